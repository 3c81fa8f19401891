//! Shared helpers for onceflow's integration tests. The tests themselves are in `tests/`;
//! every one of them runs against a real Apache Kafka broker from `onceflow::testkit`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A name no other test (in this run or an earlier one against the same cluster) uses.
#[must_use]
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!("{prefix}-{}-{t}-{n}", std::process::id())
}

/// Sends `tracing` output to the test's captured output (shown for failing tests, or with
/// `--show-output`). Safe to call from every test.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,librdkafka=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use onceflow::testkit::{self, Isolation, Kafka, ReadRecord};
use onceflow::{Pipeline, PipelineConfig, PipelineConfigBuilder, RunSummary};
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};

/// The input of the exactly-once scenarios: one event of one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique over the whole input: the correlation key between input and output.
    pub id: u64,
    /// The key; all of one user's events must stay in order.
    pub user: String,
    /// Position of this event within its user's events (0, 1, 2, ...).
    pub seq: u64,
}

/// The output: the event, transformed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enriched {
    /// The input's id.
    pub id: u64,
    /// The input's user.
    pub user: String,
    /// The input's seq.
    pub seq: u64,
    /// A derived field (so the transform is not a copy).
    pub amount_cents: u64,
}

/// The events `0..n` spread over `users` users, in per-user order.
#[must_use]
pub fn events(n: u64, users: u64) -> Vec<Event> {
    let mut seqs: HashMap<u64, u64> = HashMap::new();
    (0..n)
        .map(|id| {
            let u = id % users;
            let seq = seqs.entry(u).or_default();
            let e = Event {
                id,
                user: format!("user-{u}"),
                seq: *seq,
            };
            *seq += 1;
            e
        })
        .collect()
}

/// Produces raw (key, value) pairs with Java-compatible key routing, idempotently, and waits
/// for every acknowledgement.
pub async fn produce_raw(kafka: &Kafka, topic: &str, records: &[(String, Vec<u8>)]) {
    produce_raw_with(&input_producer(kafka), topic, records).await;
}

/// A transactional producer with `transactional_id` (acks=all, idempotent, 30 s transaction
/// timeout), not yet initialised: the tests that take a transactional id directly use it.
pub fn transactional_producer(
    kafka: &Kafka,
    transactional_id: &str,
) -> ThreadedProducer<DefaultProducerContext> {
    kafka
        .client_config()
        .set("transactional.id", transactional_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("transaction.timeout.ms", "30000")
        .create()
        .expect("transactional producer")
}

/// The idempotent, Java-partitioned producer the tests write input with.
pub fn input_producer(kafka: &Kafka) -> FutureProducer {
    input_producer_config(kafka).create().expect("producer")
}

/// [`input_producer`]'s configuration, for a test that changes one setting of it.
pub fn input_producer_config(kafka: &Kafka) -> rdkafka::ClientConfig {
    let mut config = kafka.client_config();
    config
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5");
    config
}

/// [`produce_raw`] with an existing producer.
///
/// Records are enqueued strictly in slice order, so one key's records land on its partition in
/// that order (the idempotent producer keeps enqueue order through retries). Why not
/// `FutureProducer::send` for each record and join them: when librdkafka's queue is full
/// (100,000 records by default) each refused send sleeps 100 ms and tries again, and the
/// sleepers wake in no particular order — the scenarios' per-user order checks then failed on
/// input that was already out of order. Here a refused record waits for the oldest delivery
/// instead, and nothing after it is enqueued first.
pub async fn produce_raw_with(
    producer: &FutureProducer,
    topic: &str,
    records: &[(String, Vec<u8>)],
) {
    let mut pending = std::collections::VecDeque::new();
    for (k, v) in records {
        let mut record = FutureRecord::to(topic)
            .key(k.as_str())
            .payload(v.as_slice());
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push_back(delivery);
                    break;
                }
                Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    record = back;
                    // Another caller's records may fill a shared producer's queue.
                    match pending.pop_front() {
                        Some(oldest) => acknowledged(oldest.await),
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((e, _)) => panic!("input record not enqueued: {e}"),
            }
        }
    }
    for delivery in pending {
        acknowledged(delivery.await);
    }
}

/// Panics unless a delivery succeeded.
fn acknowledged(
    delivery: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) {
    delivery
        .expect("delivery report")
        .map_err(|(e, _)| e)
        .expect("input record acknowledged");
}

/// Produces `events` as JSON keyed by user.
pub async fn produce_events(kafka: &Kafka, topic: &str, events: &[Event]) {
    produce_events_with(&input_producer(kafka), topic, events).await;
}

/// [`produce_events`] with an existing producer.
pub async fn produce_events_with(producer: &FutureProducer, topic: &str, events: &[Event]) {
    let raw: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|e| (e.user.clone(), serde_json::to_vec(e).expect("json")))
        .collect();
    produce_raw_with(producer, topic, &raw).await;
}

/// A pipeline configuration for tests: short commit interval, quick sessions.
#[must_use]
pub fn test_config(kafka: &Kafka, app: &str, instance: &str, input: &str) -> PipelineConfigBuilder {
    PipelineConfig::builder()
        .bootstrap_servers(kafka.bootstrap_servers())
        .application_id(app)
        .instance_id(instance)
        .input_topic(input)
        .consumer_property("session.timeout.ms", "6000")
        .consumer_property("heartbeat.interval.ms", "500")
}

/// A pipeline running in the background.
#[derive(Debug)]
pub struct Running {
    /// Stops it.
    pub shutdown: onceflow::ShutdownHandle,
    /// Its result.
    pub handle: tokio::task::JoinHandle<Result<RunSummary, onceflow::Error>>,
}

impl Running {
    /// Starts `pipeline` on the current runtime.
    pub fn start<P, C>(pipeline: Pipeline<P, C>) -> Self
    where
        P: onceflow::Processor,
        C: onceflow::codec::Codec<P::Input>,
    {
        let shutdown = pipeline.shutdown_handle();
        let handle = tokio::spawn(pipeline.run());
        Self { shutdown, handle }
    }

    /// Graceful stop; returns the run's figures.
    pub async fn stop(self) -> RunSummary {
        self.shutdown.shutdown();
        self.handle
            .await
            .expect("pipeline task")
            .expect("pipeline stopped cleanly")
    }
}

/// Waits until `group` has committed, for every partition of `topic`, the partition's end
/// offset: every input record's processing is committed.
pub async fn wait_caught_up(kafka: &Kafka, group: &str, topic: &str, timeout: Duration) {
    let started = Instant::now();
    loop {
        // A fetch can fail while the group rebalances; that is a reason to look again.
        let state = offsets(kafka, group, topic).await;
        if let Ok((ends, committed)) = &state
            && ends
                .iter()
                .all(|(p, end)| committed.get(p).copied().flatten() == Some(*end))
        {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "group {group} did not catch up with {topic} within {timeout:?}: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

type Offsets = (BTreeMap<i32, i64>, BTreeMap<i32, Option<i64>>);

/// End offsets and the group's committed offsets of `topic`.
pub async fn offsets(kafka: &Kafka, group: &str, topic: &str) -> Result<Offsets, String> {
    let (b, g, t) = (
        kafka.bootstrap_servers().to_owned(),
        group.to_owned(),
        topic.to_owned(),
    );
    tokio::task::spawn_blocking(move || {
        let ends = testkit::end_offsets_blocking(&b, &t, Isolation::ReadUncommitted)
            .map_err(|e| e.to_string())?;
        let committed =
            testkit::committed_offsets_blocking(&b, &g, &t).map_err(|e| e.to_string())?;
        Ok((ends, committed))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Waits until `group` has committed at least `n` offsets in total on `topic`.
pub async fn wait_progress(kafka: &Kafka, group: &str, topic: &str, n: i64, timeout: Duration) {
    let started = Instant::now();
    loop {
        let state = offsets(kafka, group, topic).await;
        let total: i64 = state
            .as_ref()
            .map(|(_, committed)| committed.values().map(|o| o.unwrap_or(0)).sum())
            .unwrap_or(0);
        if total >= n {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "group {group} committed only {total} of {n} offsets within {timeout:?}: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `counter` reaches `n`.
pub async fn wait_count(
    counter: &std::sync::atomic::AtomicU64,
    n: u64,
    what: &str,
    timeout: Duration,
) {
    let started = Instant::now();
    while counter.load(std::sync::atomic::Ordering::SeqCst) < n {
        assert!(
            started.elapsed() < timeout,
            "{what} did not reach {n} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads `topic` back under `isolation`.
pub async fn read(kafka: &Kafka, topic: &str, isolation: Isolation) -> Vec<ReadRecord> {
    testkit::read_all(
        kafka.bootstrap_servers(),
        topic,
        isolation,
        Duration::from_secs(60),
    )
    .await
    .expect("read back")
}

/// What a read-back of the output says about exactly-once.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Outputs read.
    pub outputs: usize,
    /// Ids seen more than once.
    pub duplicates: Vec<u64>,
    /// Expected ids never seen.
    pub missing: Vec<u64>,
    /// Ids seen that were not expected.
    pub unexpected: Vec<u64>,
    /// Outputs of one user whose seq did not increase along their partition.
    pub order_violations: usize,
    /// The first order violation: where it is and which seqs, for the failure message.
    pub first_order_violation: Option<String>,
    /// Outputs not on the partition the Java client would pick for their key.
    pub misrouted: usize,
    /// Outputs whose value is not the expected transform of their input.
    pub wrong_values: usize,
}

impl Verdict {
    /// Panics with the figures unless the output is exactly-once and in order.
    pub fn assert_exactly_once(&self) {
        assert!(
            self.duplicates.is_empty()
                && self.missing.is_empty()
                && self.unexpected.is_empty()
                && self.order_violations == 0
                && self.misrouted == 0
                && self.wrong_values == 0,
            "exactly-once violated: {} outputs, {} duplicates (first {:?}), {} missing (first {:?}), \
             {} unexpected, {} order violations (first: {}), {} misrouted, {} wrong values",
            self.outputs,
            self.duplicates.len(),
            self.duplicates.iter().take(10).collect::<Vec<_>>(),
            self.missing.len(),
            self.missing.iter().take(10).collect::<Vec<_>>(),
            self.unexpected.len(),
            self.order_violations,
            self.first_order_violation.as_deref().unwrap_or("none"),
            self.misrouted,
            self.wrong_values
        );
    }
}

/// The transform the scenarios' processors apply.
#[must_use]
pub fn enrich(e: &Event) -> Enriched {
    Enriched {
        id: e.id,
        user: e.user.clone(),
        seq: e.seq,
        amount_cents: e.id * 3 + 7,
    }
}

/// Checks outputs (as read back) against the expected inputs: each expected event exactly once,
/// correctly transformed, one user's events in seq order along their partition, on the
/// partition the Java client would pick among `partitions`.
#[must_use]
pub fn verify(expected: &[Event], outputs: &[ReadRecord], partitions: i32) -> Verdict {
    let by_id: HashMap<u64, &Event> = expected.iter().map(|e| (e.id, e)).collect();
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    let mut verdict = Verdict {
        outputs: outputs.len(),
        ..Verdict::default()
    };
    let mut order = OrderCheck::default();
    for r in outputs {
        let Ok(out) = serde_json::from_slice::<Enriched>(r.value.as_deref().unwrap_or_default())
        else {
            verdict.wrong_values += 1;
            continue;
        };
        *seen.entry(out.id).or_default() += 1;
        match by_id.get(&out.id) {
            Some(e) if enrich(e) == out => {}
            Some(_) => verdict.wrong_values += 1,
            None => verdict.unexpected.push(out.id),
        }
        let key = r.key.as_deref().unwrap_or_default();
        if onceflow::partitioner::partition_for_key(key, partitions) != Some(r.partition) {
            verdict.misrouted += 1;
        }
        order.observe(r.partition, r.offset, &out.user, out.seq, out.id);
    }
    verdict.order_violations = order.violations;
    verdict.first_order_violation = order.first;
    verdict.duplicates = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    let seen_ids: BTreeSet<u64> = seen.keys().copied().collect();
    verdict.missing = expected
        .iter()
        .map(|e| e.id)
        .filter(|id| !seen_ids.contains(id))
        .collect();
    verdict
}

/// Per-user order along each partition: one user's seqs must increase in offset order.
#[derive(Debug, Default)]
pub struct OrderCheck {
    /// Per (partition, user): the last seq seen and the offset it was at.
    last: HashMap<(i32, String), (u64, i64)>,
    /// Records whose seq did not increase.
    pub violations: usize,
    /// The first of them: where it is and which seqs.
    pub first: Option<String>,
}

impl OrderCheck {
    /// Notes record `id` (`user`'s `seq`) at `offset` of `partition`; call in offset order.
    pub fn observe(&mut self, partition: i32, offset: i64, user: &str, seq: u64, id: u64) {
        let slot = (partition, user.to_owned());
        if let Some(&(prev_seq, prev_offset)) = self.last.get(&slot)
            && seq <= prev_seq
        {
            self.violations += 1;
            self.first.get_or_insert_with(|| {
                format!(
                    "{user} on partition {partition}: seq {seq} (id {id}) at offset {offset} \
                     after seq {prev_seq} at offset {prev_offset}"
                )
            });
        }
        self.last.insert(slot, (seq, offset));
    }
}

/// Checks a verdict's negative: read_uncommitted must show more records than read_committed
/// when aborts happened. Returns (committed, uncommitted, ids seen more than once uncommitted).
#[must_use]
pub fn aborted_copies(
    committed: &[ReadRecord],
    uncommitted: &[ReadRecord],
) -> (usize, usize, usize) {
    let mut counts: HashMap<u64, usize> = HashMap::new();
    for r in uncommitted {
        if let Ok(out) = serde_json::from_slice::<Enriched>(r.value.as_deref().unwrap_or_default())
        {
            *counts.entry(out.id).or_default() += 1;
        }
    }
    (
        committed.len(),
        uncommitted.len(),
        counts.values().filter(|n| **n > 1).count(),
    )
}
