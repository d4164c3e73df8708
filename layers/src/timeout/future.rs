//! The response future of [`Timeout`](super::Timeout).

use super::error::TimeoutError;
use super::queue::{DeadlineQueue, QueueEntry};
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// When the deadline of one call falls.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Deadline {
    /// `timeout` after the inner future first returns `Pending`.
    AfterFirstPending,
    /// At a fixed instant (the readiness wait started the clock).
    At(Instant),
}

pin_project! {
    /// The future returned by [`Timeout`](super::Timeout).
    ///
    /// The timer is armed lazily: an inner future that is ready on its first poll
    /// never reads the clock nor creates a timer entry.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<F> {
        Running {
            #[pin]
            future: F,
            timer: Timer,
            timeout: Duration,
        },
        // The readiness wait used up the deadline: fail without calling the service.
        Elapsed { after: Duration },
    }
}

/// The timer of one call, armed at the first `Pending`.
#[derive(Debug)]
enum Timer {
    Unarmed {
        deadline: Deadline,
        queue: Option<Arc<DeadlineQueue>>,
    },
    /// A place in the service's shared queue.
    Queued(QueueEntry),
    // Boxed: inline it would triple the size (and the moving cost) of every
    // response future.
    Sleep(Pin<Box<Sleep>>),
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(
        future: F,
        timeout: Duration,
        deadline: Deadline,
        queue: Option<Arc<DeadlineQueue>>,
    ) -> Self {
        ResponseFuture {
            kind: Kind::Running {
                future,
                timer: Timer::Unarmed { deadline, queue },
                timeout,
            },
        }
    }

    pub(crate) fn elapsed(after: Duration) -> Self {
        ResponseFuture {
            kind: Kind::Elapsed { after },
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, TimeoutError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Elapsed { after } => {
                Poll::Ready(Err(TimeoutError::Elapsed { after: *after }))
            }
            KindProj::Running {
                future,
                timer,
                timeout,
            } => {
                if let Poll::Ready(result) = future.poll(cx) {
                    return Poll::Ready(result.map_err(TimeoutError::Inner));
                }
                if let Timer::Unarmed { deadline, queue } = timer {
                    // First Pending: start the clock now.
                    let deadline = *deadline;
                    let entry = match (deadline, queue.take()) {
                        (Deadline::AfterFirstPending, Some(q)) if !timeout.is_zero() => {
                            q.enter(cx.waker())
                        }
                        _ => None,
                    };
                    if let Some(entry) = entry {
                        // Just entered: its epoch is open, it cannot have fired.
                        *timer = Timer::Queued(entry);
                        return Poll::Pending;
                    }
                    // tokio saturates far deadlines.
                    *timer = Timer::Sleep(Box::pin(match deadline {
                        Deadline::AfterFirstPending => tokio::time::sleep(*timeout),
                        Deadline::At(at) => tokio::time::sleep_until(at),
                    }));
                }
                let elapsed = match timer {
                    Timer::Queued(entry) => entry.poll_elapsed(cx.waker()),
                    Timer::Sleep(sleep) => sleep.as_mut().poll(cx).is_ready(),
                    Timer::Unarmed { .. } => false,
                };
                if elapsed {
                    Poll::Ready(Err(TimeoutError::Elapsed { after: *timeout }))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}
