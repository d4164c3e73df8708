//! Per-call overhead of the metrics, batch-size and logging layers around a no-op
//! service, on one thread.
//!
//! Run: `cargo bench -p keel-benches --bench observability`
//!
//! Each iteration polls the service ready, calls it and polls the response future
//! once (the no-op completes immediately) with a no-op waker: no runtime, so the
//! figures are the layers' own cost.

use criterion::{Criterion, criterion_group, criterion_main};
use keel_benches::{Batch, Noop, call_once};
use keel_layers::batch::BatchSizeLayer;
use keel_layers::logging::LoggingLayer;
use keel_layers::metrics::MetricsLayer;
use std::hint::black_box;
use tower::{Layer, Service, ServiceBuilder};

fn bench_one<S: Service<Batch>>(c: &mut Criterion, name: &str, mut svc: S) {
    c.bench_function(name, |b| {
        b.iter(|| assert!(call_once(&mut svc, black_box([1; 8]))))
    });
}

fn calibration(c: &mut Criterion) {
    c.bench_function("calibration/std_instant_pair", |b| {
        b.iter(|| black_box(std::time::Instant::now()).elapsed())
    });
    c.bench_function("calibration/tokio_instant_pair", |b| {
        b.iter(|| black_box(tokio::time::Instant::now()).elapsed())
    });
    let clock = quanta::Clock::new();
    c.bench_function("calibration/quanta_clock_pair", |b| {
        b.iter(|| {
            let start = black_box(clock.now());
            clock.now().duration_since(start)
        })
    });
    let mut histogram = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 2)
        .expect("valid bounds");
    let mut value = 1_000u64;
    c.bench_function("calibration/hdrhistogram_record", |b| {
        b.iter(|| {
            value = value.wrapping_mul(6364136223846793005).wrapping_add(1) % 1_000_000_000;
            histogram.saturating_record(black_box(value));
        })
    });
}

fn layers(c: &mut Criterion) {
    bench_one(c, "baseline/noop", Noop);
    bench_one(c, "metrics", MetricsLayer::new().layer(Noop));
    bench_one(c, "batch_size", BatchSizeLayer::new().layer(Noop));
    bench_one(
        c,
        "logging/no_subscriber",
        LoggingLayer::new("Bench", "noop").layer(Noop),
    );
    bench_one(
        c,
        "all_three/no_subscriber",
        ServiceBuilder::new()
            .layer(LoggingLayer::new("Bench", "noop"))
            .layer(MetricsLayer::new())
            .layer(BatchSizeLayer::new())
            .service(Noop),
    );

    // A subscriber that lets WARN and ERROR through: the success events (INFO) and
    // the span (INFO) are filtered out, but failures (ERROR) could be logged, so the
    // layer still opens its (disabled) span and reads the clock.
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::sink)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        bench_one(
            c,
            "logging/subscriber_filters_events",
            LoggingLayer::new("Bench", "noop").layer(Noop),
        );
        bench_one(
            c,
            "all_three/subscriber_filters_events",
            ServiceBuilder::new()
                .layer(LoggingLayer::new("Bench", "noop"))
                .layer(MetricsLayer::new())
                .layer(BatchSizeLayer::new())
                .service(Noop),
        );
    });

    // Same subscriber but the events are logged (into a sink), for scale.
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::sink)
        .event_format(keel_layers::logging::JsonLogFormat::new())
        .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        bench_one(
            c,
            "logging/json_to_sink",
            LoggingLayer::new("Bench", "noop").layer(Noop),
        );
    });
}

criterion_group!(benches, calibration, layers);
criterion_main!(benches);
