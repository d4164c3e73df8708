//! Named, labelled handles that an exporter reads on every scrape.

use super::error::RegistryError;
use super::handle::{MetricsHandle, MetricsSnapshot};
use parking_lot::RwLock;
use std::sync::Arc;

/// A metric name or label name: `[a-zA-Z_][a-zA-Z0-9_.]*`.
///
/// Dots are allowed so that OpenTelemetry names (`messaging.client.operation.duration`,
/// `messaging.destination.name`) can be registered as they are; a Prometheus
/// exporter turns them into underscores.
pub fn is_valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// One registered handle: the name of its metric family, its labels (in
/// registration order) and the handle.
#[derive(Clone, Debug)]
pub struct Registered {
    /// The family name, for example `messaging.client.operation.duration` or
    /// `http_server`.
    pub name: String,
    /// Constant labels of this series, for example `topic="orders"`.
    pub labels: Vec<(String, String)>,
    /// The handle.
    pub handle: MetricsHandle,
}

/// One registered handle's snapshot; see [`MetricsRegistry::snapshots`].
#[derive(Clone, Debug)]
pub struct RegisteredSnapshot {
    /// The family name.
    pub name: String,
    /// Constant labels of this series.
    pub labels: Vec<(String, String)>,
    /// The snapshot.
    pub snapshot: MetricsSnapshot,
}

/// Named, labelled [`MetricsHandle`]s, read together by an exporter.
///
/// This is the interface between the metrics layer and any exporter: keel-layers
/// renders nothing itself. The `prometheus` feature of `keel` exposes a registry
/// as OpenMetrics text through the `prometheus-client` crate; anything else can
/// read [`snapshots`](Self::snapshots).
///
/// Series of one family differ by their labels (one family per operation kind,
/// one series per topic, event type or handler), never by a name prefix, so
/// dashboards can sum them. Cloning shares the registry.
///
/// ```
/// use keel_layers::metrics::{MetricsLayer, MetricsRegistry};
///
/// let registry = MetricsRegistry::new();
/// let orders = MetricsLayer::new();
/// registry
///     .register_with_labels("handler", [("event_type", "order.created")], orders.handle())
///     .unwrap();
/// // The same family and labels twice: refused.
/// assert!(registry
///     .register_with_labels("handler", [("event_type", "order.created")], orders.handle())
///     .is_err());
/// assert_eq!(registry.snapshots()[0].labels[0].1, "order.created");
/// ```
#[derive(Clone, Debug, Default)]
pub struct MetricsRegistry {
    entries: Arc<RwLock<Vec<Registered>>>,
}

impl MetricsRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a handle as the unlabelled series of family `name`.
    pub fn register(
        &self,
        name: impl Into<String>,
        handle: MetricsHandle,
    ) -> Result<(), RegistryError> {
        self.register_with_labels(name, std::iter::empty::<(String, String)>(), handle)
    }

    /// Adds a handle as the series of family `name` with these labels. Names and
    /// label names must be valid ([`is_valid_metric_name`]); label values are
    /// free text. A family + labels pair may be registered once.
    pub fn register_with_labels<K, V>(
        &self,
        name: impl Into<String>,
        labels: impl IntoIterator<Item = (K, V)>,
        handle: MetricsHandle,
    ) -> Result<(), RegistryError>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let name = name.into();
        if !is_valid_metric_name(&name) {
            return Err(RegistryError::InvalidName(name));
        }
        let labels: Vec<(String, String)> = labels
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        if let Some((bad, _)) = labels.iter().find(|(k, _)| !is_valid_metric_name(k)) {
            return Err(RegistryError::InvalidName(bad.clone()));
        }
        let mut entries = self.entries.write();
        if entries
            .iter()
            .any(|e| e.name == name && same_labels(&e.labels, &labels))
        {
            return Err(RegistryError::Duplicate(name));
        }
        entries.push(Registered {
            name,
            labels,
            handle,
        });
        Ok(())
    }

    /// Every registered handle, in registration order.
    pub fn entries(&self) -> Vec<Registered> {
        self.entries.read().clone()
    }

    /// Snapshots of every registered handle, in registration order.
    pub fn snapshots(&self) -> Vec<RegisteredSnapshot> {
        self.entries()
            .into_iter()
            .map(|e| RegisteredSnapshot {
                snapshot: e.handle.snapshot(),
                name: e.name,
                labels: e.labels,
            })
            .collect()
    }
}

fn same_labels(a: &[(String, String)], b: &[(String, String)]) -> bool {
    a.len() == b.len() && a.iter().all(|l| b.contains(l))
}
