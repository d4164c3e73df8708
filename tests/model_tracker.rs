//! Model-based test of the consumer's offset tracker
//! (`keel::kafka::consumer::tracker::OffsetTracker`).
//!
//! Random histories of assign, fetch (with gaps and re-fetches of old offsets),
//! completion in any order (including stale completions from an earlier
//! assignment and repeated completions), revoke, re-assign, commit and failed
//! commit run against the tracker and against a plain model — per partition the
//! set of dispatched offsets and the set of finished ones; the commit position is
//! the first dispatched-but-unfinished offset, or one past the last dispatched one.
//! After every step the tracker must agree with the model, and:
//!
//! - a committed position never passes an unfinished offset of the current
//!   assignment;
//! - within one assignment, committed positions never move backwards;
//! - when everything dispatched has finished, the position is the end (one past
//!   the last dispatched offset).
//!
//! No broker: the tracker is a pure data structure, and the real-broker behaviour
//! of the consumer is covered by `tests/kafka_consume.rs`.

use std::collections::{BTreeMap, BTreeSet};

use keel::kafka::consumer::TopicPartition;
use keel::kafka::consumer::tracker::{Dispatch, OffsetTracker};
use proptest::prelude::*;

const PARTITIONS: i32 = 3;

#[derive(Clone, Debug)]
enum Op {
    Assign(i32),
    Revoke(i32),
    /// Fetch the next offset after skipping `gap` offsets (compaction, markers).
    Fetch {
        partition: i32,
        gap: u8,
    },
    /// Re-fetch an offset `back` below the fetch position (seek back, resume).
    Refetch {
        partition: i32,
        back: u8,
    },
    /// Complete the `index`-th handed-out message (modulo their number); it may
    /// be already completed, or from an older assignment.
    Complete {
        index: usize,
    },
    /// A poll cycle's commit: take the moved positions and, when `fails`, report
    /// the commit of `partition` failed.
    Commit {
        fails: Option<i32>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PARTITIONS;
    prop_oneof![
        1 => p.clone().prop_map(Op::Assign),
        1 => p.clone().prop_map(Op::Revoke),
        6 => (p.clone(), prop_oneof![4 => Just(0u8), 1 => 1u8..5])
            .prop_map(|(partition, gap)| Op::Fetch { partition, gap }),
        1 => (p.clone(), 1u8..6).prop_map(|(partition, back)| Op::Refetch { partition, back }),
        6 => any::<usize>().prop_map(|index| Op::Complete { index }),
        2 => proptest::option::weighted(0.2, p).prop_map(|fails| Op::Commit { fails }),
    ]
}

#[derive(Debug, Default)]
struct ModelPartition {
    epoch: u64,
    dispatched: BTreeSet<i64>,
    finished: BTreeSet<i64>,
    /// One past the highest dispatched offset.
    next: Option<i64>,
    /// The position last handed out as committed (reset by a failed commit).
    committed: Option<i64>,
    /// The highest position ever committed in this assignment (for monotonicity).
    high_water: Option<i64>,
}

impl ModelPartition {
    fn position(&self) -> Option<i64> {
        self.dispatched
            .iter()
            .find(|o| !self.finished.contains(o))
            .copied()
            .or(self.next)
    }

    fn first_unfinished(&self) -> Option<i64> {
        self.dispatched.difference(&self.finished).next().copied()
    }
}

#[derive(Debug)]
struct Model {
    /// Where fetching resumes when nothing was dispatched yet (the committed
    /// offset of the group, or the start of the log).
    base: i64,
    parts: BTreeMap<i32, ModelPartition>,
    /// Every message handed to a worker: (partition, epoch, offset).
    handed_out: Vec<(i32, u64, i64)>,
    /// Epochs the tracker gave out, to check they are never reused.
    epochs: BTreeSet<u64>,
}

fn tp(p: i32) -> TopicPartition {
    TopicPartition::new("model", p)
}

fn check_invariants(model: &Model, tracker: &OffsetTracker) {
    for p in 0..PARTITIONS {
        let expected = model.parts.get(&p).and_then(ModelPartition::position);
        assert_eq!(
            tracker.commit_position(&tp(p)),
            expected,
            "commit position of {p}"
        );
        let expected_resume = model.parts.get(&p).and_then(|s| s.next);
        assert_eq!(
            tracker.resume_position(&tp(p)),
            expected_resume,
            "resume of {p}"
        );
        if let Some(state) = model.parts.get(&p) {
            if let (Some(pos), Some(unfinished)) = (expected, state.first_unfinished()) {
                assert!(
                    pos <= unfinished,
                    "position {pos} passes unfinished {unfinished}"
                );
            }
            if state.first_unfinished().is_none() {
                assert_eq!(
                    expected, state.next,
                    "all finished: the position is the end"
                );
            }
        }
    }
    let in_flight: usize = model
        .parts
        .values()
        .map(|s| s.dispatched.len() - s.finished.len())
        .sum();
    assert_eq!(tracker.in_flight(), in_flight, "in flight");
    let mut tracked: Vec<i32> = tracker.partitions().map(|t| t.partition).collect();
    tracked.sort_unstable();
    assert_eq!(tracked, model.parts.keys().copied().collect::<Vec<_>>());
}

fn step(model: &mut Model, tracker: &mut OffsetTracker, op: &Op) {
    match *op {
        Op::Assign(p) => {
            let epoch = tracker.assign(tp(p));
            match model.parts.get(&p) {
                Some(state) => assert_eq!(epoch, state.epoch, "re-assign keeps the epoch"),
                None => {
                    assert!(model.epochs.insert(epoch), "epoch {epoch} reused");
                    model.parts.insert(
                        p,
                        ModelPartition {
                            epoch,
                            ..Default::default()
                        },
                    );
                }
            }
        }
        Op::Revoke(p) => {
            let got = tracker.revoke(&tp(p));
            let expected = model
                .parts
                .remove(&p)
                .and_then(|s| s.position().filter(|pos| s.committed != Some(*pos)));
            assert_eq!(got, expected, "revoke of {p}");
        }
        Op::Fetch { partition, gap } => {
            let offset = match model.parts.get(&partition) {
                Some(s) => s.next.unwrap_or(model.base).saturating_add(i64::from(gap)),
                None => model.base.saturating_add(i64::from(gap)),
            };
            dispatch(model, tracker, partition, offset);
        }
        Op::Refetch { partition, back } => {
            let next = model
                .parts
                .get(&partition)
                .and_then(|s| s.next)
                .unwrap_or(model.base);
            dispatch(model, tracker, partition, next - i64::from(back));
        }
        Op::Complete { index } => {
            if model.handed_out.is_empty() {
                return;
            }
            let (p, epoch, offset) = model.handed_out[index % model.handed_out.len()];
            let got = tracker.complete(&tp(p), epoch, offset);
            let expected = match model.parts.get_mut(&p) {
                Some(s) if s.epoch == epoch => {
                    s.dispatched.contains(&offset) && s.finished.insert(offset)
                }
                _ => false,
            };
            assert_eq!(got, expected, "complete {p}@{offset} epoch {epoch}");
        }
        Op::Commit { fails } => {
            let mut got = tracker.take_commits();
            got.sort();
            let mut expected = Vec::new();
            for (p, s) in model.parts.iter_mut() {
                if let Some(pos) = s.position()
                    && s.committed != Some(pos)
                {
                    s.committed = Some(pos);
                    if let Some(high) = s.high_water {
                        assert!(pos >= high, "commit of {p} moved back from {high} to {pos}");
                    }
                    s.high_water = Some(pos);
                    expected.push((tp(*p), pos));
                }
            }
            assert_eq!(got, expected, "take_commits");
            if let Some(p) = fails {
                tracker.forget_committed(&tp(p));
                if let Some(s) = model.parts.get_mut(&p) {
                    s.committed = None;
                }
            }
        }
    }
}

fn dispatch(model: &mut Model, tracker: &mut OffsetTracker, p: i32, offset: i64) {
    let got = tracker.dispatch(&tp(p), offset);
    let expected = match model.parts.get_mut(&p) {
        None => Dispatch::NotAssigned,
        Some(s) if s.next.is_some_and(|next| offset < next) => Dispatch::Duplicate,
        Some(s) => {
            s.dispatched.insert(offset);
            // The tracker saturates at i64::MAX (that offset is redelivered).
            s.next = Some(offset.saturating_add(1));
            model.handed_out.push((p, s.epoch, offset));
            Dispatch::Accepted { epoch: s.epoch }
        }
    };
    assert_eq!(got, expected, "dispatch {p}@{offset}");
}

fn run(base: i64, ops: &[Op]) {
    let mut tracker = OffsetTracker::new();
    let mut model = Model {
        base,
        parts: BTreeMap::new(),
        handed_out: Vec::new(),
        epochs: BTreeSet::new(),
    };
    for op in ops {
        step(&mut model, &mut tracker, op);
        check_invariants(&model, &tracker);
    }
    // Drain: finish everything of the current assignments; each position reaches
    // the end.
    for (p, epoch, offset) in model.handed_out.clone() {
        if model.parts.get(&p).is_some_and(|s| s.epoch == epoch) {
            tracker.complete(&tp(p), epoch, offset);
        }
    }
    for (p, s) in &model.parts {
        assert_eq!(tracker.commit_position(&tp(*p)), s.next, "end of {p}");
    }
    assert_eq!(tracker.in_flight(), 0);
}

proptest! {
    // 1000 histories of up to 120 steps (a few seconds in a debug build).
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn tracker_matches_its_model(base in 0i64..1_000_000, ops in proptest::collection::vec(op(), 1..120)) {
        run(base, &ops);
    }
}

/// Offsets at the very top of the range (a broker can send any i64): fetching the
/// last representable offset must not overflow the "one past" position.
/// Regression: `dispatch(i64::MAX)` panicked with an add overflow (debug) before
/// the tracker saturated it.
#[test]
fn offsets_at_the_top_of_the_range() {
    let ops: Vec<Op> = (0..4)
        .flat_map(|_| {
            [
                Op::Assign(0),
                Op::Fetch {
                    partition: 0,
                    gap: 0,
                },
                Op::Complete { index: 0 },
                Op::Commit { fails: None },
            ]
        })
        .collect();
    run(i64::MAX - 2, &ops);
}
