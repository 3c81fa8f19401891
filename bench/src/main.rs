//! Side by side, on one broker in one run, with the same pre-loaded input and the same
//! transform: the raw copy ceiling, at-least-once, the same copy made exactly-once by hand with
//! rust-rdkafka's transactions, onceflow exactly-once at three commit intervals, and Kafka
//! Streams in `exactly_once_v2` and `at_least_once`.
//!
//! ```text
//! cargo run --release -p onceflow-bench -- --quick      # smoke run (CI)
//! cargo run --release -p onceflow-bench                 # full profile
//! ```
//!
//! Phase 1, throughput: each mode, in its own child process, processes the pre-loaded input;
//! the clock runs from the moment the worker holds its partitions until every output is
//! visible to a `read_committed` reader. Modes run in a different order in each repeat, after
//! warm-up rounds whose figures are thrown away. Phase 2, latency: after one phase whose figures
//! are thrown away, input produced at a fixed rate (half onceflow's measured maximum) into each
//! running mode, latency from input timestamp to visibility under `read_committed`. See
//! `docs/benchmarks.md`.

mod alloc;
mod broker_profile;
mod kstreams;
mod latency;
mod process;
mod report;
mod workers;

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use onceflow::testkit::{self, Isolation, Kafka, KafkaOptions};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::FutureProducer;
use rdkafka::producer::FutureRecord;

use crate::broker_profile::BrokerProfiler;
use crate::kstreams::KStreamsApp;
use crate::process::Worker;
use crate::report::ThroughputRow;

/// The allocator: the system's, or jemalloc in a `*-jemalloc` mode's worker (see [`alloc`]).
#[global_allocator]
static ALLOCATOR: alloc::Chosen = alloc::Chosen;

/// Input and output partitions.
pub const PARTITIONS: i32 = 6;

/// Every mode, in the order of the first repeat. A mode named `<mode>-jemalloc` is `<mode>`'s
/// worker with jemalloc as Rust's allocator (see [`alloc`]).
pub const MODES: [&str; 10] = [
    "ceiling",
    "at-least-once",
    "transactional-copy",
    "onceflow-10ms",
    "onceflow-100ms",
    "onceflow-1s",
    "at-least-once-jemalloc",
    "onceflow-100ms-jemalloc",
    "kstreams-eos-v2",
    "kstreams-alo",
];

/// The row every other is compared with.
pub const REFERENCE: &str = "onceflow-100ms";

/// The suffix of a mode whose worker runs on jemalloc.
pub const JEMALLOC_SUFFIX: &str = "-jemalloc";

/// The extra mode `--baseline` adds: the reference mode, run by another build of this harness.
pub const BASELINE_MODE: &str = "onceflow-100ms-baseline";

#[derive(Debug, Parser)]
#[command(
    about = "onceflow side by side with the ceiling, at-least-once, a hand-written transactional copy and Kafka Streams"
)]
struct Args {
    /// Records per throughput run (full profile).
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Value sizes in bytes, comma-separated.
    #[arg(long, default_value = "100,1024", value_delimiter = ',')]
    value_sizes: Vec<usize>,
    /// Throughput runs per mode; each repeat runs the modes in another order (see `run_order`).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Records in a warm-up round (every mode once, at the first of `--value-sizes`; figures
    /// discarded).
    #[arg(long, default_value_t = 500_000)]
    warmup_records: u64,
    /// Warm-up rounds before the measured runs. The broker is a fresh JVM: its JIT compiles
    /// for minutes, and the transactional modes exercise more of the broker's code, so they
    /// pay more of it (the broker JIT figures say how much is left).
    #[arg(long, default_value_t = 3)]
    warmup_rounds: usize,
    /// Seconds of fixed-rate input per mode in the latency phase (0: no latency phase).
    #[arg(long, default_value_t = 30.0)]
    latency_seconds: f64,
    /// Input rate of the latency phase, records/s (default: half `onceflow-100ms`'s median
    /// throughput in this run). A set rate takes the run's own noise out of an A/B comparison
    /// of latency, and lets it be measured away from saturation.
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Only these modes (comma-separated); default all.
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// Smoke profile: 20,000 records of 100 B, one repeat, a 2,000-record warm-up, 5 s of
    /// latency phase. Its figures mean nothing; it keeps the harness from rotting.
    #[arg(long)]
    quick: bool,
    /// Create the embedded broker's directory (its topics included) in this directory instead
    /// of the system's temporary one: `--broker-dir /dev/shm` puts it on tmpfs, which keeps
    /// the host disk's writeback stalls out of the latency phase (see
    /// docs/benchmarks-journal.md, "The broker's disk"). The directory must exist and have
    /// room for the input topics plus a run or two of output (the embedded broker removes a
    /// deleted topic's files after 1 s).
    #[arg(long, value_name = "DIR")]
    broker_dir: Option<std::path::PathBuf>,
    /// Profile the embedded broker during every measured throughput run with async-profiler
    /// (fetched from Maven Central; needs the JDK's `jcmd`): each run's stacks go to
    /// `DIR/<size>-<mode>-<repeat>.collapsed`, and the report gains a table of the broker's CPU
    /// per record by what it was doing — each request type, its network threads, its
    /// inter-broker requests, GC, JIT (see docs/benchmarks.md, "Run it").
    #[arg(long, value_name = "DIR")]
    profile_broker: Option<std::path::PathBuf>,
    /// Use this cluster instead of an embedded broker.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    bootstrap_servers: Option<String>,
    /// Write the results as JSON here.
    #[arg(long, default_value = "target/bench-results.json")]
    json_out: String,
    /// Write the markdown tables here.
    #[arg(long, default_value = "target/bench-results.md")]
    markdown_out: String,
    /// Re-render the markdown tables of an earlier run from its JSON results (written to
    /// `--markdown-out`); runs nothing.
    #[arg(long, value_name = "RESULTS_JSON")]
    render: Option<String>,
    /// Another build of this harness (typically of the commit before a change), whose
    /// `onceflow-100ms` worker runs as the extra mode `onceflow-100ms-baseline`: side by side
    /// with this build's, on the same broker and input, in the same run. The way to measure a
    /// change to the runtime, where runs on different days or hosts do not compare.
    #[arg(long, value_name = "HARNESS_BINARY")]
    baseline: Option<std::path::PathBuf>,
    /// Internal: run one Rust mode (MODE BOOTSTRAP INPUT OUTPUT GROUP).
    #[arg(long, hide = true, num_args = 5)]
    worker: Option<Vec<String>>,
    /// Internal: print which allocator this process runs on and the bytes jemalloc holds for
    /// it, then exit (checked by `bench/tests/allocator.rs`).
    #[arg(long, hide = true)]
    allocator_report: bool,
}

/// CPU seconds the embedded broker has used so far (see `Bench::broker_cpu_seconds`).
#[derive(Debug, Default, Clone, Copy)]
struct BrokerCpu {
    total: f64,
    /// Of `total`, in the JVM's JIT compiler threads.
    jit: f64,
    /// Of `total`, in the kernel (all threads, the JIT's included).
    system: f64,
}

impl BrokerCpu {
    /// What was used between `start` and `self`.
    fn since(self, start: Self) -> Self {
        Self {
            total: self.total - start.total,
            jit: self.jit - start.jit,
            system: self.system - start.system,
        }
    }
}

/// Which run of a mode a throughput run or latency phase is.
#[derive(Debug, Clone, Copy)]
enum Run {
    /// A warm-up round (figures discarded; recorded as repeat 0).
    WarmUp(usize),
    /// A measured repeat, from 1.
    Measured(usize),
}

/// What one run of the harness measures.
struct Plan {
    records: u64,
    sizes: Vec<usize>,
    repeats: usize,
    warmup_records: u64,
    warmup_rounds: usize,
    latency_seconds: f64,
    modes: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(rate) = args.latency_rate
        && !(rate.is_finite() && rate >= 1.0)
    {
        anyhow::bail!("--latency-rate must be at least 1 record/s, got {rate}");
    }
    if args.allocator_report {
        // Something held, so a process on jemalloc cannot report 0 by chance.
        let held = vec![1_u8; 1 << 20];
        println!(
            "allocator: {}; jemalloc holds {} bytes ({} held)",
            alloc::name(),
            alloc::jemalloc_allocated_bytes()?,
            held.len()
        );
        return Ok(());
    }
    if let Some(w) = &args.worker {
        let [mode, bootstrap, input, output, group] = w.as_slice() else {
            bail!("--worker takes 5 values");
        };
        eprintln!("{mode} worker: allocator {}", alloc::name());
        // Logs only when asked for (RUST_LOG), e.g. `RUST_LOG=onceflow=debug` to see each
        // transaction's timings; they go to stderr, which the harness passes through.
        if std::env::var_os("RUST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .init();
        }
        return workers::run(mode, bootstrap, input, output, group).await;
    }
    if let Some(path) = &args.render {
        let results: report::Results = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        let md = report::markdown(&results);
        println!("{md}");
        std::fs::write(&args.markdown_out, md)?;
        return Ok(());
    }
    let mut modes: Vec<String> = if args.modes.is_empty() {
        MODES.iter().map(|m| (*m).to_owned()).collect()
    } else {
        for m in &args.modes {
            if !MODES.contains(&m.as_str()) {
                bail!("unknown mode {m}; the modes are {}", MODES.join(", "));
            }
        }
        args.modes.clone()
    };
    if let Some(baseline) = &args.baseline {
        if !baseline.is_file() {
            bail!(
                "--baseline {}: no such file (build the other commit's harness with \
                 `cargo build --release -p onceflow-bench` and pass its \
                 target/release/onceflow-bench)",
                baseline.display()
            );
        }
        modes.push(BASELINE_MODE.to_owned());
    }
    let plan = if args.quick {
        Plan {
            records: 20_000,
            sizes: vec![100],
            repeats: 1,
            warmup_records: 2_000,
            warmup_rounds: 1,
            latency_seconds: 5.0,
            modes,
        }
    } else {
        Plan {
            records: args.records,
            sizes: args.value_sizes.clone(),
            repeats: args.repeats.max(1),
            warmup_records: args.warmup_records,
            warmup_rounds: args.warmup_rounds,
            latency_seconds: args.latency_seconds,
            modes,
        }
    };
    if args.bootstrap_servers.is_some() && args.broker_dir.is_some() {
        bail!("--broker-dir is for the embedded broker; it cannot apply to --bootstrap-servers");
    }
    if args.bootstrap_servers.is_some() && args.profile_broker.is_some() {
        bail!(
            "--profile-broker attaches to the embedded broker; it cannot profile --bootstrap-servers"
        );
    }
    // Before the broker starts: a missing JDK tool or an unreachable Maven Central is an
    // error in seconds, not after the warm-up.
    let profiler = match &args.profile_broker {
        Some(dir) => {
            let dir = dir.clone();
            let java = KafkaOptions::single().java;
            Some(tokio::task::spawn_blocking(move || BrokerProfiler::prepare(&dir, &java)).await??)
        }
        None => None,
    };
    let kafka = match &args.bootstrap_servers {
        Some(_) => Kafka::start_with(KafkaOptions::single()).await?,
        None => {
            // A deleted topic's files are removed after `log.segment.delete.delay.ms` (60 s by
            // default). The harness deletes each run's output as soon as it is measured, and at
            // 1 KB a minute of outputs is ~12 GB: with the default the broker's directory grew
            // into memory the VM had handed back to its host, and touching that memory again
            // made the broker's writes several times slower for the first repeats
            // (docs/benchmarks-journal.md, "The slow phases, found"). With 1 s the directory
            // stays at the inputs and a run or two of outputs, and the freed pages are reused.
            let mut options = KafkaOptions::cluster(1)
                .heap("1g")
                .broker_property("log.segment.delete.delay.ms", "1000");
            if let Some(dir) = &args.broker_dir {
                options = options.data_dir(dir);
            }
            Kafka::start_with(options).await?
        }
    };
    println!("kafka: {}", kafka.describe());
    let version = kafka.version().unwrap_or(testkit::KAFKA_VERSION).to_owned();
    let kstreams = if plan.modes.iter().any(|m| m.starts_with("kstreams")) {
        let v = version.clone();
        Some(tokio::task::spawn_blocking(move || kstreams::build(&v)).await??)
    } else {
        None
    };
    let bench = Bench {
        kafka: &kafka,
        kstreams: kstreams.as_ref(),
        baseline: args.baseline.as_deref(),
        profiler: profiler.as_ref(),
        run: std::process::id(),
    };

    if plan.warmup_records > 0 && plan.warmup_rounds > 0 {
        println!(
            "\nwarm-up: {} round(s), every mode once per round over {} records (discarded)",
            plan.warmup_rounds, plan.warmup_records
        );
        // At the first measured size, not a fixed one: a run of 1 KiB records only would
        // otherwise measure its first repeats on a broker whose JIT had seen no 1 KiB fetches
        // and produce requests yet (5.6 s of broker JIT in such a first repeat, 0.4 s by the
        // third).
        let size = plan.sizes.first().copied().unwrap_or(100);
        let input = format!("bench-warmup-{}", bench.run);
        kafka.create_topic(&input, PARTITIONS, 1).await?;
        preload(&kafka, &input, plan.warmup_records, size).await?;
        for round in 0..plan.warmup_rounds {
            for mode in &plan.modes {
                bench
                    .throughput(mode, &input, plan.warmup_records, size, Run::WarmUp(round))
                    .await?;
            }
        }
    }

    let mut rows = Vec::new();
    let mut latencies = Vec::new();
    for &size in &plan.sizes {
        println!(
            "\nthroughput: {} records of {size} B, {} repeat(s)",
            plan.records, plan.repeats
        );
        let input = format!("bench-in-{size}-{}", bench.run);
        kafka.create_topic(&input, PARTITIONS, 1).await?;
        let loading = Instant::now();
        preload(&kafka, &input, plan.records, size).await?;
        println!("pre-loaded in {:.1} s", loading.elapsed().as_secs_f64());
        for repeat in 0..plan.repeats {
            for i in run_order(plan.modes.len(), repeat) {
                let mode = &plan.modes[i];
                let row = bench
                    .throughput(mode, &input, plan.records, size, Run::Measured(repeat + 1))
                    .await?;
                rows.push(row);
            }
        }
        let reference = report::median_throughput(&rows, REFERENCE, size).or_else(|| {
            rows.iter()
                .filter(|r| r.value_size == size)
                .map(|r| r.records_per_second)
                .reduce(f64::max)
        });
        let Some(max) = reference.filter(|_| plan.latency_seconds > 0.0) else {
            continue;
        };
        let rate = args.latency_rate.unwrap_or((max / 2.0).round());
        println!(
            "\nlatency: {rate} records/s of {size} B for {} s per mode",
            plan.latency_seconds
        );
        // One phase first whose figures are thrown away. Without it the phase that ran first
        // had the longer p50 and p99 whichever build it was (docs/benchmarks.md, "Limits of
        // the method"), so the modes' order decided part of each comparison.
        if let Some(first) = plan.modes.first() {
            bench
                .latency(first, size, rate, plan.latency_seconds, Run::WarmUp(0))
                .await?;
        }
        for mode in &plan.modes {
            latencies.push(
                bench
                    .latency(mode, size, rate, plan.latency_seconds, Run::Measured(1))
                    .await?,
            );
        }
    }

    let results = report::Results {
        kafka: kafka.describe(),
        kafka_version: version,
        java: kstreams.as_ref().map(|k| k.java_version.clone()),
        records: plan.records,
        repeats: plan.repeats,
        warmup_records: plan.warmup_records,
        warmup_rounds: plan.warmup_rounds,
        latency_seconds: plan.latency_seconds,
        latency_rate_set: args.latency_rate.is_some(),
        machine: report::machine(),
        throughput: rows,
        latency: latencies,
    };
    let md = report::markdown(&results);
    println!("\n{md}");
    for path in [&args.json_out, &args.markdown_out] {
        if let Some(dir) = std::path::Path::new(path).parent() {
            std::fs::create_dir_all(dir)?;
        }
    }
    std::fs::write(&args.json_out, serde_json::to_string_pretty(&results)?)?;
    std::fs::write(&args.markdown_out, md)?;
    println!("results: {} and {}", args.json_out, args.markdown_out);
    Ok(())
}

struct Bench<'a> {
    kafka: &'a Kafka,
    kstreams: Option<&'a KStreamsApp>,
    /// The other build `--baseline` names.
    baseline: Option<&'a std::path::Path>,
    /// `--profile-broker`'s profiler.
    profiler: Option<&'a BrokerProfiler>,
    run: u32,
}

impl Bench<'_> {
    fn spawn(&self, mode: &str, input: &str, output: &str, group: &str) -> anyhow::Result<Worker> {
        let bootstrap = self.kafka.bootstrap_servers();
        let command = match mode {
            "kstreams-eos-v2" | "kstreams-alo" => {
                let Some(app) = self.kstreams else {
                    bail!("the Kafka Streams application was not built");
                };
                let guarantee = if mode == "kstreams-eos-v2" {
                    "exactly_once_v2"
                } else {
                    "at_least_once"
                };
                app.command(guarantee, bootstrap, input, output, group)
            }
            BASELINE_MODE => {
                let Some(binary) = self.baseline else {
                    bail!("{BASELINE_MODE} runs only with --baseline");
                };
                let mut c = std::process::Command::new(binary);
                c.args(["--worker", REFERENCE, bootstrap, input, output, group]);
                c
            }
            _ => {
                let mut c = std::process::Command::new(std::env::current_exe()?);
                match mode.strip_suffix(JEMALLOC_SUFFIX) {
                    Some(worker) => {
                        c.args(["--worker", worker, bootstrap, input, output, group]);
                        c.env(alloc::env_name(), alloc::JEMALLOC);
                    }
                    None => {
                        c.args(["--worker", mode, bootstrap, input, output, group]);
                        // The system allocator, whatever the harness's own environment says.
                        c.env_remove(alloc::env_name());
                    }
                }
                c
            }
        };
        Worker::spawn(mode, command)
    }

    /// CPU seconds the embedded broker's JVM(s) have used so far: in all, in its JIT compiler
    /// threads, and in the kernel; `None` for an external cluster, whose processes are not ours
    /// to read.
    fn broker_cpu_seconds(&self) -> anyhow::Result<Option<BrokerCpu>> {
        if !self.kafka.is_embedded() {
            return Ok(None);
        }
        let mut cpu = BrokerCpu::default();
        for pid in self.kafka.process_ids()? {
            let (user, system) = process::user_and_system_seconds_of(pid)?;
            cpu.total += user + system;
            cpu.system += system;
            cpu.jit += process::jit_cpu_seconds_of(pid)?;
        }
        Ok(Some(cpu))
    }

    /// The embedded broker's JVM (`--profile-broker` runs one node).
    fn broker_pid(&self) -> anyhow::Result<u32> {
        match self.kafka.process_ids()?.as_slice() {
            [pid] => Ok(*pid),
            pids => bail!(
                "--profile-broker expects one broker process, found {}",
                pids.len()
            ),
        }
    }

    /// One throughput run of `mode` over the pre-loaded `input`.
    async fn throughput(
        &self,
        mode: &str,
        input: &str,
        records: u64,
        size: usize,
        run: Run,
    ) -> anyhow::Result<ThroughputRow> {
        let (repeat, name) = match run {
            Run::WarmUp(round) => (0, format!("w{round}")),
            Run::Measured(repeat) => (repeat, repeat.to_string()),
        };
        let output = format!("bench-out-{mode}-{size}-{name}-{}", self.run);
        let group = format!("bench-{mode}-{size}-{name}-{}", self.run);
        self.kafka.create_topic(&output, PARTITIONS, 1).await?;
        // Measured runs only; started before the worker, so `jcmd`'s own JVM has come and gone
        // before the clock starts (see `broker_profile`).
        let profiling = match (self.profiler, run) {
            (Some(profiler), Run::Measured(repeat)) => {
                let pid = self.broker_pid()?;
                // `jcmd` blocks for half a second; the runtime moves this thread's other tasks
                // elsewhere meanwhile.
                tokio::task::block_in_place(|| profiler.start(pid))?;
                Some((profiler, pid, profiler.file(size, mode, repeat)))
            }
            _ => None,
        };
        let spawned = Instant::now();
        let mut worker = self.spawn(mode, input, &output, &group)?;
        let ready = worker.wait_ready(Duration::from_secs(120)).await?;
        let (user_at_ready, system_at_ready) = worker.user_and_system_seconds_so_far()?;
        let librdkafka_at_ready = worker.librdkafka_seconds_so_far()?;
        let cpu_at_ready = user_at_ready + system_at_ready;
        let broker_cpu_at_ready = self.broker_cpu_seconds()?;
        let commits = mode != "ceiling";
        let deadline = ready + Duration::from_secs(1800);
        loop {
            let (b, g, i, o) = (
                self.kafka.bootstrap_servers().to_owned(),
                group.clone(),
                input.to_owned(),
                output.clone(),
            );
            let done = tokio::task::spawn_blocking(move || -> anyhow::Result<bool> {
                if commits {
                    // Offsets are committed with (exactly-once) or after (at-least-once) the
                    // outputs they cover, so the end of the input committed means every
                    // output is visible.
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
            worker.check_alive()?;
            if Instant::now() > deadline {
                bail!("{mode} did not finish in 30 minutes");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let finished = Instant::now();
        let (user_at_end, system_at_end) = worker.user_and_system_seconds_so_far()?;
        let librdkafka = worker
            .librdkafka_seconds_so_far()?
            .zip(librdkafka_at_ready)
            .map(|(end, start)| end - start);
        let cpu_total_at_end = user_at_end + system_at_end;
        let broker_cpu = self
            .broker_cpu_seconds()?
            .zip(broker_cpu_at_ready)
            .map(|(end, start)| end.since(start));
        let broker_profile = match profiling {
            Some((profiler, pid, file)) => Some(tokio::task::block_in_place(|| {
                profiler.stop(pid, &file)?;
                broker_profile::read(&file)
            })?),
            None => None,
        };
        let usage = worker.kill()?;
        self.delete_topic(&output).await;
        let seconds = finished.duration_since(ready).as_secs_f64();
        let row = ThroughputRow {
            mode: mode.to_owned(),
            value_size: size,
            repeat,
            records,
            startup_seconds: ready.duration_since(spawned).as_secs_f64(),
            seconds,
            records_per_second: records as f64 / seconds,
            cpu_seconds: cpu_total_at_end - cpu_at_ready,
            cpu_system_seconds: Some(system_at_end - system_at_ready),
            cpu_librdkafka_seconds: librdkafka,
            cpu_seconds_total: usage.cpu_seconds,
            broker_cpu_seconds: broker_cpu.map(|b| b.total - b.jit),
            broker_jit_cpu_seconds: broker_cpu.map(|b| b.jit),
            broker_system_cpu_seconds: broker_cpu.map(|b| b.system),
            peak_rss_mib: usage.peak_rss_mib,
            broker_profile,
        };
        println!(
            "{:<16} {:>5} B  #{repeat}  {:>9.0} records/s  {:>6.1} s (+{:.1} s start)  cpu {:>6.1} s ({:.1} s system, {:.1} s librdkafka)  broker cpu {:>6.1} s (+{:.1} s JIT; {:.1} s system)  rss {:>7.1} MiB",
            row.mode,
            row.value_size,
            row.records_per_second,
            row.seconds,
            row.startup_seconds,
            row.cpu_seconds,
            row.cpu_system_seconds.unwrap_or(f64::NAN),
            row.cpu_librdkafka_seconds.unwrap_or(f64::NAN),
            row.broker_cpu_seconds.unwrap_or(f64::NAN),
            row.broker_jit_cpu_seconds.unwrap_or(f64::NAN),
            row.broker_system_cpu_seconds.unwrap_or(f64::NAN),
            row.peak_rss_mib
        );
        Ok(row)
    }

    /// The latency phase for `mode`: a fresh input, the worker started and ready, then `rate`
    /// records/s for `seconds`. A warm-up phase's row is printed, marked, and is for the caller
    /// to throw away.
    async fn latency(
        &self,
        mode: &str,
        size: usize,
        rate: f64,
        seconds: f64,
        run: Run,
    ) -> anyhow::Result<latency::LatencyRow> {
        let (name, label) = match run {
            Run::WarmUp(round) => (format!("w{round}"), "  (warm-up, discarded)"),
            Run::Measured(repeat) => (repeat.to_string(), ""),
        };
        let input = format!("bench-lat-in-{mode}-{size}-{name}-{}", self.run);
        let output = format!("bench-lat-out-{mode}-{size}-{name}-{}", self.run);
        let group = format!("bench-lat-{mode}-{size}-{name}-{}", self.run);
        self.kafka.create_topic(&input, PARTITIONS, 1).await?;
        self.kafka.create_topic(&output, PARTITIONS, 1).await?;
        let mut worker = self.spawn(mode, &input, &output, &group)?;
        worker.wait_ready(Duration::from_secs(120)).await?;
        let row = latency::run(
            self.kafka.bootstrap_servers(),
            mode,
            &input,
            &output,
            size,
            rate,
            seconds,
        )
        .await?;
        worker.check_alive()?;
        worker.kill()?;
        self.delete_topic(&input).await;
        self.delete_topic(&output).await;
        println!(
            "{:<16} {:>5} B  {:>8.0}/s  received {}/{}  p50 {:>6.0} ms  p99 {:>6.0} ms  p99.9 {:>6.0} ms  max {:>6.0} ms{label}",
            row.mode,
            row.value_size,
            row.rate,
            row.received,
            row.produced,
            row.p50_ms,
            row.p99_ms,
            row.p999_ms,
            row.max_ms
        );
        Ok(row)
    }

    /// Deletes a topic the run no longer needs (a full run writes gigabytes); a failure only
    /// costs disk space, so it is reported, not fatal.
    async fn delete_topic(&self, topic: &str) {
        let admin: Result<AdminClient<DefaultClientContext>, _> =
            self.kafka.client_config().create();
        let result = match admin {
            Ok(admin) => admin
                .delete_topics(&[topic], &AdminOptions::new())
                .await
                .map_err(|e| e.to_string())
                // The request can succeed while the topic's own deletion fails: that error is
                // in the per-topic result.
                .and_then(|results| {
                    results
                        .into_iter()
                        .try_for_each(|r| r.map(|_| ()).map_err(|(_, code)| code.to_string()))
                }),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            eprintln!("deleting {topic}: {e}");
        }
    }
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
        let (user, value) = workers::Item::value(id, size)?;
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

/// The order of the modes (indices into the plan's list) in repeat `repeat`: start one later
/// each repeat, and step through the list by a stride coprime with its length, a different
/// stride each repeat.
///
/// Why not a plain rotation: it gives every mode the same predecessor in every repeat, so
/// whatever a mode leaves behind for the next (a broker compacting `__transaction_state` after
/// a hundred transactions a second, a JVM's page cache) falls on the same mode every time.
/// Under rotation `onceflow-100ms` always followed `onceflow-10ms` and its side-by-side
/// `onceflow-100ms-baseline` always followed `kstreams-alo`, which was suspected of the 1 KB
/// disagreement between full profiles and three-mode runs (`docs/benchmarks-journal.md`);
/// varying the order takes that suspect out of every later comparison.
fn run_order(n: usize, repeat: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let strides: Vec<usize> = (1..n.max(2)).filter(|&s| gcd(s, n) == 1).collect();
    let stride = strides[repeat % strides.len()];
    (0..n).map(|i| (repeat + i * stride) % n).collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_repeat_runs_every_mode_once_and_predecessors_change() {
        for n in 1..=MODES.len() + 1 {
            for repeat in 0..6 {
                let mut order = run_order(n, repeat);
                order.sort_unstable();
                assert_eq!(order, (0..n).collect::<Vec<_>>(), "n={n} repeat={repeat}");
            }
        }
        // The full profile's modes, with and without `--baseline`: in its three repeats, no
        // mode has the same predecessor twice.
        for n in [MODES.len(), MODES.len() + 1] {
            let orders: Vec<Vec<usize>> = (0..3).map(|r| run_order(n, r)).collect();
            for mode in 0..n {
                let before: Vec<Option<usize>> = orders
                    .iter()
                    .map(|o| {
                        let at = o.iter().position(|&m| m == mode)?;
                        at.checked_sub(1).map(|p| o[p])
                    })
                    .collect();
                let known: Vec<usize> = before.iter().flatten().copied().collect();
                let mut unique = known.clone();
                unique.sort_unstable();
                unique.dedup();
                assert_eq!(unique.len(), known.len(), "n={n} mode {mode}: {before:?}");
            }
            assert_eq!(run_order(n, 0), (0..n).collect::<Vec<_>>());
        }
    }
}
