use super::Metrics;
use super::buckets::{Buckets, DEFAULT_BUCKETS};
use super::clock::LatencyClock;
use super::exemplar::{ExemplarSource, SharedSource};
use super::handle::{DEFAULT_SIGNIFICANT_FIGURES, DEFAULT_WINDOW, MetricsHandle, Percentiles};
use crate::classify::ErrorsAsFailures;
use std::sync::Arc;
use std::time::Duration;
use tower::Layer;

/// Applies [`Metrics`] to a service.
///
/// Every service the layer builds (and every clone of the layer or of those
/// services) counts into the same [`MetricsHandle`]: one layer = one set of metrics.
/// To count two services separately, build two layers.
///
/// Defaults (see [`MetricsLayer::builder`]): classifier [`ErrorsAsFailures`],
/// latency histograms with the bounds of [`DEFAULT_BUCKETS`], no HdrHistogram
/// percentiles, [`LatencyClock::tsc`].
#[derive(Clone, Debug)]
pub struct MetricsLayer<C = ErrorsAsFailures> {
    handle: MetricsHandle,
    classifier: C,
}

impl Default for MetricsLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsLayer {
    /// A layer with fresh metrics and the defaults.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder for the window and precision.
    pub fn builder() -> MetricsLayerBuilder {
        MetricsLayerBuilder {
            window: DEFAULT_WINDOW,
            significant_figures: DEFAULT_SIGNIFICANT_FIGURES,
            percentiles: false,
            buckets: DEFAULT_BUCKETS.to_vec(),
            clock: None,
            exemplars: None,
        }
    }

    /// A layer that counts into an existing handle.
    pub fn from_handle(handle: MetricsHandle) -> Self {
        MetricsLayer {
            handle,
            classifier: ErrorsAsFailures,
        }
    }
}

impl<C> MetricsLayer<C> {
    /// Replaces the classifier deciding what counts as success, failure or neither.
    pub fn classifier<C2>(self, classifier: C2) -> MetricsLayer<C2> {
        MetricsLayer {
            handle: self.handle,
            classifier,
        }
    }

    /// The handle to read (snapshot) these metrics.
    pub fn handle(&self) -> MetricsHandle {
        self.handle.clone()
    }
}

impl<S, C: Clone> Layer<S> for MetricsLayer<C> {
    type Service = Metrics<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Metrics {
            inner,
            classifier: self.classifier.clone(),
            handle: self.handle.clone(),
        }
    }
}

/// Builds a [`MetricsLayer`]; from [`MetricsLayer::builder`].
#[derive(Clone, Debug)]
pub struct MetricsLayerBuilder {
    window: Duration,
    significant_figures: u8,
    percentiles: bool,
    buckets: Vec<Duration>,
    clock: Option<LatencyClock>,
    exemplars: Option<SharedSource>,
}

impl MetricsLayerBuilder {
    /// The upper bounds of the latency histograms' buckets (default
    /// [`DEFAULT_BUCKETS`], 100 µs to 10 s). Sorted and deduplicated; zero bounds
    /// and bounds beyond [`MAX_BUCKETS`](super::MAX_BUCKETS) are dropped. Calls
    /// above the last bound land in the `+Inf` bucket.
    ///
    /// Fixed bounds are what lets a dashboard add the histograms of many instances
    /// and compute quantiles over the sum (`histogram_quantile` in PromQL); keep
    /// the same bounds on every instance.
    pub fn buckets(mut self, bounds: &[Duration]) -> Self {
        self.buckets = bounds.to_vec();
        self
    }

    /// Also keeps HdrHistogram percentiles (p50, p90, p99, p99.9, max, mean) over a
    /// rotating window (default off; [`MetricsSnapshot::latency`](super::MetricsSnapshot::latency)
    /// is `None` without them). Exact to 1 % where buckets are coarse, but they are
    /// per instance: percentiles of several instances cannot be added up. Costs a
    /// lock of the calling thread's own recorder per call and about 72 KiB per
    /// thread that calls (two histograms at two significant figures).
    pub fn percentiles(mut self, enabled: bool) -> Self {
        self.percentiles = enabled;
        self
    }

    /// The rotation interval of the percentile window (default 60 s, at least
    /// 1 ms); turns [`percentiles`](Self::percentiles) on. Quantiles cover the calls
    /// of the current and the previous interval.
    pub fn window(mut self, interval: Duration) -> Self {
        self.window = interval;
        self.percentiles = true;
        self
    }

    /// Percentile precision in significant figures, 1 to 5 (default 2: values
    /// within 1 %); turns [`percentiles`](Self::percentiles) on. Each recording
    /// thread keeps two histograms; each takes about 36 KiB at 2 figures, 270 KiB
    /// at 3, and roughly eight times more per further figure.
    pub fn significant_figures(mut self, figures: u8) -> Self {
        self.significant_figures = figures;
        self.percentiles = true;
        self
    }

    /// The clock for latencies and the window (default [`LatencyClock::tsc`]; use
    /// [`LatencyClock::tokio`] in tests on a paused tokio clock).
    pub fn clock(mut self, clock: LatencyClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Keeps exemplars: for each bucket, the trace of the latest call recorded in
    /// it, which exporters attach to the bucket (OpenMetrics exemplars; keel's
    /// `prometheus` exposition writes them). Default: none.
    ///
    /// `source` is asked for the trace once per completed call, on the thread that
    /// completes it; keel's `otel` feature has one that reads the current
    /// OpenTelemetry span (`keel::kafka::otel::exemplar_source`). Costs that
    /// question and a lock of the calling thread's own recorder per call.
    ///
    /// ```
    /// use keel_layers::metrics::{MetricsLayer, TraceRef};
    ///
    /// let layer = MetricsLayer::builder()
    ///     .exemplars(|| Some(TraceRef { trace_id: [7; 16], span_id: [1; 8] }))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn exemplars(mut self, source: impl ExemplarSource) -> Self {
        self.exemplars = Some(SharedSource(Arc::new(source)));
        self
    }

    /// The layer, with fresh metrics.
    pub fn build(self) -> MetricsLayer {
        let clock = self.clock.unwrap_or_default();
        let percentiles = self.percentiles.then_some(Percentiles {
            window: self.window,
            significant_figures: self.significant_figures,
        });
        MetricsLayer::from_handle(MetricsHandle::with(
            clock,
            Buckets::new(&self.buckets),
            percentiles,
            self.exemplars,
        ))
    }
}
