//! Errors of the dead-letter layer.

use crate::kafka::consumer::BoxError;
use keel_layers::classify::{Classification, ClassifiedError};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

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

/// The dead-letter topics could not be made sure of before start
/// ([`DeadLetterTopics::ensure`](super::DeadLetterTopics::ensure)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterTopicError {
    /// The settings are invalid (a partition count or replication factor below 1).
    #[error("invalid dead-letter topic settings: {0}")]
    Config(String),
    /// The admin client could not be created.
    #[error("could not create the admin client for dead-letter topics: {0}")]
    Client(#[source] KafkaError),
    /// The partition count of a source topic could not be read (it does not exist,
    /// or the metadata request failed); set
    /// [`DeadLetterTopics::partitions`](super::DeadLetterTopics::partitions) to
    /// create its dead-letter topic regardless.
    #[error("could not read the partitions of source topic {topic}: {message}")]
    SourceTopic {
        /// The source topic.
        topic: String,
        /// What went wrong.
        message: String,
    },
    /// The CreateTopics request failed as a whole (broker unreachable, timeout).
    #[error("could not create dead-letter topic {topic}: {source}")]
    Request {
        /// The dead-letter topic.
        topic: String,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// The broker refused to create the topic (not authorized, invalid replication
    /// factor, ...). "Already exists" is not an error.
    #[error("broker refused to create dead-letter topic {topic}: {code}")]
    Refused {
        /// The dead-letter topic.
        topic: String,
        /// The broker's error code.
        code: RDKafkaErrorCode,
    },
    /// The topic exists but not every partition had a leader within the timeout.
    #[error("dead-letter topic {topic} has no leader for every partition after {timeout:?}")]
    NotReady {
        /// The dead-letter topic.
        topic: String,
        /// The timeout of [`DeadLetterTopics`](super::DeadLetterTopics).
        timeout: std::time::Duration,
    },
}
