//! Errors of the dead-letter layer.

use crate::kafka::consumer::BoxError;
use keel_layers::classify::{Classification, ClassifiedError};
use rdkafka::error::KafkaError;

/// The dead-letter service could not do its job. The message is not committed and
/// will be handled again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterError {
    /// Publishing to the dead-letter topic failed.
    #[error("could not publish to dead-letter topic {topic}: {source}")]
    Publish {
        /// The dead-letter topic.
        topic: String,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// The wrapped handler failed to become ready.
    #[error("handler not ready: {0}")]
    NotReady(#[source] BoxError),
}

impl ClassifiedError for DeadLetterError {
    fn classification(&self) -> Classification {
        Classification::failure("dead_letter")
    }
}
