//! When and how often to retry.

use super::backoff::{Backoff, Jitter};
use super::budget::RetryBudget;
use std::time::Duration;

/// The retry rules: a [`Backoff`] schedule, a maximum number of attempts, an
/// optional overall deadline, an optional [`RetryBudget`] and an optional jitter
/// seed.
///
/// Defaults ([`RetryPolicy::new`]): backoff base 100 ms, multiplier 2, cap 10 s,
/// full jitter; 3 attempts (2 retries); no deadline; a default [`RetryBudget`]
/// (20 % of requests + 10 per second, up to 100).
///
/// A delay floor from the outcome (`Classification::retry_after`, from
/// `Retry-After` or S3 `SlowDown`) raises the next wait to at least that value,
/// even above the cap; set a [deadline](RetryPolicy::deadline) to bound it.
///
/// **Cloning** copies the settings and shares the budget.
///
/// ```
/// use keel_layers::retry::{Jitter, RetryPolicy};
/// use std::time::Duration;
///
/// let policy = RetryPolicy::new()
///     .base(Duration::from_millis(50))
///     .cap(Duration::from_secs(2))
///     .jitter(Jitter::Decorrelated)
///     .max_attempts(5)
///     .deadline(Duration::from_secs(10));
/// assert_eq!(policy.attempts(), 5);
/// ```
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub(crate) backoff: Backoff,
    pub(crate) max_attempts: u32,
    pub(crate) deadline: Option<Duration>,
    pub(crate) budget: Option<RetryBudget>,
    pub(crate) seed: Option<u64>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            backoff: Backoff::default(),
            max_attempts: 3,
            deadline: None,
            budget: Some(RetryBudget::default()),
            seed: None,
        }
    }
}

impl RetryPolicy {
    /// The defaults listed above.
    pub fn new() -> Self {
        RetryPolicy::default()
    }

    /// The seed's Kafka schedule: waits of 1, 2, 4 and 8 s (multiplier 2, cap 30 s),
    /// so at most 5 attempts; no jitter, so the schedule is exactly the seed's;
    /// **no retry budget**; no deadline.
    ///
    /// No budget, because this is the consumer's preset: a budget spent during an
    /// outage would dead-letter healthy messages after their first failure. Add
    /// one with [`budget`](Self::budget) where calls may be dropped instead (a
    /// high-traffic request path).
    ///
    /// Raising [`max_retries`](Self::max_retries) continues the schedule with 16 s,
    /// then 30 s per retry. Keep librdkafka's own retries in mind (`retries`,
    /// `retry.backoff.ms`): retrying on top multiplies attempts.
    ///
    /// ```
    /// use keel_layers::retry::RetryPolicy;
    /// let secs: Vec<u64> = RetryPolicy::kafka().schedule().map(|d| d.as_secs()).collect();
    /// assert_eq!(secs, [1, 2, 4, 8]);
    /// ```
    pub fn kafka() -> Self {
        RetryPolicy::new()
            .backoff(
                Backoff::new(Duration::from_secs(1))
                    .multiplier(2.0)
                    .cap(Duration::from_secs(30))
                    .jitter(Jitter::None),
            )
            .max_retries(4)
            .without_budget()
    }

    /// The seed's S3 schedule: 3 retries waiting 1, 2 and 4 s (multiplier 2,
    /// cap 10 s), so at most 4 attempts; no jitter; default budget; no deadline.
    /// An S3 `503 SlowDown` with a longer `Retry-After` raises the wait.
    ///
    /// The AWS SDK retries on its own (standard mode, 3 attempts); disable or
    /// account for that when stacking this layer on it.
    ///
    /// ```
    /// use keel_layers::retry::RetryPolicy;
    /// let secs: Vec<u64> = RetryPolicy::s3().schedule().map(|d| d.as_secs()).collect();
    /// assert_eq!(secs, [1, 2, 4]);
    /// ```
    pub fn s3() -> Self {
        RetryPolicy::new()
            .backoff(
                Backoff::new(Duration::from_secs(1))
                    .multiplier(2.0)
                    .cap(Duration::from_secs(10))
                    .jitter(Jitter::None),
            )
            .max_retries(3)
    }

    /// Replaces the whole backoff schedule.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the delay before the first retry.
    pub fn base(mut self, base: Duration) -> Self {
        self.backoff = self.backoff.base(base);
        self
    }

    /// Sets the growth factor between retries (values below 1 count as 1).
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.backoff = self.backoff.multiplier(multiplier);
        self
    }

    /// Sets the longest backoff.
    pub fn cap(mut self, cap: Duration) -> Self {
        self.backoff = self.backoff.cap(cap);
        self
    }

    /// Sets the jitter.
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.backoff = self.backoff.jitter(jitter);
        self
    }

    /// Sets the most attempts, the first included (0 counts as 1: no retry).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Sets the most retries (attempts − 1).
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_attempts = retries.saturating_add(1);
        self
    }

    /// Sets an overall deadline across attempts: no backoff that would end at or
    /// past it is started, and no attempt is started at or past it. An attempt
    /// already running is not cut short (put a [`Timeout`](crate::timeout::Timeout)
    /// inside the retry layer for that). When the deadline stops retrying, the
    /// caller gets the last outcome.
    ///
    /// The clock starts when the first attempt is first found pending — in practice
    /// the first poll after `call` — or, if the first attempt completes on its first
    /// poll, when it completes. So a call that succeeds at once never reads the
    /// clock, and time between `call` and the first poll is not counted (the same
    /// rule as [`Timeout`](crate::timeout::Timeout)).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Uses this budget (a clone shares it).
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Retries without a budget: only the attempt limit and the deadline bound
    /// retries. Not advised for high-traffic clients.
    pub fn without_budget(mut self) -> Self {
        self.budget = None;
        self
    }

    /// Seeds the jitter: every request then draws the same jitter sequence. For
    /// tests; by default each request seeds from a thread-local generator.
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The most attempts, the first included.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The backoff schedule.
    pub fn schedule_config(&self) -> &Backoff {
        &self.backoff
    }

    /// The overall deadline, if any.
    pub fn overall_deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// The budget, if any (to watch its balance).
    pub fn retry_budget(&self) -> Option<&RetryBudget> {
        self.budget.as_ref()
    }

    /// The waits before each permitted retry, before jitter and delay floors:
    /// `max_attempts − 1` values.
    pub fn schedule(&self) -> impl Iterator<Item = Duration> + '_ {
        (1..self.max_attempts).map(|retry| self.backoff.delay(retry))
    }

    /// `true` when a request starting now could be retried at all (the attempt
    /// limit allows it and the budget holds a token). Decides whether the request
    /// is cloned.
    #[inline]
    pub(crate) fn retry_possible(&self, attempt: u32) -> bool {
        attempt < self.max_attempts && self.budget.as_ref().is_none_or(RetryBudget::has_token)
    }
}
