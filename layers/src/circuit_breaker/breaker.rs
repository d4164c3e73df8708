//! The shared state machine behind one breaker.
//!
//! Everything a call touches while the breaker is closed is an atomic: the state
//! word (state, generation, and the failure streak or the half-open probe counters,
//! packed in one `AtomicU64` kept in a [`Slot`]) and the sliding window. The mutex `transitions`
//! is taken only to change state, so transitions are serialized and observed in
//! order, while the hot path stays lock-free.
//!
//! The generation, bumped by every transition, tags each admitted call: an outcome
//! that arrives after the breaker moved on (a slow call admitted while closed that
//! completes after the breaker opened) is not counted against the new state.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::error::Rejection;
use super::handle::{CircuitState, CircuitStats, StateChange, TransitionReason};
use super::slot::{
    ADMITTED_SHIFT, SUCCESS_SHIFT, Slot, admitted_of, gen_of, is_counting, next_word, state_of,
    streak_of, successes_of,
};
use super::window::{CountWindow, TimeWindow, WindowCounts};
use crate::classify::Outcome;

/// A callback run on every state change.
pub(crate) type StateHook = Arc<dyn Fn(&StateChange) + Send + Sync>;

/// The sliding window kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WindowKind {
    Count(u32),
    Time { span: Duration, buckets: u32 },
}

/// Resolved configuration of a breaker (see the builder for meanings and defaults).
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) consecutive_failures: u32,
    pub(crate) window: Option<WindowKind>,
    pub(crate) failure_rate: f64,
    pub(crate) minimum_calls: Option<u32>,
    pub(crate) slow_call: Option<(Duration, f64)>,
    pub(crate) open_wait: Duration,
    pub(crate) backoff: Option<(f64, Duration)>,
    pub(crate) half_open_probes: u32,
    pub(crate) max_half_open_wait: Option<Duration>,
    pub(crate) hook: Option<StateHook>,
    /// The breaker's name, in its logs and on its handle (for metrics).
    pub(crate) name: Option<Arc<str>>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("consecutive_failures", &self.consecutive_failures)
            .field("window", &self.window)
            .field("failure_rate", &self.failure_rate)
            .field("minimum_calls", &self.minimum_calls)
            .field("slow_call", &self.slow_call)
            .field("open_wait", &self.open_wait)
            .field("backoff", &self.backoff)
            .field("half_open_probes", &self.half_open_probes)
            .field("max_half_open_wait", &self.max_half_open_wait)
            .field("hook", &self.hook.is_some())
            .field("name", &self.name)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            consecutive_failures: 5,
            window: None,
            failure_rate: 0.5,
            minimum_calls: None,
            slow_call: None,
            open_wait: Duration::from_secs(60),
            backoff: None,
            half_open_probes: 1,
            max_half_open_wait: None,
            hook: None,
            name: None,
        }
    }
}

impl Config {
    /// The open wait after `reopens` consecutive re-openings from half-open.
    pub(crate) fn open_wait_after(&self, reopens: u32) -> Duration {
        match self.backoff {
            None => self.open_wait,
            Some((multiplier, max)) => {
                let secs = self.open_wait.as_secs_f64()
                    * multiplier.powi(i32::try_from(reopens).unwrap_or(i32::MAX));
                Duration::try_from_secs_f64(secs).unwrap_or(max).min(max)
            }
        }
    }
}

enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

/// What an admitted call carries until it completes.
#[derive(Debug)]
pub(crate) enum Permit {
    /// Not counted (forced closed), or already settled.
    Untracked,
    /// Counted in the closed (or metrics-only) state of generation `generation`;
    /// `started` is the start time in nanoseconds since the breaker's epoch (0 when
    /// the slow-call rule is off, so the clock is not read).
    Counted { generation: u32, started: u64 },
    /// A half-open probe of generation `generation`.
    Probe { generation: u32, started: u64 },
}

#[derive(Debug, Default)]
struct Transitions {
    /// Consecutive re-openings from half-open (drives the open-wait backoff).
    reopens: u32,
}

/// One breaker's shared state.
pub(crate) struct Breaker {
    /// The state word, in a slot response futures can reach without an `Arc`.
    slot: &'static Slot,
    pub(crate) config: Arc<Config>,
    window: Option<Window>,
    minimum_calls: u32,
    /// Whether a call needs a start time (slow-call rule).
    times_calls: bool,
    /// Open-until, in nanoseconds since `epoch`.
    open_until: AtomicU64,
    /// Half-open-until (the maximum half-open wait), in nanoseconds since `epoch`;
    /// `u64::MAX` when there is no such limit.
    half_open_until: AtomicU64,
    epoch: Instant,
    transitions: Mutex<Transitions>,
    watch: watch::Sender<CircuitState>,
    key: Option<Arc<str>>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state())
            .field("key", &self.key)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Breaker {
    /// A closed breaker (in a slot of its own until it is dropped).
    pub(crate) fn new(config: Arc<Config>, key: Option<Arc<str>>) -> Arc<Self> {
        let (window, minimum_calls) = match config.window {
            None => (None, u32::MAX),
            Some(WindowKind::Count(len)) => (
                Some(Window::Count(CountWindow::new(len))),
                config.minimum_calls.unwrap_or(len).min(len),
            ),
            Some(WindowKind::Time { span, buckets }) => {
                let buckets = buckets.max(1);
                let span = u64::try_from(span.as_nanos()).unwrap_or(u64::MAX);
                (
                    Some(Window::Time(TimeWindow::new(
                        span / u64::from(buckets),
                        buckets,
                    ))),
                    config.minimum_calls.unwrap_or(100),
                )
            }
        };
        Arc::new_cyclic(|owner| Breaker {
            slot: Slot::acquire(owner.clone()),
            times_calls: config.slow_call.is_some(),
            window,
            minimum_calls: minimum_calls.max(1),
            config,
            open_until: AtomicU64::new(0),
            half_open_until: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            transitions: Mutex::new(Transitions::default()),
            watch: watch::Sender::new(CircuitState::Closed),
            key,
        })
    }

    /// The slot of the state word, for a response future to record into.
    pub(crate) fn slot(&self) -> &'static Slot {
        self.slot
    }

    /// Whether a closed-state outcome is recorded in the state word alone (no
    /// sliding window to feed), so a response future needs only the slot.
    #[inline]
    pub(crate) fn records_in_slot(&self) -> bool {
        self.window.is_none()
    }

    /// The consecutive-failure threshold (0: rule off).
    #[inline]
    pub(crate) fn streak_threshold(&self) -> u32 {
        self.config.consecutive_failures
    }

    fn now_nanos(&self) -> u64 {
        u64::try_from(
            Instant::now()
                .saturating_duration_since(self.epoch)
                .as_nanos(),
        )
        .unwrap_or(u64::MAX)
    }

    pub(crate) fn state(&self) -> CircuitState {
        state_of(self.slot.word.load(Acquire))
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<CircuitState> {
        self.watch.subscribe()
    }

    pub(crate) fn stats(&self) -> CircuitStats {
        let counts = match &self.window {
            None => WindowCounts::default(),
            Some(Window::Count(w)) => w.counts(),
            Some(Window::Time(w)) => w.counts(self.now_nanos()),
        };
        let word = self.slot.word.load(Acquire);
        let state = state_of(word);
        CircuitStats {
            state,
            consecutive_failures: if is_counting(state) || state == CircuitState::Open {
                streak_of(word)
            } else {
                0
            },
            window_calls: counts.calls,
            window_failures: counts.failures,
            window_slow_calls: counts.slow,
        }
    }

    /// When a call started (nanoseconds since the epoch), read only when the
    /// slow-call rule needs it.
    #[inline]
    fn start_time(&self) -> u64 {
        if self.times_calls {
            self.now_nanos()
        } else {
            0
        }
    }

    /// Admits a call or says why not. Closed: one atomic load.
    #[inline]
    pub(crate) fn admit(&self) -> Result<Permit, Rejection> {
        let mut word = self.slot.word.load(Acquire);
        loop {
            match state_of(word) {
                CircuitState::Closed | CircuitState::MetricsOnly => {
                    return Ok(Permit::Counted {
                        generation: gen_of(word),
                        started: self.start_time(),
                    });
                }
                CircuitState::ForcedClosed => return Ok(Permit::Untracked),
                CircuitState::ForcedOpen => return Err(Rejection::ForcedOpen),
                CircuitState::Open => {
                    let now = self.now_nanos();
                    let until = self.open_until.load(Acquire);
                    if now < until {
                        return Err(Rejection::Open {
                            remaining_wait: Duration::from_nanos(until - now),
                        });
                    }
                    self.transition(
                        Some((gen_of(word), CircuitState::Open)),
                        CircuitState::HalfOpen,
                        TransitionReason::WaitElapsed,
                    );
                    word = self.slot.word.load(Acquire);
                }
                CircuitState::HalfOpen => {
                    // Probes that never answer must not hold the breaker half-open
                    // for good: past the maximum wait, reopen (checked here, like
                    // the open wait, so no timer task is needed).
                    if self.now_nanos() >= self.half_open_until.load(Acquire) {
                        self.transition(
                            Some((gen_of(word), CircuitState::HalfOpen)),
                            CircuitState::Open,
                            TransitionReason::HalfOpenWaitElapsed,
                        );
                        word = self.slot.word.load(Acquire);
                        continue;
                    }
                    let permitted = self.config.half_open_probes;
                    if admitted_of(word) >= u64::from(permitted) {
                        return Err(Rejection::HalfOpenFull {
                            permitted_probes: permitted,
                        });
                    }
                    let next = word + (1 << ADMITTED_SHIFT);
                    match self
                        .slot
                        .word
                        .compare_exchange_weak(word, next, AcqRel, Acquire)
                    {
                        Ok(_) => {
                            return Ok(Permit::Probe {
                                generation: gen_of(word),
                                started: self.start_time(),
                            });
                        }
                        Err(actual) => word = actual,
                    }
                }
            }
        }
    }

    fn is_slow(&self, started: u64) -> bool {
        match self.config.slow_call {
            Some((threshold, _)) => {
                Duration::from_nanos(self.now_nanos().saturating_sub(started)) >= threshold
            }
            None => false,
        }
    }

    /// Settles a permit with the call's outcome.
    #[inline]
    pub(crate) fn record(&self, permit: Permit, outcome: Outcome) {
        match permit {
            Permit::Untracked => {}
            Permit::Counted {
                generation,
                started,
            } => {
                if outcome != Outcome::Ignored {
                    self.record_counted(generation, started, outcome == Outcome::Failure);
                }
            }
            Permit::Probe {
                generation,
                started,
            } => match outcome {
                Outcome::Ignored => self.release_probe(generation),
                Outcome::Failure => self.probe_failed(generation),
                Outcome::Success if self.is_slow(started) => self.probe_failed(generation),
                Outcome::Success => self.probe_succeeded(generation),
            },
        }
    }

    #[inline]
    fn record_counted(&self, generation: u32, started: u64, failed: bool) {
        let word = self.slot.word.load(Acquire);
        let state = state_of(word);
        if gen_of(word) != generation || !is_counting(state) {
            return; // admitted under an earlier state: not this state's business
        }
        let mut trip = self
            .slot
            .record_streak(generation, failed, self.config.consecutive_failures)
            .map(|count| TransitionReason::ConsecutiveFailures { count });
        if let Some(window) = &self.window {
            let slow = self.is_slow(started);
            let counts = match window {
                Window::Count(w) => w.record(failed, slow, self.minimum_calls),
                Window::Time(w) => w.record(self.now_nanos(), failed, slow),
            };
            if let Some(counts) = counts {
                trip = trip.or_else(|| self.rate_trip(counts));
            }
        }
        if let Some(reason) = trip
            && state == CircuitState::Closed
        {
            self.open_from_closed(generation, reason);
        }
    }

    /// Opens the breaker if it is still closed in `generation`.
    pub(crate) fn open_from_closed(&self, generation: u32, reason: TransitionReason) {
        self.transition(
            Some((generation, CircuitState::Closed)),
            CircuitState::Open,
            reason,
        );
    }

    fn rate_trip(&self, counts: WindowCounts) -> Option<TransitionReason> {
        if counts.calls < self.minimum_calls || counts.calls == 0 {
            return None;
        }
        let calls = counts.calls;
        let rate = f64::from(counts.failures) / f64::from(calls);
        if counts.failures > 0 && rate >= self.config.failure_rate {
            return Some(TransitionReason::FailureRate { rate, calls });
        }
        let (_, slow_threshold) = self.config.slow_call?;
        let rate = f64::from(counts.slow) / f64::from(calls);
        (counts.slow > 0 && rate >= slow_threshold)
            .then_some(TransitionReason::SlowCallRate { rate, calls })
    }

    /// Applies `change` to the state word if it is still half-open in `generation`.
    fn update_probe_word(&self, generation: u32, change: impl Fn(u64) -> u64) -> Option<u64> {
        self.slot
            .word
            .fetch_update(AcqRel, Acquire, |word| {
                (gen_of(word) == generation && state_of(word) == CircuitState::HalfOpen)
                    .then(|| change(word))
            })
            .ok()
            .map(change)
    }

    /// Frees the slot of a probe that was cancelled or whose outcome is ignored.
    pub(crate) fn release_probe(&self, generation: u32) {
        self.update_probe_word(generation, |w| w - (1 << ADMITTED_SHIFT));
    }

    fn probe_failed(&self, generation: u32) {
        self.transition(
            Some((generation, CircuitState::HalfOpen)),
            CircuitState::Open,
            TransitionReason::ProbeFailed,
        );
    }

    fn probe_succeeded(&self, generation: u32) {
        let updated = self.update_probe_word(generation, |w| w + (1 << SUCCESS_SHIFT));
        if let Some(word) = updated
            && successes_of(word) >= u64::from(self.config.half_open_probes)
        {
            self.transition(
                Some((generation, CircuitState::HalfOpen)),
                CircuitState::Closed,
                TransitionReason::ProbesSucceeded,
            );
        }
    }

    pub(crate) fn force(&self, to: CircuitState) {
        self.transition(None, to, TransitionReason::Manual);
    }

    /// Moves to `to` if the breaker is still in `expect` (generation, state), or
    /// unconditionally when `expect` is `None`. Returns whether it moved.
    fn transition(
        &self,
        expect: Option<(u32, CircuitState)>,
        to: CircuitState,
        reason: TransitionReason,
    ) -> bool {
        let mut transitions = self
            .transitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let word = self.slot.word.load(Acquire);
        let from = state_of(word);
        if let Some((generation, state)) = expect
            && (gen_of(word) != generation || from != state)
        {
            return false;
        }
        match to {
            CircuitState::Open => {
                transitions.reopens = if from == CircuitState::HalfOpen {
                    transitions.reopens.saturating_add(1)
                } else {
                    0
                };
                let wait = self.config.open_wait_after(transitions.reopens);
                let wait = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
                // Reopened by the half-open limit: the open wait counts from the
                // moment the limit passed, as if a timer had fired then.
                let since = if reason == TransitionReason::HalfOpenWaitElapsed {
                    self.half_open_until.load(Acquire)
                } else {
                    self.now_nanos()
                };
                self.open_until.store(since.saturating_add(wait), Release);
            }
            CircuitState::HalfOpen => {
                let until = self.config.max_half_open_wait.map_or(u64::MAX, |wait| {
                    let wait = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
                    self.now_nanos().saturating_add(wait)
                });
                self.half_open_until.store(until, Release);
            }
            CircuitState::Closed | CircuitState::MetricsOnly => {
                if to == CircuitState::Closed {
                    transitions.reopens = 0;
                }
                match &self.window {
                    Some(Window::Count(w)) => w.clear(),
                    Some(Window::Time(w)) => w.clear(),
                    None => {}
                }
            }
            _ => {}
        }
        // The streak that opened the breaker stays readable while it is open.
        let streak = if from == CircuitState::Closed && to == CircuitState::Open {
            streak_of(word)
        } else {
            0
        };
        self.slot.word.store(next_word(word, to, streak), Release);

        let key = self.key.as_deref().unwrap_or("");
        let breaker = self.config.name.as_deref().unwrap_or("");
        if to == CircuitState::Open || to == CircuitState::ForcedOpen {
            tracing::warn!(breaker, from = %from, to = %to, reason = %reason, key, "circuit breaker state change");
        } else {
            tracing::info!(breaker, from = %from, to = %to, reason = %reason, key, "circuit breaker state change");
        }
        self.watch.send_replace(to);
        if let Some(hook) = &self.config.hook {
            hook(&StateChange {
                from,
                to,
                reason,
                key: self.key.clone(),
                breaker: self.config.name.clone(),
            });
        }
        drop(transitions);
        true
    }
}

impl Drop for Breaker {
    fn drop(&mut self) {
        self.slot.release();
    }
}
