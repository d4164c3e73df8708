//! Publish one event with rust-rdkafka alone, with the guarantees keel gives
//! by default (see `compare_keel_publish.rs`): idempotent producer, `acks=all`,
//! librdkafka retries inside a bounded delivery timeout, an outer timeout, a
//! circuit breaker, the same envelope and headers, a typed error.
//!
//! ```text
//! KAFKA_BROKERS=127.0.0.1:9092 cargo run --example compare_raw_publish [topic]
//! ```
//!
//! Left out (what keel has and this version does not):
//! - call metrics (count, errors, latency histogram) and a span per publish
//! - a half-open breaker that lets one probe through (here every caller probes once the wait is over)
//! - a breaker shared by every clone of the client, with a handle to read its state
//! - secrets scrubbed from librdkafka errors; config read from the environment with typed errors
//! - batches (up to 1,000 events, refused before any I/O above that, per-event outcome)

#[path = "compare/kafka_common.rs"]
mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{BoxError, OrderCreated};
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;

// region: task
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("the event could not be serialized: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("kafka refused the event: {0}")]
    Kafka(#[from] KafkaError),
    #[error("no delivery report within {0:?}")]
    Timeout(Duration),
    #[error("circuit open after repeated failures")]
    CircuitOpen,
}

/// Opens after 5 consecutive failures; lets calls through again after 60 s.
#[derive(Default)]
struct Breaker(Mutex<(u32, Option<Instant>)>);

impl Breaker {
    fn check(&self) -> Result<(), PublishError> {
        let mut state = self.0.lock().unwrap();
        match state.1 {
            Some(opened) if opened.elapsed() < Duration::from_secs(60) => {
                Err(PublishError::CircuitOpen)
            }
            Some(_) => {
                *state = (0, None);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn record(&self, ok: bool) {
        let mut state = self.0.lock().unwrap();
        state.0 = if ok { 0 } else { state.0 + 1 };
        if state.0 >= 5 {
            state.1 = Some(Instant::now());
        }
    }
}

async fn publish<T: Serialize>(
    producer: &FutureProducer,
    breaker: &Breaker,
    topic: &str,
    key: &str,
    event_type: &str,
    payload: &T,
) -> Result<(i32, i64), PublishError> {
    breaker.check()?;
    let id = uuid::Uuid::new_v4().to_string();
    let timestamp = time::OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .expect("UTC formats");
    let body = serde_json::to_vec(&serde_json::json!({
        "eventId": id, "eventType": event_type, "version": "1.0",
        "timestamp": timestamp, "payload": payload,
    }))?;
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "keel-event-id",
            value: Some(&id),
        })
        .insert(Header {
            key: "keel-event-type",
            value: Some(event_type),
        })
        .insert(Header {
            key: "keel-event-version",
            value: Some("1.0"),
        });
    let record = FutureRecord::to(topic)
        .key(key)
        .payload(&body)
        .headers(headers);
    // librdkafka bounds delivery by message.timeout.ms; this outer bound makes
    // sure the future ends even if the report never comes.
    let outer = DELIVERY_TIMEOUT + Duration::from_secs(5);
    let result =
        match tokio::time::timeout(outer, producer.send(record, Duration::from_secs(5))).await {
            Err(_) => Err(PublishError::Timeout(outer)),
            Ok(Err((e, _))) => Err(PublishError::Kafka(e)),
            Ok(Ok(delivery)) => Ok((delivery.partition, delivery.offset)),
        };
    breaker.record(result.is_ok());
    result
}
// endregion

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let topic = common::topic_arg("compare-publish");
    let order = OrderCreated {
        id: 42,
        amount_cents: 1999,
    };

    // region: task
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("retries", "5")
        .set("retry.backoff.ms", "300")
        .set("request.timeout.ms", "30000")
        .set(
            "message.timeout.ms",
            DELIVERY_TIMEOUT.as_millis().to_string(),
        )
        .create()?;
    let breaker = Breaker::default();
    let ack = publish(
        &producer,
        &breaker,
        &topic,
        "order-42",
        "order.created",
        &order,
    )
    .await?;
    // endregion

    println!(
        "published to {topic}: partition {}, offset {}",
        ack.0, ack.1
    );
    Ok(())
}
