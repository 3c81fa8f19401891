//! `onceflow verify` as a user runs it: the real binary against a real broker.

mod common;

use common::{onceflow, unique};

use std::time::Duration;

use onceflow::processor::SOURCE_HEADER;
use onceflow::testkit::Kafka;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Writes `n` inputs and, for each, one output stamped with its lineage header (as the runtime
/// does), plus `extra` copies of the output of input offset 0.
async fn scenario(kafka: &Kafka, n: usize, extra: usize) -> (String, String) {
    let (input, output) = (unique("cli-in"), unique("cli-out"));
    kafka.create_topic(&input, 1, 1).await.expect("topic");
    kafka.create_topic(&output, 1, 1).await.expect("topic");
    let producer: FutureProducer = kafka.client_config().create().expect("producer");
    for i in 0..n {
        let key = format!("k{}", i % 7);
        producer
            .send(
                FutureRecord::to(&input).key(&key).payload("v"),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("input");
    }
    let copies = (0..n).chain(std::iter::repeat_n(0, extra));
    for i in copies {
        let key = format!("k{}", i % 7);
        let source = format!("{input}/0/{i}");
        let headers = OwnedHeaders::new().insert(Header {
            key: SOURCE_HEADER,
            value: Some(&source),
        });
        producer
            .send(
                FutureRecord::to(&output)
                    .key(&key)
                    .payload("v")
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("output");
    }
    (input, output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_clean_output_and_names_a_duplicate() {
    let kafka = Kafka::shared().await.expect("broker");
    let b = kafka.bootstrap_servers();

    let (input, output) = scenario(kafka, 50, 0).await;
    let (code, stdout, stderr) = onceflow(&[
        "verify",
        "--bootstrap-servers",
        b,
        "--input",
        &input,
        "--output",
        &output,
        "--json",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(report["input_records"], 50);
    assert_eq!(report["losses"], 0);
    assert_eq!(report["outputs"][0]["duplicated_inputs"], 0);
    assert_eq!(report["transactions_finished"], true);
    let (code, table, _) = onceflow(&[
        "verify",
        "--bootstrap-servers",
        b,
        "--input",
        &input,
        "--output",
        &output,
        "--quiet",
    ]);
    assert_eq!(code, 0);
    assert!(table.contains("OK: exactly once"), "{table}");

    let (input, output) = scenario(kafka, 20, 2).await;
    let (code, stdout, _) = onceflow(&[
        "verify",
        "--bootstrap-servers",
        b,
        "--input",
        &input,
        "--output",
        &output,
        "--json",
    ]);
    assert_eq!(code, 1, "a duplicate is a violation: {stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(report["outputs"][0]["duplicated_inputs"], 1);
    assert_eq!(report["outputs"][0]["extra_copies"], 2);
    assert_eq!(report["duplicate_examples"][0], format!("{output}: 0@0"));
    // The copies of input 0 come after inputs 1..19 of the same keys: reordered too.
    assert!(report["outputs"][0]["order_violations"].as_u64().unwrap() > 0);
    println!("verify: clean output passes (exit 0); 2 extra copies of one input fail (exit 1)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_says_clearly_when_a_topic_is_missing_or_the_cluster_is_unreachable() {
    let kafka = Kafka::shared().await.expect("broker");
    let b = kafka.bootstrap_servers();
    let (code, _, stderr) = onceflow(&[
        "verify",
        "--bootstrap-servers",
        b,
        "--input",
        "no-such-topic-here",
        "--output",
        "x",
        "--quiet",
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("no-such-topic-here") && stderr.contains("does not exist"),
        "{stderr}"
    );

    let (code, _, stderr) = onceflow(&[
        "verify",
        "--bootstrap-servers",
        "127.0.0.1:1",
        "--input",
        "a",
        "--output",
        "b",
        "--quiet",
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("cannot reach Kafka at 127.0.0.1:1"),
        "{stderr}"
    );

    let (code, _, stderr) = onceflow(&[
        "verify",
        "--bootstrap-servers",
        b,
        "--input",
        "a",
        "--output",
        "b",
        "-X",
        "sasl.password",
    ]);
    assert_eq!(code, 2, "a malformed property is a usage error");
    assert!(stderr.contains("key=value"), "{stderr}");
}
