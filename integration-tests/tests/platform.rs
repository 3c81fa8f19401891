//! What onceflow relies on from Kafka and librdkafka, shown against a real broker:
//! transactions commit and abort, isolation levels filter, offsets sent in a transaction become
//! the group's committed offsets, a second producer with the same transactional id fences the
//! first, and librdkafka's `murmur2_random` partitioner agrees with the Java client.
#![allow(
    clippy::disallowed_methods,
    reason = "the platform test exercises librdkafka's transactional API directly, on blocking threads"
)]

use std::time::Duration;

use onceflow::partitioner::partition_for_key;
use onceflow::testkit::{self, Isolation, Kafka};
use onceflow_integration_tests::{init_tracing, transactional_producer, unique};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

const READ_TIMEOUT: Duration = Duration::from_secs(30);
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

type TxProducer = ThreadedProducer<DefaultProducerContext>;

fn send(producer: &TxProducer, topic: &str, key: &str, value: &str) {
    producer
        .send(BaseRecord::to(topic).key(key).payload(value))
        .map_err(|(e, _)| e)
        .expect("enqueue record");
}

/// Every transaction call blocks; tests run them on blocking threads like the runtime does.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test]
async fn committed_and_aborted_transactions_under_both_isolation_levels() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let topic = unique("platform-isolation");
    kafka.create_topic(&topic, 2, 1).await.expect("topic");

    let producer = transactional_producer(kafka, &unique("tx-isolation"));
    let t = topic.clone();
    blocking(move || {
        producer.init_transactions(TXN_TIMEOUT).expect("init");
        producer.begin_transaction().expect("begin");
        for i in 0..10 {
            send(&producer, &t, &format!("k{i}"), &format!("committed-{i}"));
        }
        producer.commit_transaction(TXN_TIMEOUT).expect("commit");

        producer.begin_transaction().expect("begin");
        for i in 0..7 {
            send(&producer, &t, &format!("k{i}"), &format!("aborted-{i}"));
        }
        // Make sure the aborted records really reached the log before the abort.
        producer.flush(TXN_TIMEOUT).expect("flush");
        producer.abort_transaction(TXN_TIMEOUT).expect("abort");
    })
    .await;

    let committed = testkit::read_all(
        kafka.bootstrap_servers(),
        &topic,
        Isolation::ReadCommitted,
        READ_TIMEOUT,
    )
    .await
    .expect("read committed");
    let uncommitted = testkit::read_all(
        kafka.bootstrap_servers(),
        &topic,
        Isolation::ReadUncommitted,
        READ_TIMEOUT,
    )
    .await
    .expect("read uncommitted");

    let mut seen: Vec<String> = committed.iter().map(|r| r.value_str()).collect();
    seen.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("committed-{i}")).collect();
    want.sort();
    assert_eq!(
        seen, want,
        "read_committed must see exactly the committed transaction"
    );

    let aborted = uncommitted
        .iter()
        .filter(|r| r.value_str().starts_with("aborted-"))
        .count();
    let committed_in_uncommitted = uncommitted.len() - aborted;
    assert_eq!(
        aborted, 7,
        "read_uncommitted must also see the aborted transaction's records"
    );
    assert_eq!(committed_in_uncommitted, 10);

    // No transaction is left open: the last stable offset caught up with the high watermark.
    let b = kafka.bootstrap_servers().to_owned();
    let t = topic.clone();
    let (lso, hw) = blocking(move || {
        (
            testkit::end_offsets_blocking(&b, &t, Isolation::ReadCommitted).expect("lso"),
            testkit::end_offsets_blocking(&b, &t, Isolation::ReadUncommitted).expect("hw"),
        )
    })
    .await;
    assert_eq!(lso, hw);
    println!(
        "read_committed saw {} records, read_uncommitted saw {} ({} aborted); end offsets {:?}",
        committed.len(),
        uncommitted.len(),
        aborted,
        hw
    );
}

#[tokio::test]
async fn offsets_sent_in_a_transaction_become_the_groups_committed_offsets() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let input = unique("platform-offsets-in");
    let output = unique("platform-offsets-out");
    let group = unique("platform-offsets-group");
    kafka.create_topic(&input, 2, 1).await.expect("input topic");
    kafka
        .create_topic(&output, 2, 1)
        .await
        .expect("output topic");

    // 20 input records, 10 per partition (explicit partitions keep the count exact).
    let plain: TxProducer = kafka.client_config().create().expect("producer");
    for i in 0..20 {
        plain
            .send(
                BaseRecord::to(&input)
                    .partition(i % 2)
                    .key("k")
                    .payload(&format!("v{i}")),
            )
            .map_err(|(e, _)| e)
            .expect("send");
    }
    let plain = blocking(move || {
        plain.flush(TXN_TIMEOUT).expect("flush");
        plain
    })
    .await;
    drop(plain);

    let consumer: BaseConsumer = kafka
        .client_config()
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&input]).expect("subscribe");
    let producer = transactional_producer(kafka, &unique("tx-offsets"));
    let (i, o, g) = (input.clone(), output.clone(), group.clone());
    let b = kafka.bootstrap_servers().to_owned();
    let committed = blocking(move || {
        producer.init_transactions(TXN_TIMEOUT).expect("init");
        producer.begin_transaction().expect("begin");
        let mut next: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
        let deadline = std::time::Instant::now() + READ_TIMEOUT;
        while next.values().sum::<i64>() < 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "consumed {next:?} of 20"
            );
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m.expect("message");
                send(
                    &producer,
                    &o,
                    "k",
                    std::str::from_utf8(m.payload().unwrap()).unwrap(),
                );
                next.insert(m.partition(), m.offset() + 1);
            }
        }
        let mut tpl = TopicPartitionList::new();
        for (p, n) in &next {
            tpl.add_partition_offset(&i, *p, Offset::Offset(*n))
                .unwrap();
        }
        // Before the transaction commits, the group has committed nothing.
        let before = testkit::committed_offsets_blocking(&b, &g, &i).expect("committed before");
        assert!(before.values().all(Option::is_none), "{before:?}");
        let meta = consumer.group_metadata().expect("group metadata");
        producer
            .send_offsets_to_transaction(&tpl, &meta, TXN_TIMEOUT)
            .expect("send offsets");
        producer.commit_transaction(TXN_TIMEOUT).expect("commit");
        next
    })
    .await;

    let b = kafka.bootstrap_servers().to_owned();
    let group_offsets = blocking(move || {
        testkit::committed_offsets_blocking(&b, &group, &input).expect("committed")
    })
    .await;
    let expected: std::collections::BTreeMap<i32, Option<i64>> =
        committed.iter().map(|(p, n)| (*p, Some(*n))).collect();
    assert_eq!(group_offsets, expected);
    assert_eq!(expected.values().map(|o| o.unwrap_or(0)).sum::<i64>(), 20);

    let out = testkit::read_all(
        kafka.bootstrap_servers(),
        &output,
        Isolation::ReadCommitted,
        READ_TIMEOUT,
    )
    .await
    .expect("read output");
    assert_eq!(out.len(), 20, "the copies were committed with the offsets");
    println!("group committed offsets after the transaction: {group_offsets:?}");
}

#[tokio::test]
async fn a_second_producer_with_the_same_transactional_id_fences_the_first() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let topic = unique("platform-fencing");
    kafka.create_topic(&topic, 1, 1).await.expect("topic");
    let id = unique("tx-fencing");

    let old = transactional_producer(kafka, &id);
    let new = transactional_producer(kafka, &id);
    let t = topic.clone();
    let (old_error, new) = blocking(move || {
        old.init_transactions(TXN_TIMEOUT).expect("old init");
        old.begin_transaction().expect("old begin");
        send(&old, &t, "k", "from-the-zombie");
        old.flush(TXN_TIMEOUT).expect("old flush");

        // The new instance bumps the epoch: the broker aborts the old one's open transaction
        // and rejects every later request carrying the old epoch.
        new.init_transactions(TXN_TIMEOUT).expect("new init");
        new.begin_transaction().expect("new begin");
        send(&new, &t, "k", "from-the-new-instance");
        new.commit_transaction(TXN_TIMEOUT).expect("new commit");

        let err = old
            .commit_transaction(TXN_TIMEOUT)
            .expect_err("the fenced producer must not be able to commit");
        (err, new)
    })
    .await;
    drop(new);

    match &old_error {
        KafkaError::Transaction(e) => {
            assert!(e.is_fatal(), "fencing must be fatal, got {e:?}");
            assert!(!e.is_retriable());
            println!("old producer's commit failed as fatal: {e}");
        }
        other => panic!("expected a transaction error, got {other:?}"),
    }

    let committed = testkit::read_all(
        kafka.bootstrap_servers(),
        &topic,
        Isolation::ReadCommitted,
        READ_TIMEOUT,
    )
    .await
    .expect("read");
    let values: Vec<String> = committed.iter().map(|r| r.value_str()).collect();
    assert_eq!(values, vec!["from-the-new-instance".to_owned()]);
    let uncommitted = testkit::read_all(
        kafka.bootstrap_servers(),
        &topic,
        Isolation::ReadUncommitted,
        READ_TIMEOUT,
    )
    .await
    .expect("read");
    assert!(
        uncommitted
            .iter()
            .any(|r| r.value_str() == "from-the-zombie"),
        "the zombie's write reached the log and was aborted, not lost in the client"
    );
}

#[tokio::test]
async fn librdkafka_murmur2_random_agrees_with_the_java_partitioner() {
    init_tracing();
    let kafka = Kafka::shared().await.expect("broker");
    println!("broker: {}", kafka.describe());
    let topic = unique("platform-partitioner");
    kafka.create_topic(&topic, 7, 1).await.expect("topic");
    let producer: TxProducer = kafka
        .client_config()
        .set("partitioner", "murmur2_random")
        .create()
        .expect("producer");
    let keys: Vec<String> = (0..500)
        .map(|i| format!("user-{i}"))
        .chain(["hejsan".into(), "abc".into()])
        .collect();
    for k in &keys {
        send(&producer, &topic, k, k);
    }
    blocking(move || producer.flush(TXN_TIMEOUT).expect("flush")).await;
    let records = testkit::read_all(
        kafka.bootstrap_servers(),
        &topic,
        Isolation::ReadUncommitted,
        READ_TIMEOUT,
    )
    .await
    .expect("read");
    assert_eq!(records.len(), keys.len());
    for r in &records {
        let key = r.key.as_deref().expect("key");
        assert_eq!(
            Some(r.partition),
            partition_for_key(key, 7),
            "key {}",
            r.key_str()
        );
    }
    let hejsan = records
        .iter()
        .find(|r| r.key_str() == "hejsan")
        .expect("hejsan");
    assert_eq!(
        hejsan.partition, 6,
        "Kafka's published vector: hejsan -> 6 of 7"
    );
    println!(
        "{} keyed records landed where the Java client would put them",
        records.len()
    );
}
