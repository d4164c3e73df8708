use super::{BatchSize, BatchSizeError};
use tower::Layer;

/// The default largest batch: 1,000 items, as the seed's `publishBatch`.
pub const DEFAULT_MAX_BATCH: usize = 1_000;

#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    pub(super) max: usize,
    pub(super) allow_empty: bool,
}

impl Limits {
    #[inline]
    pub(super) fn check(&self, len: usize) -> Result<(), BatchSizeError> {
        if len == 0 && !self.allow_empty {
            Err(BatchSizeError::Empty)
        } else if len > self.max {
            Err(BatchSizeError::TooLarge { len, max: self.max })
        } else {
            Ok(())
        }
    }
}

/// Applies [`BatchSize`] to a service.
///
/// Defaults: at most [`DEFAULT_MAX_BATCH`] (1,000) items, empty batches rejected.
/// The layer is `Copy`; every service it builds gets its own copy of the limits.
#[derive(Clone, Copy, Debug)]
pub struct BatchSizeLayer {
    limits: Limits,
}

impl Default for BatchSizeLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchSizeLayer {
    /// A layer with the defaults: 1 to 1,000 items.
    pub const fn new() -> Self {
        BatchSizeLayer {
            limits: Limits {
                max: DEFAULT_MAX_BATCH,
                allow_empty: false,
            },
        }
    }

    /// Sets the largest batch accepted (default 1,000).
    pub const fn max(mut self, max: usize) -> Self {
        self.limits.max = max;
        self
    }

    /// Lets empty batches through to the inner service (default: rejected with
    /// [`BatchSizeError::Empty`]).
    pub const fn allow_empty(mut self, allow: bool) -> Self {
        self.limits.allow_empty = allow;
        self
    }

    pub(super) fn wrap<S>(&self, inner: S) -> BatchSize<S> {
        BatchSize {
            inner,
            limits: self.limits,
        }
    }
}

impl<S> Layer<S> for BatchSizeLayer {
    type Service = BatchSize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        self.wrap(inner)
    }
}
