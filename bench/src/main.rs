//! Side-by-side throughput: the raw copy ceiling, at-least-once, and onceflow exactly-once at
//! three commit intervals — same broker, same pre-loaded input, same transform, one run.
//!
//! ```text
//! cargo run --release -p onceflow-bench -- --quick          # smoke run
//! cargo run --release -p onceflow-bench -- --records 1000000
//! ```
//!
//! Each mode runs in its own child process (this binary with `--worker`), so its CPU seconds
//! and peak RSS are its own. A mode is done when every output is visible to a `read_committed`
//! reader: for the modes that commit, when the group has committed the end of the input (the
//! outputs of a transaction become visible with its commit; at-least-once flushes before it
//! commits); for the ceiling, which commits nothing, when the output holds every record.
//!
//! Not yet here (issue 6): the Kafka Streams peer, the fixed-rate latency phase.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use onceflow::testkit::{self, Isolation, Kafka, KafkaOptions};
use onceflow::{Output, OutputRecord, Pipeline, PipelineConfig, ProcessError, Processor, Record};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::producer::{
    BaseRecord, DefaultProducerContext, FutureProducer, FutureRecord, Producer as _,
    ThreadedProducer,
};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

const PARTITIONS: i32 = 6;
const MODES: [&str; 5] = [
    "ceiling",
    "at-least-once",
    "onceflow-10ms",
    "onceflow-100ms",
    "onceflow-1s",
];

#[derive(Debug, Parser)]
#[command(about = "onceflow throughput, side by side with the ceiling and at-least-once")]
struct Args {
    /// Records per run.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Value sizes in bytes, comma-separated.
    #[arg(long, default_value = "100,1024", value_delimiter = ',')]
    value_sizes: Vec<usize>,
    /// Smoke profile: 20,000 records, 100-byte values.
    #[arg(long)]
    quick: bool,
    /// Use this cluster instead of an embedded broker.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    bootstrap_servers: Option<String>,
    /// Write the results as JSON here.
    #[arg(long, default_value = "target/bench-results.json")]
    json_out: String,
    /// Internal: run one mode (MODE BOOTSTRAP INPUT OUTPUT GROUP).
    #[arg(long, hide = true, num_args = 5)]
    worker: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Item {
    id: u64,
    user: String,
    pad: String,
    #[serde(default)]
    enriched: bool,
}

/// The transform every mode applies: parse, enrich a field, re-serialise.
fn transform(value: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut item: Item = serde_json::from_slice(value)?;
    item.enriched = true;
    Ok(serde_json::to_vec(&item)?)
}

#[derive(Debug, Serialize)]
struct Row {
    mode: String,
    value_size: usize,
    records: u64,
    seconds: f64,
    records_per_second: f64,
    cpu_seconds: f64,
    peak_rss_mib: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(w) = &args.worker {
        return worker(w).await;
    }
    let (records, sizes) = if args.quick {
        (20_000, vec![100])
    } else {
        (args.records, args.value_sizes.clone())
    };
    let kafka = match &args.bootstrap_servers {
        Some(_) => Kafka::start_with(KafkaOptions::single()).await?,
        None => Kafka::start_with(KafkaOptions::cluster(1).heap("1g")).await?,
    };
    println!("kafka: {}", kafka.describe());
    let run = std::process::id();
    let mut rows = Vec::new();
    for size in sizes {
        let input = format!("bench-in-{size}-{run}");
        kafka.create_topic(&input, PARTITIONS, 1).await?;
        preload(&kafka, &input, records, size).await?;
        for mode in MODES {
            let output = format!("bench-out-{mode}-{size}-{run}");
            let group = format!("bench-{mode}-{size}-{run}");
            kafka.create_topic(&output, PARTITIONS, 1).await?;
            let row = measure(&kafka, mode, &input, &output, &group, records, size).await?;
            println!(
                "{:<16} {:>5} B  {:>10.0} records/s  {:>6.1} s  cpu {:>6.1} s  rss {:>6.1} MiB",
                row.mode,
                row.value_size,
                row.records_per_second,
                row.seconds,
                row.cpu_seconds,
                row.peak_rss_mib
            );
            rows.push(row);
        }
    }
    println!();
    println!("{}", markdown(&rows));
    if let Some(dir) = std::path::Path::new(&args.json_out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json_out, serde_json::to_string_pretty(&rows)?)?;
    println!("results: {}", args.json_out);
    Ok(())
}

fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| mode | value | records/s | onceflow-100ms / mode | CPU s | peak RSS MiB |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let reference = rows
            .iter()
            .find(|x| x.mode == "onceflow-100ms" && x.value_size == r.value_size)
            .map_or(0.0, |x| x.records_per_second);
        out.push_str(&format!(
            "| {} | {} B | {:.0} | {:.2} | {:.1} | {:.1} |\n",
            r.mode,
            r.value_size,
            r.records_per_second,
            reference / r.records_per_second.max(1e-9),
            r.cpu_seconds,
            r.peak_rss_mib
        ));
    }
    out
}

async fn preload(kafka: &Kafka, topic: &str, records: u64, size: usize) -> anyhow::Result<()> {
    let producer: FutureProducer = kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "20")
        .set("batch.size", "1048576")
        .create()?;
    let mut pending = Vec::new();
    for id in 0..records {
        let user = format!("user-{}", id % 10_000);
        let mut item = Item {
            id,
            user: user.clone(),
            pad: String::new(),
            enriched: false,
        };
        let base = serde_json::to_vec(&item)?.len();
        item.pad = "x".repeat(size.saturating_sub(base));
        let value = serde_json::to_vec(&item)?;
        let (p, t) = (producer.clone(), topic.to_owned());
        pending.push(async move {
            p.send(
                FutureRecord::to(&t).key(&user).payload(&value),
                Duration::from_secs(120),
            )
            .await
            .map_err(|(e, _)| e)
        });
        if pending.len() == 5_000 {
            for r in futures::future::join_all(pending.drain(..)).await {
                r?;
            }
        }
    }
    for r in futures::future::join_all(pending).await {
        r?;
    }
    Ok(())
}

async fn measure(
    kafka: &Kafka,
    mode: &str,
    input: &str,
    output: &str,
    group: &str,
    records: u64,
    size: usize,
) -> anyhow::Result<Row> {
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let child = std::process::Command::new(exe)
        .args([
            "--worker",
            mode,
            kafka.bootstrap_servers(),
            input,
            output,
            group,
        ])
        .stdin(std::process::Stdio::null())
        .spawn()
        .context("starting a worker")?;
    let deadline = started + Duration::from_secs(1800);
    loop {
        let (b, g, i, o) = (
            kafka.bootstrap_servers().to_owned(),
            group.to_owned(),
            input.to_owned(),
            output.to_owned(),
        );
        let commits = mode != "ceiling";
        let done = tokio::task::spawn_blocking(move || -> anyhow::Result<bool> {
            if commits {
                let ends = testkit::end_offsets_blocking(&b, &i, Isolation::ReadUncommitted)?;
                let committed = testkit::last_committed_offsets_blocking(&b, &g, &i)?;
                Ok(ends
                    .iter()
                    .all(|(p, e)| committed.get(p).copied().flatten() == Some(*e)))
            } else {
                let ends = testkit::end_offsets_blocking(&b, &o, Isolation::ReadCommitted)?;
                Ok(ends.values().sum::<i64>() >= i64::try_from(records)?)
            }
        })
        .await??;
        if done {
            break;
        }
        if Instant::now() > deadline {
            bail!("{mode} did not finish in 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (cpu_seconds, peak_rss_mib) = kill_and_reap(child)?;
    Ok(Row {
        mode: mode.to_owned(),
        value_size: size,
        records,
        seconds,
        records_per_second: records as f64 / seconds,
        cpu_seconds,
        peak_rss_mib,
    })
}

/// SIGKILLs the worker and returns its CPU seconds (user + system) and peak RSS (MiB).
#[allow(unsafe_code)]
fn kill_and_reap(mut child: std::process::Child) -> anyhow::Result<(f64, f64)> {
    child.kill()?;
    let pid = libc::pid_t::try_from(child.id())?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child, which std has not reaped (we never called wait on it);
    // both pointers are to live locals.
    let rc = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut usage) };
    if rc != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((
        secs(usage.ru_utime) + secs(usage.ru_stime),
        usage.ru_maxrss as f64 / 1024.0,
    ))
}

async fn worker(w: &[String]) -> anyhow::Result<()> {
    let [mode, bootstrap, input, output, group] = w else {
        bail!("--worker takes 5 values");
    };
    match mode.as_str() {
        "ceiling" => {
            tokio::task::spawn_blocking({
                let (b, i, o, g) = (
                    bootstrap.clone(),
                    input.clone(),
                    output.clone(),
                    group.clone(),
                );
                move || copy_loop(&b, &i, &o, &g, None)
            })
            .await?
        }
        "at-least-once" => {
            tokio::task::spawn_blocking({
                let (b, i, o, g) = (
                    bootstrap.clone(),
                    input.clone(),
                    output.clone(),
                    group.clone(),
                );
                move || copy_loop(&b, &i, &o, &g, Some(Duration::from_millis(100)))
            })
            .await?
        }
        m => {
            let interval = match m {
                "onceflow-10ms" => Duration::from_millis(10),
                "onceflow-100ms" => Duration::from_millis(100),
                "onceflow-1s" => Duration::from_secs(1),
                other => bail!("unknown mode {other}"),
            };
            let config = PipelineConfig::builder()
                .bootstrap_servers(bootstrap)
                .application_id(group)
                .instance_id("0")
                .input_topic(input)
                .commit_interval(interval)
                .stamp_source(false)
                .build()?;
            Pipeline::new(config, Enrich(output.clone()))
                .with_codec(onceflow::codec::Raw)
                .run()
                .await?;
            Ok(())
        }
    }
}

struct Enrich(String);

#[async_trait::async_trait]
impl Processor for Enrich {
    type Input = Option<Vec<u8>>;
    async fn process(
        &self,
        r: &Record<Option<Vec<u8>>>,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        let value =
            transform(r.value.as_deref().unwrap_or_default()).map_err(ProcessError::dead_letter)?;
        let mut o = OutputRecord::to(&self.0).value(value);
        if let Some(k) = &r.key {
            o = o.key(k.as_slice());
        }
        out.send(o);
        Ok(())
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
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[input])?;
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random")
        .create()?;
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut last_commit = Instant::now();
    loop {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            let value = transform(m.payload().unwrap_or_default())?;
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(output).payload(&value);
            if let Some(k) = m.key() {
                record = record.key(k);
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((e, back))
                        if e.rdkafka_error_code()
                            == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                    {
                        record = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            }
            next.insert(m.partition(), m.offset() + 1);
        }
        if let Some(every) = commit_every
            && last_commit.elapsed() >= every
            && !next.is_empty()
        {
            producer.flush(Duration::from_secs(30))?;
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
