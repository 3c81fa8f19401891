//! The scenarios' own tools, tested: an order violation the verifier reports must be the
//! runtime's, not the input helper's, and the verifier must see one when there is one.

use onceflow::testkit::{Isolation, Kafka, ReadRecord};
use onceflow_integration_tests::{
    Event, OrderCheck, enrich, events, init_tracing, input_producer_config, produce_events_with,
    read, unique, verify,
};
use rdkafka::producer::FutureProducer;

/// The input helper once joined one `FutureProducer::send` per record; when librdkafka's queue
/// was full, the refused sends slept and retried in no particular order, so one user's input
/// reached its partition out of order and the backlog scenario blamed the runtime for it. A
/// 100-record queue makes the queue full on almost every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_keeps_each_users_order_when_the_producer_queue_is_full() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    let topic = unique("harness-order");
    kafka.create_topic(&topic, 2, 1).await.expect("topic");
    let producer: FutureProducer = input_producer_config(kafka)
        .set("queue.buffering.max.messages", "100")
        .create()
        .expect("producer");
    let input = events(20_000, 3);
    produce_events_with(&producer, &topic, &input).await;

    let back = read(kafka, &topic, Isolation::ReadCommitted).await;
    assert_eq!(back.len(), input.len(), "every input record written once");
    let mut order = OrderCheck::default();
    for r in &back {
        let e: Event = serde_json::from_slice(r.value.as_deref().expect("value")).expect("event");
        order.observe(r.partition, r.offset, &e.user, e.seq, e.id);
    }
    assert_eq!(
        order.violations, 0,
        "input records out of per-user order on their partition (first: {:?})",
        order.first
    );
}

fn output(partition: i32, offset: i64, e: &Event) -> ReadRecord {
    ReadRecord {
        partition,
        offset,
        key: Some(e.user.clone().into_bytes()),
        value: Some(serde_json::to_vec(&enrich(e)).expect("json")),
        headers: Vec::new(),
        timestamp: None,
    }
}

#[test]
fn the_verifier_reports_where_one_users_outputs_are_out_of_order() {
    let input = events(3, 1);
    let partition = onceflow::partitioner::partition_for_key(b"user-0", 2).expect("partition");
    let in_order: Vec<ReadRecord> = input
        .iter()
        .enumerate()
        .map(|(i, e)| output(partition, i as i64, e))
        .collect();
    let ok = verify(&input, &in_order, 2);
    assert_eq!(ok.order_violations, 0);
    ok.assert_exactly_once();

    let swapped = vec![
        output(partition, 0, &input[0]),
        output(partition, 1, &input[2]),
        output(partition, 2, &input[1]),
    ];
    let bad = verify(&input, &swapped, 2);
    assert_eq!(bad.order_violations, 1);
    assert_eq!(
        bad.first_order_violation.as_deref(),
        Some(
            format!(
                "user-0 on partition {partition}: seq 1 (id 1) at offset 2 after seq 2 at \
                 offset 1"
            )
            .as_str()
        )
    );
    assert!(bad.duplicates.is_empty() && bad.missing.is_empty());
}
