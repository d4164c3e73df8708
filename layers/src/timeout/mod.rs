//! A deadline per call, optionally covering the wait for readiness.
//!
//! # Why
//!
//! A call that never answers (a half-open TCP connection, a broker that lost the
//! partition leader, a stuck S3 upload) holds its caller, its memory and its
//! concurrency slot forever. [`Timeout`] fails it with
//! [`TimeoutError::Elapsed`] instead — a typed error that is a retryable failure
//! of class `"timeout"` for [`ByError`](crate::classify::ByError), so a retry layer
//! outside it retries timed-out attempts and a circuit breaker counts them.
//!
//! # When the clock starts
//!
//! The deadline is `timeout` after **the response future first returns `Pending`**
//! — in practice, the first poll right after `call`. An inner future that is ready
//! on its first poll never touches the clock, the timer wheel or the allocator,
//! which makes the layer nearly free on fast paths (tower's `Timeout` creates a
//! timer for every call). A pending call pays what tower's does, plus one small
//! allocation: the timer is boxed so that the response future stays small. The difference with "from `call`": a future that is created and
//! only polled later does not count the time in between, and synchronous work done
//! inside the very first poll is not counted (a timer cannot interrupt it anyway).
//! The timeout fires at exactly the deadline, not before (with the shared timer
//! below: not before, and up to one tick later).
//!
//! # A shared timer for services that always wait
//!
//! When nearly every call is pending on I/O (a Kafka publish waits for the
//! broker's acknowledgement), a tokio timer per call is most of the layer's cost:
//! a boxed `Sleep`, a clock read, then an insertion into and a removal from
//! tokio's timer wheel, each under the time driver's lock. With
//! [`shared_timer(true)`](Timeout::shared_timer) the pending calls of one service
//! (and its clones) share one timer instead. A call enters a FIFO with its waker
//! and leaves it when it completes — one short lock each, no clock read, no
//! allocation. One background task ticks every `timeout / 32` (at least 1 ms)
//! while calls wait: each tick closes the *epoch* of the calls that entered since
//! the previous one and wakes the calls whose epoch closed `timeout` ago.
//!
//! The price is precision: a call still never fails before `timeout` has passed
//! since its first `Pending`, but may fail up to one tick (plus the background
//! task's scheduling delay) later — fine for a backstop like the publish stack's
//! (the delivery timeout + 5 s), not for a tight deadline. The background task is
//! spawned on the first pending call and ends when no call waits. The queue has
//! one lock, shared by the service's clones: on many threads at once it is a
//! point of contention (measured here on one thread only). Readiness
//! deadlines (below) and calls polled outside a tokio runtime use their own timer.
//! Measured in BENCHMARKS.md ("Kafka publish").
//!
//! # Covering readiness (tower #648)
//!
//! tower's `Timeout` starts its clock in `call`, so a service that stays not ready
//! (a full concurrency limit, a reconnecting client) makes the caller wait without
//! bound. With [`covering_readiness(true)`](Timeout::covering_readiness):
//!
//! - the clock starts at the first `poll_ready` that finds the inner service not
//!   ready (an immediately ready service costs nothing);
//! - if the inner service becomes ready in time, `call` gets only what remains of
//!   the deadline;
//! - if the deadline passes first, `poll_ready` returns **`Ready(Ok(()))`** and the
//!   next `call` returns a future that fails at once with `Elapsed`, **without
//!   calling the inner service** (which is not ready and must not be called).
//!
//! Why not return the error from `poll_ready`? In tower, an error from `poll_ready`
//! means the service itself has failed and must be discarded: `Buffer` would
//! close, a balancer would evict the endpoint, and every later caller would fail.
//! A slow readiness is a per-request failure, not a broken service, so it is
//! reported through the call, as tower's `LoadShed` reports overload. The
//! `Elapsed` verdict belongs to the next `call` on this service instance; a
//! clone starts with a fresh readiness clock.
//!
//! # Example
//!
//! ```
//! use keel_layers::timeout::{TimeoutError, TimeoutLayer};
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let slow = service_fn(|_: ()| async {
//!     tokio::time::sleep(Duration::from_secs(60)).await;
//!     Ok::<_, std::io::Error>("late")
//! });
//! let service = ServiceBuilder::new()
//!     .layer(TimeoutLayer::new(Duration::from_secs(5)))
//!     .service(slow);
//! let err = service.oneshot(()).await.unwrap_err();
//! assert!(matches!(err, TimeoutError::Elapsed { after } if after == Duration::from_secs(5)));
//! # }
//! ```

pub mod error;
pub mod future;
mod layer;
mod queue;
#[cfg(test)]
mod tests;

pub use self::error::TimeoutError;
pub use self::layer::TimeoutLayer;

use self::future::{Deadline, ResponseFuture};
use self::queue::DeadlineQueue;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower::Service;

/// Fails calls that take longer than a timeout; see the [module docs](self).
///
/// **Cloning** clones the inner service; the clone starts with a fresh readiness
/// clock (nothing is shared).
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
    cover_readiness: bool,
    readiness: Readiness,
    // The timer of readiness waits, created on the first wait and reused.
    timer: Option<Pin<Box<Sleep>>>,
    // The timer the calls share, with `shared_timer(true)`; shared by clones.
    queue: Option<Arc<DeadlineQueue>>,
}

/// Where the readiness clock stands (only used when covering readiness).
enum Readiness {
    /// No wait in progress.
    Idle,
    /// The inner service was found not ready; the deadline falls at `deadline`.
    /// `ready` is set once it became ready within it.
    Waiting { deadline: Instant, ready: bool },
    /// The deadline passed while waiting; the next call fails with `Elapsed`.
    Expired,
}

impl<S: fmt::Debug> fmt::Debug for Timeout<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let readiness = match self.readiness {
            Readiness::Idle => "idle",
            Readiness::Waiting { ready: false, .. } => "waiting",
            Readiness::Waiting { ready: true, .. } => "ready",
            Readiness::Expired => "expired",
        };
        f.debug_struct("Timeout")
            .field("inner", &self.inner)
            .field("timeout", &self.timeout)
            .field("cover_readiness", &self.cover_readiness)
            .field("readiness", &readiness)
            .finish_non_exhaustive()
    }
}

impl<S: Clone> Clone for Timeout<S> {
    fn clone(&self) -> Self {
        Timeout {
            inner: self.inner.clone(),
            timeout: self.timeout,
            cover_readiness: self.cover_readiness,
            readiness: Readiness::Idle,
            timer: None,
            queue: self.queue.clone(),
        }
    }
}

impl<S> Timeout<S> {
    /// Wraps `inner`, giving each call `timeout` (readiness not covered).
    pub const fn new(inner: S, timeout: Duration) -> Self {
        Timeout {
            inner,
            timeout,
            cover_readiness: false,
            readiness: Readiness::Idle,
            timer: None,
            queue: None,
        }
    }

    /// Whether the deadline also covers the wait for readiness (default `false`).
    pub fn covering_readiness(mut self, cover: bool) -> Self {
        self.cover_readiness = cover;
        self
    }

    /// Whether pending calls share one timer (default `false`: a tokio timer per
    /// pending call). See [shared timer](self#a-shared-timer-for-services-that-always-wait).
    /// Clones made afterwards share it too.
    pub fn shared_timer(mut self, shared: bool) -> Self {
        self.queue = shared.then(|| Arc::new(DeadlineQueue::new(self.timeout)));
        self
    }

    /// Whether pending calls share one timer.
    pub fn is_shared_timer(&self) -> bool {
        self.queue.is_some()
    }

    /// The timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
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

impl<S, Req> Service<Req> for Timeout<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = TimeoutError<S::Error>;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if !self.cover_readiness {
            return self.inner.poll_ready(cx).map_err(TimeoutError::Inner);
        }
        if let Readiness::Expired = self.readiness {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => {
                if let Readiness::Waiting { ready, .. } = &mut self.readiness {
                    *ready = true;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                self.readiness = Readiness::Idle;
                Poll::Ready(Err(TimeoutError::Inner(e)))
            }
            Poll::Pending => {
                let deadline = match self.readiness {
                    Readiness::Waiting { deadline, .. } => deadline,
                    _ => Instant::now()
                        .checked_add(self.timeout)
                        .unwrap_or_else(far_future),
                };
                self.readiness = Readiness::Waiting {
                    deadline,
                    ready: false,
                };
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    self.readiness = Readiness::Expired;
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        match std::mem::replace(&mut self.readiness, Readiness::Idle) {
            Readiness::Idle => ResponseFuture::new(
                self.inner.call(request),
                self.timeout,
                Deadline::AfterFirstPending,
                self.queue.clone(),
            ),
            Readiness::Waiting { deadline, .. } => ResponseFuture::new(
                self.inner.call(request),
                self.timeout,
                Deadline::At(deadline),
                None,
            ),
            Readiness::Expired => ResponseFuture::elapsed(self.timeout),
        }
    }
}

/// About 30 years from now, as tokio does for deadlines that overflow.
pub(crate) fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365 * 30)
}
