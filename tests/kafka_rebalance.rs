//! Rebalances against the real broker (`scripts/up`, Kafka 4.1): a revocation is
//! a barrier (issue 11, item 6) with each assignment protocol keel supports —
//! eager (librdkafka's default `range,roundrobin`), `cooperative-sticky`
//! (incremental assign / unassign) and the KIP-848 consumer group protocol
//! (`group.protocol=consumer`, assignment by the broker).
//!
//! Each test runs two keel consumers of one group on a backlog of keyed events:
//! the first alone, then the second joins (partitions move to it), then the first
//! leaves (its partitions move too). Every handled event is recorded with its
//! owner and the instants its handler started and ended. The checks: nothing
//! lost; on no partition did two owners run handlers at overlapping times (the
//! old owner drops what it had queued and finishes what was running *before* the
//! new owner gets the partition); events handled again (by the other owner, or by
//! the same one after its partition came back) at most 1 % — what the old owner
//! finished is committed before it lets go; per-key order within each owner; no
//! handler abandoned; and, where a backlog is certain, the old owner really
//! dropped queued messages of revoked partitions.
#![cfg(feature = "kafka")]

mod kafka_util;
mod support;

use keel::kafka::consumer::{
    BoxError, ConsumedEvent, KafkaConsumer, ProcessingOrder, StartOptions,
};
use keel::kafka::registry::HandlerRegistry;
use rdkafka::ClientConfig;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 4;

/// One run of the scenario of the module docs.
struct Scenario {
    name: &'static str,
    /// The group settings under test.
    protocol: &'static [(&'static str, &'static str)],
    order: ProcessingOrder,
    events: usize,
    /// Handler time: slow enough that lanes hold a backlog when partitions move.
    handle: Duration,
    lane_capacity: usize,
    /// Fail unless the first consumer dropped queued messages of revoked partitions
    /// (only where a backlog is certain at the revocation).
    expect_drops: bool,
}

/// One handled event.
#[derive(Clone, Debug)]
struct Record {
    owner: usize,
    partition: i32,
    key: String,
    seq: u64,
    id: String,
    start: Instant,
    end: Instant,
}

type Log = Arc<Mutex<Vec<Record>>>;

fn unique(name: &str) -> String {
    format!("keel-rebalance-{name}-{}", uuid::Uuid::new_v4())
}

/// A consumer of `group` whose handler takes `scenario.handle` and records each event as
/// handled by `owner`. `protocol` are the group settings under test.
fn start(
    brokers: &str,
    topic: &str,
    group: &str,
    scenario: &Scenario,
    owner: usize,
    log: Log,
) -> KafkaConsumer {
    let handle = scenario.handle;
    let registry = HandlerRegistry::builder()
        .handler_fn("order.created", move |event: ConsumedEvent| {
            let log = log.clone();
            async move {
                let start = Instant::now();
                tokio::time::sleep(handle).await;
                let payload = event.envelope().payload();
                let record = Record {
                    owner,
                    partition: event.partition(),
                    key: payload["key"].as_str().unwrap_or("-").to_string(),
                    seq: payload["seq"].as_u64().unwrap_or(0),
                    id: event.envelope().event_id().to_string(),
                    start,
                    end: Instant::now(),
                };
                log.lock().unwrap().push(record);
                Ok::<_, BoxError>(())
            }
        })
        .build()
        .unwrap();
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", brokers);
    for (name, value) in scenario.protocol {
        client.set(*name, *value);
    }
    KafkaConsumer::builder(client, group)
        .order(scenario.order)
        .workers(2)
        // Small lanes and a short patience: backpressure (pause, rewind, seek on
        // resume) is going on when partitions move.
        .lane_capacity(scenario.lane_capacity)
        .backpressure_after(Duration::from_millis(50))
        .start(StartOptions::new([topic]).from_beginning(true), registry)
        .unwrap()
}

async fn wait_until(what: &str, timeout: Duration, log: &Log, done: impl Fn(&[Record]) -> bool) {
    let started = Instant::now();
    loop {
        {
            let records = log.lock().unwrap();
            if done(&records) {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what} ({} handled)",
                records.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// On some partition, a handler of one owner overlapped in time with a handler
/// of another: the pairs found (at most 5).
fn overlaps(records: &[Record]) -> Vec<String> {
    let mut by_partition: BTreeMap<i32, Vec<&Record>> = BTreeMap::new();
    for r in records {
        by_partition.entry(r.partition).or_default().push(r);
    }
    let mut out = Vec::new();
    for (partition, mut list) in by_partition {
        list.sort_by_key(|r| r.start);
        // Latest end so far per owner.
        let mut latest: HashMap<usize, Instant> = HashMap::new();
        for r in list {
            for (&other, &end) in &latest {
                if other != r.owner && end > r.start && out.len() < 5 {
                    out.push(format!(
                        "partition {partition}: owner {} started {:?} before owner {other} ended",
                        r.owner,
                        end - r.start
                    ));
                }
            }
            let e = latest.entry(r.owner).or_insert(r.end);
            *e = (*e).max(r.end);
        }
    }
    out
}

/// Per owner and key, events handled for the first time come in sequence order;
/// returns the violations and the events an owner handled twice itself.
fn order_violations(records: &[Record]) -> (Vec<String>, usize) {
    let mut out = Vec::new();
    let mut replays = 0;
    let mut seen: HashSet<(usize, &str)> = HashSet::new();
    let mut last: HashMap<(usize, &str), u64> = HashMap::new();
    for r in records {
        if !seen.insert((r.owner, &r.id)) {
            replays += 1;
            continue;
        }
        if let Some(prev) = last.insert((r.owner, &r.key), r.seq)
            && r.seq <= prev
        {
            out.push(format!(
                "owner {} key {}: seq {} after {prev}",
                r.owner, r.key, r.seq
            ));
        }
    }
    (out, replays)
}

/// The scenario of the module docs.
async fn one_joins_one_leaves(scenario: Scenario) {
    let (name, events) = (scenario.name, scenario.events);
    let _serial = support::serial().await;
    let brokers = support::kafka_brokers();
    let started = Instant::now();
    let topic = unique(name);
    kafka_util::create_topics(&brokers, &[(&topic, PARTITIONS)]).await;
    let sent = kafka_util::produce_keyed(&brokers, &topic, events, 40).await;
    let group = unique(&format!("{name}-group"));
    let log: Log = Arc::default();

    let first = start(&brokers, &topic, &group, &scenario, 0, log.clone());
    wait_until(
        "the first consumer to handle 100 events",
        Duration::from_secs(60),
        &log,
        |r| r.len() >= 100,
    )
    .await;
    let second = start(&brokers, &topic, &group, &scenario, 1, log.clone());
    let joined = Instant::now();
    wait_until(
        "the second consumer to get partitions and handle 50 events",
        Duration::from_secs(60),
        &log,
        |r| r.iter().filter(|r| r.owner == 1).count() >= 50,
    )
    .await;
    let moved = joined.elapsed();
    let first_metrics = first.metrics();
    first.shutdown(Duration::from_secs(20)).await.unwrap();
    let left = Instant::now();
    wait_until("every event handled", Duration::from_secs(120), &log, |r| {
        r.iter()
            .map(|r| r.id.as_str())
            .collect::<HashSet<_>>()
            .len()
            >= events
    })
    .await;
    let finished = left.elapsed();
    let second_metrics = second.metrics();
    second.shutdown(Duration::from_secs(20)).await.unwrap();

    let records = log.lock().unwrap().clone();
    let handled: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let lost = sent
        .iter()
        .filter(|id| !handled.contains(id.as_str()))
        .count();
    let by_owner = |o: usize| -> HashSet<&str> {
        records
            .iter()
            .filter(|r| r.owner == o)
            .map(|r| r.id.as_str())
            .collect()
    };
    let (a, b) = (by_owner(0), by_owner(1));
    let both = a.intersection(&b).count();
    let overlapping = overlaps(&records);
    let (violations, replays) = order_violations(&records);
    eprintln!(
        "{name}: {events} events, {} handled lines (first {}, second {}); second got partitions and 50 events {moved:.1?} after joining; \
         rest finished {finished:.1?} after the first left; dropped queued messages of revoked partitions: first {}, second {}; abandoned {}, \
         seek failures {}/{}; handled by both owners {both}; replays within one owner {replays}; lost {lost}; test took {:.1?}",
        records.len(),
        a.len(),
        b.len(),
        first_metrics.revoked_dropped,
        second_metrics.revoked_dropped,
        first_metrics.revoke_abandoned + second_metrics.revoke_abandoned,
        first_metrics.seek_failures,
        second_metrics.seek_failures,
        started.elapsed()
    );

    assert_eq!(lost, 0, "events never handled");
    assert!(
        overlapping.is_empty(),
        "two owners handled one partition at once: {overlapping:?}"
    );
    assert!(
        violations.is_empty(),
        "per-key order broken: {violations:?}"
    );
    // At-least-once allows an event to be handled again (one after the other,
    // never at once): what a lane finished just as the partition went, or an
    // offset stored but not yet committed. What the old owner finished is
    // committed synchronously on revoke, so such repeats are rare: before the
    // barrier the group test saw 322-888 replays in 20,000 events.
    assert!(
        both + replays <= events / 100,
        "{both} events handled by both owners and {replays} replays within one owner: more than 1 %"
    );
    assert!(
        !b.is_empty() && !a.is_empty(),
        "both owners must have handled events"
    );
    if scenario.expect_drops {
        assert!(
            first_metrics.revoked_dropped + second_metrics.revoked_dropped > 0,
            "the consumers had a backlog when partitions moved, yet dropped nothing"
        );
    }
    assert_eq!(
        first_metrics.revoke_abandoned + second_metrics.revoke_abandoned,
        0,
        "a handler far shorter than the revoke timeout was abandoned"
    );
}

/// The fast scenario: 4,000 events, 2 ms handlers, lanes of 32 with backpressure.
fn fast(
    name: &'static str,
    protocol: &'static [(&'static str, &'static str)],
    order: ProcessingOrder,
) -> Scenario {
    Scenario {
        name,
        protocol,
        order,
        events: 4_000,
        handle: Duration::from_millis(2),
        lane_capacity: 32,
        expect_drops: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eager_revocation_is_a_barrier_in_key_ordered_mode() {
    // librdkafka's default strategies (range, roundrobin) are eager: every
    // partition is revoked on each rebalance and some come back. Key-ordered mode
    // runs one partition on both lanes, with backpressure rewinds in play.
    one_joins_one_leaves(fast(
        "eager",
        &[("session.timeout.ms", "6000")],
        ProcessingOrder::Key,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooperative_sticky_moves_only_some_partitions_without_overlap_or_loss() {
    one_joins_one_leaves(fast(
        "cooperative",
        &[
            ("partition.assignment.strategy", "cooperative-sticky"),
            ("session.timeout.ms", "6000"),
        ],
        ProcessingOrder::Partition,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kip848_consumer_group_protocol_moves_partitions_without_overlap_or_loss() {
    // KIP-848: the broker assigns and revokes incrementally; librdkafka 2.12
    // (rdkafka-sys 4.10) supports it, Kafka 4.x enables it by default. Session
    // and assignment settings are the broker's then (not set here).
    one_joins_one_leaves(fast(
        "kip848",
        &[("group.protocol", "consumer")],
        ProcessingOrder::Partition,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_of_revoked_partitions_are_dropped_not_handled() {
    // Slow handlers and lanes of 64: each lane holds over a second of work when
    // partitions move, which the old owner must drop, not handle. Eager: every
    // partition is revoked at once, so the lanes meet revoked messages at once
    // (with incremental protocols they may sit behind kept partitions' messages
    // until after the metrics are read; they are dropped all the same).
    one_joins_one_leaves(Scenario {
        name: "drop-eager",
        protocol: &[("session.timeout.ms", "6000")],
        order: ProcessingOrder::Partition,
        // Enough work (about 30 s for one consumer) that the first cannot finish
        // it all before a slow group join on a loaded machine gives the second
        // its partitions.
        events: 3000,
        handle: Duration::from_millis(20),
        lane_capacity: 64,
        expect_drops: true,
    })
    .await;
}
