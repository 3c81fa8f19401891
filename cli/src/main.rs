//! `onceflow`: the command-line tool.
//!
//! ```text
//! onceflow verify --bootstrap-servers 127.0.0.1:9092 --input orders --output enriched [--dlq orders.dlq] [--json]
//! onceflow offsets --topic orders [--group pricer] [--json]
//! onceflow lag --group pricer [--watch] [--serve 127.0.0.1:9464]
//! onceflow reset-offsets --group pricer --topic orders --to-timestamp 2026-11-20T08:00:00Z [--execute]
//! ```
//!
//! Exit status: 0 when the check passed, 1 when it found a violation, 2 when it could not run
//! (bad arguments, unreachable cluster, missing topic).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use onceflow::verify::{Report, VerifyOptions, verify_blocking};

#[derive(Debug, Parser)]
#[command(
    name = "onceflow",
    version,
    about = "onceflow: exactly-once stream processing for Apache Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check an output topic against its input: duplicates, losses, order, open transactions.
    Verify(VerifyArgs),
    /// Per partition: earliest, latest, last stable offset; with --group, committed and lag.
    Offsets(OffsetsArgs),
    /// A group's lag on every topic it consumes; --watch refreshes, --serve exposes Prometheus metrics.
    Lag(LagArgs),
    /// Move a group's offsets (shows the plan; changes them only with --execute).
    ResetOffsets(ResetArgs),
}

#[derive(Debug, Args)]
struct OffsetsArgs {
    #[command(flatten)]
    connection: Connection,
    /// The topic.
    #[arg(long)]
    topic: String,
    /// A consumer group: adds its committed offsets and lag.
    #[arg(long)]
    group: Option<String>,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct LagArgs {
    #[command(flatten)]
    connection: Connection,
    /// The consumer group.
    #[arg(long)]
    group: String,
    /// Only this topic (default: every topic the group has committed offsets for).
    #[arg(long)]
    topic: Option<String>,
    /// Refresh every --interval seconds.
    #[arg(long)]
    watch: bool,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 2)]
    interval: u64,
    /// Stop after this many refreshes (default: until interrupted).
    #[arg(long)]
    iterations: Option<u64>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464) at /metrics.
    #[arg(long)]
    serve: Option<String>,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("to").required(true).multiple(false)))]
struct ResetArgs {
    #[command(flatten)]
    connection: Connection,
    /// The consumer group.
    #[arg(long)]
    group: String,
    /// The topic.
    #[arg(long)]
    topic: String,
    /// To the first retained offset.
    #[arg(long, group = "to")]
    to_earliest: bool,
    /// To the end (the last stable offset).
    #[arg(long, group = "to")]
    to_latest: bool,
    /// To this offset on every partition.
    #[arg(long, group = "to")]
    to_offset: Option<i64>,
    /// To the first record at or after this time: RFC 3339 (2026-11-20T08:00:00Z) or ms since the epoch.
    #[arg(long, group = "to", value_parser = parse_time)]
    to_timestamp: Option<i64>,
    /// By this many records from the committed offset (negative: back).
    #[arg(long, group = "to", allow_negative_numbers = true)]
    shift_by: Option<i64>,
    /// Apply the plan (otherwise it is only shown).
    #[arg(long)]
    execute: bool,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?} is neither ms since the epoch nor an RFC 3339 time: {e}"))?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{s:?} is before 1970"))?
        .as_millis();
    i64::try_from(ms).map_err(|_| format!("{s:?} is too far in the future"))
}

/// How to reach the cluster; the same settings the framework takes.
#[derive(Debug, Args)]
struct Connection {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    bootstrap_servers: String,
    /// A librdkafka property, `key=value` (TLS, SASL, ...). Repeatable. Values of secret
    /// properties are never printed.
    #[arg(short = 'X', long = "kafka-property", value_parser = parse_property)]
    kafka_properties: Vec<(String, String)>,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    #[command(flatten)]
    connection: Connection,
    /// The input topic.
    #[arg(long)]
    input: String,
    /// An output topic (repeatable).
    #[arg(long = "output", required = true)]
    outputs: Vec<String>,
    /// The dead-letter topic: inputs found there count as accounted for.
    #[arg(long)]
    dlq: Option<String>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Give up reading after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Verify(args) => verify(&args),
        Command::Offsets(args) => report(offsets(&args)),
        Command::Lag(args) => report(lag(&args)),
        Command::ResetOffsets(args) => report(reset(&args)),
    }
}

fn report(result: Result<(), onceflow::Error>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("onceflow: {e}");
            ExitCode::from(2)
        }
    }
}

impl Connection {
    fn toolkit(&self) -> onceflow::offsets::Connection {
        onceflow::offsets::Connection {
            bootstrap_servers: self.bootstrap_servers.clone(),
            properties: self.kafka_properties.iter().cloned().collect(),
        }
    }
}

fn json_out<T: serde::Serialize>(value: &T) -> Result<(), onceflow::Error> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| onceflow::Error::Worker(format!("cannot write JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

fn print_offsets(group: Option<&str>, rows: &[onceflow::offsets::PartitionOffsets]) {
    let opt = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    println!(
        "{:<32} {:>9} {:>12} {:>12} {:>12} {:>12} {:>8}",
        "topic", "partition", "earliest", "latest", "last stable", "committed", "lag"
    );
    for r in rows {
        println!(
            "{:<32} {:>9} {:>12} {:>12} {:>12} {:>12} {:>8}",
            r.topic,
            r.partition,
            r.earliest,
            r.latest,
            r.last_stable,
            opt(r.committed),
            opt(r.lag)
        );
    }
    if let Some(g) = group {
        let total: i64 = rows.iter().filter_map(|r| r.lag).sum();
        println!("group {g}: total lag {total} (against the last stable offset)");
    }
}

fn offsets(args: &OffsetsArgs) -> Result<(), onceflow::Error> {
    let rows = onceflow::offsets::topic_offsets(
        &args.connection.toolkit(),
        &args.topic,
        args.group.as_deref(),
    )?;
    if args.json {
        json_out(&rows)
    } else {
        print_offsets(args.group.as_deref(), &rows);
        Ok(())
    }
}

fn lag_rows(args: &LagArgs) -> Result<Vec<onceflow::offsets::PartitionOffsets>, onceflow::Error> {
    let conn = args.connection.toolkit();
    let topics = match &args.topic {
        Some(t) => vec![t.clone()],
        None => onceflow::offsets::group_topics(&conn, &args.group)?,
    };
    if topics.is_empty() {
        return Err(onceflow::Error::Config {
            field: "group".into(),
            problem: format!(
                "{} has no committed offsets on any topic (unknown group, or it never committed)",
                args.group
            ),
        });
    }
    let mut rows = Vec::new();
    for t in topics {
        rows.extend(onceflow::offsets::topic_offsets(
            &conn,
            &t,
            Some(&args.group),
        )?);
    }
    Ok(rows)
}

#[expect(
    clippy::disallowed_methods,
    reason = "the CLI is synchronous: no async executor runs here, sleeping between refreshes is the point"
)]
fn lag(args: &LagArgs) -> Result<(), onceflow::Error> {
    if let Some(addr) = &args.serve {
        return serve_metrics(args, addr);
    }
    let mut n = 0u64;
    loop {
        let rows = lag_rows(args)?;
        if args.json {
            json_out(&rows)?;
        } else {
            if args.watch {
                // Clear the screen and go home, like watch(1).
                print!("\x1b[2J\x1b[H");
            }
            print_offsets(Some(&args.group), &rows);
        }
        n += 1;
        if !args.watch || args.iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(args.interval.max(1)));
    }
}

/// A minimal HTTP endpoint: every request gets the current figures in Prometheus' text format.
fn serve_metrics(args: &LagArgs, addr: &str) -> Result<(), onceflow::Error> {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| onceflow::Error::Worker(format!("cannot listen on {addr}: {e}")))?;
    eprintln!("serving Prometheus metrics on http://{addr}/metrics");
    let mut served = 0u64;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request);
        let (status, body) = match lag_rows(args) {
            Ok(rows) => ("200 OK", prometheus_text(&args.group, &rows)),
            Err(e) => ("503 Service Unavailable", format!("# error: {e}\n")),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes());
        served += 1;
        if args.iterations.is_some_and(|max| served >= max) {
            break;
        }
    }
    Ok(())
}

fn prometheus_text(group: &str, rows: &[onceflow::offsets::PartitionOffsets]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let metrics: [(&str, &str, bool); 4] = [
        (
            "onceflow_partition_latest_offset",
            "High watermark of the partition.",
            false,
        ),
        (
            "onceflow_partition_last_stable_offset",
            "Last stable offset (end as read_committed sees it).",
            false,
        ),
        (
            "onceflow_group_committed_offset",
            "Offset the group has committed.",
            true,
        ),
        (
            "onceflow_group_lag",
            "Last stable offset minus the group's committed offset.",
            true,
        ),
    ];
    for (name, help, per_group) in metrics {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for r in rows {
            let value = match name {
                "onceflow_partition_latest_offset" => Some(r.latest),
                "onceflow_partition_last_stable_offset" => Some(r.last_stable),
                "onceflow_group_committed_offset" => r.committed,
                _ => r.lag,
            };
            let Some(value) = value else { continue };
            let group_label = if per_group {
                format!("group=\"{group}\",")
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{name}{{{group_label}topic=\"{}\",partition=\"{}\"}} {value}",
                r.topic, r.partition
            );
        }
    }
    out
}

fn reset(args: &ResetArgs) -> Result<(), onceflow::Error> {
    use onceflow::offsets::ResetTo;
    let to = if args.to_earliest {
        ResetTo::Earliest
    } else if args.to_latest {
        ResetTo::Latest
    } else if let Some(o) = args.to_offset {
        ResetTo::Offset(o)
    } else if let Some(t) = args.to_timestamp {
        ResetTo::Timestamp(t)
    } else if let Some(n) = args.shift_by {
        ResetTo::ShiftBy(n)
    } else {
        return Err(onceflow::Error::Config {
            field: "to".into(),
            problem: "choose where to reset to".into(),
        });
    };
    let conn = args.connection.toolkit();
    let plan = onceflow::offsets::plan_reset(&conn, &args.group, &args.topic, to)?;
    if args.execute {
        onceflow::offsets::execute_reset(&conn, &args.group, &args.topic, &plan)?;
    }
    if args.json {
        return json_out(&plan);
    }
    let opt = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    println!("{:>9} {:>12} {:>12}", "partition", "current", "new");
    for p in &plan {
        println!("{:>9} {:>12} {:>12}", p.partition, opt(p.current), p.target);
    }
    if args.execute {
        println!(
            "group {} now starts {} from these offsets",
            args.group, args.topic
        );
    } else {
        println!("plan only: nothing changed (add --execute to apply)");
    }
    Ok(())
}

fn verify(args: &VerifyArgs) -> ExitCode {
    let mut options = VerifyOptions::new(
        &args.connection.bootstrap_servers,
        &args.input,
        &args.outputs.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    options.dead_letter_topic.clone_from(&args.dlq);
    options.kafka_properties = args
        .connection
        .kafka_properties
        .iter()
        .cloned()
        .collect::<BTreeMap<_, _>>();
    options.timeout = Duration::from_secs(args.timeout_secs);

    let bar = if args.quiet || args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{msg:>30} [{bar:40}] {pos}/{len} records ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut on_progress = |topic: &str, read: u64, expected: u64| {
        if bar.message() != topic {
            bar.set_message(topic.to_owned());
            bar.reset();
        }
        bar.set_length(expected.max(read));
        bar.set_position(read);
    };
    let result = verify_blocking(&options, &mut on_progress);
    bar.finish_and_clear();
    match result {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(json) => println!("{json}"),
                    Err(e) => {
                        eprintln!("onceflow verify: cannot write JSON: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                print_table(&report);
            }
            if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("onceflow verify: {e}");
            ExitCode::from(2)
        }
    }
}

fn print_table(r: &Report) {
    println!(
        "input  {:<40} {:>12} records (read_committed)",
        r.input_topic, r.input_records
    );
    println!();
    println!(
        "{:<40} {:>10} {:>11} {:>10} {:>10} {:>13}",
        "output topic", "records", "duplicates", "unmatched", "reordered", "open txns"
    );
    for o in &r.outputs {
        println!(
            "{:<40} {:>10} {:>11} {:>10} {:>10} {:>13}",
            o.topic,
            o.records,
            o.duplicated_inputs,
            o.unmatched,
            o.order_violations,
            if o.open_transaction_partitions.is_empty() {
                "none".to_owned()
            } else {
                format!("{:?}", o.open_transaction_partitions)
            }
        );
    }
    println!();
    println!("dead letters            {}", r.dead_letters);
    println!("losses                  {}", r.losses);
    println!("duplicates              {}", r.duplicates());
    println!("order violations        {}", r.order_violations());
    println!(
        "transactions finished   {}",
        if r.transactions_finished { "yes" } else { "NO" }
    );
    if !r.lost_examples.is_empty() {
        println!("lost (first)            {}", r.lost_examples.join(", "));
    }
    if !r.duplicate_examples.is_empty() {
        println!(
            "duplicated (first)      {}",
            r.duplicate_examples.join(", ")
        );
    }
    println!();
    println!(
        "{}",
        if r.is_ok() {
            "OK: exactly once"
        } else {
            "VIOLATION"
        }
    );
}
