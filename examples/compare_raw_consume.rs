//! Consume a topic with a typed handler with rust-rdkafka alone, with the
//! guarantees keel gives by default (see `compare_keel_consume.rs`): offsets
//! stored only after a record is handled or dead-lettered, retries with
//! backoff (1, 2, 4 s), decode failures dead-lettered at once, a DLQ with
//! keel's provenance headers, a final commit on shutdown.
//!
//! ```text
//! KAFKA_BROKERS=127.0.0.1:9092 cargo run --example compare_raw_consume [topic]
//! ```
//!
//! Left out (what keel has and this version does not):
//! - concurrency: one record at a time for every partition; a record in retry blocks all partitions
//! - pause/resume of a partition whose queue is full; bounded in-flight memory per partition
//! - rebalance handling: a revoked partition's record in retry is still handled and stored
//! - shutdown within a deadline: a record in retry delays shutdown until its retries end
//! - a DLQ write that fails ends the program (the record is re-read on restart); keel retries it with backoff, holding only that partition
//! - a retry classifier: every handler error is retried here, keel skips retries for permanent ones
//! - metrics (lag, handled, retried, dead-lettered), spans, health and the error message cut to a bounded length
//! - decode errors quote the payload in the DLQ header (serde_json's message); keel's never do
//! - the DLQ headers for the timestamp type and the error's Rust type
//! - routing by event type (a record of another type is dead-lettered as `decode` here)

#[path = "compare/kafka_common.rs"]
mod common;

use std::time::{Duration, SystemTime};

use common::{BoxError, OrderCreated, handle_order, shutdown_signal};
use rdkafka::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::de::DeserializeOwned;

// region: task
const RETRIES: u32 = 3;

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<T> {
    event_type: String,
    payload: T,
}

fn decode<T: DeserializeOwned>(msg: &BorrowedMessage<'_>, event_type: &str) -> Result<T, String> {
    let body = msg.payload().ok_or("record without a value")?;
    let envelope: Envelope<T> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if envelope.event_type != event_type {
        return Err(format!("unexpected event type {}", envelope.event_type));
    }
    Ok(envelope.payload)
}

/// The handler with retries: Err((error, attempts)) once they are spent.
async fn handle_with_retries(order: &OrderCreated) -> Result<(), (BoxError, u32)> {
    let mut attempt = 1;
    loop {
        match handle_order(order).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt > RETRIES => return Err((e, attempt)),
            Err(_) => {
                tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
                attempt += 1;
            }
        }
    }
}

/// Republishes the record (key, value, headers) to the DLQ with provenance headers.
async fn dead_letter(
    dlq: &FutureProducer,
    group: &str,
    msg: &BorrowedMessage<'_>,
    (class, error, attempts): (&str, String, u32),
) -> Result<(), BoxError> {
    let mut headers = OwnedHeaders::new();
    if let Some(original) = msg.headers() {
        for h in original.iter() {
            headers = headers.insert(h);
        }
    }
    let failed_at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_millis();
    for (key, value) in [
        ("keel-dlq-original-topic", msg.topic().to_owned()),
        ("keel-dlq-original-partition", msg.partition().to_string()),
        ("keel-dlq-original-offset", msg.offset().to_string()),
        (
            "keel-dlq-original-timestamp",
            msg.timestamp().to_millis().unwrap_or(-1).to_string(),
        ),
        ("keel-dlq-consumer-group", group.to_owned()),
        ("keel-dlq-error-kind", class.to_owned()),
        ("keel-dlq-error-message", error),
        ("keel-dlq-attempts", attempts.to_string()),
        ("keel-dlq-failed-at", failed_at.to_string()),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(&value),
        });
    }
    let topic = format!("{}.dlq", msg.topic());
    let mut record = FutureRecord::<[u8], [u8]>::to(&topic).headers(headers);
    if let Some(key) = msg.key() {
        record = record.key(key);
    }
    if let Some(value) = msg.payload() {
        record = record.payload(value);
    }
    dlq.send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}
// endregion

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let topic = common::topic_arg("compare-consume");
    let group = format!("{topic}-billing");
    common::seed_orders(&topic).await?;

    // region: task
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .set("group.id", &group)
        .set("enable.auto.commit", "true")
        // Commit only offsets stored below, after handling or dead-lettering.
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic.as_str()])?;
    let dlq: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let msg = tokio::select! {
            _ = &mut shutdown => break,
            msg = consumer.recv() => msg?,
        };
        let failure = match decode::<OrderCreated>(&msg, "order.created") {
            Err(e) => Some(("decode", e, 1)),
            Ok(order) => match handle_with_retries(&order).await {
                Ok(()) => None,
                Err((e, attempts)) => Some(("error", e.to_string(), attempts)),
            },
        };
        if let Some(failure) = failure {
            dead_letter(&dlq, &group, &msg, failure).await?;
        }
        consumer.store_offset_from_message(&msg)?;
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        // Nothing stored since the last automatic commit.
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => return Err(e.into()),
    }
    // endregion

    println!("stopped; dead letters in {topic}.dlq");
    Ok(())
}
