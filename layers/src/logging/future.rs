use super::layer::Config;
use crate::classify::{Classify, Outcome};
use pin_project_lite::pin_project;
use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tracing::{Level, Span};

/// Emits one event at a level chosen at run time (tracing's macros need a constant
/// level, hence one call site per level).
macro_rules! event_at {
    ($level:expr, $($rest:tt)+) => {
        match $level {
            Level::ERROR => tracing::event!(target: "keel_layers::logging", Level::ERROR, $($rest)+),
            Level::WARN => tracing::event!(target: "keel_layers::logging", Level::WARN, $($rest)+),
            Level::INFO => tracing::event!(target: "keel_layers::logging", Level::INFO, $($rest)+),
            Level::DEBUG => tracing::event!(target: "keel_layers::logging", Level::DEBUG, $($rest)+),
            Level::TRACE => tracing::event!(target: "keel_layers::logging", Level::TRACE, $($rest)+),
        }
    };
}

/// What a logged call carries until it completes.
#[derive(Debug)]
pub(super) struct Logged<C> {
    pub(super) span: Span,
    /// Nanoseconds on `config.clock`.
    pub(super) start: u64,
    pub(super) config: Arc<Config>,
    pub(super) classifier: C,
}

pin_project! {
    /// The response future of [`Logging`](super::Logging): runs the inner future in
    /// the call's span and logs its outcome once it completes.
    #[derive(Debug)]
    pub struct ResponseFuture<F, C> {
        #[pin]
        pub(super) inner: F,
        // `None` when logging was disabled at call time, or after completion.
        // Boxed: only calls that log pay for it (next to a span, a small
        // allocation), and a call that does not keeps a one-word field in a
        // future that is moved on every call.
        pub(super) logged: Option<Box<Logged<C>>>,
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    C: Classify<T, E>,
    E: Display,
{
    type Output = Result<T, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(logged) = this.logged.as_ref() else {
            return this.inner.poll(cx);
        };
        let result = {
            let _entered = logged.span.enter();
            ready!(this.inner.poll(cx))
        };
        if let Some(logged) = this.logged.take() {
            logged.emit(&result);
        }
        Poll::Ready(result)
    }
}

impl<C> Logged<C> {
    fn emit<T, E: Display>(self, result: &Result<T, E>)
    where
        C: Classify<T, E>,
    {
        let duration_ms = self.config.clock.now_nanos().saturating_sub(self.start) / 1_000_000;
        let verdict = self.classifier.classify(result.as_ref());
        let config = &*self.config;
        let (level, message, outcome) = match verdict.outcome {
            Outcome::Success => (config.success_level, config.success_message, "success"),
            Outcome::Failure => (config.failure_level, config.failure_message, "failure"),
            Outcome::Ignored => (config.ignored_level, config.ignored_message, "ignored"),
        };
        let class = (verdict.outcome != Outcome::Success).then_some(verdict.class);
        let error = match (verdict.outcome, result) {
            (Outcome::Failure, Err(e)) => Some(tracing::field::display(e)),
            _ => None,
        };
        let _entered = self.span.enter();
        event_at!(
            level,
            component = config.component,
            operation = config.operation,
            outcome,
            class,
            duration_ms,
            error,
            "{message}"
        );
    }
}
