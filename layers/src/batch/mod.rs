//! Reject batches that are empty or too large before they reach the inner service.
//!
//! Kafka and S3 both cap what one request may carry (the seed allowed at most 1,000
//! events per `publishBatch`), and finding out from the broker or the bucket is slow
//! and expensive: the request has been serialized, sent and partly processed by then.
//! [`BatchSize`] checks the length up front and fails with a typed
//! [`BatchSizeError`] **without calling the inner service at all**.
//!
//! Requests expose their length through [`BatchLen`], implemented for `Vec<T>`,
//! `VecDeque<T>`, slices, arrays, boxed and shared slices and references to any of
//! them; implement it for your own batch types.
//!
//! Defaults: at most [`DEFAULT_MAX_BATCH`] (1,000) items, empty batches rejected
//! ([`BatchSizeLayer::allow_empty`] lets them through).
//!
//! # Example
//!
//! ```
//! use keel_layers::batch::{BatchSizeError, BatchSizeLayer, Error};
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut svc = ServiceBuilder::new()
//!     .layer(BatchSizeLayer::new().max(3))
//!     .service(service_fn(|batch: Vec<u32>| async move {
//!         Ok::<_, std::io::Error>(batch.len())
//!     }));
//!
//! assert_eq!(svc.ready().await.unwrap().call(vec![1, 2, 3]).await.unwrap(), 3);
//! let err = svc.ready().await.unwrap().call(vec![1, 2, 3, 4]).await.unwrap_err();
//! assert!(matches!(err, Error::Rejected(BatchSizeError::TooLarge { len: 4, max: 3 })));
//! # }
//! ```

mod error;
mod future;
mod layer;

pub use error::{BatchSizeError, Error};
pub use future::ResponseFuture;
pub use layer::{BatchSizeLayer, DEFAULT_MAX_BATCH};

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

/// The number of items in a batch request.
pub trait BatchLen {
    /// How many items the request carries.
    fn batch_len(&self) -> usize;
}

impl<T> BatchLen for Vec<T> {
    fn batch_len(&self) -> usize {
        self.len()
    }
}

impl<T> BatchLen for VecDeque<T> {
    fn batch_len(&self) -> usize {
        self.len()
    }
}

impl<T> BatchLen for [T] {
    fn batch_len(&self) -> usize {
        self.len()
    }
}

impl<T, const N: usize> BatchLen for [T; N] {
    fn batch_len(&self) -> usize {
        N
    }
}

impl<T> BatchLen for Box<[T]> {
    fn batch_len(&self) -> usize {
        self.len()
    }
}

impl<T> BatchLen for Arc<[T]> {
    fn batch_len(&self) -> usize {
        self.len()
    }
}

impl<B: BatchLen + ?Sized> BatchLen for &B {
    fn batch_len(&self) -> usize {
        (**self).batch_len()
    }
}

/// Checks the length of every request before passing it on; see the
/// [module docs](self).
///
/// Cloning clones the inner service; the limits are plain copies.
#[derive(Clone, Debug)]
pub struct BatchSize<S> {
    inner: S,
    limits: layer::Limits,
}

impl<S> BatchSize<S> {
    /// Wraps `inner` with the default limits (1 to 1,000 items).
    pub fn new(inner: S) -> Self {
        BatchSizeLayer::new().wrap(inner)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The largest batch accepted.
    pub fn max(&self) -> usize {
        self.limits.max
    }

    /// Whether empty batches are passed on.
    pub fn allows_empty(&self) -> bool {
        self.limits.allow_empty
    }
}

impl<S, Req> Service<Req> for BatchSize<S>
where
    S: Service<Req>,
    Req: BatchLen,
{
    type Response = S::Response;
    type Error = Error<S::Error>;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Error::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.limits.check(req.batch_len()) {
            Ok(()) => ResponseFuture::called(self.inner.call(req)),
            Err(rejected) => ResponseFuture::rejected(rejected),
        }
    }
}

#[cfg(test)]
mod tests;
