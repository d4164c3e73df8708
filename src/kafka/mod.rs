//! Kafka: publishing and consuming-and-handling events as Tower services.

pub mod client;
pub mod config;
pub mod consumer;
pub mod dead_letter;
pub mod envelope;
pub mod error;
pub mod facade;
#[cfg(feature = "otel")]
pub mod otel;
pub mod producer;
pub mod registry;
pub mod topic;

pub use config::KafkaConfig;
pub use envelope::EventEnvelope;
pub use facade::{ConsumerBuilder, Kafka, RecordAck};
pub use topic::{InvalidTopic, TopicName, TopicRule};
