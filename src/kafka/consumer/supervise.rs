//! Supervision: handler panics become failures, a panic on the poll thread or in
//! a lane fails the consumer visibly, and partitions stuck on an unwritable
//! dead-letter topic are paused alone.

use super::control::ConsumerControl;
use super::error::{BoxError, HandlerError};
use super::event::ConsumedEvent;
use super::metrics::ConsumerMetrics;
use super::poll::Command;
use super::state::{ConsumerState, StateCell, StuckPartitions, truncate_utf8};
use super::tracker::TopicPartition;
use futures::FutureExt;
use futures::future::CatchUnwind;
use pin_project_lite::pin_project;
use std::any::Any;
use std::collections::HashSet;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use tokio::sync::{oneshot, watch};
use tower::Service;

/// Longest panic message kept (in the error, the DLQ header and the state).
const MAX_PANIC_MESSAGE: usize = 1024;

/// A handler panicked while handling a message. The runtime turns the panic into
/// this failure (class `panic`, retryable): the message is retried, then
/// dead-lettered like any failure, and the consumer goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("handler panicked: {message}")]
pub struct HandlerPanicked {
    message: String,
}

impl HandlerPanicked {
    /// The panic message (at most 1 KiB; `"<non-string panic payload>"` when the
    /// payload was not a string).
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// The text of a panic payload, bounded.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    let text = if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.as_str()
    } else {
        "<non-string panic payload>"
    };
    truncate_utf8(text, MAX_PANIC_MESSAGE).into_owned()
}

/// The user's handler with panics in `call` and in its future caught and turned
/// into [`HandlerPanicked`] failures. A panic in `poll_ready` is not caught: a
/// service that cannot say whether it is ready is broken, and the lane fails.
#[derive(Clone, Debug)]
pub(crate) struct CatchPanic<S> {
    inner: S,
    metrics: Arc<ConsumerMetrics>,
}

impl<S> CatchPanic<S> {
    pub(crate) fn new(inner: S, metrics: Arc<ConsumerMetrics>) -> Self {
        CatchPanic { inner, metrics }
    }
}

fn panicked(payload: &(dyn Any + Send), metrics: &ConsumerMetrics) -> BoxError {
    metrics.record_panic();
    let error = HandlerPanicked {
        message: panic_message(payload),
    };
    tracing::error!(error = %error, "handler panicked; counted as a failure of class panic");
    Box::new(HandlerError::retryable(error).with_class("panic"))
}

impl<S> Service<ConsumedEvent> for CatchPanic<S>
where
    S: Service<ConsumedEvent, Response = ()>,
    S::Error: Into<BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = CatchPanicFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, event: ConsumedEvent) -> Self::Future {
        let state = match catch_unwind(AssertUnwindSafe(|| self.inner.call(event))) {
            Ok(future) => FutureState::Running {
                future: AssertUnwindSafe(future).catch_unwind(),
            },
            Err(payload) => FutureState::Panicked {
                error: Some(panicked(&*payload, &self.metrics)),
            },
        };
        CatchPanicFuture {
            state,
            metrics: self.metrics.clone(),
        }
    }
}

pin_project! {
    /// The future of [`CatchPanic`].
    pub(crate) struct CatchPanicFuture<F> {
        #[pin]
        state: FutureState<F>,
        metrics: Arc<ConsumerMetrics>,
    }
}

pin_project! {
    #[project = FutureStateProj]
    enum FutureState<F> {
        Running { #[pin] future: CatchUnwind<AssertUnwindSafe<F>> },
        Panicked { error: Option<BoxError> },
    }
}

impl<F, E> Future for CatchPanicFuture<F>
where
    F: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            FutureStateProj::Running { future } => Poll::Ready(match ready!(future.poll(cx)) {
                Ok(result) => result.map_err(Into::into),
                Err(payload) => Err(panicked(&*payload, this.metrics)),
            }),
            FutureStateProj::Panicked { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| "handler panicked (polled again)".into()))),
        }
    }
}

/// Runs `body` (the poll loop); a panic fails the consumer with its message.
pub(crate) fn guard_thread(what: &str, state: &StateCell, body: impl FnOnce()) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(body)) {
        state.fail(&format!("{what} panicked: {}", panic_message(&*payload)));
    }
}

/// Runs a lane; a panic fails the consumer with its message.
pub(crate) async fn guard_lane(
    lane: impl Future<Output = ()>,
    index: usize,
    state: Arc<StateCell>,
) {
    if let Err(payload) = AssertUnwindSafe(lane).catch_unwind().await {
        state.fail(&format!(
            "lane {index} panicked: {}",
            panic_message(&*payload)
        ));
    }
}

/// The supervisor task: stops the consumer when it fails, and pauses each
/// partition stuck on an unwritable dead-letter topic (resuming it once the
/// message is out), so the other partitions go on.
pub(crate) async fn supervise(
    control: Weak<ConsumerControl>,
    mut state: watch::Receiver<ConsumerState>,
    mut stuck: watch::Receiver<u64>,
    partitions: Arc<StuckPartitions>,
) {
    // Partitions this task paused (a partition the user paused is left alone).
    let mut paused_by_us: HashSet<TopicPartition> = HashSet::new();
    loop {
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = state.borrow_and_update().clone();
                match now {
                    ConsumerState::Failed { .. } => {
                        if let Some(control) = control.upgrade() {
                            control.stop_after_failure();
                        }
                        return;
                    }
                    ConsumerState::Stopped => return,
                    _ => {}
                }
            }
            changed = stuck.changed() => {
                if changed.is_err() {
                    return;
                }
                stuck.mark_unchanged();
                let Some(control) = control.upgrade() else { return };
                let now: HashSet<TopicPartition> = partitions.partitions().into_iter().collect();
                for tp in now.difference(&paused_by_us.clone()) {
                    let user_paused = control.shared.paused_all.load(Ordering::SeqCst)
                        || control.shared.paused().contains(tp);
                    if user_paused {
                        continue;
                    }
                    tracing::warn!(%tp, "dead-letter publish failing: partition paused until it succeeds");
                    if command(&control, |ack| Command::Pause(Some(tp.clone()), ack)).await {
                        paused_by_us.insert(tp.clone());
                    } else {
                        // Not paused (no longer assigned, say): do not leave it
                        // marked, or a later assignment would start paused.
                        control.shared.paused().remove(tp);
                    }
                }
                for tp in paused_by_us.clone().difference(&now) {
                    paused_by_us.remove(tp);
                    tracing::info!(%tp, "dead-letter publish succeeded: partition resumed");
                    command(&control, |ack| Command::Resume(Some(tp.clone()), ack)).await;
                }
            }
        }
    }
}

async fn command(
    control: &ConsumerControl,
    make: impl FnOnce(oneshot::Sender<Result<(), super::ConsumerError>>) -> Command,
) -> bool {
    let (tx, rx) = oneshot::channel();
    if control.send(make(tx)).is_err() {
        return false;
    }
    match rx.await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "pausing or resuming a stuck partition failed");
            false
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::consumer::event::test_event;
    use crate::kafka::consumer::{HandlerErrors, error_chain};
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panic_in_the_future_or_in_call_is_a_failure_of_class_panic() {
        let metrics = Arc::new(ConsumerMetrics::default());
        let in_future = tower::service_fn(|_e: ConsumedEvent| async {
            if true {
                panic!("bad state {}", 42);
            }
            Ok::<_, BoxError>(())
        });
        let err = CatchPanic::new(in_future, metrics.clone())
            .oneshot(test_event("a"))
            .await
            .unwrap_err();
        let c = HandlerErrors::classify_error(err.as_ref());
        assert_eq!(c.class, "panic");
        assert!(c.should_retry());
        assert!(error_chain(err.as_ref()).contains("bad state 42"));

        #[derive(Clone)]
        struct PanicsInCall;
        impl Service<ConsumedEvent> for PanicsInCall {
            type Response = ();
            type Error = BoxError;
            type Future = std::future::Ready<Result<(), BoxError>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: ConsumedEvent) -> Self::Future {
                panic!("{}", "x".repeat(5000))
            }
        }
        let err = CatchPanic::new(PanicsInCall, metrics.clone())
            .oneshot(test_event("a"))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("handler panicked: xxx"), "{text}");
        assert!(text.len() < 1100, "panic text bounded: {}", text.len());
        assert_eq!(metrics.snapshot().total_panics, 2);
    }

    #[test]
    fn a_panicking_thread_body_fails_the_state() {
        let state = StateCell::new();
        state.running();
        guard_thread("the poll thread", &state, || panic!("lost the consumer"));
        assert_eq!(
            state.get(),
            ConsumerState::Failed {
                reason: "the poll thread panicked: lost the consumer".into()
            }
        );
    }

    #[tokio::test]
    async fn a_panicking_lane_fails_the_state() {
        let state = Arc::new(StateCell::new());
        let mut rx = state.subscribe();
        tokio::spawn(guard_lane(async { panic!("lane bug") }, 3, state.clone()));
        rx.wait_for(ConsumerState::is_failed).await.unwrap();
        assert_eq!(
            state.get(),
            ConsumerState::Failed {
                reason: "lane 3 panicked: lane bug".into()
            }
        );
    }
}
