//! Exponential backoff with optional jitter.

use std::time::Duration;

/// How the delay before each retry is randomised.
///
/// Without jitter, clients that failed together retry together and hit the
/// recovering service in synchronised waves. AWS's "Exponential Backoff and
/// Jitter" study shows full and decorrelated jitter both spread them out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Jitter {
    /// No randomness: retry `n` waits exactly `min(cap, base × multiplier^(n−1))`.
    None,
    /// "Full jitter": retry `n` waits a uniformly random time in
    /// `[0, min(cap, base × multiplier^(n−1))]`. The default.
    #[default]
    Full,
    /// AWS's "decorrelated jitter": retry `n` waits a uniformly random time in
    /// `[base, min(cap, 3 × previous)]`, where `previous` is the delay drawn for
    /// retry `n − 1` (`base` for the first retry). The multiplier is not used.
    Decorrelated,
}

/// An exponential backoff schedule: `base`, `multiplier`, `cap` and [`Jitter`].
///
/// Retry `n` (the first retry is `n = 1`) is based on
/// `min(cap, base × multiplier^(n−1))`; [`Backoff::delay`] gives that value and the
/// jitter decides how the actual wait is drawn from it.
///
/// Out-of-range settings are clamped rather than rejected: a multiplier below 1
/// or not finite counts as 1, and a cap below the base lowers every delay to the cap.
///
/// ```
/// use keel_layers::retry::{Backoff, Jitter};
/// use std::time::Duration;
///
/// let backoff = Backoff::new(Duration::from_secs(1))
///     .multiplier(2.0)
///     .cap(Duration::from_secs(5))
///     .jitter(Jitter::None);
/// let delays: Vec<u64> = (1..=5).map(|n| backoff.delay(n).as_secs()).collect();
/// assert_eq!(delays, [1, 2, 4, 5, 5]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    base: Duration,
    multiplier: f64,
    cap: Duration,
    jitter: Jitter,
}

impl Default for Backoff {
    /// Base 100 ms, multiplier 2, cap 10 s, full jitter.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100))
    }
}

impl Backoff {
    /// A schedule starting at `base`, with multiplier 2, cap 10 s and full jitter.
    pub const fn new(base: Duration) -> Self {
        Backoff {
            base,
            multiplier: 2.0,
            cap: Duration::from_secs(10),
            jitter: Jitter::Full,
        }
    }

    /// Sets the delay before the first retry.
    pub const fn base(mut self, base: Duration) -> Self {
        self.base = base;
        self
    }

    /// Sets the growth factor between consecutive retries (default 2).
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = if multiplier.is_finite() && multiplier >= 1.0 {
            multiplier
        } else {
            1.0
        };
        self
    }

    /// Sets the longest delay the schedule produces (default 10 s).
    ///
    /// A delay floor from the outcome (`Retry-After`) may still exceed it; see
    /// [`RetryPolicy`](super::RetryPolicy).
    pub const fn cap(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self
    }

    /// Sets the jitter (default [`Jitter::Full`]).
    pub const fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay before the first retry.
    pub const fn base_delay(&self) -> Duration {
        self.base
    }

    /// The longest delay.
    pub const fn max_delay(&self) -> Duration {
        self.cap
    }

    /// The growth factor.
    pub const fn growth(&self) -> f64 {
        self.multiplier
    }

    /// The jitter mode.
    pub const fn jitter_mode(&self) -> Jitter {
        self.jitter
    }

    /// The delay for retry `retry` (1-based) before jitter:
    /// `min(cap, base × multiplier^(retry−1))`. Retry 0 is treated as retry 1.
    pub fn delay(&self, retry: u32) -> Duration {
        let cap = saturating_nanos(self.cap);
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let nanos = saturating_nanos(self.base) as f64 * self.multiplier.powi(exponent);
        // NaN and infinity fall to the cap too.
        if nanos.is_finite() && nanos < cap as f64 {
            Duration::from_nanos(nanos.round() as u64)
        } else {
            Duration::from_nanos(cap)
        }
    }

    /// The wait before retry `retry`, with jitter drawn from `rng`. `previous` is the
    /// wait drawn for the previous retry (only [`Jitter::Decorrelated`] uses it).
    pub(crate) fn next_delay(
        &self,
        retry: u32,
        previous: Duration,
        rng: &mut fastrand::Rng,
    ) -> Duration {
        match self.jitter {
            Jitter::None => self.delay(retry),
            Jitter::Full => {
                let ceiling = saturating_nanos(self.delay(retry));
                Duration::from_nanos(rng.u64(0..=ceiling))
            }
            Jitter::Decorrelated => {
                let cap = saturating_nanos(self.cap);
                let base = saturating_nanos(self.base).min(cap);
                let previous = if retry <= 1 {
                    base
                } else {
                    saturating_nanos(previous)
                };
                let high = previous.saturating_mul(3).min(cap).max(base);
                Duration::from_nanos(rng.u64(base..=high))
            }
        }
    }
}

fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn exponential_and_capped() {
        let b = Backoff::new(100 * MS)
            .multiplier(3.0)
            .cap(2000 * MS)
            .jitter(Jitter::None);
        let got: Vec<_> = (1..=6).map(|n| b.delay(n)).collect();
        assert_eq!(
            got,
            [
                100 * MS,
                300 * MS,
                900 * MS,
                2000 * MS,
                2000 * MS,
                2000 * MS
            ]
        );
        // Huge retry numbers saturate at the cap instead of overflowing.
        assert_eq!(b.delay(u32::MAX), 2000 * MS);
    }

    #[test]
    fn odd_settings_are_clamped() {
        let b = Backoff::new(100 * MS)
            .multiplier(f64::NAN)
            .jitter(Jitter::None);
        assert_eq!(b.delay(5), 100 * MS);
        let b = Backoff::new(Duration::MAX).cap(Duration::MAX);
        assert_eq!(b.delay(3), Duration::from_nanos(u64::MAX));
        let b = Backoff::new(5 * MS).cap(MS);
        assert_eq!(b.delay(1), MS);
    }

    #[test]
    fn full_jitter_stays_in_zero_to_delay() {
        let b = Backoff::new(100 * MS).cap(1000 * MS).jitter(Jitter::Full);
        let mut saw_low = false;
        let mut saw_high = false;
        for seed in 0..2000u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            for retry in 1..=6 {
                let ceiling = b.delay(retry);
                let d = b.next_delay(retry, Duration::ZERO, &mut rng);
                assert!(
                    d <= ceiling,
                    "seed {seed} retry {retry}: {d:?} > {ceiling:?}"
                );
                saw_low |= d < ceiling / 4;
                saw_high |= d > ceiling * 3 / 4;
            }
        }
        // The draws cover the range rather than sitting at one end.
        assert!(saw_low && saw_high);
    }

    #[test]
    fn decorrelated_jitter_bounds() {
        let base = 50 * MS;
        let cap = 3000 * MS;
        let b = Backoff::new(base).cap(cap).jitter(Jitter::Decorrelated);
        for seed in 0..2000u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut previous = Duration::ZERO;
            for retry in 1..=10 {
                let d = b.next_delay(retry, previous, &mut rng);
                let prior = if retry == 1 { base } else { previous };
                let high = (prior * 3).min(cap);
                assert!(
                    d >= base && d <= high,
                    "seed {seed} retry {retry}: {d:?} not in [{base:?}, {high:?}]"
                );
                previous = d;
            }
        }
    }
}
