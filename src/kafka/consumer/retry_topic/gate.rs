//! Key-preserving mode: which keys of which main partition have a record on the
//! ladder, in the order their records must be handled.
//!
//! A record whose key is waiting is not handled: it is "held", sent along the
//! ladder behind the earlier record of its key, and handled only once it is the
//! oldest one left (the *head*). Order comes from this gate alone; the retry
//! topics being FIFO per key only keeps held records from being forwarded too
//! often.
//!
//! Memory is bounded: at most `capacity` records are tracked (each costs its key
//! and an offset). When the gate is full, the main partition waits (the handler
//! call does not return) until a tracked record leaves the ladder; that is
//! in-place blocking, as without retry topics, and never loses order.

use crate::kafka::consumer::TopicPartition;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use tokio::sync::Notify;

/// Default of [`RetryTopics::max_held`](super::RetryTopics::max_held).
pub const DEFAULT_CAPACITY: usize = 10_000;

type LineKey = (TopicPartition, Vec<u8>);

/// Records of one key on the ladder, oldest first, and the rung of the oldest.
#[derive(Debug)]
struct Line {
    offsets: VecDeque<i64>,
    head_rung: usize,
}

/// Where a record stands in its key's line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    /// The oldest of its key: handle it.
    Head,
    /// Behind an earlier record of its key, which is at `head_rung`.
    Behind { head_rung: usize },
    /// Not tracked (key-preserving off, no key, or unknown after a restart).
    Untracked,
}

/// What [`KeyGate::enter`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Entered {
    /// The key was waiting: the record is held behind it, to go to `rung`.
    Held { rung: usize },
    /// The record starts a new line (it failed and the key was not waiting).
    Started,
    /// The key was not waiting and the record did not fail: handle it now.
    Free,
    /// No room: wait for [`KeyGate::room`].
    Full,
}

/// The set of waiting keys; shared by the main hop and the retry consumer.
#[derive(Debug)]
pub(crate) struct KeyGate {
    lines: Mutex<Lines>,
    capacity: usize,
    room: Notify,
}

#[derive(Debug, Default)]
struct Lines {
    by_key: HashMap<LineKey, Line>,
    records: usize,
}

impl KeyGate {
    pub(crate) fn new(capacity: usize) -> Self {
        KeyGate {
            lines: Mutex::new(Lines::default()),
            capacity: capacity.max(1),
            room: Notify::new(),
        }
    }

    fn lines(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records tracked now.
    pub(crate) fn len(&self) -> usize {
        self.lines().records
    }

    /// A main-topic record at `offset` arrives. With `failed_at_rung` `None`
    /// (before its handler runs) it is held if its key waits, else free; with
    /// `Some(rung)` (it failed and goes to `rung`) it joins its key's line,
    /// starting one if needed.
    pub(crate) fn enter(
        &self,
        tp: &TopicPartition,
        key: &[u8],
        offset: i64,
        failed_at_rung: Option<usize>,
    ) -> Entered {
        let mut lines = self.lines();
        let full = lines.records >= self.capacity;
        let k = (tp.clone(), key.to_vec());
        match (lines.by_key.get_mut(&k), failed_at_rung) {
            (Some(_), _) if full => Entered::Full,
            (Some(line), _) => {
                line.offsets.push_back(offset);
                let rung = line.head_rung;
                lines.records += 1;
                Entered::Held { rung }
            }
            (None, None) => Entered::Free,
            (None, Some(_)) if full => Entered::Full,
            (None, Some(rung)) => {
                lines.by_key.insert(
                    k,
                    Line {
                        offsets: VecDeque::from([offset]),
                        head_rung: rung,
                    },
                );
                lines.records += 1;
                Entered::Started
            }
        }
    }

    /// Waits until a record leaves (call after [`Entered::Full`]).
    pub(crate) async fn room(&self) {
        let notified = self.room.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.lines().records < self.capacity {
            return;
        }
        notified.await;
    }

    /// Forgets every line (the retry partitions moved: the records on the
    /// ladder may now be handled elsewhere, and a line whose head is gone would
    /// hold its key for ever). Later records are no longer ordered against them.
    pub(crate) fn clear(&self) {
        let mut lines = self.lines();
        lines.by_key.clear();
        lines.records = 0;
        drop(lines);
        self.room.notify_waiters();
    }

    /// Where the record at `offset` of `key` stands.
    pub(crate) fn place(&self, tp: &TopicPartition, key: &[u8], offset: i64) -> Place {
        let lines = self.lines();
        let Some(line) = lines.by_key.get(&(tp.clone(), key.to_vec())) else {
            return Place::Untracked;
        };
        match line.offsets.iter().position(|&o| o == offset) {
            Some(0) => Place::Head,
            Some(_) => Place::Behind {
                head_rung: line.head_rung,
            },
            None => Place::Untracked,
        }
    }

    /// The head record at `offset` moved on to `rung`.
    pub(crate) fn moved(&self, tp: &TopicPartition, key: &[u8], offset: i64, rung: usize) {
        let mut lines = self.lines();
        if let Some(line) = lines.by_key.get_mut(&(tp.clone(), key.to_vec()))
            && line.offsets.front() == Some(&offset)
        {
            line.head_rung = rung;
        }
    }

    /// The record at `offset` left the ladder (handled or dead-lettered), or
    /// never made it onto it (its publish failed).
    pub(crate) fn leave(&self, tp: &TopicPartition, key: &[u8], offset: i64) {
        let mut lines = self.lines();
        let k = (tp.clone(), key.to_vec());
        let Some(line) = lines.by_key.get_mut(&k) else {
            return;
        };
        let Some(at) = line.offsets.iter().position(|&o| o == offset) else {
            return;
        };
        line.offsets.remove(at);
        if line.offsets.is_empty() {
            lines.by_key.remove(&k);
        }
        lines.records -= 1;
        drop(lines);
        self.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn later_records_of_a_waiting_key_are_held_until_it_leaves() {
        let gate = KeyGate::new(10);
        let tp = TopicPartition::new("orders", 0);
        assert_eq!(gate.enter(&tp, b"a", 0, None), Entered::Free);
        assert_eq!(gate.enter(&tp, b"a", 0, Some(0)), Entered::Started);
        assert_eq!(gate.enter(&tp, b"a", 1, None), Entered::Held { rung: 0 });
        assert_eq!(gate.enter(&tp, b"b", 2, None), Entered::Free);
        // Another partition's key "a" is another key.
        assert_eq!(
            gate.enter(&TopicPartition::new("orders", 1), b"a", 0, None),
            Entered::Free
        );
        gate.moved(&tp, b"a", 0, 1);
        assert_eq!(gate.place(&tp, b"a", 1), Place::Behind { head_rung: 1 });
        assert_eq!(gate.place(&tp, b"a", 0), Place::Head);
        assert_eq!(gate.enter(&tp, b"a", 3, None), Entered::Held { rung: 1 });
        gate.leave(&tp, b"a", 0);
        assert_eq!(gate.place(&tp, b"a", 1), Place::Head);
        assert_eq!(gate.place(&tp, b"a", 9), Place::Untracked);
        gate.leave(&tp, b"a", 1);
        gate.leave(&tp, b"a", 3);
        assert_eq!(gate.len(), 0);
        assert_eq!(gate.enter(&tp, b"a", 4, None), Entered::Free);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_gate_makes_the_caller_wait_for_room() {
        let gate = Arc::new(KeyGate::new(2));
        let tp = TopicPartition::new("orders", 0);
        assert_eq!(gate.enter(&tp, b"a", 0, Some(0)), Entered::Started);
        assert_eq!(gate.enter(&tp, b"a", 1, None), Entered::Held { rung: 0 });
        assert_eq!(gate.enter(&tp, b"a", 2, None), Entered::Full);
        assert_eq!(gate.enter(&tp, b"b", 3, Some(0)), Entered::Full);
        assert_eq!(gate.len(), 2);
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.room().await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished(), "room while full");
        gate.leave(&tp, b"a", 0);
        waiter.await.unwrap();
        assert_eq!(gate.enter(&tp, b"a", 2, None), Entered::Held { rung: 0 });
        gate.clear();
        assert_eq!(gate.len(), 0);
        assert_eq!(gate.place(&tp, b"a", 2), Place::Untracked);
    }
}
