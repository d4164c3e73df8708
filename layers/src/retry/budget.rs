//! A retry budget: a token bucket that bounds retries to a share of the traffic.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// One token, in the bucket's fixed-point unit (micro-tokens). Fixed point keeps
/// fractional ratios exact: a ratio of 0.6 deposits 600,000 units and a retry
/// withdraws 1,000,000, so 10 requests allow exactly 6 retries. (tower's
/// `TpsBudget` rounds the cost of a retry to a whole number of deposits and lets
/// 0.6 behave as 1.0: tower issue #857.)
const TOKEN: u64 = 1_000_000;

/// When the budget earns tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DepositOn {
    /// Every request (first attempts only, not retries) earns `ratio` tokens, so
    /// retries stay below `ratio` × requests (+ the floor) whatever the outcomes.
    /// This is Finagle's and tower's rule. The default.
    #[default]
    Request,
    /// Only successful calls earn tokens: during a full outage retries fall to the
    /// per-second floor.
    Success,
}

/// A token bucket that lets retries add at most a fixed share of load.
///
/// - Each request (or each success, see [`DepositOn`]) deposits `ratio` tokens.
/// - Each retry withdraws one token; with less than one token, the retry is not
///   made and the caller gets the last outcome.
/// - Independently of traffic, the bucket refills at `min_per_sec` tokens per
///   second, so a quiet client can still retry.
/// - The balance never exceeds `capacity`; the bucket starts with `initial` tokens
///   (by default full).
///
/// So over any period `T`, retries ≤ `initial + ratio × requests + min_per_sec × T`:
/// during an outage retries cannot multiply the load.
///
/// Defaults: ratio 0.2, `min_per_sec` 10, capacity 100, full at start,
/// [`DepositOn::Request`].
///
/// **Cloning** shares the bucket: every clone of a budget (and so every clone of a
/// [`RetryLayer`](super::RetryLayer) or [`Retry`](super::Retry) service using it)
/// draws from the same tokens. Build a second budget for an independent limit.
///
/// **Cost**: a deposit on a full bucket is one atomic load (no write, no
/// contention); otherwise a compare-and-swap. The clock is read only when the
/// balance is below one token or a retry withdraws.
///
/// When a retry is refused for want of tokens, a `warn` event is logged once, when
/// the bucket runs dry, and an `info` event when retries resume; individual refusals
/// are logged at `debug`.
///
/// ```
/// use keel_layers::retry::RetryBudget;
///
/// let budget = RetryBudget::builder().ratio(0.5).min_per_sec(0).capacity(10).initial(0).build();
/// budget.deposit();
/// assert!(!budget.try_withdraw()); // half a token
/// budget.deposit();
/// assert!(budget.try_withdraw()); // one token
/// assert!(!budget.try_withdraw());
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    bucket: Arc<Bucket>,
}

struct Bucket {
    /// Balance in micro-tokens.
    balance: AtomicU64,
    capacity: u64,
    deposit: u64,
    refill_per_sec: u64,
    deposit_on: DepositOn,
    epoch: Instant,
    /// Nanoseconds since `epoch` up to which time refill has been credited.
    refilled_to: AtomicU64,
    /// Set while retries are being refused, for edge-triggered logging.
    dry: AtomicBool,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::builder().build()
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("balance", &self.balance())
            .field("capacity", &(self.bucket.capacity as f64 / TOKEN as f64))
            .field("ratio", &(self.bucket.deposit as f64 / TOKEN as f64))
            .field("min_per_sec", &(self.bucket.refill_per_sec / TOKEN))
            .field("deposit_on", &self.bucket.deposit_on)
            .finish()
    }
}

impl RetryBudget {
    /// A budget with the defaults (ratio 0.2, 10 retries per second floor,
    /// capacity 100, full at start, deposits per request).
    pub fn new() -> Self {
        RetryBudget::default()
    }

    /// A builder starting from the defaults.
    pub fn builder() -> RetryBudgetBuilder {
        RetryBudgetBuilder {
            ratio: 0.2,
            min_per_sec: 10,
            capacity: 100,
            initial: None,
            deposit_on: DepositOn::Request,
        }
    }

    /// Credits the budget for one request or success (`ratio` tokens), up to the
    /// capacity. The retry layer calls it; call it yourself only for a budget you
    /// share with your own code.
    #[inline]
    pub fn deposit(&self) {
        self.add(self.bucket.deposit);
    }

    /// Takes one token for a retry; `false` (and nothing taken) when less than one
    /// token is available after crediting the time-based refill.
    pub fn try_withdraw(&self) -> bool {
        self.refill();
        let taken = self
            .bucket
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                b.checked_sub(TOKEN)
            })
            .is_ok();
        if taken {
            if self.bucket.dry.swap(false, Ordering::Relaxed) {
                tracing::info!(
                    balance = self.balance(),
                    "retry budget refilled; retries resume"
                );
            }
        } else if !self.bucket.dry.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                balance = self.balance(),
                "retry budget exhausted; retries suspended until it refills"
            );
        }
        taken
    }

    /// `true` when at least one token is available (after crediting the time-based
    /// refill when the balance looks empty). Takes nothing.
    #[inline]
    pub fn has_token(&self) -> bool {
        if self.bucket.balance.load(Ordering::Relaxed) >= TOKEN {
            return true;
        }
        self.refill();
        self.bucket.balance.load(Ordering::Relaxed) >= TOKEN
    }

    /// The current balance in tokens (without crediting pending refill).
    pub fn balance(&self) -> f64 {
        self.bucket.balance.load(Ordering::Relaxed) as f64 / TOKEN as f64
    }

    /// When this budget earns tokens.
    #[inline]
    pub fn deposit_on(&self) -> DepositOn {
        self.bucket.deposit_on
    }

    #[inline]
    fn add(&self, amount: u64) {
        if amount == 0 {
            return;
        }
        let cap = self.bucket.capacity;
        // A full bucket is the steady state of a healthy service: one load, no write.
        let _ = self
            .bucket
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b < cap).then(|| b.saturating_add(amount).min(cap))
            });
    }

    fn refill(&self) {
        if self.bucket.refill_per_sec == 0 {
            return;
        }
        let now = u64::try_from(
            Instant::now()
                .saturating_duration_since(self.bucket.epoch)
                .as_nanos(),
        )
        .unwrap_or(u64::MAX);
        // Each caller claims a disjoint interval of time, so no refill is counted twice.
        let Ok(previous) =
            self.bucket
                .refilled_to
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |prev| {
                    (now > prev).then_some(now)
                })
        else {
            return;
        };
        let earned = u128::from(now - previous) * u128::from(self.bucket.refill_per_sec)
            / Duration::from_secs(1).as_nanos();
        self.add(u64::try_from(earned).unwrap_or(u64::MAX));
    }
}

/// Builds a [`RetryBudget`]; see there for the meaning and defaults.
#[derive(Clone, Debug)]
pub struct RetryBudgetBuilder {
    ratio: f64,
    min_per_sec: u32,
    capacity: u32,
    initial: Option<u32>,
    deposit_on: DepositOn,
}

impl RetryBudgetBuilder {
    /// Tokens earned per deposit (default 0.2: one retry per five requests).
    /// Negative or non-finite values count as 0; at most 1,000.
    pub fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = if ratio.is_finite() {
            ratio.clamp(0.0, 1000.0)
        } else {
            0.0
        };
        self
    }

    /// Tokens added per second regardless of traffic (default 10).
    pub fn min_per_sec(mut self, min_per_sec: u32) -> Self {
        self.min_per_sec = min_per_sec;
        self
    }

    /// The most tokens the bucket holds (default 100); the largest burst of
    /// retries it allows.
    pub fn capacity(mut self, capacity: u32) -> Self {
        self.capacity = capacity;
        self
    }

    /// Tokens at start (default: the capacity). Clamped to the capacity.
    pub fn initial(mut self, initial: u32) -> Self {
        self.initial = Some(initial);
        self
    }

    /// When tokens are earned (default [`DepositOn::Request`]).
    pub fn deposit_on(mut self, deposit_on: DepositOn) -> Self {
        self.deposit_on = deposit_on;
        self
    }

    /// Builds the budget. Its refill clock starts now.
    pub fn build(self) -> RetryBudget {
        let capacity = u64::from(self.capacity) * TOKEN;
        let initial = self
            .initial
            .map_or(capacity, |i| (u64::from(i) * TOKEN).min(capacity));
        RetryBudget {
            bucket: Arc::new(Bucket {
                balance: AtomicU64::new(initial),
                capacity,
                deposit: (self.ratio * TOKEN as f64).round() as u64,
                refill_per_sec: u64::from(self.min_per_sec) * TOKEN,
                deposit_on: self.deposit_on,
                epoch: Instant::now(),
                refilled_to: AtomicU64::new(0),
                dry: AtomicBool::new(false),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty(ratio: f64, min_per_sec: u32) -> RetryBudget {
        RetryBudget::builder()
            .ratio(ratio)
            .min_per_sec(min_per_sec)
            .capacity(1000)
            .initial(0)
            .build()
    }

    #[test]
    fn fractional_ratio_is_exact() {
        // The scenario of tower #857: 10 deposits at 0.6 allow 6 retries, not 10.
        let budget = empty(0.6, 0);
        for _ in 0..10 {
            budget.deposit();
        }
        let allowed = (0..10).filter(|_| budget.try_withdraw()).count();
        assert_eq!(allowed, 6);

        for (ratio, deposits, expected) in [(0.1, 100, 10), (0.3, 10, 3), (2.5, 4, 10)] {
            let budget = empty(ratio, 0);
            for _ in 0..deposits {
                budget.deposit();
            }
            let allowed = (0..1000).filter(|_| budget.try_withdraw()).count();
            assert_eq!(allowed, expected, "ratio {ratio}");
        }
    }

    #[test]
    fn capacity_bounds_the_balance() {
        let budget = RetryBudget::builder()
            .ratio(1.0)
            .min_per_sec(0)
            .capacity(3)
            .initial(0)
            .build();
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(budget.balance(), 3.0);
        assert_eq!((0..10).filter(|_| budget.try_withdraw()).count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn time_refills_at_the_floor_rate() {
        let budget = empty(0.0, 4);
        assert!(!budget.has_token());
        tokio::time::advance(Duration::from_millis(249)).await;
        assert!(!budget.try_withdraw());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!((0..10).filter(|_| budget.try_withdraw()).count(), 4);
    }

    #[test]
    fn clones_share_tokens() {
        let a = RetryBudget::builder().min_per_sec(0).capacity(2).build();
        let b = a.clone();
        assert!(a.try_withdraw());
        assert!(b.try_withdraw());
        assert!(!a.try_withdraw());
        assert!(!b.has_token());
    }

    #[test]
    fn concurrent_withdrawals_never_overdraw() {
        let budget = RetryBudget::builder().min_per_sec(0).capacity(1000).build();
        let taken: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let budget = budget.clone();
                    s.spawn(move || (0..1000).filter(|_| budget.try_withdraw()).count())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(taken, 1000);
    }
}
