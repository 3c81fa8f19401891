//! Crash and failover proof, as Kafka's own transaction system tests do it: the processor runs
//! as a separate OS process (`src/bin/copier.rs`) and is SIGKILLed and restarted mid-stream,
//! brokers of a three-node cluster are SIGKILLed and restarted under it, and at the end
//! `onceflow::verify` (the logic of `onceflow verify`) reads input and output back under
//! read_committed and must find 0 duplicates, 0 losses, per-key order intact and every
//! transaction finished.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use onceflow::testkit::{Isolation, Kafka, KafkaOptions};
use onceflow::verify::{Report, VerifyOptions, verify_blocking};
use onceflow_integration_tests::{
    events, init_tracing, input_producer, produce_events_with, unique,
};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const CATCH_UP: Duration = Duration::from_secs(240);

/// A small deterministic generator (xorshift64*), seeded from the clock and printed, so a
/// failing run's kill schedule can be reproduced with `CHAOS_SEED`.
struct Rng(u64);

impl Rng {
    fn from_env_or_clock() -> Self {
        let seed = std::env::var("CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            | 1;
        println!("chaos seed: {seed} (set CHAOS_SEED to replay)");
        Self(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// One copier process, with its stderr lines delivered to the test.
struct Copier {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    started: Instant,
    /// The last lines it logged, for failure messages.
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Copier {
    fn spawn(kafka: &Kafka, app: &str, instance: &str, input: &str, output: &str) -> Self {
        Self::spawn_slow(kafka, app, instance, input, output, 0)
    }

    /// A copier that takes `delay_ms` per record, so that a stream lasts long enough for
    /// every kill to land mid-stream.
    fn spawn_slow(
        kafka: &Kafka,
        app: &str,
        instance: &str,
        input: &str,
        output: &str,
        delay_ms: u64,
    ) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_copier"))
            .args([kafka.bootstrap_servers(), app, instance, input, output])
            .env("RUST_LOG", "warn,onceflow=info,onceflow::transaction=debug")
            .env("COPIER_DELAY_MS", delay_ms.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the copier");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::unbounded_channel();
        // CHAOS_ECHO=1 shows every copier log line, for diagnosing a failed run.
        let echo = std::env::var_os("CHAOS_ECHO").is_some();
        let name = instance.to_owned();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let keep = Arc::clone(&tail);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if echo {
                    eprintln!("[copier {name}] {line}");
                }
                if !line.contains("committing transaction")
                    && !line.contains("transaction committed")
                {
                    let mut t = keep.lock().expect("tail");
                    if t.len() == 200 {
                        t.pop_front();
                    }
                    t.push_back(line.clone());
                }
                // The receiver is gone once the test stopped listening; keep draining the pipe
                // so the copier never blocks on a full stderr.
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            lines,
            started: Instant::now(),
            tail,
        }
    }

    /// The summary line the copier prints when it stops.
    fn summary_line(&self) -> String {
        summary_line(&self.tail)
    }

    fn tail(&self) -> String {
        self.tail
            .lock()
            .expect("tail")
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until the group has caught up with the input, failing at once (with the copier's
    /// last log lines) if the copier exits meanwhile.
    async fn wait_caught_up(&mut self, kafka: &Kafka, app: &str, input: &str) {
        let deadline = Instant::now() + CATCH_UP;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the copier exited ({status}) before catching up; its log:\n{}",
                    self.tail()
                );
            }
            let done = onceflow_integration_tests::offsets(kafka, app, input)
                .await
                .is_ok_and(|(ends, committed)| {
                    ends.iter()
                        .all(|(p, end)| committed.get(p).copied().flatten() == Some(*end))
                });
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no catch-up within {CATCH_UP:?}; the copier's log:\n{}",
                self.tail()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits for a stderr line containing `needle`; false if the process ended or time ran out.
    async fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) if line.contains(needle) => return true,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return false,
            }
        }
    }

    async fn sigkill(mut self) {
        self.child.start_kill().expect("SIGKILL");
        let _ = self.child.wait().await;
    }

    /// SIGTERM; returns how long the process took to exit and whether it exited cleanly.
    async fn sigterm(mut self, timeout: Duration) -> (Duration, bool) {
        let pid = self.child.id().expect("running");
        terminate(pid);
        let sent = Instant::now();
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .expect("the copier exits after SIGTERM")
            .expect("wait");
        // Let the log reader catch the last lines.
        tokio::time::sleep(Duration::from_millis(100)).await;
        println!("{}", self.summary_line());
        (sent.elapsed(), status.success())
    }
}

fn terminate(pid: u32) {
    signal(pid, libc::SIGTERM);
}

#[allow(unsafe_code)]
fn signal(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid");
    // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped); no memory involved.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({signal}) failed");
}

async fn verify(kafka: &Kafka, input: &str, output: &str) -> Report {
    let options = VerifyOptions::new(kafka.bootstrap_servers(), input, &[output]);
    tokio::task::spawn_blocking(move || verify_blocking(&options, &mut |_, _, _| {}))
        .await
        .expect("verify task")
        .expect("verify")
}

fn assert_exactly_once(report: &Report) {
    assert!(
        report.is_ok(),
        "exactly-once violated: {} duplicates (e.g. {:?}), {} losses (e.g. {:?}), {} unmatched, \
         {} order violations, transactions finished: {}",
        report.duplicates(),
        report.duplicate_examples,
        report.losses,
        report.lost_examples,
        report.unmatched(),
        report.order_violations(),
        report.transactions_finished
    );
}

/// Input offsets committed so far (not waiting for a killed instance's pending transaction).
async fn committed_total(kafka: &Kafka, app: &str, input: &str) -> i64 {
    let (b, g, t) = (
        kafka.bootstrap_servers().to_owned(),
        app.to_owned(),
        input.to_owned(),
    );
    tokio::task::spawn_blocking(move || {
        onceflow::testkit::last_committed_offsets_blocking(&b, &g, &t)
            .map(|c| c.values().map(|o| o.unwrap_or(0)).sum())
            .unwrap_or(0)
    })
    .await
    .unwrap_or(0)
}

struct Setup {
    input: String,
    output: String,
    app: String,
}

async fn setup(kafka: &Kafka, name: &str, records: u64, rf: i32) -> Setup {
    let s = Setup {
        input: unique(&format!("{name}-in")),
        output: unique(&format!("{name}-out")),
        app: unique(&format!("{name}-app")),
    };
    let min_isr = if rf >= 3 { "2" } else { "1" };
    for t in [&s.input, &s.output] {
        kafka
            .create_topic_with(t, 3, rf, &[("min.insync.replicas", min_isr)])
            .await
            .expect("topic");
    }
    let producer = input_producer(kafka);
    for chunk in events(records, 211).chunks(5_000) {
        produce_events_with(&producer, &s.input, chunk).await;
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_sigkilled_ten_times_mid_stream_loses_and_duplicates_nothing() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let records = 60_000;
    let s = setup(kafka, "chaos-kill", records, 1).await;
    let mut rng = Rng::from_env_or_clock();
    let started = Instant::now();

    let (mut kills, mut commit_kills, mut recoveries) = (0, 0, Vec::new());
    for round in 0..12 {
        let mut copier = Copier::spawn_slow(kafka, &s.app, "0", &s.input, &s.output, 1);
        let assigned = copier
            .wait_for("partitions assigned", Duration::from_secs(60))
            .await;
        assert!(
            assigned,
            "round {round}: the copier never got its partitions"
        );
        recoveries.push(copier.started.elapsed());
        // Let 1 to 5 commits start, so every round makes progress, then kill: on every third
        // round at once — between "committing" and its completion (send_offsets + EndTxn take
        // milliseconds, the kill microseconds) — otherwise a random moment later, when a
        // transaction is usually open.
        let commits = 1 + rng.below(5);
        let mut seen = 0;
        while seen < commits
            && copier
                .wait_for("committing transaction", Duration::from_secs(30))
                .await
        {
            seen += 1;
        }
        if round % 3 == 1 {
            commit_kills += u32::from(seen == commits);
        } else {
            tokio::time::sleep(Duration::from_millis(50 + rng.below(350))).await;
        }
        copier.sigkill().await;
        kills += 1;
        println!(
            "kill {kills}: committed input offsets {} of {records}",
            committed_total(kafka, &s.app, &s.input).await
        );
    }
    let progress_before_final = committed_total(kafka, &s.app, &s.input).await;
    assert!(
        progress_before_final < records as i64,
        "every kill must land mid-stream: all {records} were done before the last kill"
    );

    let mut copier = Copier::spawn(kafka, &s.app, "0", &s.input, &s.output);
    copier.wait_caught_up(kafka, &s.app, &s.input).await;
    let (_, clean) = copier.sigterm(Duration::from_secs(30)).await;
    assert!(clean, "the final copier exits cleanly on SIGTERM");

    let report = verify(kafka, &s.input, &s.output).await;
    assert_exactly_once(&report);
    assert_eq!(report.input_records, records);
    assert!(
        kills >= 10 && commit_kills >= 2,
        "kills {kills}, during commit {commit_kills}"
    );
    let worst = recoveries.iter().max().copied().unwrap_or_default();
    println!(
        "{records} records, {kills} SIGKILLs ({commit_kills} during a commit), {} processed before \
         the final run: {} outputs, {} duplicates, {} losses, {} order violations, transactions \
         finished: {}; restart to assignment at most {worst:?}; total {:?}",
        progress_before_final,
        report.outputs[0].records,
        report.duplicates(),
        report.losses,
        report.order_violations(),
        report.transactions_finished,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_one_killed_repeatedly_stay_exactly_once() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let records = 50_000;
    let s = setup(kafka, "chaos-pair", records, 1).await;
    let mut rng = Rng::from_env_or_clock();
    let started = Instant::now();

    let mut steady = Copier::spawn_slow(kafka, &s.app, "steady", &s.input, &s.output, 1);
    let mut kills = 0;
    for _ in 0..6 {
        let mut victim = Copier::spawn_slow(kafka, &s.app, "victim", &s.input, &s.output, 1);
        let _ = victim
            .wait_for("partitions assigned", Duration::from_secs(30))
            .await;
        tokio::time::sleep(Duration::from_millis(200 + rng.below(800))).await;
        victim.sigkill().await;
        kills += 1;
    }
    steady.wait_caught_up(kafka, &s.app, &s.input).await;
    let (_, clean) = steady.sigterm(Duration::from_secs(30)).await;
    assert!(clean, "the steady copier exits cleanly on SIGTERM");

    let report = verify(kafka, &s.input, &s.output).await;
    assert_exactly_once(&report);
    println!(
        "{records} records, two instances, {kills} SIGKILLs of one of them (each a rebalance): \
         {} outputs, {} duplicates, {} losses, {} order violations; total {:?}",
        report.outputs[0].records,
        report.duplicates(),
        report.losses,
        report.order_violations(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_commits_the_last_transaction_and_a_restart_duplicates_nothing() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let records = 30_000;
    let s = setup(kafka, "chaos-term", records, 1).await;

    let mut copier = Copier::spawn(kafka, &s.app, "0", &s.input, &s.output);
    assert!(
        copier
            .wait_for("committing transaction", Duration::from_secs(60))
            .await
    );
    let (took, clean) = copier.sigterm(Duration::from_secs(30)).await;
    assert!(clean, "SIGTERM is a graceful stop: exit status 0");

    // What the stopped instance left is consistent: outputs and offsets committed together.
    let at_stop = committed_total(kafka, &s.app, &s.input).await;
    let partial = verify(kafka, &s.input, &s.output).await;
    assert_eq!(partial.duplicates(), 0);
    assert_eq!(
        partial.outputs[0].records as i64, at_stop,
        "outputs == committed offsets"
    );
    assert!(
        partial.transactions_finished,
        "the last transaction was committed, not left open"
    );

    let mut copier = Copier::spawn(kafka, &s.app, "0", &s.input, &s.output);
    copier.wait_caught_up(kafka, &s.app, &s.input).await;
    let _ = copier.sigterm(Duration::from_secs(30)).await;
    let report = verify(kafka, &s.input, &s.output).await;
    assert_exactly_once(&report);
    println!(
        "SIGTERM after {at_stop} of {records}: exited in {took:?} with status 0, outputs = \
         committed offsets = {at_stop}, no open transaction; after restart: {} outputs, {} \
         duplicates, {} losses",
        report.outputs[0].records,
        report.duplicates(),
        report.losses
    );
}

/// The node leading `topic`'s `partition`, from metadata.
fn leader_of(bootstrap: &str, topic: &str, partition: i32) -> Option<i32> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .ok()?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .ok()?;
    md.topics()
        .iter()
        .find(|t| t.name() == topic)?
        .partitions()
        .iter()
        .find(|p| p.id() == partition)
        .map(|p| p.leader())
        .filter(|l| *l >= 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_sigkilled_under_the_pipeline_including_leader_and_coordinator() {
    init_tracing();
    let kafka = Kafka::start_with(KafkaOptions::cluster(3))
        .await
        .expect("three-node cluster");
    println!("cluster: {}", kafka.describe());
    let records = 40_000;
    let s = setup(&kafka, "chaos-broker", records, 3).await;
    let started = Instant::now();

    let mut copier = Copier::spawn(&kafka, &s.app, "0", &s.input, &s.output);
    let mut bounces = Vec::new();
    for round in 0..3 {
        let progress = committed_total(&kafka, &s.app, &s.input).await;
        // Let the pipeline run a little before each bounce.
        let target = progress + 2_000;
        let deadline = Instant::now() + Duration::from_secs(60);
        while committed_total(&kafka, &s.app, &s.input).await < target.min(records as i64 - 1)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let b = kafka.bootstrap_servers().to_owned();
        let (input, round_) = (s.input.clone(), round);
        let victim = tokio::task::spawn_blocking(move || match round_ {
            0 => leader_of(&b, &input, 0).map(|n| (n, "leader of input partition 0")),
            1 => leader_of(&b, "__transaction_state", 0).map(|n| (n, "transaction coordinator")),
            _ => leader_of(&b, "__consumer_offsets", 0).map(|n| (n, "group coordinator")),
        })
        .await
        .expect("metadata task")
        .expect("a leader to kill");
        kafka.kill_node(victim.0).expect("kill");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let down = Instant::now();
        kafka.restart_node(victim.0).await.expect("restart");
        bounces.push(format!(
            "node {} ({}) back in {:?}",
            victim.0,
            victim.1,
            down.elapsed()
        ));
        println!("bounce {}: {}", round + 1, bounces.last().unwrap());
    }
    copier.wait_caught_up(&kafka, &s.app, &s.input).await;
    let (_, clean) = copier.sigterm(Duration::from_secs(60)).await;
    assert!(
        clean,
        "the copier survived every bounce by itself and exits cleanly"
    );

    let report = verify(&kafka, &s.input, &s.output).await;
    assert_exactly_once(&report);
    println!(
        "{records} records on 3 brokers (RF 3, min ISR 2), {} broker SIGKILLs [{}]: {} outputs, \
         {} duplicates, {} losses, {} order violations; the single copier process resumed by \
         itself; total {:?}",
        bounces.len(),
        bounces.join("; "),
        report.outputs[0].records,
        report.duplicates(),
        report.losses,
        report.order_violations(),
        started.elapsed()
    );
}

/// An output partition whose only replica is down for longer than the transaction timeout:
/// librdkafka holds its records, fails them as timed out after `message.timeout.ms` (the
/// transaction timeout), and the transaction that holds them cannot commit. The instance must
/// abort and wait for as long as the partition is away — not stop, and not take the broker's
/// timeout of its transactions for a newer instance fencing it (a risk noted when a missing
/// output topic, which fails records the same way, ended as "fenced") — and resume exactly
/// once by itself when the partition is back.
///
/// It found a broker bug: Kafka 4.3.1's coordinator skips the abort marker of a partition
/// without a leader (KAFKA-20734), so the aborted transaction's records already in the
/// partition stayed open, and the next commit of the same producer id there committed them —
/// 19 and 17 outputs twice in two of six runs, and with the pause below 20, 36 and 36 in
/// three of four, before the runtime ended such leftovers with an abort marker of its own
/// (`TxProducer::abort_leftovers`) — and 24 once more in CI while the runtime still looked for
/// them only where a delivery had failed: the aborted transaction's records there had all
/// been acknowledged before the kill (see `Acked` in the producer module).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_partition_leaderless_past_the_transaction_timeout_stalls_then_resumes() {
    init_tracing();
    let kafka = Kafka::start_with(KafkaOptions::cluster(3))
        .await
        .expect("three-node cluster");
    println!("cluster: {}", kafka.describe());
    let records = 30_000;
    let s = Setup {
        input: unique("leaderless-in"),
        output: unique("leaderless-out"),
        app: unique("leaderless-app"),
    };
    kafka
        .create_topic_with(&s.input, 3, 3, &[("min.insync.replicas", "2")])
        .await
        .expect("input topic");
    // One replica per output partition: while its node is down, the partition has no leader.
    kafka
        .create_topic_with(&s.output, 3, 1, &[])
        .await
        .expect("output topic");
    let producer = input_producer(&kafka);
    for chunk in events(records, 211).chunks(5_000) {
        produce_events_with(&producer, &s.input, chunk).await;
    }
    let started = Instant::now();
    // 1 ms per record: the stream lasts well past the outage.
    let mut copier = Copier::spawn_slow(&kafka, &s.app, "0", &s.input, &s.output, 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed_total(&kafka, &s.app, &s.input).await < 2_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (b, out) = (kafka.bootstrap_servers().to_owned(), s.output.clone());
    let victim = tokio::task::spawn_blocking(move || leader_of(&b, &out, 0))
        .await
        .expect("metadata task")
        .expect("a leader to kill");
    // The copier is paused around the kill so that no commit's markers are in flight to the
    // victim when it dies. The coordinator skips those too once the partition has no leader
    // (KAFKA-20734), leaving a *committed* transaction's records open until that producer id's
    // next marker there — an abort hides them, and no client can tell the coordinator to
    // commit them without adding a record of its own (guide, section 5). What this scenario
    // proves is the rest: a transaction open, with records in the partition, when the
    // partition loses its leader. 2 s lets any marker of a commit already sent land.
    let pid = copier.child.id().expect("the copier runs");
    signal(pid, libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_kill = committed_total(&kafka, &s.app, &s.input).await;
    kafka.kill_node(victim).expect("kill");
    signal(pid, libc::SIGCONT);
    // The copier's transaction timeout is 10 s: three and a half of them.
    let outage = Duration::from_secs(35);
    tokio::time::sleep(outage).await;
    if let Ok(Some(status)) = copier.child.try_wait() {
        panic!(
            "the copier exited ({status}) while output partition 0 had no leader; its log:\n{}",
            copier.tail()
        );
    }
    let at_restart = committed_total(&kafka, &s.app, &s.input).await;
    kafka.restart_node(victim).await.expect("restart");
    copier.wait_caught_up(&kafka, &s.app, &s.input).await;
    let tail = Arc::clone(&copier.tail);
    let (_, clean) = copier.sigterm(Duration::from_secs(60)).await;
    assert!(
        clean,
        "the copier survived the outage by itself and exits cleanly"
    );
    let report = verify(&kafka, &s.input, &s.output).await;
    if !report.is_ok() {
        kafka.keep_logs();
        print_copies(&kafka, &s.output, &report.duplicate_examples).await;
        // Which transactions aborted, and where the runtime wrote its own markers: what a
        // failure here needs to be told apart from the broker's logs.
        println!(
            "the copier's last log lines (commits left out):\n{}",
            tail.lock()
                .expect("tail")
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert_exactly_once(&report);
    // The outage must have failed a transaction, or this test proved nothing about it; and
    // that transaction's leftovers in the partition must have been ended with an abort marker
    // of the runtime's own once the partition was back (see `TxProducer::leftover_risk`).
    let aborted = summary_count(&summary_line(&tail), "transactions_aborted")
        .expect("the copier's summary line");
    let markers_written = tail.lock().expect("tail").iter().any(|l| {
        l.contains("wrote abort markers into the partitions an aborted transaction wrote to")
    });
    assert!(
        aborted >= 1,
        "a 35 s outage of an output partition aborted no transaction"
    );
    assert!(
        markers_written,
        "no abort marker was written into the partition after the outage"
    );
    println!(
        "{records} records; node {victim}, output partition 0's only replica, down {outage:?}: \
         {at_kill} input records committed at the kill, {at_restart} at the restart, \
         {aborted} transactions aborted; {} outputs, {} duplicates, {} losses, {} order \
         violations; the copier resumed by itself; total {:?}",
        report.outputs[0].records,
        report.duplicates(),
        report.losses,
        report.order_violations(),
        started.elapsed()
    );
}

/// The last summary line in a copier's log `tail` (empty if it printed none).
fn summary_line(tail: &Mutex<VecDeque<String>>) -> String {
    tail.lock()
        .expect("tail")
        .iter()
        .rev()
        .find(|l| l.contains("copier stopped"))
        .cloned()
        .unwrap_or_default()
}

/// `field`'s count in the copier's `copier stopped: RunSummary { … }` line.
fn summary_count(line: &str, field: &str) -> Option<u64> {
    let rest = line.split("copier stopped: ").nth(1)?;
    let after = rest.split(&format!("{field}: ")).nth(1)?;
    after
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// For a failure message: where each copy of the duplicated sources (`verify`'s examples,
/// `topic: partition@offset` of the input) sits in `output`, under read_committed and
/// read_uncommitted.
async fn print_copies(kafka: &Kafka, output: &str, examples: &[String]) {
    let wanted: Vec<String> = examples
        .iter()
        .filter_map(|e| e.rsplit(": ").next())
        .map(|e| e.replace('@', "/"))
        .collect();
    for isolation in [Isolation::ReadCommitted, Isolation::ReadUncommitted] {
        let records = onceflow_integration_tests::read(kafka, output, isolation).await;
        for r in &records {
            let source = r
                .headers
                .iter()
                .find(|(k, _)| k == onceflow::processor::SOURCE_HEADER)
                .and_then(|(_, v)| v.as_deref())
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            if wanted.iter().any(|w| source.ends_with(&format!("/{w}"))) {
                println!(
                    "{isolation:?}: {source} at {output}/{}@{}",
                    r.partition, r.offset
                );
            }
        }
    }
}
