//! The response future of [`HandlerRegistry`](super::HandlerRegistry).

use super::Handler;
use crate::kafka::consumer::{ConsumedEvent, HandlerError};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::{Future, Ready};
use std::pin::Pin;
use std::task::{Context, Poll};
use tower::util::Oneshot;

pin_project! {
    /// Resolves when the handler the event was routed to has handled it, or at
    /// once for an event type without a handler (skipped, or failed with
    /// [`HandlerError::unknown_event_type`]).
    pub struct ResponseFuture {
        #[pin]
        kind: Kind,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind {
        Routed { #[pin] handler: Oneshot<Handler, ConsumedEvent> },
        Unrouted { #[pin] answer: Ready<Result<(), HandlerError>> },
    }
}

impl ResponseFuture {
    pub(super) fn routed(handler: Handler, event: ConsumedEvent) -> Self {
        ResponseFuture {
            kind: Kind::Routed {
                handler: Oneshot::new(handler, event),
            },
        }
    }

    pub(super) fn unrouted(answer: Result<(), HandlerError>) -> Self {
        ResponseFuture {
            kind: Kind::Unrouted {
                answer: std::future::ready(answer),
            },
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let routed = matches!(self.kind, Kind::Routed { .. });
        f.debug_struct("ResponseFuture")
            .field("routed", &routed)
            .finish()
    }
}

impl Future for ResponseFuture {
    type Output = Result<(), HandlerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Routed { handler } => handler.poll(cx),
            KindProj::Unrouted { answer } => answer.poll(cx),
        }
    }
}
