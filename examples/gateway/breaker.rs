//! keel's circuit breakers in the gateway: one in front of the API routes
//! (counting the server's own failures), one per dependency (Kafka publish, S3), each with its
//! state exported to `/metrics`.

use std::time::Duration;

use axum::response::Response;
use keel::layers::circuit_breaker::CircuitBreakerLayer;
use keel::layers::classify::{ByError, Classification, ClassifyFn, classify_fn};
use std::convert::Infallible;

use crate::problem::ServerFault;

/// How the API breaker counts an answer.
pub type ApiClassifier = ClassifyFn<fn(Result<&Response, &Infallible>) -> Classification>;

/// Only the server's own failures count: a 5xx that Kafka or S3 caused (marked
/// [`ServerFault`]). A client's 4xx, its dropped body, a load-shedding or
/// shutdown 503 and a dependency breaker's own 503 do not: five clients that
/// misbehave must not lock the API for everyone.
fn classify_api(result: Result<&Response, &Infallible>) -> Classification {
    match result {
        Err(_) => Classification::failure("error"),
        Ok(res) if res.extensions().get::<ServerFault>().is_some() => {
            Classification::failure("5xx")
        }
        Ok(_) => Classification::SUCCESS,
    }
}

/// The breaker in front of the API routes: five server failures in a row open it
/// for 10 s; then one probe request decides.
pub fn api() -> CircuitBreakerLayer<ApiClassifier> {
    CircuitBreakerLayer::builder()
        .name("http_api")
        .consecutive_failures(5)
        .open_wait(Duration::from_secs(10))
        .classifier(classify_fn(
            classify_api as fn(Result<&Response, &Infallible>) -> Classification,
        ))
        .build()
}

/// A breaker for a dependency whose errors classify themselves (keel's
/// `KafkaProducerError`, `S3ServiceError`): permanent errors such as an invalid
/// key or a batch too large do not count.
pub fn dependency(name: &str) -> CircuitBreakerLayer<ByError> {
    CircuitBreakerLayer::builder()
        .name(name)
        .consecutive_failures(5)
        .open_wait(Duration::from_secs(10))
        .classifier(ByError)
        .build()
}
