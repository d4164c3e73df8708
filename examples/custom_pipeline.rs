//! keel's layers composed with `ServiceBuilder` around a service of your own.
//!
//! ```text
//! cargo run --example custom_pipeline
//! ```
//!
//! The inner service is a made-up "inventory lookup" that is sometimes slow and
//! sometimes fails, with a typed error that says which failures are worth a retry.
//! The pipeline, outermost first:
//!
//! ```text
//! logging ─▶ metrics ─▶ circuit breaker ─▶ retry (typed classification) ─▶ timeout ─▶ lookup
//! ```
//!
//! The retry layer reads the error's own classification (`ByError`): a missing SKU
//! is permanent and never retried, a flaky backend is. The timeout sits inside the
//! retry, so each attempt gets its own deadline. The example prints the Prometheus
//! text of the metrics layer at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keel::layers::circuit_breaker::CircuitBreakerLayer;
use keel::layers::classify::{ByError, Classification, ClassifiedError};
use keel::layers::logging::LoggingLayer;
use keel::layers::metrics::{MetricsLayer, MetricsRegistry};
use keel::layers::retry::{RetryLayer, RetryPolicy};
use keel::layers::timeout::TimeoutLayer;
use tower::{ServiceBuilder, ServiceExt, service_fn};

/// The inventory service's error.
#[derive(Debug, thiserror::Error)]
enum InventoryError {
    #[error("no such SKU: {0}")]
    UnknownSku(String),
    #[error("backend hiccup")]
    Flaky,
}

impl ClassifiedError for InventoryError {
    fn classification(&self) -> Classification {
        match self {
            InventoryError::UnknownSku(_) => {
                Classification::failure("unknown_sku").with_retryable(false)
            }
            InventoryError::Flaky => Classification::failure("flaky"),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    keel::layers::logging::init_json()?;

    // Every third call fails, every fifth is slow; "unknown-*" SKUs never exist.
    let calls = Arc::new(AtomicU32::new(0));
    let lookup = service_fn(move |sku: String| {
        let n = calls.fetch_add(1, Ordering::Relaxed);
        async move {
            if sku.starts_with("unknown") {
                return Err(InventoryError::UnknownSku(sku));
            }
            if n % 5 == 4 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            if n % 3 == 2 {
                return Err(InventoryError::Flaky);
            }
            Ok::<_, InventoryError>(format!("{sku}: {} in stock", 10 + n))
        }
    });

    let registry = MetricsRegistry::new();
    let metrics = MetricsLayer::new().classifier(ByError);
    registry.register("inventory_lookup", metrics.handle())?;
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(5)
        .open_wait(Duration::from_secs(10))
        .classifier(ByError)
        .build();
    let retry_policy = RetryPolicy::new()
        .max_retries(3)
        .base(Duration::from_millis(20))
        .cap(Duration::from_millis(200));

    let pipeline = ServiceBuilder::new()
        .layer(LoggingLayer::new("Inventory", "lookup").classifier(ByError))
        .layer(metrics)
        .layer(breaker)
        .layer(RetryLayer::new(retry_policy).classifier(ByError))
        .layer(TimeoutLayer::new(Duration::from_millis(100)))
        .service(lookup);

    for sku in [
        "apple",
        "pear",
        "plum",
        "unknown-kiwi",
        "fig",
        "lime",
        "date",
    ] {
        match pipeline.clone().oneshot(sku.to_string()).await {
            Ok(answer) => println!("{answer}"),
            Err(e) => println!("{sku}: failed: {e}"),
        }
    }
    // OpenMetrics text through prometheus-client (keel's `prometheus` feature).
    println!(
        "\n{}",
        keel::prometheus::Exposition::new()
            .layers(&registry)
            .render()
    );
    Ok(())
}
