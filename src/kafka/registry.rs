//! Kafka registry (being written).
