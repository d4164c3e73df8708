//! The in-process consumer: handlers registered by event type, each wrapped in
//! keel's metrics layer, driven by keel's consumer runtime (retries with backoff,
//! dead-letter queue, at-least-once commits).

use std::time::Duration;

use keel::kafka::client::KafkaClient;
use keel::kafka::consumer::{BoxError, ConsumedEvent, HandlerError, KafkaConsumer, StartOptions};
use keel::kafka::registry::HandlerRegistry;
use keel::layers::metrics::MetricsRegistry;
use keel::layers::retry::RetryPolicy;
use tower::ServiceBuilder;

/// The demo handlers, by event type.
pub const ORDER_CREATED: &str = "order.created";
/// Handled like any event, logged.
pub const USER_CREATED: &str = "user.created";
/// Fails its first attempt, succeeds on the retry: shows the retry counter.
pub const DEMO_FLAKY: &str = "demo.flaky";
/// Always fails: retried, then dead-lettered to `<topic>.dlq`.
pub const DEMO_POISON: &str = "demo.poison";

/// Builds the handler registry; every handler's metrics are registered as the
/// `messaging.process.duration` series of its `event_type`.
pub fn registry(metrics: &MetricsRegistry) -> Result<HandlerRegistry, BoxError> {
    let mut builder = HandlerRegistry::builder();
    for event_type in [ORDER_CREATED, USER_CREATED, DEMO_FLAKY, DEMO_POISON] {
        let layer = crate::metrics_layer();
        metrics.register_with_labels(
            "messaging.process.duration",
            [("messaging.system", "kafka"), ("event_type", event_type)],
            layer.handle(),
        )?;
        let handler = ServiceBuilder::new()
            .layer(layer)
            .service_fn(move |event: ConsumedEvent| handle(event_type, event));
        builder = builder.handler(event_type, handler);
    }
    Ok(builder.build()?)
}

async fn handle(event_type: &'static str, event: ConsumedEvent) -> Result<(), HandlerError> {
    let envelope = event.envelope();
    match event_type {
        DEMO_FLAKY if event.attempts_made() <= 1 => {
            return Err(HandlerError::retryable(std::io::Error::other(
                "demo.flaky fails its first attempt",
            )));
        }
        DEMO_POISON => {
            return Err(HandlerError::retryable(std::io::Error::other(
                "demo.poison always fails",
            )));
        }
        _ => {}
    }
    tracing::info!(
        target: "gateway::consumer",
        event_type,
        event_id = %envelope.event_id(),
        topic = event.topic(),
        partition = event.partition(),
        offset = event.offset(),
        attempt = event.attempts_made(),
        "event handled"
    );
    // Payloads are user data: never at info.
    tracing::debug!(target: "gateway::consumer", event_id = %envelope.event_id(), payload = %envelope.payload(), "event payload");
    Ok(())
}

/// Starts the consumer on `topics`, registered with `kafka`: its health check
/// counts the consumer (`consumerCount`, `consumersConnected` in `/ready`) and its
/// `disconnect` would shut the consumer down if `main` had not already.
pub fn start(
    kafka: &KafkaClient,
    topics: &[String],
    max_retries: u32,
    retry_initial: Duration,
    registry: HandlerRegistry,
) -> Result<KafkaConsumer, BoxError> {
    let consumer = KafkaConsumer::from_client(kafka)?
        .retry_policy(
            RetryPolicy::kafka()
                .without_budget()
                .base(retry_initial)
                .cap(Duration::from_secs(30)),
        )
        .start(
            StartOptions::new(topics.iter().cloned())
                .from_beginning(true)
                .max_retries(max_retries)
                .enable_dlq(true),
            registry,
        )?;
    Ok(consumer)
}
