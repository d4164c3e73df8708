//! What counts as success, failure or neither, and whether a failure may be retried.
//!
//! A layer that counts failures (the circuit breaker, the metrics) or retries them
//! cannot just look at `Err`: an HTTP `503` arrives inside `Ok(Response)` and is a
//! failure, a `404` is the caller's problem and not the server's, and a Kafka
//! "message too large" is a failure that must never be retried. So every keel layer
//! takes a [`Classify`] that turns the outcome of one call into a [`Classification`].
//!
//! Ready-made classifiers:
//!
//! - [`ErrorsAsFailures`] (the default everywhere): `Ok` is a success, `Err` a
//!   retryable failure of class `"error"`.
//! - [`ByError`]: `Ok` is a success, `Err(e)` is whatever `e` says through
//!   [`ClassifiedError`]. keel's own error types, and every keel layer's error
//!   wrapper, implement it, so one classifier reads through a whole stack.
//! - [`ClassifyFn`] (via [`classify_fn`]): any closure.
//! - [`TowerHttp`] (feature `http`, on by default): adapts any tower-http
//!   `ClassifyResponse`, such as `ServerErrorsAsFailures` (5xx are failures, 4xx are
//!   not) or `GrpcErrorsAsFailures`, so the same layers work on axum and tonic.
//!
//! # Example
//!
//! ```
//! use keel_layers::classify::{classify_fn, Classification, Classify, Outcome};
//!
//! // An HTTP-ish status in the Ok value: 5xx fail, 429 fails and is retryable.
//! let classifier = classify_fn(|result: Result<&u16, &std::io::Error>| match result {
//!     Ok(status) if *status >= 500 => Classification::failure("5xx"),
//!     Ok(429) => Classification::failure("throttled"),
//!     Ok(_) => Classification::SUCCESS,
//!     Err(_) => Classification::failure("io"),
//! });
//! assert_eq!(classifier.classify(Ok(&503)).outcome, Outcome::Failure);
//! assert_eq!(classifier.classify(Ok(&404)).outcome, Outcome::Success);
//! ```

use std::fmt;
use std::time::Duration;

/// The verdict on one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The call worked.
    Success,
    /// The call failed: breakers count it, metrics count it by class, retry may retry it.
    Failure,
    /// Neither: counted as a call but not held for or against the service
    /// (for example a cancelled request or a client error that says nothing about
    /// the service's health).
    Ignored,
}

/// The classification of one call: its [`Outcome`], whether retrying it makes sense,
/// a short class label for metrics, and an optional delay floor for the next retry
/// (from `Retry-After`, S3 `SlowDown`, Kafka throttling and the like).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Classification {
    /// Success, failure or ignored.
    pub outcome: Outcome,
    /// Whether a retry may help. Only meaningful for failures.
    pub retryable: bool,
    /// A short, low-cardinality label ("error", "timeout", "5xx", "circuit_open").
    pub class: &'static str,
    /// The least time to wait before retrying, when the outcome says so.
    pub retry_after: Option<Duration>,
}

impl Classification {
    /// A success.
    pub const SUCCESS: Classification = Classification {
        outcome: Outcome::Success,
        retryable: false,
        class: "success",
        retry_after: None,
    };

    /// An outcome that is neither success nor failure.
    pub const IGNORED: Classification = Classification {
        outcome: Outcome::Ignored,
        retryable: false,
        class: "ignored",
        retry_after: None,
    };

    /// A retryable failure with the given class label.
    pub const fn failure(class: &'static str) -> Self {
        Classification {
            outcome: Outcome::Failure,
            retryable: true,
            class,
            retry_after: None,
        }
    }

    /// A failure that retrying will not fix (bad input, authorization, too large).
    pub const fn permanent_failure(class: &'static str) -> Self {
        Classification {
            outcome: Outcome::Failure,
            retryable: false,
            class,
            retry_after: None,
        }
    }

    /// Sets whether the outcome is retryable.
    pub const fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Sets the delay floor for the next retry.
    pub const fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// `true` when the outcome is a success.
    pub const fn is_success(&self) -> bool {
        matches!(self.outcome, Outcome::Success)
    }

    /// `true` when the outcome is a failure.
    pub const fn is_failure(&self) -> bool {
        matches!(self.outcome, Outcome::Failure)
    }

    /// `true` when the outcome is a failure that may be retried.
    pub const fn should_retry(&self) -> bool {
        self.is_failure() && self.retryable
    }
}

/// Decides how one call's result counts.
///
/// Implemented for [`ErrorsAsFailures`], [`ByError`], [`ClassifyFn`] and, with the
/// `http` feature, [`TowerHttp`]. Classifiers are cloned into every service a layer
/// builds, so keep them cheap to clone.
pub trait Classify<Res, Err> {
    /// Classifies the result of one call.
    fn classify(&self, result: Result<&Res, &Err>) -> Classification;
}

/// `Ok` is a success; every `Err` is a retryable failure of class `"error"`.
///
/// The default classifier of every keel layer.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorsAsFailures;

impl<Res, Err> Classify<Res, Err> for ErrorsAsFailures {
    #[inline]
    fn classify(&self, result: Result<&Res, &Err>) -> Classification {
        match result {
            Ok(_) => Classification::SUCCESS,
            Err(_) => Classification::failure("error"),
        }
    }
}

/// An error that knows how it should be counted: its class, whether it may be
/// retried, and the least delay before a retry.
///
/// keel's `KafkaProducerError` and `S3ServiceError` implement it, and so does every
/// keel layer's error type whenever the inner error does, so a [`ByError`]
/// classifier sees through a whole stack.
pub trait ClassifiedError {
    /// How this error counts.
    fn classification(&self) -> Classification;
}

impl ClassifiedError for std::convert::Infallible {
    fn classification(&self) -> Classification {
        match *self {}
    }
}

impl ClassifiedError for std::io::Error {
    fn classification(&self) -> Classification {
        use std::io::ErrorKind::*;
        match self.kind() {
            InvalidInput | InvalidData | PermissionDenied | NotFound | Unsupported => {
                Classification::permanent_failure("io")
            }
            TimedOut => Classification::failure("timeout"),
            _ => Classification::failure("io"),
        }
    }
}

/// `Ok` is a success; `Err(e)` counts as `e` says through [`ClassifiedError`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ByError;

impl<Res, Err: ClassifiedError> Classify<Res, Err> for ByError {
    #[inline]
    fn classify(&self, result: Result<&Res, &Err>) -> Classification {
        match result {
            Ok(_) => Classification::SUCCESS,
            Err(e) => e.classification(),
        }
    }
}

/// A classifier made from a closure; see [`classify_fn`].
#[derive(Clone, Copy)]
pub struct ClassifyFn<F> {
    f: F,
}

impl<F> fmt::Debug for ClassifyFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClassifyFn").finish_non_exhaustive()
    }
}

/// Makes a classifier from a closure over `Result<&Res, &Err>`.
pub fn classify_fn<F>(f: F) -> ClassifyFn<F> {
    ClassifyFn { f }
}

impl<F, Res, Err> Classify<Res, Err> for ClassifyFn<F>
where
    F: Fn(Result<&Res, &Err>) -> Classification,
{
    #[inline]
    fn classify(&self, result: Result<&Res, &Err>) -> Classification {
        (self.f)(result)
    }
}

#[cfg(feature = "http")]
mod http_adapter {
    use super::{Classification, Classify};
    use std::time::Duration;
    use tower_http::classify::{
        ClassifiedResponse, ClassifyResponse, GrpcErrorsAsFailures, ServerErrorsAsFailures,
    };

    /// Adapts a tower-http [`ClassifyResponse`] (such as `ServerErrorsAsFailures` or
    /// `GrpcErrorsAsFailures`) to keel's [`Classify`].
    ///
    /// A response that tower-http classifies as a failure is a keel failure of class
    /// `"5xx"` / `"grpc"`; `503`, `429`, `502` and `504` and the gRPC codes
    /// `UNAVAILABLE`, `RESOURCE_EXHAUSTED` and `DEADLINE_EXCEEDED` are retryable, and
    /// a `Retry-After` header (in seconds) becomes the retry delay floor. Responses
    /// whose verdict needs the end of the stream (gRPC streaming trailers) count as
    /// successes at the head. Every `Err` is a retryable failure of class `"error"`.
    ///
    /// ```
    /// use keel_layers::classify::{Classify, Outcome, TowerHttp};
    ///
    /// let classifier = TowerHttp::server_errors();
    /// let res = http::Response::builder().status(503).body(()).unwrap();
    /// let verdict = Classify::<_, std::convert::Infallible>::classify(&classifier, Ok(&res));
    /// assert_eq!(verdict.outcome, Outcome::Failure);
    /// assert!(verdict.retryable);
    /// ```
    #[derive(Clone, Debug)]
    pub struct TowerHttp<C> {
        inner: C,
    }

    impl<C> TowerHttp<C> {
        /// Wraps a tower-http classifier.
        pub fn new(inner: C) -> Self {
            TowerHttp { inner }
        }
    }

    impl TowerHttp<ServerErrorsAsFailures> {
        /// 5xx responses are failures, everything else (4xx included) is a success.
        pub fn server_errors() -> Self {
            TowerHttp::new(ServerErrorsAsFailures::new())
        }
    }

    impl TowerHttp<GrpcErrorsAsFailures> {
        /// gRPC responses with a non-OK `grpc-status` are failures.
        pub fn grpc_errors() -> Self {
            TowerHttp::new(GrpcErrorsAsFailures::new())
        }
    }

    fn retry_after<B>(res: &http::Response<B>) -> Option<Duration> {
        let value = res.headers().get(http::header::RETRY_AFTER)?.to_str().ok()?;
        value.trim().parse::<u64>().ok().map(Duration::from_secs)
    }

    fn grpc_retryable<B>(res: &http::Response<B>) -> bool {
        // 4 DEADLINE_EXCEEDED, 8 RESOURCE_EXHAUSTED, 14 UNAVAILABLE
        matches!(
            res.headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<i32>().ok()),
            Some(4 | 8 | 14)
        )
    }

    impl<C, B, E> Classify<http::Response<B>, E> for TowerHttp<C>
    where
        C: ClassifyResponse + Clone,
    {
        fn classify(&self, result: Result<&http::Response<B>, &E>) -> Classification {
            let res = match result {
                Ok(res) => res,
                Err(_) => return Classification::failure("error"),
            };
            match self.inner.clone().classify_response(res) {
                ClassifiedResponse::Ready(Ok(())) => Classification::SUCCESS,
                ClassifiedResponse::RequiresEos(_) => Classification::SUCCESS,
                ClassifiedResponse::Ready(Err(_)) => {
                    let status = res.status().as_u16();
                    let (class, retryable) = if res.headers().contains_key("grpc-status") {
                        ("grpc", grpc_retryable(res))
                    } else {
                        ("5xx", matches!(status, 429 | 502 | 503 | 504))
                    };
                    let verdict = Classification::failure(class).with_retryable(retryable);
                    match retry_after(res) {
                        Some(delay) => verdict.with_retry_after(delay),
                        None => verdict,
                    }
                }
            }
        }
    }
}

#[cfg(feature = "http")]
pub use http_adapter::TowerHttp;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Throttled;
    impl ClassifiedError for Throttled {
        fn classification(&self) -> Classification {
            Classification::failure("throttled").with_retry_after(Duration::from_secs(2))
        }
    }

    #[test]
    fn errors_as_failures() {
        let c = ErrorsAsFailures;
        assert!(Classify::<(), ()>::classify(&c, Ok(&())).is_success());
        let v = Classify::<(), ()>::classify(&c, Err(&()));
        assert!(v.should_retry());
        assert_eq!(v.class, "error");
    }

    #[test]
    fn by_error_reads_the_error() {
        let v = Classify::<(), Throttled>::classify(&ByError, Err(&Throttled));
        assert_eq!(v.class, "throttled");
        assert_eq!(v.retry_after, Some(Duration::from_secs(2)));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad");
        assert!(!Classify::<(), _>::classify(&ByError, Err(&io)).should_retry());
    }

    #[cfg(feature = "http")]
    #[test]
    fn tower_http_server_errors() {
        let c = TowerHttp::server_errors();
        let r503 = http::Response::builder()
            .status(503)
            .header("retry-after", "3")
            .body(())
            .unwrap();
        let r404 = http::Response::builder().status(404).body(()).unwrap();
        let r500 = http::Response::builder().status(500).body(()).unwrap();
        let v = Classify::<_, ()>::classify(&c, Ok(&r503));
        assert!(v.should_retry());
        assert_eq!(v.retry_after, Some(Duration::from_secs(3)));
        assert!(Classify::<_, ()>::classify(&c, Ok(&r404)).is_success());
        let v = Classify::<_, ()>::classify(&c, Ok(&r500));
        assert!(v.is_failure() && !v.retryable);
    }

    #[cfg(feature = "http")]
    #[test]
    fn tower_http_grpc_errors() {
        let c = TowerHttp::grpc_errors();
        let unavailable = http::Response::builder()
            .header("grpc-status", "14")
            .body(())
            .unwrap();
        let invalid = http::Response::builder()
            .header("grpc-status", "3")
            .body(())
            .unwrap();
        let ok = http::Response::builder()
            .header("grpc-status", "0")
            .body(())
            .unwrap();
        assert!(Classify::<_, ()>::classify(&c, Ok(&unavailable)).should_retry());
        let v = Classify::<_, ()>::classify(&c, Ok(&invalid));
        assert!(v.is_failure() && !v.retryable);
        assert!(Classify::<_, ()>::classify(&c, Ok(&ok)).is_success());
    }
}
