//! Shared pieces of keel's benchmarks: a no-op service, one call driven without a
//! runtime, tower's never-retry policy, and a two-thread timing harness.
//!
//! The benchmarks live in `benches/` of this package; run them with
//! `cargo bench -p keel-benches`.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::pin;
use std::sync::Barrier;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tower::Service;

/// The request of the layer benches: eight bytes, `Copy`, and a batch
/// (`BatchLen`) of eight items.
pub type Batch = [u8; 8];

/// A service that is always ready and answers at once with its request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Noop;

impl<R> Service<R> for Noop {
    type Response = R;
    type Error = Infallible;
    type Future = Ready<Result<R, Infallible>>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: R) -> Self::Future {
        ready(Ok(req))
    }
}

/// One call through a service whose readiness and response are immediate:
/// `poll_ready`, `call`, one poll of the response future, all with a no-op waker
/// and no runtime in the way. Returns `true` when the call succeeded.
///
/// A service that is not ready, or a future that is pending (a peer breaker
/// waiting for a lock another thread holds), is polled again, spinning, until it
/// completes: every call counted is a call completed.
#[inline]
pub fn call_once<S: Service<R>, R>(svc: &mut S, req: R) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        match svc.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => break,
            Poll::Ready(Err(_)) => return false,
            Poll::Pending => std::hint::spin_loop(),
        }
    }
    let mut fut = pin!(svc.call(req));
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(result) => return result.is_ok(),
            Poll::Pending => std::hint::spin_loop(),
        }
    }
}

/// tower's retry policy that never retries (and so never clones the request).
#[derive(Clone, Copy, Debug, Default)]
pub struct NeverRetry;

impl<Req, Res, E> tower::retry::Policy<Req, Res, E> for NeverRetry {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut Req, _: &mut Result<Res, E>) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, _: &Req) -> Option<Req> {
        None
    }
}

/// Runs `per_thread(iters)` on two threads at once and returns the wall time from
/// their common start to the end of the slower one: with criterion's
/// `iter_custom`, the figure is the time per call while two threads call at once
/// (so a perfectly parallel layer shows the one-thread figure).
pub fn two_threads<F>(iters: u64, per_thread: &F) -> Duration
where
    F: Fn(u64) + Sync,
{
    let barrier = Barrier::new(3);
    let start = std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                barrier.wait();
                per_thread(iters);
            });
        }
        barrier.wait();
        // The scope joins both threads before returning.
        Instant::now()
    });
    start.elapsed()
}

/// Calls and rounds of a scripted load run: `KEEL_BENCH_MESSAGES` (default
/// `default_calls`) and `KEEL_BENCH_ROUNDS` (default 5) under `cargo bench`
/// (which passes `--bench`); under `cargo test --benches`, a smoke run of
/// `smoke_calls` calls and one round.
pub fn load_run_size(default_calls: usize, smoke_calls: usize) -> (usize, usize) {
    if std::env::args().any(|a| a == "--bench") {
        (
            env_usize("KEEL_BENCH_MESSAGES", default_calls),
            env_usize("KEEL_BENCH_ROUNDS", 5),
        )
    } else {
        (smoke_calls, 1)
    }
}

/// The variable `name` as a number, or `default` when unset or not a number.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The runtime of the scripted load runs: one thread (the caller's), timers on.
pub fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread tokio runtime")
}
