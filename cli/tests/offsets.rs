//! `onceflow offsets`, `lag` and `reset-offsets` as a user runs them, against a real broker.

mod common;

use common::{onceflow, unique};

use std::io::{Read as _, Write as _};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use onceflow::codec::Raw;
use onceflow::testkit::{self, Isolation, Kafka};
use onceflow::{Output, OutputRecord, Pipeline, PipelineConfig, ProcessError, Processor, Record};
use rdkafka::producer::{FutureProducer, FutureRecord};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

struct Copy(String);

#[onceflow::async_trait]
impl Processor for Copy {
    type Input = Option<Vec<u8>>;
    async fn process(
        &self,
        r: &Record<Option<Vec<u8>>>,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        let mut o = OutputRecord::to(&self.0).value(r.value.clone().unwrap_or_default());
        if let Some(k) = &r.key {
            o = o.key(k.as_slice());
        }
        out.send(o);
        Ok(())
    }
}

async fn produce(kafka: &Kafka, topic: &str, n: usize, prefix: &str) {
    let producer: FutureProducer = kafka.client_config().create().expect("producer");
    for i in 0..n {
        let key = format!("{prefix}{}", i % 11);
        producer
            .send(
                FutureRecord::to(topic).key(&key).payload("v"),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("send");
    }
}

/// Runs a copy pipeline `input` → `output` as group `app` until it has committed the end of
/// `input`, then stops it.
async fn run_until_caught_up(kafka: &Kafka, app: &str, input: &str, output: &str) {
    let config = PipelineConfig::builder()
        .bootstrap_servers(kafka.bootstrap_servers())
        .application_id(app)
        .instance_id("0")
        .input_topic(input)
        .build()
        .expect("config");
    let pipeline = Pipeline::new(config, Copy(output.to_owned())).with_codec(Raw);
    let stop = pipeline.shutdown_handle();
    let task = tokio::spawn(pipeline.run());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (b, g, t) = (
            kafka.bootstrap_servers().to_owned(),
            app.to_owned(),
            input.to_owned(),
        );
        let done = tokio::task::spawn_blocking(move || {
            let ends = testkit::end_offsets_blocking(&b, &t, Isolation::ReadCommitted).ok()?;
            let committed = testkit::last_committed_offsets_blocking(&b, &g, &t).ok()?;
            Some(
                ends.iter()
                    .all(|(p, e)| committed.get(p).copied().flatten() == Some(*e)),
            )
        })
        .await
        .expect("task");
        if done == Some(true) {
            break;
        }
        assert!(Instant::now() < deadline, "pipeline {app} did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.shutdown();
    task.await.expect("task").expect("pipeline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_zero_not_one_after_a_transactional_pipeline_catches_up() {
    let kafka = Kafka::shared().await.expect("broker");
    let b = kafka.bootstrap_servers();
    let (raw, copied, sink) = (unique("lag-raw"), unique("lag-copied"), unique("lag-sink"));
    for t in [&raw, &copied, &sink] {
        kafka.create_topic(t, 3, 1).await.expect("topic");
    }
    produce(kafka, &raw, 300, "k").await;
    // `copied` is written in transactions, so each of its partitions ends in a commit marker;
    // a second pipeline then consumes it as group `reader`.
    run_until_caught_up(kafka, &unique("lag-writer"), &raw, &copied).await;
    let reader = unique("lag-reader");
    run_until_caught_up(kafka, &reader, &copied, &sink).await;

    let (code, stdout, stderr) = onceflow(&[
        "offsets",
        "--bootstrap-servers",
        b,
        "--topic",
        &copied,
        "--group",
        &reader,
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let rows = json(&stdout);
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), 3);
    // Each partition of `copied` ends in a commit marker: its last record is below latest - 1.
    let records = testkit::read_all(
        b,
        &copied,
        Isolation::ReadCommitted,
        Duration::from_secs(30),
    )
    .await
    .expect("read");
    let mut markers = 0;
    for r in rows {
        let p = r["partition"].as_i64().unwrap();
        let last_record = records
            .iter()
            .filter(|x| i64::from(x.partition) == p)
            .map(|x| x.offset)
            .max()
            .expect("records");
        let latest = r["latest"].as_i64().unwrap();
        assert!(
            latest > last_record + 1,
            "partition {p} ends in a commit marker"
        );
        markers += latest - (last_record + 1);
        // The reader committed past the marker (its position), and lag is 0, not 1.
        assert_eq!(r["committed"], r["latest"], "{r}");
        assert_eq!(r["lag"], 0, "caught up means lag 0: {r}");
        assert_eq!(r["committed"], r["last_stable"]);
    }
    let (code, table, _) = onceflow(&["lag", "--bootstrap-servers", b, "--group", &reader]);
    assert_eq!(code, 0);
    assert!(table.contains("total lag 0"), "{table}");
    println!(
        "after catching up on a transactional topic ({markers} trailing marker offsets over 3 partitions): committed = latest, lag 0 on every partition"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_to_a_timestamp_plans_then_executes_and_refuses_while_members_are_active() {
    let kafka = Kafka::shared().await.expect("broker");
    let b = kafka.bootstrap_servers();
    let (input, output, app) = (unique("reset-in"), unique("reset-out"), unique("reset-app"));
    kafka.create_topic(&input, 2, 1).await.expect("topic");
    kafka.create_topic(&output, 2, 1).await.expect("topic");
    produce(kafka, &input, 40, "early").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cut = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    tokio::time::sleep(Duration::from_millis(50)).await;
    produce(kafka, &input, 60, "late").await;
    run_until_caught_up(kafka, &app, &input, &output).await;

    // Where the late records start, per partition, as a reader sees them.
    let late_starts: std::collections::BTreeMap<i64, i64> = {
        let records =
            testkit::read_all(b, &input, Isolation::ReadCommitted, Duration::from_secs(30))
                .await
                .expect("read");
        let mut m = std::collections::BTreeMap::new();
        for r in records.iter().filter(|r| r.key_str().starts_with("late")) {
            m.entry(i64::from(r.partition)).or_insert(r.offset);
        }
        m
    };
    let cut_s = cut.to_string();
    let (code, stdout, stderr) = onceflow(&[
        "reset-offsets",
        "--bootstrap-servers",
        b,
        "--group",
        &app,
        "--topic",
        &input,
        "--to-timestamp",
        &cut_s,
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let plan = json(&stdout);
    for p in plan.as_array().expect("plan") {
        assert_eq!(
            p["target"].as_i64(),
            late_starts.get(&p["partition"].as_i64().unwrap()).copied(),
            "{p}"
        );
    }
    // A plan changes nothing.
    let (_, before, _) = onceflow(&[
        "offsets",
        "--bootstrap-servers",
        b,
        "--topic",
        &input,
        "--group",
        &app,
        "--json",
    ]);
    assert!(
        json(&before)
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["lag"] == 0)
    );

    // Refused while the group has an active member.
    let config = PipelineConfig::builder()
        .bootstrap_servers(b)
        .application_id(&app)
        .instance_id("0")
        .input_topic(&input)
        .build()
        .expect("config");
    let pipeline = Pipeline::new(config, Copy(output.clone())).with_codec(Raw);
    let stop = pipeline.shutdown_handle();
    let task = tokio::spawn(pipeline.run());
    let mut refused = String::new();
    for _ in 0..100 {
        let (code, _, stderr) = onceflow(&[
            "reset-offsets",
            "--bootstrap-servers",
            b,
            "--group",
            &app,
            "--topic",
            &input,
            "--to-earliest",
            "--execute",
        ]);
        if code == 2 && stderr.contains("active member") {
            refused = stderr;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !refused.is_empty(),
        "reset must be refused while a member is active"
    );
    stop.shutdown();
    task.await.expect("task").expect("pipeline");

    // Executed with the group empty: the committed offsets are the plan's.
    let (code, _, stderr) = onceflow(&[
        "reset-offsets",
        "--bootstrap-servers",
        b,
        "--group",
        &app,
        "--topic",
        &input,
        "--to-timestamp",
        &cut_s,
        "--execute",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let (_, after, _) = onceflow(&[
        "offsets",
        "--bootstrap-servers",
        b,
        "--topic",
        &input,
        "--group",
        &app,
        "--json",
    ]);
    for r in json(&after).as_array().unwrap() {
        assert_eq!(
            r["committed"].as_i64(),
            late_starts.get(&r["partition"].as_i64().unwrap()).copied(),
            "{r}"
        );
    }

    // A time after the last record, and an unknown topic: clear errors, nothing changed.
    let future = (cut + 3_600_000).to_string();
    let (code, _, stderr) = onceflow(&[
        "reset-offsets",
        "--bootstrap-servers",
        b,
        "--group",
        &app,
        "--topic",
        &input,
        "--to-timestamp",
        &future,
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("after the last record"), "{stderr}");
    let (code, _, stderr) = onceflow(&[
        "offsets",
        "--bootstrap-servers",
        b,
        "--topic",
        "no-such-topic-x",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("does not exist"), "{stderr}");
    println!(
        "reset to {cut} planned {:?}, refused while active ({}), executed when empty",
        late_starts,
        refused.trim()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_serve_exposes_prometheus_metrics() {
    let kafka = Kafka::shared().await.expect("broker");
    let b = kafka.bootstrap_servers().to_owned();
    let (input, output, app) = (unique("prom-in"), unique("prom-out"), unique("prom-app"));
    kafka.create_topic(&input, 1, 1).await.expect("topic");
    kafka.create_topic(&output, 1, 1).await.expect("topic");
    produce(kafka, &input, 25, "k").await;
    run_until_caught_up(kafka, &app, &input, &output).await;
    produce(kafka, &input, 5, "k").await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_onceflow"))
        .args([
            "lag",
            "--bootstrap-servers",
            &b,
            "--group",
            &app,
            "--serve",
            &addr,
            "--iterations",
            "1",
        ])
        .spawn()
        .expect("spawn");
    let mut body = String::new();
    for _ in 0..100 {
        if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            s.read_to_string(&mut body).unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.wait();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let line = format!("onceflow_group_lag{{group=\"{app}\",topic=\"{input}\",partition=\"0\"}} 5");
    assert!(body.contains(&line), "missing {line} in:\n{body}");
    assert!(
        body.contains(&format!(
            "onceflow_partition_latest_offset{{topic=\"{input}\",partition=\"0\"}} 30"
        )),
        "{body}"
    );
    println!("Prometheus endpoint served: {line}");
}
