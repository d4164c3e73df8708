//! Honest publish outcomes under injected faults (rdkafka's in-process
//! MockCluster): a publish that times out is "outcome unknown" (and is in fact
//! delivered later), a batch says what became of each event, a full local queue
//! does not open the breaker, a transactional commit that times out leaves the
//! publisher usable. Each test prints the figure RELIABILITY.md quotes
//! (`cargo test --test kafka_publish_outcomes -- --nocapture`).
#![cfg(feature = "kafka")]

mod kafka_util;

use std::collections::HashSet;
use std::time::Duration;

use keel::kafka::client::KafkaClient;
use keel::kafka::config::{KafkaConfig, KafkaLogLevel};
use keel::kafka::envelope::EventEnvelope;
use keel::kafka::error::{EventOutcome, KafkaProducerError, ProducerErrorKind};
use keel::kafka::producer::{
    BATCH_BACKSTOP, PublishBatchRequest, PublishRequest, PublishStack, TransactionalPublisher,
};
use keel::layers::circuit_breaker::CircuitState;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tower::{Service, ServiceExt};
use uuid::Uuid;

type Cluster = MockCluster<'static, DefaultProducerContext>;

fn cluster(topic: &str) -> Cluster {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(topic, 1, 1).expect("mock topic");
    cluster
}

fn builder(cluster: &Cluster) -> keel::kafka::config::KafkaConfigBuilder {
    KafkaConfig::builder()
        .brokers(cluster.bootstrap_servers().split(',').map(str::to_string))
        .log_level(KafkaLogLevel::Nothing)
        .rdkafka_property("linger.ms", "1")
}

fn topic() -> String {
    format!("keel-outcomes-{}", Uuid::new_v4())
}

fn event(i: usize) -> EventEnvelope {
    EventEnvelope::new("outcome.event", serde_json::json!({ "i": i }))
}

/// Event ids stored in `topic` (one partition), read by a plain rdkafka consumer.
async fn stored_ids(cluster: &Cluster, topic: &str, expected: usize) -> HashSet<Uuid> {
    let (b, t) = (cluster.bootstrap_servers(), topic.to_string());
    tokio::task::spawn_blocking(move || kafka_util::read_back(&b, &t, 1, expected))
        .await
        .unwrap()
        .iter()
        .map(EventEnvelope::event_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_cut_by_the_stack_timeout_is_outcome_unknown_and_is_delivered_later() {
    let topic = topic();
    let cluster = cluster(&topic);
    let config = builder(&cluster)
        .delivery_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let client = KafkaClient::connect(config).unwrap();
    kafka_util::warm_up(&client, &topic).await;

    let stack = PublishStack::builder(&client)
        .timeout(Duration::from_millis(300))
        .build();
    let mut publish = stack.event_service();
    cluster
        .broker_round_trip_time(1, Duration::from_secs(2))
        .unwrap();
    // The caller picks the ids (they are the consumers' dedupe key).
    let sent: Vec<EventEnvelope> = (1..=20)
        .map(|i| event(i).with_event_id(Uuid::new_v4()))
        .collect();
    let mut pending = Vec::new();
    for e in &sent {
        let ready = ServiceExt::<PublishRequest>::ready(&mut publish)
            .await
            .unwrap();
        pending.push(ready.call(PublishRequest::new(topic.clone(), e.clone())));
    }
    // Polled together: the layer's timer starts when a call is first polled.
    let results = futures::future::join_all(pending).await;
    let mut unknown = Vec::new();
    for (r, e) in results.into_iter().zip(&sent) {
        let err: KafkaProducerError = r.expect_err("2 s round trips, 300 ms timeout");
        assert_eq!(err.kind(), ProducerErrorKind::OutcomeUnknown, "{err}");
        assert!(err.may_have_been_delivered());
        assert!(!err.is_retryable(), "a blind retry would duplicate it");
        assert_eq!(
            err.event_id(),
            Some(e.event_id()),
            "the error names its event"
        );
        unknown.push(e.event_id());
    }
    assert_eq!(
        stack
            .event_metrics()
            .snapshot()
            .failures_by_class
            .get("outcome_unknown"),
        Some(&20)
    );

    cluster
        .broker_round_trip_time(1, Duration::from_millis(0))
        .unwrap();
    let stored = stored_ids(&cluster, &topic, 21).await;
    let delivered = unknown.iter().filter(|id| stored.contains(id)).count();
    println!(
        "FIGURE stack timeout: {delivered} of {} publishes reported outcome-unknown were in fact delivered",
        unknown.len()
    );
    // Retrying them as plain failures would have stored each one twice.
    assert_eq!(delivered, unknown.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_timing_out_an_event_in_flight_is_outcome_unknown() {
    let topic = topic();
    let cluster = cluster(&topic);
    let config = builder(&cluster)
        .delivery_timeout(Duration::from_millis(1500))
        .request_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let client = KafkaClient::connect(config).unwrap();
    kafka_util::warm_up(&client, &topic).await;
    cluster
        .broker_round_trip_time(1, Duration::from_secs(3))
        .unwrap();
    let sent: Vec<EventEnvelope> = (1..=10).map(event).collect();
    let mut publisher = client.publisher();
    let mut pending = Vec::new();
    for e in &sent {
        let ready = ServiceExt::<PublishRequest>::ready(&mut publisher)
            .await
            .unwrap();
        pending.push(ready.call(PublishRequest::new(topic.clone(), e.clone())));
    }
    let mut unknown = Vec::new();
    for (f, e) in pending.into_iter().zip(&sent) {
        let err = f
            .await
            .expect_err("3 s round trips, 1.5 s delivery timeout");
        assert_eq!(err.kind(), ProducerErrorKind::OutcomeUnknown, "{err}");
        assert!(
            err.kafka_error().is_some(),
            "librdkafka's own report: {err}"
        );
        unknown.push(e.event_id());
    }
    cluster
        .broker_round_trip_time(1, Duration::from_millis(0))
        .unwrap();
    let stored = stored_ids(&cluster, &topic, 11).await;
    let delivered = unknown.iter().filter(|id| stored.contains(id)).count();
    println!(
        "FIGURE delivery timeout in flight: {delivered} of {} events librdkafka timed out were in fact stored",
        unknown.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_timeout_follows_a_passed_through_message_timeout() {
    let topic = topic();
    let cluster = cluster(&topic);
    let bootstrap = cluster.bootstrap_servers();
    let config = KafkaConfig::from_vars([
        ("KAFKA_BROKERS", bootstrap.as_str()),
        ("KAFKA_RDKAFKA_MESSAGE_TIMEOUT_MS", "2000"),
    ])
    .unwrap();
    assert_eq!(config.delivery_timeout(), Duration::from_secs(2));
    let client = KafkaClient::connect(config).unwrap();
    let stack = PublishStack::new(&client);
    assert_eq!(stack.timeout(), Duration::from_secs(7));
    assert_eq!(
        client.batch_publisher().timeout(),
        Duration::from_secs(7),
        "a bare batch is bounded the same way"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_cut_by_its_time_says_what_became_of_each_event() {
    let topic = topic();
    let cluster = cluster(&topic);
    // Ten messages fit in librdkafka's queue; each round trip takes 1 s.
    let config = builder(&cluster)
        .delivery_timeout(Duration::from_secs(20))
        .rdkafka_property("queue.buffering.max.messages", "10")
        .build()
        .unwrap();
    let client = KafkaClient::connect(config).unwrap();
    kafka_util::warm_up(&client, &topic).await;
    cluster
        .broker_round_trip_time(1, Duration::from_secs(1))
        .unwrap();

    let stack = PublishStack::builder(&client)
        .timeout(Duration::from_millis(1500))
        .build();
    let sent: Vec<EventEnvelope> = (1..=50).map(event).collect();
    let err = stack
        .batch_service()
        .oneshot(PublishBatchRequest::new(topic.clone(), sent.clone()))
        .await
        .expect_err("50 events through a 10-event queue at 1 s per round trip, in 1.5 s");
    assert_eq!(err.kind(), ProducerErrorKind::OutcomeUnknown, "{err}");
    // The batch answered by itself (with per-event results), not the backstop layer.
    assert!(BATCH_BACKSTOP > Duration::ZERO);
    let outcome = err.batch().expect("per-event results");
    assert_eq!(outcome.total, 50);
    assert_eq!(outcome.events.len(), 50);
    let ids: Vec<Uuid> = outcome.events.iter().map(|e| e.event_id).collect();
    let sent_ids: Vec<Uuid> = sent.iter().map(EventEnvelope::event_id).collect();
    assert_eq!(ids, sent_ids, "in the batch's order");
    assert_eq!(
        outcome.delivered + outcome.failed + outcome.unknown,
        outcome.total
    );
    assert!(outcome.delivered >= 1, "{err}");
    assert!(outcome.unknown >= 1, "{err}");
    assert!(outcome.failed >= 1, "{err}");
    // Acknowledged first, then the ones in flight, then those never handed over.
    let rank = |o: &EventOutcome| match o {
        EventOutcome::Delivered { .. } => 0,
        EventOutcome::Unknown => 1,
        _ => 2,
    };
    let ranks: Vec<u8> = outcome.events.iter().map(|e| rank(&e.outcome)).collect();
    assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{ranks:?}");
    assert!(
        outcome.events[outcome.delivered + outcome.unknown..]
            .iter()
            .all(|e| e.outcome.is_safe_to_resend())
    );

    cluster
        .broker_round_trip_time(1, Duration::from_millis(0))
        .unwrap();
    let expected = 1 + outcome.delivered + outcome.unknown;
    let stored = stored_ids(&cluster, &topic, expected).await;
    let unknown: Vec<Uuid> = outcome.unknown_ids().collect();
    let unknown_stored = unknown.iter().filter(|id| stored.contains(id)).count();
    let resendable: Vec<Uuid> = outcome.safe_to_resend().collect();
    assert!(
        resendable.iter().all(|id| !stored.contains(id)),
        "an event reported as not stored was stored"
    );
    println!(
        "FIGURE batch cut at 1.5 s: {} delivered, {} unknown ({unknown_stored} of them stored later), {} failed + {} not sent = {} safe to resend (none stored)",
        outcome.delivered,
        outcome.unknown,
        outcome
            .events
            .iter()
            .filter(|e| matches!(e.outcome, EventOutcome::Failed(_)))
            .count(),
        outcome
            .events
            .iter()
            .filter(|e| e.outcome == EventOutcome::NotSent)
            .count(),
        resendable.len()
    );
    assert_eq!(unknown_stored, unknown.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_local_queue_does_not_open_the_breaker() {
    let topic = topic();
    let cluster = cluster(&topic);
    // A tiny local queue that librdkafka holds for 200 ms before sending.
    let config = builder(&cluster)
        .rdkafka_property("queue.buffering.max.messages", "10")
        .rdkafka_property("linger.ms", "200")
        .build()
        .unwrap();
    let client = KafkaClient::connect(config).unwrap();
    kafka_util::warm_up(&client, &topic).await;

    let stack = PublishStack::new(&client); // opens after 5 consecutive failures
    let mut publish = stack.event_service();
    let mut pending = Vec::new();
    for i in 0..20 {
        let ready = ServiceExt::<PublishRequest>::ready(&mut publish)
            .await
            .unwrap();
        pending.push(ready.call(PublishRequest::new(topic.clone(), event(i))));
    }
    let mut queue_full = 0;
    for f in pending {
        match f.await {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.kind(), ProducerErrorKind::QueueFull, "{e}");
                assert!(e.is_retryable());
                queue_full += 1;
            }
        }
    }
    assert!(
        queue_full >= 5,
        "only {queue_full} calls found the queue full"
    );
    println!(
        "FIGURE queue full: {queue_full} of 20 calls refused with QueueFull, breaker {:?}",
        stack.circuit_breaker().state()
    );
    assert_eq!(
        stack.circuit_breaker().state(),
        CircuitState::Closed,
        "{queue_full} full-queue refusals in a row opened the breaker while the broker was healthy"
    );
    assert_eq!(
        stack
            .event_metrics()
            .snapshot()
            .failures_by_class
            .get("queue_full"),
        Some(&(queue_full as u64))
    );
    // The broker is fine: the same stack publishes at once.
    publish
        .oneshot(PublishRequest::new(topic.clone(), event(99)))
        .await
        .expect("the breaker let the call through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_times_out_is_retried_then_reported_unknown_and_the_publisher_recovers() {
    let topic = topic();
    let cluster = cluster(&topic);
    // Transaction steps wait at most 1 s each (the request timeout).
    let config = builder(&cluster)
        .request_timeout(Duration::from_secs(1))
        .delivery_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let client = KafkaClient::connect(config).unwrap();
    let publisher = client
        .transactional_publisher(Some(&format!("keel-tx-{}", Uuid::new_v4())))
        .await
        .expect("transactions initialised");
    let first: Vec<EventEnvelope> = (0..5).map(event).collect();
    publisher
        .publish_batch(&topic, first.clone())
        .await
        .expect("a healthy commit");

    // 1.5 s round trips: the first commit call times out after 1 s, the commit
    // goes on in librdkafka, and calling it again finishes it.
    cluster
        .broker_round_trip_time(1, Duration::from_millis(1500))
        .unwrap();
    let second: Vec<EventEnvelope> = (5..10).map(event).collect();
    let ack = publisher
        .publish_batch(&topic, second.clone())
        .await
        .expect("a commit that timed out once is called again and lands");
    assert_eq!(ack.acks.len(), 5);

    // 6 s round trips: three 1 s commit calls cannot finish it. The commit may
    // still land, so the batch is "unknown", not "0 delivered".
    cluster
        .broker_round_trip_time(1, Duration::from_secs(6))
        .unwrap();
    let third: Vec<EventEnvelope> = (10..15).map(event).collect();
    let err = publisher
        .publish_batch(&topic, third.clone())
        .await
        .expect_err("the commit cannot finish in 3 x 1 s");
    assert_eq!(err.kind(), ProducerErrorKind::OutcomeUnknown, "{err}");
    assert!(err.may_have_been_delivered());
    let outcome = err.batch().expect("per-event results");
    assert_eq!((outcome.unknown, outcome.failed), (5, 0), "{err}");
    assert!(
        outcome
            .events
            .iter()
            .all(|e| e.outcome == EventOutcome::Unknown)
    );

    // Back to normal: the next transaction first finishes the pending commit,
    // then runs; the publisher did not have to be rebuilt.
    cluster
        .broker_round_trip_time(1, Duration::from_millis(0))
        .unwrap();
    let fourth: Vec<EventEnvelope> = (15..20).map(event).collect();
    publisher
        .publish_batch(&topic, fourth.clone())
        .await
        .expect("the publisher is usable after an unknown commit");

    let (b, t) = (cluster.bootstrap_servers(), topic.clone());
    let committed: HashSet<Uuid> =
        tokio::task::spawn_blocking(move || kafka_util::read_raw(&b, &t, 1, 20, "read_committed"))
            .await
            .unwrap()
            .iter()
            .map(|m| {
                EventEnvelope::<serde_json::Value>::from_message(m)
                    .unwrap()
                    .event_id()
            })
            .collect();
    let landed = third
        .iter()
        .filter(|e| committed.contains(&e.event_id()))
        .count();
    println!(
        "FIGURE commit outcome unknown: {landed} of {} events of the unknown commit were committed",
        third.len()
    );
    for e in first.iter().chain(&second).chain(&fourth) {
        assert!(
            committed.contains(&e.event_id()),
            "a committed event is missing"
        );
    }
}

/// A topic on a new mock cluster and a transactional publisher for it.
async fn tx_publisher() -> (String, Cluster, TransactionalPublisher) {
    let topic = topic();
    let cluster = cluster(&topic);
    let config = builder(&cluster)
        .request_timeout(Duration::from_secs(5))
        .delivery_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let publisher = KafkaClient::connect(config)
        .unwrap()
        .transactional_publisher(Some(&format!("keel-tx-{}", Uuid::new_v4())))
        .await
        .expect("transactions initialised");
    (topic, cluster, publisher)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_commit_error_recreates_the_producer_for_the_next_transaction() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let (topic, cluster, publisher) = tx_publisher().await;

    // The coordinator answers the commit with INVALID_TXN_STATE: fatal for
    // librdkafka, the producer is unusable.
    cluster.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_TXN_STATE],
    );
    let failed: Vec<EventEnvelope> = (0..3).map(event).collect();
    let err = publisher
        .publish_batch(&topic, failed)
        .await
        .expect_err("a fatal commit error");
    assert!(err.batch().is_some_and(|b| b.total == 3), "{err}");

    // The next transaction runs on a new producer (same transactional.id).
    let next: Vec<EventEnvelope> = (3..6).map(event).collect();
    let ack = publisher
        .publish_batch(&topic, next)
        .await
        .expect("the publisher recreated its producer");
    assert_eq!(ack.acks.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abortable_commit_error_aborts_and_says_every_event_failed() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let (topic, cluster, publisher) = tx_publisher().await;
    cluster.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID],
    );
    let events: Vec<EventEnvelope> = (0..3).map(event).collect();
    let err = publisher
        .publish_batch(&topic, events)
        .await
        .expect_err("the coordinator refuses the commit");
    assert!(!err.may_have_been_delivered(), "{err}");
    let outcome = err.batch().expect("per-event results");
    assert_eq!((outcome.failed, outcome.unknown), (3, 0), "{err}");
    let next: Vec<EventEnvelope> = (3..6).map(event).collect();
    publisher
        .publish_batch(&topic, next)
        .await
        .expect("usable after the abort");
}

/// A payload that cannot be serialized.
#[derive(Clone)]
struct Unserializable;

impl serde::Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("not serializable"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_abort_is_reported_with_the_failure_and_redone() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let (topic, cluster, publisher) = tx_publisher().await;
    // The second event cannot be serialized: the first is aborted, and the
    // coordinator refuses that abort.
    cluster.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_TXN_STATE],
    );
    let events = vec![
        EventEnvelope::new("ok", None),
        EventEnvelope::new("bad", Some(Unserializable)),
    ];
    let err = publisher
        .publish_batch(&topic, events)
        .await
        .expect_err("the second event cannot be serialized");
    assert_eq!(err.kind(), ProducerErrorKind::Serialization, "{err}");
    let abort = err.abort_error().expect("the failed abort is reported");
    assert!(err.to_string().contains("the abort failed too"), "{err}");
    println!("abort error: {abort}");
    let outcome = err.batch().expect("per-event results");
    assert_eq!(outcome.failed, 2);

    publisher
        .publish_batch(&topic, vec![event(1)])
        .await
        .expect("the publisher recovers before its next transaction");
}
