//! The producer side: an instance's transactional producers (two, used in turn; see
//! [`crate::transaction`]), and the retry policy for each transactional call.
//!
//! Every call here blocks (librdkafka's transactional API is synchronous, even on
//! `FutureProducer`), so this module is only used from the pipeline's own threads (the
//! transaction loop's, and the poller's rebalance callback, each under the loop's lock), never
//! from an async task. It is the one place that calls the transactional API: the workspace's clippy
//! configuration disallows those methods everywhere else.
//!
//! `ThreadedProducer` is used rather than `BaseProducer` because its background thread serves
//! delivery reports: `BaseProducer::abort_transaction` waits for outstanding reports that nobody
//! polls and times out.
#![allow(
    clippy::disallowed_methods,
    reason = "the producer side is the one module allowed to make librdkafka's transactional calls"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header as RdHeader, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::types::RDKafkaErrorCode;

use crate::client_log::ClientErrors;
use crate::config::PipelineConfig;
use crate::error::{Error, ErrorClass, classify};
use crate::processor::OutputRecord;

/// How long a retriable transactional call is retried before the instance gives up. A commit
/// is never aborted after a retriable failure; it is retried until it resolves or this passes,
/// and then the instance stops without aborting.
const RETRY_WINDOW_FACTOR: u32 = 3;

/// How long [`TxProducer::failed_topic_gone`] waits for the cluster's metadata.
const TOPIC_QUESTION_TIMEOUT: Duration = Duration::from_secs(5);

/// The key of the one-record transactions the runtime writes, and aborts, into an output
/// partition to end what an aborted transaction may have left open there (a Kafka bug,
/// KAFKA-20734; the guide's section 5, "A broker bug this works around"). Their value is empty.
/// `read_committed` readers never see them; a `read_uncommitted` reader of an output topic
/// does, as it sees every aborted record, and can recognise them by this key.
pub const LEFTOVER_KEY: &[u8] = b"onceflow.abort-leftovers";

/// How long past its own timeout a watched call may take before the producer is given up as
/// hung (see [`watched`]). librdkafka enforces a call's timeout on its own threads and returns
/// shortly after it; this margin only has to cover a slow machine's scheduling.
const HUNG_GRACE: Duration = Duration::from_secs(10);

/// Logs delivery failures, and counts those of records the broker may have written. Inside a
/// transaction any failure makes the commit fail as abortable, so the transaction loop learns
/// of them there; the count is what [`TxProducer::abort`] needs to know whether the producer
/// may be used for another transaction.
#[derive(Debug)]
pub(crate) struct DeliveryContext {
    /// Records that failed or were purged after they had been sent, since the transaction
    /// began.
    possibly_written: AtomicU64,
    /// What the transaction's failed deliveries say about why the commit will fail; the commit
    /// itself then says only "messages failed delivery".
    failures: Mutex<Failures>,
    /// Where the transaction's records were acknowledged (see [`Acked`]).
    acked: Mutex<Acked>,
    errors: ClientErrors,
}

/// The partitions (and their topics) where the current transaction has records acknowledged:
/// where, if it does not commit, it may leave records that its abort marker never reaches (see
/// [`TxProducer::leftover_risk`]).
///
/// Why every acknowledged partition, not only those of failed deliveries: the coordinator skips
/// the abort marker of a partition whose leader it cannot find (KAFKA-20734), and nothing the
/// producer sees need fail first. When a partition's only broker dies, the cluster names the
/// dead broker as its leader for seconds, its records wait in the queue, and a transaction
/// aborted before they time out (its commit given up, a revocation) learns of it only as
/// records purged unsent — which every abort purges. The leaderless-partition chaos test
/// committed 24 outputs twice that way in CI: the records the aborted transaction had written
/// there before the kill, committed with the same producer id's next commit.
#[derive(Debug, Default)]
struct Acked {
    /// The last acknowledged record's partition: delivery reports come a batch at a time, so
    /// most are for the same partition as the one before, and cost a comparison, not a lookup.
    last: Option<(String, i32)>,
    partitions: BTreeSet<(String, i32)>,
}

impl Acked {
    fn note(&mut self, topic: &str, partition: i32) {
        if self
            .last
            .as_ref()
            .is_some_and(|(t, p)| *p == partition && t == topic)
        {
            return;
        }
        self.partitions.insert((topic.to_owned(), partition));
        self.last = Some((topic.to_owned(), partition));
    }
}

/// What a transaction's failed deliveries say (see [`DeliveryContext::failures`]).
#[derive(Debug, Default)]
struct Failures {
    /// The topic of the first failed delivery, whatever its error: whether that topic exists is
    /// the question when the commit fails (see [`TxProducer::failed_topic_gone`]). An output
    /// topic that does not exist fails its records only once librdkafka has waited for it
    /// (`message.timeout.ms`), as timed out.
    topic: Option<String>,
    /// The first failure that is a permission the broker refused (see
    /// [`crate::error::permission_refusal_hint`]): librdkafka fails such outputs locally once
    /// the broker has refused their topic.
    refused: Option<KafkaError>,
    /// The partitions (and their topics) of the failed deliveries that may have been written
    /// or timed out: where an aborted transaction may have left records that its abort marker
    /// never reached (see [`TxProducer::leftover_risk`]). A record that timed out without being
    /// sent still says its partition was out of reach, and the transaction's acknowledged
    /// records there are at risk.
    failed_partitions: BTreeSet<(String, i32)>,
}

impl DeliveryContext {
    fn new() -> Self {
        Self {
            possibly_written: AtomicU64::new(0),
            failures: Mutex::new(Failures::default()),
            acked: Mutex::new(Acked::default()),
            errors: ClientErrors::new("producer"),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, Failures> {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn acked(&self) -> std::sync::MutexGuard<'_, Acked> {
        self.acked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets what the last transaction's deliveries said.
    fn new_transaction(&self) {
        self.possibly_written.store(0, Ordering::Relaxed);
        *self.failures() = Failures::default();
        *self.acked() = Acked::default();
    }
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::client_log::log_librdkafka(level, fac, log_message);
    }

    // rust-rdkafka's default logs through the `log` crate at `error`; onceflow logs through
    // `tracing`, as a warning (the failures that matter come back from its own calls), with
    // repeats folded.
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.report(&error, reason);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _opaque: ()) {
        if let Ok(message) = result {
            self.acked().note(
                rdkafka::message::Message::topic(message),
                rdkafka::message::Message::partition(message),
            );
        }
        if let Err((error, message)) = result {
            let topic = rdkafka::message::Message::topic(message);
            let mut failures = self.failures();
            let written = may_have_been_written(message);
            if written {
                self.possibly_written.fetch_add(1, Ordering::Relaxed);
            }
            let partition = rdkafka::message::Message::partition(message);
            // A partition where this record may be, or which was out of reach for as long as
            // the record waited (timed out): the transaction's acknowledged records there may
            // lose their abort marker. Not one whose record was purged unsent by an abort (every
            // abort purges; most are a processor's retry) or refused by the producer itself:
            // if the transaction has acknowledged records there, `Acked` has the partition.
            let unreachable = error.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut);
            if partition >= 0 && (written || unreachable) {
                failures
                    .failed_partitions
                    .insert((topic.to_owned(), partition));
            }
            failures.topic.get_or_insert_with(|| topic.to_owned());
            if failures.refused.is_none()
                && crate::error::permission_refusal_hint(error, crate::error::Side::Output)
                    .is_some()
            {
                log_refused_output_topic(topic, error);
                failures.refused = Some(error.clone());
            }
            // One line per record would flood the log when a whole transaction fails; the
            // abort that follows is logged once, with the cause.
            tracing::debug!(
                %error,
                topic = rdkafka::message::Message::topic(message),
                "output record delivery failed; the transaction will be aborted"
            );
        }
    }
}

/// Logs the output topic the broker refuses this instance's principal, at `ERROR`: the error
/// does not name the topic, and an instance with several outputs needs to know which.
pub(crate) fn log_refused_output_topic(topic: &str, error: &dyn std::fmt::Display) {
    tracing::error!(
        topic,
        %error,
        "the broker refuses this instance's principal an output topic"
    );
}

/// Whether librdkafka reports a failed record as possibly (or certainly) in the partition's log:
/// it was sent, and its request failed in a way that leaves its fate unknown (a broker that
/// died before answering, a timeout). rust-rdkafka does not expose the status.
#[expect(
    unsafe_code,
    reason = "rust-rdkafka has no binding for rd_kafka_message_status"
)]
fn may_have_been_written(message: &rdkafka::message::BorrowedMessage<'_>) -> bool {
    // SAFETY: `message.ptr()` is the delivery report's message, valid while the report is being
    // served (this callback); `rd_kafka_message_status` only reads its status field.
    let status = unsafe { rdkafka::bindings::rd_kafka_message_status(message.ptr()) };
    status != rdkafka::bindings::rd_kafka_msg_status_t::RD_KAFKA_MSG_STATUS_NOT_PERSISTED
}

/// The producer's `linger.ms` unless the user sets one: a fifth of the commit interval, between
/// 1 ms and 20 ms.
///
/// Why this long: a transaction's outputs become visible only when it commits, and the commit
/// sends whatever is lingering at once (see [`TxProducer::commit`]), so lingering inside a
/// transaction adds no latency. It does cut the number of produce requests — each costs the
/// broker a request's handling whatever its size. With librdkafka's 5 ms the benchmark's
/// producer sent ~550 records per request and the broker spent more CPU per record than the
/// worker; the whole comparison is in `docs/benchmarks.md`. A fifth of the interval leaves most
/// of it for batches to be sent before the commit has to wait for them. Not more than 20 ms:
/// what lingers sits in the producer's queue (at most `queue.buffering.max.messages`), and
/// with 100 ms at a 1 s interval a fast pipeline filled it and waited for lingering batches —
/// measured at half the throughput of the 100 ms interval.
pub(crate) fn default_linger(commit_interval: Duration) -> Duration {
    (commit_interval / 5).clamp(Duration::from_millis(1), Duration::from_millis(20))
}

/// A send the producer refused for this record (too large, unknown topic, ...).
#[derive(Debug)]
pub(crate) struct SendRejected(pub(crate) KafkaError);

/// The instance's transactional producer.
pub(crate) struct TxProducer {
    /// Shared only with a [`watched`] call's thread, which drops its handle before it reports.
    inner: Arc<ThreadedProducer<DeliveryContext>>,
    transactional_id: String,
    /// For the errors of [`Self::failed_topic_gone`].
    bootstrap_servers: String,
    call_timeout: Duration,
    /// When the first transaction begun since this producer's last commit began (`None` right
    /// after a commit, and for a new producer): since then the coordinator may hold a
    /// transaction of this producer open. See [`TxProducer::uncommitted_since`].
    uncommitted_since: Mutex<Option<Instant>>,
    /// Set when the coordinator answered that it does not know this producer's id; the next
    /// successful [`TxProducer::abort`] then reports [`Error::ProducerIdUnknown`].
    id_unknown: AtomicBool,
    /// The call that did not return (see [`watched`]) and how long it was waited for, once one
    /// has not.
    ///
    /// Why every later call fails at once: librdkafka still holds the stuck call in progress and
    /// refuses every other transactional call as conflicting with it ("Conflicting
    /// send_offsets_to_transaction API call is already in progress"), an error the loop cannot
    /// tell from any other and stops on. As [`Error::ProducerHung`] it is one the loop recovers
    /// from by replacing the producer. The broker-bounce chaos test stopped that way: the
    /// stuck call was [`Self::holds_its_id`]'s question, asked of the idle producer while the
    /// other was replaced, and the next transaction began on the idle one.
    hung: Mutex<Option<(&'static str, Duration)>>,
}

impl std::fmt::Debug for TxProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxProducer")
            .field("transactional_id", &self.transactional_id)
            .finish_non_exhaustive()
    }
}

impl TxProducer {
    /// Creates the producer with `transactional_id` (one of
    /// [`PipelineConfig::transactional_ids`]) and registers the id with the coordinator, which
    /// fences any older producer with the same id and aborts its open transaction.
    pub(crate) fn create_and_init(
        config: &PipelineConfig,
        transactional_id: &str,
    ) -> Result<Self, Error> {
        let mut cc = ClientConfig::new();
        for (k, v) in config
            .kafka_properties
            .iter()
            .chain(config.producer_properties.iter())
        {
            cc.set(k, v);
        }
        cc.set("bootstrap.servers", &config.bootstrap_servers)
            .set("transactional.id", transactional_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "transaction.timeout.ms",
                config.transaction_timeout.as_millis().to_string(),
            )
            // Java-compatible key routing (murmur2), so one key's outputs stay in order on the
            // partition every other Kafka client would also pick.
            .set("partitioner", "murmur2_random");
        let tuned = |k: &str| {
            config.producer_properties.contains_key(k) || config.kafka_properties.contains_key(k)
        };
        if !tuned("linger.ms") {
            cc.set(
                "linger.ms",
                default_linger(config.commit_interval)
                    .as_millis()
                    .to_string(),
            );
        }
        // librdkafka's default allows 1 GiB and 100,000 unacknowledged records; a transaction
        // is flushed at every commit anyway, so the queue need not be that deep, and bounding it
        // bounds an instance's memory. With small records the 30,000-record bound is the one
        // that binds (~3 MiB of 100 B records). With 1 KiB records the bytes bind, and the queue
        // is the producer's window: an output counts against it until the broker has
        // acknowledged it and its delivery report is served, and the idempotent producer keeps
        // one produce request per partition in flight. At 4 MiB the loop waited on a full queue
        // for ~26 ms of each 100 ms transaction (docs/benchmarks-journal.md, "The producer's
        // queue, alone"); 16 MiB ran 10–18 % faster at 1 KB in every paired repeat of two
        // side-by-side runs once the benchmark's broker ran steadily, for ~16 MiB more peak RSS
        // (the journal, "The producer's queue at 16 MiB"). A full queue makes `send` wait, not
        // fail (a record larger than the whole queue is rejected, see `send`).
        if !tuned("queue.buffering.max.kbytes") {
            cc.set("queue.buffering.max.kbytes", "16384");
        }
        if !tuned("queue.buffering.max.messages") {
            cc.set("queue.buffering.max.messages", "30000");
        }

        let inner: ThreadedProducer<DeliveryContext> = cc
            .create_with_context(DeliveryContext::new())
            .map_err(|e| Error::kafka("creating the transactional producer", e))?;
        let producer = Self {
            inner: Arc::new(inner),
            transactional_id: transactional_id.to_owned(),
            bootstrap_servers: config.bootstrap_servers.clone(),
            call_timeout: config.transaction_timeout,
            uncommitted_since: Mutex::new(None),
            id_unknown: AtomicBool::new(false),
            hung: Mutex::new(None),
        };
        producer.retrying("init_transactions", |p| {
            p.inner.init_transactions(p.call_timeout)
        })?;
        tracing::info!(transactional_id = %producer.transactional_id, "transactional producer ready");
        Ok(producer)
    }

    pub(crate) fn transactional_id(&self) -> &str {
        &self.transactional_id
    }

    pub(crate) fn begin(&self) -> Result<(), Error> {
        self.inner.context().new_transaction();
        self.begin_transaction()?;
        self.uncommitted().get_or_insert_with(Instant::now);
        Ok(())
    }

    /// librdkafka's `begin_transaction`, unless the producer is hung (see [`Self::hung`]).
    /// Every other transactional call goes through [`Self::retrying`], which checks the same.
    fn begin_transaction(&self) -> Result<(), Error> {
        self.refuse_if_hung()?;
        self.inner
            .begin_transaction()
            .map_err(|e| self.error("begin_transaction", e))
    }

    /// When the earliest transaction begun on this producer since its last successful commit
    /// began; `None` if none has begun since.
    ///
    /// Why an abort does not reset it: librdkafka (2.12.1) can leave a transaction open at the
    /// coordinator after `abort_transaction` succeeded. When the answer to a transaction's only
    /// `AddPartitionsToTxn` arrives after the abort has begun, librdkafka ignores it as
    /// outdated and counts the registration as never made, so the abort sends no `EndTxn` —
    /// but the coordinator did register the partitions (`debug=eos` shows "Ignoring outdated
    /// AddPartitionsToTxn response" followed by "No partitions registered: not sending
    /// EndTxn"). No record of that transaction was sent (librdkafka sends a partition's records
    /// only once its registration is answered), so nothing of it can be committed; but unless a
    /// later transaction of the same producer ends at the coordinator first, the coordinator
    /// times it out after `transaction.timeout.ms`, aborts it and bumps the producer's epoch,
    /// and the producer's next call fails as fenced — on a transaction that may be a few
    /// milliseconds old. A commit always reaches the coordinator (the offsets it sends register
    /// the transaction there), and its `EndTxn` ends the one transaction the coordinator holds
    /// for the producer, a dangling registration included; so only a commit resets this. The
    /// loop uses it to tell that broker-side timeout from fencing by another instance
    /// ([`crate::transaction`]'s `producer_can_be_replaced`).
    pub(crate) fn uncommitted_since(&self) -> Option<Instant> {
        *self.uncommitted()
    }

    fn uncommitted(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // A poisoned lock only means a panic elsewhere while it was held; the value is a plain
        // timestamp, still valid.
        self.uncommitted_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Enqueues one record. Waits (on this blocking thread) while librdkafka's queue is full.
    /// `source`, when given, is added as the [`SOURCE_HEADER`](crate::processor::SOURCE_HEADER)
    /// lineage header. The record's timestamp is its own if set, else `input_timestamp` (the
    /// input record's), else the time of this call.
    #[expect(
        clippy::disallowed_methods,
        reason = "runs on the pipeline's worker thread, never on the async executor"
    )]
    pub(crate) fn send(
        &self,
        record: &OutputRecord,
        source: Option<&str>,
        input_timestamp: Option<i64>,
    ) -> Result<(), SendRejected> {
        let mut base: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&record.topic);
        // Only a record with headers gets a librdkafka header list (allocated and freed per
        // record otherwise).
        if !record.headers.is_empty() || source.is_some() {
            let mut headers = record
                .headers
                .iter()
                .fold(OwnedHeaders::new(), |h, header| {
                    h.insert(RdHeader {
                        key: &header.key,
                        value: header.value.as_deref(),
                    })
                });
            if let Some(source) = source {
                headers = headers.insert(RdHeader {
                    key: crate::processor::SOURCE_HEADER,
                    value: Some(source),
                });
            }
            base = base.headers(headers);
        }
        if let Some(k) = &record.key {
            base = base.key(k.as_slice());
        }
        if let Some(v) = &record.value {
            base = base.payload(&v[..]);
        }
        if let Some(p) = record.partition {
            base = base.partition(p);
        }
        if let Some(ts) = record.timestamp.or(input_timestamp) {
            base = base.timestamp(ts);
        }
        // Whether the queue was seen empty right after this send was last refused.
        let mut refused_when_empty = false;
        loop {
            match self.inner.send(base) {
                Ok(()) => return Ok(()),
                Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    // A record larger than `queue.buffering.max.kbytes` (possible when
                    // `message.max.bytes` is raised above it) is refused even by an empty
                    // queue, and waiting would hang the pipeline for ever. Only this thread
                    // enqueues, so a refusal right after the queue was seen empty is final.
                    if refused_when_empty {
                        return Err(SendRejected(e));
                    }
                    refused_when_empty = self.inner.in_flight_count() == 0;
                    // The background thread drains the queue as the broker acknowledges; a
                    // zero-timeout flush sends what is still lingering now rather than after
                    // `linger.ms`, so a full queue never waits for it.
                    let _ = self.inner.flush(Duration::ZERO);
                    std::thread::sleep(Duration::from_millis(1));
                    base = back;
                }
                Err((e, _)) => return Err(SendRejected(e)),
            }
        }
    }

    /// Adds the consumed offsets to the transaction. `group` must be the consumer's
    /// **current** group metadata (KIP-447): a stale generation fails as abortable, which is
    /// how an instance that lost its partitions is kept from committing for them.
    ///
    /// The call is [`watched`]: librdkafka (2.12.1) does not enforce this call's timeout while
    /// it waits for the group coordinator, and waits for ever when the cached coordinator's
    /// broker is gone and no broker changes state again (confluentinc/librdkafka#5456 and
    /// #5511). The broker-bounce chaos test caught exactly that: the worker thread parked in
    /// `rd_kafka_send_offsets_to_transaction` with every broker back up, and the pipeline
    /// silent for good. Past the timeout and [`HUNG_GRACE`] this returns
    /// [`Error::ProducerHung`], and the transaction loop replaces the producer.
    pub(crate) fn send_offsets(
        &self,
        offsets: &BTreeMap<(String, i32), i64>,
        group: ConsumerGroupMetadata,
    ) -> Result<(), Error> {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in offsets {
            tpl.add_partition_offset(topic, *partition, rdkafka::Offset::Offset(*next))
                .map_err(|e| Error::kafka("building the offsets to commit", e))?;
        }
        let call = Arc::new((tpl, group));
        self.retrying("send_offsets_to_transaction", |p| {
            let (inner, call, timeout) = (Arc::clone(&p.inner), Arc::clone(&call), p.call_timeout);
            watched(timeout + HUNG_GRACE, move || {
                inner.send_offsets_to_transaction(&call.0, &call.1, timeout)
            })?
            .map_err(CallError::Kafka)
        })
    }

    /// Whether this producer still holds its transactional id, asked of the coordinator without
    /// writing anything: `Ok(false)` when it is fenced, `Ok(true)` when it is not, an error when
    /// the coordinator could not be asked. `offsets` must not be empty.
    ///
    /// How: a transaction that registers only `offsets` with `group` — `AddOffsetsToTxn`, which
    /// the coordinator refuses to an older producer epoch — and is then aborted, so the offsets
    /// are discarded whatever they are. It leaves nothing open at the coordinator: the abort
    /// begins after the registration was answered, so its `EndTxn` goes out (the dangling case
    /// of [`Self::uncommitted_since`] needs an answer that arrives after the abort began).
    /// That is also why it bypasses [`Self::begin`]: nothing of it can time out later.
    pub(crate) fn holds_its_id(
        &self,
        offsets: &BTreeMap<(String, i32), i64>,
        group: ConsumerGroupMetadata,
    ) -> Result<bool, Error> {
        self.begin_transaction()?;
        let asked = self.send_offsets(offsets, group);
        match asked {
            Ok(()) => {
                // The answer stands whatever the abort does; if it failed, the producer's next
                // use fails and is recovered from as usual.
                let _ = self.retrying("abort_transaction", |p| {
                    p.inner.abort_transaction(p.call_timeout)
                });
                Ok(true)
            }
            Err(e) if e.is_fenced() => Ok(false),
            Err(e) => {
                // Whatever it was, the producer is left with no transaction open if it can be;
                // if it cannot (a hung question leaves it unusable), its next use fails and is
                // recovered from as usual.
                if !matches!(e, Error::ProducerHung { .. }) {
                    let _ = self.inner.abort_transaction(self.call_timeout);
                }
                Err(e)
            }
        }
    }

    /// Commits. A retriable failure (including a timeout, whose outcome is unknown) is retried,
    /// never turned into an abort. Returns how long of it was spent waiting for the outputs'
    /// acknowledgements (see [`Self::wait_acknowledged`]): the rest is `EndTxn`. The two are
    /// logged apart because they have different causes: the first is the producer's backlog
    /// at the broker, the second the coordinator.
    pub(crate) fn commit(&self) -> Result<Duration, Error> {
        // Before the wait for acknowledgements, which a hung producer would sit out in full.
        self.refuse_if_hung()?;
        let started = Instant::now();
        self.wait_acknowledged(self.call_timeout);
        let acknowledged = started.elapsed();
        self.retrying("commit_transaction", |p| {
            p.inner.commit_transaction(p.call_timeout)
        })
        .map_err(|e| {
            self.refused_delivery("commit_transaction")
                .or_else(|| self.failed_topic_gone())
                .unwrap_or(e)
        })?;
        *self.uncommitted() = None;
        Ok(acknowledged)
    }

    /// Waits (up to `timeout`) until every record produced so far is acknowledged, so that the
    /// flush inside `commit_transaction` finds nothing left to wait for.
    ///
    /// Why not leave it to that flush: rust-rdkafka's `flush` calls `rd_kafka_flush` without
    /// waiting and then polls the producer's queue for up to 100 ms — but the delivery reports
    /// on that queue are served by the `ThreadedProducer`'s own thread, so the poll sleeps its
    /// full 100 ms. That added 100 ms to most commits (measured: `commit_call` ≈ 101–105 ms in
    /// the `transaction committed` debug log, against 2–6 ms without it).
    ///
    /// Why `rd_kafka_flush` itself, with the timeout: librdkafka sends lingering batches at once
    /// only *while* a flush call is in progress (it counts flushing callers; its broker threads
    /// ignore `linger.ms` while the count is not zero). A zero-timeout flush, the only kind
    /// rust-rdkafka makes, is over before a broker thread wakes up, so the last batches of every
    /// transaction waited out `linger.ms` (up to 20 ms) before the commit could go on. With
    /// delivery reports as events, as rust-rdkafka configures them, the call just waits on a
    /// condition variable until the `ThreadedProducer`'s thread has served every report.
    ///
    /// Only an optimisation: on a timeout it returns, and `commit_transaction` flushes with its
    /// own timeout and reports the outcome.
    #[expect(
        unsafe_code,
        reason = "rust-rdkafka's flush never passes a timeout to rd_kafka_flush (see above)"
    )]
    fn wait_acknowledged(&self, timeout: Duration) {
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let rk = self.inner.client().native_ptr();
        // SAFETY: `rk` is the handle of the producer `self.inner` owns, alive for this call
        // (librdkafka destroys it only when the last handle to the producer is dropped);
        // `rd_kafka_flush` may be called from any application thread, concurrently with the
        // thread that polls for delivery reports. Its result is read by `commit_transaction`.
        let _ = unsafe { rdkafka::bindings::rd_kafka_flush(rk, timeout_ms) };
    }

    /// Aborts the open transaction. Fails with [`Error::UnsafeAfterAbort`] — after a
    /// successful abort — when the producer must not be used for another transaction.
    ///
    /// Why: when a transaction fails, librdkafka (2.12.1) purges the records still queued in the
    /// producer and advances each partition's sequence base past them
    /// (`rd_kafka_toppar_purge_queues`), so the next transaction numbers its records from where
    /// the purged ones began — in the same producer epoch. But a record queued for a *retry*
    /// was already sent once and may be in the partition's log, its response lost to a broker
    /// failure. The broker then takes the next transaction's records, which reuse those
    /// sequence numbers, for duplicates: it acknowledges them without writing them, and the
    /// next commit commits offsets for outputs that are not there. The broker-bounce chaos test
    /// lost 500 records that way (the output partition's log held the aborted batch and, after
    /// it, only the commit marker of the next transaction, whose batch had the same epoch and
    /// sequences 0–499). The delivery reports, all served before `abort_transaction` returns,
    /// count the failed or purged records librdkafka marks as possibly written; if there are
    /// any, a new producer — whose `init_transactions` bumps the epoch — takes over. Records
    /// purged before they were ever sent (the usual abort, after a processor's `retry`) are
    /// harmless, and keep the producer.
    ///
    /// Fails with [`Error::ProducerIdUnknown`] — also after a successful abort — when the
    /// coordinator said during the transaction that it does not know this producer's id: the
    /// producer cannot get one back by itself in every case (see the variant).
    pub(crate) fn abort(&self) -> Result<(), Error> {
        self.retrying("abort_transaction", |p| {
            p.inner.abort_transaction(p.call_timeout)
        })?;
        match self
            .inner
            .context()
            .possibly_written
            .swap(0, Ordering::Relaxed)
        {
            0 if self.id_unknown.swap(false, Ordering::Relaxed) => Err(Error::ProducerIdUnknown {
                transactional_id: self.transactional_id.clone(),
            }),
            0 => Ok(()),
            records => Err(Error::UnsafeAfterAbort { records }),
        }
    }

    /// Calls `op` until it succeeds or fails with a non-retriable error, or the retry window
    /// passes.
    #[expect(
        clippy::disallowed_methods,
        reason = "runs on the pipeline's worker thread, never on the async executor"
    )]
    fn retrying<E: Into<CallError>>(
        &self,
        operation: &'static str,
        op: impl Fn(&Self) -> Result<(), E>,
    ) -> Result<(), Error> {
        self.refuse_if_hung()?;
        let started = Instant::now();
        let window = self.call_timeout * RETRY_WINDOW_FACTOR;
        let mut backoff = Duration::from_millis(50);
        loop {
            let e = match op(self).map_err(Into::into) {
                Ok(()) => return Ok(()),
                Err(CallError::Kafka(e)) => e,
                Err(CallError::Hung(waited)) => {
                    *self.hung.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some((operation, waited));
                    return Err(Error::ProducerHung { operation, waited });
                }
                Err(CallError::Thread(e)) => {
                    return Err(Error::Worker(format!("{operation}: {e}")));
                }
            };
            if classify(&e) != ErrorClass::Retriable {
                return Err(self.error(operation, e));
            }
            if started.elapsed() >= window {
                return Err(Error::Unresolved {
                    operation,
                    waited: started.elapsed(),
                    source: e,
                });
            }
            tracing::warn!(operation, error = %e, "retriable transaction error; calling again");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// [`Error::ProducerHung`] for the call that did not return, once one has not (see
    /// [`TxProducer::hung`]).
    fn refuse_if_hung(&self) -> Result<(), Error> {
        match *self.hung.lock().unwrap_or_else(PoisonError::into_inner) {
            Some((operation, waited)) => Err(Error::ProducerHung { operation, waited }),
            None => Ok(()),
        }
    }

    /// [`Error::Refused`] for a permission refused to an output of this transaction (see
    /// [`Failures::refused`]), if one was.
    fn refused_delivery(&self, operation: &'static str) -> Option<Error> {
        let source = self.inner.context().failures().refused.take()?;
        crate::error::permission_refused(operation, crate::error::Side::Output, source).ok()
    }

    /// [`Error::MissingTopic`] if the topic of this transaction's first failed delivery does
    /// not exist, or [`Error::Refused`] if this instance may not see it, asked of the cluster's
    /// metadata; `None` if no delivery failed, or the topic is there.
    ///
    /// Why: an output topic nobody created (a typo, a topic not provisioned) fails every
    /// record sent to it, in every retry, and the commit only says that records failed. The
    /// instance aborted and retried, each time after librdkafka had waited `message.timeout.ms`
    /// for the topic; the broker timed its transactions out meanwhile, and after ~55 s it
    /// stopped as fenced by a newer instance, which there was not.
    ///
    /// Asked after any failed delivery, because librdkafka fails the records of a topic that
    /// does not exist as timed out (`_MSG_TIMED_OUT`), as it does records a broker outage kept
    /// from their partition. So the question is bounded by [`TOPIC_QUESTION_TIMEOUT`]: in an
    /// outage it costs the failed commit at most that, and an unanswered question is no answer.
    /// Blocks for one metadata request; on the pipeline's own threads, only on failure.
    fn failed_topic_gone(&self) -> Option<Error> {
        let topic = self.inner.context().failures().topic.take()?;
        match crate::offsets::partitions_within(
            self.inner.client(),
            &self.bootstrap_servers,
            &topic,
            crate::error::Side::Output,
            TOPIC_QUESTION_TIMEOUT,
        ) {
            Err(e @ (Error::MissingTopic { .. } | Error::Refused { .. })) => {
                tracing::error!(topic, error = %e, "an output topic is missing or refused");
                Some(e)
            }
            _ => None,
        }
    }

    /// The partitions where this producer's last transaction, which did not commit, may have
    /// left records that no abort marker ends: every partition where one of its records was
    /// acknowledged (see [`Acked`]), may have been written, or timed out, and every partition
    /// without a leader now of those partitions' topics. Asked after an abort (or a fence),
    /// before the next transaction begins; empty, without a question to the cluster, when the
    /// transaction had no record acknowledged and no delivery failed that way. What it
    /// returns is taken: asked again (the loop asks after an abort and again when it replaces
    /// the producer), it answers for later failures only.
    ///
    /// Why: Kafka 4.x's transaction coordinator skips the markers of a partition that has no
    /// leader when the transaction ends, as if its topic had been deleted (its log: "Couldn't
    /// find leader endpoint for partitions … likely deleted already and hence can be skipped";
    /// KAFKA-20734, open against 4.3.1). The aborted transaction's records in that partition
    /// then stay open in its log, and the **next** marker this producer id writes there decides
    /// them: a commit marker commits them with the next transaction's records. The chaos test
    /// of an output partition without a leader committed 17–19 outputs twice that way in two of
    /// six runs. [`Self::abort_leftovers`] writes an abort marker there first.
    pub(crate) fn leftover_risk(&self) -> BTreeSet<(String, i32)> {
        let mut at_risk = std::mem::take(&mut self.inner.context().failures().failed_partitions);
        at_risk.append(&mut std::mem::take(&mut *self.inner.context().acked()).partitions);
        let topics: BTreeSet<String> = at_risk.iter().map(|(t, _)| t.clone()).collect();
        for topic in topics {
            match self.partition_leaders(&topic) {
                Ok(Some(leaders)) => at_risk.extend(
                    leaders
                        .into_iter()
                        .filter(|(_, leader)| *leader < 0)
                        .map(|(p, _)| (topic.clone(), p)),
                ),
                // A topic that is gone took its records with it; one the cluster did not answer
                // for keeps only the partitions known to be in doubt.
                Ok(None) => {}
                Err(e) => tracing::debug!(topic, error = %e, "no leaders known for a topic"),
            }
        }
        at_risk
    }

    /// Each partition of `topic` with its leader's id (negative: none), by a metadata request
    /// (bounded by [`TOPIC_QUESTION_TIMEOUT`]); `None` if the cluster says the topic is not
    /// there (an error and no partitions).
    fn partition_leaders(&self, topic: &str) -> Result<Option<BTreeMap<i32, i32>>, KafkaError> {
        let metadata = self
            .inner
            .client()
            .fetch_metadata(Some(topic), TOPIC_QUESTION_TIMEOUT)?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none() || !t.partitions().is_empty())
            .map(|t| {
                t.partitions()
                    .iter()
                    .map(|p| (p.id(), p.leader()))
                    .collect()
            }))
    }

    /// Writes an abort marker of this producer id into each of `partitions`, ending whatever an
    /// earlier transaction of the id left open there (see [`Self::leftover_risk`]): a
    /// transaction that sends one record, [`LEFTOVER_KEY`] with an empty value, to each
    /// partition, waits for their acknowledgements and aborts. Read_committed readers never
    /// see those records; read_uncommitted ones do, as they see every aborted record.
    ///
    /// Returns `Ok(false)` while one of the partitions has no leader (having done nothing: the
    /// coordinator would skip its marker again), or when one of the records was not
    /// acknowledged (a leader that has died but is not yet known to be gone: the coordinator
    /// would skip the marker once it is); the caller asks again later. Partitions of a topic
    /// that no longer exists need no marker and are left out.
    pub(crate) fn abort_leftovers(
        &self,
        partitions: &BTreeSet<(String, i32)>,
    ) -> Result<bool, Error> {
        let mut live = BTreeSet::new();
        let topics: BTreeSet<&str> = partitions.iter().map(|(t, _)| t.as_str()).collect();
        for topic in topics {
            let Some(leaders) = self
                .partition_leaders(topic)
                .map_err(|e| Error::kafka("fetching the metadata of an output topic", e))?
            else {
                // Deleted: its partitions' records are gone.
                continue;
            };
            for (_, partition) in partitions.iter().filter(|(name, _)| name == topic) {
                match leaders.get(partition) {
                    Some(leader) if *leader < 0 => return Ok(false),
                    Some(_) => {
                        live.insert((topic.to_owned(), *partition));
                    }
                    None => {}
                }
            }
        }
        if live.is_empty() {
            return Ok(true);
        }
        self.begin()?;
        for (topic, partition) in &live {
            let record = OutputRecord::to(topic.as_str())
                .partition(*partition)
                .key(LEFTOVER_KEY)
                .value(Vec::new());
            if let Err(SendRejected(e)) = self.send(&record, None, None) {
                let _ = self.abort();
                return Err(Error::kafka("sending an abort marker's record", e));
            }
        }
        self.wait_acknowledged(self.call_timeout);
        // Any failure, whatever its error, records its topic.
        let acknowledged =
            self.inner.in_flight_count() == 0 && self.inner.context().failures().topic.is_none();
        self.abort()?;
        // Its own records are ended by the marker it just had written, not leftovers to end
        // again.
        std::mem::take(&mut *self.inner.context().acked());
        if !acknowledged {
            return Ok(false);
        }
        tracing::info!(
            transactional_id = %self.transactional_id,
            partitions = ?live,
            "wrote abort markers into the partitions an aborted transaction wrote to, in case its own were skipped (KAFKA-20734)"
        );
        Ok(true)
    }

    fn error(&self, operation: &'static str, e: KafkaError) -> Error {
        if crate::error::is_unknown_producer_error(&e) {
            self.id_unknown.store(true, Ordering::Relaxed);
        }
        if let Some(hint) = crate::error::refusal_hint(&e) {
            Error::Refused {
                operation,
                hint,
                source: e,
            }
        } else if crate::error::is_fenced_error(&e) {
            Error::Fenced {
                transactional_id: self.transactional_id.clone(),
                source: e,
            }
        } else {
            Error::kafka(operation, e)
        }
    }
}

/// Why a producer call did not succeed.
#[derive(Debug)]
enum CallError {
    /// librdkafka returned this error.
    Kafka(KafkaError),
    /// The call did not return within this long (see [`watched`]).
    Hung(Duration),
    /// The thread of a watched call could not be started, or ended without a result.
    Thread(String),
}

impl From<KafkaError> for CallError {
    fn from(e: KafkaError) -> Self {
        Self::Kafka(e)
    }
}

/// Runs `call` on a thread of its own and waits at most `limit` for it.
///
/// For a librdkafka call that may never return (see [`TxProducer::send_offsets`]). Past
/// `limit` the caller goes on without it: the thread stays parked in librdkafka, holding its
/// own handle to the producer, and finishes (dropping that handle, which destroys the producer
/// if it is the last) if librdkafka ever answers. Nothing it does can then harm the output: the
/// caller replaces the producer, and the new one's `init_transactions` fences the old epoch and
/// aborts its transaction. A thread per call costs tens of microseconds, once per commit.
fn watched<T: Send + 'static>(
    limit: Duration,
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CallError> {
    let started = Instant::now();
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("onceflow-txn-call".into())
        // The call only waits on a condition variable inside librdkafka.
        .stack_size(256 * 1024)
        .spawn(move || {
            let result = call();
            // The caller may have given up waiting; then nobody wants the result.
            let _ = tx.send(result);
        })
        .map_err(|e| CallError::Thread(format!("could not start its thread: {e}")))?;
    match rx.recv_timeout(limit) {
        Ok(result) => Ok(result),
        Err(RecvTimeoutError::Timeout) => Err(CallError::Hung(started.elapsed())),
        Err(RecvTimeoutError::Disconnected) => {
            Err(CallError::Thread("its thread panicked".to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::mocking::{MockCluster, MockCoordinator};

    #[test]
    fn a_watched_call_returns_its_result_or_is_given_up_after_the_limit() {
        let quick = watched(Duration::from_secs(5), || 7);
        assert!(matches!(quick, Ok(7)));

        let (release, parked) = mpsc::channel::<()>();
        let started = Instant::now();
        let stuck = watched(Duration::from_millis(200), move || parked.recv().is_ok());
        assert!(
            matches!(stuck, Err(CallError::Hung(waited)) if waited >= Duration::from_millis(200)),
            "{stuck:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // The abandoned thread finishes once its call returns.
        drop(release);

        let panicked = watched(Duration::from_secs(5), || panic!("inside the call"));
        assert!(
            matches!(panicked, Err(CallError::Thread(_))),
            "{panicked:?}"
        );
    }

    /// A pipeline configuration for instance "0" of `app` on `mock`.
    fn mock_config(
        mock: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        app: &str,
        transaction_timeout: Duration,
    ) -> crate::config::PipelineConfigBuilder {
        PipelineConfig::builder()
            .bootstrap_servers(mock.bootstrap_servers())
            .application_id(app)
            .instance_id("0")
            .input_topic("in")
            .transaction_timeout(transaction_timeout)
    }

    /// A producer on a one-broker mock cluster (fault injection only) whose retries wait 5 s, so
    /// that a record whose first produce request failed sits in the queue, sent once, when the
    /// test aborts.
    fn producer_with_slow_retries(
        mock: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        app: &str,
    ) -> Result<TxProducer, Box<dyn std::error::Error>> {
        mock.create_topic("out", 1, 1)?;
        let config = mock_config(mock, app, Duration::from_secs(30))
            .producer_property("linger.ms", "0")
            .producer_property("retry.backoff.ms", "5000")
            .producer_property("retry.backoff.max.ms", "5000")
            .build()?;
        Ok(TxProducer::create_and_init(
            &config,
            &config.transactional_id(),
        )?)
    }

    /// A consumer of group `app` on `mock`, for the group metadata that offsets are sent with.
    fn group_consumer(
        mock: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        app: &str,
    ) -> Result<BaseConsumer, Box<dyn std::error::Error>> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("group.id", app)
            .create()?)
    }

    /// Begins a transaction on a new producer of instance "0" of `app` on `mock` and sends it
    /// offsets, whose registration (`AddOffsetsToTxn`) the coordinator answers with `refusal`.
    /// Returns the producer and what `send_offsets` returned.
    fn offsets_refused_with(
        mock: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        app: &str,
        refusal: rdkafka::types::RDKafkaRespErr,
    ) -> Result<(TxProducer, Result<(), Error>), Box<dyn std::error::Error>> {
        let config = mock_config(mock, app, Duration::from_secs(30)).build()?;
        mock.create_topic("in", 1, 1)?;
        let consumer = group_consumer(mock, app)?;
        let offsets = BTreeMap::from([(("in".to_owned(), 0), 42)]);
        let group = consumer.group_metadata().ok_or("no group metadata")?;
        let producer = TxProducer::create_and_init(&config, &config.transactional_id())?;
        producer.begin()?;
        mock.request_errors(rdkafka::types::RDKafkaApiKey::AddOffsetsToTxn, &[refusal]);
        let sent = producer.send_offsets(&offsets, group);
        Ok((producer, sent))
    }

    /// Begins a transaction on `producer` (see [`producer_with_slow_retries`]) whose first
    /// produce request "times out" at the broker — the records may be in the log, and
    /// librdkafka queues them for a retry in 5 s — and aborts it a second later. Returns what
    /// the abort returned.
    fn abort_after_an_answer_was_lost(
        mock: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        producer: &TxProducer,
    ) -> Result<Result<(), Error>, Box<dyn std::error::Error>> {
        producer.begin()?;
        mock.request_errors(
            rdkafka::types::RDKafkaApiKey::Produce,
            &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT],
        );
        send_some(producer)?;
        #[expect(clippy::disallowed_methods, reason = "a plain test thread")]
        std::thread::sleep(Duration::from_secs(1));
        Ok(producer.abort())
    }

    fn send_some(producer: &TxProducer) -> Result<(), Box<dyn std::error::Error>> {
        for i in 0..10u8 {
            let record = OutputRecord::to("out").value(vec![i]);
            producer.send(&record, None, None).map_err(|e| e.0)?;
        }
        Ok(())
    }

    /// Outputs queued before librdkafka knew their topic, which the broker then refused this
    /// principal (`TOPIC_AUTHORIZATION_FAILED` in the topic's metadata): librdkafka fails them
    /// in their delivery reports and the commit only as "messages failed delivery", an
    /// abortable error that, aborted and retried, would fail again. The commit must say
    /// `Error::Refused`, naming the permission. Against the real broker, with ACLs:
    /// `integration-tests/tests/authorization.rs`.
    #[test]
    fn a_commit_whose_outputs_were_refused_their_topic_is_refused()
    -> Result<(), Box<dyn std::error::Error>> {
        let mock = MockCluster::new(1)?;
        mock.create_topic("out", 1, 1)?;
        mock.topic_error(
            "out",
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )?;
        let config = mock_config(&mock, "refused-topic", Duration::from_secs(30)).build()?;
        let producer = TxProducer::create_and_init(&config, &config.transactional_id())?;
        producer.begin()?;
        // Queued at once: librdkafka has not asked for this topic's metadata yet.
        send_some(&producer)?;
        let committed = producer.commit();
        assert!(
            matches!(&committed, Err(Error::Refused { operation: "commit_transaction", source, .. })
                if source.rdkafka_error_code() == Some(RDKafkaErrorCode::TopicAuthorizationFailed)),
            "{committed:?}"
        );
        // The next transaction starts with no refusal remembered.
        producer.abort()?;
        producer.begin()?;
        let failures = producer.inner.context().failures();
        assert!(failures.refused.is_none() && failures.topic.is_none());
        Ok(())
    }

    #[test]
    fn an_abort_after_records_were_sent_but_not_acknowledged_retires_the_producer()
    -> Result<(), Box<dyn std::error::Error>> {
        let mock = MockCluster::new(1)?;
        let producer = producer_with_slow_retries(&mock, "unsafe-after-abort")?;
        let result = abort_after_an_answer_was_lost(&mock, &producer)?;
        assert!(
            matches!(result, Err(Error::UnsafeAfterAbort { records: 10 })),
            "{result:?}"
        );
        Ok(())
    }

    /// Where a transaction that did not commit may have left records that no abort marker
    /// ends (see [`TxProducer::leftover_risk`]): the partition of records that were
    /// acknowledged, or may have been written, is noted; records an abort purged before they
    /// were ever sent, in a partition where the transaction has nothing acknowledged, note
    /// nothing. And the abort marker of the runtime's own
    /// ([`TxProducer::abort_leftovers`]) begins no transaction while the partition has no
    /// leader — the broker would skip its marker as well — and is written once it has one.
    /// Against the real broker, where the marker matters:
    /// `an_output_partition_leaderless_past_the_transaction_timeout_stalls_then_resumes` in
    /// `integration-tests/tests/chaos.rs`.
    #[test]
    fn leftovers_are_noted_where_records_may_be_and_ended_once_their_partition_has_a_leader()
    -> Result<(), Box<dyn std::error::Error>> {
        let mock = MockCluster::new(1)?;
        let producer = producer_with_slow_retries(&mock, "leftovers")?;

        // Purged by the abort before they were ever sent (queued for a partition without a
        // leader): nothing to end.
        mock.partition_leader("out", 0, None)?;
        producer.begin()?;
        send_some(&producer)?;
        producer.abort()?;
        assert!(producer.leftover_risk().is_empty());
        mock.partition_leader("out", 0, Some(1))?;

        // Acknowledged, then aborted (a processor's `retry`, or a commit given up while
        // another partition's broker was dying): the partition is noted — the coordinator
        // skips the marker of a partition it finds no leader for, and nothing need have failed
        // here first.
        producer.begin()?;
        send_some(&producer)?;
        producer.wait_acknowledged(Duration::from_secs(10));
        assert_eq!(producer.inner.in_flight_count(), 0, "acknowledged");
        producer.abort()?;
        assert_eq!(
            producer.leftover_risk(),
            BTreeSet::from([("out".to_owned(), 0)])
        );
        // Taken: asked again, it answers for later transactions only.
        assert!(producer.leftover_risk().is_empty());

        // Sent, their answer lost: the partition is noted.
        assert!(matches!(
            abort_after_an_answer_was_lost(&mock, &producer)?,
            Err(Error::UnsafeAfterAbort { .. })
        ));
        let risk = producer.leftover_risk();
        assert_eq!(risk, BTreeSet::from([("out".to_owned(), 0)]));

        // As the loop does: a new producer with the same id ends them.
        drop(producer);
        let config = mock_config(&mock, "leftovers", Duration::from_secs(30)).build()?;
        let fresh = TxProducer::create_and_init(&config, &config.transactional_id())?;
        mock.partition_leader("out", 0, None)?;
        assert!(!fresh.abort_leftovers(&risk)?);
        assert!(
            fresh.uncommitted_since().is_none(),
            "no transaction may begin while the partition has no leader"
        );
        mock.partition_leader("out", 0, Some(1))?;
        assert!(fresh.abort_leftovers(&risk)?);
        assert!(fresh.leftover_risk().is_empty());
        Ok(())
    }

    /// A transaction whose offsets the coordinator refused because it does not know the
    /// producer's id (as after `transactional.id.expiration.ms`): the abort succeeds, and says
    /// that the producer must be initialised again — librdkafka does not get a new id after
    /// this refusal, so the next transaction would be refused too. Against the real broker:
    /// `an_idle_instance_whose_next_transactions_carry_only_offsets_goes_on` in
    /// `integration-tests/tests/exactly_once.rs`.
    #[test]
    fn an_abort_after_the_coordinator_forgot_the_producer_id_retires_the_producer()
    -> Result<(), Box<dyn std::error::Error>> {
        let mock = MockCluster::new(1)?;
        let (producer, sent) = offsets_refused_with(
            &mock,
            "producer-id-unknown",
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_PRODUCER_ID_MAPPING,
        )?;
        assert!(
            matches!(&sent, Err(e) if e.class() == ErrorClass::Abortable),
            "{sent:?}"
        );
        let aborted = producer.abort();
        assert!(
            matches!(&aborted, Err(Error::ProducerIdUnknown { transactional_id })
                if transactional_id == producer.transactional_id()),
            "{aborted:?}"
        );
        Ok(())
    }

    /// A permission the coordinator refuses (here the group's: `GROUP_AUTHORIZATION_FAILED` on
    /// `AddOffsetsToTxn`, which librdkafka flags abortable) is a refusal every later
    /// transaction would meet too: it fails as [`Error::Refused`], fatal, so that the loop
    /// stops instead of aborting every commit interval. The refused outputs' case, against the
    /// real broker: `an_output_too_large_for_its_topic_stops_the_instance_and_a_restart_goes_on`
    /// in `integration-tests/tests/exactly_once.rs`.
    #[test]
    fn a_missing_group_permission_is_a_refusal_not_an_abort_to_repeat()
    -> Result<(), Box<dyn std::error::Error>> {
        let mock = MockCluster::new(1)?;
        let (producer, sent) = offsets_refused_with(
            &mock,
            "group-authorization",
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED,
        )?;
        assert!(
            matches!(&sent, Err(e @ Error::Refused { operation: "send_offsets_to_transaction", .. })
                if e.class() == ErrorClass::Fatal && e.to_string().contains("READ on the group")),
            "{sent:?}"
        );
        // What the loop does before it stops: the abort succeeds and keeps nothing open.
        producer.abort()?;
        Ok(())
    }

    /// What tells a broker-side transaction timeout from fencing: the time since the first
    /// transaction begun after the producer's last commit. Aborts do not reset it (librdkafka
    /// can leave an aborted transaction open at the coordinator, see `uncommitted_since`); a
    /// commit does.
    #[test]
    fn only_a_commit_resets_the_time_a_producer_has_gone_uncommitted()
    -> Result<(), Box<dyn std::error::Error>> {
        let mock = MockCluster::new(1)?;
        let producer = producer_with_slow_retries(&mock, "uncommitted-since")?;
        assert_eq!(producer.uncommitted_since(), None, "a new producer");

        producer.begin()?;
        let first = producer.uncommitted_since().ok_or("no time after begin")?;
        send_some(&producer)?;
        producer.abort()?;
        assert_eq!(producer.uncommitted_since(), Some(first), "after an abort");

        producer.begin()?;
        assert_eq!(
            producer.uncommitted_since(),
            Some(first),
            "a later transaction keeps the first one's time"
        );
        send_some(&producer)?;
        producer.commit()?;
        assert_eq!(producer.uncommitted_since(), None, "after a commit");

        producer.begin()?;
        assert!(
            producer.uncommitted_since().is_some_and(|t| t > first),
            "the next transaction starts the clock again"
        );
        producer.abort()?;
        Ok(())
    }

    /// The question the loop asks of its other producer before it takes a fence for the
    /// broker's timeout leaves nothing behind: no transaction open, no time gone uncommitted.
    /// Only that here — the mock cluster does not check producer epochs on `AddOffsetsToTxn`,
    /// so the answer for a fenced producer is proven against the real broker, by
    /// `a_zombie_paused_past_the_transaction_timeout_stops_and_the_newer_instance_runs_on` in
    /// `integration-tests/tests/exactly_once.rs`.
    #[test]
    fn asking_whether_a_producer_holds_its_id_leaves_no_transaction_behind()
    -> Result<(), Box<dyn std::error::Error>> {
        let mock = MockCluster::new(1)?;
        let app = "holds-its-id";
        let config = mock_config(&mock, app, Duration::from_secs(30)).build()?;
        mock.create_topic("in", 1, 1)?;
        mock.create_topic("out", 1, 1)?;
        let consumer = group_consumer(&mock, app)?;
        let offsets = BTreeMap::from([(("in".to_owned(), 0), 42)]);
        let group = || consumer.group_metadata().ok_or("no group metadata");

        let producer = TxProducer::create_and_init(&config, &config.transactional_id())?;
        assert!(
            producer.holds_its_id(&offsets, group()?)?,
            "alone with its id"
        );
        assert_eq!(
            producer.uncommitted_since(),
            None,
            "the question is no transaction"
        );
        assert!(producer.holds_its_id(&offsets, group()?)?, "asked again");
        // A transaction can follow at once, and commit.
        producer.begin()?;
        send_some(&producer)?;
        producer.send_offsets(&offsets, group()?)?;
        producer.commit()?;
        assert_eq!(producer.uncommitted_since(), None, "after the commit");
        Ok(())
    }

    #[test]
    fn an_abort_of_records_never_sent_keeps_the_producer() -> Result<(), Box<dyn std::error::Error>>
    {
        let mock = MockCluster::new(1)?;
        let producer = producer_with_slow_retries(&mock, "safe-abort")?;
        producer.begin()?;
        send_some(&producer)?;
        producer.abort()?;
        // And again, after the records of a transaction were acknowledged.
        producer.begin()?;
        send_some(&producer)?;
        producer.wait_acknowledged(Duration::from_secs(10));
        producer.abort()?;
        Ok(())
    }

    /// librdkafka's mock cluster, used only to inject the fault: the group coordinator's broker
    /// goes down in the middle of a transaction. librdkafka 2.12.1 then never answers
    /// `send_offsets_to_transaction` (confluentinc/librdkafka#5456); without the watchdog this
    /// test hangs instead of failing.
    #[test]
    fn send_offsets_that_librdkafka_never_answers_fails_as_hung_not_for_ever()
    -> Result<(), Box<dyn std::error::Error>> {
        let mock = MockCluster::new(3)?;
        let app = "hung-send-offsets";
        let config = mock_config(&mock, app, Duration::from_secs(2)).build()?;
        mock.create_topic("in", 1, 3)?;
        mock.coordinator(MockCoordinator::Transaction(config.transactional_id()), 1)?;
        mock.coordinator(MockCoordinator::Group(app.to_owned()), 2)?;

        let producer = TxProducer::create_and_init(&config, &config.transactional_id())?;
        let consumer = group_consumer(&mock, app)?;
        let group = consumer.group_metadata().ok_or("no group metadata")?;
        producer.begin()?;
        mock.broker_down(2)?;

        let started = Instant::now();
        let offsets = BTreeMap::from([(("in".to_owned(), 0), 42)]);
        let result = producer.send_offsets(&offsets, group);
        let waited = started.elapsed();
        assert!(
            matches!(
                result,
                Err(Error::ProducerHung {
                    operation: "send_offsets_to_transaction",
                    ..
                })
            ),
            "{result:?}"
        );
        assert!(waited >= Duration::from_secs(2) + HUNG_GRACE, "{waited:?}");
        assert!(
            waited < Duration::from_secs(2) + HUNG_GRACE * 2,
            "{waited:?}"
        );
        // librdkafka still holds the stuck call: every later call of this producer fails as
        // hung at once (the loop replaces the producer on that), not as a conflict with the
        // stuck call (which the loop stops on).
        let next = Instant::now();
        for later in [
            producer.begin(),
            producer.abort(),
            producer.commit().map(drop),
        ] {
            assert!(
                matches!(
                    later,
                    Err(Error::ProducerHung {
                        operation: "send_offsets_to_transaction",
                        ..
                    })
                ),
                "{later:?}"
            );
        }
        assert!(
            next.elapsed() < Duration::from_secs(1),
            "{:?}",
            next.elapsed()
        );
        // Let the abandoned call finish, so its thread ends with the test.
        mock.broker_up(2)?;
        Ok(())
    }

    /// Before the guard in `send`, this record waited for room in the queue for ever.
    #[test]
    fn a_record_larger_than_the_whole_producer_queue_is_rejected_not_waited_for()
    -> Result<(), Box<dyn std::error::Error>> {
        let mock = MockCluster::new(1)?;
        mock.create_topic("out", 1, 1)?;
        let config = mock_config(&mock, "record-larger-than-queue", Duration::from_secs(30))
            .producer_property("queue.buffering.max.kbytes", "1")
            .build()?;
        let producer = TxProducer::create_and_init(&config, &config.transactional_id())?;
        producer.begin()?;
        producer
            .send(&OutputRecord::to("out").value(vec![1u8; 100]), None, None)
            .map_err(|e| e.0)?;

        // On a thread of its own, so that a send waiting for ever fails the test rather than
        // hanging it.
        let big = OutputRecord::to("out").value(vec![2u8; 4096]);
        let (done, result) = mpsc::channel();
        std::thread::spawn(move || {
            let sent = producer.send(&big, None, None);
            let _ = done.send((producer, sent));
        });
        let (producer, sent) = result
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| "send still waiting after 20 s for room that never comes")?;
        match sent {
            Err(SendRejected(e)) => {
                assert_eq!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::QueueFull));
            }
            Ok(()) => return Err("a 4 KiB record fit a 1 KiB queue".into()),
        }
        producer.abort()?;
        Ok(())
    }

    #[test]
    fn linger_is_a_fifth_of_the_commit_interval_within_bounds() {
        assert_eq!(
            default_linger(Duration::from_millis(100)),
            Duration::from_millis(20)
        );
        assert_eq!(
            default_linger(Duration::from_millis(2)),
            Duration::from_millis(1)
        );
        assert_eq!(
            default_linger(Duration::from_secs(1)),
            Duration::from_millis(20)
        );
    }
}
