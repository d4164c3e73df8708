//! The response future of [`CircuitBreaker`](super::CircuitBreaker).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use super::breaker::{Breaker, Permit};
use super::error::{CircuitBreakerError, Rejection};
use crate::classify::{Classify, Outcome};

/// Settles an admitted call's permit: with its outcome on completion, or as
/// cancelled (a half-open probe slot is freed) when the future is dropped first.
pub(crate) struct Tracker<C> {
    breaker: Arc<Breaker>,
    permit: Permit,
    classifier: C,
}

impl<C> Tracker<C> {
    pub(crate) fn new(breaker: Arc<Breaker>, permit: Permit, classifier: C) -> Self {
        Tracker {
            breaker,
            permit,
            classifier,
        }
    }

    fn finish<T, E>(&mut self, result: Result<&T, &E>)
    where
        C: Classify<T, E>,
    {
        let outcome = match self.permit {
            Permit::Untracked => return,
            _ => self.classifier.classify(result).outcome,
        };
        let permit = std::mem::replace(&mut self.permit, Permit::Untracked);
        self.breaker.record(permit, outcome);
    }
}

impl<C> Drop for Tracker<C> {
    fn drop(&mut self) {
        if let Permit::Probe { .. } = self.permit {
            let permit = std::mem::replace(&mut self.permit, Permit::Untracked);
            self.breaker.record(permit, Outcome::Ignored);
        }
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Called { #[pin] future: F },
        Rejected { rejection: Rejection },
    }
}

pin_project! {
    /// The response future of [`CircuitBreaker`](super::CircuitBreaker): either the
    /// inner service's future, whose outcome is recorded when it completes, or an
    /// immediately ready rejection.
    pub struct ResponseFuture<F, C> {
        #[pin]
        kind: Kind<F>,
        tracker: Option<Tracker<C>>,
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn called(future: F, tracker: Tracker<C>) -> Self {
        ResponseFuture {
            kind: Kind::Called { future },
            tracker: Some(tracker),
        }
    }

    pub(crate) fn rejected(rejection: Rejection) -> Self {
        ResponseFuture {
            kind: Kind::Rejected { rejection },
            tracker: None,
        }
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Called { .. } => "called",
            Kind::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    C: Classify<T, E>,
{
    type Output = Result<T, CircuitBreakerError<E>>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Rejected { rejection } => {
                Poll::Ready(Err(CircuitBreakerError::from_rejection(*rejection)))
            }
            KindProj::Called { future } => {
                let result = ready!(future.poll(cx));
                if let Some(mut tracker) = this.tracker.take() {
                    tracker.finish(result.as_ref());
                }
                Poll::Ready(result.map_err(CircuitBreakerError::Inner))
            }
        }
    }
}
