//! One timer for all the pending calls of a [`Timeout`](super::Timeout) service.
//!
//! tokio's timer wheel costs a pending call a boxed `Sleep`, a clock read, and a
//! registration and a removal under the time driver's lock (BENCHMARKS.md, "Kafka
//! publish": +125-139 ns per call with 10,000 outstanding, against +53-68 ns here).
//! Every call of one service has the same timeout, so deadlines arrive in order:
//! a FIFO of `(epoch, slot)` and a slab of wakers replace the wheel, and one
//! driver task wakes the calls whose time is up. A call costs one short lock to
//! enter and one to leave, and no clock read: a call joins the open *epoch*; the
//! driver closes it at its next tick (every `timeout / 32`, at least 1 ms) and
//! reads the clock then, so the calls of an epoch time out `timeout` after it
//! closed — never before `timeout` has passed since they entered, and at most one
//! tick (plus the driver's scheduling delay) later.
//!
//! Memory stays bounded: leaving frees the slot at once; queue entries of calls
//! that left are dropped when they reach the front, and the queue is compacted
//! when it holds more than twice the live calls. The driver exits when no call
//! is waiting, so an idle service holds no task.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;
use tokio::time::Instant;

/// The shared timer of one `Timeout` service and its clones.
#[derive(Debug)]
pub(crate) struct DeadlineQueue {
    timeout: Duration,
    tick: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Calls in the order they entered (so in epoch order).
    order: VecDeque<Queued>,
    /// Closed epochs still referenced by `order`, with when they closed.
    closed: VecDeque<(u64, Instant)>,
    /// The open epoch: calls entering now join it.
    epoch: u64,
    live: usize,
    driver_running: bool,
}

#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    state: SlotState,
}

#[derive(Debug, Default)]
enum SlotState {
    #[default]
    Vacant,
    Waiting(Waker),
    Fired,
}

#[derive(Debug, Clone, Copy)]
struct Queued {
    epoch: u64,
    index: u32,
    generation: u32,
}

/// A call's place in the queue; leaving (dropping it) frees the place.
#[derive(Debug)]
pub(crate) struct QueueEntry {
    queue: Arc<DeadlineQueue>,
    index: u32,
    generation: u32,
}

impl DeadlineQueue {
    pub(crate) fn new(timeout: Duration) -> Self {
        DeadlineQueue {
            timeout,
            tick: (timeout / 32).max(Duration::from_millis(1)),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here panics while holding the lock; recover rather than spread a poison.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enters the queue with `waker`, in the open epoch. Returns `None` outside a
    /// tokio runtime (the caller falls back to its own timer).
    /// Takes the caller's reference, so entering costs no reference count.
    pub(crate) fn enter(self: Arc<Self>, waker: &Waker) -> Option<QueueEntry> {
        let mut state = self.lock();
        // The driver's runtime, looked up only when a driver must be started.
        let runtime = if state.driver_running {
            None
        } else {
            Some(tokio::runtime::Handle::try_current().ok()?)
        };
        let index = match state.free.pop() {
            Some(i) => i,
            None => {
                // u32 slots: more than 4 billion calls in flight is not a case.
                let i = u32::try_from(state.slots.len()).ok()?;
                state.slots.push(Slot::default());
                i
            }
        };
        let slot = &mut state.slots[index as usize];
        slot.state = SlotState::Waiting(waker.clone());
        let generation = slot.generation;
        let epoch = state.epoch;
        state.order.push_back(Queued {
            epoch,
            index,
            generation,
        });
        state.live += 1;
        // Calls mostly finish in order: drop the entries of finished calls at
        // the front, and compact when finished ones pile up behind a slow call.
        let State {
            order, slots, live, ..
        } = &mut *state;
        let is_live = |q: &Queued| slots[q.index as usize].generation == q.generation;
        while order.front().is_some_and(|q| !is_live(q)) {
            order.pop_front();
        }
        if order.len() > 2 * *live + 64 {
            order.retain(is_live);
        }
        state.driver_running = true;
        drop(state);
        if let Some(runtime) = runtime {
            runtime.spawn(drive(DriverGuard {
                queue: self.clone(),
                finished: false,
            }));
        }
        Some(QueueEntry {
            queue: self,
            index,
            generation,
        })
    }

    /// Closes the open epoch at `now`, wakes the calls whose time is up (into
    /// `wake`) and returns when to look again; `None`, with the driver marked
    /// stopped, when no call is queued (calls already fired need no timer).
    fn expire(&self, now: Instant, wake: &mut Vec<Waker>) -> Option<Instant> {
        let mut state = self.lock();
        let State {
            order,
            slots,
            closed,
            epoch,
            driver_running,
            ..
        } = &mut *state;
        if order.back().is_some_and(|q| q.epoch == *epoch) {
            closed.push_back((*epoch, now));
            *epoch += 1;
        }
        while let Some(front) = order.front().copied() {
            let slot = &mut slots[front.index as usize];
            if slot.generation == front.generation {
                while closed.front().is_some_and(|(e, _)| *e < front.epoch) {
                    closed.pop_front();
                }
                // Every queued epoch was closed above.
                let Some(&(_, closed_at)) = closed.front() else {
                    break;
                };
                let deadline = closed_at
                    .checked_add(self.timeout)
                    .unwrap_or_else(super::far_future);
                if deadline > now {
                    // Tick meanwhile: calls entering now need their epoch closed.
                    return Some(deadline.min(self.next_tick(now)));
                }
                if let SlotState::Waiting(w) = std::mem::replace(&mut slot.state, SlotState::Fired)
                {
                    wake.push(w);
                }
            }
            order.pop_front();
        }
        if order.is_empty() {
            closed.clear();
            *driver_running = false;
            None
        } else {
            Some(self.next_tick(now))
        }
    }

    fn next_tick(&self, now: Instant) -> Instant {
        now.checked_add(self.tick).unwrap_or_else(super::far_future)
    }

    /// Slots, queued entries, live calls, whether the driver runs.
    #[cfg(test)]
    pub(crate) fn stats(&self) -> (usize, usize, usize, bool) {
        let s = self.lock();
        (s.slots.len(), s.order.len(), s.live, s.driver_running)
    }

    fn driver_stopped(&self) {
        self.lock().driver_running = false;
    }
}

impl QueueEntry {
    /// Whether the deadline has passed; otherwise makes sure `waker` is the one
    /// woken then.
    pub(crate) fn poll_elapsed(&self, waker: &Waker) -> bool {
        let mut state = self.queue.lock();
        let slot = &mut state.slots[self.index as usize];
        match &mut slot.state {
            SlotState::Fired => true,
            SlotState::Waiting(w) => {
                if !w.will_wake(waker) {
                    w.clone_from(waker);
                }
                false
            }
            // Only this entry frees its slot.
            SlotState::Vacant => false,
        }
    }
}

impl Drop for QueueEntry {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        let slot = &mut state.slots[self.index as usize];
        if slot.generation == self.generation {
            slot.generation = slot.generation.wrapping_add(1);
            slot.state = SlotState::Vacant;
            state.free.push(self.index);
            state.live -= 1;
        }
    }
}

/// Marks the driver stopped when its task is dropped before it finished (a
/// runtime shutting down, even before the task first ran), so the next call
/// starts a new one.
struct DriverGuard {
    queue: Arc<DeadlineQueue>,
    finished: bool,
}

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.queue.driver_stopped();
        }
    }
}

// The guard is an argument so that it is dropped even if the task is dropped
// before its first poll.
async fn drive(mut guard: DriverGuard) {
    let mut wake = Vec::new();
    loop {
        let next = guard.queue.expire(Instant::now(), &mut wake);
        for w in wake.drain(..) {
            w.wake();
        }
        match next {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => {
                // `expire` marked the driver stopped under the lock.
                guard.finished = true;
                return;
            }
        }
    }
}
