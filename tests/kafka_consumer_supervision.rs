//! Consumer supervision against the real Kafka broker started by `scripts/up`:
//! handler panics, a lane that dies, header names that are not UTF-8, a
//! dead-letter topic that cannot be written, unknown event types.
//!
//! Every test uses its own topics and consumer group. Input is produced with a raw
//! rdkafka producer (or kcat, for bytes rdkafka cannot write); dead-letter topics
//! and committed offsets are read back with independent clients.
#![cfg(feature = "kafka")]

mod kafka_util;
use kafka_util::{client, create_topics};
mod support;

use keel::kafka::client::KafkaClient;
use keel::kafka::config::{KafkaConfig, KafkaLogLevel};
use keel::kafka::consumer::{
    BoxError, ConsumedEvent, ConsumerError, ConsumerState, DeadLetterFailure, KafkaConsumer,
    StartOptions,
};
use keel::kafka::dead_letter::headers as dlq;
use keel::kafka::envelope::EventEnvelope;
use keel::kafka::registry::HandlerRegistry;
use keel::layers::retry::RetryPolicy;
use rdkafka::ClientConfig;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::Service;

fn unique(name: &str) -> String {
    format!("keel-supervise-{name}-{}", uuid::Uuid::new_v4().simple())
}

/// Publishes `events` to `partition` of `topic`, in order, acknowledged.
async fn produce_to(brokers: &str, topic: &str, partition: i32, events: &[EventEnvelope]) {
    let producer: FutureProducer = client(brokers)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for event in events {
        let encoded = event.encode().unwrap();
        let mut record = FutureRecord::to(topic)
            .partition(partition)
            .payload(&encoded.value)
            .headers(encoded.owned_headers());
        if let Some(key) = &encoded.key {
            record = record.key(key);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// Offsets `group` committed on partitions `0..partitions` of `topic` (0 if none).
async fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    kafka_util::committed_offsets(brokers, group, topic, partitions).await
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

/// 20, 40, 80 ms ... capped at 200 ms.
fn fast_retries() -> RetryPolicy {
    RetryPolicy::kafka()
        .without_budget()
        .base(Duration::from_millis(20))
        .cap(Duration::from_millis(200))
}

fn header_text(m: &OwnedMessage, name: &str) -> String {
    String::from_utf8_lossy(kafka_util::header(m, name).unwrap_or_else(|| panic!("no {name}")))
        .into_owned()
}

type Handled = Arc<Mutex<Vec<(i32, i64)>>>;

/// A registry whose "order.created" handler records (partition, offset), fails
/// with a panic on `{"panic": true}` and with an error on `{"poison": true}`,
/// counting the calls on those.
fn registry(handled: Handled, bad_calls: Arc<AtomicU32>) -> HandlerRegistry {
    HandlerRegistry::builder()
        .handler_fn("order.created", move |event: ConsumedEvent| {
            let (handled, bad_calls) = (handled.clone(), bad_calls.clone());
            async move {
                let payload = event.envelope().payload();
                if payload["panic"] == json!(true) {
                    bad_calls.fetch_add(1, Ordering::SeqCst);
                    panic!("order {} is in an impossible state", payload["order"]);
                }
                if payload["poison"] == json!(true) {
                    bad_calls.fetch_add(1, Ordering::SeqCst);
                    return Err::<(), BoxError>("poison".into());
                }
                handled
                    .lock()
                    .unwrap()
                    .push((event.partition(), event.offset()));
                Ok(())
            }
        })
        .build()
        .unwrap()
}

fn order(n: u32) -> EventEnvelope {
    EventEnvelope::new("order.created", json!({"order": n}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_retried_then_dead_lettered_with_class_panic_and_the_consumer_goes_on()
 {
    let brokers = support::kafka_brokers();
    let topic = unique("panic");
    let dlq_topic = format!("{topic}.dlq");
    create_topics(&brokers, &[(&topic, 1), (&dlq_topic, 1)]).await;
    let group = unique("panic");
    let panicking = EventEnvelope::new("order.created", json!({"order": 1, "panic": true}));
    produce_to(
        &brokers,
        &topic,
        0,
        &[panicking.clone(), order(2), order(3)],
    )
    .await;

    let (handled, bad_calls) = (Handled::default(), Arc::new(AtomicU32::new(0)));
    let consumer = KafkaConsumer::builder(client(&brokers), group.clone())
        .retry_policy(fast_retries())
        .start(
            StartOptions::new([topic.as_str()])
                .from_beginning(true)
                .max_retries(2),
            registry(handled.clone(), bad_calls.clone()),
        )
        .unwrap();
    wait_until(
        "the events after the panic",
        Duration::from_secs(60),
        || handled.lock().unwrap().len() == 2,
    )
    .await;
    assert!(
        consumer.is_running(),
        "a handler panic does not stop the consumer"
    );
    assert_eq!(consumer.state(), ConsumerState::Running);
    let m = consumer.metrics();
    assert_eq!(
        bad_calls.load(Ordering::SeqCst),
        3,
        "first call and 2 retries"
    );
    assert_eq!(m.total_panics, 3);
    assert_eq!(m.total_retries, 2);
    assert_eq!((m.total_dead_lettered, m.total_failed), (1, 1));
    assert_eq!(m.total_processed, 2);
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(committed(&brokers, &group, &topic, 1).await[&0], 3);

    let records = kafka_util::read_raw(&brokers, &dlq_topic, 1, 1, "read_uncommitted");
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(header_text(r, dlq::ERROR_KIND), "panic");
    assert_eq!(header_text(r, dlq::ATTEMPTS), "3");
    assert!(
        header_text(r, dlq::ERROR_TYPE).contains("HandlerPanicked"),
        "{}",
        header_text(r, dlq::ERROR_TYPE)
    );
    assert!(
        header_text(r, dlq::ERROR_MESSAGE).contains("order 1 is in an impossible state"),
        "{}",
        header_text(r, dlq::ERROR_MESSAGE)
    );
    let back = EventEnvelope::<serde_json::Value>::from_message(r).unwrap();
    assert_eq!(back.event_id(), panicking.event_id());
}

/// A handler service whose readiness check panics: a bug the runtime cannot turn
/// into a message failure.
#[derive(Clone)]
struct BrokenReadiness;

impl Service<ConsumedEvent> for BrokenReadiness {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        panic!("connection pool poisoned")
    }
    fn call(&mut self, _: ConsumedEvent) -> Self::Future {
        std::future::ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_that_panics_fails_the_consumer_in_state_health_and_shutdown() {
    let brokers = support::kafka_brokers();
    let topic = unique("lane-panic");
    create_topics(&brokers, &[(&topic, 1)]).await;
    let group = unique("lane-panic");
    produce_to(&brokers, &topic, 0, &[order(1), order(2)]).await;
    let kafka = KafkaClient::connect(
        KafkaConfig::builder()
            .brokers(brokers.split(',').map(str::to_string))
            .group_id(group.clone())
            .log_level(KafkaLogLevel::Warn)
            .build()
            .unwrap(),
    )
    .unwrap();
    let consumer = KafkaConsumer::builder(client(&brokers), group.clone())
        .register_with(&kafka)
        .start(
            StartOptions::new([topic.as_str()]).from_beginning(true),
            BrokenReadiness,
        )
        .unwrap();
    let started = Instant::now();
    let mut state = consumer.subscribe_state();
    let failed = tokio::time::timeout(
        Duration::from_secs(60),
        state.wait_for(ConsumerState::is_failed),
    )
    .await
    .expect("the consumer fails within 60 s")
    .unwrap()
    .clone();
    let ConsumerState::Failed { reason } = failed else {
        unreachable!()
    };
    assert!(
        reason.contains("lane 0 panicked") && reason.contains("connection pool poisoned"),
        "{reason}"
    );
    let failed_after = started.elapsed();
    wait_until("the poll thread to stop", Duration::from_secs(10), || {
        !consumer.is_running()
    })
    .await;
    eprintln!(
        "figure: lane panic: Failed {failed_after:?} after start, not running {:?} after start",
        started.elapsed()
    );
    let health = kafka.health_check(Duration::from_secs(10)).await.unwrap();
    assert!(!health.is_healthy, "{health:?}");
    assert_eq!(health.consumers.len(), 1);
    assert_eq!(health.consumers[0].state, "failed");
    assert!(
        health.consumers[0]
            .failure
            .as_deref()
            .unwrap()
            .contains("connection pool poisoned")
    );
    match consumer.shutdown(Duration::from_secs(10)).await {
        Err(ConsumerError::Failed { reason }) => assert!(reason.contains("lane 0"), "{reason}"),
        other => panic!("shutdown after a failure must say so: {other:?}"),
    }
    // Nothing was handled, so nothing is committed.
    assert_eq!(committed(&brokers, &group, &topic, 1).await[&0], 0);
}

/// Writes one record with a header whose name is the bytes `\xff\xfe` (not UTF-8)
/// with kcat: rdkafka's API only takes `&str` names.
fn produce_non_utf8_header_name(brokers: &str, topic: &str) {
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    let mut child = std::process::Command::new(support::kcat())
        .args([
            "-P",
            "-b",
            brokers,
            "-t",
            topic,
            "-p",
            "0",
            "-k",
            "bad-header",
        ])
        .arg("-H")
        .arg(std::ffi::OsStr::from_bytes(b"\xff\xfe=value"))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("kcat");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"not\":\"an envelope\"}\n")
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "kcat could not produce");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_is_dead_lettered_as_decode_and_polling_goes_on() {
    let brokers = support::kafka_brokers();
    let topic = unique("bad-header");
    let dlq_topic = format!("{topic}.dlq");
    create_topics(&brokers, &[(&topic, 1), (&dlq_topic, 1)]).await;
    let group = unique("bad-header");
    produce_to(&brokers, &topic, 0, &[order(1)]).await;
    produce_non_utf8_header_name(&brokers, &topic);
    produce_to(&brokers, &topic, 0, &[order(3)]).await;

    let (handled, bad_calls) = (Handled::default(), Arc::new(AtomicU32::new(0)));
    let consumer = KafkaConsumer::builder(client(&brokers), group.clone())
        .retry_policy(fast_retries())
        .start(
            StartOptions::new([topic.as_str()]).from_beginning(true),
            registry(handled.clone(), bad_calls),
        )
        .unwrap();
    wait_until(
        "the events around the bad one",
        Duration::from_secs(60),
        || handled.lock().unwrap().len() == 2,
    )
    .await;
    assert_eq!(*handled.lock().unwrap(), [(0, 0), (0, 2)]);
    assert!(consumer.is_running());
    let m = consumer.metrics();
    assert_eq!((m.total_decode_errors, m.total_dead_lettered), (1, 1));
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(committed(&brokers, &group, &topic, 1).await[&0], 3);

    let records = kafka_util::read_raw(&brokers, &dlq_topic, 1, 1, "read_uncommitted");
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(header_text(r, dlq::ERROR_KIND), "decode");
    assert_eq!(header_text(r, dlq::ORIGINAL_OFFSET), "1");
    assert!(header_text(r, dlq::ERROR_MESSAGE).contains("not valid UTF-8"));
    assert_eq!(r.key(), Some(&b"bad-header"[..]));
}

use rdkafka::Message;

/// A client whose dead-letter producer may not create topics and gives up on a
/// message after 1.5 s: a missing dead-letter topic cannot be written.
fn no_auto_create(brokers: &str) -> ClientConfig {
    let mut c = client(brokers);
    c.set("allow.auto.create.topics", "false")
        .set("message.timeout.ms", "1500")
        .set("log_level", "3");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_dlq_holds_only_its_partition_visibly_and_recovers_when_fixed() {
    let brokers = support::kafka_brokers();
    let topic = unique("dlq-missing");
    let dlq_topic = format!("{topic}.dlq");
    create_topics(&brokers, &[(&topic, 2)]).await;
    let group = unique("dlq-missing");
    let poison = EventEnvelope::new("order.created", json!({"order": 0, "poison": true}));
    produce_to(&brokers, &topic, 0, &[poison.clone(), order(1), order(2)]).await;
    produce_to(&brokers, &topic, 1, &[order(10), order(11)]).await;
    let kafka = KafkaClient::connect(
        KafkaConfig::builder()
            .brokers(brokers.split(',').map(str::to_string))
            .group_id(group.clone())
            .log_level(KafkaLogLevel::Warn)
            .build()
            .unwrap(),
    )
    .unwrap();

    let (handled, bad_calls) = (Handled::default(), Arc::new(AtomicU32::new(0)));
    let consumer = KafkaConsumer::builder(no_auto_create(&brokers), group.clone())
        .retry_policy(fast_retries())
        .register_with(&kafka)
        .start(
            StartOptions::new([topic.as_str()])
                .from_beginning(true)
                .max_retries(1)
                .auto_commit(false),
            registry(handled.clone(), bad_calls.clone()),
        )
        .unwrap();
    wait_until("partition 0 to be held", Duration::from_secs(60), || {
        consumer.is_partition_paused(&topic, 0) && consumer.metrics().dlq_failures >= 2
    })
    .await;
    let stuck = consumer.stuck_partitions();
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    assert_eq!(
        (stuck[0].partition.partition, stuck[0].offset),
        (0, 0),
        "{stuck:?}"
    );
    assert!(stuck[0].failures >= 2);
    assert!(
        !consumer.is_partition_paused(&topic, 1),
        "the other partition goes on"
    );
    // The others go on: partition 1 takes new events while partition 0 is held.
    let sent = Instant::now();
    produce_to(&brokers, &topic, 1, &[order(12)]).await;
    wait_until("partition 1's new event", Duration::from_secs(30), || {
        handled.lock().unwrap().contains(&(1, 2))
    })
    .await;
    eprintln!(
        "figure: unwritable DLQ: an event on the other partition handled {:?} after its publish",
        sent.elapsed()
    );
    produce_to(&brokers, &topic, 0, &[order(3)]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !handled.lock().unwrap().contains(&(0, 3)),
        "a held partition fetches nothing new"
    );
    assert_eq!(
        bad_calls.load(Ordering::SeqCst),
        2,
        "the handler is not run again"
    );
    let m = consumer.metrics();
    assert_eq!(m.stuck_partitions, 1);
    assert!(m.longest_stuck >= Duration::from_secs(1), "{m:?}");
    assert_eq!(m.total_dead_lettered, 0);
    let health = kafka.health_check(Duration::from_secs(10)).await.unwrap();
    assert!(health.degraded, "{health:?}");
    assert!(health.is_healthy, "held, not failed: {health:?}");
    let stuck_text = &health.consumers[0].stuck_partitions;
    assert!(
        stuck_text.len() == 1 && stuck_text[0].contains(&format!("{topic}/0 at offset 0")),
        "{stuck_text:?}"
    );
    // Never committed past the message that is not in the DLQ.
    let c = committed(&brokers, &group, &topic, 2).await;
    assert_eq!(c[&0], 0, "{c:?}");
    assert_eq!(c[&1], 3, "{c:?}");

    let at_fix = consumer.metrics();
    let (stuck_for_at_fix, failures_at_fix) = (at_fix.longest_stuck, at_fix.dlq_failures);
    // An operator creates the topic: the message lands, the partition resumes.
    let fixed = Instant::now();
    create_topics(&brokers, &[(&dlq_topic, 1)]).await;
    wait_until(
        "the held message to be dead-lettered",
        Duration::from_secs(60),
        || consumer.metrics().total_dead_lettered == 1,
    )
    .await;
    wait_until("partition 0 to resume", Duration::from_secs(30), || {
        handled.lock().unwrap().contains(&(0, 3))
    })
    .await;
    eprintln!(
        "figure: unwritable DLQ: stuck {:?} when fixed ({} failed publishes); partition 0 handling again {:?} after the topic was created",
        stuck_for_at_fix,
        failures_at_fix,
        fixed.elapsed()
    );
    assert!(consumer.stuck_partitions().is_empty());
    assert!(!consumer.is_partition_paused(&topic, 0));
    assert_eq!(bad_calls.load(Ordering::SeqCst), 2, "still not run again");
    let health = kafka.health_check(Duration::from_secs(10)).await.unwrap();
    assert!(!health.degraded, "{health:?}");
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    let c = committed(&brokers, &group, &topic, 2).await;
    assert_eq!((c[&0], c[&1]), (4, 3), "{c:?}");
    let records = kafka_util::read_raw(&brokers, &dlq_topic, 1, 1, "read_uncommitted");
    assert_eq!(records.len(), 1, "dead-lettered once");
    assert_eq!(
        EventEnvelope::<serde_json::Value>::from_message(&records[0])
            .unwrap()
            .event_id(),
        poison.event_id()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_policy_fails_the_consumer_when_the_dlq_stays_unwritable() {
    let brokers = support::kafka_brokers();
    let topic = unique("dlq-stop");
    create_topics(&brokers, &[(&topic, 1)]).await;
    let group = unique("dlq-stop");
    let poison = EventEnvelope::new("order.created", json!({"order": 0, "poison": true}));
    produce_to(&brokers, &topic, 0, &[order(1), poison, order(2)]).await;

    let (handled, bad_calls) = (Handled::default(), Arc::new(AtomicU32::new(0)));
    let consumer = KafkaConsumer::builder(no_auto_create(&brokers), group.clone())
        .retry_policy(fast_retries())
        .on_dlq_failure(DeadLetterFailure::StopConsumer { after_failures: 2 })
        .start(
            StartOptions::new([topic.as_str()])
                .from_beginning(true)
                .max_retries(0)
                .auto_commit(false),
            registry(handled.clone(), bad_calls.clone()),
        )
        .unwrap();
    let mut state = consumer.subscribe_state();
    tokio::time::timeout(
        Duration::from_secs(60),
        state.wait_for(ConsumerState::is_failed),
    )
    .await
    .expect("the consumer fails within 60 s")
    .unwrap();
    assert_eq!(consumer.metrics().dlq_failures, 2);
    assert_eq!(bad_calls.load(Ordering::SeqCst), 1);
    wait_until("the consumer to stop", Duration::from_secs(10), || {
        !consumer.is_running()
    })
    .await;
    match consumer.shutdown(Duration::from_secs(10)).await {
        Err(ConsumerError::Failed { reason }) => assert!(
            reason.contains(&format!(
                "{topic}/0@1 could not be dead-lettered after 2 attempts"
            )),
            "{reason}"
        ),
        other => panic!("expected the failure: {other:?}"),
    }
    // The event before the poison one may be committed; nothing past the poison.
    let c = committed(&brokers, &group, &topic, 1).await;
    assert!(c[&0] <= 1, "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_event_type_is_dead_lettered_by_default() {
    let brokers = support::kafka_brokers();
    let topic = unique("unknown");
    let dlq_topic = format!("{topic}.dlq");
    create_topics(&brokers, &[(&topic, 1), (&dlq_topic, 1)]).await;
    let group = unique("unknown");
    let newer = EventEnvelope::new("order.refunded.v2", json!({"order": 5}));
    produce_to(&brokers, &topic, 0, &[newer.clone(), order(6)]).await;

    let (handled, bad_calls) = (Handled::default(), Arc::new(AtomicU32::new(0)));
    let consumer = KafkaConsumer::builder(client(&brokers), group.clone())
        .retry_policy(fast_retries())
        .start(
            StartOptions::new([topic.as_str()]).from_beginning(true),
            registry(handled.clone(), bad_calls),
        )
        .unwrap();
    wait_until("the known event", Duration::from_secs(60), || {
        handled.lock().unwrap().len() == 1
    })
    .await;
    let m = consumer.metrics();
    assert_eq!((m.total_dead_lettered, m.total_retries), (1, 0));
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(committed(&brokers, &group, &topic, 1).await[&0], 2);
    let records = kafka_util::read_raw(&brokers, &dlq_topic, 1, 1, "read_uncommitted");
    assert_eq!(records.len(), 1);
    assert_eq!(
        header_text(&records[0], dlq::ERROR_KIND),
        "unknown_event_type"
    );
    assert_eq!(
        EventEnvelope::<serde_json::Value>::from_message(&records[0])
            .unwrap()
            .event_id(),
        newer.event_id()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_1_mb_message_with_a_huge_error_text_still_fits_in_the_dlq() {
    let brokers = support::kafka_brokers();
    let topic = unique("big");
    let dlq_topic = format!("{topic}.dlq");
    create_topics(&brokers, &[(&topic, 1), (&dlq_topic, 1)]).await;
    let group = unique("big");
    // ~997 KB of payload: within librdkafka's default 1,000,000-byte limit, and
    // the dead-letter copy too, as long as keel's headers stay small.
    let big = EventEnvelope::new("order.created", json!({"blob": "x".repeat(997_000)}));
    produce_to(&brokers, &topic, 0, &[big.clone(), order(2)]).await;
    let handled = Handled::default();
    let registry = {
        let handled = handled.clone();
        HandlerRegistry::builder()
            .handler_fn("order.created", move |event: ConsumedEvent| {
                let handled = handled.clone();
                async move {
                    if event.envelope().payload().get("blob").is_some() {
                        // An error whose text is a whole (100 KB) response body.
                        return Err::<(), BoxError>(
                            format!("upstream said: {}", "e".repeat(100_000)).into(),
                        );
                    }
                    handled
                        .lock()
                        .unwrap()
                        .push((event.partition(), event.offset()));
                    Ok(())
                }
            })
            .build()
            .unwrap()
    };
    let consumer = KafkaConsumer::builder(client(&brokers), group.clone())
        .retry_policy(fast_retries())
        .start(
            StartOptions::new([topic.as_str()])
                .from_beginning(true)
                .max_retries(0),
            registry,
        )
        .unwrap();
    wait_until(
        "the event after the big one",
        Duration::from_secs(60),
        || handled.lock().unwrap().len() == 1,
    )
    .await;
    let m = consumer.metrics();
    assert_eq!((m.total_dead_lettered, m.dlq_failures), (1, 0), "{m:?}");
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(committed(&brokers, &group, &topic, 1).await[&0], 2);
    let records = kafka_util::read_raw(&brokers, &dlq_topic, 1, 1, "read_uncommitted");
    assert_eq!(records.len(), 1);
    let text = header_text(&records[0], dlq::ERROR_MESSAGE);
    assert!(
        text.len() <= keel::kafka::dead_letter::MAX_ERROR_MESSAGE,
        "{}",
        text.len()
    );
    assert!(text.starts_with("upstream said: eee") && text.ends_with("(truncated)"));
    assert_eq!(
        EventEnvelope::<serde_json::Value>::from_message(&records[0])
            .unwrap()
            .event_id(),
        big.event_id()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_a_partition_is_stuck_is_prompt_and_commits_nothing_past_it() {
    let brokers = support::kafka_brokers();
    let topic = unique("dlq-stuck-stop");
    create_topics(&brokers, &[(&topic, 1)]).await;
    let group = unique("dlq-stuck-stop");
    let poison = EventEnvelope::new("order.created", json!({"order": 0, "poison": true}));
    produce_to(&brokers, &topic, 0, &[order(1), poison, order(2)]).await;
    let (handled, bad_calls) = (Handled::default(), Arc::new(AtomicU32::new(0)));
    let consumer = KafkaConsumer::builder(no_auto_create(&brokers), group.clone())
        .retry_policy(fast_retries())
        .start(
            StartOptions::new([topic.as_str()])
                .from_beginning(true)
                .max_retries(0),
            registry(handled.clone(), bad_calls),
        )
        .unwrap();
    wait_until("the partition to be stuck", Duration::from_secs(60), || {
        consumer.stuck_partitions().len() == 1 && handled.lock().unwrap().len() == 2
    })
    .await;
    let stopping = Instant::now();
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    let took = stopping.elapsed();
    eprintln!("figure: shutdown while a partition is stuck took {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Offset 0 was handled; 1 never reached the DLQ; 2 was handled but is past it.
    assert_eq!(committed(&brokers, &group, &topic, 1).await[&0], 1);
}

/// Issue 11 item 1: ten events finish, the eleventh runs for a long time; the
/// ten must be committed (and the lag must show it) while the eleventh runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_offsets_are_committed_while_a_slow_message_runs() {
    let brokers = support::kafka_brokers();
    let topic = unique("slow-one");
    create_topics(&brokers, &[(&topic, 1)]).await;
    let group = unique("slow-one");
    let mut events: Vec<EventEnvelope> = (0..10).map(order).collect();
    events.push(EventEnvelope::new(
        "order.created",
        json!({"order": 10, "slow": true}),
    ));
    produce_to(&brokers, &topic, 0, &events).await;

    let release = Arc::new(tokio::sync::Notify::new());
    let handled = Handled::default();
    let registry = {
        let (release, handled) = (release.clone(), handled.clone());
        HandlerRegistry::builder()
            .handler_fn("order.created", move |event: ConsumedEvent| {
                let (release, handled) = (release.clone(), handled.clone());
                async move {
                    if event.envelope().payload()["slow"] == json!(true) {
                        release.notified().await;
                    }
                    handled
                        .lock()
                        .unwrap()
                        .push((event.partition(), event.offset()));
                    Ok::<(), BoxError>(())
                }
            })
            .build()
            .unwrap()
    };
    let consumer = KafkaConsumer::builder(client(&brokers), group.clone())
        .start(
            StartOptions::new([topic.as_str()]).from_beginning(true),
            registry,
        )
        .unwrap();
    wait_until("the ten fast events", Duration::from_secs(60), || {
        handled.lock().unwrap().len() == 10
    })
    .await;
    let started = Instant::now();
    // Read by an independent client of the group's committed offsets.
    let mut committed_at = None;
    while started.elapsed() < Duration::from_secs(8) {
        if committed(&brokers, &group, &topic, 1).await[&0] == 10 {
            committed_at = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let committed_at = committed_at
        .expect("the ten finished events were not committed while the eleventh was still running");
    let lag = consumer.lag(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        lag[0].lag,
        Some(1),
        "only the running event is lag: {lag:?}"
    );
    eprintln!(
        "figure: ten finished offsets committed {committed_at:?} after they finished, the eleventh still running"
    );
    assert_eq!(
        handled.lock().unwrap().len(),
        10,
        "the slow one is still running"
    );
    release.notify_one();
    wait_until("the slow event", Duration::from_secs(10), || {
        handled.lock().unwrap().len() == 11
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(committed(&brokers, &group, &topic, 1).await[&0], 11);
}
