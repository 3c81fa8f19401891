//! The Docker backend: Apache's `apache/kafka` image through testcontainers.
//!
//! For machines with a Docker engine. onceflow's own CI has none, so CI compiles this backend
//! (clippy with `--all-features`) but cannot run it.

use testcontainers_modules::kafka::apache;
use testcontainers_modules::testcontainers::core::ContainerPort;
use testcontainers_modules::testcontainers::runners::AsyncRunner as _;
use testcontainers_modules::testcontainers::{ContainerAsync, ImageExt as _};

use super::error::{Result, TestkitError};

pub(crate) struct DockerKafka {
    bootstrap: String,
    // Held for its Drop, which removes the container.
    _container: ContainerAsync<apache::Kafka>,
}

impl std::fmt::Debug for DockerKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerKafka")
            .field("bootstrap", &self.bootstrap)
            .finish_non_exhaustive()
    }
}

impl DockerKafka {
    pub(crate) async fn start(version: &str) -> Result<Self> {
        let container = apache::Kafka::default()
            .with_jvm_image()
            .with_tag(version)
            // A single broker cannot host the transaction log at the default RF 3.
            .with_env_var("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
            .with_env_var("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
            .with_env_var("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
            .with_env_var("KAFKA_GROUP_MIN_SESSION_TIMEOUT_MS", "1000")
            .start()
            .await
            .map_err(|e| TestkitError::Docker(e.to_string()))?;
        let port = container
            .get_host_port_ipv4(ContainerPort::Tcp(apache::KAFKA_PORT.as_u16()))
            .await
            .map_err(|e| TestkitError::Docker(e.to_string()))?;
        Ok(Self {
            bootstrap: format!("127.0.0.1:{port}"),
            _container: container,
        })
    }

    pub(crate) fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }
}
