//! Kafka dead_letter (being written).
