//! The consumer side: a `read_committed` group consumer that never commits by itself.
//!
//! Offsets are committed only through the producer's transaction (see
//! [`crate::producer`]), so this consumer has auto commit and the offset store turned off; it
//! reads with `isolation.level=read_committed`, so records of aborted or still-open upstream
//! transactions are never processed. Rebalance handling is in [`crate::rebalance`].

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use rdkafka::ClientConfig;
use rdkafka::Timestamp;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers as _, Message};

use crate::config::{PipelineConfig, StartFrom};
use crate::error::Error;
use crate::processor::Headers;

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
    // records in flight, fewer cache misses and less allocator churn). 4 MiB rather than 8:
    // at 1 KiB records the bytes are the bound that binds, and 4 MiB took ~5 MiB off the peak
    // (side by side with 6 MiB: 50.6 → 45.9 MiB) with no measured cost at 100 B, where the
    // count binds first (two runs of 3 and 4 repeats; one earlier run measured a 13 % loss
    // there). Nor on latency: single side-by-side phases near saturation once suggested a
    // longer 1 KiB p99 tail with the smaller queues, but three repeated latency-only runs
    // found no setting consistently shorter (docs/benchmarks-journal.md, "Investigations").
    if !tuned("queued.max.messages.kbytes") {
        cc.set("queued.max.messages.kbytes", "4096");
    }
    if !tuned("queued.min.messages") {
        cc.set("queued.min.messages", "30000");
    }
    cc.create_with_context(context)
        .map_err(|e| Error::kafka("creating the consumer", e))
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
            crate::client_log::log_librdkafka(level, fac, message);
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
/// can be released while the record waits for processing; the value into a block shared with
/// the partition's neighbouring records (see [`Values`]). The headers are copied once too,
/// straight into the processor's [`Headers`], and lent to the [`Record`](crate::Record) like
/// the key.
#[derive(Debug, Clone)]
pub(crate) struct Polled {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) timestamp: Timestamp,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Option<Bytes>,
    pub(crate) headers: Headers,
}

/// Where one partition's record values are copied out of librdkafka: consecutive values share
/// blocks of [`VALUE_BLOCK`] bytes, each freed when the last of its records is dropped.
///
/// Why: a value allocated and freed per record was the largest part of the worker thread's
/// allocator work (`perf`: glibc's `_int_malloc`/`_int_free`/`unlink_chunk` around half of the
/// thread at 100 B). The records of a batch are freed together, thousands at once, far more
/// than glibc's per-thread cache holds, so every free and the next poll's allocations took
/// glibc's slow paths. A shared block costs one allocation per few hundred values and a
/// reference count per record.
///
/// Per partition, because a partition's records are processed and dropped in order: its blocks
/// are freed in order too, and a record held back cannot keep other partitions' blocks alive.
/// A partition whose queue drains lets go of its block ([`Values::release`]), so an idle
/// partition holds none. Every block but the newest is at least three quarters used (a value
/// that does not fit starts a new block only when it is at most a quarter of one), so blocks
/// add at most a third to the values' bytes, plus one block per busy partition (~3 MiB for
/// 100 of them, beside the buffer's 4 MiB bound).
#[derive(Debug, Default)]
pub(crate) struct Values {
    block: BytesMut,
}

/// The size of a [`Values`] block. A value larger than a quarter of it gets a block of its own.
pub(crate) const VALUE_BLOCK: usize = 32 * 1024;

impl Values {
    /// A copy of `data`, in the current block if it has room.
    pub(crate) fn copy(&mut self, data: &[u8]) -> Bytes {
        if data.len() > VALUE_BLOCK / 4 {
            return Bytes::copy_from_slice(data);
        }
        // After a `split` the view is empty, and its capacity is the block's unused rest.
        if self.block.capacity() - self.block.len() < data.len() {
            self.block = BytesMut::with_capacity(VALUE_BLOCK);
        }
        self.block.extend_from_slice(data);
        self.block.split().freeze()
    }

    /// Lets go of the current block; the records copied into it keep it alive until dropped.
    pub(crate) fn release(&mut self) {
        self.block = BytesMut::new();
    }
}

impl Polled {
    /// Copies `m` out of librdkafka; `topic` is its topic's shared name, `values` its
    /// partition's value blocks.
    pub(crate) fn copy_of<M: Message>(m: &M, topic: Arc<str>, values: &mut Values) -> Self {
        Self {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            timestamp: m.timestamp(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(|v| values.copy(v)),
            headers: copy_headers(m),
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

    pub(crate) fn headers(&self) -> &Headers {
        &self.headers
    }

    pub(crate) fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    pub(crate) fn payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }

    /// Key, value and header bytes: what the record costs in the loop's buffer.
    pub(crate) fn size(&self) -> usize {
        self.payload.as_ref().map_or(0, Bytes::len)
            + self.key.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }
}

/// A copy of `m`'s headers, made once, straight into the processor's [`Headers`]; for a
/// record without any, an empty [`Headers`], which allocates nothing.
///
/// Why not rdkafka's `OwnedHeaders`: it is a librdkafka header list (two allocations, and a
/// copy of every header), which the processor's `Headers` then copied a second time, and
/// which was destroyed through the FFI per record. librdkafka parses the record's header
/// section on `headers()` either way; for a record without headers it reads the count from a
/// short-lived buffer and says there are none.
fn copy_headers<M: Message>(m: &M) -> Headers {
    let mut headers = Headers::new();
    if let Some(hs) = m.headers() {
        for h in hs.iter() {
            match h.value {
                Some(v) => headers.insert(h.key, v),
                None => headers.insert_null(h.key),
            }
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbouring_values_share_a_block_and_keep_their_bytes() {
        let mut values = Values::default();
        let a = values.copy(b"first value");
        let b = values.copy(b"second");
        assert_eq!(&a[..], b"first value");
        assert_eq!(&b[..], b"second");
        // One block: the second value starts where the first ends.
        assert_eq!(b.as_ptr(), a.as_ptr().wrapping_add(a.len()));

        // A value that does not fit in the rest of the block starts a new one; the old block
        // lives on in the records copied into it.
        let filler = vec![7u8; VALUE_BLOCK / 4];
        let mut copies = Vec::new();
        for _ in 0..4 {
            copies.push(values.copy(&filler));
        }
        assert!(copies.iter().all(|c| c[..] == filler[..]));
        assert_eq!(&a[..], b"first value");
        let last = copies.last().map_or(std::ptr::null(), |c| c.as_ptr());
        let prev = copies[2].as_ptr().wrapping_add(filler.len());
        assert_ne!(
            last, prev,
            "the fourth quarter-block value did not fit after the others"
        );
    }

    #[test]
    fn a_large_value_gets_its_own_allocation_and_a_released_block_is_not_reused() {
        let mut values = Values::default();
        let small = values.copy(b"small");
        let large = vec![1u8; VALUE_BLOCK / 4 + 1];
        let big = values.copy(&large);
        assert_eq!(big.len(), large.len());
        // The large value did not use the block: the next small value still follows `small`.
        let next = values.copy(b"next");
        assert_eq!(next.as_ptr(), small.as_ptr().wrapping_add(small.len()));

        values.release();
        let fresh = values.copy(b"fresh");
        assert_ne!(fresh.as_ptr(), next.as_ptr().wrapping_add(next.len()));
        assert_eq!(&fresh[..], b"fresh");
    }
}
