/// Why a handle could not be added to a [`MetricsRegistry`](super::MetricsRegistry).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The name is not a valid Prometheus metric name.
    #[error("{0:?} is not a valid Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)")]
    InvalidName(String),
    /// The name is registered already.
    #[error("metrics named {0:?} are registered already")]
    Duplicate(String),
}
