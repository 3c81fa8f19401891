//! The consumer side: a `read_committed` group consumer that never commits by itself.
//!
//! Offsets are committed only through the producer's transaction (see
//! [`crate::producer`]), so this consumer has auto commit and the offset store turned off; it
//! reads with `isolation.level=read_committed`, so records of aborted or still-open upstream
//! transactions are never processed. Rebalance handling is in [`crate::rebalance`].

use std::sync::Arc;

use rdkafka::ClientConfig;
use rdkafka::Timestamp;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message, OwnedHeaders};

use crate::config::{PipelineConfig, StartFrom};
use crate::error::Error;

/// Creates the pipeline's consumer (not yet subscribed).
pub(crate) fn create<Ctx: ConsumerContext>(
    config: &PipelineConfig,
    context: Ctx,
) -> Result<BaseConsumer<Ctx>, Error> {
    let mut cc = ClientConfig::new();
    for (k, v) in config
        .kafka_properties
        .iter()
        .chain(config.consumer_properties.iter())
    {
        cc.set(k, v);
    }
    cc.set("bootstrap.servers", &config.bootstrap_servers)
        .set("group.id", &config.application_id)
        .set(
            "client.id",
            format!("{}-{}", config.application_id, config.instance_id),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        .set(
            "partition.assignment.strategy",
            config.assignment_strategy.as_config(),
        )
        .set(
            "auto.offset.reset",
            match config.start_from {
                StartFrom::Earliest => "earliest",
                StartFrom::Latest => "latest",
            },
        );
    // librdkafka queues each partition's fetched records in one run; with the default 1 MiB per
    // partition a single partition can fill many batches while the others wait. Smaller runs
    // interleave partitions, which the transaction loop needs to process them in parallel.
    let tuned = |k: &str| {
        config.consumer_properties.contains_key(k) || config.kafka_properties.contains_key(k)
    };
    if !tuned("max.partition.fetch.bytes") && !tuned("fetch.message.max.bytes") {
        cc.set("max.partition.fetch.bytes", "262144");
    }
    // A fetch for partitions with no new data waits this long at the broker; a partition the
    // loop resumes waits for that fetch to return before it is fetched again.
    if !tuned("fetch.wait.max.ms") {
        cc.set("fetch.wait.max.ms", "100");
    }
    // librdkafka stops fetching while its queue holds `queued.min.messages` records (its
    // default 100,000; onceflow sets 30,000 below) and then waits
    // `fetch.queue.backoff.ms` (default 1 s) before it looks again. A pipeline that drains
    // faster than that leaves the queue empty for most of the second: the transaction loop
    // measured polls that found nothing for 400–600 ms at a time, at ~60% of the throughput
    // it reached with 10 ms.
    if !tuned("fetch.queue.backoff.ms") {
        cc.set("fetch.queue.backoff.ms", "10");
    }
    // librdkafka's default prefetch is up to 64 MiB and 100,000 records; with the loop's own
    // buffer behind it, 8 MiB and 30,000 records kept the benchmark's throughput and cut the
    // worker's peak memory from 67 to 43 MiB at 100 B records (and its CPU per record: fewer
    // records in flight, fewer cache misses and less allocator churn). See docs/benchmarks.md.
    if !tuned("queued.max.messages.kbytes") {
        cc.set("queued.max.messages.kbytes", "8192");
    }
    if !tuned("queued.min.messages") {
        cc.set("queued.min.messages", "30000");
    }
    cc.create_with_context(context)
        .map_err(|e| Error::kafka("creating the consumer", e))
}

/// Routes librdkafka's log lines into `tracing` (target `librdkafka`).
pub(crate) fn log_librdkafka(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", fac, "{message}");
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

/// The context of the short-lived reading clients (verify, the offset toolkit, the testkit's
/// read-back): reaching the end of a partition is what they wait for, and connection chatter
/// belongs in the debug log, not in a command's output.
pub(crate) struct QuietContext;

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if matches!(
            level,
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical
        ) {
            log_librdkafka(level, fac, message);
        } else {
            tracing::debug!(target: "librdkafka", fac, "{message}");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF) {
            tracing::debug!(%error, reason, "reader client error");
        }
    }
}

impl ConsumerContext for QuietContext {}

/// A polled input record, owned by onceflow until its transaction commits.
///
/// rust-rdkafka's `OwnedMessage` (what `BorrowedMessage::detach` makes) copies the topic name
/// into a `String` for every record; here all records of a partition share one `Arc<str>`, and
/// the key is moved into the processor's [`Record`](crate::Record) and back rather than copied
/// again. The key and value are copied once, out of librdkafka's fetch buffer, so the buffer
/// can be released while the record waits for processing.
#[derive(Debug, Clone)]
pub(crate) struct Polled {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) timestamp: Timestamp,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) headers: Option<OwnedHeaders>,
}

impl Polled {
    /// Copies `m` out of librdkafka; `topic` is its topic's shared name.
    pub(crate) fn copy_of<M: Message>(m: &M, topic: Arc<str>) -> Self {
        Self {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            timestamp: m.timestamp(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: m.headers().map(|hs| {
                hs.iter().fold(OwnedHeaders::new(), |acc, h| {
                    acc.insert(rdkafka::message::Header {
                        key: h.key,
                        value: h.value,
                    })
                })
            }),
        }
    }

    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    pub(crate) fn partition(&self) -> i32 {
        self.partition
    }

    pub(crate) fn offset(&self) -> i64 {
        self.offset
    }

    pub(crate) fn timestamp(&self) -> Timestamp {
        self.timestamp
    }

    pub(crate) fn headers(&self) -> Option<&OwnedHeaders> {
        self.headers.as_ref()
    }

    pub(crate) fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    pub(crate) fn payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }

    /// Key and value bytes: what the record costs in the loop's buffer.
    pub(crate) fn size(&self) -> usize {
        self.payload.as_ref().map_or(0, Vec::len) + self.key.as_ref().map_or(0, Vec::len)
    }
}
