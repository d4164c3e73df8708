//! The consumer's supervised state, the partitions stuck on an unwritable
//! dead-letter topic, and the policy for them.

use super::tracker::TopicPartition;
use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Where a consumer is in its life; see [`KafkaConsumer::state`](super::KafkaConsumer::state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsumerState {
    /// Built; the poll thread has not started yet.
    Starting,
    /// Polling and handling.
    Running,
    /// Stopped by a fault: a panic on the poll thread or in a lane, or the
    /// [`DeadLetterFailure::StopConsumer`] policy. Nothing is committed past what
    /// was finished; `shutdown` returns [`ConsumerError::Failed`](super::ConsumerError::Failed).
    Failed {
        /// What happened (panic message or error, at most 1 KiB).
        reason: String,
    },
    /// Shut down (or dropped).
    Stopped,
}

impl ConsumerState {
    /// Whether this is [`ConsumerState::Failed`].
    pub fn is_failed(&self) -> bool {
        matches!(self, ConsumerState::Failed { .. })
    }
}

/// What the consumer does when a message cannot be dead-lettered (the dead-letter
/// topic is missing and may not be created, refuses the record, or may not be
/// written by this client).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeadLetterFailure {
    /// Keep trying to publish with the retry policy's backoff (1 s doubling to
    /// 30 s by default), for ever, without running the handler again. Only the
    /// message's partition is paused; the others go on. Nothing of that partition is
    /// committed past the message. Counted in `dlq_failures`, listed by
    /// [`KafkaConsumer::stuck_partitions`](super::KafkaConsumer::stuck_partitions)
    /// and shown as degraded in the client's health. The default: an operator fixes
    /// the topic and the partition moves on by itself.
    #[default]
    KeepRetrying,
    /// After `after_failures` failed publishes of one message, the consumer goes to
    /// [`ConsumerState::Failed`] and stops (its group partitions go to other
    /// members, which will meet the same message).
    StopConsumer {
        /// Failed publishes of one message before the consumer stops (at least 1).
        after_failures: u32,
    },
}

/// Longest reason kept in a [`ConsumerState::Failed`].
const MAX_REASON: usize = 1024;

/// `text` cut to at most `max` bytes at a character boundary, marked when cut.
pub(crate) fn truncate_utf8(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    const MARK: &str = "…(truncated)";
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &text[..end]).into()
}

/// The state, behind a watch channel so that callers can wait for changes.
#[derive(Debug)]
pub(crate) struct StateCell {
    tx: watch::Sender<ConsumerState>,
}

impl StateCell {
    pub(crate) fn new() -> Self {
        StateCell {
            tx: watch::Sender::new(ConsumerState::Starting),
        }
    }

    pub(crate) fn get(&self) -> ConsumerState {
        self.tx.borrow().clone()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<ConsumerState> {
        self.tx.subscribe()
    }

    /// `Starting` becomes `Running`; any other state stays.
    pub(crate) fn running(&self) {
        self.tx.send_if_modified(|s| {
            let starting = *s == ConsumerState::Starting;
            if starting {
                *s = ConsumerState::Running;
            }
            starting
        });
    }

    /// Records a failure (the first one wins) and logs it. Returns whether this
    /// call made the consumer fail.
    pub(crate) fn fail(&self, reason: &str) -> bool {
        let reason = truncate_utf8(reason, MAX_REASON).into_owned();
        let changed = self.tx.send_if_modified(|s| {
            if matches!(s, ConsumerState::Failed { .. } | ConsumerState::Stopped) {
                return false;
            }
            *s = ConsumerState::Failed {
                reason: reason.clone(),
            };
            true
        });
        if changed {
            tracing::error!(reason = %reason, "kafka consumer failed; it stops");
        }
        changed
    }

    /// Records a stop, unless the consumer failed (the failure stays visible).
    pub(crate) fn stopped(&self) {
        self.tx.send_if_modified(|s| {
            let change = !matches!(s, ConsumerState::Failed { .. } | ConsumerState::Stopped);
            if change {
                *s = ConsumerState::Stopped;
            }
            change
        });
    }
}

/// A partition whose next message to commit cannot be dead-lettered.
#[derive(Clone, PartialEq, Eq)]
pub struct StuckPartition {
    /// The partition.
    pub partition: TopicPartition,
    /// Offset of the message that cannot be dead-lettered.
    pub offset: i64,
    /// How long it has been stuck.
    pub stuck_for: Duration,
    /// Failed dead-letter publishes so far.
    pub failures: u32,
    /// The last publish error (at most 1 KiB).
    pub last_error: String,
}

impl fmt::Debug for StuckPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StuckPartition")
            .field("partition", &self.partition.to_string())
            .field("offset", &self.offset)
            .field("stuck_for", &self.stuck_for)
            .field("failures", &self.failures)
            .field("last_error", &self.last_error)
            .finish()
    }
}

#[derive(Debug)]
struct Stuck {
    since: Instant,
    failures: u32,
    last_error: String,
}

/// Messages whose dead-letter publish keeps failing, by partition and offset.
/// Changes are announced on a watch channel (a version number) so the supervisor
/// pauses and resumes the partitions.
#[derive(Debug)]
pub(crate) struct StuckPartitions {
    stuck: Mutex<HashMap<(TopicPartition, i64), Stuck>>,
    changed: watch::Sender<u64>,
}

impl StuckPartitions {
    pub(crate) fn new() -> Self {
        StuckPartitions {
            stuck: Mutex::default(),
            changed: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(TopicPartition, i64), Stuck>> {
        self.stuck.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a failed publish of `offset`; returns its failures so far.
    pub(crate) fn failed(&self, tp: &TopicPartition, offset: i64, error: &str) -> u32 {
        let error = truncate_utf8(error, MAX_REASON).into_owned();
        let (failures, new) = {
            let mut stuck = self.lock();
            let new = !stuck.keys().any(|(p, _)| p == tp);
            let entry = stuck.entry((tp.clone(), offset)).or_insert(Stuck {
                since: Instant::now(),
                failures: 0,
                last_error: String::new(),
            });
            entry.failures += 1;
            entry.last_error = error;
            (entry.failures, new)
        };
        if new {
            self.changed.send_modify(|v| *v += 1);
        }
        failures
    }

    /// `offset` is dead-lettered (or abandoned): forget it.
    pub(crate) fn cleared(&self, tp: &TopicPartition, offset: i64) {
        let (removed, partition_free) = {
            let mut stuck = self.lock();
            let removed = stuck.remove(&(tp.clone(), offset)).is_some();
            (removed, !stuck.keys().any(|(p, _)| p == tp))
        };
        if removed && partition_free {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// The stuck partitions now, each with its oldest stuck message.
    pub(crate) fn snapshot(&self) -> Vec<StuckPartition> {
        let now = Instant::now();
        let mut by_partition: HashMap<TopicPartition, StuckPartition> = HashMap::new();
        for ((tp, offset), s) in self.lock().iter() {
            let entry = StuckPartition {
                partition: tp.clone(),
                offset: *offset,
                stuck_for: now.saturating_duration_since(s.since),
                failures: s.failures,
                last_error: s.last_error.clone(),
            };
            by_partition
                .entry(tp.clone())
                .and_modify(|e| {
                    if entry.offset < e.offset {
                        *e = entry.clone();
                    }
                })
                .or_insert(entry);
        }
        let mut v: Vec<_> = by_partition.into_values().collect();
        v.sort_by(|a, b| a.partition.cmp(&b.partition));
        v
    }

    pub(crate) fn partitions(&self) -> Vec<TopicPartition> {
        let mut v: Vec<_> = self.lock().keys().map(|(tp, _)| tp.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_valid_utf8_within_the_limit() {
        let text = "é".repeat(1000); // 2000 bytes
        let cut = truncate_utf8(&text, 1024);
        assert!(cut.len() <= 1024, "{}", cut.len());
        assert!(cut.ends_with("(truncated)"));
        assert_eq!(truncate_utf8("short", 1024), "short");
    }

    #[test]
    fn the_first_failure_wins_and_stays_after_stop() {
        let cell = StateCell::new();
        let mut rx = cell.subscribe();
        cell.running();
        assert_eq!(cell.get(), ConsumerState::Running);
        assert!(cell.fail("lane panicked: boom"));
        assert!(!cell.fail("second"));
        cell.stopped();
        assert_eq!(
            cell.get(),
            ConsumerState::Failed {
                reason: "lane panicked: boom".into()
            }
        );
        assert!(rx.has_changed().unwrap());
        assert!(rx.borrow_and_update().is_failed());
    }

    /// Seconds stuck are measured on tokio's clock (paused here).
    #[tokio::test(start_paused = true)]
    async fn stuck_partitions_report_their_oldest_message_and_time() {
        let stuck = StuckPartitions::new();
        let mut changes = stuck.subscribe();
        let tp = TopicPartition::new("t", 1);
        assert_eq!(stuck.failed(&tp, 7, "unknown topic"), 1);
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(stuck.failed(&tp, 7, "unknown topic"), 2);
        stuck.failed(&tp, 9, "unknown topic");
        assert!(!changes.has_changed().unwrap(), "same partition: no news");
        let snap = stuck.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!((snap[0].offset, snap[0].failures), (7, 2));
        assert_eq!(snap[0].stuck_for, Duration::from_secs(3));
        stuck.cleared(&tp, 7);
        assert!(!changes.has_changed().unwrap(), "offset 9 still stuck");
        stuck.cleared(&tp, 9);
        assert!(changes.has_changed().unwrap());
        assert!(stuck.snapshot().is_empty());
    }
}
