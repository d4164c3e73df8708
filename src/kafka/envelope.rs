//! Kafka envelope (being written).
