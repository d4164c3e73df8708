//! Observing and steering a breaker: [`CircuitBreakerHandle`], [`CircuitState`],
//! [`StateChange`].

use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;

use super::breaker::Breaker;

/// The state of a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls pass and their outcomes are counted.
    Closed,
    /// Calls fail fast with [`CircuitBreakerError::Open`](super::CircuitBreakerError::Open)
    /// until the open wait has passed.
    Open,
    /// A limited number of probe calls pass; their outcomes close or reopen the breaker.
    HalfOpen,
    /// Forced open by [`CircuitBreakerHandle::force_open`]: every call fails fast
    /// until [`CircuitBreakerHandle::reset`].
    ForcedOpen,
    /// Forced closed (disabled) by [`CircuitBreakerHandle::force_closed`]: every call
    /// passes and nothing is counted.
    ForcedClosed,
    /// Set by [`CircuitBreakerHandle::metrics_only`]: outcomes are counted (see
    /// [`CircuitBreakerHandle::stats`]) but the breaker never opens.
    MetricsOnly,
}

impl CircuitState {
    pub(crate) const ALL: [CircuitState; 6] = [
        CircuitState::Closed,
        CircuitState::Open,
        CircuitState::HalfOpen,
        CircuitState::ForcedOpen,
        CircuitState::ForcedClosed,
        CircuitState::MetricsOnly,
    ];

    /// A short lowercase name, for logs and metrics labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
            CircuitState::ForcedOpen => "forced_open",
            CircuitState::ForcedClosed => "forced_closed",
            CircuitState::MetricsOnly => "metrics_only",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a breaker changed state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TransitionReason {
    /// `count` consecutive failures reached the configured threshold.
    ConsecutiveFailures {
        /// Consecutive failures seen.
        count: u32,
    },
    /// The failure rate over the sliding window reached the threshold.
    FailureRate {
        /// Failed share of the calls in the window, 0.0 to 1.0.
        rate: f64,
        /// Calls in the window.
        calls: u32,
    },
    /// The slow-call rate over the sliding window reached the threshold.
    SlowCallRate {
        /// Slow share of the calls in the window, 0.0 to 1.0.
        rate: f64,
        /// Calls in the window.
        calls: u32,
    },
    /// The open wait passed; the breaker now admits probes.
    WaitElapsed,
    /// Every permitted probe call succeeded.
    ProbesSucceeded,
    /// A probe call failed (or was slow).
    ProbeFailed,
    /// The breaker stayed half-open for the
    /// [maximum half-open wait](super::CircuitBreakerBuilder::max_half_open_wait)
    /// without its probes settling it, and reopened.
    HalfOpenWaitElapsed,
    /// A call on the handle.
    Manual,
}

impl fmt::Display for TransitionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransitionReason::ConsecutiveFailures { count } => {
                write!(f, "{count} consecutive failures")
            }
            TransitionReason::FailureRate { rate, calls } => {
                write!(f, "failure rate {:.1}% over {calls} calls", rate * 100.0)
            }
            TransitionReason::SlowCallRate { rate, calls } => {
                write!(f, "slow-call rate {:.1}% over {calls} calls", rate * 100.0)
            }
            TransitionReason::WaitElapsed => f.write_str("open wait elapsed"),
            TransitionReason::ProbesSucceeded => f.write_str("probe calls succeeded"),
            TransitionReason::ProbeFailed => f.write_str("probe call failed"),
            TransitionReason::HalfOpenWaitElapsed => f.write_str("maximum half-open wait elapsed"),
            TransitionReason::Manual => f.write_str("manual"),
        }
    }
}

/// One state change, as given to the `on_state_change` hook.
#[derive(Clone, Debug)]
pub struct StateChange {
    /// The state left.
    pub from: CircuitState,
    /// The state entered.
    pub to: CircuitState,
    /// Why.
    pub reason: TransitionReason,
    /// The key of a per-key breaker (its `Debug` form), `None` for a single breaker.
    pub key: Option<Arc<str>>,
    /// The breaker's [name](super::CircuitBreakerBuilder::name), if it has one.
    pub breaker: Option<Arc<str>>,
}

/// What a breaker currently counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CircuitStats {
    /// The current state.
    pub state: CircuitState,
    /// Consecutive failures seen since the last success, while the breaker counts
    /// (closed, metrics-only); while open, the streak that opened it; otherwise 0.
    pub consecutive_failures: u32,
    /// Calls in the sliding window (0 when no window is configured).
    pub window_calls: u32,
    /// Failures in the sliding window.
    pub window_failures: u32,
    /// Slow calls in the sliding window.
    pub window_slow_calls: u32,
}

/// A cloneable handle on one breaker: read its state, watch its changes, force it.
///
/// Every clone, and every service the breaker's layer made, acts on the same breaker.
#[derive(Clone)]
pub struct CircuitBreakerHandle {
    pub(crate) breaker: Arc<Breaker>,
}

impl fmt::Debug for CircuitBreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerHandle")
            .field("state", &self.state())
            .finish()
    }
}

impl CircuitBreakerHandle {
    /// The current state (one atomic load).
    ///
    /// An open breaker whose wait has passed reports [`CircuitState::Open`] until the
    /// next call turns it half-open; likewise a half-open breaker past its
    /// [maximum half-open wait](super::CircuitBreakerBuilder::max_half_open_wait)
    /// reports [`CircuitState::HalfOpen`] until the next call reopens it.
    pub fn state(&self) -> CircuitState {
        self.breaker.state()
    }

    /// The breaker's [name](super::CircuitBreakerBuilder::name), if it has one:
    /// the `breaker` field of its logs and the `breaker` label of its metrics.
    pub fn name(&self) -> Option<&str> {
        self.breaker.config.name.as_deref()
    }

    /// A receiver that sees every state change (the latest state is always
    /// readable; intermediate states can be skipped by a slow reader).
    pub fn subscribe(&self) -> watch::Receiver<CircuitState> {
        self.breaker.subscribe()
    }

    /// What the breaker currently counts.
    pub fn stats(&self) -> CircuitStats {
        self.breaker.stats()
    }

    /// Opens the breaker until [`reset`](Self::reset): every call fails fast with
    /// [`CircuitBreakerError::ForcedOpen`](super::CircuitBreakerError::ForcedOpen).
    pub fn force_open(&self) {
        self.breaker.force(CircuitState::ForcedOpen);
    }

    /// Disables the breaker until [`reset`](Self::reset): every call passes and
    /// nothing is counted.
    #[doc(alias = "disable")]
    pub fn force_closed(&self) {
        self.breaker.force(CircuitState::ForcedClosed);
    }

    /// Counts outcomes but never opens, until [`reset`](Self::reset). Useful to
    /// watch what a new configuration would do before enforcing it.
    pub fn metrics_only(&self) {
        self.breaker.force(CircuitState::MetricsOnly);
    }

    /// Closes the breaker, clears every count and the backoff of the open wait.
    pub fn reset(&self) {
        self.breaker.force(CircuitState::Closed);
    }
}
