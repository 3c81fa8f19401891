//! Permissions, against a real broker that enforces ACLs (Kafka's `StandardAuthorizer`, SASL/PLAIN
//! users; see `KafkaOptions::sasl_users`).
//!
//! The guide (section 5) lists the ACLs a pipeline's principal needs: READ on the input topics,
//! WRITE on the output topics, READ on the group (the application id), WRITE on the
//! transactional ids. These tests show that those four are enough for exactly-once, and that
//! without any one of them the pipeline stops with `Error::Refused` — the broker's own refusal,
//! not one injected by librdkafka's mock cluster — instead of retrying or idling for ever, with
//! nothing committed.

use std::time::Duration;

use onceflow::testkit::{Acl, AclOperation, AclResource, Isolation, Kafka, KafkaOptions};
use onceflow::{
    Output, OutputRecord, Pipeline, PipelineConfigBuilder, ProcessError, Processor, Record,
};
use onceflow_integration_tests::{
    Event, Running, enrich, events, init_tracing, produce_events, read, test_config, unique,
    verify, wait_caught_up,
};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::OnceCell;

const CATCH_UP: Duration = Duration::from_secs(120);

/// How long a pipeline refused a permission may take to stop. librdkafka reports most refusals
/// at once; a refused group shows up after the consumer's first join attempt.
const STOPS_WITHIN: Duration = Duration::from_secs(60);

/// The users of this file's broker; each test uses its own.
const USERS: [&str; 9] = [
    "complete",
    "toolkit",
    "no-read",
    "describe-in",
    "no-write",
    "describe-out",
    "no-write-dead-letters",
    "no-group",
    "no-txn",
];

fn password(user: &str) -> String {
    format!("{user}-secret")
}

/// One broker with ACLs for this file (its own JVM: the shared broker enforces none).
async fn kafka() -> &'static Kafka {
    static KAFKA: OnceCell<Kafka> = OnceCell::const_new();
    KAFKA
        .get_or_init(|| async {
            let options = USERS
                .iter()
                .fold(KafkaOptions::single(), |o, u| o.sasl_user(*u, password(u)));
            Kafka::start_with(options)
                .await
                .expect("a broker that enforces ACLs")
        })
        .await
}

/// Emits `enrich(event)`, keyed by user, to `out`.
struct Enrich {
    out: String,
}

#[onceflow::async_trait]
impl Processor for Enrich {
    type Input = Event;

    async fn process(&self, r: &Record<Event>, out: &mut Output) -> Result<(), ProcessError> {
        out.send(
            OutputRecord::to(&self.out)
                .key(r.value.user.as_str())
                .json(&enrich(&r.value))?,
        );
        Ok(())
    }
}

struct Topics {
    input: String,
    output: String,
    /// Created only for the users that need it.
    dead_letters: String,
    app: String,
}

async fn setup(kafka: &Kafka, name: &str) -> Topics {
    let t = Topics {
        input: unique(&format!("acl-{name}-in")),
        output: unique(&format!("acl-{name}-out")),
        dead_letters: unique(&format!("acl-{name}-dlq")),
        app: unique(&format!("acl-{name}-app")),
    };
    kafka.create_topic(&t.input, 3, 1).await.expect("input");
    kafka.create_topic(&t.output, 3, 1).await.expect("output");
    t
}

/// The permissions the guide lists, the way an operator would grant them: the transactional
/// ids by prefix (an instance's two ids are `<application id>-<instance id>` and that with
/// `-1` appended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    ReadInput,
    WriteOutput,
    ReadGroup,
    WriteTransactionalIds,
    /// Not one of the four: to see the topic (its metadata) without reading it.
    DescribeInput,
    /// Not one of the four: to see the topic (its metadata) without writing it.
    DescribeOutput,
    /// For a pipeline with a dead-letter topic.
    WriteDeadLetters,
}

const ALL: [Grant; 4] = [
    Grant::ReadInput,
    Grant::WriteOutput,
    Grant::ReadGroup,
    Grant::WriteTransactionalIds,
];

fn acls(user: &str, t: &Topics, grants: &[Grant]) -> Vec<Acl> {
    let principal = format!("User:{user}");
    grants
        .iter()
        .map(|g| match g {
            Grant::ReadInput => {
                Acl::allow(&principal, AclOperation::Read, AclResource::Topic, &t.input)
            }
            Grant::WriteOutput => Acl::allow(
                &principal,
                AclOperation::Write,
                AclResource::Topic,
                &t.output,
            ),
            Grant::ReadGroup => {
                Acl::allow(&principal, AclOperation::Read, AclResource::Group, &t.app)
            }
            Grant::DescribeInput => Acl::allow(
                &principal,
                AclOperation::Describe,
                AclResource::Topic,
                &t.input,
            ),
            Grant::WriteDeadLetters => Acl::allow(
                &principal,
                AclOperation::Write,
                AclResource::Topic,
                &t.dead_letters,
            ),
            Grant::DescribeOutput => Acl::allow(
                &principal,
                AclOperation::Describe,
                AclResource::Topic,
                &t.output,
            ),
            Grant::WriteTransactionalIds => Acl::allow(
                &principal,
                AclOperation::Write,
                AclResource::TransactionalId,
                &t.app,
            )
            .prefixed(),
        })
        .collect()
}

/// The pipeline's configuration as `user`, through the SASL listener.
fn config_as(kafka: &Kafka, user: &str, t: &Topics) -> PipelineConfigBuilder {
    sasl_properties(user).into_iter().fold(
        test_config(kafka, &t.app, "0", &t.input)
            .bootstrap_servers(kafka.sasl_bootstrap_servers().expect("a SASL listener")),
        |config, (k, v)| config.kafka_property(k, v),
    )
}

/// The client properties of `user` on the broker's SASL listener.
fn sasl_properties(user: &str) -> [(&'static str, String); 4] {
    [
        ("security.protocol", "SASL_PLAINTEXT".to_owned()),
        ("sasl.mechanism", "PLAIN".to_owned()),
        ("sasl.username", user.to_owned()),
        ("sasl.password", password(user)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_with_the_four_acls_the_guide_lists_processes_exactly_once() {
    init_tracing();
    let kafka = kafka().await;
    let t = setup(kafka, "complete").await;
    kafka
        .create_acls(&acls("complete", &t, &ALL))
        .await
        .expect("ACLs");
    let input = events(3_000, 17);
    produce_events(kafka, &t.input, &input).await;

    let running = Running::start(Pipeline::new(
        config_as(kafka, "complete", &t).build().expect("config"),
        Enrich {
            out: t.output.clone(),
        },
    ));
    wait_caught_up(kafka, &t.app, &t.input, CATCH_UP).await;
    let summary = running.stop().await;
    let outputs = read(kafka, &t.output, Isolation::ReadCommitted).await;
    println!(
        "with READ on the input, WRITE on the output, READ on the group and WRITE on the \
         transactional ids: {} committed by the pipeline, {} outputs read back",
        summary.records_committed,
        outputs.len()
    );
    verify(&input, &outputs, 3).assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_missing_any_one_of_them_is_stopped_with_a_refusal_and_commits_nothing() {
    init_tracing();
    let kafka = kafka().await;
    // Each user has the four ACLs but one; two of them may still see the topic they may not
    // use, which makes the broker refuse a different request (the fetch or the produce, rather
    // than the metadata). One has a dead-letter topic it may write: a refused output topic is
    // not the records' fault, so none of them may end up there. Each refusal's hint must name
    // the ACL that is missing (the broker's code alone does not say whether READ or WRITE).
    let without =
        |missing: Grant| -> Vec<Grant> { ALL.into_iter().filter(|g| *g != missing).collect() };
    let with = |mut grants: Vec<Grant>, extra: Grant| {
        grants.push(extra);
        grants
    };
    let cases = [
        (
            "no-read",
            without(Grant::ReadInput),
            RDKafkaErrorCode::TopicAuthorizationFailed,
            "READ on each input topic",
        ),
        (
            "no-write-dead-letters",
            with(without(Grant::WriteOutput), Grant::WriteDeadLetters),
            RDKafkaErrorCode::TopicAuthorizationFailed,
            "WRITE on each topic",
        ),
        (
            "describe-in",
            with(without(Grant::ReadInput), Grant::DescribeInput),
            RDKafkaErrorCode::TopicAuthorizationFailed,
            "READ on each input topic",
        ),
        (
            "no-write",
            without(Grant::WriteOutput),
            RDKafkaErrorCode::TopicAuthorizationFailed,
            "WRITE on each topic",
        ),
        (
            "describe-out",
            with(without(Grant::WriteOutput), Grant::DescribeOutput),
            RDKafkaErrorCode::TopicAuthorizationFailed,
            "WRITE on each topic",
        ),
        (
            "no-group",
            without(Grant::ReadGroup),
            RDKafkaErrorCode::GroupAuthorizationFailed,
            "READ on the group",
        ),
        (
            "no-txn",
            without(Grant::WriteTransactionalIds),
            RDKafkaErrorCode::TransactionalIdAuthorizationFailed,
            "WRITE and DESCRIBE on the ids",
        ),
    ];
    for (user, granted, code, acl) in cases {
        let t = setup(kafka, user).await;
        kafka
            .create_acls(&acls(user, &t, &granted))
            .await
            .expect("ACLs");
        let dead_letters = granted.contains(&Grant::WriteDeadLetters);
        let mut config = config_as(kafka, user, &t);
        if dead_letters {
            kafka
                .create_topic(&t.dead_letters, 1, 1)
                .await
                .expect("dead-letter topic");
            config = config.dead_letter_topic(&t.dead_letters);
        }
        let input = events(300, 7);
        produce_events(kafka, &t.input, &input).await;

        let started = std::time::Instant::now();
        let running = Running::start(Pipeline::new(
            config.build().expect("config"),
            Enrich {
                out: t.output.clone(),
            },
        ));
        let result = tokio::time::timeout(STOPS_WITHIN, running.handle)
            .await
            .unwrap_or_else(|_| panic!("{user}: still running after {STOPS_WITHIN:?}"))
            .expect("pipeline task");
        println!(
            "{user}: stopped after {:?} with: {}",
            started.elapsed(),
            result
                .as_ref()
                .map_or_else(ToString::to_string, |s| format!("{s:?}"))
        );
        match &result {
            Err(onceflow::Error::Refused { source, hint, .. }) => {
                assert_eq!(
                    source.rdkafka_error_code(),
                    Some(code),
                    "{user}: refused, but for {source}"
                );
                // The hint names the ACL the principal lacks, not every ACL a refusal of this
                // code could mean.
                assert!(
                    hint.contains(acl),
                    "{user}: the hint {hint:?} does not name {acl}"
                );
            }
            other => panic!("{user}: expected Error::Refused, got {other:?}"),
        }
        let committed = read(kafka, &t.output, Isolation::ReadCommitted).await;
        assert!(
            committed.is_empty(),
            "{user}: {} outputs committed",
            committed.len()
        );
        if dead_letters {
            let lettered = read(kafka, &t.dead_letters, Isolation::ReadUncommitted).await;
            assert!(
                lettered.is_empty(),
                "{user}: {} records sent to the dead-letter topic",
                lettered.len()
            );
        }
    }
}

/// The offset toolkit, asked about a topic its principal may not even describe, fails with
/// `Error::Refused`, and the hint names DESCRIBE — not READ or WRITE, which a pipeline's
/// refusals name: the toolkit's question is the topic's metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offset_toolkit_refused_a_topic_names_describe() {
    init_tracing();
    let kafka = kafka().await;
    let t = setup(kafka, "toolkit").await;
    let mut conn = onceflow::offsets::Connection::new(
        kafka.sasl_bootstrap_servers().expect("a SASL listener"),
    );
    conn.properties.extend(
        sasl_properties("toolkit")
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v)),
    );
    let topic = t.input.clone();
    // The toolkit's calls block on librdkafka: off the async executor.
    let result =
        tokio::task::spawn_blocking(move || onceflow::offsets::topic_offsets(&conn, &topic, None))
            .await
            .expect("the toolkit's thread");
    match &result {
        Err(onceflow::Error::Refused { source, hint, .. }) => {
            assert_eq!(
                source.rdkafka_error_code(),
                Some(RDKafkaErrorCode::TopicAuthorizationFailed),
                "refused, but for {source}"
            );
            assert!(hint.contains("DESCRIBE on it"), "the hint {hint:?}");
        }
        other => panic!("expected Error::Refused, got {other:?}"),
    }
}
