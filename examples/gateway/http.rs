//! The HTTP side: routes, error mapping, and keel's layers around the axum router.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::TryStreamExt;
use keel::kafka::client::KafkaClient;
use keel::kafka::consumer::{ConsumerState, KafkaConsumer};
use keel::kafka::envelope::EventEnvelope;
use keel::kafka::error::{KafkaProducerError, ProducerErrorKind};
use keel::kafka::producer::{
    BatchAck, PublishAck, PublishBatchRequest, PublishRequest, PublishStack,
};
use keel::layers::circuit_breaker::{CircuitBreakerHandle, CircuitBreakerLayer};
use keel::layers::classify::TowerHttp;
use keel::layers::logging::LoggingLayer;
use keel::layers::metrics::{MetricsLayer, MetricsRegistry, PROMETHEUS_CONTENT_TYPE};
use keel::s3::upload::{ProgressListener, UploadProgress};
use keel::s3::{S3, S3ErrorKind, S3ServiceError, UploadBody, UploadOptions};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::RwLock;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_http::classify::ServerErrorsAsFailures;

use crate::prom;

/// keel's single-event publish stack, boxed.
pub type EventStack = BoxCloneSyncService<PublishRequest, PublishAck, BoxError>;
/// keel's batch publish stack, boxed.
pub type BatchStack = BoxCloneSyncService<PublishBatchRequest, BatchAck, BoxError>;

/// What every handler shares. Cloning is cheap.
#[derive(Clone)]
pub struct AppState {
    /// keel's Kafka client: health, publish metrics.
    pub kafka: KafkaClient,
    /// `POST /events/{topic}` goes through this.
    pub publish: EventStack,
    /// `POST /events/{topic}/batch` goes through this.
    pub publish_batch: BatchStack,
    /// keel's S3 facade over its default stack.
    pub s3: S3,
    /// The consumer, for `/metrics` and readiness; taken out at shutdown.
    pub consumer: Arc<RwLock<Option<KafkaConsumer>>>,
    /// Every layer's metrics, rendered by `/metrics`.
    pub metrics: MetricsRegistry,
    /// Set on SIGTERM / Ctrl-C: readiness answers 503, new API calls are refused.
    pub shutting_down: Arc<AtomicBool>,
    /// Lifetime of the presigned URLs `GET /files/{*key}` redirects to.
    pub presign_expiry: Duration,
    /// Bound on each dependency check of `/health/ready`.
    pub health_timeout: Duration,
    /// Consumer lag per (topic, partition), sampled in the background (a
    /// watermark request per partition is too slow for every scrape).
    pub consumer_lag: Arc<std::sync::Mutex<Vec<(String, i32, i64)>>>,
    /// Circuit breakers by name, for `/metrics`.
    pub breakers: Vec<(&'static str, CircuitBreakerHandle)>,
}

/// keel's default publish stack (logging, metrics, batch size, circuit breaker,
/// timeout; no retry layer: librdkafka retries itself, and a retry on top would
/// break per-key order), its metrics registered for `/metrics`.
pub fn publish_stacks(
    kafka: &KafkaClient,
    metrics: &MetricsRegistry,
    timeout: Option<Duration>,
) -> Result<(EventStack, BatchStack, CircuitBreakerHandle), BoxError> {
    let mut builder = PublishStack::builder(kafka).open_wait(Duration::from_secs(10));
    if let Some(timeout) = timeout {
        builder = builder.timeout(timeout);
    }
    let stack = builder.build();
    metrics.register("kafka_publish_call", stack.event_metrics())?;
    metrics.register("kafka_publish_batch_call", stack.batch_metrics())?;
    let publish = ServiceExt::<PublishRequest>::map_err(stack.event_service(), BoxError::from);
    let publish_batch =
        ServiceExt::<PublishBatchRequest>::map_err(stack.batch_service(), BoxError::from);
    Ok((
        BoxCloneSyncService::new(publish),
        BoxCloneSyncService::new(publish_batch),
        stack.circuit_breaker(),
    ))
}

/// The whole app: routes, per-route metrics, the API behind a breaker that counts
/// 5xx, and logging + metrics around everything.
pub fn app(
    state: AppState,
    api_breaker: CircuitBreakerLayer<TowerHttp<ServerErrorsAsFailures>>,
) -> Result<Router, BoxError> {
    let registry = state.metrics.clone();
    let route_metrics = |name: &str| -> Result<_, BoxError> {
        let layer = MetricsLayer::new().classify(TowerHttp::server_errors());
        registry.register(format!("http_route_{name}"), layer.handle())?;
        Ok(layer)
    };

    let api = Router::new()
        .route(
            "/events/{topic}",
            post(publish_one).route_layer(route_metrics("publish")?),
        )
        .route(
            "/events/{topic}/batch",
            post(publish_batch).route_layer(route_metrics("publish_batch")?),
        )
        .route(
            "/files/{*key}",
            get(download)
                .route_layer(route_metrics("download")?)
                .merge(put(upload).route_layer(route_metrics("upload")?))
                .merge(axum::routing::delete(delete).route_layer(route_metrics("delete")?)),
        )
        .with_state(state.clone());
    // The API as one service behind keel's layers: layer errors become responses.
    let api = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(layer_error))
        .map_err(BoxError::from)
        .layer(api_breaker)
        .service(api);

    let app = Router::new()
        .route(
            "/health/live",
            get(live).route_layer(route_metrics("health_live")?),
        )
        .route(
            "/health/ready",
            get(ready).route_layer(route_metrics("health_ready")?),
        )
        .route(
            "/metrics",
            get(metrics_text).route_layer(route_metrics("metrics")?),
        )
        .fallback_service(api)
        .with_state(state);

    Ok(app)
}

/// keel's layers around the whole router: a span and a completion log per request,
/// and metrics (`http_*`) with 5xx counted as failures.
pub fn wrap(
    app: Router,
    registry: &MetricsRegistry,
) -> Result<
    impl Service<Request, Response = Response, Error = Infallible, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static,
    BoxError,
> {
    let all = MetricsLayer::new().classify(TowerHttp::server_errors());
    registry.register("http", all.handle())?;
    Ok(ServiceBuilder::new()
        .layer(
            LoggingLayer::new("http", "request")
                .classify(TowerHttp::server_errors())
                .fields(|req: &Request| {
                    tracing::info_span!("http", method = %req.method(), path = %req.uri().path())
                }),
        )
        .layer(all)
        .service(app))
}

/// Maps a layer error (breaker open, ...) to a response.
async fn layer_error(err: BoxError) -> Response {
    let message = err.to_string();
    tracing::warn!(target: "gateway::http", error = %message, "request refused by a layer");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "5")],
        Json(json!({ "error": message })),
    )
        .into_response()
}

/// An error answered as JSON with a status.
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

fn producer_status(e: &KafkaProducerError) -> StatusCode {
    match e.kind() {
        ProducerErrorKind::BatchTooLarge { .. } | ProducerErrorKind::MessageTooLarge => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        ProducerErrorKind::Serialization | ProducerErrorKind::UnknownTopic => {
            StatusCode::BAD_REQUEST
        }
        ProducerErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ProducerErrorKind::QueueFull
        | ProducerErrorKind::CircuitOpen
        | ProducerErrorKind::Transport
        | ProducerErrorKind::ShuttingDown
        | ProducerErrorKind::Disabled => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    }
}

fn s3_status(e: &S3ServiceError) -> StatusCode {
    match e.kind() {
        S3ErrorKind::NotFound => StatusCode::NOT_FOUND,
        S3ErrorKind::InvalidKey(_) | S3ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
        S3ErrorKind::AccessDenied => StatusCode::BAD_GATEWAY,
        S3ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        S3ErrorKind::Throttled { .. }
        | S3ErrorKind::CircuitOpen
        | S3ErrorKind::ShuttingDown
        | S3ErrorKind::Transport => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    }
}

impl From<BoxError> for ApiError {
    fn from(err: BoxError) -> Self {
        let status = if let Some(e) = err.downcast_ref::<KafkaProducerError>() {
            producer_status(e)
        } else if let Some(e) = err.downcast_ref::<S3ServiceError>() {
            s3_status(e)
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        ApiError::new(status, err.to_string())
    }
}

impl From<S3ServiceError> for ApiError {
    fn from(err: S3ServiceError) -> Self {
        ApiError::new(s3_status(&err), err.to_string())
    }
}

/// The body of `POST /events/{topic}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventBody {
    event_type: String,
    #[serde(default = "default_version")]
    version: String,
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    key: Option<String>,
}

fn default_version() -> String {
    "1".to_string()
}

impl EventBody {
    fn into_envelope(self) -> Result<EventEnvelope, ApiError> {
        if self.event_type.trim().is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "eventType must not be empty",
            ));
        }
        let mut envelope =
            EventEnvelope::new(self.event_type, self.payload).with_version(self.version);
        if let Some(key) = self.key {
            envelope = envelope.with_key(key);
        }
        Ok(envelope)
    }
}

fn refuse_when_stopping(state: &AppState) -> Result<(), ApiError> {
    if state.shutting_down.load(Ordering::Acquire) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down",
        ));
    }
    Ok(())
}

async fn publish_one(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    Json(body): Json<EventBody>,
) -> Result<(StatusCode, Json<PublishAck>), ApiError> {
    refuse_when_stopping(&state)?;
    let envelope = body.into_envelope()?;
    let ack = state
        .publish
        .clone()
        .oneshot(PublishRequest::new(topic, envelope))
        .await?;
    Ok((StatusCode::ACCEPTED, Json(ack)))
}

/// `POST /events/{topic}/batch` takes a JSON array of events, or `{"events": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum BatchBody {
    List(Vec<EventBody>),
    Wrapped { events: Vec<EventBody> },
}

async fn publish_batch(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    Json(body): Json<BatchBody>,
) -> Result<(StatusCode, Json<BatchAck>), ApiError> {
    refuse_when_stopping(&state)?;
    let events = match body {
        BatchBody::List(events) | BatchBody::Wrapped { events } => events,
    };
    if events.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "the batch is empty"));
    }
    let envelopes = events
        .into_iter()
        .map(EventBody::into_envelope)
        .collect::<Result<Vec<_>, _>>()?;
    let ack = state
        .publish_batch
        .clone()
        .oneshot(PublishBatchRequest::new(topic, envelopes))
        .await?;
    Ok((StatusCode::ACCEPTED, Json(ack)))
}

async fn upload(
    State(state): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    refuse_when_stopping(&state)?;
    let mut options = UploadOptions::new();
    if let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        options = options.content_type(ct);
    }
    let total = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let stream = body.into_data_stream().map_err(io::Error::other);
    let progress_key = key.clone();
    let progress = ProgressListener::new(move |p: UploadProgress| {
        tracing::info!(
            target: "gateway::upload",
            key = %progress_key,
            bytes_sent = p.bytes_sent,
            total = p.total.or(total),
            part = p.part_number,
            "upload progress"
        );
    });
    let out = state
        .s3
        .upload_with_progress(key.as_str(), UploadBody::stream(stream), options, progress)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "bucket": out.bucket,
            "key": out.key.as_str(),
            "location": out.location,
            "etag": out.etag,
            "versionId": out.version_id,
            "size": out.size,
            "parts": out.parts,
        })),
    ))
}

async fn download(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    if !state.s3.exists(key.as_str()).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no object {key}"),
        ));
    }
    let url = state
        .s3
        .presign_get(key.as_str(), state.presign_expiry)
        .await?;
    Ok((
        StatusCode::TEMPORARY_REDIRECT,
        [(header::LOCATION, url.url)],
    )
        .into_response())
}

async fn delete(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    refuse_when_stopping(&state)?;
    state.s3.delete(key.as_str()).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn live() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let stopping = state.shutting_down.load(Ordering::Acquire);
    let (kafka, s3) = tokio::join!(
        state.kafka.health_check(state.health_timeout),
        tokio::time::timeout(state.health_timeout, state.s3.health()),
    );
    let (kafka_ok, kafka_json) = match kafka {
        Ok(h) => (
            h.is_healthy,
            serde_json::to_value(&h).unwrap_or(Value::Null),
        ),
        Err(e) => (false, json!({ "isHealthy": false, "error": e.to_string() })),
    };
    let (s3_ok, s3_json) = match s3 {
        Ok(h) => (h.healthy, serde_json::to_value(&h).unwrap_or(Value::Null)),
        Err(_) => (
            false,
            json!({ "healthy": false, "lastError": "health check timed out" }),
        ),
    };
    // A consumer that failed (a panic on its poll thread or in a lane, or a
    // message it may not dead-letter under the stop policy) is not ready, with
    // the reason; one holding a partition it cannot dead-letter is degraded.
    let (consumer_ok, consumer) = match state.consumer.read().await.as_ref() {
        Some(c) => {
            let failure = match c.state() {
                ConsumerState::Failed { reason } => Some(reason),
                _ => None,
            };
            let stuck: Vec<Value> = c
                .stuck_partitions()
                .iter()
                .map(|s| {
                    json!({
                        "partition": s.partition.to_string(),
                        "offset": s.offset,
                        "stuckSeconds": s.stuck_for.as_secs_f64(),
                        "failures": s.failures,
                        "lastError": s.last_error,
                    })
                })
                .collect();
            (
                failure.is_none(),
                json!({
                    "running": c.is_running(),
                    "paused": c.is_paused(),
                    "inFlight": c.in_flight(),
                    "failure": failure,
                    "degraded": !stuck.is_empty(),
                    "stuckPartitions": stuck,
                }),
            )
        }
        None => (true, json!({ "running": false })),
    };
    let is_ready = kafka_ok && s3_ok && consumer_ok && !stopping;
    let status = if is_ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "ready": is_ready,
            "shuttingDown": stopping,
            "kafka": kafka_json,
            "s3": s3_json,
            "consumer": consumer,
        })),
    )
}

/// Samples the consumer's lag every `every` into `state.consumer_lag`, until
/// the consumer is taken out at shutdown.
pub async fn sample_lag(state: AppState, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if state.shutting_down.load(Ordering::Acquire) {
            return;
        }
        let guard = state.consumer.read().await;
        let Some(consumer) = guard.as_ref() else {
            return;
        };
        // Bounded, so that shutdown (which takes the consumer) never waits long.
        let sampled =
            tokio::time::timeout(Duration::from_secs(3), consumer.lag(Duration::from_secs(1)))
                .await;
        drop(guard);
        match sampled {
            Ok(Ok(lags)) => {
                *state.consumer_lag.lock().unwrap_or_else(|e| e.into_inner()) = lags
                    .into_iter()
                    .map(|l| {
                        (
                            l.partition.topic.to_string(),
                            l.partition.partition,
                            l.lag.unwrap_or(-1),
                        )
                    })
                    .collect();
            }
            Ok(Err(e)) => {
                tracing::debug!(target: "gateway::metrics", error = %e, "consumer lag unavailable")
            }
            Err(_) => tracing::debug!(target: "gateway::metrics", "consumer lag timed out"),
        }
    }
}

async fn metrics_text(State(state): State<AppState>) -> Result<Response, Infallible> {
    let mut text = state.metrics.render();
    let mut extra = prom::PromText::default();
    if let Some(c) = state.consumer.read().await.as_ref() {
        prom::consumer(&mut extra, &c.metrics(), c.in_flight());
    }
    let lags = state
        .consumer_lag
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if !lags.is_empty() {
        extra.family(
            "kafka_consumer_lag",
            "gauge",
            "Messages not yet handled, per assigned partition (-1: unknown yet), sampled every 5 s.",
            lags.into_iter().map(|(topic, partition, lag)| {
                (
                    format!("topic=\"{topic}\",partition=\"{partition}\""),
                    lag as f64,
                )
            }),
        );
    }
    prom::publish(&mut extra, &state.kafka.publish_metrics());
    prom::s3(&mut extra, &state.s3.metrics());
    extra.family(
        "circuit_breaker_state",
        "gauge",
        "0 closed, 1 open, 2 half-open, 3 forced open, 4 forced closed, 5 metrics only.",
        state
            .breakers
            .iter()
            .map(|(name, handle)| (format!("breaker=\"{name}\""), crate::breaker::gauge(handle))),
    );
    text.push_str(&extra.finish());
    Ok(([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], text).into_response())
}
