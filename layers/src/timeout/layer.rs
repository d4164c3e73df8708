//! [`TimeoutLayer`].

use super::Timeout;
use std::time::Duration;
use tower::Layer;

/// Wraps services in [`Timeout`].
///
/// Defaults: the deadline covers the call only (like tower's); turn on
/// [`covering_readiness`](TimeoutLayer::covering_readiness) to let it cover the
/// wait for readiness too; turn on [`shared_timer`](TimeoutLayer::shared_timer)
/// for services whose calls nearly always wait. Cheap to clone (three words);
/// clones share nothing (each service the layer wraps gets its own timer).
///
/// ```
/// use keel_layers::timeout::TimeoutLayer;
/// use std::time::Duration;
///
/// let layer = TimeoutLayer::new(Duration::from_secs(30)).covering_readiness(true);
/// # let _ = layer;
/// ```
#[derive(Clone, Copy, Debug)]
pub struct TimeoutLayer {
    timeout: Duration,
    cover_readiness: bool,
    shared_timer: bool,
}

impl TimeoutLayer {
    /// A layer giving each call `timeout`.
    pub const fn new(timeout: Duration) -> Self {
        TimeoutLayer {
            timeout,
            cover_readiness: false,
            shared_timer: false,
        }
    }

    /// Whether the deadline also covers the wait for the inner service's readiness
    /// (default `false`). See [`Timeout`] for the exact semantics.
    pub const fn covering_readiness(mut self, cover: bool) -> Self {
        self.cover_readiness = cover;
        self
    }

    /// Whether the pending calls of each wrapped service share one timer instead
    /// of a tokio timer each (default `false`). See
    /// [shared timer](super#a-shared-timer-for-services-that-always-wait).
    pub const fn shared_timer(mut self, shared: bool) -> Self {
        self.shared_timer = shared;
        self
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout::new(inner, self.timeout)
            .covering_readiness(self.cover_readiness)
            .shared_timer(self.shared_timer)
    }
}
