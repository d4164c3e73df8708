//! [`ServiceBuilderExt`]: keel's six layers as methods on [`tower::ServiceBuilder`].
//!
//! Import the trait and stack the layers the way tower's own methods stack:
//! the first method called wraps everything after it (it is the **outermost**
//! layer, the first to see a request and the last to see its response).
//!
//! | method | layer | notes |
//! |---|---|---|
//! | [`circuit_breaker`](ServiceBuilderExt::circuit_breaker) | [`CircuitBreakerLayer`] | pass the layer (keep its [`handle`](CircuitBreakerLayer::handle) first) |
//! | [`keel_retry`](ServiceBuilderExt::keel_retry) | [`RetryLayer`] from a [`RetryPolicy`] | every `Err` retryable |
//! | [`keel_retry_with`](ServiceBuilderExt::keel_retry_with) | a configured [`RetryLayer`] | for a classifier |
//! | [`keel_timeout`](ServiceBuilderExt::keel_timeout) | [`TimeoutLayer`] from a `Duration` | the call only |
//! | [`keel_timeout_with`](ServiceBuilderExt::keel_timeout_with) | a configured [`TimeoutLayer`] | for [`covering_readiness`](TimeoutLayer::covering_readiness) |
//! | [`metrics`](ServiceBuilderExt::metrics) | [`MetricsLayer`] | pass the layer (keep its [`handle`](MetricsLayer::handle) first) |
//! | [`batch_size`](ServiceBuilderExt::batch_size) | [`BatchSizeLayer`] with a maximum | empty batches rejected |
//! | [`logging`](ServiceBuilderExt::logging) | [`LoggingLayer`] | |
//!
//! Retry and timeout carry a `keel_` prefix because tower's `ServiceBuilder` already
//! has inherent `retry` and `timeout` methods (tower's own layers), and an inherent
//! method always wins over a trait method of the same name. Anything not covered
//! here (per-key breakers, a batch layer that allows empty batches) goes through
//! [`ServiceBuilder::layer`] as usual.
//!
//! # Order
//!
//! A common order, outermost first, and why:
//!
//! 1. **logging** — one span and one event per caller-visible call, retries included
//!    in its duration;
//! 2. **metrics** — counts what callers see (a rejection by the breaker or the
//!    batch check is counted, with its class);
//! 3. **batch size** — rejects an oversized batch once, before any retry;
//! 4. **circuit breaker** — outside the retry, so one caller call counts once and an
//!    open breaker is not retried into (inside it, each attempt counts and an open
//!    breaker ends the retries with a permanent `circuit_open` failure under
//!    [`ByError`](crate::classify::ByError));
//! 5. **retry**;
//! 6. **timeout** — inside the retry, so it bounds each attempt and a timed-out
//!    attempt is retried.
//!
//! Every layer works in any order; the order only changes what is counted where.
//!
//! # Errors and axum
//!
//! Layers that can refuse a call change the error type: the breaker returns
//! [`CircuitBreakerError<E>`](crate::circuit_breaker::CircuitBreakerError), the timeout
//! [`TimeoutError<E>`](crate::timeout::TimeoutError), the batch check
//! [`batch::Error<E>`](crate::batch::Error); retry, metrics and logging keep `E`.
//! Each wrapper has `into_inner()` to get the inner error back, typed.
//!
//! axum (and hyper) want services whose error is `Infallible`: turn keel's errors
//! into responses at the outside of the stack with axum's `HandleErrorLayer`
//! (it needs the service inside to be `Clone`, which keel's are). tower's
//! `map_result` or `map_err` cannot do it: they convert readiness errors with
//! `From`, and `Infallible` has no `From` for keel's errors. `HandleErrorLayer`
//! instead reports the service ready and sends readiness errors to the handler too.
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use axum::{Router, error_handling::HandleErrorLayer, http::StatusCode};
//! use axum::{response::{IntoResponse, Response}, routing::get};
//! use keel_layers::builder::ServiceBuilderExt;
//! use keel_layers::circuit_breaker::{CircuitBreakerError, CircuitBreakerLayer};
//! use keel_layers::classify::TowerHttp;
//! use keel_layers::metrics::MetricsLayer;
//! use keel_layers::timeout::TimeoutError;
//! use tower::ServiceBuilder;
//!
//! type KeelError = TimeoutError<CircuitBreakerError<Infallible>>;
//!
//! fn to_response(err: KeelError) -> Response {
//!     match err {
//!         TimeoutError::Elapsed { .. } => StatusCode::GATEWAY_TIMEOUT.into_response(),
//!         // The router's own error is Infallible: this arm cannot happen.
//!         TimeoutError::Inner(CircuitBreakerError::Inner(never)) => match never {},
//!         // Open, forced open or half-open and full: fail fast.
//!         TimeoutError::Inner(_rejected) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
//!     }
//! }
//!
//! let metrics = MetricsLayer::new().classifier(TowerHttp::server_errors());
//! let breaker = CircuitBreakerLayer::builder()
//!     .classifier(TowerHttp::server_errors())
//!     .build();
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(
//!         ServiceBuilder::new()
//!             // Err(keel error) becomes a response: the error type is Infallible again.
//!             .layer(HandleErrorLayer::new(|err: KeelError| async move { to_response(err) }))
//!             .metrics(metrics)
//!             .keel_timeout(Duration::from_secs(10))
//!             .circuit_breaker(breaker),
//!     );
//! # let _ = app;
//! ```
//!
//! # Example: all six
//!
//! ```
//! use std::time::Duration;
//! use keel_layers::builder::ServiceBuilderExt;
//! use keel_layers::circuit_breaker::CircuitBreakerLayer;
//! use keel_layers::classify::ByError;
//! use keel_layers::logging::LoggingLayer;
//! use keel_layers::metrics::MetricsLayer;
//! use keel_layers::retry::{RetryLayer, RetryPolicy};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let metrics = MetricsLayer::new().classifier(ByError);
//! let stats = metrics.handle();
//! let breaker = CircuitBreakerLayer::builder().classifier(ByError).build();
//! let breaker_handle = breaker.handle();
//!
//! let publish = ServiceBuilder::new()
//!     .logging(LoggingLayer::new("KafkaProducer", "publishBatch").classifier(ByError))
//!     .metrics(metrics)
//!     .batch_size(1_000)
//!     .circuit_breaker(breaker)
//!     .keel_retry_with(RetryLayer::new(RetryPolicy::kafka()).classifier(ByError))
//!     .keel_timeout(Duration::from_secs(30))
//!     .service(service_fn(|events: Vec<&'static str>| async move {
//!         Ok::<_, std::io::Error>(events.len())
//!     }));
//!
//! assert_eq!(publish.clone().oneshot(vec!["a", "b"]).await.unwrap(), 2);
//! // Rejected by the batch check: the breaker, retry and service never see it.
//! let err = publish.oneshot(vec![]).await.unwrap_err();
//! assert!(err.rejection().is_some());
//! assert_eq!((stats.snapshot().successes, stats.snapshot().failures), (1, 1));
//! assert_eq!(breaker_handle.stats().consecutive_failures, 0);
//! # }
//! ```

use std::time::Duration;

use tower::ServiceBuilder;
use tower::layer::util::Stack;

use crate::batch::BatchSizeLayer;
use crate::circuit_breaker::CircuitBreakerLayer;
use crate::logging::LoggingLayer;
use crate::metrics::MetricsLayer;
use crate::retry::{RetryLayer, RetryPolicy};
use crate::timeout::TimeoutLayer;

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

/// keel's layers as [`ServiceBuilder`] methods; see the [module docs](self).
///
/// Each method adds one layer **inside** the ones added before it, exactly like
/// [`ServiceBuilder::layer`]. Sealed: implemented only for `ServiceBuilder`.
pub trait ServiceBuilderExt<L>: sealed::Sealed + Sized {
    /// Adds a circuit breaker. The layer owns one breaker, shared by every service
    /// it builds and their clones; take its [`handle`](CircuitBreakerLayer::handle)
    /// before passing it in.
    fn circuit_breaker<C>(
        self,
        layer: CircuitBreakerLayer<C>,
    ) -> ServiceBuilder<Stack<CircuitBreakerLayer<C>, L>>;

    /// Adds retries under `policy`, treating every `Err` as retryable (see
    /// [`RetryLayer::new`]). Named `keel_retry` because tower's `ServiceBuilder::retry`
    /// adds tower's own retry layer.
    fn keel_retry(self, policy: RetryPolicy) -> ServiceBuilder<Stack<RetryLayer, L>>;

    /// Adds a configured retry layer (for example with a classifier).
    fn keel_retry_with<C>(self, layer: RetryLayer<C>) -> ServiceBuilder<Stack<RetryLayer<C>, L>>;

    /// Adds a per-call timeout that does not cover readiness (see [`TimeoutLayer::new`]).
    /// Named `keel_timeout` because tower's `ServiceBuilder::timeout` adds tower's own
    /// timeout layer.
    fn keel_timeout(self, timeout: Duration) -> ServiceBuilder<Stack<TimeoutLayer, L>>;

    /// Adds a configured timeout layer (for example
    /// [`covering_readiness(true)`](TimeoutLayer::covering_readiness)).
    fn keel_timeout_with(self, layer: TimeoutLayer) -> ServiceBuilder<Stack<TimeoutLayer, L>>;

    /// Adds metrics. Every service the layer builds counts into the same handle;
    /// take its [`handle`](MetricsLayer::handle) before passing it in.
    fn metrics<C>(self, layer: MetricsLayer<C>) -> ServiceBuilder<Stack<MetricsLayer<C>, L>>;

    /// Rejects batches that are empty or larger than `max` (see [`BatchSizeLayer`];
    /// to let empty batches through, add `BatchSizeLayer::new().max(max).allow_empty(true)`
    /// with [`ServiceBuilder::layer`]).
    fn batch_size(self, max: usize) -> ServiceBuilder<Stack<BatchSizeLayer, L>>;

    /// Adds a span and a completion event per call.
    fn logging<C, F>(
        self,
        layer: LoggingLayer<C, F>,
    ) -> ServiceBuilder<Stack<LoggingLayer<C, F>, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn circuit_breaker<C>(
        self,
        layer: CircuitBreakerLayer<C>,
    ) -> ServiceBuilder<Stack<CircuitBreakerLayer<C>, L>> {
        self.layer(layer)
    }

    fn keel_retry(self, policy: RetryPolicy) -> ServiceBuilder<Stack<RetryLayer, L>> {
        self.layer(RetryLayer::new(policy))
    }

    fn keel_retry_with<C>(self, layer: RetryLayer<C>) -> ServiceBuilder<Stack<RetryLayer<C>, L>> {
        self.layer(layer)
    }

    fn keel_timeout(self, timeout: Duration) -> ServiceBuilder<Stack<TimeoutLayer, L>> {
        self.layer(TimeoutLayer::new(timeout))
    }

    fn keel_timeout_with(self, layer: TimeoutLayer) -> ServiceBuilder<Stack<TimeoutLayer, L>> {
        self.layer(layer)
    }

    fn metrics<C>(self, layer: MetricsLayer<C>) -> ServiceBuilder<Stack<MetricsLayer<C>, L>> {
        self.layer(layer)
    }

    fn batch_size(self, max: usize) -> ServiceBuilder<Stack<BatchSizeLayer, L>> {
        self.layer(BatchSizeLayer::new().max(max))
    }

    fn logging<C, F>(
        self,
        layer: LoggingLayer<C, F>,
    ) -> ServiceBuilder<Stack<LoggingLayer<C, F>, L>> {
        self.layer(layer)
    }
}
