//! Which partition assignments this consumer still owns: the revocation barrier.
//!
//! When partitions are revoked, another member of the group may start on them as
//! soon as this one lets them go. If this consumer still handled messages of them
//! afterwards (queued in a lane, or running in a handler), two consumers would work
//! on one key at once and the old owner's completions could not be committed any
//! more. So the rebalance callback on the poll thread runs a barrier before it
//! lets librdkafka release the partitions:
//!
//! 1. it *withdraws* the revoked assignments (their epochs, see
//!    [`OffsetTracker`](super::tracker::OffsetTracker)): from then on a lane drops
//!    every queued message of them unhandled ([`Ownership::begin`] says no);
//! 2. it waits, bounded, until no lane is inside a handler for them
//!    ([`Ownership::wait_idle`]); what is still running at the deadline is
//!    abandoned (its completion is ignored, its offset not committed);
//! 3. the caller then commits what finished, synchronously, and forgets the
//!    partitions.
//!
//! The lane side is one atomic store and load per message (its *busy* slot and the
//! revocation generation, both `SeqCst`): either the lane sees the withdrawal and
//! drops the message, or the barrier sees the lane busy and waits for it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// An assignment epoch no partition has (epochs start at 1): a lane that is idle.
const IDLE: u64 = 0;

/// The live assignment epochs and what each lane is handling; see the module docs.
#[derive(Debug)]
pub(crate) struct Ownership {
    live: Mutex<Arc<HashSet<u64>>>,
    /// Bumped on every withdrawal, so lanes re-read `live` only then.
    generation: AtomicU64,
    /// Per lane, the epoch of the message in its handler (`IDLE` when none).
    busy: Box<[AtomicU64]>,
    /// Per lane, whether it holds finished offsets it has not reported yet.
    holding: Box<[AtomicBool]>,
}

/// A lane's copy of the live epochs, refreshed when the generation moves.
#[derive(Debug)]
pub(crate) struct LaneView {
    generation: u64,
    live: Arc<HashSet<u64>>,
}

impl Ownership {
    /// Nothing owned yet, `lanes` lanes idle.
    pub(crate) fn new(lanes: usize) -> Self {
        Ownership {
            live: Mutex::new(Arc::new(HashSet::new())),
            generation: AtomicU64::new(0),
            busy: (0..lanes).map(|_| AtomicU64::new(IDLE)).collect(),
            holding: (0..lanes).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn live(&self) -> MutexGuard<'_, Arc<HashSet<u64>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A newly assigned partition's epoch: its messages may be handled.
    pub(crate) fn grant(&self, epoch: u64) {
        let mut live = self.live();
        Arc::make_mut(&mut live).insert(epoch);
        // Lanes only ever need to see a grant before the partition's first message,
        // which comes after this through the lane queue.
        self.generation.fetch_add(1, SeqCst);
    }

    /// Revoked assignments: lanes drop their queued messages from now on.
    pub(crate) fn withdraw(&self, epochs: &[u64]) {
        {
            let mut live = self.live();
            let set = Arc::make_mut(&mut live);
            for epoch in epochs {
                set.remove(epoch);
            }
        }
        self.generation.fetch_add(1, SeqCst);
    }

    /// Whether `epoch` is still owned (for work outside the lanes, such as a
    /// dead-letter publish retried in the background).
    pub(crate) fn owns(&self, epoch: u64) -> bool {
        self.live().contains(&epoch)
    }

    /// The current generation (moves on every grant and withdrawal).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(SeqCst)
    }

    /// A lane's first view (nothing live until refreshed).
    pub(crate) fn view(&self) -> LaneView {
        LaneView {
            generation: u64::MAX,
            live: Arc::default(),
        }
    }

    /// Lane `lane` is about to handle a message of assignment `epoch`: `true` if
    /// it still owns it (the lane is marked busy until [`Ownership::end`]), `false`
    /// if the partition was revoked (drop the message).
    pub(crate) fn begin(&self, lane: usize, epoch: u64, view: &mut LaneView) -> bool {
        let slot = &self.busy[lane];
        slot.store(epoch, SeqCst);
        let generation = self.generation.load(SeqCst);
        if generation != view.generation {
            view.live = self.live().clone();
            view.generation = generation;
        }
        if view.live.contains(&epoch) {
            true
        } else {
            slot.store(IDLE, SeqCst);
            false
        }
    }

    /// Whether a revocation happened since `view` was refreshed (the lane then
    /// reports its completions before [`Ownership::end`], for the barrier's commit).
    pub(crate) fn moved_since(&self, view: &LaneView) -> bool {
        self.generation.load(SeqCst) != view.generation
    }

    /// Lane `lane` is out of its handler.
    pub(crate) fn end(&self, lane: usize) {
        self.busy[lane].store(IDLE, SeqCst);
    }

    /// Lane `lane` holds unreported completions (`true`) or just reported them.
    pub(crate) fn holding(&self, lane: usize, holding: bool) {
        self.holding[lane].store(holding, SeqCst);
    }

    /// Waits, at most `timeout`, until no lane holds unreported completions (a
    /// lane reports as soon as it sees a revocation, at its next message), so
    /// that what finished before a revocation is committed with it rather than
    /// handled again by the new owner. Returns whether they all reported.
    pub(crate) fn wait_reported(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.holding.iter().all(|h| !h.load(SeqCst)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until no lane handles a message of `epochs`, at most `timeout`
    /// (sleeping 1 ms between looks: this blocks the poll thread, inside the
    /// rebalance callback). Returns how many lanes were still busy with them at
    /// the deadline (abandoned).
    pub(crate) fn wait_idle(&self, epochs: &[u64], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let busy = self
                .busy
                .iter()
                .filter(|slot| epochs.contains(&slot.load(SeqCst)))
                .count();
            if busy == 0 || Instant::now() >= deadline {
                return busy;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_withdrawn_epoch_is_refused_and_a_live_one_accepted() {
        let own = Ownership::new(2);
        let mut view = own.view();
        own.grant(1);
        own.grant(2);
        assert!(own.begin(0, 1, &mut view));
        own.end(0);
        own.withdraw(&[1]);
        assert!(!own.begin(0, 1, &mut view), "revoked epoch still handled");
        assert!(own.begin(1, 2, &mut view));
        assert!(!own.owns(1));
        assert!(own.owns(2));
    }

    #[test]
    fn wait_idle_waits_for_a_busy_lane_and_gives_up_at_the_deadline() {
        let own = Arc::new(Ownership::new(2));
        let mut view = own.view();
        own.grant(7);
        assert!(own.begin(1, 7, &mut view));
        // Busy with another epoch only: nothing to wait for.
        assert_eq!(own.wait_idle(&[8], Duration::from_secs(5)), 0);
        // Still busy at the deadline: abandoned.
        assert_eq!(own.wait_idle(&[7], Duration::from_millis(20)), 1);
        let lane = {
            let own = own.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                own.end(1);
            })
        };
        let started = Instant::now();
        assert_eq!(own.wait_idle(&[7], Duration::from_secs(5)), 0);
        assert!(started.elapsed() >= Duration::from_millis(25));
        lane.join().unwrap();
    }

    #[test]
    fn wait_reported_waits_for_lanes_holding_completions() {
        let own = Ownership::new(2);
        assert!(own.wait_reported(Duration::ZERO));
        own.holding(1, true);
        assert!(!own.wait_reported(Duration::from_millis(5)));
        own.holding(1, false);
        assert!(own.wait_reported(Duration::ZERO));
    }

    #[test]
    fn a_lane_notices_a_withdrawal_during_its_message() {
        let own = Ownership::new(1);
        let mut view = own.view();
        own.grant(3);
        assert!(own.begin(0, 3, &mut view));
        assert!(!own.moved_since(&view));
        own.withdraw(&[3]);
        assert!(own.moved_since(&view));
    }
}
