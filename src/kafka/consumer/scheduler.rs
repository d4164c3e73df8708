//! Which worker handles a message: the ordering guarantee of the runtime.
//!
//! The runtime runs `workers` lanes; each lane is a bounded FIFO queue drained by one
//! task, one message at a time. Order is kept for everything routed to the same lane,
//! so the routing function *is* the ordering guarantee:
//!
//! - [`ProcessingOrder::Partition`] (default): a lane per partition hash. Every
//!   message of a partition goes to the same lane, so a partition is handled strictly
//!   in offset order, one message at a time; several partitions run side by side when
//!   `workers > 1`.
//! - [`ProcessingOrder::Key`] (opt-in, as Confluent's Parallel Consumer): a lane per
//!   hash of (topic, partition, key). Messages with the same key keep their order;
//!   different keys of one partition run concurrently on up to `workers` lanes. A
//!   message without a key is routed by its partition, so keyless messages keep
//!   partition order among themselves.
//!
//! Either way the commit position only moves up to the lowest unfinished offset of
//! each partition ([`super::tracker::OffsetTracker`]), so a slow key holds back
//! commits, never correctness.

use std::hash::{DefaultHasher, Hash, Hasher};

/// The ordering the runtime keeps while handling messages concurrently.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProcessingOrder {
    /// One message at a time per partition, in offset order (the default).
    #[default]
    Partition,
    /// Messages with the same key in order; different keys of a partition concurrently.
    Key,
}

/// The lane (`0..lanes`) that handles a message. Deterministic: the same inputs
/// always give the same lane, in every process.
pub fn lane_for(
    order: ProcessingOrder,
    lanes: usize,
    topic: &str,
    partition: i32,
    key: Option<&[u8]>,
) -> usize {
    if lanes <= 1 {
        return 0;
    }
    // DefaultHasher::new() uses fixed keys: stable across runs, good spread.
    let mut h = DefaultHasher::new();
    topic.hash(&mut h);
    partition.hash(&mut h);
    if let (ProcessingOrder::Key, Some(key)) = (order, key) {
        key.hash(&mut h);
    }
    (h.finish() % lanes as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::consumer::tracker::{Dispatch, OffsetTracker, TopicPartition};
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::sync::mpsc;

    #[test]
    fn partition_order_ignores_the_key() {
        let a = lane_for(ProcessingOrder::Partition, 8, "t", 3, Some(b"a"));
        let b = lane_for(ProcessingOrder::Partition, 8, "t", 3, Some(b"b"));
        let none = lane_for(ProcessingOrder::Partition, 8, "t", 3, None);
        assert_eq!(a, b);
        assert_eq!(a, none);
    }

    #[test]
    fn same_key_same_lane_and_keys_spread() {
        let mut used = HashSet::new();
        for k in 0..1000u32 {
            let key = format!("key-{k}");
            let lane = lane_for(ProcessingOrder::Key, 16, "t", 0, Some(key.as_bytes()));
            assert_eq!(
                lane,
                lane_for(ProcessingOrder::Key, 16, "t", 0, Some(key.as_bytes()))
            );
            assert!(lane < 16);
            used.insert(lane);
        }
        assert_eq!(used.len(), 16, "1,000 keys should reach all 16 lanes");
    }

    #[test]
    fn keyless_messages_follow_their_partition() {
        assert_eq!(
            lane_for(ProcessingOrder::Key, 16, "t", 2, None),
            lane_for(ProcessingOrder::Partition, 16, "t", 2, None)
        );
        assert_eq!(lane_for(ProcessingOrder::Key, 1, "t", 2, Some(b"k")), 0);
    }

    /// Simulates the runtime: one partition, 400 messages over 20 keys, 8 lanes whose
    /// handler time depends on the key (paused clock). Checks that every key is
    /// handled in offset order, that the lanes really overlap, and that no commit
    /// position ever passes an unfinished offset.
    #[tokio::test(start_paused = true)]
    async fn key_ordered_lanes_keep_key_order_and_commit_safely() {
        const LANES: usize = 8;
        let tp = TopicPartition::new("t", 0);
        let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
        let epoch = tracker.lock().unwrap().assign(tp.clone());
        let handled: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
        let running = Arc::new(Mutex::new((0usize, 0usize))); // (now, max)
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<i64>();

        let mut lanes = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..LANES {
            let (tx, mut rx) = mpsc::channel::<(String, i64)>(4);
            lanes.push(tx);
            let handled = handled.clone();
            let running = running.clone();
            let done_tx = done_tx.clone();
            tasks.push(tokio::spawn(async move {
                while let Some((key, offset)) = rx.recv().await {
                    {
                        let mut r = running.lock().unwrap();
                        r.0 += 1;
                        r.1 = r.1.max(r.0);
                    }
                    let n: u64 = key[1..].parse().unwrap();
                    tokio::time::sleep(Duration::from_millis(1 + n % 5)).await;
                    handled.lock().unwrap().push((key, offset));
                    running.lock().unwrap().0 -= 1;
                    done_tx.send(offset).unwrap();
                }
            }));
        }
        drop(done_tx);

        // The "poll thread": dispatch in offset order, complete as workers report.
        let dispatcher = {
            let tracker = tracker.clone();
            let tp = tp.clone();
            tokio::spawn(async move {
                for offset in 0..400i64 {
                    let key = format!("k{}", offset % 20);
                    assert!(matches!(
                        tracker.lock().unwrap().dispatch(&tp, offset),
                        Dispatch::Accepted { .. }
                    ));
                    let lane = lane_for(ProcessingOrder::Key, LANES, "t", 0, Some(key.as_bytes()));
                    lanes[lane].send((key, offset)).await.unwrap();
                }
            })
        };
        let mut finished = HashSet::new();
        while let Some(offset) = done_rx.recv().await {
            let mut t = tracker.lock().unwrap();
            assert!(t.complete(&tp, epoch, offset));
            finished.insert(offset);
            let position = t.commit_position(&tp).unwrap();
            // Everything below the commit position is finished.
            assert!((0..position).all(|o| finished.contains(&o)));
        }
        dispatcher.await.unwrap();
        for task in tasks {
            task.await.unwrap();
        }

        let handled = handled.lock().unwrap();
        assert_eq!(handled.len(), 400);
        let mut last: HashMap<&str, i64> = HashMap::new();
        for (key, offset) in handled.iter() {
            if let Some(prev) = last.insert(key, *offset) {
                assert!(prev < *offset, "key {key}: {offset} handled after {prev}");
            }
        }
        assert!(running.lock().unwrap().1 > 1, "lanes never overlapped");
        assert_eq!(tracker.lock().unwrap().commit_position(&tp), Some(400));
    }
}
