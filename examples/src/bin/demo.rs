//! The main job: an exactly-once onceflow pipeline on a real Kafka, checked by reading back.
//!
//! Starts an embedded Apache Kafka (or uses `--bootstrap-servers`), produces keyed order
//! events, runs a onceflow pipeline that enriches each event (outputs and input offsets are
//! committed together in Kafka transactions), then reads the output back under
//! `read_committed` and prints how many records arrived, were duplicated and were lost.
//!
//! ```text
//! cargo run -p onceflow-examples --bin demo -- --records 20000
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use onceflow::testkit::{self, Isolation, Kafka, KafkaOptions};
use onceflow::{Output, OutputRecord, Pipeline, PipelineConfig, ProcessError, Processor, Record};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};

#[derive(Debug, Parser)]
#[command(about = "Run an exactly-once onceflow pipeline on a real Kafka and verify it")]
struct Args {
    /// How many input events to produce.
    #[arg(long, default_value_t = 20_000)]
    records: u64,
    /// Use this cluster instead of starting an embedded broker.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    bootstrap_servers: Option<String>,
    /// Input and output partitions.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
}

#[derive(Debug, Serialize, Deserialize)]
struct OrderEvent {
    id: u64,
    user: String,
    cents: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Priced {
    id: u64,
    user: String,
    cents: u64,
    with_vat_cents: u64,
}

/// Adds VAT to each event; keyed by user so one user's results stay in order.
struct AddVat {
    output: String,
}

#[onceflow::async_trait]
impl Processor for AddVat {
    type Input = OrderEvent;

    async fn process(&self, r: &Record<OrderEvent>, out: &mut Output) -> Result<(), ProcessError> {
        let e = &r.value;
        let priced = Priced {
            id: e.id,
            user: e.user.clone(),
            cents: e.cents,
            with_vat_cents: e.cents * 120 / 100,
        };
        out.send(
            OutputRecord::to(&self.output)
                .key(e.user.as_str())
                .json(&priced)?
                .headers_from(&r.headers),
        );
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,onceflow=info".into()),
        )
        .init();
    let args = Args::parse();
    let started = Instant::now();

    let options = if args.bootstrap_servers.is_some() {
        KafkaOptions::single()
    } else {
        println!(
            "starting an embedded Apache Kafka {} ...",
            testkit::KAFKA_VERSION
        );
        KafkaOptions::cluster(1)
    };
    let kafka = Kafka::start_with(options).await?;
    println!("kafka: {}", kafka.describe());

    let run = std::process::id();
    let input = format!("demo-orders-{run}");
    let output = format!("demo-priced-{run}");
    let app = format!("demo-pricer-{run}");
    kafka.create_topic(&input, args.partitions, 1).await?;
    kafka.create_topic(&output, args.partitions, 1).await?;

    produce_input(&kafka, &input, args.records).await?;
    println!("produced {} order events to {input}", args.records);

    let config = PipelineConfig::builder()
        .bootstrap_servers(kafka.bootstrap_servers())
        .application_id(&app)
        .instance_id("0")
        .input_topic(&input)
        .build()?;
    let pipeline = Pipeline::new(
        config,
        AddVat {
            output: output.clone(),
        },
    );
    let shutdown = pipeline.shutdown_handle();
    let run_started = Instant::now();
    let running = tokio::spawn(pipeline.run());
    wait_caught_up(&kafka, &app, &input).await?;
    let process_secs = run_started.elapsed().as_secs_f64();
    shutdown.shutdown();
    let summary = running.await??;

    let out = testkit::read_all(
        kafka.bootstrap_servers(),
        &output,
        Isolation::ReadCommitted,
        Duration::from_secs(120),
    )
    .await?;
    let mut seen: HashMap<u64, u32> = HashMap::new();
    for r in &out {
        let p: Priced = serde_json::from_slice(r.value.as_deref().unwrap_or_default())
            .with_context(|| format!("unexpected output {:?}", r.value_str()))?;
        *seen.entry(p.id).or_default() += 1;
    }
    let duplicates: u64 = seen.values().map(|c| u64::from(c.saturating_sub(1))).sum();
    let losses = (0..args.records).filter(|n| !seen.contains_key(n)).count();

    println!();
    println!("onceflow demo: exactly-once pricing pipeline");
    println!("  input events            {}", args.records);
    println!("  output (read_committed) {}", out.len());
    println!("  duplicates              {duplicates}");
    println!("  losses                  {losses}");
    println!(
        "  transactions committed  {}",
        summary.transactions_committed
    );
    println!("  transactions aborted    {}", summary.transactions_aborted);
    println!(
        "  throughput              {:.0} events/s (until every output was committed)",
        args.records as f64 / process_secs.max(1e-9)
    );
    println!(
        "  total time              {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if duplicates != 0 || losses != 0 || out.len() as u64 != args.records {
        bail!("exactly-once violated: {duplicates} duplicates, {losses} losses");
    }
    println!("  exactly-once            OK");
    Ok(())
}

async fn produce_input(kafka: &Kafka, topic: &str, records: u64) -> anyhow::Result<()> {
    let producer: FutureProducer = kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()?;
    let mut pending = Vec::new();
    for id in 0..records {
        let event = OrderEvent {
            id,
            user: format!("user-{}", id % 1_000),
            cents: 100 + id % 9_900,
        };
        let value = serde_json::to_vec(&event)?;
        let key = event.user.clone();
        let p = producer.clone();
        let topic = topic.to_owned();
        pending.push(async move {
            p.send(
                FutureRecord::to(&topic).key(&key).payload(&value),
                Duration::from_secs(60),
            )
            .await
            .map_err(|(e, _)| e)
        });
        if pending.len() == 1_000 {
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

/// Waits until the pipeline's group has committed the end offset of every input partition.
async fn wait_caught_up(kafka: &Kafka, group: &str, topic: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (b, g, t) = (
            kafka.bootstrap_servers().to_owned(),
            group.to_owned(),
            topic.to_owned(),
        );
        let caught_up = tokio::task::spawn_blocking(move || -> anyhow::Result<bool> {
            let ends = testkit::end_offsets_blocking(&b, &t, Isolation::ReadUncommitted)?;
            let committed = testkit::committed_offsets_blocking(&b, &g, &t)?;
            Ok(ends
                .iter()
                .all(|(p, end)| committed.get(p).copied().flatten() == Some(*end)))
        })
        .await??;
        if caught_up {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the pipeline did not catch up within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
