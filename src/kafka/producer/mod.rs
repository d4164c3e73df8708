//! Publishing events as Tower services.
//!
//! - [`PublishEvent`]: `Service<PublishRequest<T>>` (build one from
//!   `(topic, EventEnvelope<T>)` with `.into()`), one event, resolving to a [`PublishAck`] with the
//!   partition and offset once the broker acknowledges it.
//! - [`PublishBatch`]: `Service<PublishBatchRequest<T>>`, up to
//!   [`max_batch_size`](crate::kafka::config::KafkaConfig::max_batch_size) events
//!   (1,000 by default) to one topic, resolving to a [`BatchAck`] once every event
//!   is acknowledged. A larger batch is refused before any I/O.
//! - [`TransactionalPublisher`]: all-or-nothing batches (`transactional.id`,
//!   init / begin / commit / abort) for critical events.
//! - [`PublishMetrics`]: total published, total failed, average batch size, last
//!   published at, latency percentiles; shared by every service of one client.
//!
//! Get them from a [`KafkaClient`]:
//! [`publisher`](crate::kafka::client::KafkaClient::publisher),
//! [`batch_publisher`](crate::kafka::client::KafkaClient::batch_publisher),
//! [`transactional_publisher`](crate::kafka::client::KafkaClient::transactional_publisher).
//!
//! # Enqueue at once, acknowledge later
//!
//! `call` serializes the event and hands it to librdkafka's queue *before it
//! returns* (rdkafka's `send_result`); the returned future only waits for the
//! acknowledgement. So events are enqueued in call order — which is what keeps
//! per-key order — and awaiting many futures one by one costs nothing extra.
//! (rdkafka's `FutureProducer::send` is an `async fn` that enqueues only when
//! first polled; awaiting such futures one by one sends one message per
//! `linger.ms`.) A batch enqueues every event, then awaits every acknowledgement.
//!
//! # Bounded waits
//!
//! A publish resolves within the config's
//! [`delivery_timeout`](crate::kafka::config::KafkaConfig::delivery_timeout)
//! (librdkafka's `message.timeout.ms`, 30 s by default instead of librdkafka's
//! 300 s, or the value passed through `KAFKA_RDKAFKA_MESSAGE_TIMEOUT_MS`) rather
//! than waiting forever. A full local queue fails at once with `QueueFull`
//! (retryable, back-pressure: it does not count towards the publish breaker) for
//! single events; a batch waits for its own earlier events to drain, within the
//! delivery timeout, and is bounded as a whole by [`PublishBatch::with_timeout`].
//!
//! # Outcomes: delivered, failed, or unknown
//!
//! An acknowledgement that does not come in time does not mean the event was
//! lost: it may be in flight, or still in librdkafka's queue. Such a publish
//! fails with [`ProducerErrorKind::OutcomeUnknown`]
//! ([`KafkaProducerError::may_have_been_delivered`]), which keel's retry layer
//! does not retry; the error names the event
//! ([`KafkaProducerError::event_id`]). Resend only the same envelope (its event
//! id is the consumers' dedupe key; set your own with
//! [`EventEnvelope::with_event_id`](crate::kafka::envelope::EventEnvelope::with_event_id)).
//! A failed batch says what became of each event
//! ([`KafkaProducerError::batch`]: [`BatchOutcome`](crate::kafka::error::BatchOutcome),
//! one [`EventResult`] per event: delivered with partition and offset, failed
//! with its kind, not sent, or unknown), so the caller resends exactly the
//! events that are [`safe_to_resend`](crate::kafka::error::BatchOutcome::safe_to_resend).
//!
//! # Retries and ordering
//!
//! librdkafka retries failed produce requests itself (`retries`,
//! `retry.backoff.ms`), and the idempotent producer (on by default, with
//! `acks=all`) makes those retries safe: no duplicates, no reordering within a
//! partition. A publish error therefore means librdkafka has already retried
//! until the delivery timeout. That is why the default stack
//! ([`PublishStack`], explained in [`stack`]) has **no retry layer**: retrying on top would multiply
//! attempts, and a re-sent event would land *after* events of the same key
//! published meanwhile, breaking per-key order. If you add one anyway, classify
//! with [`ByError`](keel_layers::classify::ByError): message-too-large and
//! serialization errors are permanent and are never retried.
//!
//! # Trace context (feature `otel`)
//!
//! With keel's `otel` feature each publish runs in an OpenTelemetry PRODUCER
//! span `send <topic>` and writes its W3C `traceparent` into the record's headers
//! (never over one the caller set); consumers continue the trace. See
//! `keel::kafka::otel`.
//!
//! # Example
//!
//! ```no_run
//! use keel::kafka::client::KafkaClient;
//! use keel::kafka::config::KafkaConfig;
//! use keel::kafka::envelope::EventEnvelope;
//! use keel::kafka::producer::PublishRequest;
//! use tower::ServiceExt;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = KafkaClient::connect(KafkaConfig::from_env()?)?;
//! let event = EventEnvelope::new("user.created", serde_json::json!({"userId": "123"}))
//!     .with_key("123");
//! let ack = client
//!     .publisher()
//!     .oneshot(PublishRequest::new("user.events", event))
//!     .await?;
//! println!("stored at partition {} offset {}", ack.partition, ack.offset);
//! # Ok(()) }
//! ```

mod batch;
mod future;
mod metrics;
pub mod stack;
mod transactional;

pub use batch::{BatchAck, PublishBatch, PublishBatchFuture, PublishBatchRequest};
pub use future::PublishFuture;
pub use metrics::{LatencyPercentiles, PublishMetrics, PublishMetricsSnapshot};
pub use stack::{
    BATCH_BACKSTOP, IntoProducerError, KafkaOutage, ProducerErrors, ProducerErrorsFuture,
    ProducerErrorsLayer, PublishBatchStack, PublishEventStack, PublishFields, PublishStack,
    PublishStackBuilder, TopicRequest,
};
pub use transactional::{COMMIT_ATTEMPTS, Transaction, TransactionalPublisher};

use quanta::Instant;
use std::borrow::Cow;
use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use serde::Serialize;
use uuid::Uuid;

use crate::kafka::client::{ClientShared, KafkaClient, KeelProducer};
use crate::kafka::envelope::EventEnvelope;
use crate::kafka::error::{EventOutcome, EventResult, KafkaProducerError, ProducerErrorKind};

/// One event for one topic, optionally pinned to a partition.
///
/// The topic is a `Cow<'static, str>`: a literal (or a name leaked once at
/// start-up) costs nothing per call; a `String` is moved in.
#[derive(Clone, Debug, PartialEq)]
pub struct PublishRequest<T = serde_json::Value> {
    /// The topic.
    pub topic: Cow<'static, str>,
    /// The event.
    pub event: EventEnvelope<T>,
    /// A fixed partition; `None` lets the partitioner choose (by key).
    pub partition: Option<i32>,
}

impl<T> PublishRequest<T> {
    /// `event` for `topic`, partitioned by its key.
    pub fn new(topic: impl Into<Cow<'static, str>>, event: EventEnvelope<T>) -> Self {
        PublishRequest {
            topic: topic.into(),
            event,
            partition: None,
        }
    }

    /// Pins the event to `partition`.
    pub fn with_partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }
}

impl<T, S: Into<Cow<'static, str>>> From<(S, EventEnvelope<T>)> for PublishRequest<T> {
    fn from((topic, event): (S, EventEnvelope<T>)) -> Self {
        PublishRequest::new(topic, event)
    }
}

/// The broker's acknowledgement of one event.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishAck {
    /// The event's id.
    pub event_id: Uuid,
    /// The partition it was stored in.
    pub partition: i32,
    /// Its offset in that partition. librdkafka reports `-1001` (unknown) when
    /// the idempotent producer learns of the write only through the broker's
    /// duplicate-sequence answer to a retry.
    pub offset: i64,
}

/// What the publish services share: the client's producer, config, state, metrics.
#[derive(Clone)]
pub(crate) struct ProducerCore {
    pub(crate) shared: Arc<ClientShared>,
}

impl ProducerCore {
    pub(crate) fn new(client: &KafkaClient) -> Self {
        ProducerCore {
            shared: client.shared.clone(),
        }
    }

    pub(crate) fn metrics(&self) -> &PublishMetrics {
        &self.shared.metrics
    }

    /// The producer, or the error every publish answers when there is none.
    pub(crate) fn producer(&self, topic: &str) -> Result<&KeelProducer, KafkaProducerError> {
        let producer = self
            .shared
            .producer
            .as_ref()
            .ok_or_else(|| KafkaProducerError::disabled(topic))?;
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(KafkaProducerError::new(
                topic,
                ProducerErrorKind::ShuttingDown,
            ));
        }
        Ok(producer)
    }

    pub(crate) fn confirm_connected(&self) {
        if let Some(t) = &self.shared.producer_tracker {
            t.confirm_connected();
        }
    }
}

/// One event ready for librdkafka: serialized value, key, headers, timestamp.
pub(crate) struct Prepared {
    pub(crate) event_id: Uuid,
    value: Vec<u8>,
    key: Option<Vec<u8>>,
    headers: Option<OwnedHeaders>,
    timestamp_ms: i64,
    partition: Option<i32>,
}

impl Prepared {
    /// Serializes `event`; fails only if the payload cannot be serialized.
    pub(crate) fn new<T: Serialize>(
        event: &EventEnvelope<T>,
        partition: Option<i32>,
    ) -> Result<Self, serde_json::Error> {
        Ok(Prepared {
            event_id: event.event_id(),
            value: event.encode_value()?,
            key: event.key().map(<[u8]>::to_vec),
            headers: Some(current_headers(event)),
            timestamp_ms: event.timestamp_ms(),
            partition,
        })
    }

    /// Like [`Prepared::new`], taking the event so its key is moved, not copied,
    /// and encoding into a buffer of `capacity` bytes (the size of the previous
    /// event of a batch saves growing it step by step).
    pub(crate) fn from_event<T: Serialize>(
        mut event: EventEnvelope<T>,
        partition: Option<i32>,
        capacity: usize,
    ) -> Result<Self, serde_json::Error> {
        let mut value = Vec::with_capacity(capacity);
        event.encode_value_into(&mut value)?;
        Ok(Prepared {
            event_id: event.event_id(),
            value,
            headers: Some(current_headers(&event)),
            timestamp_ms: event.timestamp_ms(),
            key: event.take_key(),
            partition,
        })
    }

    /// Bytes of the encoded value.
    pub(crate) fn encoded_len(&self) -> usize {
        self.value.len()
    }

    /// Hands the event to librdkafka's queue and returns the acknowledgement
    /// future; on failure gives the event back (for a retry on `QueueFull`).
    /// The error is as large as the record, like rdkafka's own `send_result`.
    #[allow(clippy::result_large_err)]
    pub(crate) fn send(
        mut self,
        producer: &KeelProducer,
        topic: &str,
    ) -> Result<DeliveryFuture, (KafkaError, Self)> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
            .payload(&self.value[..])
            .timestamp(self.timestamp_ms);
        if let Some(h) = self.headers.take() {
            record = record.headers(h);
        }
        if let Some(key) = &self.key {
            record = record.key(&key[..]);
        }
        if let Some(p) = self.partition {
            record = record.partition(p);
        }
        match producer.send_result(record) {
            Ok(delivery) => Ok(delivery),
            Err((e, record)) => {
                let headers = record.headers;
                Err((e, Prepared { headers, ..self }))
            }
        }
    }
}

/// The event's Kafka headers; with `otel`, plus the trace context of the span
/// current at the call (batches and transactions: one context for the whole call).
fn current_headers<T>(event: &EventEnvelope<T>) -> OwnedHeaders {
    #[cfg(feature = "otel")]
    {
        crate::kafka::otel::inject(
            event.headers(),
            event.kafka_headers(),
            &tracing::Span::current(),
        )
    }
    #[cfg(not(feature = "otel"))]
    event.kafka_headers()
}

/// The OpenTelemetry PRODUCER span of one publish (feature `otel`); nothing
/// without the feature, so the default build pays nothing for it.
#[cfg(feature = "otel")]
pub(crate) type SendSpan = tracing::Span;
/// The OpenTelemetry PRODUCER span of one publish (feature `otel`); nothing
/// without the feature, so the default build pays nothing for it.
#[cfg(not(feature = "otel"))]
pub(crate) type SendSpan = ();

/// How long past librdkafka's delivery timeout the publish stack waits for a
/// call, and a bare [`PublishBatch`] for a whole batch: librdkafka's own, typed
/// delivery report comes first.
pub const PUBLISH_TIMEOUT_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The acknowledgement of one enqueued event as a result: delivered, failed (not
/// stored), or unknown (may have been stored).
pub(crate) fn delivery_result(
    result: <DeliveryFuture as Future>::Output,
    topic: &str,
    event_id: Uuid,
) -> Result<PublishAck, KafkaProducerError> {
    match result {
        Ok(Ok(d)) => Ok(PublishAck {
            event_id,
            partition: d.partition,
            offset: d.offset,
        }),
        Ok(Err((e, _))) => Err(KafkaProducerError::from_delivery(topic, e).with_event_id(event_id)),
        Err(_) => Err(lost_report(topic).with_event_id(event_id)),
    }
}

/// The delivery report never came (the producer was dropped with the event in
/// flight): the event may have been stored.
pub(crate) fn lost_report(topic: &str) -> KafkaProducerError {
    KafkaProducerError::with_source(
        topic,
        ProducerErrorKind::OutcomeUnknown,
        "the delivery report was lost (the producer was dropped)",
    )
}

fn outcome_of(e: &KafkaProducerError) -> EventOutcome {
    if e.kind().may_have_been_delivered() {
        EventOutcome::Unknown
    } else {
        EventOutcome::Failed(e.kind())
    }
}

/// Awaits every acknowledgement, in order, until `deadline` (when given; the
/// events not acknowledged by then are [`EventOutcome::Unknown`]). All delivered:
/// their acks. Otherwise the first failure and every event's result.
///
/// One timer serves the whole batch, and the per-event results are built only
/// once something failed, so a batch that succeeds costs what it did before.
pub(crate) async fn await_acks(
    deliveries: impl IntoIterator<Item = (DeliveryFuture, Uuid)>,
    topic: &str,
    deadline: Option<tokio::time::Instant>,
) -> Result<Vec<PublishAck>, (KafkaProducerError, Vec<EventResult>)> {
    let deliveries = deliveries.into_iter();
    let mut acks = Vec::with_capacity(deliveries.size_hint().0);
    let mut failed: Option<(KafkaProducerError, Vec<EventResult>)> = None;
    let sleep = deadline.map(tokio::time::sleep_until);
    tokio::pin!(sleep);
    let mut expired = false;
    for (mut delivery, event_id) in deliveries {
        let result = if expired {
            None
        } else {
            std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = std::pin::Pin::new(&mut delivery).poll(cx) {
                    return Poll::Ready(Some(r));
                }
                match sleep.as_mut().as_pin_mut() {
                    Some(s) => s.poll(cx).map(|()| None),
                    None => Poll::Pending,
                }
            })
            .await
        };
        let result = match result {
            Some(r) => delivery_result(r, topic, event_id),
            None => {
                expired = true;
                Err(KafkaProducerError::with_source(
                    topic,
                    ProducerErrorKind::OutcomeUnknown,
                    "the batch's time ran out before the broker acknowledged every event; \
                     the rest may still be delivered",
                ))
            }
        };
        match (result, &mut failed) {
            (Ok(ack), None) => acks.push(ack),
            (Ok(ack), Some((_, results))) => results.push(ack.into()),
            (Err(e), Some((_, results))) => results.push(EventResult {
                event_id,
                outcome: outcome_of(&e),
            }),
            (Err(e), None) => {
                let mut results: Vec<EventResult> = Vec::with_capacity(acks.capacity());
                results.extend(acks.drain(..).map(EventResult::from));
                results.push(EventResult {
                    event_id,
                    outcome: outcome_of(&e),
                });
                failed = Some((e, results));
            }
        }
    }
    match failed {
        None => Ok(acks),
        Some(f) => Err(f),
    }
}

impl From<PublishAck> for EventResult {
    fn from(ack: PublishAck) -> Self {
        EventResult {
            event_id: ack.event_id,
            outcome: EventOutcome::Delivered {
                partition: ack.partition,
                offset: ack.offset,
            },
        }
    }
}

pub(crate) fn is_queue_full(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull)
}

/// Publishes one event and resolves on the broker's acknowledgement.
///
/// `call` enqueues the event at once; see the [module docs](self). `poll_ready`
/// is always ready (librdkafka's queue is the buffer; a full queue is a
/// `QueueFull` error). Cloning is cheap and shares the client's producer and
/// metrics.
#[derive(Clone)]
pub struct PublishEvent {
    core: ProducerCore,
}

impl std::fmt::Debug for PublishEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishEvent").finish_non_exhaustive()
    }
}

impl PublishEvent {
    /// The publish service of `client`.
    pub fn new(client: &KafkaClient) -> Self {
        PublishEvent {
            core: ProducerCore::new(client),
        }
    }

    /// The metrics shared with every publish service of the client.
    pub fn metrics(&self) -> PublishMetricsSnapshot {
        self.core.metrics().snapshot()
    }

    fn publish<T: Serialize>(&self, req: PublishRequest<T>) -> PublishFuture {
        let started = Instant::now();
        let event_id = req.event.event_id();
        let topic = req.topic;
        #[cfg(feature = "otel")]
        let span: SendSpan = crate::kafka::otel::send_span(&topic, req.event.key());
        #[cfg(not(feature = "otel"))]
        let span: SendSpan = ();
        let producer = match self.core.producer(&topic) {
            Ok(p) => p,
            Err(e) => {
                return PublishFuture::failed(
                    e.with_event_id(event_id),
                    self.core.clone(),
                    started,
                    span,
                );
            }
        };
        #[cfg(feature = "otel")]
        let headers =
            crate::kafka::otel::inject(req.event.headers(), req.event.kafka_headers(), &span);
        #[cfg(not(feature = "otel"))]
        let headers = req.event.kafka_headers();
        match send_encoded(producer, &topic, &req.event, headers, req.partition) {
            Ok(delivery) => {
                PublishFuture::waiting(delivery, topic, event_id, self.core.clone(), started, span)
            }
            Err(SendError::Encode(e)) => PublishFuture::failed(
                KafkaProducerError::with_source(topic, ProducerErrorKind::Serialization, e)
                    .with_event_id(event_id),
                self.core.clone(),
                started,
                span,
            ),
            Err(SendError::Enqueue(e)) => PublishFuture::failed(
                KafkaProducerError::from_kafka(topic, e).with_event_id(event_id),
                self.core.clone(),
                started,
                span,
            ),
        }
    }
}

/// Why [`send_encoded`] failed.
enum SendError {
    Encode(serde_json::Error),
    Enqueue(KafkaError),
}

/// Largest encoding buffer a thread keeps between publishes.
const MAX_KEPT_BUFFER: usize = 64 * 1024;

thread_local! {
    // librdkafka copies the value when it enqueues, so one buffer per thread
    // serves every single-event publish: no allocation for the value.
    static ENCODE_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Encodes `event` into this thread's buffer and enqueues it with `headers`.
fn send_encoded<T: Serialize>(
    producer: &KeelProducer,
    topic: &str,
    event: &EventEnvelope<T>,
    headers: OwnedHeaders,
    partition: Option<i32>,
) -> Result<DeliveryFuture, SendError> {
    ENCODE_BUFFER.with(|cell| {
        // A payload whose `Serialize` publishes again finds the buffer taken.
        let mut kept = cell.try_borrow_mut().ok();
        let mut own = Vec::new();
        let buf: &mut Vec<u8> = kept.as_deref_mut().unwrap_or(&mut own);
        buf.clear();
        let result = match event.encode_value_into(buf) {
            Err(e) => Err(SendError::Encode(e)),
            Ok(()) => {
                let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
                    .payload(&buf[..])
                    .timestamp(event.timestamp_ms())
                    .headers(headers);
                if let Some(key) = event.key() {
                    record = record.key(key);
                }
                if let Some(p) = partition {
                    record = record.partition(p);
                }
                producer
                    .send_result(record)
                    .map_err(|(e, _)| SendError::Enqueue(e))
            }
        };
        if buf.capacity() > MAX_KEPT_BUFFER {
            *buf = Vec::new();
        }
        result
    })
}

impl<T: Serialize> tower::Service<PublishRequest<T>> for PublishEvent {
    type Response = PublishAck;
    type Error = KafkaProducerError;
    type Future = PublishFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: PublishRequest<T>) -> Self::Future {
        self.publish(req)
    }
}

impl KafkaClient {
    /// The single-event publish service (no layers; see [`PublishStack`] for the
    /// default stack).
    pub fn publisher(&self) -> PublishEvent {
        PublishEvent::new(self)
    }

    /// The batch publish service (no layers).
    pub fn batch_publisher(&self) -> PublishBatch {
        PublishBatch::new(self)
    }

    /// The publish metrics of this client.
    pub fn publish_metrics(&self) -> PublishMetricsSnapshot {
        self.shared.metrics.snapshot()
    }

    /// A transactional publisher with `transactional_id` (or the config's
    /// `KAFKA_TRANSACTIONAL_ID` when `None`), its transactions initialised.
    pub async fn transactional_publisher(
        &self,
        transactional_id: Option<&str>,
    ) -> Result<TransactionalPublisher, KafkaProducerError> {
        TransactionalPublisher::new(self, transactional_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::config::KafkaConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;
    use tower::ServiceExt;

    /// A payload whose first serialization publishes another event on the same
    /// thread, while this thread's encoding buffer is in use.
    struct Reentrant {
        publisher: PublishEvent,
        armed: AtomicBool,
        inner: Mutex<Option<PublishFuture>>,
    }

    impl Serialize for Reentrant {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            if self.armed.swap(false, Ordering::Relaxed) {
                let inner = tower::Service::call(
                    &mut self.publisher.clone(),
                    PublishRequest::new("t", EventEnvelope::new("inner", serde_json::json!(1))),
                );
                *self.inner.lock().unwrap() = Some(inner);
            }
            s.serialize_str("outer")
        }
    }

    #[tokio::test]
    async fn a_payload_that_publishes_while_being_encoded_gets_its_own_buffer() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 1, 1).expect("mock topic");
        let config = KafkaConfig::builder()
            .brokers([cluster.bootstrap_servers()])
            .build()
            .unwrap();
        let client = KafkaClient::connect(config).unwrap();
        let payload = Reentrant {
            publisher: client.publisher(),
            armed: AtomicBool::new(true),
            inner: Mutex::new(None),
        };
        let outer = EventEnvelope::new("outer", &payload);
        let copy = outer.clone();
        let ack = client
            .publisher()
            .oneshot(PublishRequest::new("t", outer))
            .await
            .expect("outer event acknowledged");
        let inner = payload.inner.lock().unwrap().take().expect("inner publish");
        let inner_ack = inner.await.expect("inner event acknowledged");
        // The inner event was enqueued first, while the outer one was encoding.
        assert_eq!((inner_ack.offset, ack.offset), (0, 1));

        // Neither value was written over by the other.
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "reader")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        let mut values = Vec::new();
        while values.len() < 2 {
            match consumer.poll(Duration::from_secs(10)) {
                Some(Ok(m)) => values.push(m.payload().unwrap_or_default().to_vec()),
                Some(Err(e)) => panic!("reading the mock topic: {e}"),
                None => panic!("the mock topic holds {} of 2 events", values.len()),
            }
        }
        let inner_value: serde_json::Value = serde_json::from_slice(&values[0]).unwrap();
        assert_eq!(inner_value["eventType"], "inner");
        assert_eq!(inner_value["payload"], 1);
        assert_eq!(values[1], copy.encode_value().unwrap());
    }
}
