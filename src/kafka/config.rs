//! Kafka config (being written).
