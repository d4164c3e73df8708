//! The poison-rate guard against the real Kafka broker started by `scripts/up`: a
//! consumer whose handler fails every record is stopped (or paused) by the guard
//! within its window, instead of draining the topic into the dead-letter queue.
//!
//! Each test uses its own topics and group. The dead-letter topic and the
//! committed offsets are read back with independent rdkafka clients
//! (`tests/kafka_util`), and a second consumer of the group shows that the records
//! the guard held were not committed.
#![cfg(feature = "kafka")]

mod kafka_util;
use kafka_util::client;
mod support;

use keel::kafka::client::KafkaClient;
use keel::kafka::config::{KafkaConfig, KafkaLogLevel};
use keel::kafka::consumer::{
    BoxError, ConsumedEvent, ConsumerError, ConsumerState, HandlerError, KafkaConsumer,
    PoisonAction, PoisonGuard, StartOptions,
};
use keel::kafka::envelope::EventEnvelope;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn unique(name: &str) -> String {
    format!("keel-poison-{name}-{}", uuid::Uuid::new_v4().simple())
}

async fn create_topics(brokers: &str, topics: &[&str]) {
    let one_partition: Vec<(&str, i32)> = topics.iter().map(|t| (*t, 1)).collect();
    kafka_util::create_topics(brokers, &one_partition).await;
}

/// Publishes `n` "order.created" events to partition 0 of `topic`, acknowledged.
async fn produce(brokers: &str, topic: &str, n: u32) {
    let producer: FutureProducer = client(brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let encoded: Vec<_> = (0..n)
        .map(|i| {
            EventEnvelope::new("order.created", json!({ "order": i }))
                .encode()
                .unwrap()
        })
        .collect();
    let sends = encoded.iter().map(|e| {
        producer.send(
            FutureRecord::<(), _>::to(topic)
                .partition(0)
                .payload(&e.value)
                .headers(e.owned_headers()),
            Duration::from_secs(30),
        )
    });
    for result in futures::future::join_all(sends).await {
        result.map_err(|(e, _)| e).unwrap();
    }
}

/// A handler that records the offsets it is called with and fails each record
/// permanently (no retries) until `fixed` is set.
#[derive(Clone, Default)]
struct BadDeploy {
    calls: Arc<Mutex<Vec<i64>>>,
    fixed: Arc<AtomicBool>,
}

impl tower::Service<ConsumedEvent> for BadDeploy {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: ConsumedEvent) -> Self::Future {
        self.calls.lock().unwrap().push(event.offset());
        std::future::ready(if self.fixed.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Box::new(HandlerError::permanent(std::io::Error::other(
                "the new release cannot read this order",
            ))) as BoxError)
        })
    }
}

impl BadDeploy {
    fn service(&self) -> Self {
        self.clone()
    }

    fn calls(&self) -> Vec<i64> {
        self.calls.lock().unwrap().clone()
    }
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kafka_client(brokers: &str, group: &str) -> KafkaClient {
    KafkaClient::connect(
        KafkaConfig::builder()
            .brokers(brokers.split(',').map(str::to_string))
            .group_id(group.to_string())
            .log_level(KafkaLogLevel::Warn)
            .build()
            .unwrap(),
    )
    .unwrap()
}

async fn committed(brokers: &str, group: &str, topic: &str) -> i64 {
    kafka_util::committed_offsets(brokers, group, topic, 1).await[&0]
}

/// `N` records dead-lettered within the window: the guard stops the consumer
/// (state, health, shutdown say why), exactly `N` records are in the DLQ, nothing
/// past them is committed, and the next consumer of the group gets every record
/// the guard held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_stops_a_consumer_that_dead_letters_everything_and_commits_nothing_more() {
    const RECORDS: u32 = 200;
    const LIMIT: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(30);
    let brokers = support::kafka_brokers();
    let topic = unique("stop");
    let dlq_topic = format!("{topic}.dlq");
    create_topics(&brokers, &[&topic, &dlq_topic]).await;
    let group = unique("stop");
    produce(&brokers, &topic, RECORDS).await;

    let kafka = kafka_client(&brokers, &group);
    let handler = BadDeploy::default();
    let consumer = KafkaConsumer::builder(client(&brokers), group.clone())
        .register_with(&kafka)
        .poison_guard(
            PoisonGuard::new()
                .max_dead_lettered(LIMIT)
                .window(WINDOW)
                .action(PoisonAction::Stop),
        )
        .start(
            StartOptions::new([topic.as_str()]).from_beginning(true),
            handler.service(),
        )
        .unwrap();
    wait_until("the first record", Duration::from_secs(60), || {
        !handler.calls().is_empty()
    })
    .await;
    let first_failure = Instant::now();
    let mut state = consumer.subscribe_state();
    let failed = tokio::time::timeout(WINDOW, state.wait_for(ConsumerState::is_failed))
        .await
        .expect("stopped within the guard's window")
        .unwrap()
        .clone();
    let stopped_after = first_failure.elapsed();
    let ConsumerState::Failed { reason } = failed else {
        unreachable!()
    };
    assert!(
        reason.starts_with("poison-rate guard") && reason.contains("limit 10 records"),
        "{reason}"
    );
    assert_eq!(consumer.poison_guard_reason().as_deref(), Some(&*reason));
    wait_until("the poll thread to stop", Duration::from_secs(10), || {
        !consumer.is_running()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        handler.calls(),
        (0..i64::from(LIMIT)).collect::<Vec<_>>(),
        "no record handled after the guard tripped"
    );
    let m = consumer.metrics();
    assert_eq!((m.total_dead_lettered, m.total_processed), (10, 0));

    let health = kafka.health_check(Duration::from_secs(10)).await.unwrap();
    assert!(!health.is_healthy, "{health:?}");
    assert_eq!(health.consumers[0].state, "failed");
    assert_eq!(health.consumers[0].failure.as_deref(), Some(&*reason));
    assert_eq!(health.consumers[0].poison_guard.as_deref(), Some(&*reason));
    match consumer.shutdown(Duration::from_secs(10)).await {
        Err(ConsumerError::Failed { reason: r }) => assert_eq!(r, reason),
        other => panic!("shutdown after the guard stopped it must say so: {other:?}"),
    }

    let dead = kafka_util::read_raw(&brokers, &dlq_topic, 1, LIMIT as usize, "read_uncommitted");
    assert_eq!(
        dead.len(),
        LIMIT as usize,
        "exactly the records before the trip"
    );
    let position = committed(&brokers, &group, &topic).await;
    assert!(
        position <= i64::from(LIMIT),
        "committed {position}: past the records the guard held back"
    );

    // The fixed release, in the same group, gets every record not dead-lettered.
    let fixed = BadDeploy::default();
    fixed.fixed.store(true, Ordering::SeqCst);
    let next = KafkaConsumer::builder(client(&brokers), group.clone())
        .start(
            StartOptions::new([topic.as_str()]).from_beginning(true),
            fixed.service(),
        )
        .unwrap();
    wait_until("the held records", Duration::from_secs(60), || {
        fixed.calls().last() == Some(&i64::from(RECORDS - 1))
    })
    .await;
    next.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        fixed.calls(),
        (position..i64::from(RECORDS)).collect::<Vec<_>>()
    );
    assert_eq!(
        committed(&brokers, &group, &topic).await,
        i64::from(RECORDS)
    );
    eprintln!(
        "figure: poison guard (stop, {LIMIT} records in {WINDOW:?}): stopped {stopped_after:?} \
         after the first failure; {} records dead-lettered, committed {position} of {RECORDS}",
        dead.len()
    );
}

/// More than half of the records dead-lettered once 20 were seen: the guard
/// pauses the consumer (still running, in the group), health is degraded with the
/// reason, only the dead-lettered records are committed; released after the fix,
/// the consumer handles the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_pauses_on_the_rate_and_release_resumes_after_the_fix() {
    const RECORDS: u32 = 100;
    let brokers = support::kafka_brokers();
    let topic = unique("pause");
    let dlq_topic = format!("{topic}.dlq");
    create_topics(&brokers, &[&topic, &dlq_topic]).await;
    let group = unique("pause");
    produce(&brokers, &topic, RECORDS).await;

    let kafka = kafka_client(&brokers, &group);
    let handler = BadDeploy::default();
    let consumer = KafkaConsumer::builder(client(&brokers), group.clone())
        .register_with(&kafka)
        .poison_guard(
            PoisonGuard::new()
                .max_rate(0.5)
                .min_records(20)
                .window(Duration::from_secs(60)),
        )
        .start(
            StartOptions::new([topic.as_str()]).from_beginning(true),
            handler.service(),
        )
        .unwrap();
    wait_until("the guard to trip", Duration::from_secs(60), || {
        consumer.poison_guard_reason().is_some()
    })
    .await;
    let reason = consumer.poison_guard_reason().unwrap();
    assert!(
        reason.contains("20 of 20 records (100.0%)") && reason.contains("limit 50.0%"),
        "{reason}"
    );
    wait_until("fetching to pause", Duration::from_secs(10), || {
        consumer.is_paused()
    })
    .await;
    // Held: no more records handled, the dead-lettered ones committed, no more.
    assert_eq!(consumer.metrics().total_dead_lettered, 20);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut position = 0;
    while Instant::now() < deadline && position < 20 {
        position = committed(&brokers, &group, &topic).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(position, 20, "the 20 dead-lettered records are committed");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(handler.calls(), (0..20).collect::<Vec<_>>());
    assert_eq!(committed(&brokers, &group, &topic).await, 20);
    assert!(consumer.is_running());
    assert_eq!(consumer.state(), ConsumerState::Running);
    let health = kafka.health_check(Duration::from_secs(10)).await.unwrap();
    assert!(health.degraded, "{health:?}");
    assert!(health.is_healthy, "paused, not failed: {health:?}");
    assert_eq!(health.consumers[0].poison_guard.as_deref(), Some(&*reason));
    assert_eq!(health.consumers[0].failure, None);

    handler.fixed.store(true, Ordering::SeqCst);
    assert!(consumer.release_poison_guard().unwrap());
    assert!(!consumer.release_poison_guard().unwrap(), "released once");
    wait_until("the rest of the records", Duration::from_secs(60), || {
        handler.calls().len() == RECORDS as usize
    })
    .await;
    assert_eq!(handler.calls(), (0..i64::from(RECORDS)).collect::<Vec<_>>());
    assert!(!consumer.is_paused());
    assert_eq!(consumer.poison_guard_reason(), None);
    let health = kafka.health_check(Duration::from_secs(10)).await.unwrap();
    assert!(!health.degraded, "{health:?}");
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        committed(&brokers, &group, &topic).await,
        i64::from(RECORDS)
    );
    let dead = kafka_util::read_raw(&brokers, &dlq_topic, 1, 20, "read_uncommitted");
    assert_eq!(dead.len(), 20);
}
