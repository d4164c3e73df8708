//! Dead-letter queue: a message the handler finally fails on is published, unchanged,
//! to `<topic>.dlq` with provenance headers, and the partition moves on.
//!
//! Without a dead-letter queue a consumer that meets a poison message has two bad
//! choices: retry it forever (the partition stops) or skip it (the message is lost).
//! [`DeadLetterLayer`] takes the third way, as Spring Kafka's
//! `DeadLetterPublishingRecoverer` does: after the last retry (put keel-layers'
//! [`RetryLayer`](keel_layers::retry::RetryLayer) *inside* this layer, and
//! [`CountAttemptsLayer`](crate::kafka::consumer::CountAttemptsLayer) inside that so
//! attempts are counted) the original key, payload and headers are republished to
//! the dead-letter topic, with [`headers`] appended: original topic, partition, offset, timestamp and
//! timestamp type, consumer group, error kind, error type, error message, attempts
//! and the failure time. The publish is acknowledged by the broker (idempotent
//! producer, `acks=all`) before the service answers, so the consumer runtime commits
//! the original offset only once the message is safe in the dead-letter topic. If
//! the publish fails the service fails with [`DeadLetterError`] and the offset is not
//! committed.
//!
//! The dead-letter topic must exist, or the broker must create topics on demand.
//!
//! # Example
//!
//! ```no_run
//! use keel::kafka::consumer::{BoxError, ConsumedEvent, CountAttemptsLayer, HandlerErrors};
//! use keel::layers::retry::{RetryLayer, RetryPolicy};
//! use keel::kafka::dead_letter::{DeadLetterLayer, DeadLetterPublisher};
//! use rdkafka::ClientConfig;
//! use tower::ServiceBuilder;
//!
//! let mut base = ClientConfig::new();
//! base.set("bootstrap.servers", "127.0.0.1:9092");
//! let publisher = DeadLetterPublisher::new(&base, "orders-service", ".dlq")?;
//! let handler = tower::service_fn(|event: ConsumedEvent| async move {
//!     println!("{}", event.event_type());
//!     Ok::<_, BoxError>(())
//! });
//! let stack = ServiceBuilder::new()
//!     .layer(DeadLetterLayer::new(publisher))
//!     .layer(RetryLayer::new(RetryPolicy::kafka().without_budget()).classifier(HandlerErrors))
//!     .layer(CountAttemptsLayer)
//!     .service(handler);
//! # let _ = stack;
//! # Ok::<_, rdkafka::error::KafkaError>(())
//! ```

mod error;
pub mod headers;
mod layer;
mod publisher;

pub use error::DeadLetterError;
pub use layer::DeadLetterLayer;
pub use publisher::{DEFAULT_SUFFIX, DeadLetterPublisher, DeadLetterReason, DeadLettered};

use crate::kafka::consumer::{BoxError, ConsumedEvent, HandlerError, HandlerErrors};
use futures::future::BoxFuture;
use std::task::{Context, Poll};
use tower::Service;

/// What became of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// The handler succeeded.
    Handled,
    /// The handler failed; the message is in the dead-letter topic.
    DeadLettered(DeadLettered),
}

/// The service of [`DeadLetterLayer`]; see [the module docs](self).
#[derive(Clone, Debug)]
pub struct DeadLetter<S> {
    inner: S,
    publisher: DeadLetterPublisher,
}

impl<S> DeadLetter<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, publisher: DeadLetterPublisher) -> Self {
        DeadLetter { inner, publisher }
    }
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The provenance of a handler failure.
pub(crate) fn reason_for<E: Into<BoxError>>(error: E, attempts: u32) -> DeadLetterReason {
    let type_name = std::any::type_name::<E>();
    let error: BoxError = error.into();
    let (kind, error_type) = match error.downcast_ref::<HandlerError>() {
        Some(h) => (h.class(), h.error_type()),
        None => (
            HandlerErrors::classify_error(error.as_ref()).class,
            type_name,
        ),
    };
    DeadLetterReason {
        kind: kind.to_string(),
        error_type: error_type.to_string(),
        message: crate::kafka::consumer::error_chain(error.as_ref()),
        attempts,
    }
}

impl<S> Service<ConsumedEvent> for DeadLetter<S>
where
    S: Service<ConsumedEvent, Response = ()>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Disposition;
    type Error = DeadLetterError;
    type Future = BoxFuture<'static, Result<Disposition, DeadLetterError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| DeadLetterError::NotReady(e.into()))
    }

    fn call(&mut self, event: ConsumedEvent) -> Self::Future {
        let fut = self.inner.call(event.clone());
        let publisher = self.publisher.clone();
        Box::pin(async move {
            let error = match fut.await {
                Ok(()) => return Ok(Disposition::Handled),
                Err(e) => e,
            };
            let reason = reason_for(error, event.attempts_made().max(1));
            let landed = publisher.publish(event.message(), &reason).await?;
            tracing::error!(
                topic = event.topic(),
                partition = event.partition(),
                offset = event.offset(),
                event_type = event.event_type(),
                attempts = reason.attempts,
                error_kind = %reason.kind,
                error = %reason.message,
                dlq_topic = %landed.topic,
                dlq_offset = landed.offset,
                "handler failed, message dead-lettered"
            );
            Ok(Disposition::DeadLettered(landed))
        })
    }
}
