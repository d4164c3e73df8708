//! A circuit breaker for any [`tower::Service`].
//!
//! # Why
//!
//! When a broker or an object store is down, every call waits for its timeout and
//! then fails; retries multiply the load on a service that is trying to recover,
//! and callers pile up behind slow calls. A circuit breaker notices the failures,
//! and for a while fails calls at once — without calling the service — so callers
//! get a fast, typed answer ([`CircuitBreakerError::Open`], with the time left) and
//! the service gets room to recover. After the wait it lets a few probe calls
//! through, and their outcome closes it again or reopens it.
//!
//! # Rules
//!
//! - **Closed**: calls pass. The breaker opens after
//!   [`consecutive_failures`](CircuitBreakerBuilder::consecutive_failures) failures
//!   in a row (default 5), or — when a [`count_window`](CircuitBreakerBuilder::count_window)
//!   or [`time_window`](CircuitBreakerBuilder::time_window) is configured — when the
//!   failure rate (or the [slow-call](CircuitBreakerBuilder::slow_calls) rate) over
//!   the truly sliding window reaches its threshold once
//!   [`minimum_calls`](CircuitBreakerBuilder::minimum_calls) are in the window
//!   (rates are checked when a failure or slow call is recorded, and when a count
//!   window first reaches the minimum).
//!   What counts as a failure is decided by a [`Classify`]
//!   (default [`ErrorsAsFailures`]);
//!   [`Outcome::Ignored`](crate::classify::Outcome::Ignored) counts for neither side.
//! - **Open**: calls fail fast for [`open_wait`](CircuitBreakerBuilder::open_wait)
//!   (default 60 s), which can grow with [`open_backoff`](CircuitBreakerBuilder::open_backoff)
//!   each time a probe fails.
//! - **Half-open**: exactly [`half_open_probes`](CircuitBreakerBuilder::half_open_probes)
//!   calls (default 1) pass; others fail fast with
//!   [`CircuitBreakerError::HalfOpenFull`]. When all probes succeed the breaker
//!   closes; the first failed (or slow) probe reopens it. A probe whose future is
//!   dropped, or whose outcome is ignored, frees its slot for another probe. A probe
//!   that never completes keeps the breaker half-open, so put a timeout inside it,
//!   or set [`max_half_open_wait`](CircuitBreakerBuilder::max_half_open_wait): the
//!   first call after that wait reopens the breaker.
//! - **Manual**: a [`CircuitBreakerHandle`] forces it open, forces it closed
//!   (disabled), switches it to metrics-only (counts, never opens) and resets it.
//!
//! Every state change is logged with `tracing` (from, to, reason; `warn` when
//! opening, `info` otherwise), sent on a [`tokio::sync::watch`] channel
//! ([`CircuitBreakerHandle::subscribe`]) and passed to the optional
//! [`on_state_change`](CircuitBreakerBuilder::on_state_change) hook.
//!
//! # Where calls are rejected
//!
//! In `call`, never in `poll_ready`: the breaker's state can change between
//! `poll_ready` and `call` (the wait passes, another clone's probe closes it), and
//! tower requires an error from `poll_ready` to mean the service is unusable for
//! good. So `poll_ready` only drives (and passes on errors of) the inner service's
//! readiness, and a rejected `call` returns an immediately ready error future
//! without calling the inner service; whatever readiness the inner service
//! reserved stays reserved for the next call.
//!
//! # Cost
//!
//! The closed-state path takes no lock: admitting a call is one atomic load, and
//! recording a success with the default rules is a load (plus a compare-and-swap
//! only when a failure streak must be reset; a failure is one compare-and-swap).
//! Without a sliding window the response future holds no `Arc` of the breaker: it
//! records into the breaker's state word through a `&'static` reference (the word
//! lives in a slot that is allocated once and recycled when the breaker is
//! dropped, so slots never outnumber the breakers alive at once), and no shared
//! reference count is touched per call. Probes and calls that feed a sliding
//! window hold an `Arc`. A count window adds one `fetch_add` per call
//! and recounts its bits only on failures. The clock is read only when a time
//! window or the slow-call rule is configured, and to time the open wait. State
//! changes take a mutex. Per-key breakers ([`CircuitBreakerBuilder::per_key`]) add
//! a bounded map lookup under a mutex.
//!
//! # Sharing
//!
//! A [`CircuitBreakerLayer`] owns one breaker: all services it makes and all their
//! clones share its state. Build one layer per dependency, or use per-key breakers.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use keel_layers::circuit_breaker::{CircuitBreakerError, CircuitBreakerLayer, CircuitState};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let breaker = CircuitBreakerLayer::builder()
//!     .consecutive_failures(2)
//!     .open_wait(Duration::from_secs(30))
//!     .build();
//! let handle = breaker.handle();
//!
//! let svc = ServiceBuilder::new()
//!     .layer(breaker)
//!     .service(service_fn(|fail: bool| async move {
//!         if fail { Err(std::io::Error::other("down")) } else { Ok("ok") }
//!     }));
//!
//! assert!(svc.clone().oneshot(true).await.is_err());
//! assert!(svc.clone().oneshot(true).await.is_err());
//! assert_eq!(handle.state(), CircuitState::Open);
//! // Fails fast now, without calling the service.
//! match svc.clone().oneshot(false).await {
//!     Err(CircuitBreakerError::Open { remaining_wait }) => {
//!         assert!(remaining_wait <= Duration::from_secs(30))
//!     }
//!     other => panic!("expected Open, got {other:?}"),
//! }
//! # }
//! ```

mod breaker;
mod error;
mod future;
mod handle;
mod keyed;
mod layer;
mod slot;
mod window;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use crate::classify::{Classify, ErrorsAsFailures};
use breaker::Breaker;

pub use error::CircuitBreakerError;
pub use future::ResponseFuture;
pub use handle::{CircuitBreakerHandle, CircuitState, CircuitStats, StateChange, TransitionReason};
pub use keyed::{KeyedCircuitBreaker, KeyedCircuitBreakerHandle, KeyedCircuitBreakerLayer};
pub use layer::{CircuitBreakerBuilder, CircuitBreakerLayer};

/// A service guarded by a circuit breaker; see the [module docs](self).
///
/// Clones share the breaker (and clone the inner service).
pub struct CircuitBreaker<S, C = ErrorsAsFailures> {
    inner: S,
    breaker: Arc<Breaker>,
    classifier: C,
}

impl<S: Clone, C: Clone> Clone for CircuitBreaker<S, C> {
    fn clone(&self) -> Self {
        CircuitBreaker {
            inner: self.inner.clone(),
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("state", &self.breaker.state())
            .finish_non_exhaustive()
    }
}

impl<S> CircuitBreaker<S> {
    /// Wraps `inner` in a new breaker with the default settings (see
    /// [`CircuitBreakerBuilder`]); use [`CircuitBreakerLayer::builder`] for others.
    pub fn new(inner: S) -> Self {
        tower::Layer::layer(&CircuitBreakerLayer::new(), inner)
    }
}

impl<S, C> CircuitBreaker<S, C> {
    pub(crate) fn from_parts(inner: S, breaker: Arc<Breaker>, classifier: C) -> Self {
        CircuitBreaker {
            inner,
            breaker,
            classifier,
        }
    }

    /// A handle on this service's breaker.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle {
            breaker: self.breaker.clone(),
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
}

impl<S, C, Req> Service<Req> for CircuitBreaker<S, C>
where
    S: Service<Req>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = CircuitBreakerError<S::Error>;
    type Future = ResponseFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(CircuitBreakerError::Inner)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        match self.breaker.admit() {
            Ok(permit) => ResponseFuture::called(
                self.inner.call(req),
                future::Tracker::new(&self.breaker, permit, self.classifier.clone()),
            ),
            Err(rejection) => ResponseFuture::rejected(rejection, self.classifier.clone()),
        }
    }
}
