//! [`S3Metrics`]: the seed's S3 counters (uploads, downloads, deletes, failed,
//! last operation at) plus bytes up and down and latency per operation.
//!
//! Counted once per facade call (a retried call counts once; the retry layer's
//! own metrics count attempts). Counters are atomics; the latency table takes a
//! short lock per call, which is nothing beside a network round trip. Cloning an
//! `S3Metrics` shares the counters.
//!
//! ```
//! use keel::s3::metrics::S3Metrics;
//! use keel::s3::error::S3Operation;
//! use std::time::Duration;
//!
//! let metrics = S3Metrics::default();
//! metrics.record(S3Operation::Upload, Duration::from_millis(12), true);
//! metrics.add_bytes_uploaded(1024);
//! let snapshot = metrics.snapshot();
//! assert_eq!(snapshot.total_uploads, 1);
//! assert_eq!(snapshot.bytes_uploaded, 1024);
//! assert_eq!(snapshot.latency["upload"].count, 1);
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::error::S3Operation;
use keel_layers::metrics::DEFAULT_BUCKETS;

/// Shared S3 counters; see the [module docs](self).
#[derive(Clone, Debug, Default)]
pub struct S3Metrics {
    inner: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    uploads: AtomicU64,
    downloads: AtomicU64,
    deletes: AtomicU64,
    failed: AtomicU64,
    bytes_uploaded: AtomicU64,
    bytes_downloaded: AtomicU64,
    /// Milliseconds since the Unix epoch; 0 = never.
    last_operation_ms: AtomicU64,
    latency: Mutex<BTreeMap<&'static str, LatencySummary>>,
}

/// Latency of one operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LatencySummary {
    /// Calls measured.
    pub count: u64,
    /// Sum of their durations.
    pub total: Duration,
    /// The fastest.
    pub min: Duration,
    /// The slowest.
    pub max: Duration,
    /// The latest.
    pub last: Duration,
    /// Calls that failed.
    pub failures: u64,
    /// Calls per latency bucket: `buckets[i]` counts those at most
    /// [`DEFAULT_BUCKETS`]`[i]` (and above the bound before); the last entry those
    /// above every bound. Not cumulative. The bounds are the metrics layer's
    /// defaults, so S3 histograms aggregate like the layers' do.
    pub buckets: [u64; BUCKETS],
}

/// Entries of [`LatencySummary::buckets`]: one per bound of [`DEFAULT_BUCKETS`],
/// plus the overflow bucket.
pub const BUCKETS: usize = 19;

const _: () = assert!(DEFAULT_BUCKETS.len() + 1 == BUCKETS);

impl LatencySummary {
    /// Mean duration, zero when nothing was measured.
    pub fn mean(&self) -> Duration {
        match u32::try_from(self.count) {
            Ok(0) => Duration::ZERO,
            Ok(n) => self.total / n,
            Err(_) => Duration::from_secs_f64(self.total.as_secs_f64() / self.count as f64),
        }
    }

    fn add(&mut self, d: Duration, ok: bool) {
        self.min = if self.count == 0 { d } else { self.min.min(d) };
        self.count += 1;
        if !ok {
            self.failures += 1;
        }
        let bucket = DEFAULT_BUCKETS
            .iter()
            .position(|bound| d <= *bound)
            .unwrap_or(DEFAULT_BUCKETS.len());
        self.buckets[bucket] += 1;
        self.total += d;
        self.max = self.max.max(d);
        self.last = d;
    }
}

/// A point-in-time copy of [`S3Metrics`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct S3MetricsSnapshot {
    /// Successful uploads.
    pub total_uploads: u64,
    /// Successful downloads (counted when the object's headers arrive).
    pub total_downloads: u64,
    /// Successful deletes (one per key for batch deletes).
    pub total_deletes: u64,
    /// Failed operations of any kind.
    pub total_failed: u64,
    /// Bytes uploaded by successful uploads.
    pub bytes_uploaded: u64,
    /// Bytes read from download bodies.
    pub bytes_downloaded: u64,
    /// When the last operation ended.
    pub last_operation_at: Option<SystemTime>,
    /// Latency per operation name.
    pub latency: BTreeMap<&'static str, LatencySummary>,
}

impl S3Metrics {
    /// Records one finished call of `operation`.
    pub fn record(&self, operation: S3Operation, elapsed: Duration, ok: bool) {
        let c = &self.inner;
        if ok {
            let counter = match operation {
                S3Operation::Upload => Some(&c.uploads),
                S3Operation::Download => Some(&c.downloads),
                S3Operation::Delete => Some(&c.deletes),
                _ => None,
            };
            if let Some(counter) = counter {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            c.failed.fetch_add(1, Ordering::Relaxed);
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1)
            .max(1);
        c.last_operation_ms.fetch_max(now_ms, Ordering::Relaxed);
        let mut latency = c.latency.lock().unwrap_or_else(|p| p.into_inner());
        latency
            .entry(operation.as_str())
            .or_default()
            .add(elapsed, ok);
    }

    /// Counts a call refused before it reached the stack (an invalid key, an
    /// unreadable file).
    pub fn add_failed(&self) {
        self.inner.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds keys deleted by a batch delete.
    pub fn add_deletes(&self, n: u64) {
        self.inner.deletes.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds uploaded bytes.
    pub fn add_bytes_uploaded(&self, n: u64) {
        self.inner.bytes_uploaded.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds downloaded bytes.
    pub fn add_bytes_downloaded(&self, n: u64) {
        self.inner.bytes_downloaded.fetch_add(n, Ordering::Relaxed);
    }

    /// A copy of the counters now.
    pub fn snapshot(&self) -> S3MetricsSnapshot {
        let c = &self.inner;
        let last = c.last_operation_ms.load(Ordering::Relaxed);
        S3MetricsSnapshot {
            total_uploads: c.uploads.load(Ordering::Relaxed),
            total_downloads: c.downloads.load(Ordering::Relaxed),
            total_deletes: c.deletes.load(Ordering::Relaxed),
            total_failed: c.failed.load(Ordering::Relaxed),
            bytes_uploaded: c.bytes_uploaded.load(Ordering::Relaxed),
            bytes_downloaded: c.bytes_downloaded.load(Ordering::Relaxed),
            last_operation_at: (last > 0).then(|| UNIX_EPOCH + Duration::from_millis(last)),
            latency: c.latency.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_operation_and_outcome() {
        let m = S3Metrics::default();
        assert_eq!(m.snapshot().last_operation_at, None);
        m.record(S3Operation::Upload, Duration::from_millis(10), true);
        m.record(S3Operation::Upload, Duration::from_millis(30), true);
        m.record(S3Operation::Download, Duration::from_millis(5), true);
        m.record(S3Operation::Delete, Duration::from_millis(1), true);
        m.record(S3Operation::Exists, Duration::from_millis(2), false);
        m.add_deletes(4);
        m.add_bytes_downloaded(7);
        let s = m.clone().snapshot();
        assert_eq!(
            (
                s.total_uploads,
                s.total_downloads,
                s.total_deletes,
                s.total_failed
            ),
            (2, 1, 5, 1)
        );
        assert_eq!(s.bytes_downloaded, 7);
        assert!(s.last_operation_at.is_some());
        let up = s.latency["upload"];
        assert_eq!(up.count, 2);
        assert_eq!(up.mean(), Duration::from_millis(20));
        assert_eq!(up.min, Duration::from_millis(10));
        assert_eq!(up.max, Duration::from_millis(30));
        assert_eq!(s.latency["exists"].count, 1);
        assert_eq!(s.latency["exists"].failures, 1);
        assert_eq!(up.failures, 0);
        // 10 ms is in the 10 ms bucket (`le`), 30 ms in the 50 ms one.
        let at = |d: Duration| DEFAULT_BUCKETS.iter().position(|b| *b == d).unwrap();
        assert_eq!(up.buckets[at(Duration::from_millis(10))], 1);
        assert_eq!(up.buckets[at(Duration::from_millis(50))], 1);
        assert_eq!(up.buckets.iter().sum::<u64>(), up.count);
    }
}
