//! The main job: the order-events pipeline on a real Kafka, crashed once, verified.
//!
//! 1. Starts an embedded Apache Kafka (or uses `--bootstrap-servers`) and creates the topics.
//! 2. Produces `--events` order events keyed by user id (Java-compatible routing), with
//!    `trace_id`, `schema_version`, `event_type` and `source` headers, idempotently.
//! 3. Runs the [`OrderProcessor`] pipeline as a separate process, SIGKILLs it mid-stream, and
//!    starts it again — the new instance fences the dead one's transaction.
//! 4. Verifies with `onceflow::verify` (the logic of `onceflow verify`) and checks the ledger
//!    total against the input, then prints a summary.
//!
//! ```text
//! cargo run -p onceflow-examples --bin demo -- --events 50000
//! ```

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use onceflow::testkit::{self, Isolation, Kafka, KafkaOptions};
use onceflow::verify::{VerifyOptions, verify_blocking};
use onceflow_examples::{LedgerEntry, OrderProcessor, produce_order_events, run_order_pipeline};

#[derive(Debug, Parser)]
#[command(about = "The onceflow demo: an exactly-once order pipeline, crashed once and verified")]
struct Args {
    /// How many order events to produce.
    #[arg(long, default_value_t = 50_000)]
    events: u64,
    /// Use this cluster instead of starting an embedded broker.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    bootstrap_servers: Option<String>,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Internal: run only the processor (used by the demo itself for its child process).
    #[arg(long, hide = true, num_args = 6, value_names = ["BOOTSTRAP", "APP", "EVENTS", "ORDERS", "LEDGER", "DLQ"])]
    run_processor: Option<Vec<String>>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(p) = &args.run_processor {
        return run_processor(p).await;
    }
    let started = Instant::now();

    let options = if args.bootstrap_servers.is_some() {
        KafkaOptions::single()
    } else {
        println!(
            "[1/5] starting an embedded Apache Kafka {} ...",
            testkit::KAFKA_VERSION
        );
        KafkaOptions::cluster(1)
    };
    let kafka = Kafka::start_with(options).await?;
    println!("      kafka: {}", kafka.describe());
    let run = std::process::id();
    let [events, orders, ledger, dlq] =
        ["order-events", "orders", "ledger", "order-events.dlq"].map(|t| format!("{t}-{run}"));
    let app = format!("order-processor-{run}");
    for t in [&events, &orders, &ledger, &dlq] {
        kafka.create_topic(t, args.partitions, 1).await?;
    }

    println!("[2/5] producing {} order events ...", args.events);
    let expected_ledger =
        produce_order_events(kafka.bootstrap_servers(), &events, args.events, true).await?;

    println!(
        "[3/5] running the order processor; it will be killed (SIGKILL) mid-stream and restarted"
    );
    let bootstrap = kafka.bootstrap_servers().to_owned();
    let child_args = [&bootstrap, &app, &events, &orders, &ledger, &dlq];
    let process_started = Instant::now();
    let first = spawn_processor(&child_args)?;
    // Kill it as soon as its first transactions are committed: mid-stream, with a
    // transaction most likely open.
    let at_kill = wait_progress(&kafka, &app, &events, 1).await?;
    kill(first);
    println!(
        "      SIGKILLed the processor with {at_kill} of {} events committed; restarting it",
        args.events
    );
    let second = spawn_processor(&child_args)?;
    wait_progress(&kafka, &app, &events, i64::MAX).await?;
    let summary = stop(second)?;
    let process_secs = process_started.elapsed().as_secs_f64();

    println!("[4/5] verifying with read_committed readers ...");
    let mut v = VerifyOptions::new(&bootstrap, &events, &[&orders, &ledger]);
    v.dead_letter_topic = Some(dlq.clone());
    let report =
        tokio::task::spawn_blocking(move || verify_blocking(&v, &mut |_, _, _| {})).await??;
    let entries = testkit::read_all(
        &bootstrap,
        &ledger,
        Isolation::ReadCommitted,
        Duration::from_secs(120),
    )
    .await?;
    let mut ledger_total = 0i64;
    for r in &entries {
        let e: LedgerEntry = serde_json::from_slice(r.value.as_deref().unwrap_or_default())?;
        if e.kind != "loyalty_points" {
            ledger_total += e.amount;
        }
    }

    println!("[5/5] summary");
    println!("  events in                   {}", report.input_records);
    for o in &report.outputs {
        println!(
            "  {:<27} {}",
            format!("{} records", short(&o.topic)),
            o.records
        );
    }
    println!("  dead letters (invalid)      {}", report.dead_letters);
    println!(
        "  ledger total (cents)        {ledger_total} (expected from the input: {expected_ledger})"
    );
    println!("  duplicates                  {}", report.duplicates());
    println!("  losses                      {}", report.losses);
    println!(
        "  per-key order violations    {}",
        report.order_violations()
    );
    println!("  transactions (after crash)  {summary}");
    println!(
        "  throughput                  {:.0} events/s (incl. crash and restart)",
        args.events as f64 / process_secs.max(1e-9)
    );
    println!(
        "  total time                  {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if !report.is_ok() || ledger_total != expected_ledger {
        bail!("exactly-once violated");
    }
    println!("  exactly-once                OK (1 crash, 0 duplicates, 0 losses)");
    Ok(())
}

fn short(topic: &str) -> &str {
    topic.rsplit_once('-').map_or(topic, |(t, _)| t)
}

fn spawn_processor(args: &[&String; 6]) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("locating the demo binary")?;
    Command::new(exe)
        .arg("--run-processor")
        .args(args.iter().map(|s| s.as_str()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the processor process")
}

fn kill(mut child: Child) {
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

/// SIGTERM (graceful: commit and leave), then the summary line the processor printed.
#[allow(unsafe_code)]
fn stop(child: Child) -> anyhow::Result<String> {
    let pid = libc::pid_t::try_from(child.id())?;
    // SAFETY: kill(2) on our own, not yet reaped child; no memory is shared.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        bail!("could not signal the processor");
    }
    let output = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Waits (printing progress) until the group has committed `target` input offsets, or all of
/// them with `i64::MAX`; returns how many it had committed.
async fn wait_progress(
    kafka: &Kafka,
    group: &str,
    topic: &str,
    target: i64,
) -> anyhow::Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (b, g, t) = (
            kafka.bootstrap_servers().to_owned(),
            group.to_owned(),
            topic.to_owned(),
        );
        let (done, total, end) =
            tokio::task::spawn_blocking(move || -> anyhow::Result<(bool, i64, i64)> {
                let ends = testkit::end_offsets_blocking(&b, &t, Isolation::ReadUncommitted)?;
                let committed = testkit::last_committed_offsets_blocking(&b, &g, &t)?;
                let total: i64 = committed.values().map(|o| o.unwrap_or(0)).sum();
                let end: i64 = ends.values().sum();
                let all = ends
                    .iter()
                    .all(|(p, e)| committed.get(p).copied().flatten() == Some(*e));
                Ok((all, total, end))
            })
            .await??;
        print!("\r      committed {total} / {end}");
        let _ = std::io::stdout().flush();
        if done || total >= target {
            println!();
            return Ok(total);
        }
        if Instant::now() > deadline {
            bail!("the processor made no progress for 600 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The child process: the order pipeline until SIGTERM; prints its transaction figures.
async fn run_processor(p: &[String]) -> anyhow::Result<()> {
    let [bootstrap, app, events, orders, ledger, dlq] = p else {
        bail!("--run-processor takes 6 values");
    };
    let processor = OrderProcessor {
        orders_topic: orders.clone(),
        ledger_topic: ledger.clone(),
    };
    let s = run_order_pipeline(bootstrap, app, "0", events, dlq, processor).await?;
    println!(
        "{} committed, {} aborted",
        s.transactions_committed, s.transactions_aborted
    );
    Ok(())
}
