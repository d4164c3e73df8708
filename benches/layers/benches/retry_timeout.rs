//! Per-call overhead of keel's Retry and Timeout on a no-op service, one thread,
//! beside tower's own `Timeout` and `Retry` (with a policy that never retries).
//!
//! Run: `cargo bench -p keel-benches --bench retry_timeout`
//!
//! Unlike the `layers` bench, every call here goes through a current-thread tokio
//! runtime (`ready().await`, `call().await`), and a second service answers on its
//! second poll so that the timeouts arm their timers. This package builds tokio
//! without `test-util`, whose paused-clock support makes every clock read take a
//! mutex (tower's `Timeout` measured ~150-190 ns per call with it, ~45 ns without).

use criterion::{Criterion, criterion_group, criterion_main};
use keel_benches::{NeverRetry, Noop};
use keel_layers::retry::{Retry, RetryPolicy};
use keel_layers::timeout::Timeout;
use std::convert::Infallible;
use std::hint::black_box;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::{Service, ServiceExt};

/// Answers on the second poll (the first returns `Pending` after waking itself),
/// so a timeout has to arm its timer.
#[derive(Clone, Copy, Debug)]
struct YieldOnce;

#[derive(Debug)]
struct YieldOnceFuture(Option<u64>, bool);

impl std::future::Future for YieldOnceFuture {
    type Output = Result<u64, Infallible>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.1 {
            self.1 = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(self.0.take().unwrap_or_default()))
    }
}

impl Service<u64> for YieldOnce {
    type Response = u64;
    type Error = Infallible;
    type Future = YieldOnceFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: u64) -> Self::Future {
        YieldOnceFuture(Some(req), false)
    }
}

fn bench_service<S>(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    make: impl Fn() -> S,
) where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut svc = make();
                let start = Instant::now();
                for i in 0..iters {
                    let ready = svc.ready().await.unwrap();
                    black_box(ready.call(black_box(i)).await.unwrap());
                }
                start.elapsed()
            })
        })
    });
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let timeout = Duration::from_secs(30);

    bench_service(c, &rt, "noop (baseline)", || Noop);

    bench_service(c, &rt, "timeout/tower", || {
        tower::timeout::Timeout::new(Noop, timeout)
    });
    bench_service(c, &rt, "timeout/keel", || Timeout::new(Noop, timeout));
    bench_service(c, &rt, "timeout/keel covering readiness", || {
        Timeout::new(Noop, timeout).covering_readiness(true)
    });

    bench_service(c, &rt, "pending-once (baseline)", || YieldOnce);
    bench_service(c, &rt, "timeout/tower pending-once", || {
        tower::timeout::Timeout::new(YieldOnce, timeout)
    });
    bench_service(c, &rt, "timeout/keel pending-once", || {
        Timeout::new(YieldOnce, timeout)
    });
    bench_service(c, &rt, "timeout/keel shared timer pending-once", || {
        Timeout::new(YieldOnce, timeout).shared_timer(true)
    });

    bench_service(c, &rt, "retry/tower never-retry policy", || {
        tower::retry::Retry::new(NeverRetry, Noop)
    });
    bench_service(c, &rt, "retry/keel max_attempts 1", || {
        Retry::new(Noop, RetryPolicy::new().max_attempts(1).without_budget())
    });
    bench_service(c, &rt, "retry/keel 3 attempts, no budget", || {
        Retry::new(Noop, RetryPolicy::new().without_budget())
    });
    bench_service(c, &rt, "retry/keel 3 attempts + budget (default)", || {
        Retry::new(Noop, RetryPolicy::new())
    });
    bench_service(c, &rt, "retry/keel s3 preset + deadline", || {
        Retry::new(Noop, RetryPolicy::s3().deadline(Duration::from_secs(60)))
    });

    bench_service(c, &rt, "retry+timeout/tower", || {
        tower::retry::Retry::new(NeverRetry, tower::timeout::Timeout::new(Noop, timeout))
    });
    bench_service(c, &rt, "retry+timeout/keel", || {
        Retry::new(Timeout::new(Noop, timeout), RetryPolicy::new())
    });
}

criterion_group! {
    name = retry_timeout;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(retry_timeout);
