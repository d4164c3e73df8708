use crate::classify::{Classification, ClassifiedError};

/// Why a batch was rejected before the inner service saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BatchSizeError {
    /// The batch has no items (and empty batches are not allowed).
    #[error("batch is empty")]
    Empty,
    /// The batch has more items than the maximum.
    #[error("batch of {len} items exceeds the maximum of {max}")]
    TooLarge {
        /// Items in the rejected batch.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
}

impl ClassifiedError for BatchSizeError {
    /// A permanent failure of class `"batch_size"`: the same batch will be rejected
    /// again, so retrying is pointless.
    fn classification(&self) -> Classification {
        Classification::permanent_failure("batch_size")
    }
}

/// The error of a [`BatchSize`](super::BatchSize) service: a rejected batch, or the
/// inner service's error.
#[derive(Debug, thiserror::Error)]
pub enum Error<E> {
    /// The batch was rejected; the inner service was not called.
    #[error(transparent)]
    Rejected(#[from] BatchSizeError),
    /// The inner service failed.
    #[error(transparent)]
    Inner(E),
}

impl<E> Error<E> {
    /// The inner error, if this is one.
    pub fn into_inner(self) -> Option<E> {
        match self {
            Error::Inner(e) => Some(e),
            Error::Rejected(_) => None,
        }
    }

    /// The rejection, if the batch was rejected.
    pub fn rejection(&self) -> Option<BatchSizeError> {
        match self {
            Error::Rejected(r) => Some(*r),
            Error::Inner(_) => None,
        }
    }
}

impl<E: ClassifiedError> ClassifiedError for Error<E> {
    fn classification(&self) -> Classification {
        match self {
            Error::Rejected(r) => r.classification(),
            Error::Inner(e) => e.classification(),
        }
    }
}
