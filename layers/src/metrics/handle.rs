//! The state shared by every service of one layer, the handle that reads it, and the
//! snapshot it produces.
//!
//! Calls are recorded per thread: each thread that calls the services of one layer
//! gets its own [`Recorder`] (through the `thread_local` crate), so two threads never
//! write the same cache line and take no shared lock. A snapshot adds the recorders
//! up.

use super::buckets::{Buckets, DEFAULT_BUCKETS, OutcomeHistograms};
use super::clock::LatencyClock;
use super::exemplar::{Exemplar, SharedSource, Stored};
use super::window::{Window, summary};
use crate::classify::{Classification, Outcome};
use parking_lot::Mutex;
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use thread_local::ThreadLocal;

/// At most this many distinct failure classes are counted separately; further
/// classes are counted under [`OTHER_CLASS`]. Classes are meant to be a handful of
/// static labels, this only bounds memory if a classifier misbehaves.
pub const MAX_FAILURE_CLASSES: usize = 32;

/// The class that absorbs failures beyond [`MAX_FAILURE_CLASSES`] distinct classes.
pub const OTHER_CLASS: &str = "other";

/// The default latency window of the optional percentiles: they cover the last 60
/// to 120 seconds.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// The default precision of the optional percentiles: two significant figures
/// (values within 1 %).
pub const DEFAULT_SIGNIFICANT_FIGURES: u8 = 2;

/// The optional HdrHistogram percentiles: window and precision.
#[derive(Clone, Copy, Debug)]
pub(super) struct Percentiles {
    pub(super) window: Duration,
    pub(super) significant_figures: u8,
}

/// What every recorder of one layer shares: set once, read only.
pub(super) struct Config {
    pub(super) clock: LatencyClock,
    /// Wall clock when `clock` read zero, in unix milliseconds: wall times are
    /// derived from the monotonic end-of-call reading, so a call reads the clock
    /// only twice.
    origin_wall_ms: u64,
    origin: u64,
    buckets: Buckets,
    percentiles: Option<Percentiles>,
    exemplars: Option<SharedSource>,
}

pub(super) struct Shared {
    pub(super) config: Arc<Config>,
    threads: ThreadLocal<Arc<Recorder>>,
}

/// One thread's counters.
///
/// Written by the thread that owns it, and by another thread only when a call
/// started here completes (or is dropped) there, which is why the counters are
/// atomics (relaxed: each is a plain count, no ordering between them is relied on).
/// The lock guards the rarely used parts: failure classes, and the percentile
/// window when enabled; a snapshot takes it briefly.
pub(super) struct Recorder {
    pub(super) config: Arc<Config>,
    started: AtomicU64,
    cancelled: AtomicU64,
    /// End of the last success / failure on `clock`, plus one (0: never); turned
    /// into wall time by a snapshot, so a call does no division.
    last_success: AtomicU64,
    last_failure: AtomicU64,
    histograms: OutcomeHistograms,
    slow: Mutex<Slow>,
}

struct Slow {
    failures_by_class: Vec<(&'static str, u64)>,
    window: Option<Window>,
    /// With an exemplar source: per outcome (success, failure, ignored), per
    /// bucket, the latest call that had a trace.
    exemplars: Vec<Option<Stored>>,
}

impl Config {
    /// Unix milliseconds of a `last_*` reading (`clock` nanoseconds plus one).
    fn wall_ms(&self, reading: u64) -> Option<u64> {
        let now = reading.checked_sub(1)?;
        Some(self.origin_wall_ms.saturating_add(now / 1_000_000))
    }
}

impl Shared {
    pub(super) fn new(
        clock: LatencyClock,
        buckets: Buckets,
        percentiles: Option<Percentiles>,
        exemplars: Option<SharedSource>,
    ) -> Self {
        let origin = clock.now_nanos();
        let origin_wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Shared {
            config: Arc::new(Config {
                clock,
                origin_wall_ms: origin_wall_ms.saturating_sub(origin / 1_000_000),
                origin,
                buckets,
                percentiles,
                exemplars,
            }),
            threads: ThreadLocal::new(),
        }
    }

    /// This thread's recorder, created on the thread's first call.
    #[inline]
    pub(super) fn recorder(&self) -> &Arc<Recorder> {
        self.threads
            .get_or(|| Arc::new(Recorder::new(self.config.clone())))
    }
}

impl Recorder {
    fn new(config: Arc<Config>) -> Self {
        let window = config.percentiles.map(|p| {
            Window::new(
                p.window.max(Duration::from_millis(1)),
                p.significant_figures,
                config.origin,
            )
        });
        Recorder {
            started: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            last_success: AtomicU64::new(0),
            last_failure: AtomicU64::new(0),
            histograms: OutcomeHistograms::new(&config.buckets),
            slow: Mutex::new(Slow {
                failures_by_class: Vec::new(),
                window,
                exemplars: if config.exemplars.is_some() {
                    vec![None; 3 * (config.buckets.len() + 1)]
                } else {
                    Vec::new()
                },
            }),
            config,
        }
    }

    #[inline]
    pub(super) fn start(&self) {
        self.started.fetch_add(1, Relaxed);
    }

    #[inline]
    pub(super) fn cancel(&self) {
        self.cancelled.fetch_add(1, Relaxed);
    }

    #[inline]
    pub(super) fn complete(&self, verdict: Classification, start: u64, now: u64) {
        let latency = now.saturating_sub(start);
        let config = &*self.config;
        let index = config.buckets.index(latency);
        match verdict.outcome {
            Outcome::Success => {
                self.last_success.store(now.saturating_add(1), Relaxed);
                self.histograms.success.record(index, latency);
            }
            Outcome::Ignored => self.histograms.ignored.record(index, latency),
            Outcome::Failure => {
                self.last_failure.store(now.saturating_add(1), Relaxed);
                self.histograms.failure.record(index, latency);
                self.slow.lock().count_failure(verdict.class);
            }
        }
        if config.percentiles.is_some() {
            self.record_percentile(latency, now);
        }
        if let Some(source) = &config.exemplars {
            self.record_exemplar(source, verdict.outcome, index, latency, now);
        }
    }

    fn record_exemplar(
        &self,
        source: &SharedSource,
        outcome: Outcome,
        index: usize,
        latency: u64,
        now: u64,
    ) {
        let Some(trace) = source.0.current() else {
            return;
        };
        let slot = outcome_slot(outcome) * (self.config.buckets.len() + 1) + index;
        if let Some(stored) = self.slow.lock().exemplars.get_mut(slot) {
            *stored = Some(Stored {
                trace,
                latency,
                at: now,
            });
        }
    }

    #[cold]
    fn record_percentile(&self, latency: u64, now: u64) {
        if let Some(window) = &mut self.slow.lock().window {
            window.record(latency, now);
        }
    }
}

fn outcome_slot(outcome: Outcome) -> usize {
    match outcome {
        Outcome::Success => 0,
        Outcome::Failure => 1,
        Outcome::Ignored => 2,
    }
}

impl Slow {
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
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl MetricsHandle {
    /// Fresh, zeroed metrics with the default histogram buckets
    /// ([`DEFAULT_BUCKETS`](super::DEFAULT_BUCKETS)), HdrHistogram percentiles over
    /// the given window and precision (significant figures, clamped to 1..=5), and
    /// the given clock. [`MetricsLayer::builder`](super::MetricsLayer::builder)
    /// offers every option.
    pub fn new(window: Duration, significant_figures: u8, clock: LatencyClock) -> Self {
        Self::with(
            clock,
            Buckets::new(DEFAULT_BUCKETS),
            Some(Percentiles {
                window,
                significant_figures,
            }),
            None,
        )
    }

    pub(super) fn with(
        clock: LatencyClock,
        buckets: Buckets,
        percentiles: Option<Percentiles>,
        exemplars: Option<SharedSource>,
    ) -> Self {
        MetricsHandle {
            shared: Arc::new(Shared::new(clock, buckets, percentiles, exemplars)),
        }
    }

    /// Calls currently running (started and neither completed nor dropped).
    pub fn in_flight(&self) -> u64 {
        let (mut started, mut ended) = (0_u64, 0_u64);
        for r in self.shared.threads.iter() {
            started = started.wrapping_add(r.started.load(Relaxed));
            ended = ended
                .wrapping_add(r.cancelled.load(Relaxed))
                .wrapping_add(r.histograms.completed());
        }
        // A call may start on one thread and end on another; the sum is exact once
        // both were read, and never shown below zero while they race.
        started.saturating_sub(ended)
    }

    /// A consistent-enough copy of all counters and histograms, added up over the
    /// threads that recorded.
    ///
    /// Takes each thread's lock for the time it takes to copy its failure classes
    /// (and, with percentiles, to merge two histograms: microseconds); meant for a
    /// scrape every few seconds, not per call. Counters are read one by one while
    /// calls go on, so `calls` may run ahead of the completions by the calls that
    /// raced with the snapshot.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let config = &*self.shared.config;
        let now = config.clock.now_nanos();
        let mut calls = 0_u64;
        let mut cancelled = 0_u64;
        let mut last_success = 0_u64;
        let mut last_failure = 0_u64;
        let mut histograms = LatencyHistograms::empty(&config.buckets, config.exemplars.is_some());
        let mut classes: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut merged: Option<hdrhistogram::Histogram<u64>> = None;
        for r in self.shared.threads.iter() {
            let mut slow = r.slow.lock();
            // Read the completions before `started`, so no completion is counted
            // without its start.
            histograms.add(&r.histograms);
            calls += r.started.load(Relaxed);
            cancelled += r.cancelled.load(Relaxed);
            last_success = last_success.max(r.last_success.load(Relaxed));
            last_failure = last_failure.max(r.last_failure.load(Relaxed));
            for (class, n) in &slow.failures_by_class {
                *classes.entry(class).or_default() += n;
            }
            if let Some(window) = &mut slow.window {
                window.add_into(&mut merged, now);
            }
            histograms.add_exemplars(&slow.exemplars, config);
        }
        // Threads that recorded more than MAX_FAILURE_CLASSES classes between them:
        // fold the rarest into `other`, so the snapshot keeps the same bound.
        if classes.len() > MAX_FAILURE_CLASSES {
            let mut by_count: Vec<(&'static str, u64)> = classes.into_iter().collect();
            by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            let mut kept: BTreeMap<&'static str, u64> = BTreeMap::new();
            for (class, n) in by_count {
                if kept.len() < MAX_FAILURE_CLASSES - 1 || kept.contains_key(class) {
                    *kept.entry(class).or_default() += n;
                } else {
                    *kept.entry(OTHER_CLASS).or_default() += n;
                }
            }
            classes = kept;
        }
        let completed = histograms.count();
        let in_flight = calls.saturating_sub(completed + cancelled);
        MetricsSnapshot {
            calls: calls.max(completed + cancelled),
            successes: histograms.success.count,
            failures: histograms.failure.count,
            ignored: histograms.ignored.count,
            cancelled,
            in_flight,
            failures_by_class: classes,
            last_success_unix_ms: config.wall_ms(last_success),
            last_failure_unix_ms: config.wall_ms(last_failure),
            latency_sum: Duration::from_nanos(histograms.sum_nanos()),
            latency: config
                .percentiles
                .map(|_| merged.as_ref().map(summary).unwrap_or_default()),
            histograms,
        }
    }
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
    /// Total latency of all completed calls since the start.
    #[serde(serialize_with = "secs")]
    pub latency_sum: Duration,
    /// Latency histograms by outcome since the start, with fixed bucket bounds:
    /// what a Prometheus histogram exposes, and what adds up across instances.
    pub histograms: LatencyHistograms,
    /// HdrHistogram percentiles over the rotating window, when enabled
    /// ([`MetricsLayerBuilder::percentiles`](super::MetricsLayerBuilder::percentiles)).
    pub latency: Option<LatencySummary>,
}

impl MetricsSnapshot {
    /// Completed calls: successes, failures and ignored.
    pub fn completed(&self) -> u64 {
        self.successes + self.failures + self.ignored
    }
}

/// A cumulative latency histogram: counts per bucket, their total and the sum.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Histogram {
    /// Calls per bucket: `buckets[i]` counts the calls with a latency at most
    /// `bounds[i]` and above `bounds[i - 1]`; the last entry counts those above
    /// every bound (Prometheus' `+Inf` bucket). Not cumulative.
    pub buckets: Vec<u64>,
    /// Calls recorded: the sum of `buckets`.
    pub count: u64,
    /// Sum of the latencies, nanoseconds.
    pub sum_nanos: u64,
    /// Per bucket (same indexes as `buckets`), the latest call recorded there
    /// that had a trace; empty unless the layer has an
    /// [`ExemplarSource`](super::ExemplarSource)
    /// ([`MetricsLayerBuilder::exemplars`](super::MetricsLayerBuilder::exemplars)).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exemplars: Vec<Option<Exemplar>>,
}

impl Histogram {
    /// The sum of the latencies.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_nanos)
    }

    /// `(upper bound, cumulative count)` pairs, the last bound `None` for `+Inf`:
    /// the `_bucket{le=…}` samples of Prometheus.
    pub fn cumulative<'a>(
        &'a self,
        bounds: &'a [Duration],
    ) -> impl Iterator<Item = (Option<Duration>, u64)> + 'a {
        let mut running = 0_u64;
        self.buckets.iter().enumerate().map(move |(i, n)| {
            running += n;
            (bounds.get(i).copied(), running)
        })
    }
}

/// The latency histograms of one layer, by outcome, and their bucket bounds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LatencyHistograms {
    /// Upper bounds of the buckets, ascending; see
    /// [`MetricsLayerBuilder::buckets`](super::MetricsLayerBuilder::buckets).
    #[serde(serialize_with = "secs_list")]
    pub bounds: Vec<Duration>,
    /// Calls classified as successes.
    pub success: Histogram,
    /// Calls classified as failures.
    pub failure: Histogram,
    /// Calls classified as neither.
    pub ignored: Histogram,
}

impl LatencyHistograms {
    fn empty(buckets: &Buckets, buckets_exemplars: bool) -> Self {
        let empty = Histogram {
            buckets: vec![0; buckets.len() + 1],
            count: 0,
            sum_nanos: 0,
            exemplars: if buckets_exemplars {
                vec![None; buckets.len() + 1]
            } else {
                Vec::new()
            },
        };
        LatencyHistograms {
            bounds: buckets.bounds(),
            success: empty.clone(),
            failure: empty.clone(),
            ignored: empty,
        }
    }

    fn add(&mut self, from: &OutcomeHistograms) {
        from.success.add_to(&mut self.success);
        from.failure.add_to(&mut self.failure);
        from.ignored.add_to(&mut self.ignored);
    }

    /// Keeps, per bucket, the later of the exemplar here and the recorder's.
    fn add_exemplars(&mut self, stored: &[Option<Stored>], config: &Config) {
        if stored.is_empty() {
            return;
        }
        let per_outcome = stored.len() / 3;
        for (i, histogram) in [&mut self.success, &mut self.failure, &mut self.ignored]
            .into_iter()
            .enumerate()
        {
            let from = stored.iter().skip(i * per_outcome).take(per_outcome);
            for (into, from) in histogram.exemplars.iter_mut().zip(from) {
                let Some(s) = from else { continue };
                let unix_ms = config.wall_ms(s.at.saturating_add(1)).unwrap_or(0);
                if into.is_none_or(|e| e.unix_ms <= unix_ms) {
                    *into = Some(Exemplar {
                        trace: s.trace,
                        latency: Duration::from_nanos(s.latency),
                        unix_ms,
                    });
                }
            }
        }
    }

    /// Completed calls, all outcomes.
    pub fn count(&self) -> u64 {
        self.success.count + self.failure.count + self.ignored.count
    }

    fn sum_nanos(&self) -> u64 {
        self.success
            .sum_nanos
            .saturating_add(self.failure.sum_nanos)
            .saturating_add(self.ignored.sum_nanos)
    }

    /// The histogram of one outcome.
    pub fn outcome(&self, outcome: Outcome) -> &Histogram {
        match outcome {
            Outcome::Success => &self.success,
            Outcome::Failure => &self.failure,
            Outcome::Ignored => &self.ignored,
        }
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

fn secs_list<S: Serializer>(d: &[Duration], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(d.iter().map(Duration::as_secs_f64))
}

// The completions counted in a recorder, for `in_flight`.
impl OutcomeHistograms {
    fn completed(&self) -> u64 {
        self.success.count() + self.failure.count() + self.ignored.count()
    }
}
