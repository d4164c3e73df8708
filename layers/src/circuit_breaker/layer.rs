//! [`CircuitBreakerLayer`] and its builder.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::CircuitBreaker;
use super::breaker::{Breaker, Config, WindowKind};
use super::handle::{CircuitBreakerHandle, StateChange};
use super::keyed::KeyedCircuitBreakerLayer;
use crate::classify::ErrorsAsFailures;

/// Wraps services in a [`CircuitBreaker`].
///
/// The layer owns **one** breaker: every service it makes, and every clone of the
/// layer or of those services, shares it (one state, one set of counts). Build
/// another layer for an independent breaker, or use
/// [`CircuitBreakerBuilder::per_key`] for one breaker per key.
#[derive(Clone)]
pub struct CircuitBreakerLayer<C = ErrorsAsFailures> {
    breaker: Arc<Breaker>,
    classifier: C,
}

impl<C> fmt::Debug for CircuitBreakerLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl CircuitBreakerLayer {
    /// A breaker with the defaults listed on [`CircuitBreakerBuilder`].
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder, starting from the defaults.
    pub fn builder() -> CircuitBreakerBuilder {
        CircuitBreakerBuilder {
            config: Config::default(),
            classifier: ErrorsAsFailures,
        }
    }
}

impl Default for CircuitBreakerLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// A handle on this layer's breaker.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle {
            breaker: self.breaker.clone(),
        }
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::from_parts(inner, self.breaker.clone(), self.classifier.clone())
    }
}

/// Configures a [`CircuitBreakerLayer`].
///
/// Defaults (those of the TypeScript client keel replaces, plus off-by-default rules):
///
/// | setting | default |
/// |---|---|
/// | [`consecutive_failures`](Self::consecutive_failures) | 5 |
/// | sliding window ([`count_window`](Self::count_window) / [`time_window`](Self::time_window)) | none (no rate rule) |
/// | [`failure_rate`](Self::failure_rate) | 0.5 (used only with a window) |
/// | [`minimum_calls`](Self::minimum_calls) | the count window's length; 100 for a time window |
/// | [`slow_calls`](Self::slow_calls) | off |
/// | [`open_wait`](Self::open_wait) | 60 s |
/// | [`open_backoff`](Self::open_backoff) | off (the wait stays the same) |
/// | [`half_open_probes`](Self::half_open_probes) | 1 |
/// | [`max_half_open_wait`](Self::max_half_open_wait) | none (half-open until the probes settle it) |
/// | [`classifier`](Self::classifier) | [`ErrorsAsFailures`] |
/// | [`on_state_change`](Self::on_state_change) | none (changes are still logged and sent on the watch channel) |
/// | [`name`](Self::name) | none (logs carry an empty `breaker` field) |
pub struct CircuitBreakerBuilder<C = ErrorsAsFailures> {
    config: Config,
    classifier: C,
}

impl<C> fmt::Debug for CircuitBreakerBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<C> CircuitBreakerBuilder<C> {
    /// Opens after `n` consecutive failures (successes reset the count; ignored
    /// outcomes leave it). `0` turns the rule off. Default 5.
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.config.consecutive_failures = n;
        self
    }

    /// Opens when the failed share of the calls in the sliding window is at least
    /// `rate` (0.0 to 1.0, clamped) once [`minimum_calls`](Self::minimum_calls) are
    /// in the window. Needs a window. Default 0.5.
    pub fn failure_rate(mut self, rate: f64) -> Self {
        self.config.failure_rate = clamp_rate(rate);
        self
    }

    /// A sliding window over the last `len` recorded outcomes (at least 1).
    pub fn count_window(mut self, len: u32) -> Self {
        self.config.window = Some(WindowKind::Count(len.max(1)));
        self
    }

    /// A sliding window over the last `span`, kept in `buckets` time buckets (1 to
    /// 1,024; outcomes leave the window one bucket at a time). Reads the clock on
    /// every call.
    pub fn time_window(mut self, span: Duration, buckets: u32) -> Self {
        self.config.window = Some(WindowKind::Time {
            span,
            buckets: buckets.clamp(1, 1024),
        });
        self
    }

    /// The rate rules apply only once the window holds at least `n` calls (capped at
    /// a count window's length).
    pub fn minimum_calls(mut self, n: u32) -> Self {
        self.config.minimum_calls = Some(n.max(1));
        self
    }

    /// Calls taking at least `threshold` count as slow; the breaker opens when the
    /// slow share of the window reaches `rate` (0.0 to 1.0). A slow probe counts as a
    /// failed probe. Reads the clock twice per call. Without a window, a count window
    /// of 100 is used.
    pub fn slow_calls(mut self, threshold: Duration, rate: f64) -> Self {
        self.config.slow_call = Some((threshold, clamp_rate(rate)));
        if self.config.window.is_none() {
            self.config.window = Some(WindowKind::Count(100));
        }
        self
    }

    /// How long the breaker stays open before admitting probes. Default 60 s.
    pub fn open_wait(mut self, wait: Duration) -> Self {
        self.config.open_wait = wait;
        self
    }

    /// Grows the open wait by `multiplier` each time a failed probe reopens the
    /// breaker, up to `max`; closing resets it.
    pub fn open_backoff(mut self, multiplier: f64, max: Duration) -> Self {
        self.config.backoff = Some((multiplier.max(1.0), max));
        self
    }

    /// How many probe calls the half-open state admits (1 to 65,535); all must
    /// succeed to close, any failure reopens. Default 1.
    pub fn half_open_probes(mut self, n: u32) -> Self {
        self.config.half_open_probes = n.clamp(1, 0xffff);
        self
    }

    /// Reopens a half-open breaker whose probes have not settled it `wait` after it
    /// turned half-open (resilience4j's `maxWaitDurationInHalfOpenState`), so probes
    /// that never answer cannot keep it half-open, rejecting every other call with
    /// [`HalfOpenFull`](super::CircuitBreakerError::HalfOpenFull), for good. The
    /// check runs when a call arrives, and the breaker then behaves as if it had
    /// reopened the moment the wait passed: the open wait (with its backoff) counts
    /// from then, and late probe outcomes are not counted. Default none: the breaker stays half-open until
    /// its probes succeed or fail (then put a timeout inside the breaker).
    pub fn max_half_open_wait(mut self, wait: Duration) -> Self {
        self.config.max_half_open_wait = Some(wait);
        self
    }

    /// Runs `hook` on every state change, in order, while the change is being made:
    /// keep it short, and do not force the breaker from inside it (that deadlocks).
    pub fn on_state_change<F>(mut self, hook: F) -> Self
    where
        F: Fn(&StateChange) + Send + Sync + 'static,
    {
        self.config.hook = Some(Arc::new(hook));
        self
    }

    /// Decides what counts as a failure. Default [`ErrorsAsFailures`].
    pub fn classifier<C2>(self, classifier: C2) -> CircuitBreakerBuilder<C2> {
        CircuitBreakerBuilder {
            config: self.config,
            classifier,
        }
    }

    /// Names the breaker (`"kafka_publish"`, `"s3"`): the `breaker` field of its
    /// state-change logs, [`StateChange::breaker`](super::StateChange::breaker), and
    /// [`CircuitBreakerHandle::name`], which exporters use as the `breaker` label.
    /// With [`per_key`](Self::per_key), every key's breaker has this name and its
    /// key in `key`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = Some(Arc::from(name.into()));
        self
    }

    /// Builds the layer (one breaker).
    pub fn build(self) -> CircuitBreakerLayer<C> {
        CircuitBreakerLayer {
            breaker: Breaker::new(Arc::new(self.config), None),
            classifier: self.classifier,
        }
    }

    /// Builds a layer with one breaker per key: `key_fn` extracts the key from each
    /// request (the Kafka topic, the S3 bucket), and at most `max_keys` breakers are
    /// kept (at least 1); the least recently used one is dropped to make room.
    pub fn per_key<K, F>(self, key_fn: F, max_keys: usize) -> KeyedCircuitBreakerLayer<K, F, C>
    where
        K: Hash + Eq + Clone + fmt::Debug,
    {
        KeyedCircuitBreakerLayer::new(Arc::new(self.config), key_fn, max_keys, self.classifier)
    }
}

fn clamp_rate(rate: f64) -> f64 {
    if rate.is_nan() {
        1.0
    } else {
        rate.clamp(0.0, 1.0)
    }
}
