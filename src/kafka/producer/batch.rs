//! [`PublishBatch`]: many events to one topic, enqueued at once, acknowledged together.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rdkafka::producer::DeliveryFuture;
use serde::Serialize;
use uuid::Uuid;

use super::{Prepared, ProducerCore, PublishAck, await_acks, is_queue_full};
use crate::kafka::client::{KafkaClient, KeelProducer};
use crate::kafka::envelope::EventEnvelope;
use crate::kafka::error::{BatchOutcome, KafkaProducerError, ProducerErrorKind};

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
/// how many events were delivered. Use [`TransactionalPublisher`](super::TransactionalPublisher)
/// for all or nothing. Cloning is cheap and shares the client's producer and metrics.
#[derive(Clone)]
pub struct PublishBatch {
    core: ProducerCore,
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
        }
    }

    /// The largest batch accepted.
    pub fn max_batch_size(&self) -> usize {
        self.core.shared.config.max_batch_size()
    }

    fn publish<T: Serialize>(&self, req: PublishBatchRequest<T>) -> PublishBatchFuture {
        let started = quanta::Instant::now();
        let topic = req.topic;
        let total = req.events.len();
        let metrics = &self.core.shared.metrics;
        let producer = match self.core.producer(&topic) {
            Ok(p) => p.clone(),
            Err(e) => {
                metrics.record_refused(total as u64);
                return ready(Err(e));
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
        let mut prepared = Vec::with_capacity(total);
        // Events of one batch are usually alike in size: size each buffer like
        // the previous event (capped, so one huge event does not inflate the rest).
        let mut capacity = 128;
        for event in req.events {
            match Prepared::from_event(event, None, capacity) {
                Ok(p) => {
                    capacity = p.encoded_len().clamp(128, 64 * 1024);
                    prepared.push(p);
                }
                Err(e) => {
                    metrics.record_refused(total as u64);
                    return ready(Err(KafkaProducerError::with_source(
                        topic,
                        ProducerErrorKind::Serialization,
                        e,
                    )
                    .with_batch(BatchOutcome {
                        total,
                        delivered: 0,
                        failed: total,
                    })));
                }
            }
        }
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
        let delivery_timeout = core.shared.config.delivery_timeout();
        PublishBatchFuture {
            inner: Box::pin(async move {
                let mut failure: Option<KafkaProducerError> = None;
                if let Some((err, first)) = enqueue_error {
                    if is_queue_full(&err) {
                        let pending = std::iter::once(first).chain(rest);
                        if let Err(e) = enqueue_rest(
                            &producer,
                            &topic,
                            pending,
                            &mut deliveries,
                            std::time::Instant::now()
                                + delivery_timeout.saturating_sub(started.elapsed()),
                        )
                        .await
                        {
                            failure = Some(e);
                        }
                    } else {
                        failure = Some(KafkaProducerError::from_kafka(&*topic, err));
                        drop(rest);
                    }
                }
                let (acks, ack_failure) = await_acks(deliveries.into_iter().zip(ids), &topic).await;
                if failure.is_none() {
                    failure = ack_failure;
                }
                let elapsed = started.elapsed();
                let delivered = acks.len();
                core.metrics().record_call(
                    delivered as u64,
                    (total - delivered) as u64,
                    started,
                    elapsed,
                );
                match failure {
                    None => {
                        core.confirm_connected();
                        tracing::debug!(
                            target: "keel::kafka",
                            topic = %topic,
                            events = total,
                            duration_us = elapsed.as_micros() as u64,
                            "batch published"
                        );
                        Ok(BatchAck { topic, acks })
                    }
                    Some(e) => {
                        let e = e.with_batch(BatchOutcome {
                            total,
                            delivered,
                            failed: total - delivered,
                        });
                        tracing::warn!(
                            target: "keel::kafka",
                            topic = %topic,
                            events = total,
                            delivered,
                            error = %e,
                            duration_us = elapsed.as_micros() as u64,
                            "batch publish failed"
                        );
                        Err(e)
                    }
                }
            }),
        }
    }
}

/// Enqueues `pending` in order, waiting while librdkafka's queue is full (other
/// publishers, or this batch's own earlier events, drain it), until `deadline`.
async fn enqueue_rest(
    producer: &KeelProducer,
    topic: &str,
    pending: impl Iterator<Item = Prepared>,
    deliveries: &mut Vec<DeliveryFuture>,
    deadline: Instant,
) -> Result<(), KafkaProducerError> {
    for mut p in pending {
        loop {
            match p.send(producer, topic) {
                Ok(d) => {
                    deliveries.push(d);
                    break;
                }
                Err((e, back)) if is_queue_full(&e) => {
                    if Instant::now() >= deadline {
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
