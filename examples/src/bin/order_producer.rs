//! Produces order events: keyed by user id (Java-compatible routing, so each user's events stay
//! in order on one partition), with `trace_id`, `schema_version`, `event_type` and `source`
//! headers, idempotent, batched and lz4-compressed.
//!
//! ```text
//! cargo run -p onceflow-examples --bin order_producer -- --bootstrap-servers 127.0.0.1:9092 --topic order-events --events 10000
//! ```

use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Produce order events keyed by user id")]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    bootstrap_servers: String,
    /// The topic.
    #[arg(long)]
    topic: String,
    /// How many events.
    #[arg(long, default_value_t = 10_000)]
    events: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let total = onceflow_examples::produce_order_events(
        &args.bootstrap_servers,
        &args.topic,
        args.events,
        true,
    )
    .await?;
    println!(
        "produced {} events; they move {total} cents through the ledger",
        args.events
    );
    Ok(())
}
