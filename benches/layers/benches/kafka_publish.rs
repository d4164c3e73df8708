//! Publish throughput on the real broker: keel's publish services (bare, and
//! through the default stack) beside raw rdkafka `FutureProducer::send_result`
//! with the same librdkafka config, at 100 B and 1 KiB.
//!
//! A scripted load run (not criterion): each variant publishes `KEEL_BENCH_MESSAGES`
//! messages (default 200,000) with at most `KEEL_BENCH_WINDOW` (default 10,000)
//! acknowledgements outstanding, and the rounds alternate between variants so
//! that drift on a shared machine hits all of them alike. Reported: the median
//! msg/s over `KEEL_BENCH_ROUNDS` (default 5) rounds, after `KEEL_BENCH_WARMUP` (default 1)
//! uncounted rounds, and the ratio to raw
//! rdkafka, and the CPU time of the whole process (librdkafka threads included)
//! per message, which a shared machine disturbs less than wall-clock rates.
//! Every message is acknowledged by the broker (`acks=all`,
//! idempotent) before it counts.
//!
//! With `--features otel` (keel's `otel` feature) a fifth variant runs the
//! default stack with an OpenTelemetry layer installed on the publishing thread
//! (`tracing-opentelemetry` over an SDK tracer provider, every span sampled, no
//! exporter, INFO filter): each publish then makes its `send` span and writes
//! `traceparent`. The other variants run without any subscriber, as before.
//!
//! Run: `scripts/bench-kafka-publish` (also runs Apache Kafka's
//! ProducerPerformance beside it), or
//! `cargo bench -p keel-benches --bench kafka_publish`.
//! Needs the broker of `scripts/up` (`KEEL_KAFKA_BROKERS`, default
//! 127.0.0.1:9092).

use std::collections::VecDeque;
use std::future::Future;
use std::time::{Duration, Instant};

use keel::kafka::client::KafkaClient;
use keel::kafka::config::{KafkaConfig, KafkaLogLevel};
use keel::kafka::envelope::EventEnvelope;
use keel::kafka::producer::{PublishBatchRequest, PublishRequest, PublishStack};
use keel_benches::{current_thread_runtime, env_usize, load_run_size};
use rdkafka::admin::AdminOptions;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tower::Service;

/// A payload of exactly `size` bytes of JSON body once wrapped in the envelope:
/// the envelope adds ~150 bytes, so small sizes carry a short string.
fn payload_for(size: usize) -> serde_json::Value {
    let overhead = EventEnvelope::new("bench.event", serde_json::json!({ "d": "" }))
        .encode()
        .unwrap()
        .value
        .len();
    let pad = size.saturating_sub(overhead);
    serde_json::json!({ "d": "x".repeat(pad) })
}

/// keel's event, borrowing the payload (as the raw variant does).
fn event(payload: &serde_json::Value, i: usize) -> EventEnvelope<&serde_json::Value> {
    EventEnvelope::new("bench.event", payload).with_key(format!("k{}", i % 64))
}

/// Drives `n` publishes with at most `window` outstanding: `start(i)` must
/// enqueue at once and return the acknowledgement future.
async fn drive<F, Fut>(n: usize, window: usize, mut start: F) -> Duration
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = ()>,
{
    let began = Instant::now();
    let mut outstanding = VecDeque::with_capacity(window);
    for i in 0..n {
        if outstanding.len() >= window {
            outstanding.pop_front().unwrap().await;
        }
        outstanding.push_back(start(i));
    }
    for f in outstanding {
        f.await;
    }
    began.elapsed()
}

/// What a raw-rdkafka user writes to send the same message as keel: the same
/// JSON body (serde, own struct), key and three headers, enqueued with
/// `send_result`. No keel code.
fn raw_send(
    raw: &FutureProducer,
    topic: &str,
    payload: &serde_json::Value,
    i: usize,
) -> rdkafka::producer::DeliveryFuture {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a> {
        event_id: uuid::Uuid,
        event_type: &'a str,
        version: &'a str,
        #[serde(with = "time::serde::rfc3339")]
        timestamp: time::OffsetDateTime,
        payload: &'a serde_json::Value,
    }
    let now = time::OffsetDateTime::now_utc();
    let body = Body {
        event_id: uuid::Uuid::new_v4(),
        event_type: "bench.event",
        version: "1.0",
        timestamp: now,
        payload,
    };
    let value = serde_json::to_vec(&body).unwrap();
    let id = body.event_id.to_string();
    let headers = OwnedHeaders::new_with_capacity(3)
        .insert(Header {
            key: "keel-event-id",
            value: Some(&id),
        })
        .insert(Header {
            key: "keel-event-type",
            value: Some("bench.event"),
        })
        .insert(Header {
            key: "keel-event-version",
            value: Some("1.0"),
        });
    let key = format!("k{}", i % 64);
    let record = FutureRecord::to(topic)
        .payload(&value)
        .key(&key)
        .headers(headers)
        .timestamp((now.unix_timestamp_nanos() / 1_000_000) as i64);
    raw.send_result(record)
        .map_err(|(e, _)| e)
        .expect("enqueue")
}

/// msg/s of `n` single-event publishes through `svc`.
async fn single_events<S>(
    mut svc: S,
    topic: &'static str,
    payload: &serde_json::Value,
    n: usize,
    window: usize,
) -> f64
where
    for<'a> S: Service<PublishRequest<&'a serde_json::Value>>,
    for<'a> <S as Service<PublishRequest<&'a serde_json::Value>>>::Error: std::fmt::Debug,
{
    let d = drive(n, window, |i| {
        let fut = svc.call(PublishRequest::new(topic, event(payload, i)));
        async move {
            fut.await.expect("ack");
        }
    })
    .await;
    n as f64 / d.as_secs_f64()
}

/// CPU time this process has used so far, in nanoseconds: the sum of every
/// thread's run time in `/proc/self/task/*/schedstat` (librdkafka's threads
/// included). `None` where that file does not exist.
///
/// Unlike wall-clock throughput, CPU time per message hardly depends on what
/// else the shared machine runs, so it shows a layer's cost more steadily.
fn process_cpu_ns() -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path().join("schedstat");
        // A thread may have exited since the directory was read.
        if let Ok(text) = std::fs::read_to_string(path) {
            total += text.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

/// CPU time of the calling thread (the one running the publishing loop and
/// every keel layer; librdkafka works on its own threads), in nanoseconds.
fn caller_thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// `KEEL_BENCH_ONLY` (comma-separated tags: raw, keel_bare, keel_stack,
/// keel_stack_batch) limits the run to those variants, e.g. for a profiler.
fn wanted(v: usize) -> bool {
    match std::env::var("KEEL_BENCH_ONLY") {
        Ok(only) => only.split(',').any(|t| t.trim() == TAGS[v]),
        Err(_) => true,
    }
}

const TAGS: [&str; 5] = [
    "raw",
    "keel_bare",
    "keel_stack",
    "keel_stack_batch",
    "keel_stack_otel",
];

/// How many variants this build runs (the OpenTelemetry one with `otel` only).
const VARIANTS: usize = if cfg!(feature = "otel") { 5 } else { 4 };

/// A subscriber that makes OpenTelemetry spans of INFO and above (keel's
/// `send` spans; not the stack's DEBUG `publish` span), all sampled, exported
/// nowhere: the cost of the spans and of the `traceparent` header alone.
#[cfg(feature = "otel")]
fn otel_subscriber() -> impl tracing::Subscriber + Send + Sync {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::INFO)
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("keel-bench")))
}

struct Variant {
    name: &'static str,
    rates: Vec<f64>,
    /// CPU microseconds per message, per round.
    cpu_us: Vec<f64>,
    /// CPU microseconds per message of the publishing thread alone, per round.
    caller_us: Vec<f64>,
}

/// One machine-readable line: `<label> <tag> <size> <median><unit> rounds: ...`
/// (`scripts/bench-kafka-publish` reads the RESULT lines).
fn print_rounds(label: &str, tag: &str, size: usize, values: &[f64], decimals: usize, unit: &str) {
    let rounds: Vec<String> = values.iter().map(|v| format!("{v:.decimals$}")).collect();
    println!(
        "{label} {tag} {size} {:.decimals$}{unit} rounds: {}",
        median(values),
        rounds.join(" ")
    );
}

fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

impl Variant {
    fn new(name: &'static str) -> Self {
        Variant {
            name,
            rates: vec![],
            cpu_us: vec![],
            caller_us: vec![],
        }
    }

    fn median(&self) -> f64 {
        median(&self.rates)
    }
}

async fn run_size(
    client: &KafkaClient,
    raw: &FutureProducer,
    topic: &'static str,
    size: usize,
    n: usize,
    window: usize,
    rounds: usize,
) {
    let payload = payload_for(size);
    let value_len = event(&payload, 0).encode().unwrap().value.len();

    let stack = PublishStack::new(client);
    let single_stack = stack.event_service();
    let batch_stack = stack.batch_service();

    let mut variants = vec![
        Variant::new("raw rdkafka FutureProducer::send_result"),
        Variant::new("keel PublishEvent (bare service)"),
        Variant::new("keel PublishEvent through the default stack"),
        Variant::new("keel PublishBatch x1000 through the default stack"),
        Variant::new("keel PublishEvent through the default stack, OpenTelemetry layer on"),
    ];
    variants.truncate(VARIANTS);
    // Warm-up rounds first (not counted): the broker's JVM compiles its hot
    // paths during the first seconds, which otherwise favours later variants.
    let warmup = env_usize("KEEL_BENCH_WARMUP", 1);
    for round in 0..warmup + rounds {
        // Rotate the order every round so no variant always runs first or last.
        for k in 0..VARIANTS {
            let v = (k + round) % VARIANTS;
            if !wanted(v) {
                continue;
            }
            let cpu_before = process_cpu_ns();
            let caller_before = caller_thread_cpu_ns();
            let rate = match v {
                0 => {
                    let d = drive(n, window, |i| {
                        let fut = raw_send(raw, topic, &payload, i);
                        async move {
                            fut.await.expect("delivery").expect("ack");
                        }
                    })
                    .await;
                    n as f64 / d.as_secs_f64()
                }
                1 => single_events(client.publisher(), topic, &payload, n, window).await,
                2 => single_events(single_stack.clone(), topic, &payload, n, window).await,
                #[cfg(feature = "otel")]
                4 => {
                    // On this thread only (the runtime has one), for this variant only.
                    let _otel = tracing::subscriber::set_default(otel_subscriber());
                    use tracing::Instrument;
                    single_events(single_stack.clone(), topic, &payload, n, window)
                        .instrument(tracing::info_span!("bench_round"))
                        .await
                }
                _ => {
                    let mut svc = batch_stack.clone();
                    let batches = n / 1000;
                    let d = drive(batches, (window / 1000).max(1), |b| {
                        let events = (0..1000).map(|i| event(&payload, b * 1000 + i)).collect();
                        let fut = svc.call(PublishBatchRequest::new(topic, events));
                        async move {
                            fut.await.expect("batch ack");
                        }
                    })
                    .await;
                    (batches * 1000) as f64 / d.as_secs_f64()
                }
            };
            if round < warmup {
                continue;
            }
            variants[v].rates.push(rate);
            if let (Some(before), Some(after)) = (cpu_before, process_cpu_ns()) {
                variants[v]
                    .cpu_us
                    .push(after.saturating_sub(before) as f64 / 1e3 / n as f64);
            }
            if let (Some(before), Some(after)) = (caller_before, caller_thread_cpu_ns()) {
                variants[v]
                    .caller_us
                    .push(after.saturating_sub(before) as f64 / 1e3 / n as f64);
            }
        }
    }
    let raw_median = variants[0].median();
    for (tag, v) in TAGS.iter().zip(&variants) {
        print_rounds("RESULT", tag, size, &v.rates, 0, "");
        print_rounds("CPU", tag, size, &v.cpu_us, 2, " us/msg");
        print_rounds("CALLER_CPU", tag, size, &v.caller_us, 2, " us/msg");
    }
    println!(
        "\n## {size} B events (JSON value {value_len} B + key + 3 headers), {n} messages x {rounds} rounds, window {window}"
    );
    println!(
        "| variant | median msg/s | MB/s (value) | ratio of medians | median of per-round ratios | CPU µs/msg (median) | CPU ratio (median per round) | publishing thread CPU µs/msg (median) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for v in &variants {
        let m = v.median();
        // Each round runs every variant back to back: the ratio within a round
        // is less exposed to slow drift of a shared machine than the medians.
        let paired: Vec<f64> = v
            .rates
            .iter()
            .zip(&variants[0].rates)
            .map(|(a, b)| a / b)
            .collect();
        let cpu_paired: Vec<f64> = v
            .cpu_us
            .iter()
            .zip(&variants[0].cpu_us)
            .map(|(a, b)| a / b)
            .collect();
        println!(
            "| {} | {:.0} | {:.1} | {:.3} | {:.3} | {:.2} | {:.3} | {:.2} |",
            v.name,
            m,
            m * value_len as f64 / 1e6,
            m / raw_median,
            median(&paired),
            median(&v.cpu_us),
            median(&cpu_paired),
            median(&v.caller_us)
        );
    }
}

fn main() {
    let brokers = std::env::var("KEEL_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let (n, rounds) = load_run_size(200_000, 2_000);
    let window = env_usize("KEEL_BENCH_WINDOW", 10_000);
    let n = n.div_ceil(1000) * 1000;

    current_thread_runtime().block_on(async {
        let config = KafkaConfig::builder()
            .brokers(brokers.split(',').map(str::to_string))
            .client_id("keel-bench")
            .log_level(KafkaLogLevel::Warn)
            .build()
            .unwrap();
        let client = KafkaClient::connect(config.clone()).unwrap();
        // Raw rdkafka with exactly keel's producer config.
        let raw: FutureProducer = config.producer_client_config().create().unwrap();
        // Known up front, as a real topic name is (a `const`, or read once from
        // the config): a `&'static str`, which keel's requests share without a
        // copy (`Cow::Borrowed`), just as raw rdkafka borrows it.
        let topic: &'static str =
            format!("keel-bench-publish-{}", uuid::Uuid::new_v4()).leak();
        client
            .create_topic(topic, 1, 1, Duration::from_secs(30))
            .await
            .expect("create the bench topic (is the broker up? scripts/up)");
        println!("# Kafka publish throughput, broker {brokers}, topic {topic} (1 partition)");
        println!("librdkafka config (keel's and raw's): acks=all, enable.idempotence=true, librdkafka defaults otherwise");
        let sizes: Vec<usize> = std::env::var("KEEL_BENCH_SIZES")
            .ok()
            .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![100, 1024]);
        for size in sizes {
            run_size(&client, &raw, topic, size, n, window, rounds).await;
        }
        raw.flush(Duration::from_secs(10)).unwrap();
        // A run writes gigabytes: give the broker's disk back.
        let deleted = client
            .admin()
            .unwrap()
            .delete_topics(&[topic], &AdminOptions::new())
            .await;
        if let Err(e) = deleted {
            eprintln!("could not delete the bench topic {topic}: {e}");
        }
        client.disconnect(Duration::from_secs(10)).await.unwrap();
    });
}
