//! The offset toolkit: where each partition begins and ends, where a group is, how far behind
//! it is, and moving a group's offsets (to a time, an offset, the ends, or by a shift).
//!
//! Lag is measured against the **last stable offset** (LSO), not the high watermark: in a topic
//! written with transactions the last record of each transaction is an invisible commit marker,
//! so a `read_committed` group that has consumed everything sits one below the high watermark
//! forever. Measured against the high watermark it would show "lag 1" on a healthy pipeline.
//!
//! All functions block (librdkafka requests); call them from a blocking thread in async code.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::client::{Client, ClientContext};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;

use crate::consumer::QuietContext;
use crate::error::{Error, Side};

const TIMEOUT: Duration = Duration::from_secs(15);

/// How to reach the cluster.
#[derive(Clone, Default)]
pub struct Connection {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// Extra librdkafka properties (TLS, SASL, ...).
    pub properties: BTreeMap<String, String>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("properties", &crate::config::Redacted(&self.properties))
            .finish()
    }
}

impl Connection {
    /// A connection to `bootstrap_servers` with no extra properties.
    #[must_use]
    pub fn new(bootstrap_servers: &str) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.to_owned(),
            properties: BTreeMap::new(),
        }
    }

    fn client(
        &self,
        group: Option<&str>,
        isolation: &str,
    ) -> Result<BaseConsumer<QuietContext>, Error> {
        let mut cc = ClientConfig::new();
        for (k, v) in &self.properties {
            cc.set(k, v);
        }
        cc.set("bootstrap.servers", &self.bootstrap_servers)
            .set("group.id", group.unwrap_or("onceflow-offsets"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", isolation);
        cc.create_with_context(QuietContext)
            .map_err(|e| Error::kafka("creating a client", e))
    }
}

/// One partition's offsets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionOffsets {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The first retained offset (low watermark).
    pub earliest: i64,
    /// The high watermark: the offset the next record will get.
    pub latest: i64,
    /// The last stable offset: the end as a `read_committed` reader sees it.
    pub last_stable: i64,
    /// The group's committed offset, when a group was given and it committed one.
    pub committed: Option<i64>,
    /// `last_stable - committed`, when there is a committed offset.
    pub lag: Option<i64>,
}

/// Partitions of `topic` (sorted), with clear errors for an unreachable cluster, a topic this
/// client may not describe and a missing topic. Shared with [`crate::verify`], with the
/// pipeline's start-up check of its input topics, and with the producer side's check of an
/// output topic whose records failed.
///
/// The metadata request creates the topic only if `client` may have the broker create topics
/// (`allow.auto.create.topics`: off for a consumer unless its configuration turns it on, on by
/// default for a producer) and the broker allows it.
pub(crate) fn partitions<C: ClientContext>(
    client: &Client<C>,
    bootstrap_servers: &str,
    topic: &str,
    side: Side,
) -> Result<Vec<i32>, Error> {
    partitions_within(client, bootstrap_servers, topic, side, TIMEOUT)
}

/// [`partitions`], waiting at most `timeout` for the cluster's answer. `side` says whether
/// `topic` is an input or an output, which a refusal's hint names the ACL of.
pub(crate) fn partitions_within<C: ClientContext>(
    client: &Client<C>,
    bootstrap_servers: &str,
    topic: &str,
    side: Side,
    timeout: Duration,
) -> Result<Vec<i32>, Error> {
    let md = client
        .fetch_metadata(Some(topic), timeout)
        .map_err(|source| Error::Unreachable {
            bootstrap_servers: bootstrap_servers.to_owned(),
            source,
        })?;
    let found = md.topics().iter().find(|t| t.name() == topic);
    if let Some(code) = found.and_then(|t| t.error()).map(RDKafkaErrorCode::from)
        && let Ok(refused) = crate::error::permission_refused(
            "reading a topic's metadata",
            side,
            KafkaError::MetadataFetch(code),
        )
    {
        return Err(refused);
    }
    match found {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            let mut ps: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
            ps.sort_unstable();
            Ok(ps)
        }
        _ => Err(Error::MissingTopic {
            topic: topic.to_owned(),
        }),
    }
}

/// Per partition of `topic`: earliest, latest (high watermark), last stable offset, and — with
/// a group — its committed offset and lag against the last stable offset.
pub fn topic_offsets(
    conn: &Connection,
    topic: &str,
    group: Option<&str>,
) -> Result<Vec<PartitionOffsets>, Error> {
    let uncommitted = conn.client(group, "read_uncommitted")?;
    let committed_reader = conn.client(group, "read_committed")?;
    let parts = partitions(
        uncommitted.client(),
        &conn.bootstrap_servers,
        topic,
        Side::Any,
    )?;
    let committed = match group {
        Some(_) => committed_offsets(&uncommitted, topic, &parts)?,
        None => BTreeMap::new(),
    };
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        let (earliest, latest) = uncommitted
            .fetch_watermarks(topic, p, TIMEOUT)
            .map_err(|e| Error::kafka("fetching watermarks", e))?;
        // A read_committed client's "high watermark" is the last stable offset.
        let (_, last_stable) = committed_reader
            .fetch_watermarks(topic, p, TIMEOUT)
            .map_err(|e| Error::kafka("fetching the last stable offset", e))?;
        let committed = committed.get(&p).copied().flatten();
        out.push(PartitionOffsets {
            topic: topic.to_owned(),
            partition: p,
            earliest,
            latest,
            last_stable,
            committed,
            lag: committed.map(|c| (last_stable - c).max(0)),
        });
    }
    Ok(out)
}

/// The group's last committed offsets (not waiting for offsets pending in an open transaction).
fn committed_offsets(
    client: &BaseConsumer<QuietContext>,
    topic: &str,
    parts: &[i32],
) -> Result<BTreeMap<i32, Option<i64>>, Error> {
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        tpl.add_partition(topic, *p);
    }
    let committed = client
        .committed_offsets(tpl, TIMEOUT)
        .map_err(|e| Error::kafka("fetching committed offsets", e))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| {
            let o = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (e.partition(), o)
        })
        .collect())
}

/// The topics `group` has committed offsets for, found by asking for every topic's partitions.
pub fn group_topics(conn: &Connection, group: &str) -> Result<Vec<String>, Error> {
    let client = conn.client(Some(group), "read_uncommitted")?;
    let md = client
        .fetch_metadata(None, TIMEOUT)
        .map_err(|source| Error::Unreachable {
            bootstrap_servers: conn.bootstrap_servers.clone(),
            source,
        })?;
    let mut tpl = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| !t.name().starts_with("__")) {
        for p in t.partitions() {
            tpl.add_partition(t.name(), p.id());
        }
    }
    if tpl.count() == 0 {
        return Ok(Vec::new());
    }
    let committed = client
        .committed_offsets(tpl, TIMEOUT)
        .map_err(|e| Error::kafka("fetching committed offsets", e))?;
    let mut topics: Vec<String> = committed
        .elements()
        .iter()
        .filter(|e| matches!(e.offset(), Offset::Offset(_)))
        .map(|e| e.topic().to_owned())
        .collect();
    topics.sort();
    topics.dedup();
    Ok(topics)
}

/// How many members the group has right now (0 when it is empty or unknown).
pub fn active_members(conn: &Connection, group: &str) -> Result<usize, Error> {
    let client = conn.client(None, "read_uncommitted")?;
    let list = client
        .fetch_group_list(Some(group), TIMEOUT)
        .map_err(|source| Error::Unreachable {
            bootstrap_servers: conn.bootstrap_servers.clone(),
            source,
        })?;
    Ok(list
        .groups()
        .iter()
        .filter(|g| g.name() == group)
        .map(|g| g.members().len())
        .sum())
}

/// Where to move a group's offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The first retained offset.
    Earliest,
    /// The end (last stable offset: nothing left to read).
    Latest,
    /// This offset on every partition.
    Offset(i64),
    /// The first record with a timestamp at or after this (ms since the epoch).
    Timestamp(i64),
    /// The current committed offset plus this (negative: back).
    ShiftBy(i64),
}

/// One partition's planned move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResetPlan {
    /// The partition.
    pub partition: i32,
    /// Its committed offset now.
    pub current: Option<i64>,
    /// Where it will be.
    pub target: i64,
    /// The partition's earliest and last stable offsets, for reference.
    pub earliest: i64,
    /// See `earliest`.
    pub last_stable: i64,
}

/// Computes where `group`'s offsets on `topic` would move. Changes nothing.
pub fn plan_reset(
    conn: &Connection,
    group: &str,
    topic: &str,
    to: ResetTo,
) -> Result<Vec<ResetPlan>, Error> {
    let offsets = topic_offsets(conn, topic, Some(group))?;
    let by_time = match to {
        ResetTo::Timestamp(ts) => Some(offsets_for_time(conn, topic, ts)?),
        _ => None,
    };
    let mut plan = Vec::with_capacity(offsets.len());
    for o in offsets {
        let target = match to {
            ResetTo::Earliest => o.earliest,
            ResetTo::Latest => o.last_stable,
            ResetTo::Offset(n) => n,
            ResetTo::ShiftBy(n) => o.committed.unwrap_or(o.earliest) + n,
            ResetTo::Timestamp(ts) => match by_time.as_ref().and_then(|m| m.get(&o.partition)) {
                Some(Some(off)) => *off,
                _ => {
                    return Err(Error::config(
                        "to-timestamp",
                        format!(
                            "{ts} is after the last record of {topic}/{}; nothing to replay there \
                             (use --to-latest to skip to the end)",
                            o.partition
                        ),
                    ));
                }
            },
        };
        if !(o.earliest..=o.last_stable).contains(&target) {
            return Err(Error::config(
                "target offset",
                format!(
                    "{target} is outside {topic}/{}'s range {}..={}",
                    o.partition, o.earliest, o.last_stable
                ),
            ));
        }
        plan.push(ResetPlan {
            partition: o.partition,
            current: o.committed,
            target,
            earliest: o.earliest,
            last_stable: o.last_stable,
        });
    }
    Ok(plan)
}

/// Per partition, the offset of the first record with a timestamp at or after `timestamp_ms`
/// (`None`: no such record — the time is after the partition's last record).
pub fn offsets_for_time(
    conn: &Connection,
    topic: &str,
    timestamp_ms: i64,
) -> Result<BTreeMap<i32, Option<i64>>, Error> {
    let client = conn.client(None, "read_committed")?;
    let parts = partitions(client.client(), &conn.bootstrap_servers, topic, Side::Any)?;
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition_offset(topic, *p, Offset::Offset(timestamp_ms))
            .map_err(|e| Error::kafka("building the request", e))?;
    }
    let found = client
        .offsets_for_times(tpl, TIMEOUT)
        .map_err(|e| Error::kafka("looking up offsets for a time", e))?;
    Ok(found
        .elements()
        .iter()
        .map(|e| {
            let o = match e.offset() {
                Offset::Offset(o) if o >= 0 => Some(o),
                _ => None,
            };
            (e.partition(), o)
        })
        .collect())
}

/// Commits `plan` as `group`'s offsets on `topic`. Refuses while the group has active members:
/// they would overwrite the new offsets with their own at their next commit.
pub fn execute_reset(
    conn: &Connection,
    group: &str,
    topic: &str,
    plan: &[ResetPlan],
) -> Result<(), Error> {
    let members = active_members(conn, group)?;
    if members > 0 {
        return Err(Error::config(
            "group",
            format!(
                "{group} has {members} active member(s); stop them first (their next commit \
                 would overwrite the reset)"
            ),
        ));
    }
    let client = conn.client(Some(group), "read_uncommitted")?;
    let mut tpl = TopicPartitionList::new();
    for p in plan {
        tpl.add_partition_offset(topic, p.partition, Offset::Offset(p.target))
            .map_err(|e| Error::kafka("building the offsets", e))?;
    }
    client
        .commit(&tpl, CommitMode::Sync)
        .map_err(|e| Error::kafka("committing the new offsets", e))
}
