//! Retry failed calls with exponential backoff, jitter, a retry budget and an
//! overall deadline.
//!
//! # Why
//!
//! A transient failure (a broker leader election, an S3 `503 SlowDown`, a dropped
//! connection) is often gone a second later, so a retry turns it into a success.
//! But naive retries hurt: synchronised clients retry in waves (hence
//! [jitter](Jitter)), a server asking for time (`Retry-After`) must get it (hence
//! the delay floor), a long outage turns every request into `max_attempts`
//! requests (hence the [budget](RetryBudget)), and the caller has a deadline of its
//! own (hence the [overall deadline](RetryPolicy::deadline)).
//!
//! # What is retried
//!
//! Each outcome goes through a [`Classify`] (default
//! [`ErrorsAsFailures`]). An outcome is retried
//! only when `Classification::should_retry()` is true (a retryable failure), the
//! attempt limit allows another attempt, a copy of the request was kept (see
//! below), the backoff would end before the deadline, and the budget gives a token
//! — checked in that order. Otherwise **the last outcome is returned as is**:
//! the inner service's `Ok` or `Err`, unchanged and typed (`Retry`'s error type is
//! the inner error type; there is no wrapper). So running out of budget, attempts
//! or time looks to the caller like the last attempt's result.
//!
//! The wait before retry `n` is drawn from the [`Backoff`] (with its [`Jitter`])
//! and then raised to `Classification::retry_after` when the outcome carries one.
//! Every retry is logged with `tracing` at `warn` (fields `attempt` — the attempt
//! about to start —, `max_attempts`, `backoff_ms`, `class`); every decision not to
//! retry at `debug`; the budget running dry at `warn`, once.
//!
//! # Readiness
//!
//! Like tower's `Retry`, each response future holds a clone of the inner service.
//! Before **every** retry it polls that clone's `poll_ready` until ready (an error
//! from it ends the call with that error), and only then calls it: a concurrency
//! limit or a circuit breaker inside is honoured for each attempt. When a deadline
//! is set and the service is still not ready at the deadline, the last outcome is
//! returned.
//!
//! # When the request is cloned
//!
//! The request must be `Clone`, but it is cloned only when another attempt may
//! follow. Just before attempt `k` is sent, one copy is made for attempt `k + 1`
//! if and only if `k < max_attempts` and the budget (when there is one) holds at
//! least one token at that moment. So:
//!
//! - with `max_attempts` 1, or while the budget is empty, the request (and the
//!   service) are never cloned, and such a call is not retried even if the budget
//!   refills during it;
//! - the last permitted attempt receives the kept copy by move, no clone;
//! - a call that succeeds first time costs one clone (the copy kept in case).
//!
//! At most `max_attempts − 1` clones per call. The service is cloned once per
//! call, when the request is.
//!
//! # Cost per call
//!
//! The policy is built once and shared through an `Arc` by the layer, its
//! services and their clones. A call that can be retried takes one reference to
//! it (an atomic increment) along with the request and service copies. A call
//! that cannot (`max_attempts` 1, or an empty budget) takes nothing: its response
//! future is the inner future plus the classifier and two counters, unless the
//! budget earns on successes ([`DepositOn::Success`]), which needs the policy to
//! credit it. Crediting a budget per request is one atomic load while the bucket
//! is full.
//!
//! # Example
//!
//! ```
//! use keel_layers::retry::{RetryLayer, RetryPolicy};
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
//! let counter = attempts.clone();
//! let flaky = service_fn(move |name: &'static str| {
//!     let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//!     async move {
//!         if n < 2 { Err(std::io::Error::other("try again")) } else { Ok(format!("hello {name}")) }
//!     }
//! });
//! let service = ServiceBuilder::new()
//!     .layer(RetryLayer::new(RetryPolicy::new().base(Duration::from_millis(10)).max_attempts(3)))
//!     .service(flaky);
//! assert_eq!(service.oneshot("keel").await.unwrap(), "hello keel");
//! assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 3);
//! # }
//! ```
//!
//! # Layering with a timeout
//!
//! [`Timeout`](crate::timeout::Timeout) *inside* `Retry` bounds each attempt (a
//! timed-out attempt is a retryable failure of class `"timeout"` under
//! [`ByError`](crate::classify::ByError)); *outside* it bounds the whole call.

mod backoff;
mod budget;
pub mod future;
mod layer;
mod policy;
#[cfg(test)]
mod tests;

pub use self::backoff::{Backoff, Jitter};
pub use self::budget::{DepositOn, RetryBudget, RetryBudgetBuilder};
pub use self::layer::RetryLayer;
pub use self::policy::RetryPolicy;

use self::future::ResponseFuture;
use crate::classify::{Classify, ErrorsAsFailures};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

/// Retries failed calls of the inner service under a [`RetryPolicy`]; see the
/// [module docs](self).
///
/// **Cloning** clones the inner service and the classifier, and shares the policy
/// (held in an `Arc`) and so its budget.
#[derive(Clone, Debug)]
pub struct Retry<S, C = ErrorsAsFailures> {
    inner: S,
    policy: Arc<RetryPolicy>,
    classifier: C,
}

impl<S> Retry<S> {
    /// Wraps `inner`, retrying every `Err` under `policy`.
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        Retry::with_classifier(inner, policy, ErrorsAsFailures)
    }
}

impl<S, C> Retry<S, C> {
    /// Wraps `inner`, retrying what `classifier` says is retryable.
    pub fn with_classifier(inner: S, policy: RetryPolicy, classifier: C) -> Self {
        Retry::from_shared(inner, Arc::new(policy), classifier)
    }

    pub(crate) fn from_shared(inner: S, policy: Arc<RetryPolicy>, classifier: C) -> Self {
        Retry {
            inner,
            policy,
            classifier,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

impl<S, C, Req> Service<Req> for Retry<S, C>
where
    S: Service<Req> + Clone,
    Req: Clone,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, Req, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Req) -> Self::Future {
        let policy = &*self.policy;
        let mut deposit_on_success = false;
        if let Some(budget) = &policy.budget {
            match budget.deposit_on() {
                DepositOn::Request => budget.deposit(),
                DepositOn::Success => deposit_on_success = true,
            }
        }
        let retry_with = policy
            .retry_possible(1)
            .then(|| (self.inner.clone(), request.clone()));
        // The future needs the policy only to plan a retry or to credit the budget
        // for a success; otherwise (max_attempts 1, or an empty budget with
        // deposits per request) it carries no reference to it at all.
        let shared_policy =
            (retry_with.is_some() || deposit_on_success).then(|| self.policy.clone());
        let max_attempts = policy.max_attempts;
        // The service that was polled ready takes this call; the clone (not yet
        // polled) serves the retries, each after its own poll_ready.
        let future = self.inner.call(request);
        ResponseFuture::new(
            future,
            retry_with,
            shared_policy,
            max_attempts,
            self.classifier.clone(),
        )
    }
}
