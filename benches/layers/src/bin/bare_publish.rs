//! The peer of the gateway load benchmark: a bare axum handler that parses the
//! same JSON event as the gateway's `POST /events/{topic}` and publishes it with
//! raw rdkafka (`FutureProducer`), with the librdkafka config keel's producer
//! uses (idempotent, `acks=all`). No layers, no limits, no validation beyond
//! JSON parsing: what a team writes by hand before it needs the gateway.
//!
//! `KAFKA_BROKERS` unset: an in-process `MockCluster` (one broker, as the
//! gateway's embedded default). Listens on `KEEL_GATEWAY_ADDR`
//! (`127.0.0.1:8090`) and prints `listening on ADDR`.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel::kafka::config::KafkaConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventBody {
    event_type: String,
    #[serde(default)]
    version: Option<String>,
    payload: Value,
    #[serde(default)]
    key: Option<String>,
}

async fn publish(
    State(producer): State<Arc<FutureProducer>>,
    Path(topic): Path<String>,
    Json(event): Json<EventBody>,
) -> Response {
    let record = serde_json::json!({
        "eventId": uuid::Uuid::new_v4(),
        "eventType": event.event_type,
        "version": event.version.unwrap_or_else(|| "1".into()),
        "timestamp": time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        "payload": event.payload,
    });
    let bytes = match serde_json::to_vec(&record) {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let mut r = FutureRecord::<str, [u8]>::to(&topic).payload(&bytes);
    if let Some(key) = event.key.as_deref() {
        r = r.key(key);
    }
    match producer.send(r, Timeout::Never).await {
        Ok(delivery) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({
                "topic": topic,
                "partition": delivery.partition,
                "offset": delivery.offset,
            })),
        )
            .into_response(),
        Err((e, _)) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut mock: Option<MockCluster<'static, DefaultProducerContext>> = None;
    let brokers = match std::env::var("KAFKA_BROKERS") {
        Ok(b) if !b.trim().is_empty() => b,
        _ => {
            let cluster = MockCluster::new(1)?;
            for topic in std::env::var("KEEL_BENCH_TOPICS")
                .unwrap_or_else(|_| "bench".into())
                .split(',')
            {
                cluster.create_topic(topic, 3, 1)?;
            }
            let b = cluster.bootstrap_servers();
            mock = Some(cluster);
            b
        }
    };
    let config = KafkaConfig::builder()
        .brokers(brokers.split(',').map(str::to_string))
        .build()?;
    let producer: FutureProducer = config.producer_client_config().create()?;
    let app = Router::new()
        .route("/events/{topic}", post(publish))
        .route("/health/ready", get(|| async { "ok" }))
        .with_state(Arc::new(producer));
    let addr = std::env::var("KEEL_GATEWAY_ADDR").unwrap_or_else(|_| "127.0.0.1:8090".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop(mock);
    Ok(())
}
