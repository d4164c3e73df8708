//! Kafka producer (being written).
