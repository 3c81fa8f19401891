//! A real Apache Kafka for tests and demos: embedded, external, or in Docker.
//!
//! onceflow's promises (exactly-once, fencing, rebalance safety) can only be shown against a
//! real broker: librdkafka's mock cluster writes no commit/abort markers, ignores
//! `isolation.level` and never fences a producer. So this module starts the real thing, the way
//! Spring users use `EmbeddedKafka`:
//!
//! * **Embedded** (default): Apache Kafka's broker jars are fetched once from Maven Central into
//!   a cache ([`cache_dir`]), and each node runs as a child JVM in KRaft mode (combined broker +
//!   controller) on free `127.0.0.1` ports in a fresh temporary directory. Needs Java 17+ and
//!   Maven the first time, Java only after that.
//! * **External**: when `KAFKA_BOOTSTRAP_SERVERS` is set, [`Kafka::start`] and
//!   [`Kafka::shared`] use that cluster instead and start nothing.
//! * **Docker** (feature `testcontainers`): `Kafka::docker` runs the `apache/kafka` image.
//!
//! ```no_run
//! # async fn demo() -> Result<(), onceflow::testkit::TestkitError> {
//! use onceflow::testkit::Kafka;
//!
//! // One broker for every test in this process (started on first use).
//! let kafka = Kafka::shared().await?;
//! kafka.create_topic("orders", 3, 1).await?;
//! println!("bootstrap.servers = {}", kafka.bootstrap_servers());
//!
//! // A three-node cluster of its own, with a node to kill.
//! let cluster = Kafka::start_with(onceflow::testkit::KafkaOptions::cluster(3)).await?;
//! cluster.kill_node(2)?;
//! cluster.restart_node(2).await?;
//! # Ok(()) }
//! ```
//!
//! A broker that enforces ACLs, for tests of permissions: its users log in with SASL/PLAIN on
//! a second listener, and get only what a test grants them (see [`KafkaOptions::sasl_users`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), onceflow::testkit::TestkitError> {
//! use onceflow::testkit::{Acl, AclOperation, AclResource, Kafka, KafkaOptions};
//!
//! let kafka =
//!     Kafka::start_with(KafkaOptions::single().sasl_user("payments", "payments-secret")).await?;
//! kafka.create_topic("payments-in", 3, 1).await?;
//! kafka
//!     .create_acls(&[
//!         Acl::allow("User:payments", AclOperation::Read, AclResource::Topic, "payments-in"),
//!         Acl::allow("User:payments", AclOperation::Write, AclResource::TransactionalId, "payments")
//!             .prefixed(),
//!     ])
//!     .await?;
//! let users_connect_to = kafka.sasl_bootstrap_servers();
//! # Ok(()) }
//! ```
//!
//! Brokers are killed when their [`Kafka`] is dropped, including when a test panics, and also
//! when the test process itself dies (the kernel delivers `SIGKILL` to them). Their directory,
//! with each node's `server.log`, is kept and its path printed when a test panicked or a start
//! failed.

mod embedded;
mod error;
mod jars;
mod readback;
mod security;

#[cfg(feature = "testcontainers")]
mod docker;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

pub use embedded::spawn_tied_to_this_process;
pub use error::{Result, TestkitError};
pub use jars::{
    CACHE_DIR_ENV, FALLBACK_KAFKA_VERSION, KAFKA_VERSION, MAVEN_DEPENDENCY_PLUGIN, cache_dir,
};
pub use readback::{
    Isolation, ReadRecord, committed_offsets_blocking, end_offsets_blocking,
    last_committed_offsets_blocking, read_all, read_all_blocking,
};
pub use security::{Acl, AclOperation, AclResource, SaslUser};

/// Environment variable naming an existing cluster to use instead of starting one.
pub const BOOTSTRAP_SERVERS_ENV: &str = "KAFKA_BOOTSTRAP_SERVERS";

/// Environment variable that overrides [`KAFKA_VERSION`] for the embedded broker.
pub const VERSION_ENV: &str = "ONCEFLOW_KAFKA_VERSION";

/// How to start an embedded broker or cluster. Every field has a documented default.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KafkaOptions {
    /// Number of nodes, each a combined broker + controller. Default 1. With 3 or more, the
    /// internal topics and `default.replication.factor` use RF 3 and `min.insync.replicas` 2.
    pub nodes: i32,
    /// Apache Kafka version. Default: `$ONCEFLOW_KAFKA_VERSION`, else [`KAFKA_VERSION`].
    pub version: String,
    /// Try [`FALLBACK_KAFKA_VERSION`] when `version` cannot be fetched. Default true (false
    /// when `version` was given explicitly through [`KafkaOptions::version`]).
    pub allow_fallback: bool,
    /// JVM maximum heap per node. Default `512m`.
    pub heap: String,
    /// How long each node may take to accept clients. Default 90 s (a cold JVM on a loaded
    /// 2-core machine).
    pub start_timeout: Duration,
    /// Extra `server.properties` lines, written after (and so overriding) the testkit's own.
    /// Default none.
    pub broker_properties: Vec<(String, String)>,
    /// The `java` program. Default `$JAVA_HOME/bin/java`, else `java` on `PATH`.
    pub java: std::path::PathBuf,
    /// Where broker jars are cached. Default [`cache_dir`]`()`.
    pub cache_dir: std::path::PathBuf,
    /// The directory in which each start creates its broker directory (logs, data, config),
    /// removed again when the [`Kafka`] is dropped. Default `None`: the system's temporary
    /// directory (`$TMPDIR`, else `/tmp`). A tmpfs such as `/dev/shm` keeps the host's disk
    /// writeback out of latency measurements; it holds every topic in memory.
    pub data_dir: Option<std::path::PathBuf>,
    /// Honour `KAFKA_BOOTSTRAP_SERVERS`. Default true; a multi-node cluster sets it false,
    /// because its tests kill nodes, which an external cluster does not let us do.
    pub use_external: bool,
    /// Users of a second client listener that authenticates with SASL/PLAIN
    /// (over plaintext) and authorizes with ACLs: Kafka's `StandardAuthorizer`, nothing allowed
    /// without an ACL. Default none: no such listener and no authorizer. The first listener,
    /// which [`Kafka::bootstrap_servers`] names and every testkit helper uses, stays PLAINTEXT
    /// with its anonymous principal a super user, so a test creates topics and reads results as
    /// usual and grants each user what it needs with [`Kafka::create_acls`]; the users connect
    /// to [`Kafka::sasl_bootstrap_servers`]. Set with [`KafkaOptions::sasl_user`]; a cluster with
    /// users is always embedded (an external one has its own).
    pub sasl_users: Vec<SaslUser>,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        let version = std::env::var(VERSION_ENV)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| KAFKA_VERSION.to_owned());
        Self {
            nodes: 1,
            version,
            allow_fallback: true,
            heap: "512m".to_owned(),
            start_timeout: Duration::from_secs(90),
            broker_properties: Vec::new(),
            java: embedded::java_program(),
            cache_dir: cache_dir(),
            data_dir: None,
            use_external: true,
            sasl_users: Vec::new(),
        }
    }
}

impl KafkaOptions {
    /// A single node (the default).
    #[must_use]
    pub fn single() -> Self {
        Self::default()
    }

    /// `nodes` nodes, always embedded (see [`KafkaOptions::use_external`]).
    #[must_use]
    pub fn cluster(nodes: i32) -> Self {
        Self {
            nodes,
            use_external: false,
            ..Self::default()
        }
    }

    /// Runs exactly this Apache Kafka version, with no fallback.
    #[must_use]
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self.allow_fallback = false;
        self
    }

    /// Adds a `server.properties` line.
    #[must_use]
    pub fn broker_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.broker_properties.push((key.into(), value.into()));
        self
    }

    /// Sets the per-node start timeout.
    #[must_use]
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Uses this `java` program.
    #[must_use]
    pub fn java(mut self, java: impl Into<std::path::PathBuf>) -> Self {
        self.java = java.into();
        self
    }

    /// Caches broker jars in `dir`.
    #[must_use]
    pub fn cache_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.cache_dir = dir.into();
        self
    }

    /// Creates the broker directory in `dir` (which must exist) instead of the system's
    /// temporary directory; see [`KafkaOptions::data_dir`].
    #[must_use]
    pub fn data_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Adds a user of the SASL listener, with ACLs enforced (see [`KafkaOptions::sasl_users`]).
    /// Names and passwords are letters, digits, `-` and `_` (they go into the broker's JAAS
    /// configuration as they are).
    #[must_use]
    pub fn sasl_user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.sasl_users.push(SaslUser {
            name: name.into(),
            password: password.into(),
        });
        self.use_external = false;
        self
    }

    /// Sets the JVM heap per node, e.g. `"1g"`.
    #[must_use]
    pub fn heap(mut self, heap: impl Into<String>) -> Self {
        self.heap = heap.into();
        self
    }

    fn fallback_versions(&self) -> Vec<&str> {
        if self.allow_fallback && self.version != FALLBACK_KAFKA_VERSION {
            vec![FALLBACK_KAFKA_VERSION]
        } else {
            Vec::new()
        }
    }
}

#[derive(Debug)]
enum Backend {
    // Arc: restarts wait on a blocking thread, which needs an owned handle.
    Embedded(Arc<embedded::EmbeddedCluster>),
    External,
    #[cfg(feature = "testcontainers")]
    Docker(
        #[expect(dead_code, reason = "held for its Drop, which removes the container")]
        Box<docker::DockerKafka>,
    ),
}

/// A running Kafka cluster for tests: embedded, external or Docker. Dropping it stops what it
/// started.
#[derive(Debug)]
pub struct Kafka {
    bootstrap: String,
    /// The SASL listener's addresses, when the cluster has one.
    sasl_bootstrap: Option<String>,
    backend: Backend,
}

impl Kafka {
    /// A single-node broker of its own (or the external cluster, if `KAFKA_BOOTSTRAP_SERVERS`
    /// is set).
    pub async fn start() -> Result<Self> {
        Self::start_with(KafkaOptions::default()).await
    }

    /// A broker or cluster as `options` say. The blocking parts (Maven, JVM start-up) run on a
    /// blocking thread, not on the async executor.
    pub async fn start_with(options: KafkaOptions) -> Result<Self> {
        tokio::task::spawn_blocking(move || Self::start_blocking(&options))
            .await
            .map_err(|e| TestkitError::Unsupported(format!("the start-up task failed: {e}")))?
    }

    /// [`Kafka::start_with`] for code that is not async. Blocks for the whole start-up.
    pub fn start_blocking(options: &KafkaOptions) -> Result<Self> {
        if options.use_external
            && options.sasl_users.is_empty()
            && let Some(bootstrap) = external_bootstrap()
        {
            tracing::info!(%bootstrap, "using the external Kafka cluster from {BOOTSTRAP_SERVERS_ENV}");
            return Ok(Self {
                bootstrap,
                sasl_bootstrap: None,
                backend: Backend::External,
            });
        }
        let cluster = embedded::EmbeddedCluster::start(options)?;
        Ok(Self {
            bootstrap: cluster.bootstrap_servers(),
            sasl_bootstrap: cluster.sasl_bootstrap_servers(),
            backend: Backend::Embedded(Arc::new(cluster)),
        })
    }

    /// One single-node broker shared by every caller in this process, started on first use.
    ///
    /// Tests that use unique topic and group names can share it and save a JVM start each.
    /// It is never dropped; the kernel kills it when the process exits. If it failed to start,
    /// every caller gets that error.
    pub async fn shared() -> Result<&'static Self> {
        static SHARED: OnceLock<std::result::Result<Kafka, String>> = OnceLock::new();
        let shared = tokio::task::spawn_blocking(|| {
            SHARED.get_or_init(|| {
                Self::start_blocking(&KafkaOptions::default()).map_err(|e| e.to_string())
            })
        })
        .await
        .map_err(|e| TestkitError::Unsupported(format!("the start-up task failed: {e}")))?;
        shared
            .as_ref()
            .map_err(|e| TestkitError::SharedStartFailed(e.clone()))
    }

    /// A single broker in Docker (image `apache/kafka`, tag [`KAFKA_VERSION`]). Needs a
    /// running Docker engine.
    #[cfg(feature = "testcontainers")]
    pub async fn docker() -> Result<Self> {
        let kafka = docker::DockerKafka::start(KAFKA_VERSION).await?;
        Ok(Self {
            bootstrap: kafka.bootstrap_servers().to_owned(),
            sasl_bootstrap: None,
            backend: Backend::Docker(Box::new(kafka)),
        })
    }

    /// The `bootstrap.servers` value for clients.
    #[must_use]
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// The `bootstrap.servers` value for the users of the SASL listener (see
    /// [`KafkaOptions::sasl_users`]); `None` when the cluster has none. Their clients also set
    /// `security.protocol=SASL_PLAINTEXT`, `sasl.mechanism=PLAIN`, `sasl.username` and
    /// `sasl.password`.
    #[must_use]
    pub fn sasl_bootstrap_servers(&self) -> Option<&str> {
        self.sasl_bootstrap.as_deref()
    }

    /// A client configuration with `bootstrap.servers` set.
    #[must_use]
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        config
    }

    /// True when this is a broker the testkit started (not external, not Docker).
    #[must_use]
    pub fn is_embedded(&self) -> bool {
        matches!(self.backend, Backend::Embedded(_))
    }

    /// A short description for logs, e.g. `embedded Apache Kafka 4.3.1, 1 node`.
    #[must_use]
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Embedded(c) => format!(
                "embedded Apache Kafka {}, {} node(s), {} (dir {})",
                c.version(),
                c.node_ids().len(),
                self.bootstrap,
                c.dir().display()
            ),
            Backend::External => format!("external Kafka at {}", self.bootstrap),
            #[cfg(feature = "testcontainers")]
            Backend::Docker(_) => format!("Kafka in Docker at {}", self.bootstrap),
        }
    }

    /// The Apache Kafka version of an embedded broker.
    #[must_use]
    pub fn version(&self) -> Option<&str> {
        match &self.backend {
            Backend::Embedded(c) => Some(c.version()),
            _ => None,
        }
    }

    fn embedded(&self, what: &str) -> Result<&Arc<embedded::EmbeddedCluster>> {
        match &self.backend {
            Backend::Embedded(c) => Ok(c),
            _ => Err(TestkitError::Unsupported(format!(
                "{what} needs an embedded cluster; this is {}",
                self.describe()
            ))),
        }
    }

    /// The node ids of an embedded cluster (1..=n).
    pub fn node_ids(&self) -> Result<Vec<i32>> {
        Ok(self.embedded("listing nodes")?.node_ids())
    }

    /// The `server.log` of an embedded node.
    pub fn log_path(&self, node: i32) -> Result<std::path::PathBuf> {
        self.embedded("a broker log")?.log_path(node)
    }

    /// The operating-system process ids of an embedded cluster's running broker JVMs, e.g. for
    /// measuring the brokers' CPU time beside a client's.
    pub fn process_ids(&self) -> Result<Vec<u32>> {
        Ok(self.embedded("listing broker processes")?.process_ids())
    }

    /// Hard-kills one node with SIGKILL: no controlled shutdown, like a power cut.
    pub fn kill_node(&self, node: i32) -> Result<()> {
        self.embedded("killing a node")?.kill_node(node)
    }

    /// Restarts a killed node with its old ports and data and waits until it accepts clients.
    pub async fn restart_node(&self, node: i32) -> Result<()> {
        let cluster = Arc::clone(self.embedded("restarting a node")?);
        tokio::task::spawn_blocking(move || cluster.restart_node(node))
            .await
            .map_err(|e| TestkitError::Unsupported(format!("the restart task failed: {e}")))?
    }

    /// Keeps the embedded cluster's directory (and logs) after drop, e.g. when a test found a
    /// violation without panicking.
    pub fn keep_logs(&self) {
        if let Backend::Embedded(c) = &self.backend {
            c.keep_logs();
        }
    }

    /// Creates a topic and waits until every partition has a leader.
    ///
    /// An existing topic with that name is an error: tests should use fresh names.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        replication_factor: i32,
    ) -> Result<()> {
        self.create_topic_with(name, partitions, replication_factor, &[])
            .await
    }

    /// [`Kafka::create_topic`] with topic configs, e.g. `("min.insync.replicas", "2")`.
    pub async fn create_topic_with(
        &self,
        name: &str,
        partitions: i32,
        replication_factor: i32,
        configs: &[(&str, &str)],
    ) -> Result<()> {
        let (admin, options) = self.admin()?;
        let mut topic = NewTopic::new(
            name,
            partitions,
            TopicReplication::Fixed(replication_factor),
        );
        for (k, v) in configs {
            topic = topic.set(k, v);
        }
        let results = admin.create_topics([&topic], &options).await;
        topic_results("creating", name, results)?;
        let bootstrap = self.bootstrap.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || wait_for_leaders(&bootstrap, &name, partitions))
            .await
            .map_err(|e| TestkitError::Unsupported(format!("the metadata task failed: {e}")))?
    }

    /// Deletes a topic: to see what a pipeline does when its input disappears while it runs.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let (admin, options) = self.admin()?;
        let results = admin.delete_topics(&[name], &options).await;
        topic_results("deleting", name, results)
    }

    /// Creates ACLs, each allowing its principal one operation on a resource, from any host.
    /// Only meaningful on a cluster that enforces them (see [`KafkaOptions::sasl_users`]).
    pub async fn create_acls(&self, acls: &[Acl]) -> Result<()> {
        let config = self.client_config();
        let acls = acls.to_vec();
        tokio::task::spawn_blocking(move || security::create_acls_blocking(&config, &acls))
            .await
            .map_err(|e| TestkitError::Unsupported(format!("the ACL task failed: {e}")))?
    }

    /// An admin client of this cluster, and the options its topic operations wait with.
    fn admin(&self) -> Result<(AdminClient<DefaultClientContext>, AdminOptions)> {
        let admin = self
            .client_config()
            .create()
            .map_err(|source| TestkitError::Admin {
                context: "creating an admin client".into(),
                source,
            })?;
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        Ok((admin, options))
    }
}

/// The outcome of an admin operation on topic `name` (`doing` says which: "creating",
/// "deleting"): the request's error, or the first topic's.
fn topic_results(
    doing: &str,
    name: &str,
    results: rdkafka::error::KafkaResult<Vec<rdkafka::admin::TopicResult>>,
) -> Result<()> {
    let results = results.map_err(|source| TestkitError::Admin {
        context: format!("{doing} topic {name}"),
        source,
    })?;
    for result in results {
        if let Err((topic, code)) = result {
            return Err(TestkitError::Admin {
                context: format!("{doing} topic {topic}"),
                source: rdkafka::error::KafkaError::AdminOp(code),
            });
        }
    }
    Ok(())
}

fn external_bootstrap() -> Option<String> {
    non_empty(std::env::var(BOOTSTRAP_SERVERS_ENV).ok())
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// Polls metadata (a blocking librdkafka call, so this runs on a blocking thread) until every
/// partition of `topic` has a leader: `CreateTopics` returns when the controller has the topic,
/// which can be before brokers serve it.
#[expect(
    clippy::disallowed_methods,
    reason = "runs on a blocking thread (spawn_blocking in create_topic_with)"
)]
fn wait_for_leaders(bootstrap: &str, topic: &str, partitions: i32) -> Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|source| TestkitError::Admin {
            context: "creating a metadata client".into(),
            source,
        })?;
    let started = Instant::now();
    let limit = Duration::from_secs(30);
    while started.elapsed() < limit {
        if let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))
            && let Some(t) = md.topics().iter().find(|t| t.name() == topic)
            && t.error().is_none()
            && t.partitions().len() == usize::try_from(partitions).unwrap_or(0)
            && t.partitions()
                .iter()
                .all(|p| p.leader() >= 0 && p.error().is_none())
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(TestkitError::TopicNotReady {
        topic: topic.to_owned(),
        partitions,
        waited: started.elapsed(),
    })
}

/// True when `code` means the topic already exists.
#[must_use]
pub fn is_topic_exists(error: &TestkitError) -> bool {
    matches!(
        error,
        TestkitError::Admin {
            source: rdkafka::error::KafkaError::AdminOp(RDKafkaErrorCode::TopicAlreadyExists),
            ..
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_bootstrap_env_means_embedded() {
        assert_eq!(non_empty(None), None);
        assert_eq!(non_empty(Some("  ".into())), None);
        assert_eq!(
            non_empty(Some(" 10.0.0.1:9092 ".into())),
            Some("10.0.0.1:9092".into())
        );
    }

    #[test]
    fn options_document_their_defaults() {
        let o = KafkaOptions::single();
        assert_eq!(o.nodes, 1);
        assert!(o.use_external);
        assert_eq!(o.fallback_versions(), vec![FALLBACK_KAFKA_VERSION]);
        let c = KafkaOptions::cluster(3).version("3.9.1");
        assert_eq!(c.nodes, 3);
        assert!(!c.use_external);
        assert!(c.fallback_versions().is_empty());
        assert!(o.sasl_users.is_empty());
        let s = KafkaOptions::single().sasl_user("app", "app-secret");
        assert_eq!(s.sasl_users[0].name, "app");
        assert!(
            !format!("{s:?}").contains("app-secret"),
            "Debug hides passwords: {s:?}"
        );
        assert!(
            !s.use_external,
            "a cluster with SASL users is always embedded"
        );
    }
}
