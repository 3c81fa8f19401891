//! The exactly-once runtime against a real broker. Every claim is checked by reading the
//! output back under read_committed (and read_uncommitted where aborts must show), never by
//! trusting the pipeline's own counters.

use std::collections::BTreeMap;
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use onceflow::dead_letter;
use onceflow::testkit::{Isolation, Kafka, KafkaOptions};
use onceflow::{Output, OutputRecord, Pipeline, ProcessError, Processor, Record};
use onceflow_integration_tests::{
    Event, Running, aborted_copies, enrich, events, init_tracing, offsets, produce_events,
    produce_raw, read, test_config, transactional_producer, unique, verify, wait_caught_up,
    wait_count, wait_progress,
};

const CATCH_UP: Duration = Duration::from_secs(120);

/// Emits `enrich(event)` keyed by user to `out`, stamped with who processed it and where the
/// input was; optionally slow, so that streams last long enough for things to happen mid-way.
struct Enrich {
    out: String,
    instance: String,
    delay: Duration,
    /// Records processed (including ones later aborted): for sequencing a test, not for
    /// checking it.
    processed: Arc<AtomicU64>,
}

impl Enrich {
    fn new(out: &str, instance: &str) -> Self {
        Self {
            out: out.to_owned(),
            instance: instance.to_owned(),
            delay: Duration::ZERO,
            processed: Arc::default(),
        }
    }

    fn slow(out: &str, instance: &str, delay: Duration) -> Self {
        Self {
            delay,
            ..Self::new(out, instance)
        }
    }
}

#[onceflow::async_trait]
impl Processor for Enrich {
    type Input = Event;

    async fn process(&self, r: &Record<Event>, out: &mut Output) -> Result<(), ProcessError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.processed.fetch_add(1, Ordering::SeqCst);
        out.send(
            OutputRecord::to(&self.out)
                .key(r.value.user.as_str())
                .json(&enrich(&r.value))?
                .headers_from(&r.headers)
                .header("processed_by", self.instance.as_str())
                .header("source_partition", r.partition.to_string())
                .header("source_offset", r.offset.to_string()),
        );
        Ok(())
    }
}

struct Topics {
    input: String,
    output: String,
    app: String,
}

async fn setup(kafka: &Kafka, name: &str, input_partitions: i32, output_partitions: i32) -> Topics {
    setup_with(kafka, name, input_partitions, output_partitions, &[]).await
}

/// [`setup`] with topic configs for the output topic.
async fn setup_with(
    kafka: &Kafka,
    name: &str,
    input_partitions: i32,
    output_partitions: i32,
    output_configs: &[(&str, &str)],
) -> Topics {
    let t = Topics {
        input: unique(&format!("{name}-in")),
        output: unique(&format!("{name}-out")),
        app: unique(&format!("{name}-app")),
    };
    kafka
        .create_topic(&t.input, input_partitions, 1)
        .await
        .expect("input topic");
    kafka
        .create_topic_with(&t.output, output_partitions, 1, output_configs)
        .await
        .expect("output topic");
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keyed_records_come_out_exactly_once_in_order_on_java_partitions() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let t = setup(kafka, "eos-basic", 3, 5).await;
    let input = events(10_000, 97);
    produce_events(kafka, &t.input, &input).await;

    let config = test_config(kafka, &t.app, "0", &t.input)
        .build()
        .expect("config");
    let running = Running::start(Pipeline::new(config, Enrich::new(&t.output, "0")));
    wait_caught_up(kafka, &t.app, &t.input, CATCH_UP).await;
    let summary = running.stop().await;

    let committed = read(kafka, &t.output, Isolation::ReadCommitted).await;
    let verdict = verify(&input, &committed, 5);
    verdict.assert_exactly_once();
    assert_eq!(committed.len(), 10_000);
    println!(
        "10,000 inputs over 3 partitions -> {} committed outputs over 5 partitions: 0 duplicates, \
         0 losses, 0 order violations, 0 misrouted; {} transactions",
        committed.len(),
        summary.transactions_committed
    );

    // Event time survives the pipeline: each output carries its input's timestamp.
    let inputs = read(kafka, &t.input, Isolation::ReadCommitted).await;
    let input_time: BTreeMap<(i32, i64), Option<i64>> = inputs
        .iter()
        .map(|r| ((r.partition, r.offset), r.timestamp))
        .collect();
    let mut differing = 0;
    for o in &committed {
        let partition: i32 = o
            .header_str("source_partition")
            .and_then(|p| p.parse().ok())
            .expect("source_partition header");
        let offset: i64 = o
            .header_str("source_offset")
            .and_then(|p| p.parse().ok())
            .expect("source_offset header");
        let expected = input_time.get(&(partition, offset)).copied().flatten();
        assert!(
            expected.is_some(),
            "input {partition}/{offset} has no timestamp"
        );
        if o.timestamp != expected {
            differing += 1;
        }
    }
    assert_eq!(differing, 0, "outputs whose timestamp is not their input's");
}

/// Fails the first attempt of each record whose id `fails` picks with `retry`; passes
/// everything else through, enriched.
struct RetryFirstAttempt {
    out: String,
    fails: Box<dyn Fn(u64) -> bool + Send + Sync>,
    failed_once: Mutex<HashSet<u64>>,
}

impl RetryFirstAttempt {
    fn new(out: &str, fails: impl Fn(u64) -> bool + Send + Sync + 'static) -> Self {
        Self {
            out: out.to_owned(),
            fails: Box::new(fails),
            failed_once: Mutex::default(),
        }
    }
}

#[onceflow::async_trait]
impl Processor for RetryFirstAttempt {
    type Input = Event;

    async fn process(&self, r: &Record<Event>, out: &mut Output) -> Result<(), ProcessError> {
        if (self.fails)(r.value.id) {
            let first_attempt = self.failed_once.lock().expect("lock").insert(r.value.id);
            if first_attempt {
                return Err(ProcessError::retry(format!(
                    "simulated transient failure of event {}",
                    r.value.id
                )));
            }
        }
        out.send(
            OutputRecord::to(&self.out)
                .key(r.value.user.as_str())
                .json(&enrich(&r.value))?,
        );
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_records_appear_once_committed_while_aborted_copies_show_uncommitted() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let t = setup(kafka, "eos-retry", 3, 3).await;
    let input = events(2_100, 31);
    produce_events(kafka, &t.input, &input).await;

    let config = test_config(kafka, &t.app, "0", &t.input)
        .retry_backoff(Duration::from_millis(5))
        // Outputs must reach the broker before their transaction aborts, or there are no
        // aborted copies for read_uncommitted to show. With the default linger (a fifth of the
        // commit interval) an abort often comes first, and librdkafka purges the lingering
        // outputs without ever sending them — less work, but nothing to prove here.
        .producer_property("linger.ms", "0")
        .build()
        .expect("config");
    let running = Running::start(Pipeline::new(
        config,
        // Every 7th record fails once.
        RetryFirstAttempt::new(&t.output, |id| id.is_multiple_of(7)),
    ));
    wait_caught_up(kafka, &t.app, &t.input, CATCH_UP).await;
    let summary = running.stop().await;

    let committed = read(kafka, &t.output, Isolation::ReadCommitted).await;
    verify(&input, &committed, 3).assert_exactly_once();
    let uncommitted = read(kafka, &t.output, Isolation::ReadUncommitted).await;
    let (c, u, doubled) = aborted_copies(&committed, &uncommitted);
    assert!(
        u > c && doubled > 0,
        "aborts must leave aborted copies visible to read_uncommitted: committed {c}, \
         uncommitted {u}, ids written more than once {doubled}"
    );
    // One abort consumes at most one first failure per input partition: >= 300 / 3 aborts.
    assert!(summary.transactions_aborted >= 100, "{summary:?}");
    println!(
        "2,100 inputs, every 7th failing once: read_committed {c} (exactly once), \
         read_uncommitted {u} ({doubled} ids also in aborted transactions); \
         {} transactions aborted, {} committed",
        summary.transactions_aborted, summary.transactions_committed
    );
}

/// Every abort whose transaction had outputs acknowledged leaves them to be ended with an abort
/// marker of the runtime's own before that producer's next transaction (KAFKA-20734). Here the
/// producer of the aborted transaction never gets a next one before the stop — the retry and
/// everything after it commit on the other producer, in one transaction — so only the stop
/// can end them: the partition's last record, read uncommitted, must be that marker's record,
/// written after the retry's commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_right_after_an_abort_ends_the_aborted_transactions_leftovers() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let t = setup(kafka, "eos-stop-leftovers", 1, 1).await;
    let input = events(11, 3);
    let (first, last) = input.split_at(10);

    let config = test_config(kafka, &t.app, "0", &t.input)
        .retry_backoff(Duration::from_millis(5))
        // The first transaction stays open (its interval is long) until the 11th record
        // fills it; the retry's transaction takes all 11 at once, is full, and commits at
        // once. So the aborted transaction's producer has no transaction after it.
        .commit_interval(Duration::from_secs(20))
        .transaction_timeout(Duration::from_secs(60))
        .max_records_per_transaction(11)
        // Outputs must be acknowledged before the abort for it to leave anything behind.
        .producer_property("linger.ms", "0")
        .build()
        .expect("config");
    let running = Running::start(Pipeline::new(
        config,
        RetryFirstAttempt::new(&t.output, {
            let id = last[0].id;
            move |n| n == id
        }),
    ));
    produce_events(kafka, &t.input, first).await;
    let started = std::time::Instant::now();
    while read(kafka, &t.output, Isolation::ReadUncommitted)
        .await
        .len()
        < first.len()
    {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the first transaction's outputs never reached the broker"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Their delivery reports, which note the partition, are served within a poll or two.
    tokio::time::sleep(Duration::from_millis(300)).await;
    produce_events(kafka, &t.input, last).await;
    wait_caught_up(kafka, &t.app, &t.input, CATCH_UP).await;
    let summary = running.stop().await;

    let committed = read(kafka, &t.output, Isolation::ReadCommitted).await;
    verify(&input, &committed, 1).assert_exactly_once();
    let uncommitted = read(kafka, &t.output, Isolation::ReadUncommitted).await;
    let keys: Vec<String> = uncommitted
        .iter()
        .map(|r| String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned())
        .collect();
    let marker_key = String::from_utf8_lossy(onceflow::LEFTOVER_KEY);
    let markers = keys.iter().filter(|k| **k == marker_key).count();
    assert_eq!(
        summary.transactions_committed, 1,
        "the retry must commit in one transaction: {summary:?}"
    );
    assert_eq!(
        (uncommitted.len(), markers, keys.last().map(String::as_str)),
        (first.len() + input.len() + 1, 1, Some(&*marker_key)),
        "read uncommitted: the aborted outputs, the committed ones, then the one record of the \
         abort marker the stop wrote ({summary:?})"
    );
}

/// Dead-letters events with `id % 97 == 13`; always retries events with `id % 331 == 5`.
struct Picky {
    out: String,
}

#[onceflow::async_trait]
impl Processor for Picky {
    type Input = Event;

    async fn process(&self, r: &Record<Event>, out: &mut Output) -> Result<(), ProcessError> {
        if r.value.id % 97 == 13 {
            return Err(ProcessError::dead_letter(format!(
                "event {} breaks a business rule",
                r.value.id
            )));
        }
        if r.value.id % 331 == 5 {
            return Err(ProcessError::retry("a dependency that never recovers"));
        }
        out.send(
            OutputRecord::to(&self.out)
                .key(r.value.user.as_str())
                .json(&enrich(&r.value))?,
        );
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_go_to_the_dead_letter_topic_and_never_stall_the_partition() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let t = setup(kafka, "eos-poison", 3, 3).await;
    let dlq = unique("eos-poison-dlq");
    kafka.create_topic(&dlq, 1, 1).await.expect("dlq topic");

    // 3,000 records: every 100th is malformed JSON (1%); the rest are events.
    let all = events(3_000, 53);
    let mut raw = Vec::new();
    let mut good = Vec::new();
    let mut malformed = BTreeSet::new();
    for e in &all {
        if e.id % 100 == 42 {
            malformed.insert(format!("{{\"id\": {}, \"user\": broken", e.id));
            raw.push((
                e.user.clone(),
                format!("{{\"id\": {}, \"user\": broken", e.id).into_bytes(),
            ));
        } else {
            raw.push((e.user.clone(), serde_json::to_vec(e).expect("json")));
            good.push(e.clone());
        }
    }
    produce_raw(kafka, &t.input, &raw).await;
    let rule_breakers: BTreeSet<u64> = good
        .iter()
        .map(|e| e.id)
        .filter(|id| id % 97 == 13)
        .collect();
    let never_recover: BTreeSet<u64> = good
        .iter()
        .map(|e| e.id)
        .filter(|id| id % 331 == 5)
        .collect();
    let expected_out: Vec<Event> = good
        .iter()
        .filter(|e| !rule_breakers.contains(&e.id) && !never_recover.contains(&e.id))
        .cloned()
        .collect();

    let config = test_config(kafka, &t.app, "0", &t.input)
        .dead_letter_topic(&dlq)
        .max_attempts(3)
        .retry_backoff(Duration::from_millis(5))
        .build()
        .expect("config");
    let running = Running::start(Pipeline::new(
        config,
        Picky {
            out: t.output.clone(),
        },
    ));
    wait_caught_up(kafka, &t.app, &t.input, CATCH_UP).await;
    let summary = running.stop().await;

    let committed = read(kafka, &t.output, Isolation::ReadCommitted).await;
    verify(&expected_out, &committed, 3).assert_exactly_once();

    let letters = read(kafka, &dlq, Isolation::ReadCommitted).await;
    let mut decode = BTreeSet::new();
    let mut rejected = BTreeSet::new();
    let mut exhausted = BTreeSet::new();
    for l in &letters {
        let kind = l
            .header_str(dead_letter::HEADER_ERROR_KIND)
            .expect("kind header");
        assert!(
            l.header_str(dead_letter::HEADER_ERROR)
                .is_some_and(|e| !e.is_empty())
        );
        assert_eq!(
            l.header_str(dead_letter::HEADER_SOURCE_TOPIC).as_deref(),
            Some(t.input.as_str())
        );
        assert!(l.header_str(dead_letter::HEADER_SOURCE_PARTITION).is_some());
        assert!(l.header_str(dead_letter::HEADER_SOURCE_OFFSET).is_some());
        assert!(l.header_str(dead_letter::HEADER_TIME).is_some());
        match kind.as_str() {
            "decode" => {
                assert!(
                    decode.insert(l.value_str()),
                    "decode dead letter twice: {}",
                    l.value_str()
                );
            }
            "processor" => {
                let e: Event =
                    serde_json::from_slice(l.value.as_deref().unwrap()).expect("original");
                assert!(rejected.insert(e.id), "dead letter twice: {}", e.id);
            }
            "retries_exhausted" => {
                let e: Event =
                    serde_json::from_slice(l.value.as_deref().unwrap()).expect("original");
                assert_eq!(
                    l.header_str(dead_letter::HEADER_ATTEMPTS).as_deref(),
                    Some("3")
                );
                assert!(exhausted.insert(e.id), "dead letter twice: {}", e.id);
            }
            other => panic!("unexpected kind {other}"),
        }
    }
    assert_eq!(
        decode, malformed,
        "every malformed record, dead-lettered once, byte for byte"
    );
    assert_eq!(rejected, rule_breakers);
    assert_eq!(exhausted, never_recover);
    println!(
        "3,000 inputs: {} good outputs exactly once; dead letters: {} undecodable, {} rejected, \
         {} after 3 attempts; group offsets at the end of the input; {} aborted transactions",
        committed.len(),
        decode.len(),
        rejected.len(),
        exhausted.len(),
        summary.transactions_aborted
    );
}

/// The headers `id`'s input record carries: a trace id, a repeated name, a null value, an
/// empty value and bytes that are not UTF-8 — everything a header can be. Every third record
/// has none.
fn input_headers(id: u64) -> Vec<(String, Option<Vec<u8>>)> {
    if id.is_multiple_of(3) {
        return Vec::new();
    }
    vec![
        ("trace_id".to_owned(), Some(format!("t-{id}").into_bytes())),
        ("hop".to_owned(), Some(b"gateway".to_vec())),
        ("hop".to_owned(), Some(b"ledger".to_vec())),
        ("tombstone".to_owned(), None),
        ("empty".to_owned(), Some(Vec::new())),
        (
            "raw".to_owned(),
            Some(vec![0xff, 0x00, id.to_le_bytes()[0]]),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_headers_reach_outputs_and_dead_letters_byte_for_byte_in_order() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;

    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    let t = setup(kafka, "eos-headers", 3, 3).await;
    let dlq = unique("eos-headers-dlq");
    kafka.create_topic(&dlq, 1, 1).await.expect("dlq topic");

    // Every 50th record does not parse, so its headers must reach the dead letter.
    let input = events(600, 31);
    let producer = onceflow_integration_tests::input_producer(kafka);
    for e in &input {
        let value = if e.id % 50 == 7 {
            format!("{{\"id\": {}, broken", e.id).into_bytes()
        } else {
            serde_json::to_vec(e).expect("json")
        };
        let mut record = FutureRecord::to(&t.input)
            .key(e.user.as_str())
            .payload(&value);
        let headers = input_headers(e.id);
        if !headers.is_empty() {
            record = record.headers(headers.iter().fold(OwnedHeaders::new(), |hs, (k, v)| {
                hs.insert(Header {
                    key: k.as_str(),
                    value: v.as_deref(),
                })
            }));
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("input record acknowledged");
    }
    let good: Vec<Event> = input.iter().filter(|e| e.id % 50 != 7).cloned().collect();

    let config = test_config(kafka, &t.app, "0", &t.input)
        .dead_letter_topic(&dlq)
        .build()
        .expect("config");
    let running = Running::start(Pipeline::new(config, Enrich::new(&t.output, "0")));
    wait_caught_up(kafka, &t.app, &t.input, CATCH_UP).await;
    running.stop().await;

    let committed = read(kafka, &t.output, Isolation::ReadCommitted).await;
    verify(&good, &committed, 3).assert_exactly_once();
    for o in &committed {
        let e: onceflow_integration_tests::Enriched =
            serde_json::from_slice(o.value.as_deref().expect("value")).expect("output");
        let expected = input_headers(e.id);
        assert_eq!(
            o.headers[..expected.len()],
            expected[..],
            "output of {}: the input's headers first, in order",
            e.id
        );
        let added: Vec<&str> = o.headers[expected.len()..]
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(
            added,
            [
                "processed_by",
                "source_partition",
                "source_offset",
                onceflow::processor::SOURCE_HEADER
            ],
            "output of {}: then the processor's own, then the lineage header",
            e.id
        );
    }

    let letters = read(kafka, &dlq, Isolation::ReadCommitted).await;
    let mut lettered = BTreeSet::new();
    for l in &letters {
        let id: u64 = l
            .value_str()
            .trim_start_matches("{\"id\": ")
            .split(',')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("the original value");
        let expected = input_headers(id);
        assert_eq!(
            l.headers[..expected.len()],
            expected[..],
            "dead letter of {id}: the input's headers first, in order"
        );
        assert_eq!(
            l.header_str(dead_letter::HEADER_ERROR_KIND).as_deref(),
            Some("decode")
        );
        assert!(lettered.insert(id), "dead letter twice: {id}");
    }
    let malformed: BTreeSet<u64> = input
        .iter()
        .map(|e| e.id)
        .filter(|id| id % 50 == 7)
        .collect();
    assert_eq!(lettered, malformed);
    println!(
        "600 inputs, 2 in 3 with 6 headers: {} outputs and {} dead letters carry them byte for \
         byte, in order",
        committed.len(),
        letters.len()
    );
}

/// Waits (at most a minute) for `instance` to stop by itself, and checks that it stopped as
/// fenced — by `by`, for the message.
async fn stopped_fenced(instance: Running, by: &str) -> onceflow::Error {
    let result = tokio::time::timeout(Duration::from_secs(60), instance.handle)
        .await
        .expect("the fenced instance stops by itself")
        .expect("task");
    let err = result.expect_err("the fenced instance must stop with an error");
    assert!(err.is_fenced(), "expected fencing by {by}, got: {err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_with_the_same_transactional_id_is_fenced_and_never_commits_again() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let t = setup(kafka, "eos-zombie", 3, 3).await;
    let input = events(4_000, 61);
    produce_events(kafka, &t.input, &input).await;

    // Both instances claim instance id "0", so both use transactional id "<app>-0": the second
    // to start fences the first, as a restarted instance fences its half-dead predecessor.
    let old = Running::start(Pipeline::new(
        test_config(kafka, &t.app, "0", &t.input)
            .build()
            .expect("config"),
        Enrich::slow(&t.output, "old", Duration::from_millis(2)),
    ));
    wait_progress(kafka, &t.app, &t.input, 400, CATCH_UP).await;
    let new = Running::start(Pipeline::new(
        test_config(kafka, &t.app, "0", &t.input)
            .build()
            .expect("config"),
        Enrich::new(&t.output, "new"),
    ));

    let err = stopped_fenced(old, "a newer instance with the same id").await;
    println!("old instance stopped: {err}");

    wait_caught_up(kafka, &t.app, &t.input, CATCH_UP).await;
    let summary = new.stop().await;
    let committed = read(kafka, &t.output, Isolation::ReadCommitted).await;
    verify(&input, &committed, 3).assert_exactly_once();
    let by_old = committed
        .iter()
        .filter(|r| r.header_str("processed_by").as_deref() == Some("old"))
        .count();
    println!(
        "4,000 inputs: {} committed outputs exactly once ({by_old} committed by the old instance \
         before it was fenced, the rest by the new one in {} transactions)",
        committed.len(),
        summary.transactions_committed
    );
}

/// Takes `transactional_id` with a producer of its own, as a restarted instance would, and
/// returns that producer (it holds the id until it is dropped).
#[expect(
    clippy::disallowed_methods,
    reason = "the test takes a transactional id directly, on a blocking thread"
)]
fn take_transactional_id(
    kafka: &Kafka,
    transactional_id: &str,
) -> rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext> {
    use rdkafka::producer::Producer as _;
    let producer = transactional_producer(kafka, transactional_id);
    producer
        .init_transactions(Duration::from_secs(30))
        .expect("init_transactions");
    producer
}

/// An instance runs its transactions on two producers in turn, one per transactional id
/// (`PipelineConfig::transactional_ids`). Taking either id away from it must stop it as
/// fenced: a test that fenced only the first would pass with an instance that never used the
/// second, or that kept committing on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn either_of_an_instances_two_transactional_ids_fences_it() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    for which in 0..2 {
        let t = setup(kafka, &format!("eos-fence-id{which}"), 3, 3).await;
        let input = events(6_000, 43);
        produce_events(kafka, &t.input, &input).await;
        let config = test_config(kafka, &t.app, "0", &t.input)
            .build()
            .expect("config");
        let id = config.transactional_ids()[which].clone();
        let old = Running::start(Pipeline::new(
            config,
            Enrich::slow(&t.output, "old", Duration::from_millis(2)),
        ));
        wait_progress(kafka, &t.app, &t.input, 300, CATCH_UP).await;
        let holder = {
            let id = id.clone();
            tokio::task::spawn_blocking(move || take_transactional_id(kafka, &id))
                .await
                .expect("blocking task")
        };
        let err = stopped_fenced(old, &id).await;
        println!("{id} taken: the instance stopped with: {err}");
        drop(holder);

        // Restarted, the instance takes both ids back and finishes the input exactly once.
        let new = Running::start(Pipeline::new(
            test_config(kafka, &t.app, "0", &t.input)
                .build()
                .expect("config"),
            Enrich::new(&t.output, "new"),
        ));
        wait_caught_up(kafka, &t.app, &t.input, CATCH_UP).await;
        new.stop().await;
        let committed = read(kafka, &t.output, Isolation::ReadCommitted).await;
        verify(&input, &committed, 3).assert_exactly_once();
    }
}

async fn instances_join_and_leave_mid_stream(strategy: onceflow::config::AssignmentStrategy) {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let t = setup(kafka, "eos-rebalance", 6, 3).await;
    // Two waves: 6,000 before the first instance starts, 12,000 once the newcomers start. With
    // one wave, instance 1 (and 2, while the group waited for it) could drain the partitions
    // that instance 3 was then given, so it had nothing left to process (seen in CI). Each
    // partition takes at least 3 ms per record whoever owns it, so the second wave keeps every
    // partition busy for ~6 s — well past the rebalances.
    let input = events(18_000, 83);
    let (first_wave, second_wave) = input.split_at(6_000);
    produce_events(kafka, &t.input, first_wave).await;
    let config = |instance: &str| {
        test_config(kafka, &t.app, instance, &t.input)
            .assignment_strategy(strategy)
            .build()
            .expect("config")
    };
    let delay = Duration::from_millis(3);

    let first = Running::start(Pipeline::new(
        config("1"),
        Enrich::slow(&t.output, "1", delay),
    ));
    wait_progress(kafka, &t.app, &t.input, 1_000, CATCH_UP).await;
    let p2 = Enrich::slow(&t.output, "2", delay);
    let p3 = Enrich::slow(&t.output, "3", delay);
    let (c2, c3) = (Arc::clone(&p2.processed), Arc::clone(&p3.processed));
    let second = Running::start(Pipeline::new(config("2"), p2));
    let third = Running::start(Pipeline::new(config("3"), p3));
    produce_events(kafka, &t.input, second_wave).await;
    // Mid-stream for real: both newcomers own partitions and have done work before they leave.
    wait_count(&c2, 200, "instance 2's processed records", CATCH_UP).await;
    wait_count(&c3, 200, "instance 3's processed records", CATCH_UP).await;
    let before_leaving = onceflow_integration_tests::offsets(kafka, &t.app, &t.input).await;
    let s2 = second.stop().await;
    let s3 = third.stop().await;
    println!("committed offsets when instances 2 and 3 left: {before_leaving:?}");
    wait_caught_up(kafka, &t.app, &t.input, CATCH_UP).await;
    let s1 = first.stop().await;

    let committed = read(kafka, &t.output, Isolation::ReadCommitted).await;
    verify(&input, &committed, 3).assert_exactly_once();

    // Each input record's processing was committed by exactly one instance, and every
    // instance took part.
    let mut owners: BTreeMap<(i32, i64), String> = BTreeMap::new();
    for r in &committed {
        let p: i32 = r
            .header_str("source_partition")
            .expect("header")
            .parse()
            .expect("int");
        let o: i64 = r
            .header_str("source_offset")
            .expect("header")
            .parse()
            .expect("int");
        let by = r.header_str("processed_by").expect("header");
        assert!(
            owners.insert((p, o), by).is_none(),
            "input {p}@{o} committed twice"
        );
    }
    let mut runs = 0;
    let mut last: Option<(i32, &String)> = None;
    for ((p, _), by) in &owners {
        if last != Some((*p, by)) {
            runs += 1;
        }
        last = Some((*p, by));
    }
    let per_instance: BTreeMap<&String, usize> =
        owners.values().fold(BTreeMap::new(), |mut m, by| {
            *m.entry(by).or_default() += 1;
            m
        });
    assert_eq!(
        per_instance.len(),
        3,
        "all three instances committed work: {per_instance:?}"
    );
    println!(
        "{strategy:?}: 18,000 inputs over 6 partitions, instances 2 and 3 joined and left: \
         exactly once; committed per instance {per_instance:?}; {runs} ownership runs over 6 \
         partitions; rebalances seen by instance 1: {}, by 2: {}, by 3: {}",
        s1.rebalances, s2.rebalances, s3.rebalances
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_joining_and_leaving_mid_stream_keep_exactly_once_cooperative() {
    instances_join_and_leave_mid_stream(onceflow::config::AssignmentStrategy::CooperativeSticky)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_joining_and_leaving_mid_stream_keep_exactly_once_eager() {
    instances_join_and_leave_mid_stream(onceflow::config::AssignmentStrategy::Eager).await;
}

/// Stalls once, for longer than the transaction timeout, on the first record it sees at least
/// `after` after its first record: with a commit interval longer than `after`, that record is
/// processed inside the first transaction, after earlier outputs of that transaction reached
/// the broker, so the broker has an open transaction to time out.
struct StallsOnce {
    out: String,
    after: Duration,
    stall: Duration,
    first_seen: std::sync::OnceLock<std::time::Instant>,
    /// Set as the stall begins.
    stalled: Arc<AtomicBool>,
    assigned: Arc<AtomicBool>,
}

#[onceflow::async_trait]
impl Processor for StallsOnce {
    type Input = Event;

    async fn process(&self, r: &Record<Event>, out: &mut Output) -> Result<(), ProcessError> {
        let first = *self.first_seen.get_or_init(std::time::Instant::now);
        if first.elapsed() >= self.after && !self.stalled.swap(true, Ordering::SeqCst) {
            tokio::time::sleep(self.stall).await;
        }
        out.send(
            OutputRecord::to(&self.out)
                .key(r.value.user.as_str())
                .json(&enrich(&r.value))?,
        );
        Ok(())
    }

    async fn on_partitions_assigned(&self, _partitions: &[onceflow::TopicPartition]) {
        self.assigned.store(true, Ordering::SeqCst);
    }
}

/// Starts instance "0" with a [`StallsOnce`] processor (a 3 s commit interval, so the stall
/// falls inside the first transaction) and waits until it has partitions. Returns it and the
/// flag set as the stall begins.
async fn start_stalling_once(
    kafka: &Kafka,
    t: &Topics,
    timeout: Duration,
    stall: Duration,
) -> (Running, Arc<AtomicBool>) {
    let stalled = Arc::new(AtomicBool::new(false));
    let assigned = Arc::new(AtomicBool::new(false));
    let running = Running::start(Pipeline::new(
        test_config(kafka, &t.app, "0", &t.input)
            .commit_interval(Duration::from_secs(3))
            .transaction_timeout(timeout)
            .build()
            .expect("config"),
        StallsOnce {
            out: t.output.clone(),
            after: Duration::from_secs(1),
            stall,
            first_seen: std::sync::OnceLock::new(),
            stalled: Arc::clone(&stalled),
            assigned: Arc::clone(&assigned),
        },
    ));
    while !assigned.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (running, stalled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_the_broker_times_out_is_recovered_from_without_loss_or_duplicates() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let t = setup(kafka, "eos-timeout", 3, 3).await;
    let input = events(1_000, 41);

    let timeout = Duration::from_secs(4);
    let stall = timeout + Duration::from_secs(3);
    let (running, _) = start_stalling_once(kafka, &t, timeout, stall).await;
    // A live stream: the input trickles in (over ~3 s) while the pipeline runs.
    let producer = onceflow_integration_tests::input_producer(kafka);
    for chunk in input.chunks(10) {
        onceflow_integration_tests::produce_events_with(&producer, &t.input, chunk).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    wait_caught_up(kafka, &t.app, &t.input, CATCH_UP).await;
    let summary = running.stop().await;

    let committed = read(kafka, &t.output, Isolation::ReadCommitted).await;
    verify(&input, &committed, 3).assert_exactly_once();
    let uncommitted = read(kafka, &t.output, Isolation::ReadUncommitted).await;
    let (c, u, doubled) = aborted_copies(&committed, &uncommitted);
    assert!(
        doubled > 0,
        "the broker-aborted transaction's outputs must be visible to read_uncommitted: \
         committed {c}, uncommitted {u}"
    );
    assert!(summary.producer_recoveries >= 1, "{summary:?}");
    println!(
        "stall of {stall:?} inside a transaction with a {timeout:?} timeout: the broker aborted \
         it, the pipeline re-initialised its producer {} time(s) and went on; read_committed {c} \
         exactly once, read_uncommitted {u} ({doubled} ids also in the aborted transaction)",
        summary.producer_recoveries
    );
}

/// A zombie paused inside a transaction for longer than the transaction timeout, whose
/// instance id a restarted instance took meanwhile, must stop when it wakes — not take its
/// transactional id back. By time alone its fence looks like the broker's timeout (the test
/// above), which the instance recovers from by re-initialising the producer; here that would
/// fence the newer instance, which would stop instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_paused_past_the_transaction_timeout_stops_and_the_newer_instance_runs_on() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let t = setup(kafka, "eos-zombie-paused", 3, 3).await;
    let input = events(2_000, 47);

    let timeout = Duration::from_secs(4);
    let stall = timeout + Duration::from_secs(5);
    let (old, stalled) = start_stalling_once(kafka, &t, timeout, stall).await;
    // The input trickles in until the old instance's processor stalls, a second into its first
    // transaction, with outputs of that transaction sent.
    let producer = onceflow_integration_tests::input_producer(kafka);
    let mut produced = 0;
    for chunk in input.chunks(10) {
        onceflow_integration_tests::produce_events_with(&producer, &t.input, chunk).await;
        produced += chunk.len();
        if stalled.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(
        stalled.load(Ordering::SeqCst),
        "the old instance's processor never stalled: all {produced} inputs were produced first"
    );
    let rest = &input[produced..];

    // The restarted instance: same instance id, so it registers both transactional ids (fencing
    // the stalled one's producers) and joins the group.
    let new = Running::start(Pipeline::new(
        test_config(kafka, &t.app, "0", &t.input)
            .build()
            .expect("config"),
        Enrich::new(&t.output, "new"),
    ));
    onceflow_integration_tests::produce_events_with(&producer, &t.input, rest).await;

    let err = stopped_fenced(
        old,
        "a newer instance with the same id, while it was stalled",
    )
    .await;
    println!("old instance, stalled for {stall:?} (timeout {timeout:?}), stopped: {err}");

    wait_caught_up(kafka, &t.app, &t.input, CATCH_UP).await;
    // Fails if the newer instance stopped: then the old one took an id back and fenced it.
    let summary = new.stop().await;
    let committed = read(kafka, &t.output, Isolation::ReadCommitted).await;
    verify(&input, &committed, 3).assert_exactly_once();
    println!(
        "2,000 inputs: {} committed outputs exactly once, the newer instance ran on to the end \
         ({} transactions)",
        committed.len(),
        summary.transactions_committed
    );
}

/// Emits `enrich(event)` for the events before `until_id` and nothing for the others: a
/// filter, whose transactions past that point carry only the consumer's offsets. Every record
/// counts in `inner.processed`, emitted or not.
struct EnrichUntil {
    inner: Enrich,
    until_id: u64,
}

#[onceflow::async_trait]
impl Processor for EnrichUntil {
    type Input = Event;

    async fn process(&self, r: &Record<Event>, out: &mut Output) -> Result<(), ProcessError> {
        if r.value.id < self.until_id {
            self.inner.process(r, out).await
        } else {
            self.inner.processed.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
}

/// A pipeline idle for longer than the broker keeps an unused transactional id
/// (`transactional.id.expiration.ms`, 7 days by default) must go on when input comes back:
/// the coordinator has forgotten both of the instance's ids (and the partitions their producer
/// state), so the first transactions on each producer are refused
/// (`INVALID_PRODUCER_ID_MAPPING`) — never may the pipeline stop or stall, lose or double a
/// record. The broker here forgets after 2 s instead of 7 days. Run twice: with outputs after
/// the idle spell, and with none, so that the transactions after it register only offsets.
async fn idle_past_the_transactional_id_expiration(name: &str, outputs_after_idle: bool) {
    init_tracing();
    let mut options = KafkaOptions::single()
        .broker_property("transactional.id.expiration.ms", "2000")
        .broker_property(
            "transaction.remove.expired.transaction.cleanup.interval.ms",
            "500",
        )
        .broker_property("producer.id.expiration.ms", "2000")
        .broker_property("producer.id.expiration.check.interval.ms", "500");
    // Its own broker: the expiry would reach into the other tests' pipelines.
    options.use_external = false;
    let kafka = Kafka::start_with(options).await.expect("broker");
    println!("broker: {}", kafka.describe());
    let t = setup(&kafka, name, 3, 3).await;
    let input = events(1_000, 31);
    let (first, second) = input.split_at(500);

    let config = test_config(&kafka, &t.app, "0", &t.input)
        .build()
        .expect("config");
    let processor = EnrichUntil {
        inner: Enrich::new(&t.output, "0"),
        until_id: if outputs_after_idle { u64::MAX } else { 500 },
    };
    let processed = Arc::clone(&processor.inner.processed);
    let running = Running::start(Pipeline::new(config, processor));
    produce_events(&kafka, &t.input, first).await;
    wait_caught_up(&kafka, &t.app, &t.input, CATCH_UP).await;
    // Idle: no input, so no transaction, for longer than the expiration and its clean-up.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let before = processed.load(Ordering::SeqCst);
    produce_events(&kafka, &t.input, second).await;
    wait_caught_up(&kafka, &t.app, &t.input, Duration::from_secs(60)).await;
    let summary = running.stop().await;

    let committed = read(&kafka, &t.output, Isolation::ReadCommitted).await;
    let expected = if outputs_after_idle {
        &input[..]
    } else {
        first
    };
    verify(expected, &committed, 3).assert_exactly_once();
    // The expiry was met, not slept through: a transaction after the idle spell was refused,
    // so some of the records after it were processed twice.
    let after = processed.load(Ordering::SeqCst) - before;
    assert!(
        after > second.len() as u64,
        "{after} records processed after the idle spell, none again: no transaction was \
         refused, so the ids did not expire ({summary:?})"
    );
    println!(
        "1,000 inputs around a 6 s idle spell with a 2 s transactional id expiration, outputs \
         after it: {outputs_after_idle}: {} committed outputs exactly once, every input's \
         offset committed; {after} records processed for the 500 after the idle spell; {} \
         transaction(s) aborted, {} producer recovery(ies) in the whole run",
        committed.len(),
        summary.transactions_aborted,
        summary.producer_recoveries
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_idle_past_the_transactional_id_expiration_goes_on_exactly_once() {
    idle_past_the_transactional_id_expiration("eos-idle-expiry", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_instance_whose_next_transactions_carry_only_offsets_goes_on() {
    idle_past_the_transactional_id_expiration("eos-idle-expiry-offsets", false).await;
}

/// What makes the broker refuse the output of one input record, for
/// [`an_output_the_broker_refuses_stops_the_instance`].
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// A 200 KB output to a topic whose `max.message.bytes` is 64 KiB (`MSG_SIZE_TOO_LARGE`).
    TooLarge,
    /// An output without a key to a compacted topic (`INVALID_RECORD`).
    NoKeyOnACompactedTopic,
}

impl Refusal {
    fn output_topic_configs(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::TooLarge => &[("max.message.bytes", "65536")],
            Self::NoKeyOnACompactedTopic => &[("cleanup.policy", "compact")],
        }
    }
}

/// Emits `enrich(event)` keyed by user, except for event `refused`, whose output the broker
/// refuses (see [`Refusal`]).
struct EmitsOneRefused {
    out: String,
    refused: Option<(u64, Refusal)>,
}

#[onceflow::async_trait]
impl Processor for EmitsOneRefused {
    type Input = Event;

    async fn process(&self, r: &Record<Event>, out: &mut Output) -> Result<(), ProcessError> {
        let record = OutputRecord::to(&self.out);
        out.send(match self.refused {
            Some((id, Refusal::TooLarge)) if id == r.value.id => {
                record.key(r.value.user.as_str()).value(vec![b'x'; 200_000])
            }
            Some((id, Refusal::NoKeyOnACompactedTopic)) if id == r.value.id => {
                record.json(&enrich(&r.value))?
            }
            _ => record.key(r.value.user.as_str()).json(&enrich(&r.value))?,
        });
        Ok(())
    }
}

/// An output record the broker refuses — and would refuse again however often it is produced
/// again — must stop the instance with an error that says so, not abort and process the same
/// records again every commit interval for ever (librdkafka flags these refusals abortable).
/// Nothing may be lost or doubled: what was committed before stays exactly once, the refused
/// transaction is aborted (read_uncommitted shows its records), the group's offset stays
/// before the refused record, and once the cause is gone (here: a processor that no longer
/// emits it) a restart carries on exactly once.
async fn an_output_the_broker_refuses_stops_the_instance(name: &str, refusal: Refusal) {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    // One input partition, so that an input's offset is its id.
    let t = setup_with(kafka, name, 1, 3, refusal.output_topic_configs()).await;
    let input = events(1_500, 29);
    let refused_id = 1_250;
    let config = || {
        test_config(kafka, &t.app, "0", &t.input)
            // Batches under the 64 KiB limit, so that only the refused record is too large.
            .producer_property("batch.size", "16384")
            .build()
            .expect("config")
    };

    let running = Running::start(Pipeline::new(
        config(),
        EmitsOneRefused {
            out: t.output.clone(),
            refused: Some((refused_id, refusal)),
        },
    ));
    produce_events(kafka, &t.input, &input[..1_000]).await;
    wait_caught_up(kafka, &t.app, &t.input, CATCH_UP).await;
    produce_events(kafka, &t.input, &input[1_000..]).await;
    let stopped = tokio::time::timeout(Duration::from_secs(60), running.handle)
        .await
        .expect("the instance stops by itself")
        .expect("task");
    let err = stopped.expect_err("a refused output must stop the instance");
    assert!(
        matches!(err, onceflow::Error::Refused { .. }),
        "{refusal:?}: expected Error::Refused, got: {err}"
    );
    assert_eq!(err.class(), onceflow::error::ErrorClass::Fatal);

    let (_, group) = offsets(kafka, &t.app, &t.input).await.expect("offsets");
    let at = group
        .get(&0)
        .copied()
        .flatten()
        .expect("a committed offset");
    assert!(
        (1_000..=refused_id as i64).contains(&at),
        "the group's offset {at} must be past the first 1,000 and not past the refused record"
    );
    let committed = read(kafka, &t.output, Isolation::ReadCommitted).await;
    let upto = usize::try_from(at).expect("offset");
    verify(&input[..upto], &committed, 3).assert_exactly_once();
    let uncommitted = read(kafka, &t.output, Isolation::ReadUncommitted).await;
    assert!(
        uncommitted.len() > committed.len(),
        "the refused transaction's other records must show under read_uncommitted: {} against \
         {} committed",
        uncommitted.len(),
        committed.len()
    );

    // The cause fixed, the same instance restarts and carries on.
    let running = Running::start(Pipeline::new(
        config(),
        EmitsOneRefused {
            out: t.output.clone(),
            refused: None,
        },
    ));
    wait_caught_up(kafka, &t.app, &t.input, CATCH_UP).await;
    running.stop().await;
    let after = read(kafka, &t.output, Isolation::ReadCommitted).await;
    verify(&input, &after, 3).assert_exactly_once();
    println!(
        "{refusal:?}: stopped with \"{err}\"; {} of 1,500 inputs committed then ({} outputs \
         under read_uncommitted), all 1,500 exactly once after the restart",
        committed.len(),
        uncommitted.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_too_large_for_its_topic_stops_the_instance_and_a_restart_goes_on() {
    an_output_the_broker_refuses_stops_the_instance("eos-too-large", Refusal::TooLarge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_without_a_key_on_a_compacted_topic_stops_the_instance_and_a_restart_goes_on() {
    an_output_the_broker_refuses_stops_the_instance(
        "eos-no-key-compacted",
        Refusal::NoKeyOnACompactedTopic,
    )
    .await;
}

/// A pipeline whose input topic does not exist (a typo, a topic not yet provisioned) stops at
/// start-up with `Error::MissingTopic` instead of sitting subscribed to nothing for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_whose_input_topic_does_not_exist_stops_at_start_up() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    let input = unique("eos-missing-in");
    let config = test_config(kafka, &unique("eos-missing-app"), "0", &input)
        .build()
        .expect("config");
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        Pipeline::new(config, Enrich::new("eos-missing-out", "0")).run(),
    )
    .await
    .expect("the pipeline stops by itself");
    assert!(
        matches!(&result, Err(onceflow::Error::MissingTopic { topic }) if *topic == input),
        "{result:?}"
    );
}

/// An input topic deleted while the pipeline runs stops it with `Error::MissingTopic`, as a
/// missing topic does at start-up, instead of leaving it subscribed to nothing for ever; what
/// it committed before stays exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_topic_deleted_while_the_pipeline_runs_stops_it() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    let t = setup(kafka, "eos-deleted-in", 3, 3).await;
    let input = events(1_500, 17);
    produce_events(kafka, &t.input, &input).await;
    // librdkafka gives a topic missing from the metadata this long to appear (30 s by default)
    // before it reports it; shortened so the test does not wait it out.
    let config = test_config(kafka, &t.app, "0", &t.input)
        .consumer_property("topic.metadata.propagation.max.ms", "2000")
        .build()
        .expect("config");
    let running = Running::start(Pipeline::new(config, Enrich::new(&t.output, "0")));
    wait_caught_up(kafka, &t.app, &t.input, CATCH_UP).await;

    let deleting = std::time::Instant::now();
    kafka
        .delete_topic(&t.input)
        .await
        .expect("delete the input");
    let deleted = deleting.elapsed();
    let result = tokio::time::timeout(Duration::from_secs(60), running.handle)
        .await
        .expect("the pipeline stops by itself once its input topic is gone")
        .expect("pipeline task");
    println!(
        "deleted in {deleted:?}; stopped {:?} after the deletion began, with: {result:?}",
        deleting.elapsed()
    );
    assert!(
        matches!(&result, Err(onceflow::Error::MissingTopic { topic }) if *topic == t.input),
        "{result:?}"
    );
    let outputs = read(kafka, &t.output, Isolation::ReadCommitted).await;
    verify(&input, &outputs, 3).assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_commits_outputs_with_offsets_and_forced_stop_aborts() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let t = setup(kafka, "eos-shutdown", 3, 3).await;
    let input = events(6_000, 29);
    produce_events(kafka, &t.input, &input).await;
    let config = || {
        test_config(kafka, &t.app, "0", &t.input)
            .build()
            .expect("config")
    };
    let delay = Duration::from_millis(2);

    // Graceful, mid-stream: what is committed afterwards is consistent — every committed input
    // offset has its output committed, and no output lacks its committed offset.
    let first = Running::start(Pipeline::new(
        config(),
        Enrich::slow(&t.output, "first", delay),
    ));
    wait_progress(kafka, &t.app, &t.input, 600, CATCH_UP).await;
    let summary = first.stop().await;
    let (_, committed_offsets) = onceflow_integration_tests::offsets(kafka, &t.app, &t.input)
        .await
        .expect("offsets");
    let offsets_total: i64 = committed_offsets.values().map(|o| o.unwrap_or(0)).sum();
    let outputs = read(kafka, &t.output, Isolation::ReadCommitted).await;
    assert_eq!(
        outputs.len() as i64,
        offsets_total,
        "after a graceful stop, committed outputs and committed offsets must match"
    );
    assert!(
        offsets_total < 6_000,
        "the stop must have happened mid-stream"
    );
    println!(
        "graceful stop after {} of 6,000: outputs and offsets both at {offsets_total}",
        summary.records_committed
    );

    // Forced, mid-stream: the open transaction is aborted and `run` says so.
    let second = Running::start(Pipeline::new(
        config(),
        Enrich::slow(&t.output, "second", delay),
    ));
    wait_progress(kafka, &t.app, &t.input, offsets_total + 300, CATCH_UP).await;
    second.shutdown.force();
    let forced = second.handle.await.expect("task");
    assert!(
        matches!(forced, Err(onceflow::Error::Interrupted)),
        "a forced stop reports it: {forced:?}"
    );

    // A restart finishes the stream: exactly once overall.
    let third = Running::start(Pipeline::new(config(), Enrich::new(&t.output, "third")));
    wait_caught_up(kafka, &t.app, &t.input, CATCH_UP).await;
    third.stop().await;
    let committed = read(kafka, &t.output, Isolation::ReadCommitted).await;
    verify(&input, &committed, 3).assert_exactly_once();
    println!("forced stop, then restart: 6,000 inputs exactly once");
}

/// [`Enrich`], noting the input partition of every record it processes, in processing order.
struct NoteOrder {
    inner: Enrich,
    order: Arc<Mutex<Vec<i32>>>,
}

#[onceflow::async_trait]
impl Processor for NoteOrder {
    type Input = Event;

    async fn process(&self, r: &Record<Event>, out: &mut Output) -> Result<(), ProcessError> {
        self.order.lock().expect("lock").push(r.partition);
        self.inner.process(r, out).await
    }
}

/// One partition's backlog must not hold another partition's records back until it is worked
/// off. onceflow pauses no partition (a pause makes librdkafka drop what it prefetched, and the
/// broker serve it again); what keeps it fair is that librdkafka stops fetching once its one
/// consumer queue holds `queued.min.messages` records (30,000 by default here), the loop's own
/// buffer holds at most 20,000, and batches are taken round-robin over partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitions_backlog_does_not_hold_back_the_other_partitions() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let t = setup(kafka, "eos-backlog", 2, 2).await;
    // One user's backlog on one partition, a few records of another user on the other.
    const BACKLOG: u64 = 100_000;
    const FEW: u64 = 200;
    let backlog_user = "user-0".to_owned();
    let backlog_partition =
        onceflow::partitioner::partition_for_key(backlog_user.as_bytes(), 2).expect("partition");
    let other_user = (1..)
        .map(|u| format!("user-{u}"))
        .find(|u| {
            onceflow::partitioner::partition_for_key(u.as_bytes(), 2) != Some(backlog_partition)
        })
        .expect("a user on the other partition");
    let input: Vec<Event> = (0..BACKLOG)
        .map(|i| Event {
            id: i,
            user: backlog_user.clone(),
            seq: i,
        })
        .chain((0..FEW).map(|i| Event {
            id: BACKLOG + i,
            user: other_user.clone(),
            seq: i,
        }))
        .collect();
    produce_events(kafka, &t.input, &input).await;

    let order = Arc::new(Mutex::new(Vec::new()));
    let config = test_config(kafka, &t.app, "0", &t.input)
        .build()
        .expect("config");
    let running = Running::start(Pipeline::new(
        config,
        NoteOrder {
            inner: Enrich::new(&t.output, "0"),
            order: Arc::clone(&order),
        },
    ));
    wait_caught_up(kafka, &t.app, &t.input, CATCH_UP).await;
    running.stop().await;

    let committed = read(kafka, &t.output, Isolation::ReadCommitted).await;
    verify(&input, &committed, 2).assert_exactly_once();
    let order = order.lock().expect("lock").clone();
    let other_done = order
        .iter()
        .rposition(|p| *p != backlog_partition)
        .expect("the other partition's records were processed");
    let backlog_before = order[..other_done]
        .iter()
        .filter(|p| **p == backlog_partition)
        .count();
    // The bound: librdkafka's queue (30,000 records, plus one fetch response per partition)
    // and the loop's buffer (20,000) of backlog records ahead of them, at most.
    assert!(
        backlog_before < 70_000,
        "the other partition's last record was processed after {backlog_before} of the \
         backlog's {BACKLOG} records"
    );
    println!(
        "{BACKLOG} records of backlog on partition {backlog_partition}, {FEW} on the other: \
         the other's last record was processed after {backlog_before} backlog records; \
         {} outputs exactly once",
        committed.len()
    );
}

/// A pipeline whose output topic does not exist (a typo, a topic not provisioned) stops with
/// `Error::MissingTopic` naming it, with nothing committed — and, with a dead-letter topic
/// configured, nothing dead-lettered: the records are not at fault. librdkafka fails records
/// to a topic that does not exist as timed out, after `message.timeout.ms`, and the commit says
/// only that they failed. Without the check the instance aborted and retried every ~11 s, the
/// broker timed out its transactions meanwhile, and after 55 s it stopped as fenced by a newer
/// instance, which there was not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_whose_output_topic_does_not_exist_stops_and_dead_letters_nothing() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    let input_topic = unique("eos-missing-out-in");
    let dead_letters = unique("eos-missing-out-dlq");
    let missing = unique("eos-missing-out-out");
    kafka.create_topic(&input_topic, 3, 1).await.expect("input");
    kafka
        .create_topic(&dead_letters, 1, 1)
        .await
        .expect("dead-letter topic");
    let input = events(300, 7);
    produce_events(kafka, &input_topic, &input).await;
    let config = test_config(kafka, &unique("eos-missing-out-app"), "0", &input_topic)
        .dead_letter_topic(&dead_letters)
        .build()
        .expect("config");
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(90),
        Pipeline::new(config, Enrich::new(&missing, "0")).run(),
    )
    .await
    .expect("the pipeline stops by itself");
    println!("stopped after {:?} with: {result:?}", started.elapsed());
    assert!(
        matches!(&result, Err(onceflow::Error::MissingTopic { topic }) if *topic == missing),
        "{result:?}"
    );
    let lettered = read(kafka, &dead_letters, Isolation::ReadUncommitted).await;
    assert!(
        lettered.is_empty(),
        "{} records sent to the dead-letter topic",
        lettered.len()
    );
}
