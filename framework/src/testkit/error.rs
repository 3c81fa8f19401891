use std::path::PathBuf;
use std::time::Duration;

/// Why the testkit could not give you a broker.
///
/// Every variant says what went wrong *and* what to do about it, because the person reading it
/// is usually looking at a red CI log, not at this source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// `java` is not on `PATH` (or does not run).
    #[error(
        "the embedded Kafka broker needs Java 17 or newer, but `{program}` could not be run: {source}. \
         Install a JDK (e.g. `apt-get install openjdk-17-jre-headless`), set JAVA_HOME, or set \
         KAFKA_BOOTSTRAP_SERVERS to use an existing cluster"
    )]
    JavaMissing {
        /// The program that was tried.
        program: String,
        /// The error from starting it.
        #[source]
        source: std::io::Error,
    },

    /// `mvn` is not on `PATH` (or does not run).
    #[error(
        "the embedded Kafka broker's jars are fetched with Maven, but `mvn` could not be run: {source}. \
         Install Maven (e.g. `apt-get install maven`), or set KAFKA_BOOTSTRAP_SERVERS to use an \
         existing cluster"
    )]
    MavenMissing {
        /// The error from starting `mvn`.
        #[source]
        source: std::io::Error,
    },

    /// Maven ran but could not resolve the broker's jars (no network, no such version, ...).
    #[error(
        "Maven could not fetch Apache Kafka {version} from Maven Central (tried: {tried}). \
         Check that this machine reaches Maven Central (proxy settings go in ~/.m2/settings.xml), \
         or fill the cache at {cache} on a machine that does, or set KAFKA_BOOTSTRAP_SERVERS. \
         Last lines of Maven's output:\n{output_tail}"
    )]
    MavenFailed {
        /// The version that was wanted first.
        version: String,
        /// Every version that was tried, in order.
        tried: String,
        /// The cache directory the jars go to.
        cache: PathBuf,
        /// The end of Maven's output.
        output_tail: String,
    },

    /// A broker process exited while it was starting.
    #[error(
        "Kafka node {node} exited during start-up ({status}). Its log is {log}; last lines:\n{log_tail}"
    )]
    BrokerExited {
        /// The node id.
        node: i32,
        /// How it exited.
        status: String,
        /// The full log, kept on disk.
        log: PathBuf,
        /// The last 30 lines of the log.
        log_tail: String,
    },

    /// A broker did not accept clients within the start timeout.
    #[error(
        "Kafka node {node} did not accept clients on {address} within {waited:?}. A slow or \
         overloaded machine may need a longer `KafkaOptions::start_timeout`. Its log is {log}; \
         last lines:\n{log_tail}"
    )]
    NotReady {
        /// The node id.
        node: i32,
        /// The client address that was probed.
        address: String,
        /// How long it waited.
        waited: Duration,
        /// The full log, kept on disk.
        log: PathBuf,
        /// The last 30 lines of the log.
        log_tail: String,
    },

    /// The storage format step (`kafka-storage format`) failed.
    #[error("formatting the storage of Kafka node {node} failed ({status}):\n{output_tail}")]
    FormatFailed {
        /// The node id.
        node: i32,
        /// How the tool exited.
        status: String,
        /// The end of its output.
        output_tail: String,
    },

    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// An admin operation (create topic, metadata) failed.
    #[error("{context}: {source}")]
    Admin {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: rdkafka::error::KafkaError,
    },

    /// A topic did not get a leader for every partition in time.
    #[error("topic {topic} did not get a leader for all {partitions} partitions within {waited:?}")]
    TopicNotReady {
        /// The topic.
        topic: String,
        /// Its partition count.
        partitions: i32,
        /// How long it waited.
        waited: Duration,
    },

    /// Reading a topic back did not reach its end in time.
    #[error(
        "reading {topic} ({isolation}) did not reach the end of partitions {missing:?} within \
         {waited:?} (read {read} records); under read_committed an open transaction holds the end back"
    )]
    ReadTimeout {
        /// The topic.
        topic: String,
        /// `read_committed` or `read_uncommitted`.
        isolation: &'static str,
        /// Partitions whose end was not reached.
        missing: Vec<i32>,
        /// Records read before giving up.
        read: usize,
        /// How long it read.
        waited: Duration,
    },

    /// The operation makes no sense for this backend (e.g. killing a node of an external
    /// cluster) or for these arguments.
    #[error("{0}")]
    Unsupported(String),

    /// The process-wide shared broker failed to start earlier; every user of it gets this.
    #[error("the shared embedded Kafka broker failed to start: {0}")]
    SharedStartFailed(String),

    /// The Docker (testcontainers) backend failed.
    #[cfg(feature = "testcontainers")]
    #[error(
        "starting Kafka in Docker (testcontainers, image apache/kafka) failed: {0}. Is a Docker \
         engine running and reachable? Without one, use the embedded broker (the default)"
    )]
    Docker(String),
}

impl TestkitError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// The testkit's result type.
pub type Result<T, E = TestkitError> = std::result::Result<T, E>;
