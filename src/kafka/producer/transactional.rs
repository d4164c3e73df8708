//! All-or-nothing publishing with Kafka transactions.

use quanta::Instant;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rdkafka::producer::{DeliveryFuture, Producer};
use serde::Serialize;
use tokio::sync::{Mutex, OwnedMutexGuard};
use uuid::Uuid;

use super::batch::{BatchAck, PublishBatchFuture, PublishBatchRequest};
use super::{Prepared, PublishAck, PublishMetrics, await_acks};
use crate::kafka::client::{KafkaClient, KeelClientContext, KeelProducer};
use crate::kafka::envelope::EventEnvelope;
use crate::kafka::error::{BatchOutcome, KafkaProducerError, ProducerErrorKind};

struct TxInner {
    producer: KeelProducer,
    lock: Arc<Mutex<()>>,
    metrics: Arc<PublishMetrics>,
    transactional_id: String,
    max_batch_size: usize,
    timeout: Duration,
}

/// Publishes batches atomically: a read-committed consumer sees all of a
/// transaction's events or none.
///
/// It owns its own producer with `transactional.id` (one id per producing
/// process: a new producer with the same id fences the old one) and runs one
/// transaction at a time; concurrent callers wait their turn. Use
/// [`publish_batch`](Self::publish_batch) (or the `Service` impl) for one topic,
/// or [`begin`](Self::begin) for several topics and explicit commit / abort.
/// A [`Transaction`] dropped without commit is aborted.
///
/// Transactional events are fenced and committed by the broker, so this costs a
/// few round trips per batch: use it for critical events, not bulk traffic.
/// Cloning is cheap and shares the producer.
#[derive(Clone)]
pub struct TransactionalPublisher {
    inner: Arc<TxInner>,
}

impl fmt::Debug for TransactionalPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionalPublisher")
            .field("transactional_id", &self.inner.transactional_id)
            .finish_non_exhaustive()
    }
}

fn tx_error(topic: &str, e: rdkafka::error::KafkaError) -> KafkaProducerError {
    KafkaProducerError::from_kafka(topic, e)
}

impl TransactionalPublisher {
    /// Creates the producer with `transactional_id` (or the config's
    /// `KAFKA_TRANSACTIONAL_ID`) and initialises transactions (fencing any older
    /// producer with the same id), within the config's request timeout.
    pub async fn new(
        client: &KafkaClient,
        transactional_id: Option<&str>,
    ) -> Result<Self, KafkaProducerError> {
        let config = client.config();
        if !config.enabled() {
            return Err(KafkaProducerError::disabled(""));
        }
        let id = transactional_id
            .map(str::to_string)
            .or_else(|| config.transactional_id().map(str::to_string))
            .ok_or_else(|| {
                KafkaProducerError::with_source(
                    "",
                    ProducerErrorKind::Transaction {
                        retriable: false,
                        requires_abort: false,
                        fatal: true,
                    },
                    "no transactional.id: pass one or set KAFKA_TRANSACTIONAL_ID",
                )
            })?;
        let mut rd = config.producer_client_config();
        rd.set("transactional.id", &id);
        let context = KeelClientContext::new("transactional-producer", config);
        let producer: KeelProducer = rd
            .create_with_context(context)
            .map_err(|e| tx_error("", e))?;
        let timeout = config.request_timeout();
        let init = producer.clone();
        tokio::task::spawn_blocking(move || init.init_transactions(timeout))
            .await
            .map_err(|e| KafkaProducerError::with_source("", ProducerErrorKind::Other, e))?
            .map_err(|e| tx_error("", e))?;
        tracing::info!(target: "keel::kafka", transactional_id = %id, "transactional producer ready");
        Ok(TransactionalPublisher {
            inner: Arc::new(TxInner {
                producer,
                lock: Arc::new(Mutex::new(())),
                metrics: client.shared.metrics.clone(),
                transactional_id: id,
                max_batch_size: config.max_batch_size(),
                timeout,
            }),
        })
    }

    /// The `transactional.id`.
    pub fn transactional_id(&self) -> &str {
        &self.inner.transactional_id
    }

    /// Waits for the previous transaction to finish, then begins one.
    pub async fn begin(&self) -> Result<Transaction, KafkaProducerError> {
        let guard = self.inner.lock.clone().lock_owned().await;
        self.inner
            .producer
            .begin_transaction()
            .map_err(|e| tx_error("", e))?;
        Ok(Transaction {
            inner: self.inner.clone(),
            guard: Some(guard),
            deliveries: Vec::new(),
            first_topic: None,
            started: Instant::now(),
        })
    }

    /// Publishes `events` to `topic` in one transaction: all are committed, or,
    /// on any failure, the transaction is aborted and none is visible to
    /// read-committed consumers.
    pub async fn publish_batch<T: Serialize>(
        &self,
        topic: &str,
        events: Vec<EventEnvelope<T>>,
    ) -> Result<BatchAck, KafkaProducerError> {
        let total = events.len();
        if total > self.inner.max_batch_size {
            self.inner.metrics.record_refused(total as u64);
            return Err(KafkaProducerError::new(
                topic,
                ProducerErrorKind::BatchTooLarge {
                    size: total,
                    max: self.inner.max_batch_size,
                },
            ));
        }
        self.inner.metrics.record_batch(total);
        let mut tx = self.begin().await?;
        if let Err(e) = tx.publish_all(topic, &events) {
            let _ = tx.abort().await;
            return Err(e);
        }
        let acks = tx.commit().await?;
        Ok(BatchAck {
            topic: Cow::Owned(topic.to_string()),
            acks,
        })
    }
}

impl<T: Serialize + Send + Sync + 'static> tower::Service<PublishBatchRequest<T>>
    for TransactionalPublisher
{
    type Response = BatchAck;
    type Error = KafkaProducerError;
    type Future = PublishBatchFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: PublishBatchRequest<T>) -> Self::Future {
        let this = self.clone();
        PublishBatchFuture::boxed(async move { this.publish_batch(&req.topic, req.events).await })
    }
}

/// One open transaction; see [`TransactionalPublisher::begin`].
///
/// Events are enqueued at once by [`publish`](Self::publish); [`commit`](Self::commit)
/// waits for every acknowledgement, then commits. Dropping it without commit or
/// abort aborts the transaction in the background.
pub struct Transaction {
    inner: Arc<TxInner>,
    guard: Option<OwnedMutexGuard<()>>,
    deliveries: Vec<(DeliveryFuture, Uuid)>,
    first_topic: Option<String>,
    started: Instant,
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("transactional_id", &self.inner.transactional_id)
            .field("events", &self.deliveries.len())
            .finish_non_exhaustive()
    }
}

impl Transaction {
    fn topic(&self) -> &str {
        self.first_topic.as_deref().unwrap_or("")
    }

    /// Enqueues one event in the transaction.
    pub fn publish<T: Serialize>(
        &mut self,
        topic: &str,
        event: &EventEnvelope<T>,
    ) -> Result<(), KafkaProducerError> {
        let prepared = Prepared::new(event, None).map_err(|e| {
            KafkaProducerError::with_source(topic, ProducerErrorKind::Serialization, e)
        })?;
        let delivery = prepared
            .send(&self.inner.producer, topic)
            .map_err(|(e, _)| KafkaProducerError::from_kafka(topic, e))?;
        if self.first_topic.is_none() {
            self.first_topic = Some(topic.to_string());
        }
        self.deliveries.push((delivery, event.event_id()));
        Ok(())
    }

    /// Enqueues every event, in order.
    pub fn publish_all<T: Serialize>(
        &mut self,
        topic: &str,
        events: &[EventEnvelope<T>],
    ) -> Result<(), KafkaProducerError> {
        events.iter().try_for_each(|e| self.publish(topic, e))
    }

    /// Waits for every acknowledgement and commits. If any event failed, or the
    /// commit fails, the transaction is aborted and the error returned.
    pub async fn commit(mut self) -> Result<Vec<PublishAck>, KafkaProducerError> {
        let topic = self.topic().to_string();
        let total = self.deliveries.len();
        let (acks, failure) = await_acks(std::mem::take(&mut self.deliveries), &topic).await;
        if let Some(e) = failure {
            let _ = self.finish(false).await;
            self.inner
                .metrics
                .record_call(0, total as u64, self.started, self.started.elapsed());
            return Err(e.with_batch(BatchOutcome {
                total,
                delivered: 0,
                failed: total,
            }));
        }
        match self.finish(true).await {
            Ok(()) => {
                self.inner.metrics.record_call(
                    total as u64,
                    0,
                    self.started,
                    self.started.elapsed(),
                );
                Ok(acks)
            }
            Err(e) => {
                self.inner.metrics.record_call(
                    0,
                    total as u64,
                    self.started,
                    self.started.elapsed(),
                );
                Err(e.with_batch(BatchOutcome {
                    total,
                    delivered: 0,
                    failed: total,
                }))
            }
        }
    }

    /// Aborts: none of the transaction's events become visible to read-committed
    /// consumers.
    pub async fn abort(mut self) -> Result<(), KafkaProducerError> {
        // Let outstanding deliveries settle so the abort does not race them.
        for (delivery, _) in std::mem::take(&mut self.deliveries) {
            let _ = delivery.await;
        }
        self.finish(false).await
    }

    /// Commits or aborts on a blocking thread, keeping the publisher's lock until
    /// done. A failed commit that requires it is followed by an abort.
    async fn finish(&mut self, commit: bool) -> Result<(), KafkaProducerError> {
        let guard = self.guard.take();
        let producer = self.inner.producer.clone();
        let timeout = self.inner.timeout;
        let topic = self.topic().to_string();
        let id = self.inner.transactional_id.clone();
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            let result = if commit {
                producer.commit_transaction(timeout)
            } else {
                producer.abort_transaction(timeout)
            };
            match result {
                Ok(()) => {
                    tracing::debug!(target: "keel::kafka", transactional_id = %id, commit, "transaction finished");
                    Ok(())
                }
                Err(e) => {
                    let err = KafkaProducerError::from_kafka(topic.as_str(), e);
                    if commit
                        && matches!(
                            err.kind(),
                            ProducerErrorKind::Transaction {
                                requires_abort: true,
                                ..
                            }
                        )
                    {
                        let _ = producer.abort_transaction(timeout);
                    }
                    tracing::warn!(target: "keel::kafka", transactional_id = %id, commit, error = %err, "transaction failed");
                    Err(err)
                }
            }
        })
        .await
        .map_err(|e| KafkaProducerError::with_source(self.topic(), ProducerErrorKind::Other, e))?
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        let producer = self.inner.producer.clone();
        let timeout = self.inner.timeout;
        let abort = move || {
            let _guard = guard;
            if let Err(e) = producer.abort_transaction(timeout) {
                tracing::warn!(target: "keel::kafka", error = %e, "abort of a dropped transaction failed");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(abort);
            }
            Err(_) => abort(),
        }
    }
}
