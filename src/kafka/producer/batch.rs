//! [`PublishBatch`]: many events to one topic, enqueued at once, acknowledged together.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use rdkafka::producer::DeliveryFuture;
use serde::Serialize;
use uuid::Uuid;

use super::{
    PUBLISH_TIMEOUT_MARGIN, Prepared, ProducerCore, PublishAck, await_acks, is_queue_full,
};
use crate::kafka::client::{KafkaClient, KeelProducer};
use crate::kafka::envelope::EventEnvelope;
use crate::kafka::error::{
    BatchOutcome, EventOutcome, EventResult, KafkaProducerError, ProducerErrorKind,
};

/// Events for one topic, published together.
///
/// The topic is a `Cow<'static, str>`, as in
/// [`PublishRequest`](super::PublishRequest).
#[derive(Clone, Debug, PartialEq)]
pub struct PublishBatchRequest<T = serde_json::Value> {
    /// The topic.
    pub topic: Cow<'static, str>,
    /// The events, published in this order (per-key order is kept).
    pub events: Vec<EventEnvelope<T>>,
}

impl<T> PublishBatchRequest<T> {
    /// `events` for `topic`.
    pub fn new(topic: impl Into<Cow<'static, str>>, events: Vec<EventEnvelope<T>>) -> Self {
        PublishBatchRequest {
            topic: topic.into(),
            events,
        }
    }

    /// Events in the batch.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// `true` when the batch holds no event.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// Acknowledgements of a whole batch, in the batch's order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchAck {
    /// The topic.
    pub topic: Cow<'static, str>,
    /// One acknowledgement per event, in order.
    pub acks: Vec<PublishAck>,
}

/// The response future of [`PublishBatch`].
pub struct PublishBatchFuture {
    inner: Pin<Box<dyn Future<Output = Result<BatchAck, KafkaProducerError>> + Send>>,
}

impl fmt::Debug for PublishBatchFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishBatchFuture").finish_non_exhaustive()
    }
}

impl Future for PublishBatchFuture {
    type Output = Result<BatchAck, KafkaProducerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

/// Publishes a batch of events to one topic and resolves once the broker has
/// acknowledged every one.
///
/// `call` checks the size (more than
/// [`max_batch_size`](crate::kafka::config::KafkaConfig::max_batch_size) is refused
/// with [`ProducerErrorKind::BatchTooLarge`] before any I/O), serializes every
/// event (one that cannot be serialized fails the batch before anything is sent),
/// then enqueues them all in order; the future awaits every acknowledgement. If
/// librdkafka's queue fills up mid-batch, the rest is enqueued as the batch's own
/// earlier events drain, within the delivery timeout.
///
/// Not atomic: on a failure the error's [`batch`](KafkaProducerError::batch) says
/// what became of every event ([`BatchOutcome::events`]): delivered (with
/// partition and offset), failed (not stored, with the kind), not sent, or
/// unknown (may have been stored). The whole batch is bounded by
/// [`with_timeout`](Self::with_timeout). Use [`TransactionalPublisher`](super::TransactionalPublisher)
/// for all or nothing. Cloning is cheap and shares the client's producer and metrics.
#[derive(Clone)]
pub struct PublishBatch {
    core: ProducerCore,
    timeout: Duration,
}

impl fmt::Debug for PublishBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishBatch").finish_non_exhaustive()
    }
}

impl PublishBatchFuture {
    pub(crate) fn boxed<F>(future: F) -> Self
    where
        F: Future<Output = Result<BatchAck, KafkaProducerError>> + Send + 'static,
    {
        PublishBatchFuture {
            inner: Box::pin(future),
        }
    }
}

fn ready(result: Result<BatchAck, KafkaProducerError>) -> PublishBatchFuture {
    PublishBatchFuture {
        inner: Box::pin(std::future::ready(result)),
    }
}

impl PublishBatch {
    /// The batch publish service of `client`.
    pub fn new(client: &KafkaClient) -> Self {
        PublishBatch {
            core: ProducerCore::new(client),
            timeout: client.config().delivery_timeout() + PUBLISH_TIMEOUT_MARGIN,
        }
    }

    /// Bounds the whole batch, enqueueing and acknowledgements (default: the
    /// config's [`delivery_timeout`](crate::kafka::config::KafkaConfig::delivery_timeout)
    /// plus [`PUBLISH_TIMEOUT_MARGIN`]). When it expires the batch fails with
    /// [`ProducerErrorKind::OutcomeUnknown`]: the events acknowledged by then are
    /// delivered, those still waiting are [`EventOutcome::Unknown`] (they are in
    /// librdkafka's queue and may yet be delivered), those not enqueued yet
    /// [`EventOutcome::NotSent`]. The [`PublishStack`](super::PublishStack) sets it to
    /// its own timeout, so a batch always answers with per-event results before
    /// the stack's timeout layer would drop it.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The bound on one batch.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The largest batch accepted.
    pub fn max_batch_size(&self) -> usize {
        self.core.shared.config.max_batch_size()
    }

    fn publish<T: Serialize>(&self, req: PublishBatchRequest<T>) -> PublishBatchFuture {
        let started = quanta::Instant::now();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let topic = req.topic;
        let total = req.events.len();
        let metrics = &self.core.shared.metrics;
        let producer = match self.core.producer(&topic) {
            Ok(p) => p.clone(),
            Err(e) => {
                metrics.record_refused(total as u64);
                let ids = req.events.iter().map(EventEnvelope::event_id);
                return ready(Err(
                    e.with_batch(BatchOutcome::all(ids, EventOutcome::NotSent))
                ));
            }
        };
        let max = self.max_batch_size();
        if total > max {
            metrics.record_refused(total as u64);
            return ready(Err(KafkaProducerError::new(
                topic,
                ProducerErrorKind::BatchTooLarge { size: total, max },
            )));
        }
        if total == 0 {
            return ready(Ok(BatchAck {
                topic,
                acks: Vec::new(),
            }));
        }
        metrics.record_batch(total);
        // With `otel`: one PRODUCER span for the batch; every event carries its
        // context (`Prepared` injects the current span's).
        #[cfg(feature = "otel")]
        let span = crate::kafka::otel::send_batch_span(&topic, total);
        #[cfg(feature = "otel")]
        let entered = span.clone().entered();
        let mut prepared = Vec::with_capacity(total);
        // Events of one batch are usually alike in size: size each buffer like
        // the previous event (capped, so one huge event does not inflate the rest).
        let mut capacity = 128;
        let mut events = req.events.into_iter();
        while let Some(event) = events.next() {
            let event_id = event.event_id();
            match Prepared::from_event(event, None, capacity) {
                Ok(p) => {
                    capacity = p.encoded_len().clamp(128, 64 * 1024);
                    prepared.push(p);
                }
                Err(e) => {
                    metrics.record_refused(total as u64);
                    // Nothing was sent: the bad event failed, every other one is unsent.
                    let results = prepared
                        .iter()
                        .map(|p| p.event_id)
                        .map(not_sent)
                        .chain(std::iter::once(EventResult {
                            event_id,
                            outcome: EventOutcome::Failed(ProducerErrorKind::Serialization),
                        }))
                        .chain(events.map(|e| not_sent(e.event_id())))
                        .collect();
                    return ready(Err(KafkaProducerError::with_source(
                        topic,
                        ProducerErrorKind::Serialization,
                        e,
                    )
                    .with_batch(BatchOutcome::from_events(results))));
                }
            }
        }
        #[cfg(feature = "otel")]
        drop(entered);
        let ids: Vec<Uuid> = prepared.iter().map(|p| p.event_id).collect();
        // Enqueue everything we can right now, in order.
        let mut deliveries: Vec<DeliveryFuture> = Vec::with_capacity(total);
        let mut enqueue_error = None;
        let mut rest = prepared.into_iter();
        for p in rest.by_ref() {
            match p.send(&producer, &topic) {
                Ok(d) => deliveries.push(d),
                Err((err, p)) => {
                    enqueue_error = Some((err, p));
                    break;
                }
            }
        }
        let rest: Vec<Prepared> = rest.collect();
        let core = self.core.clone();
        // Waiting for queue space ends with librdkafka's delivery timeout, or
        // earlier with the batch's own time.
        let enqueue_deadline =
            deadline.min(tokio::time::Instant::now() + core.shared.config.delivery_timeout());
        let future = async move {
            // The first event that could not be enqueued, and why.
            let mut stopped: Option<KafkaProducerError> = None;
            if let Some((err, first)) = enqueue_error {
                if is_queue_full(&err) {
                    let pending = std::iter::once(first).chain(rest);
                    if let Err(e) = enqueue_rest(
                        &producer,
                        &topic,
                        pending,
                        &mut deliveries,
                        enqueue_deadline,
                    )
                    .await
                    {
                        stopped = Some(e);
                    }
                } else {
                    stopped = Some(KafkaProducerError::from_kafka(&*topic, err));
                    drop(rest);
                }
            }
            let enqueued = deliveries.len();
            let acked = await_acks(
                deliveries.into_iter().zip(ids.iter().copied()),
                &topic,
                Some(deadline),
            )
            .await;
            let elapsed = started.elapsed();
            let (failure, results) = match (acked, stopped) {
                (Ok(acks), None) => {
                    core.metrics()
                        .record_call(total as u64, 0, started, elapsed);
                    core.confirm_connected();
                    tracing::debug!(
                        target: "keel::kafka",
                        topic = %topic,
                        events = total,
                        duration_us = elapsed.as_micros() as u64,
                        "batch published"
                    );
                    return Ok(BatchAck { topic, acks });
                }
                (Ok(acks), Some(e)) => {
                    let results: Vec<EventResult> =
                        acks.into_iter().map(EventResult::from).collect();
                    (e, results)
                }
                (Err((first, results)), stopped) => (stopped.unwrap_or(first), results),
            };
            // The events after the enqueued ones: the first was refused by
            // librdkafka, the rest never handed over.
            let mut results = results;
            let mut unsent = ids[enqueued..].iter().copied();
            if let Some(event_id) = unsent.next() {
                results.push(EventResult {
                    event_id,
                    outcome: EventOutcome::Failed(failure.kind()),
                });
            }
            results.extend(unsent.map(not_sent));
            let outcome = BatchOutcome::from_events(results);
            // Some events may have been stored: that is what the batch's
            // error says first (the cause keeps what stopped it).
            let failure = if outcome.unknown > 0 && !failure.kind().may_have_been_delivered() {
                KafkaProducerError::with_source(&*topic, ProducerErrorKind::OutcomeUnknown, failure)
            } else {
                failure
            };
            core.metrics().record_call(
                outcome.delivered as u64,
                (total - outcome.delivered) as u64,
                started,
                elapsed,
            );
            tracing::warn!(
                target: "keel::kafka",
                topic = %topic,
                events = total,
                delivered = outcome.delivered,
                failed = outcome.failed,
                outcome_unknown = outcome.unknown,
                error = %failure,
                duration_us = elapsed.as_micros() as u64,
                "batch publish failed"
            );
            #[cfg(feature = "otel")]
            crate::kafka::otel::record_publish_error(&tracing::Span::current(), &failure);
            Err(failure.with_batch(outcome))
        };
        #[cfg(feature = "otel")]
        let future = tracing::Instrument::instrument(future, span);
        PublishBatchFuture {
            inner: Box::pin(future),
        }
    }
}

fn not_sent(event_id: Uuid) -> EventResult {
    EventResult {
        event_id,
        outcome: EventOutcome::NotSent,
    }
}

/// Enqueues `pending` in order, waiting while librdkafka's queue is full (other
/// publishers, or this batch's own earlier events, drain it), until `deadline`.
async fn enqueue_rest(
    producer: &KeelProducer,
    topic: &str,
    pending: impl Iterator<Item = Prepared>,
    deliveries: &mut Vec<DeliveryFuture>,
    deadline: tokio::time::Instant,
) -> Result<(), KafkaProducerError> {
    for mut p in pending {
        loop {
            match p.send(producer, topic) {
                Ok(d) => {
                    deliveries.push(d);
                    break;
                }
                Err((e, back)) if is_queue_full(&e) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(KafkaProducerError::from_kafka(topic, e));
                    }
                    p = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(KafkaProducerError::from_kafka(topic, e)),
            }
        }
    }
    Ok(())
}

impl<T: Serialize> tower::Service<PublishBatchRequest<T>> for PublishBatch {
    type Response = BatchAck;
    type Error = KafkaProducerError;
    type Future = PublishBatchFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: PublishBatchRequest<T>) -> Self::Future {
        self.publish(req)
    }
}
