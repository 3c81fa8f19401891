//! Pipeline configuration: typed, validated before anything connects, and safe to print.
//!
//! Build one with [`PipelineConfig::builder`]. Every setting has a documented default except
//! the four that identify the pipeline (bootstrap servers, application id, input topics,
//! instance id). [`PipelineConfigBuilder::build`] refuses, with an error naming the setting:
//!
//! * overrides of what exactly-once depends on — `enable.auto.commit`, `isolation.level`,
//!   `transactional.id`, `enable.idempotence`, `acks` (and their aliases) — in the pass-through
//!   librdkafka properties;
//! * a transaction timeout that is not longer than the commit interval (every transaction would
//!   be aborted by the broker before it could commit);
//! * empty or malformed names, a dead-letter topic that is also an input, zero limits.
//!
//! Secrets given as pass-through properties (`sasl.password`, `ssl.key.password`,
//! `ssl.key.pem`, `sasl.oauthbearer.client.secret`, ...) are shown as `<redacted>` by `Debug`
//! and are never logged.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::error::Error;

/// How a consumer group assigns partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AssignmentStrategy {
    /// Incremental cooperative rebalancing: only moved partitions are revoked, the others keep
    /// processing through a rebalance. The default.
    #[default]
    CooperativeSticky,
    /// Eager ("stop the world") rebalancing with the range assignor: every partition is revoked
    /// and reassigned at each rebalance.
    Eager,
}

impl AssignmentStrategy {
    pub(crate) fn as_config(self) -> &'static str {
        match self {
            Self::CooperativeSticky => "cooperative-sticky",
            Self::Eager => "range",
        }
    }
}

/// Where a new consumer group starts on a partition with no committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartFrom {
    /// The first retained record. The default: a new pipeline processes what is there.
    #[default]
    Earliest,
    /// Only records produced after the group first joined.
    Latest,
}

/// What to do with an input record whose value cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DecodeFailure {
    /// Send it to the dead-letter topic and go on. The default.
    #[default]
    DeadLetter,
    /// Stop the pipeline.
    Fatal,
}

/// The validated configuration of a pipeline. See the [module docs](self).
#[derive(Clone)]
pub struct PipelineConfig {
    pub(crate) bootstrap_servers: String,
    pub(crate) application_id: String,
    pub(crate) input_topics: Vec<String>,
    pub(crate) transactional_id_prefix: String,
    pub(crate) instance_id: String,
    pub(crate) commit_interval: Duration,
    pub(crate) max_records_per_transaction: usize,
    pub(crate) transaction_timeout: Duration,
    pub(crate) dead_letter_topic: Option<String>,
    pub(crate) max_attempts: u32,
    pub(crate) retry_backoff: Duration,
    pub(crate) max_retry_backoff: Duration,
    pub(crate) decode_failure: DecodeFailure,
    pub(crate) assignment_strategy: AssignmentStrategy,
    pub(crate) start_from: StartFrom,
    pub(crate) stamp_source: bool,
    pub(crate) kafka_properties: BTreeMap<String, String>,
    pub(crate) consumer_properties: BTreeMap<String, String>,
    pub(crate) producer_properties: BTreeMap<String, String>,
}

impl PipelineConfig {
    /// A builder with every default set.
    #[must_use]
    pub fn builder() -> PipelineConfigBuilder {
        PipelineConfigBuilder::default()
    }

    /// `bootstrap.servers`.
    #[must_use]
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// The application id, used as the consumer group id.
    #[must_use]
    pub fn application_id(&self) -> &str {
        &self.application_id
    }

    /// The input topics.
    #[must_use]
    pub fn input_topics(&self) -> &[String] {
        &self.input_topics
    }

    /// This instance's first `transactional.id`: `<prefix>-<instance id>`.
    #[must_use]
    pub fn transactional_id(&self) -> String {
        format!("{}-{}", self.transactional_id_prefix, self.instance_id)
    }

    /// Both of this instance's `transactional.id`s: `<prefix>-<instance id>` and
    /// `<prefix>-<instance id>:1`. An instance has two transactional producers and begins each
    /// transaction on the one whose last transaction ended longer ago (see the guide, §2); both
    /// ids fence a restarted instance's zombie. The `:` cannot occur in a prefix or an instance
    /// id, so no other instance's first id is this one's second. A prefixed ACL on
    /// `<prefix>-` covers both.
    #[must_use]
    pub fn transactional_ids(&self) -> [String; 2] {
        let first = self.transactional_id();
        let second = format!("{first}:1");
        [first, second]
    }

    /// The instance id.
    #[must_use]
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The commit interval.
    #[must_use]
    pub fn commit_interval(&self) -> Duration {
        self.commit_interval
    }

    /// The transaction timeout.
    #[must_use]
    pub fn transaction_timeout(&self) -> Duration {
        self.transaction_timeout
    }

    /// The dead-letter topic, if any.
    #[must_use]
    pub fn dead_letter_topic(&self) -> Option<&str> {
        self.dead_letter_topic.as_deref()
    }

    /// Whether the consumer may have the broker create a missing input topic
    /// (`allow.auto.create.topics=true`, off by default). Without it a pipeline checks at
    /// start-up that its input topics exist.
    pub(crate) fn allows_auto_created_topics(&self) -> bool {
        // The consumer's own properties override the shared ones (see `consumer::create`).
        self.consumer_properties
            .get("allow.auto.create.topics")
            .or_else(|| self.kafka_properties.get("allow.auto.create.topics"))
            .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
    }
}

impl fmt::Debug for PipelineConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipelineConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("application_id", &self.application_id)
            .field("input_topics", &self.input_topics)
            .field("transactional_ids", &self.transactional_ids())
            .field("commit_interval", &self.commit_interval)
            .field(
                "max_records_per_transaction",
                &self.max_records_per_transaction,
            )
            .field("transaction_timeout", &self.transaction_timeout)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("max_attempts", &self.max_attempts)
            .field("retry_backoff", &self.retry_backoff)
            .field("max_retry_backoff", &self.max_retry_backoff)
            .field("decode_failure", &self.decode_failure)
            .field("assignment_strategy", &self.assignment_strategy)
            .field("start_from", &self.start_from)
            .field("stamp_source", &self.stamp_source)
            .field("kafka_properties", &Redacted(&self.kafka_properties))
            .field("consumer_properties", &Redacted(&self.consumer_properties))
            .field("producer_properties", &Redacted(&self.producer_properties))
            .finish()
    }
}

/// Shows a property map with secret values replaced.
pub(crate) struct Redacted<'a>(pub(crate) &'a BTreeMap<String, String>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown = if is_secret(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k, shown)
            }))
            .finish()
    }
}

/// True for librdkafka properties whose value is a credential or key material.
#[must_use]
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.contains("sasl.jaas")
        || k == "sasl.oauthbearer.config"
        || k == "ssl.key.pem"
        || k == "ssl_key"
        || (k.starts_with("ssl.") && k.contains("key") && k.ends_with(".pem"))
        || k.contains("token")
}

/// Properties onceflow sets itself because exactly-once depends on them, with the reason an
/// override is refused.
const OWNED_PROPERTIES: &[(&str, &str)] = &[
    (
        "enable.auto.commit",
        "offsets are committed inside each transaction; auto commit would commit offsets of records whose outputs may still be aborted",
    ),
    (
        "enable.auto.offset.store",
        "offsets are tracked by the transaction loop, not stored by the consumer",
    ),
    (
        "isolation.level",
        "the input must be read read_committed, or aborted upstream records would be processed",
    ),
    (
        "transactional.id",
        "it is derived from transactional_id_prefix and instance_id so that a restarted instance fences its zombie",
    ),
    (
        "enable.idempotence",
        "transactions require the idempotent producer",
    ),
    ("acks", "transactions require acks=all"),
    ("request.required.acks", "transactions require acks=all"),
    ("group.id", "it is the application_id; set that instead"),
    ("bootstrap.servers", "set it with bootstrap_servers()"),
    ("metadata.broker.list", "set it with bootstrap_servers()"),
    (
        "partition.assignment.strategy",
        "set it with assignment_strategy()",
    ),
    (
        "transaction.timeout.ms",
        "set it with transaction_timeout(), which is validated against the commit interval",
    ),
    (
        "enable.partition.eof",
        "the transaction loop does not expect end-of-partition events",
    ),
];

/// Builds a [`PipelineConfig`]. Every default is documented on its setter.
#[derive(Clone)]
pub struct PipelineConfigBuilder {
    bootstrap_servers: Option<String>,
    application_id: Option<String>,
    input_topics: Vec<String>,
    transactional_id_prefix: Option<String>,
    instance_id: Option<String>,
    commit_interval: Duration,
    max_records_per_transaction: usize,
    transaction_timeout: Duration,
    dead_letter_topic: Option<String>,
    max_attempts: u32,
    retry_backoff: Duration,
    max_retry_backoff: Duration,
    decode_failure: DecodeFailure,
    assignment_strategy: AssignmentStrategy,
    start_from: StartFrom,
    stamp_source: bool,
    kafka_properties: BTreeMap<String, String>,
    consumer_properties: BTreeMap<String, String>,
    producer_properties: BTreeMap<String, String>,
}

impl Default for PipelineConfigBuilder {
    fn default() -> Self {
        Self {
            bootstrap_servers: None,
            application_id: None,
            input_topics: Vec::new(),
            transactional_id_prefix: None,
            instance_id: None,
            commit_interval: Duration::from_millis(100),
            max_records_per_transaction: 100_000,
            transaction_timeout: Duration::from_secs(10),
            dead_letter_topic: None,
            max_attempts: 5,
            retry_backoff: Duration::from_millis(100),
            max_retry_backoff: Duration::from_secs(5),
            decode_failure: DecodeFailure::DeadLetter,
            assignment_strategy: AssignmentStrategy::CooperativeSticky,
            start_from: StartFrom::Earliest,
            stamp_source: true,
            kafka_properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
        }
    }
}

impl fmt::Debug for PipelineConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipelineConfigBuilder")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("application_id", &self.application_id)
            .field("input_topics", &self.input_topics)
            .field("instance_id", &self.instance_id)
            .field("kafka_properties", &Redacted(&self.kafka_properties))
            .field("consumer_properties", &Redacted(&self.consumer_properties))
            .field("producer_properties", &Redacted(&self.producer_properties))
            .finish_non_exhaustive()
    }
}

impl PipelineConfigBuilder {
    /// `bootstrap.servers`, e.g. `"broker1:9092,broker2:9092"`. Required.
    #[must_use]
    pub fn bootstrap_servers(mut self, servers: impl Into<String>) -> Self {
        self.bootstrap_servers = Some(servers.into());
        self
    }

    /// The application id: the consumer group id, and the default transactional-id prefix.
    /// Required. Every instance of one pipeline uses the same application id.
    #[must_use]
    pub fn application_id(mut self, id: impl Into<String>) -> Self {
        self.application_id = Some(id.into());
        self
    }

    /// Adds an input topic. At least one is required.
    #[must_use]
    pub fn input_topic(mut self, topic: impl Into<String>) -> Self {
        self.input_topics.push(topic.into());
        self
    }

    /// Adds input topics.
    #[must_use]
    pub fn input_topics<I, S>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.input_topics.extend(topics.into_iter().map(Into::into));
        self
    }

    /// Prefix of the `transactional.id`. Default: the application id.
    #[must_use]
    pub fn transactional_id_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.transactional_id_prefix = Some(prefix.into());
        self
    }

    /// This instance's id, stable across its restarts (a pod ordinal, a host name). Required.
    ///
    /// The `transactional.id`s are `<prefix>-<instance id>` and `<prefix>-<instance id>:1`
    /// (see [`PipelineConfig::transactional_ids`]): when an instance restarts, its new
    /// producers fence the old ones, so a half-dead predecessor can never commit again. Two
    /// *running* instances must never share an id — the older one would be fenced and stop.
    #[must_use]
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// How often a transaction commits. Default 100 ms (as Kafka Streams under exactly-once).
    /// Shorter: lower latency, more commits; longer: the reverse.
    ///
    /// It is timed from the start of one commit to the start of the next, as Kafka Streams
    /// times `commit.interval.ms`: a transaction that begins while records wait behind a commit
    /// commits one interval after that commit began, so no record waits more than the interval
    /// plus one commit. After an idle spell longer than the interval, the first records are
    /// committed as soon as they are processed.
    #[must_use]
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// Most input records in one transaction; reaching it commits early. Default 100,000: at
    /// the default 100 ms interval it only bites above ~1M records/s, and it bounds what an
    /// abort has to process again.
    #[must_use]
    pub fn max_records_per_transaction(mut self, n: usize) -> Self {
        self.max_records_per_transaction = n;
        self
    }

    /// `transaction.timeout.ms`: how long the broker lets a transaction stay open before it
    /// aborts it. Default 10 s. Must be longer than the commit interval, at least 1 s, and at
    /// most the broker's `transaction.max.timeout.ms` (15 min by default).
    #[must_use]
    pub fn transaction_timeout(mut self, timeout: Duration) -> Self {
        self.transaction_timeout = timeout;
        self
    }

    /// The dead-letter topic: records that cannot be decoded or that the processor rejects are
    /// written there, in the same transaction, with headers naming the error. Default none —
    /// then a record that must be dead-lettered stops the pipeline rather than being dropped.
    #[must_use]
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// How many times a record whose processing fails with `retry` is attempted before it is
    /// dead-lettered, so a poison record cannot stall its partition forever. Default 5.
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Back-off before the second attempt; doubled per attempt up to
    /// [`max_retry_backoff`](Self::max_retry_backoff). Default 100 ms.
    #[must_use]
    pub fn retry_backoff(mut self, backoff: Duration) -> Self {
        self.retry_backoff = backoff;
        self
    }

    /// Upper bound of the retry back-off. Default 5 s.
    #[must_use]
    pub fn max_retry_backoff(mut self, backoff: Duration) -> Self {
        self.max_retry_backoff = backoff;
        self
    }

    /// What to do with undecodable input. Default [`DecodeFailure::DeadLetter`].
    #[must_use]
    pub fn on_decode_failure(mut self, action: DecodeFailure) -> Self {
        self.decode_failure = action;
        self
    }

    /// The partition assignment strategy. Default [`AssignmentStrategy::CooperativeSticky`].
    #[must_use]
    pub fn assignment_strategy(mut self, strategy: AssignmentStrategy) -> Self {
        self.assignment_strategy = strategy;
        self
    }

    /// Where a new group starts. Default [`StartFrom::Earliest`].
    #[must_use]
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start_from = start;
        self
    }

    /// Adds the lineage header [`SOURCE_HEADER`](crate::processor::SOURCE_HEADER)
    /// (`topic/partition/offset` of the input) to every output record, so `onceflow verify` can
    /// match outputs to inputs. Default true.
    #[must_use]
    pub fn stamp_source(mut self, stamp: bool) -> Self {
        self.stamp_source = stamp;
        self
    }

    /// A librdkafka property for both the consumer and the producer (TLS, SASL, tuning). The
    /// properties exactly-once depends on are refused by [`build`](Self::build).
    #[must_use]
    pub fn kafka_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka_properties.insert(key.into(), value.into());
        self
    }

    /// A librdkafka property for the consumer only.
    #[must_use]
    pub fn consumer_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.consumer_properties.insert(key.into(), value.into());
        self
    }

    /// A librdkafka property for the producer only.
    #[must_use]
    pub fn producer_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.producer_properties.insert(key.into(), value.into());
        self
    }

    /// Validates and builds. Nothing connects here.
    pub fn build(self) -> Result<PipelineConfig, Error> {
        let bootstrap_servers = required(self.bootstrap_servers, "bootstrap_servers")?;
        let application_id = required(self.application_id, "application_id")?;
        check_name("application_id", &application_id)?;
        let instance_id = required(self.instance_id, "instance_id")?;
        check_name("instance_id", &instance_id)?;
        let transactional_id_prefix = self
            .transactional_id_prefix
            .unwrap_or_else(|| application_id.clone());
        check_name("transactional_id_prefix", &transactional_id_prefix)?;

        if self.input_topics.is_empty() {
            return Err(Error::config(
                "input_topics",
                "at least one input topic is required",
            ));
        }
        for t in &self.input_topics {
            check_topic("input_topics", t)?;
        }
        if let Some(dlq) = &self.dead_letter_topic {
            check_topic("dead_letter_topic", dlq)?;
            if self.input_topics.contains(dlq) {
                return Err(Error::config(
                    "dead_letter_topic",
                    format!("{dlq} is also an input topic; dead letters would be processed again"),
                ));
            }
        }
        if self.commit_interval.is_zero() {
            return Err(Error::config(
                "commit_interval",
                "must be greater than zero",
            ));
        }
        if self.transaction_timeout < Duration::from_secs(1) {
            return Err(Error::config(
                "transaction_timeout",
                "must be at least 1 s (librdkafka's minimum)",
            ));
        }
        if self.transaction_timeout <= self.commit_interval {
            return Err(Error::config(
                "transaction_timeout",
                format!(
                    "{:?} is not longer than the commit interval {:?}: the broker would abort \
                     transactions before they commit. Make it several times the commit interval",
                    self.transaction_timeout, self.commit_interval
                ),
            ));
        }
        if self.transaction_timeout > Duration::from_secs(i32::MAX as u64 / 1000) {
            return Err(Error::config("transaction_timeout", "is too large"));
        }
        if self.max_records_per_transaction == 0 {
            return Err(Error::config(
                "max_records_per_transaction",
                "must be at least 1",
            ));
        }
        if self.max_attempts == 0 {
            return Err(Error::config("max_attempts", "must be at least 1"));
        }
        if self.retry_backoff > self.max_retry_backoff {
            return Err(Error::config(
                "retry_backoff",
                "is longer than max_retry_backoff",
            ));
        }
        for (scope, map) in [
            ("kafka_property", &self.kafka_properties),
            ("consumer_property", &self.consumer_properties),
            ("producer_property", &self.producer_properties),
        ] {
            for key in map.keys() {
                let normalized = key.trim().to_ascii_lowercase();
                if let Some((_, why)) = OWNED_PROPERTIES.iter().find(|(k, _)| *k == normalized) {
                    return Err(Error::config(
                        format!("{scope}({key})"),
                        format!("onceflow sets this itself: {why}"),
                    ));
                }
            }
        }

        Ok(PipelineConfig {
            bootstrap_servers,
            application_id,
            input_topics: self.input_topics,
            transactional_id_prefix,
            instance_id,
            commit_interval: self.commit_interval,
            max_records_per_transaction: self.max_records_per_transaction,
            transaction_timeout: self.transaction_timeout,
            dead_letter_topic: self.dead_letter_topic,
            max_attempts: self.max_attempts,
            retry_backoff: self.retry_backoff,
            max_retry_backoff: self.max_retry_backoff,
            decode_failure: self.decode_failure,
            assignment_strategy: self.assignment_strategy,
            start_from: self.start_from,
            stamp_source: self.stamp_source,
            kafka_properties: self.kafka_properties,
            consumer_properties: self.consumer_properties,
            producer_properties: self.producer_properties,
        })
    }
}

fn required(value: Option<String>, field: &str) -> Result<String, Error> {
    match value.map(|v| v.trim().to_owned()) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(Error::config(field, "is required")),
    }
}

/// Kafka's rule for topic names: 1..=249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
fn check_topic(field: &str, topic: &str) -> Result<(), Error> {
    let valid_chars = topic
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if topic.is_empty() || topic.len() > 249 || !valid_chars || topic == "." || topic == ".." {
        return Err(Error::config(
            field,
            format!("{topic:?} is not a valid Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"),
        ));
    }
    Ok(())
}

/// Ids end up in group ids, transactional ids and log lines: keep them plain.
fn check_name(field: &str, value: &str) -> Result<(), Error> {
    let valid = !value.is_empty()
        && value.len() <= 200
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid {
        return Err(Error::config(
            field,
            format!("{value:?} must be 1 to 200 of a-z A-Z 0-9 . _ -"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> PipelineConfigBuilder {
        PipelineConfig::builder()
            .bootstrap_servers("127.0.0.1:9092")
            .application_id("payments")
            .input_topic("orders")
            .instance_id("0")
    }

    #[test]
    fn an_instances_second_transactional_id_is_no_other_instances_first() {
        // "0:1" would make instance "0:1"'s first id instance "0"'s second: the `:` is refused.
        for (field, builder) in [
            ("instance_id", minimal().instance_id("0:1")),
            (
                "transactional_id_prefix",
                minimal().transactional_id_prefix("payments:1"),
            ),
        ] {
            let err = builder.build().unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn defaults_are_as_documented() {
        let c = minimal().build().unwrap();
        assert_eq!(c.commit_interval, Duration::from_millis(100));
        assert_eq!(c.max_records_per_transaction, 100_000);
        assert_eq!(c.transaction_timeout, Duration::from_secs(10));
        assert_eq!(c.transactional_id(), "payments-0");
        assert_eq!(c.transactional_ids(), ["payments-0", "payments-0:1"]);
        assert_eq!(c.max_attempts, 5);
        assert_eq!(c.assignment_strategy, AssignmentStrategy::CooperativeSticky);
        assert_eq!(c.decode_failure, DecodeFailure::DeadLetter);
        assert_eq!(c.dead_letter_topic, None);
    }

    #[test]
    fn refuses_overrides_exactly_once_depends_on() {
        for key in [
            "enable.auto.commit",
            "isolation.level",
            "transactional.id",
            "enable.idempotence",
            "acks",
            "request.required.acks",
            " Enable.Auto.Commit ",
        ] {
            let err = minimal().kafka_property(key, "x").build().unwrap_err();
            assert!(
                err.to_string().contains("onceflow sets this itself"),
                "{key}: {err}"
            );
            let err = minimal().consumer_property(key, "x").build().unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{key}");
            let err = minimal().producer_property(key, "x").build().unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{key}");
        }
    }

    #[test]
    fn refuses_a_transaction_timeout_not_longer_than_the_commit_interval() {
        let err = minimal()
            .commit_interval(Duration::from_secs(2))
            .transaction_timeout(Duration::from_secs(2))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("transaction_timeout"), "{err}");
        assert!(
            minimal()
                .transaction_timeout(Duration::from_millis(500))
                .build()
                .is_err()
        );
    }

    #[test]
    fn refuses_missing_and_malformed_settings() {
        assert!(PipelineConfig::builder().build().is_err());
        assert!(minimal().instance_id(" ").build().is_err());
        assert!(minimal().instance_id("a b").build().is_err());
        assert!(minimal().input_topic("bad topic").build().is_err());
        assert!(minimal().dead_letter_topic("orders").build().is_err());
        assert!(minimal().max_records_per_transaction(0).build().is_err());
        assert!(minimal().max_attempts(0).build().is_err());
        assert!(minimal().commit_interval(Duration::ZERO).build().is_err());
        let no_inputs = PipelineConfig::builder()
            .bootstrap_servers("b:9092")
            .application_id("a")
            .instance_id("0")
            .build()
            .unwrap_err();
        assert!(no_inputs.to_string().contains("input_topics"));
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c = minimal()
            .kafka_property("security.protocol", "SASL_SSL")
            .kafka_property("sasl.username", "svc-payments")
            .kafka_property("sasl.password", "hunter2-very-secret")
            .consumer_property("ssl.key.password", "k3y-pass")
            .producer_property("ssl.key.pem", "-----BEGIN PRIVATE KEY-----abc")
            .kafka_property("sasl.oauthbearer.client.secret", "oauth-s3cret")
            .build()
            .unwrap();
        let shown = format!(
            "{c:?} {:?}",
            minimal().kafka_property("sasl.password", "hunter2-very-secret")
        );
        for secret in ["hunter2", "k3y-pass", "PRIVATE KEY", "oauth-s3cret"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert!(shown.contains("<redacted>"));
        assert!(shown.contains("svc-payments"), "non-secrets stay visible");
    }
}
