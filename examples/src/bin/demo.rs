//! The main job: a transactional copy pipeline on a real Kafka, checked by reading it back.
//!
//! Starts an embedded Apache Kafka (or uses `--bootstrap-servers`), produces keyed input
//! records, copies them input → output inside Kafka transactions (records and input offsets
//! committed together), then reads the output back under `read_committed` and prints how many
//! records arrived, how many were duplicated and how many were lost.
//!
//! ```text
//! cargo run -p onceflow-examples --bin demo -- --records 20000
//! ```

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use onceflow::testkit::{self, Isolation, Kafka, KafkaOptions};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

#[derive(Debug, Parser)]
#[command(about = "Run a transactional copy pipeline on a real Kafka and verify it exactly-once")]
struct Args {
    /// How many input records to produce.
    #[arg(long, default_value_t = 20_000)]
    records: u64,
    /// Use this cluster instead of starting an embedded broker.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    bootstrap_servers: Option<String>,
    /// Input partitions.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Records per transaction at most.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
}

type Producer = ThreadedProducer<DefaultProducerContext>;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,onceflow=info".into()),
        )
        .init();
    let args = Args::parse();
    let started = Instant::now();

    // Everything here is blocking librdkafka work on the main thread; the testkit's async
    // helpers get a small runtime of their own.
    let rt = tokio::runtime::Runtime::new()?;
    let kafka = match &args.bootstrap_servers {
        Some(_) => Kafka::start_blocking(&KafkaOptions::single())?,
        None => {
            println!(
                "starting an embedded Apache Kafka {} ...",
                testkit::KAFKA_VERSION
            );
            Kafka::start_blocking(&KafkaOptions::cluster(1))?
        }
    };
    println!("kafka: {}", kafka.describe());
    let bootstrap = kafka.bootstrap_servers().to_owned();

    let run = format!("{}", std::process::id());
    let input = format!("demo-input-{run}");
    let output = format!("demo-output-{run}");
    let group = format!("demo-copier-{run}");
    rt.block_on(kafka.create_topic(&input, args.partitions, 1))?;
    rt.block_on(kafka.create_topic(&output, args.partitions, 1))?;

    produce_input(&kafka, &input, args.records)?;
    println!("produced {} input records to {input}", args.records);

    let copy_started = Instant::now();
    let stats = copy_exactly_once(&kafka, &input, &output, &group, args.records, args.batch)?;
    let copy_secs = copy_started.elapsed().as_secs_f64();

    let out = testkit::read_all_blocking(
        &bootstrap,
        &output,
        Isolation::ReadCommitted,
        Duration::from_secs(120),
    )?;
    let mut seen: HashMap<u64, u32> = HashMap::new();
    for r in &out {
        let n: u64 = r
            .value_str()
            .strip_prefix("copy-of-")
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("unexpected output {:?}", r.value_str()))?;
        *seen.entry(n).or_default() += 1;
    }
    let duplicates: u64 = seen.values().map(|c| u64::from(c.saturating_sub(1))).sum();
    let losses = (0..args.records).filter(|n| !seen.contains_key(n)).count();

    println!();
    println!("onceflow demo: transactional copy");
    println!("  input records       {}", args.records);
    println!("  output (committed)  {}", out.len());
    println!("  duplicates          {duplicates}");
    println!("  losses              {losses}");
    println!("  transactions        {}", stats.transactions);
    println!(
        "  copy throughput     {:.0} records/s",
        args.records as f64 / copy_secs.max(1e-9)
    );
    println!(
        "  total time          {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if duplicates != 0 || losses != 0 || out.len() as u64 != args.records {
        bail!("exactly-once violated: {duplicates} duplicates, {losses} losses");
    }
    println!("  exactly-once        OK");
    Ok(())
}

#[expect(
    clippy::disallowed_methods,
    reason = "the demo drives librdkafka from the main thread, outside any async executor"
)]
fn produce_input(kafka: &Kafka, topic: &str, records: u64) -> anyhow::Result<()> {
    let producer: Producer = kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()?;
    for n in 0..records {
        let key = format!("user-{}", n % 1_000);
        let value = n.to_string();
        let mut record = BaseRecord::to(topic).key(&key).payload(&value);
        // The queue is bounded; when it is full, let delivery catch up and try again.
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(())
}

struct CopyStats {
    transactions: u64,
}

/// consume (read_committed) → produce + send offsets inside one transaction → commit.
fn copy_exactly_once(
    kafka: &Kafka,
    input: &str,
    output: &str,
    group: &str,
    expected: u64,
    batch: usize,
) -> anyhow::Result<CopyStats> {
    let consumer: BaseConsumer = kafka
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()?;
    consumer.subscribe(&[input])?;
    let producer: Producer = kafka
        .client_config()
        .set("transactional.id", format!("{group}-0"))
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()?;
    let timeout = Duration::from_secs(30);
    producer.init_transactions(timeout)?;

    let mut copied = 0u64;
    let mut transactions = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while copied < expected {
        if Instant::now() > deadline {
            bail!("copied only {copied} of {expected} records in 300 s");
        }
        producer.begin_transaction()?;
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        let batch_end = Instant::now() + Duration::from_millis(100);
        let mut in_batch = 0;
        while in_batch < batch && Instant::now() < batch_end {
            let Some(message) = consumer.poll(Duration::from_millis(20)) else {
                continue;
            };
            let message = message?;
            let value = format!(
                "copy-of-{}",
                std::str::from_utf8(message.payload().unwrap_or_default())?
            );
            let record = BaseRecord::to(output)
                .key(message.key().unwrap_or_default())
                .payload(&value);
            producer.send(record).map_err(|(e, _)| e)?;
            next.insert(message.partition(), message.offset() + 1);
            in_batch += 1;
        }
        if next.is_empty() {
            producer.abort_transaction(timeout)?;
            continue;
        }
        let mut offsets = TopicPartitionList::new();
        for (partition, offset) in &next {
            offsets.add_partition_offset(input, *partition, Offset::Offset(*offset))?;
        }
        let group_metadata = consumer
            .group_metadata()
            .context("the consumer has no group metadata")?;
        producer.send_offsets_to_transaction(&offsets, &group_metadata, timeout)?;
        producer.commit_transaction(timeout)?;
        copied += in_batch as u64;
        transactions += 1;
    }
    Ok(CopyStats { transactions })
}
