//! Prometheus text exposition (format 0.0.4) of named snapshots.

use super::error::RegistryError;
use super::handle::{MetricsHandle, MetricsSnapshot};
use parking_lot::RwLock;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

/// The `Content-Type` of [`render_prometheus`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders named snapshots in the Prometheus text format.
///
/// Each name becomes the prefix of its metric families (invalid characters become
/// `_`; a later duplicate of an earlier name is skipped, since a family may appear
/// only once):
///
/// | family | type | |
/// |---|---|---|
/// | `<name>_calls_total` | counter | calls started |
/// | `<name>_successes_total` | counter | |
/// | `<name>_failures_total{class="…"}` | counter | one series per failure class |
/// | `<name>_ignored_total` | counter | |
/// | `<name>_cancelled_total` | counter | futures dropped before completion |
/// | `<name>_in_flight` | gauge | |
/// | `<name>_duration_seconds{quantile="0.5"…"0.999"}` | summary | quantiles over the window (`NaN` when empty), `_sum` and `_count` since start |
/// | `<name>_duration_max_seconds` | gauge | slowest call in the window |
/// | `<name>_last_success_timestamp_seconds` | gauge | omitted until the first success |
/// | `<name>_last_failure_timestamp_seconds` | gauge | omitted until the first failure |
///
/// ```
/// use keel_layers::metrics::{render_prometheus, MetricsLayer};
///
/// let layer = MetricsLayer::new();
/// let text = render_prometheus(&[("kafka_publish", &layer.handle().snapshot())]);
/// assert!(text.contains("kafka_publish_calls_total 0\n"));
/// ```
pub fn render_prometheus(snapshots: &[(&str, &MetricsSnapshot)]) -> String {
    let mut out = String::with_capacity(1024 * snapshots.len());
    let mut seen: Vec<String> = Vec::with_capacity(snapshots.len());
    for (name, snapshot) in snapshots {
        let name = sanitize_metric_name(name);
        if seen.contains(&name) {
            continue;
        }
        render_one(&mut out, &name, snapshot);
        seen.push(name);
    }
    out
}

/// `true` when `name` is a valid Prometheus metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
pub fn is_valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn sanitize_metric_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == ':') {
        out.insert(0, '_');
    }
    out
}

fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn family(out: &mut String, name: &str, suffix: &str, kind: &str, help: &str) {
    // HELP texts are constants here without `\` or newlines, so need no escaping.
    let _ = writeln!(out, "# HELP {name}{suffix} {help}");
    let _ = writeln!(out, "# TYPE {name}{suffix} {kind}");
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn render_one(out: &mut String, name: &str, s: &MetricsSnapshot) {
    let mut counter = |suffix: &str, help: &str, value: u64| {
        family(out, name, suffix, "counter", help);
        let _ = writeln!(out, "{name}{suffix} {value}");
    };
    counter("_calls_total", "Calls started.", s.calls);
    counter("_successes_total", "Calls that succeeded.", s.successes);
    counter(
        "_ignored_total",
        "Calls counted as neither success nor failure.",
        s.ignored,
    );
    counter(
        "_cancelled_total",
        "Calls dropped before completing.",
        s.cancelled,
    );

    family(
        out,
        name,
        "_failures_total",
        "counter",
        "Calls that failed, by failure class.",
    );
    for (class, count) in &s.failures_by_class {
        let class = escape_label_value(class);
        let _ = writeln!(out, "{name}_failures_total{{class=\"{class}\"}} {count}");
    }

    family(out, name, "_in_flight", "gauge", "Calls running now.");
    let _ = writeln!(out, "{name}_in_flight {}", s.in_flight);

    family(
        out,
        name,
        "_duration_seconds",
        "summary",
        "Call latency: quantiles over the recent window, sum and count since start.",
    );
    let l = &s.latency;
    for (quantile, value) in [
        ("0.5", l.p50),
        ("0.9", l.p90),
        ("0.99", l.p99),
        ("0.999", l.p999),
    ] {
        if l.count == 0 {
            let _ = writeln!(
                out,
                "{name}_duration_seconds{{quantile=\"{quantile}\"}} NaN"
            );
        } else {
            let _ = writeln!(
                out,
                "{name}_duration_seconds{{quantile=\"{quantile}\"}} {}",
                seconds(value)
            );
        }
    }
    let _ = writeln!(
        out,
        "{name}_duration_seconds_sum {}",
        seconds(s.latency_sum)
    );
    let _ = writeln!(out, "{name}_duration_seconds_count {}", s.completed());

    family(
        out,
        name,
        "_duration_max_seconds",
        "gauge",
        "Slowest call in the recent window.",
    );
    let _ = writeln!(out, "{name}_duration_max_seconds {}", seconds(l.max));

    for (suffix, help, at) in [
        (
            "_last_success_timestamp_seconds",
            "Unix time of the last success.",
            s.last_success_unix_ms,
        ),
        (
            "_last_failure_timestamp_seconds",
            "Unix time of the last failure.",
            s.last_failure_unix_ms,
        ),
    ] {
        if let Some(ms) = at {
            family(out, name, suffix, "gauge", help);
            let _ = writeln!(out, "{name}{suffix} {}", ms as f64 / 1000.0);
        }
    }
}

/// Named [`MetricsHandle`]s rendered together, for a `/metrics` endpoint.
///
/// Cloning shares the registry.
///
/// ```
/// use keel_layers::metrics::{MetricsLayer, MetricsRegistry};
///
/// let registry = MetricsRegistry::new();
/// let publish = MetricsLayer::new();
/// registry.register("kafka_publish", publish.handle()).unwrap();
/// assert!(registry.register("kafka_publish", publish.handle()).is_err());
/// assert!(registry.render().contains("# TYPE kafka_publish_in_flight gauge"));
/// ```
#[derive(Clone, Debug, Default)]
pub struct MetricsRegistry {
    entries: Arc<RwLock<Vec<(String, MetricsHandle)>>>,
}

impl MetricsRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a handle under `name`, the prefix of its metric families. The name must
    /// be a valid Prometheus metric name and not registered yet.
    pub fn register(
        &self,
        name: impl Into<String>,
        handle: MetricsHandle,
    ) -> Result<(), RegistryError> {
        let name = name.into();
        if !is_valid_metric_name(&name) {
            return Err(RegistryError::InvalidName(name));
        }
        let mut entries = self.entries.write();
        if entries.iter().any(|(n, _)| *n == name) {
            return Err(RegistryError::Duplicate(name));
        }
        entries.push((name, handle));
        Ok(())
    }

    /// Snapshots of every registered handle, in registration order.
    pub fn snapshots(&self) -> Vec<(String, MetricsSnapshot)> {
        let entries = self.entries.read().clone();
        entries
            .into_iter()
            .map(|(name, handle)| (name, handle.snapshot()))
            .collect()
    }

    /// The Prometheus text of every registered handle; see [`render_prometheus`].
    pub fn render(&self) -> String {
        let snapshots = self.snapshots();
        let named: Vec<(&str, &MetricsSnapshot)> =
            snapshots.iter().map(|(n, s)| (n.as_str(), s)).collect();
        render_prometheus(&named)
    }
}
