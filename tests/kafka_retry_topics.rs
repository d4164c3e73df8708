//! Retry topics against the real broker (`scripts/up`): a failed record waits in
//! `<topic>.retry.<delay>` while its partition moves on, is handled again when
//! due, and ends in the dead-letter topic with its whole history after the last
//! rung; the key-preserving mode keeps per-key order; a consumer process killed
//! in the middle of the ladder loses nothing (checked with kcat).
//!
//! One test at a time ([`support::serial`]): the figures printed with
//! `--nocapture` (RELIABILITY.md, "Retry topics") must not mix.
#![cfg(feature = "kafka")]

mod kafka_util;
use kafka_util::client;
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keel::kafka::consumer::retry_topic::{RetryState, RetryTopics, headers};
use keel::kafka::consumer::{BoxError, ConsumedEvent, KafkaConsumer, StartOptions};
use keel::kafka::envelope::EventEnvelope;
use rdkafka::Message;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("keel-retry-{name}-{}-{nanos}", std::process::id())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Creates `topic` and `<topic>.dlq` with one partition each, and the retry
/// topics of `retries` through keel's `ensure_topics`.
async fn create_topics(brokers: &str, topic: &str, retries: &RetryTopics) {
    let dlq = format!("{topic}.dlq");
    kafka_util::create_topics(brokers, &[(topic, 1), (&dlq, 1)]).await;
    let ensured = retries
        .ensure_topics(&client(brokers), &[topic.to_string()])
        .await
        .expect("retry topics");
    assert_eq!(ensured.len(), retries.ladder().len());
    assert!(ensured.iter().all(|t| t.created && t.partitions == 1));
}

/// Publishes `(key, payload)` events with a plain rdkafka producer, all enqueued
/// at once; returns their offsets.
async fn produce(brokers: &str, topic: &str, events: &[(String, Value)]) -> Vec<i64> {
    let producer: FutureProducer = client(brokers)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let mut deliveries = Vec::with_capacity(events.len());
    for (key, payload) in events {
        let encoded = EventEnvelope::new("order.created", payload.clone())
            .with_key(key.as_bytes().to_vec())
            .encode()
            .unwrap();
        let headers = encoded.owned_headers();
        let mut record = FutureRecord::to(topic)
            .payload(&encoded.value)
            .key(key.as_bytes())
            .headers(headers);
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
    let mut offsets = Vec::with_capacity(deliveries.len());
    for d in deliveries {
        offsets.push(d.await.unwrap().unwrap().offset);
    }
    offsets
}

/// One handler call, as the test handlers record it.
#[derive(Clone, Debug)]
struct Call {
    key: String,
    seq: u64,
    topic: String,
    at_ms: u64,
    state: Option<RetryState>,
    ok: bool,
}

type Calls = Arc<Mutex<Vec<Call>>>;

/// A handler that records every call and fails while `fails(key, seq, failures
/// so far)` says so.
fn recording_handler(
    calls: Calls,
    fails: impl Fn(&str, u64, usize) -> bool + Clone + Send + Sync + 'static,
) -> impl tower::Service<
    ConsumedEvent,
    Response = (),
    Error = BoxError,
    Future = impl Future<Output = Result<(), BoxError>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |event: ConsumedEvent| {
        let (calls, fails) = (calls.clone(), fails.clone());
        async move {
            let payload = event.envelope().payload();
            let key = payload["key"].as_str().unwrap_or_default().to_string();
            let seq = payload["seq"].as_u64().unwrap_or_default();
            let state = RetryState::of(&event)?;
            let failed = state.as_ref().map_or(0, |s| s.history.len());
            let ok = !fails(&key, seq, failed);
            calls.lock().unwrap().push(Call {
                key: key.clone(),
                seq,
                topic: event.topic().to_string(),
                at_ms: now_ms(),
                state,
                ok,
            });
            if ok {
                Ok(())
            } else {
                Err(format!("{key}/{seq} fails always here").into())
            }
        }
    })
}

/// Waits until `done` holds, for at most `limit`.
async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const POLL_INTERVAL: Duration = Duration::from_millis(100);

fn builder(brokers: &str, group: &str) -> keel::kafka::consumer::KafkaConsumerBuilder {
    KafkaConsumer::builder(client(brokers), group).poll_timeout(POLL_INTERVAL)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_failing_twice_is_handled_from_the_second_retry_topic_while_10000_others_pass() {
    let _serial = support::serial().await;
    let brokers = support::kafka_brokers();
    let topic = unique("twice");
    let retries = RetryTopics::delays([Duration::from_secs(1), Duration::from_secs(2)]).unwrap();
    create_topics(&brokers, &topic, &retries).await;
    let mut events = vec![("failing".to_string(), json!({"key": "failing", "seq": 0}))];
    events.extend((1..=10_000u64).map(|i| {
        let key = format!("k{}", i % 50);
        (key.clone(), json!({"key": key, "seq": i}))
    }));
    produce(&brokers, &topic, &events).await;

    let calls: Calls = Arc::default();
    let handler = recording_handler(calls.clone(), |_, seq, failed| seq == 0 && failed < 2);
    let consumer = retries
        .start(
            builder(&brokers, &unique("g")),
            StartOptions::new([topic.as_str()]).from_beginning(true),
            handler,
        )
        .unwrap();
    wait_for(
        "the failing record and 10,000 others",
        Duration::from_secs(90),
        || {
            let calls = calls.lock().unwrap();
            calls.iter().any(|c| c.seq == 0 && c.ok)
                && calls.iter().filter(|c| c.seq != 0).count() >= 10_000
        },
    )
    .await;
    let metrics = consumer.metrics();
    consumer.shutdown(Duration::from_secs(20)).await.unwrap();

    let calls = calls.lock().unwrap().clone();
    let failing: Vec<&Call> = calls.iter().filter(|c| c.seq == 0).collect();
    let topics: Vec<&str> = failing.iter().map(|c| c.topic.as_str()).collect();
    assert_eq!(
        topics,
        [
            topic.clone(),
            format!("{topic}.retry.1s"),
            format!("{topic}.retry.2s")
        ],
        "main, first rung, second rung"
    );
    assert_eq!(
        failing.iter().map(|c| c.ok).collect::<Vec<_>>(),
        [false, false, true]
    );
    let mut lateness = Vec::new();
    for (rung, call) in failing[1..].iter().enumerate() {
        let state = call.state.as_ref().expect("retry headers");
        let delay = [1_000, 2_000][rung];
        assert_eq!(state.rung, rung);
        assert_eq!(state.original_topic, topic);
        assert_eq!(state.original_offset, 0);
        assert_eq!(state.attempts as usize, rung + 1);
        assert_eq!(state.history.len(), rung + 1);
        let failed_at = state.history.last().unwrap().at_ms;
        assert_eq!(
            state.due_at_ms - failed_at,
            delay,
            "due = last failure + delay"
        );
        assert!(
            call.at_ms >= state.due_at_ms,
            "rung {rung} handled {} ms early",
            state.due_at_ms - call.at_ms
        );
        let late = call.at_ms - state.due_at_ms;
        assert!(
            late <= POLL_INTERVAL.as_millis() as u64,
            "rung {rung} handled {late} ms late (poll interval {POLL_INTERVAL:?})"
        );
        lateness.push(late);
    }
    // The main partition did not wait: the record after the failing one was
    // handled before the first retry was even due, and no gap between two main
    // records comes near the 1 s delay.
    let main: Vec<&Call> = calls.iter().filter(|c| c.seq != 0).collect();
    let distinct: HashSet<u64> = main.iter().map(|c| c.seq).collect();
    assert_eq!(distinct.len(), 10_000);
    let first_due = failing[1].state.as_ref().unwrap().due_at_ms;
    let next = main.iter().find(|c| c.seq == 1).unwrap();
    assert!(
        next.at_ms < first_due,
        "the main partition waited for the retry"
    );
    let max_gap = main
        .windows(2)
        .map(|w| w[1].at_ms.saturating_sub(w[0].at_ms))
        .max()
        .unwrap();
    assert!(
        max_gap < 1_000,
        "a {max_gap} ms stall on the main partition"
    );
    let span = main.last().unwrap().at_ms - failing[0].at_ms;
    let while_waiting = main.iter().filter(|c| c.at_ms < failing[2].at_ms).count();
    assert_eq!(
        (
            metrics.hopped,
            metrics.moved,
            metrics.recovered,
            metrics.dead_lettered
        ),
        (1, 1, 1, 0)
    );
    println!(
        "retry-topics figures: lateness rung0={} ms rung1={} ms (runtime min/max {:?}/{:?}); \
         10,000 main records in {span} ms after the failure ({:.0}/s), {while_waiting} of them \
         before the retried record's success; longest main gap {max_gap} ms",
        lateness[0],
        lateness[1],
        metrics.min_lateness,
        metrics.max_lateness,
        10_000.0 / (span.max(1) as f64 / 1_000.0),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_failing_on_every_rung_ends_in_the_dlq_with_its_whole_history() {
    let _serial = support::serial().await;
    let brokers = support::kafka_brokers();
    let topic = unique("always");
    let retries =
        RetryTopics::delays([Duration::from_millis(500), Duration::from_secs(1)]).unwrap();
    create_topics(&brokers, &topic, &retries).await;
    let events: Vec<(String, Value)> = (0..5u64)
        .map(|i| ("k".to_string(), json!({"key": "k", "seq": i})))
        .collect();
    let offsets = produce(&brokers, &topic, &events).await;

    let calls: Calls = Arc::default();
    let handler = recording_handler(calls.clone(), |_, seq, _| seq == 2);
    let consumer = retries
        .start(
            builder(&brokers, &unique("g")),
            StartOptions::new([topic.as_str()]).from_beginning(true),
            handler,
        )
        .unwrap();
    wait_for("the dead letter", Duration::from_secs(60), || {
        consumer.metrics().dead_lettered == 1
    })
    .await;
    consumer.shutdown(Duration::from_secs(20)).await.unwrap();

    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        calls.iter().filter(|c| c.seq == 2).count(),
        3,
        "main + two rungs"
    );
    assert_eq!(calls.iter().filter(|c| c.ok).count(), 4);
    // An independent reader (plain rdkafka) sees one dead letter.
    let dlq = kafka_util::read_raw(&brokers, &format!("{topic}.dlq"), 1, 1, "read_uncommitted");
    assert_eq!(dlq.len(), 1, "exactly one dead letter");
    let m = &dlq[0];
    let text = |name: &str| {
        String::from_utf8(
            kafka_util::header(m, name)
                .unwrap_or_else(|| panic!("header {name}"))
                .to_vec(),
        )
        .unwrap()
    };
    assert_eq!(m.key(), Some(b"k".as_slice()));
    let envelope: EventEnvelope =
        EventEnvelope::from_message(m).expect("payload and event headers unchanged");
    assert_eq!(envelope.payload()["seq"], 2);
    assert_eq!(text("keel-dlq-original-topic"), topic);
    assert_eq!(text("keel-dlq-original-partition"), "0");
    assert_eq!(text("keel-dlq-original-offset"), offsets[2].to_string());
    assert_eq!(text("keel-dlq-attempts"), "3");
    assert_eq!(text("keel-dlq-error-kind"), "error");
    assert_eq!(text(headers::ORIGINAL_TOPIC), topic);
    assert_eq!(text(headers::ATTEMPTS), "3");
    let history: Vec<Value> = serde_json::from_str(&text(headers::HISTORY)).unwrap();
    let hops: Vec<&str> = history
        .iter()
        .map(|h| h["topic"].as_str().unwrap())
        .collect();
    assert_eq!(
        hops,
        [
            topic.clone(),
            format!("{topic}.retry.500ms"),
            format!("{topic}.retry.1s")
        ]
    );
    assert!(
        history.iter().all(
            |h| h["kind"] == "error" && h["message"].as_str().unwrap().contains("fails always")
        )
    );
    let at: Vec<u64> = history
        .iter()
        .map(|h| h["at_ms"].as_u64().unwrap())
        .collect();
    assert!(
        at[1] - at[0] >= 500 && at[2] - at[1] >= 1_000,
        "delays between failures: {at:?}"
    );
    assert_eq!(text(headers::FIRST_FAILURE_AT), at[0].to_string());
    assert_eq!(text(headers::LAST_FAILURE_AT), at[2].to_string());
    assert!(text(headers::FIRST_ERROR_MESSAGE).contains("k/2 fails always"));
    // No payload in the failure headers.
    assert!(!text(headers::HISTORY).contains("\"seq\""));
}

/// Keys a, b, c, six records each, interleaved; a/0 fails twice, a/3 and b/2
/// once. Returns the successful calls' (key, seq) in handling order.
async fn run_keyed(brokers: &str, topic: &str, retries: RetryTopics) -> Vec<(String, u64)> {
    let calls: Calls = Arc::default();
    let handler = recording_handler(calls.clone(), |key, seq, failed| {
        matches!(
            (key, seq, failed),
            ("a", 0, 0 | 1) | ("a", 3, 0) | ("b", 2, 0)
        )
    });
    let consumer = retries
        .start(
            builder(brokers, &unique("g")),
            StartOptions::new([topic]).from_beginning(true),
            handler,
        )
        .unwrap();
    wait_for("18 handled records", Duration::from_secs(60), || {
        calls.lock().unwrap().iter().filter(|c| c.ok).count() >= 18
    })
    .await;
    consumer.shutdown(Duration::from_secs(20)).await.unwrap();
    let calls = calls.lock().unwrap();
    calls
        .iter()
        .filter(|c| c.ok)
        .map(|c| (c.key.clone(), c.seq))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_key_preserving_mode_keeps_per_key_order() {
    let _serial = support::serial().await;
    let brokers = support::kafka_brokers();
    // Two topics with the same records: the runs must not share retry topics.
    let (topic, free_topic) = (unique("keys"), unique("keys-free"));
    let ladder = [Duration::from_millis(300), Duration::from_millis(600)];
    let events: Vec<(String, Value)> = (0..6u64)
        .flat_map(|seq| ["a", "b", "c"].map(|k| (k.to_string(), json!({"key": k, "seq": seq}))))
        .collect();
    for t in [&topic, &free_topic] {
        create_topics(&brokers, t, &RetryTopics::delays(ladder).unwrap()).await;
        produce(&brokers, t, &events).await;
    }

    let per_key = |handled: &[(String, u64)]| {
        let mut by: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (k, s) in handled {
            by.entry(k.clone()).or_default().push(*s);
        }
        by
    };
    let preserved = run_keyed(
        &brokers,
        &topic,
        RetryTopics::delays(ladder).unwrap().key_preserving(true),
    )
    .await;
    let by = per_key(&preserved);
    for key in ["a", "b", "c"] {
        assert_eq!(
            by[key],
            (0..6).collect::<Vec<_>>(),
            "order of key {key}: {preserved:?}"
        );
    }
    // Without it, the trade-off shows: later records of a overtake a/0.
    let free = run_keyed(&brokers, &free_topic, RetryTopics::delays(ladder).unwrap()).await;
    let by = per_key(&free);
    assert_eq!(by["a"].len(), 6, "{free:?}");
    assert_ne!(by["a"][0], 0, "a/0 was overtaken: {free:?}");
    assert_eq!(by["c"], (0..6).collect::<Vec<_>>());
}

/// Child consumer processes, killed when the test ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `(pid, seq, topic, failures)` per line of `file`; cut lines are ignored.
fn read_handled(file: &Path) -> Vec<(u32, u64, String, usize)> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5).then(|| {
                (
                    f[0].parse().unwrap(),
                    f[2].parse().unwrap(),
                    f[3].to_string(),
                    f[4].parse().unwrap(),
                )
            })
        })
        .collect()
}

/// `seq` of every record of `topic`, read with kcat from the beginning.
fn kcat_seqs(brokers: &str, topic: &str) -> Vec<u64> {
    let out = Command::new(support::kcat())
        .args([
            "-C",
            "-b",
            brokers,
            "-t",
            topic,
            "-o",
            "beginning",
            "-e",
            "-q",
            "-f",
            "%s\n",
        ])
        .output()
        .expect("run kcat");
    assert!(
        out.status.success(),
        "kcat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a JSON envelope");
            v["payload"]["seq"].as_u64().expect("seq")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_killed_mid_ladder_loses_nothing() {
    let _serial = support::serial().await;
    let brokers = support::kafka_brokers();
    let topic = unique("kill");
    let group = unique("g");
    let retries = RetryTopics::delays([Duration::from_secs(1), Duration::from_secs(2)]).unwrap();
    create_topics(&brokers, &topic, &retries).await;
    const RECORDS: u64 = 300;
    let events: Vec<(String, Value)> = (0..RECORDS)
        .map(|i| {
            (
                format!("k{}", i % 7),
                json!({"key": format!("k{}", i % 7), "seq": i}),
            )
        })
        .collect();
    produce(&brokers, &topic, &events).await;
    let failing: HashSet<u64> = (0..RECORDS).filter(|s| s.is_multiple_of(10)).collect();

    let binary = support::example_binary("retry_topic_consumer");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("handled.txt");
    let spawn = |n: usize| {
        let log = std::fs::File::create(dir.path().join(format!("child-{n}.log"))).unwrap();
        Command::new(&binary)
            .args(["--brokers", &brokers, "--topic", &topic, "--group", &group])
            .args([
                "--fail-every",
                "10",
                "--failures",
                "2",
                "--ladder-ms",
                "1000,2000",
            ])
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the consumer process")
    };
    let started = Instant::now();
    let mut children = Children(vec![spawn(0)]);
    // Kill once records are on the second rung and some are not handled yet.
    let second = format!("{topic}.retry.2s");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "nothing reached the second rung");
        if kafka_util::high_watermarks(&brokers, &second, 1) >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    children.0[0].kill().unwrap(); // SIGKILL
    children.0[0].wait().unwrap();
    let before: HashSet<u64> = read_handled(&out).iter().map(|h| h.1).collect();
    let pending: Vec<u64> = failing
        .iter()
        .filter(|s| !before.contains(s))
        .copied()
        .collect();
    assert!(
        !pending.is_empty(),
        "the kill came after the ladder was done"
    );

    let killed_at = started.elapsed();
    children.0.push(spawn(1));
    wait_for("every record handled", Duration::from_secs(120), || {
        let handled: HashSet<u64> = read_handled(&out).iter().map(|h| h.1).collect();
        (0..RECORDS).all(|s| handled.contains(&s))
    })
    .await;
    let recovered_at = started.elapsed();
    for n in 0..2 {
        let log =
            std::fs::read_to_string(dir.path().join(format!("child-{n}.log"))).unwrap_or_default();
        eprintln!(
            "child {n} log:\n{}",
            log.lines().rev().take(15).collect::<Vec<_>>().join("\n")
        );
    }
    eprintln!("killed at {killed_at:?}, everything handled at {recovered_at:?}");
    let handled = read_handled(&out);
    // Each failing record succeeded after two failures, on the second rung.
    for (_, seq, from, failures) in handled.iter().filter(|h| failing.contains(&h.1)) {
        assert_eq!(
            (from.as_str(), *failures),
            (second.as_str(), 2),
            "record {seq}"
        );
    }
    // Independent reader: every failing record went through both rungs, and
    // nothing went to the dead-letter topic.
    let first_rung: HashSet<u64> = kcat_seqs(&brokers, &format!("{topic}.retry.1s"))
        .into_iter()
        .collect();
    let second_rung: HashSet<u64> = kcat_seqs(&brokers, &second).into_iter().collect();
    assert_eq!(first_rung, failing);
    assert_eq!(second_rung, failing);
    assert!(kcat_seqs(&brokers, &format!("{topic}.dlq")).is_empty());
    let mut per_seq: HashMap<u64, usize> = HashMap::new();
    for h in &handled {
        *per_seq.entry(h.1).or_default() += 1;
    }
    let redone = per_seq.values().filter(|n| **n > 1).count();
    println!(
        "retry-topics kill: {} records, {} failing, {} still on the ladder at the kill, \
         {} handled twice after the restart, none lost",
        RECORDS,
        failing.len(),
        pending.len(),
        redone
    );
}
