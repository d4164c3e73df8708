use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tower::{Layer, Service, ServiceExt};

use super::*;
use crate::classify::{Classification, ClassifiedError, classify_fn};

#[derive(Debug, PartialEq)]
struct TestError(&'static str);

impl fmt::Display for TestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for TestError {}

impl ClassifiedError for TestError {
    fn classification(&self) -> Classification {
        Classification::failure("test")
    }
}

/// What the test service does with a request.
#[derive(Clone, Copy, Debug)]
enum Req {
    Ok,
    Fail,
    /// An error the classifier ignores.
    Ignore,
    /// Succeeds after sleeping this long.
    Slow(Duration),
    /// Fails after sleeping this long.
    SlowFail(Duration),
}

type Fut = Pin<Box<dyn Future<Output = Result<&'static str, TestError>> + Send>>;

/// A service that counts its calls.
#[derive(Clone)]
struct Counting {
    calls: Arc<AtomicUsize>,
}

impl Service<Req> for Counting {
    type Response = &'static str;
    type Error = TestError;
    type Future = Fut;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), TestError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Fut {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            match req {
                Req::Ok => Ok("ok"),
                Req::Fail => Err(TestError("fail")),
                Req::Ignore => Err(TestError("ignore")),
                Req::Slow(d) => {
                    tokio::time::sleep(d).await;
                    Ok("slow")
                }
                Req::SlowFail(d) => {
                    tokio::time::sleep(d).await;
                    Err(TestError("slow fail"))
                }
            }
        })
    }
}

fn counting() -> (Counting, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    (
        Counting {
            calls: calls.clone(),
        },
        calls,
    )
}

/// Failures, except `TestError("ignore")`, which is ignored.
fn classifier() -> impl Classify<&'static str, TestError> + Clone {
    classify_fn(|r: Result<&&'static str, &TestError>| match r {
        Ok(_) => Classification::SUCCESS,
        Err(TestError("ignore")) => Classification::IGNORED,
        Err(_) => Classification::failure("test"),
    })
}

fn builder() -> CircuitBreakerBuilder<impl Classify<&'static str, TestError> + Clone> {
    CircuitBreakerLayer::builder().classifier(classifier())
}

async fn send<S>(svc: &mut S, req: Req) -> Result<&'static str, CircuitBreakerError<TestError>>
where
    S: Service<Req, Response = &'static str, Error = CircuitBreakerError<TestError>>,
{
    svc.ready().await?.call(req).await
}

fn is_open(r: &Result<&'static str, CircuitBreakerError<TestError>>) -> bool {
    matches!(r, Err(CircuitBreakerError::Open { .. }))
}

#[tokio::test(start_paused = true)]
async fn opens_after_exactly_n_consecutive_failures_and_stops_calling_inner() {
    let (inner, calls) = counting();
    let layer = builder().build(); // default: 5 consecutive failures
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    for _ in 0..4 {
        assert_eq!(
            send(&mut svc, Req::Fail).await.unwrap_err().into_inner(),
            Some(TestError("fail"))
        );
    }
    assert_eq!(handle.state(), CircuitState::Closed);
    assert!(send(&mut svc, Req::Fail).await.is_err());
    assert_eq!(handle.state(), CircuitState::Open);
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    for _ in 0..10 {
        assert!(is_open(&send(&mut svc, Req::Ok).await));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5, "inner called while open");
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_consecutive_count() {
    let (inner, _) = counting();
    let layer = builder().consecutive_failures(3).build();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    for req in [Req::Fail, Req::Fail, Req::Ok, Req::Fail, Req::Fail] {
        let _ = send(&mut svc, req).await;
    }
    assert_eq!(handle.state(), CircuitState::Closed);
    assert_eq!(handle.stats().consecutive_failures, 2);
    let _ = send(&mut svc, Req::Fail).await;
    assert_eq!(handle.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn ignored_outcomes_count_for_neither_side() {
    let (inner, _) = counting();
    let layer = builder().consecutive_failures(2).count_window(10).build();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    let _ = send(&mut svc, Req::Fail).await;
    for _ in 0..5 {
        let _ = send(&mut svc, Req::Ignore).await;
    }
    let stats = handle.stats();
    assert_eq!(
        stats.consecutive_failures, 1,
        "ignored reset or added to the streak"
    );
    assert_eq!(stats.window_calls, 1, "ignored outcomes entered the window");
    let _ = send(&mut svc, Req::Fail).await;
    assert_eq!(handle.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn rate_trips_only_once_minimum_calls_are_seen() {
    let (inner, _) = counting();
    let layer = builder()
        .consecutive_failures(0)
        .count_window(10)
        .minimum_calls(4)
        .failure_rate(0.5)
        .build();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    for _ in 0..3 {
        let _ = send(&mut svc, Req::Fail).await;
    }
    assert_eq!(
        handle.state(),
        CircuitState::Closed,
        "tripped below minimum calls"
    );
    // The fourth call reaches the minimum: 3 of 4 failed.
    let _ = send(&mut svc, Req::Ok).await;
    assert_eq!(handle.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn count_window_really_slides() {
    let (inner, _) = counting();
    let changes = Arc::new(Mutex::new(Vec::new()));
    let seen = changes.clone();
    let layer = builder()
        .consecutive_failures(0)
        .count_window(4)
        .minimum_calls(4)
        .failure_rate(0.75)
        .on_state_change(move |c| seen.lock().unwrap().push(c.reason))
        .build();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    for req in [Req::Fail, Req::Ok, Req::Ok, Req::Ok, Req::Ok] {
        let _ = send(&mut svc, req).await;
    }
    // The first failure has slid out.
    assert_eq!(handle.stats().window_failures, 0);
    assert_eq!(handle.stats().window_calls, 4);
    for req in [Req::Ok, Req::Fail, Req::Fail] {
        let _ = send(&mut svc, req).await;
    }
    assert_eq!(handle.state(), CircuitState::Closed); // ok ok fail fail: 50 %
    // Ninth call: ok fail fail fail = 75 %. A tumbling window of 4 would hold one
    // call here and a cumulative count 4 of 9: neither would trip.
    let _ = send(&mut svc, Req::Fail).await;
    assert_eq!(handle.state(), CircuitState::Open);
    assert_eq!(
        *changes.lock().unwrap(),
        vec![TransitionReason::FailureRate {
            rate: 0.75,
            calls: 4
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn time_window_drops_old_outcomes() {
    let (inner, _) = counting();
    let layer = builder()
        .consecutive_failures(0)
        .time_window(Duration::from_secs(10), 10)
        .minimum_calls(2)
        .failure_rate(0.5)
        .build();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    let _ = send(&mut svc, Req::Fail).await; // 1 call: below the minimum
    tokio::time::advance(Duration::from_secs(11)).await;
    let _ = send(&mut svc, Req::Ok).await;
    let _ = send(&mut svc, Req::Ok).await;
    let _ = send(&mut svc, Req::Fail).await; // 1 of 3 in the window; 2 of 4 if the old one stayed
    assert_eq!(handle.state(), CircuitState::Closed);
    assert_eq!(handle.stats().window_calls, 3);
    let _ = send(&mut svc, Req::Fail).await; // 2 of 4
    assert_eq!(handle.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_the_breaker() {
    let (inner, _) = counting();
    let layer = builder()
        .consecutive_failures(0)
        .count_window(4)
        .minimum_calls(2)
        .slow_calls(Duration::from_secs(1), 0.5)
        .build();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    assert_eq!(
        send(&mut svc, Req::Slow(Duration::from_millis(999)))
            .await
            .unwrap(),
        "slow"
    );
    assert_eq!(send(&mut svc, Req::Ok).await.unwrap(), "ok");
    assert_eq!(handle.state(), CircuitState::Closed);
    assert_eq!(handle.stats().window_slow_calls, 0);
    let _ = send(&mut svc, Req::Slow(Duration::from_secs(1))).await;
    let _ = send(&mut svc, Req::Slow(Duration::from_secs(2))).await;
    assert_eq!(handle.stats().window_slow_calls, 2);
    assert_eq!(handle.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn stays_open_for_the_wait_then_probes() {
    let (inner, calls) = counting();
    let layer = builder()
        .consecutive_failures(1)
        .open_wait(Duration::from_secs(60))
        .build();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    let _ = send(&mut svc, Req::Fail).await;
    assert_eq!(handle.state(), CircuitState::Open);
    tokio::time::advance(Duration::from_millis(59_999)).await;
    match send(&mut svc, Req::Ok).await {
        Err(CircuitBreakerError::Open { remaining_wait }) => {
            assert_eq!(remaining_wait, Duration::from_millis(1))
        }
        other => panic!("expected open, got {other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(send(&mut svc, Req::Ok).await.unwrap(), "ok");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(handle.state(), CircuitState::Closed);
}

async fn open_then_wait(
    svc: &mut impl Service<Req, Response = &'static str, Error = CircuitBreakerError<TestError>>,
    wait: Duration,
) {
    let _ = send(svc, Req::Fail).await;
    tokio::time::advance(wait).await;
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_k_concurrent_probes() {
    let (inner, calls) = counting();
    let layer = builder()
        .consecutive_failures(1)
        .open_wait(Duration::from_secs(5))
        .half_open_probes(3)
        .build();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    open_then_wait(&mut svc, Duration::from_secs(5)).await;
    let mut probes = Vec::new();
    for _ in 0..3 {
        svc.ready().await.unwrap();
        probes.push(svc.call(Req::Slow(Duration::from_secs(1))));
    }
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    for _ in 0..2 {
        match send(&mut svc, Req::Ok).await {
            Err(CircuitBreakerError::HalfOpenFull { permitted_probes }) => {
                assert_eq!(permitted_probes, 3)
            }
            other => panic!("expected half-open rejection, got {other:?}"),
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1 + 3);
    let last = probes.pop().unwrap();
    for probe in probes {
        probe.await.unwrap();
    }
    assert_eq!(
        handle.state(),
        CircuitState::HalfOpen,
        "closed before all probes succeeded"
    );
    last.await.unwrap();
    assert_eq!(handle.state(), CircuitState::Closed);
}

#[test]
fn half_open_admits_exactly_k_probes_across_threads() {
    let (inner, calls) = counting();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let layer = builder()
        .consecutive_failures(1)
        .open_wait(Duration::ZERO)
        .half_open_probes(3)
        .build();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    assert!(rt.block_on(send(&mut svc, Req::Fail)).is_err());
    assert_eq!(handle.state(), CircuitState::Open);
    let barrier = std::sync::Barrier::new(8);
    let admitted = AtomicUsize::new(0);
    let runtime = rt.handle().clone();
    // Every admitted probe is kept in flight (polled once, never completed) until
    // the end of the test.
    let in_flight: Vec<_> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let mut svc = svc.clone();
                let (barrier, admitted, runtime) = (&barrier, &admitted, &runtime);
                s.spawn(move || {
                    let _guard = runtime.enter();
                    barrier.wait();
                    let mut cx = Context::from_waker(Waker::noop());
                    let mut kept = Vec::new();
                    for _ in 0..50 {
                        let mut probe = svc.call(Req::Slow(Duration::from_secs(1)));
                        match Pin::new(&mut probe).poll(&mut cx) {
                            Poll::Ready(Err(CircuitBreakerError::HalfOpenFull { .. })) => {}
                            Poll::Ready(other) => panic!("unexpected {other:?}"),
                            Poll::Pending => {
                                admitted.fetch_add(1, Ordering::SeqCst);
                                kept.push(probe);
                            }
                        }
                    }
                    kept
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    assert_eq!(in_flight.len(), 3);
    assert_eq!(admitted.load(Ordering::SeqCst), 3);
    assert_eq!(calls.load(Ordering::SeqCst), 1 + 3);
    assert_eq!(handle.state(), CircuitState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn failed_probe_reopens_with_growing_capped_wait() {
    let (inner, calls) = counting();
    let layer = builder()
        .consecutive_failures(1)
        .open_wait(Duration::from_secs(10))
        .open_backoff(2.0, Duration::from_secs(25))
        .build();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    open_then_wait(&mut svc, Duration::from_secs(10)).await;
    let remaining = |r: Result<&'static str, CircuitBreakerError<TestError>>| match r {
        Err(CircuitBreakerError::Open { remaining_wait }) => remaining_wait,
        other => panic!("expected open, got {other:?}"),
    };
    // Probe fails: reopen for 20 s.
    assert!(
        send(&mut svc, Req::Fail)
            .await
            .unwrap_err()
            .inner()
            .is_some()
    );
    assert_eq!(handle.state(), CircuitState::Open);
    assert_eq!(
        remaining(send(&mut svc, Req::Ok).await),
        Duration::from_secs(20)
    );
    tokio::time::advance(Duration::from_secs(20)).await;
    // Probe fails again: 40 s capped at 25 s.
    let _ = send(&mut svc, Req::Fail).await;
    assert_eq!(
        remaining(send(&mut svc, Req::Ok).await),
        Duration::from_secs(25)
    );
    tokio::time::advance(Duration::from_secs(25)).await;
    // Probe succeeds: closed, and the backoff starts over.
    send(&mut svc, Req::Ok).await.unwrap();
    assert_eq!(handle.state(), CircuitState::Closed);
    let _ = send(&mut svc, Req::Fail).await;
    assert_eq!(
        remaining(send(&mut svc, Req::Ok).await),
        Duration::from_secs(10)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

#[tokio::test(start_paused = true)]
async fn dropped_or_ignored_probe_frees_its_slot() {
    let (inner, _) = counting();
    let layer = builder()
        .consecutive_failures(1)
        .open_wait(Duration::from_secs(1))
        .build();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    open_then_wait(&mut svc, Duration::from_secs(1)).await;
    svc.ready().await.unwrap();
    let probe = svc.call(Req::Ok);
    assert!(matches!(
        send(&mut svc, Req::Ok).await,
        Err(CircuitBreakerError::HalfOpenFull { .. })
    ));
    drop(probe);
    let _ = send(&mut svc, Req::Ignore).await; // admitted, then ignored
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    send(&mut svc, Req::Ok).await.unwrap();
    assert_eq!(handle.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn manual_states() {
    let (inner, calls) = counting();
    let layer = builder().consecutive_failures(2).build();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);

    handle.force_open();
    assert_eq!(handle.state(), CircuitState::ForcedOpen);
    assert!(matches!(
        send(&mut svc, Req::Ok).await,
        Err(CircuitBreakerError::ForcedOpen)
    ));
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert!(matches!(
        send(&mut svc, Req::Ok).await,
        Err(CircuitBreakerError::ForcedOpen)
    ));
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    handle.force_closed();
    for _ in 0..10 {
        let _ = send(&mut svc, Req::Fail).await;
    }
    assert_eq!(handle.state(), CircuitState::ForcedClosed);
    assert_eq!(
        handle.stats().consecutive_failures,
        0,
        "disabled breaker counted"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 10);

    handle.metrics_only();
    for _ in 0..10 {
        assert!(
            send(&mut svc, Req::Fail)
                .await
                .unwrap_err()
                .inner()
                .is_some()
        );
    }
    assert_eq!(handle.state(), CircuitState::MetricsOnly);
    assert_eq!(handle.stats().consecutive_failures, 10);
    assert_eq!(calls.load(Ordering::SeqCst), 20);

    handle.reset();
    assert_eq!(handle.state(), CircuitState::Closed);
    assert_eq!(handle.stats().consecutive_failures, 0);
    let _ = send(&mut svc, Req::Fail).await;
    assert_eq!(handle.state(), CircuitState::Closed);
    let _ = send(&mut svc, Req::Fail).await;
    assert_eq!(handle.state(), CircuitState::Open);
    handle.reset();
    send(&mut svc, Req::Ok).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn watch_and_hook_see_every_transition() {
    let (inner, _) = counting();
    let changes = Arc::new(Mutex::new(Vec::new()));
    let seen = changes.clone();
    let layer = builder()
        .consecutive_failures(1)
        .open_wait(Duration::from_secs(1))
        .on_state_change(move |c| seen.lock().unwrap().push((c.from, c.to, c.reason)))
        .build();
    let handle = layer.handle();
    let mut rx = handle.subscribe();
    let mut svc = layer.layer(inner);
    assert_eq!(*rx.borrow_and_update(), CircuitState::Closed);

    let _ = send(&mut svc, Req::Fail).await;
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), CircuitState::Open);

    tokio::time::advance(Duration::from_secs(1)).await;
    svc.ready().await.unwrap();
    let probe = svc.call(Req::Ok);
    assert_eq!(*rx.borrow_and_update(), CircuitState::HalfOpen);
    probe.await.unwrap();
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow_and_update(), CircuitState::Closed);

    use CircuitState::*;
    assert_eq!(
        *changes.lock().unwrap(),
        vec![
            (
                Closed,
                Open,
                TransitionReason::ConsecutiveFailures { count: 1 }
            ),
            (Open, HalfOpen, TransitionReason::WaitElapsed),
            (HalfOpen, Closed, TransitionReason::ProbesSucceeded),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn per_key_breakers_are_isolated_and_bounded() {
    let (inner, calls) = counting();
    let inner = tower::util::MapRequest::new(inner, |(_, req): (&'static str, Req)| req);
    let layer = builder()
        .consecutive_failures(2)
        .per_key(|(key, _): &(&'static str, Req)| *key, 2);
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    assert!(handle.is_empty());
    for _ in 0..2 {
        let _ = svc.ready().await.unwrap().call(("a", Req::Fail)).await;
    }
    assert_eq!(handle.get(&"a").unwrap().state(), CircuitState::Open);
    let r = svc.ready().await.unwrap().call(("a", Req::Ok)).await;
    assert!(matches!(r, Err(CircuitBreakerError::Open { .. })));
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call(("b", Req::Ok))
            .await
            .unwrap(),
        "ok"
    );
    assert_eq!(handle.get(&"b").unwrap().state(), CircuitState::Closed);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // A third key evicts the least recently used ("a").
    svc.ready()
        .await
        .unwrap()
        .call(("c", Req::Ok))
        .await
        .unwrap();
    assert_eq!(handle.len(), 2);
    assert!(handle.get(&"a").is_none());
    assert!(handle.get(&"b").is_some() && handle.get(&"c").is_some());
}

/// An inner service whose readiness the test sets.
#[derive(Clone)]
struct Gate {
    state: Arc<Mutex<Poll<Result<(), TestError>>>>,
}

impl Service<Req> for Gate {
    type Response = &'static str;
    type Error = TestError;
    type Future = std::future::Ready<Result<&'static str, TestError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), TestError>> {
        let mut state = self.state.lock().unwrap();
        match &*state {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(_)) => std::mem::replace(&mut *state, Poll::Pending),
        }
    }

    fn call(&mut self, _: Req) -> Self::Future {
        std::future::ready(Err(TestError("fail")))
    }
}

#[tokio::test(start_paused = true)]
async fn poll_ready_passes_inner_readiness_and_errors() {
    let state = Arc::new(Mutex::new(Poll::Pending));
    let layer = builder().consecutive_failures(1).build();
    let mut svc = layer.layer(Gate {
        state: state.clone(),
    });
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_pending());
    *state.lock().unwrap() = Poll::Ready(Err(TestError("broken")));
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Err(CircuitBreakerError::Inner(e))) => assert_eq!(e, TestError("broken")),
        other => panic!("expected the inner error, got {other:?}"),
    }
    *state.lock().unwrap() = Poll::Ready(Ok(()));
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    // Open breaker: readiness still follows the inner service; `call` rejects.
    let _ = svc.call(Req::Fail).await;
    assert_eq!(layer.handle().state(), CircuitState::Open);
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    *state.lock().unwrap() = Poll::Pending;
    assert!(svc.poll_ready(&mut cx).is_pending());
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_breaker() {
    let (inner, calls) = counting();
    let layer = builder().consecutive_failures(2).build();
    let mut a = layer.layer(inner.clone());
    let mut b = a.clone();
    let mut c = layer.clone().layer(inner);
    let _ = send(&mut a, Req::Fail).await;
    let _ = send(&mut b, Req::Fail).await;
    assert!(is_open(&send(&mut c, Req::Ok).await));
    assert!(is_open(&send(&mut a, Req::Ok).await));
    assert_eq!(c.handle().state(), CircuitState::Open);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn late_outcome_from_an_earlier_state_is_not_counted() {
    let (inner, _) = counting();
    let layer = builder().consecutive_failures(2).build();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    svc.ready().await.unwrap();
    let stale = svc.call(Req::SlowFail(Duration::from_secs(10)));
    handle.force_open();
    handle.reset();
    let _ = send(&mut svc, Req::Fail).await;
    assert_eq!(handle.stats().consecutive_failures, 1);
    // Admitted before the reset: its failure belongs to the old state.
    assert!(stale.await.is_err());
    assert_eq!(handle.stats().consecutive_failures, 1);
    assert_eq!(handle.state(), CircuitState::Closed);
}

#[test]
fn error_classification_display_and_into_inner() {
    let open: CircuitBreakerError<TestError> = CircuitBreakerError::Open {
        remaining_wait: Duration::from_secs(3),
    };
    let c = open.classification();
    assert!(c.is_failure() && !c.retryable);
    assert_eq!(c.class, "circuit_open");
    assert!(open.is_rejected());
    assert_eq!(
        open.to_string(),
        "circuit breaker is open; probing again in 3s"
    );
    assert!(open.into_inner().is_none());
    let inner = CircuitBreakerError::Inner(TestError("boom"));
    assert_eq!(inner.classification().class, "test");
    assert_eq!(inner.to_string(), "boom");
    assert_eq!(inner.into_inner(), Some(TestError("boom")));
    let forced: CircuitBreakerError<TestError> = CircuitBreakerError::ForcedOpen;
    assert_eq!(forced.classification().class, "circuit_open");
}

#[test]
fn open_wait_backoff_grows_and_saturates() {
    let config = breaker::Config {
        open_wait: Duration::from_secs(1),
        backoff: Some((10.0, Duration::from_secs(300))),
        ..breaker::Config::default()
    };
    assert_eq!(config.open_wait_after(0), Duration::from_secs(1));
    assert_eq!(config.open_wait_after(2), Duration::from_secs(100));
    assert_eq!(config.open_wait_after(3), Duration::from_secs(300));
    assert_eq!(config.open_wait_after(u32::MAX), Duration::from_secs(300));
}

#[tokio::test(start_paused = true)]
async fn late_outcome_of_a_dropped_breaker_does_not_reach_the_next_one() {
    // The response future records into the breaker's `'static` slot, which a
    // dropped breaker hands to the next one (usually the very next, when no other
    // test takes it first): the late failure must not count there.
    let (inner, _) = counting();
    let layer = builder().consecutive_failures(1).build();
    let mut svc = layer.layer(inner.clone());
    svc.ready().await.unwrap();
    let stale = svc.call(Req::SlowFail(Duration::from_secs(10)));
    drop((svc, layer));

    let next = builder().consecutive_failures(1).build();
    let handle = next.handle();
    assert!(matches!(
        stale.await,
        Err(CircuitBreakerError::Inner(TestError("slow fail")))
    ));
    assert_eq!(handle.state(), CircuitState::Closed);
    assert_eq!(handle.stats().consecutive_failures, 0);

    let mut svc = next.layer(inner);
    let _ = send(&mut svc, Req::Fail).await;
    assert_eq!(
        handle.state(),
        CircuitState::Open,
        "the next breaker still works"
    );
}

#[test]
fn a_released_slot_ignores_its_old_generation() {
    let breaker = breaker::Breaker::new(Arc::new(breaker::Config::default()), None);
    let slot = breaker.slot();
    let generation = slot::gen_of(slot.word.load(Ordering::Acquire));
    assert_eq!(slot.record_streak(generation, true, 5), None);
    assert_eq!(breaker.stats().consecutive_failures, 1);
    drop(breaker);
    // Whoever holds the slot now (nobody, or a breaker of another test) is in a
    // later generation: the old one's outcomes are not counted.
    assert_eq!(slot.record_streak(generation, true, 1), None);
}

/// A probe that never answers: past the maximum half-open wait the next call finds
/// the breaker open again, with the open wait counted from the moment the limit
/// passed, and the late probe's outcome is not counted.
#[tokio::test(start_paused = true)]
async fn half_open_with_unanswered_probe_reopens_after_the_maximum_wait() {
    let (inner, calls) = counting();
    let changes = Arc::new(Mutex::new(Vec::new()));
    let seen = changes.clone();
    let layer = builder()
        .consecutive_failures(1)
        .open_wait(Duration::from_secs(5))
        .max_half_open_wait(Duration::from_secs(10))
        .on_state_change(move |c| seen.lock().unwrap().push((c.from, c.to, c.reason)))
        .build();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    open_then_wait(&mut svc, Duration::from_secs(5)).await;

    svc.ready().await.unwrap();
    // Would answer after an hour; nobody polls it until the end.
    let hung = svc.call(Req::SlowFail(Duration::from_secs(3600)));
    assert_eq!(handle.state(), CircuitState::HalfOpen);

    tokio::time::advance(Duration::from_millis(9_999)).await;
    assert!(matches!(
        send(&mut svc, Req::Ok).await,
        Err(CircuitBreakerError::HalfOpenFull {
            permitted_probes: 1
        })
    ));
    assert_eq!(handle.state(), CircuitState::HalfOpen);

    // 10 s after turning half-open, plus 2 s: the open wait started 2 s ago.
    tokio::time::advance(Duration::from_millis(2_001)).await;
    match send(&mut svc, Req::Ok).await {
        Err(CircuitBreakerError::Open { remaining_wait }) => {
            assert_eq!(remaining_wait, Duration::from_secs(3))
        }
        other => panic!("expected open, got {other:?}"),
    }
    assert_eq!(handle.state(), CircuitState::Open);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the first failure and the probe"
    );

    // The hung probe's late failure belongs to the old half-open state.
    tokio::time::advance(Duration::from_secs(3)).await;
    let probe = svc.call(Req::Ok);
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    assert!(hung.await.is_err());
    assert_eq!(
        handle.state(),
        CircuitState::HalfOpen,
        "late outcome counted"
    );
    probe.await.unwrap();
    assert_eq!(handle.state(), CircuitState::Closed);

    use CircuitState::*;
    assert_eq!(
        changes.lock().unwrap()[1..],
        [
            (Open, HalfOpen, TransitionReason::WaitElapsed),
            (HalfOpen, Open, TransitionReason::HalfOpenWaitElapsed),
            (Open, HalfOpen, TransitionReason::WaitElapsed),
            (HalfOpen, Closed, TransitionReason::ProbesSucceeded),
        ]
    );
}

/// A call long after the half-open limit and the open wait that followed it goes
/// straight through as a new probe (the open wait has passed meanwhile), and the
/// reopening counts for the open-wait backoff.
#[tokio::test(start_paused = true)]
async fn half_open_limit_reopens_with_backoff_and_a_late_call_probes_again() {
    let (inner, calls) = counting();
    let layer = builder()
        .consecutive_failures(1)
        .open_wait(Duration::from_secs(4))
        .open_backoff(2.0, Duration::from_secs(60))
        .max_half_open_wait(Duration::from_secs(1))
        .build();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    open_then_wait(&mut svc, Duration::from_secs(4)).await;
    svc.ready().await.unwrap();
    let _hung = svc.call(Req::Slow(Duration::from_secs(3600)));

    // Half-open limit at 1 s, then an open wait of 4 × 2 = 8 s: due at 9 s.
    tokio::time::advance(Duration::from_millis(8_999)).await;
    match send(&mut svc, Req::Ok).await {
        Err(CircuitBreakerError::Open { remaining_wait }) => {
            assert_eq!(remaining_wait, Duration::from_millis(1))
        }
        other => panic!("expected open with the doubled wait, got {other:?}"),
    }
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(send(&mut svc, Req::Ok).await.unwrap(), "ok");
    assert_eq!(handle.state(), CircuitState::Closed);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// Without the option (the default) an unanswered probe keeps the breaker half-open.
#[tokio::test(start_paused = true)]
async fn without_a_maximum_half_open_wait_the_breaker_stays_half_open() {
    let (inner, _) = counting();
    let layer = builder()
        .consecutive_failures(1)
        .open_wait(Duration::from_secs(1))
        .build();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    open_then_wait(&mut svc, Duration::from_secs(1)).await;
    svc.ready().await.unwrap();
    let _hung = svc.call(Req::Slow(Duration::from_secs(3600)));
    tokio::time::advance(Duration::from_secs(24 * 3600)).await;
    assert!(matches!(
        send(&mut svc, Req::Ok).await,
        Err(CircuitBreakerError::HalfOpenFull { .. })
    ));
    assert_eq!(handle.state(), CircuitState::HalfOpen);
}
