//! [`TimeoutError`].

use crate::classify::{Classification, ClassifiedError};
use std::time::Duration;

/// The error of a [`Timeout`](super::Timeout) service: the deadline passed, or the
/// inner service failed.
#[derive(Debug, thiserror::Error)]
pub enum TimeoutError<E> {
    /// No response within the deadline. A retryable failure of class `"timeout"`.
    #[error("request timed out after {after:?}")]
    Elapsed {
        /// The configured timeout.
        after: Duration,
    },
    /// The inner service's error, unchanged.
    #[error(transparent)]
    Inner(E),
}

impl<E> TimeoutError<E> {
    /// `true` for [`TimeoutError::Elapsed`].
    pub fn is_elapsed(&self) -> bool {
        matches!(self, TimeoutError::Elapsed { .. })
    }

    /// The inner error, or `None` for a timeout.
    pub fn into_inner(self) -> Option<E> {
        match self {
            TimeoutError::Inner(e) => Some(e),
            TimeoutError::Elapsed { .. } => None,
        }
    }

    /// The inner error by reference, or `None` for a timeout.
    pub fn inner(&self) -> Option<&E> {
        match self {
            TimeoutError::Inner(e) => Some(e),
            TimeoutError::Elapsed { .. } => None,
        }
    }
}

impl<E: ClassifiedError> ClassifiedError for TimeoutError<E> {
    fn classification(&self) -> Classification {
        match self {
            TimeoutError::Elapsed { .. } => Classification::failure("timeout"),
            TimeoutError::Inner(e) => e.classification(),
        }
    }
}
