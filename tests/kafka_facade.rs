//! The `keel::kafka::Kafka` facade against the real broker started by
//! `scripts/up`: publish round trips, typed handlers, and topics written by kcat
//! (an independent producer: plain JSON, text, schema-registry framing, no
//! headers) consumed end to end with retries and the dead-letter queue.
//!
//! Dead-letter topics are read back with kcat too.
#![cfg(feature = "kafka")]

mod kafka_util;
mod support;

use keel::kafka::config::KafkaLogLevel;
use keel::kafka::consumer::decode::{JsonDecoder, SchemaRegistryDecoder};
use keel::kafka::consumer::{BoxError, KafkaConsumer, Record};
use keel::kafka::dead_letter::headers as dlq;
use keel::kafka::{EventEnvelope, Kafka, KafkaConfig};
use keel::layers::retry::RetryPolicy;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("keel-facade-{name}-{}-{nanos}", std::process::id())
}

/// Creates `topic` and its `.dlq`, one partition each.
async fn create_topics(brokers: &str, topic: &str) {
    let dlq_topic = format!("{topic}.dlq");
    kafka_util::create_topics(brokers, &[(topic, 1), (&dlq_topic, 1)]).await;
}

fn facade(brokers: &str) -> Kafka {
    let config = KafkaConfig::builder()
        .brokers(brokers.split(',').map(str::to_string))
        .group_id(unique("unused"))
        .log_level(KafkaLogLevel::Warn)
        .build()
        .unwrap();
    Kafka::connect(config).unwrap()
}

/// Retries 20 ms apart, so that exhausted retries take well under a second.
fn fast_retries() -> RetryPolicy {
    RetryPolicy::kafka().base(Duration::from_millis(20))
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Produces each value as one record of `topic` with kcat (no headers): one
/// file per record, so binary values need no delimiter.
fn kcat_produce(brokers: &str, topic: &str, records: &[(Option<&str>, &[u8])]) {
    let dir = std::env::temp_dir().join(unique("kcat-in"));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (key, value)) in records.iter().enumerate() {
        let path = dir.join(format!("{i:03}"));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(value)
            .unwrap();
        let mut cmd = std::process::Command::new(support::kcat());
        cmd.args(["-P", "-b", brokers, "-t", topic, "-p", "0"]);
        if let Some(key) = key {
            cmd.args(["-k", key]);
        }
        let out = cmd.arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "kcat failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Reads `count` records of `topic` with kcat -J.
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
    // kcat prints a binary payload's bytes as they are.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn kcat_headers(record: &Value) -> BTreeMap<String, String> {
    record["headers"]
        .as_array()
        .map(|list| {
            list.chunks(2)
                .map(|kv| {
                    (
                        kv[0].as_str().unwrap().to_string(),
                        kv[1].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// How many records the dead-letter topic holds, read with a plain rdkafka
/// reader until `expected` arrived, then half a second more for extra ones.
fn dlq_count(brokers: &str, topic: &str, expected: usize) -> usize {
    kafka_util::read_raw(
        brokers,
        &format!("{topic}.dlq"),
        1,
        expected,
        "read_uncommitted",
    )
    .len()
}

async fn stop(consumer: KafkaConsumer) {
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u64,
}

/// A typed handler never sees a payload that is not its type: the record is
/// dead-lettered once, at once, class `decode`, one attempt, no retries; the
/// partition moves on to the next (good) event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_handler_whose_decode_fails_is_dead_lettered_once_without_retries() {
    let brokers = support::kafka_brokers();
    let topic = unique("typed");
    create_topics(&brokers, &topic).await;
    let kafka = facade(&brokers);
    let bad = EventEnvelope::new("order.created", serde_json::json!({"id": "not a number"}));
    kafka.publish(topic.clone(), bad.clone()).await.unwrap();
    kafka
        .publish(
            topic.clone(),
            EventEnvelope::new("order.created", Order { id: 7 }),
        )
        .await
        .unwrap();

    let seen = Arc::new(Mutex::new(Vec::new()));
    let consumer = {
        let seen = seen.clone();
        kafka
            .consumer(unique("typed-group"))
            .topics([topic.clone()])
            .from_beginning(true)
            .max_retries(3)
            .runtime(|r| r.retry_policy(fast_retries()))
            .on::<Order, _, _, _>("order.created", move |order, _record| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(order);
                    Ok::<_, BoxError>(())
                }
            })
            .start()
            .unwrap()
    };
    wait_until("the good event and the dead letter", || {
        let m = consumer.metrics();
        m.total_processed == 1 && m.total_dead_lettered == 1
    })
    .await;
    let metrics = consumer.metrics();
    stop(consumer).await;
    assert_eq!(*seen.lock().unwrap(), [Order { id: 7 }]);
    assert_eq!(
        metrics.total_retries, 0,
        "a decode failure is never retried"
    );

    assert_eq!(
        dlq_count(&brokers, &topic, 1),
        1,
        "dead-lettered exactly once"
    );
    let records = kcat_read(&brokers, &format!("{topic}.dlq"), 1);
    let h = kcat_headers(&records[0]);
    assert_eq!(h[dlq::ERROR_KIND], "decode");
    assert_eq!(h[dlq::ATTEMPTS], "1");
    assert_eq!(h[dlq::ORIGINAL_OFFSET], "0");
    assert!(
        !h[dlq::ERROR_MESSAGE].contains("not a number"),
        "no payload in the error: {}",
        h[dlq::ERROR_MESSAGE]
    );
    // The record is republished unchanged.
    let original: Value = serde_json::from_str(records[0]["payload"].as_str().unwrap()).unwrap();
    assert_eq!(original["eventId"], bad.event_id().to_string());
}

/// A topic written by kcat with plain JSON and no headers: good records are
/// handled, a failing one is retried then dead-lettered (class `error`), one
/// that is not JSON is dead-lettered at once (class `decode`), unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_json_from_kcat_is_consumed_with_retries_and_the_dlq() {
    #[derive(Debug, Deserialize)]
    struct Click {
        page: String,
        #[serde(default)]
        fail: bool,
    }
    let brokers = support::kafka_brokers();
    let topic = unique("kcat-json");
    create_topics(&brokers, &topic).await;
    kcat_produce(
        &brokers,
        &topic,
        &[
            (Some("u1"), br#"{"page":"/home"}"#),
            (Some("u2"), br#"{"page":"/boom","fail":true}"#),
            (None, b"this is not json"),
            (Some("u3"), br#"{"page":"/about"}"#),
        ],
    );
    let kafka = facade(&brokers);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(Mutex::new(0u32));
    let consumer = {
        let (seen, calls) = (seen.clone(), calls.clone());
        kafka
            .consumer(unique("kcat-json-group"))
            .from_beginning(true)
            .max_retries(2)
            .runtime(|r| r.retry_policy(fast_retries()))
            .on_topic_with(&topic, JsonDecoder::<Click>::new(), move |click, record| {
                let (seen, calls) = (seen.clone(), calls.clone());
                async move {
                    *calls.lock().unwrap() += 1;
                    if click.fail {
                        return Err::<(), BoxError>("the click service is down".into());
                    }
                    let key = record
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned());
                    seen.lock()
                        .unwrap()
                        .push((key, click.page, record.offset()));
                    Ok(())
                }
            })
            .start()
            .unwrap()
    };
    wait_until("two clicks handled and two dead letters", || {
        let m = consumer.metrics();
        m.total_processed == 2 && m.total_dead_lettered == 2
    })
    .await;
    let metrics = consumer.metrics();
    stop(consumer).await;
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (Some("u1".to_string()), "/home".to_string(), 0),
            (Some("u3".to_string()), "/about".to_string(), 3)
        ]
    );
    // 2 good calls + 3 for the failing one (1 + 2 retries); the bad JSON none.
    assert_eq!(*calls.lock().unwrap(), 5);
    assert_eq!(metrics.total_retries, 2);

    assert_eq!(dlq_count(&brokers, &topic, 2), 2);
    let records = kcat_read(&brokers, &format!("{topic}.dlq"), 2);
    let by_offset: BTreeMap<String, &Value> = records
        .iter()
        .map(|r| (kcat_headers(r)[dlq::ORIGINAL_OFFSET].clone(), r))
        .collect();
    let failed = kcat_headers(by_offset["1"]);
    assert_eq!(failed[dlq::ERROR_KIND], "error");
    assert_eq!(failed[dlq::ATTEMPTS], "3");
    assert_eq!(by_offset["1"]["key"], "u2");
    assert_eq!(
        by_offset["1"]["payload"], r#"{"page":"/boom","fail":true}"#,
        "republished unchanged"
    );
    let undecodable = kcat_headers(by_offset["2"]);
    assert_eq!(undecodable[dlq::ERROR_KIND], "decode");
    assert_eq!(undecodable[dlq::ATTEMPTS], "1");
    assert_eq!(by_offset["2"]["payload"], "this is not json");
    // No keel header was added to the record itself: only provenance.
    assert!(
        undecodable.keys().all(|k| k.starts_with("keel-dlq-")),
        "{undecodable:?}"
    );
}

/// Text records from kcat, read as strings with their keys and positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strings_from_kcat_are_consumed_as_text() {
    let brokers = support::kafka_brokers();
    let topic = unique("kcat-text");
    create_topics(&brokers, &topic).await;
    kcat_produce(
        &brokers,
        &topic,
        &[
            (Some("a"), "héllo".as_bytes()),
            (None, b"world"),
            (Some("c"), &[0xff, 0xfe, 0x00]),
        ],
    );
    let kafka = facade(&brokers);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let consumer = {
        let seen = seen.clone();
        kafka
            .consumer(unique("kcat-text-group"))
            .from_beginning(true)
            .runtime(|r| r.retry_policy(fast_retries()))
            .on_topic(&topic, move |record: Record| {
                let seen = seen.clone();
                async move {
                    let text = record.text()?;
                    assert!(record.headers().is_none(), "kcat wrote no headers");
                    assert!(!record.has_envelope());
                    seen.lock().unwrap().push((
                        record.key().map(<[u8]>::to_vec),
                        text,
                        record.partition(),
                    ));
                    Ok::<_, BoxError>(())
                }
            })
            .start()
            .unwrap()
    };
    wait_until("two strings and one dead letter", || {
        let m = consumer.metrics();
        m.total_processed == 2 && m.total_dead_lettered == 1
    })
    .await;
    let metrics = consumer.metrics();
    stop(consumer).await;
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (Some(b"a".to_vec()), "héllo".to_string(), 0),
            (None, "world".to_string(), 0)
        ]
    );
    assert_eq!(metrics.total_retries, 0);
    let records = kcat_read(&brokers, &format!("{topic}.dlq"), 1);
    let h = kcat_headers(&records[0]);
    assert_eq!(h[dlq::ERROR_KIND], "decode");
    assert!(h[dlq::ERROR_MESSAGE].contains("Utf8Decoder"), "{h:?}");
}

/// Schema-registry framing (magic 0 + big-endian schema id) written by kcat:
/// the handler gets `(schema_id, body)`; a record with another magic byte is
/// dead-lettered as `decode`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_registry_framed_records_from_kcat_give_the_schema_id_and_body() {
    let brokers = support::kafka_brokers();
    let topic = unique("kcat-sr");
    create_topics(&brokers, &topic).await;
    let mut framed = vec![0u8, 0, 0, 0x01, 0x2c];
    framed.extend_from_slice(b"\x02\x0aavro-body");
    kcat_produce(
        &brokers,
        &topic,
        &[
            (Some("k"), &framed),
            (None, b"\x01not framed"),
            (None, &[0, 0, 0, 0, 7]),
        ],
    );
    let kafka = facade(&brokers);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let consumer = {
        let seen = seen.clone();
        kafka
            .consumer(unique("kcat-sr-group"))
            .from_beginning(true)
            .on_topic_with(&topic, SchemaRegistryDecoder, move |(id, body), _record| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push((id, body.to_vec()));
                    Ok::<_, BoxError>(())
                }
            })
            .start()
            .unwrap()
    };
    wait_until("two framed records and one dead letter", || {
        let m = consumer.metrics();
        m.total_processed == 2 && m.total_dead_lettered == 1
    })
    .await;
    stop(consumer).await;
    assert_eq!(
        *seen.lock().unwrap(),
        [(300, b"\x02\x0aavro-body".to_vec()), (7, Vec::new())]
    );
    let records = kcat_read(&brokers, &format!("{topic}.dlq"), 1);
    let h = kcat_headers(&records[0]);
    assert_eq!(h[dlq::ERROR_KIND], "decode");
    assert_eq!(h[dlq::ORIGINAL_OFFSET], "1");
}

/// publish, publish_batch and publish_json through the facade, consumed back
/// through the facade (typed by event type, JSON by topic) and cross-checked
/// with kcat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_facade_publishes_and_consumes_its_own_records() {
    let brokers = support::kafka_brokers();
    let events = unique("rt-events");
    let plain = unique("rt-plain");
    create_topics(&brokers, &events).await;
    create_topics(&brokers, &plain).await;
    let kafka = facade(&brokers);

    let one = kafka
        .publish(
            events.clone(),
            EventEnvelope::new("order.created", Order { id: 1 }).with_key("o1"),
        )
        .await
        .unwrap();
    let batch = kafka
        .publish_batch(
            events.clone(),
            vec![
                EventEnvelope::new("order.created", Order { id: 2 }),
                EventEnvelope::new("order.created", Order { id: 3 }),
            ],
        )
        .await
        .unwrap();
    assert_eq!(batch.acks.len(), 2);
    assert_eq!((one.partition, one.offset), (0, 0));
    let ack = kafka
        .publish_json(&plain, "user-9", &Order { id: 9 })
        .await
        .unwrap();
    assert_eq!((ack.partition, ack.offset), (0, 0));
    assert_eq!(kafka.publish_stack().event_metrics().snapshot().calls, 1);

    // kcat sees plain JSON with the key and no keel header.
    let raw = kcat_read(&brokers, &plain, 1);
    assert_eq!(raw[0]["key"], "user-9");
    assert_eq!(raw[0]["payload"], r#"{"id":9}"#);
    assert!(kcat_headers(&raw[0]).is_empty());

    let typed = Arc::new(Mutex::new(Vec::new()));
    let json = Arc::new(Mutex::new(Vec::new()));
    let consumer = {
        let (typed, json) = (typed.clone(), json.clone());
        kafka
            .consumer(unique("rt-group"))
            .topics([events.clone()])
            .from_beginning(true)
            .on::<Order, _, _, _>("order.created", move |order, record| {
                let typed = typed.clone();
                async move {
                    let id = record.envelope().event_id();
                    typed.lock().unwrap().push((order.id, id));
                    Ok::<_, BoxError>(())
                }
            })
            .on_topic_with(&plain, JsonDecoder::<Order>::new(), move |order, record| {
                let json = json.clone();
                async move {
                    json.lock()
                        .unwrap()
                        .push((order, record.key().map(<[u8]>::to_vec)));
                    Ok::<_, BoxError>(())
                }
            })
            .start()
            .unwrap()
    };
    wait_until("four records", || consumer.metrics().total_processed == 4).await;
    stop(consumer).await;
    let typed = typed.lock().unwrap().clone();
    assert_eq!(
        typed.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(typed[1].1, batch.acks[0].event_id);
    assert_eq!(typed[0].1, one.event_id);
    assert_eq!(
        *json.lock().unwrap(),
        [(Order { id: 9 }, Some(b"user-9".to_vec()))]
    );
}

/// A facade consumer without any handler is refused before any I/O.
#[tokio::test]
async fn a_consumer_without_handlers_is_refused() {
    let brokers = support::kafka_brokers();
    let kafka = facade(&brokers);
    let err = kafka.consumer("g").topics(["t"]).start().unwrap_err();
    assert!(err.to_string().contains("no handler"), "{err}");
}

/// A batch handler over one partition's records, one of which always fails:
/// only that record is handled again (alone, with the retries) and
/// dead-lettered; the others are handled once; every offset is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_one_failing_record_retries_and_dead_letters_only_that_one() {
    use keel::kafka::consumer::batch::{BatchOptions, BatchResult};
    let brokers = support::kafka_brokers();
    let topic = unique("batch");
    create_topics(&brokers, &topic).await;
    let kafka = facade(&brokers);
    for n in 0..10u64 {
        kafka
            .publish_json(&topic, format!("k{n}"), &Order { id: n })
            .await
            .unwrap();
    }
    let group = unique("batch-group");
    let calls: Arc<Mutex<Vec<Vec<i64>>>> = Arc::new(Mutex::new(Vec::new()));
    let consumer = {
        let calls = calls.clone();
        kafka
            .consumer(group.clone())
            .from_beginning(true)
            .max_retries(2)
            .runtime(|r| r.retry_policy(fast_retries()))
            .on_batch(
                &topic,
                BatchOptions::new(4).max_wait(Duration::from_millis(300)),
                move |records: Vec<Record>| {
                    let calls = calls.clone();
                    async move {
                        calls
                            .lock()
                            .unwrap()
                            .push(records.iter().map(Record::offset).collect());
                        let mut result = BatchResult::ok();
                        for (i, record) in records.iter().enumerate() {
                            match record.json::<Order>() {
                                Ok(order) if order.id == 5 => {
                                    result = result.fail(i, "order 5 cannot be stored")
                                }
                                Ok(_) => {}
                                Err(e) => result = result.fail(i, e),
                            }
                        }
                        result
                    }
                },
            )
            .start()
            .unwrap()
    };
    wait_until("nine records handled and one dead letter", || {
        let m = consumer.metrics();
        m.total_processed == 9 && m.total_dead_lettered == 1
    })
    .await;
    // Offsets commit as for single records (every 200 ms): all ten.
    let start = Instant::now();
    while kafka_util::committed_offsets(&brokers, &group, &topic, 1)
        .await
        .get(&0)
        != Some(&10)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "offset 10 never committed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(consumer).await;

    let calls = calls.lock().unwrap().clone();
    // Batches: consecutive offsets of the partition, at most 4, and at least
    // one with more than one record.
    assert!(
        calls.iter().all(|c| !c.is_empty() && c.len() <= 4),
        "{calls:?}"
    );
    assert!(calls.iter().any(|c| c.len() > 1), "{calls:?}");
    let mut count = std::collections::HashMap::new();
    for offset in calls.iter().flatten() {
        *count.entry(*offset).or_insert(0) += 1;
    }
    for offset in 0..10 {
        // Offset 5 once in its batch, then alone 1 + 2 retries.
        let expected = if offset == 5 { 4 } else { 1 };
        assert_eq!(
            count.get(&offset),
            Some(&expected),
            "offset {offset}: {calls:?}"
        );
    }
    assert_eq!(calls.iter().filter(|c| **c == [5]).count(), 3);

    assert_eq!(dlq_count(&brokers, &topic, 1), 1, "only the failing record");
    let records = kcat_read(&brokers, &format!("{topic}.dlq"), 1);
    let h = kcat_headers(&records[0]);
    assert_eq!(h[dlq::ORIGINAL_OFFSET], "5");
    assert_eq!(h[dlq::ERROR_KIND], "error");
    assert_eq!(h[dlq::ATTEMPTS], "4");
    assert_eq!(records[0]["payload"], r#"{"id":5}"#);
}
