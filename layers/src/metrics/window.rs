//! The rotating latency window: a current and a previous histogram, rotated lazily.

use hdrhistogram::Histogram;
use std::time::Duration;

/// Longest latency tracked exactly: one hour. Longer calls are recorded as one hour.
pub(super) const HIGHEST_TRACKABLE_NANOS: u64 = 3_600 * 1_000_000_000;

/// Latencies of the last one to two intervals.
///
/// Calls are recorded into `current`; once `interval` has passed since
/// `current_start`, `current` becomes `previous` and a fresh `current` starts.
/// Quantiles are read from `previous + current`, so a reading always covers at least
/// one full interval (once one has passed) and at most two. Times are nanoseconds
/// on the layer's [`LatencyClock`](super::LatencyClock).
#[derive(Clone)]
pub(super) struct Window {
    current: Histogram<u64>,
    previous: Histogram<u64>,
    current_start: u64,
    interval: u64,
}

impl Window {
    pub(super) fn new(interval: Duration, significant_figures: u8, now: u64) -> Self {
        let histogram = new_histogram(significant_figures);
        Window {
            previous: histogram.clone(),
            current: histogram,
            current_start: now,
            interval: super::clock::nanos(interval).max(1),
        }
    }

    /// Moves the window forward to `now`, dropping what is older than one interval
    /// before the current one.
    #[inline]
    pub(super) fn rotate(&mut self, now: u64) {
        let elapsed = now.saturating_sub(self.current_start);
        if elapsed < self.interval {
            return;
        }
        let intervals = elapsed / self.interval;
        if intervals == 1 {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.reset();
        } else {
            self.current.reset();
            self.previous.reset();
        }
        // Keep interval boundaries aligned; `intervals * interval <= elapsed`.
        self.current_start += intervals * self.interval;
    }

    #[inline]
    pub(super) fn record(&mut self, latency: u64, now: u64) {
        self.rotate(now);
        self.current.saturating_record(latency);
    }

    /// Adds `previous + current` as of `now` into `into`, which must have the same
    /// precision (the windows of one layer all do).
    pub(super) fn add_into(&mut self, into: &mut Option<Histogram<u64>>, now: u64) {
        self.rotate(now);
        let into = into.get_or_insert_with(|| {
            let mut empty = self.current.clone();
            empty.reset();
            empty
        });
        // Same bounds and precision: adding cannot fail.
        let _ = into.add(&self.previous);
        let _ = into.add(&self.current);
    }
}

/// Latency summary of a merged window.
pub(super) fn summary(merged: &Histogram<u64>) -> super::LatencySummary {
    // hdrhistogram reports a bucket's highest value; its middle is closer to
    // what was recorded.
    let middle = |value: u64| Duration::from_nanos(merged.median_equivalent(value));
    let q = |quantile: f64| middle(merged.value_at_quantile(quantile));
    if merged.is_empty() {
        return super::LatencySummary::default();
    }
    super::LatencySummary {
        count: merged.len(),
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        p999: q(0.999),
        max: middle(merged.max()),
        mean: Duration::from_nanos(merged.mean().round() as u64),
    }
}

fn new_histogram(significant_figures: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_TRACKABLE_NANOS, significant_figures.clamp(1, 5))
        .expect("constant bounds and clamped precision are valid")
}
