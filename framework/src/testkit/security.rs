//! Authentication and authorization for the embedded broker: SASL/PLAIN users, and the ACLs a
//! test grants them.
//!
//! Why: a pipeline whose principal lacks a permission must stop with a clear error, never retry
//! for ever or sit idle (guide, section 5). librdkafka's mock cluster can only inject the error
//! codes; a real broker with a real authorizer shows which requests are refused, and that the
//! ACLs the guide lists are enough. rust-rdkafka has no ACL API, so [`create_acls_blocking`]
//! calls librdkafka's `rd_kafka_CreateAcls` directly.

use std::ffi::{CStr, CString, c_char};
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::AdminClient;
use rdkafka::bindings as rd;
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use super::error::{Result, TestkitError};

/// A user of the embedded broker's SASL listener (see
/// [`KafkaOptions::sasl_users`](super::KafkaOptions::sasl_users)). `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SaslUser {
    /// The user name; its principal is `User:<name>`.
    pub name: String,
    /// The password.
    pub password: String,
}

impl fmt::Debug for SaslUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaslUser")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl SaslUser {
    /// Names and passwords go into the broker's JAAS configuration as they are, so they are
    /// kept to characters that need no quoting there.
    pub(crate) fn check(&self) -> Result<()> {
        let plain = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if plain(&self.name) && plain(&self.password) {
            Ok(())
        } else {
            Err(TestkitError::Unsupported(format!(
                "SASL user {:?}: names and passwords must be non-empty and made of letters, digits, \
                 '-' and '_'",
                self.name
            )))
        }
    }
}

/// What an [`Acl`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AclResource {
    /// A topic.
    Topic,
    /// A consumer group.
    Group,
    /// A producer's `transactional.id`.
    TransactionalId,
    /// The cluster (its name is `kafka-cluster`).
    Cluster,
}

/// What an [`Acl`] allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AclOperation {
    /// `READ` (implies `DESCRIBE`).
    Read,
    /// `WRITE` (implies `DESCRIBE`).
    Write,
    /// `DESCRIBE`.
    Describe,
    /// `CREATE`.
    Create,
    /// `IDEMPOTENT_WRITE` (on the cluster).
    IdempotentWrite,
    /// `ALL`.
    All,
}

/// One ACL: `principal` is allowed `operation` on the resource named `name` (or, if
/// `prefixed`, on every resource of its kind whose name starts with `name`), from any host.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Acl {
    /// E.g. `User:payments`.
    pub principal: String,
    /// What is allowed.
    pub operation: AclOperation,
    /// The kind of resource.
    pub resource: AclResource,
    /// The resource's name, or a prefix of it.
    pub name: String,
    /// Whether `name` is a prefix. Default false (the name itself).
    pub prefixed: bool,
}

impl Acl {
    /// Allows `principal` (e.g. `User:payments`) `operation` on the resource named `name`.
    #[must_use]
    pub fn allow(
        principal: impl Into<String>,
        operation: AclOperation,
        resource: AclResource,
        name: impl Into<String>,
    ) -> Self {
        Self {
            principal: principal.into(),
            operation,
            resource,
            name: name.into(),
            prefixed: false,
        }
    }

    /// The same ACL for every resource whose name starts with this one's.
    #[must_use]
    pub fn prefixed(mut self) -> Self {
        self.prefixed = true;
        self
    }
}

/// How long the broker has to answer `CreateAcls`.
const ACL_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates `acls` through an admin client made from `config`. Blocks until the broker answers;
/// run it on a blocking thread.
#[allow(
    unsafe_code,
    reason = "rust-rdkafka has no ACL API; this calls librdkafka's CreateAcls directly"
)]
pub(crate) fn create_acls_blocking(config: &ClientConfig, acls: &[Acl]) -> Result<()> {
    if acls.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> =
        config.create().map_err(|source| TestkitError::Admin {
            context: "creating an admin client for ACLs".into(),
            source,
        })?;
    let rk = admin.inner().native_ptr();
    let failed = |acl: Option<&Acl>, code: RDKafkaErrorCode, why: String| TestkitError::Admin {
        context: match acl {
            Some(acl) => format!("creating ACL {acl:?}: {why}"),
            None => format!("creating ACLs: {why}"),
        },
        source: KafkaError::AdminOp(code),
    };

    // Owns what librdkafka allocated, whatever happens below.
    struct Owned {
        bindings: Vec<*mut rd::rd_kafka_AclBinding_t>,
        queue: *mut rd::rd_kafka_queue_t,
        event: *mut rd::rd_kafka_event_t,
    }
    impl Drop for Owned {
        fn drop(&mut self) {
            // SAFETY: each pointer is null or was returned by librdkafka's matching
            // constructor and is destroyed only here, once.
            unsafe {
                if !self.event.is_null() {
                    rd::rd_kafka_event_destroy(self.event);
                }
                if !self.queue.is_null() {
                    rd::rd_kafka_queue_destroy(self.queue);
                }
                for &b in &self.bindings {
                    rd::rd_kafka_AclBinding_destroy(b);
                }
            }
        }
    }
    let mut owned = Owned {
        bindings: Vec::with_capacity(acls.len()),
        queue: std::ptr::null_mut(),
        event: std::ptr::null_mut(),
    };

    let c_string = |what: &str, s: &str| {
        CString::new(s).map_err(|_| {
            failed(
                None,
                RDKafkaErrorCode::InvalidArgument,
                format!("{what} {s:?} contains a NUL byte"),
            )
        })
    };
    let host = c_string("host", "*")?;
    for acl in acls {
        let name = c_string("resource name", &acl.name)?;
        let principal = c_string("principal", &acl.principal)?;
        let mut errstr: [c_char; 512] = [0; 512];
        // SAFETY: the strings are NUL-terminated and outlive the call (librdkafka copies
        // them); `errstr` is writable for its stated length.
        let binding = unsafe {
            rd::rd_kafka_AclBinding_new(
                resource_type(acl.resource),
                name.as_ptr(),
                if acl.prefixed {
                    rd::rd_kafka_ResourcePatternType_t::RD_KAFKA_RESOURCE_PATTERN_PREFIXED
                } else {
                    rd::rd_kafka_ResourcePatternType_t::RD_KAFKA_RESOURCE_PATTERN_LITERAL
                },
                principal.as_ptr(),
                host.as_ptr(),
                operation(acl.operation),
                rd::rd_kafka_AclPermissionType_t::RD_KAFKA_ACL_PERMISSION_TYPE_ALLOW,
                errstr.as_mut_ptr(),
                errstr.len(),
            )
        };
        if binding.is_null() {
            // SAFETY: librdkafka wrote a NUL-terminated message into `errstr`.
            let why = unsafe { CStr::from_ptr(errstr.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            return Err(failed(Some(acl), RDKafkaErrorCode::InvalidArgument, why));
        }
        owned.bindings.push(binding);
    }

    let timeout_ms = i32::try_from(ACL_TIMEOUT.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `rk` is the admin client's live handle (`admin` outlives `owned`'s use of it);
    // the bindings array is valid for the call, and librdkafka copies what it keeps; the
    // result arrives on `queue` as one event, destroyed by `owned`.
    unsafe {
        owned.queue = rd::rd_kafka_queue_new(rk);
        rd::rd_kafka_CreateAcls(
            rk,
            owned.bindings.as_mut_ptr(),
            owned.bindings.len(),
            std::ptr::null_mut(),
            owned.queue,
        );
        owned.event = rd::rd_kafka_queue_poll(owned.queue, timeout_ms);
    }
    if owned.event.is_null() {
        return Err(failed(
            None,
            RDKafkaErrorCode::RequestTimedOut,
            format!("no answer within {ACL_TIMEOUT:?}"),
        ));
    }
    // SAFETY: `owned.event` is a live event; the strings and arrays read here belong to it
    // and are read before it is destroyed.
    unsafe {
        let err = rd::rd_kafka_event_error(owned.event);
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            let why = CStr::from_ptr(rd::rd_kafka_event_error_string(owned.event))
                .to_string_lossy()
                .into_owned();
            return Err(failed(None, RDKafkaErrorCode::from(err), why));
        }
        let result = rd::rd_kafka_event_CreateAcls_result(owned.event);
        if result.is_null() {
            return Err(failed(
                None,
                RDKafkaErrorCode::Fail,
                "the answer was not a CreateAcls result".into(),
            ));
        }
        let mut n = 0usize;
        let results = rd::rd_kafka_CreateAcls_result_acls(result, &raw mut n);
        for (i, acl) in acls.iter().enumerate().take(n) {
            let error = rd::rd_kafka_acl_result_error(*results.add(i));
            if !error.is_null() {
                let code = RDKafkaErrorCode::from(rd::rd_kafka_error_code(error));
                let why = CStr::from_ptr(rd::rd_kafka_error_string(error))
                    .to_string_lossy()
                    .into_owned();
                return Err(failed(Some(acl), code, why));
            }
        }
        if n != acls.len() {
            return Err(failed(
                None,
                RDKafkaErrorCode::Fail,
                format!("{n} results for {} ACLs", acls.len()),
            ));
        }
    }
    drop(owned);
    drop(admin);
    Ok(())
}

fn resource_type(r: AclResource) -> rd::rd_kafka_ResourceType_t {
    use rd::rd_kafka_ResourceType_t as T;
    match r {
        AclResource::Topic => T::RD_KAFKA_RESOURCE_TOPIC,
        AclResource::Group => T::RD_KAFKA_RESOURCE_GROUP,
        AclResource::TransactionalId => T::RD_KAFKA_RESOURCE_TRANSACTIONAL_ID,
        AclResource::Cluster => T::RD_KAFKA_RESOURCE_BROKER,
    }
}

fn operation(o: AclOperation) -> rd::rd_kafka_AclOperation_t {
    use rd::rd_kafka_AclOperation_t as O;
    match o {
        AclOperation::Read => O::RD_KAFKA_ACL_OPERATION_READ,
        AclOperation::Write => O::RD_KAFKA_ACL_OPERATION_WRITE,
        AclOperation::Describe => O::RD_KAFKA_ACL_OPERATION_DESCRIBE,
        AclOperation::Create => O::RD_KAFKA_ACL_OPERATION_CREATE,
        AclOperation::IdempotentWrite => O::RD_KAFKA_ACL_OPERATION_IDEMPOTENT_WRITE,
        AclOperation::All => O::RD_KAFKA_ACL_OPERATION_ALL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_password_stays_out_of_debug_and_odd_characters_are_refused() {
        let user = SaslUser {
            name: "app".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{user:?}").contains("s3cret"));
        assert!(user.check().is_ok());
        let quoted = SaslUser {
            name: "app".into(),
            password: "a\"b".into(),
        };
        assert!(quoted.check().is_err());
    }
}
