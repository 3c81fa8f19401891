//! Reading a topic back to check a claim, under either isolation level.
//!
//! Exactly-once is a statement about what a `read_committed` reader sees; that aborts really
//! happened is a statement about what a `read_uncommitted` reader sees. Tests should check
//! both by reading, not by trusting the pipeline's own counters.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::error::{Result, TestkitError};
use crate::consumer::QuietContext;

/// The isolation level of a read-back consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isolation {
    /// Only records of committed transactions (and non-transactional records).
    ReadCommitted,
    /// Every record written, including those of aborted and still-open transactions.
    ReadUncommitted,
}

impl Isolation {
    /// The `isolation.level` value.
    #[must_use]
    pub fn as_config(self) -> &'static str {
        match self {
            Self::ReadCommitted => "read_committed",
            Self::ReadUncommitted => "read_uncommitted",
        }
    }
}

/// One record as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRecord {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Value bytes.
    pub value: Option<Vec<u8>>,
    /// Headers in order, as (name, value).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Timestamp in ms since the epoch, when the record has one.
    pub timestamp: Option<i64>,
}

impl ReadRecord {
    /// The value as UTF-8 (lossy), or "" for a null value.
    #[must_use]
    pub fn value_str(&self) -> String {
        self.value
            .as_deref()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    }

    /// The key as UTF-8 (lossy), or "" for a null key.
    #[must_use]
    pub fn key_str(&self) -> String {
        self.key
            .as_deref()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    }

    /// The first header called `name`, as UTF-8 (lossy).
    #[must_use]
    pub fn header_str(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

fn reader(bootstrap: &str, isolation: Isolation) -> Result<BaseConsumer<QuietContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        // No group: read-back must not disturb any group's offsets.
        .set("group.id", "onceflow-testkit-readback")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation.as_config())
        .create_with_context(QuietContext)
        .map_err(|source| TestkitError::Admin {
            context: "creating a read-back consumer".into(),
            source,
        })
}

fn partitions_of<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str) -> Result<Vec<i32>> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|source| TestkitError::Admin {
            context: format!("fetching metadata of {topic}"),
            source,
        })?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| TestkitError::Unsupported(format!("topic {topic} has no metadata")))?;
    if let Some(code) = t.error() {
        return Err(TestkitError::Admin {
            context: format!("metadata of topic {topic}"),
            source: KafkaError::MetadataFetch(code.into()),
        });
    }
    Ok(t.partitions().iter().map(|p| p.id()).collect())
}

/// Reads every record of `topic` from the beginning up to its current end as seen at
/// `isolation` (the last stable offset for `read_committed`), in offset order per partition.
///
/// Blocking (librdkafka polling); from async code use [`read_all`].
pub fn read_all_blocking(
    bootstrap: &str,
    topic: &str,
    isolation: Isolation,
    timeout: Duration,
) -> Result<Vec<ReadRecord>> {
    let consumer = reader(bootstrap, isolation)?;
    let partitions = partitions_of(&consumer, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .map_err(|source| TestkitError::Admin {
                context: "building the assignment".into(),
                source,
            })?;
    }
    consumer
        .assign(&tpl)
        .map_err(|source| TestkitError::Admin {
            context: format!("assigning {topic}"),
            source,
        })?;

    let started = Instant::now();
    let mut at_end: BTreeSet<i32> = BTreeSet::new();
    let mut records = Vec::new();
    while at_end.len() < partitions.len() {
        if started.elapsed() > timeout {
            return Err(TestkitError::ReadTimeout {
                topic: topic.to_owned(),
                isolation: isolation.as_config(),
                missing: partitions
                    .iter()
                    .copied()
                    .filter(|p| !at_end.contains(p))
                    .collect(),
                read: records.len(),
                waited: started.elapsed(),
            });
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            // librdkafka reports EOF when the fetch position reaches the partition's end:
            // the high watermark, or the last stable offset under read_committed.
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(source)) => {
                return Err(TestkitError::Admin {
                    context: format!("reading {topic}"),
                    source,
                });
            }
            Some(Ok(m)) => {
                at_end.remove(&m.partition());
                let headers = m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default();
                records.push(ReadRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers,
                    timestamp: m.timestamp().to_millis(),
                });
            }
        }
    }
    records.sort_by_key(|r| (r.partition, r.offset));
    Ok(records)
}

/// [`read_all_blocking`] on a blocking thread.
pub async fn read_all(
    bootstrap: &str,
    topic: &str,
    isolation: Isolation,
    timeout: Duration,
) -> Result<Vec<ReadRecord>> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || read_all_blocking(&bootstrap, &topic, isolation, timeout))
        .await
        .map_err(|e| TestkitError::Unsupported(format!("the read-back task failed: {e}")))?
}

/// Per partition, the end offset as seen at `isolation`: the high watermark for
/// `read_uncommitted`, the last stable offset for `read_committed`. They are equal exactly when
/// no transaction on the partition is still open.
pub fn end_offsets_blocking(
    bootstrap: &str,
    topic: &str,
    isolation: Isolation,
) -> Result<BTreeMap<i32, i64>> {
    let consumer = reader(bootstrap, isolation)?;
    let mut ends = BTreeMap::new();
    for p in partitions_of(&consumer, topic)? {
        let high = watermark_retrying(&consumer, topic, p)?;
        ends.insert(p, high);
    }
    Ok(ends)
}

/// How long [`end_offsets_blocking`] keeps asking while the broker answers that a partition
/// has no leader (yet, or for the moment).
const LEADER_WAIT: Duration = Duration::from_secs(10);

/// The high watermark of `topic`/`partition` (the last stable offset under `read_committed`).
///
/// A leadership answer (`NotLeaderForPartition`, `LeaderNotAvailable`) is asked again for up to
/// [`LEADER_WAIT`]: a progress check that polls every 50 ms met one once on a single broker,
/// right after the topic was created with every leader elected, and the benchmark died of it;
/// a broker restarting in a chaos test answers the same way for a moment. Anything else fails
/// at once.
#[expect(
    clippy::disallowed_methods,
    reason = "a blocking read-back helper, never called on the async executor"
)]
fn watermark_retrying<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Result<i64> {
    let started = Instant::now();
    loop {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok((_, high)) => return Ok(high),
            Err(source) => {
                let leadership = matches!(
                    source.rdkafka_error_code(),
                    Some(
                        rdkafka::types::RDKafkaErrorCode::NotLeaderForPartition
                            | rdkafka::types::RDKafkaErrorCode::LeaderNotAvailable
                    )
                );
                if !leadership || started.elapsed() >= LEADER_WAIT {
                    return Err(TestkitError::Admin {
                        context: format!("fetching the end offset of {topic}/{partition}"),
                        source,
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The offsets `group` has committed for `topic`, per partition (`None`: nothing committed).
///
/// Waits for offsets still pending in an open transaction (as a new owner of the partitions
/// would), so it can take up to its 10 s timeout, and fail, while a crashed producer's
/// transaction is unresolved. For a progress reading that must not wait, use
/// [`last_committed_offsets_blocking`].
pub fn committed_offsets_blocking(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> Result<BTreeMap<i32, Option<i64>>> {
    committed_offsets(bootstrap, group, topic, Isolation::ReadCommitted)
}

/// The offsets `group` has committed for `topic` so far, not waiting for offsets pending in an
/// open transaction.
pub fn last_committed_offsets_blocking(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> Result<BTreeMap<i32, Option<i64>>> {
    committed_offsets(bootstrap, group, topic, Isolation::ReadUncommitted)
}

fn committed_offsets(
    bootstrap: &str,
    group: &str,
    topic: &str,
    isolation: Isolation,
) -> Result<BTreeMap<i32, Option<i64>>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        // read_committed makes the fetch wait for offsets still pending in a transaction
        // (require_stable), instead of returning an older value.
        .set("isolation.level", isolation.as_config())
        .create()
        .map_err(|source| TestkitError::Admin {
            context: "creating an offsets client".into(),
            source,
        })?;
    let mut tpl = TopicPartitionList::new();
    for p in partitions_of(&consumer, topic)? {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .map_err(|source| TestkitError::Admin {
            context: format!("fetching the committed offsets of group {group}"),
            source,
        })?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (e.partition(), offset)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    use super::*;

    /// librdkafka's mock cluster, used only to inject the broker's answers: more refusals
    /// than librdkafka itself retries.
    #[test]
    fn end_offsets_ask_again_while_a_partition_has_no_leader()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let mock = MockCluster::<DefaultProducerContext>::new(1)?;
        mock.create_topic("t", 2, 1)?;
        mock.request_errors(
            RDKafkaApiKey::ListOffsets,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 20],
        );
        let ends = end_offsets_blocking(&mock.bootstrap_servers(), "t", Isolation::ReadCommitted)?;
        assert_eq!(ends, BTreeMap::from([(0, 0), (1, 0)]));
        Ok(())
    }
}
