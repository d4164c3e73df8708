//! Kafka: publishing and consuming-and-handling events as Tower services.

pub mod client;
pub mod config;
pub mod consumer;
pub mod dead_letter;
pub mod envelope;
pub mod error;
#[cfg(feature = "otel")]
pub mod otel;
pub mod producer;
pub mod registry;
pub mod topic;

pub use topic::{InvalidTopic, TopicName, TopicRule};
