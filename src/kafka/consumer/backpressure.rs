//! Per-lane backpressure: which batches wait for a full lane, and which partitions
//! are paused because of it.
//!
//! A lane that stays full must not stall the whole assignment: only the partitions
//! that feed it are paused (librdkafka `pause`), every other partition keeps being
//! fetched and handled. Once a lane has batches held back, later batches for it
//! queue behind them (its order is kept) and pause their partitions too; batches
//! for other lanes go on as usual. When the lane has sent its held batches and is
//! half empty again, the partitions it paused are resumed — unless another lane
//! still holds them paused. This module is the bookkeeping only; the poll thread
//! does the librdkafka calls.

use super::poll::Batch;
use super::tracker::TopicPartition;
use std::collections::{HashSet, VecDeque};

/// Held batches and backpressure pauses, per lane.
#[derive(Debug, Default)]
pub(crate) struct Backpressure {
    /// Batches waiting for room in each lane, in order.
    pub(crate) held: Vec<VecDeque<Batch>>,
    /// Partitions paused because of each lane.
    paused_by: Vec<HashSet<TopicPartition>>,
    /// Every partition some lane holds paused (the union of `paused_by`).
    paused: HashSet<TopicPartition>,
}

impl Backpressure {
    /// Bookkeeping for `lanes` lanes, none blocked.
    pub(crate) fn new(lanes: usize) -> Self {
        Backpressure {
            held: (0..lanes).map(|_| VecDeque::new()).collect(),
            paused_by: (0..lanes).map(|_| HashSet::new()).collect(),
            paused: HashSet::new(),
        }
    }

    /// Whether `lane` holds batches or keeps partitions paused: new batches for it
    /// must queue behind the held ones.
    pub(crate) fn is_blocked(&self, lane: usize) -> bool {
        !self.held[lane].is_empty() || !self.paused_by[lane].is_empty()
    }

    /// Whether any lane is blocked.
    pub(crate) fn any(&self) -> bool {
        !self.paused.is_empty() || self.held.iter().any(|h| !h.is_empty())
    }

    /// Whether `tp` is paused because of a full lane.
    pub(crate) fn is_paused(&self, tp: &TopicPartition) -> bool {
        !self.paused.is_empty() && self.paused.contains(tp)
    }

    /// The partitions paused because of full lanes.
    pub(crate) fn paused(&self) -> &HashSet<TopicPartition> {
        &self.paused
    }

    /// Holds `batch` for `lane` and pauses its partitions on that lane's account.
    /// Returns the partitions that were not paused before (to pause in librdkafka).
    pub(crate) fn hold(&mut self, lane: usize, batch: Batch) -> Vec<TopicPartition> {
        let mut newly = Vec::new();
        for work in &batch {
            if self.paused_by[lane].insert(work.tp.clone()) && self.paused.insert(work.tp.clone()) {
                newly.push(work.tp.clone());
            }
        }
        self.held[lane].push_back(batch);
        newly
    }

    /// `lane` sent everything it held and has room again: forgets its pauses.
    /// Returns the partitions no other lane keeps paused (to resume).
    pub(crate) fn release(&mut self, lane: usize) -> Vec<TopicPartition> {
        debug_assert!(self.held[lane].is_empty());
        let mine = std::mem::take(&mut self.paused_by[lane]);
        let mut freed = Vec::new();
        for tp in mine {
            if !self.paused_by.iter().any(|p| p.contains(&tp)) {
                self.paused.remove(&tp);
                freed.push(tp);
            }
        }
        freed
    }

    /// Forgets the pauses of `tps` (revoked: nothing to resume for them).
    pub(crate) fn forget(&mut self, tps: &[TopicPartition]) {
        for tp in tps {
            self.paused.remove(tp);
            for by in &mut self.paused_by {
                by.remove(tp);
            }
        }
    }

    /// Lanes that hold batches or keep partitions paused.
    pub(crate) fn blocked_lanes(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.held.len()).filter(|&lane| self.is_blocked(lane))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::consumer::event::ReceivedMessage;
    use crate::kafka::consumer::poll::Work;
    use rdkafka::Timestamp;
    use rdkafka::message::OwnedMessage;

    fn work(partition: i32, offset: i64) -> Work {
        let tp = TopicPartition::new("t", partition);
        let owned = OwnedMessage::new(
            None,
            None,
            "t".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        );
        Work {
            message: ReceivedMessage::new(owned),
            tp,
            epoch: 1,
        }
    }

    #[test]
    fn a_held_batch_pauses_only_its_partitions() {
        let mut bp = Backpressure::new(3);
        assert!(!bp.any());
        let newly = bp.hold(1, vec![work(0, 0), work(0, 1), work(2, 5)]);
        assert_eq!(newly.len(), 2);
        assert!(bp.is_blocked(1));
        assert!(!bp.is_blocked(0) && !bp.is_blocked(2));
        assert!(bp.is_paused(&TopicPartition::new("t", 0)));
        assert!(bp.is_paused(&TopicPartition::new("t", 2)));
        assert!(!bp.is_paused(&TopicPartition::new("t", 1)));
        // A second batch for the same lane queues behind; nothing new to pause.
        assert!(bp.hold(1, vec![work(0, 2)]).is_empty());
        assert_eq!(bp.held[1].len(), 2);
        assert_eq!(bp.blocked_lanes().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn a_partition_paused_by_two_lanes_resumes_when_both_drained() {
        // Key-ordered mode: one partition feeds several lanes.
        let mut bp = Backpressure::new(2);
        assert_eq!(bp.hold(0, vec![work(0, 0)]).len(), 1);
        assert!(bp.hold(1, vec![work(0, 1), work(1, 0)]).len() == 1);
        bp.held[0].clear();
        assert!(bp.release(0).is_empty(), "lane 1 still holds partition 0");
        assert!(bp.is_paused(&TopicPartition::new("t", 0)));
        assert!(!bp.is_blocked(0));
        bp.held[1].clear();
        let mut freed = bp.release(1);
        freed.sort_by_key(|tp| tp.partition);
        assert_eq!(
            freed,
            vec![TopicPartition::new("t", 0), TopicPartition::new("t", 1)]
        );
        assert!(!bp.any());
    }
}
