use super::Metrics;
use super::clock::LatencyClock;
use super::handle::{DEFAULT_SIGNIFICANT_FIGURES, DEFAULT_WINDOW, MetricsHandle};
use crate::classify::ErrorsAsFailures;
use std::time::Duration;
use tower::Layer;

/// Applies [`Metrics`] to a service.
///
/// Every service the layer builds (and every clone of the layer or of those
/// services) counts into the same [`MetricsHandle`]: one layer = one set of metrics.
/// To count two services separately, build two layers.
///
/// Defaults (see [`MetricsLayer::builder`]): classifier [`ErrorsAsFailures`], latency
/// window 60 s (quantiles cover the last 60 to 120 s), two significant figures,
/// [`LatencyClock::tsc`].
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
            clock: None,
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
    pub fn classify<C2>(self, classifier: C2) -> MetricsLayer<C2> {
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
    clock: Option<LatencyClock>,
}

impl MetricsLayerBuilder {
    /// The rotation interval of the latency window (default 60 s, at least 1 ms).
    /// Quantiles cover the calls of the current and the previous interval.
    pub fn window(mut self, interval: Duration) -> Self {
        self.window = interval;
        self
    }

    /// Histogram precision in significant figures, 1 to 5 (default 2: values within
    /// 1 %). The layer keeps two histograms; each takes about 36 KiB at 2 figures,
    /// 270 KiB at 3, and roughly eight times more per further figure.
    pub fn significant_figures(mut self, figures: u8) -> Self {
        self.significant_figures = figures;
        self
    }

    /// The clock for latencies and the window (default [`LatencyClock::tsc`]; use
    /// [`LatencyClock::tokio`] in tests on a paused tokio clock).
    pub fn clock(mut self, clock: LatencyClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The layer, with fresh metrics.
    pub fn build(self) -> MetricsLayer {
        let clock = self.clock.unwrap_or_default();
        MetricsLayer::from_handle(MetricsHandle::new(
            self.window,
            self.significant_figures,
            clock,
        ))
    }
}
