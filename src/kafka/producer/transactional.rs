//! All-or-nothing publishing with Kafka transactions.
//!
//! What happens when a step fails: see [`TransactionalPublisher`].

use quanta::Instant;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, Producer};
use serde::Serialize;
use tokio::sync::{Mutex, OwnedMutexGuard};
use uuid::Uuid;

use super::batch::{BatchAck, PublishBatchFuture, PublishBatchRequest};
use super::{Prepared, PublishAck, PublishMetrics, await_acks};
use crate::kafka::client::{KafkaClient, KeelClientContext, KeelProducer};
use crate::kafka::config::KafkaConfig;
use crate::kafka::envelope::EventEnvelope;
use crate::kafka::error::{
    BatchOutcome, EventOutcome, EventResult, KafkaProducerError, ProducerErrorKind,
};

/// How many times a commit (or an abort) that fails with a retriable error,
/// such as a timeout, is called before its outcome is reported as unknown. Each
/// call waits at most the config's request timeout.
pub const COMMIT_ATTEMPTS: u32 = 3;

struct TxInner {
    state: Arc<Mutex<TxState>>,
    metrics: Arc<PublishMetrics>,
    transactional_id: String,
    max_batch_size: usize,
    timeout: Duration,
    config: KafkaConfig,
}

/// The producer and what it needs before its next transaction. Held by the
/// open transaction (one at a time).
struct TxState {
    producer: KeelProducer,
    repair: Repair,
}

/// What a failed transaction left to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repair {
    /// Nothing: a transaction may begin.
    None,
    /// A commit whose outcome is unknown: call commit again to finish it.
    FinishCommit,
    /// An abort that failed: abort again.
    Abort,
    /// A fatal error: create the producer again.
    Recreate,
    /// Fenced by a newer producer with the same id: unusable for good.
    Fenced,
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
/// # When a step fails
///
/// librdkafka says what a failed transaction step needs
/// (`rd_kafka_error_is_retriable`, `_txn_requires_abort`, `_is_fatal`), and the
/// publisher follows it so that it stays usable:
///
/// - **commit timed out / retriable**: the commit goes on inside librdkafka and
///   may land. It is called again, up to [`COMMIT_ATTEMPTS`] times; if it is still
///   unresolved the batch fails with
///   [`OutcomeUnknown`](ProducerErrorKind::OutcomeUnknown) and every event
///   [`Unknown`](EventOutcome::Unknown) (never "0 delivered"), and the next
///   [`begin`](TransactionalPublisher::begin) finishes that commit first (a new
///   transaction cannot begin before it).
/// - **abortable**: the transaction is aborted (retried like the commit); the
///   events are [`Failed`](EventOutcome::Failed). An abort that fails is
///   reported ([`KafkaProducerError::abort_error`]), not dropped, and is redone
///   before the next transaction.
/// - **fatal**: the producer is unusable; the next transaction recreates it
///   (same `transactional.id`, transactions initialised again). A producer
///   *fenced* by a newer one with the same id is not recreated (that would fence
///   the newer one in turn): every later call fails with
///   [`Fatal`](ProducerErrorKind::Fatal); build a new publisher to take over.
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

fn tx_error(topic: &str, e: KafkaError) -> KafkaProducerError {
    KafkaProducerError::from_kafka(topic, e)
}

/// What librdkafka says a failed transaction step needs.
#[derive(Clone, Copy, Debug, Default)]
struct Needs {
    retriable: bool,
    abort: bool,
    fatal: bool,
    fenced: bool,
}

fn needs(e: &KafkaError) -> Needs {
    let fenced = matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
    );
    match e {
        KafkaError::Transaction(r) => Needs {
            retriable: r.is_retriable(),
            abort: r.txn_requires_abort(),
            fatal: r.is_fatal(),
            fenced,
        },
        // rdkafka flushes before committing: nothing is committed yet, try again.
        KafkaError::Flush(_) => Needs {
            retriable: true,
            ..Needs::default()
        },
        _ => Needs {
            fatal: fenced,
            fenced,
            ..Needs::default()
        },
    }
}

/// Creates the transactional producer and initialises its transactions
/// (fencing any older producer with the same id). Blocking.
fn create_producer(
    config: &KafkaConfig,
    id: &str,
    timeout: Duration,
) -> Result<KeelProducer, KafkaProducerError> {
    let mut rd = config.producer_client_config();
    rd.set("transactional.id", id);
    let context = KeelClientContext::new("transactional-producer", config);
    let producer: KeelProducer = rd
        .create_with_context(context)
        .map_err(|e| tx_error("", e))?;
    producer
        .init_transactions(timeout)
        .map_err(|e| tx_error("", e))?;
    Ok(producer)
}

/// Aborts, calling again on retriable errors; the error of the last call.
/// Leaves in `state.repair` what remains to do. Blocking.
fn abort_blocking(
    state: &mut TxState,
    timeout: Duration,
    topic: &str,
) -> Result<(), KafkaProducerError> {
    let mut last = None;
    for _ in 0..COMMIT_ATTEMPTS {
        match state.producer.abort_transaction(timeout) {
            Ok(()) => {
                state.repair = Repair::None;
                return Ok(());
            }
            Err(e) => {
                let n = needs(&e);
                last = Some(tx_error(topic, e));
                if n.fatal {
                    state.repair = if n.fenced {
                        Repair::Fenced
                    } else {
                        Repair::Recreate
                    };
                    break;
                }
                state.repair = Repair::Abort;
                if !n.retriable {
                    break;
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| KafkaProducerError::new(topic, ProducerErrorKind::Other)))
}

/// How a commit ended.
enum Committed {
    /// Committed: the events are visible.
    Yes,
    /// Not committed (aborted, or refused): the error, with the abort's if it failed.
    No(KafkaProducerError),
    /// May have been committed: the error.
    Unknown(KafkaProducerError),
}

/// Commits, calling again on retriable errors, aborting when librdkafka
/// requires it. Leaves in `state.repair` what remains to do. Blocking.
fn commit_blocking(state: &mut TxState, timeout: Duration, topic: &str) -> Committed {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let e = match state.producer.commit_transaction(timeout) {
            Ok(()) => {
                state.repair = Repair::None;
                return Committed::Yes;
            }
            Err(e) => e,
        };
        let n = needs(&e);
        let err = tx_error(topic, e);
        if n.fatal {
            // The producer died during the commit: it may have landed.
            state.repair = if n.fenced {
                Repair::Fenced
            } else {
                Repair::Recreate
            };
            return Committed::Unknown(unknown(topic, err));
        }
        if n.abort || !n.retriable {
            // Refused: abort, as librdkafka requires, so the producer goes on.
            return match abort_blocking(state, timeout, topic) {
                Ok(()) => Committed::No(err),
                Err(abort) => Committed::No(err.with_abort_error(abort)),
            };
        }
        if attempt >= COMMIT_ATTEMPTS {
            state.repair = Repair::FinishCommit;
            return Committed::Unknown(unknown(topic, err));
        }
        tracing::debug!(target: "keel::kafka", attempt, error = %err, "commit not finished yet; calling it again");
    }
}

/// "The commit may have landed", caused by `err`.
fn unknown(topic: &str, err: KafkaProducerError) -> KafkaProducerError {
    KafkaProducerError::with_source(topic, ProducerErrorKind::OutcomeUnknown, err)
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
        let timeout = config.request_timeout();
        let (c, i) = (config.clone(), id.clone());
        let producer = tokio::task::spawn_blocking(move || create_producer(&c, &i, timeout))
            .await
            .map_err(|e| KafkaProducerError::with_source("", ProducerErrorKind::Other, e))??;
        tracing::info!(target: "keel::kafka", transactional_id = %id, "transactional producer ready");
        Ok(TransactionalPublisher {
            inner: Arc::new(TxInner {
                state: Arc::new(Mutex::new(TxState {
                    producer,
                    repair: Repair::None,
                })),
                metrics: client.shared.metrics.clone(),
                transactional_id: id,
                max_batch_size: config.max_batch_size(),
                timeout,
                config: config.clone(),
            }),
        })
    }

    /// The `transactional.id`.
    pub fn transactional_id(&self) -> &str {
        &self.inner.transactional_id
    }

    /// Waits for the previous transaction to finish, repairs what it left (a
    /// commit to finish, an abort to redo, a producer to recreate; see the
    /// [type docs](TransactionalPublisher)), then begins one.
    pub async fn begin(&self) -> Result<Transaction, KafkaProducerError> {
        let mut guard = self.inner.state.clone().lock_owned().await;
        if guard.repair != Repair::None {
            guard = self.repair(guard).await?;
        }
        guard
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

    /// Does what the last transaction left to do, on a blocking thread.
    async fn repair(
        &self,
        mut guard: OwnedMutexGuard<TxState>,
    ) -> Result<OwnedMutexGuard<TxState>, KafkaProducerError> {
        let timeout = self.inner.timeout;
        let config = self.inner.config.clone();
        let id = self.inner.transactional_id.clone();
        tokio::task::spawn_blocking(move || {
            let state = &mut *guard;
            let result = match state.repair {
                Repair::None => Ok(()),
                Repair::FinishCommit => match commit_blocking(state, timeout, "") {
                    Committed::Yes => {
                        tracing::warn!(target: "keel::kafka", transactional_id = %id, "the earlier transaction whose commit outcome was unknown is committed");
                        Ok(())
                    }
                    Committed::No(e) => {
                        tracing::warn!(target: "keel::kafka", transactional_id = %id, error = %e, "the earlier transaction whose commit outcome was unknown is aborted");
                        if state.repair == Repair::None { Ok(()) } else { Err(e) }
                    }
                    Committed::Unknown(e) => Err(e),
                },
                Repair::Abort => abort_blocking(state, timeout, ""),
                Repair::Recreate => create_producer(&config, &id, timeout).map(|p| {
                    tracing::warn!(target: "keel::kafka", transactional_id = %id, "transactional producer recreated after a fatal error");
                    state.producer = p;
                    state.repair = Repair::None;
                }),
                Repair::Fenced => Err(KafkaProducerError::with_source(
                    "",
                    ProducerErrorKind::Fatal,
                    "fenced by a newer producer with the same transactional.id; \
                     create a new TransactionalPublisher to take over",
                )),
            };
            result.map(|()| guard)
        })
        .await
        .map_err(|e| KafkaProducerError::with_source("", ProducerErrorKind::Other, e))?
    }

    /// Publishes `events` to `topic` in one transaction: all are committed, or,
    /// on any failure, the transaction is aborted and none is visible to
    /// read-committed consumers. The error's [`batch`](KafkaProducerError::batch)
    /// says what became of each event: all failed (aborted), or all unknown when
    /// the commit may have landed.
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
        let mut tx = match self.begin().await {
            Ok(tx) => tx,
            Err(e) => {
                let ids = events.iter().map(EventEnvelope::event_id);
                return Err(e.with_batch(BatchOutcome::all(ids, EventOutcome::NotSent)));
            }
        };
        if let Err(e) = tx.publish_all(topic, &events) {
            // Nothing becomes visible: the enqueued events are aborted, the rest unsent.
            let enqueued = tx.deliveries.len();
            let kind = aborted_kind(&e);
            let results = events
                .iter()
                .enumerate()
                .map(|(i, ev)| EventResult {
                    event_id: ev.event_id(),
                    outcome: if i <= enqueued {
                        EventOutcome::Failed(kind)
                    } else {
                        EventOutcome::NotSent
                    },
                })
                .collect();
            let e = e.with_batch(BatchOutcome::from_events(results));
            return Err(match tx.abort().await {
                Ok(()) => e,
                Err(abort) => e.with_abort_error(abort),
            });
        }
        let acks = tx.commit().await?;
        Ok(BatchAck {
            topic: Cow::Owned(topic.to_string()),
            acks,
        })
    }
}

/// The kind an aborted transaction's events failed with: what made it abort
/// (an event that was not stored is not "unknown" once its transaction is aborted).
fn aborted_kind(e: &KafkaProducerError) -> ProducerErrorKind {
    match e.kind() {
        ProducerErrorKind::OutcomeUnknown => ProducerErrorKind::Timeout,
        kind => kind,
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
    guard: Option<OwnedMutexGuard<TxState>>,
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
        let Some(state) = self.guard.as_ref() else {
            return Err(KafkaProducerError::new(topic, ProducerErrorKind::Other));
        };
        let prepared = Prepared::new(event, None).map_err(|e| {
            KafkaProducerError::with_source(topic, ProducerErrorKind::Serialization, e)
                .with_event_id(event.event_id())
        })?;
        let delivery = prepared.send(&state.producer, topic).map_err(|(e, _)| {
            KafkaProducerError::from_kafka(topic, e).with_event_id(event.event_id())
        })?;
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

    /// Waits for every acknowledgement and commits.
    ///
    /// If an event failed, the transaction is aborted and the error says so,
    /// every event [`Failed`](EventOutcome::Failed). If the commit fails, it is
    /// retried or the transaction aborted as librdkafka requires (see the
    /// [`TransactionalPublisher`] docs); when the commit may have landed the error is
    /// [`OutcomeUnknown`](ProducerErrorKind::OutcomeUnknown) and every event
    /// [`Unknown`](EventOutcome::Unknown). An abort that fails too is in
    /// [`abort_error`](KafkaProducerError::abort_error).
    pub async fn commit(mut self) -> Result<Vec<PublishAck>, KafkaProducerError> {
        let topic = self.topic().to_string();
        let deliveries = std::mem::take(&mut self.deliveries);
        let total = deliveries.len();
        let ids: Vec<Uuid> = deliveries.iter().map(|(_, id)| *id).collect();
        let result = match await_acks(deliveries, &topic, None).await {
            Err((e, _)) => {
                let kind = aborted_kind(&e);
                let e = e.with_batch(BatchOutcome::all(ids, EventOutcome::Failed(kind)));
                match self.finish_abort().await {
                    Ok(()) => Err(e),
                    Err(abort) => Err(e.with_abort_error(abort)),
                }
            }
            Ok(acks) => match self.finish(commit_blocking).await {
                Ok(Committed::Yes) => Ok(acks),
                Ok(Committed::No(e)) => {
                    let kind = e.kind();
                    Err(e.with_batch(BatchOutcome::all(ids, EventOutcome::Failed(kind))))
                }
                Ok(Committed::Unknown(e)) => {
                    Err(e.with_batch(BatchOutcome::all(ids, EventOutcome::Unknown)))
                }
                Err(e) => Err(e.with_batch(BatchOutcome::all(ids, EventOutcome::Unknown))),
            },
        };
        let elapsed = self.started.elapsed();
        match &result {
            Ok(_) => self
                .inner
                .metrics
                .record_call(total as u64, 0, self.started, elapsed),
            Err(e) => {
                self.inner
                    .metrics
                    .record_call(0, total as u64, self.started, elapsed);
                tracing::warn!(
                    target: "keel::kafka",
                    transactional_id = %self.inner.transactional_id,
                    events = total,
                    outcome_unknown = e.may_have_been_delivered(),
                    error = %e,
                    "transaction failed"
                );
            }
        }
        result
    }

    /// Aborts: none of the transaction's events become visible to read-committed
    /// consumers. A failed abort is redone before the publisher's next transaction.
    pub async fn abort(mut self) -> Result<(), KafkaProducerError> {
        // Let outstanding deliveries settle so the abort does not race them.
        for (delivery, _) in std::mem::take(&mut self.deliveries) {
            let _ = delivery.await;
        }
        self.finish_abort().await
    }

    /// Runs `step` (a commit or an abort) on a blocking thread with the
    /// publisher's state, keeping its lock until done. `Err` only when the
    /// blocking task is lost.
    async fn finish<R: Send + 'static>(
        &mut self,
        step: fn(&mut TxState, Duration, &str) -> R,
    ) -> Result<R, KafkaProducerError> {
        let Some(mut guard) = self.guard.take() else {
            return Err(KafkaProducerError::new(
                self.topic(),
                ProducerErrorKind::Other,
            ));
        };
        let timeout = self.inner.timeout;
        let topic = self.topic().to_string();
        tokio::task::spawn_blocking(move || step(&mut guard, timeout, &topic))
            .await
            .map_err(|e| KafkaProducerError::with_source(self.topic(), ProducerErrorKind::Other, e))
    }

    /// Aborts on a blocking thread; see [`finish`](Self::finish).
    async fn finish_abort(&mut self) -> Result<(), KafkaProducerError> {
        let result = self.finish(abort_blocking).await.and_then(|r| r);
        match &result {
            Ok(()) => {
                tracing::debug!(target: "keel::kafka", transactional_id = %self.inner.transactional_id, "transaction aborted")
            }
            Err(e) => {
                tracing::warn!(target: "keel::kafka", transactional_id = %self.inner.transactional_id, error = %e, "transaction abort failed; it is redone before the next transaction")
            }
        }
        result
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else {
            return;
        };
        let timeout = self.inner.timeout;
        let mut abort = move || {
            if let Err(e) = abort_blocking(&mut guard, timeout, "") {
                tracing::warn!(target: "keel::kafka", error = %e, "abort of a dropped transaction failed; it is redone before the next transaction");
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
