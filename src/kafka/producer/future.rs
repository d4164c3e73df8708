//! The response future of [`PublishEvent`](super::PublishEvent).

use quanta::Instant;
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use rdkafka::producer::DeliveryFuture;
use uuid::Uuid;

use super::{ProducerCore, PublishAck, SendSpan, delivery_result};
use crate::kafka::error::{KafkaProducerError, ProducerErrorKind};

pin_project! {
    /// Waits for the broker's acknowledgement of one already-enqueued event.
    ///
    /// Dropping it does not take the event back (it is in librdkafka's queue
    /// already); only the metrics of that call are lost.
    pub struct PublishFuture {
        #[pin]
        delivery: Option<DeliveryFuture>,
        error: Option<KafkaProducerError>,
        topic: Cow<'static, str>,
        event_id: Uuid,
        core: ProducerCore,
        started: Instant,
        // The PRODUCER span (feature `otel`): ends when the future is dropped.
        span: SendSpan,
    }
}

impl std::fmt::Debug for PublishFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishFuture")
            .field("topic", &self.topic)
            .field("event_id", &self.event_id)
            .field("waiting", &self.delivery.is_some())
            .finish()
    }
}

impl PublishFuture {
    pub(crate) fn waiting(
        delivery: DeliveryFuture,
        topic: Cow<'static, str>,
        event_id: Uuid,
        core: ProducerCore,
        started: Instant,
        span: SendSpan,
    ) -> Self {
        PublishFuture {
            delivery: Some(delivery),
            error: None,
            topic,
            event_id,
            core,
            started,
            span,
        }
    }

    pub(crate) fn failed(
        error: KafkaProducerError,
        core: ProducerCore,
        started: Instant,
        span: SendSpan,
    ) -> Self {
        PublishFuture {
            delivery: None,
            topic: Cow::Owned(error.topic().to_string()),
            event_id: error.event_id().unwrap_or_else(Uuid::nil),
            error: Some(error),
            core,
            started,
            span,
        }
    }
}

impl Future for PublishFuture {
    type Output = Result<PublishAck, KafkaProducerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.delivery.as_pin_mut() {
            None => Err(this.error.take().unwrap_or_else(|| {
                KafkaProducerError::new(&**this.topic, ProducerErrorKind::Other)
            })),
            Some(delivery) => match delivery.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => delivery_result(r, this.topic, *this.event_id),
            },
        };
        let elapsed = this.started.elapsed();
        match &result {
            Ok(ack) => {
                #[cfg(feature = "otel")]
                crate::kafka::otel::record_ack(this.span, ack);
                this.core
                    .metrics()
                    .record_call(1, 0, *this.started, elapsed);
                this.core.confirm_connected();
                tracing::debug!(
                    target: "keel::kafka",
                    topic = %this.topic,
                    event_id = %ack.event_id,
                    partition = ack.partition,
                    offset = ack.offset,
                    duration_us = elapsed.as_micros() as u64,
                    "event published"
                );
            }
            Err(e) => {
                #[cfg(feature = "otel")]
                crate::kafka::otel::record_publish_error(this.span, e);
                this.core
                    .metrics()
                    .record_call(0, 1, *this.started, elapsed);
                tracing::warn!(
                    target: "keel::kafka",
                    topic = %this.topic,
                    event_id = %this.event_id,
                    outcome_unknown = e.may_have_been_delivered(),
                    error = %e,
                    duration_us = elapsed.as_micros() as u64,
                    "event publish failed"
                );
            }
        }
        Poll::Ready(result)
    }
}
