//! The fault suite, broker side: Kafka brokers killed with `SIGKILL` in the middle
//! of a publish through keel's default publish stack ([`PublishStack`]), started
//! again on their own data, and the topic read back by an independent reader (a
//! plain rdkafka consumer, no keel code).
//!
//! Needs the single broker and the three-node cluster: `scripts/up --cluster`
//! (`scripts/test` starts both). The tests kill and restart them with
//! `scripts/kafka-kill` / `scripts/kafka-start` (found through `KEEL_RUN_DIR`), one
//! test at a time ([`support::serial`]); a killed broker is started again and
//! answers before its test ends, also when the test fails ([`KilledKafkaNode`]).
//! Figures (`--nocapture`) are recorded in RELIABILITY.md ("Fault suite").
#![cfg(feature = "kafka")]

mod kafka_util;
mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel::kafka::client::KafkaClient;
use keel::kafka::config::{KafkaConfig, KafkaLogLevel};
use keel::kafka::envelope::EventEnvelope;
use keel::kafka::producer::{PublishRequest, PublishStack};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};
use serde_json::json;
use support::KilledKafkaNode;
use tower::{Service, ServiceExt};
use uuid::Uuid;

/// Events per publish run (issue 11: 50,000).
const EVENTS: usize = 50_000;
/// Keys the events are spread over; each key's events carry a sequence 1, 2, ...
const KEYS: usize = 64;
/// Partitions of each test topic.
const PARTITIONS: i32 = 6;
/// Publish pace: `PER_TICK` events every `TICK`, 5,000 events/s, so that the
/// publish runs about 10 s and the kill lands in its middle.
const TICK: Duration = Duration::from_millis(10);
const PER_TICK: usize = 50;
/// The broker is killed once this many events were acknowledged.
const KILL_AFTER_ACKS: usize = 15_000;

/// One event of the run: index, key, per-key sequence.
fn event(i: usize, seq: &mut [u64]) -> EventEnvelope {
    let k = i % KEYS;
    seq[k] += 1;
    EventEnvelope::new(
        "order.created",
        json!({"key": format!("key-{k}"), "seq": seq[k], "i": i}),
    )
    .with_key(format!("key-{k}"))
}

/// What one paced publish run saw.
struct PublishRun {
    /// Event id of every event sent, by index.
    ids: Vec<Uuid>,
    /// Ids whose publish returned an acknowledgement.
    acked: HashSet<Uuid>,
    /// Errors of the publishes that failed, as text.
    failures: Vec<String>,
    /// When each acknowledgement arrived, sorted.
    ack_times: Vec<Instant>,
}

/// One publish's answer: the event, acknowledged or the error text, and when.
type Outcome = (Uuid, Result<(), String>, Instant);

/// Publishes [`EVENTS`] events to `topic` through the default publish stack at
/// the pace above, calling the service in order (events are enqueued in call
/// order, so per-key order is the index order). `acks` counts acknowledgements as
/// they arrive.
async fn publish_paced(client: KafkaClient, topic: String, acks: Arc<AtomicUsize>) -> PublishRun {
    let stack = PublishStack::new(&client);
    let mut service = stack.event_service();
    let mut seq = vec![0u64; KEYS];
    let results: Arc<Mutex<Vec<Outcome>>> = Arc::new(Mutex::new(Vec::with_capacity(EVENTS)));
    let mut ids = Vec::with_capacity(EVENTS);
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(TICK);
    let mut i = 0;
    while i < EVENTS {
        tick.tick().await;
        for _ in 0..PER_TICK.min(EVENTS - i) {
            let envelope = event(i, &mut seq);
            let id = envelope.event_id();
            ids.push(id);
            let call = ServiceExt::<PublishRequest>::ready(&mut service)
                .await
                .expect("the publish stack is ready")
                .call(PublishRequest::new(topic.clone(), envelope));
            let (results, acks) = (results.clone(), acks.clone());
            tasks.spawn(async move {
                let outcome = call.await.map(|_| ()).map_err(|e| e.to_string());
                if outcome.is_ok() {
                    acks.fetch_add(1, Ordering::Relaxed);
                }
                results.lock().unwrap().push((id, outcome, Instant::now()));
            });
            i += 1;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("publish task");
    }
    let results = std::mem::take(&mut *results.lock().unwrap());
    let mut run = PublishRun {
        ids,
        acked: HashSet::new(),
        failures: Vec::new(),
        ack_times: Vec::new(),
    };
    for (id, outcome, at) in results {
        match outcome {
            Ok(()) => {
                run.acked.insert(id);
                run.ack_times.push(at);
            }
            Err(e) => run.failures.push(e),
        }
    }
    run.ack_times.sort();
    run
}

/// The longest time without any acknowledgement between `from` and the last one,
/// and when it ended.
fn longest_ack_gap(times: &[Instant], from: Instant) -> (Duration, Option<Instant>) {
    let mut best = (Duration::ZERO, None);
    let mut prev = from;
    for &t in times.iter().filter(|&&t| t >= from) {
        if t - prev > best.0 {
            best = (t - prev, Some(t));
        }
        prev = t;
    }
    best
}

/// What the independent reader found in the topic.
#[derive(Debug, Default)]
struct TopicCheck {
    records: usize,
    duplicates: usize,
    acked_lost: usize,
    /// Records whose publish failed (or was never acknowledged) but that are there.
    unacked_present: usize,
    /// Key order violations: a key's sequence went down or repeated.
    out_of_order: usize,
}

/// Reads `topic` back with a plain rdkafka consumer and checks it against `run`.
async fn check_topic(brokers: &str, topic: &str, run: &PublishRun) -> TopicCheck {
    let (b, t, expected) = (brokers.to_string(), topic.to_string(), run.ids.len());
    let raw = tokio::task::spawn_blocking(move || {
        kafka_util::read_raw(&b, &t, PARTITIONS, expected, "read_uncommitted")
    })
    .await
    .unwrap();
    let mut check = TopicCheck {
        records: raw.len(),
        ..TopicCheck::default()
    };
    let mut seen = HashSet::new();
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    // read_raw keeps each partition's order, and a key lives in one partition.
    for m in &raw {
        let envelope: EventEnvelope = EventEnvelope::from_message(m).expect("a keel event");
        if !seen.insert(envelope.event_id()) {
            check.duplicates += 1;
            continue;
        }
        if !run.acked.contains(&envelope.event_id()) {
            check.unacked_present += 1;
        }
        let key = String::from_utf8_lossy(m.key().expect("a key")).into_owned();
        let seq = envelope.payload()["seq"].as_u64().expect("seq");
        if let Some(prev) = last_seq.insert(key, seq)
            && seq <= prev
        {
            check.out_of_order += 1;
        }
    }
    check.acked_lost = run.acked.iter().filter(|id| !seen.contains(id)).count();
    check
}

fn client(brokers: &str, name: &str) -> KafkaClient {
    let config = KafkaConfig::builder()
        .brokers(brokers.split(',').map(str::to_string))
        .client_id(name)
        .log_level(KafkaLogLevel::Warn)
        .build()
        .unwrap();
    KafkaClient::connect(config).unwrap()
}

/// Creates `topic` with `replication` replicas and `min.insync.replicas`.
async fn create_topic(brokers: &str, topic: &str, replication: i32, min_isr: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let new = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(replication))
        .set("min.insync.replicas", min_isr);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    for result in admin.create_topics([&new], &options).await.unwrap() {
        result.unwrap();
    }
}

/// The leader of each partition of `topic` (broker id), once every partition has
/// one and `replication` in-sync replicas.
fn leaders(brokers: &str, topic: &str, replication: usize) -> Vec<i32> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(meta) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))
            && let Some(t) = meta.topics().first()
            && t.partitions().len() == PARTITIONS as usize
            && t.partitions()
                .iter()
                .all(|p| p.leader() >= 0 && p.isr().len() == replication)
        {
            let mut partitions: Vec<_> = t.partitions().iter().collect();
            partitions.sort_by_key(|p| p.id());
            return partitions.iter().map(|p| p.leader()).collect();
        }
        assert!(
            Instant::now() < deadline,
            "topic {topic} has no leader with {replication} in-sync replicas for each partition after 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `acks` reaches `n` (or fails after `timeout`).
async fn wait_for_acks(acks: &AtomicUsize, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while acks.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} events acknowledged after {timeout:?}",
            acks.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_broker_killed_and_restarted_mid_publish_loses_and_duplicates_nothing() {
    let _serial = support::serial().await;
    let brokers = support::kafka_brokers();
    let test_started = Instant::now();
    let topic = format!("keel-fault-single-{}", Uuid::new_v4());
    create_topic(&brokers, &topic, 1, "1").await;

    let acks = Arc::new(AtomicUsize::new(0));
    let publish = tokio::spawn(publish_paced(
        client(&brokers, "keel-fault-single"),
        topic.clone(),
        acks.clone(),
    ));
    wait_for_acks(&acks, KILL_AFTER_ACKS, Duration::from_secs(60)).await;

    let killed_at = Instant::now();
    let acks_at_kill = acks.load(Ordering::Relaxed);
    let (_node, restart) = tokio::task::spawn_blocking(|| {
        let mut node = KilledKafkaNode::kill("kafka");
        let restart = node.restart();
        (node, restart)
    })
    .await
    .unwrap();
    let answered_at = killed_at + restart;
    let run = tokio::time::timeout(Duration::from_secs(120), publish)
        .await
        .expect("the publish finishes within 120 s of the kill")
        .unwrap();
    let (gap, gap_end) = longest_ack_gap(&run.ack_times, killed_at);
    let first_ack_after_answer = run
        .ack_times
        .iter()
        .find(|&&t| t >= answered_at)
        .map(|&t| t - answered_at);
    let check = check_topic(&brokers, &topic, &run).await;
    eprintln!(
        "single broker: killed after {acks_at_kill} acks; kill + restart until it answers {restart:.1?}; \
         longest time without an ack {gap:.1?} (ended {:.1?} after the kill); first ack {first_ack_after_answer:.1?} \
         after the broker answered; acknowledged {} of {EVENTS}, failed {} (first: {:?}); \
         topic: {check:?}; test took {:.1?}",
        gap_end.map(|t| t - killed_at),
        run.acked.len(),
        run.failures.len(),
        run.failures.first(),
        test_started.elapsed()
    );

    assert_eq!(check.acked_lost, 0, "acknowledged events lost: {check:?}");
    assert_eq!(check.duplicates, 0, "events stored twice: {check:?}");
    assert_eq!(check.out_of_order, 0, "per-key order broken: {check:?}");
    assert_eq!(
        run.acked.len() + run.failures.len(),
        EVENTS,
        "every publish answered"
    );
    assert_eq!(
        check.records,
        run.acked.len() + check.unacked_present,
        "the topic holds the acknowledged events and nothing else but unacknowledged ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_leader_killed_mid_publish_every_event_acknowledged_once() {
    let _serial = support::serial().await;
    let brokers = support::kafka_cluster_brokers();
    let test_started = Instant::now();
    let topic = format!("keel-fault-cluster-{}", Uuid::new_v4());
    create_topic(&brokers, &topic, 3, "2").await;
    let (b, t) = (brokers.clone(), topic.clone());
    let before = tokio::task::spawn_blocking(move || leaders(&b, &t, 3))
        .await
        .unwrap();
    // The broker that leads the most partitions.
    let mut led: HashMap<i32, usize> = HashMap::new();
    for l in &before {
        *led.entry(*l).or_default() += 1;
    }
    let (&victim, &victim_led) = led
        .iter()
        .max_by_key(|(id, n)| (**n, -**id))
        .expect("leaders");

    let acks = Arc::new(AtomicUsize::new(0));
    let publish = tokio::spawn(publish_paced(
        client(&brokers, "keel-fault-cluster"),
        topic.clone(),
        acks.clone(),
    ));
    wait_for_acks(&acks, KILL_AFTER_ACKS, Duration::from_secs(60)).await;

    let killed_at = Instant::now();
    let acks_at_kill = acks.load(Ordering::Relaxed);
    let name = support::cluster_node_name(victim);
    let mut node = tokio::task::spawn_blocking(move || KilledKafkaNode::kill(&name))
        .await
        .unwrap();
    let run = tokio::time::timeout(Duration::from_secs(120), publish)
        .await
        .expect("the publish finishes within 120 s of the kill")
        .unwrap();
    let publish_done = killed_at.elapsed();
    let (gap, gap_end) = longest_ack_gap(&run.ack_times, killed_at);
    // Started again on its data before reading back, so that the cluster is whole
    // for the next test whatever the checks say.
    let (restart, node) = tokio::task::spawn_blocking(move || (node.restart(), node))
        .await
        .unwrap();
    let (b, t) = (brokers.clone(), topic.clone());
    let after = tokio::task::spawn_blocking(move || leaders(&b, &t, 3))
        .await
        .unwrap();
    let check = check_topic(&brokers, &topic, &run).await;
    eprintln!(
        "cluster: killed broker {victim} (led {victim_led} of {PARTITIONS} partitions: {before:?}) after {acks_at_kill} acks; \
         publish done {publish_done:.1?} after the kill; longest time without an ack {gap:.1?} (ended {:.1?} after the kill); \
         acknowledged {} of {EVENTS}, failed {} (first: {:?}); restart on its data until in sync {restart:.1?}; \
         leaders after {after:?}; topic: {check:?}; test took {:.1?}",
        gap_end.map(|t| t - killed_at),
        run.acked.len(),
        run.failures.len(),
        run.failures.first(),
        test_started.elapsed()
    );
    drop(node);

    assert!(
        victim_led >= 2,
        "the victim leads most partitions: {before:?}"
    );
    assert_eq!(
        run.acked.len(),
        EVENTS,
        "every event acknowledged (failures: {:?})",
        run.failures.iter().take(3).collect::<Vec<_>>()
    );
    assert_eq!(check.acked_lost, 0, "acknowledged events lost: {check:?}");
    assert_eq!(check.duplicates, 0, "events stored twice: {check:?}");
    assert_eq!(check.out_of_order, 0, "per-key order broken: {check:?}");
    assert_eq!(check.records, EVENTS, "{check:?}");
}
