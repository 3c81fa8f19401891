//! # onceflow
//!
//! Exactly-once stream processing for Apache Kafka.
//!
//! You implement a [`Processor`]; onceflow owns everything that makes the result exactly-once:
//! the `read_committed` consumer, the transactional producer, the input offsets committed in
//! the same transaction as the outputs, rebalances, fencing of zombie instances, retries, dead
//! letters and shutdown. Every input record's effects — its outputs, its dead letter, the
//! advance of its offset — are committed exactly once, or not at all.
//!
//! ## Quick start
//!
//! ```no_run
//! use onceflow::{Output, OutputRecord, Pipeline, PipelineConfig, ProcessError, Processor, Record};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Payment { user: String, cents: i64 }
//!
//! #[derive(Serialize)]
//! struct LedgerEntry<'a> { user: &'a str, cents: i64, source_offset: i64 }
//!
//! struct ToLedger;
//!
//! #[async_trait::async_trait]
//! impl Processor for ToLedger {
//!     type Input = Payment;
//!
//!     async fn process(&self, r: &Record<Payment>, out: &mut Output) -> Result<(), ProcessError> {
//!         if r.value.cents <= 0 {
//!             return Err(ProcessError::dead_letter("non-positive amount"));
//!         }
//!         let entry = LedgerEntry { user: &r.value.user, cents: r.value.cents, source_offset: r.offset };
//!         out.send(OutputRecord::to("ledger").key(r.value.user.as_str()).json(&entry)?.headers_from(&r.headers));
//!         Ok(())
//!     }
//! }
//!
//! # async fn run() -> Result<(), onceflow::Error> {
//! let config = PipelineConfig::builder()
//!     .bootstrap_servers("127.0.0.1:9092")
//!     .application_id("ledger-writer")
//!     .instance_id("0")                      // stable per instance: fences its zombies
//!     .input_topic("payments")
//!     .dead_letter_topic("payments.dlq")
//!     .build()?;                             // validated before anything connects
//! let summary = Pipeline::new(config, ToLedger).run_until_signal().await?;
//! println!("committed {} transactions", summary.transactions_committed);
//! # Ok(()) }
//! ```
//!
//! A complete runnable version against an embedded broker is `examples/src/bin/quickstart.rs`.
//!
//! ## Modules, by what they own
//!
//! * [`processor`]: the `Processor` trait and its contract; records, outputs, errors.
//! * [`config`]: the validated pipeline configuration.
//! * [`codec`]: decoding input values (JSON, raw bytes, UTF-8, your own).
//! * [`error`]: the error type and its three classes (retriable / abortable / fatal).
//! * [`partitioner`]: key → partition routing identical to the Java client's (murmur2).
//! * [`dead_letter`]: the dead-letter record format and its headers.
//! * [`shutdown`]: graceful and forced shutdown.
//! * [`verify`]: checking an output topic against its input (the logic of `onceflow verify`).
//! * [`offsets`]: end offsets, committed offsets and lag per partition, offsets for a time,
//!   resetting a group (the logic of `onceflow offsets`, `lag`, `reset-offsets`).
//! * the consumer side, producer side, transaction loop and rebalance handling are internal
//!   modules (`consumer`, `producer`, `transaction`, `rebalance`); the [`guide`] explains
//!   them.
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

mod client_log;
pub mod codec;
pub mod config;
mod consumer;
pub mod dead_letter;
pub mod error;
pub mod offsets;
pub mod partitioner;
mod pipeline;
pub mod processor;
mod producer;
mod rebalance;
pub mod shutdown;
mod transaction;
pub mod verify;

#[cfg(feature = "testkit")]
pub mod testkit;

/// The onceflow guide (`docs/guide.md`): offsets and commit modes, the transaction loop,
/// fencing, rebalances, error classes, configuration, and a complete program (compiled here as
/// a doc test).
#[doc = include_str!("../../docs/guide.md")]
pub mod guide {}

pub use config::{PipelineConfig, PipelineConfigBuilder};
pub use error::{Error, ErrorClass};
pub use pipeline::Pipeline;
pub use processor::{
    IntoTopic, Output, OutputRecord, ProcessError, Processor, Record, TopicPartition,
};
pub use producer::LEFTOVER_KEY;
pub use shutdown::ShutdownHandle;
pub use transaction::RunSummary;

/// Re-exported so processors can use `#[onceflow::async_trait]`.
pub use async_trait::async_trait;
