//! The response future of [`Retry`](super::Retry).

use super::budget::DepositOn;
use super::policy::RetryPolicy;
use crate::classify::{Classification, Classify};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower::Service;

pin_project! {
    /// The future returned by [`Retry`](super::Retry): a state machine
    /// `Calling → Backoff → CheckReady → Calling → …` that ends with the first
    /// outcome that is not retried.
    pub struct ResponseFuture<S, Req, C>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future>,
        // A clone of the service, for the retries; `None` when no retry is possible.
        service: Option<S>,
        // The copy of the request for the next attempt; `None` when no further
        // attempt is possible.
        spare: Option<Req>,
        // The last outcome, kept across the backoff only when a deadline may have to
        // return it while waiting for readiness. (Retry-path state is boxed to keep
        // the future small for calls that never retry.)
        last: Option<Box<Result<S::Response, S::Error>>>,
        // The policy, shared with the service; `None` when the call can neither be
        // retried nor credit the budget (so no reference is taken).
        policy: Option<Arc<RetryPolicy>>,
        max_attempts: u32,
        classifier: C,
        // The attempt in flight, 1-based.
        attempt: u32,
        // The overall deadline, fixed on the first Pending poll or the first outcome,
        // whichever comes first (see `RetryPolicy::deadline`).
        deadline: Option<Instant>,
        jitter: Option<Box<JitterState>>,
    }
}

/// The jitter generator and the previous wait, created at the first retry.
struct JitterState {
    rng: fastrand::Rng,
    previous: Duration,
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // Waiting for the inner service's response.
        Calling { #[pin] future: F },
        // Waiting out the backoff. (Timers are boxed: they exist only on the retry
        // path and would otherwise triple the size of every response future.)
        Backoff { sleep: Pin<Box<Sleep>> },
        // Polling the service's readiness; `deadline` fires at the overall deadline.
        CheckReady { deadline: Option<Pin<Box<Sleep>>> },
    }
}

impl<S, Req, C> fmt::Debug for ResponseFuture<S, Req, C>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Calling { .. } => "calling",
            State::Backoff { .. } => "backoff",
            State::CheckReady { .. } => "check_ready",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("attempt", &self.attempt)
            .field("may_retry", &self.spare.is_some())
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<S, Req, C> ResponseFuture<S, Req, C>
where
    S: Service<Req>,
{
    pub(crate) fn new(
        future: S::Future,
        retry_with: Option<(S, Req)>,
        policy: Option<Arc<RetryPolicy>>,
        max_attempts: u32,
        classifier: C,
    ) -> Self {
        let (service, spare) = match retry_with {
            Some((service, request)) => (Some(service), Some(request)),
            None => (None, None),
        };
        ResponseFuture {
            state: State::Calling { future },
            service,
            spare,
            last: None,
            policy,
            max_attempts,
            classifier,
            attempt: 1,
            deadline: None,
            jitter: None,
        }
    }
}

impl<S, Req, C> Future for ResponseFuture<S, Req, C>
where
    S: Service<Req>,
    Req: Clone,
    C: Classify<S::Response, S::Error>,
{
    type Output = Result<S::Response, S::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { future } => {
                    let Poll::Ready(result) = future.poll(cx) else {
                        if let Some(policy) = this.policy.as_deref() {
                            start_deadline(this.deadline, policy);
                        }
                        return Poll::Pending;
                    };
                    let verdict = this.classifier.classify(result.as_ref());
                    let Some(policy) = this.policy.as_deref() else {
                        if verdict.should_retry() {
                            log_no_retry(&verdict, *this.attempt, *this.max_attempts);
                        }
                        return Poll::Ready(result);
                    };
                    if verdict.is_success()
                        && let Some(budget) = &policy.budget
                        && budget.deposit_on() == DepositOn::Success
                    {
                        budget.deposit();
                    }
                    if !verdict.should_retry() {
                        return Poll::Ready(result);
                    }
                    start_deadline(this.deadline, policy);
                    let Some(delay) = plan_retry(
                        &verdict,
                        *this.attempt,
                        policy,
                        this.spare.is_some(),
                        *this.deadline,
                        this.jitter,
                    ) else {
                        return Poll::Ready(result);
                    };
                    if this.deadline.is_some() {
                        *this.last = Some(Box::new(result));
                    }
                    if delay.is_zero() {
                        let deadline = this
                            .deadline
                            .map(|at| Box::pin(tokio::time::sleep_until(at)));
                        this.state.set(State::CheckReady { deadline });
                    } else {
                        this.state.set(State::Backoff {
                            sleep: Box::pin(tokio::time::sleep(delay)),
                        });
                    }
                }
                StateProj::Backoff { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    let deadline = this
                        .deadline
                        .map(|at| Box::pin(tokio::time::sleep_until(at)));
                    this.state.set(State::CheckReady { deadline });
                }
                StateProj::CheckReady { deadline } => {
                    let (Some(service), true) = (this.service.as_mut(), this.spare.is_some())
                    else {
                        unreachable!(
                            "a retry is planned only with a service clone and a spare request"
                        );
                    };
                    match service.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                        Poll::Pending => {
                            if let Some(deadline) = deadline
                                && deadline.as_mut().poll(cx).is_ready()
                                && let Some(last) = this.last.take()
                            {
                                tracing::debug!(
                                    attempt = *this.attempt + 1,
                                    "retry abandoned: service not ready before the deadline"
                                );
                                return Poll::Ready(*last);
                            }
                            return Poll::Pending;
                        }
                    }
                    if let Some(at) = *this.deadline
                        && Instant::now() >= at
                        && let Some(last) = this.last.take()
                    {
                        tracing::debug!(
                            attempt = *this.attempt + 1,
                            "retry abandoned: ready only at the deadline"
                        );
                        return Poll::Ready(*last);
                    }
                    *this.last = None;
                    let Some(request) = this.spare.take() else {
                        unreachable!("checked above");
                    };
                    *this.attempt += 1;
                    if this
                        .policy
                        .as_deref()
                        .is_some_and(|policy| policy.retry_possible(*this.attempt))
                    {
                        *this.spare = Some(request.clone());
                    }
                    let future = service.call(request);
                    this.state.set(State::Calling { future });
                }
            }
        }
    }
}

/// Fixes the overall deadline if the policy has one and it is not fixed yet. Called
/// when the first attempt pends or fails, so that a call answered at once never
/// reads the clock.
fn start_deadline(deadline: &mut Option<Instant>, policy: &RetryPolicy) {
    if deadline.is_none()
        && let Some(limit) = policy.deadline
    {
        *deadline = Instant::now().checked_add(limit);
    }
}

/// Logs why attempt `attempt`, which failed with a retryable `verdict`, is not
/// retried when no copy of the request was kept for it.
fn log_no_retry(verdict: &Classification, attempt: u32, max_attempts: u32) {
    if attempt >= max_attempts {
        tracing::debug!(
            attempt,
            class = verdict.class,
            "not retrying: attempts exhausted"
        );
    } else {
        // No copy was kept because the budget was empty when this attempt started.
        tracing::debug!(
            attempt,
            class = verdict.class,
            "not retrying: retry budget was empty"
        );
    }
}

/// Decides whether attempt `attempt`, which failed with `verdict`, is retried, and
/// after what wait. Takes a budget token when it says yes.
fn plan_retry(
    verdict: &Classification,
    attempt: u32,
    policy: &RetryPolicy,
    have_request: bool,
    deadline: Option<Instant>,
    jitter: &mut Option<Box<JitterState>>,
) -> Option<Duration> {
    if attempt >= policy.max_attempts || !have_request {
        log_no_retry(verdict, attempt, policy.max_attempts);
        return None;
    }
    let jitter = jitter.get_or_insert_with(|| {
        Box::new(JitterState {
            rng: match policy.seed {
                Some(seed) => fastrand::Rng::with_seed(seed),
                None => fastrand::Rng::new(),
            },
            previous: Duration::ZERO,
        })
    });
    let drawn = policy
        .backoff
        .next_delay(attempt, jitter.previous, &mut jitter.rng);
    jitter.previous = drawn;
    let delay = match verdict.retry_after {
        Some(floor) => drawn.max(floor),
        None => drawn,
    };
    if let Some(deadline) = deadline {
        let fits = Instant::now()
            .checked_add(delay)
            .is_some_and(|end| end < deadline);
        if !fits {
            tracing::debug!(
                attempt,
                class = verdict.class,
                backoff_ms = delay.as_millis() as u64,
                "not retrying: the backoff would end past the deadline"
            );
            return None;
        }
    }
    if let Some(budget) = &policy.budget
        && !budget.try_withdraw()
    {
        tracing::debug!(
            attempt,
            class = verdict.class,
            "not retrying: retry budget exhausted"
        );
        return None;
    }
    tracing::warn!(
        attempt = attempt + 1,
        max_attempts = policy.max_attempts,
        backoff_ms = delay.as_millis() as u64,
        class = verdict.class,
        "retrying after a failed attempt"
    );
    Some(delay)
}
