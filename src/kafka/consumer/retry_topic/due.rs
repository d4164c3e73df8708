//! When a retry partition may hand out its head record: the pure part of the
//! retry consumer's poll loop, kept apart so it runs on tokio's paused clock.
//!
//! Each assigned retry partition is `Open` (fetching), `Holding` its head record
//! until it is due (the partition is paused; the record is kept in memory, one
//! per partition), or has the record `InFlight` (paused too). Records fetched
//! behind the head are dropped: when the head is finished the partition is
//! sought back to the offset after it and resumed, so they come again. Nothing
//! sleeps: the poll thread keeps polling (so `max.poll.interval.ms` is served)
//! with a timeout no longer than the time to the next due record.

use crate::kafka::consumer::TopicPartition;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// What to do with a fetched record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fetched {
    /// Due now: pause the partition and hand the record to a worker.
    Dispatch,
    /// Not due: pause the partition; the record is held until it is.
    Hold,
    /// Behind the head (or of a partition not assigned): drop it, it comes again
    /// after the seek.
    Drop,
}

enum State<M> {
    Open,
    Holding {
        message: M,
        offset: i64,
        due: Instant,
        due_at_ms: u64,
    },
    InFlight {
        offset: i64,
    },
}

struct Slot<M> {
    epoch: u64,
    state: State<M>,
}

/// The retry partitions of one consumer.
pub(crate) struct Slots<M> {
    slots: HashMap<TopicPartition, Slot<M>>,
    next_epoch: u64,
}

/// A record handed out: its partition, the assignment epoch and its offset, to
/// be given back to [`Slots::finish`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub(crate) tp: TopicPartition,
    pub(crate) epoch: u64,
    pub(crate) offset: i64,
}

impl<M> Slots<M> {
    pub(crate) fn new() -> Self {
        Slots {
            slots: HashMap::new(),
            next_epoch: 1,
        }
    }

    /// A partition was assigned: it starts open, in a new epoch.
    pub(crate) fn assign(&mut self, tp: TopicPartition) {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.slots.insert(
            tp,
            Slot {
                epoch,
                state: State::Open,
            },
        );
    }

    /// A partition was revoked: its held record is dropped (uncommitted; its new
    /// owner fetches it) and a finish of its in-flight record is ignored.
    pub(crate) fn revoke(&mut self, tp: &TopicPartition) {
        self.slots.remove(tp);
    }

    /// Partitions assigned now.
    #[cfg(test)]
    pub(crate) fn partitions(&self) -> impl Iterator<Item = &TopicPartition> {
        self.slots.keys()
    }

    /// Records in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.slots
            .values()
            .filter(|s| matches!(s.state, State::InFlight { .. }))
            .count()
    }

    /// A record of `tp` at `offset`, due at `due_at_ms` (wall clock), fetched at
    /// `now` / `now_ms`.
    pub(crate) fn fetched(
        &mut self,
        tp: &TopicPartition,
        offset: i64,
        due_at_ms: u64,
        message: M,
        now: Instant,
        now_ms: u64,
    ) -> (Fetched, Option<(Ticket, M)>) {
        let Some(slot) = self.slots.get_mut(tp) else {
            return (Fetched::Drop, None);
        };
        if !matches!(slot.state, State::Open) {
            return (Fetched::Drop, None);
        }
        if due_at_ms <= now_ms {
            slot.state = State::InFlight { offset };
            let ticket = Ticket {
                tp: tp.clone(),
                epoch: slot.epoch,
                offset,
            };
            return (Fetched::Dispatch, Some((ticket, message)));
        }
        slot.state = State::Holding {
            message,
            offset,
            due: now + Duration::from_millis(due_at_ms - now_ms),
            due_at_ms,
        };
        (Fetched::Hold, None)
    }

    /// Held records due at `now` (monotonic) and `now_ms` (wall clock: a record
    /// is never handed out before its wall-clock due time, even if the two
    /// clocks drift).
    pub(crate) fn due(&mut self, now: Instant, now_ms: u64) -> Vec<(Ticket, M, u64)> {
        let mut out = Vec::new();
        for (tp, slot) in &mut self.slots {
            let State::Holding { due, due_at_ms, .. } = &mut slot.state else {
                continue;
            };
            if *due > now {
                continue;
            }
            if *due_at_ms > now_ms {
                *due = now + Duration::from_millis(*due_at_ms - now_ms);
                continue;
            }
            let due_at_ms = *due_at_ms;
            let State::Holding {
                message, offset, ..
            } = std::mem::replace(&mut slot.state, State::Open)
            else {
                unreachable!("matched above")
            };
            slot.state = State::InFlight { offset };
            out.push((
                Ticket {
                    tp: tp.clone(),
                    epoch: slot.epoch,
                    offset,
                },
                message,
                due_at_ms,
            ));
        }
        out
    }

    /// How long the poll thread may block: until the next held record is due,
    /// at most `max`.
    pub(crate) fn wait(&self, now: Instant, max: Duration) -> Duration {
        self.slots
            .values()
            .filter_map(|s| match &s.state {
                State::Holding { due, .. } => Some(due.saturating_duration_since(now)),
                _ => None,
            })
            .fold(max, Duration::min)
    }

    /// A handed-out record is finished (handled, moved on or dead-lettered):
    /// the offset to seek to, store and resume from, or `None` when its partition
    /// was revoked or reassigned meanwhile.
    pub(crate) fn finish(&mut self, ticket: &Ticket) -> Option<i64> {
        let slot = self.slots.get_mut(&ticket.tp)?;
        match slot.state {
            State::InFlight { offset } if slot.epoch == ticket.epoch && offset == ticket.offset => {
                slot.state = State::Open;
                Some(offset + 1)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    /// Wall clock that follows tokio's (paused) clock from `T0`.
    fn wall(start: Instant) -> u64 {
        T0 + Instant::now().duration_since(start).as_millis() as u64
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_record_waits_until_due_then_is_handed_out_once() {
        let start = Instant::now();
        let tp = TopicPartition::new("t.retry.1s", 0);
        let mut slots = Slots::new();
        slots.assign(tp.clone());
        let (what, _) = slots.fetched(&tp, 5, T0 + 1_000, "head", Instant::now(), wall(start));
        assert_eq!(what, Fetched::Hold);
        // Records behind the head are dropped until it is finished.
        let (what, _) = slots.fetched(&tp, 6, T0, "next", Instant::now(), wall(start));
        assert_eq!(what, Fetched::Drop);
        assert_eq!(
            slots.wait(Instant::now(), Duration::from_secs(5)),
            Duration::from_secs(1)
        );
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(
            slots.due(Instant::now(), wall(start)).is_empty(),
            "1 ms early"
        );
        assert_eq!(
            slots.wait(Instant::now(), Duration::from_millis(50)),
            Duration::from_millis(1)
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        let due = slots.due(Instant::now(), wall(start));
        assert_eq!(due.len(), 1);
        let (ticket, message, due_at) = &due[0];
        assert_eq!((*message, ticket.offset, *due_at), ("head", 5, T0 + 1_000));
        assert!(slots.due(Instant::now(), wall(start)).is_empty());
        assert_eq!(slots.in_flight(), 1);
        assert_eq!(
            slots.wait(Instant::now(), Duration::from_millis(50)),
            Duration::from_millis(50)
        );
        assert_eq!(slots.finish(ticket), Some(6));
        assert_eq!(slots.finish(ticket), None, "finished twice");
        // Open again: a record already due is dispatched at once.
        let (what, handed) = slots.fetched(&tp, 6, T0, "next", Instant::now(), wall(start));
        assert_eq!(what, Fetched::Dispatch);
        assert_eq!(handed.unwrap().0.offset, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wall_clock_has_the_last_word() {
        let start = Instant::now();
        let tp = TopicPartition::new("t.retry.1s", 0);
        let mut slots = Slots::new();
        slots.assign(tp.clone());
        slots.fetched(&tp, 0, T0 + 100, (), Instant::now(), wall(start));
        tokio::time::advance(Duration::from_millis(100)).await;
        // The monotonic clock says due, the wall clock is 3 ms behind: wait on.
        assert!(slots.due(Instant::now(), wall(start) - 3).is_empty());
        assert_eq!(
            slots.wait(Instant::now(), Duration::from_secs(1)),
            Duration::from_millis(3)
        );
        tokio::time::advance(Duration::from_millis(3)).await;
        assert_eq!(slots.due(Instant::now(), wall(start)).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn partitions_wait_independently_and_revocation_voids_tickets() {
        let start = Instant::now();
        let (a, b) = (
            TopicPartition::new("t.retry.10s", 0),
            TopicPartition::new("t.retry.10s", 1),
        );
        let mut slots = Slots::new();
        slots.assign(a.clone());
        slots.assign(b.clone());
        slots.fetched(&a, 0, T0 + 10_000, 'a', Instant::now(), wall(start));
        let (what, handed) = slots.fetched(&b, 0, T0, 'b', Instant::now(), wall(start));
        assert_eq!(what, Fetched::Dispatch);
        let (ticket_b, _) = handed.unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        let due = slots.due(Instant::now(), wall(start));
        assert_eq!(due.len(), 1);
        let ticket_a = due[0].0.clone();
        slots.revoke(&b);
        assert_eq!(slots.finish(&ticket_b), None, "revoked meanwhile");
        // Reassigned: a new epoch, the old ticket is void there too.
        slots.revoke(&a);
        slots.assign(a.clone());
        assert_eq!(slots.finish(&ticket_a), None);
        assert_eq!(slots.partitions().count(), 1);
    }
}
