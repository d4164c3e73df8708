//! Publish one event with keel. Compared with `compare_raw_publish.rs` in
//! docs/COMPARISON.md; the lines between `region: task` and `endregion` are
//! counted by `scripts/count-compare`.
//!
//! ```text
//! KAFKA_BROKERS=127.0.0.1:9092 cargo run --example compare_keel_publish [topic]
//! ```
//!
//! What keel does by default here: idempotent producer with `acks=all`
//! (no duplicates, no loss on a leader change), librdkafka retries (5) inside a
//! delivery timeout of 30 s, an outer timeout (delivery timeout + 5 s) so the
//! future always ends, a circuit breaker (opens after 5 consecutive failures,
//! probes after 60 s), a span and a completion event per publish, call
//! metrics, keel's envelope (id, type, version, timestamp; the same in
//! headers) and a typed error (`KafkaProducerError`).

#[path = "compare/kafka_common.rs"]
mod common;

use common::{BoxError, OrderCreated};
use keel::prelude::*;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let topic = common::topic_arg("compare-publish");
    let order = OrderCreated {
        id: 42,
        amount_cents: 1999,
    };

    // region: task
    let kafka = Kafka::connect(KafkaConfig::from_env()?)?;
    let event = EventEnvelope::new("order.created", order).with_key("order-42");
    let ack = kafka.publish(topic.clone(), event).await?;
    // endregion

    println!("published to {topic}: {ack:?}");
    Ok(())
}
