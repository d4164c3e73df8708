//! The main-topic side: [`RetryHop`] wraps the handler; after the last in-place
//! attempt it sends the failed record to the first retry topic and answers `Ok`
//! only once the broker has it, so the runtime commits the main offset only then.

use super::Shared;
use super::gate::Entered;
use super::headers::{Failure, RetryState};
use super::publisher::now_ms;
use crate::kafka::consumer::{BoxError, ConsumedEvent, HandlerErrors, TopicPartition};
use crate::kafka::dead_letter::reason_for;
use futures::future::BoxFuture;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

/// The handler as the main consumer runs it: see [the module docs](super).
///
/// Cloning clones the handler and shares the ladder, producer and key gate.
#[derive(Clone)]
pub struct RetryHop<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for RetryHop<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryHop")
            .field("ladder", &self.shared.ladder)
            .finish_non_exhaustive()
    }
}

impl<S> RetryHop<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        RetryHop { inner, shared }
    }
    /// The wrapped handler.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// A failure as the history records it; whether it may be retried at all.
pub(crate) fn failure_of(error: BoxError, topic: &str, attempts: u32) -> (Failure, bool) {
    let retryable = HandlerErrors::classify_error(error.as_ref()).retryable;
    let reason = reason_for(error, attempts);
    let failure = Failure::new(
        now_ms(),
        topic,
        attempts,
        reason.kind,
        reason.error_type,
        &reason.message,
    );
    (failure, retryable)
}

impl<S> Service<ConsumedEvent> for RetryHop<S>
where
    S: Service<ConsumedEvent, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<(), BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, event: ConsumedEvent) -> Self::Future {
        // The ready clone serves this call (tower's usual swap).
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let shared = self.shared.clone();
        Box::pin(async move {
            let tp = TopicPartition::new(event.topic(), event.partition());
            if let (Some(gate), Some(key)) = (&shared.gate, event.key()) {
                // Key-preserving: a record whose key waits on the ladder is held.
                let entered = loop {
                    match gate.enter(&tp, key, event.offset(), None) {
                        Entered::Full => gate.room().await,
                        other => break other,
                    }
                };
                if let Entered::Held { rung } = entered {
                    return hold(&shared, &event, rung).await;
                }
            }
            let error: BoxError = match inner.call(event.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) => e.into(),
            };
            let attempts = event.attempts_made().max(1);
            let retryable = HandlerErrors::classify_error(error.as_ref()).retryable;
            // Permanent failures go to the DLQ at once; the first attempts are
            // retried in place by the runtime's retry layer.
            if !retryable || attempts < shared.in_place {
                return Err(error);
            }
            let message = error.to_string();
            let (failure, _) = failure_of(error, event.topic(), attempts);
            hop(&shared, &event, &tp, failure).await.map_err(|publish| {
                tracing::error!(topic = event.topic(), partition = event.partition(), offset = event.offset(), error = %publish, "could not publish to the retry topic: the runtime dead-letters the record");
                BoxError::from(message)
            })
        })
    }
}

/// Sends a failed main-topic record to rung 0.
async fn hop(
    shared: &Shared,
    event: &ConsumedEvent,
    tp: &TopicPartition,
    failure: Failure,
) -> Result<(), BoxError> {
    if let (Some(gate), Some(key)) = (&shared.gate, event.key()) {
        while gate.enter(tp, key, event.offset(), Some(0)) == Entered::Full {
            gate.room().await;
        }
    }
    let delay = shared.ladder.delay(0).unwrap_or_default();
    let state = RetryState {
        original_topic: event.topic().to_string(),
        original_partition: event.partition(),
        original_offset: event.offset(),
        attempts: failure.attempts,
        rung: 0,
        due_at_ms: failure.at_ms + delay.as_millis() as u64,
        held: false,
        history: vec![failure],
    };
    let topic = shared.ladder.topic(event.topic(), 0).unwrap_or_default();
    match shared
        .publisher
        .send(&topic, event.message(), state.headers(event.message()))
        .await
    {
        Ok(_) => {
            shared.metrics.count(&shared.metrics.hopped);
            tracing::warn!(topic = event.topic(), partition = event.partition(), offset = event.offset(), retry_topic = %topic, due_at_ms = state.due_at_ms, "handler failed: record sent to its retry topic");
            Ok(())
        }
        Err(e) => {
            shared.metrics.count(&shared.metrics.publish_failures);
            if let (Some(gate), Some(key)) = (&shared.gate, event.key()) {
                gate.leave(tp, key, event.offset());
            }
            Err(e.into())
        }
    }
}

/// Sends a main-topic record whose key waits to the rung of its key's head.
async fn hold(shared: &Shared, event: &ConsumedEvent, rung: usize) -> Result<(), BoxError> {
    let delay = shared.ladder.delay(rung).unwrap_or_default();
    let state = RetryState {
        original_topic: event.topic().to_string(),
        original_partition: event.partition(),
        original_offset: event.offset(),
        attempts: 0,
        rung,
        due_at_ms: now_ms() + delay.as_millis() as u64,
        held: true,
        history: Vec::new(),
    };
    let topic = shared.ladder.topic(event.topic(), rung).unwrap_or_default();
    let sent = shared
        .publisher
        .send(&topic, event.message(), state.headers(event.message()))
        .await;
    match sent {
        Ok(_) => {
            shared.metrics.count(&shared.metrics.held);
            Ok(())
        }
        Err(e) => {
            shared.metrics.count(&shared.metrics.publish_failures);
            if let (Some(gate), Some(key)) = (&shared.gate, event.key()) {
                let tp = TopicPartition::new(event.topic(), event.partition());
                gate.leave(&tp, key, event.offset());
            }
            // Retried by the runtime (the handler has not run), then dead-lettered.
            Err(e.into())
        }
    }
}
