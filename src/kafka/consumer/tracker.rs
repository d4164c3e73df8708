//! In-order offset tracking: which offset of each partition may be committed.
//!
//! Messages of one partition may finish out of order (key-ordered mode runs them on
//! several workers, and a retried message finishes after later ones). Committing the
//! offset of whichever message finished last would tell Kafka that earlier, still
//! running messages are done (rust-rdkafka #89): a crash then loses them. The
//! [`OffsetTracker`] records every offset handed to a worker and commits only up to
//! the **lowest unfinished** one — or, when nothing is unfinished, one past the last
//! dispatched offset. Offsets need not be contiguous (compaction and transaction
//! markers leave gaps), so the tracker never computes `offset + 1` for an offset it
//! has not seen.
//!
//! Each assignment of a partition gets an epoch. A completion from an older
//! assignment (the partition was revoked and came back while a worker was still busy)
//! is ignored, so it cannot move the commit position of the new assignment.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

/// A topic and partition.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition number.
    pub partition: i32,
}

impl TopicPartition {
    /// A topic-partition.
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Debug for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// What [`OffsetTracker::dispatch`] decided about one fetched message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch {
    /// Handle it; report its completion with this epoch.
    Accepted {
        /// The assignment epoch to pass to [`OffsetTracker::complete`].
        epoch: u64,
    },
    /// An offset at or below one already dispatched (a re-fetch after a seek or
    /// resume): drop it, it is already being handled or was handled.
    Duplicate,
    /// The partition is not assigned to this consumer (any more): drop it.
    NotAssigned,
}

#[derive(Debug)]
struct PartitionOffsets {
    epoch: u64,
    /// Dispatched and not finished.
    pending: BTreeSet<i64>,
    /// One past the highest dispatched offset.
    next_offset: Option<i64>,
    /// The last commit position handed out by `take_commits`.
    committed: Option<i64>,
}

impl PartitionOffsets {
    fn commit_position(&self) -> Option<i64> {
        self.pending.first().copied().or(self.next_offset)
    }
}

/// Per-partition record of dispatched and finished offsets; see the module docs.
///
/// Pure data structure: no Kafka, no clock. The consumer runtime keeps one behind a
/// mutex that only its poll thread locks on the hot path.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<TopicPartition, PartitionOffsets>,
    next_epoch: u64,
}

impl OffsetTracker {
    /// An empty tracker (no partition assigned).
    pub fn new() -> Self {
        OffsetTracker::default()
    }

    /// Starts tracking a newly assigned partition and returns its epoch. A partition
    /// that is already tracked keeps its state and epoch.
    pub fn assign(&mut self, tp: TopicPartition) -> u64 {
        if let Some(state) = self.partitions.get(&tp) {
            return state.epoch;
        }
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        self.partitions.insert(
            tp,
            PartitionOffsets {
                epoch,
                pending: BTreeSet::new(),
                next_offset: None,
                committed: None,
            },
        );
        epoch
    }

    /// Stops tracking a revoked partition. Returns the position to commit for it if
    /// that position was not committed yet (the caller commits it before letting the
    /// partition go).
    pub fn revoke(&mut self, tp: &TopicPartition) -> Option<i64> {
        let state = self.partitions.remove(tp)?;
        let position = state.commit_position()?;
        (state.committed != Some(position)).then_some(position)
    }

    /// The epoch of `tp`'s current assignment (`None` when not tracked).
    pub fn epoch(&self, tp: &TopicPartition) -> Option<u64> {
        self.partitions.get(tp).map(|s| s.epoch)
    }

    /// Records that `offset` was fetched and is about to be handed to a worker.
    pub fn dispatch(&mut self, tp: &TopicPartition, offset: i64) -> Dispatch {
        let Some(state) = self.partitions.get_mut(tp) else {
            return Dispatch::NotAssigned;
        };
        if state.next_offset.is_some_and(|next| offset < next) {
            return Dispatch::Duplicate;
        }
        state.pending.insert(offset);
        // Saturating: a broker can send offset i64::MAX, which has no "one past"
        // (`+ 1` panicked the poll thread in debug builds and wrapped to a negative
        // commit position in release). At i64::MAX the position stays on that
        // offset, so it is delivered again rather than skipped.
        state.next_offset = Some(offset.saturating_add(1));
        Dispatch::Accepted { epoch: state.epoch }
    }

    /// Records that the message at `offset` was handled or dead-lettered. Returns
    /// `false` when the completion belongs to an older assignment, or to an offset
    /// that was never dispatched, and was ignored.
    pub fn complete(&mut self, tp: &TopicPartition, epoch: u64, offset: i64) -> bool {
        match self.partitions.get_mut(tp) {
            Some(state) if state.epoch == epoch => state.pending.remove(&offset),
            _ => false,
        }
    }

    /// The offset to commit for `tp` now: the lowest unfinished offset, or one past
    /// the last dispatched offset when all are finished; `None` when nothing was
    /// dispatched since the partition was assigned.
    pub fn commit_position(&self, tp: &TopicPartition) -> Option<i64> {
        self.partitions.get(tp)?.commit_position()
    }

    /// Where fetching must resume for `tp` so that nothing is skipped: one past the
    /// last dispatched offset (`None` when nothing was dispatched).
    pub fn resume_position(&self, tp: &TopicPartition) -> Option<i64> {
        self.partitions.get(tp)?.next_offset
    }

    /// The commit positions that moved since the last call, marked as committed.
    /// If committing them fails, call [`OffsetTracker::forget_committed`].
    pub fn take_commits(&mut self) -> Vec<(TopicPartition, i64)> {
        let mut out = Vec::new();
        for (tp, state) in &mut self.partitions {
            if let Some(position) = state.commit_position()
                && state.committed != Some(position)
            {
                state.committed = Some(position);
                out.push((tp.clone(), position));
            }
        }
        out
    }

    /// Forgets that `tp`'s position was committed (the commit failed), so the next
    /// [`OffsetTracker::take_commits`] returns it again.
    pub fn forget_committed(&mut self, tp: &TopicPartition) {
        if let Some(state) = self.partitions.get_mut(tp) {
            state.committed = None;
        }
    }

    /// Messages dispatched and not finished, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|s| s.pending.len()).sum()
    }

    /// The tracked (assigned) partitions.
    pub fn partitions(&self) -> impl Iterator<Item = &TopicPartition> {
        self.partitions.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        TopicPartition::new("t", p)
    }

    fn epoch(d: Dispatch) -> u64 {
        match d {
            Dispatch::Accepted { epoch } => epoch,
            other => panic!("expected Accepted, got {other:?}"),
        }
    }

    #[test]
    fn nothing_dispatched_nothing_to_commit() {
        let mut t = OffsetTracker::new();
        t.assign(tp(0));
        assert_eq!(t.commit_position(&tp(0)), None);
        assert!(t.take_commits().is_empty());
        assert_eq!(t.revoke(&tp(0)), None);
    }

    #[test]
    fn commits_only_up_to_the_lowest_unfinished_offset() {
        let mut t = OffsetTracker::new();
        t.assign(tp(0));
        let e = epoch(t.dispatch(&tp(0), 10));
        for o in 11..15 {
            t.dispatch(&tp(0), o);
        }
        // 11, 12 and 14 finish before 10: nothing may be committed past 10.
        assert!(t.complete(&tp(0), e, 11));
        assert!(t.complete(&tp(0), e, 12));
        assert!(t.complete(&tp(0), e, 14));
        assert_eq!(t.commit_position(&tp(0)), Some(10));
        assert!(t.complete(&tp(0), e, 10));
        assert_eq!(t.commit_position(&tp(0)), Some(13));
        assert!(t.complete(&tp(0), e, 13));
        assert_eq!(t.commit_position(&tp(0)), Some(15));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn gaps_in_offsets_are_not_waited_for() {
        let mut t = OffsetTracker::new();
        t.assign(tp(0));
        let e = epoch(t.dispatch(&tp(0), 3));
        t.dispatch(&tp(0), 7); // 4..6 compacted away
        t.complete(&tp(0), e, 3);
        assert_eq!(t.commit_position(&tp(0)), Some(7));
        t.complete(&tp(0), e, 7);
        assert_eq!(t.commit_position(&tp(0)), Some(8));
    }

    #[test]
    fn take_commits_returns_each_position_once_and_again_after_a_failure() {
        let mut t = OffsetTracker::new();
        t.assign(tp(0));
        t.assign(tp(1));
        let e0 = epoch(t.dispatch(&tp(0), 0));
        let e1 = epoch(t.dispatch(&tp(1), 5));
        t.complete(&tp(0), e0, 0);
        let mut c = t.take_commits();
        c.sort();
        assert_eq!(c, vec![(tp(0), 1), (tp(1), 5)]);
        assert!(t.take_commits().is_empty());
        t.forget_committed(&tp(1));
        assert_eq!(t.take_commits(), vec![(tp(1), 5)]);
        t.complete(&tp(1), e1, 5);
        assert_eq!(t.take_commits(), vec![(tp(1), 6)]);
    }

    #[test]
    fn refetched_offsets_are_duplicates() {
        let mut t = OffsetTracker::new();
        t.assign(tp(0));
        t.dispatch(&tp(0), 0);
        t.dispatch(&tp(0), 1);
        assert_eq!(t.dispatch(&tp(0), 1), Dispatch::Duplicate);
        assert_eq!(t.dispatch(&tp(0), 0), Dispatch::Duplicate);
        assert_eq!(t.resume_position(&tp(0)), Some(2));
        assert!(matches!(t.dispatch(&tp(0), 2), Dispatch::Accepted { .. }));
    }

    #[test]
    fn unassigned_partitions_are_refused() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.dispatch(&tp(3), 0), Dispatch::NotAssigned);
        assert!(!t.complete(&tp(3), 1, 0));
    }

    #[test]
    fn revoke_returns_the_uncommitted_position_and_stale_completions_are_ignored() {
        let mut t = OffsetTracker::new();
        let old = t.assign(tp(0));
        t.dispatch(&tp(0), 0);
        t.dispatch(&tp(0), 1);
        t.complete(&tp(0), old, 0);
        // 1 is still running when the partition is revoked: commit 1, not 2.
        assert_eq!(t.revoke(&tp(0)), Some(1));
        let new = t.assign(tp(0));
        assert_ne!(old, new);
        // The old worker finishes offset 1 after the partition came back.
        assert!(!t.complete(&tp(0), old, 1));
        assert_eq!(t.commit_position(&tp(0)), None);
        let e = epoch(t.dispatch(&tp(0), 1));
        assert_eq!(e, new);
    }

    #[test]
    fn the_last_representable_offset_does_not_overflow() {
        // Found by tests/model_tracker.rs: dispatch(i64::MAX) overflowed `offset + 1`.
        let mut t = OffsetTracker::new();
        let e = t.assign(tp(0));
        assert_eq!(
            t.dispatch(&tp(0), i64::MAX - 1),
            Dispatch::Accepted { epoch: e }
        );
        assert_eq!(
            t.dispatch(&tp(0), i64::MAX),
            Dispatch::Accepted { epoch: e }
        );
        assert_eq!(t.resume_position(&tp(0)), Some(i64::MAX));
        assert!(t.complete(&tp(0), e, i64::MAX - 1));
        assert_eq!(t.commit_position(&tp(0)), Some(i64::MAX));
        assert!(t.complete(&tp(0), e, i64::MAX));
        // Never past the end, never negative.
        assert_eq!(t.commit_position(&tp(0)), Some(i64::MAX));
    }

    #[test]
    fn revoke_skips_an_already_committed_position() {
        let mut t = OffsetTracker::new();
        let e = t.assign(tp(0));
        t.dispatch(&tp(0), 0);
        t.complete(&tp(0), e, 0);
        assert_eq!(t.take_commits(), vec![(tp(0), 1)]);
        assert_eq!(t.revoke(&tp(0)), None);
    }
}
