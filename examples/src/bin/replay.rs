//! Replay: re-process the order events from a point in time into repair topics, under a
//! separate consumer group, exactly once — for repairing data after a bug without touching the
//! production group's offsets.
//!
//! ```text
//! cargo run -p onceflow-examples --bin replay -- --bootstrap-servers 127.0.0.1:9092 \
//!     --input order-events --from 2026-11-20T08:00:00Z \
//!     --orders orders-repair --ledger ledger-repair --dlq order-events-repair.dlq
//! ```

use clap::Parser;
use onceflow_examples::{OrderProcessor, ReplayPlan, replay};

#[derive(Debug, Parser)]
#[command(about = "Re-process order events from a point in time into repair topics")]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    bootstrap_servers: String,
    /// The input topic.
    #[arg(long)]
    input: String,
    /// From this time: RFC 3339 or ms since the epoch.
    #[arg(long)]
    from: String,
    /// Repair output for orders.
    #[arg(long)]
    orders: String,
    /// Repair output for the ledger.
    #[arg(long)]
    ledger: String,
    /// Dead letters of the replay.
    #[arg(long)]
    dlq: String,
    /// The repair group (default: `order-repair-<from ms>`).
    #[arg(long)]
    group: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let from_ms = match args.from.parse::<i64>() {
        Ok(ms) => ms,
        Err(_) => {
            let t = humantime::parse_rfc3339_weak(&args.from)?;
            i64::try_from(t.duration_since(std::time::UNIX_EPOCH)?.as_millis())?
        }
    };
    let summary = replay(ReplayPlan {
        bootstrap_servers: args.bootstrap_servers,
        input: args.input,
        from_ms,
        group: args
            .group
            .unwrap_or_else(|| format!("order-repair-{from_ms}")),
        processor: OrderProcessor {
            orders_topic: args.orders,
            ledger_topic: args.ledger,
        },
        dead_letter_topic: args.dlq,
    })
    .await?;
    println!(
        "replayed {} records under group {} (per partition start..end: {:?})",
        summary.records, summary.group, summary.ranges
    );
    Ok(())
}
