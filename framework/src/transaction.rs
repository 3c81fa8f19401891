//! The transaction loop: poll → process → produce → send offsets → commit, on two threads.
//!
//! # Why two threads, and who does what
//!
//! Every transactional call blocks, and librdkafka runs rebalance callbacks on the thread that
//! polls the consumer. So neither runs on the async executor: each pipeline instance has two
//! dedicated OS threads.
//!
//! * The **poller** owns `poll`: it copies each record into the [`Intake`]'s buffer, applies
//!   the seeks an abort schedules, and serves librdkafka's callbacks — the rebalance callback,
//!   which commits the open transaction synchronously before partitions are let go (see
//!   [`crate::rebalance`]). When the stream is idle it commits positions that moved past
//!   transaction markers.
//! * The **loop** takes batches from the buffer, has them processed on the async runtime (one
//!   task per partition, so partitions proceed in parallel while each stays in order),
//!   produces their outputs into the transaction, and commits.
//!
//! Why not one thread: copying records out of librdkafka took a third of the loop's time, with
//! nothing else running meanwhile (docs/benchmarks.md).
//!
//! # The state, and the three rules that keep it exactly-once
//!
//! [`LoopState`] (the producers, the open transaction) sits behind a mutex shared by the loop
//! and the rebalance callback; the buffer sits behind a lock of its own, so that polling never
//! waits for a commit. Lock order: the state's, then the buffer's.
//!
//! 1. **A transaction is committed only between batches.** From the moment the loop takes
//!    records out of the buffer until they are produced into the transaction (or put back, or
//!    the step that failed on them is recovered from), they are *in flight*, and the rebalance
//!    callback waits ([`Shared::between_batches`]). Otherwise it could commit a transaction
//!    without records already taken — their offsets skipped — or with part of a failed
//!    record's outputs. A failure keeps the loop in flight too, until it has recovered from it
//!    ([`recovering`]): the callback must not commit or abort on a producer that may be dead.
//! 2. **No record from before a rewind survives it.** An abort empties the buffer and
//!    schedules each partition's seek back under one hold of the buffer's lock; until the
//!    poller has applied the seek, records of that partition that arrive were fetched before
//!    it, and are dropped on arrival.
//! 3. **A committed position never skips a record in the poller's hands.** A commit may send a
//!    partition's consumer position (past transaction markers) instead of its next offset only
//!    when nothing of it is buffered or taken — and only when no poll was in progress as the
//!    positions were read, since a poll moves the position before its record is buffered.
//!
//! The processor's hooks run one at a time, between batches: the rebalance hooks on the poller
//! under the state's lock, once nothing is in flight; `on_transaction_aborted` on the loop,
//! under the same lock.
//!
//! # One transaction
//!
//! 1. Records are polled into the buffer. A transaction begins when records are taken for
//!    processing; the first offset taken per partition is its **rewind point**.
//! 2. Each record is decoded and processed; outputs (and dead letters) are produced into the
//!    transaction in offset order per partition, and the partition's next offset is recorded.
//! 3. When the commit interval has passed, or `max_records_per_transaction` were taken, the
//!    next offsets of every partition touched are sent with the consumer's *current* group
//!    metadata, and the transaction commits.
//! 4. On an abortable failure the transaction is aborted, every touched (or buffered)
//!    partition is rewound to its rewind point — its last committed offset — and the records are
//!    processed again.
//!
//! Transactions alternate between the instance's two transactional producers (one per
//! transactional id, [`PipelineConfig::transactional_ids`]): after a commit or an abort the next
//! transaction begins on the other one, whose coordinator has long finished its last
//! transaction, instead of waiting ~20 ms for the markers of the one just ended (see
//! [`take_turns`]). Only one transaction is ever open, so nothing above changes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerGroupMetadata};
use tokio::runtime::Handle;

use crate::codec::Codec;
use crate::consumer::{Polled, Values};
use futures::FutureExt as _;

use crate::config::{DecodeFailure, PipelineConfig};
use crate::dead_letter::{self, DeadLetterKind};
use crate::error::{Error, ErrorClass};
use crate::processor::{Disposition, Output, OutputRecord, Processor, Record, TopicPartition};
use crate::producer::TxProducer;
use crate::rebalance::RebalanceContext;
use crate::shutdown::ShutdownHandle;

/// The longest the poller blocks in one poll, and the loop in one wait for records, so stops
/// and shutdown requests are seen promptly.
const MAX_POLL_WAIT: Duration = Duration::from_millis(100);
/// At most this many records are taken for processing at once.
const MAX_BATCH: usize = 2_000;
/// At most about this many bytes (keys and values, at the buffer's average record size) are
/// taken for processing at once.
///
/// Why: a batch's inputs and their outputs are alive until the batch is produced, and the
/// loop's buffer refills behind it meanwhile. With 1 KiB records a batch of [`MAX_BATCH`] held
/// ~2 MiB of inputs and more of outputs; at this bound (~500 such records) peak RSS was
/// 39–41 MiB against 44–48 in every repeat of a side-by-side run, at the same throughput
/// (docs/benchmarks.md). Its latency cost, measured in both orders against the
/// old bound at 20,000 records/s of 1 KiB: ~3 ms at p50 and ~9 ms at p99. Small records are
/// bounded by the count alone (2,000 records of 100 B with their keys are ~220 KiB).
const MAX_BATCH_BYTES: usize = 512 * 1024;
/// At most this many records of one partition are taken for processing at once.
const MAX_PER_PARTITION: usize = 500;
/// At most this many records are buffered in all (bounds memory whatever the partition count).
const MAX_BUFFERED: usize = 20_000;
/// At most this many bytes (keys and values) are buffered in all: with large records the count
/// alone would let the buffer hold hundreds of megabytes.
///
/// Why 4 MiB: the buffer need hold only the next batches and what one poll adds; librdkafka's
/// own queue (`queued.max.messages.kbytes`, 4 MiB by default here) is the prefetch that hides
/// the broker's latency. At 16 MiB, with 1 KiB records, the bytes were the binding bound and
/// the buffer could hold ~15,000 records behind librdkafka's queue, a second prefetch: 20 MiB
/// more peak RSS (79 against 58 MiB in the benchmark, side by side) and no more throughput.
/// Not 2 MiB (then one batch, [`MAX_BATCH`] records, of 1 KiB records): that took another ~4 MiB
/// off at the same throughput, but with 1 KiB records at 40,000–49,000 records/s its p99
/// latency was 1.2–4.1 s in five latency phases (three runs), against 0.7–1.1 s for the
/// 8 MiB queues and this 4 MiB buffer side by side (docs/benchmarks-journal.md) — single
/// phases at a saturating rate, the kind of evidence that did not hold up for the queues when
/// repeated, so measure again (repeated latency-only runs) before changing this either way.
/// At 100 B the record count is the bound (20,000 records are ~2.1 MiB).
const MAX_BUFFERED_BYTES: usize = 4 << 20;
/// A batch is processed in parallel (a task per partition) when the previous one took at least
/// this long; below it, handing work to other threads costs more than it saves.
const PARALLEL_ABOVE: Duration = Duration::from_millis(5);
/// How many times in a row (without a successful commit between) the producer may be
/// re-created after it became unusable, before the instance gives up and stops.
const MAX_PRODUCER_RECOVERIES: u32 = 3;

type Key = (String, i32);

/// Polled, not yet processed records, per partition in offset order.
///
/// Batches are taken round-robin over partitions, a bounded number from each, so one
/// partition's large fetch cannot starve the others or serialise the processing that could run
/// in parallel across partitions.
#[derive(Default)]
pub(crate) struct Buffer {
    partitions: BTreeMap<Key, Queue>,
    len: usize,
    /// Key and value bytes of the buffered records.
    bytes: usize,
    /// The instance reads one topic, so a record's partition alone finds its queue.
    single_topic: bool,
    /// Partitions to seek back to these offsets (after an abort), not yet seeked by the poller.
    /// Records of theirs that arrive meanwhile were fetched from before the rewind, and are
    /// dropped.
    pub(crate) pending_seeks: BTreeMap<Key, i64>,
    /// The loop waits for records (see [`Intake::wait_for_records`]).
    loop_waiting: bool,
    /// The poller waits for room (see [`Intake::wait_for_room`]).
    poller_waiting: bool,
}

/// One partition's buffered records, the topic name they share and the blocks their values
/// are copied into.
struct Queue {
    topic: Arc<str>,
    records: VecDeque<Polled>,
    values: Values,
}

impl Queue {
    fn new(topic: &str) -> Self {
        Self {
            topic: Arc::from(topic),
            records: VecDeque::new(),
            values: Values::default(),
        }
    }
}

impl Buffer {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether another record may be buffered: below both [`MAX_BUFFERED`] and
    /// [`MAX_BUFFERED_BYTES`].
    fn has_room(&self) -> bool {
        self.len < MAX_BUFFERED && self.bytes < MAX_BUFFERED_BYTES
    }

    /// Whether `m`'s partition waits for a seek back: then `m` was fetched before the rewind.
    /// (The partition is compared first: `topic()` measures the name on every call.)
    fn is_stale<M: rdkafka::Message>(&self, m: &M) -> bool {
        self.pending_seeks
            .keys()
            .any(|k| k.1 == m.partition() && k.0 == m.topic())
    }

    /// Drops the buffered records of `seeks`' partitions and schedules the seeks; where one is
    /// already scheduled for a partition, the lower offset wins.
    fn schedule_seeks(&mut self, seeks: &BTreeMap<Key, i64>) {
        self.drop_partitions(|k| seeks.contains_key(k));
        for (k, o) in seeks {
            let e = self.pending_seeks.entry(k.clone()).or_insert(*o);
            *e = (*e).min(*o);
        }
    }

    fn partition_len(&self, key: &Key) -> usize {
        self.partitions.get(key).map_or(0, |q| q.records.len())
    }

    /// Appends a copy of a polled record.
    ///
    /// No partition is ever paused for holding too many: the poller stops polling when the
    /// buffer is full, and librdkafka bounds what it prefetches over the whole consumer queue
    /// (`queued.min.messages` and `queued.max.messages.kbytes` count the queue every partition
    /// forwards to), so a partition with a backlog cannot hold the others' fetches back by
    /// more than those bounds, and batches are taken round-robin (see [`Buffer::take`]).
    /// Pausing would cost more than it gives: librdkafka discards a paused partition's
    /// prefetched records and the broker must serve them again — in the benchmark, 40 pauses
    /// per million records while the input had a backlog, and at 100 B ~0.6 µs of broker and
    /// of worker CPU per record each.
    fn push<M: rdkafka::Message>(&mut self, m: &M) {
        // Found by a scan (an instance owns few partitions) rather than by building a
        // `(String, i32)` key: this runs for every record polled. With one input topic the
        // topic is not compared: rdkafka's `topic()` measures and UTF-8-checks the name on
        // every call (~2 % of the worker thread in `perf`).
        let single_topic = self.single_topic;
        let partition = m.partition();
        let found = self
            .partitions
            .iter_mut()
            .find(|(k, _)| k.1 == partition && (single_topic || k.0 == m.topic()))
            .map(|(_, q)| q);
        let q = match found {
            Some(q) => q,
            None => self
                .partitions
                .entry((m.topic().to_owned(), m.partition()))
                .or_insert_with(|| Queue::new(m.topic())),
        };
        let record = Polled::copy_of(m, Arc::clone(&q.topic), &mut q.values);
        self.len += 1;
        self.bytes += record.size();
        q.records.push_back(record);
    }

    /// Returns a run of one partition's records, taken but not committed, to the front of its
    /// queue, in order — as if they had never been taken.
    fn put_back(&mut self, records: &mut Vec<Polled>) {
        let Some(first) = records.first() else {
            return;
        };
        let q = self
            .partitions
            .entry((first.topic().to_owned(), first.partition()))
            .or_insert_with(|| Queue::new(first.topic()));
        self.len += records.len();
        self.bytes += records.iter().map(Polled::size).sum::<usize>();
        for r in records.drain(..).rev() {
            q.records.push_front(r);
        }
    }

    /// Drops the records of the partitions `drop` says yes to.
    pub(crate) fn drop_partitions(&mut self, mut drop: impl FnMut(&Key) -> bool) {
        self.partitions.retain(|k, q| {
            let remove = drop(k);
            if remove {
                self.len -= q.records.len();
                self.bytes -= q.records.iter().map(Polled::size).sum::<usize>();
            }
            !remove
        });
    }

    /// The first buffered offset of every partition, emptying the buffer.
    fn drain_first_offsets(&mut self) -> BTreeMap<Key, i64> {
        self.len = 0;
        self.bytes = 0;
        std::mem::take(&mut self.partitions)
            .into_iter()
            .filter_map(|(k, q)| q.records.front().map(|m| (k, m.offset)))
            .collect()
    }

    /// Up to `max` records, at most `per_partition` from each partition, in order per partition.
    /// Each partition's run goes into a vector from `spare`.
    fn take(
        &mut self,
        max: usize,
        per_partition: usize,
        spare: &mut Spare,
    ) -> BTreeMap<Key, Vec<Polled>> {
        let mut taken = BTreeMap::new();
        let mut left = max;
        let busy = self
            .partitions
            .values()
            .filter(|q| !q.records.is_empty())
            .count();
        let share = per_partition.min(max.div_ceil(busy.max(1))).max(1);
        for (k, q) in &mut self.partitions {
            if left == 0 {
                break;
            }
            let n = q.records.len().min(share).min(left);
            if n > 0 {
                let mut records = spare.records();
                // Exactly: amortized growth (doubling) would push a reused vector past
                // `MAX_SPARE_CAPACITY` and get it freed rather than kept.
                records.reserve_exact(n);
                records.extend(q.records.drain(..n));
                left -= n;
                self.len -= n;
                self.bytes -= records.iter().map(Polled::size).sum::<usize>();
                taken.insert(k.clone(), records);
                if q.records.is_empty() {
                    q.values.release();
                }
            }
        }
        // Drained queues stay (until their partition is revoked): they keep their capacity,
        // where re-creating them made every batch grow them again from nothing.
        taken
    }
}

/// What the poller thread hands to the loop: the buffer, behind a lock of its own, and how the
/// two wake each other.
///
/// Why a lock apart from [`LoopState`]'s: the loop holds that one for as long as it produces a
/// batch or commits (~15 ms per commit in the benchmark). Polling records into the buffer under
/// it would stall the poller for all of that, which is the very time polling should overlap.
/// The buffer's lock is only ever held for a push, a take or a drop. Lock order: the state's
/// lock, then the buffer's; never the other way round.
pub(crate) struct Intake {
    buffer: Mutex<Buffer>,
    /// Signalled when a record arrives while the loop waits for one.
    records_ready: Condvar,
    /// Signalled when the loop takes records while the poller waits for room.
    room_freed: Condvar,
    /// Polls that may have returned a record not yet in the buffer (see
    /// [`positions_past_markers`]).
    polls_in_progress: AtomicUsize,
    /// Tells the poller to stop.
    stop: AtomicBool,
}

impl Intake {
    fn new(single_topic: bool) -> Self {
        Self {
            buffer: Mutex::new(Buffer {
                single_topic,
                ..Buffer::default()
            }),
            records_ready: Condvar::new(),
            room_freed: Condvar::new(),
            polls_in_progress: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        }
    }

    pub(crate) fn buffer(&self) -> MutexGuard<'_, Buffer> {
        // The buffer is left consistent between statements; a panic elsewhere while holding
        // the lock ends the instance anyway.
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Buffers a polled record (or drops it, if it is from before a pending rewind). Wakes the
    /// loop, if it waits, only once a whole batch is buffered: otherwise the poller's
    /// [`drained`](Self::drained) does.
    ///
    /// Why not at the first record: the loop would take it as a batch of one, and the next
    /// record too. Woken per record, the loop processed, produced and locked per record, and
    /// used more CPU per record than the single-threaded loop (docs/benchmarks.md).
    ///
    /// Returns whether the poller may poll the next record straight away: the buffer has room
    /// for it and no seek waits (see [`poll_loop`]).
    fn push<M: rdkafka::Message>(&self, m: &M) -> bool {
        let mut b = self.buffer();
        if b.is_stale(m) {
            return false;
        }
        b.push(m);
        if b.len() >= MAX_BATCH {
            self.wake_loop(&mut b);
        }
        b.has_room() && b.pending_seeks.is_empty()
    }

    /// The poller found nothing more to poll: wakes the loop for what it buffered.
    fn drained(&self) {
        let mut b = self.buffer();
        if !b.is_empty() {
            self.wake_loop(&mut b);
        }
    }

    fn wake_loop(&self, b: &mut Buffer) {
        if b.loop_waiting {
            b.loop_waiting = false;
            self.records_ready.notify_one();
        }
    }

    /// Waits, at most `wait`, for the buffer to hold a record.
    fn wait_for_records(&self, wait: Duration) {
        let mut b = self.buffer();
        if !b.is_empty() || wait.is_zero() {
            return;
        }
        b.loop_waiting = true;
        let (mut b, _) = self
            .records_ready
            .wait_timeout(b, wait)
            .unwrap_or_else(PoisonError::into_inner);
        b.loop_waiting = false;
    }

    /// Whether the buffer has room for another record, waiting for it at most
    /// [`MAX_POLL_WAIT`].
    fn wait_for_room(&self) -> bool {
        let mut b = self.buffer();
        if b.has_room() {
            return true;
        }
        b.poller_waiting = true;
        let (mut b, _) = self
            .room_freed
            .wait_timeout(b, MAX_POLL_WAIT)
            .unwrap_or_else(PoisonError::into_inner);
        b.poller_waiting = false;
        b.has_room()
    }

    /// Wakes the poller if it waits for room.
    fn room_freed(&self, b: &mut Buffer) {
        if b.poller_waiting {
            b.poller_waiting = false;
            self.room_freed.notify_one();
        }
    }

    /// Tells the poller to stop, and wakes it if it waits for room.
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _b = self.buffer();
        self.room_freed.notify_one();
    }
}

/// The vectors a batch is carried in, kept from one batch to the next.
///
/// Why: a batch moves each partition's run of records, what processing decided for each and
/// their outputs through vectors of tens of kilobytes. Allocating and freeing them per batch
/// was the most expensive thing the allocator did on the worker thread: glibc's malloc
/// consolidates every freed small block (each record's key and value, each output) whenever a
/// block of 1 KiB or more is requested, so each new batch vector walked thousands of them
/// (`malloc_consolidate` and `unlink_chunk` in `perf`; see docs/benchmarks.md). Reused, they
/// are allocated once.
#[derive(Default)]
pub(crate) struct Spare {
    records: Vec<Vec<Polled>>,
    outcomes: Vec<Vec<Outcome>>,
    outputs: Vec<Vec<OutputRecord>>,
}

/// At most this many vectors of each kind are kept (a batch needs one of each per partition it
/// takes records from; a batch over more partitions allocates the rest, as before).
const MAX_SPARE: usize = 16;
/// A vector that grew past this many elements (a processor that fans one record out into many
/// outputs) is freed rather than kept. With [`MAX_SPARE`], what is kept stays around 2 MiB at
/// the most (the vectors; what they held is freed with the batch).
const MAX_SPARE_CAPACITY: usize = MAX_PER_PARTITION;

impl Spare {
    fn records(&mut self) -> Vec<Polled> {
        self.records.pop().unwrap_or_default()
    }

    fn outcomes(&mut self) -> Vec<Outcome> {
        self.outcomes.pop().unwrap_or_default()
    }

    fn outputs(&mut self) -> Vec<OutputRecord> {
        self.outputs.pop().unwrap_or_default()
    }

    /// Takes back one partition run's vectors, emptied.
    fn keep(&mut self, records: Vec<Polled>, outcomes: Vec<Outcome>, outputs: Vec<OutputRecord>) {
        fn put<T>(pool: &mut Vec<Vec<T>>, mut v: Vec<T>) {
            v.clear();
            if pool.len() < MAX_SPARE && v.capacity() <= MAX_SPARE_CAPACITY {
                pool.push(v);
            }
        }
        put(&mut self.records, records);
        put(&mut self.outcomes, outcomes);
        put(&mut self.outputs, outputs);
    }
}

/// Figures of one run of a pipeline, as counted by the worker. (Tests check exactly-once by
/// reading the output back, not by trusting these.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunSummary {
    /// Transactions committed.
    pub transactions_committed: u64,
    /// Transactions aborted (by onceflow, or by the broker after a timeout).
    pub transactions_aborted: u64,
    /// Input records whose processing was committed.
    pub records_committed: u64,
    /// Output records committed.
    pub outputs_committed: u64,
    /// Input records committed as dead letters.
    pub dead_letters_committed: u64,
    /// Rebalances (revocations) this instance went through.
    pub rebalances: u64,
    /// Times the producer was re-created because it became unusable (a transaction the broker
    /// timed out, a fatal transactional error other than fencing by a newer instance, a
    /// producer id the coordinator forgot).
    pub producer_recoveries: u64,
}

/// What the loop must do after a failed step.
#[derive(Debug)]
pub(crate) enum Step {
    /// Abort the open transaction, rewind, optionally back off, go on.
    Abort {
        reason: String,
        backoff: Option<Duration>,
    },
    /// Stop the instance (after a best-effort abort), unless it is a recoverable timeout.
    Stop(Error),
}

impl From<Error> for Step {
    fn from(e: Error) -> Self {
        match e.class() {
            ErrorClass::Abortable => Step::Abort {
                reason: e.to_string(),
                backoff: None,
            },
            // Retriable errors were already retried by the producer; what is left is final.
            ErrorClass::Retriable | ErrorClass::Fatal => Step::Stop(e),
        }
    }
}

pub(crate) struct OpenTxn {
    seq: u64,
    started: Instant,
    /// When it is due to commit (see [`commit_due`]).
    due: Instant,
    span: tracing::Span,
    /// Next offset to commit, per partition touched.
    next: BTreeMap<Key, i64>,
    /// First offset taken for processing, per partition: where to rewind on abort.
    rewind: BTreeMap<Key, i64>,
    records: usize,
    outputs: usize,
    dead_letters: usize,
}

struct Attempts {
    count: u32,
    last_error: String,
}

pub(crate) struct LoopState {
    /// The producer of the open transaction, or of the next one.
    pub(crate) producer: TxProducer,
    /// The other producer, with no transaction open: its last one ended before `producer`'s
    /// did. The two swap places after every commit or abort (see [`take_turns`]).
    idle: TxProducer,
    pub(crate) txn: Option<OpenTxn>,
    pub(crate) intake: Arc<Intake>,
    /// Records are taken out of the buffer and not yet produced into the open transaction (or
    /// put back, or the step that failed on them recovered from), or the loop has a failure
    /// to recover from (see [`recovering`]): the transaction must not be committed (or aborted
    /// by anyone but the loop), nor the partitions' hooks run, until the loop is done. The
    /// rebalance callback waits for this to clear (see [`Shared::between_batches`]).
    pub(crate) in_flight: bool,
    /// The rebalance callback waits for `in_flight` to clear.
    callback_waiting: bool,
    attempts: HashMap<(String, i32, i64), Attempts>,
    /// The offsets this instance last committed, per partition it owns.
    pub(crate) committed: BTreeMap<Key, i64>,
    /// Partitions with records taken for the next transaction while the open one commits
    /// (see `commit_processing_ahead`): not settled, however empty their buffer is.
    taken_ahead: BTreeSet<Key>,
    /// A failure the poller thread could not handle itself (in the rebalance callback it must
    /// not stop the instance from inside librdkafka); the loop handles it next.
    pub(crate) deferred: Option<Step>,
    pub(crate) summary: RunSummary,
    next_seq: u64,
    producer_recoveries_in_row: u32,
    /// When the most recent commit began: the next transaction is due one commit interval
    /// after it.
    last_commit_began: Option<Instant>,
    /// Moving average of the time one record of one partition takes to process, used to size
    /// batches so that one batch takes about half a commit interval.
    per_record: Option<Duration>,
    /// How long the last batch's processing took (chooses inline or parallel processing).
    last_batch: Duration,
    /// The vectors of the last batches, for the next.
    spare: Spare,
    /// Per transactional id, the partitions where an aborted transaction of it may have left
    /// records open that its abort marker never reached; its next transaction begins only once
    /// an abort marker has ended them (see `TxProducer::leftover_risk`).
    leftovers: BTreeMap<String, BTreeSet<(String, i32)>>,
}

impl LoopState {
    /// How many records of one partition to take per batch: as many as fit in half a commit
    /// interval at the observed processing speed, between 1 and [`MAX_PER_PARTITION`]. A slow
    /// processor thus still commits about every commit interval, and rebalances and shutdowns
    /// never wait long for a batch.
    fn per_partition_share(&self, commit_interval: Duration) -> usize {
        match self.per_record {
            Some(per) if !per.is_zero() => {
                let fit = (commit_interval / 2).as_nanos() / per.as_nanos();
                usize::try_from(fit)
                    .unwrap_or(MAX_PER_PARTITION)
                    .clamp(1, MAX_PER_PARTITION)
            }
            _ => MAX_PER_PARTITION,
        }
    }

    fn observe_batch(&mut self, elapsed: Duration, longest_partition_run: usize) {
        self.last_batch = elapsed;
        let Ok(n) = u32::try_from(longest_partition_run.max(1)) else {
            return;
        };
        let sample = elapsed / n;
        self.per_record = Some(match self.per_record {
            Some(avg) => (avg * 7 + sample * 3) / 10,
            None => sample,
        });
    }
}

/// When a transaction beginning `now` is due to commit: one commit interval after the previous
/// commit *began*, or at once if that is already past — not one interval after the transaction
/// begins.
///
/// Why: records that arrive while a commit runs wait for it to finish before they can be taken.
/// Timed from its own beginning, the next transaction would keep them a whole interval more, so
/// their latency would be the interval plus two commits. Timed from the previous commit's start,
/// commits start at most once per interval (as Kafka Streams times `commit.interval.ms`), and no
/// record waits more than the interval plus one commit. After an idle spell, the first records
/// are committed as soon as they are processed. An instance's first transaction gets a whole
/// interval. A transaction due at once (after a commit slower than the interval) still holds
/// the batch it began with — up to half an interval of processing per partition — so slow
/// commits do not shrink transactions to a record each.
fn commit_due(
    last_commit_began: Option<Instant>,
    now: Instant,
    commit_interval: Duration,
) -> Instant {
    match last_commit_began {
        Some(began) => (began + commit_interval).max(now),
        None => now + commit_interval,
    }
}

/// Everything the worker and the rebalance callback share.
pub(crate) struct Shared<P: Processor, C> {
    pub(crate) processor: Arc<P>,
    pub(crate) codec: Arc<C>,
    pub(crate) config: PipelineConfig,
    pub(crate) runtime: Handle,
    pub(crate) shutdown: ShutdownHandle,
    state: Mutex<LoopState>,
    /// Signalled when `in_flight` clears while the rebalance callback waits for it.
    settled: Condvar,
}

impl<P: Processor, C> Shared<P, C> {
    pub(crate) fn state(&self) -> MutexGuard<'_, LoopState> {
        // A panic while holding the lock would already have ended the worker thread; the
        // state is only read afterwards to report figures.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state, once the loop has no records in flight: the open transaction holds every
    /// record taken so far, produced, so it may be committed, and no processing runs, so the
    /// processor's hooks may. The loop cannot take more while the guard is held.
    pub(crate) fn between_batches(&self) -> MutexGuard<'_, LoopState> {
        let mut st = self.state();
        while st.in_flight {
            st.callback_waiting = true;
            st = self
                .settled
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        st.callback_waiting = false;
        st
    }
}

/// Marks the loop in flight from the moment it learns of a failure (a commit that failed, or a
/// step the poller handed over) until [`recover`] lands it.
///
/// Why: meanwhile a rebalance served on the poller must wait rather than commit or abort the
/// failed transaction itself — the producer may be dead, and only the loop's recovery knows
/// whether it is being replaced. The broker-bounce chaos test caught a revocation that, in the
/// moment between a `send_offsets_to_transaction` given up as hung and the loop's recovery,
/// aborted on the hung producer; the abort was refused for 30 s ("conflicting call in
/// progress") and its failure, handed to the loop, stopped the instance although the producer
/// was being replaced anyway.
fn recovering(st: &mut LoopState) {
    st.in_flight = true;
}

/// Marks the loop's records as landed (produced, put back, or recovered from), waking a
/// rebalance callback that waits for that.
fn land<P: Processor, C>(shared: &Shared<P, C>, st: &mut LoopState) {
    st.in_flight = false;
    if st.callback_waiting {
        st.callback_waiting = false;
        shared.settled.notify_all();
    }
}

pub(crate) type PipelineConsumer<P, C> = BaseConsumer<RebalanceContext<P, C>>;

/// Runs the pipeline on the current (dedicated, blocking) thread until shutdown or a fatal
/// error.
pub(crate) fn run_worker<P, C>(
    processor: Arc<P>,
    codec: Arc<C>,
    config: PipelineConfig,
    runtime: Handle,
    shutdown: ShutdownHandle,
) -> Result<RunSummary, Error>
where
    P: Processor,
    C: Codec<P::Input>,
{
    // The producers first: init_transactions fences any older producer with either of our
    // transactional ids (a zombie of this instance) before we read a single record.
    let [first, second] = config.transactional_ids();
    let producer = TxProducer::create_and_init(&config, &first)?;
    let idle = TxProducer::create_and_init(&config, &second)?;
    // Topic names are validated (no patterns), so one name means one topic.
    let single_topic = config.input_topics.len() == 1;
    let shared = Arc::new(Shared {
        processor,
        codec,
        config,
        runtime,
        shutdown,
        settled: Condvar::new(),
        state: Mutex::new(LoopState {
            producer,
            idle,
            txn: None,
            intake: Arc::new(Intake::new(single_topic)),
            in_flight: false,
            callback_waiting: false,
            attempts: HashMap::new(),
            committed: BTreeMap::new(),
            taken_ahead: BTreeSet::new(),
            deferred: None,
            summary: RunSummary::default(),
            next_seq: 0,
            producer_recoveries_in_row: 0,
            last_commit_began: None,
            per_record: None,
            last_batch: Duration::ZERO,
            spare: Spare::default(),
            leftovers: BTreeMap::new(),
        }),
    });
    let consumer: PipelineConsumer<P, C> =
        crate::consumer::create(&shared.config, RebalanceContext::new(Arc::clone(&shared)))?;
    // A missing input topic is a mistake to report, not to wait out: subscribed to it, the
    // consumer would sit idle for ever, warning at every poll (Kafka Streams stops at start-up
    // too).
    check_input_topics(&shared.config, &consumer)?;
    let topics: Vec<&str> = shared
        .config
        .input_topics
        .iter()
        .map(String::as_str)
        .collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| Error::kafka("subscribing to the input topics", e))?;
    tracing::info!(
        application_id = %shared.config.application_id,
        transactional_ids = ?shared.config.transactional_ids(),
        topics = ?shared.config.input_topics,
        "pipeline started"
    );

    // An open transaction is aborted in there when the loop fails.
    let result = main_loop(&shared, &consumer);

    // Leaving the group runs the revoke callback (nothing is open any more) and hands the
    // partitions to the other instances at once.
    leave_group(&consumer);
    drop(consumer);
    shared.runtime.block_on(shared.processor.on_close());
    let summary = shared.state().summary.clone();
    match &result {
        Ok(()) => tracing::info!(?summary, "pipeline stopped"),
        Err(e) if e.is_fenced() => tracing::error!(error = %e, "pipeline fenced"),
        Err(e) => tracing::error!(error = %e, "pipeline stopped on an error"),
    }
    result.map(|()| summary)
}

/// How long a stopping instance serves rebalance events while it leaves its group.
const LEAVE_GROUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Unsubscribes and serves rebalance events until the consumer holds no partitions, before it
/// is closed.
///
/// Why not leave it to the close: librdkafka can hang for ever in the close when a rebalance
/// (an assignment) is under way as it closes — the rebalance callback's `assign` waits for a
/// reply that never comes (librdkafka issue #4884, open). It hung instances that stopped while
/// others were joining the group. Leaving first, while `poll` still serves the callbacks, means
/// the close has nothing left to rebalance. Records polled meanwhile are dropped: every
/// transaction is over by now, and the partitions' next owners read them again from the
/// committed offsets.
fn leave_group<Ctx: rdkafka::consumer::ConsumerContext>(consumer: &BaseConsumer<Ctx>) {
    consumer.unsubscribe();
    let deadline = Instant::now() + LEAVE_GROUP_TIMEOUT;
    while Instant::now() < deadline {
        let holds_partitions = consumer
            .assignment()
            .map(|a| a.count() > 0)
            .unwrap_or(false);
        if !holds_partitions {
            return;
        }
        // Only serves callbacks and drops records; see above.
        let _ = consumer.poll(Duration::from_millis(50));
    }
    tracing::warn!(
        timeout = ?LEAVE_GROUP_TIMEOUT,
        "the consumer still held partitions after unsubscribing; closing it anyway"
    );
}

/// Runs the poller thread beside the transaction loop until the loop ends, then stops it.
///
/// Why two threads: copying records out of librdkafka took a third of the loop's time, and
/// nothing else could run meanwhile; with one thread, neither onceflow nor a plain
/// at-least-once loop used the machine's two cores (docs/benchmarks.md). The poller polls, and
/// copies each record into the buffer, while the loop processes, produces and commits.
fn main_loop<P, C>(
    shared: &Arc<Shared<P, C>>,
    consumer: &PipelineConsumer<P, C>,
) -> Result<(), Error>
where
    P: Processor,
    C: Codec<P::Input>,
{
    let intake = Arc::clone(&shared.state().intake);
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("onceflow-poller".into())
            .spawn_scoped(scope, || poll_loop(shared, consumer, &intake))
            .map_err(|e| Error::Worker(format!("cannot start the poller thread: {e}")))?;
        let mut poller = Poller {
            intake: &intake,
            handle: Some(handle),
        };
        let result = transaction_loop(shared, consumer, &mut poller);
        {
            let mut st = shared.state();
            if result.is_err() && st.txn.is_some() {
                // Best effort: an abort that fails leaves the transaction to the broker's
                // timeout, or to the next instance's init_transactions. Either way it never
                // commits — and it is gone before a rebalance callback could commit it.
                if let Err(e) = abort_open(&mut st, "the pipeline is stopping on an error") {
                    tracing::debug!(error = %e, "abort while stopping failed");
                }
            }
            // Only this process knows of them: the next instance with these ids would commit
            // them with its first commit into those partitions (see `LoopState::leftovers`).
            // Ended here where their partitions have a leader (after any abort there are
            // some, see `TxProducer::leftover_risk`); only the rest are left to an operator. Not
            // on a forced stop, which must not wait for the cluster.
            if !shared.shutdown.is_forced() {
                end_leftovers_before_stopping(&mut st);
            }
            for (transactional_id, partitions) in &st.leftovers {
                tracing::error!(
                    transactional_id,
                    ?partitions,
                    "stopping with records of an aborted transaction that may still be open in \
                     these partitions (their abort marker was skipped by the broker while they \
                     had no leader); before this instance id runs again, find and abort them \
                     with `kafka-transactions.sh find-hanging` and `abort`"
                );
            }
            // A rebalance callback waiting for the loop must be let go for the poller to stop.
            land(shared, &mut st);
        }
        let stopped = poller.stop();
        result.and(stopped)
    })
}

/// The running poller thread, stopped (and waited for) once.
struct Poller<'scope, 'a> {
    intake: &'a Intake,
    handle: Option<std::thread::ScopedJoinHandle<'scope, ()>>,
}

impl Poller<'_, '_> {
    fn stop(&mut self) -> Result<(), Error> {
        let Some(handle) = self.handle.take() else {
            return Ok(());
        };
        self.intake.stop();
        handle
            .join()
            .map_err(|_| Error::Worker("the poller thread panicked".into()))
    }
}

fn transaction_loop<P, C>(
    shared: &Arc<Shared<P, C>>,
    consumer: &PipelineConsumer<P, C>,
    poller: &mut Poller<'_, '_>,
) -> Result<(), Error>
where
    P: Processor,
    C: Codec<P::Input>,
{
    let intake = poller.intake;
    loop {
        if shared.shutdown.is_forced() {
            let mut st = shared.state();
            if st.txn.is_some() {
                let _ = abort_open(&mut st, "forced shutdown");
            }
            return Err(Error::Interrupted);
        }
        if shared.shutdown.is_shutdown_requested() {
            // The poller first: with nothing polled behind its back, the last commit may send
            // the consumer's positions (past trailing transaction markers).
            poller.stop()?;
            let step = {
                let mut st = shared.state();
                commit_open(&mut st, consumer)
            };
            match step {
                Ok(()) => return Ok(()),
                Err(step) => {
                    // The last transaction could not commit; abort it so the next owner
                    // starts from the last committed offsets, then stop.
                    recover(shared, consumer, step)?;
                    return Ok(());
                }
            }
        }

        // With nothing buffered, wait for records, at most until the open transaction is due.
        let wait = match &shared.state().txn {
            Some(t) => t
                .due
                .saturating_duration_since(Instant::now())
                .min(MAX_POLL_WAIT),
            None => MAX_POLL_WAIT,
        };
        intake.wait_for_records(wait);

        let deferred = {
            let mut st = shared.state();
            let step = st.deferred.take();
            if step.is_some() {
                recovering(&mut st);
            }
            step
        };
        if let Some(step) = deferred {
            recover(shared, consumer, step)?;
        }

        if let Err(step) = process_buffered(shared) {
            recover(shared, consumer, step)?;
            continue;
        }
        let due = {
            let st = shared.state();
            st.txn.as_ref().is_some_and(|t| {
                Instant::now() >= t.due || t.records >= shared.config.max_records_per_transaction
            })
        };
        if due && let Err(step) = commit_processing_ahead(shared, consumer) {
            recover(shared, consumer, step)?;
        }
    }
}

/// The poller thread: applies pending seeks, polls records into the buffer one at a time, and
/// serves librdkafka's callbacks — the rebalance callback among them — inside `poll`. When the
/// stream is idle it also commits positions that moved past transaction markers.
fn poll_loop<P, C>(shared: &Arc<Shared<P, C>>, consumer: &PipelineConsumer<P, C>, intake: &Intake)
where
    P: Processor,
    C: Codec<P::Input>,
{
    let mut wait = Duration::ZERO;
    let mut last_marker_check = Instant::now();
    // Whether to look for pending seeks and room before the next poll. While records stream
    // in, the push of the last one already looked, under the lock it took anyway: a record
    // then costs one lock of the buffer, not three (the buffer's lock is the one the loop takes
    // for every batch). A seek the loop schedules meanwhile is applied one poll later, and the
    // record that poll returns is dropped on arrival if it is stale, as it would be anyway.
    let mut look = true;
    while !intake.stop.load(Ordering::SeqCst) {
        if look {
            if let Err(e) = apply_pending_seeks(intake, consumer) {
                defer(shared, Step::Stop(e));
            }
            if !intake.wait_for_room() {
                continue;
            }
        }
        // Counted from before the poll: a record it returns moves the consumer's position
        // before it is in the buffer.
        intake.polls_in_progress.fetch_add(1, Ordering::SeqCst);
        let got = match consumer.poll(wait) {
            Some(Ok(message)) => {
                // One record at a time: a revocation served inside the next `poll` must find
                // every earlier record in the buffer to drop it.
                look = !intake.push(&message);
                true
            }
            Some(Err(e)) => {
                match crate::error::permission_refused(
                    "consuming the input topics",
                    crate::error::Side::Input,
                    e,
                ) {
                    Ok(refused) => defer(shared, Step::Stop(refused)),
                    Err(e) => {
                        if let Some(missing) = input_topic_gone(&shared.config, consumer, &e) {
                            defer(shared, Step::Stop(missing));
                        } else {
                            tracing::warn!(error = %e, "consumer error");
                        }
                    }
                }
                false
            }
            None => false,
        };
        intake.polls_in_progress.fetch_sub(1, Ordering::SeqCst);
        // Drain what is fetched without waiting; once it is drained, wake the loop and wait for
        // more (a poll returns as soon as a record arrives).
        if got {
            wait = Duration::ZERO;
            continue;
        }
        look = true;
        wait = MAX_POLL_WAIT;
        intake.drained();
        if last_marker_check.elapsed() >= shared.config.commit_interval {
            last_marker_check = Instant::now();
            let mut st = shared.state();
            if !st.in_flight
                && st.deferred.is_none()
                && let Err(step) = commit_marker_positions(&mut st, consumer)
            {
                st.deferred = Some(step);
            }
        }
    }
}

/// Asks the cluster's metadata whether every input topic exists and may be read:
/// [`Error::MissingTopic`] or [`Error::Refused`] for the first that does not or may not (or
/// [`Error::Unreachable`]). Skipped when the consumer may have the broker create a missing
/// topic (`allow.auto.create.topics=true`): then the subscription waits for it.
///
/// At start-up (see [`run_worker`]) and when a consumer error says an input topic is gone (see
/// [`input_topic_gone`]); on the worker and the poller thread, never on the async executor.
fn check_input_topics<Ctx: rdkafka::consumer::ConsumerContext>(
    config: &PipelineConfig,
    consumer: &BaseConsumer<Ctx>,
) -> Result<(), Error> {
    if config.allows_auto_created_topics() {
        return Ok(());
    }
    for topic in &config.input_topics {
        crate::offsets::partitions(
            consumer.client(),
            &config.bootstrap_servers,
            topic,
            crate::error::Side::Input,
        )?;
    }
    Ok(())
}

/// The [`Error::MissingTopic`] to stop with when consumer error `e` says an input topic is gone
/// (deleted while the pipeline runs) and the cluster's metadata, asked again, agrees.
///
/// Why stop: the group then has no partition of the topic to assign, so the pipeline would sit
/// idle for ever, as it would have at start-up (see [`run_worker`]); Kafka Streams stops on a
/// missing source topic too. Why ask again: one answer from a broker whose metadata lags (a
/// topic just created, a controller change) must not stop a pipeline whose topic is there; any
/// other answer of the check (unreachable, refused) is left to the consumer's own errors.
fn input_topic_gone<Ctx: rdkafka::consumer::ConsumerContext>(
    config: &PipelineConfig,
    consumer: &BaseConsumer<Ctx>,
    e: &rdkafka::error::KafkaError,
) -> Option<Error> {
    if !crate::error::names_a_missing_topic(e) {
        return None;
    }
    match check_input_topics(config, consumer) {
        Err(missing @ Error::MissingTopic { .. }) => Some(missing),
        _ => None,
    }
}

/// Hands a failure to the loop, unless one is already waiting there.
fn defer<P: Processor, C>(shared: &Shared<P, C>, step: Step) {
    let mut st = shared.state();
    if st.deferred.is_none() {
        st.deferred = Some(step);
    }
}

/// Seeks partitions whose records must be processed again (after an abort). Their buffered
/// records were dropped when the seek was scheduled, and records of theirs polled until now
/// were dropped on arrival (see [`Buffer::is_stale`]): those came from before the rewind. Runs
/// on the poller thread between polls, so no record is polled while a seek is under way.
fn apply_pending_seeks<Ctx: rdkafka::consumer::ConsumerContext>(
    intake: &Intake,
    consumer: &BaseConsumer<Ctx>,
) -> Result<(), Error> {
    let seeks = {
        let b = intake.buffer();
        if b.pending_seeks.is_empty() {
            return Ok(());
        }
        b.pending_seeks.clone()
    };
    let assigned = assigned_set(consumer);
    for ((topic, partition), offset) in &seeks {
        if !assigned.contains(&(topic.clone(), *partition)) {
            // Revoked meanwhile: its next owner starts from the committed offset anyway.
            continue;
        }
        consumer
            .seek(
                topic,
                *partition,
                rdkafka::Offset::Offset(*offset),
                Duration::from_secs(10),
            )
            .map_err(|e| Error::kafka("seeking back to the last committed offset", e))?;
        tracing::debug!(
            topic,
            partition,
            offset,
            "rewound to the last committed offset"
        );
    }
    let mut b = intake.buffer();
    for (key, offset) in seeks {
        // Unless the loop rewound the partition again (lower) meanwhile: then seek again.
        if b.pending_seeks.get(&key) == Some(&offset) {
            b.pending_seeks.remove(&key);
        }
    }
    Ok(())
}

fn assigned_set<Ctx: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<Ctx>,
) -> BTreeSet<Key> {
    consumer
        .assignment()
        .map(|tpl| {
            tpl.elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect()
        })
        .unwrap_or_default()
}

/// Each partition of `tpl` with its offset, `None` where it is not an offset (unset, or a
/// logical one such as the end).
fn offsets_of(tpl: &rdkafka::TopicPartitionList) -> Vec<(Key, Option<i64>)> {
    tpl.elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                rdkafka::Offset::Offset(o) => Some(o),
                _ => None,
            };
            ((e.topic().to_owned(), e.partition()), offset)
        })
        .collect()
}

/// One partition's records, what processing decided for each (shorter than the records when
/// processing stopped at a retry or a fatal error), and all their outputs in order.
type Processed = (Vec<Polled>, Vec<Outcome>, Vec<OutputRecord>);

/// What processing decided for one record.
enum Outcome {
    /// Produce the next this-many records of the run's outputs.
    Emit(usize),
    DeadLetter {
        kind: DeadLetterKind,
        reason: String,
        attempts: u32,
    },
    Retry(String),
    Fatal(crate::error::BoxError),
}

/// Commits the open transaction while the next batch is processed on the runtime's threads,
/// then opens the next transaction and produces that batch into it.
///
/// Why: a commit blocks this thread for broker round trips — sending the offsets, waiting for
/// every output's acknowledgement, EndTxn — about 15 % of the time in the benchmark. Nothing
/// can be *produced* meanwhile (the transactional producer belongs to the committing
/// transaction until the commit returns), but the next batch can be *processed*: its outputs
/// are held and produced once the next transaction has begun, so exactly-once is untouched —
/// those outputs and their offsets still commit together, in the next transaction.
///
/// While the commit runs, the batch's partitions count as holding unprocessed records (the
/// commit must not send their consumer position, which is past the batch, as the offset to
/// resume from). If the commit or the next `begin` fails, the batch's records go back to the
/// front of the buffer, untouched, as if never taken: the recovery that follows (abort and
/// rewind, a new producer, or a stop) treats them like any buffered record. The batch is in
/// flight from the moment it is taken until it is produced (or put back and recovered from), so
/// a rebalance served on the poller thread meanwhile waits for it before it commits.
fn commit_processing_ahead<P, C>(
    shared: &Arc<Shared<P, C>>,
    consumer: &PipelineConsumer<P, C>,
) -> Result<(), Step>
where
    P: Processor,
    C: Codec<P::Input>,
{
    let config = &shared.config;
    let ahead = {
        let mut st = shared.state();
        if st.deferred.is_some() {
            // The poller failed on this transaction (in a rebalance); the loop handles that
            // first.
            return Ok(());
        }
        // Records of the committing transaction do not count against the next one's limit.
        let n = batch_size(&st.intake.buffer(), config.max_records_per_transaction, 0);
        (n > 0).then(|| {
            let batch = take_batch(&mut st, n, config.commit_interval);
            st.in_flight = true;
            // Their partitions' positions are past records the committing transaction does
            // not hold: committing a position instead of its next offset would skip them.
            for (records, _, _) in &batch.groups {
                if let Some(first) = records.first() {
                    st.taken_ahead
                        .insert((first.topic().to_owned(), first.partition()));
                }
            }
            shared.runtime.spawn(process_groups(shared, batch))
        })
    };
    let committed = {
        let mut st = shared.state();
        let committed = commit_open(&mut st, consumer);
        st.taken_ahead.clear();
        if committed.is_err() {
            recovering(&mut st);
        }
        committed
    };
    let Some(ahead) = ahead else {
        return committed;
    };
    // The batch is waited for whatever the commit's outcome: its processing may have effects.
    let results = match shared.runtime.block_on(ahead) {
        Ok(Ok(results)) => results,
        // Its records went with the panic: only stopping keeps them from being skipped.
        Ok(Err(panic)) => {
            return Err(Step::Stop(Error::Worker(format!(
                "the processor panicked: {panic}"
            ))));
        }
        Err(join) => {
            return Err(Step::Stop(Error::Worker(format!(
                "processing the next batch during a commit failed: {join}"
            ))));
        }
    };
    let begun = committed.and_then(|()| {
        let mut st = shared.state();
        let due = commit_due(st.last_commit_began, Instant::now(), config.commit_interval);
        begin_txn(&mut st, due)?;
        note_rewind_points(&mut st, &results);
        Ok(())
    });
    if let Err(step) = begun {
        let mut st = shared.state();
        let LoopState { intake, spare, .. } = &mut *st;
        let mut buffer = intake.buffer();
        for (mut records, outcomes, outputs) in results {
            // No rewind can be pending for these partitions: a partition waiting for its seek
            // has nothing buffered to take, and nothing else rewinds while they are in flight.
            buffer.put_back(&mut records);
            spare.keep(records, outcomes, outputs);
        }
        return Err(step);
    }
    produce_results(shared, results)
}

/// Takes buffered records, processes them (partitions in parallel, each in order), and
/// produces their results into the open transaction.
fn process_buffered<P, C>(shared: &Arc<Shared<P, C>>) -> Result<(), Step>
where
    P: Processor,
    C: Codec<P::Input>,
{
    let config = &shared.config;
    // Take a batch and open the transaction.
    let batch = {
        let mut st = shared.state();
        if st.deferred.is_some() {
            // The poller failed on this transaction (in a rebalance); the loop handles that
            // first.
            return Ok(());
        }
        let taken = st.txn.as_ref().map_or(0, |t| t.records);
        let n = batch_size(
            &st.intake.buffer(),
            config.max_records_per_transaction,
            taken,
        );
        if n == 0 {
            return Ok(());
        }
        if st.txn.is_none() {
            let due = commit_due(st.last_commit_began, Instant::now(), config.commit_interval);
            begin_txn(&mut st, due)?;
        }
        let batch = take_batch(&mut st, n, config.commit_interval);
        st.in_flight = true;
        note_rewind_points(&mut st, &batch.groups);
        batch
    };
    let longest = batch.longest;
    let processing_started = Instant::now();
    let results = shared.runtime.block_on(process_groups(shared, batch));
    // A panicking processor is a bug in it; stopping (after an abort) is the only safe answer.
    let results =
        results.map_err(|e| Step::Stop(Error::Worker(format!("the processor panicked: {e}"))))?;
    shared
        .state()
        .observe_batch(processing_started.elapsed(), longest);
    produce_results(shared, results)
}

/// Records taken from the buffer for processing, one run per partition.
struct Batch {
    groups: Vec<Processed>,
    /// Earlier failed attempts of these records (for `ProcessError::retry`'s attempt count).
    prior: HashMap<(String, i32, i64), (u32, String)>,
    /// The longest partition run: what the batch's duration is divided by to estimate the
    /// processing time per record.
    longest: usize,
    /// Whether its runs are processed as parallel tasks: when there are several and the last
    /// batch took long enough for that to pay (see [`process_groups`]).
    parallel: bool,
}

/// How many buffered records the next batch takes: at most [`MAX_BATCH`], about
/// [`MAX_BATCH_BYTES`] at the buffer's average record size (at least one record), and no more
/// than the transaction (holding `taken` records already) may still hold.
fn batch_size(buffer: &Buffer, max_per_transaction: usize, taken: usize) -> usize {
    max_per_transaction
        .saturating_sub(taken)
        .min(MAX_BATCH)
        .min(records_in_batch_bytes(buffer.len(), buffer.bytes))
        .min(buffer.len())
}

/// How many of `len` buffered records holding `bytes` in all fit in [`MAX_BATCH_BYTES`] at
/// their average size; at least one, so a record larger than the bound is still taken.
fn records_in_batch_bytes(len: usize, bytes: usize) -> usize {
    if bytes == 0 {
        return len;
    }
    // In u128: the product of two `usize`s cannot overflow it.
    let fit = (MAX_BATCH_BYTES as u128 * len as u128) / bytes as u128;
    usize::try_from(fit).unwrap_or(usize::MAX).max(1)
}

/// Takes up to `n` buffered records, round-robin over partitions.
fn take_batch(st: &mut LoopState, n: usize, commit_interval: Duration) -> Batch {
    let share = st.per_partition_share(commit_interval);
    let LoopState {
        attempts,
        intake,
        spare,
        ..
    } = st;
    let taken = {
        let mut buffer = intake.buffer();
        let taken = buffer.take(n, share, spare);
        intake.room_freed(&mut buffer);
        taken
    };
    let mut prior: HashMap<(String, i32, i64), (u32, String)> = HashMap::new();
    if !attempts.is_empty() {
        for (key, records) in &taken {
            for m in records {
                let id = (key.0.clone(), key.1, m.offset());
                if let Some(a) = attempts.get(&id) {
                    prior.insert(id, (a.count, a.last_error.clone()));
                }
            }
        }
    }
    // Each run is processed with its own (spare) vectors for the outcomes and outputs.
    let groups: Vec<Processed> = taken
        .into_values()
        .map(|records| (records, spare.outcomes(), spare.outputs()))
        .collect();
    let longest = groups.iter().map(|g| g.0.len()).max().unwrap_or(0);
    let parallel = groups.len() > 1 && st.last_batch >= PARALLEL_ABOVE;
    Batch {
        groups,
        prior,
        longest,
        parallel,
    }
}

/// The first offset of each run is where its partition rewinds to if the open transaction is
/// aborted (unless an earlier batch of the transaction already set it).
fn note_rewind_points(st: &mut LoopState, groups: &[Processed]) {
    let Some(txn) = st.txn.as_mut() else {
        return;
    };
    for (records, _, _) in groups {
        if let Some(first) = records.first() {
            txn.rewind
                .entry((first.topic().to_owned(), first.partition()))
                .or_insert(first.offset());
        }
    }
}

/// Processes a batch: one run per partition, records of a partition strictly in order. Either
/// every run's records come back with their outcomes and outputs, or the message of a panic.
fn process_groups<P, C>(
    shared: &Arc<Shared<P, C>>,
    batch: Batch,
) -> impl Future<Output = Result<Vec<Processed>, String>> + Send + 'static
where
    P: Processor,
    C: Codec<P::Input>,
{
    let processor = Arc::clone(&shared.processor);
    let codec = Arc::clone(&shared.codec);
    let decode_failure = shared.config.decode_failure;
    let max_attempts = shared.config.max_attempts;
    let Batch {
        groups,
        prior,
        parallel,
        ..
    } = batch;
    let prior = Arc::new(prior);
    // Where the partitions' runs are processed: as tasks on the runtime's worker threads, in
    // parallel, when the last batch took long enough for that to pay; otherwise concurrently
    // on the thread that awaits this (a processor that awaits still overlaps its partitions'
    // waits). Handing a batch to other threads and waking this one again costs more than a
    // cheap processor's whole batch: measured with the benchmark's JSON transform, inline
    // processing raised throughput by ~10% and cut CPU per record.
    async move {
        if parallel {
            let handles: Vec<_> = groups
                .into_iter()
                .map(|(mut records, mut outcomes, mut emitted)| {
                    let processor = Arc::clone(&processor);
                    let codec = Arc::clone(&codec);
                    let prior = Arc::clone(&prior);
                    tokio::spawn(async move {
                        process_partition(
                            &*processor,
                            &*codec,
                            &mut records,
                            (&mut outcomes, &mut emitted),
                            &prior,
                            max_attempts,
                            decode_failure,
                        )
                        .await;
                        (records, outcomes, emitted)
                    })
                })
                .collect();
            let mut results = Vec::with_capacity(handles.len());
            for h in handles {
                results.push(h.await.map_err(|e| e.to_string())?);
            }
            Ok(results)
        } else {
            let runs = groups
                .into_iter()
                .map(|(mut records, mut outcomes, mut emitted)| {
                    let (prior, processor, codec) = (&prior, &*processor, &*codec);
                    std::panic::AssertUnwindSafe(async move {
                        process_partition(
                            processor,
                            codec,
                            &mut records,
                            (&mut outcomes, &mut emitted),
                            prior,
                            max_attempts,
                            decode_failure,
                        )
                        .await;
                        (records, outcomes, emitted)
                    })
                    .catch_unwind()
                });
            futures::future::join_all(runs)
                .await
                .into_iter()
                .map(|r| r.map_err(|p| panic_message(&*p)))
                .collect()
        }
    }
}

/// Produces a processed batch's outputs and dead letters into the open transaction, in offset
/// order per partition, and advances each partition's next offset.
fn produce_results<P, C>(shared: &Arc<Shared<P, C>>, results: Vec<Processed>) -> Result<(), Step>
where
    P: Processor,
    C: Codec<P::Input>,
{
    let config = &shared.config;
    let mut guard = shared.state();
    let LoopState {
        producer,
        txn,
        attempts,
        spare,
        ..
    } = &mut *guard;
    let Some(txn) = txn.as_mut() else {
        return Err(Step::Stop(Error::Worker(
            "the transaction disappeared while its records were processed".into(),
        )));
    };
    for (records, mut outcomes, mut outputs) in results {
        let mut emitted = outputs.drain(..);
        // The partition's next offset is recorded once per run of records, not per record
        // (building the key allocates); every early return below ends in an abort, which
        // discards it anyway.
        let mut next_offset = None;
        for (message, outcome) in records.iter().zip(outcomes.drain(..)) {
            match outcome {
                Outcome::Emit(count) => {
                    let source = config.stamp_source.then(|| {
                        format!(
                            "{}/{}/{}",
                            message.topic(),
                            message.partition(),
                            message.offset()
                        )
                    });
                    for output in emitted.by_ref().take(count) {
                        if let Err(rejected) = producer.send(
                            &output,
                            source.as_deref(),
                            message.timestamp().to_millis(),
                        ) {
                            // A permission is not the record's fault: stop, as the commit would.
                            let rejected = match crate::error::permission_refused(
                                "producing an output record",
                                crate::error::Side::Output,
                                rejected.0,
                            ) {
                                Ok(refused) => {
                                    crate::producer::log_refused_output_topic(
                                        &output.topic,
                                        &refused,
                                    );
                                    return Err(Step::Stop(refused));
                                }
                                Err(rejected) => rejected,
                            };
                            // Some of this record's outputs may already be in the transaction;
                            // only an abort takes them out again.
                            let reason = format!("an output record was rejected: {rejected}");
                            let count = note_attempt(attempts, message, &reason);
                            return Err(Step::Abort {
                                reason: format!("{}: {reason}", position(message)),
                                backoff: Some(backoff_for(config, count)),
                            });
                        }
                    }
                    next_offset = Some(message.offset() + 1);
                    txn.records += 1;
                    txn.outputs += count;
                }
                Outcome::DeadLetter {
                    kind,
                    reason,
                    attempts: tried,
                } => {
                    let Some(dlq) = &config.dead_letter_topic else {
                        return Err(Step::Stop(Error::NoDeadLetterTopic {
                            topic: message.topic().to_owned(),
                            partition: message.partition(),
                            offset: message.offset(),
                            reason,
                        }));
                    };
                    let letter = dead_letter::record(
                        dlq,
                        message,
                        kind,
                        &reason,
                        tried,
                        &config.instance_id,
                    );
                    if let Err(rejected) = producer.send(&letter, None, None) {
                        return Err(Step::Stop(
                            crate::error::permission_refused(
                                "dead-lettering a record",
                                crate::error::Side::Output,
                                rejected.0,
                            )
                            .unwrap_or_else(|e| Error::kafka("dead-lettering a record", e)),
                        ));
                    }
                    tracing::warn!(
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        kind = kind.as_str(),
                        reason,
                        dead_letter_topic = dlq,
                        "record dead-lettered"
                    );
                    next_offset = Some(message.offset() + 1);
                    txn.records += 1;
                    txn.dead_letters += 1;
                }
                Outcome::Retry(reason) => {
                    let count = note_attempt(attempts, message, &reason);
                    return Err(Step::Abort {
                        reason: format!(
                            "processing {} failed (attempt {count} of {}): {reason}",
                            position(message),
                            config.max_attempts
                        ),
                        backoff: Some(backoff_for(config, count)),
                    });
                }
                Outcome::Fatal(source) => {
                    return Err(Step::Stop(Error::Processor {
                        topic: message.topic().to_owned(),
                        partition: message.partition(),
                        offset: message.offset(),
                        source,
                    }));
                }
            }
        }
        drop(emitted);
        if let (Some(next), Some(first)) = (next_offset, records.first()) {
            txn.next
                .insert((first.topic().to_owned(), first.partition()), next);
        }
        spare.keep(records, outcomes, outputs);
    }
    // Every record of the batch is in the transaction now, with its offset.
    land(shared, &mut guard);
    Ok(())
}

/// The text of a panic's payload, if it is one.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned())
}

fn position(m: &Polled) -> String {
    format!("{}/{}@{}", m.topic(), m.partition(), m.offset())
}

/// Counts a failed attempt of `m`; returns the attempts so far.
fn note_attempt(
    attempts: &mut HashMap<(String, i32, i64), Attempts>,
    m: &Polled,
    reason: &str,
) -> u32 {
    let a = attempts
        .entry((m.topic().to_owned(), m.partition(), m.offset()))
        .or_insert(Attempts {
            count: 0,
            last_error: String::new(),
        });
    a.count += 1;
    reason.clone_into(&mut a.last_error);
    a.count
}

/// Exponential back-off: `retry_backoff * 2^(attempt-1)`, at most `max_retry_backoff`.
fn backoff_for(config: &PipelineConfig, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    config
        .retry_backoff
        .saturating_mul(factor)
        .min(config.max_retry_backoff)
}

/// Decodes and processes one partition's records in order. Stops at the first record that
/// must be retried or is fatal: the transaction will be aborted, and later records of the
/// partition must not be processed before it.
async fn process_partition<P, C>(
    processor: &P,
    codec: &C,
    records: &mut [Polled],
    (outcomes, emitted): (&mut Vec<Outcome>, &mut Vec<OutputRecord>),
    prior: &HashMap<(String, i32, i64), (u32, String)>,
    max_attempts: u32,
    decode_failure: DecodeFailure,
) where
    P: Processor,
    C: Codec<P::Input>,
{
    // `outcomes` and `emitted` come empty (reused from earlier batches). Every record's
    // outputs are moved into `emitted`, and the `Output` handed to the processor is reused: no
    // allocation per record for them.
    outcomes.reserve_exact(records.len());
    emitted.reserve_exact(records.len());
    let mut out = Output::default();
    for m in records.iter_mut() {
        // Records seen before (retried) are rare; skip the lookup, and the key it allocates,
        // when there are none.
        let tried = if prior.is_empty() {
            0
        } else {
            prior
                .get(&(m.topic().to_owned(), m.partition(), m.offset()))
                .map_or(0, |(count, _)| *count)
        };
        if tried >= max_attempts {
            let last = prior
                .get(&(m.topic().to_owned(), m.partition(), m.offset()))
                .map(|(_, e)| e.clone())
                .unwrap_or_default();
            outcomes.push(Outcome::DeadLetter {
                kind: DeadLetterKind::RetriesExhausted,
                reason: format!("gave up after {tried} attempts; last error: {last}"),
                attempts: tried,
            });
            continue;
        }
        let value = match codec.decode(m.payload()) {
            Ok(v) => v,
            Err(e) => match decode_failure {
                DecodeFailure::DeadLetter => {
                    outcomes.push(Outcome::DeadLetter {
                        kind: DeadLetterKind::Decode,
                        reason: e.to_string(),
                        attempts: tried + 1,
                    });
                    continue;
                }
                DecodeFailure::Fatal => {
                    outcomes.push(Outcome::Fatal(Box::new(e)));
                    break;
                }
            },
        };
        // The key and headers are lent to the `Record` and taken back after processing (a
        // dead letter or the lineage header may still need them), rather than copied per
        // record.
        let mut record = Record {
            value,
            key: m.key.take(),
            headers: std::mem::take(&mut m.headers),
            topic: Arc::clone(&m.topic),
            partition: m.partition,
            offset: m.offset,
            timestamp: m.timestamp.to_millis(),
        };
        out.records.clear();
        let result = processor.process(&record, &mut out).await;
        m.key = record.key.take();
        m.headers = std::mem::take(&mut record.headers);
        match result {
            Ok(()) => {
                outcomes.push(Outcome::Emit(out.records.len()));
                emitted.append(&mut out.records);
            }
            Err(e) => match e.disposition() {
                Disposition::DeadLetter => outcomes.push(Outcome::DeadLetter {
                    kind: DeadLetterKind::Processor,
                    reason: e.into_source().to_string(),
                    attempts: tried + 1,
                }),
                Disposition::Retry => {
                    outcomes.push(Outcome::Retry(e.into_source().to_string()));
                    break;
                }
                Disposition::Fatal => {
                    outcomes.push(Outcome::Fatal(e.into_source()));
                    break;
                }
            },
        }
    }
}

/// Begins a transaction that commits at `due` (or earlier, when full).
fn begin_txn(st: &mut LoopState, due: Instant) -> Result<(), Step> {
    end_leftovers(st)?;
    st.producer.begin().map_err(Step::from)?;
    let seq = st.next_seq;
    st.next_seq += 1;
    st.txn = Some(OpenTxn {
        seq,
        started: Instant::now(),
        due,
        span: tracing::info_span!(
            "transaction",
            seq,
            records = tracing::field::Empty,
            partitions = tracing::field::Empty,
            outcome = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        ),
        next: BTreeMap::new(),
        rewind: BTreeMap::new(),
        records: 0,
        outputs: 0,
        dead_letters: 0,
    });
    Ok(())
}

/// Before the current producer's next transaction: an abort marker into every partition where
/// an aborted transaction of its id may have left records open (see `LoopState::leftovers`).
/// While one of them has no leader, nothing begins: the step backs off and the loop asks again.
fn end_leftovers(st: &mut LoopState) -> Result<(), Step> {
    match end_leftovers_of(&st.producer, &mut st.leftovers) {
        Ok(true) => Ok(()),
        Ok(false) => {
            let id = st.producer.transactional_id();
            tracing::warn!(
                transactional_id = id,
                partitions = ?st.leftovers.get(id),
                "an aborted transaction may have left records in partitions without a leader; \
                 waiting for their leaders to end them with an abort marker before the next \
                 transaction"
            );
            Err(Step::Abort {
                reason: "waiting for output partitions to have a leader".into(),
                backoff: Some(LEFTOVER_BACKOFF),
            })
        }
        Err(e) => Err(Step::from(e)),
    }
}

/// Ends the leftovers of both producers that it can, once, as the instance stops (see
/// [`end_leftovers`]); what it cannot end stays in `st.leftovers`.
fn end_leftovers_before_stopping(st: &mut LoopState) {
    let LoopState {
        producer,
        idle,
        leftovers,
        ..
    } = st;
    for p in [&*producer, &*idle] {
        if let Err(e) = end_leftovers_of(p, leftovers) {
            tracing::debug!(error = %e, "ending leftovers while stopping failed");
        }
    }
}

/// Ends what `leftovers` holds for `producer`'s transactional id with abort markers of its own
/// ([`TxProducer::abort_leftovers`]), and forgets them once ended. `Ok(true)` when nothing is
/// left for the id; `Ok(false)` while one of its partitions has no leader.
fn end_leftovers_of(
    producer: &TxProducer,
    leftovers: &mut BTreeMap<String, BTreeSet<(String, i32)>>,
) -> Result<bool, Error> {
    let id = producer.transactional_id();
    let Some(partitions) = leftovers.get(id) else {
        return Ok(true);
    };
    let ended = producer.abort_leftovers(partitions)?;
    if ended {
        leftovers.remove(id);
    }
    Ok(ended)
}

/// How long the loop waits before asking again whether the partitions of
/// [`end_leftovers`] have a leader.
const LEFTOVER_BACKOFF: Duration = Duration::from_secs(2);

/// Partitions whose consumer position is past the offset this instance would commit for them,
/// with nothing unprocessed in between: everything below the position is processed or is an
/// invisible control record (a transaction marker) or an aborted record. Committing the position
/// instead of `last processed + 1` is what makes a caught-up group show lag 0 on a
/// transactional input, where every transaction ends in a marker (as Kafka Streams does).
fn positions_past_markers<Ctx: rdkafka::consumer::ConsumerContext>(
    st: &LoopState,
    consumer: &BaseConsumer<Ctx>,
    owned: &BTreeSet<Key>,
) -> Vec<(Key, i64)> {
    let Ok(positions) = consumer.position() else {
        return Vec::new();
    };
    // Read after the positions: a poll that began before them may have returned a record past
    // which they point and that is not buffered yet. Without a poll in progress, every record
    // below the positions is buffered, taken, or dropped with a rewind or a revocation.
    if st.intake.polls_in_progress.load(Ordering::SeqCst) > 0 {
        return Vec::new();
    }
    let buffer = st.intake.buffer();
    offsets_of(&positions)
        .into_iter()
        .filter_map(|(key, position)| {
            let position = position?;
            let ours = st
                .txn
                .as_ref()
                .and_then(|t| t.next.get(&key))
                .or_else(|| st.committed.get(&key))
                .copied()?;
            let settled = settled(&key, owned, &buffer, &st.taken_ahead);
            (settled && position > ours).then_some((key, position))
        })
        .collect()
}

/// Whether everything below a partition's consumer position is processed (or invisible): it is
/// owned, nothing of it is buffered or taken ahead for the next transaction, and no rewind is
/// pending.
fn settled(key: &Key, owned: &BTreeSet<Key>, buffer: &Buffer, taken_ahead: &BTreeSet<Key>) -> bool {
    owned.contains(key)
        && buffer.partition_len(key) == 0
        && !taken_ahead.contains(key)
        && !buffer.pending_seeks.contains_key(key)
}

/// When idle, commits positions that only moved past transaction markers, in an offsets-only
/// transaction, so the group's committed offsets reach the end of the input.
fn commit_marker_positions<Ctx: rdkafka::consumer::ConsumerContext>(
    st: &mut LoopState,
    consumer: &BaseConsumer<Ctx>,
) -> Result<(), Step> {
    if st.txn.is_some() || !st.intake.buffer().is_empty() || st.committed.is_empty() {
        return Ok(());
    }
    let owned = assigned_set(consumer);
    let ahead = positions_past_markers(st, consumer, &owned);
    if ahead.is_empty() {
        return Ok(());
    }
    // Committed at once, below.
    begin_txn(st, Instant::now())?;
    if let Some(txn) = st.txn.as_mut() {
        txn.next.extend(ahead);
    }
    commit_open(st, consumer)
}

/// Sends the open transaction's offsets (for partitions this instance still owns, with the
/// consumer's current group metadata) and commits.
pub(crate) fn commit_open<Ctx: rdkafka::consumer::ConsumerContext>(
    st: &mut LoopState,
    consumer: &BaseConsumer<Ctx>,
) -> Result<(), Step> {
    let Some(txn) = st.txn.as_ref() else {
        return Ok(());
    };
    let owned = assigned_set(consumer);
    if let Some((topic, partition)) = txn.next.keys().find(|k| !owned.contains(*k)) {
        return Err(Step::Abort {
            reason: format!(
                "{topic}/{partition} is no longer assigned to this instance, so its offsets \
                 must not be committed"
            ),
            backoff: None,
        });
    }
    let ahead = positions_past_markers(st, consumer, &owned);
    let Some(txn) = st.txn.as_mut() else {
        return Ok(());
    };
    for (key, position) in ahead {
        if txn.next.contains_key(&key) {
            txn.next.insert(key, position);
        }
    }
    tracing::debug!(
        seq = txn.seq,
        records = txn.records,
        partitions = txn.next.len(),
        "committing transaction"
    );
    // Both calls block for broker round trips, and the commit first waits until every output
    // is acknowledged; their durations are logged because, with little processed meanwhile,
    // they bound both throughput and latency.
    let committing = Instant::now();
    st.last_commit_began = Some(committing);
    if !txn.next.is_empty() {
        let group: ConsumerGroupMetadata = consumer.group_metadata().ok_or_else(|| {
            Step::Stop(Error::Worker("the consumer has no group metadata".into()))
        })?;
        st.producer.send_offsets(&txn.next, group)?;
    }
    let offsets_sent = committing.elapsed();
    let acknowledged = st.producer.commit()?;
    let commit_call = committing.elapsed().saturating_sub(offsets_sent);
    take_turns(st);

    let Some(txn) = st.txn.take() else {
        return Ok(());
    };
    let elapsed = txn.started.elapsed();
    txn.span.record("records", txn.records);
    txn.span.record("partitions", txn.next.len());
    txn.span.record("outcome", "committed");
    txn.span.record("duration_ms", elapsed.as_millis() as u64);
    tracing::debug!(
        parent: &txn.span,
        seq = txn.seq,
        records = txn.records,
        outputs = txn.outputs,
        dead_letters = txn.dead_letters,
        partitions = txn.next.len(),
        ?elapsed,
        ?offsets_sent,
        ?acknowledged,
        ?commit_call,
        "transaction committed"
    );
    let s = &mut st.summary;
    s.transactions_committed += 1;
    s.records_committed += txn.records as u64;
    s.outputs_committed += txn.outputs as u64;
    s.dead_letters_committed += txn.dead_letters as u64;
    st.producer_recoveries_in_row = 0;
    for (k, o) in &txn.next {
        st.committed.insert(k.clone(), *o);
    }
    if !st.attempts.is_empty() {
        st.attempts.retain(|(t, p, o), _| {
            txn.next
                .get(&(t.clone(), *p))
                .is_none_or(|next| *o >= *next)
        });
    }
    Ok(())
}

/// Makes the idle producer the one the next transaction begins on, once the current one's
/// transaction has ended (committed or aborted).
///
/// Why two producers: after `EndTxn` the coordinator still writes the transaction's markers,
/// and until it is done it refuses the same transactional id's next `AddPartitionsToTxn` with
/// `CONCURRENT_TRANSACTIONS`. librdkafka (2.12.1) retries that after a fixed 20 ms, so with one
/// producer the next transaction's first outputs left ~27 ms after each commit (a median, in
/// 101 of 121 transactions; docs/benchmarks-journal.md), and the next commit waited for the
/// backlog that built meanwhile. The idle producer's last transaction ended a whole
/// transaction ago, so its coordinator state is long complete. Each producer's transactions
/// still run one at a time and in order, and the loop's next transaction begins only after
/// this one has ended — every output acknowledged, its offsets committed — so no output of
/// the next transaction can overtake one of this one in a partition, and the group's
/// committed offsets only move forward.
fn take_turns(st: &mut LoopState) {
    let LoopState { producer, idle, .. } = st;
    std::mem::swap(producer, idle);
}

/// Aborts the open transaction and schedules the rewind of every partition it touched (and of
/// every buffered record). Returns the partitions whose records will be processed again.
pub(crate) fn abort_open(st: &mut LoopState, reason: &str) -> Result<Vec<TopicPartition>, Error> {
    let Some(txn) = st.txn.take() else {
        return Ok(Vec::new());
    };
    let result = st.producer.abort();
    note_leftovers(&mut st.leftovers, &st.producer);
    if result.is_ok() {
        // On an error the producer is replaced (see `recover_from`), so it must stay the one
        // `st.producer` names.
        take_turns(st);
    }
    let partitions = rewind(&mut st.intake.buffer(), Some(&txn));
    st.summary.transactions_aborted += 1;
    txn.span.record("records", txn.records);
    txn.span.record("partitions", txn.rewind.len());
    txn.span.record("outcome", "aborted");
    txn.span
        .record("duration_ms", txn.started.elapsed().as_millis() as u64);
    tracing::warn!(
        parent: &txn.span,
        seq = txn.seq,
        records = txn.records,
        reason,
        "transaction aborted; its partitions are rewound to their last committed offsets"
    );
    result.map(|()| partitions)
}

/// Remembers, in `leftovers` (`LoopState::leftovers`), where the transaction that `producer`
/// just failed to commit may have left records that no marker ends.
fn note_leftovers(
    leftovers: &mut BTreeMap<String, BTreeSet<(String, i32)>>,
    producer: &TxProducer,
) {
    let risk = producer.leftover_risk();
    if !risk.is_empty() {
        leftovers
            .entry(producer.transactional_id().to_owned())
            .or_default()
            .extend(risk);
    }
}

/// Schedules seeks back to each partition's rewind point and empties the buffer (under one
/// hold of its lock, so the poller cannot slip a record of a rewound partition in between).
fn rewind(buffer: &mut Buffer, txn: Option<&OpenTxn>) -> Vec<TopicPartition> {
    let mut points: BTreeMap<Key, i64> = txn.map(|t| t.rewind.clone()).unwrap_or_default();
    for (k, first) in buffer.drain_first_offsets() {
        points.entry(k).or_insert(first);
    }
    buffer.schedule_seeks(&points);
    points
        .into_keys()
        .map(|(t, p)| TopicPartition::new(t, p))
        .collect()
}

/// Acts on a failed step: abort and go on, re-create a producer whose transaction the broker
/// timed out, or stop. Whatever the outcome, the loop has no records in flight afterwards.
fn recover<P, C>(
    shared: &Arc<Shared<P, C>>,
    consumer: &PipelineConsumer<P, C>,
    step: Step,
) -> Result<(), Error>
where
    P: Processor,
    C: Codec<P::Input>,
{
    let result = recover_from(shared, consumer, step);
    land(shared, &mut shared.state());
    result
}

#[expect(
    clippy::disallowed_methods,
    reason = "the retry back-off sleeps the worker thread, never an async executor thread"
)]
fn recover_from<P, C>(
    shared: &Arc<Shared<P, C>>,
    consumer: &PipelineConsumer<P, C>,
    step: Step,
) -> Result<(), Error>
where
    P: Processor,
    C: Codec<P::Input>,
{
    match step {
        Step::Abort { reason, backoff } => {
            let aborted = {
                let mut st = shared.state();
                let aborted = abort_open(&mut st, &reason);
                if let Ok(partitions) = &aborted
                    && !partitions.is_empty()
                {
                    // Under the lock, so that no rebalance hook runs at the same time: the
                    // hooks are called one at a time, between batches.
                    shared
                        .runtime
                        .block_on(shared.processor.on_transaction_aborted(partitions));
                }
                // Nothing is open or in flight any more: a rebalance need not wait for the
                // back-off. The poller applies the rewind's seeks.
                land(shared, &mut st);
                aborted
            };
            match aborted {
                Ok(_) => {
                    if let Some(b) = backoff {
                        std::thread::sleep(b);
                    }
                    Ok(())
                }
                Err(e) => recover_from(shared, consumer, Step::Stop(e)),
            }
        }
        Step::Stop(e) => {
            let recoverable = {
                let st = shared.state();
                st.producer_recoveries_in_row < MAX_PRODUCER_RECOVERIES
                    && producer_can_be_replaced(
                        &e,
                        &st,
                        consumer,
                        shared.config.transaction_timeout,
                    )
            };
            if !recoverable {
                let mut st = shared.state();
                // A fenced producer's transaction was aborted by the broker; a hung one refuses
                // every call until its stuck call returns, and its transaction is aborted by
                // the next instance's `init_transactions`.
                if st.txn.is_some() && !e.is_fenced() && !matches!(e, Error::ProducerHung { .. }) {
                    let _ = abort_open(&mut st, "the pipeline is stopping");
                }
                return Err(e);
            }
            replace_producer(shared, consumer, &e)
        }
    }
}

/// True when the producer is dead for a reason a new producer cures.
///
/// * Fenced when the failed producer has gone longer than `transaction.timeout.ms` without a
///   commit since a transaction began on it ([`TxProducer::uncommitted_since`]): the
///   coordinator may have timed out a transaction of it — the open one, or one librdkafka left
///   open there after an abort — aborted it and bumped the epoch, and librdkafka reports that
///   exactly like fencing by a newer instance — unless the instance's other producer is
///   fenced too ([`taken_over`]). A producer that committed within the timeout was fenced by
///   a real newer instance: stop.
/// * Any other fatal producer error (e.g. `INVALID_TXN_STATE` from an abort after messages
///   timed out during a broker failover): this instance still owns its partitions — the
///   consumer group says so — so it takes a new producer epoch.
/// * A call that never returned ([`Error::ProducerHung`]): the same, once the call has been
///   waited for past its own timeout — and at any later use of that producer, which fails as
///   hung at once (see `TxProducer::hung`); so an idle producer whose [`taken_over`] question
///   never returned is replaced when the next transaction begins on it.
/// * An abort after records failed or were purged ([`Error::UnsafeAfterAbort`]): the abort
///   itself succeeded, but only a new epoch makes the producer's sequence numbers safe again.
/// * An abort after the coordinator said it does not know the producer's id
///   ([`Error::ProducerIdUnknown`]): only `init_transactions` registers it again.
fn producer_can_be_replaced<Ctx: rdkafka::consumer::ConsumerContext>(
    e: &Error,
    st: &LoopState,
    consumer: &BaseConsumer<Ctx>,
    txn_timeout: Duration,
) -> bool {
    match e {
        Error::Fenced {
            transactional_id, ..
        } => {
            let (fenced, other) = if st.producer.transactional_id() == transactional_id {
                (&st.producer, &st.idle)
            } else if st.idle.transactional_id() == transactional_id {
                (&st.idle, &st.producer)
            } else {
                return false;
            };
            uncommitted_past(fenced, txn_timeout)
                && !taken_over(fenced, other, consumer, txn_timeout)
        }
        Error::Kafka {
            source: rdkafka::error::KafkaError::Transaction(t),
            ..
        } => t.is_fatal(),
        // The producer is stuck in a call librdkafka lost track of (see `ProducerHung`), or
        // its sequence numbers may collide with records in the log (see `UnsafeAfterAbort`), or
        // the coordinator forgot its id (see `ProducerIdUnknown`).
        Error::ProducerHung { .. }
        | Error::UnsafeAfterAbort { .. }
        | Error::ProducerIdUnknown { .. } => true,
        _ => false,
    }
}

/// Whether `producer` has gone longer than `txn_timeout` without a commit since a transaction
/// began on it ([`TxProducer::uncommitted_since`]).
fn uncommitted_past(producer: &TxProducer, txn_timeout: Duration) -> bool {
    producer
        .uncommitted_since()
        .is_some_and(|t| t.elapsed() >= txn_timeout)
}

/// True when the fence of `fenced`, which [`producer_can_be_replaced`] would take for the
/// broker's timeout, came from a newer instance with this instance's id after all: the
/// instance's `other` producer, asked with [`TxProducer::holds_its_id`], is fenced too.
///
/// Why ask: telling the two apart by time alone fails a zombie. An instance paused in a
/// transaction for longer than the timeout (a frozen process, a network partition) and taken
/// over meanwhile by a restarted instance with its id would re-initialise its producer — and
/// fence the newer instance, which would stop. A newer instance registers both of the
/// instance's ids before it reads a record
/// ([`crate::config::PipelineConfig::transactional_ids`]); the broker's timeout ends one
/// producer's transaction, and fences that producer only.
///
/// Not asked — the time decides — when the other producer has itself gone uncommitted longer
/// than the timeout (its fence would be as ambiguous), or when there is nothing to ask with
/// (no consumer group metadata, no partition with a position yet). When the coordinator cannot
/// be asked, the time decides too, as it did before the question existed.
fn taken_over<Ctx: rdkafka::consumer::ConsumerContext>(
    fenced: &TxProducer,
    other: &TxProducer,
    consumer: &BaseConsumer<Ctx>,
    txn_timeout: Duration,
) -> bool {
    if uncommitted_past(other, txn_timeout) {
        return false;
    }
    let Some(group) = consumer.group_metadata() else {
        return false;
    };
    // Any valid offsets do: the question's transaction is aborted, and its offsets with it.
    let offsets: BTreeMap<Key, i64> = consumer
        .position()
        .map(|positions| {
            offsets_of(&positions)
                .into_iter()
                .filter_map(|(key, offset)| Some((key, offset?)))
                .collect()
        })
        .unwrap_or_default();
    if offsets.is_empty() {
        return false;
    }
    match other.holds_its_id(&offsets, group) {
        Ok(held) => {
            if !held {
                tracing::error!(
                    fenced = fenced.transactional_id(),
                    other = other.transactional_id(),
                    "both transactional ids of this instance are fenced: a newer instance with \
                     this instance id took them over; stopping instead of taking them back"
                );
            }
            !held
        }
        Err(asked) => {
            tracing::warn!(
                error = %asked,
                "could not ask the coordinator whether this instance's other transactional id \
                 is fenced; taking the fence for the broker's transaction timeout"
            );
            false
        }
    }
}

/// Where each assigned partition resumes after the producer is replaced: its committed offset
/// (read with `read_committed`, so the last commit is in it), or — where the group has
/// committed nothing for it yet — the first offset this instance held in memory for it
/// (`rewind_points`: the open transaction's rewind points and the first buffered records).
///
/// Why the fallback must cover the buffer too: replacing the producer empties the buffer, and
/// a partition with nothing committed whose records were buffered but not yet taken into a
/// transaction (a producer that failed in `begin_transaction` leaves exactly that) would
/// otherwise resume where the consumer had fetched to, past the dropped records — and the next
/// commit would skip them. The broker-bounce chaos test lost 4,330 records that way.
/// A partition with neither is untouched: nothing of it was dropped.
fn recovery_seeks(
    committed: &[(Key, Option<i64>)],
    rewind_points: &BTreeMap<Key, i64>,
) -> BTreeMap<Key, i64> {
    committed
        .iter()
        .filter_map(|(key, offset)| {
            offset
                .or_else(|| rewind_points.get(key).copied())
                .map(|o| (key.clone(), o))
        })
        .collect()
}

/// Replaces a dead producer: `init_transactions` with the same transactional id aborts (or, if
/// it was prepared, completes) whatever the old one left open. Then every assigned partition is
/// rewound to the offset the broker has **committed** — not to the in-memory rewind points,
/// which would duplicate a commit whose outcome was unknown and turned out committed
/// (see [`recovery_seeks`]).
fn replace_producer<P, C>(
    shared: &Arc<Shared<P, C>>,
    consumer: &PipelineConsumer<P, C>,
    cause: &Error,
) -> Result<(), Error>
where
    P: Processor,
    C: Codec<P::Input>,
{
    let cause = match cause {
        Error::Fenced { source, .. } => source.to_string(),
        other => other.to_string(),
    };
    tracing::warn!(
        %cause,
        "the transactional producer can no longer be used; re-initialising it and processing \
         the records since the last commit again"
    );
    // The producer that failed is the one of the open (or last) transaction; the idle one
    // ended its last transaction cleanly and is kept.
    let failed_id = shared.state().producer.transactional_id().to_owned();
    let fresh = TxProducer::create_and_init(&shared.config, &failed_id)?;
    let assignment = consumer
        .assignment()
        .map_err(|e| Error::kafka("reading the assignment", e))?;
    // read_committed: waits for offsets still pending in a transaction being completed.
    let committed = consumer
        .committed_offsets(assignment, Duration::from_secs(30))
        .map_err(|e| Error::kafka("fetching the committed offsets", e))?;
    let committed = offsets_of(&committed);
    let mut st = shared.state();
    // Whichever place the failed producer holds now: a rebalance served meanwhile may have
    // ended a transaction and made the producers change places.
    let old = if st.idle.transactional_id() == failed_id {
        std::mem::replace(&mut st.idle, fresh)
    } else {
        std::mem::replace(&mut st.producer, fresh)
    };
    let txn = st.txn.take();
    {
        let intake = Arc::clone(&st.intake);
        // All under one hold of the buffer's lock: no record the poller brings in between
        // can survive the seeks.
        let mut buffer = intake.buffer();
        // Every record this instance holds or has taken since its last commit — the open
        // transaction's and the buffer's, which `rewind` empties — must be read again.
        let partitions = rewind(&mut buffer, txn.as_ref());
        let rewind_points = std::mem::take(&mut buffer.pending_seeks);
        let seeks = recovery_seeks(&committed, &rewind_points);
        buffer.drop_partitions(|k| seeks.contains_key(k));
        buffer.pending_seeks = seeks;
        drop(buffer);
        if !partitions.is_empty() {
            // Under the state's lock, like every hook (see `recover_from`).
            shared
                .runtime
                .block_on(shared.processor.on_transaction_aborted(&partitions));
        }
    }
    note_leftovers(&mut st.leftovers, &old);
    st.summary.transactions_aborted += u64::from(txn.is_some());
    st.summary.producer_recoveries += 1;
    st.producer_recoveries_in_row += 1;
    drop(st);
    drop(old);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;
    use rdkafka::message::OwnedMessage;

    #[test]
    fn a_transaction_is_due_one_interval_after_the_previous_commit_began() {
        let t0 = Instant::now();
        let interval = Duration::from_millis(100);
        // The first transaction gets a whole interval.
        assert_eq!(commit_due(None, t0, interval), t0 + interval);
        // Begun right after a commit that took 30 ms: due 70 ms later, not 100.
        let began = t0;
        let now = t0 + Duration::from_millis(30);
        assert_eq!(commit_due(Some(began), now, interval), t0 + interval);
        // Begun after an idle spell longer than the interval: due at once.
        let now = t0 + Duration::from_millis(500);
        assert_eq!(commit_due(Some(began), now, interval), now);
    }

    fn record(partition: i32, offset: i64, size: usize) -> OwnedMessage {
        record_of("in", partition, offset, size)
    }

    fn record_of(topic: &str, partition: i32, offset: i64, size: usize) -> OwnedMessage {
        OwnedMessage::new(
            Some(vec![0; size]),
            None,
            topic.to_owned(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    impl Buffer {
        fn push_owned(&mut self, m: &OwnedMessage) {
            self.push(m);
        }
    }

    #[test]
    fn take_is_round_robin_and_keeps_order() {
        let mut buffer = Buffer::default();
        for offset in 0..10 {
            buffer.push_owned(&record(0, offset, 1));
            buffer.push_owned(&record(1, offset, 1));
        }
        let taken = buffer.take(8, 500, &mut Spare::default());
        assert_eq!(taken.len(), 2);
        for records in taken.values() {
            let offsets: Vec<i64> = records.iter().map(Polled::offset).collect();
            assert_eq!(offsets, vec![0, 1, 2, 3]);
        }
        assert_eq!(buffer.len(), 12);
    }

    #[test]
    fn records_put_back_are_taken_again_first_and_in_order() {
        let mut buffer = Buffer::default();
        for offset in 0..10 {
            buffer.push_owned(&record(0, offset, 3));
        }
        buffer.push_owned(&record(1, 0, 5));
        let (len, bytes) = (buffer.len(), buffer.bytes);
        // Three of partition 0, all of partition 1 (whose queue is left empty).
        let mut taken = buffer.take(5, 500, &mut Spare::default());
        assert_eq!(buffer.len(), 7);
        for records in taken.values_mut() {
            buffer.put_back(records);
            assert!(records.is_empty());
        }
        assert_eq!((buffer.len(), buffer.bytes), (len, bytes));
        let again = buffer.take(20, 500, &mut Spare::default());
        let offsets = |p: i32| -> Vec<i64> {
            again[&("in".to_owned(), p)]
                .iter()
                .map(Polled::offset)
                .collect()
        };
        assert_eq!(offsets(0), (0..10).collect::<Vec<_>>());
        assert_eq!(offsets(1), vec![0]);
    }

    #[test]
    fn a_partition_with_records_taken_ahead_is_not_settled() {
        let key = ("in".to_owned(), 0);
        let owned = BTreeSet::from([key.clone()]);
        let mut buffer = Buffer::default();
        let mut ahead = BTreeSet::new();
        assert!(settled(&key, &owned, &buffer, &ahead));
        buffer.push_owned(&record(0, 7, 1));
        let _taken = buffer.take(10, 10, &mut Spare::default());
        ahead.insert(key.clone());
        assert!(!settled(&key, &owned, &buffer, &ahead));
        buffer.push_owned(&record(0, 8, 1));
        assert!(!settled(&key, &owned, &buffer, &BTreeSet::new()));
        let none_owned = BTreeSet::new();
        assert!(!settled(
            &key,
            &none_owned,
            &Buffer::default(),
            &BTreeSet::new()
        ));
        let mut rewinding = Buffer::default();
        rewinding.schedule_seeks(&BTreeMap::from([(key.clone(), 3)]));
        assert!(!settled(&key, &owned, &rewinding, &BTreeSet::new()));
    }

    #[test]
    fn records_of_a_partition_waiting_for_its_rewind_are_dropped_on_arrival() {
        let intake = Intake::new(true);
        assert!(intake.push(&record(0, 5, 1)), "room, and no seek waits");
        assert!(intake.push(&record(1, 5, 1)));
        {
            let mut b = intake.buffer();
            // The abort's rewind: partition 0 goes back to 5, and drops what it buffered.
            b.schedule_seeks(&BTreeMap::from([(("in".to_owned(), 0), 5)]));
            // A second rewind further back wins; a later one does not.
            b.schedule_seeks(&BTreeMap::from([(("in".to_owned(), 0), 4)]));
            b.schedule_seeks(&BTreeMap::from([(("in".to_owned(), 0), 9)]));
            assert_eq!(b.pending_seeks[&("in".to_owned(), 0)], 4);
            assert_eq!(b.len(), 1);
        }
        // Polled before the seek: from before the rewind, so dropped. Every push says the
        // poller must look for the seek before it polls again.
        assert!(!intake.push(&record(0, 6, 1)));
        assert!(!intake.push(&record(1, 6, 1)));
        let mut b = intake.buffer();
        assert_eq!(b.partition_len(&("in".to_owned(), 0)), 0);
        assert_eq!(b.partition_len(&("in".to_owned(), 1)), 2);
        // Once the seek is applied, records are buffered again.
        b.pending_seeks.clear();
        drop(b);
        assert!(intake.push(&record(0, 4, 1)));
        assert_eq!(intake.buffer().partition_len(&("in".to_owned(), 0)), 1);
    }

    #[test]
    fn a_push_that_fills_the_buffer_tells_the_poller_to_wait_for_room() {
        let intake = Intake::new(true);
        assert!(intake.push(&record(0, 0, MAX_BUFFERED_BYTES / 2)));
        assert!(!intake.push(&record(0, 1, MAX_BUFFERED_BYTES / 2)));
        assert!(!intake.buffer().has_room());
    }

    #[test]
    fn the_buffer_has_room_below_both_bounds() {
        let mut buffer = Buffer::default();
        assert!(buffer.has_room());
        buffer.push_owned(&record(0, 0, MAX_BUFFERED_BYTES));
        assert!(!buffer.has_room());
        let _ = buffer.take(1, 1, &mut Spare::default());
        assert!(buffer.has_room());
        for offset in 0..MAX_BUFFERED {
            buffer.push_owned(&record(0, i64::try_from(offset).unwrap_or(0), 0));
        }
        assert!(!buffer.has_room());
    }

    #[test]
    fn the_same_partition_of_two_topics_is_queued_apart() {
        let mut buffer = Buffer::default();
        buffer.push_owned(&record_of("orders", 0, 7, 1));
        buffer.push_owned(&record_of("payments", 0, 3, 1));
        buffer.push_owned(&record_of("orders", 0, 8, 1));
        let taken = buffer.take(10, 10, &mut Spare::default());
        let offsets = |t: &str| -> Vec<i64> {
            taken[&(t.to_owned(), 0)]
                .iter()
                .map(|m| {
                    assert_eq!(m.topic(), t);
                    m.offset()
                })
                .collect()
        };
        assert_eq!(offsets("orders"), vec![7, 8]);
        assert_eq!(offsets("payments"), vec![3]);
    }

    #[test]
    fn a_drained_partition_lets_go_of_its_value_block() {
        let mut buffer = Buffer {
            single_topic: true,
            ..Buffer::default()
        };
        let mut spare = Spare::default();
        buffer.push_owned(&record(0, 0, 10));
        buffer.push_owned(&record(0, 1, 10));
        let first = buffer.take(1, 10, &mut spare);
        let held = buffer.take(1, 10, &mut spare);
        let first = &first[&("in".to_owned(), 0)][0];
        let held = &held[&("in".to_owned(), 0)][0];
        let (a, b) = (
            first.payload().unwrap_or_default(),
            held.payload().unwrap_or_default(),
        );
        // Consecutive values of a partition share a block...
        assert_eq!(b.as_ptr(), a.as_ptr().wrapping_add(a.len()));
        // ...until its queue drains: then the next value starts a new block.
        buffer.push_owned(&record(0, 2, 10));
        let after = buffer.take(1, 10, &mut spare);
        let c = after[&("in".to_owned(), 0)][0]
            .payload()
            .unwrap_or_default();
        assert_ne!(c.as_ptr(), b.as_ptr().wrapping_add(b.len()));
    }

    #[test]
    fn a_single_topic_buffer_queues_by_partition() {
        let mut buffer = Buffer {
            single_topic: true,
            ..Buffer::default()
        };
        for offset in 0..3 {
            buffer.push_owned(&record(0, offset, 1));
            buffer.push_owned(&record(1, offset, 1));
        }
        let taken = buffer.take(10, 10, &mut Spare::default());
        assert_eq!(taken.len(), 2);
        assert!(taken.values().all(|run| run.len() == 3));
    }

    #[test]
    fn spare_vectors_come_back_empty_and_keep_their_allocation() {
        let mut spare = Spare::default();
        let mut buffer = Buffer::default();
        for offset in 0..100 {
            buffer.push_owned(&record(0, offset, 1));
        }
        let mut taken = buffer.take(100, 100, &mut spare);
        let Some(run) = taken.remove(&("in".to_owned(), 0)) else {
            panic!("partition 0 was not taken");
        };
        let (records_at, capacity) = (run.as_ptr(), run.capacity());
        spare.keep(run, Vec::with_capacity(100), Vec::new());
        let again = spare.records();
        assert!(again.is_empty());
        assert_eq!((again.as_ptr(), again.capacity()), (records_at, capacity));
        assert!(spare.outcomes().capacity() >= 100);
    }

    #[test]
    fn a_replaced_producer_resumes_uncommitted_partitions_at_their_first_held_record() {
        let key = |p: i32| ("in".to_owned(), p);
        // Partition 0: committed at 120. Partition 1: nothing committed, records buffered from
        // offset 0 (the case that lost records). Partition 2: nothing committed, nothing held.
        let committed = vec![(key(0), Some(120)), (key(1), None), (key(2), None)];
        let mut buffer = Buffer::default();
        for offset in 0..5 {
            buffer.push_owned(&record(1, offset, 1));
        }
        buffer.push_owned(&record(0, 130, 1));
        let seeks = recovery_seeks(&committed, &buffer.drain_first_offsets());
        assert_eq!(seeks.get(&key(0)), Some(&120), "the committed offset wins");
        assert_eq!(
            seeks.get(&key(1)),
            Some(&0),
            "back to the first buffered record"
        );
        assert_eq!(seeks.get(&key(2)), None, "nothing held, nothing to rewind");
    }

    #[test]
    fn a_reused_vector_grows_only_to_what_a_run_needs() {
        let mut spare = Spare::default();
        spare.keep(Vec::with_capacity(300), Vec::new(), Vec::new());
        let mut buffer = Buffer::default();
        for offset in 0..i64::try_from(MAX_SPARE_CAPACITY).unwrap_or(i64::MAX) {
            buffer.push_owned(&record(0, offset, 1));
        }
        let mut taken = buffer.take(MAX_SPARE_CAPACITY, MAX_SPARE_CAPACITY, &mut spare);
        let Some(run) = taken.remove(&("in".to_owned(), 0)) else {
            panic!("partition 0 was not taken");
        };
        assert_eq!(run.len(), MAX_SPARE_CAPACITY);
        assert!(run.capacity() <= MAX_SPARE_CAPACITY, "{}", run.capacity());
        spare.keep(run, Vec::new(), Vec::new());
        assert_eq!(spare.records.len(), 1, "the grown vector is kept");
    }

    #[test]
    fn a_batch_of_large_records_is_bounded_by_bytes_and_one_of_small_records_by_count() {
        let fill = |size: usize| {
            let mut buffer = Buffer::default();
            for offset in 0..4_000 {
                buffer.push_owned(&record(0, offset, size));
            }
            records_in_batch_bytes(buffer.len(), buffer.bytes)
        };
        // 1 KiB values (no keys): MAX_BATCH_BYTES / 1 KiB of them, far fewer than MAX_BATCH.
        assert_eq!(fill(1024), MAX_BATCH_BYTES / 1024);
        // 100-byte values: the bytes bound lies past MAX_BATCH, which stays the bound.
        assert!(fill(100) > MAX_BATCH, "{}", fill(100));
        // One record larger than the bound is still taken on its own.
        assert_eq!(records_in_batch_bytes(3, 3 * (MAX_BATCH_BYTES + 1)), 1);
        // Records without key or value bytes are bounded by their count alone.
        assert_eq!(records_in_batch_bytes(7, 0), 7);
    }

    #[test]
    fn spares_are_bounded_in_number_and_size() {
        let mut spare = Spare::default();
        for _ in 0..MAX_SPARE + 5 {
            spare.keep(Vec::with_capacity(1), Vec::new(), Vec::new());
        }
        assert_eq!(spare.records.len(), MAX_SPARE);
        let mut spare = Spare::default();
        spare.keep(
            Vec::new(),
            Vec::new(),
            Vec::with_capacity(MAX_SPARE_CAPACITY + 1),
        );
        assert!(spare.outputs.is_empty());
    }

    /// Copies each input text to "out"; the pipeline test below never gets a record.
    struct Copy;

    #[async_trait::async_trait]
    impl Processor for Copy {
        type Input = String;

        async fn process(
            &self,
            r: &Record<String>,
            out: &mut Output,
        ) -> Result<(), crate::ProcessError> {
            out.send(OutputRecord::to("out").value(r.value.as_str()));
            Ok(())
        }
    }

    /// Runs a pipeline of instance "0" of `app` on `mock` over input "in" (with the consumer's
    /// `extra` properties) until it stops, for at most 30 s; `meanwhile` runs once it started.
    fn run_on_mock(
        mock: &rdkafka::mocking::MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        app: &str,
        extra: &[(&str, &str)],
        meanwhile: impl FnOnce(),
    ) -> Result<Result<crate::RunSummary, Error>, Box<dyn std::error::Error>> {
        let mut config = PipelineConfig::builder()
            .bootstrap_servers(mock.bootstrap_servers())
            .application_id(app)
            .instance_id("0")
            .input_topic("in");
        for (k, v) in extra {
            config = config.consumer_property(*k, *v);
        }
        let config = config.build()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let result = runtime.block_on(async {
            let pipeline = crate::Pipeline::new(config, Copy).with_codec(crate::codec::Utf8);
            let running = tokio::spawn(pipeline.run());
            tokio::time::sleep(Duration::from_secs(2)).await;
            meanwhile();
            tokio::time::timeout(Duration::from_secs(30), running).await
        });
        Ok(result??)
    }

    /// An input topic that does not exist stops the pipeline at start-up with
    /// [`Error::MissingTopic`]; subscribed to it, the consumer would sit idle for ever. Only
    /// with `allow.auto.create.topics` does the pipeline leave it to the subscription.
    #[test]
    fn a_missing_input_topic_stops_the_pipeline_at_start_up()
    -> Result<(), Box<dyn std::error::Error>> {
        let mock = rdkafka::mocking::MockCluster::new(1)?;
        let result = run_on_mock(&mock, "missing-input", &[], || {})?;
        assert!(
            matches!(&result, Err(Error::MissingTopic { topic }) if topic == "in"),
            "{result:?}"
        );
        Ok(())
    }

    /// An input topic this instance may not read stops the pipeline with [`Error::Refused`]:
    /// at start-up, and when the refusal comes while it runs (both injected into the mock
    /// cluster's metadata: `TOPIC_AUTHORIZATION_FAILED`; fault injection only). librdkafka
    /// reports the second as a consumer error at every poll and keeps asking, so without the
    /// rule the pipeline would sit idle for ever, warning.
    #[test]
    fn an_input_topic_the_instance_may_not_read_stops_the_pipeline()
    -> Result<(), Box<dyn std::error::Error>> {
        let refused = rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED;
        let mock = rdkafka::mocking::MockCluster::new(1)?;
        mock.create_topic("in", 1, 1)?;
        mock.topic_error("in", refused)?;
        let at_start = run_on_mock(&mock, "input-acl-at-start", &[], || {})?;
        assert!(
            matches!(
                &at_start,
                Err(e @ Error::Refused { operation: "reading a topic's metadata", .. })
                    if e.class() == ErrorClass::Fatal && e.to_string().contains("READ on each input topic")
            ),
            "{at_start:?}"
        );

        let mock = rdkafka::mocking::MockCluster::new(1)?;
        mock.create_topic("in", 1, 1)?;
        // The consumer asks for the topic's metadata again every 500 ms, and so meets the
        // refusal while it runs.
        let while_running = run_on_mock(
            &mock,
            "input-acl-while-running",
            &[("topic.metadata.refresh.interval.ms", "500")],
            || {
                let _ = mock.topic_error("in", refused);
            },
        )?;
        assert!(
            matches!(
                &while_running,
                Err(e @ Error::Refused { operation: "consuming the input topics", .. })
                    if e.class() == ErrorClass::Fatal && e.to_string().contains("READ on each input topic")
            ),
            "{while_running:?}"
        );
        Ok(())
    }
}
