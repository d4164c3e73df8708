//! Consume a topic with a typed handler, with keel. Compared with
//! `compare_raw_consume.rs` in docs/COMPARISON.md; the lines between
//! `region: task` and `endregion` are counted by `scripts/count-compare`.
//!
//! ```text
//! KAFKA_BROKERS=127.0.0.1:9092 cargo run --example compare_keel_consume [topic]
//! ```
//!
//! The set-up writes four `order.created` events: orders 1 and 2 are handled,
//! order 13 fails in the handler (retried after 1, 2 and 4 s, then
//! dead-lettered with class `error`), the fourth does not decode into
//! `OrderCreated` (dead-lettered at once, class `decode`). Read the DLQ with
//! `kcat -b $KAFKA_BROKERS -C -t <topic>.dlq -e -f '%h %s\n'`.
//!
//! What keel does by default here: offsets stored only after a record is
//! handled or dead-lettered (at-least-once), retries with backoff (3, no
//! budget), decode failures permanent, a DLQ with provenance headers
//! (original topic, partition, offset, timestamp, group, error class and
//! message, attempts, time), partitions handled concurrently while each
//! keeps its order, pause/resume when a partition's queue is full, commits
//! on rebalance and graceful shutdown within a deadline.

#[path = "compare/kafka_common.rs"]
mod common;

use std::time::Duration;

use common::{BoxError, OrderCreated, handle_order, shutdown_signal};
use keel::prelude::*;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let topic = common::topic_arg("compare-consume");
    let group = format!("{topic}-billing");
    common::seed_orders(&topic).await?;

    // region: task
    let kafka = Kafka::connect(KafkaConfig::from_env()?)?;
    let consumer = kafka
        .consumer(group)
        .topics([topic.clone()])
        .from_beginning(true)
        .on("order.created", |order: OrderCreated, _record| async move {
            handle_order(&order).await
        })
        .start()?;
    shutdown_signal().await;
    consumer.shutdown(Duration::from_secs(10)).await?;
    // endregion

    println!("stopped; dead letters in {topic}.dlq");
    Ok(())
}
