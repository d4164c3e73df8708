//! DLQ replay against the real Kafka broker started by `scripts/up`.
//!
//! 1,000 records are dead-lettered by a keel consumer whose handler fails them all
//! (so the dead-letter topic holds real provenance headers), then replayed to
//! their original topic by the `dlq_replay` example run as a child process: once
//! killed with `SIGKILL` in the middle, then run again to the end. An independent
//! reader (kcat, `read_committed`) then finds each record exactly once in the
//! original topic, with its key, payload, partition and original headers, and a
//! replay count of 1. The library API is tested too (a filter, a dry run, another
//! destination topic, a second run that finds nothing left to do).
#![cfg(feature = "kafka")]

mod kafka_util;
use kafka_util::{client, create_topics};
mod support;

use keel::kafka::consumer::{
    BoxError, ConsumedEvent, HandlerError, KafkaConsumer, PoisonGuard, StartOptions,
};
use keel::kafka::dead_letter::headers;
use keel::kafka::dead_letter::replay::{Replay, ReplayError};
use keel::kafka::envelope::{EventEnvelope, HEADER_EVENT_ID};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn unique(name: &str) -> String {
    format!("keel-replay-{name}-{}", uuid::Uuid::new_v4().simple())
}

/// An original record as the test produced it.
#[derive(Clone, Debug)]
struct Original {
    partition: i32,
    key: String,
    payload: Vec<u8>,
    headers: Vec<(String, String)>,
}

/// Publishes `n` keyed events to `topic` (partition by key), acknowledged, each
/// with an extra custom header; returns them by event id.
async fn produce_originals(brokers: &str, topic: &str, n: u32) -> HashMap<String, Original> {
    let producer: FutureProducer = client(brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let events: Vec<_> = (0..n)
        .map(|i| {
            EventEnvelope::new("order.created", json!({ "order": i }))
                .with_key(format!("customer-{}", i % 37))
                .encode()
                .unwrap()
        })
        .collect();
    let sends = events.iter().map(|e| {
        let headers = e.owned_headers().insert(rdkafka::message::Header {
            key: "x-tenant",
            value: Some("acme".as_bytes()),
        });
        producer.send(
            FutureRecord::to(topic)
                .key(e.key.as_deref().unwrap())
                .payload(&e.value)
                .headers(headers),
            Duration::from_secs(30),
        )
    });
    let delivered = futures::future::join_all(sends).await;
    let mut out = HashMap::new();
    for (e, d) in events.iter().zip(delivered) {
        let partition = d.map_err(|(e, _)| e).unwrap().partition;
        let mut hs: Vec<(String, String)> = e
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8(v.clone()).unwrap()))
            .collect();
        hs.push(("x-tenant".into(), "acme".into()));
        let id = String::from_utf8(e.header(HEADER_EVENT_ID).unwrap().to_vec()).unwrap();
        out.insert(
            id,
            Original {
                partition,
                key: String::from_utf8(e.key.clone().unwrap()).unwrap(),
                payload: e.value.clone(),
                headers: hs,
            },
        );
    }
    out
}

/// Dead-letters every record of `topic` with a keel consumer whose handler fails
/// them all (permanent: no retries); waits until `n` are in the DLQ.
async fn dead_letter_all(brokers: &str, topic: &str, n: u64) {
    let handler = tower::service_fn(|_e: ConsumedEvent| async {
        Err::<(), BoxError>(Box::new(HandlerError::permanent(std::io::Error::other(
            "bad deploy",
        ))))
    });
    let consumer = KafkaConsumer::builder(client(brokers), unique("bad-deploy"))
        // No guard: this test wants the whole topic in the DLQ.
        .poison_guard(PoisonGuard::new())
        .start(StartOptions::new([topic]).from_beginning(true), handler)
        .unwrap();
    let start = Instant::now();
    while consumer.metrics().total_dead_lettered < n {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "only {} of {n} dead-lettered after 180 s",
            consumer.metrics().total_dead_lettered
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Every record of `topic` read by kcat with `isolation.level=read_committed`.
fn kcat_committed(brokers: &str, topic: &str) -> Vec<Value> {
    kcat_read(brokers, topic, "read_committed")
}

/// Every record of `topic` read by kcat with `isolation.level=<isolation>`.
fn kcat_read(brokers: &str, topic: &str, isolation: &str) -> Vec<Value> {
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
            "-J",
            "-q",
        ])
        .args(["-X", &format!("isolation.level={isolation}")])
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

/// kcat's `headers` array (`[k, v, k, v, ...]`) as pairs.
fn kcat_headers(record: &Value) -> Vec<(String, String)> {
    let hs = record["headers"].as_array().cloned().unwrap_or_default();
    hs.chunks(2)
        .map(|kv| {
            (
                kv[0].as_str().unwrap().to_string(),
                kv[1].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Checks that `topic` holds each original exactly once as a replayed record
/// (replay count 1), unchanged, in its original partition, next to the originals
/// themselves. Returns the replayed records' event ids in order of arrival.
fn assert_replayed_exactly_once(
    brokers: &str,
    topic: &str,
    dlq: &str,
    originals: &HashMap<String, Original>,
) {
    let records = kcat_committed(brokers, topic);
    let (replayed, first_time): (Vec<_>, Vec<_>) = records.iter().partition(|r| {
        kcat_headers(r)
            .iter()
            .any(|(k, _)| k == headers::REPLAY_COUNT)
    });
    assert_eq!(
        first_time.len(),
        originals.len(),
        "the originals themselves"
    );
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for r in &replayed {
        let hs = kcat_headers(r);
        let get = |name: &str| hs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!(get(headers::REPLAY_COUNT), Some("1"));
        assert!(
            get(headers::REPLAYED_FROM).is_some_and(|f| f.starts_with(&format!("{dlq}/"))),
            "{hs:?}"
        );
        assert!(
            hs.iter().all(|(k, _)| !k.starts_with("keel-dlq-")),
            "provenance headers dropped: {hs:?}"
        );
        let id = get(HEADER_EVENT_ID).unwrap_or_else(|| panic!("no event id: {r}"));
        let original = originals
            .get(id)
            .unwrap_or_else(|| panic!("a replayed record that is no original: {r}"));
        assert_eq!(
            r["payload"].as_str().map(str::as_bytes),
            Some(&original.payload[..])
        );
        for h in &original.headers {
            assert!(hs.contains(h), "original header {h:?} kept: {hs:?}");
        }
        assert_eq!(r["key"].as_str(), Some(original.key.as_str()));
        assert_eq!(r["partition"].as_i64(), Some(i64::from(original.partition)));
        // Original headers first, in order, then the two replay headers.
        let names: Vec<&str> = hs.iter().map(|(k, _)| k.as_str()).collect();
        let expected: Vec<&str> = original
            .headers
            .iter()
            .map(|(k, _)| k.as_str())
            .chain([headers::REPLAY_COUNT, headers::REPLAYED_FROM])
            .collect();
        assert_eq!(names, expected);
        *seen.entry(id.to_string()).or_default() += 1;
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "replayed more than once: {doubled:?}");
    assert_eq!(
        seen.len(),
        originals.len(),
        "every original replayed ({} of {})",
        seen.len(),
        originals.len()
    );
}

/// The replay CLI as a child process, its stdout read line by line.
struct ReplayProcess {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl ReplayProcess {
    fn start(brokers: &str, args: &[&str]) -> Self {
        let mut child = Command::new(support::example_binary("dlq_replay"))
            .args(["--brokers", brokers])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the dlq_replay example");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ReplayProcess { child, lines }
    }

    /// Waits for a stdout line that `pick` accepts.
    fn wait_line(&self, timeout: Duration, mut pick: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pick(&line) => return line,
                Ok(_) => {}
                Err(e) => panic!("no expected line from dlq_replay within {timeout:?}: {e}"),
            }
        }
    }
}

impl Drop for ReplayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn committed_count(line: &str) -> Option<u64> {
    line.strip_prefix("committed ")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// The replay killed with SIGKILL in the middle and run again: each of 1,000
/// dead-lettered records lands exactly once in the original topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_midway_and_restarted_lands_each_record_exactly_once() {
    const N: u32 = 1000;
    let brokers = support::kafka_brokers();
    let topic = unique("orders");
    let dlq = format!("{topic}.dlq");
    create_topics(&brokers, &[(&topic, 3), (&dlq, 3)]).await;
    let originals = produce_originals(&brokers, &topic, N).await;
    assert_eq!(originals.len(), N as usize);
    dead_letter_all(&brokers, &topic, u64::from(N)).await;
    let group = unique("replay-group");

    // Slow enough (250 records/s, 50 per transaction) to be killed in the middle.
    let first = ReplayProcess::start(
        &brokers,
        &[
            "--from", &dlq, "--group", &group, "--rate", "250/s", "--batch", "50",
        ],
    );
    first.wait_line(Duration::from_secs(60), |l| {
        committed_count(l).is_some_and(|n| n >= 300)
    });
    // Let it get into the next transaction, then kill it.
    std::thread::sleep(Duration::from_millis(100));
    let mut first = first;
    first.child.kill().unwrap(); // SIGKILL
    let status = first.child.wait().unwrap();
    assert!(!status.success(), "killed, not finished: {status:?}");
    let progress: i64 = kafka_util::committed_offsets(&brokers, &group, &dlq, 3)
        .await
        .values()
        .sum();
    assert!(
        (300..i64::from(N)).contains(&progress),
        "killed midway: {progress} committed"
    );

    let second = ReplayProcess::start(&brokers, &["--from", &dlq, "--group", &group]);
    let restart = second.wait_line(Duration::from_secs(120), |l| l.starts_with("replayed "));
    let mut second = second;
    assert!(second.child.wait().unwrap().success());
    assert!(
        restart.starts_with(&format!(
            "replayed {} records of {} read",
            i64::from(N) - progress,
            i64::from(N) - progress
        )),
        "the restart replays only what was not committed: {restart} (committed before: {progress})"
    );
    assert_eq!(
        kafka_util::committed_offsets(&brokers, &group, &dlq, 3)
            .await
            .values()
            .sum::<i64>(),
        i64::from(N)
    );
    assert_replayed_exactly_once(&brokers, &topic, &dlq, &originals);
    // The killed run had written records of its open transaction: they are in the
    // log (a read_uncommitted reader sees them twice) but were aborted.
    let in_log = kcat_read(&brokers, &topic, "read_uncommitted")
        .iter()
        .filter(|r| {
            kcat_headers(r)
                .iter()
                .any(|(k, _)| k == headers::REPLAY_COUNT)
        })
        .count();
    assert!(
        in_log > N as usize,
        "the kill should land inside a transaction with records written: {in_log} in the log"
    );

    // Nothing left: a third run replays nothing.
    let third = ReplayProcess::start(&brokers, &["--from", &dlq, "--group", &group]);
    let summary = third.wait_line(Duration::from_secs(60), |l| l.starts_with("replayed "));
    assert!(
        summary.starts_with("replayed 0 records of 0 read"),
        "{summary}"
    );
    eprintln!(
        "figure: dlq replay killed (-9) at {progress} of {N} committed, {} aborted records in \
         the log; the restart: {restart}",
        in_log - N as usize
    );
}

/// The library API: a dry run writes and commits nothing; a filtered run to
/// another topic writes only the matching records there; the replay rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_dry_run_and_another_destination() {
    const N: u32 = 200;
    let brokers = support::kafka_brokers();
    let topic = unique("src");
    let dlq = format!("{topic}.dlq");
    let elsewhere = unique("elsewhere");
    create_topics(&brokers, &[(&topic, 2), (&dlq, 2), (&elsewhere, 1)]).await;
    let originals = produce_originals(&brokers, &topic, N).await;
    dead_letter_all(&brokers, &topic, u64::from(N)).await;
    let group = unique("replay-lib");

    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let report = Replay::new(client(&brokers), &dlq)
        .group(&group)
        .dry_run(true)
        .on_record({
            let seen = seen.clone();
            move |r, to| seen.lock().unwrap().push((r.offset(), to.to_string()))
        })
        .run()
        .await
        .unwrap();
    assert!(report.dry_run && report.complete);
    assert_eq!((report.read, report.replayed), (u64::from(N), u64::from(N)));
    assert_eq!(seen.lock().unwrap().len(), N as usize);
    assert!(seen.lock().unwrap().iter().all(|(_, to)| *to == topic));
    assert_eq!(report.by_topic.get(&topic), Some(&u64::from(N)));
    let committed: i64 = kafka_util::committed_offsets(&brokers, &group, &dlq, 2)
        .await
        .values()
        .sum();
    assert_eq!(committed, 0, "a dry run commits nothing");
    assert_eq!(
        kcat_committed(&brokers, &topic).len(),
        N as usize,
        "a dry run writes nothing"
    );

    // Only the records of customer-3, to another topic.
    let wanted = originals.values().filter(|o| o.key == "customer-3").count() as u64;
    assert!(wanted > 0);
    let report = Replay::new(client(&brokers), &dlq)
        .group(&group)
        .to(&elsewhere)
        .filter(|r| r.key() == Some(b"customer-3"))
        .filter_header(headers::ERROR_KIND, "permanent")
        .run()
        .await
        .unwrap();
    assert_eq!(report.replayed, wanted);
    assert_eq!(report.skipped, u64::from(N) - wanted);
    let there = kcat_committed(&brokers, &elsewhere);
    assert_eq!(there.len() as u64, wanted);
    assert!(there.iter().all(|r| r["key"] == "customer-3"));
    assert_eq!(kcat_committed(&brokers, &topic).len(), N as usize);

    // A topic that does not exist is a typed error.
    let err = Replay::new(client(&brokers), unique("missing"))
        .run()
        .await
        .unwrap_err();
    assert!(matches!(err, ReplayError::UnknownTopic(_)), "{err}");
}
