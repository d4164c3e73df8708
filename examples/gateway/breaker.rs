//! keel's circuit breakers in the gateway: one in front of the API routes
//! (counting 5xx answers), one per dependency (Kafka publish, S3), each with its
//! state exported to `/metrics`.

use std::time::Duration;

use keel::layers::circuit_breaker::{CircuitBreakerHandle, CircuitBreakerLayer, CircuitState};
use keel::layers::classify::{ByError, TowerHttp};
use tower_http::classify::ServerErrorsAsFailures;

/// The breaker in front of the API routes: five 5xx answers in a row open it for
/// 10 s; then one probe request decides.
pub fn api() -> CircuitBreakerLayer<TowerHttp<ServerErrorsAsFailures>> {
    CircuitBreakerLayer::builder()
        .consecutive_failures(5)
        .open_wait(Duration::from_secs(10))
        .classifier(TowerHttp::server_errors())
        .build()
}

/// A breaker for a dependency whose errors classify themselves (keel's
/// `KafkaProducerError`, `S3ServiceError`): permanent errors such as an invalid
/// key or a batch too large do not count.
pub fn dependency() -> CircuitBreakerLayer<ByError> {
    CircuitBreakerLayer::builder()
        .consecutive_failures(5)
        .open_wait(Duration::from_secs(10))
        .classifier(ByError)
        .build()
}

/// The state as a gauge value: 0 closed, 1 open, 2 half-open, 3 forced open,
/// 4 forced closed, 5 metrics only.
pub fn gauge(handle: &CircuitBreakerHandle) -> f64 {
    match handle.state() {
        CircuitState::Closed => 0.0,
        CircuitState::Open => 1.0,
        CircuitState::HalfOpen => 2.0,
        CircuitState::ForcedOpen => 3.0,
        CircuitState::ForcedClosed => 4.0,
        CircuitState::MetricsOnly => 5.0,
    }
}
