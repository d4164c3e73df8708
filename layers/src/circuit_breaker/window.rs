//! Lock-free sliding windows over the most recent outcomes.
//!
//! Both windows answer one question — "of the calls in the window, how many failed
//! and how many were slow?" — and both are written with plain atomics so the
//! closed-state path never takes a lock.
//!
//! - [`CountWindow`]: a ring of the last `len` outcomes, stored as two bit sets
//!   (failed, slow) in `AtomicU64` words. Recording a fast success is one
//!   `fetch_add` on the ring cursor plus a load of the slot's words (they are only
//!   written when a bit must change). The totals are recounted with `popcount`
//!   only when a failure or a slow call is recorded, since only those can trip.
//! - [`TimeWindow`]: `buckets` time buckets spanning the window, each one
//!   `AtomicU64` holding a tag (which tick it belongs to) and three saturating
//!   counters, updated with one compare-and-swap; a bucket whose tag is stale is
//!   restarted by the first writer of the new tick and skipped by readers.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Calls, failures and slow calls currently in a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WindowCounts {
    pub(crate) calls: u32,
    pub(crate) failures: u32,
    pub(crate) slow: u32,
}

/// Ring of the last `len` outcomes.
#[derive(Debug)]
pub(crate) struct CountWindow {
    len: u64,
    cursor: AtomicU64,
    failed: Box<[AtomicU64]>,
    slow: Box<[AtomicU64]>,
}

fn words(len: u64) -> Box<[AtomicU64]> {
    (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

/// Sets or clears one bit, writing only when it changes.
#[inline]
fn put_bit(word: &AtomicU64, mask: u64, on: bool) {
    let current = word.load(Relaxed);
    if (current & mask != 0) != on {
        if on {
            word.fetch_or(mask, Relaxed);
        } else {
            word.fetch_and(!mask, Relaxed);
        }
    }
}

impl CountWindow {
    pub(crate) fn new(len: u32) -> Self {
        let len = u64::from(len.max(1));
        CountWindow {
            len,
            cursor: AtomicU64::new(0),
            failed: words(len),
            slow: words(len),
        }
    }

    /// Records one outcome; returns the window's counts when they could trip the
    /// breaker (after a failure or a slow call, or when the window has just reached
    /// `minimum_calls`), `None` otherwise.
    #[inline]
    pub(crate) fn record(
        &self,
        failed: bool,
        slow: bool,
        minimum_calls: u32,
    ) -> Option<WindowCounts> {
        let position = self.cursor.fetch_add(1, Relaxed);
        let slot = position % self.len;
        let (word, mask) = ((slot / 64) as usize, 1u64 << (slot % 64));
        put_bit(&self.failed[word], mask, failed);
        put_bit(&self.slow[word], mask, slow);
        if failed || slow || position + 1 == u64::from(minimum_calls) {
            Some(self.counts_at(position + 1))
        } else {
            None
        }
    }

    fn counts_at(&self, recorded: u64) -> WindowCounts {
        let ones = |set: &[AtomicU64]| set.iter().map(|w| w.load(Relaxed).count_ones()).sum();
        WindowCounts {
            calls: recorded.min(self.len) as u32,
            failures: ones(&self.failed),
            slow: ones(&self.slow),
        }
    }

    pub(crate) fn counts(&self) -> WindowCounts {
        self.counts_at(self.cursor.load(Relaxed))
    }

    pub(crate) fn clear(&self) {
        self.cursor.store(0, Relaxed);
        for w in self.failed.iter().chain(self.slow.iter()) {
            w.store(0, Relaxed);
        }
    }
}

// Bucket word layout: tag (13 bits) | calls (17) | failures (17) | slow (17).
const COUNT_BITS: u32 = 17;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
const TAG_SHIFT: u32 = 3 * COUNT_BITS;
const TAG_MASK: u64 = (1 << (64 - TAG_SHIFT)) - 1;

fn tag_of(tick: u64) -> u64 {
    tick & TAG_MASK
}

fn unpack(word: u64) -> (u64, u64, u64) {
    (
        word & COUNT_MAX,
        (word >> COUNT_BITS) & COUNT_MAX,
        (word >> (2 * COUNT_BITS)) & COUNT_MAX,
    )
}

fn pack(tag: u64, calls: u64, failures: u64, slow: u64) -> u64 {
    (tag << TAG_SHIFT) | (slow << (2 * COUNT_BITS)) | (failures << COUNT_BITS) | calls
}

/// Time buckets covering the last `bucket_nanos * buckets.len()` nanoseconds.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    bucket_nanos: u64,
    buckets: Box<[AtomicU64]>,
}

impl TimeWindow {
    pub(crate) fn new(bucket_nanos: u64, buckets: u32) -> Self {
        TimeWindow {
            bucket_nanos: bucket_nanos.max(1),
            buckets: (0..buckets.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Records one outcome at `now_nanos` (since the breaker's epoch); returns the
    /// window's counts when the outcome could trip the breaker.
    pub(crate) fn record(&self, now_nanos: u64, failed: bool, slow: bool) -> Option<WindowCounts> {
        let tick = now_nanos / self.bucket_nanos;
        let bucket = &self.buckets[(tick % self.buckets.len() as u64) as usize];
        let tag = tag_of(tick);
        let mut current = bucket.load(Relaxed);
        loop {
            let (calls, failures, slows) = if current >> TAG_SHIFT == tag {
                unpack(current)
            } else {
                (0, 0, 0)
            };
            if calls == COUNT_MAX {
                break; // saturated: the bucket's rates stay as they are
            }
            let next = pack(
                tag,
                calls + 1,
                failures + u64::from(failed),
                slows + u64::from(slow),
            );
            match bucket.compare_exchange_weak(current, next, Relaxed, Relaxed) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        (failed || slow).then(|| self.counts(now_nanos))
    }

    pub(crate) fn counts(&self, now_nanos: u64) -> WindowCounts {
        let tick = now_nanos / self.bucket_nanos;
        let n = self.buckets.len() as u64;
        let mut total = WindowCounts::default();
        for back in 0..n.min(tick + 1) {
            let t = tick - back;
            let word = self.buckets[(t % n) as usize].load(Relaxed);
            if word >> TAG_SHIFT == tag_of(t) {
                let (calls, failures, slow) = unpack(word);
                total.calls += calls as u32;
                total.failures += failures as u32;
                total.slow += slow as u32;
            }
        }
        total
    }

    pub(crate) fn clear(&self) {
        for b in self.buckets.iter() {
            b.store(0, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_window_keeps_only_the_last_len_outcomes() {
        let w = CountWindow::new(4);
        assert_eq!(w.record(true, false, 4).map(|c| c.failures), Some(1));
        w.record(false, false, u32::MAX);
        w.record(false, false, u32::MAX);
        w.record(false, false, u32::MAX);
        assert_eq!(
            w.counts(),
            WindowCounts {
                calls: 4,
                failures: 1,
                slow: 0
            }
        );
        // The fifth outcome overwrites the first (the failure).
        w.record(false, false, u32::MAX);
        assert_eq!(
            w.counts(),
            WindowCounts {
                calls: 4,
                failures: 0,
                slow: 0
            }
        );
        let c = w.record(false, true, u32::MAX).unwrap();
        assert_eq!(
            c,
            WindowCounts {
                calls: 4,
                failures: 0,
                slow: 1
            }
        );
        w.clear();
        assert_eq!(w.counts(), WindowCounts::default());
    }

    #[test]
    fn count_window_spanning_several_words() {
        let w = CountWindow::new(130);
        for i in 0..260 {
            w.record(i % 2 == 0, false, u32::MAX);
        }
        assert_eq!(
            w.counts(),
            WindowCounts {
                calls: 130,
                failures: 65,
                slow: 0
            }
        );
    }

    #[test]
    fn time_window_drops_expired_buckets() {
        let w = TimeWindow::new(100, 4); // 4 buckets of 100 ns
        w.record(0, true, false);
        w.record(150, false, false);
        assert_eq!(
            w.counts(150),
            WindowCounts {
                calls: 2,
                failures: 1,
                slow: 0
            }
        );
        // At 400 the bucket of tick 0 has left the window.
        assert_eq!(
            w.counts(400),
            WindowCounts {
                calls: 1,
                failures: 0,
                slow: 0
            }
        );
        // Writing tick 4 (same bucket as tick 0) restarts it.
        let c = w.record(420, false, true).unwrap();
        assert_eq!(
            c,
            WindowCounts {
                calls: 2,
                failures: 0,
                slow: 1
            }
        );
        assert_eq!(w.counts(10_000), WindowCounts::default());
    }
}
