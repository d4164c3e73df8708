//! Prometheus / OpenMetrics exposition of keel's metrics, through the
//! [`prometheus-client`](https://docs.rs/prometheus-client) crate (feature
//! `prometheus`).
//!
//! keel's layers and services keep their own counters and histograms (recorded
//! per thread, without a shared lock: see [`keel_layers::metrics`]). At every
//! scrape an [`Exposition`] takes their snapshots and hands them to
//! `prometheus-client`'s OpenMetrics text encoder as collectors, so the escaping,
//! the family layout, `_bucket{le=…}` / `_sum` / `_count`, units and the `# EOF`
//! trailer are the crate's, not hand-written.
//!
//! # Why `prometheus-client`
//!
//! It is the Prometheus project's own Rust client (github.com/prometheus/client_rust),
//! it writes OpenMetrics 1.0 text (with units and exemplars) as its native format,
//! and its [`Collector`](prometheus_client::collector::Collector) trait lets keel
//! expose metrics it records itself, at scrape time, without a second copy on the
//! hot path. The `metrics` facade with `metrics-exporter-prometheus` would put a
//! global recorder between every call and its counters (a name-and-label lookup
//! per update unless handles are cached) and renders the older Prometheus 0.0.4
//! text only; keel's layers already count per thread, so what they need from a
//! crate is the encoder. BENCHMARKS.md "Metrics and Prometheus" measures a scrape
//! and compares the layer with `prometheus-client`'s own histogram on the hot path.
//!
//! # Names and labels
//!
//! Families follow the OpenTelemetry semantic conventions where one applies
//! (messaging conventions 1.28+, as the `otel` feature's spans), in their
//! Prometheus form (dots become underscores, the unit a suffix):
//!
//! | family | type | from |
//! |---|---|---|
//! | `messaging_client_operation_duration_seconds` | histogram | the publish stacks' metrics layers, registered under `messaging.client.operation.duration` |
//! | `messaging_process_duration_seconds` | histogram | handler metrics layers registered under `messaging.process.duration` |
//! | `messaging_client_sent_messages_total` | counter | [`Exposition::publish`] |
//! | `messaging_client_consumed_messages_total` | counter | [`Exposition::consumer`] |
//!
//! Series of one family differ by labels, never by a name prefix: the labels a
//! handle was registered with (`event_type`, `messaging_destination_name`,
//! `messaging_operation_name`, …) plus `outcome` (`success`, `failure`, and
//! `ignored` once a call was) on every duration histogram and `error_type` on failure counters.
//! What the conventions do not cover keeps a `keel_` name with labels
//! (`keel_kafka_consumer_messages_total{outcome="dead_lettered"}`,
//! `keel_circuit_breaker_state{breaker="kafka_publish"}`, …). One of them is a
//! histogram: `keel_kafka_consumer_processing_duration_seconds{group,outcome}`,
//! the consumer runtime's time per message from the start of handling to its end
//! (every attempt, the backoff between them and dead-lettering included), where
//! `messaging_process_duration_seconds` times one handler call.
//!
//! The names of keel before 0.2 (`kafka_consumer_processed_total`,
//! `kafka_publish_published_total`, `s3_uploads_total`, …) are rendered too only
//! when asked for with [`Exposition::keel_names`].
//!
//! Histograms have fixed bucket bounds (the layer's, by default
//! [`DEFAULT_BUCKETS`](keel_layers::metrics::DEFAULT_BUCKETS)), so the series of
//! many instances add up and `histogram_quantile` works over their sum. A layer
//! built with [`percentiles`](keel_layers::metrics::MetricsLayerBuilder::percentiles)
//! also shows its HdrHistogram window as `<stem>_duration_window_seconds{quantile=…}`
//! gauges (per instance; not to be summed).
//!
//! # Exemplars
//!
//! A layer built with
//! [`exemplars`](keel_layers::metrics::MetricsLayerBuilder::exemplars) keeps, per
//! bucket, the trace of the latest call that landed there, and the exposition
//! writes it as an OpenMetrics exemplar on that bucket's line:
//!
//! ```text
//! messaging_process_duration_seconds_bucket{le="0.005",event_type="order.created",outcome="success"} 41 # {trace_id="4bf92f3577b34da6a3ce929d0e0e4736",span_id="00f067aa0ba902b7"} 0.0031 1764835200.123
//! ```
//!
//! With the `otel` feature, `keel::kafka::otel::exemplar_source()` reads the
//! trace of the current span (sampled traces only), so Grafana can jump from a
//! slow bucket to its trace. Prometheus keeps exemplars when run with
//! `--enable-feature=exemplar-storage` and scraping OpenMetrics
//! ([`OPENMETRICS_CONTENT_TYPE`]). prometheus-client 0.26 gives a collector no way
//! to build its `Exemplar` type (the constructor is private to the crate), so the
//! crate's encoder writes the bucket lines and keel appends the exemplar to the
//! line it belongs to.
//!
//! # Example
//!
//! ```
//! use keel::prometheus::{Exposition, OPENMETRICS_CONTENT_TYPE};
//! use keel_layers::metrics::{MetricsLayer, MetricsRegistry};
//!
//! let registry = MetricsRegistry::new();
//! let handler = MetricsLayer::new();
//! registry
//!     .register_with_labels(
//!         "messaging.process.duration",
//!         [("messaging.system", "kafka"), ("event_type", "order.created")],
//!         handler.handle(),
//!     )
//!     .unwrap();
//!
//! let mut scrape = Exposition::new();
//! scrape.layers(&registry);
//! let text = scrape.render();
//! assert!(text.contains(
//!     "messaging_process_duration_seconds_count{messaging_system=\"kafka\",event_type=\"order.created\",outcome=\"success\"} 0"
//! ));
//! assert!(text.ends_with("# EOF\n"));
//! # let _ = OPENMETRICS_CONTENT_TYPE;
//! ```

mod families;

use families::{Family, Sample};
use keel_layers::metrics::{MetricsRegistry, RegisteredSnapshot};

#[cfg(feature = "kafka")]
pub use families::PartitionLagSample;

/// The `Content-Type` of [`Exposition::render`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One scrape: the snapshots to expose, rendered as OpenMetrics text by
/// `prometheus-client`. Build one per scrape (it holds the values of that moment).
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
    keel_names: bool,
}

impl Exposition {
    /// An empty scrape, without the pre-0.2 names.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also renders keel's pre-0.2 family names (`kafka_consumer_processed_total`,
    /// `kafka_publish_published_total`, `s3_uploads_total`, …) beside the current
    /// ones, for dashboards not migrated yet. Default off. Call it before adding
    /// sources.
    pub fn keel_names(&mut self, enabled: bool) -> &mut Self {
        self.keel_names = enabled;
        self
    }

    /// Every handle of a [`MetricsRegistry`]: per registered name, a duration
    /// histogram by outcome, failures by class, cancellations, calls in flight and
    /// (when the layer keeps them) the percentile window; see the
    /// [module docs](self).
    pub fn layers(&mut self, registry: &MetricsRegistry) -> &mut Self {
        let snapshots = registry.snapshots();
        self.add_layer_snapshots(&snapshots);
        self
    }

    /// Like [`layers`](Self::layers), from snapshots taken already.
    pub fn add_layer_snapshots(&mut self, snapshots: &[RegisteredSnapshot]) -> &mut Self {
        families::layers(&mut self.families, snapshots);
        self
    }

    /// A gauge family of your own, one sample per label set.
    pub fn gauge<I, L>(&mut self, name: &str, help: &str, samples: I) -> &mut Self
    where
        I: IntoIterator<Item = (L, f64)>,
        L: IntoIterator<Item = (String, String)>,
    {
        let family = families::family(&mut self.families, name, help, families::Kind::Gauge);
        for (labels, value) in samples {
            family
                .samples
                .push(Sample::gauge(labels.into_iter().collect(), value));
        }
        self
    }

    /// A counter family of your own (`_total` is appended), one sample per label set.
    pub fn counter<I, L>(&mut self, name: &str, help: &str, samples: I) -> &mut Self
    where
        I: IntoIterator<Item = (L, u64)>,
        L: IntoIterator<Item = (String, String)>,
    {
        let family = families::family(&mut self.families, name, help, families::Kind::Counter);
        for (labels, value) in samples {
            family
                .samples
                .push(Sample::counter(labels.into_iter().collect(), value));
        }
        self
    }

    /// The OpenMetrics text, ending in `# EOF`.
    pub fn render(&self) -> String {
        let out = families::encode(self.families.clone());
        let exemplars = families::exemplar_suffixes(&self.families);
        if exemplars.is_empty() {
            return out;
        }
        let mut with = String::with_capacity(out.len() + 96 * exemplars.len());
        for line in out.lines() {
            with.push_str(line);
            if let Some(exemplar) = exemplars.get(line) {
                with.push_str(exemplar);
            }
            with.push('\n');
        }
        with
    }
}

#[cfg(feature = "kafka")]
impl Exposition {
    /// A consumer runtime: messages consumed (semantic conventions), keel's
    /// outcome counters, retries, in flight, stuck partitions and the lag per
    /// partition, labelled with the consumer group.
    pub fn consumer(
        &mut self,
        group: &str,
        metrics: &crate::kafka::consumer::ConsumerMetricsSnapshot,
        in_flight: usize,
        lags: &[PartitionLagSample],
    ) -> &mut Self {
        families::consumer(
            &mut self.families,
            group,
            metrics,
            in_flight,
            lags,
            self.keel_names,
        );
        self
    }

    /// The publish services' counters: messages sent (semantic conventions).
    pub fn publish(
        &mut self,
        metrics: &crate::kafka::producer::PublishMetricsSnapshot,
    ) -> &mut Self {
        families::publish(&mut self.families, metrics, self.keel_names);
        self
    }
}

#[cfg(feature = "s3")]
impl Exposition {
    /// The S3 facade's counters: operations and bytes by operation.
    pub fn s3(&mut self, metrics: &crate::s3::metrics::S3MetricsSnapshot) -> &mut Self {
        families::s3(&mut self.families, metrics, self.keel_names);
        self
    }
}

impl Exposition {
    /// Circuit breakers' states, one series per `breaker` label (the breaker's
    /// [name](keel_layers::circuit_breaker::CircuitBreakerBuilder::name); `""` for
    /// one without): 0 closed, 1 open, 2 half-open, 3 forced open, 4 forced
    /// closed, 5 metrics only.
    pub fn breakers<'a>(
        &mut self,
        breakers: impl IntoIterator<Item = &'a keel_layers::circuit_breaker::CircuitBreakerHandle>,
    ) -> &mut Self {
        families::breakers(
            &mut self.families,
            breakers.into_iter().map(|h| (h.name().unwrap_or(""), h)),
        );
        self
    }
}

#[cfg(test)]
mod tests;
