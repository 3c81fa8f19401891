//! The order processor on the exactly-once runtime: validates and enriches every event into the
//! orders topic, books payments, refunds and loyalty points into the ledger topic, dead-letters
//! invalid events with the reason, and carries `trace_id` along. Stops gracefully on
//! SIGINT/SIGTERM (a second signal aborts).
//!
//! ```text
//! cargo run -p onceflow-examples --bin order_processor -- --bootstrap-servers 127.0.0.1:9092 \
//!     --input order-events --orders orders --ledger ledger --dlq order-events.dlq --instance-id 0
//! ```

use clap::Parser;
use onceflow_examples::{OrderProcessor, run_order_pipeline};

#[derive(Debug, Parser)]
#[command(about = "Run the exactly-once order processor")]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    bootstrap_servers: String,
    /// The application id (consumer group).
    #[arg(long, default_value = "order-processor")]
    application_id: String,
    /// This instance's stable id (unique among running instances).
    #[arg(long)]
    instance_id: String,
    /// The input topic.
    #[arg(long)]
    input: String,
    /// The orders output topic.
    #[arg(long)]
    orders: String,
    /// The ledger output topic.
    #[arg(long)]
    ledger: String,
    /// The dead-letter topic.
    #[arg(long)]
    dlq: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    let processor = OrderProcessor {
        orders_topic: a.orders,
        ledger_topic: a.ledger,
    };
    let summary = run_order_pipeline(
        &a.bootstrap_servers,
        &a.application_id,
        &a.instance_id,
        &a.input,
        &a.dlq,
        processor,
    )
    .await?;
    println!("{summary:?}");
    Ok(())
}
