//! Dead letters: the original record, sent to the dead-letter topic inside the same
//! transaction that advances its input offset, with headers that say what went wrong.
//!
//! The original key, value and headers are kept byte for byte, so a dead letter can be
//! inspected, fixed and replayed. The headers onceflow adds (names below) let an operator find
//! the source record and the reason without decoding anything.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::consumer::Polled;

use crate::processor::OutputRecord;

/// Header: the error message.
pub const HEADER_ERROR: &str = "onceflow.dlq.error";
/// Header: what failed — `decode`, `processor` or `retries_exhausted`.
pub const HEADER_ERROR_KIND: &str = "onceflow.dlq.error.kind";
/// Header: the input topic.
pub const HEADER_SOURCE_TOPIC: &str = "onceflow.dlq.source.topic";
/// Header: the input partition (decimal).
pub const HEADER_SOURCE_PARTITION: &str = "onceflow.dlq.source.partition";
/// Header: the input offset (decimal).
pub const HEADER_SOURCE_OFFSET: &str = "onceflow.dlq.source.offset";
/// Header: the input record's timestamp, ms since the epoch (decimal), when it had one.
pub const HEADER_SOURCE_TIMESTAMP: &str = "onceflow.dlq.source.timestamp";
/// Header: when the record was dead-lettered, ms since the epoch (decimal).
pub const HEADER_TIME: &str = "onceflow.dlq.time";
/// Header: how many times processing was attempted (decimal).
pub const HEADER_ATTEMPTS: &str = "onceflow.dlq.attempts";
/// Header: the instance that dead-lettered it.
pub const HEADER_INSTANCE: &str = "onceflow.dlq.instance";

/// Why a record is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadLetterKind {
    Decode,
    Processor,
    RetriesExhausted,
}

impl DeadLetterKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Decode => "decode",
            Self::Processor => "processor",
            Self::RetriesExhausted => "retries_exhausted",
        }
    }
}

/// The dead letter for `original`.
pub(crate) fn record(
    topic: &str,
    original: &Polled,
    kind: DeadLetterKind,
    reason: &str,
    attempts: u32,
    instance: &str,
) -> OutputRecord {
    let mut out = OutputRecord::to(topic);
    if let Some(k) = original.key() {
        out = out.key(k);
    }
    // Shared with the input record, not copied.
    out.value.clone_from(&original.payload);
    out.headers = original.headers().clone();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    out = out
        .header(HEADER_ERROR, reason)
        .header(HEADER_ERROR_KIND, kind.as_str())
        .header(HEADER_SOURCE_TOPIC, original.topic())
        .header(HEADER_SOURCE_PARTITION, original.partition().to_string())
        .header(HEADER_SOURCE_OFFSET, original.offset().to_string())
        .header(HEADER_TIME, now.to_string())
        .header(HEADER_ATTEMPTS, attempts.to_string())
        .header(HEADER_INSTANCE, instance);
    if let Some(ts) = original.timestamp().to_millis() {
        out = out.header(HEADER_SOURCE_TIMESTAMP, ts.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processor::Headers;
    use rdkafka::Timestamp;

    #[test]
    fn keeps_the_original_and_names_the_error() {
        let original = Polled {
            payload: Some(bytes::Bytes::from_static(b"{bad")),
            key: Some(b"user-1".to_vec()),
            topic: "orders".into(),
            timestamp: Timestamp::CreateTime(1_700_000_000_000),
            partition: 2,
            offset: 41,
            headers: {
                let mut h = Headers::new();
                h.insert("trace_id", "t-9");
                h
            },
        };
        let dl = record(
            "orders.dlq",
            &original,
            DeadLetterKind::Decode,
            "invalid JSON",
            1,
            "i-0",
        );
        assert_eq!(dl.topic(), "orders.dlq");
        assert_eq!(dl.value_bytes(), Some(&b"{bad"[..]));
        assert_eq!(dl.key_bytes(), Some(&b"user-1"[..]));
        assert_eq!(dl.headers.get_str("trace_id"), Some("t-9"));
        assert_eq!(dl.headers.get_str(HEADER_ERROR), Some("invalid JSON"));
        assert_eq!(dl.headers.get_str(HEADER_ERROR_KIND), Some("decode"));
        assert_eq!(dl.headers.get_str(HEADER_SOURCE_TOPIC), Some("orders"));
        assert_eq!(dl.headers.get_str(HEADER_SOURCE_PARTITION), Some("2"));
        assert_eq!(dl.headers.get_str(HEADER_SOURCE_OFFSET), Some("41"));
        assert_eq!(
            dl.headers.get_str(HEADER_SOURCE_TIMESTAMP),
            Some("1700000000000")
        );
        assert!(dl.headers.get_str(HEADER_TIME).is_some());
    }
}
