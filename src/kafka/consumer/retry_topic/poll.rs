//! The retry consumer: a poll thread over every retry topic (its own group,
//! `<group>.retry`) and one worker task per due record.
//!
//! The thread never waits for a handler: a partition whose head record is not
//! due, or is being handled, is paused while polling goes on (see `due.rs`).

use super::Shared;
use super::due::{Fetched, Slots, Ticket};
use super::gate::{KeyGate, Place};
use super::headers::RetryState;
use super::hop::failure_of;
use super::publisher::now_ms;
use crate::kafka::consumer::supervise::panic_message;
use crate::kafka::consumer::{
    BoxError, ConsumedEvent, HandlerError, MessageHeaders, ReceivedMessage, TopicPartition,
};
use crate::kafka::envelope::EventEnvelope;
use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

type Partitions = Arc<Mutex<Slots<ReceivedMessage>>>;

fn lock(p: &Partitions) -> std::sync::MutexGuard<'_, Slots<ReceivedMessage>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps the slots in step with the assignment (callbacks run inside `poll`).
pub(crate) struct RetryContext {
    slots: Partitions,
    gate: Option<Arc<KeyGate>>,
}

impl ClientContext for RetryContext {}

impl ConsumerContext for RetryContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut slots = lock(&self.slots);
            for e in tpl.elements() {
                slots.revoke(&TopicPartition::new(e.topic(), e.partition()));
            }
            // Their records may be handled elsewhere now: a key must not wait
            // here for a head that will never finish here.
            if tpl.count() > 0
                && let Some(gate) = &self.gate
            {
                gate.clear();
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            {
                let mut slots = lock(&self.slots);
                for e in tpl.elements() {
                    slots.assign(TopicPartition::new(e.topic(), e.partition()));
                }
            }
            // A pause from a previous assignment would never be lifted.
            if tpl.count() > 0
                && let Err(e) = consumer.resume(tpl)
            {
                tracing::warn!(error = %e, "could not resume assigned retry partitions");
            }
        }
    }
}

/// One finished record, from a worker back to the poll thread.
pub(crate) struct Done(Ticket);

pub(crate) struct RetryLoop<S> {
    pub(crate) consumer: BaseConsumer<RetryContext>,
    pub(crate) slots: Partitions,
    pub(crate) handler: S,
    pub(crate) shared: Arc<Shared>,
    /// Retry topic → (main topic, rung).
    pub(crate) topics: HashMap<String, (String, usize)>,
    pub(crate) rt: Handle,
    pub(crate) poll_interval: Duration,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) drain: Arc<AtomicBool>,
}

pub(crate) fn new_slots(gate: Option<Arc<KeyGate>>) -> (RetryContext, Partitions) {
    let slots = Arc::new(Mutex::new(Slots::new()));
    (
        RetryContext {
            slots: slots.clone(),
            gate,
        },
        slots,
    )
}

impl<S> RetryLoop<S>
where
    S: Service<ConsumedEvent, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    /// Polls until stopped; on a drain, stops handing out records and returns
    /// once the ones in flight are finished (or on stop).
    pub(crate) fn run(self) {
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            while let Ok(Done(ticket)) = done_rx.try_recv() {
                self.finished(&ticket);
            }
            let draining = self.drain.load(Ordering::SeqCst);
            if draining && lock(&self.slots).in_flight() == 0 {
                break;
            }
            if !draining {
                let due = lock(&self.slots).due(Instant::now(), now_ms());
                for (ticket, message, due_at_ms) in due {
                    self.dispatch(ticket, message, due_at_ms, &done_tx);
                }
            }
            let wait = {
                let slots = lock(&self.slots);
                // Finished records come back through a channel the poll cannot
                // wake on: poll briefly while any is in flight.
                let max = if slots.in_flight() > 0 {
                    self.poll_interval.min(Duration::from_millis(5))
                } else {
                    self.poll_interval
                };
                slots.wait(Instant::now(), max)
            };
            match self.consumer.poll(wait) {
                Some(Ok(m)) if !draining => {
                    self.fetched(ReceivedMessage::new(m.detach()), &done_tx)
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "retry consumer poll error"),
                None => {}
            }
        }
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "final commit of the retry consumer");
        }
    }

    fn fetched(&self, message: ReceivedMessage, done: &mpsc::Sender<Done>) {
        let tp = TopicPartition::new(message.topic(), message.partition());
        let offset = message.offset();
        // A record whose headers cannot be read is due now: it goes to the DLQ.
        let due_at = RetryState::from_message(&message)
            .ok()
            .flatten()
            .map_or(0, |s| s.due_at_ms);
        let (what, handed) =
            lock(&self.slots).fetched(&tp, offset, due_at, message, Instant::now(), now_ms());
        if what != Fetched::Drop {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&tp.topic, tp.partition);
            if let Err(e) = self.consumer.pause(&tpl) {
                // Harmless: records behind the head are dropped until the seek.
                tracing::debug!(%tp, error = %e, "pausing a retry partition failed");
            }
        }
        if let Some((ticket, message)) = handed {
            self.dispatch(ticket, message, due_at, done);
        }
    }

    fn dispatch(
        &self,
        ticket: Ticket,
        message: ReceivedMessage,
        due_at_ms: u64,
        done: &mpsc::Sender<Done>,
    ) {
        if due_at_ms > 0 {
            self.shared
                .metrics
                .lateness(now_ms().saturating_sub(due_at_ms));
        }
        let handler = self.handler.clone();
        let work = Work {
            shared: self.shared.clone(),
            source: self.topics.get(message.topic()).cloned(),
            stop: self.stop.clone(),
        };
        let done = done.clone();
        self.rt.spawn(async move {
            if work.process(handler, message).await {
                let _ = done.send(Done(ticket));
            }
        });
    }

    /// Stores the offset after the finished record, seeks there and resumes.
    fn finished(&self, ticket: &Ticket) {
        let Some(next) = lock(&self.slots).finish(ticket) else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        let _ =
            tpl.add_partition_offset(&ticket.tp.topic, ticket.tp.partition, Offset::Offset(next));
        if let Err(e) = self.consumer.store_offsets(&tpl) {
            tracing::warn!(tp = %ticket.tp, error = %e, "storing a retry offset failed");
        }
        if let Err(e) = self.consumer.seek(
            &ticket.tp.topic,
            ticket.tp.partition,
            Offset::Offset(next),
            Duration::from_secs(5),
        ) {
            tracing::warn!(tp = %ticket.tp, error = %e, "seek in a retry partition failed");
        }
        if let Err(e) = self.consumer.resume(&tpl) {
            tracing::warn!(tp = %ticket.tp, error = %e, "resuming a retry partition failed");
        }
    }
}

/// What a worker needs to finish one retry record (the handler apart: it
/// need not be `Sync`).
struct Work {
    shared: Arc<Shared>,
    /// (main topic, rung) of the record's retry topic.
    source: Option<(String, usize)>,
    stop: Arc<AtomicBool>,
}

impl Work {
    /// Handles, moves on or dead-letters one due record; `true` once it is out of
    /// this partition (its offset may be committed), `false` when stopped first.
    async fn process<S>(self, handler: S, message: ReceivedMessage) -> bool
    where
        S: Service<ConsumedEvent, Response = ()> + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let (source, rung) = self
            .source
            .clone()
            .unwrap_or_else(|| (message.topic().to_string(), 0));
        let state = match RetryState::from_message(&message) {
            Ok(Some(state)) => state,
            bad => {
                let problem = match bad {
                    Err(e) => e.to_string(),
                    _ => "no retry headers".to_string(),
                };
                let state = RetryState {
                    original_topic: source.clone(),
                    original_partition: -1,
                    original_offset: -1,
                    attempts: 0,
                    rung,
                    due_at_ms: 0,
                    held: false,
                    history: vec![super::headers::Failure::new(
                        now_ms(),
                        message.topic(),
                        0,
                        "decode",
                        "keel::kafka::consumer::retry_topic::RetryTopicError",
                        &problem,
                    )],
                };
                return self.dead_letter(&message, state).await;
            }
        };
        let tp = TopicPartition::new(state.original_topic.as_str(), state.original_partition);
        let gate = self
            .shared
            .gate
            .clone()
            .zip(message.key().map(<[u8]>::to_vec));
        if let Some((gate, key)) = &gate
            && let Place::Behind { head_rung } = gate.place(&tp, key, state.original_offset)
        {
            // An earlier record of its key is still on the ladder: follow it.
            let next = RetryState {
                rung: head_rung,
                due_at_ms: now_ms() + self.delay(head_rung),
                held: true,
                ..state
            };
            return self.publish(&message, &source, next).await;
        }
        let decoded = EventEnvelope::from_parts(
            message.payload(),
            message.key(),
            message
                .headers()
                .into_iter()
                .flat_map(MessageHeaders::entries),
            message.timestamp(),
        );
        let result: Result<(), BoxError> = match decoded {
            Err(e) => Err(Box::new(HandlerError::permanent(e).with_class("decode"))),
            Ok(envelope) => {
                let event = ConsumedEvent::new(envelope, message.clone());
                event.count_attempt();
                let call = handler.oneshot(event);
                match AssertUnwindSafe(call).catch_unwind().await {
                    Ok(r) => r.map_err(Into::into),
                    Err(panic) => Err(Box::new(
                        HandlerError::retryable(format!(
                            "handler panicked: {}",
                            panic_message(&*panic)
                        ))
                        .with_class("panic"),
                    )),
                }
            }
        };
        let error = match result {
            Ok(()) => {
                self.shared.metrics.count(&self.shared.metrics.recovered);
                if let Some((gate, key)) = &gate {
                    gate.leave(&tp, key, state.original_offset);
                }
                return true;
            }
            Err(e) => e,
        };
        let (failure, retryable) = failure_of(error, message.topic(), 1);
        let mut next = state;
        next.attempts += 1;
        next.held = false;
        next.history.push(failure);
        // The rung follows the record's own failures (a held record starts low).
        let to = next.history.len() - 1;
        if !retryable || to >= self.shared.ladder.len() {
            return self.dead_letter(&message, next).await;
        }
        next.rung = to;
        next.due_at_ms = now_ms() + self.delay(to);
        if let Some((gate, key)) = &gate {
            gate.moved(&tp, key, next.original_offset, to);
        }
        self.publish(&message, &source, next).await
    }

    fn delay(&self, rung: usize) -> u64 {
        self.shared
            .ladder
            .delay(rung)
            .unwrap_or_default()
            .as_millis() as u64
    }

    /// Publishes to the rung of `state`, retrying until acknowledged or stopped.
    async fn publish(&self, message: &ReceivedMessage, source: &str, state: RetryState) -> bool {
        let topic = self
            .shared
            .ladder
            .topic(source, state.rung)
            .unwrap_or_default();
        let headers = || state.headers(message);
        if self.keep_sending(&topic, message, headers).await {
            let counter = if state.held {
                &self.shared.metrics.held
            } else {
                &self.shared.metrics.moved
            };
            self.shared.metrics.count(counter);
            return true;
        }
        false
    }

    async fn dead_letter(&self, message: &ReceivedMessage, state: RetryState) -> bool {
        let gate_entry = self
            .shared
            .gate
            .clone()
            .zip(message.key().map(<[u8]>::to_vec));
        if !self.shared.enable_dlq {
            tracing::error!(topic = %state.original_topic, partition = state.original_partition, offset = state.original_offset, attempts = state.attempts, "record failed on every rung and the DLQ is disabled: skipped");
        } else {
            let topic = self.shared.publisher.dlq_topic(&state.original_topic);
            let headers = || self.shared.publisher.dlq_headers(message, &state);
            if !self.keep_sending(&topic, message, headers).await {
                return false;
            }
            self.shared
                .metrics
                .count(&self.shared.metrics.dead_lettered);
            tracing::error!(topic = %state.original_topic, partition = state.original_partition, offset = state.original_offset, attempts = state.attempts, dlq_topic = %topic, "record failed on every rung: dead-lettered");
        }
        if let Some((gate, key)) = gate_entry {
            let tp = TopicPartition::new(state.original_topic.as_str(), state.original_partition);
            gate.leave(&tp, &key, state.original_offset);
        }
        true
    }

    /// Sends until the broker acknowledges (backoff 1 s doubling to 30 s); the
    /// record stays unfinished meanwhile, so its offset is not committed.
    async fn keep_sending(
        &self,
        topic: &str,
        message: &ReceivedMessage,
        headers: impl Fn() -> rdkafka::message::OwnedHeaders,
    ) -> bool {
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.shared.publisher.send(topic, message, headers()).await {
                Ok(_) => return true,
                Err(e) => {
                    self.shared
                        .metrics
                        .count(&self.shared.metrics.publish_failures);
                    tracing::error!(%topic, error = %e, "retry-topic publish failed; retrying");
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                return false;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}
