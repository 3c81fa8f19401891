//! Checking a pipeline's output against its input, the way a `read_committed` reader sees it.
//!
//! This is the logic behind `onceflow verify`. It reads the input topic and every output topic
//! under `read_committed`, matches each output to the input record it came from by the lineage
//! header [`SOURCE_HEADER`] that the runtime stamps, and reports:
//!
//! * **duplicates** — input records that appear more than once in one output topic;
//! * **losses** — input records that appear in no output topic and not in the dead-letter topic;
//! * **unmatched** — outputs with no lineage header, or whose source is not a committed input
//!   record (written by something else, or from an aborted upstream transaction);
//! * **order violations** — along an output partition, two outputs with the same key from the
//!   same input partition whose input offsets go backwards (a key's events reordered);
//! * **open transactions** — output partitions whose last stable offset is behind the high
//!   watermark: some transaction is still open (or a crashed producer's transaction has not been
//!   aborted yet), so the picture is not final.
//!
//! A pipeline that filters (emits nothing for some inputs) shows those inputs as losses unless
//! they went to the dead-letter topic; verify is meant for pipelines where every input has an
//! effect, which is what a financial pipeline wants to prove.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;

use crate::consumer::QuietContext;
use crate::error::Error;
use crate::processor::{SOURCE_HEADER, parse_source};

/// What to verify.
#[derive(Clone)]
pub struct VerifyOptions {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// The input topic.
    pub input_topic: String,
    /// The output topics (at least one).
    pub output_topics: Vec<String>,
    /// The dead-letter topic, whose records count as accounted-for inputs.
    pub dead_letter_topic: Option<String>,
    /// Extra librdkafka properties (TLS, SASL).
    pub kafka_properties: BTreeMap<String, String>,
    /// How long reading may take in all. Default 10 minutes.
    pub timeout: Duration,
}

impl std::fmt::Debug for VerifyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyOptions")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("input_topic", &self.input_topic)
            .field("output_topics", &self.output_topics)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field(
                "kafka_properties",
                &crate::config::Redacted(&self.kafka_properties),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl VerifyOptions {
    /// Options for `input` → `outputs` on `bootstrap_servers`.
    #[must_use]
    pub fn new(bootstrap_servers: &str, input: &str, outputs: &[&str]) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.to_owned(),
            input_topic: input.to_owned(),
            output_topics: outputs.iter().map(|s| (*s).to_owned()).collect(),
            dead_letter_topic: None,
            kafka_properties: BTreeMap::new(),
            timeout: Duration::from_secs(600),
        }
    }
}

/// Figures for one output topic.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct OutputFigures {
    /// The topic.
    pub topic: String,
    /// Records read under read_committed.
    pub records: u64,
    /// Input records that appear more than once in this topic (counted once each).
    pub duplicated_inputs: u64,
    /// Extra copies beyond the first, summed.
    pub extra_copies: u64,
    /// Outputs without a usable lineage header or with an unknown source.
    pub unmatched: u64,
    /// Per-key order violations.
    pub order_violations: u64,
    /// Partitions whose last stable offset is behind the high watermark.
    pub open_transaction_partitions: Vec<i32>,
}

/// The result of a verification.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    /// The input topic.
    pub input_topic: String,
    /// Input records (read_committed).
    pub input_records: u64,
    /// Per output topic.
    pub outputs: Vec<OutputFigures>,
    /// Records in the dead-letter topic that name an input record.
    pub dead_letters: u64,
    /// Input records found in no output topic and not dead-lettered.
    pub losses: u64,
    /// A few lost inputs, as `partition@offset`, for a first look.
    pub lost_examples: Vec<String>,
    /// A few duplicated inputs, as `topic: partition@offset`.
    pub duplicate_examples: Vec<String>,
    /// True when no output partition has an open transaction.
    pub transactions_finished: bool,
}

impl Report {
    /// Total duplicated inputs over all output topics.
    #[must_use]
    pub fn duplicates(&self) -> u64 {
        self.outputs.iter().map(|o| o.duplicated_inputs).sum()
    }

    /// Total order violations.
    #[must_use]
    pub fn order_violations(&self) -> u64 {
        self.outputs.iter().map(|o| o.order_violations).sum()
    }

    /// Total unmatched outputs.
    #[must_use]
    pub fn unmatched(&self) -> u64 {
        self.outputs.iter().map(|o| o.unmatched).sum()
    }

    /// True when nothing is wrong: no duplicate, no loss, nothing unmatched, no reordering, and
    /// every transaction finished.
    #[must_use]
    pub fn is_ok(&self) -> bool {
        self.duplicates() == 0
            && self.losses == 0
            && self.unmatched() == 0
            && self.order_violations() == 0
            && self.transactions_finished
    }
}

/// Progress while reading: (topic, records read in it, records expected in it).
pub type Progress<'a> = &'a mut dyn FnMut(&str, u64, u64);

/// Runs the verification. Blocking (librdkafka polling): from async code, call it on a
/// blocking thread.
pub fn verify_blocking(options: &VerifyOptions, progress: Progress<'_>) -> Result<Report, Error> {
    if options.output_topics.is_empty() {
        return Err(Error::config(
            "output_topics",
            "at least one output topic is required",
        ));
    }
    let deadline = Instant::now() + options.timeout;
    let mut report = Report {
        input_topic: options.input_topic.clone(),
        transactions_finished: true,
        ..Report::default()
    };

    // Inputs: (partition, offset) → how many times seen per output topic, packed per topic.
    let mut inputs: HashMap<(i32, i64), Seen> = HashMap::new();
    read_topic(options, &options.input_topic, deadline, progress, |m| {
        inputs.insert((m.partition(), m.offset()), Seen::default());
    })?;
    report.input_records = inputs.len() as u64;

    for (index, topic) in options.output_topics.iter().enumerate() {
        let mut figures = OutputFigures {
            topic: topic.clone(),
            ..OutputFigures::default()
        };
        // (output partition, key, input partition) → last input offset seen.
        let mut last: HashMap<(i32, Vec<u8>, i32), i64> = HashMap::new();
        read_topic(options, topic, deadline, progress, |m| {
            figures.records += 1;
            let Some((src_topic, src_partition, src_offset)) = source_of(m) else {
                figures.unmatched += 1;
                return;
            };
            if src_topic != options.input_topic {
                figures.unmatched += 1;
                return;
            }
            let Some(seen) = inputs.get_mut(&(src_partition, src_offset)) else {
                figures.unmatched += 1;
                return;
            };
            let count = seen.bump(index);
            if count == 2 {
                figures.duplicated_inputs += 1;
                if report.duplicate_examples.len() < 10 {
                    report
                        .duplicate_examples
                        .push(format!("{topic}: {src_partition}@{src_offset}"));
                }
            }
            if count >= 2 {
                figures.extra_copies += 1;
            }
            if let Some(key) = m.key() {
                let slot = (m.partition(), key.to_vec(), src_partition);
                if let Some(prev) = last.get(&slot)
                    && src_offset <= *prev
                {
                    figures.order_violations += 1;
                }
                last.insert(slot, src_offset);
            }
        })?;
        figures.open_transaction_partitions = open_transactions(options, topic)?;
        if !figures.open_transaction_partitions.is_empty() {
            report.transactions_finished = false;
        }
        report.outputs.push(figures);
    }

    if let Some(dlq) = &options.dead_letter_topic {
        read_topic(options, dlq, deadline, progress, |m| {
            let source = header(m, crate::dead_letter::HEADER_SOURCE_TOPIC).and_then(|t| {
                let p = header(m, crate::dead_letter::HEADER_SOURCE_PARTITION)?
                    .parse()
                    .ok()?;
                let o = header(m, crate::dead_letter::HEADER_SOURCE_OFFSET)?
                    .parse()
                    .ok()?;
                Some((t, p, o))
            });
            if let Some((t, p, o)) = source
                && t == options.input_topic
                && let Some(seen) = inputs.get_mut(&(p, o))
            {
                seen.dead_lettered = true;
                report.dead_letters += 1;
            }
        })?;
        if !open_transactions(options, dlq)?.is_empty() {
            report.transactions_finished = false;
        }
    }

    let mut lost: Vec<(i32, i64)> = inputs
        .iter()
        .filter(|(_, s)| !s.dead_lettered && s.counts.iter().all(|c| *c == 0))
        .map(|(k, _)| *k)
        .collect();
    lost.sort_unstable();
    report.losses = lost.len() as u64;
    report.lost_examples = lost
        .iter()
        .take(10)
        .map(|(p, o)| format!("{p}@{o}"))
        .collect();
    Ok(report)
}

#[derive(Default)]
struct Seen {
    counts: Vec<u32>,
    dead_lettered: bool,
}

impl Seen {
    fn bump(&mut self, topic_index: usize) -> u32 {
        if self.counts.len() <= topic_index {
            self.counts.resize(topic_index + 1, 0);
        }
        self.counts[topic_index] += 1;
        self.counts[topic_index]
    }
}

fn header<'a>(m: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a str> {
    m.headers()?
        .iter()
        .filter(|h| h.key == name)
        .last()
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

fn source_of<'a>(m: &'a BorrowedMessage<'_>) -> Option<(&'a str, i32, i64)> {
    parse_source(header(m, SOURCE_HEADER)?)
}

fn reader(options: &VerifyOptions, isolation: &str) -> Result<BaseConsumer<QuietContext>, Error> {
    let mut cc = ClientConfig::new();
    for (k, v) in &options.kafka_properties {
        cc.set(k, v);
    }
    cc.set("bootstrap.servers", &options.bootstrap_servers)
        .set("group.id", "onceflow-verify")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation);
    cc.create_with_context(QuietContext)
        .map_err(|e| Error::kafka("creating a reader", e))
}

/// Reads `topic` from the beginning to its read_committed end, calling `each` per record.
fn read_topic(
    options: &VerifyOptions,
    topic: &str,
    deadline: Instant,
    progress: Progress<'_>,
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> Result<(), Error> {
    let consumer = reader(options, "read_committed")?;
    let parts = crate::offsets::partitions(
        consumer.client(),
        &options.bootstrap_servers,
        topic,
        crate::error::Side::Any,
    )?;
    let mut expected = 0u64;
    let mut tpl = TopicPartitionList::new();
    let mut pending: BTreeSet<i32> = BTreeSet::new();
    for p in &parts {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, Duration::from_secs(15))
            .map_err(|e| Error::kafka("fetching watermarks", e))?;
        expected += u64::try_from(high - low).unwrap_or(0);
        if high > low {
            pending.insert(*p);
            tpl.add_partition_offset(topic, *p, Offset::Beginning)
                .map_err(|e| Error::kafka("building the assignment", e))?;
        }
    }
    progress(topic, 0, expected);
    if pending.is_empty() {
        return Ok(());
    }
    consumer
        .assign(&tpl)
        .map_err(|e| Error::kafka("assigning partitions", e))?;
    let mut read = 0u64;
    while !pending.is_empty() {
        if Instant::now() > deadline {
            return Err(Error::Worker(format!(
                "reading {topic} did not finish in time ({read} of about {expected} records read)"
            )));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                pending.remove(&p);
            }
            Some(Err(e)) => return Err(Error::kafka("reading", e)),
            Some(Ok(m)) => {
                each(&m);
                read += 1;
                if read.is_multiple_of(10_000) {
                    progress(topic, read, expected);
                }
            }
        }
    }
    progress(topic, read, expected);
    Ok(())
}

/// Partitions of `topic` whose last stable offset is behind the high watermark.
fn open_transactions(options: &VerifyOptions, topic: &str) -> Result<Vec<i32>, Error> {
    let conn = crate::offsets::Connection {
        bootstrap_servers: options.bootstrap_servers.clone(),
        properties: options.kafka_properties.clone(),
    };
    Ok(crate::offsets::topic_offsets(&conn, topic, None)?
        .into_iter()
        .filter(|p| p.last_stable < p.latest)
        .map(|p| p.partition)
        .collect())
}
