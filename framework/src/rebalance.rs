//! Rebalances: commit before letting go, start from committed offsets, run the user's hooks.
//!
//! librdkafka calls [`RebalanceContext`] on the poller thread, inside `poll`, before it
//! releases revoked partitions and after it takes assigned ones. Both wait until the
//! transaction loop has no records in flight — every record it took is produced into the open
//! transaction, with its offset — and hold the loop's lock until the hooks have run, so the loop
//! takes no records meanwhile (see [`crate::transaction`]):
//!
//! * **Revoke** (cooperative: only the moved partitions; eager: all of them): the open
//!   transaction is committed first — its offsets are for partitions this instance still owns at
//!   that moment, with the current group generation — so the next owner starts exactly where this
//!   one stopped. If the assignment was *lost* (the session expired, so another instance may
//!   already own the partitions), committing could duplicate its work, so the transaction is
//!   aborted instead. Buffered records of the revoked partitions are dropped (they were never
//!   processed; the next owner reads them again from the committed offset). Then the processor's
//!   `on_partitions_revoked` hook runs.
//! * **Assign**: librdkafka starts each new partition at the group's committed offset (read with
//!   `read_committed`, so offsets pending in an open transaction are waited for, not skipped).
//!   Then `on_partitions_assigned` runs.
//!
//! A failure here cannot stop the instance from inside librdkafka's callback; it is handed to
//! the transaction loop, which acts on it before it takes another batch. That hand-off only ever
//! aborts or stops, never commits, so nothing is committed for partitions already let go.

use std::collections::BTreeSet;
use std::sync::Arc;

use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;

use crate::client_log::ClientErrors;
use crate::codec::Codec;
use crate::processor::{Processor, TopicPartition};
use crate::transaction::{Shared, Step, abort_open, commit_open};

/// The consumer context of a pipeline: rebalance handling and log routing.
pub(crate) struct RebalanceContext<P: Processor, C> {
    shared: Arc<Shared<P, C>>,
    errors: ClientErrors,
}

impl<P: Processor, C> RebalanceContext<P, C> {
    pub(crate) fn new(shared: Arc<Shared<P, C>>) -> Self {
        Self {
            shared,
            errors: ClientErrors::new("consumer"),
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

impl<P: Processor, C: Codec<P::Input>> ClientContext for RebalanceContext<P, C> {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::client_log::log_librdkafka(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.report(&error, reason);
    }
}

impl<P: Processor, C: Codec<P::Input>> ConsumerContext for RebalanceContext<P, C> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.on_revoke(consumer, &partitions_of(tpl));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions = partitions_of(tpl);
                tracing::info!(?partitions, "partitions assigned");
                if !partitions.is_empty() {
                    // Between batches, like every hook; the loop waits meanwhile.
                    let _between = self.shared.between_batches();
                    self.shared
                        .runtime
                        .block_on(self.shared.processor.on_partitions_assigned(&partitions));
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

impl<P: Processor, C: Codec<P::Input>> RebalanceContext<P, C> {
    fn on_revoke(&self, consumer: &BaseConsumer<Self>, partitions: &[TopicPartition]) {
        let lost = consumer.assignment_lost();
        tracing::info!(?partitions, lost, "partitions revoked");
        let revoked: BTreeSet<(String, i32)> = partitions
            .iter()
            .map(|tp| (tp.topic.clone(), tp.partition))
            .collect();
        // Once the loop has produced (or put back) the records it took: the transaction must
        // hold them, with their offsets, before it can be committed. The lock is held until the
        // hooks have run, so the loop takes no more records of the revoked partitions
        // meanwhile.
        let mut st = self.shared.between_batches();
        let aborted = {
            st.summary.rebalances += 1;
            let mut aborted = Vec::new();
            if st.txn.is_some() && st.deferred.is_none() {
                let outcome = if lost {
                    Err(Step::Abort {
                        reason: "the assignment was lost (session timeout); another instance may \
                                 already own these partitions"
                            .into(),
                        backoff: None,
                    })
                } else {
                    commit_open(&mut st, consumer)
                };
                match outcome {
                    Ok(()) => {}
                    Err(Step::Abort { reason, .. }) => match abort_open(&mut st, &reason) {
                        Ok(parts) => aborted = parts,
                        Err(e) => st.deferred = Some(Step::Stop(e)),
                    },
                    Err(stop @ Step::Stop(_)) => st.deferred = Some(stop),
                }
            }
            // The revoked partitions' unprocessed records belong to their next owner now.
            {
                let mut buffer = st.intake.buffer();
                buffer.drop_partitions(|k| revoked.contains(k));
                buffer.pending_seeks.retain(|k, _| !revoked.contains(k));
            }
            st.committed.retain(|k, _| !revoked.contains(k));
            aborted
        };
        if !aborted.is_empty() {
            self.shared
                .runtime
                .block_on(self.shared.processor.on_transaction_aborted(&aborted));
        }
        self.shared
            .runtime
            .block_on(self.shared.processor.on_partitions_revoked(partitions));
        drop(st);
    }
}
