//! One error type for the runtime, and the three-way class every error has.
//!
//! Kafka's transactional API fails in three ways, and doing the wrong thing with any of them
//! loses or duplicates data:
//!
//! | class | meaning | what onceflow does |
//! | --- | --- | --- |
//! | [`ErrorClass::Retriable`] | the call may succeed if made again; the transaction is intact | calls the same operation again (a commit that timed out is retried, **never** aborted: its outcome is unknown, and aborting after an indefinite commit is how Jepsen found lost writes, KAFKA-17754) |
//! | [`ErrorClass::Abortable`] | this transaction cannot commit, the producer can go on | aborts, rewinds every touched partition to its last committed offset, runs the processor's abort hook, continues |
//! | [`ErrorClass::Fatal`] | the producer can never commit again (fenced by a newer instance, misconfigured, ...) | stops this instance with the error |
//!
//! An error librdkafka flags as none of the three is treated as fatal: when in doubt, stopping
//! is safe (the next instance resolves the transaction), guessing is not.
//!
//! One exception to librdkafka's flags: a refusal that the broker would repeat on every retry
//! — an output record it does not accept, a missing permission — is fatal here even where
//! librdkafka flags it abortable ([`Error::Refused`]). Aborting would process the same records
//! again, produce the same outputs or ask for the same permission, and be refused again: a
//! loop that aborts every commit interval, for ever, with every partition of the instance
//! held still behind it.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// A boxed error from user code.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What the runtime does about an error. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Make the same call again.
    Retriable,
    /// Abort the transaction, rewind, go on.
    Abortable,
    /// Stop this instance.
    Fatal,
}

/// Everything that can stop a pipeline or fail one of its operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration was refused before anything connected.
    #[error("invalid onceflow configuration: {field}: {problem}")]
    Config {
        /// The setting at fault.
        field: String,
        /// What is wrong and how to fix it.
        problem: String,
    },

    /// A Kafka operation failed.
    #[error("{operation} failed: {source}")]
    Kafka {
        /// What was being done, e.g. "commit_transaction".
        operation: &'static str,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },

    /// This instance's producer was fenced: it must never commit again.
    #[error(
        "this instance (transactional.id {transactional_id}) was fenced and has stopped: another \
         producer with the same transactional.id started (a restart or a duplicate deployment of \
         this instance) and took over, so this one's open transaction was aborted by the broker. \
         Nothing it processed since its last commit is visible to read_committed readers; the \
         newer instance reprocesses it. If no other instance was started, check that instance ids \
         are unique per running process. Cause: {source}"
    )]
    Fenced {
        /// The fenced transactional id.
        transactional_id: String,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },

    /// The processor said a record's failure is fatal.
    #[error("the processor failed fatally on {topic}/{partition}@{offset}: {source}")]
    Processor {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// Input offset.
        offset: i64,
        /// The processor's error.
        #[source]
        source: BoxError,
    },

    /// A record had to be dead-lettered but the pipeline has no dead-letter topic. Stopping is
    /// the only alternative to silently dropping it.
    #[error(
        "record {topic}/{partition}@{offset} must be dead-lettered ({reason}), but no dead-letter \
         topic is configured; set PipelineConfigBuilder::dead_letter_topic"
    )]
    NoDeadLetterTopic {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// Input offset.
        offset: i64,
        /// Why it was to be dead-lettered.
        reason: String,
    },

    /// A commit whose outcome is unknown kept failing as retriable. The instance stops without
    /// aborting; the next instance with this transactional id resolves the transaction.
    #[error(
        "{operation} did not complete within {waited:?} (last error: {source}); stopping without \
         aborting, because the outcome is unknown: the next start of this instance resolves it"
    )]
    Unresolved {
        /// The operation.
        operation: &'static str,
        /// How long it was retried.
        waited: Duration,
        /// The last error.
        #[source]
        source: KafkaError,
    },

    /// A transactional call did not return, long past its own timeout: librdkafka lost track
    /// of it. The producer cannot be used again (librdkafka refuses every other transactional
    /// call while one is in progress), so the runtime replaces it, which aborts its
    /// transaction, and processes the records since the last commit again.
    #[error(
        "{operation} did not return within {waited:?}, past its own timeout: librdkafka lost \
         track of the call (known to happen while a coordinator's broker restarts, \
         confluentinc/librdkafka#5456 and #5511); this producer cannot be used again"
    )]
    ProducerHung {
        /// The operation.
        operation: &'static str,
        /// How long it was waited for.
        waited: Duration,
    },

    /// A transaction was aborted after librdkafka gave up on records it had already sent (the
    /// broker may have written them). The producer's sequence numbers can no longer be trusted
    /// in its current epoch, so the runtime replaces it (see `TxProducer::abort` in the
    /// producer side).
    #[error(
        "the transaction was aborted with {records} record(s) that were sent but never \
         acknowledged; this producer's next sequence numbers may collide with them in the log, \
         so it must not be used for another transaction"
    )]
    UnsafeAfterAbort {
        /// How many records were sent but never acknowledged.
        records: u64,
    },

    /// The transaction coordinator did not know the producer's id: it forgets a transactional
    /// id that has not been used for `transactional.id.expiration.ms` (7 days by default), so
    /// an instance idle for longer meets this on its first transactions. librdkafka (2.12.1)
    /// gets a new producer id by itself only when the refusal answers the registration of an
    /// output partition; when it answers the registration of the consumer's offsets — all a
    /// transaction registers when its records produced no output — the aborted transaction's
    /// successor is refused the same way, for as long as no output comes. So after the abort
    /// the runtime replaces the producer, whose `init_transactions` registers the id anew, and
    /// processes the records since the last commit again.
    #[error(
        "the transaction coordinator does not know the producer id of {transactional_id} (a \
         transactional id unused for longer than transactional.id.expiration.ms is forgotten); \
         this producer must be initialised again"
    )]
    ProducerIdUnknown {
        /// The producer's transactional id.
        transactional_id: String,
    },

    /// The broker refused an output record or an operation in a way it would repeat on every
    /// retry (see the [module docs](self)): the instance stops instead of aborting and
    /// processing the same records again for ever. Nothing since the last commit is visible to
    /// read_committed readers, and the group's offsets stay at the last commit, so once the
    /// cause is fixed a restart processes those records again, exactly once.
    ///
    /// librdkafka flags most of these abortable. Which refusals count is listed at
    /// [`classify`]; the consumer's (an input topic it may not read, a group it may not use)
    /// stop a pipeline too, at start-up or while it runs, and the offset toolkit reports a
    /// topic it may not describe with this error as well.
    #[error(
        "{operation} failed on a refusal the broker would repeat on every retry ({hint}). \
         onceflow stops instead of retrying for ever; a pipeline loses nothing by it: nothing \
         since its last commit is visible to read_committed readers, and a restart after the \
         cause is fixed processes it again. Cause: {source}"
    )]
    Refused {
        /// What was being done, e.g. "commit_transaction".
        operation: &'static str,
        /// What the refusal means and where to look.
        hint: &'static str,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },

    /// The cluster did not answer.
    #[error(
        "cannot reach Kafka at {bootstrap_servers}: {source}. Check the address, that the \
         brokers run, and the TLS/SASL settings"
    )]
    Unreachable {
        /// The bootstrap servers tried.
        bootstrap_servers: String,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },

    /// A topic does not exist. A pipeline checks its input topics at start-up, and stops with
    /// this when one is deleted while it runs, unless its consumer may have the broker create
    /// them (`allow.auto.create.topics=true`); and when the outputs of a transaction failed and
    /// the cluster's metadata says their topic does not exist.
    #[error("topic {topic} does not exist (or has no partitions)")]
    MissingTopic {
        /// The topic.
        topic: String,
    },

    /// A second shutdown signal: the open transaction was aborted and the pipeline stopped
    /// without waiting.
    #[error("shutdown was forced (second signal): the open transaction was aborted")]
    Interrupted,

    /// The pipeline's worker thread could not be started or panicked.
    #[error("the pipeline's worker thread failed: {0}")]
    Worker(String),
}

impl Error {
    /// The error's class: what the runtime does (or did) about it.
    #[must_use]
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Kafka { source, .. } => classify(source),
            Self::Config { .. }
            | Self::Fenced { .. }
            | Self::Processor { .. }
            | Self::NoDeadLetterTopic { .. }
            | Self::Unresolved { .. }
            | Self::ProducerHung { .. }
            | Self::UnsafeAfterAbort { .. }
            | Self::ProducerIdUnknown { .. }
            | Self::Refused { .. }
            | Self::Unreachable { .. }
            | Self::MissingTopic { .. }
            | Self::Interrupted
            | Self::Worker(_) => ErrorClass::Fatal,
        }
    }

    /// True when this instance was fenced by a newer one.
    #[must_use]
    pub fn is_fenced(&self) -> bool {
        matches!(self, Self::Fenced { .. })
    }

    pub(crate) fn config(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn kafka(operation: &'static str, source: KafkaError) -> Self {
        Self::Kafka { operation, source }
    }
}

/// The class of a librdkafka error, by its transactional flags — except that a refusal the
/// broker would repeat on every retry is [`ErrorClass::Fatal`] whatever its flags:
///
/// | code | what the broker refused |
/// | --- | --- |
/// | `MSG_SIZE_TOO_LARGE` | a batch of output records larger than the topic's `max.message.bytes` |
/// | `INVALID_RECORD` | an output record invalid for its topic (e.g. one without a key on a compacted topic) |
/// | `INVALID_TIMESTAMP` | an output record's timestamp outside what its topic accepts |
/// | `TOPIC_AUTHORIZATION_FAILED`, `GROUP_AUTHORIZATION_FAILED`, `CLUSTER_AUTHORIZATION_FAILED`, `TRANSACTIONAL_ID_AUTHORIZATION_FAILED` | a permission this instance's principal lacks |
#[must_use]
pub fn classify(error: &KafkaError) -> ErrorClass {
    if refusal_hint(error).is_some() {
        return ErrorClass::Fatal;
    }
    match error {
        KafkaError::Transaction(e) => {
            if e.is_fatal() {
                ErrorClass::Fatal
            } else if e.txn_requires_abort() {
                ErrorClass::Abortable
            } else if e.is_retriable() {
                ErrorClass::Retriable
            } else {
                ErrorClass::Fatal
            }
        }
        // rdkafka's commit_transaction flushes first; a flush that timed out carries no
        // transactional flags, but the transaction is intact and the commit may be made again.
        KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut) => ErrorClass::Retriable,
        _ => ErrorClass::Fatal,
    }
}

/// What a refusal the broker would repeat on every retry means (see [`classify`]), or `None`
/// for any other error.
///
/// Only errors of transactional calls count here: a record the producer refuses before sending
/// it (`send`) is a different path — it is tried again and then dead-lettered, because it is
/// known to be that record's — unless the refusal is a permission (see
/// [`permission_refusal_hint`]).
pub(crate) fn refusal_hint(error: &KafkaError) -> Option<&'static str> {
    let KafkaError::Transaction(e) = error else {
        return None;
    };
    // Transactional calls are the producer's: a topic they are refused is an output.
    hint_for(e.code(), Side::Output)
}

/// Which side of a pipeline met a refusal. A refused topic means a different missing ACL on
/// each: READ for an input, WRITE for an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The consumer, or a question about an input topic.
    Input,
    /// The producer (outputs and dead letters), or a question about an output topic.
    Output,
    /// A question about a topic that may be either (the offset toolkit's, the read-back
    /// check's): its metadata, which takes DESCRIBE.
    Any,
}

/// What an error means when it is a permission the broker refuses this instance's principal
/// (`TOPIC_`, `GROUP_`, `CLUSTER_` or `TRANSACTIONAL_ID_AUTHORIZATION_FAILED`), whatever call
/// or callback it came from; `None` for any other error.
///
/// Why a permission stops the instance wherever it shows up: the broker refuses it again on
/// every retry, and it is nobody's record's fault.
/// - A consumer refused an input topic or the group keeps asking, so the pipeline would sit idle
///   for ever, with a warning at every poll (other consumer errors are logged and polled past,
///   because librdkafka retries them itself).
/// - librdkafka refuses to queue an output for a topic the broker has refused it
///   (`TOPIC_AUTHORIZATION_FAILED` from `send`), and fails the outputs it had queued in their
///   delivery reports, after which the commit fails only as "messages failed delivery". Taken
///   for the record's fault, every record would be retried and then dead-lettered — with a
///   dead-letter topic configured, the whole input would be.
pub(crate) fn permission_refusal_hint(error: &KafkaError, side: Side) -> Option<&'static str> {
    match error.rdkafka_error_code()? {
        code @ (RDKafkaErrorCode::TopicAuthorizationFailed
        | RDKafkaErrorCode::GroupAuthorizationFailed
        | RDKafkaErrorCode::ClusterAuthorizationFailed
        | RDKafkaErrorCode::TransactionalIdAuthorizationFailed) => hint_for(code, side),
        _ => None,
    }
}

/// `e` as [`Error::Refused`] of `operation`, on `side`, when it is a permission the broker
/// refuses (see [`permission_refusal_hint`]), or `e` back for the caller's own handling.
pub(crate) fn permission_refused(
    operation: &'static str,
    side: Side,
    e: KafkaError,
) -> Result<Error, KafkaError> {
    match permission_refusal_hint(&e, side) {
        Some(hint) => Ok(Error::Refused {
            operation,
            hint,
            source: e,
        }),
        None => Err(e),
    }
}

/// Whether a consumer error says a subscribed topic or its partitions are not (or no longer)
/// in the cluster's metadata. When an input topic is deleted while the pipeline runs,
/// librdkafka reports its partitions as no longer available (`_UNKNOWN_PARTITION`), then the
/// topic as not existing (`UNKNOWN_TOPIC_OR_PART`).
pub(crate) fn names_a_missing_topic(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
        )
    )
}

/// The hint of each refusal the broker would repeat on every retry (see [`classify`]), met on
/// `side`.
///
/// Why the side: the broker answers `TOPIC_AUTHORIZATION_FAILED` whichever ACL a topic lacks,
/// and librdkafka does not name the topic in most of these errors (a refused
/// `AddPartitionsToTxn` surfaces at `send_offsets_to_transaction`). A hint that names both
/// READ and WRITE leaves an operator to guess; the side the refusal came from says which.
fn hint_for(code: RDKafkaErrorCode, side: Side) -> Option<&'static str> {
    Some(match code {
        RDKafkaErrorCode::MessageSizeTooLarge => {
            "a batch of output records is larger than its topic's max.message.bytes: keep the \
             producer's batch.size and message.max.bytes under the topic's limit, or \
             dead-letter records whose output would be larger in the processor"
        }
        RDKafkaErrorCode::InvalidRecord => {
            "an output record is invalid for its topic, e.g. a record without a key on a \
             compacted topic; the broker's log names the rule"
        }
        RDKafkaErrorCode::InvalidTimestamp => {
            "an output record's timestamp is outside what its topic accepts \
             (message.timestamp.before.max.ms / after.max.ms); outputs carry their input's \
             timestamp unless the processor sets one"
        }
        RDKafkaErrorCode::TopicAuthorizationFailed => match side {
            Side::Input => {
                "this instance's principal may not read an input topic (READ on each input \
                 topic)"
            }
            Side::Output => {
                "this instance's principal may not write an output topic (WRITE on each topic \
                 the processor sends to, and on the dead-letter topic)"
            }
            Side::Any => {
                "this principal may not describe the topic (DESCRIBE on it, which READ and \
                 WRITE imply)"
            }
        },
        RDKafkaErrorCode::GroupAuthorizationFailed => {
            "this instance's principal may not use the consumer group (READ on the group, \
             named by application_id)"
        }
        RDKafkaErrorCode::ClusterAuthorizationFailed => {
            "this instance's principal lacks a cluster permission (IDEMPOTENT_WRITE on brokers \
             older than 2.8)"
        }
        RDKafkaErrorCode::TransactionalIdAuthorizationFailed => {
            "this instance's principal may not use its transactional ids (WRITE and DESCRIBE \
             on the ids, see PipelineConfig::transactional_ids)"
        }
        _ => return None,
    })
}

/// True when the coordinator answered that it does not know the producer's id (see
/// [`Error::ProducerIdUnknown`]).
pub(crate) fn is_unknown_producer_error(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::InvalidProducerIdMapping | RDKafkaErrorCode::UnknownProducerId)
    )
}

/// True when librdkafka reports that this producer was fenced (or its epoch is stale).
pub(crate) fn is_fenced_error(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_timeout_inside_commit_is_retriable() {
        assert_eq!(
            classify(&KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)),
            ErrorClass::Retriable
        );
    }

    #[test]
    fn unknown_errors_are_fatal() {
        assert_eq!(
            classify(&KafkaError::Subscription("x".into())),
            ErrorClass::Fatal
        );
        assert_eq!(Error::Interrupted.class(), ErrorClass::Fatal);
        assert_eq!(Error::config("a", "b").class(), ErrorClass::Fatal);
    }

    #[test]
    fn a_refused_topic_names_the_acl_of_the_side_that_met_it() {
        let refused = |side| {
            let e = KafkaError::MessageConsumption(RDKafkaErrorCode::TopicAuthorizationFailed);
            match permission_refused("an operation", side, e) {
                Ok(Error::Refused { hint, .. }) => hint,
                other => panic!("expected a refusal, got {other:?}"),
            }
        };
        let input = refused(Side::Input);
        assert!(input.contains("READ on each input topic") && !input.contains("WRITE"));
        let output = refused(Side::Output);
        assert!(output.contains("WRITE on each topic") && !output.contains("READ"));
        let any = refused(Side::Any);
        assert!(any.contains("DESCRIBE on it"));
        // Other permissions read the same from every side.
        let group = KafkaError::MessageConsumption(RDKafkaErrorCode::GroupAuthorizationFailed);
        assert_eq!(
            permission_refusal_hint(&group, Side::Input),
            permission_refusal_hint(&group, Side::Output)
        );
    }

    #[test]
    fn fenced_error_explains_itself() {
        let e = Error::Fenced {
            transactional_id: "app-0".into(),
            source: KafkaError::Flush(RDKafkaErrorCode::Fenced),
        };
        let text = e.to_string();
        assert!(text.contains("app-0") && text.contains("same transactional.id"));
        assert!(e.is_fenced());
    }
}
