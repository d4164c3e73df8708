//! Kafka error (being written).
