//! The consumer side: a `read_committed` group consumer that never commits by itself.
//!
//! Offsets are committed only through the producer's transaction (see
//! [`crate::producer`]), so this consumer has auto commit and the offset store turned off; it
//! reads with `isolation.level=read_committed`, so records of aborted or still-open upstream
//! transactions are never processed. Rebalance handling is in [`crate::rebalance`].

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::error::KafkaError;

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
    // librdkafka stops fetching while its queue holds `queued.min.messages` (100,000) records —
    // counted over all partitions, as they share the consumer queue — and then waits
    // `fetch.queue.backoff.ms` (default 1 s) before it looks again. A pipeline that drains
    // faster than that leaves the queue empty for most of the second: the transaction loop
    // measured polls that found nothing for 400–600 ms at a time, at ~60% of the throughput
    // it reached with 10 ms.
    if !tuned("fetch.queue.backoff.ms") {
        cc.set("fetch.queue.backoff.ms", "10");
    }
    // librdkafka's default prefetch is up to 64 MiB; with the loop's own buffer (≤ 16 MiB)
    // 16 MiB is ample at any rate measured (docs/benchmarks.md), and keeps an instance's
    // memory small and bounded.
    if !tuned("queued.max.messages.kbytes") {
        cc.set("queued.max.messages.kbytes", "16384");
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
