//! The replay example against a real broker: records after the time are re-processed exactly
//! once into the repair topics; production's group is not touched.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use onceflow::testkit::{self, Isolation, Kafka};
use onceflow_examples::{EventGenerator, OrderProcessor, OrderUpdate, ReplayPlan, replay};
use rdkafka::producer::{FutureProducer, FutureRecord};

fn unique(name: &str) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{}-{t}", std::process::id())
}

async fn produce(
    producer: &FutureProducer,
    topic: &str,
    g: &mut EventGenerator,
    n: usize,
) -> Vec<u64> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let (e, _) = g.next_event();
        ids.push(e.event_id);
        let value = serde_json::to_vec(&e).unwrap();
        producer
            .send(
                FutureRecord::to(topic).key(&e.user_id).payload(&value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_a_time_reprocesses_exactly_the_later_records_into_repair_topics() {
    let kafka = Kafka::shared().await.expect("broker");
    let b = kafka.bootstrap_servers().to_owned();
    let [input, orders, ledger, dlq] =
        ["rp-events", "rp-orders", "rp-ledger", "rp-dlq"].map(unique);
    for t in [&input, &orders, &ledger, &dlq] {
        kafka.create_topic(t, 3, 1).await.unwrap();
    }
    let producer: FutureProducer = kafka
        .client_config()
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    let mut generator = EventGenerator::new(50, 9, 0);
    produce(&producer, &input, &mut generator, 300).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let from_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let later: BTreeSet<u64> = produce(&producer, &input, &mut generator, 200)
        .await
        .into_iter()
        .collect();

    let summary = replay(ReplayPlan {
        bootstrap_servers: b.clone(),
        input: input.clone(),
        from_ms,
        group: unique("rp-group"),
        processor: OrderProcessor {
            orders_topic: orders.clone(),
            ledger_topic: ledger.clone(),
        },
        dead_letter_topic: dlq.clone(),
    })
    .await
    .expect("replay");
    assert_eq!(summary.records, 200);

    let repaired = testkit::read_all(
        &b,
        &orders,
        Isolation::ReadCommitted,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let mut ids = Vec::new();
    for r in &repaired {
        let u: OrderUpdate = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        ids.push(u.event_id);
    }
    let unique_ids: BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(
        ids.len(),
        unique_ids.len(),
        "no duplicate in the repair output"
    );
    assert_eq!(unique_ids, later, "exactly the records after the time");
    println!(
        "replay from {from_ms}: {} records re-processed once into {orders}; group {}",
        summary.records, summary.group
    );
}
