//! A lane: one task draining one bounded queue of batches, one message at a time.
//!
//! The lane reports finished offsets to the poll thread in batches too: after each
//! batch when the queue runs empty, and during a long batch at least every 10 ms,
//! so commits never wait long behind slow handlers.

use super::attempts::CountAttempts;
use super::error::HandlerErrors;
use super::error::{BoxError, error_chain};
use super::event::{ConsumedEvent, MessageHeaders, ReceivedMessage};
use super::metrics::{ConsumerMetrics, Ending};
use super::poll::{Batch, Completion};
use crate::kafka::dead_letter::{
    DeadLetter, DeadLetterPublisher, DeadLetterReason, Disposition, reason_for,
};
use crate::kafka::envelope::EventEnvelope;
use keel_layers::retry::{Backoff, Retry, RetryLayer, RetryPolicy};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
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
    pub(crate) completions: mpsc::UnboundedSender<Vec<Completion>>,
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

/// Longest a lane keeps finished offsets before reporting them, while it works
/// through a batch of slow messages (a batch of fast ones is reported at its end).
const REPORT_INTERVAL: Duration = Duration::from_millis(10);

/// Finished messages of a lane not yet reported to the poll thread.
struct Finished {
    completions: Vec<Completion>,
    since: Instant,
}

impl Finished {
    fn new() -> Self {
        Finished {
            completions: Vec::new(),
            since: Instant::now(),
        }
    }

    /// Adds a message that finished at `at`.
    fn push(&mut self, completion: Completion, at: Instant) {
        if self.completions.is_empty() {
            self.since = at;
        }
        self.completions.push(completion);
    }

    /// Whether, at `now`, the oldest unreported completion waited
    /// `REPORT_INTERVAL` or longer.
    fn overdue(&self, now: Instant) -> bool {
        !self.completions.is_empty() && now.duration_since(self.since) >= REPORT_INTERVAL
    }

    /// Sends everything finished so far in one message (nothing when empty).
    fn report(&mut self, to: &mpsc::UnboundedSender<Vec<Completion>>) {
        if !self.completions.is_empty() {
            let _ = to.send(std::mem::take(&mut self.completions));
        }
    }
}

pub(crate) async fn run_lane<S>(
    mut queue: mpsc::Receiver<Batch>,
    mut stack: Stack<S>,
    ctx: Arc<LaneContext>,
    mut stop: watch::Receiver<bool>,
) where
    S: Service<ConsumedEvent, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let mut finished = Finished::new();
    'lane: loop {
        if *stop.borrow() {
            break;
        }
        // Fast path while the queue has work; park on both only when it is empty
        // (after reporting what is finished: nothing else would report it).
        let batch = match queue.try_recv() {
            Ok(batch) => batch,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                finished.report(&ctx.completions);
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|stop| *stop) => break,
                    batch = queue.recv() => match batch {
                        Some(batch) => batch,
                        None => break,
                    },
                }
            }
        };
        for work in batch {
            // Stop between messages: the rest of the batch stays uncommitted.
            if *stop.borrow() {
                break 'lane;
            }
            // Yield now and then so a queue the poll thread keeps full cannot
            // starve other tasks of this worker.
            tokio::task::coop::consume_budget().await;
            let offset = work.message.offset();
            let span = tracing::info_span!(
                "kafka_message",
                topic = %work.tp.topic,
                partition = work.tp.partition,
                offset
            );
            let done = process(&mut stack, &ctx, work.message)
                .instrument(span)
                .await;
            let completion = Completion {
                tp: work.tp,
                epoch: work.epoch,
                offset,
            };
            finished.push(completion, done);
            if finished.overdue(done) {
                finished.report(&ctx.completions);
            }
        }
    }
    finished.report(&ctx.completions);
}

/// Handles one message to its end; returns when it finished.
async fn process<S>(stack: &mut Stack<S>, ctx: &LaneContext, message: ReceivedMessage) -> Instant
where
    S: Service<ConsumedEvent, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let started = Instant::now();
    let envelope = match EventEnvelope::from_parts(
        message.payload(),
        message.key(),
        message
            .headers()
            .into_iter()
            .flat_map(MessageHeaders::entries),
        message.timestamp(),
    ) {
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
            let done = Instant::now();
            ctx.metrics.record(ending, 0, done - started);
            return done;
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
                let done = Instant::now();
                ctx.metrics.record(ending, retries, done - started);
                return done;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::consumer::poll::{Work, lane_shape};
    use crate::kafka::consumer::tracker::TopicPartition;
    use rdkafka::message::{OwnedMessage, Timestamp};
    use std::sync::Mutex;
    use tokio::sync::Notify;

    fn work(tp: &TopicPartition, offset: i64) -> Work {
        let encoded = EventEnvelope::new("e", serde_json::json!({"offset": offset}))
            .encode()
            .unwrap();
        let message = OwnedMessage::new(
            Some(encoded.value.clone()),
            None,
            tp.topic.to_string(),
            Timestamp::NotAvailable,
            tp.partition,
            offset,
            Some(encoded.owned_headers()),
        );
        Work {
            tp: tp.clone(),
            epoch: 1,
            message: ReceivedMessage::new(message),
        }
    }

    fn context() -> (Arc<LaneContext>, mpsc::UnboundedReceiver<Vec<Completion>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let policy = RetryPolicy::kafka().without_budget();
        let ctx = LaneContext {
            completions: tx,
            metrics: Arc::default(),
            dlq: None,
            backoff: *policy.schedule_config(),
        };
        (Arc::new(ctx), rx)
    }

    /// A lane running `handler` with the Kafka retry schedule.
    struct TestLane {
        queue: mpsc::Sender<Batch>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
        ctx: Arc<LaneContext>,
        reports: mpsc::UnboundedReceiver<Vec<Completion>>,
    }

    fn start_lane<S>(handler: S) -> TestLane
    where
        S: Service<ConsumedEvent, Response = ()> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let (ctx, reports) = context();
        let stack = Stack::new(handler, RetryPolicy::kafka().without_budget(), None);
        let (queue, rx) = mpsc::channel(1);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_lane(rx, stack, ctx.clone(), stop_rx));
        TestLane {
            queue,
            stop,
            task,
            ctx,
            reports,
        }
    }

    fn offsets(batch: &[Completion]) -> Vec<i64> {
        batch.iter().map(|c| c.offset).collect()
    }

    #[test]
    fn lane_shape_keeps_batches_within_the_capacity() {
        assert_eq!(lane_shape(256), (64, 4));
        assert_eq!(lane_shape(100), (64, 1));
        assert_eq!(lane_shape(16), (16, 1));
        assert_eq!(lane_shape(1), (1, 1));
    }

    /// A batch of slow messages (4 ms each, paused clock) is reported in order:
    /// every 10 ms while the batch runs, the rest once the queue is empty.
    #[tokio::test(start_paused = true)]
    async fn completions_come_back_in_order_in_batches() {
        let tp = TopicPartition::new("t", 0);
        let handled = Arc::new(Mutex::new(Vec::new()));
        let handler = {
            let handled = handled.clone();
            tower::service_fn(move |event: ConsumedEvent| {
                let handled = handled.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(4)).await;
                    handled.lock().unwrap().push(event.offset());
                    Ok::<_, BoxError>(())
                }
            })
        };
        let TestLane {
            queue,
            stop: _stop,
            task: lane,
            ctx,
            mut reports,
        } = start_lane(handler);
        queue
            .send((0..5).map(|o| work(&tp, o)).collect())
            .await
            .unwrap();
        // Finished at 4, 8, 12, 16 ms: the fourth is 12 ms after the first.
        assert_eq!(offsets(&reports.recv().await.unwrap()), [0, 1, 2, 3]);
        assert_eq!(offsets(&reports.recv().await.unwrap()), [4]);
        queue.send(vec![work(&tp, 5)]).await.unwrap();
        assert_eq!(offsets(&reports.recv().await.unwrap()), [5]);
        drop(queue);
        lane.await.unwrap();
        assert_eq!(*handled.lock().unwrap(), [0, 1, 2, 3, 4, 5]);
        assert_eq!(ctx.metrics.snapshot().total_processed, 6);
        drop(ctx);
        assert!(reports.recv().await.is_none(), "nothing reported twice");
    }

    /// Stopping in the middle of a batch finishes the current message, reports
    /// what is finished and leaves the rest of the batch unhandled (uncommitted).
    #[tokio::test(start_paused = true)]
    async fn a_stop_mid_batch_reports_what_finished_and_handles_no_more() {
        let tp = TopicPartition::new("t", 0);
        let second_started = Arc::new(Notify::new());
        let handled = Arc::new(Mutex::new(Vec::new()));
        let handler = {
            let (handled, second_started) = (handled.clone(), second_started.clone());
            tower::service_fn(move |event: ConsumedEvent| {
                let (handled, second_started) = (handled.clone(), second_started.clone());
                async move {
                    if event.offset() == 1 {
                        second_started.notify_one();
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    handled.lock().unwrap().push(event.offset());
                    Ok::<_, BoxError>(())
                }
            })
        };
        let TestLane {
            queue,
            stop,
            task: lane,
            ctx,
            mut reports,
        } = start_lane(handler);
        // Only the lane reports: when it ends, the reports end.
        drop(ctx);
        queue
            .send((0..4).map(|o| work(&tp, o)).collect())
            .await
            .unwrap();
        second_started.notified().await;
        stop.send(true).unwrap();
        lane.await.unwrap();
        assert_eq!(*handled.lock().unwrap(), [0, 1]);
        assert_eq!(offsets(&reports.recv().await.unwrap()), [0, 1]);
        assert!(reports.recv().await.is_none());
    }
}
