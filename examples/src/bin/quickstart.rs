//! onceflow's quick start, runnable: payments in, ledger entries out, exactly once.
//!
//! ```text
//! cargo run -p onceflow-examples --bin quickstart
//! ```
//!
//! It starts an embedded Apache Kafka (or uses `KAFKA_BOOTSTRAP_SERVERS`), writes a few
//! payments — one of them invalid — runs the pipeline until every payment is processed, stops
//! it gracefully, and prints what a `read_committed` reader sees in the ledger and in the
//! dead-letter topic.

use std::time::Duration;

use onceflow::testkit::{self, Isolation, Kafka};
use onceflow::{Output, OutputRecord, Pipeline, PipelineConfig, ProcessError, Processor, Record};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
struct Payment {
    user: String,
    cents: i64,
}

#[derive(Debug, Serialize)]
struct LedgerEntry<'a> {
    user: &'a str,
    cents: i64,
    source_offset: i64,
}

/// Turns each payment into a ledger entry keyed by user; rejects non-positive amounts.
struct ToLedger {
    ledger: String,
}

#[onceflow::async_trait]
impl Processor for ToLedger {
    type Input = Payment;

    async fn process(&self, r: &Record<Payment>, out: &mut Output) -> Result<(), ProcessError> {
        if r.value.cents <= 0 {
            // Goes to the dead-letter topic, in the same transaction, with the reason.
            return Err(ProcessError::dead_letter(format!(
                "non-positive amount {}",
                r.value.cents
            )));
        }
        let entry = LedgerEntry {
            user: &r.value.user,
            cents: r.value.cents,
            // Derived from the input only, so a re-processing writes the same entry.
            source_offset: r.offset,
        };
        out.send(
            OutputRecord::to(&self.ledger)
                .key(r.value.user.as_str())
                .json(&entry)?
                .headers_from(&r.headers),
        );
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let kafka = Kafka::start().await?;
    println!("kafka: {}", kafka.describe());
    let run = std::process::id();
    let payments = format!("payments-{run}");
    let ledger = format!("ledger-{run}");
    let ledger_dlq = format!("payments-{run}.dlq");
    kafka.create_topic(&payments, 3, 1).await?;
    kafka.create_topic(&ledger, 3, 1).await?;
    kafka.create_topic(&ledger_dlq, 1, 1).await?;

    let producer: FutureProducer = kafka.client_config().create()?;
    for (user, cents) in [
        ("alice", 1250),
        ("bob", 990),
        ("alice", -5),
        ("carol", 4000),
    ] {
        let value = format!(r#"{{"user":"{user}","cents":{cents}}}"#);
        producer
            .send(
                FutureRecord::to(&payments).key(user).payload(&value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }

    let config = PipelineConfig::builder()
        .bootstrap_servers(kafka.bootstrap_servers())
        .application_id(format!("ledger-writer-{run}"))
        .instance_id("0")
        .input_topic(&payments)
        .dead_letter_topic(&ledger_dlq)
        .build()?;
    let pipeline = Pipeline::new(
        config,
        ToLedger {
            ledger: ledger.clone(),
        },
    );
    let shutdown = pipeline.shutdown_handle();
    let running = tokio::spawn(pipeline.run());

    // Four payments in: three ledger entries and one dead letter out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let entries = read(&kafka, &ledger).await?;
        let dead = read(&kafka, &ledger_dlq).await?;
        if entries.len() == 3 && dead.len() == 1 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the pipeline did not finish"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.shutdown();
    let summary = running.await??;

    for r in read(&kafka, &ledger).await? {
        println!("ledger      {} -> {}", r.key_str(), r.value_str());
    }
    for r in read(&kafka, &ledger_dlq).await? {
        println!(
            "dead letter {} ({})",
            r.value_str(),
            r.header_str(onceflow::dead_letter::HEADER_ERROR)
                .unwrap_or_default()
        );
    }
    println!("{summary:?}");
    Ok(())
}

async fn read(kafka: &Kafka, topic: &str) -> anyhow::Result<Vec<testkit::ReadRecord>> {
    Ok(testkit::read_all(
        kafka.bootstrap_servers(),
        topic,
        Isolation::ReadCommitted,
        Duration::from_secs(30),
    )
    .await?)
}
