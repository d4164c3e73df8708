//! Consume-and-handle on the real broker (`scripts/up`), keel beside raw rdkafka.
//!
//! - `consume_handle_commit/*`: 100,000 envelopes (~150 B) from one partition. keel's
//!   runtime (poll thread, one lane, registry, retry and DLQ layers, offset tracker,
//!   stored offsets + auto-commit) beside a raw `StreamConsumer` loop doing the same
//!   work per message: decode the envelope, call a no-op handler, store the offset
//!   (auto-commit). Timed from the first handled message to the last, so joining the
//!   group is not counted.
//! - `key_ordered_1ms/*`: 1,000 envelopes over 100 keys on one partition, a handler
//!   that sleeps 1 ms: sequential (one lane) beside key-ordered mode on 32 lanes.
//!
//! - `consume_handle_commit/keel_from_config`, `.../facade_on_topic`,
//!   `.../facade_typed`: the same 100,000 envelopes through the runtime built from
//!   a `KafkaConfig` (registry routing by event type) beside the `Kafka` facade
//!   (one client config for both): routing by topic with the raw record, and a
//!   typed handler (`on::<BenchPayload>`, payload decoded per record).
//! - `publish_10k/*`: 10,000 envelopes, at most 1,000 outstanding, through the
//!   default publish stack's event service (`ready` + `call`) beside
//!   `Kafka::publish` (the same stack, cloned per call by `oneshot`).
//!
//! Every record carries a W3C `traceparent` header (as records from a traced
//! producer do); only keel's `otel` build reads it.
//!
//! With keel's `otel` feature and `KEEL_BENCH_OTEL=1`, an OpenTelemetry layer
//! (`tracing-opentelemetry` over an SDK tracer provider, every span sampled, no
//! exporter, an `INFO` filter) is the global subscriber: keel's lane then makes a
//! CONSUMER span `process <topic>` per message, the child of the header's context.
//! The raw loop does not use `tracing`, so it is the same in both processes.
//!
//! Run: `scripts/up && cargo bench --no-default-features --features kafka --bench kafka_consume`
//! (and `--features kafka,otel`, with and without `KEEL_BENCH_OTEL=1`)

#[path = "../tests/support/mod.rs"]
mod support;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use keel::kafka::Kafka;
use keel::kafka::client::KafkaClient;
use keel::kafka::config::{KafkaConfig, KafkaLogLevel};
use keel::kafka::consumer::{BoxError, ConsumedEvent, KafkaConsumer, Record, StartOptions};
use keel::kafka::envelope::EventEnvelope;
use keel::kafka::error::KafkaProducerError;
use keel::kafka::producer::{PublishAck, PublishRequest};
use keel::kafka::registry::HandlerRegistry;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tower::{Service, ServiceExt};

const THROUGHPUT_N: u64 = 100_000;
const KEYED_N: u64 = 1_000;
const PUBLISH_N: u64 = 10_000;
const OUTSTANDING: usize = 1_000;

/// The payload `prepare` writes, for the typed facade handler.
#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct BenchPayload {
    i: u64,
    note: String,
}

/// A client of `brokers` whose consumers join group `group`.
fn kafka_client(brokers: &str, group: &str) -> KafkaClient {
    let config = KafkaConfig::builder()
        .brokers(brokers.split(',').map(str::to_string))
        .group_id(group.to_string())
        .log_level(KafkaLogLevel::Warn)
        .build()
        .unwrap();
    KafkaClient::connect(config).unwrap()
}

/// Counts handled messages: notes the first, signals the `n`th.
#[derive(Clone)]
struct Counter {
    n: u64,
    first: Arc<OnceLock<Instant>>,
    done: Arc<Notify>,
    count: Arc<AtomicU64>,
}

impl Counter {
    fn new(n: u64) -> Self {
        Counter {
            n,
            first: Arc::default(),
            done: Arc::default(),
            count: Arc::default(),
        }
    }
    fn hit(&self) {
        self.first.get_or_init(Instant::now);
        if self.count.fetch_add(1, Ordering::Relaxed) + 1 == self.n {
            self.done.notify_one();
        }
    }
}

#[derive(Clone, Copy)]
enum Via {
    RuntimeFromConfig,
    FacadeOnTopic,
    FacadeTyped,
}

async fn config_run(brokers: &str, topic: &str, n: u64, via: Via) -> Duration {
    let group = unique("g");
    let client = kafka_client(brokers, &group);
    let counter = Counter::new(n);
    let consumer = match via {
        Via::RuntimeFromConfig => {
            let c = counter.clone();
            let registry = HandlerRegistry::builder()
                .handler_fn("bench.event", move |event: ConsumedEvent| {
                    let c = c.clone();
                    async move {
                        black_box(event.envelope().payload());
                        c.hit();
                        Ok::<_, BoxError>(())
                    }
                })
                .build()
                .unwrap();
            KafkaConsumer::from_client(&client)
                .unwrap()
                .start(StartOptions::new([topic]).from_beginning(true), registry)
                .unwrap()
        }
        Via::FacadeOnTopic => {
            let c = counter.clone();
            Kafka::new(&client)
                .consumer(group)
                .from_beginning(true)
                .on_topic(topic, move |record: Record| {
                    let c = c.clone();
                    async move {
                        black_box(record.envelope().payload());
                        c.hit();
                        Ok::<_, BoxError>(())
                    }
                })
                .start()
                .unwrap()
        }
        Via::FacadeTyped => {
            let c = counter.clone();
            Kafka::new(&client)
                .consumer(group)
                .topics([topic])
                .from_beginning(true)
                .on::<BenchPayload, _, _, _>("bench.event", move |payload, _record| {
                    let c = c.clone();
                    async move {
                        black_box(payload);
                        c.hit();
                        Ok::<_, BoxError>(())
                    }
                })
                .start()
                .unwrap()
        }
    };
    counter.done.notified().await;
    let elapsed = counter.first.get().unwrap().elapsed();
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    elapsed
}

/// Publishes `n` envelopes to `topic`, at most [`OUTSTANDING`] at a time.
async fn publish_run(kafka: &Kafka, topic: &'static str, n: u64, facade: bool) -> Duration {
    let began = Instant::now();
    let mut service = kafka.event_service();
    // Both variants boxed alike, so the box costs the same on each side.
    let mut pending: FuturesUnordered<
        futures::future::BoxFuture<'static, Result<PublishAck, KafkaProducerError>>,
    > = FuturesUnordered::new();
    for i in 0..n {
        if pending.len() >= OUTSTANDING {
            pending.next().await.unwrap().unwrap();
        }
        let event = EventEnvelope::new("bench.event", json!({"i": i, "note": "publish bench"}))
            .with_key(format!("key-{}", i % 64));
        if facade {
            let kafka = kafka.clone();
            pending.push(Box::pin(async move { kafka.publish(topic, event).await }));
        } else {
            ServiceExt::<PublishRequest>::ready(&mut service)
                .await
                .unwrap();
            pending.push(Box::pin(service.call(PublishRequest::new(topic, event))));
        }
    }
    while let Some(r) = pending.next().await {
        r.unwrap();
    }
    began.elapsed()
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("keel-bench-{name}-{}-{nanos}", std::process::id())
}

fn client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

async fn prepare(brokers: &str, name: &str, n: u64, keys: u64) -> String {
    let topic = unique(name);
    let admin: AdminClient<DefaultClientContext> = client(brokers).create().unwrap();
    for r in admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        r.unwrap();
    }
    let producer: FutureProducer = client(brokers).set("linger.ms", "10").create().unwrap();
    let mut deliveries = Vec::with_capacity(n as usize);
    for i in 0..n {
        let event = EventEnvelope::new("bench.event", json!({"i": i, "note": "consume bench"}))
            .with_key(format!("key-{}", i % keys));
        let encoded = event.encode().unwrap();
        let headers = encoded.owned_headers().insert(rdkafka::message::Header {
            key: "traceparent",
            value: Some(&b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"[..]),
        });
        let mut record = FutureRecord::to(&topic)
            .payload(&encoded.value)
            .headers(headers);
        if let Some(key) = &encoded.key {
            record = record.key(key);
        }
        loop {
            match producer.send_result(record) {
                Ok(d) => {
                    deliveries.push(d);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => panic!("{e}"),
            }
        }
    }
    for d in deliveries {
        d.await.unwrap().unwrap();
    }
    topic
}

/// Handler counting messages; returns (registry, first-handled instant, done signal).
fn counting_registry(
    n: u64,
    sleep: Option<Duration>,
) -> (HandlerRegistry, Arc<OnceLock<Instant>>, Arc<Notify>) {
    let first = Arc::new(OnceLock::new());
    let done = Arc::new(Notify::new());
    let count = Arc::new(AtomicU64::new(0));
    let registry = {
        let (first, done) = (first.clone(), done.clone());
        HandlerRegistry::builder()
            .handler_fn("bench.event", move |event: ConsumedEvent| {
                let (first, done, count) = (first.clone(), done.clone(), count.clone());
                async move {
                    first.get_or_init(Instant::now);
                    black_box(event.envelope().payload());
                    if let Some(d) = sleep {
                        tokio::time::sleep(d).await;
                    }
                    if count.fetch_add(1, Ordering::Relaxed) + 1 == n {
                        done.notify_one();
                    }
                    Ok::<_, BoxError>(())
                }
            })
            .build()
            .unwrap()
    };
    (registry, first, done)
}

async fn keel_run(
    brokers: &str,
    topic: &str,
    n: u64,
    workers: usize,
    key_ordered: bool,
    sleep: Option<Duration>,
) -> Duration {
    let (registry, first, done) = counting_registry(n, sleep);
    let mut builder = KafkaConsumer::builder(client(brokers), unique("g"));
    builder = if key_ordered {
        builder.key_ordered(workers)
    } else {
        builder.workers(workers)
    };
    let consumer = builder
        .start(StartOptions::new([topic]).from_beginning(true), registry)
        .unwrap();
    done.notified().await;
    let elapsed = first.get().unwrap().elapsed();
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    elapsed
}

async fn raw_run(brokers: &str, topic: &str, n: u64) -> Duration {
    let consumer: StreamConsumer = client(brokers)
        .set("group.id", unique("g"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("queued.max.messages.kbytes", "16384")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let handler = |event: EventEnvelope| {
        black_box(event.payload());
    };
    let mut first = None;
    for _ in 0..n {
        let m = consumer.recv().await.unwrap();
        first.get_or_insert_with(Instant::now);
        if let Ok(event) = EventEnvelope::from_message(&m) {
            handler(event);
        }
        consumer.store_offset_from_message(&m).unwrap();
    }
    let elapsed = first.unwrap().elapsed();
    consumer
        .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        .unwrap();
    elapsed
}

/// With `otel` and `KEEL_BENCH_OTEL=1`: an OpenTelemetry layer as the global
/// subscriber (set before any consumer starts, for the lanes' worker threads).
#[cfg(feature = "otel")]
fn install_otel() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    if std::env::var("KEEL_BENCH_OTEL").as_deref() != Ok("1") {
        return;
    }
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("bench")))
        .with(tracing_subscriber::filter::LevelFilter::INFO);
    tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
    eprintln!("kafka_consume: OpenTelemetry layer installed");
}

fn benches(c: &mut Criterion) {
    #[cfg(feature = "otel")]
    install_otel();
    let brokers = support::kafka_brokers();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let big = rt.block_on(prepare(&brokers, "throughput", THROUGHPUT_N, 1_000));
    let keyed = rt.block_on(prepare(&brokers, "keyed", KEYED_N, 100));

    let mut g = c.benchmark_group("consume_handle_commit");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(THROUGHPUT_N));
    g.bench_function("raw_stream_consumer", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (brokers, topic) = (brokers.clone(), big.clone());
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += raw_run(&brokers, &topic, THROUGHPUT_N).await;
                }
                total
            }
        })
    });
    g.bench_function("keel_runtime", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (brokers, topic) = (brokers.clone(), big.clone());
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += keel_run(&brokers, &topic, THROUGHPUT_N, 1, false, None).await;
                }
                total
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("consume_handle_commit");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(THROUGHPUT_N));
    for (name, via) in [
        ("keel_from_config", Via::RuntimeFromConfig),
        ("facade_on_topic", Via::FacadeOnTopic),
        ("facade_typed", Via::FacadeTyped),
    ] {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (brokers, topic) = (brokers.clone(), big.clone());
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += config_run(&brokers, &topic, THROUGHPUT_N, via).await;
                    }
                    total
                }
            })
        });
    }
    g.finish();

    let publish_topic: &'static str = Box::leak(
        rt.block_on(prepare(&brokers, "publish", 1, 1))
            .into_boxed_str(),
    );
    let kafka = rt.block_on(async {
        let kafka = Kafka::new(&kafka_client(&brokers, &unique("unused")));
        // The first publish waits for the connection and the producer id.
        kafka
            .publish(publish_topic, EventEnvelope::new("warm.up", json!({})))
            .await
            .unwrap();
        kafka
    });
    let mut g = c.benchmark_group("publish_10k");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(PUBLISH_N));
    for (name, facade) in [("stack_service", false), ("facade", true)] {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let kafka = kafka.clone();
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += publish_run(&kafka, publish_topic, PUBLISH_N, facade).await;
                    }
                    total
                }
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("key_ordered_1ms");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(KEYED_N));
    for (name, workers, key_ordered) in [("sequential", 1, false), ("key_ordered_32", 32, true)] {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (brokers, topic) = (brokers.clone(), keyed.clone());
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += keel_run(
                            &brokers,
                            &topic,
                            KEYED_N,
                            workers,
                            key_ordered,
                            Some(Duration::from_millis(1)),
                        )
                        .await;
                    }
                    total
                }
            })
        });
    }
    g.finish();
}

criterion_group!(kafka_consume, benches);
criterion_main!(kafka_consume);
