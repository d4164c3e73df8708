//! Per-partition backpressure against the real Kafka broker started by
//! `scripts/up` (issue 11, item 5): a lane that stays full pauses only the
//! partitions that feed it; the other partitions keep being handled and committed.
//!
//! Input is produced with a raw rdkafka producer; committed offsets are read back
//! with an independent client of the group.
#![cfg(feature = "kafka")]

mod kafka_util;
mod support;

use keel::kafka::consumer::scheduler::lane_for;
use keel::kafka::consumer::{
    BoxError, ConsumedEvent, KafkaConsumer, ProcessingOrder, StartOptions,
};
use keel::kafka::envelope::EventEnvelope;
use keel::kafka::registry::HandlerRegistry;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 4;
const WORKERS: usize = 8;
const PER_PARTITION: usize = 100;

fn client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

/// A topic name whose partition `blocked` has a lane of its own among the
/// `PARTITIONS` partitions, so that blocking it blocks no other partition's lane.
fn topic_with_a_lane_of_its_own() -> (String, i32) {
    loop {
        let topic = format!("keel-backpressure-{}", uuid::Uuid::new_v4().simple());
        let lanes: Vec<usize> = (0..PARTITIONS)
            .map(|p| lane_for(ProcessingOrder::Partition, WORKERS, &topic, p, None))
            .collect();
        if let Some(blocked) = (0..PARTITIONS)
            .find(|&p| lanes.iter().filter(|&&l| l == lanes[p as usize]).count() == 1)
        {
            return (topic, blocked);
        }
    }
}

async fn create_topic(brokers: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = client(brokers).create().unwrap();
    let new = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1));
    for result in admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap()
    {
        result.unwrap();
    }
}

/// `PER_PARTITION` events to each of `partitions`, acknowledged (retried while
/// a new topic's partitions get their leaders).
async fn produce(brokers: &str, topic: &str, partitions: &[i32]) {
    let producer: FutureProducer = client(brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut sends = Vec::new();
    for &partition in partitions {
        for n in 0..PER_PARTITION {
            let encoded = EventEnvelope::new("order.created", json!({"order": n}))
                .encode()
                .unwrap();
            let producer = producer.clone();
            let topic = topic.to_string();
            sends.push(async move {
                let mut tries = 0;
                loop {
                    let record = FutureRecord::<(), _>::to(&topic)
                        .partition(partition)
                        .payload(&encoded.value)
                        .headers(encoded.owned_headers());
                    match producer.send(record, Duration::from_secs(10)).await {
                        Ok(_) => return,
                        Err((e, _)) if tries < 20 => {
                            tries += 1;
                            eprintln!("produce to {partition}: {e}, retrying");
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        Err((e, _)) => panic!("produce to {partition}: {e}"),
                    }
                }
            });
        }
    }
    futures::future::join_all(sends).await;
}

/// Offsets `group` committed on every partition of `topic` (0 if none).
async fn committed(brokers: &str, group: &str, topic: &str) -> HashMap<i32, i64> {
    kafka_util::committed_offsets(brokers, group, topic, PARTITIONS).await
}

/// One partition's handler blocks until released; small lanes so that its lane is
/// full at once. Once the lane has been full for a while (its partition paused),
/// more events are produced to the other partitions: they must still be fetched,
/// handled and committed while it blocks (with the whole assignment paused they
/// never would be). Once released, the blocked partition is handled completely,
/// in offset order, without gaps (the resume seeks back correctly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_partition_pauses_only_itself_the_others_are_handled_and_committed() {
    let brokers = support::kafka_brokers();
    let (topic, blocked) = topic_with_a_lane_of_its_own();
    create_topic(&brokers, &topic).await;
    let group = format!("{topic}-group");
    let others: Vec<i32> = (0..PARTITIONS).filter(|&p| p != blocked).collect();
    produce(&brokers, &topic, &(0..PARTITIONS).collect::<Vec<_>>()).await;

    let (release, released) = tokio::sync::watch::channel(false);
    let handled: Arc<Mutex<Vec<(i32, i64)>>> = Arc::default();
    let registry = {
        let handled = handled.clone();
        HandlerRegistry::builder()
            .handler_fn("order.created", move |event: ConsumedEvent| {
                let (handled, mut released) = (handled.clone(), released.clone());
                async move {
                    if event.partition() == blocked {
                        released.wait_for(|r| *r).await.unwrap();
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
        .workers(WORKERS)
        .lane_capacity(4)
        .backpressure_after(Duration::from_millis(100))
        .start(
            StartOptions::new([topic.as_str()]).from_beginning(true),
            registry,
        )
        .unwrap();

    let count = |p: i32| handled.lock().unwrap().iter().filter(|h| h.0 == p).count();
    // The blocked partition's lane fills at once (4 + 4 messages of 100); after
    // `backpressure_after` its batches are held and fetching pauses.
    let deadline = Instant::now() + Duration::from_secs(60);
    while consumer.metrics().total_processed == 0 {
        assert!(Instant::now() < deadline, "nothing handled within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    produce(&brokers, &topic, &others).await;
    let expected = 2 * PER_PARTITION;

    let started = Instant::now();
    let mut all_committed = None;
    while started.elapsed() < Duration::from_secs(60) {
        let c = committed(&brokers, &group, &topic).await;
        if others.iter().all(|p| c[p] == expected as i64) {
            all_committed = Some((started.elapsed(), c));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let per_partition: Vec<(i32, usize)> = (0..PARTITIONS).map(|p| (p, count(p))).collect();
    let (took, c) = all_committed.unwrap_or_else(|| {
        panic!(
            "partition {blocked} blocks its lane; the others were not all handled and committed \
             within 60 s of producing more to them: handled per partition {per_partition:?}"
        )
    });
    eprintln!(
        "figure: partition {blocked} blocked; the other {} partitions handled and committed \
         ({expected} each) {took:?} after the second {PER_PARTITION} were produced; handled per partition {per_partition:?}",
        others.len()
    );
    assert_eq!(
        count(blocked),
        0,
        "the blocked partition handled nothing yet"
    );
    assert_eq!(c[&blocked], 0, "nothing committed past the blocked event");
    for p in &others {
        assert_eq!(count(*p), expected, "partition {p} handled once each");
    }

    release.send(true).unwrap();
    let released_at = Instant::now();
    while count(blocked) < PER_PARTITION {
        assert!(
            released_at.elapsed() < Duration::from_secs(60),
            "after the release only {} of partition {blocked} handled",
            count(blocked)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    let offsets: Vec<i64> = handled
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h.0 == blocked)
        .map(|h| h.1)
        .collect();
    assert_eq!(
        offsets,
        (0..PER_PARTITION as i64).collect::<Vec<_>>(),
        "the blocked partition handled in order, each once, none skipped"
    );
    let c = committed(&brokers, &group, &topic).await;
    assert_eq!(
        c[&blocked], PER_PARTITION as i64,
        "blocked partition committed to the end"
    );
    for p in &others {
        assert_eq!(c[p], expected as i64, "partition {p} committed to the end");
    }
}
