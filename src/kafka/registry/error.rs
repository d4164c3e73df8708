//! Errors of building a [`HandlerRegistry`](super::HandlerRegistry).

/// A registry of handlers could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// Two handlers for one event type.
    #[error("more than one handler registered for event type {0:?}")]
    DuplicateHandler(String),
}
