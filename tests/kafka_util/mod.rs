//! Helpers shared by the Kafka integration tests: an independent reader, a
//! warm-up publish.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use keel::kafka::envelope::EventEnvelope;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::json;

/// Reads every message of `topic` (partitions `0..partitions`) from the beginning
/// with a plain rdkafka consumer (no keel code), until `expected` arrived or 30 s
/// passed, then half a second more so that extra (duplicate) messages show up.
/// `isolation` is `read_committed` or `read_uncommitted`.
pub fn read_raw(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    expected: usize,
    isolation: &str,
) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("keel-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("isolation.level", isolation)
        .create()
        .expect("reader consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < expected && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            out.push(m.expect("consume").detach());
        }
    }
    let settle = Instant::now() + Duration::from_millis(500);
    while Instant::now() < settle {
        if let Some(m) = consumer.poll(Duration::from_millis(50)) {
            out.push(m.expect("consume").detach());
        }
    }
    out
}

/// [`read_raw`] decoded as keel events (read-uncommitted).
pub fn read_back(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    expected: usize,
) -> Vec<EventEnvelope> {
    read_raw(bootstrap, topic, partitions, expected, "read_uncommitted")
        .iter()
        .map(|m| EventEnvelope::from_message(m).expect("a keel event"))
        .collect()
}

/// Sum of the high watermarks of `topic`'s partitions.
pub fn high_watermarks(bootstrap: &str, topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("watermark client");
    // A fresh client may see a partition's leader a moment after the topic's
    // creator did: retry a few times before failing.
    (0..partitions)
        .map(|p| {
            let mut last = None;
            for _ in 0..20 {
                match consumer.fetch_watermarks(topic, p, Duration::from_secs(10)) {
                    Ok((_, high)) => return high,
                    Err(e) => last = Some(e),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            panic!("watermarks of {topic}/{p}: {last:?}")
        })
        .sum()
}

/// The first header named `name` of a raw message.
pub fn header<'a>(m: &'a OwnedMessage, name: &str) -> Option<&'a [u8]> {
    use rdkafka::message::Headers;
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
}

/// Publishes until one event is acknowledged: on a loaded machine the first
/// connection and the idempotent producer's id can take longer than the short
/// delivery timeouts some tests use.
pub async fn warm_up(client: &keel::kafka::client::KafkaClient, topic: &str) {
    use tower::ServiceExt;
    for _ in 0..10 {
        let event = EventEnvelope::new("warm.up", serde_json::json!({}));
        let r = client
            .publisher()
            .oneshot(keel::kafka::producer::PublishRequest::new(
                topic.to_string(),
                event,
            ))
            .await;
        if r.is_ok() {
            return;
        }
    }
    panic!("no publish succeeded while the broker was up");
}

/// Offsets `group` committed on partitions `0..partitions` of `topic` (0 if none),
/// read with a plain rdkafka client of the group (it does not join it).
pub async fn committed_offsets(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> std::collections::HashMap<i32, i64> {
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("a probe consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let c =
        tokio::task::spawn_blocking(move || probe.committed_offsets(tpl, Duration::from_secs(10)))
            .await
            .expect("probe task")
            .expect("committed offsets");
    c.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => (e.partition(), o),
            _ => (e.partition(), 0),
        })
        .collect()
}

/// A plain librdkafka client config for `brokers`.
pub fn client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

/// Creates each `(topic, partitions)` with replication 1; fails the test if one
/// cannot be created (names are unique per test, so none exists yet).
pub async fn create_topics(brokers: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = client(brokers).create().unwrap();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    for result in admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .unwrap()
    {
        result.unwrap();
    }
}

/// Produces `n` keyed events (`keys` keys, payload `{key, seq}`, round robin)
/// with a plain idempotent rdkafka producer, waiting out a full queue; returns
/// their ids in order.
pub async fn produce_keyed(brokers: &str, topic: &str, n: usize, keys: usize) -> Vec<String> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut seq = vec![0u64; keys];
    let mut ids = Vec::with_capacity(n);
    let mut deliveries = Vec::with_capacity(n);
    for i in 0..n {
        let k = i % keys;
        seq[k] += 1;
        let event = EventEnvelope::new(
            "order.created",
            json!({"key": format!("key-{k}"), "seq": seq[k]}),
        )
        .with_key(format!("key-{k}"));
        ids.push(event.event_id().to_string());
        let encoded = event.encode().unwrap();
        let key = encoded.key.clone().unwrap();
        let mut record = FutureRecord::to(topic)
            .payload(&encoded.value)
            .key(&key)
            .headers(encoded.owned_headers());
        loop {
            match producer.send_result(record) {
                Ok(d) => {
                    deliveries.push(d);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => panic!("produce failed: {e}"),
            }
        }
    }
    for d in deliveries {
        d.await.unwrap().unwrap();
    }
    ids
}
