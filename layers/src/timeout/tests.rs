//! Timeout tests, on tokio's paused clock.

use super::*;
use crate::classify::{ByError, ClassifiedError};
use crate::retry::{Jitter, Retry, RetryPolicy};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Waker;
use tower::ServiceExt;

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
}

/// A service that is not ready until `ready_at`, then answers after `latency`
/// (`None`: never). Counts calls.
#[derive(Clone)]
struct Slow {
    ready_at: Option<Instant>,
    latency: Option<Duration>,
    calls: Arc<AtomicUsize>,
    fail_ready: bool,
}

impl Slow {
    fn new(latency: Option<Duration>) -> Self {
        Slow {
            ready_at: None,
            latency,
            calls: Arc::new(AtomicUsize::new(0)),
            fail_ready: false,
        }
    }

    fn not_ready_for(mut self, d: Duration) -> Self {
        self.ready_at = Some(Instant::now() + d);
        self
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<u32> for Slow {
    type Response = u32;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<u32>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.fail_ready {
            return Poll::Ready(Err(io::Error::other("broken")));
        }
        match self.ready_at {
            Some(at) if Instant::now() < at => {
                // Wake the caller when readiness arrives.
                let waker = cx.waker().clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    waker.wake();
                });
                Poll::Pending
            }
            _ => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: u32) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let latency = self.latency;
        Box::pin(async move {
            match latency {
                Some(Duration::ZERO) => {}
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending::<()>().await,
            }
            if req == u32::MAX {
                Err(io::Error::new(io::ErrorKind::InvalidInput, "bad request"))
            } else {
                Ok(req)
            }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn fires_exactly_at_the_deadline_not_before() {
    let mut svc = Timeout::new(Slow::new(None), SEC);
    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    assert!(poll_once(&mut fut).is_pending());
    tokio::time::advance(SEC - MS).await;
    assert!(poll_once(&mut fut).is_pending(), "not before the deadline");
    tokio::time::advance(MS).await;
    match poll_once(&mut fut) {
        Poll::Ready(Err(TimeoutError::Elapsed { after })) => assert_eq!(after, SEC),
        other => panic!("expected Elapsed, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn response_in_time_passes_through() {
    let svc = Timeout::new(Slow::new(Some(SEC - MS)), SEC);
    assert_eq!(svc.clone().oneshot(7).await.unwrap(), 7);
    let immediate = Timeout::new(Slow::new(Some(Duration::ZERO)), SEC);
    assert_eq!(immediate.clone().oneshot(8).await.unwrap(), 8);
    // Errors pass through unchanged, typed.
    let err = immediate.oneshot(u32::MAX).await.unwrap_err();
    let inner = err.into_inner().expect("inner error");
    assert_eq!(inner.kind(), io::ErrorKind::InvalidInput);
}

#[tokio::test(start_paused = true)]
async fn clock_starts_at_the_first_pending_poll() {
    let mut svc = Timeout::new(Slow::new(Some(3 * SEC)), 2 * SEC);
    let fut = Box::pin(svc.ready().await.unwrap().call(1));
    // Not polled for 10 s: that time is not charged to the call.
    tokio::time::advance(10 * SEC).await;
    let start = Instant::now();
    let result = fut.await;
    assert!(result.unwrap_err().is_elapsed());
    assert_eq!(Instant::now() - start, 2 * SEC);
}

#[tokio::test(start_paused = true)]
async fn readiness_not_covered_by_default() {
    let svc = Timeout::new(Slow::new(Some(SEC)).not_ready_for(10 * SEC), 2 * SEC);
    let start = Instant::now();
    assert_eq!(svc.oneshot(3).await.unwrap(), 3);
    assert_eq!(Instant::now() - start, 11 * SEC);
}

#[tokio::test(start_paused = true)]
async fn covered_readiness_leaves_the_call_the_rest() {
    // Ready after 3 s of a 5 s deadline; the call needs 2.5 s: times out at 5 s.
    let inner = Slow::new(Some(2500 * MS)).not_ready_for(3 * SEC);
    let mut svc = Timeout::new(inner.clone(), 5 * SEC).covering_readiness(true);
    let start = Instant::now();
    svc.ready().await.unwrap();
    assert_eq!(Instant::now() - start, 3 * SEC);
    let err = svc.call(1).await.unwrap_err();
    assert!(matches!(err, TimeoutError::Elapsed { after } if after == 5 * SEC));
    assert_eq!(Instant::now() - start, 5 * SEC);
    assert_eq!(inner.calls(), 1);

    // The next call, on a ready service, gets the full timeout again.
    let start = Instant::now();
    assert_eq!(svc.ready().await.unwrap().call(2).await.unwrap(), 2);
    assert_eq!(Instant::now() - start, 2500 * MS);
}

#[tokio::test(start_paused = true)]
async fn readiness_past_the_deadline_fails_the_call_not_the_service() {
    let inner = Slow::new(Some(Duration::ZERO)).not_ready_for(10 * SEC);
    let mut svc = Timeout::new(inner.clone(), 2 * SEC).covering_readiness(true);
    let start = Instant::now();
    // poll_ready does not error: it reports ready at the deadline...
    svc.ready().await.unwrap();
    assert_eq!(Instant::now() - start, 2 * SEC);
    // ...and the call fails at once without reaching the inner service.
    let err = svc.call(1).await.unwrap_err();
    assert!(err.is_elapsed());
    assert_eq!(inner.calls(), 0);
    assert_eq!(Instant::now() - start, 2 * SEC);

    // The service is still usable: a new wait starts a new clock.
    svc.ready().await.unwrap();
    assert_eq!(Instant::now() - start, 4 * SEC);
    assert!(svc.call(2).await.unwrap_err().is_elapsed());
    tokio::time::advance(6 * SEC).await;
    assert_eq!(svc.ready().await.unwrap().call(3).await.unwrap(), 3);
    assert_eq!(inner.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn ready_errors_pass_through_as_inner() {
    let mut inner = Slow::new(Some(Duration::ZERO));
    inner.fail_ready = true;
    for cover in [false, true] {
        let svc = Timeout::new(inner.clone(), SEC).covering_readiness(cover);
        let err = svc.oneshot(1).await.unwrap_err();
        assert_eq!(err.to_string(), "broken");
        assert!(!err.is_elapsed());
    }
}

#[test]
fn elapsed_is_a_retryable_timeout() {
    let elapsed = TimeoutError::<io::Error>::Elapsed { after: SEC };
    let c = elapsed.classification();
    assert!(c.should_retry());
    assert_eq!(c.class, "timeout");
    assert_eq!(elapsed.to_string(), "request timed out after 1s");
    let inner = TimeoutError::Inner(io::Error::new(io::ErrorKind::InvalidInput, "bad"));
    assert!(!inner.classification().should_retry());
    assert_eq!(inner.classification().class, "io");
}

#[tokio::test(start_paused = true)]
async fn timed_out_attempts_are_retried_inside_retry() {
    // First attempt hangs, the second answers.
    #[derive(Clone)]
    struct HangOnce(Arc<AtomicUsize>);
    impl Service<u32> for HangOnce {
        type Response = u32;
        type Error = io::Error;
        type Future = Pin<Box<dyn Future<Output = io::Result<u32>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: u32) -> Self::Future {
            let first = self.0.fetch_add(1, Ordering::SeqCst) == 0;
            Box::pin(async move {
                if first {
                    std::future::pending::<()>().await;
                }
                Ok(req)
            })
        }
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let policy = RetryPolicy::new()
        .jitter(Jitter::None)
        .base(100 * MS)
        .without_budget();
    let svc = Retry::with_classifier(Timeout::new(HangOnce(calls.clone()), SEC), policy, ByError);
    let start = Instant::now();
    assert_eq!(svc.oneshot(5).await.unwrap(), 5);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(Instant::now() - start, SEC + 100 * MS);
}

#[tokio::test(start_paused = true)]
async fn timeout_outside_retry_bounds_the_whole_call() {
    use crate::retry::RetryLayer;
    use tower::ServiceBuilder;
    // Every attempt fails after 1 s; retries every 1 s would go on for 10 attempts.
    let failing = tower::service_fn(|_: u32| async {
        tokio::time::sleep(SEC).await;
        Err::<u32, _>(io::Error::other("down"))
    });
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(5 * SEC))
        .layer(RetryLayer::new(
            RetryPolicy::new()
                .jitter(Jitter::None)
                .base(SEC)
                .multiplier(1.0)
                .max_attempts(10)
                .without_budget(),
        ))
        .service(failing);
    let start = Instant::now();
    let err = svc.oneshot(1).await.unwrap_err();
    assert!(err.is_elapsed());
    assert_eq!(Instant::now() - start, 5 * SEC);
}

// --- shared timer (`shared_timer(true)`) ---

fn shared(inner: Slow, timeout: Duration) -> Timeout<Slow> {
    Timeout::new(inner, timeout).shared_timer(true)
}

/// How late a shared timer may fire: one tick (`timeout / 32`, at least 1 ms).
fn tick(timeout: Duration) -> Duration {
    (timeout / 32).max(MS)
}

/// Lets the driver task run (it is woken by the clock, then needs a turn).
async fn let_driver_run() {
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn shared_timer_fires_not_before_the_timeout_and_within_a_tick() {
    let mut svc = shared(Slow::new(None), SEC);
    assert!(svc.is_shared_timer());
    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    assert!(poll_once(&mut fut).is_pending());
    let_driver_run().await;
    tokio::time::advance(SEC - MS).await;
    let_driver_run().await;
    assert!(poll_once(&mut fut).is_pending(), "not before the timeout");
    // The epoch closed when the driver first ran, right after the call entered.
    tokio::time::advance(MS + tick(SEC)).await;
    let_driver_run().await;
    match poll_once(&mut fut) {
        Poll::Ready(Err(TimeoutError::Elapsed { after })) => assert_eq!(after, SEC),
        other => panic!("expected Elapsed, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn shared_timer_wakes_the_waiting_task() {
    // Awaited (not polled by hand): the timer must wake the task itself.
    let svc = shared(Slow::new(None), 2 * SEC);
    let start = Instant::now();
    let err = svc.oneshot(1).await.unwrap_err();
    assert!(err.is_elapsed());
    let took = Instant::now() - start;
    assert!(
        took >= 2 * SEC && took <= 2 * SEC + tick(2 * SEC),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn shared_timer_entering_late_in_an_epoch_still_gets_the_whole_timeout() {
    // Calls entering while the driver sleeps join the open epoch, which closes
    // at the driver's next tick: they never time out early.
    let svc = shared(Slow::new(None), SEC);
    let first = tokio::spawn(svc.clone().oneshot(1));
    let_driver_run().await;
    tokio::time::advance(tick(SEC) / 2).await;
    let entered = Instant::now();
    let second = tokio::spawn(svc.clone().oneshot(2));
    assert!(first.await.unwrap().unwrap_err().is_elapsed());
    assert!(second.await.unwrap().unwrap_err().is_elapsed());
    let took = Instant::now() - entered;
    assert!(took >= SEC && took <= SEC + tick(SEC), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn shared_timer_times_out_only_the_slow_calls_among_many() {
    let fast = shared(Slow::new(Some(SEC)), 3 * SEC);
    let slow = {
        // Same shared timer as `fast`: a clone with a slower inner service.
        let mut s = fast.clone();
        s.get_mut().latency = Some(10 * SEC);
        s
    };
    let start = Instant::now();
    let mut calls = Vec::new();
    for i in 0..100u32 {
        let svc = if i % 10 == 3 {
            slow.clone()
        } else {
            fast.clone()
        };
        calls.push(tokio::spawn(svc.oneshot(i)));
        tokio::time::advance(10 * MS).await;
    }
    let mut elapsed = 0;
    for (i, call) in calls.into_iter().enumerate() {
        match call.await.unwrap() {
            Ok(v) => assert_eq!(v as usize, i),
            Err(e) => {
                assert!(e.is_elapsed());
                assert_eq!(i % 10, 3, "only the slow calls time out");
                elapsed += 1;
            }
        }
    }
    assert_eq!(elapsed, 10);
    // The last slow call started at ~0.93 s and timed out 3 s later.
    assert!(Instant::now() - start < 4 * SEC + 100 * MS);
}

#[tokio::test(start_paused = true)]
async fn shared_timer_follows_a_new_waker() {
    let mut svc = shared(Slow::new(None), SEC);
    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    assert!(poll_once(&mut fut).is_pending());
    // Polled again from another task: that task must be the one woken.
    let handle = tokio::spawn(fut);
    let result = handle.await.unwrap();
    assert!(result.unwrap_err().is_elapsed());
}

#[tokio::test(start_paused = true)]
async fn shared_timer_memory_stays_bounded_and_the_driver_stops_when_idle() {
    let svc = shared(Slow::new(Some(MS)), 30 * SEC);
    // 10,000 calls that each wait 1 ms: none is near its deadline.
    for i in 0..10_000u32 {
        assert_eq!(svc.clone().oneshot(i).await.unwrap(), i);
    }
    let queue = svc.queue.as_ref().unwrap();
    let (slots, queued, live, _) = queue.stats();
    assert_eq!(live, 0);
    assert!(slots <= 1, "slots are reused, got {slots}");
    assert!(
        queued <= 65,
        "finished calls leave the queue, {queued} queued"
    );
    // Within a tick of the last call, nothing waits: the driver stops.
    tokio::time::advance(tick(30 * SEC)).await;
    let_driver_run().await;
    let (_, queued, _, running) = queue.stats();
    assert_eq!(queued, 0);
    assert!(!running, "no task left behind by an idle service");
    // And a new call starts it again.
    let mut never = svc.clone();
    never.get_mut().latency = None;
    assert!(never.oneshot(1).await.unwrap_err().is_elapsed());
}

#[test]
fn shared_timer_survives_its_runtime() {
    let svc = shared(Slow::new(None), SEC);
    for _ in 0..2 {
        // Each runtime drops the driver task when it shuts down; the next
        // runtime's first call must start a new one.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let err = rt.block_on(svc.clone().oneshot(1)).unwrap_err();
        assert!(err.is_elapsed());
        let pending = rt.block_on(async {
            let mut s = svc.clone();
            let mut fut = Box::pin(s.ready().await.unwrap().call(2));
            assert!(poll_once(&mut fut).is_pending());
            // Kept (not awaited) past the runtime's end.
            Some(fut)
        });
        drop(rt);
        drop(pending);
    }
    let (_, _, live, running) = svc.queue.as_ref().unwrap().stats();
    assert_eq!(live, 0);
    assert!(!running);
}
