//! Publish metrics: totals, average batch size, last publish, latency percentiles.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

// TSC clock: a latency reading costs a few ns instead of a clock_gettime call.
use quanta::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Counters and a latency histogram shared by every publish service of one
/// [`KafkaClient`](crate::kafka::client::KafkaClient).
///
/// Latency is recorded once per call (one event, or one whole batch), from the
/// call to the broker's last acknowledgement, in microseconds, in an
/// hdrhistogram with 3 significant digits (about 5 ns per record; one short
/// lock per call).
#[derive(Debug)]
pub struct PublishMetrics {
    published: AtomicU64,
    failed: AtomicU64,
    batches: AtomicU64,
    batch_events: AtomicU64,
    last_published_unix_ms: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
    /// Wall-clock origin: wall times are derived from monotonic readings the
    /// calls take anyway, so recording reads no extra clock.
    origin: Instant,
    origin_unix_ms: u64,
}

impl Default for PublishMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PublishMetrics {
    /// Empty metrics.
    pub fn new() -> Self {
        PublishMetrics {
            published: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            batch_events: AtomicU64::new(0),
            last_published_unix_ms: AtomicU64::new(0),
            // 1 µs .. 1 h, 3 significant digits.
            latency_us: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
            ),
            origin: Instant::now(),
            origin_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }

    /// Records one finished call, started at `started` and lasting `latency`:
    /// `published` events acknowledged, `failed` not.
    pub(crate) fn record_call(
        &self,
        published: u64,
        failed: u64,
        started: Instant,
        latency: Duration,
    ) {
        if published > 0 {
            self.published.fetch_add(published, Ordering::Relaxed);
            let end = (started + latency).saturating_duration_since(self.origin);
            let now = self.origin_unix_ms + end.as_millis() as u64;
            self.last_published_unix_ms
                .fetch_max(now, Ordering::Relaxed);
        }
        if failed > 0 {
            self.failed.fetch_add(failed, Ordering::Relaxed);
        }
        let micros = (latency.as_micros() as u64).clamp(1, 3_600_000_000);
        if let Ok(mut h) = self.latency_us.lock() {
            let _ = h.record(micros);
        }
    }

    /// Records that a batch of `size` events was submitted.
    pub(crate) fn record_batch(&self, size: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batch_events.fetch_add(size as u64, Ordering::Relaxed);
    }

    /// Records events that failed before any call reached Kafka (refused batches).
    pub(crate) fn record_refused(&self, events: u64) {
        self.failed.fetch_add(events, Ordering::Relaxed);
    }

    /// A consistent-enough copy of every figure.
    pub fn snapshot(&self) -> PublishMetricsSnapshot {
        let batches = self.batches.load(Ordering::Relaxed);
        let batch_events = self.batch_events.load(Ordering::Relaxed);
        let last = self.last_published_unix_ms.load(Ordering::Relaxed);
        let (count, p50, p90, p99, p999, max) = match self.latency_us.lock() {
            Ok(h) if !h.is_empty() => (
                h.len(),
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999),
                h.max(),
            ),
            _ => (0, 0, 0, 0, 0, 0),
        };
        PublishMetricsSnapshot {
            total_published: self.published.load(Ordering::Relaxed),
            total_failed: self.failed.load(Ordering::Relaxed),
            total_batches: batches,
            average_batch_size: if batches == 0 {
                0.0
            } else {
                batch_events as f64 / batches as f64
            },
            last_published_at_unix_ms: (last != 0).then_some(last),
            latency: LatencyPercentiles {
                calls: count,
                p50_us: p50,
                p90_us: p90,
                p99_us: p99,
                p999_us: p999,
                max_us: max,
            },
        }
    }
}

/// A copy of the publish metrics; serializes in the seed's camelCase shape.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishMetricsSnapshot {
    /// Events the broker acknowledged.
    pub total_published: u64,
    /// Events that failed (refused, not serializable, not acknowledged).
    pub total_failed: u64,
    /// Batch publishes submitted.
    pub total_batches: u64,
    /// Mean events per batch publish (single-event publishes excluded).
    pub average_batch_size: f64,
    /// When the last acknowledgement arrived, ms since the Unix epoch.
    pub last_published_at_unix_ms: Option<u64>,
    /// Publish latency per call, call to last acknowledgement.
    pub latency: LatencyPercentiles,
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LatencyPercentiles {
    /// Calls recorded.
    pub calls: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_and_percentiles() {
        let m = PublishMetrics::new();
        assert_eq!(m.snapshot().average_batch_size, 0.0);
        assert_eq!(m.snapshot().last_published_at_unix_ms, None);
        m.record_batch(10);
        m.record_batch(30);
        let t = Instant::now();
        m.record_call(40, 0, t, Duration::from_millis(2));
        m.record_call(1, 0, t, Duration::from_millis(4));
        m.record_call(0, 1, t, Duration::from_millis(100));
        m.record_refused(5);
        let s = m.snapshot();
        assert_eq!(s.total_published, 41);
        assert_eq!(s.total_failed, 6);
        assert_eq!(s.total_batches, 2);
        assert_eq!(s.average_batch_size, 20.0);
        let wall_now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let last = s.last_published_at_unix_ms.unwrap();
        assert!(
            last <= wall_now + 1_000 && last + 60_000 >= wall_now,
            "{last} vs {wall_now}"
        );
        assert_eq!(s.latency.calls, 3);
        assert!(
            (3_990..=4_010).contains(&s.latency.p50_us),
            "{:?}",
            s.latency
        );
        assert!(s.latency.max_us >= 99_000);
    }
}
