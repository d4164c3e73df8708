//! The error a [`CircuitBreaker`](super::CircuitBreaker) returns.

use std::time::Duration;

use crate::classify::{Classification, ClassifiedError};

/// Why the breaker refused a call without calling the inner service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rejection {
    Open { remaining_wait: Duration },
    ForcedOpen,
    HalfOpenFull { permitted_probes: u32 },
}

/// The error of a [`CircuitBreaker`](super::CircuitBreaker): either the breaker
/// refused the call (the inner service was **not** called), or the inner service
/// failed.
///
/// Rejections classify (through [`ClassifiedError`]) as permanent failures of class
/// `"circuit_open"`: retrying into an open breaker only burns the retry budget.
#[derive(Debug, thiserror::Error)]
pub enum CircuitBreakerError<E> {
    /// The breaker is open; it lets probe calls through once `remaining_wait` has passed.
    #[error("circuit breaker is open; probing again in {remaining_wait:?}")]
    Open {
        /// Time left until the breaker turns half-open.
        remaining_wait: Duration,
    },
    /// The breaker was forced open through its handle.
    #[error("circuit breaker is forced open")]
    ForcedOpen,
    /// The breaker is half-open and all its probe calls are in flight.
    #[error("circuit breaker is half-open and all {permitted_probes} probe calls are in flight")]
    HalfOpenFull {
        /// How many probe calls the half-open state admits.
        permitted_probes: u32,
    },
    /// The inner service failed.
    #[error(transparent)]
    Inner(E),
}

impl<E> CircuitBreakerError<E> {
    /// `true` when the breaker refused the call (the inner service was not called).
    pub fn is_rejected(&self) -> bool {
        !matches!(self, CircuitBreakerError::Inner(_))
    }

    /// The inner service's error, or `None` for a rejection.
    pub fn into_inner(self) -> Option<E> {
        match self {
            CircuitBreakerError::Inner(e) => Some(e),
            _ => None,
        }
    }

    /// A reference to the inner service's error, or `None` for a rejection.
    pub fn inner(&self) -> Option<&E> {
        match self {
            CircuitBreakerError::Inner(e) => Some(e),
            _ => None,
        }
    }

    pub(crate) fn from_rejection(rejection: Rejection) -> Self {
        match rejection {
            Rejection::Open { remaining_wait } => CircuitBreakerError::Open { remaining_wait },
            Rejection::ForcedOpen => CircuitBreakerError::ForcedOpen,
            Rejection::HalfOpenFull { permitted_probes } => {
                CircuitBreakerError::HalfOpenFull { permitted_probes }
            }
        }
    }
}

impl<E: ClassifiedError> ClassifiedError for CircuitBreakerError<E> {
    fn classification(&self) -> Classification {
        match self {
            CircuitBreakerError::Inner(e) => e.classification(),
            _ => Classification::permanent_failure("circuit_open"),
        }
    }
}
