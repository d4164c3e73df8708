//! The poison-rate guard: stops a consumer from draining a whole topic into the
//! dead-letter queue.
//!
//! # Why
//!
//! After a bad deploy (a handler that fails on every record, a schema the new code
//! cannot read) a consumer with a DLQ keeps going: each record is retried, then
//! dead-lettered, and the partition moves on, until the whole backlog sits in the
//! DLQ and must be replayed. rust-arroyo stops a consumer in that case. With a
//! [`PoisonGuard`] ([`KafkaConsumerBuilder::poison_guard`]), when more than a
//! share of the records, or more than a number of records, ended in the DLQ within
//! a sliding time window, keel stops handling at once and either pauses the
//! consumer (the default) or stops it ([`PoisonAction`]). The records not handled
//! yet are not committed: they wait in the topic for the fix.
//!
//! # What counts
//!
//! Every record that ends is counted: handled (or skipped as an unknown type),
//! dead-lettered (after its retries, or at once when it cannot be decoded), or
//! failed and skipped when the DLQ is disabled. The last two are *poisoned*. The
//! window is a time window of [`PoisonGuard::window`] kept in ten buckets: records
//! leave it a tenth of the window at a time, so memory is fixed whatever the rate.
//!
//! # When it trips
//!
//! - `max_dead_lettered(n)`: `n` poisoned records in the window;
//! - `max_rate(x)`: more than `x` (0.0 to 1.0) of the records in the window are
//!   poisoned, once the window holds at least
//!   [`min_records`](PoisonGuard::min_records) records (default 20; a single
//!   failure out of one record is no evidence).
//!
//! The check runs as each record ends, on the lane that handled it; a tripped
//! guard holds every lane before its next record, so with one lane (the default)
//! nothing more reaches the DLQ, and with `workers` lanes at most the records other
//! lanes are already handling do.
//!
//! # Then
//!
//! - [`PoisonAction::Pause`] (default): fetching is paused
//!   ([`KafkaConsumer::is_paused`] is true), the lanes hold, the consumer stays in
//!   the group and keeps its partitions. Its health shows the reason in
//!   [`ConsumerHealth::poison_guard`](crate::kafka::client::ConsumerHealth::poison_guard)
//!   and the report is degraded (not unhealthy: a restart by the orchestrator would
//!   only start draining again). [`KafkaConsumer::release_poison_guard`] clears the
//!   window and resumes, once the cause is fixed.
//! - [`PoisonAction::Stop`]: the consumer goes to [`ConsumerState::Failed`] with
//!   the reason, which makes the health report unhealthy; its partitions go to the
//!   other members of the group (which will trip on the same records if they run
//!   the same code).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use keel::kafka::consumer::{KafkaConsumer, PoisonAction, PoisonGuard};
//! # fn f(client: rdkafka::ClientConfig) {
//! let builder = KafkaConsumer::builder(client, "orders")
//!     .poison_guard(
//!         PoisonGuard::new()
//!             .max_rate(0.5)             // more than half of the records ...
//!             .max_dead_lettered(100)    // ... or 100 records ...
//!             .window(Duration::from_secs(60)) // ... within a minute
//!             .action(PoisonAction::Stop),
//!     );
//! # let _ = builder; }
//! ```
//!
//! [`KafkaConsumerBuilder::poison_guard`]: super::KafkaConsumerBuilder::poison_guard
//! [`KafkaConsumer::is_paused`]: super::KafkaConsumer::is_paused
//! [`KafkaConsumer::release_poison_guard`]: super::KafkaConsumer::release_poison_guard
//! [`ConsumerState::Failed`]: super::ConsumerState::Failed

use super::KafkaConsumer;
use super::control::ConsumerControl;
use super::error::ConsumerError;
use super::metrics::Ending;
use super::poll::Command;
use super::state::StateCell;
use std::sync::{Mutex, Weak};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// Buckets of the sliding window.
const BUCKETS: u64 = 10;

/// What a tripped [`PoisonGuard`] does to the consumer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PoisonAction {
    /// Pause fetching and hold the lanes, in the group, until
    /// [`KafkaConsumer::release_poison_guard`](super::KafkaConsumer::release_poison_guard);
    /// health degraded with the reason.
    #[default]
    Pause,
    /// Fail the consumer ([`ConsumerState::Failed`](super::ConsumerState::Failed)
    /// with the reason; health unhealthy): it stops and leaves the group.
    Stop,
}

/// Configures the poison-rate guard (see [the module docs](self)).
///
/// | setting | default |
/// |---|---|
/// | [`max_rate`](Self::max_rate) | off |
/// | [`max_dead_lettered`](Self::max_dead_lettered) | off |
/// | [`window`](Self::window) | 60 s |
/// | [`min_records`](Self::min_records) | 20 |
/// | [`action`](Self::action) | [`PoisonAction::Pause`] |
///
/// With neither limit set the guard never trips.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoisonGuard {
    max_rate: Option<f64>,
    max_dead_lettered: Option<u32>,
    window: Duration,
    min_records: u32,
    action: PoisonAction,
}

impl Default for PoisonGuard {
    fn default() -> Self {
        PoisonGuard {
            max_rate: None,
            max_dead_lettered: None,
            window: Duration::from_secs(60),
            min_records: 20,
            action: PoisonAction::Pause,
        }
    }
}

impl PoisonGuard {
    /// A guard with the defaults above (no limit set yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// Trips when more than `rate` (0.0 to 1.0, clamped; NaN is 1.0) of the records
    /// in the window were poisoned, once it holds [`min_records`](Self::min_records).
    pub fn max_rate(mut self, rate: f64) -> Self {
        self.max_rate = Some(if rate.is_nan() {
            1.0
        } else {
            rate.clamp(0.0, 1.0)
        });
        self
    }

    /// Trips when `n` records (at least 1) in the window were poisoned.
    pub fn max_dead_lettered(mut self, n: u32) -> Self {
        self.max_dead_lettered = Some(n.max(1));
        self
    }

    /// The sliding window (at least 10 ms; default 60 s).
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window.max(Duration::from_millis(10));
        self
    }

    /// Records the window must hold before the rate rule applies (at least 1;
    /// default 20).
    pub fn min_records(mut self, n: u32) -> Self {
        self.min_records = n.max(1);
        self
    }

    /// What to do when the guard trips (default [`PoisonAction::Pause`]).
    pub fn action(mut self, action: PoisonAction) -> Self {
        self.action = action;
        self
    }

    /// Whether a limit is set.
    fn armed(&self) -> bool {
        self.max_rate.is_some() || self.max_dead_lettered.is_some()
    }
}

/// Counts of one bucket of the window.
#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// The bucket's slot (time since the epoch divided by the bucket's length).
    slot: u64,
    records: u32,
    poisoned: u32,
}

/// Records and poisoned records over the last `window`, in [`BUCKETS`] buckets.
#[derive(Debug)]
pub(crate) struct PoisonWindow {
    epoch: Instant,
    bucket_nanos: u64,
    buckets: [Bucket; BUCKETS as usize],
}

impl PoisonWindow {
    pub(crate) fn new(window: Duration) -> Self {
        let nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        PoisonWindow {
            epoch: Instant::now(),
            bucket_nanos: (nanos / BUCKETS).max(1),
            buckets: [Bucket::default(); BUCKETS as usize],
        }
    }

    fn slot(&self, now: Instant) -> u64 {
        let nanos =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        nanos / self.bucket_nanos
    }

    /// Counts one record that ended at `now`; returns (records, poisoned) in the
    /// window after it.
    pub(crate) fn record(&mut self, now: Instant, poisoned: bool) -> (u32, u32) {
        let slot = self.slot(now);
        let bucket = &mut self.buckets[(slot % BUCKETS) as usize];
        if bucket.slot != slot || bucket.records == 0 {
            *bucket = Bucket {
                slot,
                records: 0,
                poisoned: 0,
            };
        }
        bucket.records = bucket.records.saturating_add(1);
        bucket.poisoned = bucket.poisoned.saturating_add(u32::from(poisoned));
        self.counts(now)
    }

    /// (records, poisoned) in the window at `now`.
    pub(crate) fn counts(&self, now: Instant) -> (u32, u32) {
        let slot = self.slot(now);
        self.buckets
            .iter()
            .filter(|b| b.records > 0 && b.slot <= slot && slot - b.slot < BUCKETS)
            .fold((0u32, 0u32), |(r, p), b| {
                (r.saturating_add(b.records), p.saturating_add(b.poisoned))
            })
    }

    pub(crate) fn clear(&mut self) {
        self.buckets = [Bucket::default(); BUCKETS as usize];
    }
}

/// A running guard, shared by the lanes (`Arc` in the lane context).
#[derive(Debug)]
pub(crate) struct PoisonGuardState {
    config: PoisonGuard,
    window: Mutex<PoisonWindow>,
    /// `Some(reason)` while tripped.
    tripped: watch::Sender<Option<String>>,
}

impl PoisonGuardState {
    /// The running guard of `config`, `None` when no limit is set.
    pub(crate) fn new(config: PoisonGuard) -> Option<Self> {
        config.armed().then(|| PoisonGuardState {
            window: Mutex::new(PoisonWindow::new(config.window)),
            config,
            tripped: watch::Sender::new(None),
        })
    }

    pub(crate) fn action(&self) -> PoisonAction {
        self.config.action
    }

    /// Counts a record that ended; returns the reason when this record tripped the
    /// guard (once: until it is released, a tripped guard trips no more).
    pub(crate) fn ended(&self, ending: Ending) -> Option<String> {
        let poisoned = ending != Ending::Processed;
        let (records, bad) = {
            let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
            window.record(Instant::now(), poisoned)
        };
        if !poisoned {
            return None;
        }
        let window = self.config.window;
        let reason = match (self.config.max_dead_lettered, self.config.max_rate) {
            (Some(n), _) if bad >= n => format!(
                "poison-rate guard: {bad} of {records} records dead-lettered or failed within \
                 {window:?} (limit {n} records)"
            ),
            (_, Some(rate))
                if records >= self.config.min_records
                    && f64::from(bad) / f64::from(records) > rate =>
            {
                format!(
                    "poison-rate guard: {bad} of {records} records ({:.1}%) dead-lettered or \
                     failed within {window:?} (limit {:.1}%)",
                    f64::from(bad) * 100.0 / f64::from(records),
                    rate * 100.0
                )
            }
            _ => return None,
        };
        let tripped = self.tripped.send_if_modified(|t| {
            let first = t.is_none();
            if first {
                *t = Some(reason.clone());
            }
            first
        });
        tripped.then_some(reason)
    }

    /// Why it tripped, while it is tripped.
    pub(crate) fn reason(&self) -> Option<String> {
        self.tripped.borrow().clone()
    }

    pub(crate) fn is_tripped(&self) -> bool {
        self.tripped.borrow().is_some()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.tripped.subscribe()
    }

    /// Clears the window and the trip; returns whether it was tripped.
    pub(crate) fn release(&self) -> bool {
        self.window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.tripped.send_if_modified(|t| t.take().is_some())
    }

    /// Waits until the guard is released (`true`) or `stop` is set (`false`).
    pub(crate) async fn held(&self, stop: &mut watch::Receiver<bool>) -> bool {
        let mut tripped = self.tripped.subscribe();
        tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => false,
            released = tripped.wait_for(Option::is_none) => released.is_ok(),
        }
    }

    /// Acts on a trip of this lane's record: fails the consumer under
    /// [`PoisonAction::Stop`]; under [`PoisonAction::Pause`] the guard's task
    /// ([`watch_guard`]) pauses fetching.
    pub(crate) fn tripped_by(&self, reason: &str, state: &StateCell) {
        tracing::error!(reason, action = ?self.config.action, "poison-rate guard tripped");
        if self.config.action == PoisonAction::Stop {
            state.fail(reason);
        }
    }
}

/// The guard's task under [`PoisonAction::Pause`]: pauses fetching when the guard
/// trips and resumes it when it is released.
pub(crate) async fn watch_guard(
    control: Weak<ConsumerControl>,
    mut tripped: watch::Receiver<Option<String>>,
) {
    while tripped.changed().await.is_ok() {
        let is_tripped = tripped.borrow_and_update().is_some();
        let Some(control) = control.upgrade() else {
            return;
        };
        let (ack, done) = oneshot::channel();
        let command = if is_tripped {
            Command::Pause(None, ack)
        } else {
            Command::Resume(None, ack)
        };
        if control.send(command).is_err() {
            return;
        }
        drop(control);
        if let Ok(Err(error)) = done.await {
            tracing::warn!(%error, is_tripped, "poison-rate guard: pausing or resuming failed");
        }
    }
}

impl KafkaConsumer {
    /// Why the [poison-rate guard](super::poison_guard) tripped, while it holds the
    /// consumer paused (or why it stopped it); `None` otherwise or without a guard.
    pub fn poison_guard_reason(&self) -> Option<String> {
        self.control.poison_guard.as_ref()?.reason()
    }

    /// Releases a tripped [poison-rate guard](super::poison_guard) after the cause
    /// is fixed: clears its window and resumes fetching and handling (every
    /// partition, like [`resume`](super::KafkaConsumer::resume)). Returns whether it
    /// was tripped. A consumer the guard stopped
    /// ([`PoisonAction::Stop`]) stays stopped: start a new one.
    pub fn release_poison_guard(&self) -> Result<bool, ConsumerError> {
        match &self.control.poison_guard {
            Some(_) if !self.is_running() => Err(ConsumerError::NotRunning),
            Some(guard) => {
                let released = guard.release();
                if released {
                    tracing::info!("poison-rate guard released; the consumer resumes");
                }
                Ok(released)
            }
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(config: PoisonGuard) -> PoisonGuardState {
        PoisonGuardState::new(config).expect("armed")
    }

    #[test]
    fn without_a_limit_there_is_no_guard() {
        assert!(PoisonGuardState::new(PoisonGuard::new()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn trips_at_n_poisoned_records_within_the_window_and_once() {
        let g = guard(
            PoisonGuard::new()
                .max_dead_lettered(3)
                .window(Duration::from_secs(10)),
        );
        let mut rx = g.subscribe();
        assert_eq!(g.ended(Ending::DeadLettered), None);
        assert_eq!(g.ended(Ending::Processed), None);
        assert_eq!(g.ended(Ending::Failed), None);
        assert!(!g.is_tripped());
        let reason = g
            .ended(Ending::DeadLettered)
            .expect("third poisoned record");
        assert!(
            reason.contains("3 of 4 records") && reason.contains("limit 3 records"),
            "{reason}"
        );
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().as_deref(), Some(reason.as_str()));
        assert_eq!(g.ended(Ending::DeadLettered), None, "trips once");
        assert_eq!(g.reason(), Some(reason));
        assert!(g.release());
        assert!(!g.is_tripped());
        assert!(!g.release(), "released already");
        // The window was cleared: two more are not enough.
        assert_eq!(g.ended(Ending::DeadLettered), None);
        assert_eq!(g.ended(Ending::DeadLettered), None);
    }

    /// Poisoned records older than the window leave it a bucket (a tenth) at a time.
    #[tokio::test(start_paused = true)]
    async fn old_records_leave_the_window() {
        let g = guard(
            PoisonGuard::new()
                .max_dead_lettered(3)
                .window(Duration::from_secs(10)),
        );
        assert_eq!(g.ended(Ending::DeadLettered), None);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(g.ended(Ending::DeadLettered), None);
        // The first record's bucket [0 s, 1 s) leaves the window at 10 s.
        tokio::time::advance(Duration::from_millis(5_000)).await;
        assert_eq!(g.ended(Ending::DeadLettered), None, "first one left");
        tokio::time::advance(Duration::from_millis(4_999)).await;
        assert!(
            g.ended(Ending::DeadLettered).is_some(),
            "5 s, 10 s and 14.999 s are within 10 s of buckets"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_counts_at_most_its_span() {
        let mut w = PoisonWindow::new(Duration::from_secs(1));
        for _ in 0..5 {
            w.record(Instant::now(), true);
        }
        assert_eq!(w.counts(Instant::now()), (5, 5));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(w.record(Instant::now(), false), (6, 5));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(w.counts(Instant::now()), (1, 0), "the first bucket left");
        // Long idle: everything left, even a bucket whose ring index is reused.
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(w.counts(Instant::now()), (0, 0));
        w.clear();
        assert_eq!(w.record(Instant::now(), true), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_rule_waits_for_min_records_and_needs_more_than_the_rate() {
        let g = guard(
            PoisonGuard::new()
                .max_rate(0.5)
                .min_records(4)
                .window(Duration::from_secs(60)),
        );
        assert_eq!(
            g.ended(Ending::DeadLettered),
            None,
            "1 of 1: too few records"
        );
        assert_eq!(g.ended(Ending::DeadLettered), None);
        assert_eq!(g.ended(Ending::Processed), None);
        // 3 of 4 = 75 % > 50 %.
        let reason = g.ended(Ending::DeadLettered).expect("rate");
        assert!(
            reason.contains("75.0%") && reason.contains("limit 50.0%"),
            "{reason}"
        );

        let g = guard(PoisonGuard::new().max_rate(0.5).min_records(2));
        assert_eq!(g.ended(Ending::Processed), None);
        assert_eq!(
            g.ended(Ending::DeadLettered),
            None,
            "exactly 50 %: not more"
        );
        assert!(g.ended(Ending::DeadLettered).is_some(), "2 of 3");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_lane_waits_for_release_or_stop() {
        let g = std::sync::Arc::new(guard(PoisonGuard::new().max_dead_lettered(1)));
        assert!(g.ended(Ending::DeadLettered).is_some());
        let (stop_tx, mut stop) = watch::channel(false);
        let waiting = {
            let g = g.clone();
            let mut stop = stop.clone();
            tokio::spawn(async move { g.held(&mut stop).await })
        };
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!waiting.is_finished(), "held while tripped");
        g.release();
        assert!(waiting.await.unwrap(), "released");

        assert!(g.ended(Ending::DeadLettered).is_some());
        let waiting = {
            let g = g.clone();
            tokio::spawn(async move { g.held(&mut stop).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop_tx.send(true).unwrap();
        assert!(!waiting.await.unwrap(), "stopped");
    }

    #[tokio::test(start_paused = true)]
    async fn stop_fails_the_consumer_with_the_reason() {
        let g = guard(
            PoisonGuard::new()
                .max_dead_lettered(1)
                .action(PoisonAction::Stop),
        );
        let state = StateCell::new();
        state.running();
        let reason = g.ended(Ending::DeadLettered).unwrap();
        g.tripped_by(&reason, &state);
        assert_eq!(state.get(), super::super::ConsumerState::Failed { reason });
    }
}
