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

/// Where an admitted call's outcome goes. Kept flat and small: the future is
/// built in `call` and moved by the caller, and a compact value moves cheaply.
enum Recorder {
    /// Nothing to record: rejected, uncounted (forced closed), or already settled.
    Nothing,
    /// Only the state word: a closed-state call of a breaker with no sliding
    /// window. No `Arc`, so no shared reference count is touched.
    Slot {
        slot: &'static Slot,
        generation: u32,
        threshold: u32,
    },
    /// The whole breaker: probes, and calls that feed a sliding window.
    Breaker {
        breaker: Arc<Breaker>,
        permit: Permit,
    },
}

/// Settles an admitted call's permit: with its outcome on completion, or as
/// cancelled (a half-open probe slot is freed) when the future is dropped first.
pub(crate) struct Tracker<C> {
    recorder: Recorder,
    classifier: C,
}

impl<C> Tracker<C> {
    #[inline]
    pub(crate) fn new(breaker: &Arc<Breaker>, permit: Permit, classifier: C) -> Self {
        let recorder = match permit {
            Permit::Untracked => Recorder::Nothing,
            Permit::Counted { generation, .. } if breaker.records_in_slot() => Recorder::Slot {
                slot: breaker.slot(),
                generation,
                threshold: breaker.streak_threshold(),
            },
            permit => Recorder::Breaker {
                breaker: breaker.clone(),
                permit,
            },
        };
        Tracker {
            recorder,
            classifier,
        }
    }

    #[inline]
    fn rejected(classifier: C) -> Self {
        Tracker {
            recorder: Recorder::Nothing,
            classifier,
        }
    }

    #[inline]
    fn finish<T, E>(&mut self, result: Result<&T, &E>)
    where
        C: Classify<T, E>,
    {
        match std::mem::replace(&mut self.recorder, Recorder::Nothing) {
            Recorder::Nothing => {}
            Recorder::Slot {
                slot,
                generation,
                threshold,
            } => match self.classifier.classify(result).outcome {
                Outcome::Ignored => {}
                outcome => slot.record(generation, outcome == Outcome::Failure, threshold),
            },
            Recorder::Breaker { breaker, permit } => {
                breaker.record(permit, self.classifier.classify(result).outcome);
            }
        }
    }
}

impl<C> Drop for Tracker<C> {
    fn drop(&mut self) {
        if let Recorder::Breaker {
            permit: Permit::Probe { .. },
            ..
        } = &self.recorder
            && let Recorder::Breaker { breaker, permit } =
                std::mem::replace(&mut self.recorder, Recorder::Nothing)
        {
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
        tracker: Tracker<C>,
    }
}

impl<F, C> ResponseFuture<F, C> {
    #[inline]
    pub(crate) fn called(future: F, tracker: Tracker<C>) -> Self {
        ResponseFuture {
            kind: Kind::Called { future },
            tracker,
        }
    }

    #[inline]
    pub(crate) fn rejected(rejection: Rejection, classifier: C) -> Self {
        ResponseFuture {
            kind: Kind::Rejected { rejection },
            tracker: Tracker::rejected(classifier),
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
                this.tracker.finish(result.as_ref());
                Poll::Ready(result.map_err(CircuitBreakerError::Inner))
            }
        }
    }
}
