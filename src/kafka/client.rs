//! Kafka client (being written).
