//! The second phase: input produced at a fixed rate into a running worker, and the end-to-end
//! latency of every record — from its input timestamp (set when it is produced) to the moment
//! a `read_committed` reader of the output receives it. Every worker keeps the input's
//! timestamp on its output, so the reader needs nothing else.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::PARTITIONS;
use crate::workers::Item;

/// The latencies of one mode at one rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatencyRow {
    pub mode: String,
    pub value_size: usize,
    /// Input records per second, produced at a fixed pace.
    pub rate: f64,
    pub produced: u64,
    /// Outputs seen by the read_committed reader before the deadline.
    pub received: u64,
    /// Outputs counted (those of inputs produced after the warm-up fifth of the run).
    pub counted: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Produces `rate` records/s for `seconds` into `input` while reading `output`, and returns
/// the latency percentiles. The worker must be ready (holding `input`'s partitions).
pub async fn run(
    bootstrap: &str,
    mode: &str,
    input: &str,
    output: &str,
    value_size: usize,
    rate: f64,
    seconds: f64,
) -> anyhow::Result<LatencyRow> {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let total = (rate * seconds).round().max(1.0) as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (b, o, stop) = (bootstrap.to_owned(), output.to_owned(), Arc::clone(&stop));
        tokio::task::spawn_blocking(move || read_latencies(&b, &o, total, &stop))
    };
    let started_ms = now_ms();
    let produced = {
        let (b, i) = (bootstrap.to_owned(), input.to_owned());
        tokio::task::spawn_blocking(move || produce_paced(&b, &i, total, rate, value_size))
            .await??
    };
    // Everything produced must come out; a mode that cannot keep up gets a deadline, and its
    // row says how many outputs it missed.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reader.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let samples = reader.await??;
    let received = samples.len() as u64;
    #[allow(clippy::cast_possible_truncation)]
    let warm_until = started_ms + (seconds * 1000.0 / 5.0) as i64;
    let mut counted: Vec<i64> = samples
        .iter()
        .filter(|(input_ts, _)| *input_ts >= warm_until)
        .map(|(_, latency)| *latency)
        .collect();
    counted.sort_unstable();
    let pct = |q: f64| percentile(&counted, q);
    Ok(LatencyRow {
        mode: mode.to_owned(),
        value_size,
        rate,
        produced,
        received,
        counted: counted.len() as u64,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        max_ms: counted.last().map_or(f64::NAN, |m| *m as f64),
    })
}

/// The nearest-rank `q` quantile of `sorted` (NaN when empty): the smallest value with at
/// least `q` of the samples at or below it.
fn percentile(sorted: &[i64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64
}

/// Sends `total` records at `rate` per second, each stamped with the time it is sent.
#[allow(
    clippy::disallowed_methods,
    reason = "a dedicated blocking thread; sleeping is how it keeps the pace"
)]
fn produce_paced(
    bootstrap: &str,
    topic: &str,
    total: u64,
    rate: f64,
    size: usize,
) -> anyhow::Result<u64> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "1")
        .create()?;
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
        while sent < due {
            let (user, value) = Item::value(sent, size)?;
            let record: BaseRecord<'_, str, Vec<u8>> = BaseRecord::to(topic)
                .key(user.as_str())
                .payload(&value)
                .timestamp(now_ms());
            crate::workers::send_waiting(&producer, record)?;
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(sent)
}

/// Reads `output` from the beginning under read_committed until `total` records have
/// arrived or `stop` is set; returns (input timestamp, latency ms) per record.
fn read_latencies(
    bootstrap: &str,
    topic: &str,
    total: u64,
    stop: &AtomicBool,
) -> anyhow::Result<Vec<(i64, i64)>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "onceflow-bench-latency-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        // The broker answers a read_committed fetch as soon as the last stable offset moves;
        // this only bounds an idle wait.
        .set("fetch.wait.max.ms", "100")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut samples = Vec::with_capacity(usize::try_from(total).context("count")?);
    while (samples.len() as u64) < total && !stop.load(Ordering::SeqCst) {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        let arrived = now_ms();
        let ts = m
            .timestamp()
            .to_millis()
            .context("an output without a timestamp")?;
        samples.push((ts, arrived - ts));
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<i64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), 500.0);
        assert_eq!(percentile(&v, 0.99), 990.0);
        assert_eq!(percentile(&v, 0.999), 999.0);
        assert_eq!(percentile(&[7], 0.999), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
