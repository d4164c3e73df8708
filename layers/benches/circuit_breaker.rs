//! Per-call overhead of a closed circuit breaker around a no-op service: keel's
//! `CircuitBreakerLayer` beside no layer, tower-resilience's circuit breaker layer,
//! failsafe (sync `call`) and recloser (sync `call`), on one thread and with two
//! threads hammering one shared breaker.
//!
//! Run: `cargo bench -p keel-layers --bench circuit_breaker`

use std::convert::Infallible;
use std::future::{Future, Ready};
use std::hint::black_box;
use std::pin::pin;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use failsafe::CircuitBreaker as _;
use keel_layers::circuit_breaker::CircuitBreakerLayer;
use tower::{Layer, Service, service_fn};

type Noop = tower::util::ServiceFn<fn(u64) -> Ready<Result<u64, Infallible>>>;

fn noop() -> Noop {
    service_fn(|x: u64| std::future::ready(Ok(x)))
}

/// One call through a Tower service whose readiness and response are immediate:
/// poll_ready, call, poll the future once.
#[inline]
fn call_once<S: Service<u64>>(svc: &mut S, x: u64) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    if !matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))) {
        return false;
    }
    let fut = pin!(svc.call(x));
    matches!(fut.poll(&mut cx), Poll::Ready(Ok(_)))
}

fn keel_default() -> impl Service<u64, Response = u64> + Clone + Send + 'static {
    CircuitBreakerLayer::new().layer(noop())
}

fn keel_count_window() -> impl Service<u64, Response = u64> + Clone + Send + 'static {
    CircuitBreakerLayer::builder()
        .count_window(100)
        .failure_rate(0.5)
        .build()
        .layer(noop())
}

fn tower_resilience() -> impl Service<u64, Response = u64> + Clone + Send + 'static {
    tower_resilience_circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .build()
        .expect("valid tower-resilience config")
        .layer(noop())
}

/// Runs `per_thread` on two threads at once, `iters` calls each; returns the wall
/// time, so the figure is the per-call time while two threads share the breaker.
fn two_threads<F>(iters: u64, per_thread: &F) -> Duration
where
    F: Fn(u64) + Sync,
{
    let barrier = Barrier::new(3);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                barrier.wait();
                per_thread(iters);
            });
        }
        barrier.wait();
        let start = Instant::now();
        // The scope joins both threads before returning.
        start
    })
    .elapsed()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();

    let mut g = c.benchmark_group("circuit_breaker/1_thread");
    {
        let mut svc = noop();
        g.bench_function("no_layer", |b| b.iter(|| call_once(&mut svc, black_box(1))));
        let mut svc = keel_default();
        g.bench_function("keel_consecutive", |b| {
            b.iter(|| call_once(&mut svc, black_box(1)))
        });
        let mut svc = keel_count_window();
        g.bench_function("keel_count_window_100", |b| {
            b.iter(|| call_once(&mut svc, black_box(1)))
        });
        let mut svc = tower_resilience();
        g.bench_function("tower_resilience", |b| {
            b.iter(|| call_once(&mut svc, black_box(1)))
        });
        let cb = failsafe::Config::new().build();
        g.bench_function("failsafe_sync", |b| {
            b.iter(|| cb.call(|| Ok::<u64, ()>(black_box(1))).is_ok())
        });
        let cb = recloser::Recloser::default();
        g.bench_function("recloser_sync", |b| {
            b.iter(|| cb.call(|| Ok::<u64, ()>(black_box(1))).is_ok())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("circuit_breaker/2_threads");
    fn tower_two<S>(svc: S) -> impl Fn(u64) + Sync
    where
        S: Service<u64> + Clone + Send + Sync + 'static,
    {
        move |iters| {
            let mut svc = svc.clone();
            for _ in 0..iters {
                black_box(call_once(&mut svc, black_box(1)));
            }
        }
    }
    {
        let per_thread = tower_two(noop());
        g.bench_function("no_layer", |b| {
            b.iter_custom(|n| two_threads(n, &per_thread))
        });
        let per_thread = tower_two(keel_default());
        g.bench_function("keel_consecutive", |b| {
            b.iter_custom(|n| two_threads(n, &per_thread))
        });
        let per_thread = tower_two(keel_count_window());
        g.bench_function("keel_count_window_100", |b| {
            b.iter_custom(|n| two_threads(n, &per_thread))
        });
        let handle = rt.handle().clone();
        let svc = tower_resilience();
        let per_thread = move |iters: u64| {
            let _guard = handle.enter();
            let mut svc = svc.clone();
            for _ in 0..iters {
                black_box(call_once(&mut svc, black_box(1)));
            }
        };
        g.bench_function("tower_resilience", |b| {
            b.iter_custom(|n| two_threads(n, &per_thread))
        });
        let cb = failsafe::Config::new().build();
        let per_thread = |iters: u64| {
            for _ in 0..iters {
                black_box(cb.call(|| Ok::<u64, ()>(black_box(1))).is_ok());
            }
        };
        g.bench_function("failsafe_sync", |b| {
            b.iter_custom(|n| two_threads(n, &per_thread))
        });
        let cb = Arc::new(recloser::Recloser::default());
        let per_thread = |iters: u64| {
            for _ in 0..iters {
                black_box(cb.call(|| Ok::<u64, ()>(black_box(1))).is_ok());
            }
        };
        g.bench_function("recloser_sync", |b| {
            b.iter_custom(|n| two_threads(n, &per_thread))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
