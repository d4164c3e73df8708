//! Publish events and handle them with a consumer, on an in-process Kafka.
//!
//! ```text
//! cargo run --example publish_consume            # embedded mock cluster
//! KAFKA_BROKERS=127.0.0.1:9092 cargo run --example publish_consume
//! ```
//!
//! Publishes ten `order.created` events and one poison event through keel's
//! publish service, handles them with a registry of handlers (retries with
//! backoff, then the dead-letter queue), prints the consumer's counters and shuts
//! down gracefully.

#[path = "gateway/embedded.rs"]
mod embedded;

use std::time::Duration;

use keel::kafka::client::KafkaClient;
use keel::kafka::config::{KafkaConfig, KafkaConfigBuilder, KafkaLogLevel};
use keel::kafka::consumer::{BoxError, ConsumedEvent, HandlerError, KafkaConsumer, StartOptions};
use keel::kafka::dead_letter::DeadLetterTopics;
use keel::kafka::envelope::EventEnvelope;
use keel::kafka::producer::PublishRequest;
use keel::kafka::registry::HandlerRegistry;
use keel::layers::retry::RetryPolicy;
use serde_json::json;
use tower::ServiceExt;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    keel::layers::logging::init_json()?;
    let topic = format!("orders-{}", uuid::Uuid::new_v4().simple());

    // Real brokers when KAFKA_BROKERS is set, else librdkafka's mock cluster
    // (kept alive until the end of main).
    let mut mock = None;
    let config = match std::env::var("KAFKA_BROKERS") {
        Ok(_) => KafkaConfig::from_env()?,
        Err(_) => {
            let cluster = embedded::EmbeddedKafka::start()?;
            cluster.create_topic(&topic, 2);
            // The mock cluster answers no CreateTopics requests: made here.
            cluster.create_topic(&format!("{topic}.dlq"), 2);
            let config = KafkaConfigBuilder::from_vars(std::env::vars())?
                .brokers(cluster.bootstrap_servers().split(',').map(str::to_string))
                .log_level(KafkaLogLevel::Warn)
                .build()?;
            mock = Some(cluster);
            config
        }
    };
    let client = KafkaClient::connect(config.clone())?;
    if mock.is_none() {
        client
            .create_topic(&topic, 2, 1, Duration::from_secs(15))
            .await?;
    }

    let registry = HandlerRegistry::builder()
        .handler_fn("order.created", |event: ConsumedEvent| async move {
            println!(
                "handled {} {} at {}/{}",
                event.event_type(),
                event.envelope().payload(),
                event.partition(),
                event.offset()
            );
            Ok::<_, BoxError>(())
        })
        .handler_fn("order.poison", |_event: ConsumedEvent| async move {
            Err::<(), _>(HandlerError::retryable(std::io::Error::other(
                "this handler always fails",
            )))
        })
        .build()?;
    // Registered with the client: its health check counts the consumer and its
    // disconnect would shut it down.
    let options = StartOptions::new([topic.clone()])
        .from_beginning(true)
        .max_retries(2);
    let mut builder = KafkaConsumer::from_client(&client)?.retry_policy(
        RetryPolicy::kafka()
            .without_budget()
            .base(Duration::from_millis(100))
            .cap(Duration::from_secs(1)),
    );
    if mock.is_none() {
        // On real brokers keel creates the dead-letter topic `<topic>.dlq` before
        // start (as many partitions as the topic) unless it exists.
        builder = builder
            .ensure_dlq_topics(&options, DeadLetterTopics::new())
            .await?;
    }
    let consumer = builder.start(options, registry)?;

    let publisher = client.publisher();
    for i in 0..10 {
        let event = EventEnvelope::new("order.created", json!({ "orderId": i }))
            .with_key(format!("customer-{}", i % 3));
        let ack = publisher
            .clone()
            .oneshot(PublishRequest::new(topic.clone(), event))
            .await?;
        println!(
            "published order {i} to partition {} offset {}",
            ack.partition, ack.offset
        );
    }
    let poison = EventEnvelope::new("order.poison", json!({ "reason": "demo" }));
    publisher
        .clone()
        .oneshot(PublishRequest::new(topic.clone(), poison))
        .await?;

    // Wait until all eleven are finished: ten handled, one dead-lettered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = consumer.metrics();
        if m.total_processed >= 10 && m.total_dead_lettered >= 1 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("not everything was handled in time: {m:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = consumer.metrics();
    println!(
        "processed {}, retries {}, dead-lettered {} (to {topic}.dlq)",
        m.total_processed, m.total_retries, m.total_dead_lettered
    );
    let health = client.health_check(Duration::from_secs(5)).await?;
    println!(
        "health: {}, consumers {}",
        health.state, health.metrics.consumer_count
    );
    consumer.shutdown(Duration::from_secs(10)).await?;
    client.disconnect(Duration::from_secs(10)).await?;
    drop(mock);
    Ok(())
}
