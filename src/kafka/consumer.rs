//! Kafka consumer (being written).
