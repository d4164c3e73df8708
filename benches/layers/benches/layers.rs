//! Per-call overhead of keel's six layers on a no-op service, in one run: each
//! layer alone, the six together, tower's own `Timeout` and `Retry` (a policy that
//! never retries), and three other Rust circuit breakers (tower-resilience's
//! layer, failsafe and recloser) — on one thread, then with two threads calling
//! clones of one service (sharing its breaker, metrics and retry budget) at once.
//!
//! Run: `cargo bench -p keel-benches --bench layers`
//!
//! Every Tower case is one `poll_ready`, one `call` and one poll of the response
//! future with a no-op waker (see `keel_benches::call_once`): no runtime
//! scheduling in the figure. A tokio runtime is entered because tower's `Timeout`
//! and tower-resilience create timers. failsafe and recloser have no Tower layer;
//! they are timed through their synchronous `call`, which is less work than a
//! Tower layer does. No tracing subscriber is installed, so the logging layer
//! takes its "nothing would be logged" path (see its docs).

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};
use failsafe::CircuitBreaker as _;
use keel_benches::{Batch, NeverRetry, Noop, call_once, two_threads};
use keel_layers::ServiceBuilderExt;
use keel_layers::batch::BatchSizeLayer;
use keel_layers::circuit_breaker::CircuitBreakerLayer;
use keel_layers::logging::LoggingLayer;
use keel_layers::metrics::MetricsLayer;
use keel_layers::retry::{RetryLayer, RetryPolicy};
use keel_layers::timeout::TimeoutLayer;
use tokio::runtime::Handle;
use tower::{Layer, Service, ServiceBuilder};

const REQUEST: Batch = [1; 8];
const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one case: a Tower service, or a closure around a synchronous breaker call.
trait Runner {
    fn tower<S>(&mut self, name: &str, svc: S)
    where
        S: Service<Batch> + Clone + Send;

    fn sync<F>(&mut self, name: &str, call: F)
    where
        F: Fn() -> bool + Sync;
}

/// Every case, in the order of the report.
fn cases<R: Runner>(r: &mut R) {
    r.tower("baseline/noop", Noop);

    r.tower(
        "keel/circuit_breaker",
        CircuitBreakerLayer::new().layer(Noop),
    );
    r.tower(
        "keel/circuit_breaker_count_window_100",
        CircuitBreakerLayer::builder()
            .count_window(100)
            .failure_rate(0.5)
            .build()
            .layer(Noop),
    );
    r.tower(
        "keel/retry",
        RetryLayer::new(RetryPolicy::new()).layer(Noop),
    );
    r.tower(
        "keel/retry_max_attempts_1",
        RetryLayer::new(RetryPolicy::new().max_attempts(1)).layer(Noop),
    );
    r.tower("keel/timeout", TimeoutLayer::new(TIMEOUT).layer(Noop));
    r.tower("keel/metrics", MetricsLayer::new().layer(Noop));
    // With the optional HdrHistogram window: a lock of the thread's own recorder.
    r.tower(
        "keel/metrics_percentiles",
        MetricsLayer::builder()
            .percentiles(true)
            .build()
            .layer(Noop),
    );
    r.tower("keel/batch_size", BatchSizeLayer::new().layer(Noop));
    r.tower(
        "keel/logging",
        LoggingLayer::new("Bench", "call").layer(Noop),
    );
    r.tower(
        "keel/all_six",
        ServiceBuilder::new()
            .logging(LoggingLayer::new("Bench", "call"))
            .metrics(MetricsLayer::new())
            .batch_size(1_000)
            .circuit_breaker(CircuitBreakerLayer::new())
            .keel_retry(RetryPolicy::new())
            .keel_timeout(TIMEOUT)
            .service(Noop),
    );
    r.tower(
        "keel/retry_timeout",
        ServiceBuilder::new()
            .keel_retry(RetryPolicy::new())
            .keel_timeout(TIMEOUT)
            .service(Noop),
    );

    r.tower("tower/timeout", tower::timeout::Timeout::new(Noop, TIMEOUT));
    r.tower(
        "tower/retry_never",
        tower::retry::Retry::new(NeverRetry, Noop),
    );
    r.tower(
        "tower/retry_timeout",
        tower::retry::Retry::new(NeverRetry, tower::timeout::Timeout::new(Noop, TIMEOUT)),
    );

    r.tower(
        "peer/tower_resilience_circuit_breaker",
        tower_resilience_circuitbreaker::CircuitBreakerLayer::builder()
            .failure_rate_threshold(0.5)
            .sliding_window_size(100)
            .build()
            .expect("valid tower-resilience config")
            .layer(Noop),
    );
    let failsafe = failsafe::Config::new().build();
    r.sync("peer/failsafe_sync", move || {
        failsafe.call(|| Ok::<_, ()>(black_box(1))).is_ok()
    });
    let recloser = recloser::Recloser::default();
    r.sync("peer/recloser_sync", move || {
        recloser.call(|| Ok::<_, ()>(black_box(1))).is_ok()
    });

    // The machine's speed in this run: ANCHORS.md calibrates one `Instant::now()` +
    // `elapsed()` pair at about 50 ns on a quiet 2-core machine.
    r.sync("calibration/std_instant_pair", || {
        black_box(Instant::now()).elapsed() < Duration::MAX
    });
    // What a layer pays to hand its response future a shared `Arc` (one atomic
    // increment, one decrement); on two threads both hit the same counter.
    let shared = Arc::new(0_u64);
    r.sync("calibration/arc_clone_drop", move || {
        Arc::strong_count(&black_box(shared.clone())) > 1
    });
}

struct OneThread<'a, 'c> {
    group: &'a mut BenchmarkGroup<'c, WallTime>,
}

impl Runner for OneThread<'_, '_> {
    fn tower<S>(&mut self, name: &str, mut svc: S)
    where
        S: Service<Batch> + Clone + Send,
    {
        self.group.bench_function(name, |b| {
            b.iter(|| assert!(call_once(&mut svc, black_box(REQUEST))))
        });
    }

    fn sync<F>(&mut self, name: &str, call: F)
    where
        F: Fn() -> bool + Sync,
    {
        self.group
            .bench_function(name, |b| b.iter(|| assert!(call())));
    }
}

struct TwoThreads<'a, 'c> {
    group: &'a mut BenchmarkGroup<'c, WallTime>,
    runtime: Handle,
}

impl Runner for TwoThreads<'_, '_> {
    fn tower<S>(&mut self, name: &str, svc: S)
    where
        S: Service<Batch> + Clone + Send,
    {
        // Each thread calls its own clone; the clones share what the layer shares.
        let svc = Mutex::new(svc);
        let runtime = &self.runtime;
        let per_thread = |iters: u64| {
            let _guard = runtime.enter();
            let mut svc = svc.lock().expect("bench service").clone();
            for _ in 0..iters {
                assert!(call_once(&mut svc, black_box(REQUEST)));
            }
        };
        self.group
            .bench_function(name, |b| b.iter_custom(|n| two_threads(n, &per_thread)));
    }

    fn sync<F>(&mut self, name: &str, call: F)
    where
        F: Fn() -> bool + Sync,
    {
        let per_thread = |iters: u64| {
            for _ in 0..iters {
                assert!(call());
            }
        };
        self.group
            .bench_function(name, |b| b.iter_custom(|n| two_threads(n, &per_thread)));
    }
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = runtime.enter();

    let mut group = c.benchmark_group("1_thread");
    cases(&mut OneThread { group: &mut group });
    group.finish();

    let mut group = c.benchmark_group("2_threads");
    cases(&mut TwoThreads {
        group: &mut group,
        runtime: runtime.handle().clone(),
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
