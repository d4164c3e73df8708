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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::consumer::ReceivedMessage;
    use crate::kafka::consumer::retry_topic::gate::KeyGate;
    use crate::kafka::consumer::retry_topic::ladder::Ladder;
    use crate::kafka::consumer::retry_topic::publisher::RetryPublisher;
    use crate::kafka::consumer::{HandlerError, HandlerErrors};
    use crate::kafka::envelope::EventEnvelope;
    use rdkafka::ClientConfig;
    use rdkafka::message::{OwnedMessage, Timestamp};
    use rdkafka::mocking::MockCluster;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;
    use tower::ServiceExt;

    fn event(key: &str, offset: i64) -> ConsumedEvent {
        let envelope = EventEnvelope::new("e", serde_json::json!({"offset": offset}));
        let encoded = envelope.encode().unwrap();
        let message = ReceivedMessage::new(OwnedMessage::new(
            Some(encoded.value.clone()),
            Some(key.as_bytes().to_vec()),
            "t".into(),
            Timestamp::NotAvailable,
            0,
            offset,
            Some(encoded.owned_headers()),
        ));
        ConsumedEvent::new(envelope, message)
    }

    /// The hop over a one-broker mock cluster with the retry topic `t.retry.1s`.
    fn shared(
        cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        in_place: u32,
        key_preserving: bool,
    ) -> Arc<Shared> {
        cluster.create_topic("t.retry.1s", 1, 1).unwrap();
        let mut base = ClientConfig::new();
        base.set("bootstrap.servers", cluster.bootstrap_servers());
        Arc::new(Shared {
            ladder: Ladder::new([Duration::from_secs(1)]).unwrap(),
            publisher: RetryPublisher::new(&base, "g", ".dlq").unwrap(),
            gate: key_preserving.then(|| Arc::new(KeyGate::new(10))),
            in_place,
            enable_dlq: true,
            metrics: Arc::default(),
        })
    }

    /// A handler counting its calls; fails (permanently when asked) for offset 0.
    fn handler(
        calls: Arc<AtomicU32>,
        permanent: bool,
    ) -> impl Service<ConsumedEvent, Response = (), Error = BoxError, Future: Send> + Clone + Send
    {
        tower::service_fn(move |event: ConsumedEvent| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                match (event.offset(), permanent) {
                    (0, true) => Err(Box::new(HandlerError::permanent("bad")) as BoxError),
                    (0, false) => Err("transient".into()),
                    _ => Ok(()),
                }
            }
        })
    }

    /// The runtime counts attempts outside the hop; do the same.
    async fn attempt<S>(hop: &mut RetryHop<S>, event: &ConsumedEvent) -> Result<(), BoxError>
    where
        RetryHop<S>: Service<ConsumedEvent, Response = (), Error = BoxError>,
    {
        event.count_attempt();
        hop.ready().await?.call(event.clone()).await
    }

    #[tokio::test]
    async fn the_hop_comes_after_the_in_place_attempts_and_skips_permanent_failures() {
        let cluster = MockCluster::new(1).unwrap();
        let shared = shared(&cluster, 2, false);
        let calls = Arc::new(AtomicU32::new(0));
        let mut hop = RetryHop::new(handler(calls.clone(), false), shared.clone());
        let failing = event("a", 0);
        // Attempt 1 of 2 fails in place (the runtime retries it).
        let first = attempt(&mut hop, &failing).await.unwrap_err();
        assert!(HandlerErrors::classify_error(first.as_ref()).retryable);
        assert_eq!(shared.metrics.hopped.load(Ordering::SeqCst), 0);
        // Attempt 2 fails too: published to the retry topic, answered Ok.
        attempt(&mut hop, &failing).await.unwrap();
        assert_eq!(shared.metrics.hopped.load(Ordering::SeqCst), 1);
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        // A permanent failure is not sent along the ladder: the runtime
        // dead-letters it.
        let calls = Arc::new(AtomicU32::new(0));
        let mut hop = RetryHop::new(handler(calls.clone(), true), shared.clone());
        let error = attempt(&mut hop, &event("b", 0)).await.unwrap_err();
        assert!(!HandlerErrors::classify_error(error.as_ref()).retryable);
        assert_eq!(shared.metrics.hopped.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_later_record_of_a_waiting_key_is_held_without_running_the_handler() {
        let cluster = MockCluster::new(1).unwrap();
        let shared = shared(&cluster, 1, true);
        let calls = Arc::new(AtomicU32::new(0));
        let mut hop = RetryHop::new(handler(calls.clone(), false), shared.clone());
        attempt(&mut hop, &event("a", 0)).await.unwrap();
        assert_eq!(shared.metrics.hopped.load(Ordering::SeqCst), 1);
        // Key "a" waits: its next record is held (sent along, handler not run).
        attempt(&mut hop, &event("a", 1)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(shared.metrics.held.load(Ordering::SeqCst), 1);
        // Another key goes through.
        attempt(&mut hop, &event("b", 2)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(shared.gate.as_ref().unwrap().len(), 2);
    }
}
