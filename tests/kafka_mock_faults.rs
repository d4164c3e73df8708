//! Fault injection on rdkafka's in-process MockCluster: broker down, injected
//! request errors, slow round trips. No external server is needed.
#![cfg(feature = "kafka")]

mod kafka_util;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel::kafka::client::{CloseFuture, ConnectionState, KafkaClient, ManagedConsumer};
use keel::kafka::config::{KafkaConfig, KafkaLogLevel};
use keel::kafka::envelope::EventEnvelope;
use keel::kafka::error::{KafkaClientError, KafkaProducerError, ProducerErrorKind};
use keel::kafka::producer::{PublishBatchRequest, PublishRequest, PublishStack};
use keel::layers::circuit_breaker::CircuitState;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tower::{Service, ServiceExt};
use uuid::Uuid;

type Cluster = MockCluster<'static, DefaultProducerContext>;

fn cluster(topic: &str, partitions: i32) -> Cluster {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster
        .create_topic(topic, partitions, 1)
        .expect("mock topic");
    cluster
}

fn config(cluster: &Cluster, delivery_timeout: Duration) -> KafkaConfig {
    KafkaConfig::builder()
        .brokers(cluster.bootstrap_servers().split(',').map(str::to_string))
        .delivery_timeout(delivery_timeout)
        .request_timeout(Duration::from_millis(
            500.min(delivery_timeout.as_millis() as u64),
        ))
        .statistics_interval(Duration::from_millis(100))
        .log_level(KafkaLogLevel::Nothing)
        // Reconnect quickly once the broker is back.
        .rdkafka_property("reconnect.backoff.ms", "20")
        .rdkafka_property("reconnect.backoff.max.ms", "200")
        .rdkafka_property("linger.ms", "1")
        .build()
        .expect("valid config")
}

fn topic() -> String {
    format!("keel-mock-{}", Uuid::new_v4())
}

fn event(i: usize) -> EventEnvelope {
    EventEnvelope::new("mock.event", serde_json::json!({ "i": i }))
        .with_key(format!("key-{}", i % 10))
}

/// Waits (bounded) until `f` holds; librdkafka's threads change state on their own.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_fails_with_a_typed_error_in_bounded_time() {
    let topic = topic();
    let cluster = cluster(&topic, 1);
    let client = KafkaClient::connect(config(&cluster, Duration::from_secs(1))).unwrap();
    let publisher = client.publisher();

    kafka_util::warm_up(&client, &topic).await;
    eventually("CONNECTED", || client.state() == ConnectionState::Connected).await;

    cluster.broker_down(1).unwrap();
    // Bounded by the 1 s delivery timeout; the outer timeout only guards the test.
    let err: KafkaProducerError = tokio::time::timeout(
        Duration::from_secs(15),
        publisher
            .clone()
            .oneshot(PublishRequest::new(topic.clone(), event(1))),
    )
    .await
    .expect("the publish resolves within the delivery timeout")
    .expect_err("the broker is down");
    assert_eq!(err.topic(), topic);
    // librdkafka's delivery timeout: it cannot tell whether the event left, so
    // the outcome is unknown (not a plain, retryable timeout).
    assert!(
        matches!(
            err.kind(),
            ProducerErrorKind::OutcomeUnknown | ProducerErrorKind::Transport
        ),
        "{err}"
    );
    assert!(err.may_have_been_delivered() || err.is_retryable(), "{err}");
    let batch_err = publisher_batch_fails(&client, &topic).await;
    assert!(
        matches!(
            batch_err.kind(),
            ProducerErrorKind::OutcomeUnknown | ProducerErrorKind::Transport
        ),
        "{batch_err}"
    );
    assert_eq!(batch_err.batch().map(|b| b.delivered), Some(0));
    assert_eq!(batch_err.batch().map(|b| b.events.len()), Some(3));

    // librdkafka's own events move the state to ERROR, then back once the broker returns.
    eventually("ERROR state", || client.state() == ConnectionState::Error).await;
    assert!(client.last_error().is_some());
    cluster.broker_up(1).unwrap();
    publisher
        .clone()
        .oneshot(PublishRequest::new(topic.clone(), event(2)))
        .await
        .expect("publish after the broker is back");
    eventually("CONNECTED again", || {
        client.state() == ConnectionState::Connected
    })
    .await;
    let m = client.publish_metrics();
    assert!(m.total_published >= 2);
    assert!(m.total_failed >= 4);
}

async fn publisher_batch_fails(client: &KafkaClient, topic: &str) -> KafkaProducerError {
    tokio::time::timeout(
        Duration::from_secs(15),
        client.batch_publisher().oneshot(PublishBatchRequest::new(
            topic.to_string(),
            vec![event(10), event(11), event(12)],
        )),
    )
    .await
    .expect("the batch resolves within the delivery timeout")
    .expect_err("the broker is down")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_retriable_errors_lose_nothing_and_duplicate_nothing() {
    let topic = topic();
    let partitions = 3;
    let cluster = cluster(&topic, partitions);
    // One request in flight per connection. The mock broker does not reject a
    // request whose sequence numbers leave a gap (a real broker answers
    // OUT_OF_ORDER_SEQUENCE_NUMBER), so with several in flight a later request is
    // stored while an earlier, failed one waits for its retry; the retry is then
    // taken for a duplicate and acknowledged without being stored (offset -1001).
    // That is a gap in the mock, not in librdkafka or keel: against the real
    // broker the idempotent producer keeps 5 requests in flight safely.
    let config = KafkaConfig::builder()
        .brokers(cluster.bootstrap_servers().split(',').map(str::to_string))
        .log_level(KafkaLogLevel::Nothing)
        .rdkafka_property("max.in.flight.requests.per.connection", "1")
        .rdkafka_property("linger.ms", "1")
        .build()
        .unwrap();
    let client = KafkaClient::connect(config).unwrap();
    let batches = client.batch_publisher();

    // Every Produce request fails a few times with retriable errors, and the
    // connection is cut once mid-stream: librdkafka retries, the idempotent
    // producer keeps it exactly-once and in order.
    use RDKafkaRespErr::*;
    let errors = [
        RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RD_KAFKA_RESP_ERR__TRANSPORT,
        RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
    ];
    let mut sent = Vec::new();
    let mut all_acks = Vec::new();
    for round in 0..5 {
        cluster.request_errors(RDKafkaApiKey::Produce, &errors);
        let events: Vec<EventEnvelope> = (0..100).map(|i| event(round * 100 + i)).collect();
        sent.extend(events.iter().cloned());
        let ack = batches
            .clone()
            .oneshot(PublishBatchRequest::new(topic.clone(), events))
            .await
            .expect("retriable errors are absorbed by librdkafka");
        assert_eq!(ack.acks.len(), 100);
        all_acks.extend(ack.acks);
    }
    // Every acknowledgement names a real, distinct position.
    let positions: HashSet<(i32, i64)> = all_acks.iter().map(|a| (a.partition, a.offset)).collect();
    assert_eq!(positions.len(), 500);
    assert!(all_acks.iter().all(|a| a.offset >= 0));

    let bootstrap = cluster.bootstrap_servers();
    let topic2 = topic.clone();
    let received = tokio::task::spawn_blocking(move || {
        kafka_util::read_back(&bootstrap, &topic2, partitions, 500)
    })
    .await
    .unwrap();
    assert_eq!(received.len(), sent.len(), "no loss and no duplicates");
    let ids: HashSet<Uuid> = received.iter().map(|e| e.event_id()).collect();
    assert_eq!(ids.len(), received.len(), "no duplicates");
    let sent_by_id: HashMap<Uuid, &EventEnvelope> =
        sent.iter().map(|e| (e.event_id(), e)).collect();
    for e in &received {
        let original = sent_by_id.get(&e.event_id()).expect("every event was sent");
        assert_eq!(e.payload(), original.payload());
        assert_eq!(e.key(), original.key());
    }
    // Order per key: the sequence of each key's payloads matches the send order.
    let order = |events: &[EventEnvelope]| {
        let mut by_key: HashMap<Vec<u8>, Vec<Uuid>> = HashMap::new();
        for e in events {
            by_key
                .entry(e.key().unwrap().to_vec())
                .or_default()
                .push(e.event_id());
        }
        by_key
    };
    assert_eq!(order(&received), order(&sent));
    assert_eq!(client.publish_metrics().total_published, 500);
    assert_eq!(client.publish_metrics().total_failed, 0);
}

/// A tower service that counts the calls that reach the inner publisher.
#[derive(Clone)]
struct Counting<S> {
    inner: S,
    calls: Arc<AtomicUsize>,
}

impl<S, R> tower::Service<R> for Counting<S>
where
    S: tower::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.call(req)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_config_answers_disabled_without_connecting() {
    let client =
        KafkaClient::connect(KafkaConfig::from_vars([("ENABLE_KAFKA", "false")]).unwrap()).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = Counting {
        inner: client.publisher(),
        calls: calls.clone(),
    };
    let err = svc
        .oneshot(PublishRequest::new("t", event(0)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ProducerErrorKind::Disabled);
    assert!(err.to_string().contains("disabled"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let err = client
        .batch_publisher()
        .oneshot(PublishBatchRequest::new("t", vec![event(1)]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ProducerErrorKind::Disabled);
    assert_eq!(client.state(), ConnectionState::Disconnected);
}

#[derive(Default)]
struct FakeConsumer {
    closed: AtomicUsize,
}

impl ManagedConsumer for FakeConsumer {
    fn name(&self) -> String {
        "fake".into()
    }
    fn is_connected(&self) -> bool {
        self.closed.load(Ordering::SeqCst) == 0
    }
    fn close(&self, _timeout: Duration) -> CloseFuture {
        self.closed.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
}

/// A consumer whose close never finishes: disconnect reports it after the timeout.
struct StuckConsumer;

impl ManagedConsumer for StuckConsumer {
    fn name(&self) -> String {
        "stuck".into()
    }
    fn is_connected(&self) -> bool {
        true
    }
    fn close(&self, _timeout: Duration) -> CloseFuture {
        Box::pin(std::future::pending())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_reports_what_did_not_close_in_time() {
    let topic = topic();
    let cluster = cluster(&topic, 1);
    let client = KafkaClient::connect(config(&cluster, Duration::from_secs(5))).unwrap();
    let _registration = client.register_consumer(Arc::new(StuckConsumer));
    let err = client
        .disconnect(Duration::from_millis(200))
        .await
        .unwrap_err();
    match err {
        KafkaClientError::DisconnectTimeout { pending, .. } => {
            assert!(pending.contains("consumer stuck"), "{pending}")
        }
        other => panic!("expected DisconnectTimeout, got {other}"),
    }
    assert_eq!(client.state(), ConnectionState::Disconnected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_and_disconnect_on_the_mock_cluster() {
    let topic = topic();
    let cluster = cluster(&topic, 1);
    let client = KafkaClient::connect(config(&cluster, Duration::from_secs(5))).unwrap();
    let health = client.health_check(Duration::from_secs(5)).await.unwrap();
    assert!(health.is_healthy, "{health:?}");
    assert_eq!(health.state, ConnectionState::Connected);
    assert!(health.metrics.producer_connected);
    assert_eq!(health.metrics.consumer_count, 0);
    assert!(health.brokers >= 1);
    let json = serde_json::to_value(&health).unwrap();
    assert_eq!(json["state"], "CONNECTED");
    assert_eq!(json["isHealthy"], true);

    // Publishes still in flight are flushed by disconnect.
    // A registered consumer is counted and closed by disconnect.
    let fake = Arc::new(FakeConsumer::default());
    let registration = client.register_consumer(fake.clone());
    let health = client.health_check(Duration::from_secs(5)).await.unwrap();
    assert_eq!(health.metrics.consumer_count, 1);
    assert_eq!(health.metrics.consumers_connected, 1);

    // `call` enqueues at once, so these are in librdkafka's queue before
    // disconnect starts.
    let mut publisher = client.publisher();
    let mut pending = Vec::new();
    for i in 0..50 {
        let ready = ServiceExt::<PublishRequest>::ready(&mut publisher)
            .await
            .unwrap();
        pending.push(ready.call(PublishRequest::new(topic.clone(), event(i))));
    }
    let pending = tokio::spawn(futures::future::join_all(pending));
    client
        .disconnect(KafkaClient::DEFAULT_DISCONNECT_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(client.state(), ConnectionState::Disconnected);
    assert_eq!(fake.closed.load(Ordering::SeqCst), 1);
    drop(registration);
    assert_eq!(client.consumer_count(), 0);
    for r in pending.await.unwrap() {
        r.expect("flushed before disconnect returned");
    }
    let err = client
        .publisher()
        .oneshot(PublishRequest::new(topic.clone(), event(99)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ProducerErrorKind::ShuttingDown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_after_5_failures_fails_fast_then_a_probe_closes_it() {
    let topic = topic();
    let cluster = cluster(&topic, 1);
    let client = KafkaClient::connect(config(&cluster, Duration::from_secs(1))).unwrap();
    kafka_util::warm_up(&client, &topic).await;

    let open_wait = Duration::from_secs(1);
    let stack = PublishStack::builder(&client).open_wait(open_wait).build();
    let calls = Arc::new(AtomicUsize::new(0));
    let publish = stack.wrap_event_service(Counting {
        inner: client.publisher(),
        calls: calls.clone(),
    });
    let breaker = stack.circuit_breaker();
    assert_eq!(breaker.state(), CircuitState::Closed);

    cluster.broker_down(1).unwrap();
    for i in 0..5 {
        let err = publish
            .clone()
            .oneshot(PublishRequest::new(topic.clone(), event(i)))
            .await
            .expect_err("the broker is down");
        assert!(
            matches!(
                err.kind(),
                ProducerErrorKind::OutcomeUnknown | ProducerErrorKind::Transport
            ),
            "{err}"
        );
        let expected = if i < 4 {
            CircuitState::Closed
        } else {
            CircuitState::Open
        };
        assert_eq!(breaker.state(), expected, "after failure {}", i + 1);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5);

    // Open: fails fast with a typed error, Kafka is not touched.
    for i in 0..20 {
        let err = publish
            .clone()
            .oneshot(PublishRequest::new(topic.clone(), event(100 + i)))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ProducerErrorKind::CircuitOpen);
        assert_eq!(err.topic(), topic);
        assert!(!err.is_retryable());
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        5,
        "no call reached the publisher"
    );
    assert_eq!(client.circuit_breaker_state().as_deref(), Some("OPEN"));
    let m = stack.event_metrics().snapshot();
    assert_eq!(m.failures_by_class.get("circuit_open"), Some(&20));

    // The broker comes back; once the open wait has passed, one probe goes
    // through, succeeds and closes the breaker.
    cluster.broker_up(1).unwrap();
    eventually("CONNECTED again", || {
        client.state() == ConnectionState::Connected
    })
    .await;
    let mut rejected_while_open = 0;
    let ack = loop {
        match publish
            .clone()
            .oneshot(PublishRequest::new(topic.clone(), event(200)))
            .await
        {
            Ok(ack) => break ack,
            Err(e) if e.kind() == ProducerErrorKind::CircuitOpen => {
                rejected_while_open += 1;
                assert!(
                    rejected_while_open < 100,
                    "the breaker never let a probe through"
                );
                tokio::time::sleep(open_wait / 10).await;
            }
            Err(e) => panic!("the probe failed: {e}"),
        }
    };
    assert!(ack.offset >= 0);
    assert_eq!(calls.load(Ordering::SeqCst), 6, "exactly one probe call");
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert_eq!(client.circuit_breaker_state().as_deref(), Some("CLOSED"));
    publish
        .clone()
        .oneshot(PublishRequest::new(topic.clone(), event(201)))
        .await
        .expect("closed again");
    assert_eq!(calls.load(Ordering::SeqCst), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_do_not_open_the_breaker() {
    let topic = topic();
    let cluster = cluster(&topic, 1);
    let config = KafkaConfig::builder()
        .brokers(cluster.bootstrap_servers().split(',').map(str::to_string))
        .log_level(KafkaLogLevel::Nothing)
        .rdkafka_property("message.max.bytes", "2000")
        .build()
        .unwrap();
    let client = KafkaClient::connect(config).unwrap();
    let stack = PublishStack::new(&client);
    let publish = stack.event_service();
    let huge = EventEnvelope::new("too.big", serde_json::json!({ "d": "x".repeat(10_000) }));
    for _ in 0..10 {
        let err = publish
            .clone()
            .oneshot(PublishRequest::new(topic.clone(), huge.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ProducerErrorKind::MessageTooLarge, "{err}");
        assert!(!err.is_retryable());
    }
    assert_eq!(stack.circuit_breaker().state(), CircuitState::Closed);
    let m = stack.event_metrics().snapshot();
    assert_eq!(m.failures_by_class.get("message_too_large"), Some(&10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_round_trip_time_makes_the_timeout_layer_fire() {
    let topic = topic();
    let cluster = cluster(&topic, 1);
    let client = KafkaClient::connect(config(&cluster, Duration::from_secs(20))).unwrap();
    kafka_util::warm_up(&client, &topic).await;

    let stack = PublishStack::builder(&client)
        .timeout(Duration::from_millis(300))
        .build();
    let publish = stack.event_service();
    cluster
        .broker_round_trip_time(1, Duration::from_secs(3))
        .unwrap();
    let err = publish
        .clone()
        .oneshot(PublishRequest::new(topic.clone(), event(1)))
        .await
        .expect_err("3 s round trips against a 300 ms timeout");
    // The record is still in librdkafka: the outcome is unknown, not retryable.
    assert_eq!(err.kind(), ProducerErrorKind::OutcomeUnknown);
    assert!(!err.is_retryable());
    assert_eq!(err.topic(), topic);
    // The layer fired, not librdkafka's delivery timeout (20 s).
    assert!(err.kafka_error().is_none(), "{err}");
    assert!(err.to_string().contains("timeout layer"), "{err}");
    let m = stack.event_metrics().snapshot();
    assert_eq!(m.failures_by_class.get("outcome_unknown"), Some(&1));

    // With the round trip back to normal, the same stack publishes again.
    cluster
        .broker_round_trip_time(1, Duration::from_millis(0))
        .unwrap();
    let publish_patiently = PublishStack::builder(&client)
        .timeout(Duration::from_secs(30))
        .build()
        .event_service();
    publish_patiently
        .oneshot(PublishRequest::new(topic.clone(), event(2)))
        .await
        .expect("publish after the slowdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_batch_stack_refuses_1001_before_the_breaker_and_the_broker() {
    let topic = topic();
    let cluster = cluster(&topic, 1);
    let client = KafkaClient::connect(config(&cluster, Duration::from_secs(5))).unwrap();
    let stack = PublishStack::new(&client);
    let calls = Arc::new(AtomicUsize::new(0));
    let batches = stack.wrap_batch_service(Counting {
        inner: client.batch_publisher(),
        calls: calls.clone(),
    });
    for _ in 0..6 {
        let err = batches
            .clone()
            .oneshot(PublishBatchRequest::new(
                topic.clone(),
                (0..1001).map(event).collect(),
            ))
            .await
            .unwrap_err();
        assert_eq!(
            err.kind(),
            ProducerErrorKind::BatchTooLarge {
                size: 1001,
                max: 1000
            }
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "never reached the publisher"
    );
    assert_eq!(stack.circuit_breaker().state(), CircuitState::Closed);
    assert_eq!(
        stack
            .batch_metrics()
            .snapshot()
            .failures_by_class
            .get("batch_too_large"),
        Some(&6)
    );
    let ack = batches
        .oneshot(PublishBatchRequest::new(
            topic.clone(),
            (0..1000).map(event).collect(),
        ))
        .await
        .expect("1,000 is fine");
    assert_eq!(ack.acks.len(), 1000);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_local_queue_is_a_typed_error_for_events_and_waited_out_by_batches() {
    let topic = topic();
    let cluster = cluster(&topic, 1);
    // A tiny local queue that librdkafka holds for 200 ms before sending.
    let config = KafkaConfig::builder()
        .brokers(cluster.bootstrap_servers().split(',').map(str::to_string))
        .log_level(KafkaLogLevel::Nothing)
        .rdkafka_property("queue.buffering.max.messages", "10")
        .rdkafka_property("linger.ms", "200")
        .build()
        .unwrap();
    let client = KafkaClient::connect(config).unwrap();
    kafka_util::warm_up(&client, &topic).await;

    // Single events: the 11th enqueue in a row finds the queue full.
    let mut publisher = client.publisher();
    let mut pending = Vec::new();
    let mut queue_full = None;
    for i in 0..11 {
        let ready = ServiceExt::<PublishRequest>::ready(&mut publisher)
            .await
            .unwrap();
        pending.push(ready.call(PublishRequest::new(topic.clone(), event(i))));
    }
    for (i, f) in pending.into_iter().enumerate() {
        match f.await {
            Ok(_) => assert!(i < 10, "event {i} cannot have fit in the queue"),
            Err(e) => queue_full = Some(e),
        }
    }
    let err = queue_full.expect("the 11th event finds the queue full");
    assert_eq!(err.kind(), ProducerErrorKind::QueueFull);
    assert!(err.is_retryable());

    // A batch of 100 through the same queue: enqueued as the queue drains.
    let ack = client
        .batch_publisher()
        .oneshot(PublishBatchRequest::new(
            topic.clone(),
            (0..100).map(event).collect(),
        ))
        .await
        .expect("the batch waits for room in the queue");
    assert_eq!(ack.acks.len(), 100);
    let offsets: Vec<i64> = ack.acks.iter().map(|a| a.offset).collect();
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "in order: {offsets:?}"
    );
}
