//! [`Kafka`]: the facade — `kafka.publish(topic, event)`, `kafka.publish_json(..)`
//! and `kafka.consumer(group).topics([..]).on::<T>(..).start()` — over the same
//! Tower services and layers as the rest of keel.
//!
//! keel's Kafka side is a stack of services ([`PublishStack`], the consumer
//! runtime, [`HandlerRegistry`](crate::kafka::registry::HandlerRegistry)); this
//! is the short way in, like [`S3`](crate::s3::S3) for S3:
//!
//! - **Publishing** goes through the default [`PublishStack`] (logging, metrics,
//!   circuit breaker, timeout; no retry layer, librdkafka retries) built once
//!   here: [`publish`](Kafka::publish) an envelope,
//!   [`publish_batch`](Kafka::publish_batch) up to 1,000 of them,
//!   [`publish_json`](Kafka::publish_json) a plain JSON value (no envelope) for
//!   consumers that are not keel. [`event_service`](Kafka::event_service) and
//!   [`batch_service`](Kafka::batch_service) hand out the services themselves.
//! - **Consuming** ([`ConsumerBuilder`]) routes each record by topic first
//!   ([`on_topic`](ConsumerBuilder::on_topic), Karafka's way: any producer's
//!   records) and then by keel event type ([`on`](ConsumerBuilder::on), typed).
//!   Records need not be keel envelopes
//!   ([`require_envelope(false)`](KafkaConsumerBuilder::require_envelope)):
//!   handlers decode them with a [`Decoder`]. A record that cannot be decoded
//!   is a permanent failure of class `decode`: dead-lettered at once, never
//!   retried. Retries, the DLQ, commits, pause/resume and shutdown are the
//!   [consumer runtime's](crate::kafka::consumer), with its retry preset
//!   ([`RetryPolicy::kafka`](keel_layers::retry::RetryPolicy::kafka): no retry
//!   budget). The router is a `tower::Service<Record>`:
//!   [`layer`](ConsumerBuilder::layer) stacks any layer on it, and
//!   [`service`](ConsumerBuilder::service) hands it out.
//! - **Batch handlers** ([`on_batch`](ConsumerBuilder::on_batch)): see
//!   [`batch`](crate::kafka::consumer::batch).
//!
//! Cloning a `Kafka` is cheap: clones share the client, the publish stack (one
//! circuit breaker) and its metrics.
//!
//! ```no_run
//! use keel::kafka::{Kafka, KafkaConfig, EventEnvelope};
//! use keel::kafka::consumer::{BoxError, Record};
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct OrderCreated { id: u64 }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let kafka = Kafka::connect(KafkaConfig::from_env()?)?;
//! kafka.publish("orders", EventEnvelope::new("order.created", OrderCreated { id: 1 })).await?;
//!
//! let consumer = kafka
//!     .consumer("billing")
//!     .topics(["orders"])
//!     .on::<OrderCreated, _, _, _>("order.created", |order, _record| async move {
//!         println!("order {}", order.id);
//!         Ok::<_, BoxError>(())
//!     })
//!     .on_topic("clicks", |record: Record| async move {
//!         let text = record.text()?; // not UTF-8: dead-lettered, class `decode`
//!         println!("click {text}");
//!         Ok::<_, BoxError>(())
//!     })
//!     .start()?;
//! // ...
//! consumer.shutdown(Duration::from_secs(10)).await?;
//! # Ok(()) }
//! ```

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready};
use rdkafka::producer::FutureRecord;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tower::util::{BoxCloneSyncService, Oneshot};
use tower::{Layer, Service, ServiceExt};

use super::client::KafkaClient;
use super::config::KafkaConfig;
use super::consumer::batch::{BatchHandler, BatchOptions, BatchResult, BatchRoutes};
use super::consumer::decode::{Decoder, RecordDecodeError, json_reason};
use super::consumer::{
    BoxError, ConsumerError, HandlerError, KafkaConsumer, KafkaConsumerBuilder, Record,
    StartOptions,
};
use super::envelope::EventEnvelope;
use super::error::{KafkaClientError, KafkaProducerError, ProducerErrorKind};
use super::producer::{
    BatchAck, PublishAck, PublishBatchRequest, PublishBatchStack, PublishEventStack,
    PublishRequest, PublishStack,
};

/// A handler as the router stores it: a type-erased record service.
pub type RecordHandler = BoxCloneSyncService<Record, (), BoxError>;

/// The Kafka facade; see the [module docs](self).
#[derive(Clone)]
pub struct Kafka {
    client: KafkaClient,
    stack: PublishStack,
    events: PublishEventStack,
    batches: PublishBatchStack,
}

impl fmt::Debug for Kafka {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kafka")
            .field("stack", &self.stack)
            .finish_non_exhaustive()
    }
}

/// Where a [`Kafka::publish_json`] record was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RecordAck {
    /// The partition.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
}

impl Kafka {
    /// Connects a [`KafkaClient`] with `config` and builds the default stacks.
    /// Must be called inside a tokio runtime (as [`KafkaClient::connect`]).
    pub fn connect(config: KafkaConfig) -> Result<Self, KafkaClientError> {
        Ok(Self::new(&KafkaClient::connect(config)?))
    }

    /// The facade over an existing client, with the default [`PublishStack`].
    pub fn new(client: &KafkaClient) -> Self {
        Self::with_stack(client, PublishStack::new(client))
    }

    /// The facade over `client` publishing through `stack` (a
    /// [`PublishStack::builder`] with other breaker or timeout settings).
    pub fn with_stack(client: &KafkaClient, stack: PublishStack) -> Self {
        Kafka {
            client: client.clone(),
            events: stack.event_service(),
            batches: stack.batch_service(),
            stack,
        }
    }

    /// The client (health checks, `disconnect`).
    pub fn client(&self) -> &KafkaClient {
        &self.client
    }

    /// The publish stack (its circuit breaker and metrics).
    pub fn publish_stack(&self) -> &PublishStack {
        &self.stack
    }

    /// The single-event publish service the facade calls: stack your own layers
    /// on it with `ServiceBuilder`.
    pub fn event_service(&self) -> PublishEventStack {
        self.events.clone()
    }

    /// The batch publish service the facade calls.
    pub fn batch_service(&self) -> PublishBatchStack {
        self.batches.clone()
    }

    /// Publishes one envelope to `topic` (partitioned by its key), through the
    /// publish stack. Resolves with the broker's acknowledgement.
    pub async fn publish<T: Serialize>(
        &self,
        topic: impl Into<Cow<'static, str>>,
        event: EventEnvelope<T>,
    ) -> Result<PublishAck, KafkaProducerError> {
        self.events
            .clone()
            .oneshot(PublishRequest::new(topic, event))
            .await
    }

    /// Publishes up to `max_batch_size` (1,000) envelopes to `topic`, through the
    /// batch stack: a larger batch is refused before any I/O; a failure says
    /// which events were delivered, failed or are unknown.
    pub async fn publish_batch<T: Serialize>(
        &self,
        topic: impl Into<Cow<'static, str>>,
        events: Vec<EventEnvelope<T>>,
    ) -> Result<BatchAck, KafkaProducerError> {
        self.batches
            .clone()
            .oneshot(PublishBatchRequest::new(topic, events))
            .await
    }

    /// Publishes `value` as a plain JSON record with `key`: no envelope and no
    /// keel headers, what services that are not keel expect (read it back with
    /// [`Record::json`]). Goes through the client's idempotent producer (its
    /// retries, its delivery timeout) bounded by the stack's timeout, but not
    /// through the stack's layers: they are typed on envelopes.
    pub async fn publish_json<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        key: impl AsRef<[u8]>,
        value: &T,
    ) -> Result<RecordAck, KafkaProducerError> {
        let payload = serde_json::to_vec(value).map_err(|e| {
            KafkaProducerError::with_source(topic, ProducerErrorKind::Serialization, e)
        })?;
        let core = super::producer::ProducerCore::new(&self.client);
        let delivery = {
            let producer = core.producer(topic)?;
            let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
                .payload(&payload[..])
                .key(key.as_ref());
            producer
                .send_result(record)
                .map_err(|(e, _)| KafkaProducerError::from_kafka(topic, e))?
        };
        let waited = tokio::time::timeout(self.stack.timeout(), delivery).await;
        let result = waited.map_err(|_| {
            KafkaProducerError::with_source(
                topic,
                ProducerErrorKind::OutcomeUnknown,
                "no acknowledgement within the publish timeout",
            )
        })?;
        match result {
            Ok(Ok(delivery)) => {
                core.confirm_connected();
                Ok(RecordAck {
                    partition: delivery.partition,
                    offset: delivery.offset,
                })
            }
            Ok(Err((e, _))) => Err(KafkaProducerError::from_delivery(topic, e)),
            Err(_) => Err(super::producer::lost_report(topic)),
        }
    }

    /// A consumer of group `group`, to configure and [`start`](ConsumerBuilder::start).
    pub fn consumer(&self, group: impl Into<String>) -> ConsumerBuilder {
        let runtime = KafkaConsumer::from_client(&self.client)
            .map(|b| b.group(group.into()).require_envelope(false));
        ConsumerBuilder {
            runtime,
            topics: Vec::new(),
            by_topic: HashMap::new(),
            by_type: HashMap::new(),
            batches: Vec::new(),
            layers: Vec::new(),
            options: StartOptions::new(Vec::<String>::new()),
        }
    }
}

type Wrap = Arc<dyn Fn(RecordHandler) -> RecordHandler + Send + Sync>;

/// Configures a consumer of the [`Kafka`] facade: topics, handlers, layers.
///
/// Defaults are the runtime's: from the latest offset when the group has none,
/// auto-commit of finished offsets every 200 ms, 3 retries (1 s, 2 s, 4 s; no
/// retry budget), dead-letter queue `<topic>.dlq` on, one lane per consumer.
pub struct ConsumerBuilder {
    runtime: Result<KafkaConsumerBuilder, ConsumerError>,
    topics: Vec<String>,
    by_topic: HashMap<String, RecordHandler>,
    by_type: HashMap<String, RecordHandler>,
    batches: Vec<(String, BatchHandler, BatchOptions)>,
    layers: Vec<Wrap>,
    options: StartOptions,
}

impl fmt::Debug for ConsumerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("topics", &self.topics)
            .field("on_topic", &self.by_topic.keys().collect::<Vec<_>>())
            .field("on", &self.by_type.keys().collect::<Vec<_>>())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Decodes a typed handler's input: a permanent `decode` failure if it fails.
fn typed_handler<T, F, Fut, E>(
    decode: impl Fn(&Record) -> Result<T, RecordDecodeError> + Clone + Send + Sync + 'static,
    handler: F,
) -> RecordHandler
where
    T: Send + 'static,
    F: Fn(T, Record) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    BoxCloneSyncService::new(tower::service_fn(move |record: Record| {
        let decoded = decode(&record);
        let handler = handler.clone();
        async move {
            match decoded {
                Ok(value) => handler(value, record).await.map_err(Into::into),
                // Typed, so the dead-letter headers name the decode error.
                Err(e) => {
                    Err(Box::new(HandlerError::permanent(e).with_class("decode")) as BoxError)
                }
            }
        }
    }))
}

impl ConsumerBuilder {
    /// Subscribes to `topics` (added to those of [`on_topic`](Self::on_topic) and
    /// [`on_batch`](Self::on_batch)).
    pub fn topics<I, T>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.topics.extend(topics.into_iter().map(Into::into));
        self
    }

    /// Handles keel events of `event_type` (on any subscribed topic) with a typed
    /// handler: the envelope's payload is decoded into `T` first. A record that
    /// is not a keel envelope, or whose payload is not a `T`, never reaches the
    /// handler: it is a permanent failure of class `decode`, dead-lettered at
    /// once without retries. The handler's own errors are retried (return
    /// [`HandlerError::permanent`] to skip the retries).
    pub fn on<T, F, Fut, E>(mut self, event_type: impl Into<String>, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(T, Record) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let decode = |record: &Record| match record.try_envelope() {
            // `&Value` is a serde deserializer: no copy of the payload.
            Some(envelope) => T::deserialize(envelope.payload())
                .map_err(|e| RecordDecodeError::new("on::<T>", json_reason(&e))),
            None => Err(RecordDecodeError::new("on::<T>", "not a keel envelope")),
        };
        self.by_type
            .insert(event_type.into(), typed_handler(decode, handler));
        self
    }

    /// Handles every record of `topic` (subscribing to it), keel envelope or
    /// not, with a handler that reads the [`Record`] itself: key, value,
    /// headers, position, timestamp; decode it with [`Record::decode`] and
    /// return the error (`?`): a decode failure is permanent (class `decode`).
    /// Topic routes come before event-type routes.
    pub fn on_topic<F, Fut, E>(self, topic: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Record) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let service = tower::service_fn(move |record: Record| {
            let fut = handler(record);
            async move { fut.await.map_err(Into::into) }
        });
        self.on_topic_service(topic, service)
    }

    /// Like [`on_topic`](Self::on_topic), the record decoded by `decoder` first:
    /// a record it cannot decode never reaches the handler (permanent, class
    /// `decode`).
    pub fn on_topic_with<D, F, Fut, E>(
        mut self,
        topic: impl Into<String>,
        decoder: D,
        handler: F,
    ) -> Self
    where
        D: Decoder,
        F: Fn(D::Output, Record) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let decoder = Arc::new(decoder);
        let decode = move |record: &Record| decoder.decode(record);
        let topic = topic.into();
        self.by_topic
            .insert(topic.clone(), typed_handler(decode, handler));
        self.topics.push(topic);
        self
    }

    /// Handles every record of `topic` with any `tower::Service<Record>` (built
    /// with layers of its own).
    pub fn on_topic_service<S>(mut self, topic: impl Into<String>, service: S) -> Self
    where
        S: Service<Record, Response = ()> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let topic = topic.into();
        let service = service.map_err(Into::into);
        self.by_topic
            .insert(topic.clone(), BoxCloneSyncService::new(service));
        self.topics.push(topic);
        self
    }

    /// Handles the records of `topic` in batches of one partition's records:
    /// see [`batch`](crate::kafka::consumer::batch). The handler's
    /// [`BatchResult`] names the records that failed; only those are retried
    /// (one at a time) and dead-lettered.
    pub fn on_batch<F, Fut>(
        mut self,
        topic: impl Into<String>,
        options: BatchOptions,
        handler: F,
    ) -> Self
    where
        F: Fn(Vec<Record>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = BatchResult> + Send + 'static,
    {
        let topic = topic.into();
        let handler = BatchHandler::new(handler);
        // A record that failed in its batch is handled again alone, routed here.
        self.by_topic
            .insert(topic.clone(), BoxCloneSyncService::new(handler.single()));
        self.batches.push((topic.clone(), handler, options));
        self.topics.push(topic);
        self
    }

    /// Stacks `layer` around the router (every handler): a timeout, metrics,
    /// your own. Layers added later wrap those added earlier.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<RecordHandler> + Send + Sync + 'static,
        L::Service: Service<Record, Response = ()> + Clone + Send + Sync + 'static,
        <L::Service as Service<Record>>::Error: Into<BoxError>,
        <L::Service as Service<Record>>::Future: Send + 'static,
    {
        self.layers.push(Arc::new(move |inner| {
            BoxCloneSyncService::new(layer.layer(inner).map_err(Into::into))
        }));
        self
    }

    /// Start from the earliest offset when the group has none (default: latest).
    pub fn from_beginning(mut self, yes: bool) -> Self {
        self.options.from_beginning = yes;
        self
    }

    /// Retries per record after the first attempt (default 3).
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.options.max_retries = retries;
        self
    }

    /// Dead-letter finally failed and undecodable records to `<topic>.dlq`
    /// (default `true`).
    pub fn dlq(mut self, enabled: bool) -> Self {
        self.options.enable_dlq = enabled;
        self
    }

    /// Auto-commit of finished offsets (default `true`); see [`StartOptions`].
    pub fn auto_commit(mut self, yes: bool) -> Self {
        self.options.auto_commit = yes;
        self
    }

    /// Any other runtime setting: workers, ordering, retry policy, commit
    /// interval, DLQ failure policy...
    ///
    /// ```no_run
    /// # fn f(kafka: keel::kafka::Kafka) {
    /// use keel::layers::retry::RetryPolicy;
    /// use std::time::Duration;
    /// let builder = kafka.consumer("g").runtime(|r| {
    ///     r.key_ordered(4).retry_policy(RetryPolicy::kafka().base(Duration::from_millis(200)))
    /// });
    /// # }
    /// ```
    pub fn runtime(
        mut self,
        configure: impl FnOnce(KafkaConsumerBuilder) -> KafkaConsumerBuilder,
    ) -> Self {
        self.runtime = self.runtime.map(configure);
        self
    }

    fn subscribed(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        self.topics
            .iter()
            .filter(|t| seen.insert(t.as_str()))
            .cloned()
            .collect()
    }

    /// The router with its layers: a `tower::Service<Record>` to run with
    /// [`KafkaConsumer::builder`] yourself, or to test.
    pub fn service(&self) -> RecordHandler {
        let router = Router {
            by_topic: Arc::new(self.by_topic.clone()),
            by_type: Arc::new(self.by_type.clone()),
        };
        let mut service = BoxCloneSyncService::new(router);
        for wrap in &self.layers {
            service = wrap(service);
        }
        service
    }

    /// Subscribes and starts the consumer (inside a tokio runtime). Fails with
    /// [`ConsumerError::Config`] when there is no topic or no handler, and as
    /// [`KafkaConsumerBuilder::start`] does.
    pub fn start(mut self) -> Result<KafkaConsumer, ConsumerError> {
        let runtime = std::mem::replace(&mut self.runtime, Err(ConsumerError::NotRunning))?;
        if self.by_topic.is_empty() && self.by_type.is_empty() {
            return Err(ConsumerError::Config(
                "no handler: add one with on, on_topic or on_batch".into(),
            ));
        }
        let mut options = self.options.clone();
        options.topics = self.subscribed();
        let service = self.service();
        let batches = std::mem::take(&mut self.batches);
        let runtime = if batches.is_empty() {
            runtime
        } else {
            runtime.batches(BatchRoutes::new(batches))
        };
        runtime.start(options, service)
    }
}

/// Routes a record by topic, then by keel event type. A record no route takes
/// is dead-lettered: class `unknown_event_type` for an envelope, `decode` for
/// a record that is not one.
#[derive(Clone)]
pub struct Router {
    by_topic: Arc<HashMap<String, RecordHandler>>,
    by_type: Arc<HashMap<String, RecordHandler>>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("topics", &self.by_topic.keys().collect::<Vec<_>>())
            .field("event_types", &self.by_type.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Service<Record> for Router {
    type Response = ();
    type Error = BoxError;
    type Future = Either<Oneshot<RecordHandler, Record>, Ready<Result<(), BoxError>>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each handler is driven to readiness by its own `oneshot`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, record: Record) -> Self::Future {
        let handler = self
            .by_topic
            .get(record.topic())
            .or_else(|| match record.try_envelope() {
                Some(envelope) => self.by_type.get(envelope.event_type()),
                None => None,
            });
        match handler {
            Some(handler) => Either::Left(handler.clone().oneshot(record)),
            None => {
                let error: BoxError = if record.has_envelope() {
                    Box::new(HandlerError::unknown_event_type(record.event_type()))
                } else {
                    Box::new(
                        HandlerError::permanent(RecordDecodeError::new(
                            "router",
                            "not a keel envelope and no on_topic handler for its topic",
                        ))
                        .with_class("decode"),
                    )
                };
                Either::Right(futures::future::ready(Err(error)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::config::KafkaLogLevel;
    use crate::kafka::consumer::ReceivedMessage;
    use rdkafka::message::{OwnedMessage, Timestamp};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn kafka() -> Kafka {
        // No broker needed: nothing here is sent.
        let config = KafkaConfig::builder()
            .brokers(["127.0.0.1:9".to_string()])
            .log_level(KafkaLogLevel::Nothing)
            .build()
            .unwrap();
        Kafka::connect(config).unwrap()
    }

    fn record(topic: &str, value: &[u8], envelope: bool) -> Record {
        let message = if envelope {
            let e = EventEnvelope::new("order.created", serde_json::json!({"id": 1}));
            e.encode().unwrap().to_owned_message(topic, 0, 0)
        } else {
            OwnedMessage::new(
                Some(value.to_vec()),
                None,
                topic.into(),
                Timestamp::NotAvailable,
                0,
                0,
                None,
            )
        };
        let message = ReceivedMessage::new(message);
        match crate::kafka::consumer::decode::envelope_of(&message, false).unwrap() {
            Some(envelope) => Record::new(envelope, message),
            None => Record::from_record(message),
        }
    }

    fn class(error: &BoxError) -> (&'static str, bool) {
        let c = crate::kafka::consumer::HandlerErrors::classify_error(error.as_ref());
        (c.class, c.retryable)
    }

    #[derive(serde::Deserialize)]
    struct Order {
        id: u64,
    }

    /// Topic routes first, then event types; what no route takes is a
    /// permanent failure; layers wrap the router.
    #[tokio::test]
    async fn the_router_routes_by_topic_then_event_type_and_layers_wrap_it() {
        let layered = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let builder = {
            let (s1, s2) = (seen.clone(), seen.clone());
            let layered = layered.clone();
            kafka()
                .consumer("g")
                .on::<Order, _, _, _>("order.created", move |order, _| {
                    let s = s1.clone();
                    async move {
                        s.lock().unwrap().push(format!("typed {}", order.id));
                        Ok::<_, BoxError>(())
                    }
                })
                .on_topic("raw", move |record: Record| {
                    let s = s2.clone();
                    async move {
                        s.lock().unwrap().push(format!("raw {}", record.text()?));
                        Ok::<_, BoxError>(())
                    }
                })
                .layer(tower::layer::layer_fn(move |inner: RecordHandler| {
                    let layered = layered.clone();
                    tower::service_fn(move |r: Record| {
                        layered.fetch_add(1, Ordering::SeqCst);
                        inner.clone().oneshot(r)
                    })
                }))
        };
        let svc = builder.service();
        svc.clone()
            .oneshot(record("orders", b"", true))
            .await
            .unwrap();
        // An envelope on a topic route goes to the topic's handler, as a record.
        svc.clone().oneshot(record("raw", b"", true)).await.unwrap();
        svc.clone()
            .oneshot(record("raw", b"hello", false))
            .await
            .unwrap();
        let e = svc
            .clone()
            .oneshot(record("raw", &[0xff], false))
            .await
            .unwrap_err();
        assert_eq!(class(&e), ("decode", false));
        let e = svc
            .clone()
            .oneshot(record("other", b"{}", false))
            .await
            .unwrap_err();
        assert_eq!(class(&e), ("decode", false));
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen[0], "typed 1");
        assert!(seen[1].starts_with("raw {") && seen[1].contains("order.created"));
        assert_eq!(seen[2], "raw hello");
        assert_eq!(layered.load(Ordering::SeqCst), 5);
    }

    /// A payload of the wrong shape never reaches a typed handler: permanent,
    /// class `decode`, and the error names the decode error, not the payload.
    #[tokio::test]
    async fn a_typed_decode_failure_is_permanent_and_quotes_no_payload() {
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = {
            let calls = calls.clone();
            kafka()
                .consumer("g")
                .on::<Order, _, _, _>("order.created", move |_, _| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async { Ok::<_, BoxError>(()) }
                })
                .service()
        };
        let e = EventEnvelope::new("order.created", serde_json::json!({"id": "secret"}));
        let message = ReceivedMessage::new(e.encode().unwrap().to_owned_message("t", 0, 0));
        let envelope = crate::kafka::consumer::decode::envelope_of(&message, true)
            .unwrap()
            .unwrap();
        let error = svc
            .oneshot(Record::new(envelope, message))
            .await
            .unwrap_err();
        assert_eq!(class(&error), ("decode", false));
        assert!(!error.to_string().contains("secret"), "{error}");
        let h = error.downcast_ref::<HandlerError>().unwrap();
        assert!(
            h.error_type().contains("RecordDecodeError"),
            "{}",
            h.error_type()
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
