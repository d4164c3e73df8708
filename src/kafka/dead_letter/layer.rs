//! The layer of [`DeadLetter`].

use super::{DeadLetter, DeadLetterPublisher};
use tower::Layer;

/// Wraps a handler so that a message it finally fails on is published to the
/// dead-letter topic instead of failing the stream; see [the module docs](super).
///
/// Cheap to clone; clones share the publisher (and its producer).
#[derive(Clone, Debug)]
pub struct DeadLetterLayer {
    publisher: DeadLetterPublisher,
}

impl DeadLetterLayer {
    /// A layer publishing through `publisher`.
    pub fn new(publisher: DeadLetterPublisher) -> Self {
        DeadLetterLayer { publisher }
    }
}

impl<S> Layer<S> for DeadLetterLayer {
    type Service = DeadLetter<S>;
    fn layer(&self, inner: S) -> DeadLetter<S> {
        DeadLetter::new(inner, self.publisher.clone())
    }
}
