//! Authentication and authorization for the embedded broker: SASL/PLAIN users, and the ACLs a
//! test grants them.
//!
//! Why: a pipeline whose principal lacks a permission must stop with a clear error, never retry
//! for ever or sit idle (guide, section 5). librdkafka's mock cluster can only inject the error
//! codes; a real broker with a real authorizer shows which requests are refused, and that the
//! ACLs the guide lists are enough. rust-rdkafka has no ACL API, so [`create_acls_blocking`]
//! calls librdkafka's `rd_kafka_CreateAcls` (and `rd_kafka_DescribeAcls`) directly.

use std::ffi::{CStr, CString, c_char};
use std::fmt;
use std::time::{Duration, Instant};

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

/// How long the broker has to answer `CreateAcls`, and then to show every new ACL.
const ACL_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates `acls` through an admin client made from `config`, and returns once the broker
/// enforces them. Blocks; run it on a blocking thread.
///
/// Why wait after `CreateAcls` has answered: in KRaft the controller answers once the ACLs are
/// committed to the metadata log, and the broker's authorizer applies them a moment later, when
/// it reads that log. A client that connects in between is refused. `DescribeAcls` is answered
/// from the broker's authorizer, so once it lists an ACL, the ACL is enforced.
#[allow(
    unsafe_code,
    reason = "rust-rdkafka has no ACL API; this calls librdkafka's CreateAcls and DescribeAcls"
)]
#[expect(
    clippy::disallowed_methods,
    reason = "runs on a blocking thread (spawn_blocking in Kafka::create_acls)"
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

    let mut bindings = Bindings(Vec::with_capacity(acls.len()));
    for acl in acls {
        bindings.0.push(new_binding(acl, Binding::Acl)?);
    }
    // SAFETY: `rk` is the admin client's live handle (`admin` outlives every use of it here);
    // the bindings array is valid for the call and stays owned by `bindings` (librdkafka copies
    // what it keeps).
    let answer = AdminEvent::call(rk, |queue| unsafe {
        rd::rd_kafka_CreateAcls(
            rk,
            bindings.0.as_mut_ptr(),
            bindings.0.len(),
            std::ptr::null_mut(),
            queue,
        );
    })?;
    answer.check()?;
    // SAFETY: the result and its array belong to `answer`, alive until the end of this block.
    unsafe {
        let result = rd::rd_kafka_event_CreateAcls_result(answer.event);
        if result.is_null() {
            return Err(failed(
                None,
                RDKafkaErrorCode::Fail,
                "the answer was not a CreateAcls result",
            ));
        }
        let mut n = 0usize;
        let results = rd::rd_kafka_CreateAcls_result_acls(result, &raw mut n);
        if n != acls.len() {
            return Err(failed(
                None,
                RDKafkaErrorCode::Fail,
                format!("{n} results for {} ACLs", acls.len()),
            ));
        }
        for (i, acl) in acls.iter().enumerate() {
            let error = rd::rd_kafka_acl_result_error(*results.add(i));
            if !error.is_null() {
                let code = RDKafkaErrorCode::from(rd::rd_kafka_error_code(error));
                let why = CStr::from_ptr(rd::rd_kafka_error_string(error))
                    .to_string_lossy()
                    .into_owned();
                return Err(failed(Some(acl), code, why));
            }
        }
    }
    drop(answer);
    drop(bindings);

    let deadline = Instant::now() + ACL_TIMEOUT;
    for acl in acls {
        let filter = Bindings(vec![new_binding(acl, Binding::Filter)?]);
        for tries in 1.. {
            // SAFETY: as for CreateAcls; the filter stays owned by `filter`.
            let answer = AdminEvent::call(rk, |queue| unsafe {
                rd::rd_kafka_DescribeAcls(rk, filter.0[0], std::ptr::null(), queue);
            })?;
            answer.check()?;
            // SAFETY: the result belongs to `answer`, alive for this block.
            let listed = unsafe {
                let result = rd::rd_kafka_event_DescribeAcls_result(answer.event);
                let mut n = 0usize;
                if !result.is_null() {
                    rd::rd_kafka_DescribeAcls_result_acls(result, &raw mut n);
                }
                n
            };
            if listed > 0 {
                tracing::debug!(?acl, tries, "ACL enforced");
                break;
            }
            if Instant::now() > deadline {
                return Err(failed(
                    Some(acl),
                    RDKafkaErrorCode::RequestTimedOut,
                    format!("created, but the broker did not list it within {ACL_TIMEOUT:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(admin);
    Ok(())
}

fn failed(acl: Option<&Acl>, code: RDKafkaErrorCode, why: impl fmt::Display) -> TestkitError {
    TestkitError::Admin {
        context: match acl {
            Some(acl) => format!("creating ACL {acl:?}: {why}"),
            None => format!("creating ACLs: {why}"),
        },
        source: KafkaError::AdminOp(code),
    }
}

/// ACL bindings (or filters) librdkafka allocated, destroyed with this.
struct Bindings(Vec<*mut rd::rd_kafka_AclBinding_t>);

impl Drop for Bindings {
    #[allow(unsafe_code, reason = "frees what librdkafka allocated")]
    fn drop(&mut self) {
        for &b in &self.0 {
            // SAFETY: each was returned by `rd_kafka_AclBinding_new` or
            // `rd_kafka_AclBindingFilter_new` and is destroyed only here, once.
            unsafe { rd::rd_kafka_AclBinding_destroy(b) };
        }
    }
}

/// Which of librdkafka's constructors [`new_binding`] calls.
#[derive(Clone, Copy)]
enum Binding {
    /// An ACL to create.
    Acl,
    /// A filter that matches exactly that ACL.
    Filter,
}

#[allow(unsafe_code, reason = "librdkafka's ACL binding constructors")]
fn new_binding(acl: &Acl, kind: Binding) -> Result<*mut rd::rd_kafka_AclBinding_t> {
    let c_string = |what: &str, s: &str| {
        CString::new(s).map_err(|_| {
            failed(
                Some(acl),
                RDKafkaErrorCode::InvalidArgument,
                format!("{what} {s:?} contains a NUL byte"),
            )
        })
    };
    let name = c_string("resource name", &acl.name)?;
    let principal = c_string("principal", &acl.principal)?;
    let host = c_string("host", "*")?;
    let pattern = if acl.prefixed {
        rd::rd_kafka_ResourcePatternType_t::RD_KAFKA_RESOURCE_PATTERN_PREFIXED
    } else {
        rd::rd_kafka_ResourcePatternType_t::RD_KAFKA_RESOURCE_PATTERN_LITERAL
    };
    let constructor = match kind {
        Binding::Acl => rd::rd_kafka_AclBinding_new,
        Binding::Filter => rd::rd_kafka_AclBindingFilter_new,
    };
    let mut errstr: [c_char; 512] = [0; 512];
    // SAFETY: the strings are NUL-terminated and outlive the call (librdkafka copies them);
    // `errstr` is writable for its stated length.
    let binding = unsafe {
        constructor(
            resource_type(acl.resource),
            name.as_ptr(),
            pattern,
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
    Ok(binding)
}

/// The answer to one admin request, on a queue of its own; both destroyed with this.
struct AdminEvent {
    queue: *mut rd::rd_kafka_queue_t,
    event: *mut rd::rd_kafka_event_t,
}

impl AdminEvent {
    /// Makes a queue, lets `request` send the request with it, and waits for the answer.
    #[allow(unsafe_code, reason = "librdkafka's queue and event API")]
    fn call(
        rk: *mut rd::rd_kafka_t,
        request: impl FnOnce(*mut rd::rd_kafka_queue_t),
    ) -> Result<Self> {
        // SAFETY: `rk` is a live client handle (the caller's admin client).
        let queue = unsafe { rd::rd_kafka_queue_new(rk) };
        let mut this = Self {
            queue,
            event: std::ptr::null_mut(),
        };
        request(this.queue);
        let timeout_ms = i32::try_from(ACL_TIMEOUT.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `this.queue` is the live queue the request answers on.
        this.event = unsafe { rd::rd_kafka_queue_poll(this.queue, timeout_ms) };
        if this.event.is_null() {
            return Err(failed(
                None,
                RDKafkaErrorCode::RequestTimedOut,
                format!("no answer within {ACL_TIMEOUT:?}"),
            ));
        }
        Ok(this)
    }

    /// The request's own error, if it failed as a whole.
    #[allow(unsafe_code, reason = "librdkafka's event API")]
    fn check(&self) -> Result<()> {
        // SAFETY: `self.event` is a live event; its error string belongs to it.
        unsafe {
            let err = rd::rd_kafka_event_error(self.event);
            if err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                return Ok(());
            }
            let why = CStr::from_ptr(rd::rd_kafka_event_error_string(self.event))
                .to_string_lossy()
                .into_owned();
            Err(failed(None, RDKafkaErrorCode::from(err), why))
        }
    }
}

impl Drop for AdminEvent {
    #[allow(unsafe_code, reason = "frees what librdkafka allocated")]
    fn drop(&mut self) {
        // SAFETY: each pointer is null or was returned by librdkafka's matching constructor
        // and is destroyed only here, once; the event before its queue.
        unsafe {
            if !self.event.is_null() {
                rd::rd_kafka_event_destroy(self.event);
            }
            if !self.queue.is_null() {
                rd::rd_kafka_queue_destroy(self.queue);
            }
        }
    }
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
