//! The state word of a breaker, kept in a `'static` slot so that a response
//! future can record its outcome without holding an `Arc` of the breaker.
//!
//! # Why
//!
//! Handing every response future an `Arc<Breaker>` costs an atomic increment on
//! `call` and a decrement on drop, on a counter every caller shares — most of the
//! closed path's cost (a `perf record` put about 60 % of a call there). What a
//! closed-state outcome needs is only the state word: the generation to check and
//! the failure streak to bump or clear. So the word lives in a [`Slot`] with a
//! `'static` lifetime, and the future holds a plain `&'static Slot`.
//!
//! # Where slots come from
//!
//! Slots are leaked once and then recycled through a global free list: a dropped
//! breaker returns its slot, and the next breaker takes it. The number of slots
//! ever allocated is the largest number of breakers alive at once (one per
//! [`CircuitBreakerLayer`](super::CircuitBreakerLayer), at most `max_keys` per
//! keyed layer, plus evicted ones still held by a running call); each is 128 bytes.
//!
//! A recycled slot keeps its generation counter running, and releasing a slot
//! moves it on: a late future of the old breaker finds a generation that is not
//! its own and records nothing, exactly as for a late outcome after a transition.
//!
//! # The word
//!
//! `state (8 bits) | field (32) | generation (24)`. The 32-bit field is the
//! consecutive-failure streak while the breaker counts (closed, metrics-only; the
//! streak that opened it is kept while open) and, while half-open, two 16-bit
//! counters: probes admitted and probes succeeded.

use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::{Mutex, PoisonError, Weak};

use super::breaker::Breaker;
use super::handle::{CircuitState, TransitionReason};

pub(crate) const ADMITTED_SHIFT: u32 = 8;
pub(crate) const SUCCESS_SHIFT: u32 = 24;
const STREAK_SHIFT: u32 = 8;
const STREAK_MASK: u64 = 0xffff_ffff << STREAK_SHIFT;
pub(crate) const GEN_SHIFT: u32 = 40;
const FIELD_MASK: u64 = 0xffff;
const GEN_MASK: u64 = (1 << (64 - GEN_SHIFT)) - 1;

pub(crate) fn state_of(word: u64) -> CircuitState {
    CircuitState::ALL
        .get((word & 0xff) as usize)
        .copied()
        .unwrap_or(CircuitState::Closed)
}

pub(crate) fn state_code(state: CircuitState) -> u64 {
    CircuitState::ALL
        .iter()
        .position(|s| *s == state)
        .unwrap_or(0) as u64
}

pub(crate) fn gen_of(word: u64) -> u32 {
    (word >> GEN_SHIFT) as u32
}

pub(crate) fn admitted_of(word: u64) -> u64 {
    (word >> ADMITTED_SHIFT) & FIELD_MASK
}

pub(crate) fn successes_of(word: u64) -> u64 {
    (word >> SUCCESS_SHIFT) & FIELD_MASK
}

/// The consecutive-failure streak of a word in a counting (or open) state.
pub(crate) fn streak_of(word: u64) -> u32 {
    ((word & STREAK_MASK) >> STREAK_SHIFT) as u32
}

/// Whether outcomes are counted in this state.
pub(crate) fn is_counting(state: CircuitState) -> bool {
    matches!(state, CircuitState::Closed | CircuitState::MetricsOnly)
}

/// The word of state `to` one generation after `word`, carrying `streak`.
pub(crate) fn next_word(word: u64, to: CircuitState, streak: u32) -> u64 {
    let generation = (u64::from(gen_of(word)) + 1) & GEN_MASK;
    (generation << GEN_SHIFT) | (u64::from(streak) << STREAK_SHIFT) | state_code(to)
}

/// One breaker's state word (and a way back to the breaker for transitions).
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) word: AtomicU64,
    /// The breaker using the slot; empty while the slot is free.
    owner: Mutex<Weak<Breaker>>,
}

/// Slots of dropped breakers, waiting for the next breaker.
static FREE: Mutex<Vec<&'static Slot>> = Mutex::new(Vec::new());

impl Slot {
    /// A slot for a new breaker, closed, in a generation no earlier user of the
    /// slot has seen.
    pub(crate) fn acquire(owner: Weak<Breaker>) -> &'static Slot {
        let recycled = FREE.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let slot = recycled.unwrap_or_else(|| {
            Box::leak(Box::new(Slot {
                word: AtomicU64::new(0),
                owner: Mutex::new(Weak::new()),
            }))
        });
        *slot.owner.lock().unwrap_or_else(PoisonError::into_inner) = owner;
        let word = slot.word.load(Acquire);
        slot.word
            .store(next_word(word, CircuitState::Closed, 0), Release);
        slot
    }

    /// Gives the slot back (its breaker is being dropped).
    pub(crate) fn release(&'static self) {
        *self.owner.lock().unwrap_or_else(PoisonError::into_inner) = Weak::new();
        let word = self.word.load(Acquire);
        self.word
            .store(next_word(word, CircuitState::Closed, 0), Release);
        FREE.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(self);
    }

    /// Counts an outcome of a call admitted in `generation` in the failure streak:
    /// a failure adds one, a success clears it (a store only when it is not 0
    /// already). Nothing happens when the breaker has moved to another generation
    /// or does not count, or when `threshold` is 0 (the rule is off). Returns the
    /// streak when a failure made it reach `threshold` while closed.
    #[inline]
    pub(crate) fn record_streak(
        &self,
        generation: u32,
        failed: bool,
        threshold: u32,
    ) -> Option<u32> {
        if threshold == 0 {
            return None;
        }
        let current = |word: u64| gen_of(word) == generation && is_counting(state_of(word));
        if failed {
            let before = self
                .word
                .fetch_update(AcqRel, Acquire, |word| {
                    current(word).then(|| {
                        let streak = streak_of(word).saturating_add(1);
                        (word & !STREAK_MASK) | (u64::from(streak) << STREAK_SHIFT)
                    })
                })
                .ok()?;
            let streak = streak_of(before).saturating_add(1);
            (state_of(before) == CircuitState::Closed && streak >= threshold).then_some(streak)
        } else {
            let word = self.word.load(Acquire);
            if streak_of(word) != 0 && current(word) {
                let _ = self.word.fetch_update(AcqRel, Acquire, |word| {
                    (streak_of(word) != 0 && current(word)).then_some(word & !STREAK_MASK)
                });
            }
            None
        }
    }

    /// Records a closed-state outcome for a caller that holds only the slot, and
    /// opens the breaker when the streak reaches `threshold`.
    #[inline]
    pub(crate) fn record(&self, generation: u32, failed: bool, threshold: u32) {
        if let Some(count) = self.record_streak(generation, failed, threshold) {
            self.trip(generation, count);
        }
    }

    #[cold]
    fn trip(&self, generation: u32, count: u32) {
        let owner = self
            .owner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(breaker) = owner.upgrade() {
            breaker.open_from_closed(generation, TransitionReason::ConsecutiveFailures { count });
        }
    }
}
