//! The rotating latency window: a current and a previous histogram, rotated lazily.

use hdrhistogram::Histogram;
use std::time::Duration;
use tokio::time::Instant;

/// Longest latency tracked exactly: one hour. Longer calls are recorded as one hour.
pub(super) const HIGHEST_TRACKABLE_NANOS: u64 = 3_600 * 1_000_000_000;

/// Latencies of the last one to two intervals.
///
/// Calls are recorded into `current`; once `interval` has passed since
/// `current_start`, `current` becomes `previous` and a fresh `current` starts.
/// Quantiles are read from `previous + current`, so a reading always covers at least
/// one full interval (once one has passed) and at most two.
pub(super) struct Window {
    current: Histogram<u64>,
    previous: Histogram<u64>,
    current_start: Instant,
    interval: Duration,
}

impl Window {
    pub(super) fn new(interval: Duration, significant_figures: u8, now: Instant) -> Self {
        let histogram = new_histogram(significant_figures);
        Window {
            previous: histogram.clone(),
            current: histogram,
            current_start: now,
            interval,
        }
    }

    /// Moves the window forward to `now`, dropping what is older than one interval
    /// before the current one.
    #[inline]
    pub(super) fn rotate(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.current_start);
        if elapsed < self.interval {
            return;
        }
        let intervals = elapsed.as_nanos() / self.interval.as_nanos().max(1);
        if intervals == 1 {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.reset();
        } else {
            self.current.reset();
            self.previous.reset();
        }
        // Keep interval boundaries aligned to the first start; `intervals` is at
        // least 1 and the product is at most `elapsed`, so this cannot overflow.
        let step = self
            .interval
            .checked_mul(u32::try_from(intervals).unwrap_or(u32::MAX))
            .unwrap_or(elapsed);
        self.current_start += step.min(elapsed);
    }

    #[inline]
    pub(super) fn record(&mut self, latency: Duration, now: Instant) {
        self.rotate(now);
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.current.saturating_record(nanos);
    }

    /// Latency summary over `previous + current` as of `now`.
    pub(super) fn summary(&mut self, now: Instant) -> super::LatencySummary {
        self.rotate(now);
        let mut merged = self.previous.clone();
        // Same bounds and precision: adding cannot fail.
        let _ = merged.add(&self.current);
        let q = |quantile: f64| Duration::from_nanos(merged.value_at_quantile(quantile));
        super::LatencySummary {
            count: merged.len(),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: Duration::from_nanos(merged.max()),
            mean: Duration::from_nanos(merged.mean().round() as u64),
        }
    }
}

fn new_histogram(significant_figures: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_TRACKABLE_NANOS, significant_figures.clamp(1, 5))
        .expect("constant bounds and clamped precision are valid")
}
