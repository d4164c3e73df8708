//! Count calls, failures by class, calls in flight, and latency quantiles.
//!
//! The seed exposed `getMetrics()` per client; keel wraps any service in [`Metrics`]
//! and reads the numbers through a cloneable [`MetricsHandle`]:
//!
//! - totals: calls started, successes, failures by
//!   [`Classification::class`](crate::classify::Classification::class), ignored, and
//!   cancelled (futures dropped before completing);
//! - a gauge of calls in flight, decremented on completion *and* when the response
//!   future is dropped;
//! - the wall-clock time of the last success and of the last failure;
//! - latency histograms by outcome with fixed bucket bounds ([`DEFAULT_BUCKETS`],
//!   or your own), which add up across instances;
//! - optionally ([`MetricsLayerBuilder::percentiles`]) latency percentiles in an
//!   [HdrHistogram](https://hdrhistogram.github.io/HdrHistogram/) over a rotating
//!   window — p50, p90, p99, p99.9, max and mean of the last one to two intervals
//!   (default 60 s), rotated lazily, no background task.
//!
//! What counts as a failure is decided by a [`Classify`] (default
//! [`ErrorsAsFailures`]), so the same layer counts an HTTP 503 inside `Ok` as a
//! failure with [`TowerHttp`](crate::classify::TowerHttp).
//!
//! [`MetricsHandle::snapshot`] returns a plain [`MetricsSnapshot`] (serde
//! `Serialize`). [`MetricsRegistry`] gathers handles under a family name and
//! labels; exporters read it. keel-layers has no exporter of its own: the
//! `prometheus` feature of `keel` renders a registry as OpenMetrics text.
//!
//! # Cost per call, and why it scales
//!
//! Two clock readings (start and end), and a few relaxed atomic increments on the
//! calling thread's own recorder: calls started, the latency's bucket, the sum,
//! and the reference the response future holds. Each thread that calls gets its
//! own recorder (the `thread_local` crate), and a snapshot adds them up, so two
//! threads calling clones of one service share no lock and no written cache line
//! (the earlier design took one lock per call; on two threads that lock made the
//! layer 3.6x slower per call, 138 ns against 38 ns; see BENCHMARKS.md "Metrics
//! and Prometheus"). A failure also takes the recorder's own lock to count its
//! class, and so does every call when percentiles are on.
//!
//! Wall times are derived from the end reading and a wall-clock origin taken when
//! the metrics were created, so no third clock read; they drift from the system
//! clock only if the system clock is stepped. The monotonic clock is a
//! [`LatencyClock`]: by default the CPU's time-stamp counter through `quanta`,
//! about half the cost of `Instant::now()`; [`LatencyClock::tokio`] follows tokio's
//! clock so tests can pause and advance time.
//!
//! Memory: per thread that calls, 3 x (bounds + 2) counters (under 0.5 KiB with
//! the defaults), plus about 72 KiB with percentiles on. Threads that end leave
//! their recorder to the next thread, so the number of recorders is bounded by
//! the number of threads alive at once.
//!
//! # Example
//!
//! ```
//! use keel_layers::metrics::MetricsLayer;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let metrics = MetricsLayer::new();
//! let handle = metrics.handle();
//! let mut svc = ServiceBuilder::new()
//!     .layer(metrics)
//!     .service(service_fn(|fail: bool| async move {
//!         if fail { Err("boom") } else { Ok(()) }
//!     }));
//!
//! svc.ready().await.unwrap().call(false).await.unwrap();
//! svc.ready().await.unwrap().call(true).await.unwrap_err();
//!
//! let snapshot = handle.snapshot();
//! assert_eq!((snapshot.calls, snapshot.successes, snapshot.failures), (2, 1, 1));
//! assert_eq!(snapshot.failures_by_class["error"], 1);
//! assert_eq!(snapshot.in_flight, 0);
//! # }
//! ```

mod buckets;
mod clock;
mod error;
mod exemplar;
mod future;
mod handle;
mod layer;
mod registry;
mod window;

pub use buckets::{DEFAULT_BUCKETS, LatencyBuckets, MAX_BUCKETS};
pub use clock::LatencyClock;
pub use error::RegistryError;
pub use exemplar::{Exemplar, ExemplarSource, TraceRef};
pub use future::ResponseFuture;
pub use handle::{
    DEFAULT_SIGNIFICANT_FIGURES, DEFAULT_WINDOW, Histogram, LatencyHistograms, LatencySummary,
    MAX_FAILURE_CLASSES, MetricsHandle, MetricsSnapshot, OTHER_CLASS,
};
pub use layer::{MetricsLayer, MetricsLayerBuilder};
pub use registry::{MetricsRegistry, Registered, RegisteredSnapshot, is_valid_metric_name};

use crate::classify::{Classify, ErrorsAsFailures};
use std::task::{Context, Poll};
use tower::Service;

/// Records every call's outcome and latency; see the [module docs](self).
///
/// Cloning clones the inner service and the classifier and shares the metrics.
#[derive(Clone, Debug)]
pub struct Metrics<S, C = ErrorsAsFailures> {
    inner: S,
    classifier: C,
    handle: MetricsHandle,
}

impl<S> Metrics<S> {
    /// Wraps `inner` with fresh metrics and the defaults of [`MetricsLayer::new`].
    pub fn new(inner: S) -> Self {
        Metrics {
            inner,
            classifier: ErrorsAsFailures,
            handle: MetricsLayer::new().handle(),
        }
    }
}

impl<S, C> Metrics<S, C> {
    /// The handle to read these metrics.
    pub fn handle(&self) -> MetricsHandle {
        self.handle.clone()
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
}

impl<S, C, Req> Service<Req> for Metrics<S, C>
where
    S: Service<Req>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // This thread's recorder: no other thread writes it unless a call started
        // here ends there, so two threads calling at once share no cache line.
        let recorder = self.handle.shared.recorder();
        let start = recorder.config.clock.now_nanos();
        let inner = self.inner.call(req);
        // Counted once the inner call returned, so a panicking `call` leaves no
        // phantom call in flight.
        recorder.start();
        ResponseFuture {
            inner,
            classifier: self.classifier.clone(),
            start,
            in_flight: future::InFlight(Some(recorder.clone())),
        }
    }
}

#[cfg(test)]
mod tests;
