//! The futures of the dead-letter layer: [`ResponseFuture`] of the
//! [`DeadLetter`](super::DeadLetter) service and [`DeadLetterPublishFuture`] of
//! [`DeadLetterPublisher::publish`].

use super::error::DeadLetterError;
use super::publisher::{DeadLetterPublisher, DeadLetterReason, DeadLettered, Enqueue};
use super::{Disposition, reason_for};
use crate::kafka::consumer::{BoxError, ConsumedEvent, ReceivedMessage};
use pin_project_lite::pin_project;
use rdkafka::error::KafkaError;
use rdkafka::producer::DeliveryFuture;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::Sleep;

/// How long to wait before enqueueing again while librdkafka's local queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);

pin_project! {
    /// Waits for the broker to acknowledge one dead-lettered message.
    ///
    /// The message is enqueued when the future is created; while librdkafka's local
    /// queue is full it is enqueued again every 5 ms (only then does the future keep
    /// a copy of the message). Dropping the future does not take back a message
    /// already enqueued.
    pub struct DeadLetterPublishFuture {
        topic: String,
        // The message and reason, kept only while the local queue is full.
        pending: Option<Box<(ReceivedMessage, DeadLetterReason)>>,
        publisher: DeadLetterPublisher,
        #[pin]
        state: PublishState,
    }
}

pin_project! {
    #[project = PublishStateProj]
    enum PublishState {
        Delivering { #[pin] delivery: DeliveryFuture },
        QueueFull { #[pin] sleep: Sleep },
        Failed { error: Option<KafkaError> },
    }
}

impl fmt::Debug for DeadLetterPublishFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            PublishState::Delivering { .. } => "delivering",
            PublishState::QueueFull { .. } => "queue_full",
            PublishState::Failed { .. } => "failed",
        };
        f.debug_struct("DeadLetterPublishFuture")
            .field("topic", &self.topic)
            .field("state", &state)
            .finish()
    }
}

impl From<Enqueue> for PublishState {
    fn from(enqueued: Enqueue) -> Self {
        match enqueued {
            Enqueue::Delivering(delivery) => PublishState::Delivering { delivery },
            Enqueue::QueueFull => PublishState::QueueFull {
                sleep: tokio::time::sleep(QUEUE_FULL_WAIT),
            },
            Enqueue::Failed(error) => PublishState::Failed { error: Some(error) },
        }
    }
}

impl DeadLetterPublishFuture {
    pub(crate) fn new(
        publisher: DeadLetterPublisher,
        message: &ReceivedMessage,
        reason: &DeadLetterReason,
    ) -> Self {
        let topic = publisher.dlq_topic(message.topic());
        let enqueued = publisher.enqueue(&topic, message, reason);
        let pending = matches!(enqueued, Enqueue::QueueFull)
            .then(|| Box::new((message.clone(), reason.clone())));
        DeadLetterPublishFuture {
            topic,
            pending,
            publisher,
            state: enqueued.into(),
        }
    }
}

impl Future for DeadLetterPublishFuture {
    type Output = Result<DeadLettered, DeadLetterError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let fail = |source| DeadLetterError::Publish {
                topic: this.topic.clone(),
                source,
            };
            match this.state.as_mut().project() {
                PublishStateProj::Delivering { delivery } => {
                    return Poll::Ready(match ready!(delivery.poll(cx)) {
                        Ok(Ok(d)) => Ok(DeadLettered {
                            topic: this.topic.clone(),
                            partition: d.partition,
                            offset: d.offset,
                        }),
                        Ok(Err((e, _))) => Err(fail(e)),
                        Err(_canceled) => Err(fail(KafkaError::Canceled)),
                    });
                }
                PublishStateProj::Failed { error } => {
                    return Poll::Ready(Err(fail(error.take().unwrap_or(KafkaError::Canceled))));
                }
                PublishStateProj::QueueFull { sleep } => {
                    ready!(sleep.poll(cx));
                    let enqueued = match this.pending.as_deref() {
                        Some((message, reason)) => {
                            this.publisher.enqueue(this.topic, message, reason)
                        }
                        None => Enqueue::Failed(KafkaError::Canceled),
                    };
                    if !matches!(enqueued, Enqueue::QueueFull) {
                        *this.pending = None;
                    }
                    this.state.set(enqueued.into());
                }
            }
        }
    }
}

pin_project! {
    /// The response future of [`DeadLetter`](super::DeadLetter): runs the handler
    /// and, if it fails, publishes the message to the dead-letter topic and waits
    /// for the acknowledgement.
    pub struct ResponseFuture<F> {
        event: ConsumedEvent,
        publisher: DeadLetterPublisher,
        reason: Option<DeadLetterReason>,
        #[pin]
        state: ResponseState<F>,
    }
}

pin_project! {
    #[project = ResponseStateProj]
    enum ResponseState<F> {
        Handling { #[pin] handler: F },
        Publishing { #[pin] publish: DeadLetterPublishFuture },
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            ResponseState::Handling { .. } => "handling",
            ResponseState::Publishing { .. } => "publishing",
        };
        f.debug_struct("ResponseFuture")
            .field("topic", &self.event.topic())
            .field("partition", &self.event.partition())
            .field("offset", &self.event.offset())
            .field("state", &state)
            .finish()
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(handler: F, event: ConsumedEvent, publisher: DeadLetterPublisher) -> Self {
        ResponseFuture {
            event,
            publisher,
            reason: None,
            state: ResponseState::Handling { handler },
        }
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    type Output = Result<Disposition, DeadLetterError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                ResponseStateProj::Handling { handler } => {
                    let error = match ready!(handler.poll(cx)) {
                        Ok(()) => return Poll::Ready(Ok(Disposition::Handled)),
                        Err(e) => e,
                    };
                    let reason = reason_for(error, this.event.attempts_made().max(1));
                    let publish = this.publisher.publish(this.event.message(), &reason);
                    *this.reason = Some(reason);
                    this.state.set(ResponseState::Publishing { publish });
                }
                ResponseStateProj::Publishing { publish } => {
                    let landed = ready!(publish.poll(cx))?;
                    let event = &*this.event;
                    if let Some(reason) = this.reason.take() {
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
                    }
                    return Poll::Ready(Ok(Disposition::DeadLettered(landed)));
                }
            }
        }
    }
}
