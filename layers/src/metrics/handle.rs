//! The state shared by every service of one layer, the handle that reads it, and the
//! snapshot it produces.

use super::clock::LatencyClock;
use super::window::Window;
use crate::classify::{Classification, Outcome};
use parking_lot::Mutex;
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// At most this many distinct failure classes are counted separately; further
/// classes are counted under [`OTHER_CLASS`]. Classes are meant to be a handful of
/// static labels, this only bounds memory if a classifier misbehaves.
pub const MAX_FAILURE_CLASSES: usize = 32;

/// The class that absorbs failures beyond [`MAX_FAILURE_CLASSES`] distinct classes.
pub const OTHER_CLASS: &str = "other";

/// The default latency window: quantiles cover the last 60 to 120 seconds.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// The default histogram precision: two significant figures (values within 1 %).
pub const DEFAULT_SIGNIFICANT_FIGURES: u8 = 2;

pub(super) struct Shared {
    calls: AtomicU64,
    in_flight: AtomicU64,
    cancelled: AtomicU64,
    last_success_ms: AtomicU64,
    last_failure_ms: AtomicU64,
    /// Wall clock when `clock` read zero, in unix milliseconds: wall times are
    /// derived from the monotonic end-of-call reading, so a call reads the clock
    /// only twice.
    origin_wall_ms: u64,
    pub(super) clock: LatencyClock,
    completions: Mutex<Completions>,
}

struct Completions {
    successes: u64,
    failures: u64,
    ignored: u64,
    latency_sum_nanos: u64,
    failures_by_class: Vec<(&'static str, u64)>,
    window: Window,
}

impl Shared {
    pub(super) fn new(window: Duration, significant_figures: u8, clock: LatencyClock) -> Self {
        let origin = clock.now_nanos();
        let origin_wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Shared {
            calls: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            last_success_ms: AtomicU64::new(0),
            last_failure_ms: AtomicU64::new(0),
            origin_wall_ms: origin_wall_ms.saturating_sub(origin / 1_000_000),
            clock,
            completions: Mutex::new(Completions {
                successes: 0,
                failures: 0,
                ignored: 0,
                latency_sum_nanos: 0,
                failures_by_class: Vec::new(),
                window: Window::new(
                    window.max(Duration::from_millis(1)),
                    significant_figures,
                    origin,
                ),
            }),
        }
    }

    #[inline]
    pub(super) fn start(&self) {
        self.calls.fetch_add(1, Relaxed);
        self.in_flight.fetch_add(1, Relaxed);
    }

    #[inline]
    pub(super) fn cancel(&self) {
        self.in_flight.fetch_sub(1, Relaxed);
        self.cancelled.fetch_add(1, Relaxed);
    }

    #[inline]
    fn wall_ms(&self, now: u64) -> u64 {
        self.origin_wall_ms.saturating_add(now / 1_000_000)
    }

    #[inline]
    pub(super) fn complete(&self, verdict: Classification, start: u64, now: u64) {
        let latency = now.saturating_sub(start);
        self.in_flight.fetch_sub(1, Relaxed);
        match verdict.outcome {
            Outcome::Success => self.last_success_ms.store(self.wall_ms(now), Relaxed),
            Outcome::Failure => self.last_failure_ms.store(self.wall_ms(now), Relaxed),
            Outcome::Ignored => {}
        }
        let mut c = self.completions.lock();
        match verdict.outcome {
            Outcome::Success => c.successes += 1,
            Outcome::Ignored => c.ignored += 1,
            Outcome::Failure => {
                c.failures += 1;
                c.count_failure(verdict.class);
            }
        }
        c.latency_sum_nanos = c.latency_sum_nanos.saturating_add(latency);
        c.window.record(latency, now);
    }
}

impl Completions {
    fn count_failure(&mut self, class: &'static str) {
        if let Some(entry) = self.failures_by_class.iter_mut().find(|(c, _)| *c == class) {
            entry.1 += 1;
            return;
        }
        if self.failures_by_class.len() < MAX_FAILURE_CLASSES - 1 {
            self.failures_by_class.push((class, 1));
            return;
        }
        match self
            .failures_by_class
            .iter_mut()
            .find(|(c, _)| *c == OTHER_CLASS)
        {
            Some(entry) => entry.1 += 1,
            None => self.failures_by_class.push((OTHER_CLASS, 1)),
        }
    }
}

/// A cloneable handle on the counters of one [`MetricsLayer`](super::MetricsLayer):
/// every service the layer builds, and every clone of those services, count into the
/// same state, which this handle reads.
#[derive(Clone)]
pub struct MetricsHandle {
    pub(super) shared: Arc<Shared>,
}

impl fmt::Debug for MetricsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsHandle")
            .field("calls", &self.shared.calls.load(Relaxed))
            .field("in_flight", &self.shared.in_flight.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl MetricsHandle {
    /// Fresh, zeroed metrics with the given latency window, histogram precision
    /// (significant figures, clamped to 1..=5) and clock.
    pub fn new(window: Duration, significant_figures: u8, clock: LatencyClock) -> Self {
        MetricsHandle {
            shared: Arc::new(Shared::new(window, significant_figures, clock)),
        }
    }

    /// Calls currently running (started and neither completed nor dropped).
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Relaxed)
    }

    /// A consistent-enough copy of all counters and the latency summary.
    ///
    /// Takes the lock the services record under for the time it takes to merge two
    /// histograms (microseconds); meant for a scrape every few seconds, not per call.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let shared = &*self.shared;
        let now = shared.clock.now_nanos();
        let mut c = shared.completions.lock();
        let latency = c.window.summary(now);
        let snapshot = MetricsSnapshot {
            calls: shared.calls.load(Relaxed),
            successes: c.successes,
            failures: c.failures,
            ignored: c.ignored,
            cancelled: shared.cancelled.load(Relaxed),
            in_flight: shared.in_flight.load(Relaxed),
            failures_by_class: c.failures_by_class.iter().copied().collect(),
            last_success_unix_ms: nonzero(shared.last_success_ms.load(Relaxed)),
            last_failure_unix_ms: nonzero(shared.last_failure_ms.load(Relaxed)),
            latency_sum: Duration::from_nanos(c.latency_sum_nanos),
            latency,
        };
        drop(c);
        snapshot
    }
}

fn nonzero(ms: u64) -> Option<u64> {
    (ms != 0).then_some(ms)
}

/// Counters and latencies of one layer at one moment; see [`MetricsHandle::snapshot`].
///
/// Serializes (serde) with durations as fractional seconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricsSnapshot {
    /// Calls started.
    pub calls: u64,
    /// Calls classified as successes.
    pub successes: u64,
    /// Calls classified as failures.
    pub failures: u64,
    /// Calls classified as neither.
    pub ignored: u64,
    /// Calls whose future was dropped before completing (for example by a timeout
    /// outside this layer or a client hanging up).
    pub cancelled: u64,
    /// Calls running now. `calls = successes + failures + ignored + cancelled +
    /// in_flight`, up to calls racing with the snapshot.
    pub in_flight: u64,
    /// Failures by [`Classification::class`].
    pub failures_by_class: BTreeMap<&'static str, u64>,
    /// When the last success completed, unix milliseconds.
    pub last_success_unix_ms: Option<u64>,
    /// When the last failure completed, unix milliseconds.
    pub last_failure_unix_ms: Option<u64>,
    /// Total latency of all completed calls since the start (for a Prometheus
    /// summary's `_sum`).
    #[serde(serialize_with = "secs")]
    pub latency_sum: Duration,
    /// Latency quantiles over the rotating window.
    pub latency: LatencySummary,
}

impl MetricsSnapshot {
    /// Completed calls: successes, failures and ignored.
    pub fn completed(&self) -> u64 {
        self.successes + self.failures + self.ignored
    }
}

/// Latency quantiles of the calls completed in the last one to two window intervals.
///
/// All zero when `count` is zero. Values are accurate to the histogram's precision
/// (1 % with the default two significant figures).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LatencySummary {
    /// Calls in the window.
    pub count: u64,
    /// Median.
    #[serde(serialize_with = "secs")]
    pub p50: Duration,
    /// 90th percentile.
    #[serde(serialize_with = "secs")]
    pub p90: Duration,
    /// 99th percentile.
    #[serde(serialize_with = "secs")]
    pub p99: Duration,
    /// 99.9th percentile.
    #[serde(serialize_with = "secs")]
    pub p999: Duration,
    /// Slowest call.
    #[serde(serialize_with = "secs")]
    pub max: Duration,
    /// Mean.
    #[serde(serialize_with = "secs")]
    pub mean: Duration,
}

fn secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}
