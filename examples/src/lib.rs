//! The order-events example, shared by the example binaries and the demo.
//!
//! Users' shop events (view product, add to cart, checkout, payment succeeded, order created,
//! shipped, delivered, refunded) are keyed by user id, so each user's events stay in order on one
//! partition. The [`OrderProcessor`] validates and enriches every event into the `orders` topic and
//! turns money events into ledger entries (payments, refunds, loyalty points) in the `ledger`
//! topic. Everything it emits is derived from the input alone — ids come from the event, amounts
//! from its fields — so a replay writes the same ledger. Invalid events go to the dead-letter
//! topic with the reason.

use onceflow::{Output, OutputRecord, ProcessError, Processor, Record};
use serde::{Deserialize, Serialize};

/// Header: a trace id that follows an event through every topic.
pub const HEADER_TRACE_ID: &str = "trace_id";
/// Header: the event's schema version.
pub const HEADER_SCHEMA_VERSION: &str = "schema_version";
/// Header: the event type.
pub const HEADER_EVENT_TYPE: &str = "event_type";
/// Header: the producing service.
pub const HEADER_SOURCE: &str = "source";

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// Looked at a product.
    ViewProduct,
    /// Put a product in the cart.
    AddToCart,
    /// Started checking out.
    Checkout,
    /// The payment went through.
    PaymentSucceeded,
    /// The order exists.
    OrderCreated,
    /// It left the warehouse.
    Shipped,
    /// It arrived.
    Delivered,
    /// Money went back to the user.
    Refunded,
}

impl EventType {
    /// The name used in headers.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ViewProduct => "view_product",
            Self::AddToCart => "add_to_cart",
            Self::Checkout => "checkout",
            Self::PaymentSucceeded => "payment_succeeded",
            Self::OrderCreated => "order_created",
            Self::Shipped => "shipped",
            Self::Delivered => "delivered",
            Self::Refunded => "refunded",
        }
    }
}

/// One user event, as produced to the input topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEvent {
    /// Unique event id.
    pub event_id: u64,
    /// The user (also the record key).
    pub user_id: String,
    /// What happened.
    pub event_type: EventType,
    /// The order, for order events.
    pub order_id: Option<String>,
    /// The product, for product events.
    pub product_id: Option<String>,
    /// Amount in cents, for money events.
    pub amount_cents: Option<i64>,
    /// Position in this user's event sequence (0, 1, 2, ...).
    pub seq: u64,
}

/// A validated, enriched event in the `orders` topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderUpdate {
    /// The input event's id.
    pub event_id: u64,
    /// The user.
    pub user_id: String,
    /// The event type.
    pub event_type: EventType,
    /// The order, if any.
    pub order_id: Option<String>,
    /// The order's status after this event.
    pub status: String,
    /// The user's event sequence number.
    pub seq: u64,
}

/// A money movement in the `ledger` topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Deterministic id: `<event id>-<kind>`, so a replay writes the same entry.
    pub entry_id: String,
    /// The user.
    pub user_id: String,
    /// The order.
    pub order_id: String,
    /// `payment`, `refund` or `loyalty_points`.
    pub kind: String,
    /// Signed cents from the shop's point of view (payments positive, refunds negative);
    /// for loyalty points, the points.
    pub amount: i64,
}

/// Validates, enriches, and books money movements. See the [crate docs](crate).
#[derive(Debug, Clone)]
pub struct OrderProcessor {
    /// The `orders` output topic.
    pub orders_topic: String,
    /// The `ledger` output topic.
    pub ledger_topic: String,
}

fn status_of(t: EventType) -> &'static str {
    match t {
        EventType::ViewProduct | EventType::AddToCart => "browsing",
        EventType::Checkout => "checking_out",
        EventType::PaymentSucceeded => "paid",
        EventType::OrderCreated => "created",
        EventType::Shipped => "shipped",
        EventType::Delivered => "delivered",
        EventType::Refunded => "refunded",
    }
}

/// Why an event is invalid, if it is.
fn invalid(e: &OrderEvent) -> Option<String> {
    if e.user_id.trim().is_empty() {
        return Some("empty user_id".into());
    }
    let needs_order = !matches!(e.event_type, EventType::ViewProduct | EventType::AddToCart);
    if needs_order && e.order_id.as_deref().is_none_or(str::is_empty) {
        return Some(format!("{} without an order_id", e.event_type.as_str()));
    }
    match (e.event_type, e.amount_cents) {
        (EventType::PaymentSucceeded | EventType::Refunded, None) => {
            Some(format!("{} without an amount", e.event_type.as_str()))
        }
        (_, Some(a)) if a <= 0 => Some(format!("non-positive amount {a}")),
        _ => None,
    }
}

#[onceflow::async_trait]
impl Processor for OrderProcessor {
    type Input = OrderEvent;

    async fn process(&self, r: &Record<OrderEvent>, out: &mut Output) -> Result<(), ProcessError> {
        let e = &r.value;
        if let Some(reason) = invalid(e) {
            return Err(ProcessError::dead_letter(reason));
        }
        let key = e.user_id.as_str();
        // The trace id travels with everything this event causes.
        let traced = |record: OutputRecord| -> OutputRecord {
            match r.headers.get(HEADER_TRACE_ID) {
                Some(t) => record.header(HEADER_TRACE_ID, t),
                None => record,
            }
        };
        let update = OrderUpdate {
            event_id: e.event_id,
            user_id: e.user_id.clone(),
            event_type: e.event_type,
            order_id: e.order_id.clone(),
            status: status_of(e.event_type).to_owned(),
            seq: e.seq,
        };
        out.send(traced(
            OutputRecord::to(&self.orders_topic)
                .key(key)
                .json(&update)?,
        ));

        let order_id = e.order_id.clone().unwrap_or_default();
        let mut book = |kind: &str, amount: i64| -> Result<(), ProcessError> {
            let entry = LedgerEntry {
                entry_id: format!("{}-{kind}", e.event_id),
                user_id: e.user_id.clone(),
                order_id: order_id.clone(),
                kind: kind.to_owned(),
                amount,
            };
            out.send(traced(
                OutputRecord::to(&self.ledger_topic).key(key).json(&entry)?,
            ));
            Ok(())
        };
        match (e.event_type, e.amount_cents) {
            (EventType::PaymentSucceeded, Some(a)) => book("payment", a)?,
            (EventType::Refunded, Some(a)) => book("refund", -a)?,
            // One loyalty point per whole currency unit of the order, booked on delivery.
            (EventType::Delivered, Some(a)) => book("loyalty_points", a / 100)?,
            _ => {}
        }
        Ok(())
    }
}

/// A deterministic generator of realistic event streams: each user walks the funnel
/// view → cart → checkout → paid → created → shipped → delivered (some get refunded), and
/// `invalid_every` events (0 for none) is malformed on purpose.
#[derive(Debug, Clone)]
pub struct EventGenerator {
    users: u64,
    state: u64,
    next_id: u64,
    /// Per user: (funnel step, orders completed).
    steps: std::collections::HashMap<u64, (u64, u64)>,
    /// Per user: the next sequence number.
    seqs: std::collections::HashMap<u64, u64>,
    invalid_every: u64,
}

impl EventGenerator {
    /// `users` users, a fixed seed.
    #[must_use]
    pub fn new(users: u64, seed: u64, invalid_every: u64) -> Self {
        Self {
            users: users.max(1),
            state: seed | 1,
            next_id: 0,
            steps: std::collections::HashMap::new(),
            seqs: std::collections::HashMap::new(),
            invalid_every,
        }
    }

    fn rand(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// The next event, with its trace id.
    pub fn next_event(&mut self) -> (OrderEvent, String) {
        let user = self.rand() % self.users;
        let id = self.next_id;
        self.next_id += 1;
        let (step, orders) = self.steps.get(&user).copied().unwrap_or((0, 0));
        let order_id = format!("o-{user}-{orders}");
        let amount = 500 + (self.rand() % 20_000) as i64;
        let funnel = [
            EventType::ViewProduct,
            EventType::AddToCart,
            EventType::Checkout,
            EventType::PaymentSucceeded,
            EventType::OrderCreated,
            EventType::Shipped,
            EventType::Delivered,
        ];
        let mut event_type = funnel[(step % 7) as usize];
        if event_type == EventType::Delivered && self.rand().is_multiple_of(10) {
            event_type = EventType::Refunded;
        }
        let next_step = (step + 1) % 7;
        let seq = {
            let s = self.seqs.entry(user).or_default();
            *s += 1;
            *s - 1
        };
        self.steps
            .insert(user, (next_step, orders + u64::from(next_step == 0)));
        let mut e = OrderEvent {
            event_id: id,
            user_id: format!("user-{user}"),
            event_type,
            order_id: (step % 7 >= 2).then(|| order_id.clone()),
            product_id: (step % 7 < 2).then(|| format!("p-{}", self.rand() % 500)),
            amount_cents: matches!(
                event_type,
                EventType::PaymentSucceeded | EventType::Refunded | EventType::Delivered
            )
            .then_some(amount),
            seq,
        };
        if self.invalid_every > 0 && id % self.invalid_every == self.invalid_every - 1 {
            e.amount_cents = Some(-1);
        }
        (e, format!("trace-{id:016x}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(e: OrderEvent) -> Record<OrderEvent> {
        Record::new("events", 0, 7, e).with_header(HEADER_TRACE_ID, "t-1")
    }

    fn processor() -> OrderProcessor {
        OrderProcessor {
            orders_topic: "orders".into(),
            ledger_topic: "ledger".into(),
        }
    }

    #[tokio::test]
    async fn a_payment_books_the_ledger_and_keeps_the_trace() {
        let e = OrderEvent {
            event_id: 42,
            user_id: "user-1".into(),
            event_type: EventType::PaymentSucceeded,
            order_id: Some("o-1".into()),
            product_id: None,
            amount_cents: Some(1999),
            seq: 3,
        };
        let mut out = Output::new();
        processor().process(&record(e), &mut out).await.unwrap();
        let records = out.records();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].topic(), "orders");
        let entry: LedgerEntry = serde_json::from_slice(records[1].value_bytes().unwrap()).unwrap();
        assert_eq!(entry.entry_id, "42-payment");
        assert_eq!(entry.amount, 1999);
        assert_eq!(records[1].key_bytes(), Some(&b"user-1"[..]));
    }

    #[tokio::test]
    async fn invalid_events_are_dead_lettered_with_a_reason() {
        let e = OrderEvent {
            event_id: 1,
            user_id: "user-1".into(),
            event_type: EventType::Refunded,
            order_id: Some("o-1".into()),
            product_id: None,
            amount_cents: Some(-1),
            seq: 0,
        };
        let err = processor()
            .process(&record(e), &mut Output::new())
            .await
            .unwrap_err();
        assert_eq!(
            err.disposition(),
            onceflow::processor::Disposition::DeadLetter
        );
        assert!(err.to_string().contains("non-positive"));
    }

    #[test]
    fn the_generator_is_deterministic_and_walks_the_funnel() {
        let mut a = EventGenerator::new(10, 7, 0);
        let mut b = EventGenerator::new(10, 7, 0);
        let xs: Vec<_> = (0..200).map(|_| a.next_event()).collect();
        let ys: Vec<_> = (0..200).map(|_| b.next_event()).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|(e, _)| invalid(&e.clone()).is_none()));
        let per_user = xs.iter().filter(|(e, _)| e.user_id == "user-3").count();
        let seqs: Vec<u64> = xs
            .iter()
            .filter(|(e, _)| e.user_id == "user-3")
            .map(|(e, _)| e.seq)
            .collect();
        assert_eq!(seqs, (0..per_user as u64).collect::<Vec<_>>());
    }
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    /// The repair group.
    pub group: String,
    /// Per partition: where the replay started and the end it stopped at.
    pub ranges: std::collections::BTreeMap<i32, (i64, i64)>,
    /// Input records replayed.
    pub records: i64,
}

/// Where to replay from and to.
#[derive(Debug, Clone)]
pub struct ReplayPlan {
    /// Kafka bootstrap servers.
    pub bootstrap_servers: String,
    /// The input topic to re-process.
    pub input: String,
    /// Re-process records from this time on (ms since the epoch).
    pub from_ms: i64,
    /// The repair group (its own, never production's).
    pub group: String,
    /// Where the repaired output goes.
    pub processor: OrderProcessor,
    /// Dead letters of the replay.
    pub dead_letter_topic: String,
}

/// Re-processes `plan.input` from `plan.from_ms` up to the end offsets seen at the start, under
/// its own consumer group, into the repair topics, exactly once; then stops. Production's group
/// and topics are not touched.
pub async fn replay(plan: ReplayPlan) -> anyhow::Result<ReplaySummary> {
    use onceflow::offsets::{self, Connection, ResetPlan};
    let conn = Connection::new(&plan.bootstrap_servers);
    let (c, input, group, from) = (
        conn.clone(),
        plan.input.clone(),
        plan.group.clone(),
        plan.from_ms,
    );
    // Start offsets: the first record at or after the time; a partition with none starts at
    // its end (nothing to replay there).
    let ranges = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let starts = offsets::offsets_for_time(&c, &input, from)?;
        let now = offsets::topic_offsets(&c, &input, Some(&group))?;
        if now.iter().any(|p| p.committed.is_some()) {
            anyhow::bail!(
                "group {group} already has committed offsets; a replay needs a fresh group"
            );
        }
        let mut reset = Vec::new();
        let mut ranges = std::collections::BTreeMap::new();
        for p in &now {
            let start = starts
                .get(&p.partition)
                .copied()
                .flatten()
                .unwrap_or(p.last_stable);
            reset.push(ResetPlan {
                partition: p.partition,
                current: None,
                target: start,
                earliest: p.earliest,
                last_stable: p.last_stable,
            });
            ranges.insert(p.partition, (start, p.last_stable));
        }
        offsets::execute_reset(&c, &group, &input, &reset)?;
        Ok(ranges)
    })
    .await??;

    let config = onceflow::PipelineConfig::builder()
        .bootstrap_servers(&plan.bootstrap_servers)
        .application_id(&plan.group)
        .instance_id("replay")
        .input_topic(&plan.input)
        .dead_letter_topic(&plan.dead_letter_topic)
        .build()?;
    let pipeline = onceflow::Pipeline::new(config, plan.processor.clone());
    let stop = pipeline.shutdown_handle();
    let running = tokio::spawn(pipeline.run());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let (c, input, group) = (conn.clone(), plan.input.clone(), plan.group.clone());
        let now =
            tokio::task::spawn_blocking(move || offsets::topic_offsets(&c, &input, Some(&group)))
                .await??;
        let done = now.iter().all(|p| {
            let end = ranges.get(&p.partition).map_or(0, |r| r.1);
            p.committed.is_some_and(|c| c >= end)
        });
        if done {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the replay made no progress"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    stop.shutdown();
    running.await??;
    let records = ranges.values().map(|(s, e)| e - s).sum();
    Ok(ReplaySummary {
        group: plan.group,
        ranges,
        records,
    })
}

/// Produces `n` generated order events to `topic` the way a shop's producer should: keyed by
/// user id with Java-compatible routing, with the four headers, idempotent, batched and
/// compressed. About 1% are invalid on purpose. Returns the ledger total (payments − refunds,
/// in cents) the events must produce.
pub async fn produce_order_events(
    bootstrap_servers: &str,
    topic: &str,
    n: u64,
    show_progress: bool,
) -> anyhow::Result<i64> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use std::io::Write as _;

    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "10")
        .set("batch.size", "262144")
        .set("compression.type", "lz4")
        .create()?;
    let mut generator = EventGenerator::new(1_000, 42, 97);
    let mut expected = 0i64;
    let mut pending = Vec::new();
    for i in 0..n {
        let (event, trace) = generator.next_event();
        match (event.event_type, event.amount_cents) {
            (EventType::PaymentSucceeded, Some(a)) if a > 0 => expected += a,
            (EventType::Refunded, Some(a)) if a > 0 => expected -= a,
            _ => {}
        }
        let value = serde_json::to_vec(&event)?;
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: HEADER_TRACE_ID,
                value: Some(&trace),
            })
            .insert(Header {
                key: HEADER_SCHEMA_VERSION,
                value: Some("1"),
            })
            .insert(Header {
                key: HEADER_EVENT_TYPE,
                value: Some(event.event_type.as_str()),
            })
            .insert(Header {
                key: HEADER_SOURCE,
                value: Some("onceflow-example"),
            });
        let (p, topic, key) = (producer.clone(), topic.to_owned(), event.user_id.clone());
        pending.push(async move {
            p.send(
                FutureRecord::to(&topic)
                    .key(&key)
                    .payload(&value)
                    .headers(headers),
                std::time::Duration::from_secs(60),
            )
            .await
            .map_err(|(e, _)| e)
        });
        if pending.len() == 2_000 || i + 1 == n {
            for r in futures::future::join_all(pending.drain(..)).await {
                r?;
            }
            if show_progress {
                print!("\r      {} / {n}", i + 1);
                let _ = std::io::stdout().flush();
            }
        }
    }
    if show_progress {
        println!();
    }
    Ok(expected)
}

/// Runs the order pipeline until SIGINT/SIGTERM.
pub async fn run_order_pipeline(
    bootstrap_servers: &str,
    application_id: &str,
    instance_id: &str,
    input: &str,
    dead_letter_topic: &str,
    processor: OrderProcessor,
) -> anyhow::Result<onceflow::RunSummary> {
    let config = onceflow::PipelineConfig::builder()
        .bootstrap_servers(bootstrap_servers)
        .application_id(application_id)
        .instance_id(instance_id)
        .input_topic(input)
        .dead_letter_topic(dead_letter_topic)
        .build()?;
    Ok(onceflow::Pipeline::new(config, processor)
        .run_until_signal()
        .await?)
}
