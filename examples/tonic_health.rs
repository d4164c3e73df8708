//! keel's layers around a tonic gRPC server, with gRPC error codes as failures.
//!
//! ```text
//! cargo run --example tonic_health
//! ```
//!
//! Serves the standard gRPC health service (tonic-health: no protoc needed) behind
//! keel's logging and metrics layers and a circuit breaker, all classifying with
//! `TowerHttp::grpc_errors()`: a response is a failure when its `grpc-status` is not
//! OK, although HTTP says 200. A client then checks a known service (OK), an unknown
//! one (NOT_FOUND, a failure) and a service set to NOT_SERVING (OK at the gRPC
//! level: the answer is a status, not an error), and the example prints the
//! Prometheus text the layers produced.

use std::time::Duration;

use keel::layers::circuit_breaker::CircuitBreakerLayer;
use keel::layers::classify::TowerHttp;
use keel::layers::logging::LoggingLayer;
use keel::layers::metrics::{MetricsLayer, MetricsRegistry};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceBuilder;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    keel::layers::logging::init_json()?;

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("keel.Orders", tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("keel.Legacy", tonic_health::ServingStatus::NotServing)
        .await;

    let registry = MetricsRegistry::new();
    let metrics = MetricsLayer::new().classifier(TowerHttp::grpc_errors());
    registry.register("grpc", metrics.handle())?;
    let stack = ServiceBuilder::new()
        .layer(LoggingLayer::new("grpc", "call").classifier(TowerHttp::grpc_errors()))
        .layer(metrics)
        .layer(
            CircuitBreakerLayer::builder()
                .consecutive_failures(5)
                .classifier(TowerHttp::grpc_errors())
                .build(),
        )
        .into_inner();

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .layer(stack)
            .add_service(health_service)
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stop_rx.await;
            }),
    );
    println!("gRPC health service on http://{addr}");

    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut client = HealthClient::new(channel);
    for service in ["", "keel.Orders", "keel.Legacy", "keel.Unknown"] {
        let answer = client
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await;
        match answer {
            Ok(res) => println!("check {service:?}: {:?}", res.into_inner().status()),
            Err(status) => println!("check {service:?}: gRPC error {:?}", status.code()),
        }
    }

    // OpenMetrics text through prometheus-client (keel's `prometheus` feature).
    println!(
        "\n{}",
        keel::prometheus::Exposition::new()
            .layers(&registry)
            .render()
    );
    let _ = stop_tx.send(());
    server.await??;
    Ok(())
}
