use super::handle::Recorder;
use crate::classify::Classify;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

/// Counts a call as cancelled if its future is dropped before completing.
pub(super) struct InFlight(pub(super) Option<Arc<Recorder>>);

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("InFlight").field(&self.0.is_some()).finish()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(recorder) = self.0.take() {
            recorder.cancel();
        }
    }
}

pin_project! {
    /// The response future of [`Metrics`](super::Metrics): records the outcome and
    /// latency when the inner future completes, or a cancellation when dropped first.
    #[derive(Debug)]
    pub struct ResponseFuture<F, C> {
        #[pin]
        pub(super) inner: F,
        pub(super) classifier: C,
        pub(super) start: u64,
        pub(super) in_flight: InFlight,
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    C: Classify<T, E>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some(recorder) = this.in_flight.0.take() {
            let now = recorder.config.clock.now_nanos();
            let verdict = this.classifier.classify(result.as_ref());
            recorder.complete(verdict, *this.start, now);
        }
        Poll::Ready(result)
    }
}
