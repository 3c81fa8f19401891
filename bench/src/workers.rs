//! The processing side of each mode: what runs inside the measured child process.
//!
//! The Rust modes run as this binary with `--worker`; the Kafka Streams modes run as a JVM
//! (see [`crate::kstreams`]). Every worker prints `ready` on stdout once it holds its
//! partitions, so the harness can start the clock at the same point for all of them, and
//! every worker keeps the input record's timestamp on its output, so the latency phase can
//! read end-to-end latency off the output.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use onceflow::{
    Output, OutputRecord, Pipeline, PipelineConfig, ProcessError, Processor, Record, TopicPartition,
};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

/// The commit interval of the at-least-once baseline and of the Kafka Streams modes: the same
/// as onceflow's default, which is the row the others are compared with.
pub const BASELINE_COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// One benchmark record's value (JSON). `pad` brings it to the requested size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Item {
    pub id: u64,
    pub user: String,
    pub pad: String,
    #[serde(default)]
    pub enriched: bool,
}

impl Item {
    /// The JSON value of record `id` (key `user-<id mod 10,000>`), padded to `size` bytes.
    pub fn value(id: u64, size: usize) -> anyhow::Result<(String, Vec<u8>)> {
        let user = format!("user-{}", id % 10_000);
        let mut item = Self {
            id,
            user: user.clone(),
            pad: String::new(),
            enriched: false,
        };
        let base = serde_json::to_vec(&item)?.len();
        item.pad = "x".repeat(size.saturating_sub(base));
        Ok((user, serde_json::to_vec(&item)?))
    }
}

/// The transform every mode applies: parse, enrich a field, re-serialise.
pub fn transform(value: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut item: Item = serde_json::from_slice(value)?;
    item.enriched = true;
    Ok(serde_json::to_vec(&item)?)
}

/// Prints `ready` once per process: the harness's signal that partitions are assigned.
fn announce_ready() {
    static READY: AtomicBool = AtomicBool::new(false);
    if !READY.swap(true, Ordering::SeqCst) {
        let mut out = std::io::stdout().lock();
        // The harness treats a worker that never says ready as failed; nothing to do here.
        let _ = writeln!(out, "ready").and_then(|()| out.flush());
    }
}

/// Runs one Rust mode until the harness kills the process.
pub async fn run(
    mode: &str,
    bootstrap: &str,
    input: &str,
    output: &str,
    group: &str,
) -> anyhow::Result<()> {
    let interval = match mode {
        "ceiling" | "at-least-once" | "transactional-copy" => {
            let (mode, b, i, o, g) = (
                mode.to_owned(),
                bootstrap.to_owned(),
                input.to_owned(),
                output.to_owned(),
                group.to_owned(),
            );
            return tokio::task::spawn_blocking(move || match mode.as_str() {
                "transactional-copy" => transactional_copy_loop(&b, &i, &o, &g),
                _ => {
                    let commit = (mode == "at-least-once").then_some(BASELINE_COMMIT_INTERVAL);
                    copy_loop(&b, &i, &o, &g, commit)
                }
            })
            .await?;
        }
        "onceflow-10ms" => Duration::from_millis(10),
        "onceflow-100ms" => Duration::from_millis(100),
        "onceflow-1s" => Duration::from_secs(1),
        other => bail!("unknown worker mode {other}"),
    };
    let config = PipelineConfig::builder()
        .bootstrap_servers(bootstrap)
        .application_id(group)
        .instance_id("0")
        .input_topic(input)
        .commit_interval(interval)
        .stamp_source(false)
        .build()?;
    Pipeline::new(config, Enrich(Arc::from(output)))
        .with_codec(onceflow::codec::Json)
        .run()
        .await?;
    Ok(())
}

/// The onceflow mode's processor: the same transform, written the way onceflow is meant to be
/// used — the `Json` codec parses the value into an [`Item`] (a record that does not parse is
/// dead-lettered by the runtime), the processor re-serialises it with `enriched` set, keyed
/// output (the input's timestamp is kept by the runtime). The output bytes are the same as
/// [`transform`]'s (a unit test checks).
struct Enrich(Arc<str>);

/// An [`Item`] with `enriched` set, serialised from borrowed fields (the processor sees the
/// input by reference).
#[derive(Serialize)]
struct Enriched<'a> {
    id: u64,
    user: &'a str,
    pad: &'a str,
    enriched: bool,
}

impl<'a> Enriched<'a> {
    fn of(item: &'a Item) -> Self {
        Self {
            id: item.id,
            user: &item.user,
            pad: &item.pad,
            enriched: true,
        }
    }
}

#[async_trait::async_trait]
impl Processor for Enrich {
    type Input = Item;

    async fn process(&self, r: &Record<Item>, out: &mut Output) -> Result<(), ProcessError> {
        let mut o = OutputRecord::to(&self.0).json(&Enriched::of(&r.value))?;
        if let Some(k) = &r.key {
            o = o.key(k.as_slice());
        }
        out.send(o);
        Ok(())
    }

    async fn on_partitions_assigned(&self, partitions: &[TopicPartition]) {
        if !partitions.is_empty() {
            announce_ready();
        }
    }
}

/// Announces readiness after the first non-empty assignment.
struct ReadyContext;

impl ClientContext for ReadyContext {}

impl ConsumerContext for ReadyContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance
            && tpl.count() > 0
        {
            announce_ready();
        }
    }
}

/// The baselines with plain rdkafka: consume, transform, produce (idempotent, acks=all); with
/// `commit_every`, flush and commit the consumed offsets at that interval (at-least-once).
#[allow(
    clippy::disallowed_methods,
    reason = "a dedicated blocking thread; sleeping on a full queue is its back-pressure"
)]
fn copy_loop(
    bootstrap: &str,
    input: &str,
    output: &str,
    group: &str,
    commit_every: Option<Duration>,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer<ReadyContext> =
        baseline_consumer(bootstrap, group).create_with_context(ReadyContext)?;
    consumer.subscribe(&[input])?;
    let producer: ThreadedProducer<DefaultProducerContext> =
        baseline_producer(bootstrap).create()?;
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut last_commit = Instant::now();
    loop {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            copy_one(&m, output, &producer)?;
            next.insert(m.partition(), m.offset() + 1);
        }
        if let Some(every) = commit_every
            && last_commit.elapsed() >= every
            && !next.is_empty()
        {
            flush(&producer, Duration::from_secs(30))?;
            let mut tpl = TopicPartitionList::new();
            for (p, o) in &next {
                tpl.add_partition_offset(input, *p, Offset::Offset(*o))?;
            }
            consumer.commit(&tpl, CommitMode::Sync)?;
            next.clear();
            last_commit = Instant::now();
        }
    }
}

/// The Rust baselines' consumer settings: librdkafka's defaults, no automatic commits.
fn baseline_consumer(bootstrap: &str, group: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // As onceflow sets it: librdkafka's 1 s default stalls a consumer that drains its
        // queue quickly (see framework/src/consumer.rs).
        .set("fetch.queue.backoff.ms", "10");
    config
}

/// The Rust baselines' producer settings: idempotent, `acks=all`, Java-compatible key routing.
fn baseline_producer(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random");
    config
}

/// The baselines' work on one input record: [`transform`] its value and produce it to
/// `output` with the input's key and timestamp.
fn copy_one<M: Message>(
    m: &M,
    output: &str,
    producer: &ThreadedProducer<DefaultProducerContext>,
) -> anyhow::Result<()> {
    let value = transform(m.payload().unwrap_or_default())?;
    let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(output).payload(&value);
    if let Some(k) = m.key() {
        record = record.key(k);
    }
    if let Some(ts) = m.timestamp().to_millis() {
        record = record.timestamp(ts);
    }
    send_waiting(producer, record)
}

/// The at-least-once copy made exactly-once by hand with rust-rdkafka's transactional API, as
/// a user without onceflow would write it for one instance that never fails: a
/// `read_committed` consumer, and every [`BASELINE_COMMIT_INTERVAL`] the producer flushed and
/// the consumed offsets sent into its transaction, which then commits.
///
/// Why it is here: it separates what the transactions themselves cost on this broker and host
/// from what onceflow's runtime costs on top (`onceflow-100ms ÷ transactional-copy`). So it gets
/// the same two tricks onceflow uses against the commit's wait, and nothing else of onceflow's:
/// two transactional producers take turns, and each commit (`send_offsets_to_transaction`, then
/// `commit_transaction`) runs on a thread of its own while the next transaction already runs on
/// the other producer. Before the next commit is sent, the previous one must have finished, so
/// the group's offsets only move forward. Everything else is at-least-once's: librdkafka's
/// default consumer and producer settings, one thread polling, transforming and producing.
///
/// What it leaves out, and a real application could not: no rebalance handling (a partition
/// revoked mid-transaction would be committed by whoever gets it next *and* by this
/// transaction), no abort and rewind on a failed produce or commit (any error ends the
/// worker), no dead letters, no bound on memory (librdkafka prefetches up to 64 MiB).
#[expect(
    clippy::disallowed_methods,
    reason = "a benchmark baseline on a dedicated blocking thread: it makes the transactional \
              calls itself, without onceflow's producer side (that is its point), and waits out \
              a full producer queue with a sleep"
)]
fn transactional_copy_loop(
    bootstrap: &str,
    input: &str,
    output: &str,
    group: &str,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(30);
    let consumer: BaseConsumer<ReadyContext> = baseline_consumer(bootstrap, group)
        .set("isolation.level", "read_committed")
        .create_with_context(ReadyContext)?;
    consumer.subscribe(&[input])?;
    let producer = |name: &str| -> anyhow::Result<Arc<ThreadedProducer<DefaultProducerContext>>> {
        let p: ThreadedProducer<DefaultProducerContext> = baseline_producer(bootstrap)
            .set("transactional.id", format!("{group}-{name}"))
            .create()?;
        p.init_transactions(timeout)?;
        Ok(Arc::new(p))
    };
    let producers = [producer("a")?, producer("b")?];
    let mut current = 0;
    producers[current].begin_transaction()?;
    // The commit of the other producer's transaction, running.
    let mut committing: Option<std::thread::JoinHandle<anyhow::Result<()>>> = None;
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut last_commit = Instant::now();
    loop {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            copy_one(&m, output, &producers[current])?;
            next.insert(m.partition(), m.offset() + 1);
        }
        if last_commit.elapsed() >= BASELINE_COMMIT_INTERVAL && !next.is_empty() {
            // Every output acknowledged first: the next transaction's outputs go through the
            // other producer and could otherwise reach a partition before these, putting a
            // key's outputs out of order.
            let p = Arc::clone(&producers[current]);
            flush(&p, timeout)?;
            let mut offsets = TopicPartitionList::new();
            for (partition, offset) in &next {
                offsets.add_partition_offset(input, *partition, Offset::Offset(*offset))?;
            }
            let Some(group_metadata) = consumer.group_metadata() else {
                bail!("the consumer has no group metadata");
            };
            if let Some(previous) = committing.take() {
                previous
                    .join()
                    .map_err(|_| anyhow::anyhow!("the commit thread panicked"))??;
            }
            committing = Some(std::thread::spawn(move || {
                p.send_offsets_to_transaction(&offsets, &group_metadata, timeout)?;
                p.commit_transaction(timeout)?;
                Ok(())
            }));
            current = 1 - current;
            producers[current].begin_transaction()?;
            next.clear();
            last_commit = Instant::now();
        }
    }
}

/// Waits until every produced record is acknowledged. Not `producer.flush`: with a
/// `ThreadedProducer`, rust-rdkafka's flush polls for up to 100 ms at a time while the
/// producer's own thread takes the delivery reports, so each flush would cost ~100 ms and
/// handicap this baseline (onceflow waits the same way before it commits).
#[allow(
    clippy::disallowed_methods,
    reason = "a dedicated blocking thread; the check every millisecond is the wait"
)]
fn flush(
    producer: &ThreadedProducer<DefaultProducerContext>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        // Returns at once; wakes the broker threads to send lingering batches now.
        let _ = producer.flush(Duration::ZERO);
        if producer.in_flight_count() == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("records still unacknowledged after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Enqueues `record`, waiting while librdkafka's queue is full (the producer's thread drains it
/// as the broker acknowledges).
#[allow(
    clippy::disallowed_methods,
    reason = "a dedicated blocking thread; sleeping on a full queue is its back-pressure"
)]
pub fn send_waiting<K, P>(
    producer: &ThreadedProducer<DefaultProducerContext>,
    mut record: BaseRecord<'_, K, P>,
) -> anyhow::Result<()>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((e, back))
                if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
            {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onceflow_processor_writes_what_the_baselines_write() -> anyhow::Result<()> {
        for size in [100, 1024] {
            let (_, value) = Item::value(42, size)?;
            let item: Item = serde_json::from_slice(&value)?;
            let output = OutputRecord::to("out").json(&Enriched::of(&item))?;
            assert_eq!(output.value_bytes(), Some(transform(&value)?.as_slice()));
        }
        Ok(())
    }
}
