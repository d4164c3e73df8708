//! Counters and processing-time statistics of a consumer runtime.

use hdrhistogram::Histogram;
use keel_layers::metrics::{DEFAULT_BUCKETS, Histogram as BucketHistogram, LatencyBuckets};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Live metrics of one consumer runtime, shared by its workers (`Arc`).
#[derive(Debug)]
pub struct ConsumerMetrics {
    processed: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
    decode_errors: AtomicU64,
    panics: AtomicU64,
    dlq_failures: AtomicU64,
    revoked_dropped: AtomicU64,
    revoke_abandoned: AtomicU64,
    seek_failures: AtomicU64,
    last_processed_at_ms: AtomicU64,
    /// Processing time in microseconds, 1 µs .. 1 h, 2 significant digits.
    histogram: Mutex<Histogram<u64>>,
    /// Processing time in fixed buckets by ending (processed, dead-lettered,
    /// dropped): what adds up across instances.
    buckets: [LatencyBuckets; 3],
    /// With `otel`: per ending and bucket, the trace of the latest message that
    /// ended there (an exemplar; see `keel_layers::metrics::Exemplar`).
    #[cfg(feature = "otel")]
    exemplars: Mutex<Vec<Option<keel_layers::metrics::Exemplar>>>,
}

/// A runtime's processing times in fixed buckets, by how each message ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessingHistograms {
    /// Upper bounds of the buckets: [`DEFAULT_BUCKETS`] (100 µs to 10 s, the
    /// messaging semantic conventions' bounds and four finer ones).
    pub bounds: Vec<Duration>,
    /// Messages handled successfully (unknown types skipped included).
    pub processed: BucketHistogram,
    /// Messages that failed after their retries and were dead-lettered.
    pub dead_lettered: BucketHistogram,
    /// Messages that failed after their retries with no DLQ (logged, skipped).
    pub dropped: BucketHistogram,
}

impl Default for ConsumerMetrics {
    fn default() -> Self {
        ConsumerMetrics {
            processed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            decode_errors: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            dlq_failures: AtomicU64::new(0),
            revoked_dropped: AtomicU64::new(0),
            revoke_abandoned: AtomicU64::new(0),
            seek_failures: AtomicU64::new(0),
            last_processed_at_ms: AtomicU64::new(0),
            histogram: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("static bounds are valid"),
            ),
            buckets: [(); 3].map(|()| LatencyBuckets::new(DEFAULT_BUCKETS)),
            #[cfg(feature = "otel")]
            exemplars: Mutex::new(vec![None; 3 * (DEFAULT_BUCKETS.len() + 1)]),
        }
    }
}

/// How one message ended, for the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Handled successfully (or skipped as an unknown type).
    Processed,
    /// Failed after its retries and was published to the DLQ.
    DeadLettered,
    /// Failed after its retries; DLQ disabled, so it was logged and skipped.
    Failed,
}

impl ConsumerMetrics {
    pub(crate) fn record(&self, ending: Ending, retries: u32, elapsed: Duration) {
        match ending {
            Ending::Processed => self.processed.fetch_add(1, Relaxed),
            Ending::DeadLettered => {
                self.dead_lettered.fetch_add(1, Relaxed);
                self.failed.fetch_add(1, Relaxed)
            }
            Ending::Failed => self.failed.fetch_add(1, Relaxed),
        };
        if retries > 0 {
            self.retries.fetch_add(u64::from(retries), Relaxed);
        }
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let slot = match ending {
            Ending::Processed => 0,
            Ending::DeadLettered => 1,
            Ending::Failed => 2,
        };
        let _index = self.buckets[slot].record(elapsed);
        #[cfg(feature = "otel")]
        self.record_exemplar(slot, _index, elapsed);
        if let Ok(mut h) = self.histogram.lock() {
            h.saturating_record((nanos / 1_000).max(1));
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.last_processed_at_ms.store(now_ms, Relaxed);
    }

    /// Keeps the trace of the current (`process`) span, when sampled, as the
    /// exemplar of the bucket this message ended in.
    #[cfg(feature = "otel")]
    fn record_exemplar(&self, slot: usize, index: usize, elapsed: Duration) {
        use keel_layers::metrics::ExemplarSource as _;
        let Some(trace) = crate::kafka::otel::exemplar_source().current() else {
            return;
        };
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if let Ok(mut exemplars) = self.exemplars.lock()
            && let Some(e) = exemplars.get_mut(slot * (DEFAULT_BUCKETS.len() + 1) + index)
        {
            *e = Some(keel_layers::metrics::Exemplar {
                trace,
                latency: elapsed,
                unix_ms,
            });
        }
    }

    pub(crate) fn record_retries(&self, retries: u32) {
        self.retries.fetch_add(u64::from(retries), Relaxed);
    }

    pub(crate) fn record_decode_error(&self) {
        self.decode_errors.fetch_add(1, Relaxed);
    }

    pub(crate) fn record_panic(&self) {
        self.panics.fetch_add(1, Relaxed);
    }

    /// A queued message of a revoked partition, dropped unhandled.
    pub(crate) fn record_revoked_drop(&self) {
        self.revoked_dropped.fetch_add(1, Relaxed);
    }

    /// Messages still in a handler when a revocation's wait ran out.
    pub(crate) fn record_revoke_abandoned(&self, n: usize) {
        self.revoke_abandoned.fetch_add(n as u64, Relaxed);
    }

    /// A seek before resuming a partition failed (the partition stays paused and
    /// the seek is retried).
    pub(crate) fn record_seek_failure(&self) {
        self.seek_failures.fetch_add(1, Relaxed);
    }

    pub(crate) fn record_dlq_failure(&self) {
        self.dlq_failures.fetch_add(1, Relaxed);
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> ConsumerMetricsSnapshot {
        let processing = self.processing();
        // The mean, from the buckets' sums and counts.
        let (sum, count) = [
            &processing.processed,
            &processing.dead_lettered,
            &processing.dropped,
        ]
        .iter()
        .fold((0_u64, 0_u64), |(s, n), h| {
            (s.saturating_add(h.sum_nanos), n + h.count)
        });
        let average = sum
            .checked_div(count)
            .map_or(Duration::ZERO, Duration::from_nanos);
        let p99 = self
            .histogram
            .lock()
            .map(|h| {
                if h.is_empty() {
                    Duration::ZERO
                } else {
                    Duration::from_micros(h.value_at_quantile(0.99))
                }
            })
            .unwrap_or_default();
        let last = self.last_processed_at_ms.load(Relaxed);
        ConsumerMetricsSnapshot {
            total_processed: self.processed.load(Relaxed),
            total_failed: self.failed.load(Relaxed),
            total_retries: self.retries.load(Relaxed),
            total_dead_lettered: self.dead_lettered.load(Relaxed),
            total_decode_errors: self.decode_errors.load(Relaxed),
            total_panics: self.panics.load(Relaxed),
            dlq_failures: self.dlq_failures.load(Relaxed),
            revoked_dropped: self.revoked_dropped.load(Relaxed),
            revoke_abandoned: self.revoke_abandoned.load(Relaxed),
            seek_failures: self.seek_failures.load(Relaxed),
            stuck_partitions: 0,
            longest_stuck: Duration::ZERO,
            last_processed_at: (last != 0).then(|| UNIX_EPOCH + Duration::from_millis(last)),
            average_processing_time: average,
            p99_processing_time: p99,
            processing,
        }
    }

    fn processing(&self) -> ProcessingHistograms {
        #[allow(unused_mut)]
        let mut histograms = self.buckets.each_ref().map(LatencyBuckets::snapshot);
        #[cfg(feature = "otel")]
        if let Ok(exemplars) = self.exemplars.lock()
            && exemplars.iter().any(Option::is_some)
        {
            for (h, of) in histograms
                .iter_mut()
                .zip(exemplars.chunks(DEFAULT_BUCKETS.len() + 1))
            {
                h.exemplars = of.to_vec();
            }
        }
        let [processed, dead_lettered, dropped] = histograms;
        ProcessingHistograms {
            bounds: DEFAULT_BUCKETS.to_vec(),
            processed,
            dead_lettered,
            dropped,
        }
    }
}

/// A copy of a runtime's metrics at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerMetricsSnapshot {
    /// Messages handled successfully (unknown types skipped by the registry included).
    pub total_processed: u64,
    /// Messages whose handling failed after all retries (dead-lettered or skipped),
    /// undecodable messages included.
    pub total_failed: u64,
    /// Retries made (a message handled at its third attempt counts 2).
    pub total_retries: u64,
    /// Messages published to a dead-letter topic.
    pub total_dead_lettered: u64,
    /// Messages that were not a valid event envelope.
    pub total_decode_errors: u64,
    /// Handler panics caught (each is a failure of class `panic`, retried then
    /// dead-lettered like any failure).
    pub total_panics: u64,
    /// Dead-letter publishes that failed (each is retried; see
    /// [`DeadLetterFailure`](super::DeadLetterFailure)).
    pub dlq_failures: u64,
    /// Queued messages of revoked partitions dropped unhandled (their new owner
    /// handles them).
    pub revoked_dropped: u64,
    /// Messages still in a handler when a revocation stopped waiting for them
    /// (`revoke_timeout`): not committed, so the new owner handles them again.
    pub revoke_abandoned: u64,
    /// Seeks before resuming a partition that failed; the partition stayed paused
    /// until a later seek succeeded.
    pub seek_failures: u64,
    /// Partitions held now because a message cannot be dead-lettered (filled by
    /// [`KafkaConsumer::metrics`](super::KafkaConsumer::metrics); 0 from
    /// [`ConsumerMetrics::snapshot`]).
    pub stuck_partitions: u64,
    /// How long the longest-stuck of them has been held (same source).
    pub longest_stuck: Duration,
    /// When the last message finished (handled, dead-lettered or failed).
    pub last_processed_at: Option<SystemTime>,
    /// Mean time from the start of handling to the end (retries and DLQ included).
    pub average_processing_time: Duration,
    /// 99th percentile of the same (2 significant digits; an HdrHistogram of this
    /// instance since the start, not to be combined across instances).
    pub p99_processing_time: Duration,
    /// The same times in fixed buckets by ending, which add up across instances
    /// (`keel_kafka_consumer_processing_duration_seconds` in
    /// [`keel::prometheus`](crate)). With the `otel` feature each bucket also
    /// keeps an exemplar: the trace and `process` span of the latest message that
    /// ended there, when its trace is sampled.
    pub processing: ProcessingHistograms,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percentiles() {
        let m = ConsumerMetrics::default();
        assert_eq!(m.snapshot().last_processed_at, None);
        for i in 1..=100u64 {
            m.record(Ending::Processed, 0, Duration::from_millis(i));
        }
        m.record(Ending::DeadLettered, 3, Duration::from_millis(1));
        m.record(Ending::Failed, 2, Duration::from_millis(1));
        m.record_decode_error();
        let s = m.snapshot();
        assert_eq!(s.total_processed, 100);
        assert_eq!(s.total_failed, 2);
        assert_eq!(s.total_dead_lettered, 1);
        assert_eq!(s.total_retries, 5);
        assert_eq!(s.total_decode_errors, 1);
        assert!(s.last_processed_at.is_some());
        // 102 samples: 1..=100 ms and two of 1 ms; p99 is about 99 ms.
        let p99 = s.p99_processing_time.as_millis();
        assert!((98..=100).contains(&p99), "p99 = {p99} ms");
        let avg = s.average_processing_time.as_micros();
        assert_eq!(avg, (5050 + 2) * 1000 / 102);
        // Fixed buckets: 1..=100 ms processed; the two failures at 1 ms.
        let h = &s.processing;
        assert_eq!(h.processed.count, 100);
        assert_eq!(h.processed.sum(), Duration::from_millis(5050));
        let le = |h: &BucketHistogram, bound: Duration| -> u64 {
            h.cumulative(&s.processing.bounds)
                .find(|(b, _)| *b == Some(bound))
                .map(|(_, n)| n)
                .unwrap()
        };
        assert_eq!(le(&h.processed, Duration::from_millis(5)), 5);
        assert_eq!(le(&h.processed, Duration::from_millis(50)), 50);
        assert_eq!(le(&h.processed, Duration::from_millis(100)), 100);
        assert_eq!(*h.processed.buckets.last().unwrap(), 0, "none above 10 s");
        assert_eq!(
            (h.dead_lettered.count, h.dropped.count),
            (1, 1),
            "one dead-lettered, one dropped"
        );
        assert_eq!(le(&h.dead_lettered, Duration::from_millis(1)), 1);
    }
}
