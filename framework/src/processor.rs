//! The [`Processor`] trait: the one thing a onceflow user writes.
//!
//! # The contract
//!
//! A processor turns one input record into zero or more output records. The runtime calls
//! [`Processor::process`] for each input record and owns everything else.
//!
//! **What is atomic.** All output records emitted for an input record, any dead letter written
//! for it, and the advance of its input offset are committed in one Kafka transaction — or none
//! of them is. A `read_committed` reader of the outputs sees each input's effects exactly once.
//! Effects *outside* Kafka (an HTTP call, a database write) are not part of the transaction: make
//! them idempotent, or keep them out of `process`.
//!
//! **What may be called again.** A transaction is aborted when any record in it fails with
//! [`ProcessError::retry`], when the broker or a rebalance forces it, or when the process dies
//! before it commits. Then every input record of that transaction is processed **again**, in
//! the same order, possibly by another instance. (The next batch is processed while a commit
//! runs, its outputs held for the next transaction; if that commit fails, the batch's records
//! are processed again too, after [`Processor::on_transaction_aborted`].) So `process` must be
//! a deterministic function of its input (and of state rebuilt from committed data): never
//! derive an output from a clock, a random number or a counter kept in memory across
//! transactions without resetting it in [`Processor::on_transaction_aborted`].
//!
//! **Ordering.** Records of one input partition are processed one at a time, in offset order,
//! and their outputs are produced in that order. Records of different partitions may be
//! processed concurrently (so `process` takes `&self`: keep shared state behind a lock). A
//! keyed output goes to the partition the Java client would pick (murmur2), so one key's
//! outputs stay in order on one partition.
//!
//! **Errors.** A [`ProcessError`] says what should happen to the record:
//! * [`retry`](ProcessError::retry): transient (a dependency timed out). The transaction is
//!   aborted, the runtime backs off, and the record is processed again. After
//!   `max_attempts` attempts it is dead-lettered instead, so a poison record cannot stall its
//!   partition forever.
//! * [`dead_letter`](ProcessError::dead_letter): this record can never succeed (invalid
//!   content). The original record goes to the dead-letter topic, in the same transaction, with
//!   headers naming the error; its offset advances; nothing else it emitted is kept.
//! * [`fatal`](ProcessError::fatal): the pipeline must stop (a broken invariant). The open
//!   transaction is aborted and `run` returns the error.
//!
//! **Hooks** (all optional, no-op by default) run one at a time on the pipeline's own threads
//! (never on your runtime's), between batches — never while `process` runs for the instance: [`on_partitions_assigned`](Processor::on_partitions_assigned) after new
//! partitions are assigned and before their first record;
//! [`on_partitions_revoked`](Processor::on_partitions_revoked) after the open transaction was
//! committed (or aborted, if the assignment was lost) and before the partitions go to another
//! instance; [`on_transaction_aborted`](Processor::on_transaction_aborted) after an abort, with
//! the partitions whose records will be processed again — drop in-memory state built since the
//! last commit; [`on_close`](Processor::on_close) once, after the last commit.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

/// The lineage header onceflow adds to every output record (unless
/// [`stamp_source(false)`](crate::PipelineConfigBuilder::stamp_source)): the input record it came
/// from, as `topic/partition/offset`. `onceflow verify` matches outputs to inputs with it.
pub const SOURCE_HEADER: &str = "onceflow.source";

/// Parses a [`SOURCE_HEADER`] value into (topic, partition, offset).
#[must_use]
pub fn parse_source(value: &str) -> Option<(&str, i32, i64)> {
    let (rest, offset) = value.rsplit_once('/')?;
    let (topic, partition) = rest.rsplit_once('/')?;
    Some((topic, partition.parse().ok()?, offset.parse().ok()?))
}
use serde::Serialize;

use crate::error::BoxError;

/// A topic and partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
}

impl TopicPartition {
    /// A topic-partition.
    #[must_use]
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// One record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Name.
    pub key: String,
    /// Value (`None` is a null header value).
    pub value: Option<Vec<u8>>,
}

/// A record's headers, in order. Names may repeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<Header>);

impl Headers {
    /// No headers.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a header.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.0.push(Header {
            key: key.into(),
            value: Some(value.into()),
        });
    }

    /// Appends a header with a null value.
    pub fn insert_null(&mut self, key: impl Into<String>) {
        self.0.push(Header {
            key: key.into(),
            value: None,
        });
    }

    /// The value of the last header called `key`, if it has one.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .rev()
            .find(|h| h.key == key)
            .and_then(|h| h.value.as_deref())
    }

    /// [`get`](Self::get) as UTF-8, if it is.
    #[must_use]
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// All headers in order.
    pub fn iter(&self) -> impl Iterator<Item = &Header> {
        self.0.iter()
    }

    /// Number of headers.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<Header> for Headers {
    fn from_iter<I: IntoIterator<Item = Header>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// One decoded input record, as [`Processor::process`] sees it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Record<T> {
    /// The decoded value.
    pub value: T,
    /// The key bytes (`None` for an unkeyed record).
    pub key: Option<Vec<u8>>,
    /// The input record's headers as they were produced: in order, names repeated, null
    /// values kept. Copy them onto an output with
    /// [`OutputRecord::headers_from`] to carry trace context along.
    pub headers: Headers,
    /// Input topic.
    pub topic: Arc<str>,
    /// Input partition.
    pub partition: i32,
    /// Input offset.
    pub offset: i64,
    /// Timestamp in ms since the epoch, when the record has one.
    pub timestamp: Option<i64>,
}

impl<T> Record<T> {
    /// A record for unit-testing a processor without Kafka.
    #[must_use]
    pub fn new(topic: &str, partition: i32, offset: i64, value: T) -> Self {
        Self {
            value,
            key: None,
            headers: Headers::new(),
            topic: Arc::from(topic),
            partition,
            offset,
            timestamp: None,
        }
    }

    /// Sets the key (for tests).
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header (for tests).
    #[must_use]
    pub fn with_header(mut self, key: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.insert(key, value);
        self
    }

    /// The key as UTF-8, if it is.
    #[must_use]
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }
}

/// One record to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRecord {
    pub(crate) topic: Arc<str>,
    pub(crate) key: Option<Vec<u8>>,
    /// Shared, not copied: [`OutputRecord::json`] writes values into blocks several outputs
    /// share (see `codec::encode_json`), and a dead letter shares its input's value.
    pub(crate) value: Option<Bytes>,
    pub(crate) headers: Headers,
    pub(crate) partition: Option<i32>,
    pub(crate) timestamp: Option<i64>,
}

/// What [`OutputRecord::to`] accepts as a topic name.
///
/// Output records share their topic name as an `Arc<str>`. A `&str`, `String` or `&String` is
/// copied into a new one for each record; an `Arc<str>` (or a reference to one) is shared, so
/// a processor that keeps its output topic as an `Arc<str>` allocates nothing for it per
/// record.
pub trait IntoTopic {
    /// The shared topic name.
    fn into_topic(self) -> Arc<str>;
}

impl IntoTopic for &str {
    fn into_topic(self) -> Arc<str> {
        Arc::from(self)
    }
}

impl IntoTopic for String {
    fn into_topic(self) -> Arc<str> {
        Arc::from(self)
    }
}

impl IntoTopic for &String {
    fn into_topic(self) -> Arc<str> {
        Arc::from(self.as_str())
    }
}

impl IntoTopic for Arc<str> {
    fn into_topic(self) -> Arc<str> {
        self
    }
}

impl IntoTopic for &Arc<str> {
    fn into_topic(self) -> Arc<str> {
        Arc::clone(self)
    }
}

impl OutputRecord {
    /// A record for `topic` with no key, no value and no headers.
    ///
    /// A `&str` or `String` topic is copied into a new shared string; a processor that
    /// produces many records can keep its topic as an `Arc<str>` and pass `&topic`, which
    /// costs no allocation per record (see [`IntoTopic`]):
    ///
    /// ```
    /// use std::sync::Arc;
    /// use onceflow::OutputRecord;
    ///
    /// let topic: Arc<str> = Arc::from("payments.enriched");
    /// let record = OutputRecord::to(&topic).value("{}");
    /// assert_eq!(record.topic(), "payments.enriched");
    /// assert_eq!(Arc::strong_count(&topic), 2); // shared, not copied
    /// ```
    #[must_use]
    pub fn to(topic: impl IntoTopic) -> Self {
        Self {
            topic: topic.into_topic(),
            key: None,
            value: None,
            headers: Headers::new(),
            partition: None,
            timestamp: None,
        }
    }

    /// Sets the key. A keyed record goes to the partition the Java client would pick.
    #[must_use]
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the value bytes.
    #[must_use]
    pub fn value(mut self, value: impl Into<Vec<u8>>) -> Self {
        self.value = Some(Bytes::from(value.into()));
        self
    }

    /// Sets the value to `value` as JSON (the bytes `serde_json::to_vec` writes).
    ///
    /// Cheaper than calling `serde_json::to_vec` yourself: the value is written straight into
    /// a per-thread block that neighbouring outputs share, instead of into a vector grown from
    /// empty, allocated and freed per record (see `docs/benchmarks.md`). A value serde cannot
    /// encode (a map with non-string keys, a failing `Serialize` impl) is a
    /// [fatal](ProcessError::fatal) error.
    pub fn json<V: Serialize + ?Sized>(mut self, value: &V) -> Result<Self, ProcessError> {
        let bytes = crate::codec::encode_json(value).map_err(ProcessError::fatal)?;
        self.value = Some(bytes);
        Ok(self)
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.insert(key, value);
        self
    }

    /// Copies all of `headers` (e.g. an input's `trace_id`) onto this record.
    #[must_use]
    pub fn headers_from(mut self, headers: &Headers) -> Self {
        for h in headers.iter() {
            self.headers.0.push(h.clone());
        }
        self
    }

    /// Forces a partition instead of key-based routing.
    #[must_use]
    pub fn partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Sets the record's timestamp (milliseconds since the Unix epoch). Without it, an output
    /// carries the timestamp of the input record it was produced for — event time survives the
    /// pipeline, as in Kafka Streams, so `offsets_for_time` on an output topic finds the outputs
    /// of the inputs from that time, and end-to-end latency can be read off any output.
    #[must_use]
    pub fn timestamp(mut self, millis: i64) -> Self {
        self.timestamp = Some(millis);
        self
    }

    /// The timestamp set with [`timestamp`](Self::timestamp), if any.
    #[must_use]
    pub fn timestamp_millis(&self) -> Option<i64> {
        self.timestamp
    }

    /// The topic.
    #[must_use]
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The value bytes.
    #[must_use]
    pub fn value_bytes(&self) -> Option<&[u8]> {
        self.value.as_deref()
    }

    /// The key bytes.
    #[must_use]
    pub fn key_bytes(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }
}

/// Where [`Processor::process`] puts its output records. They are produced after `process`
/// returns `Ok`, inside the current transaction; on an error none of them is produced.
#[derive(Debug, Default)]
pub struct Output {
    pub(crate) records: Vec<OutputRecord>,
}

impl Output {
    /// An empty output (for unit-testing a processor).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Emits a record.
    pub fn send(&mut self, record: OutputRecord) {
        self.records.push(record);
    }

    /// The records emitted so far.
    #[must_use]
    pub fn records(&self) -> &[OutputRecord] {
        &self.records
    }
}

/// What should happen to a record whose processing failed. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Abort, back off, process again (dead-letter after `max_attempts`).
    Retry,
    /// Send the original record to the dead-letter topic and go on.
    DeadLetter,
    /// Abort and stop the pipeline.
    Fatal,
}

impl Disposition {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::DeadLetter => "dead_letter",
            Self::Fatal => "fatal",
        }
    }
}

/// A processing failure and what to do about it.
#[derive(Debug)]
pub struct ProcessError {
    disposition: Disposition,
    source: BoxError,
}

impl ProcessError {
    /// Transient: abort the transaction and process the record again after a back-off.
    pub fn retry(error: impl Into<BoxError>) -> Self {
        Self {
            disposition: Disposition::Retry,
            source: error.into(),
        }
    }

    /// Permanent for this record: dead-letter it and go on.
    pub fn dead_letter(error: impl Into<BoxError>) -> Self {
        Self {
            disposition: Disposition::DeadLetter,
            source: error.into(),
        }
    }

    /// Stop the pipeline.
    pub fn fatal(error: impl Into<BoxError>) -> Self {
        Self {
            disposition: Disposition::Fatal,
            source: error.into(),
        }
    }

    /// What should happen to the record.
    #[must_use]
    pub fn disposition(&self) -> Disposition {
        self.disposition
    }

    /// The underlying error.
    #[must_use]
    pub fn into_source(self) -> BoxError {
        self.source
    }
}

impl std::fmt::Display for ProcessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.source, self.disposition.as_str())
    }
}

impl std::error::Error for ProcessError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// The user's transformation. One required method; every hook has a no-op default.
/// See the [module docs](self) for the contract.
#[async_trait]
pub trait Processor: Send + Sync + 'static {
    /// The decoded input value type (the pipeline's codec produces it).
    type Input: Send + Sync + 'static;

    /// Processes one input record, emitting zero or more outputs into `out`.
    async fn process(
        &self,
        record: &Record<Self::Input>,
        out: &mut Output,
    ) -> Result<(), ProcessError>;

    /// New partitions were assigned; their first records come next.
    async fn on_partitions_assigned(&self, _partitions: &[TopicPartition]) {}

    /// Partitions are being taken away; the open transaction was already committed (or
    /// aborted, if the assignment was lost).
    async fn on_partitions_revoked(&self, _partitions: &[TopicPartition]) {}

    /// A transaction was aborted; records of these partitions since their last commit will be
    /// processed again. Drop in-memory state built from them.
    async fn on_transaction_aborted(&self, _partitions: &[TopicPartition]) {}

    /// The pipeline is stopping; called once after the last commit.
    async fn on_close(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_header_round_trips() {
        assert_eq!(parse_source("orders.v1/3/42"), Some(("orders.v1", 3, 42)));
        assert_eq!(parse_source("a/b/c"), None);
        assert_eq!(parse_source("nope"), None);
    }

    #[test]
    fn headers_get_the_last_value() {
        let mut h = Headers::new();
        h.insert("trace_id", "a");
        h.insert("trace_id", "b");
        h.insert_null("empty");
        assert_eq!(h.get_str("trace_id"), Some("b"));
        assert_eq!(h.get("empty"), None);
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn output_record_builds() {
        let mut input = Headers::new();
        input.insert("trace_id", "t-1");
        let r = OutputRecord::to("out")
            .key("user-1")
            .json(&serde_json::json!({"a": 1}))
            .unwrap()
            .headers_from(&input)
            .header("x", "y");
        assert_eq!(r.topic(), "out");
        assert_eq!(r.key_bytes(), Some(&b"user-1"[..]));
        assert_eq!(r.value_bytes(), Some(&br#"{"a":1}"#[..]));
        assert_eq!(r.headers.get_str("trace_id"), Some("t-1"));
    }

    #[test]
    fn process_error_keeps_its_disposition() {
        assert_eq!(ProcessError::retry("x").disposition(), Disposition::Retry);
        assert_eq!(
            ProcessError::dead_letter("x").disposition(),
            Disposition::DeadLetter
        );
        assert_eq!(ProcessError::fatal("x").disposition(), Disposition::Fatal);
        assert!(ProcessError::retry("boom").to_string().contains("boom"));
    }
}
