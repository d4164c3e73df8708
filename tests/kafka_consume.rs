//! Consume-and-handle against the real Kafka broker started by `scripts/up`.
//!
//! Every test uses its own topics and consumer group. Input is produced with a raw
//! rdkafka producer from keel envelopes; the dead-letter topic is read back with
//! kcat, an independent client.
#![cfg(feature = "kafka")]

mod kafka_util;
use kafka_util::{client, create_topics};
mod support;

use keel::kafka::client::KafkaClient;
use keel::kafka::config::{KafkaConfig, KafkaLogLevel};
use keel::kafka::consumer::{
    BoxError, ConsumedEvent, ConsumerError, ConsumerMetricsSnapshot, HandlerError, KafkaConsumer,
    KafkaConsumerBuilder, StartOptions,
};
use keel::kafka::dead_letter::headers as dlq;
use keel::kafka::dead_letter::{DeadLetterTopicError, DeadLetterTopics, EnsuredTopic};
use keel::kafka::envelope::EventEnvelope;
use keel::kafka::registry::{HandlerRegistry, UnknownEventTypes};
use keel::layers::retry::RetryPolicy;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("keel-consume-{name}-{}-{nanos}", std::process::id())
}

fn producer(brokers: &str) -> FutureProducer {
    client(brokers)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()
        .unwrap()
}

/// Publishes envelopes, all enqueued at once; returns (partition, offset) of each.
async fn produce(
    producer: &FutureProducer,
    topic: &str,
    events: &[EventEnvelope],
) -> Vec<(i32, i64)> {
    let mut deliveries = Vec::with_capacity(events.len());
    for event in events {
        let encoded = event.encode().unwrap();
        let mut record = FutureRecord::to(topic)
            .payload(&encoded.value)
            .timestamp(encoded.timestamp_ms)
            .headers(encoded.owned_headers());
        if let Some(key) = &encoded.key {
            record = record.key(key);
        }
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
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
    let mut out = Vec::with_capacity(deliveries.len());
    for d in deliveries {
        let d = d.await.unwrap().unwrap();
        out.push((d.partition, d.offset));
    }
    out
}

/// The offsets `group` committed for partitions `0..partitions` of `topic` (0 when
/// none), read by an independent consumer.
async fn committed_offsets(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> HashMap<i32, i64> {
    kafka_util::committed_offsets(brokers, group, topic, partitions).await
}

/// What a handler saw.
#[derive(Clone, Debug)]
struct Seen {
    key: Option<String>,
    event_id: String,
    payload: Value,
    partition: i32,
    offset: i64,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn seen(event: &ConsumedEvent) -> Seen {
    Seen {
        key: event.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        event_id: event.envelope().event_id().to_string(),
        payload: event.envelope().payload().clone(),
        partition: event.partition(),
        offset: event.offset(),
    }
}

/// A registry whose "order.created" handler records every event.
fn recording_registry(log: Log) -> HandlerRegistry {
    HandlerRegistry::builder()
        .handler_fn("order.created", move |event: ConsumedEvent| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(seen(&event));
                Ok::<_, BoxError>(())
            }
        })
        .build()
        .unwrap()
}

/// A consumer of `group` on `brokers` with [`fast_retries`], started.
fn start_with_fast_retries(
    brokers: &str,
    group: String,
    options: StartOptions,
    registry: HandlerRegistry,
) -> KafkaConsumer {
    KafkaConsumer::builder(client(brokers), group)
        .retry_policy(fast_retries())
        .start(options, registry)
        .unwrap()
}

/// Waits (up to 60 s) until `done(&consumer)`, then stops `consumer` and returns
/// its metrics as they were before the stop.
async fn stop_after(
    consumer: KafkaConsumer,
    what: &str,
    mut done: impl FnMut(&KafkaConsumer) -> bool,
) -> ConsumerMetricsSnapshot {
    wait_until(what, Duration::from_secs(60), || done(&consumer)).await;
    let metrics = consumer.metrics();
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    metrics
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

/// `n` events over `keys` keys; payload carries the key and a per-key sequence.
fn keyed_events(n: usize, keys: usize) -> Vec<EventEnvelope> {
    let mut seq = vec![0u64; keys];
    (0..n)
        .map(|i| {
            let k = i % keys;
            seq[k] += 1;
            EventEnvelope::new(
                "order.created",
                json!({"key": format!("key-{k}"), "seq": seq[k], "i": i, "blob": "x".repeat(i % 50)}),
            )
            .with_key(format!("key-{k}"))
        })
        .collect()
}

/// The Kafka schedule scaled down: 10, 20, 40 ms.
fn fast_retries() -> RetryPolicy {
    RetryPolicy::kafka()
        .without_budget()
        .base(Duration::from_millis(10))
        .cap(Duration::from_millis(40))
}

/// Every event handled exactly once, content identical, per-key order kept.
fn check_exactly_once_in_key_order(sent: &[EventEnvelope], log: &[Seen]) {
    assert_eq!(log.len(), sent.len(), "handled count");
    let by_id: HashMap<String, &EventEnvelope> =
        sent.iter().map(|e| (e.event_id().to_string(), e)).collect();
    let mut ids = HashSet::new();
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    for s in log {
        assert!(
            ids.insert(s.event_id.clone()),
            "event {} handled twice",
            s.event_id
        );
        let original = by_id
            .get(&s.event_id)
            .expect("handled an event that was never sent");
        assert_eq!(&s.payload, original.payload(), "payload changed");
        assert_eq!(
            s.key.as_deref().map(str::as_bytes),
            original.key(),
            "key changed"
        );
        let key = s.key.clone().unwrap();
        let seq = s.payload["seq"].as_u64().unwrap();
        let prev = last_seq.insert(key.clone(), seq).unwrap_or(0);
        assert_eq!(seq, prev + 1, "key {key}: seq {seq} handled after {prev}");
    }
}

async fn run_ten_thousand(
    name: &str,
    builder: impl FnOnce(ClientConfig, String) -> KafkaConsumerBuilder,
) {
    let brokers = support::kafka_brokers();
    let topic = unique(name);
    create_topics(&brokers, &[(&topic, 4)]).await;
    let sent = keyed_events(10_000, 100);
    produce(&producer(&brokers), &topic, &sent).await;

    let log: Log = Arc::default();
    let group = unique(name);
    let consumer = builder(client(&brokers), group.clone())
        .start(
            StartOptions::new([topic.as_str()]).from_beginning(true),
            recording_registry(log.clone()),
        )
        .unwrap();
    wait_until("10,000 events handled", Duration::from_secs(120), || {
        consumer.metrics().total_processed >= 10_000
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    check_exactly_once_in_key_order(&sent, &log.lock().unwrap());
    // Graceful shutdown committed everything (auto-commit mode: stored offsets).
    let committed = committed_offsets(&brokers, &group, &topic, 4).await;
    assert_eq!(committed.values().sum::<i64>(), 10_000, "{committed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_are_handled_exactly_once_in_key_order() {
    run_ten_thousand("10k-seq", |c, g| KafkaConsumer::builder(c, g).workers(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_key_ordered_mode_keeps_key_order() {
    run_ten_thousand("10k-keyed", |c, g| {
        KafkaConsumer::builder(c, g).key_ordered(16)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_failing_twice_is_retried_and_handled_once() {
    let brokers = support::kafka_brokers();
    let topic = unique("retry");
    create_topics(&brokers, &[(&topic, 1)]).await;
    let event = EventEnvelope::new("order.created", json!({"n": 1}));
    produce(&producer(&brokers), &topic, std::slice::from_ref(&event)).await;

    let calls = Arc::new(AtomicU32::new(0));
    let handled = Arc::new(AtomicU32::new(0));
    let registry = {
        let (calls, handled) = (calls.clone(), handled.clone());
        HandlerRegistry::builder()
            .handler_fn("order.created", move |_event: ConsumedEvent| {
                let (calls, handled) = (calls.clone(), handled.clone());
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                        return Err::<(), BoxError>("transient failure".into());
                    }
                    handled.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
            .build()
            .unwrap()
    };
    let consumer = start_with_fast_retries(
        &brokers,
        unique("retry"),
        StartOptions::new([topic.as_str()])
            .from_beginning(true)
            .max_retries(3),
        registry,
    );
    let metrics = stop_after(consumer, "the event to be processed", |c| {
        c.metrics().total_processed == 1
    })
    .await;
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(metrics.total_retries, 2);
    assert_eq!(metrics.total_failed, 0);
    assert_eq!(metrics.total_dead_lettered, 0);
}

fn kcat_read(brokers: &str, topic: &str, count: usize) -> Vec<Value> {
    let out = std::process::Command::new(support::kcat())
        .args([
            "-C",
            "-b",
            brokers,
            "-t",
            topic,
            "-o",
            "beginning",
            "-e",
            "-J",
            "-q",
        ])
        .args(["-c", &count.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kcat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Checks a DLQ record read by kcat -J: the original key, payload and headers
/// unchanged, and the provenance headers naming where it came from. Returns the
/// headers for the caller's own checks (error kind, message, attempts).
fn assert_dead_lettered_unchanged<T: serde::Serialize>(
    record: &Value,
    original: &EventEnvelope<T>,
    topic: &str,
    (partition, offset): (i32, i64),
    group: &str,
) -> BTreeMap<String, String> {
    let encoded = original.encode().unwrap();
    assert_eq!(
        record["key"].as_str().map(str::as_bytes),
        encoded.key.as_deref()
    );
    assert_eq!(
        record["payload"].as_str().unwrap().as_bytes(),
        &encoded.value[..]
    );
    let h = kcat_headers(record);
    for (name, value) in &encoded.headers {
        assert_eq!(
            h.get(name).map(String::as_bytes),
            Some(&value[..]),
            "original header {name}"
        );
    }
    assert_eq!(h[dlq::ORIGINAL_TOPIC], topic);
    assert_eq!(h[dlq::ORIGINAL_PARTITION], partition.to_string());
    assert_eq!(h[dlq::ORIGINAL_OFFSET], offset.to_string());
    assert_eq!(h[dlq::ORIGINAL_TIMESTAMP], encoded.timestamp_ms.to_string());
    assert_eq!(h[dlq::ORIGINAL_TIMESTAMP_TYPE], "CreateTime");
    assert_eq!(h[dlq::CONSUMER_GROUP], group);
    h
}

fn kcat_headers(record: &Value) -> BTreeMap<String, String> {
    let list = record["headers"]
        .as_array()
        .expect("kcat -J prints headers as a list");
    list.chunks(2)
        .map(|kv| {
            (
                kv[0].as_str().unwrap().to_string(),
                kv[1].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_lands_in_the_dlq_with_provenance_and_the_partition_moves_on() {
    let brokers = support::kafka_brokers();
    let topic = unique("poison");
    let dlq_topic = format!("{topic}.dlq");
    create_topics(&brokers, &[(&topic, 1), (&dlq_topic, 1)]).await;
    let group = unique("poison");

    let poison = EventEnvelope::new("order.created", json!({"poison": true}))
        .with_key("k-poison")
        .with_header("trace-id", "t-123");
    let good = EventEnvelope::new("order.created", json!({"poison": false}));
    let producer = producer(&brokers);
    let poison_at = produce(&producer, &topic, std::slice::from_ref(&poison)).await[0];
    // Not an envelope at all.
    let garbage = producer
        .send(
            FutureRecord::to(&topic)
                .key("k-garbage")
                .payload("this is not json")
                .headers(OwnedHeaders::new().insert(Header {
                    key: "origin",
                    value: Some("test"),
                })),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    produce(&producer, &topic, std::slice::from_ref(&good)).await;

    let handled_good = Arc::new(AtomicU32::new(0));
    let registry = {
        let handled_good = handled_good.clone();
        HandlerRegistry::builder()
            .handler_fn("order.created", move |event: ConsumedEvent| {
                let handled_good = handled_good.clone();
                async move {
                    if event.envelope().payload()["poison"] == json!(true) {
                        return Err::<(), BoxError>("poison pill: cannot process".into());
                    }
                    handled_good.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
            .build()
            .unwrap()
    };
    let consumer = start_with_fast_retries(
        &brokers,
        group.clone(),
        StartOptions::new([topic.as_str()])
            .from_beginning(true)
            .max_retries(2)
            .enable_dlq(true),
        registry,
    );
    let metrics = stop_after(consumer, "the good event after the poison", |_| {
        handled_good.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(metrics.total_dead_lettered, 2);
    assert_eq!(metrics.total_decode_errors, 1);
    assert_eq!(metrics.total_retries, 2);

    let records = kcat_read(&brokers, &dlq_topic, 2);
    assert_eq!(records.len(), 2, "two messages in the DLQ: {records:?}");

    // The poison event: unchanged key, payload and headers, plus provenance.
    let h = assert_dead_lettered_unchanged(&records[0], &poison, &topic, poison_at, &group);
    assert_eq!(h["trace-id"], "t-123");
    assert_eq!(h[dlq::ERROR_KIND], "error");
    assert!(!h[dlq::ERROR_TYPE].is_empty());
    assert!(
        h[dlq::ERROR_MESSAGE].contains("poison pill"),
        "{}",
        h[dlq::ERROR_MESSAGE]
    );
    assert_eq!(h[dlq::ATTEMPTS], "3");
    assert!(h[dlq::FAILED_AT].parse::<u64>().unwrap() > 0);

    // The undecodable message: dead-lettered at once, typed as a decode error.
    let g = &records[1];
    assert_eq!(g["key"], json!("k-garbage"));
    assert_eq!(g["payload"], json!("this is not json"));
    let h = kcat_headers(g);
    assert_eq!(h["origin"], "test");
    assert_eq!(h[dlq::ORIGINAL_OFFSET], garbage.offset.to_string());
    assert_eq!(h[dlq::ERROR_KIND], "decode");
    assert!(
        h[dlq::ERROR_TYPE].contains("DecodeError"),
        "{}",
        h[dlq::ERROR_TYPE]
    );
    assert_eq!(h[dlq::ATTEMPTS], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_skips_retries_and_is_dead_lettered() {
    let brokers = support::kafka_brokers();
    let topic = unique("permanent");
    create_topics(&brokers, &[(&topic, 1), (&format!("{topic}.dlq"), 1)]).await;
    let event = EventEnvelope::new("order.created", json!({}));
    produce(&producer(&brokers), &topic, std::slice::from_ref(&event)).await;
    let registry = HandlerRegistry::builder()
        .handler_fn("order.created", |_e: ConsumedEvent| async {
            Err::<(), _>(HandlerError::permanent("invalid order"))
        })
        .build()
        .unwrap();
    let consumer = KafkaConsumer::builder(client(&brokers), unique("permanent"))
        .start(
            StartOptions::new([topic.as_str()]).from_beginning(true),
            registry,
        )
        .unwrap();
    wait_until(
        "the event to be dead-lettered",
        Duration::from_secs(60),
        || consumer.metrics().total_dead_lettered == 1,
    )
    .await;
    assert_eq!(consumer.metrics().total_retries, 0);
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    let records = kcat_read(&brokers, &format!("{topic}.dlq"), 1);
    let h = kcat_headers(&records[0]);
    assert_eq!(h[dlq::ERROR_KIND], "permanent");
    assert_eq!(h[dlq::ATTEMPTS], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_delivery_and_resume_loses_nothing() {
    let brokers = support::kafka_brokers();
    let topic = unique("pause");
    create_topics(&brokers, &[(&topic, 2)]).await;
    let producer = producer(&brokers);
    let first = keyed_events(200, 10);
    produce(&producer, &topic, &first).await;

    let log: Log = Arc::default();
    let consumer = KafkaConsumer::builder(client(&brokers), unique("pause"))
        .start(
            StartOptions::new([topic.as_str()]).from_beginning(true),
            recording_registry(log.clone()),
        )
        .unwrap();
    wait_until("the first 200", Duration::from_secs(60), || {
        log.lock().unwrap().len() == 200
    })
    .await;

    consumer.pause().await.unwrap();
    assert!(consumer.is_paused());
    wait_until("in-flight work to finish", Duration::from_secs(10), || {
        consumer.in_flight() == 0
    })
    .await;
    let before = log.lock().unwrap().len();
    let second = keyed_events(300, 10);
    produce(&producer, &topic, &second).await;
    // Give a running fetcher ample time to deliver; nothing may arrive while paused.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(log.lock().unwrap().len(), before, "delivered while paused");

    consumer.resume().await.unwrap();
    assert!(!consumer.is_paused());
    wait_until("all 500", Duration::from_secs(60), || {
        log.lock().unwrap().len() >= 500
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    let log = log.lock().unwrap();
    let ids: HashSet<&str> = log.iter().map(|s| s.event_id.as_str()).collect();
    assert_eq!(log.len(), 500, "no duplicates");
    for e in first.iter().chain(&second) {
        assert!(
            ids.contains(e.event_id().to_string().as_str()),
            "lost {}",
            e.event_id()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_one_partition_stops_only_that_partition() {
    let brokers = support::kafka_brokers();
    let topic = unique("pause-one");
    create_topics(&brokers, &[(&topic, 2)]).await;
    let log: Log = Arc::default();
    let consumer = KafkaConsumer::builder(client(&brokers), unique("pause-one"))
        .start(
            StartOptions::new([topic.as_str()]).from_beginning(true),
            recording_registry(log.clone()),
        )
        .unwrap();
    wait_until("the assignment", Duration::from_secs(30), || {
        consumer.assignment().len() == 2
    })
    .await;
    consumer.pause_partition(&topic, 0).await.unwrap();
    assert!(consumer.is_partition_paused(&topic, 0));
    assert!(!consumer.is_partition_paused(&topic, 1));
    let sent = keyed_events(200, 20);
    let at = produce(&producer(&brokers), &topic, &sent).await;
    let on_p1 = at.iter().filter(|(p, _)| *p == 1).count();
    wait_until("partition 1's events", Duration::from_secs(60), || {
        log.lock().unwrap().len() == on_p1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(log.lock().unwrap().iter().all(|s| s.partition == 1));
    consumer.resume_partition(&topic, 0).await.unwrap();
    wait_until("all 200", Duration::from_secs(60), || {
        log.lock().unwrap().len() == 200
    })
    .await;
    // Lag per partition: high watermark minus commit position, zero once the last
    // completions are in.
    let start = Instant::now();
    loop {
        let lag = consumer.lag(Duration::from_secs(5)).await.unwrap();
        assert_eq!(lag.len(), 2);
        assert_eq!(lag.iter().map(|l| l.high_watermark).sum::<i64>(), 200);
        if lag.iter().all(|l| l.lag == Some(0)) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "lag stays {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_dropped_mid_stream_loses_nothing() {
    let brokers = support::kafka_brokers();
    let topic = unique("drop");
    let group = unique("drop");
    create_topics(&brokers, &[(&topic, 2)]).await;
    let sent = keyed_events(2_000, 40);
    let at = produce(&producer(&brokers), &topic, &sent).await;

    // First consumer: commits eagerly, then hangs forever on its 701st message.
    let first: Arc<Mutex<HashSet<(i32, i64)>>> = Arc::default();
    let registry = {
        let first = first.clone();
        HandlerRegistry::builder()
            .handler_fn("order.created", move |event: ConsumedEvent| {
                let first = first.clone();
                async move {
                    if first.lock().unwrap().len() >= 700 {
                        std::future::pending::<()>().await;
                    }
                    first
                        .lock()
                        .unwrap()
                        .insert((event.partition(), event.offset()));
                    Ok::<_, BoxError>(())
                }
            })
            .build()
            .unwrap()
    };
    let consumer = KafkaConsumer::builder(client(&brokers), group.clone())
        .commit_interval(Duration::ZERO)
        .start(
            StartOptions::new([topic.as_str()])
                .from_beginning(true)
                .auto_commit(false),
            registry,
        )
        .unwrap();
    wait_until("700 handled", Duration::from_secs(60), || {
        first.lock().unwrap().len() >= 700
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // let a commit happen
    drop(consumer); // no shutdown: nothing more is committed
    // Async commits sent just before the drop may still be on the wire: let them
    // land before reading what the group committed.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // What the group committed, read by an independent consumer of the group.
    let committed = committed_offsets(&brokers, &group, &topic, 2).await;
    let committed_total: i64 = committed.values().sum();
    assert!(
        committed_total > 0,
        "the first consumer committed something"
    );
    assert!(
        committed_total <= 700,
        "commits cover only handled messages: {committed:?}"
    );
    let first = first.lock().unwrap().clone();
    for (&p, &c) in &committed {
        for o in 0..c {
            assert!(
                first.contains(&(p, o)),
                "offset {p}/{o} committed but never handled"
            );
        }
    }

    // Second consumer, same group: must handle every uncommitted message.
    let log: Log = Arc::default();
    let uncommitted: HashSet<(i32, i64)> = at
        .iter()
        .copied()
        .filter(|(p, o)| *o >= committed.get(p).copied().unwrap_or(0))
        .collect();
    let consumer = KafkaConsumer::builder(client(&brokers), group)
        .start(
            StartOptions::new([topic.as_str()]).from_beginning(true),
            recording_registry(log.clone()),
        )
        .unwrap();
    wait_until("every uncommitted message", Duration::from_secs(90), || {
        let log = log.lock().unwrap();
        let got: HashSet<(i32, i64)> = log.iter().map(|s| (s.partition, s.offset)).collect();
        uncommitted.is_subset(&got)
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    let log = log.lock().unwrap();
    let all: HashSet<(i32, i64)> = log
        .iter()
        .map(|s| (s.partition, s.offset))
        .chain(first.iter().copied())
        .collect();
    assert_eq!(all.len(), 2_000, "every message handled by one of the two");
    assert!(
        log.iter().all(|s| s.offset >= committed[&s.partition]),
        "re-handled a committed message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_by_its_timeout() {
    let brokers = support::kafka_brokers();
    let topic = unique("shutdown");
    create_topics(&brokers, &[(&topic, 1)]).await;
    produce(&producer(&brokers), &topic, &keyed_events(1, 1)).await;
    let started = Arc::new(AtomicU32::new(0));
    let registry = {
        let started = started.clone();
        HandlerRegistry::builder()
            .handler_fn("order.created", move |_e: ConsumedEvent| {
                started.fetch_add(1, Ordering::SeqCst);
                async {
                    std::future::pending::<()>().await;
                    Ok::<_, BoxError>(())
                }
            })
            .build()
            .unwrap()
    };
    let consumer = KafkaConsumer::builder(client(&brokers), unique("shutdown"))
        .start(
            StartOptions::new([topic.as_str()]).from_beginning(true),
            registry,
        )
        .unwrap();
    wait_until("the handler to start", Duration::from_secs(60), || {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(consumer.is_running());
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        consumer.shutdown(Duration::from_secs(1)),
    )
    .await
    .expect("shutdown returned within its bound");
    assert!(matches!(
        result,
        Err(keel::kafka::consumer::ConsumerError::ShutdownTimedOut(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_mid_stream_loses_nothing() {
    let brokers = support::kafka_brokers();
    let topic = unique("rebalance");
    let group = unique("rebalance");
    create_topics(&brokers, &[(&topic, 4)]).await;
    let sent = keyed_events(2_000, 40);
    produce(&producer(&brokers), &topic, &sent).await;

    // A's handler stops after 300 events until B has partitions: A's lanes are
    // full and messages are in flight while the group rebalances (A must keep
    // polling to let the rebalance happen at all).
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let slow_registry = |log: Log, gate: Option<Arc<tokio::sync::Semaphore>>| {
        HandlerRegistry::builder()
            .handler_fn("order.created", move |event: ConsumedEvent| {
                let (log, gate) = (log.clone(), gate.clone());
                async move {
                    if let Some(gate) = gate
                        && log.lock().unwrap().len() >= 300
                    {
                        let _ = gate.acquire().await;
                    }
                    log.lock().unwrap().push(seen(&event));
                    Ok::<_, BoxError>(())
                }
            })
            .build()
            .unwrap()
    };
    let (log_a, log_b): (Log, Log) = (Arc::default(), Arc::default());
    let options = StartOptions::new([topic.as_str()]).from_beginning(true);
    let a = KafkaConsumer::builder(client(&brokers), group.clone())
        .workers(4)
        .lane_capacity(16)
        .start(
            options.clone(),
            slow_registry(log_a.clone(), Some(gate.clone())),
        )
        .unwrap();
    wait_until("A to handle 300", Duration::from_secs(60), || {
        log_a.lock().unwrap().len() >= 300
    })
    .await;
    let b = KafkaConsumer::builder(client(&brokers), group.clone())
        .workers(4)
        .start(options, slow_registry(log_b.clone(), None))
        .unwrap();
    wait_until("B to get partitions", Duration::from_secs(60), || {
        !b.assignment().is_empty()
    })
    .await;
    assert!(a.assignment().len() < 4, "A gave partitions up");
    gate.close(); // let A go on
    let union = || -> HashSet<String> {
        log_a
            .lock()
            .unwrap()
            .iter()
            .chain(log_b.lock().unwrap().iter())
            .map(|s| s.event_id.clone())
            .collect()
    };
    wait_until(
        "every event handled by A or B",
        Duration::from_secs(120),
        || union().len() == 2_000,
    )
    .await;
    a.shutdown(Duration::from_secs(10)).await.unwrap();
    b.shutdown(Duration::from_secs(10)).await.unwrap();
    assert!(
        !log_b.lock().unwrap().is_empty(),
        "B got partitions in the rebalance"
    );
    let committed = committed_offsets(&brokers, &group, &topic, 4).await;
    assert_eq!(committed.values().sum::<i64>(), 2_000, "{committed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dlq_failures_are_counted_and_the_partition_moves_on() {
    let brokers = support::kafka_brokers();
    let topic = unique("no-dlq");
    create_topics(&brokers, &[(&topic, 1)]).await;
    let bad = EventEnvelope::new("order.created", json!({"poison": true}));
    let unknown = EventEnvelope::new("order.unknown", json!({}));
    let good = EventEnvelope::new("order.created", json!({"poison": false}));
    produce(&producer(&brokers), &topic, &[bad, unknown, good.clone()]).await;
    let log: Log = Arc::default();
    let registry = {
        let log = log.clone();
        HandlerRegistry::builder()
            .handler_fn("order.created", move |event: ConsumedEvent| {
                let log = log.clone();
                async move {
                    if event.envelope().payload()["poison"] == json!(true) {
                        return Err::<(), BoxError>("poison".into());
                    }
                    log.lock().unwrap().push(seen(&event));
                    Ok(())
                }
            })
            .build()
            .unwrap()
    };
    let consumer = start_with_fast_retries(
        &brokers,
        unique("no-dlq"),
        StartOptions::new([topic.as_str()])
            .from_beginning(true)
            .max_retries(1)
            .enable_dlq(false),
        registry,
    );
    let metrics = stop_after(consumer, "the good event", |_| {
        log.lock().unwrap().len() == 1
    })
    .await;
    assert_eq!(log.lock().unwrap()[0].event_id, good.event_id().to_string());
    // The poison event, and the unknown type (failed without retries by default;
    // with the DLQ disabled, logged and counted).
    assert_eq!(metrics.total_failed, 2);
    assert_eq!(metrics.total_retries, 1);
    assert_eq!(metrics.total_dead_lettered, 0);
    assert_eq!(metrics.total_processed, 1);
    assert!(metrics.last_processed_at.is_some());
    // The failed message waited one 10 ms backoff: it is the slowest of three.
    assert!(
        metrics.p99_processing_time >= Duration::from_millis(9),
        "{metrics:?}"
    );
    assert!(metrics.average_processing_time > Duration::ZERO);
}

/// Partition count of `topic` from a metadata request that cannot auto-create it
/// (a consumer's `allow.auto.create.topics` is false); `None` when it does not exist.
async fn topic_partitions(brokers: &str, topic: &str) -> Option<usize> {
    let probe: BaseConsumer = client(brokers).create().unwrap();
    let name = topic.to_string();
    let metadata = tokio::task::spawn_blocking(move || {
        probe.fetch_metadata(Some(&name), Duration::from_secs(10))
    })
    .await
    .unwrap()
    .unwrap();
    let t = metadata.topics().iter().find(|t| t.name() == topic)?;
    (t.error().is_none()).then(|| t.partitions().len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_event_type_goes_to_the_dlq_and_the_partition_moves_on() {
    let brokers = support::kafka_brokers();
    let topic = unique("unknown-dlq");
    let dlq_topic = format!("{topic}.dlq");
    create_topics(&brokers, &[(&topic, 1), (&dlq_topic, 1)]).await;
    let group = unique("unknown-dlq");
    let unknown = EventEnvelope::new("order.shipped", json!({"order": 7}))
        .with_key("k-unknown")
        .with_header("trace-id", "t-unknown");
    let good = EventEnvelope::new("order.created", json!({"order": 8}));
    let at = produce(
        &producer(&brokers),
        &topic,
        &[unknown.clone(), good.clone()],
    )
    .await;

    let log: Log = Arc::default();
    let registry = {
        let log = log.clone();
        HandlerRegistry::builder()
            .handler_fn("order.created", move |event: ConsumedEvent| {
                let log = log.clone();
                async move {
                    log.lock().unwrap().push(seen(&event));
                    Ok::<_, BoxError>(())
                }
            })
            .on_unknown(UnknownEventTypes::DeadLetter)
            .build()
            .unwrap()
    };
    let consumer = start_with_fast_retries(
        &brokers,
        group.clone(),
        StartOptions::new([topic.as_str()])
            .from_beginning(true)
            .max_retries(3)
            .enable_dlq(true),
        registry,
    );
    let metrics = stop_after(consumer, "the event after the unknown one", |_| {
        log.lock().unwrap().len() == 1
    })
    .await;
    assert_eq!(log.lock().unwrap()[0].event_id, good.event_id().to_string());
    assert_eq!(metrics.total_dead_lettered, 1);
    assert_eq!(metrics.total_retries, 0, "an unknown type is not retried");
    assert_eq!(metrics.total_processed, 1);
    // The partition moved on: both offsets are committed.
    let committed = committed_offsets(&brokers, &group, &topic, 1).await;
    assert_eq!(committed[&0], 2, "{committed:?}");

    let records = kcat_read(&brokers, &dlq_topic, 1);
    assert_eq!(records.len(), 1, "{records:?}");
    let h = assert_dead_lettered_unchanged(&records[0], &unknown, &topic, at[0], &group);
    assert_eq!(h["trace-id"], "t-unknown");
    assert_eq!(h[dlq::ERROR_KIND], "unknown_event_type");
    assert!(
        h[dlq::ERROR_TYPE].contains("UnknownEventType"),
        "{}",
        h[dlq::ERROR_TYPE]
    );
    assert!(
        h[dlq::ERROR_MESSAGE].contains("order.shipped"),
        "{}",
        h[dlq::ERROR_MESSAGE]
    );
    assert_eq!(h[dlq::ATTEMPTS], "1");
    assert!(h[dlq::FAILED_AT].parse::<u64>().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_event_type_is_skipped_and_committed_past_when_asked() {
    let brokers = support::kafka_brokers();
    let topic = unique("unknown-skip");
    create_topics(&brokers, &[(&topic, 1)]).await;
    let group = unique("unknown-skip");
    let unknown = EventEnvelope::new("order.shipped", json!({"order": 9}));
    let good = EventEnvelope::new("order.created", json!({"order": 10}));
    produce(&producer(&brokers), &topic, &[unknown, good.clone()]).await;

    let log: Log = Arc::default();
    // The DLQ is on, yet `Skip` (an explicit opt-in) skips unknown types.
    let registry = {
        let log = log.clone();
        HandlerRegistry::builder()
            .handler_fn("order.created", move |event: ConsumedEvent| {
                let log = log.clone();
                async move {
                    log.lock().unwrap().push(seen(&event));
                    Ok::<_, BoxError>(())
                }
            })
            .on_unknown(UnknownEventTypes::Skip)
            .build()
            .unwrap()
    };
    let consumer = start_with_fast_retries(
        &brokers,
        group.clone(),
        StartOptions::new([topic.as_str()])
            .from_beginning(true)
            .enable_dlq(true),
        registry,
    );
    let metrics = stop_after(consumer, "the event after the unknown one", |_| {
        log.lock().unwrap().len() == 1
    })
    .await;
    assert_eq!(log.lock().unwrap()[0].event_id, good.event_id().to_string());
    assert_eq!(
        metrics.total_processed, 2,
        "the skipped event counts as processed"
    );
    assert_eq!(metrics.total_dead_lettered, 0);
    assert_eq!(metrics.total_failed, 0);
    let committed = committed_offsets(&brokers, &group, &topic, 1).await;
    assert_eq!(
        committed[&0], 2,
        "committed past the skipped event: {committed:?}"
    );
    assert_eq!(
        topic_partitions(&brokers, &format!("{topic}.dlq")).await,
        None,
        "nothing was published to a dead-letter topic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_creates_missing_dlq_topics_at_start() {
    let brokers = support::kafka_brokers();
    let topic = unique("ensure-dlq");
    let dlq_topic = format!("{topic}.dlq");
    // The broker would auto-create the DLQ with num.partitions=1; keel gives it as
    // many partitions as its source.
    create_topics(&brokers, &[(&topic, 3)]).await;
    assert_eq!(topic_partitions(&brokers, &dlq_topic).await, None);
    let options = StartOptions::new([topic.as_str()])
        .from_beginning(true)
        .max_retries(0);
    let registry = HandlerRegistry::builder()
        .handler_fn("order.created", |_e: ConsumedEvent| async {
            Err::<(), _>(HandlerError::permanent("always fails"))
        })
        .build()
        .unwrap();
    let consumer = KafkaConsumer::builder(client(&brokers), unique("ensure-dlq"))
        .ensure_dlq_topics(&options, DeadLetterTopics::new())
        .await
        .unwrap()
        .start(options.clone(), registry)
        .unwrap();
    assert_eq!(topic_partitions(&brokers, &dlq_topic).await, Some(3));

    // Ensuring again leaves the topic as it is.
    let again = DeadLetterTopics::new()
        .partitions(5)
        .ensure(&client(&brokers), std::slice::from_ref(&topic), ".dlq")
        .await
        .unwrap();
    assert_eq!(
        again,
        vec![EnsuredTopic {
            topic: dlq_topic.clone(),
            partitions: 3,
            created: false
        }]
    );

    // The consumer dead-letters into it.
    let event = EventEnvelope::new("order.created", json!({})).with_key("k");
    produce(&producer(&brokers), &topic, std::slice::from_ref(&event)).await;
    wait_until(
        "the event to be dead-lettered",
        Duration::from_secs(60),
        || consumer.metrics().total_dead_lettered == 1,
    )
    .await;
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    let records = kcat_read(&brokers, &dlq_topic, 1);
    assert_eq!(kcat_headers(&records[0])[dlq::ORIGINAL_TOPIC], topic);

    // An explicit partition count for a new topic.
    let other = unique("ensure-dlq-explicit");
    create_topics(&brokers, &[(&other, 1)]).await;
    let made = DeadLetterTopics::new()
        .partitions(2)
        .replication(1)
        .ensure(&client(&brokers), std::slice::from_ref(&other), "-dead")
        .await
        .unwrap();
    assert_eq!(made[0].topic, format!("{other}-dead"));
    assert!(made[0].created);
    assert_eq!(made[0].partitions, 2);
    assert_eq!(
        topic_partitions(&brokers, &format!("{other}-dead")).await,
        Some(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dlq_topic_keel_cannot_create_is_a_typed_error() {
    let brokers = support::kafka_brokers();
    let topic = unique("ensure-dlq-refused");
    create_topics(&brokers, &[(&topic, 1)]).await;
    let options = StartOptions::new([topic.as_str()]);
    // One broker cannot hold three replicas.
    let err = KafkaConsumer::builder(client(&brokers), unique("ensure-dlq-refused"))
        .ensure_dlq_topics(&options, DeadLetterTopics::new().replication(3))
        .await
        .unwrap_err();
    match err {
        ConsumerError::DeadLetterTopic(DeadLetterTopicError::Refused { topic: t, code }) => {
            assert_eq!(t, format!("{topic}.dlq"));
            assert_eq!(code, RDKafkaErrorCode::InvalidReplicationFactor);
        }
        other => panic!("expected a refused DLQ topic, got {other:?}"),
    }
    // Without partitions, a source topic that does not exist cannot be mirrored.
    let missing = unique("ensure-dlq-missing");
    let err = DeadLetterTopics::new()
        .ensure(&client(&brokers), std::slice::from_ref(&missing), ".dlq")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DeadLetterTopicError::SourceTopic { topic, .. } if *topic == missing),
        "{err:?}"
    );
    assert_eq!(
        topic_partitions(&brokers, &missing).await,
        None,
        "not auto-created"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_started_from_the_client_is_counted_and_closed_by_disconnect() {
    let brokers = support::kafka_brokers();
    let topic = unique("managed");
    create_topics(&brokers, &[(&topic, 2)]).await;
    let group = unique("managed");
    let config = KafkaConfig::builder()
        .brokers(brokers.split(',').map(str::to_string))
        .group_id(group.clone())
        .log_level(KafkaLogLevel::Warn)
        .build()
        .unwrap();
    let kafka = KafkaClient::connect(config).unwrap();
    let health = kafka.health_check(Duration::from_secs(10)).await.unwrap();
    assert_eq!(health.metrics.consumer_count, 0);

    let log: Log = Arc::default();
    let consumer = KafkaConsumer::from_client(&kafka)
        .unwrap()
        .start(
            StartOptions::new([topic.as_str()]).from_beginning(true),
            recording_registry(log.clone()),
        )
        .unwrap();
    assert!(consumer.is_registered());
    let sent = keyed_events(100, 10);
    produce(&producer(&brokers), &topic, &sent).await;
    wait_until("100 events handled", Duration::from_secs(60), || {
        log.lock().unwrap().len() == 100
    })
    .await;
    let health = kafka.health_check(Duration::from_secs(10)).await.unwrap();
    assert_eq!(health.metrics.consumer_count, 1, "{health:?}");
    assert_eq!(health.metrics.consumers_connected, 1, "{health:?}");
    let json = serde_json::to_value(&health).unwrap();
    assert_eq!(json["metrics"]["consumerCount"], 1);

    // disconnect shuts the consumer down gracefully: it stops and commits.
    kafka
        .disconnect(KafkaClient::DEFAULT_DISCONNECT_TIMEOUT)
        .await
        .unwrap();
    assert!(!consumer.is_running());
    let committed = committed_offsets(&brokers, &group, &topic, 2).await;
    assert_eq!(committed.values().sum::<i64>(), 100, "{committed:?}");
    // Shutting the handle down afterwards reports the shutdown that ran.
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        kafka.consumer_count(),
        0,
        "deregistered once the handle is gone"
    );
    check_exactly_once_in_key_order(&sent, &log.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_registered_consumer_is_no_longer_counted() {
    let brokers = support::kafka_brokers();
    let topic = unique("managed-drop");
    create_topics(&brokers, &[(&topic, 1)]).await;
    let config = KafkaConfig::builder()
        .brokers(brokers.split(',').map(str::to_string))
        .group_id(unique("managed-drop"))
        .log_level(KafkaLogLevel::Warn)
        .build()
        .unwrap();
    let kafka = KafkaClient::connect(config).unwrap();
    let consumer = KafkaConsumer::from_client(&kafka)
        .unwrap()
        .start(
            StartOptions::new([topic.as_str()]),
            recording_registry(Log::default()),
        )
        .unwrap();
    assert_eq!(kafka.consumer_count(), 1);
    drop(consumer);
    assert_eq!(kafka.consumer_count(), 0);
    let health = kafka.health_check(Duration::from_secs(10)).await.unwrap();
    assert_eq!(health.metrics.consumer_count, 0);
    kafka.disconnect(Duration::from_secs(10)).await.unwrap();
}

/// The lag from librdkafka's statistics (no broker request) agrees with the
/// broker's watermarks: all produced events count while the handler holds them,
/// none once they are handled and committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_lag_follows_the_handler_without_broker_requests() {
    let brokers = support::kafka_brokers();
    let topic = unique("stats-lag");
    create_topics(&brokers, &[(&topic, 2)]).await;
    let sent = keyed_events(100, 10);
    produce(&producer(&brokers), &topic, &sent).await;

    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let registry = {
        let (released, handled) = (released.clone(), handled.clone());
        HandlerRegistry::builder()
            .handler_fn("order.created", move |_event: ConsumedEvent| {
                let (released, handled) = (released.clone(), handled.clone());
                async move {
                    while !released.load(std::sync::atomic::Ordering::Acquire) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    handled.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    Ok::<_, BoxError>(())
                }
            })
            .build()
            .unwrap()
    };
    // Statistics every second, as KafkaConfig sets them (a bare ClientConfig has none).
    let mut config = client(&brokers);
    config.set("statistics.interval.ms", "1000");
    let consumer = KafkaConsumer::builder(config, unique("stats-lag"))
        .start(
            StartOptions::new([topic.as_str()]).from_beginning(true),
            registry,
        )
        .unwrap();

    // Held: every event is lag, once the statistics (every second) report the
    // partitions' high watermarks.
    let start = Instant::now();
    let held = loop {
        let lag = consumer.statistics_lag();
        if lag.len() == 2 && lag.iter().map(|l| l.lag.unwrap_or(0)).sum::<i64>() == 100 {
            break lag;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "statistics lag never reached 100: {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(handled.load(std::sync::atomic::Ordering::Acquire), 0);
    // The same high watermarks the broker answers when asked (one request per
    // partition); the statistics' reading costs no request.
    let t = Instant::now();
    let _ = consumer.statistics_lag();
    let from_stats = t.elapsed();
    let t = Instant::now();
    let asked = consumer.lag(Duration::from_secs(5)).await.unwrap();
    let from_broker = t.elapsed();
    eprintln!("lag of 2 partitions: statistics {from_stats:?}, broker requests {from_broker:?}");
    for (s, a) in held.iter().zip(&asked) {
        assert_eq!(s.partition, a.partition);
        assert_eq!(s.high_watermark, a.high_watermark, "{held:?} vs {asked:?}");
    }

    released.store(true, std::sync::atomic::Ordering::Release);
    wait_until("all handled", Duration::from_secs(60), || {
        handled.load(std::sync::atomic::Ordering::Acquire) == 100
    })
    .await;
    let start = Instant::now();
    loop {
        let lag = consumer.statistics_lag();
        if lag.iter().all(|l| l.lag == Some(0)) {
            assert_eq!(lag.iter().map(|l| l.high_watermark).sum::<i64>(), 100);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "lag stays {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
}
