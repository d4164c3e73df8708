//! `X::layer(..)` constructors on every service of this crate, in tower-http's
//! style (`Timeout::layer(d)` beside `TimeoutLayer::new(d)`), so that the name
//! of the service is the one way in.
//!
//! They are implemented on `X<()>`: the inner service is not known when a layer
//! is built, and a plain `impl<S> X<S>` would leave `S` for the caller to name.
//!
//! ```
//! use keel_layers::batch::BatchSize;
//! use keel_layers::circuit_breaker::CircuitBreaker;
//! use keel_layers::logging::Logging;
//! use keel_layers::metrics::Metrics;
//! use keel_layers::retry::{Retry, RetryPolicy};
//! use keel_layers::timeout::Timeout;
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//!
//! let stack = ServiceBuilder::new()
//!     .layer(Logging::layer("billing", "charge"))
//!     .layer(Metrics::layer())
//!     .layer(CircuitBreaker::builder().consecutive_failures(5).build())
//!     .layer(Retry::layer(RetryPolicy::default()))
//!     .layer(Timeout::layer(Duration::from_secs(2)))
//!     .layer(BatchSize::layer().max(100))
//!     .service_fn(|batch: Vec<u32>| async move { Ok::<_, std::io::Error>(batch.len()) });
//! # let _ = stack;
//! ```

use std::time::Duration;

use crate::batch::{BatchSize, BatchSizeLayer};
use crate::circuit_breaker::{CircuitBreaker, CircuitBreakerBuilder, CircuitBreakerLayer};
use crate::logging::{Logging, LoggingLayer};
use crate::metrics::{Metrics, MetricsLayer};
use crate::retry::{Retry, RetryLayer, RetryPolicy};
use crate::timeout::{Timeout, TimeoutLayer};

impl Timeout<()> {
    /// [`TimeoutLayer::new`]: each call bounded by `timeout`.
    pub const fn layer(timeout: Duration) -> TimeoutLayer {
        TimeoutLayer::new(timeout)
    }
}

impl Retry<()> {
    /// [`RetryLayer::new`]: retries by `policy`, errors as failures (change with
    /// [`RetryLayer::classifier`]).
    pub fn layer(policy: RetryPolicy) -> RetryLayer {
        RetryLayer::new(policy)
    }
}

impl CircuitBreaker<()> {
    /// [`CircuitBreakerLayer::new`]: a breaker with the defaults.
    pub fn layer() -> CircuitBreakerLayer {
        CircuitBreakerLayer::new()
    }

    /// [`CircuitBreakerLayer::builder`]: a breaker configured step by step.
    pub fn builder() -> CircuitBreakerBuilder {
        CircuitBreakerLayer::builder()
    }
}

impl BatchSize<()> {
    /// [`BatchSizeLayer::new`]: 1 to 1,000 items (change with
    /// [`BatchSizeLayer::max`]).
    pub const fn layer() -> BatchSizeLayer {
        BatchSizeLayer::new()
    }
}

impl Logging<()> {
    /// [`LoggingLayer::new`]: one span and one completion event per call.
    pub fn layer(component: &'static str, operation: &'static str) -> LoggingLayer {
        LoggingLayer::new(component, operation)
    }
}

impl Metrics<()> {
    /// [`MetricsLayer::new`]: call counts, failures by class, latency.
    pub fn layer() -> MetricsLayer {
        MetricsLayer::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, ServiceExt};

    #[tokio::test]
    async fn each_constructor_gives_a_working_layer() {
        let svc = tower::service_fn(|n: u32| async move { Ok::<_, std::io::Error>(n + 1) });
        let svc = Timeout::layer(Duration::from_secs(1)).layer(svc);
        let svc = Retry::layer(RetryPolicy::default()).layer(svc);
        let svc = CircuitBreaker::layer().layer(svc);
        let svc = Logging::layer("test", "add").layer(svc);
        let metrics = Metrics::layer();
        let handle = metrics.handle();
        let svc = metrics.layer(svc);
        assert_eq!(svc.oneshot(1).await.unwrap(), 2);
        assert_eq!(handle.snapshot().successes, 1);

        let batch = BatchSize::layer()
            .max(2)
            .layer(tower::service_fn(|b: Vec<u8>| async move {
                Ok::<_, std::io::Error>(b.len())
            }));
        assert!(batch.oneshot(vec![1, 2, 3]).await.is_err(), "3 > max 2");
    }
}
