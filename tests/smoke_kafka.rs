//! Smoke test of the real Apache Kafka broker that `scripts/up` starts, with raw
//! clients only (rdkafka, kcat, Kafka's own console consumer): it shows that the
//! test servers work before any keel code is tested against them.

mod support;

use std::process::Command;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// Bound for each network step; the broker answers in milliseconds when it is up.
const STEP: Duration = Duration::from_secs(30);

async fn create_topic(brokers: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(STEP)),
        )
        .await
        .expect("create_topics request");
    for result in results {
        result.unwrap_or_else(|(name, code)| panic!("creating topic {name}: {code}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_round_trip_read_back_by_kcat_and_console_consumer() {
    let brokers = support::kafka_brokers();
    let topic = format!("keel-smoke-{}", uuid::Uuid::new_v4());
    let key = "smoke-key";
    let value = format!("hello from keel {topic}");
    create_topic(&brokers, &topic).await;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let delivered = producer
        .send(
            FutureRecord::to(&topic)
                .key(key)
                .payload(&value)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "trace",
                    value: Some("abc"),
                })),
            STEP,
        )
        .await
        .unwrap_or_else(|(err, _)| panic!("delivery to {topic} failed: {err}"));
    assert_eq!(delivered.partition, 0);
    let offset = delivered.offset;

    // rdkafka consumer, assigned to the partition and offset the producer reported.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("{topic}-group"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(&topic, 0, Offset::Offset(offset))
        .expect("assignment");
    consumer.assign(&assignment).expect("assign");
    let message = tokio::time::timeout(STEP, consumer.recv())
        .await
        .expect("no message within the step bound")
        .expect("consumer error");
    assert_eq!(message.offset(), offset);
    assert_eq!(message.key(), Some(key.as_bytes()));
    assert_eq!(message.payload(), Some(value.as_bytes()));
    let header = message.headers().expect("headers").get(0);
    assert_eq!(
        (header.key, header.value),
        ("trace", Some(b"abc".as_slice()))
    );

    // kcat, an independent librdkafka-based client, reads the same record.
    let kcat = support::kcat();
    let out = Command::new(&kcat)
        .args([
            "-b", &brokers, "-C", "-t", &topic, "-p", "0", "-e", "-c", "1",
        ])
        .args(["-o", &offset.to_string(), "-f", "%k|%s|%o\n"])
        .output()
        .expect("run kcat");
    assert!(
        out.status.success(),
        "kcat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{key}|{value}|{offset}\n")
    );

    // Apache Kafka's own Java console consumer reads it too.
    let libs = support::kafka_libs();
    let out = Command::new("java")
        .arg("-cp")
        .arg(libs.join("*"))
        .arg("org.apache.kafka.tools.consumer.ConsoleConsumer")
        .args(["--bootstrap-server", &brokers, "--topic", &topic])
        .args([
            "--from-beginning",
            "--max-messages",
            "1",
            "--timeout-ms",
            "30000",
        ])
        .args([
            "--property",
            "print.key=true",
            "--property",
            "key.separator=|",
        ])
        .output()
        .expect("run java ConsoleConsumer");
    assert!(
        out.status.success(),
        "ConsoleConsumer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = format!("{key}|{value}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(|line| line == expected),
        "ConsoleConsumer printed no line {expected:?}:\n{stdout}"
    );
}

/// With no broker at the configured address, the Kafka test above fails, and its
/// message names the command that starts the servers. It runs that very test in a
/// child process of this test binary, pointed at a port where nothing listens.
#[test]
fn kafka_test_without_broker_fails_naming_the_start_command() {
    let out = support::run_this_test_binary(
        "kafka_round_trip_read_back_by_kcat_and_console_consumer",
        &[("KEEL_KAFKA_BROKERS", support::closed_local_address())],
    );
    assert!(!out.status.success(), "the test passed without a broker");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Apache Kafka is not reachable") && text.contains("scripts/up"),
        "the failure does not name the start command:\n{text}"
    );
}
