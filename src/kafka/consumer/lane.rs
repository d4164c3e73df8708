//! A lane: one task draining one bounded queue of batches, one message at a time.
//!
//! The lane reports finished offsets to the poll thread in batches too: after each
//! batch when the queue runs empty, and during a long batch at least every 10 ms —
//! also while one slow message runs — so commits never wait behind slow handlers.

use super::attempts::CountAttempts;
use super::batch::BatchLane;
use super::error::HandlerErrors;
use super::error::{BoxError, error_chain};
use super::event::{ConsumedEvent, ReceivedMessage};
use super::metrics::{ConsumerMetrics, Ending};
use super::ownership::Ownership;
use super::poison_guard::PoisonGuardState;
use super::poll::{Batch, Completion};
use super::state::{DeadLetterFailure, StateCell, StuckPartitions};
use super::supervise::CatchPanic;
use super::tracker::TopicPartition;
use crate::kafka::dead_letter::{DeadLetterPublisher, DeadLetterReason, reason_for};
use keel_layers::retry::{Backoff, Retry, RetryLayer, RetryPolicy};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tracing::Instrument;

type Retried<S> = Retry<CountAttempts<CatchPanic<S>>, HandlerErrors>;

/// The per-lane handler stack the runtime builds from the start options:
/// panics caught, attempts counted, retries. Dead-lettering is done by the lane
/// (see [`dead_letter`]) so that a failed publish is retried without running the
/// handler again.
pub(crate) struct Stack<S: Service<ConsumedEvent>> {
    retry: Retried<S>,
    /// Batch handlers, when the consumer has some (see `batch.rs`).
    batch: Option<BatchLane>,
}

pub(crate) struct LaneContext {
    pub(crate) completions: mpsc::UnboundedSender<Vec<Completion>>,
    pub(crate) metrics: Arc<ConsumerMetrics>,
    pub(crate) dlq: Option<DeadLetterPublisher>,
    pub(crate) backoff: Backoff,
    pub(crate) on_dlq_failure: DeadLetterFailure,
    pub(crate) stuck: Arc<StuckPartitions>,
    pub(crate) state: Arc<StateCell>,
    /// The lanes' stop signal, for messages whose dead-letter publish is retried
    /// outside the lane.
    pub(crate) stop: watch::Receiver<bool>,
    /// The assignments still owned: messages of revoked ones are dropped.
    pub(crate) ownership: Arc<Ownership>,
    /// Dead-letter records that are not keel envelopes (else hand them over).
    pub(crate) require_envelope: bool,
    /// The consumer group, for the `process` spans' `messaging.consumer.group.name`.
    #[cfg(feature = "otel")]
    pub(crate) group: Arc<str>,
    /// The poison-rate guard, when one is configured.
    pub(crate) poison_guard: Option<Arc<PoisonGuardState>>,
}

impl LaneContext {
    /// Counts how a message ended: in the metrics, and for the poison-rate guard
    /// (which may trip on it).
    fn ended(&self, ending: Ending, retries: u32, took: Duration) {
        self.metrics.record(ending, retries, took);
        if let Some(guard) = &self.poison_guard
            && let Some(reason) = guard.ended(ending)
        {
            guard.tripped_by(&reason, &self.state);
        }
    }
}

impl<S> Stack<S>
where
    S: Service<ConsumedEvent, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    pub(crate) fn new(handler: S, policy: RetryPolicy, metrics: Arc<ConsumerMetrics>) -> Self {
        let retry = tower::Layer::layer(
            &RetryLayer::new(policy).classifier(HandlerErrors),
            CountAttempts::new(CatchPanic::new(handler, metrics)),
        );
        Stack { retry, batch: None }
    }

    /// Runs the records of `routes`' topics through their batch handlers.
    pub(crate) fn with_batches(mut self, batch: Option<BatchLane>) -> Self {
        self.batch = batch;
        self
    }

    /// Runs the handler with its retries; the last error when it finally fails.
    async fn handle(&mut self, event: ConsumedEvent) -> Result<(), BoxError> {
        self.retry.ready().await?.call(event).await
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

    fn is_empty(&self) -> bool {
        self.completions.is_empty()
    }

    /// When the oldest unreported completion is due to be reported.
    fn due(&self) -> Instant {
        self.since + REPORT_INTERVAL
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
    index: usize,
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
    let mut owned = ctx.ownership.view();
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
                ctx.ownership.holding(index, false);
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
        // Batch handlers: wait for a fuller batch if asked to, then cut batches.
        let batch = match &stack.batch {
            Some(b) if b.would_wait(&batch) => {
                finished.report(&ctx.completions);
                ctx.ownership.holding(index, false);
                b.gather(batch, &mut queue, &mut stop).await
            }
            _ => batch,
        };
        if let Some(b) = &mut stack.batch {
            b.prepare(&batch);
        }
        for work in batch {
            // Stop between messages: the rest of the batch stays uncommitted.
            if *stop.borrow() {
                break 'lane;
            }
            // A tripped poison-rate guard holds the lane before its next message
            // (reporting what finished first): the message stays uncommitted.
            if let Some(guard) = ctx.poison_guard.as_ref().filter(|g| g.is_tripped()) {
                finished.report(&ctx.completions);
                ctx.ownership.holding(index, false);
                if !guard.held(&mut stop).await {
                    break 'lane;
                }
            }
            // Yield now and then so a queue the poll thread keeps full cannot
            // starve other tasks of this worker.
            tokio::task::coop::consume_budget().await;
            let offset = work.message.offset();
            // A revocation happened: report what finished now, so that it can
            // still be committed for the revoked partitions (else their new owner
            // would handle it again).
            if ctx.ownership.moved_since(&owned) {
                finished.report(&ctx.completions);
                ctx.ownership.holding(index, false);
            }
            // Revocation barrier: a message of a partition revoked since it was
            // queued is dropped; its new owner handles it.
            if !ctx.ownership.begin(index, work.epoch, &mut owned) {
                ctx.metrics.record_revoked_drop();
                tracing::debug!(tp = %work.tp, offset, "message of a revoked partition dropped");
                continue;
            }
            // With `otel`: the same span, named `process <topic>` for OpenTelemetry
            // and the child of the producer's context found in the headers.
            #[cfg(feature = "otel")]
            let span = crate::kafka::otel::process_span(&work.message, &ctx.group);
            #[cfg(not(feature = "otel"))]
            let span = tracing::info_span!(
                "kafka_message",
                topic = %work.tp.topic,
                partition = work.tp.partition,
                offset
            );
            let completion = Completion {
                tp: work.tp,
                epoch: work.epoch,
                offset,
            };
            // `None`: its dead-letter publish goes on outside the lane, which
            // reports the completion once the message is out.
            let handled = process(&mut stack, &ctx, &completion, work.message).instrument(span);
            let done = if finished.is_empty() {
                handled.await
            } else {
                // A slow message must not hold back what finished before it:
                // report that when it is due, then go on waiting.
                tokio::pin!(handled);
                tokio::select! {
                    biased;
                    done = &mut handled => done,
                    _ = tokio::time::sleep_until(finished.due()) => {
                        finished.report(&ctx.completions);
                        ctx.ownership.holding(index, false);
                        handled.await
                    }
                }
            };
            let Some(done) = done else {
                ctx.ownership.end(index);
                continue;
            };
            finished.push(completion, done);
            ctx.ownership.holding(index, true);
            // A revocation waits for this lane: report first, so that the barrier
            // commits this message before the partition goes.
            if finished.overdue(done) || ctx.ownership.moved_since(&owned) {
                finished.report(&ctx.completions);
                ctx.ownership.holding(index, false);
            }
            ctx.ownership.end(index);
        }
    }
    finished.report(&ctx.completions);
    ctx.ownership.holding(index, false);
}

/// Handles one message to its end; returns when it finished, or `None` when its
/// dead-letter publish failed and goes on in the background.
async fn process<S>(
    stack: &mut Stack<S>,
    ctx: &Arc<LaneContext>,
    at: &Completion,
    message: ReceivedMessage,
) -> Option<Instant>
where
    S: Service<ConsumedEvent, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let started = Instant::now();
    let batched = match &mut stack.batch {
        Some(b) => {
            // The group names the batch span (`otel` only).
            #[cfg(feature = "otel")]
            let group: &str = &ctx.group;
            #[cfg(not(feature = "otel"))]
            let group = "";
            b.outcome(&(at.tp.clone(), at.offset), ctx.require_envelope, group)
                .await
        }
        None => None,
    };
    let (event, result) = match batched {
        // Failed in its batch: handled again alone with the retries, unless
        // the failure is permanent.
        Some((event, Err(error))) if stack.batch.as_ref().is_some_and(|b| b.rerun(&error)) => {
            tokio::time::sleep(ctx.backoff.delay(1)).await;
            let result = stack.handle(event.clone()).await;
            (event, result)
        }
        Some(outcome) => outcome,
        None => match decode_and_handle(stack, ctx, at, message, started).await {
            Ok(handled) => handled,
            Err(done) => return done,
        },
    };
    finish(ctx, at, event, result, started).await
}

/// Decodes a message (dead-letters it when that fails: `Err` with the lane's
/// answer) and runs the handler stack on it.
async fn decode_and_handle<S>(
    stack: &mut Stack<S>,
    ctx: &Arc<LaneContext>,
    at: &Completion,
    message: ReceivedMessage,
    started: Instant,
) -> Result<(ConsumedEvent, Result<(), BoxError>), Option<Instant>>
where
    S: Service<ConsumedEvent, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    // keel's envelope is one decoder among others: required, a record that is
    // not one is dead-lettered here; otherwise the handler decodes it.
    let decoded = super::decode::envelope_of(&message, ctx.require_envelope);
    let envelope = match decoded {
        Ok(envelope) => envelope,
        Err(reason) => {
            #[cfg(feature = "otel")]
            crate::kafka::otel::record_process_error(&reason.error_type);
            ctx.metrics.record_decode_error();
            tracing::warn!(
                topic = message.topic(),
                partition = message.partition(),
                offset = message.offset(),
                error = %reason.message,
                "undecodable message"
            );
            return Err(match &ctx.dlq {
                Some(publisher) => dead_letter(ctx, publisher, at, message, reason, started).await,
                None => {
                    let done = Instant::now();
                    ctx.ended(Ending::Failed, 0, done - started);
                    Some(done)
                }
            });
        }
    };
    let event = match envelope {
        Some(envelope) => ConsumedEvent::new(envelope, message),
        None => ConsumedEvent::from_record(message),
    };
    let result = stack.handle(event.clone()).await;
    Ok((event, result))
}

/// Counts a handled message, or dead-letters (or skips) a failed one.
async fn finish(
    ctx: &Arc<LaneContext>,
    at: &Completion,
    event: ConsumedEvent,
    result: Result<(), BoxError>,
    started: Instant,
) -> Option<Instant> {
    let retries = event.attempts_made().saturating_sub(1);
    let error = match result {
        Ok(()) => {
            let done = Instant::now();
            ctx.ended(Ending::Processed, retries, done - started);
            return Some(done);
        }
        Err(error) => error,
    };
    #[cfg(feature = "otel")]
    crate::kafka::otel::record_process_error(handler_error_type(error.as_ref()));
    match &ctx.dlq {
        Some(publisher) => {
            let reason = reason_for(error, event.attempts_made().max(1));
            ctx.metrics.record_retries(retries);
            dead_letter(ctx, publisher, at, event.message().clone(), reason, started).await
        }
        None => {
            tracing::error!(
                topic = event.topic(),
                partition = event.partition(),
                offset = event.offset(),
                event_type = event.event_type(),
                attempts = event.attempts_made(),
                error = %error_chain(error.as_ref()),
                "handler failed and the DLQ is disabled: message skipped"
            );
            let done = Instant::now();
            ctx.ended(Ending::Failed, retries, done - started);
            Some(done)
        }
    }
}

/// The `error.type` of a failed handler: the [`HandlerError`]'s type when the
/// handler gave one, else its class (`transient`, `permanent`, ...).
///
/// [`HandlerError`]: crate::kafka::consumer::HandlerError
#[cfg(feature = "otel")]
fn handler_error_type(error: &(dyn std::error::Error + 'static)) -> &'static str {
    match error.downcast_ref::<super::HandlerError>() {
        Some(h) => h.error_type(),
        None => HandlerErrors::classify_error(error).class,
    }
}

/// Publishes a failed message to its dead-letter topic. On success the message is
/// finished. On failure the handler is not run again: the publish is retried in a
/// task of its own (the lane goes on with other messages; the supervisor pauses the
/// message's partition) per [`DeadLetterFailure`]; the message stays unfinished, so
/// nothing of its partition is committed past it. Returns `None` then.
async fn dead_letter(
    ctx: &Arc<LaneContext>,
    publisher: &DeadLetterPublisher,
    at: &Completion,
    message: ReceivedMessage,
    reason: DeadLetterReason,
    started: Instant,
) -> Option<Instant> {
    match publisher.publish(&message, &reason).await {
        Ok(landed) => {
            log_dead_lettered(&message, &reason, &landed.topic, landed.offset);
            let done = Instant::now();
            ctx.ended(Ending::DeadLettered, 0, done - started);
            Some(done)
        }
        Err(error) => {
            if publish_failed(ctx, &at.tp, at.offset, &error.to_string()) {
                let task = keep_publishing(
                    ctx.clone(),
                    publisher.clone(),
                    Completion {
                        tp: at.tp.clone(),
                        epoch: at.epoch,
                        offset: at.offset,
                    },
                    message,
                    reason,
                    started,
                );
                tokio::spawn(task.in_current_span());
            }
            None
        }
    }
}

/// Counts a failed dead-letter publish; `false` when the policy says to stop (the
/// consumer is failed then).
fn publish_failed(ctx: &LaneContext, tp: &TopicPartition, offset: i64, error: &str) -> bool {
    ctx.metrics.record_dlq_failure();
    let failures = ctx.stuck.failed(tp, offset, error);
    tracing::error!(%tp, offset, failures, error, "dead-letter publish failed; the partition is held (not committed past this message)");
    match ctx.on_dlq_failure {
        DeadLetterFailure::StopConsumer { after_failures } if failures >= after_failures.max(1) => {
            ctx.state.fail(&format!(
                "message {tp}@{offset} could not be dead-lettered after {failures} attempts: {error}"
            ));
            false
        }
        _ => true,
    }
}

/// Retries a dead-letter publish with the retry policy's backoff until it is
/// acknowledged (then reports the completion), the policy stops the consumer, or
/// the lanes stop (then the message is left unfinished: delivered again later).
async fn keep_publishing(
    ctx: Arc<LaneContext>,
    publisher: DeadLetterPublisher,
    at: Completion,
    message: ReceivedMessage,
    reason: DeadLetterReason,
    started: Instant,
) {
    let mut stop = ctx.stop.clone();
    let mut round = 1u32;
    loop {
        let delay = ctx.backoff.delay(round);
        let published = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => None,
            published = async {
                tokio::time::sleep(delay).await;
                publisher.publish(&message, &reason).await
            } => Some(published),
        };
        // Revoked meanwhile: the new owner handles (and dead-letters) it.
        let published = published.filter(|_| ctx.ownership.owns(at.epoch));
        match published {
            None => {
                ctx.stuck.cleared(&at.tp, at.offset);
                return;
            }
            Some(Ok(landed)) => {
                ctx.stuck.cleared(&at.tp, at.offset);
                log_dead_lettered(&message, &reason, &landed.topic, landed.offset);
                ctx.ended(Ending::DeadLettered, 0, Instant::now() - started);
                let _ = ctx.completions.send(vec![at]);
                return;
            }
            Some(Err(error)) => {
                if !publish_failed(&ctx, &at.tp, at.offset, &error.to_string()) {
                    return;
                }
                round = round.saturating_add(1);
            }
        }
    }
}

fn log_dead_lettered(
    message: &ReceivedMessage,
    reason: &DeadLetterReason,
    topic: &str,
    offset: i64,
) {
    tracing::error!(
        topic = message.topic(),
        partition = message.partition(),
        offset = message.offset(),
        attempts = reason.attempts,
        error_kind = %reason.kind,
        error = %reason.message,
        dlq_topic = %topic,
        dlq_offset = offset,
        "message dead-lettered"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::consumer::poll::{Work, lane_shape};
    use crate::kafka::consumer::tracker::TopicPartition;
    use crate::kafka::envelope::EventEnvelope;
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
            on_dlq_failure: DeadLetterFailure::default(),
            stuck: Arc::new(StuckPartitions::new()),
            state: Arc::new(StateCell::new()),
            stop: watch::channel(false).1,
            ownership: {
                let ownership = Ownership::new(1);
                ownership.grant(1);
                Arc::new(ownership)
            },
            require_envelope: true,
            #[cfg(feature = "otel")]
            group: Arc::from("test-group"),
            poison_guard: None,
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
        let stack = Stack::new(
            handler,
            RetryPolicy::kafka().without_budget(),
            ctx.metrics.clone(),
        );
        let (queue, rx) = mpsc::channel(1);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_lane(0, rx, stack, ctx.clone(), stop_rx));
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
    /// at most 10 ms after the oldest finished (also while a message runs), the
    /// rest once the queue is empty.
    #[tokio::test(start_paused = true)]
    async fn queued_messages_of_a_revoked_partition_are_dropped_and_the_running_one_reported() {
        let (kept, revoked) = (TopicPartition::new("t", 0), TopicPartition::new("t", 1));
        let handled = Arc::new(Mutex::new(Vec::new()));
        let started = Arc::new(Notify::new());
        let handler = {
            let (handled, started) = (handled.clone(), started.clone());
            tower::service_fn(move |event: ConsumedEvent| {
                let (handled, started) = (handled.clone(), started.clone());
                async move {
                    started.notify_one();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    handled
                        .lock()
                        .unwrap()
                        .push((event.partition(), event.offset()));
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
        // Epoch 1 is `kept` (granted by `context`), epoch 2 `revoked`.
        ctx.ownership.grant(2);
        let of = |tp: &TopicPartition, offset: i64, epoch: u64| Work {
            epoch,
            ..work(tp, offset)
        };
        queue
            .send(vec![
                of(&revoked, 0, 2),
                of(&kept, 0, 1),
                of(&revoked, 1, 2),
                of(&kept, 1, 1),
            ])
            .await
            .unwrap();
        // Revoked while its first message runs: that one finishes and is
        // reported at once (the barrier commits it); the queued one is dropped.
        started.notified().await;
        ctx.ownership.withdraw(&[2]);
        let first = reports.recv().await.unwrap();
        assert_eq!(
            first
                .iter()
                .map(|c| (c.tp.partition, c.offset))
                .collect::<Vec<_>>(),
            [(1, 0)]
        );
        drop(queue);
        lane.await.unwrap();
        assert_eq!(*handled.lock().unwrap(), [(1, 0), (0, 0), (0, 1)]);
        assert_eq!(ctx.metrics.snapshot().revoked_dropped, 1);
        assert!(
            ctx.ownership.wait_reported(Duration::ZERO),
            "a lane still holds completions"
        );
    }

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
        let start = tokio::time::Instant::now();
        queue
            .send((0..5).map(|o| work(&tp, o)).collect())
            .await
            .unwrap();
        // Finished at 4, 8, 12 ms; at 14 ms, while the fourth still runs, the
        // first has waited 10 ms: 0-2 are reported then, not when the fourth ends.
        assert_eq!(offsets(&reports.recv().await.unwrap()), [0, 1, 2]);
        assert_eq!(
            tokio::time::Instant::now().duration_since(start),
            Duration::from_millis(14)
        );
        // 3 and 4 finish at 16 and 20 ms, reported when the queue runs empty.
        assert_eq!(offsets(&reports.recv().await.unwrap()), [3, 4]);
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

    /// A tripped poison-rate guard holds the lane before its next message: what
    /// finished is reported, the rest waits unhandled (uncommitted) until release.
    #[tokio::test(start_paused = true)]
    async fn a_tripped_poison_guard_holds_the_lane_until_released() {
        use crate::kafka::consumer::poison_guard::{PoisonGuard, PoisonGuardState};
        let tp = TopicPartition::new("t", 0);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let handler = {
            let calls = calls.clone();
            tower::service_fn(move |event: ConsumedEvent| {
                let calls = calls.clone();
                async move {
                    calls.lock().unwrap().push(event.offset());
                    Err::<(), BoxError>(Box::new(super::super::HandlerError::permanent(
                        std::io::Error::other("bad deploy"),
                    )))
                }
            })
        };
        let (ctx, mut reports) = context();
        let mut ctx = Arc::into_inner(ctx).unwrap();
        let guard =
            Arc::new(PoisonGuardState::new(PoisonGuard::new().max_dead_lettered(2)).unwrap());
        ctx.poison_guard = Some(guard.clone());
        let ctx = Arc::new(ctx);
        let stack = Stack::new(
            handler,
            RetryPolicy::kafka().without_budget(),
            ctx.metrics.clone(),
        );
        let (queue, rx) = mpsc::channel(1);
        let (stop, stop_rx) = watch::channel(false);
        let lane = tokio::spawn(run_lane(0, rx, stack, ctx.clone(), stop_rx));
        queue
            .send((0..5).map(|o| work(&tp, o)).collect())
            .await
            .unwrap();
        assert_eq!(offsets(&reports.recv().await.unwrap()), [0, 1]);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(
            *calls.lock().unwrap(),
            [0, 1],
            "held after the second failure"
        );
        assert!(guard.reason().unwrap().contains("limit 2 records"));
        assert_eq!(ctx.metrics.snapshot().total_failed, 2);

        assert!(guard.release());
        // 2 and 3 trip it again (the window was cleared); 4 waits.
        assert_eq!(offsets(&reports.recv().await.unwrap()), [2, 3]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(*calls.lock().unwrap(), [0, 1, 2, 3]);
        stop.send(true).unwrap();
        lane.await.unwrap();
        assert_eq!(*calls.lock().unwrap(), [0, 1, 2, 3], "stopped while held");
    }
}
