//! A onceflow pipeline as its own OS process, for the chaos tests: they SIGKILL it, restart
//! it, and SIGTERM it. It copies each input record to the output topic (same key, same value,
//! plus the lineage header the runtime stamps), stops gracefully on the first SIGTERM/SIGINT,
//! and logs to stderr (`RUST_LOG`, e.g. `onceflow::transaction=debug` to see each commit).
//!
//! ```text
//! [COPIER_DELAY_MS=1] copier <bootstrap> <application id> <instance id> <input topic> <output topic>
//! ```

use std::time::Duration;

use onceflow::codec::Raw;
use onceflow::{Output, OutputRecord, Pipeline, PipelineConfig, ProcessError, Processor, Record};

struct Copy {
    output: String,
    /// Per-record processing time (`COPIER_DELAY_MS`), to stretch a stream out.
    delay: Duration,
}

#[onceflow::async_trait]
impl Processor for Copy {
    type Input = Option<Vec<u8>>;

    async fn process(
        &self,
        r: &Record<Option<Vec<u8>>>,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let mut record = OutputRecord::to(&self.output).headers_from(&r.headers);
        if let Some(k) = &r.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &r.value {
            record = record.value(v.as_slice());
        }
        out.send(record);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), onceflow::Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let [_, bootstrap, app, instance, input, output] = args.as_slice() else {
        eprintln!("usage: copier <bootstrap> <application id> <instance id> <input> <output>");
        return Err(onceflow::Error::Config {
            field: "arguments".into(),
            problem: "expected 5".into(),
        });
    };
    let config = PipelineConfig::builder()
        .bootstrap_servers(bootstrap)
        .application_id(app)
        .instance_id(instance)
        .input_topic(input)
        .transaction_timeout(Duration::from_secs(10))
        // A killed instance's partitions move after this long.
        .consumer_property("session.timeout.ms", "3000")
        .consumer_property("heartbeat.interval.ms", "300")
        .build()?;
    let delay = std::env::var("COPIER_DELAY_MS")
        .ok()
        .and_then(|d| d.parse().ok())
        .map_or(Duration::ZERO, Duration::from_millis);
    let copy = Copy {
        output: output.clone(),
        delay,
    };
    let summary = Pipeline::new(config, copy)
        .with_codec(Raw)
        .run_until_signal()
        .await?;
    eprintln!("copier stopped: {summary:?}");
    Ok(())
}
