//! Set-up shared by the `compare_*` Kafka examples: not part of what they
//! compare (see docs/COMPARISON.md). Topic names, the business handler both
//! versions call, test records and the shutdown signal.
#![allow(dead_code)]

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};

/// Errors of the examples' set-up and of the handler.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The event both versions publish and consume.
#[derive(Debug, Serialize, Deserialize)]
pub struct OrderCreated {
    /// Order id.
    pub id: u64,
    /// Amount in cents.
    pub amount_cents: u64,
}

/// `KAFKA_BROKERS`, as keel reads it (default `localhost:9092`).
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "localhost:9092".to_owned())
}

/// The first argument, or `<prefix>-<uuid>` (topics are shared on the test broker).
pub fn topic_arg(prefix: &str) -> String {
    std::env::args()
        .nth(1)
        .unwrap_or_else(|| format!("{prefix}-{}", uuid::Uuid::new_v4()))
}

/// The business logic both consumers call: order 13 always fails (a bug
/// downstream), so it is retried and then dead-lettered.
pub async fn handle_order(order: &OrderCreated) -> Result<(), BoxError> {
    if order.id == 13 {
        return Err(format!("billing refused order {}", order.id).into());
    }
    println!("handled order {} ({} cents)", order.id, order.amount_cents);
    Ok(())
}

/// Writes test records to `topic` as another service would: orders 1 and 2 and
/// 13 as keel envelopes, then one whose payload is not an `OrderCreated`.
pub async fn seed_orders(topic: &str) -> Result<(), BoxError> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()?;
    let bodies = [
        serde_json::json!({"id": 1, "amount_cents": 1200}),
        serde_json::json!({"id": 2, "amount_cents": 800}),
        serde_json::json!({"id": 13, "amount_cents": 500}),
        serde_json::json!({"id": "not-a-number"}),
    ];
    for (i, payload) in bodies.iter().enumerate() {
        let id = uuid::Uuid::new_v4().to_string();
        let body = serde_json::json!({
            "eventId": id, "eventType": "order.created", "version": "1.0",
            "timestamp": "2026-12-04T07:00:00Z", "payload": payload,
        })
        .to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "keel-event-id",
                value: Some(&id),
            })
            .insert(Header {
                key: "keel-event-type",
                value: Some("order.created"),
            })
            .insert(Header {
                key: "keel-event-version",
                value: Some("1.0"),
            });
        let key = format!("order-{i}");
        producer
            .send(
                FutureRecord::to(topic)
                    .key(&key)
                    .payload(&body)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Ctrl-C, or `COMPARE_RUN_SECS` seconds (default 20) so the example ends by itself.
pub async fn shutdown_signal() {
    let secs = std::env::var("COMPARE_RUN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = tokio::time::sleep(Duration::from_secs(secs)) => {}
    }
}
