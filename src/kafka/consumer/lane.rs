//! A lane: one task draining one bounded queue, one message at a time.

use super::attempts::CountAttempts;
use super::error::HandlerErrors;
use super::error::{BoxError, error_chain};
use super::event::{ConsumedEvent, ReceivedMessage};
use super::metrics::{ConsumerMetrics, Ending};
use super::poll::{Completion, Work};
use crate::kafka::dead_letter::{
    DeadLetter, DeadLetterPublisher, DeadLetterReason, Disposition, reason_for,
};
use crate::kafka::envelope::EventEnvelope;
use keel_layers::retry::{Backoff, Retry, RetryLayer, RetryPolicy};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, watch};
use tower::{Service, ServiceExt};
use tracing::Instrument;

pub(crate) type Boxed<S> =
    tower::util::MapErr<S, fn(<S as Service<ConsumedEvent>>::Error) -> BoxError>;
type Retried<S> = Retry<CountAttempts<Boxed<S>>, HandlerErrors>;

/// The per-lane handler stack the runtime builds from the start options.
pub(crate) enum Stack<S: Service<ConsumedEvent>> {
    /// Retry, then dead-letter.
    DeadLetter(DeadLetter<Retried<S>>),
    /// Retry, then log and skip (DLQ disabled).
    Plain(Retried<S>),
}

pub(crate) struct LaneContext {
    pub(crate) completions: mpsc::UnboundedSender<Completion>,
    pub(crate) metrics: Arc<ConsumerMetrics>,
    pub(crate) dlq: Option<DeadLetterPublisher>,
    pub(crate) backoff: Backoff,
}

impl<S> Stack<S>
where
    S: Service<ConsumedEvent, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    pub(crate) fn new(handler: S, policy: RetryPolicy, dlq: Option<DeadLetterPublisher>) -> Self {
        let boxed: Boxed<S> = handler.map_err(Into::into as fn(S::Error) -> BoxError);
        let retry = tower::Layer::layer(
            &RetryLayer::new(policy).classifier(HandlerErrors),
            CountAttempts::new(boxed),
        );
        match dlq {
            Some(publisher) => Stack::DeadLetter(DeadLetter::new(retry, publisher)),
            None => Stack::Plain(retry),
        }
    }

    /// Handles one event to its end. `Err` only when the dead-letter publish failed.
    async fn handle(&mut self, event: ConsumedEvent) -> Result<Ending, BoxError> {
        match self {
            Stack::DeadLetter(svc) => match svc.ready().await?.call(event).await? {
                Disposition::Handled => Ok(Ending::Processed),
                Disposition::DeadLettered(_) => Ok(Ending::DeadLettered),
            },
            Stack::Plain(svc) => {
                let result = match svc.ready().await {
                    Ok(ready) => ready.call(event.clone()).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => Ok(Ending::Processed),
                    Err(e) => {
                        tracing::error!(
                            topic = event.topic(),
                            partition = event.partition(),
                            offset = event.offset(),
                            event_type = event.event_type(),
                            attempts = event.attempts_made(),
                            error = %error_chain(e.as_ref()),
                            "handler failed and the DLQ is disabled: message skipped"
                        );
                        Ok(Ending::Failed)
                    }
                }
            }
        }
    }
}

pub(crate) async fn run_lane<S>(
    mut queue: mpsc::Receiver<Work>,
    mut stack: Stack<S>,
    ctx: Arc<LaneContext>,
    mut stop: watch::Receiver<bool>,
) where
    S: Service<ConsumedEvent, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    loop {
        if *stop.borrow() {
            break;
        }
        // Fast path while the queue has work; park on both only when it is empty.
        let work = match queue.try_recv() {
            Ok(work) => {
                // Yield now and then so a queue the poll thread keeps full cannot
                // starve other tasks of this worker.
                tokio::task::coop::consume_budget().await;
                work
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                biased;
                _ = stop.wait_for(|stop| *stop) => break,
                work = queue.recv() => match work {
                    Some(work) => work,
                    None => break,
                },
            },
        };
        let offset = work.message.offset();
        let span = tracing::info_span!(
            "kafka_message",
            topic = %work.tp.topic,
            partition = work.tp.partition,
            offset
        );
        process(&mut stack, &ctx, work.message)
            .instrument(span)
            .await;
        let _ = ctx.completions.send(Completion {
            tp: work.tp,
            epoch: work.epoch,
            offset,
        });
    }
}

async fn process<S>(stack: &mut Stack<S>, ctx: &LaneContext, message: ReceivedMessage)
where
    S: Service<ConsumedEvent, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let started = Instant::now();
    let envelope = match EventEnvelope::from_message(message.as_message()) {
        Ok(envelope) => envelope,
        Err(error) => {
            ctx.metrics.record_decode_error();
            tracing::warn!(
                topic = message.topic(),
                partition = message.partition(),
                offset = message.offset(),
                error = %error,
                "undecodable message"
            );
            let ending = match &ctx.dlq {
                Some(publisher) => {
                    let reason = reason_for(error, 0);
                    publish_until_acked(publisher, &message, &reason, ctx.backoff).await;
                    Ending::DeadLettered
                }
                None => Ending::Failed,
            };
            ctx.metrics.record(ending, 0, started.elapsed());
            return;
        }
    };
    let event = ConsumedEvent::new(envelope, message);
    let mut round = 0u32;
    loop {
        let attempts_before = event.attempts_made();
        match stack.handle(event.clone()).await {
            Ok(ending) => {
                // Retries of this round only; earlier rounds were counted already.
                let retries = (event.attempts_made() - attempts_before).saturating_sub(1);
                ctx.metrics.record(ending, retries, started.elapsed());
                return;
            }
            Err(error) => {
                // The DLQ publish failed: the offset must not be committed, so handle
                // the message again (at-least-once) after a backoff.
                round += 1;
                let retries = (event.attempts_made() - attempts_before).saturating_sub(1);
                ctx.metrics.record_retries(retries);
                let delay = ctx.backoff.delay(round);
                tracing::error!(
                    topic = event.topic(),
                    partition = event.partition(),
                    offset = event.offset(),
                    error = %error_chain(error.as_ref()),
                    backoff_ms = delay.as_millis() as u64,
                    "dead-letter publish failed; handling the message again"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn publish_until_acked(
    publisher: &DeadLetterPublisher,
    message: &ReceivedMessage,
    reason: &DeadLetterReason,
    backoff: Backoff,
) {
    let mut round = 0u32;
    loop {
        match publisher.publish(message, reason).await {
            Ok(landed) => {
                tracing::error!(
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    dlq_topic = %landed.topic,
                    dlq_offset = landed.offset,
                    "undecodable message dead-lettered"
                );
                return;
            }
            Err(e) => {
                round += 1;
                let delay = backoff.delay(round);
                tracing::error!(error = %e, backoff_ms = delay.as_millis() as u64, "dead-letter publish failed, retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}
