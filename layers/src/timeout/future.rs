//! The response future of [`Timeout`](super::Timeout).

use super::error::TimeoutError;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
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
            // Boxed: a timer exists only on the slow path, and inline it would
            // triple the size (and the moving cost) of every response future.
            sleep: Option<Pin<Box<Sleep>>>,
            deadline: Deadline,
            timeout: Duration,
        },
        // The readiness wait used up the deadline: fail without calling the service.
        Elapsed { after: Duration },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(future: F, timeout: Duration, deadline: Deadline) -> Self {
        ResponseFuture {
            kind: Kind::Running {
                future,
                sleep: None,
                deadline,
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
                sleep,
                deadline,
                timeout,
            } => {
                if let Poll::Ready(result) = future.poll(cx) {
                    return Poll::Ready(result.map_err(TimeoutError::Inner));
                }
                if sleep.is_none() {
                    // First Pending: start the clock now (tokio saturates far deadlines).
                    *sleep = Some(Box::pin(match *deadline {
                        Deadline::AfterFirstPending => tokio::time::sleep(*timeout),
                        Deadline::At(at) => tokio::time::sleep_until(at),
                    }));
                }
                match sleep.as_mut().map(|s| s.as_mut().poll(cx)) {
                    Some(Poll::Ready(())) => {
                        Poll::Ready(Err(TimeoutError::Elapsed { after: *timeout }))
                    }
                    _ => Poll::Pending,
                }
            }
        }
    }
}
