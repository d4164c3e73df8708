//! Fixed-bound latency histograms, one per outcome per recording thread.

use super::handle::Histogram;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The default bucket bounds, in seconds: the explicit boundaries the OpenTelemetry
/// messaging semantic conventions recommend for `messaging.*.duration`
/// (5 ms to 10 s), with four finer bounds below for in-process services.
pub const DEFAULT_BUCKETS: &[Duration] = &[
    Duration::from_micros(100),
    Duration::from_micros(250),
    Duration::from_micros(500),
    Duration::from_millis(1),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(50),
    Duration::from_millis(75),
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_millis(750),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_millis(7_500),
    Duration::from_secs(10),
];

/// At most this many bucket bounds; more are dropped (each costs 24 bytes per
/// thread and layer, and a series in every scrape).
pub const MAX_BUCKETS: usize = 64;

/// Sorted, deduplicated upper bounds in nanoseconds.
#[derive(Clone, Debug)]
pub(super) struct Buckets(Arc<[u64]>);

impl Buckets {
    pub(super) fn new(bounds: &[Duration]) -> Self {
        let mut nanos: Vec<u64> = bounds
            .iter()
            .map(|d| super::clock::nanos(*d))
            .filter(|n| *n > 0)
            .collect();
        nanos.sort_unstable();
        nanos.dedup();
        nanos.truncate(MAX_BUCKETS);
        Buckets(nanos.into())
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn bounds(&self) -> Vec<Duration> {
        self.0.iter().map(|n| Duration::from_nanos(*n)).collect()
    }

    /// The bucket of `latency`: the first bound at or above it, or the overflow
    /// bucket. A linear scan: the bounds are few and most calls land in the first.
    #[inline]
    pub(super) fn index(&self, latency: u64) -> usize {
        self.0
            .iter()
            .position(|bound| latency <= *bound)
            .unwrap_or(self.0.len())
    }
}

/// One thread's histogram of one outcome.
pub(super) struct AtomicHistogram {
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    fn new(buckets: &Buckets) -> Self {
        AtomicHistogram {
            buckets: (0..=buckets.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    #[inline]
    pub(super) fn record(&self, index: usize, latency: u64) {
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Relaxed);
        }
        self.sum_nanos.fetch_add(latency, Relaxed);
    }

    pub(super) fn count(&self) -> u64 {
        self.buckets
            .iter()
            .fold(0_u64, |n, b| n.wrapping_add(b.load(Relaxed)))
    }

    pub(super) fn add_to(&self, into: &mut Histogram) {
        for (total, bucket) in into.buckets.iter_mut().zip(self.buckets.iter()) {
            let n = bucket.load(Relaxed);
            *total += n;
            into.count += n;
        }
        into.sum_nanos = into.sum_nanos.saturating_add(self.sum_nanos.load(Relaxed));
    }
}

/// One thread's histograms, by outcome.
pub(super) struct OutcomeHistograms {
    pub(super) success: AtomicHistogram,
    pub(super) failure: AtomicHistogram,
    pub(super) ignored: AtomicHistogram,
}

impl OutcomeHistograms {
    pub(super) fn new(buckets: &Buckets) -> Self {
        OutcomeHistograms {
            success: AtomicHistogram::new(buckets),
            failure: AtomicHistogram::new(buckets),
            ignored: AtomicHistogram::new(buckets),
        }
    }
}

/// A fixed-bound latency histogram counted with relaxed atomics, without a lock:
/// the histogram the metrics layer records into, for times measured outside a
/// Tower call (keel's consumer runtime times whole messages with it). Shared by
/// all threads that record; [`snapshot`](Self::snapshot) reads it.
pub struct LatencyBuckets {
    buckets: Buckets,
    histogram: AtomicHistogram,
}

impl LatencyBuckets {
    /// Empty, with these upper bounds (sorted and deduplicated as by
    /// [`MetricsLayerBuilder::buckets`](super::MetricsLayerBuilder::buckets)).
    pub fn new(bounds: &[Duration]) -> Self {
        let buckets = Buckets::new(bounds);
        LatencyBuckets {
            histogram: AtomicHistogram::new(&buckets),
            buckets,
        }
    }

    /// Counts one latency; returns the index of its bucket (the number of bounds
    /// for the `+Inf` bucket), as in [`Histogram::buckets`].
    pub fn record(&self, latency: Duration) -> usize {
        let nanos = super::clock::nanos(latency);
        let index = self.buckets.index(nanos);
        self.histogram.record(index, nanos);
        index
    }

    /// The upper bounds of the buckets.
    pub fn bounds(&self) -> Vec<Duration> {
        self.buckets.bounds()
    }

    /// The counts so far (no exemplars).
    pub fn snapshot(&self) -> Histogram {
        let mut h = Histogram {
            buckets: vec![0; self.buckets.len() + 1],
            ..Histogram::default()
        };
        self.histogram.add_to(&mut h);
        h
    }
}

impl std::fmt::Debug for LatencyBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyBuckets")
            .field("bounds", &self.bounds())
            .field("count", &self.histogram.count())
            .finish()
    }
}
