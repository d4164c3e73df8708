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
//!   not, but for 429) or `GrpcErrorsAsFailures`, so the same layers work on axum and
//!   tonic. `429` and `503` are retryable, and their `Retry-After` (seconds or an HTTP
//!   date) is the retry layer's delay floor.
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
    /// A short, low-cardinality label naming what failed ("error", "timeout",
    /// "too_many_requests", "service_unavailable", "circuit_open").
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
    use std::time::{Duration, SystemTime};
    use tower_http::classify::{
        ClassifiedResponse, ClassifyResponse, GrpcErrorsAsFailures, ServerErrorsAsFailures,
    };

    /// The longest `Retry-After` honoured by default (see [`TowerHttp::max_retry_after`]).
    pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

    /// Adapts a tower-http [`ClassifyResponse`] (such as `ServerErrorsAsFailures` or
    /// `GrpcErrorsAsFailures`) to keel's [`Classify`].
    ///
    /// What fails:
    ///
    /// - whatever the tower-http classifier calls a failure (5xx for
    ///   `ServerErrorsAsFailures`, a non-OK `grpc-status` for `GrpcErrorsAsFailures`);
    /// - and `429 Too Many Requests` whatever the inner classifier says: tower-http
    ///   counts it as a client error, but it is the server asking to slow down.
    ///
    /// Retryable: `429`, `502`, `503`, `504` and the gRPC codes `UNAVAILABLE`,
    /// `RESOURCE_EXHAUSTED` and `DEADLINE_EXCEEDED`. A `Retry-After` header, in
    /// seconds or as an HTTP date, becomes the retry delay floor
    /// ([`Classification::retry_after`]), which keel's retry layer honours. A
    /// `Retry-After` longer than [`max_retry_after`](TowerHttp::max_retry_after)
    /// (default 60 s) makes the failure not retryable: waiting less than the server
    /// asked is pointless, and waiting minutes inside one call holds the caller.
    ///
    /// The class names what failed, for metrics and logs: `too_many_requests`,
    /// `internal_server_error`, `bad_gateway`, `service_unavailable`,
    /// `gateway_timeout`, `5xx` for the other server errors, `4xx` for client
    /// errors a custom classifier counts as failures, `grpc_<code>` (for example
    /// `grpc_unavailable`) for gRPC, and `error` for every `Err`. Responses whose
    /// verdict needs the end of the stream (gRPC streaming trailers) count as
    /// successes at the head.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keel_layers::classify::{Classify, Outcome, TowerHttp};
    ///
    /// let classifier = TowerHttp::server_errors();
    /// let res = http::Response::builder()
    ///     .status(429)
    ///     .header("retry-after", "2")
    ///     .body(())
    ///     .unwrap();
    /// let verdict = Classify::<_, std::convert::Infallible>::classify(&classifier, Ok(&res));
    /// assert_eq!(verdict.outcome, Outcome::Failure);
    /// assert!(verdict.retryable);
    /// assert_eq!(verdict.class, "too_many_requests");
    /// assert_eq!(verdict.retry_after, Some(Duration::from_secs(2)));
    /// ```
    #[derive(Clone, Debug)]
    pub struct TowerHttp<C> {
        inner: C,
        max_retry_after: Duration,
    }

    impl<C> TowerHttp<C> {
        /// Wraps a tower-http classifier.
        pub fn new(inner: C) -> Self {
            TowerHttp {
                inner,
                max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            }
        }

        /// The longest `Retry-After` still retried (default 60 s); a longer one
        /// makes the failure not retryable.
        pub fn max_retry_after(mut self, max: Duration) -> Self {
            self.max_retry_after = max;
            self
        }
    }

    impl TowerHttp<ServerErrorsAsFailures> {
        /// 5xx and 429 responses are failures, every other response (other 4xx
        /// included) is a success.
        pub fn server_errors() -> Self {
            TowerHttp::new(ServerErrorsAsFailures::new())
        }
    }

    impl TowerHttp<GrpcErrorsAsFailures> {
        /// gRPC responses with a non-OK `grpc-status` are failures (and HTTP 429).
        pub fn grpc_errors() -> Self {
            TowerHttp::new(GrpcErrorsAsFailures::new())
        }
    }

    /// The delay a `Retry-After` value asks for, at `now`: delta-seconds, or an
    /// HTTP date (RFC 9110 10.2.3; a date in the past means "now"). `None` when
    /// the value is neither.
    pub(super) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
        let value = value.trim();
        if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
            // Digits too long for u64 are "a very long time".
            return Some(Duration::from_secs(
                value.parse::<u64>().unwrap_or(u64::MAX),
            ));
        }
        let at = httpdate::parse_http_date(value).ok()?;
        Some(at.duration_since(now).unwrap_or(Duration::ZERO))
    }

    fn retry_after<B>(res: &http::Response<B>) -> Option<Duration> {
        let value = res
            .headers()
            .get(http::header::RETRY_AFTER)?
            .to_str()
            .ok()?;
        parse_retry_after(value, SystemTime::now())
    }

    /// The gRPC status of a response, from its headers (trailers-only answers).
    fn grpc_status<B>(res: &http::Response<B>) -> Option<i32> {
        res.headers()
            .get("grpc-status")?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The class and retryability of a failed gRPC answer.
    fn grpc_class(code: Option<i32>) -> (&'static str, bool) {
        match code {
            Some(1) => ("grpc_cancelled", false),
            Some(2) => ("grpc_unknown", false),
            Some(3) => ("grpc_invalid_argument", false),
            Some(4) => ("grpc_deadline_exceeded", true),
            Some(5) => ("grpc_not_found", false),
            Some(6) => ("grpc_already_exists", false),
            Some(7) => ("grpc_permission_denied", false),
            Some(8) => ("grpc_resource_exhausted", true),
            Some(9) => ("grpc_failed_precondition", false),
            Some(10) => ("grpc_aborted", false),
            Some(11) => ("grpc_out_of_range", false),
            Some(12) => ("grpc_unimplemented", false),
            Some(13) => ("grpc_internal", false),
            Some(14) => ("grpc_unavailable", true),
            Some(15) => ("grpc_data_loss", false),
            Some(16) => ("grpc_unauthenticated", false),
            _ => ("grpc", false),
        }
    }

    /// The class and retryability of a failed HTTP answer.
    fn http_class(status: u16) -> (&'static str, bool) {
        match status {
            429 => ("too_many_requests", true),
            500 => ("internal_server_error", false),
            502 => ("bad_gateway", true),
            503 => ("service_unavailable", true),
            504 => ("gateway_timeout", true),
            501 | 505..=599 => ("5xx", false),
            400..=428 | 430..=499 => ("4xx", false),
            _ => ("http_error", false),
        }
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
            let status = res.status();
            let failed = status == http::StatusCode::TOO_MANY_REQUESTS
                || match self.inner.clone().classify_response(res) {
                    ClassifiedResponse::Ready(verdict) => verdict.is_err(),
                    ClassifiedResponse::RequiresEos(_) => false,
                };
            if !failed {
                return Classification::SUCCESS;
            }
            let (class, retryable) = match grpc_status(res) {
                Some(code) if status.is_success() => grpc_class(Some(code)),
                _ => http_class(status.as_u16()),
            };
            let verdict = Classification::failure(class).with_retryable(retryable);
            match retry_after(res) {
                Some(delay) if delay > self.max_retry_after => verdict.with_retryable(false),
                Some(delay) => verdict.with_retry_after(delay),
                None => verdict,
            }
        }
    }
}

#[cfg(feature = "http")]
pub use http_adapter::{DEFAULT_MAX_RETRY_AFTER, TowerHttp};

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
    fn response(status: u16, retry_after: Option<&str>) -> http::Response<()> {
        let mut b = http::Response::builder().status(status);
        if let Some(v) = retry_after {
            b = b.header("retry-after", v);
        }
        b.body(()).unwrap()
    }

    #[cfg(feature = "http")]
    #[test]
    fn tower_http_server_errors() {
        let c = TowerHttp::server_errors();
        let classify = |res: &http::Response<()>| Classify::<_, ()>::classify(&c, Ok(res));

        let v = classify(&response(503, Some("3")));
        assert!(v.should_retry());
        assert_eq!(v.class, "service_unavailable");
        assert_eq!(v.retry_after, Some(Duration::from_secs(3)));
        // 503 without Retry-After: still retryable, no floor.
        let v = classify(&response(503, None));
        assert!(v.should_retry());
        assert_eq!(v.retry_after, None);

        assert!(classify(&response(404, None)).is_success());
        assert!(classify(&response(200, Some("5"))).is_success());

        let v = classify(&response(500, None));
        assert!(v.is_failure() && !v.retryable);
        assert_eq!(v.class, "internal_server_error");
        let v = classify(&response(507, None));
        assert!(v.is_failure() && !v.retryable);
        assert_eq!(v.class, "5xx");
        assert_eq!(classify(&response(502, None)).class, "bad_gateway");
        assert_eq!(classify(&response(504, None)).class, "gateway_timeout");

        let v = Classify::<http::Response<()>, ()>::classify(&c, Err(&()));
        assert!(v.should_retry());
        assert_eq!(v.class, "error");
    }

    #[cfg(feature = "http")]
    #[test]
    fn tower_http_429_is_a_retryable_failure_with_its_floor() {
        // tower-http's ServerErrorsAsFailures calls a 429 a success.
        let c = TowerHttp::server_errors();
        let v = Classify::<_, ()>::classify(&c, Ok(&response(429, None)));
        assert_eq!(v.outcome, Outcome::Failure);
        assert!(v.retryable);
        assert_eq!(v.class, "too_many_requests");
        assert_eq!(v.retry_after, None);
        let v = Classify::<_, ()>::classify(&c, Ok(&response(429, Some(" 7 "))));
        assert!(v.should_retry());
        assert_eq!(v.retry_after, Some(Duration::from_secs(7)));
        // The gRPC adapter too.
        let g = TowerHttp::grpc_errors();
        let v = Classify::<_, ()>::classify(&g, Ok(&response(429, Some("1"))));
        assert!(v.should_retry());
        assert_eq!(v.class, "too_many_requests");
    }

    #[cfg(feature = "http")]
    #[test]
    fn retry_after_as_an_http_date() {
        use super::http_adapter::parse_retry_after;
        use std::time::{SystemTime, UNIX_EPOCH};
        // Sun, 06 Nov 1994 08:49:37 GMT is 784111777 s after the epoch.
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        let at = UNIX_EPOCH + Duration::from_secs(784_111_777);
        let now = at - Duration::from_secs(42);
        assert_eq!(parse_retry_after(date, now), Some(Duration::from_secs(42)));
        // A date in the past: retry now.
        assert_eq!(
            parse_retry_after(date, at + Duration::from_secs(5)),
            Some(Duration::ZERO)
        );
        // The obsolete formats RFC 9110 still requires recipients to accept.
        assert_eq!(
            parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now),
            Some(Duration::from_secs(42))
        );
        assert_eq!(
            parse_retry_after("Sun Nov  6 08:49:37 1994", now),
            Some(Duration::from_secs(42))
        );
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        for bad in ["", "-1", "1.5", "soon", "Sun, 06 Nov 1994"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }

        // Through the classifier, against the wall clock: a date ~30 s ahead.
        let ahead = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        let c = TowerHttp::server_errors();
        let v = Classify::<_, ()>::classify(&c, Ok(&response(503, Some(&ahead))));
        assert!(v.should_retry());
        let floor = v.retry_after.expect("a floor from the date");
        // The date has whole seconds: 29 s < floor <= 30 s.
        assert!(
            floor > Duration::from_secs(28) && floor <= Duration::from_secs(30),
            "{floor:?}"
        );
        // An unreadable Retry-After is ignored, the 503 stays retryable.
        let v = Classify::<_, ()>::classify(&c, Ok(&response(503, Some("soon"))));
        assert!(v.should_retry());
        assert_eq!(v.retry_after, None);
    }

    #[cfg(feature = "http")]
    #[test]
    fn a_retry_after_beyond_the_maximum_is_not_retried() {
        let c = TowerHttp::server_errors().max_retry_after(Duration::from_secs(10));
        let v = Classify::<_, ()>::classify(&c, Ok(&response(503, Some("11"))));
        assert!(v.is_failure() && !v.retryable);
        assert_eq!(v.class, "service_unavailable");
        let v = Classify::<_, ()>::classify(&c, Ok(&response(429, Some("10"))));
        assert!(v.should_retry());
        assert_eq!(v.retry_after, Some(Duration::from_secs(10)));
        // Default: 60 s.
        let d = TowerHttp::server_errors();
        assert!(!Classify::<_, ()>::classify(&d, Ok(&response(429, Some("61")))).retryable);
        assert!(Classify::<_, ()>::classify(&d, Ok(&response(429, Some("60")))).retryable);
    }

    #[cfg(feature = "http")]
    #[test]
    fn tower_http_grpc_errors() {
        let c = TowerHttp::grpc_errors();
        let grpc = |code: &str| {
            http::Response::builder()
                .header("grpc-status", code)
                .body(())
                .unwrap()
        };
        let v = Classify::<_, ()>::classify(&c, Ok(&grpc("14")));
        assert!(v.should_retry());
        assert_eq!(v.class, "grpc_unavailable");
        let v = Classify::<_, ()>::classify(&c, Ok(&grpc("3")));
        assert!(v.is_failure() && !v.retryable);
        assert_eq!(v.class, "grpc_invalid_argument");
        assert_eq!(
            Classify::<_, ()>::classify(&c, Ok(&grpc("8"))).class,
            "grpc_resource_exhausted"
        );
        assert!(Classify::<_, ()>::classify(&c, Ok(&grpc("0"))).is_success());
    }

    /// The retry layer waits at least the `Retry-After` of a 429 / 503 before
    /// the next attempt (on the paused clock).
    #[cfg(feature = "http")]
    #[tokio::test(start_paused = true)]
    async fn the_retry_layer_honours_the_retry_after_floor() {
        use crate::retry::{Jitter, Retry, RetryPolicy};
        use std::sync::{Arc, Mutex};
        use tokio::time::Instant;
        use tower::{ServiceExt, service_fn};

        let answers = Arc::new(Mutex::new(vec![
            response(200, None),
            response(503, Some("2")),
            response(429, Some("5")),
        ]));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let inner = {
            let (answers, calls) = (answers.clone(), calls.clone());
            service_fn(move |_req: ()| {
                calls.lock().unwrap().push(Instant::now());
                let res = answers.lock().unwrap().pop().unwrap();
                async move { Ok::<_, std::convert::Infallible>(res) }
            })
        };
        // Backoff 100 ms, far below the floors.
        let policy = RetryPolicy::new()
            .jitter(Jitter::None)
            .without_budget()
            .base(Duration::from_millis(100))
            .max_attempts(5);
        let svc = Retry::with_classifier(inner, policy, TowerHttp::server_errors());
        let start = Instant::now();
        let res = svc.oneshot(()).await.unwrap();
        assert_eq!(res.status(), 200);
        let at: Vec<Duration> = calls.lock().unwrap().iter().map(|t| *t - start).collect();
        let s = Duration::from_secs;
        assert_eq!(at, [s(0), s(5), s(7)]);
    }
}
