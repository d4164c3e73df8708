/// Why a handle could not be added to a [`MetricsRegistry`](super::MetricsRegistry).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The name (or a label name) is not valid: `[a-zA-Z_][a-zA-Z0-9_.]*`.
    #[error("{0:?} is not a valid metric or label name ([a-zA-Z_][a-zA-Z0-9_.]*)")]
    InvalidName(String),
    /// The name with these labels is registered already.
    #[error("metrics named {0:?} with these labels are registered already")]
    Duplicate(String),
}
