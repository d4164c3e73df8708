//! The response future of [`CircuitBreaker`](super::CircuitBreaker).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use super::breaker::{Breaker, Permit};
use super::error::{CircuitBreakerError, Rejection};
use super::slot::Slot;
use crate::classify::{Classify, Outcome};

/// Where an admitted call's outcome goes.
enum Recorder {
    /// Only the state word: a closed-state call of a breaker with no sliding
    /// window (or an uncounted call). No `Arc`, so no shared counter touched.
    Slot { slot: &'static Slot, threshold: u32 },
    /// The whole breaker: probes, and calls that feed a sliding window.
    Breaker(Arc<Breaker>),
}

/// Settles an admitted call's permit: with its outcome on completion, or as
/// cancelled (a half-open probe slot is freed) when the future is dropped first.
pub(crate) struct Tracker<C> {
    recorder: Recorder,
    permit: Permit,
    classifier: C,
}

impl<C> Tracker<C> {
    #[inline]
    pub(crate) fn new(breaker: &Arc<Breaker>, permit: Permit, classifier: C) -> Self {
        let recorder = match permit {
            Permit::Untracked => Recorder::Slot {
                slot: breaker.slot(),
                threshold: 0,
            },
            Permit::Counted { .. } if breaker.records_in_slot() => Recorder::Slot {
                slot: breaker.slot(),
                threshold: breaker.streak_threshold(),
            },
            _ => Recorder::Breaker(breaker.clone()),
        };
        Tracker {
            recorder,
            permit,
            classifier,
        }
    }

    #[inline]
    fn finish<T, E>(&mut self, result: Result<&T, &E>)
    where
        C: Classify<T, E>,
    {
        if let Permit::Untracked = self.permit {
            return;
        }
        let outcome = self.classifier.classify(result).outcome;
        let permit = std::mem::replace(&mut self.permit, Permit::Untracked);
        match (&self.recorder, permit) {
            (Recorder::Slot { slot, threshold }, Permit::Counted { generation, .. }) => {
                if outcome != Outcome::Ignored {
                    slot.record(generation, outcome == Outcome::Failure, *threshold);
                }
            }
            (Recorder::Breaker(breaker), permit) => breaker.record(permit, outcome),
            (Recorder::Slot { .. }, _) => {}
        }
    }
}

impl<C> Drop for Tracker<C> {
    fn drop(&mut self) {
        if let (Permit::Probe { .. }, Recorder::Breaker(breaker)) = (&self.permit, &self.recorder) {
            let permit = std::mem::replace(&mut self.permit, Permit::Untracked);
            breaker.record(permit, Outcome::Ignored);
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
