//! `onceflow`: the command-line tool.
//!
//! ```text
//! onceflow verify --bootstrap-servers 127.0.0.1:9092 --input orders --output enriched [--dlq orders.dlq] [--json]
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
    }
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
