//! The testkit itself: a three-node cluster survives a hard-killed node and takes it back,
//! and every way a start can fail ends in an error that names the cause.

use std::time::Duration;

use onceflow::testkit::{self, Isolation, Kafka, KafkaOptions, TestkitError};
use onceflow_integration_tests::{init_tracing, unique};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

async fn produce(kafka: &Kafka, topic: &str, values: std::ops::Range<i32>) {
    let producer: FutureProducer = kafka
        .client_config()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "60000")
        .create()
        .expect("producer");
    for i in values {
        let value = format!("v{i}");
        producer
            .send(
                FutureRecord::to(topic).key(&value).payload(&value),
                Duration::from_secs(60),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("acknowledged by min.insync.replicas brokers");
    }
    let _ = producer.client();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_survives_a_hard_killed_node_and_takes_it_back() {
    init_tracing();
    let kafka = Kafka::start_with(KafkaOptions::cluster(3))
        .await
        .expect("three-node cluster");
    println!("cluster: {}", kafka.describe());
    assert_eq!(kafka.node_ids().unwrap(), vec![1, 2, 3]);
    assert_eq!(kafka.bootstrap_servers().split(',').count(), 3);

    let topic = unique("testkit-cluster");
    kafka
        .create_topic_with(&topic, 3, 3, &[("min.insync.replicas", "2")])
        .await
        .expect("topic");
    produce(&kafka, &topic, 0..100).await;

    kafka.kill_node(2).expect("kill node 2");
    assert!(
        kafka.kill_node(2).is_err(),
        "a dead node cannot be killed again"
    );
    // Two of three replicas still meet min.insync.replicas=2: acks=all writes go on.
    produce(&kafka, &topic, 100..200).await;

    kafka.restart_node(2).await.expect("restart node 2");
    produce(&kafka, &topic, 200..300).await;

    let records = testkit::read_all(
        kafka.bootstrap_servers(),
        &topic,
        Isolation::ReadCommitted,
        Duration::from_secs(60),
    )
    .await
    .expect("read back");
    let mut values: Vec<i32> = records
        .iter()
        .map(|r| r.value_str()[1..].parse().unwrap())
        .collect();
    values.sort_unstable();
    assert_eq!(
        values,
        (0..300).collect::<Vec<_>>(),
        "no write lost, none doubled"
    );
    println!(
        "300 acks=all records written across a SIGKILL and restart of node 2, all read back once"
    );
}

#[tokio::test]
async fn a_missing_java_is_named_with_its_fix() {
    // cluster(1): always embedded, even when KAFKA_BOOTSTRAP_SERVERS is set.
    let err = Kafka::start_with(KafkaOptions::cluster(1).java("/nonexistent/jdk/bin/java"))
        .await
        .map(|_| ())
        .expect_err("cannot start without Java");
    assert!(matches!(err, TestkitError::JavaMissing { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("Java 17") && text.contains("KAFKA_BOOTSTRAP_SERVERS"),
        "{text}"
    );
}

#[tokio::test]
async fn a_version_maven_cannot_resolve_is_named_with_the_versions_tried() {
    let cache = tempfile_dir();
    let err = Kafka::start_with(
        KafkaOptions::cluster(1)
            .version("0.0.1-no-such-release")
            .cache_dir(&cache),
    )
    .await
    .map(|_| ())
    .expect_err("no such Kafka on Maven Central");
    assert!(matches!(err, TestkitError::MavenFailed { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("0.0.1-no-such-release"), "{text}");
    assert!(text.contains("Maven Central"), "{text}");
    assert!(
        !cache
            .join("0.0.1-no-such-release")
            .join(".complete")
            .exists(),
        "a failed fetch must not be marked complete"
    );
    let _ = std::fs::remove_dir_all(cache);
}

#[tokio::test]
async fn a_broker_that_dies_during_start_up_reports_its_log() {
    init_tracing();
    // The storage tool accepts this; the broker only fails when it loads the reporter class.
    let err = Kafka::start_with(
        KafkaOptions::cluster(1).broker_property("metric.reporters", "no.such.MetricsReporter"),
    )
    .await
    .map(|_| ())
    .expect_err("the broker cannot start");
    match &err {
        TestkitError::BrokerExited { log_tail, log, .. } => {
            assert!(log_tail.contains("no.such.MetricsReporter"), "{log_tail}");
            assert!(
                log.exists(),
                "the log is kept for the reader: {}",
                log.display()
            );
            let _ = std::fs::remove_dir_all(log.parent().and_then(|p| p.parent()).unwrap());
        }
        other => panic!("expected BrokerExited, got {other:?}"),
    }
}

#[tokio::test]
async fn a_broker_that_is_not_ready_in_time_is_reported_not_waited_for_forever() {
    let err = Kafka::start_with(KafkaOptions::cluster(1).start_timeout(Duration::from_millis(1)))
        .await
        .map(|_| ())
        .expect_err("no JVM opens its port in a millisecond");
    match &err {
        TestkitError::NotReady { waited, log, .. } => {
            assert!(*waited < Duration::from_secs(10));
            let _ = std::fs::remove_dir_all(log.parent().and_then(|p| p.parent()).unwrap());
        }
        other => panic!("expected NotReady, got {other:?}"),
    }
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique("onceflow-cache-test"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn the_broker_directory_goes_where_data_dir_says_and_is_removed_on_drop() {
    init_tracing();
    let parent = tempfile_dir();
    let entries = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let kafka = Kafka::start_with(KafkaOptions::cluster(1).data_dir(&parent))
        .await
        .expect("broker in the given directory");
    let inside = entries(&parent);
    assert_eq!(inside.len(), 1, "one broker directory: {inside:?}");
    assert!(inside[0].starts_with("onceflow-kafka-"), "{inside:?}");
    assert!(
        kafka.describe().contains(&parent.display().to_string()),
        "{}",
        kafka.describe()
    );
    // The broker really writes there: a topic's partition directory appears under it.
    let topic = unique("testkit-data-dir");
    kafka.create_topic(&topic, 1, 1).await.expect("topic");
    produce(&kafka, &topic, 0..10).await;
    let data = parent.join(&inside[0]).join("node-1").join("data");
    assert!(
        entries(&data).iter().any(|e| e == &format!("{topic}-0")),
        "{:?}",
        entries(&data)
    );
    drop(kafka);
    assert!(entries(&parent).is_empty(), "{:?}", entries(&parent));
    let _ = std::fs::remove_dir_all(parent);
}

#[tokio::test]
async fn a_data_dir_that_does_not_exist_is_named_in_the_error() {
    let parent = tempfile_dir();
    let missing = parent.join("no-such-dir");
    let err = Kafka::start_with(KafkaOptions::cluster(1).data_dir(&missing))
        .await
        .map(|_| ())
        .expect_err("cannot create a broker directory in a missing directory");
    assert!(matches!(err, TestkitError::Io { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(parent);
}
