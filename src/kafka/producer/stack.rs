//! The default publish stack: logging, metrics, batch size, circuit breaker and
//! timeout from keel-layers around the publish services.
//!
//! ```text
//!   Logging            one span + one event per call (topic, event type / batch size, duration)
//!   Metrics            calls, failures by class, in flight, latency percentiles
//!   ProducerErrors     every error below becomes a KafkaProducerError with the topic
//!   BatchSize          (batches only) more than 1,000 events: refused, no I/O
//!   CircuitBreaker     opens after 5 consecutive Kafka failures, probes after 60 s
//!   Timeout            bound on one call: the delivery timeout + 5 s (one timer shared by all calls);
//!                      a batch bounds itself by the same time and answers per-event results
//!   PublishEvent / PublishBatch
//! ```
//!
//! # Why this order
//!
//! - **Batch size outside the breaker**: a refused batch is the caller's mistake,
//!   not a sign that Kafka is unhealthy, so it must not count towards opening the
//!   breaker; it is still logged and counted by the metrics.
//! - **Timeout inside the breaker**: a call that hangs counts as a failure.
//! - **The breaker counts only Kafka failures**: it classifies with
//!   [`KafkaOutage`], which counts retryable failures (transport, broker errors)
//!   and publishes whose outcome is unknown (no acknowledgement in time), and
//!   ignores permanent ones (message too large, serialization, unknown topic) and
//!   a full local queue (back-pressure from the application's own rate): those
//!   say nothing about the cluster's health.
//! - **Errors are typed once**: [`ProducerErrors`] turns the layers' wrappers
//!   (`TimeoutError`, `CircuitBreakerError`, `batch::Error`) into
//!   [`KafkaProducerError`] with the topic and, for one event, its id
//!   ([`ProducerErrorKind::OutcomeUnknown`] when the timeout fires: the record is
//!   still in librdkafka and may yet be delivered,
//!   [`ProducerErrorKind::CircuitOpen`], [`ProducerErrorKind::BatchTooLarge`]), so
//!   the stack's error type is the same as the bare services'.
//!
//! # No double retries, per-key order kept
//!
//! There is **no retry layer**. librdkafka already retries every failed produce
//! request (`retries`, `retry.backoff.ms` from the config) until the delivery
//! timeout, and the idempotent producer (on by default, `acks=all`) makes those
//! retries exactly-once and in order within a partition. A retry layer on top would
//! multiply the attempts (each one already retried inside librdkafka) and, worse,
//! re-send an event *after* the events of the same key published meanwhile, so a
//! consumer would see them out of order. For the same reason the timeout is longer
//! than the delivery timeout (`message.timeout.ms`, also when it is set through
//! the `KAFKA_RDKAFKA_*` pass-through): librdkafka's own delivery report fires
//! first, and the layer only catches a call that hangs for another reason.
//!
//! # Outcome unknown
//!
//! A publish that got no acknowledgement in time fails with
//! [`ProducerErrorKind::OutcomeUnknown`], not a retryable timeout: the event may
//! have been stored (it was in flight), or may still be (it is in librdkafka's
//! queue). keel's retry layer does not retry it. A caller that must resend
//! resends the *same* envelope (same event id, the consumers' dedupe key), and
//! a batch error lists which events are unknown, failed or delivered
//! ([`BatchOutcome`](crate::kafka::error::BatchOutcome)). Events are
//! enqueued in call order (see the [producer docs](super)), and no layer here
//! reorders or buffers calls, so per-key order is what the caller's order is.
//!
//! # Sharing
//!
//! One [`PublishStack`] owns one circuit breaker: the event and batch services it
//! builds, and all their clones, share it (one breaker per Kafka cluster). Each
//! service kind has its own metrics handle. Building a stack registers the breaker
//! with the client, so [`KafkaClient::health_check`] reports its state.
//!
//! # Example
//!
//! ```no_run
//! use keel::kafka::client::KafkaClient;
//! use keel::kafka::config::KafkaConfig;
//! use keel::kafka::envelope::EventEnvelope;
//! use keel::kafka::producer::{PublishRequest, PublishStack};
//! use tower::ServiceExt;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = KafkaClient::connect(KafkaConfig::from_env()?)?;
//! let stack = PublishStack::new(&client);
//! let publish = stack.event_service();
//! let event = EventEnvelope::new("user.created", serde_json::json!({"userId": "123"}));
//! publish.oneshot(PublishRequest::new("user.events", event)).await?;
//! println!("breaker: {:?}", stack.circuit_breaker().state());
//! println!("calls: {}", stack.event_metrics().snapshot().calls);
//! # Ok(()) }
//! ```

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use keel_layers::batch::{self, BatchSize, BatchSizeError, BatchSizeLayer};
use keel_layers::circuit_breaker::{
    CircuitBreaker, CircuitBreakerError, CircuitBreakerHandle, CircuitBreakerLayer,
};
use keel_layers::classify::{ByError, Classification, ClassifiedError, Classify};
use keel_layers::logging::{Logging, LoggingLayer, RequestFields};
use keel_layers::metrics::{Metrics, MetricsHandle, MetricsLayer};
use keel_layers::timeout::{Timeout, TimeoutError, TimeoutLayer};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::Level;

use super::{
    PUBLISH_TIMEOUT_MARGIN, PublishBatch, PublishBatchRequest, PublishEvent, PublishRequest,
};
use crate::kafka::client::KafkaClient;
use crate::kafka::error::{
    CLASS_OUTCOME_UNKNOWN, CLASS_QUEUE_FULL, KafkaProducerError, ProducerErrorKind,
};
use uuid::Uuid;

/// Counts only failures that say Kafka is unhealthy: retryable failures and
/// publishes whose outcome is unknown (no acknowledgement in time) count;
/// permanent ones (message too large, serialization, unknown topic, a refused
/// batch) and a full local queue are [`Ignored`](keel_layers::classify::Outcome::Ignored).
///
/// A full queue ([`CLASS_QUEUE_FULL`]) is back-pressure: the application
/// produces faster than librdkafka sends, which says nothing about the broker
/// (while the broker is down, the timeouts of the queued events open the breaker).
#[derive(Clone, Copy, Debug, Default)]
pub struct KafkaOutage;

impl<Res, E: ClassifiedError> Classify<Res, E> for KafkaOutage {
    #[inline]
    fn classify(&self, result: Result<&Res, &E>) -> Classification {
        match result {
            Ok(_) => Classification::SUCCESS,
            Err(e) => {
                let c = e.classification();
                if c.class == CLASS_QUEUE_FULL {
                    Classification::IGNORED
                } else if c.retryable || c.class == CLASS_OUTCOME_UNKNOWN {
                    c
                } else {
                    Classification::IGNORED
                }
            }
        }
    }
}

/// An error that can become a [`KafkaProducerError`] for a topic.
pub trait IntoProducerError {
    /// Converts, naming `topic` where the error does not carry it.
    fn into_producer_error(self, topic: &str) -> KafkaProducerError;
}

impl IntoProducerError for KafkaProducerError {
    fn into_producer_error(self, _topic: &str) -> KafkaProducerError {
        self
    }
}

impl<E: IntoProducerError> IntoProducerError for TimeoutError<E> {
    fn into_producer_error(self, topic: &str) -> KafkaProducerError {
        match self {
            // The record is in librdkafka's queue (or on the wire): it may
            // still be delivered, so this is not a plain, retryable timeout.
            TimeoutError::Elapsed { after } => KafkaProducerError::with_source(
                topic,
                ProducerErrorKind::OutcomeUnknown,
                format!(
                    "no acknowledgement within {after:?} (timeout layer); \
                     the event may still be delivered"
                ),
            ),
            TimeoutError::Inner(e) => e.into_producer_error(topic),
        }
    }
}

impl<E: IntoProducerError> IntoProducerError for CircuitBreakerError<E> {
    fn into_producer_error(self, topic: &str) -> KafkaProducerError {
        let why = match self {
            CircuitBreakerError::Inner(e) => return e.into_producer_error(topic),
            CircuitBreakerError::Open { remaining_wait } => {
                format!("circuit breaker is open; probing again in {remaining_wait:?}")
            }
            CircuitBreakerError::ForcedOpen => "circuit breaker is forced open".to_string(),
            CircuitBreakerError::HalfOpenFull { permitted_probes } => format!(
                "circuit breaker is half-open and all {permitted_probes} probe calls are in flight"
            ),
        };
        KafkaProducerError::with_source(topic, ProducerErrorKind::CircuitOpen, why)
    }
}

impl<E: IntoProducerError> IntoProducerError for batch::Error<E> {
    fn into_producer_error(self, topic: &str) -> KafkaProducerError {
        match self {
            batch::Error::Inner(e) => e.into_producer_error(topic),
            batch::Error::Rejected(BatchSizeError::TooLarge { len, max }) => {
                KafkaProducerError::new(topic, ProducerErrorKind::BatchTooLarge { size: len, max })
            }
            batch::Error::Rejected(other) => KafkaProducerError::with_source(
                topic,
                ProducerErrorKind::BatchTooLarge { size: 0, max: 0 },
                other,
            ),
        }
    }
}

/// A request that names its topic.
pub trait TopicRequest {
    /// The topic.
    fn topic(&self) -> &str;

    /// The topic, when it is a `&'static str` (then it is shared, not copied).
    fn static_topic(&self) -> Option<&'static str> {
        None
    }

    /// The event's id, for a single-event request: the layers' errors name it.
    fn event_id(&self) -> Option<Uuid> {
        None
    }
}

/// The `&'static str` inside `topic`, if it holds one.
#[allow(clippy::ptr_arg)] // the variant is what matters, not the text
fn borrowed(topic: &Cow<'static, str>) -> Option<&'static str> {
    match topic {
        Cow::Borrowed(t) => Some(t),
        Cow::Owned(_) => None,
    }
}

impl<T> TopicRequest for PublishRequest<T> {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn static_topic(&self) -> Option<&'static str> {
        borrowed(&self.topic)
    }

    fn event_id(&self) -> Option<Uuid> {
        Some(self.event.event_id())
    }
}

impl<T> TopicRequest for PublishBatchRequest<T> {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn static_topic(&self) -> Option<&'static str> {
        borrowed(&self.topic)
    }
}

impl<T> batch::BatchLen for PublishBatchRequest<T> {
    fn batch_len(&self) -> usize {
        self.events.len()
    }
}

/// Turns the errors of the layers below into [`KafkaProducerError`]s carrying the
/// request's topic. See [`IntoProducerError`].
///
/// Each response future keeps the topic (the layers below can fail before the
/// publish service sees the request): a `&'static str` as it is; otherwise a
/// service remembers the last topic as an `Arc<str>`, so calls to the same topic
/// share it instead of copying it.
#[derive(Debug)]
pub struct ProducerErrors<S> {
    inner: S,
    last_topic: Option<Arc<str>>,
}

impl<S: Clone> Clone for ProducerErrors<S> {
    fn clone(&self) -> Self {
        // A clone starts without a topic of its own, so clones running on other
        // threads do not share one reference count.
        ProducerErrors {
            inner: self.inner.clone(),
            last_topic: None,
        }
    }
}

impl<S> ProducerErrors<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        ProducerErrors {
            inner,
            last_topic: None,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Applies [`ProducerErrors`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ProducerErrorsLayer;

impl<S> Layer<S> for ProducerErrorsLayer {
    type Service = ProducerErrors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ProducerErrors::new(inner)
    }
}

impl<S, R> Service<R> for ProducerErrors<S>
where
    S: Service<R>,
    S::Error: IntoProducerError,
    R: TopicRequest,
{
    type Response = S::Response;
    type Error = KafkaProducerError;
    type Future = ProducerErrorsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| e.into_producer_error(""))
    }

    fn call(&mut self, req: R) -> Self::Future {
        let topic = match (req.static_topic(), &self.last_topic) {
            (Some(t), _) => TopicName::Static(t),
            (None, Some(t)) if **t == *req.topic() => TopicName::Shared(t.clone()),
            (None, _) => TopicName::Shared(self.last_topic.insert(Arc::from(req.topic())).clone()),
        };
        let event_id = req.event_id();
        ProducerErrorsFuture {
            inner: self.inner.call(req),
            topic,
            event_id,
        }
    }
}

pin_project! {
    /// The response future of [`ProducerErrors`].
    #[derive(Debug)]
    pub struct ProducerErrorsFuture<F> {
        #[pin]
        inner: F,
        topic: TopicName,
        event_id: Option<Uuid>,
    }
}

/// The topic a [`ProducerErrorsFuture`] names in its errors.
#[derive(Debug)]
enum TopicName {
    Static(&'static str),
    Shared(Arc<str>),
}

impl TopicName {
    fn as_str(&self) -> &str {
        match self {
            TopicName::Static(t) => t,
            TopicName::Shared(t) => t,
        }
    }
}

impl<F, T, E> Future for ProducerErrorsFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: IntoProducerError,
{
    type Output = Result<T, KafkaProducerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => Poll::Ready(r.map_err(|e| {
                let e = e.into_producer_error(this.topic.as_str());
                match this.event_id {
                    Some(id) if e.event_id().is_none() => e.with_event_id(*id),
                    _ => e,
                }
            })),
        }
    }
}

/// What the logging layer records about a publish: topic, event type and id (one
/// event) or batch size (a batch). Never the payload, key or headers.
#[derive(Clone, Copy, Debug, Default)]
pub struct PublishFields;

impl<T> RequestFields<PublishRequest<T>> for PublishFields {
    fn span(&self, req: &PublishRequest<T>) -> tracing::Span {
        // With `otel`: semantic-convention names (keel's behind `otel-keel-fields`).
        #[cfg(feature = "otel")]
        return crate::kafka::otel::publish_fields_span(
            &req.topic,
            req.event.event_type(),
            req.event.event_id(),
        );
        #[cfg(not(feature = "otel"))]
        tracing::debug_span!(
            "publish",
            topic = %req.topic,
            event_type = req.event.event_type(),
            event_id = %req.event.event_id()
        )
    }
}

impl<T> RequestFields<PublishBatchRequest<T>> for PublishFields {
    fn span(&self, req: &PublishBatchRequest<T>) -> tracing::Span {
        #[cfg(feature = "otel")]
        return crate::kafka::otel::publish_batch_fields_span(&req.topic, req.events.len());
        #[cfg(not(feature = "otel"))]
        tracing::info_span!("publish_batch", topic = %req.topic, events = req.events.len())
    }
}

/// How much later than a batch's own bound the batch stack's timeout layer
/// fires (see [`PublishStack::batch_service`]).
pub const BATCH_BACKSTOP: Duration = Duration::from_secs(1);

/// The default stack around a single-event publish service `S`.
pub type PublishEventStack<S = PublishEvent> = Logging<
    Metrics<ProducerErrors<CircuitBreaker<Timeout<S>, KafkaOutage>>, ByError>,
    ByError,
    PublishFields,
>;

/// The default stack around a batch publish service `S`.
pub type PublishBatchStack<S = PublishBatch> = Logging<
    Metrics<ProducerErrors<BatchSize<CircuitBreaker<Timeout<S>, KafkaOutage>>>, ByError>,
    ByError,
    PublishFields,
>;

/// The default publish stack; see the [module docs](self).
///
/// Cloning shares the circuit breaker and the metrics.
#[derive(Clone)]
pub struct PublishStack {
    client: KafkaClient,
    breaker: CircuitBreakerLayer<KafkaOutage>,
    timeout: Duration,
    max_batch_size: usize,
    event_metrics: MetricsLayer<ByError>,
    batch_metrics: MetricsLayer<ByError>,
    event_logging: LoggingLayer<ByError, PublishFields>,
    batch_logging: LoggingLayer<ByError, PublishFields>,
}

impl fmt::Debug for PublishStack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishStack")
            .field("timeout", &self.timeout)
            .field("max_batch_size", &self.max_batch_size)
            .field("circuit_breaker", &self.breaker.handle().state())
            .finish_non_exhaustive()
    }
}

impl PublishStack {
    /// The default stack for `client`: breaker opening after 5 consecutive
    /// failures and probing after 60 s, batches of at most the config's
    /// `max_batch_size` (1,000), timeout of the config's delivery timeout + 5 s.
    pub fn new(client: &KafkaClient) -> Self {
        Self::builder(client).build()
    }

    /// A builder starting from the defaults.
    pub fn builder(client: &KafkaClient) -> PublishStackBuilder {
        PublishStackBuilder {
            client: client.clone(),
            consecutive_failures: 5,
            open_wait: Duration::from_secs(60),
            timeout: client.config().delivery_timeout() + PUBLISH_TIMEOUT_MARGIN,
            max_batch_size: client.config().max_batch_size(),
            success_level: Level::DEBUG,
        }
    }

    /// The single-event service: the stack around [`KafkaClient::publisher`].
    pub fn event_service(&self) -> PublishEventStack {
        self.wrap_event_service(self.client.publisher())
    }

    /// The batch service: the stack around [`KafkaClient::batch_publisher`].
    ///
    /// The batch publisher itself is bounded by the stack's timeout, so that a
    /// batch that runs out of time still answers what became of each event; the
    /// timeout layer, [`BATCH_BACKSTOP`] later, only catches a batch that hangs
    /// for another reason.
    pub fn batch_service(&self) -> PublishBatchStack {
        let inner = self.client.batch_publisher().with_timeout(self.timeout);
        self.wrap_batch(inner, self.timeout + BATCH_BACKSTOP)
    }

    /// The stack around any single-event publish service (a decorated
    /// [`PublishEvent`], a test double).
    pub fn wrap_event_service<S>(&self, inner: S) -> PublishEventStack<S> {
        let timed = TimeoutLayer::new(self.timeout)
            .shared_timer(true)
            .layer(inner);
        let guarded = self.breaker.layer(timed);
        let typed = ProducerErrors::new(guarded);
        let measured = self.event_metrics.layer(typed);
        self.event_logging.layer(measured)
    }

    /// The stack around any batch publish service.
    pub fn wrap_batch_service<S>(&self, inner: S) -> PublishBatchStack<S> {
        self.wrap_batch(inner, self.timeout)
    }

    fn wrap_batch<S>(&self, inner: S, timeout: Duration) -> PublishBatchStack<S> {
        let timed = TimeoutLayer::new(timeout).layer(inner);
        let guarded = self.breaker.layer(timed);
        let sized = BatchSizeLayer::new()
            .max(self.max_batch_size)
            .allow_empty(true)
            .layer(guarded);
        let typed = ProducerErrors::new(sized);
        let measured = self.batch_metrics.layer(typed);
        self.batch_logging.layer(measured)
    }

    /// The circuit breaker shared by every service of this stack.
    pub fn circuit_breaker(&self) -> CircuitBreakerHandle {
        self.breaker.handle()
    }

    /// Call metrics of the single-event services.
    pub fn event_metrics(&self) -> MetricsHandle {
        self.event_metrics.handle()
    }

    /// Call metrics of the batch services.
    pub fn batch_metrics(&self) -> MetricsHandle {
        self.batch_metrics.handle()
    }

    /// The timeout of one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Configures a [`PublishStack`]; every setting starts at its documented default.
#[derive(Debug)]
pub struct PublishStackBuilder {
    client: KafkaClient,
    consecutive_failures: u32,
    open_wait: Duration,
    timeout: Duration,
    max_batch_size: usize,
    success_level: Level,
}

impl PublishStackBuilder {
    /// Consecutive Kafka failures that open the breaker (default 5).
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_failures = n;
        self
    }

    /// How long the breaker stays open before a probe (default 60 s).
    pub fn open_wait(mut self, wait: Duration) -> Self {
        self.open_wait = wait;
        self
    }

    /// Bound on one call (default: the config's delivery timeout + 5 s, so that
    /// librdkafka's own delivery timeout fires first).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Largest batch (default: the config's `max_batch_size`, 1,000).
    pub fn max_batch_size(mut self, max: usize) -> Self {
        self.max_batch_size = max;
        self
    }

    /// Level of the log event of a successful call (default `DEBUG` for single
    /// events, whose rate can be high; batches always log at `INFO`). Failures
    /// log at `ERROR`.
    pub fn success_level(mut self, level: Level) -> Self {
        self.success_level = level;
        self
    }

    /// Builds the stack and lets the client's health check report its breaker.
    pub fn build(self) -> PublishStack {
        let breaker = CircuitBreakerLayer::builder()
            .name("kafka_publish")
            .consecutive_failures(self.consecutive_failures)
            .open_wait(self.open_wait)
            .classifier(KafkaOutage)
            .build();
        let handle = breaker.handle();
        self.client.watch_circuit_breaker(Arc::new(move || {
            handle.state().as_str().to_ascii_uppercase()
        }));
        let logging = |operation, success_level, message| {
            LoggingLayer::new("KafkaProducer", operation)
                .classifier(ByError)
                .fields(PublishFields)
                .span_level(Level::DEBUG)
                .on_success(success_level)
                .success_message(message)
                .failure_message("Kafka publish failed")
        };
        PublishStack {
            event_logging: logging(
                "publish",
                self.success_level,
                "Event published successfully",
            ),
            batch_logging: logging("publish_batch", Level::INFO, "Batch published successfully"),
            client: self.client,
            breaker,
            timeout: self.timeout,
            max_batch_size: self.max_batch_size,
            event_metrics: MetricsLayer::new().classifier(ByError),
            batch_metrics: MetricsLayer::new().classifier(ByError),
        }
    }
}
