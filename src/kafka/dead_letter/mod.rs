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
//! The service answers through [`ResponseFuture`] (the handler's future, then
//! [`DeadLetterPublishFuture`] while the message is published), named futures with
//! no boxing, like tower's own layers.
//!
//! The dead-letter topic must exist, or the broker must create topics on demand
//! (with its default partition count), unless you let keel create it before the
//! consumer starts: [`DeadLetterTopics`] with
//! [`KafkaConsumerBuilder::ensure_dlq_topics`](crate::kafka::consumer::KafkaConsumerBuilder::ensure_dlq_topics).
//!
//! Once the cause is fixed, [`replay`] republishes dead-lettered records to their
//! original topic, exactly once even when the replay is killed and started again.
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
mod future;
pub mod headers;
mod layer;
mod publisher;
pub mod replay;
mod topics;

pub use error::{DeadLetterError, DeadLetterTopicError};
pub use future::{DeadLetterPublishFuture, ResponseFuture};
pub use layer::DeadLetterLayer;
pub(crate) use publisher::is_consumer_only;
pub use publisher::{
    DEFAULT_SUFFIX, DeadLetterPublisher, DeadLetterReason, DeadLettered, MAX_ERROR_MESSAGE,
};
pub use topics::{DeadLetterTopics, EnsuredTopic};

use crate::kafka::consumer::{BoxError, ConsumedEvent, HandlerError, HandlerErrors};
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
{
    type Response = Disposition;
    type Error = DeadLetterError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| DeadLetterError::NotReady(e.into()))
    }

    fn call(&mut self, event: ConsumedEvent) -> Self::Future {
        let handler = self.inner.call(event.clone());
        ResponseFuture::new(handler, event, self.publisher.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::consumer::event::test_event;
    use rdkafka::ClientConfig;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;
    use tower::{Layer, ServiceExt};

    /// A one-broker mock cluster with the dead-letter topic of `test_event` ("t").
    fn cluster() -> MockCluster<'static, DefaultProducerContext> {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t.dlq", 1, 1).expect("mock topic");
        cluster
    }

    fn publisher(cluster: &MockCluster<'static, DefaultProducerContext>) -> DeadLetterPublisher {
        let mut base = ClientConfig::new();
        base.set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "dropped-for-the-producer")
            // One message at a time in librdkafka's queue.
            .set("queue.buffering.max.messages", "1")
            .set("linger.ms", "0");
        DeadLetterPublisher::new(&base, "g", DEFAULT_SUFFIX).expect("producer")
    }

    fn handler(fail: bool) -> impl Service<ConsumedEvent, Response = (), Error = BoxError> + Clone {
        tower::service_fn(move |_event: ConsumedEvent| async move {
            if fail {
                Err::<(), BoxError>("handler gave up".into())
            } else {
                Ok(())
            }
        })
    }

    #[tokio::test]
    async fn a_handled_message_is_not_published() {
        let cluster = cluster();
        let service = DeadLetterLayer::new(publisher(&cluster)).layer(handler(false));
        let answer = service.oneshot(test_event("a")).await.unwrap();
        assert_eq!(answer, Disposition::Handled);
    }

    #[tokio::test]
    async fn a_failed_message_is_acknowledged_in_the_dead_letter_topic() {
        let cluster = cluster();
        let service = DeadLetterLayer::new(publisher(&cluster)).layer(handler(true));
        let answer = service.oneshot(test_event("a")).await.unwrap();
        assert_eq!(
            answer,
            Disposition::DeadLettered(DeadLettered {
                topic: "t.dlq".into(),
                partition: 0,
                offset: 0,
            })
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_local_queue_is_waited_out() {
        let cluster = cluster();
        let publisher = publisher(&cluster);
        let reason = reason_for("boom", 1);
        // The broker is down: the first message stays in librdkafka's one-message
        // queue, so the second finds it full and waits.
        cluster.broker_down(1).unwrap();
        let first = publisher.publish(test_event("a").message(), &reason);
        let second = publisher.publish(test_event("b").message(), &reason);
        assert!(format!("{second:?}").contains("queue_full"), "{second:?}");
        cluster.broker_up(1).unwrap();
        let (first, second) = futures::join!(first, second);
        let (first, second) = (first.unwrap(), second.unwrap());
        assert_eq!((first.offset, second.offset), (0, 1));
        assert_eq!(second.topic, "t.dlq");
    }

    #[tokio::test]
    async fn a_refused_publish_is_a_typed_error() {
        let cluster = cluster();
        let publisher = publisher(&cluster);
        // Larger than `message.max.bytes`: refused before it is queued.
        let big = rdkafka::message::OwnedMessage::new(
            Some(vec![0u8; 2_000_000]),
            None,
            "t".into(),
            rdkafka::Timestamp::NotAvailable,
            0,
            1,
            None,
        );
        let message = crate::kafka::consumer::ReceivedMessage::new(big);
        let err = publisher
            .publish(&message, &reason_for("boom", 1))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DeadLetterError::Publish { topic, .. } if topic == "t.dlq"),
            "{err}"
        );
    }
}
