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
        // Everything only a retry (or a deposit on success) needs; `None` when the
        // call can neither be retried nor credit the budget, so that such a call
        // builds, moves and drops a future barely larger than the inner one.
        retry: Option<Retrying<S, Req, Result<S::Response, S::Error>>>,
        classifier: C,
        // The attempt in flight, 1-based.
        attempt: u32,
        max_attempts: u32,
        // The overall deadline, fixed on the first Pending poll or the first outcome,
        // whichever comes first (see `RetryPolicy::deadline`). Kept out of `retry`
        // so that `Option<Retrying>` is told apart by its own fields, not by a
        // niche inside the `Instant`.
        deadline: Option<Instant>,
    }
}

/// The retry-path part of a [`ResponseFuture`].
struct Retrying<S, Req, Out> {
    // The policy, shared with the service.
    policy: Arc<RetryPolicy>,
    // A clone of the service, for the retries; `None` when no retry is possible.
    service: Option<S>,
    // The copy of the request for the next attempt; `None` when no further
    // attempt is possible.
    spare: Option<Req>,
    // The last outcome, kept across the backoff only when a deadline may have to
    // return it while waiting for readiness.
    last: Option<Box<Out>>,
    jitter: Option<Box<JitterState>>,
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
            .field(
                "may_retry",
                &self.retry.as_ref().is_some_and(|r| r.spare.is_some()),
            )
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<S, Req, C> ResponseFuture<S, Req, C>
where
    S: Service<Req>,
{
    /// `retry_with` (a service clone and a request copy) when a retry is
    /// possible; `policy` when a retry is possible or a success credits the budget.
    #[inline]
    pub(crate) fn new(
        future: S::Future,
        retry_with: Option<(S, Req)>,
        policy: Option<Arc<RetryPolicy>>,
        max_attempts: u32,
        classifier: C,
    ) -> Self {
        let retry = policy.map(|policy| {
            let (service, spare) = match retry_with {
                Some((service, request)) => (Some(service), Some(request)),
                None => (None, None),
            };
            Retrying {
                policy,
                service,
                spare,
                last: None,
                jitter: None,
            }
        });
        ResponseFuture {
            state: State::Calling { future },
            retry,
            classifier,
            attempt: 1,
            max_attempts,
            deadline: None,
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
                        if let Some(retry) = this.retry.as_ref() {
                            start_deadline(this.deadline, &retry.policy);
                        }
                        return Poll::Pending;
                    };
                    let verdict = this.classifier.classify(result.as_ref());
                    let Some(retry) = this.retry.as_mut() else {
                        if verdict.should_retry() {
                            log_no_retry(&verdict, *this.attempt, *this.max_attempts);
                        }
                        return Poll::Ready(result);
                    };
                    if verdict.is_success()
                        && let Some(budget) = &retry.policy.budget
                        && budget.deposit_on() == DepositOn::Success
                    {
                        budget.deposit();
                    }
                    if !verdict.should_retry() {
                        return Poll::Ready(result);
                    }
                    start_deadline(this.deadline, &retry.policy);
                    let Some(delay) = plan_retry(
                        &verdict,
                        *this.attempt,
                        &retry.policy,
                        retry.spare.is_some(),
                        *this.deadline,
                        &mut retry.jitter,
                    ) else {
                        return Poll::Ready(result);
                    };
                    if this.deadline.is_some() {
                        retry.last = Some(Box::new(result));
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
                    let Some(Retrying {
                        policy,
                        service: Some(service),
                        spare: spare @ Some(_),
                        last,
                        ..
                    }) = this.retry.as_mut()
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
                                && let Some(last) = last.take()
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
                        && let Some(last) = last.take()
                    {
                        tracing::debug!(
                            attempt = *this.attempt + 1,
                            "retry abandoned: ready only at the deadline"
                        );
                        return Poll::Ready(*last);
                    }
                    *last = None;
                    let Some(request) = spare.take() else {
                        unreachable!("matched above");
                    };
                    *this.attempt += 1;
                    if policy.retry_possible(*this.attempt) {
                        *spare = Some(request.clone());
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
