//! What keel's Prometheus exposition costs, and why keel records calls itself and
//! uses `prometheus-client` only to encode (see `keel::prometheus`).
//!
//! Run: `cargo bench -p keel-benches --bench prometheus`
//!
//! - `record/*`: one recorded call on one thread and on two threads at once.
//!   keel's metrics layer around a no-op service (two clock readings, the
//!   thread's own recorder) beside `prometheus-client`'s own `Histogram::observe`
//!   with the same 18 buckets, fed one clock-pair reading per call (what a layer
//!   built on it would do; its histogram takes a lock per observation).
//! - `scrape/*`: one `/metrics` rendering (snapshots + OpenMetrics encoding) of
//!   a gateway-sized registry: 20 layer series of 4 families, each recorded into.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use keel::prometheus::Exposition;
use keel_benches::{Batch, Noop, call_once, two_threads};
use keel_layers::metrics::{DEFAULT_BUCKETS, MetricsLayer, MetricsRegistry};
use prometheus_client::metrics::histogram::Histogram;
use tower::Layer;

const REQUEST: Batch = [1; 8];

fn record(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    let bounds: Vec<f64> = DEFAULT_BUCKETS.iter().map(Duration::as_secs_f64).collect();
    let clock = quanta::Clock::new();

    let keel = MetricsLayer::new().layer(Noop);
    let mut one = keel.clone();
    group.bench_function("1_thread/keel_metrics_layer", |b| {
        b.iter(|| assert!(call_once(&mut one, black_box(REQUEST))))
    });
    let histogram = Histogram::new(bounds.iter().copied());
    group.bench_function("1_thread/prometheus_client_histogram", |b| {
        b.iter(|| {
            let start = clock.now();
            histogram.observe(clock.now().duration_since(start).as_secs_f64());
        })
    });

    let per_thread = |iters: u64| {
        let mut svc = keel.clone();
        for _ in 0..iters {
            assert!(call_once(&mut svc, black_box(REQUEST)));
        }
    };
    group.bench_function("2_threads/keel_metrics_layer", |b| {
        b.iter_custom(|n| two_threads(n, &per_thread))
    });
    let shared = Histogram::new(bounds.iter().copied());
    let per_thread = |iters: u64| {
        for _ in 0..iters {
            let start = clock.now();
            shared.observe(clock.now().duration_since(start).as_secs_f64());
        }
    };
    group.bench_function("2_threads/prometheus_client_histogram", |b| {
        b.iter_custom(|n| two_threads(n, &per_thread))
    });
    group.finish();
}

fn scrape(c: &mut Criterion) {
    let registry = MetricsRegistry::new();
    let mut services = Vec::new();
    for (family, n) in [
        ("messaging.process.duration", 4),
        ("messaging.client.operation.duration", 2),
        ("http.server.request.duration", 12),
        ("rpc.client.call.duration", 2),
    ] {
        for i in 0..n {
            let layer = MetricsLayer::new();
            registry
                .register_with_labels(family, [("series", format!("s{i}"))], layer.handle())
                .expect("unique labels");
            services.push(layer.layer(Noop));
        }
    }
    for svc in &mut services {
        for _ in 0..100 {
            call_once(svc, REQUEST);
        }
    }
    let mut bytes = 0;
    c.bench_function("scrape/20_series_openmetrics", |b| {
        b.iter(|| {
            let text = Exposition::new().layers(&registry).render();
            bytes = text.len();
            black_box(text)
        })
    });
    println!("scrape text: {bytes} bytes");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = record, scrape
}
criterion_main!(benches);
