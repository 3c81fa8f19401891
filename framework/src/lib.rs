//! # onceflow
//!
//! Exactly-once stream processing for Apache Kafka.
//!
//! onceflow owns everything that makes a consume → transform → produce pipeline exactly-once:
//! the `read_committed` consumer, the transactional producer, offsets committed inside the
//! transaction, rebalances, fencing of zombie instances, retries, dead letters and shutdown.
//!
//! Modules:
//! * [`partitioner`]: key → partition routing identical to the Java client's (murmur2).
#![cfg_attr(
    feature = "testkit",
    doc = "* [`testkit`]: a real Apache Kafka (embedded, external or Docker) for tests and demos."
)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod partitioner;

#[cfg(feature = "testkit")]
pub mod testkit;
