//! Retry tests, on tokio's paused clock.

use super::*;
use crate::classify::{ByError, Classification, ClassifiedError};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower::{Service, ServiceExt};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

/// A failure with a chosen classification.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fail {
    id: u32,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl Fail {
    fn transient(id: u32) -> Self {
        Fail {
            id,
            retryable: true,
            retry_after: None,
        }
    }
}

impl ClassifiedError for Fail {
    fn classification(&self) -> Classification {
        let c = Classification::failure("test").with_retryable(self.retryable);
        match self.retry_after {
            Some(d) => c.with_retry_after(d),
            None => c,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Ready,
    Call,
}

/// What every clone of a [`Scripted`] service shares.
#[derive(Default)]
struct Script {
    /// Outcomes handed out in order; once empty, every call succeeds with `Ok(0)`.
    outcomes: VecDeque<Result<u32, Fail>>,
    /// `(event, virtual time)` in order.
    log: Vec<(Event, Instant)>,
    /// The service is not ready before this instant.
    not_ready_until: Option<Instant>,
    /// After the first call, the service is not ready for this long.
    unready_after_call: Option<Duration>,
    /// Every poll_ready after the first call fails with this error.
    ready_error_after_call: Option<Fail>,
    /// How long each call takes to answer.
    latency: Duration,
}

/// A service that plays a script and records readiness polls and calls.
struct Scripted {
    script: Arc<Mutex<Script>>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Clone for Scripted {
    fn clone(&self) -> Self {
        Scripted {
            script: self.script.clone(),
            sleep: None,
        }
    }
}

impl Scripted {
    fn new(outcomes: impl IntoIterator<Item = Result<u32, Fail>>) -> Self {
        Scripted {
            script: Arc::new(Mutex::new(Script {
                outcomes: outcomes.into_iter().collect(),
                ..Script::default()
            })),
            sleep: None,
        }
    }

    fn failing(n: u32) -> Self {
        Scripted::new((1..=n).map(|id| Err(Fail::transient(id))))
    }

    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script.lock().unwrap()
    }

    fn call_times(&self) -> Vec<Instant> {
        self.script()
            .log
            .iter()
            .filter(|(e, _)| *e == Event::Call)
            .map(|(_, t)| *t)
            .collect()
    }

    fn calls(&self) -> usize {
        self.call_times().len()
    }

    fn gaps(&self) -> Vec<Duration> {
        self.call_times().windows(2).map(|w| w[1] - w[0]).collect()
    }

    fn events(&self) -> Vec<Event> {
        self.script().log.iter().map(|(e, _)| *e).collect()
    }
}

impl<R> Service<R> for Scripted {
    type Response = u32;
    type Error = Fail;
    type Future = Pin<Box<dyn Future<Output = Result<u32, Fail>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Fail>> {
        let until = self.script().not_ready_until;
        if let Some(until) = until
            && Instant::now() < until
        {
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            ready!(sleep.as_mut().poll(cx));
        }
        let mut script = self.script();
        if let Some(e) = script.ready_error_after_call.clone()
            && script.log.iter().any(|(e, _)| *e == Event::Call)
        {
            return Poll::Ready(Err(e));
        }
        script.log.push((Event::Ready, Instant::now()));
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: R) -> Self::Future {
        let mut script = self.script();
        let now = Instant::now();
        script.log.push((Event::Call, now));
        if let Some(d) = script.unready_after_call.take() {
            script.not_ready_until = Some(now + d);
        }
        let outcome = script.outcomes.pop_front().unwrap_or(Ok(0));
        let latency = script.latency;
        Box::pin(async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            outcome
        })
    }
}

/// A request that counts its clones.
#[derive(Debug)]
struct Counted(Arc<AtomicUsize>);

impl Clone for Counted {
    fn clone(&self) -> Self {
        self.0.fetch_add(1, Ordering::SeqCst);
        Counted(self.0.clone())
    }
}

fn no_jitter() -> RetryPolicy {
    RetryPolicy::new().jitter(Jitter::None).without_budget()
}

async fn run<S, C>(svc: &mut Retry<S, C>) -> Result<u32, Fail>
where
    Retry<S, C>: Service<(), Response = u32, Error = Fail>,
{
    svc.ready().await?.call(()).await
}

#[tokio::test(start_paused = true)]
async fn exact_backoff_sequence_with_cap() {
    let inner = Scripted::failing(100);
    let policy = no_jitter()
        .base(100 * MS)
        .multiplier(2.0)
        .cap(500 * MS)
        .max_attempts(6);
    let mut svc = Retry::new(inner.clone(), policy);
    let result = run(&mut svc).await;
    assert_eq!(
        result,
        Err(Fail::transient(6)),
        "the last error passes through"
    );
    assert_eq!(
        inner.gaps(),
        [100 * MS, 200 * MS, 400 * MS, 500 * MS, 500 * MS]
    );
}

#[tokio::test(start_paused = true)]
async fn kafka_preset_schedule() {
    let inner = Scripted::failing(100);
    let mut svc = Retry::new(inner.clone(), RetryPolicy::kafka());
    assert!(run(&mut svc).await.is_err());
    assert_eq!(inner.gaps(), [SEC, 2 * SEC, 4 * SEC, 8 * SEC]);

    // More retries continue the schedule up to the 30 s cap.
    let inner = Scripted::failing(100);
    let mut svc = Retry::new(inner.clone(), RetryPolicy::kafka().max_retries(6));
    assert!(run(&mut svc).await.is_err());
    assert_eq!(
        inner.gaps(),
        [SEC, 2 * SEC, 4 * SEC, 8 * SEC, 16 * SEC, 30 * SEC]
    );
}

/// The consumer's preset cannot bring back the budget its docs warn against:
/// a spent budget would dead-letter healthy messages during an outage.
#[test]
fn kafka_preset_has_no_budget() {
    assert!(RetryPolicy::kafka().retry_budget().is_none());
    assert!(RetryPolicy::kafka().max_retries(9).retry_budget().is_none());
    assert!(RetryPolicy::s3().retry_budget().is_some());
}

#[tokio::test(start_paused = true)]
async fn s3_preset_schedule() {
    let inner = Scripted::failing(100);
    let mut svc = Retry::new(inner.clone(), RetryPolicy::s3());
    assert!(run(&mut svc).await.is_err());
    assert_eq!(inner.gaps(), [SEC, 2 * SEC, 4 * SEC]);
    assert_eq!(inner.calls(), 4);
    let secs: Vec<_> = RetryPolicy::s3().max_retries(5).schedule().collect();
    assert_eq!(secs, [SEC, 2 * SEC, 4 * SEC, 8 * SEC, 10 * SEC]);
}

#[tokio::test(start_paused = true)]
async fn full_jitter_waits_stay_within_bounds() {
    for seed in 0..64 {
        let inner = Scripted::failing(100);
        let policy = RetryPolicy::new()
            .without_budget()
            .base(100 * MS)
            .cap(1000 * MS)
            .jitter(Jitter::Full)
            .max_attempts(6)
            .jitter_seed(seed);
        let backoff = *policy.schedule_config();
        let mut svc = Retry::new(inner.clone(), policy);
        assert!(run(&mut svc).await.is_err());
        let gaps = inner.gaps();
        assert_eq!(gaps.len(), 5);
        for (i, gap) in gaps.iter().enumerate() {
            assert!(*gap <= backoff.delay(i as u32 + 1), "seed {seed}: {gaps:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn decorrelated_jitter_waits_stay_within_bounds_and_seed_repeats() {
    let mut first = None;
    for round in 0..2 {
        for seed in 0..64 {
            let inner = Scripted::failing(100);
            let policy = RetryPolicy::new()
                .without_budget()
                .base(100 * MS)
                .cap(2000 * MS)
                .jitter(Jitter::Decorrelated)
                .max_attempts(8)
                .jitter_seed(seed);
            let mut svc = Retry::new(inner.clone(), policy);
            assert!(run(&mut svc).await.is_err());
            let gaps = inner.gaps();
            let mut previous = 100 * MS;
            for gap in &gaps {
                assert!(*gap >= 100 * MS && *gap <= (previous * 3).min(2000 * MS));
                previous = *gap;
            }
            if seed == 7 {
                match (&first, round) {
                    (None, 0) => first = Some(gaps),
                    (Some(f), 1) => assert_eq!(f, &gaps, "a seed gives a repeatable sequence"),
                    _ => unreachable!(),
                }
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn max_attempts_honoured_and_success_stops() {
    for attempts in [1, 2, 5] {
        let inner = Scripted::failing(100);
        let mut svc = Retry::new(inner.clone(), no_jitter().base(MS).max_attempts(attempts));
        assert!(run(&mut svc).await.is_err());
        assert_eq!(inner.calls(), attempts as usize);
    }
    let inner = Scripted::failing(2);
    let mut svc = Retry::new(inner.clone(), no_jitter().base(MS).max_attempts(5));
    assert_eq!(run(&mut svc).await, Ok(0));
    assert_eq!(inner.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn non_retryable_is_not_retried() {
    let permanent = Fail {
        id: 9,
        retryable: false,
        retry_after: None,
    };
    let inner = Scripted::new([Err(permanent.clone())]);
    let mut svc = Retry::with_classifier(inner.clone(), no_jitter().max_attempts(5), ByError);
    assert_eq!(run(&mut svc).await, Err(permanent));
    assert_eq!(inner.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_raises_the_delay() {
    let slow_down = |id, d| Fail {
        id,
        retryable: true,
        retry_after: Some(d),
    };
    // A floor above the backoff wins, even above the cap; a floor below does nothing.
    let inner = Scripted::new([Err(slow_down(1, 3 * SEC)), Err(slow_down(2, 10 * MS))]);
    let policy = no_jitter()
        .base(100 * MS)
        .cap(SEC)
        .multiplier(2.0)
        .max_attempts(3);
    let mut svc = Retry::with_classifier(inner.clone(), policy, ByError);
    assert_eq!(run(&mut svc).await, Ok(0));
    assert_eq!(inner.gaps(), [3 * SEC, 200 * MS]);
}

#[tokio::test(start_paused = true)]
async fn budget_exhaustion_stops_retries_and_time_refills_it() {
    let budget = RetryBudget::builder()
        .ratio(0.0)
        .min_per_sec(1)
        .capacity(2)
        .build();
    let inner = Scripted::failing(1000);
    let policy = no_jitter().base(MS).max_attempts(10).budget(budget.clone());
    let mut svc = Retry::new(inner.clone(), policy);

    // Two tokens: one call and two retries, then the last error comes back.
    assert_eq!(run(&mut svc).await, Err(Fail::transient(3)));
    assert_eq!(inner.calls(), 3);
    // Empty: no retry at all.
    assert_eq!(run(&mut svc).await, Err(Fail::transient(4)));
    assert_eq!(inner.calls(), 4);
    // Clones share the bucket.
    let mut clone = svc.clone();
    assert!(run(&mut clone).await.is_err());
    assert_eq!(inner.calls(), 5);
    // One second later the floor has added one token: one retry again.
    tokio::time::advance(SEC).await;
    assert!(run(&mut svc).await.is_err());
    assert_eq!(inner.calls(), 7);
}

#[tokio::test(start_paused = true)]
async fn budget_earns_from_requests_and_successes() {
    let budget = RetryBudget::builder()
        .ratio(0.5)
        .min_per_sec(0)
        .capacity(10)
        .initial(0)
        .build();
    let inner = Scripted::new([]);
    let mut svc = Retry::new(inner.clone(), no_jitter().base(MS).budget(budget.clone()));
    assert_eq!(run(&mut svc).await, Ok(0));
    assert_eq!(run(&mut svc).await, Ok(0));
    assert_eq!(budget.balance(), 1.0);

    let on_success = deposit_on_success_budget();
    let inner = Scripted::new([Ok(1), Err(Fail::transient(1)), Err(Fail::transient(2))]);
    let policy = no_jitter()
        .base(MS)
        .max_attempts(3)
        .budget(on_success.clone());
    let mut svc = Retry::new(inner.clone(), policy);
    assert_eq!(run(&mut svc).await, Ok(1));
    assert_eq!(on_success.balance(), 1.0);
    // The failure spends the token; with the bucket empty, attempt 2 is the last.
    assert_eq!(run(&mut svc).await, Err(Fail::transient(2)));
    assert_eq!(inner.calls(), 3);
    assert_eq!(on_success.balance(), 0.0);
}

#[tokio::test(start_paused = true)]
async fn deadline_stops_retrying() {
    let inner = Scripted::failing(100);
    let policy = no_jitter()
        .base(SEC)
        .multiplier(2.0)
        .cap(60 * SEC)
        .max_attempts(10)
        .deadline(5 * SEC);
    let mut svc = Retry::new(inner.clone(), policy);
    let start = Instant::now();
    assert_eq!(run(&mut svc).await, Err(Fail::transient(3)));
    // Attempts at 0 s, 1 s and 3 s; a 4 s backoff would end at 7 s > 5 s.
    let offsets: Vec<_> = inner.call_times().iter().map(|t| *t - start).collect();
    assert_eq!(offsets, [Duration::ZERO, SEC, 3 * SEC]);
    assert_eq!(
        Instant::now() - start,
        3 * SEC,
        "no pointless wait at the end"
    );
}

#[tokio::test(start_paused = true)]
async fn deadline_counts_the_time_spent_in_attempts() {
    let inner = Scripted::failing(100);
    inner.script().latency = 2 * SEC;
    let policy = no_jitter()
        .base(SEC)
        .multiplier(2.0)
        .max_attempts(10)
        .deadline(5 * SEC);
    let mut svc = Retry::new(inner.clone(), policy);
    let start = Instant::now();
    assert_eq!(run(&mut svc).await, Err(Fail::transient(2)));
    // Attempt 1 runs 0-2 s, waits 1 s, attempt 2 runs 3-5 s; a 2 s backoff would
    // end at 7 s, past the 5 s deadline.
    let offsets: Vec<_> = inner.call_times().iter().map(|t| *t - start).collect();
    assert_eq!(offsets, [Duration::ZERO, 3 * SEC]);
    assert_eq!(Instant::now() - start, 5 * SEC);
}

#[tokio::test(start_paused = true)]
async fn deadline_bounds_the_wait_for_readiness() {
    let inner = Scripted::failing(100);
    inner.script().unready_after_call = Some(60 * SEC);
    let policy = no_jitter().base(SEC).max_attempts(10).deadline(5 * SEC);
    let mut svc = Retry::new(inner.clone(), policy);
    let start = Instant::now();
    assert_eq!(run(&mut svc).await, Err(Fail::transient(1)));
    assert_eq!(inner.calls(), 1);
    assert_eq!(Instant::now() - start, 5 * SEC);
}

#[tokio::test(start_paused = true)]
async fn readiness_polled_before_every_attempt() {
    let inner = Scripted::failing(2);
    let mut svc = Retry::new(inner.clone(), no_jitter().base(MS).max_attempts(3));
    assert_eq!(run(&mut svc).await, Ok(0));
    use Event::*;
    assert_eq!(inner.events(), [Ready, Call, Ready, Call, Ready, Call]);
}

#[tokio::test(start_paused = true)]
async fn retry_waits_for_a_service_that_is_not_ready() {
    let inner = Scripted::failing(1);
    inner.script().unready_after_call = Some(5 * SEC);
    let mut svc = Retry::new(inner.clone(), no_jitter().base(SEC).max_attempts(3));
    assert_eq!(run(&mut svc).await, Ok(0));
    // The backoff ended at 1 s, but the second attempt waited for readiness at 5 s.
    assert_eq!(inner.gaps(), [5 * SEC]);
}

#[tokio::test(start_paused = true)]
async fn readiness_error_during_retry_passes_through() {
    let inner = Scripted::failing(100);
    let broken = Fail {
        id: 77,
        retryable: true,
        retry_after: None,
    };
    inner.script().ready_error_after_call = Some(broken.clone());
    let mut svc = Retry::new(inner.clone(), no_jitter().base(MS).max_attempts(3));
    assert_eq!(run(&mut svc).await, Err(broken));
    assert_eq!(inner.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn request_cloned_only_when_a_retry_is_possible() {
    async fn clones(inner: Scripted, policy: RetryPolicy) -> usize {
        let count = Arc::new(AtomicUsize::new(0));
        let mut svc = Retry::new(inner, policy);
        let _ = ServiceExt::<Counted>::ready(&mut svc)
            .await
            .unwrap()
            .call(Counted(count.clone()))
            .await;
        count.load(Ordering::SeqCst)
    }
    let base = no_jitter().base(MS);
    // No retry possible: no clone.
    assert_eq!(
        clones(Scripted::failing(9), base.clone().max_attempts(1)).await,
        0
    );
    let empty = RetryBudget::builder().min_per_sec(0).initial(0).build();
    assert_eq!(
        clones(
            Scripted::failing(9),
            base.clone().max_attempts(3).budget(empty)
        )
        .await,
        0
    );
    // Three failing attempts: two copies, the last attempt takes one by move.
    assert_eq!(
        clones(Scripted::failing(9), base.clone().max_attempts(3)).await,
        2
    );
    // Success first time: the one copy kept in case.
    assert_eq!(
        clones(Scripted::failing(0), base.clone().max_attempts(3)).await,
        1
    );
    // Budget with one token: copy for attempt 2, none for attempt 3.
    let one = RetryBudget::builder().min_per_sec(0).capacity(1).build();
    let inner = Scripted::failing(9);
    assert_eq!(
        clones(inner.clone(), base.clone().max_attempts(5).budget(one)).await,
        1
    );
    assert_eq!(inner.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn layer_builds_a_working_retry() {
    use tower::Layer;
    let inner = Scripted::failing(1);
    let layer = RetryLayer::new(no_jitter().base(MS)).classifier(ByError);
    let mut svc = layer.layer(inner.clone());
    assert_eq!(run(&mut svc).await, Ok(0));
    assert_eq!(inner.calls(), 2);
    assert_eq!(svc.policy().attempts(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_call_that_cannot_retry_still_credits_a_budget_on_success() {
    // With max_attempts 1 the response future takes the policy only to credit a
    // deposit-on-success budget; a per-request budget is credited in `call`.
    let on_success = deposit_on_success_budget();
    let inner = Scripted::new([Ok(1), Err(Fail::transient(1))]);
    let policy = no_jitter().max_attempts(1).budget(on_success.clone());
    let mut svc = Retry::new(inner.clone(), policy);
    assert_eq!(run(&mut svc).await, Ok(1));
    assert_eq!(on_success.balance(), 1.0);
    assert_eq!(run(&mut svc).await, Err(Fail::transient(1)));
    assert_eq!(
        on_success.balance(),
        1.0,
        "a failure earned or spent a token"
    );
    assert_eq!(inner.calls(), 2);

    let per_request = RetryBudget::builder()
        .ratio(0.5)
        .min_per_sec(0)
        .initial(0)
        .build();
    let inner = Scripted::new([Err(Fail::transient(1)), Ok(2)]);
    let mut svc = Retry::new(
        inner,
        no_jitter().max_attempts(1).budget(per_request.clone()),
    );
    assert_eq!(run(&mut svc).await, Err(Fail::transient(1)));
    assert_eq!(run(&mut svc).await, Ok(2));
    assert_eq!(per_request.balance(), 1.0);
}

/// An empty budget credited one token per successful call.
fn deposit_on_success_budget() -> RetryBudget {
    RetryBudget::builder()
        .ratio(1.0)
        .min_per_sec(0)
        .initial(0)
        .deposit_on(DepositOn::Success)
        .build()
}
