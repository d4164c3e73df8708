//! Errors of the retry-topic runtime.

use rdkafka::error::KafkaError;

/// An error of the retry-topic runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RetryTopicError {
    /// The ladder or other settings are invalid.
    #[error("invalid retry-topic configuration: {0}")]
    Config(String),
    /// A retry or dead-letter record was not acknowledged by the broker.
    #[error("publishing to {topic} failed: {source}")]
    Publish {
        /// The topic written to.
        topic: String,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// A record of a retry topic carries `keel-retry-*` headers that cannot be
    /// read (not written by keel, or damaged).
    #[error("bad retry header {header}: {problem}")]
    BadHeader {
        /// The header.
        header: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// librdkafka refused to create or drive the retry consumer.
    #[error("retry consumer: {context}: {source}")]
    Kafka {
        /// What the runtime was doing.
        context: &'static str,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
}
