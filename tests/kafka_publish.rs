//! Publishing against the real broker that `scripts/up` starts, read back by an
//! independent client (a plain rdkafka consumer, no keel code).
#![cfg(feature = "kafka")]

mod kafka_util;
mod support;

use std::collections::HashMap;
use std::time::Duration;

use keel::kafka::client::{ConnectionState, KafkaClient};
use keel::kafka::config::{KafkaConfig, KafkaLogLevel};
use keel::kafka::envelope::{
    EventEnvelope, HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_EVENT_VERSION,
};
use keel::kafka::error::ProducerErrorKind;
use keel::kafka::producer::{PublishBatchRequest, PublishRequest, PublishStack};
use rdkafka::Message;
use serde::{Deserialize, Serialize};
use tower::ServiceExt;
use uuid::Uuid;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    amount_cents: u64,
    lines: Vec<String>,
}

fn order(i: usize) -> EventEnvelope<OrderPlaced> {
    EventEnvelope::new(
        "order.placed",
        OrderPlaced {
            order_id: format!("order-{i}"),
            amount_cents: 100 * i as u64,
            lines: vec![format!("sku-{}", i % 7); i % 3],
        },
    )
    .with_key(format!("customer-{}", i % 5))
    .with_header("trace-id", format!("trace-{i}"))
}

fn client(brokers: &str) -> KafkaClient {
    let config = KafkaConfig::builder()
        .brokers(brokers.split(',').map(str::to_string))
        .client_id("keel-publish-test")
        .log_level(KafkaLogLevel::Warn)
        .delivery_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    KafkaClient::connect(config).unwrap()
}

async fn new_topic(client: &KafkaClient, partitions: i32) -> String {
    let topic = format!("keel-publish-{}", Uuid::new_v4());
    client
        .create_topic(&topic, partitions, 1, Duration::from_secs(20))
        .await
        .expect("create topic");
    topic
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_one_and_a_batch_and_reads_them_back() {
    let brokers = support::kafka_brokers();
    let client = client(&brokers);
    let topic = new_topic(&client, 3).await;

    let single = order(0);
    let ack = client
        .publisher()
        .oneshot(PublishRequest::new(topic.clone(), single.clone()))
        .await
        .expect("publish one");
    assert_eq!(ack.event_id, single.event_id());
    assert!(ack.offset >= 0 && (0..3).contains(&ack.partition));

    let batch: Vec<_> = (1..=200).map(order).collect();
    let acks = client
        .batch_publisher()
        .oneshot(PublishBatchRequest::new(topic.clone(), batch.clone()))
        .await
        .expect("publish a batch");
    assert_eq!(acks.acks.len(), 200);
    for (a, e) in acks.acks.iter().zip(&batch) {
        assert_eq!(a.event_id, e.event_id());
        assert!(a.offset >= 0);
    }

    let sent: Vec<_> = std::iter::once(single).chain(batch).collect();
    let (b, t) = (brokers.clone(), topic.clone());
    let raw = tokio::task::spawn_blocking(move || {
        kafka_util::read_raw(&b, &t, 3, 201, "read_uncommitted")
    })
    .await
    .unwrap();
    assert_eq!(raw.len(), 201, "every event exactly once");

    let by_id: HashMap<Uuid, &EventEnvelope<OrderPlaced>> =
        sent.iter().map(|e| (e.event_id(), e)).collect();
    let mut per_key: HashMap<Vec<u8>, Vec<Uuid>> = HashMap::new();
    for m in &raw {
        // Id, type and version travel as headers too.
        let id_header = kafka_util::header(m, HEADER_EVENT_ID).expect("id header");
        let id = Uuid::parse_str(std::str::from_utf8(id_header).unwrap()).unwrap();
        assert_eq!(
            kafka_util::header(m, HEADER_EVENT_TYPE),
            Some(&b"order.placed"[..])
        );
        assert_eq!(
            kafka_util::header(m, HEADER_EVENT_VERSION),
            Some(&b"1.0"[..])
        );
        // The JSON body is the seed's shape.
        let body: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(body["eventId"], id.to_string());
        assert_eq!(body["eventType"], "order.placed");

        let decoded = EventEnvelope::<OrderPlaced>::from_message(m).unwrap();
        let original = by_id[&id];
        assert_eq!(&decoded, original, "content identical");
        per_key
            .entry(m.key().unwrap().to_vec())
            .or_default()
            .push(id);
    }
    // Order per key: within a key (one partition), the read order is the send order.
    for (key, ids) in per_key {
        let sent_order: Vec<Uuid> = sent
            .iter()
            .filter(|e| e.key() == Some(&key[..]))
            .map(|e| e.event_id())
            .collect();
        assert_eq!(ids, sent_order, "order kept for key {key:?}");
    }

    let m = client.publish_metrics();
    assert_eq!(m.total_published, 201);
    assert_eq!(m.total_failed, 0);
    assert_eq!(m.average_batch_size, 200.0);
    assert_eq!(m.latency.calls, 2);
    assert!(m.last_published_at_unix_ms.is_some());

    let health = client.health_check(Duration::from_secs(10)).await.unwrap();
    assert!(health.is_healthy, "{health:?}");
    assert_eq!(health.state, ConnectionState::Connected);
    assert!(
        health.metrics.admin_connected,
        "the admin client created the topic"
    );
    client
        .disconnect(KafkaClient::DEFAULT_DISCONNECT_TIMEOUT)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_1001_is_refused_before_any_io() {
    let brokers = support::kafka_brokers();
    let client = client(&brokers);
    let topic = new_topic(&client, 2).await;

    // Through the default stack (the batch-size layer refuses it) and through the
    // bare service (which checks too): neither sends anything.
    let stack = PublishStack::new(&client);
    let batch: Vec<_> = (0..1001).map(order).collect();
    let too_large = ProducerErrorKind::BatchTooLarge {
        size: 1001,
        max: 1000,
    };
    let err = stack
        .batch_service()
        .oneshot(PublishBatchRequest::new(topic.clone(), batch.clone()))
        .await
        .expect_err("1,001 events is over the limit");
    assert_eq!(err.kind(), too_large);
    assert_eq!(stack.batch_metrics().snapshot().failures, 1);
    let err = client
        .batch_publisher()
        .oneshot(PublishBatchRequest::new(topic.clone(), batch))
        .await
        .expect_err("1,001 events is over the limit");
    assert_eq!(err.kind(), too_large);
    assert_eq!(err.topic(), topic);
    assert!(!err.is_retryable());

    // Nothing reached the broker: the topic is still empty, nothing is queued.
    use rdkafka::producer::Producer;
    assert_eq!(client.producer().unwrap().in_flight_count(), 0);
    let (b, t) = (brokers.clone(), topic.clone());
    let written = tokio::task::spawn_blocking(move || kafka_util::high_watermarks(&b, &t, 2))
        .await
        .unwrap();
    assert_eq!(written, 0);
    let m = client.publish_metrics();
    assert_eq!(
        (m.total_published, m.total_failed, m.total_batches),
        (0, 1001, 0)
    );

    // 1,000 is fine.
    let batch: Vec<_> = (0..1000).map(order).collect();
    let ack = stack
        .batch_service()
        .oneshot(PublishBatchRequest::new(topic.clone(), batch))
        .await
        .expect("1,000 events is the limit");
    assert_eq!(ack.acks.len(), 1000);
    let (b, t) = (brokers.clone(), topic.clone());
    let written = tokio::task::spawn_blocking(move || kafka_util::high_watermarks(&b, &t, 2))
        .await
        .unwrap();
    assert_eq!(written, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transaction_is_invisible_to_read_committed_consumers() {
    let brokers = support::kafka_brokers();
    let client = client(&brokers);
    let topic = new_topic(&client, 1).await;
    let publisher = client
        .transactional_publisher(Some(&format!("keel-tx-{}", Uuid::new_v4())))
        .await
        .expect("transactions initialised");

    // Aborted: 10 events written to the log, then the transaction is aborted.
    let aborted: Vec<_> = (0..10).map(order).collect();
    let mut tx = publisher.begin().await.unwrap();
    tx.publish_all(&topic, &aborted).unwrap();
    tx.abort().await.expect("abort");

    // Committed: 5 events through the all-or-nothing batch call.
    let committed: Vec<_> = (100..105).map(order).collect();
    let acks = publisher
        .publish_batch(&topic, committed.clone())
        .await
        .expect("commit");
    assert_eq!(acks.acks.len(), 5);

    // A dropped transaction is aborted too.
    let dropped: Vec<_> = (200..203).map(order).collect();
    {
        let mut tx = publisher.begin().await.unwrap();
        tx.publish_all(&topic, &dropped).unwrap();
    }
    // The next transaction waits for that abort, then commits.
    let last = vec![order(300)];
    publisher.publish_batch(&topic, last.clone()).await.unwrap();

    let (b, t) = (brokers.clone(), topic.clone());
    let read_committed =
        tokio::task::spawn_blocking(move || kafka_util::read_raw(&b, &t, 1, 6, "read_committed"))
            .await
            .unwrap();
    let ids: Vec<Uuid> = read_committed
        .iter()
        .map(|m| {
            EventEnvelope::<OrderPlaced>::from_message(m)
                .unwrap()
                .event_id()
        })
        .collect();
    let expected: Vec<Uuid> = committed
        .iter()
        .chain(&last)
        .map(|e| e.event_id())
        .collect();
    assert_eq!(ids, expected, "only committed events are visible");

    // The explicitly aborted events did reach the log (abort awaited their
    // acknowledgements): a read-uncommitted reader sees them. The dropped
    // transaction's events may have been purged before they were ever sent.
    let (b, t) = (brokers.clone(), topic.clone());
    let read_uncommitted = tokio::task::spawn_blocking(move || {
        kafka_util::read_raw(&b, &t, 1, 16, "read_uncommitted")
    })
    .await
    .unwrap();
    let seen: std::collections::HashSet<Uuid> = read_uncommitted
        .iter()
        .map(|m| {
            EventEnvelope::<OrderPlaced>::from_message(m)
                .unwrap()
                .event_id()
        })
        .collect();
    assert!(aborted.iter().all(|e| seen.contains(&e.event_id())));
    assert!((16..=19).contains(&read_uncommitted.len()));
}
