use super::{BatchSizeError, Error};
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project! {
    /// The response future of [`BatchSize`](super::BatchSize): either the inner
    /// service's future or an immediate rejection.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Called { #[pin] future: F },
        Rejected { error: BatchSizeError },
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn called(future: F) -> Self {
        ResponseFuture {
            state: State::Called { future },
        }
    }

    pub(super) fn rejected(error: BatchSizeError) -> Self {
        ResponseFuture {
            state: State::Rejected { error },
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, Error<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { future } => future.poll(cx).map_err(Error::Inner),
            StateProj::Rejected { error } => Poll::Ready(Err(Error::Rejected(*error))),
        }
    }
}
