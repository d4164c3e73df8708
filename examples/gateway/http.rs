//! The HTTP side: routes, error mapping, and keel's layers around the axum router.

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::error_handling::HandleErrorLayer;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::TryStreamExt;
use keel::kafka::client::KafkaClient;
use keel::kafka::consumer::{ConsumerState, KafkaConsumer};
use keel::kafka::error::{KafkaProducerError, ProducerErrorKind};
use keel::kafka::producer::{
    BatchAck, PublishAck, PublishBatchRequest, PublishRequest, PublishStack,
};
use keel::kafka::topic::TopicName;
use keel::layers::circuit_breaker::{CircuitBreakerHandle, CircuitBreakerLayer};
use keel::layers::classify::TowerHttp;
use keel::layers::logging::LoggingLayer;
use keel::layers::metrics::MetricsRegistry;
use keel::prometheus::{Exposition, OPENMETRICS_CONTENT_TYPE, PartitionLagSample};
use keel::s3::upload::{ProgressListener, UploadProgress};
use keel::s3::{S3, S3ErrorKind, S3ServiceError, UploadBody, UploadOptions};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::sync::RwLock;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use crate::body::{BatchBody, EventBody, batch_envelopes};
use crate::breaker::ApiClassifier;
use crate::idempotency::{self, Begin, IdempotencyCache};
use crate::problem::{self, Problem};
use crate::serve;

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
    /// Circuit breakers, for `/metrics` (labelled by their names).
    pub breakers: Vec<CircuitBreakerHandle>,
    /// `/metrics` also renders keel's pre-0.2 family names.
    pub keel_metric_names: bool,
    /// The topics `POST /events/{topic}` may publish to (never a `.dlq`).
    pub publish_topics: Arc<HashSet<String>>,
    /// Sizes the API accepts.
    pub limits: ApiLimits,
    /// Answers kept by `Idempotency-Key`.
    pub idempotency: IdempotencyCache,
    /// The optional bearer token every route but `/health/*` requires.
    pub token: Option<Arc<str>>,
    /// Refuse publish, upload and delete.
    pub read_only: bool,
    /// Places for uploads in flight: each holds a few parts in memory.
    pub uploads: Arc<tokio::sync::Semaphore>,
}

/// Sizes the API accepts (see main.rs for their variables and defaults).
#[derive(Clone, Copy, Debug)]
pub struct ApiLimits {
    /// Largest event, encoded (envelope JSON plus key), in bytes.
    pub max_event_bytes: usize,
    /// Most events in one batch.
    pub max_batch_events: usize,
    /// Largest request body of `POST /events/{topic}/batch`, in bytes.
    pub max_batch_body_bytes: usize,
    /// API requests served at once; more are shed (503).
    pub max_in_flight: usize,
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
    for (operation, handle) in [
        ("send", stack.event_metrics()),
        ("send_batch", stack.batch_metrics()),
    ] {
        metrics.register_with_labels(
            "messaging.client.operation.duration",
            [
                ("messaging.system", "kafka"),
                ("messaging.operation.type", "send"),
                ("messaging.operation.name", operation),
            ],
            handle,
        )?;
    }
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
/// the server's own failures, optional bearer token and read-only mode, and every
/// error as a problem.
pub fn app(
    state: AppState,
    api_breaker: CircuitBreakerLayer<ApiClassifier>,
) -> Result<Router, BoxError> {
    let registry = state.metrics.clone();
    // One `http.server.request.duration` series per route and method.
    let route_metrics = |method: &str, route: &str| -> Result<_, BoxError> {
        let layer = crate::metrics_layer().classifier(TowerHttp::server_errors());
        registry.register_with_labels(
            "http.server.request.duration",
            [("http.request.method", method), ("http.route", route)],
            layer.handle(),
        )?;
        Ok(layer)
    };
    let limits = state.limits;

    let api = Router::new()
        .route(
            "/events/{topic}",
            post(publish_one).route_layer(route_metrics("POST", "/events/{topic}")?),
        )
        .route(
            "/events/{topic}/batch",
            post(publish_batch).route_layer(route_metrics("POST", "/events/{topic}/batch")?),
        )
        .route(
            "/files/{*key}",
            get(download)
                .route_layer(route_metrics("GET", "/files/{*key}")?)
                .merge(put(upload).route_layer(route_metrics("PUT", "/files/{*key}")?))
                .merge(
                    axum::routing::delete(delete)
                        .route_layer(route_metrics("DELETE", "/files/{*key}")?),
                ),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone());
    // With `otel`: the route template names the SERVER span (see otel.rs).
    #[cfg(feature = "otel")]
    let api = api.route_layer(middleware::from_fn(crate::otel::record_route));
    // The API as one service behind keel's layers: layer errors become responses.
    let api = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(layer_error))
        // tower's own: beyond `max_in_flight` requests at once, answer 503 at
        // once rather than queue until memory runs out.
        .load_shed()
        .concurrency_limit(limits.max_in_flight)
        .map_err(BoxError::from)
        .layer(api_breaker)
        .service(api);

    let mut app = Router::new()
        .route(
            "/health/live",
            get(live).route_layer(route_metrics("GET", "/health/live")?),
        )
        .route(
            "/health/ready",
            get(ready).route_layer(route_metrics("GET", "/health/ready")?),
        )
        .route(
            "/metrics",
            get(metrics_text).route_layer(route_metrics("GET", "/metrics")?),
        );
    if state.token.is_some() {
        app = app.route("/debug/health", get(debug_health));
    }
    let app = app
        .fallback_service(api)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(middleware::from_fn(problem::uniform_errors))
        .with_state(state);

    Ok(app)
}

async fn not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "not-found", "no such route")
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this route does not take that method",
    )
}

/// The optional bearer token (every route but `/health/*`) and read-only mode.
///
/// This is the minimum for a gateway on a trusted network; real authentication
/// (OIDC, mTLS, per-client keys) belongs in a tower layer in front of `app`.
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let open = path == "/health/live" || path == "/health/ready";
    if let (Some(token), false) = (&state.token, open) {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        // Constant time over the token's bytes (only a length mismatch ends early).
        if !bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
            return Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required",
            )
            .into_response();
        }
    }
    let writes = path.starts_with("/events/") || path.starts_with("/files/");
    if state.read_only && writes && !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Problem::new(
            StatusCode::FORBIDDEN,
            "read-only",
            "this gateway runs read-only",
        )
        .into_response();
    }
    next.run(req).await
}

/// keel's layers around the whole router: a request id (`x-request-id`, taken
/// from the client or generated, echoed back), a span and a completion log per
/// request carrying it, and metrics of every request (`keel_http_server_*`, the
/// routes' own are `http_server_request_*`) with 5xx counted as failures.
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
    let all = crate::metrics_layer().classifier(TowerHttp::server_errors());
    registry.register("keel.http.server", all.handle())?;
    // With `otel`: the route template names the SERVER span (see otel.rs).
    #[cfg(feature = "otel")]
    let app = app.route_layer(middleware::from_fn(crate::otel::record_route));
    let service = ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            LoggingLayer::new("http", "request")
                .classifier(TowerHttp::server_errors())
                .fields(|req: &Request| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
                }),
        )
        .layer(all)
        .service(app);
    // With `otel`: outermost, so every span of the request is in its trace.
    #[cfg(feature = "otel")]
    let service = tower::Layer::layer(&middleware::from_fn(crate::otel::server_span), service);
    Ok(service)
}

/// Maps a layer error (the API breaker open, a timeout) to a problem.
async fn layer_error(err: BoxError) -> Response {
    if err.is::<tower::load_shed::error::Overloaded>() {
        tracing::info!(target: "gateway::http", "request shed: too many in flight");
        return Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many requests in flight",
        )
        .retry_after(1)
        .into_response();
    }
    tracing::warn!(target: "gateway::http", error = %err, "request refused by a layer");
    if err.is::<tower::timeout::error::Elapsed>() {
        return Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "dependency-timeout",
            "the request did not finish in time",
        )
        .into_response();
    }
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the API is failing and refuses requests for a moment",
    )
    .retry_after(5)
    .into_response()
}

/// What Kafka's error means for the client. The detail never carries the
/// error's own text (it goes to the log).
fn producer_problem(e: &KafkaProducerError) -> Problem {
    use ProducerErrorKind as K;
    let unavailable = |detail: &str, secs| {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail).retry_after(secs)
    };
    match e.kind() {
        K::BatchTooLarge { .. } | K::MessageTooLarge => Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "the event or batch is larger than Kafka accepts",
        ),
        K::Serialization => Problem::invalid("the event could not be encoded"),
        K::UnknownTopic => Problem::new(
            StatusCode::BAD_GATEWAY,
            "dependency-failed",
            "the topic does not exist on the broker",
        ),
        K::Timeout | K::OutcomeUnknown => Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "dependency-timeout",
            "Kafka did not confirm in time: the event may or may not be published; \
             retry with the same Idempotency-Key or eventId",
        )
        .server_fault(),
        K::QueueFull => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the publish queue is full",
        )
        .retry_after(1),
        K::CircuitOpen => unavailable("Kafka is failing; publishing is paused", 10),
        K::Transport => unavailable("Kafka cannot be reached", 5).server_fault(),
        K::ShuttingDown | K::Disabled | K::Canceled => {
            unavailable("the gateway is shutting down", 5)
        }
        _ => Problem::new(
            StatusCode::BAD_GATEWAY,
            "dependency-failed",
            "Kafka refused the event",
        )
        .server_fault(),
    }
}

/// What S3's error means for the client.
fn s3_problem(e: &S3ServiceError) -> Problem {
    let unavailable = |detail: &str, secs| {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail).retry_after(secs)
    };
    match e.kind() {
        S3ErrorKind::NotFound => Problem::new(StatusCode::NOT_FOUND, "not-found", "no such object"),
        S3ErrorKind::InvalidKey(rule) => Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-key",
            format!("invalid object key: {rule}"),
        )
        .with_extra(json!({ "rule": rule.as_str() })),
        S3ErrorKind::InvalidRequest => Problem::invalid("S3 refused the request as invalid"),
        // The client's own body failed (dropped, short, long): its fault, not ours.
        S3ErrorKind::Body => {
            Problem::invalid("the request body failed or ended before it was complete")
        }
        S3ErrorKind::Timeout => Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "dependency-timeout",
            "S3 did not answer in time",
        )
        .server_fault(),
        S3ErrorKind::Throttled { .. } => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "S3 asks to slow down",
        )
        .retry_after(1),
        S3ErrorKind::CircuitOpen => unavailable("S3 is failing; requests are paused", 10),
        S3ErrorKind::ShuttingDown => unavailable("the gateway is shutting down", 5),
        S3ErrorKind::Transport => unavailable("S3 cannot be reached", 5).server_fault(),
        _ => Problem::new(
            StatusCode::BAD_GATEWAY,
            "dependency-failed",
            "S3 failed the request",
        )
        .server_fault(),
    }
}

/// A service error as a problem; the cause goes to the log.
fn failed(err: BoxError) -> Problem {
    let problem = if let Some(e) = err.downcast_ref::<KafkaProducerError>() {
        producer_problem(e)
    } else if let Some(e) = err.downcast_ref::<S3ServiceError>() {
        s3_problem(e)
    } else if err.is::<tower::timeout::error::Elapsed>() {
        Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "dependency-timeout",
            "the dependency did not answer in time; the outcome is unknown",
        )
        .server_fault()
    } else {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    };
    log_failure(&problem, &err);
    problem
}

fn s3_failed(err: S3ServiceError) -> Problem {
    let problem = if *err.kind() == S3ErrorKind::Body && serve::body_stalled(&err) {
        serve::body_stalled_problem()
    } else {
        s3_problem(&err)
    };
    log_failure(&problem, &err);
    problem
}

fn log_failure(problem: &Problem, err: &dyn std::fmt::Display) {
    if problem.status.is_server_error() {
        tracing::warn!(target: "gateway::http", status = problem.status.as_u16(), error = %err, "request failed");
    } else {
        tracing::info!(target: "gateway::http", status = problem.status.as_u16(), error = %err, "request refused");
    }
}

/// Reads a request body of at most `limit` bytes: 413 at once when
/// `Content-Length` says more (nothing read), or as soon as more arrives; 408
/// when it stalls; 400 when the client's connection fails.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Problem> {
    let too_large = || {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            format!("the request body is larger than {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let cause = e.into_inner();
        if serve::caused_by::<http_body_util::LengthLimitError>(cause.as_ref()) {
            too_large()
        } else if serve::body_stalled(cause.as_ref()) {
            serve::body_stalled_problem()
        } else {
            tracing::info!(target: "gateway::http", error = %cause, "request body failed");
            Problem::invalid("the request body failed before it was complete")
        }
    })
}

/// Parses a JSON body with problems, not axum's plain-text rejections.
fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<T, Problem> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|v| {
            v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
        });
    if !json {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "the body must be application/json",
        ));
    }
    if body.is_empty() {
        return Err(Problem::invalid("the request body is empty"));
    }
    serde_json::from_slice(body).map_err(|e| {
        let mut detail = format!("the body is not valid: {e}");
        if detail.len() > 300 {
            let mut cut = 300;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
            detail.push('…');
        }
        Problem::invalid(detail)
    })
}

/// The topic of a publish: a valid name this gateway publishes to.
fn allowed_topic(state: &AppState, topic: &str) -> Result<TopicName, Problem> {
    let topic = TopicName::new(topic).map_err(|e| {
        Problem::new(StatusCode::BAD_REQUEST, "invalid-topic", e.to_string())
            .with_extra(json!({ "rule": e.rule.as_str() }))
    })?;
    if topic.is_dead_letter() || !state.publish_topics.contains(topic.as_str()) {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden-topic",
            "this gateway does not publish to that topic",
        ));
    }
    Ok(topic)
}

fn refuse_when_stopping(state: &AppState) -> Result<(), Problem> {
    if state.shutting_down.load(Ordering::Acquire) {
        return Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the gateway is shutting down",
        )
        .retry_after(5));
    }
    Ok(())
}

/// Runs `publish` once per `Idempotency-Key` (see [`crate::idempotency`]).
async fn idempotent<F>(
    state: &AppState,
    scope: &str,
    headers: &HeaderMap,
    body: &Bytes,
    publish: F,
) -> Response
where
    F: Future<Output = Response>,
{
    let key = match idempotency::key_of(headers) {
        Ok(Some(key)) => key,
        Ok(None) => return publish.await,
        Err(problem) => return problem.into_response(),
    };
    let claim = match state.idempotency.begin(scope, &key, body) {
        Begin::Answer(res) => return res,
        Begin::New(claim) => claim,
    };
    let res = publish.await;
    if !res.status().is_success() {
        claim.finish(res.status(), &Bytes::new());
        return res;
    }
    let (parts, body) = res.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    claim.finish(parts.status, &bytes);
    Response::from_parts(parts, Body::from(bytes))
}

async fn publish_one(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    read: Option<axum::Extension<serve::BodyRead>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Room for the JSON around the largest event; its encoded size is checked
    // again after parsing.
    let body = match read_body(&headers, body, state.limits.max_event_bytes + 64 * 1024).await {
        Ok(b) => b,
        Err(p) => return p.into_response(),
    };
    if let Some(axum::Extension(read)) = read {
        read.set();
    }
    let prepared = (|| {
        refuse_when_stopping(&state)?;
        let topic = allowed_topic(&state, &topic)?;
        let event: EventBody = json_body(&headers, &body)?;
        Ok::<_, Problem>((topic, event.into_envelope(state.limits.max_event_bytes)?))
    })();
    let (topic, envelope) = match prepared {
        Ok(p) => p,
        Err(problem) => return problem.into_response(),
    };
    let scope = format!("event\n{topic}");
    idempotent(&state, &scope, &headers, &body, async {
        match state
            .publish
            .clone()
            .oneshot(PublishRequest::new(topic.into_string(), envelope))
            .await
        {
            Ok(ack) => (StatusCode::ACCEPTED, Json(ack)).into_response(),
            Err(e) => failed(e).into_response(),
        }
    })
    .await
}

async fn publish_batch(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    read: Option<axum::Extension<serve::BodyRead>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(&headers, body, state.limits.max_batch_body_bytes).await {
        Ok(b) => b,
        Err(p) => return p.into_response(),
    };
    if let Some(axum::Extension(read)) = read {
        read.set();
    }
    let prepared = (|| {
        refuse_when_stopping(&state)?;
        let topic = allowed_topic(&state, &topic)?;
        let events = match json_body::<BatchBody>(&headers, &body)? {
            BatchBody::List(events) | BatchBody::Wrapped { events } => events,
        };
        Ok::<_, Problem>((
            topic,
            batch_envelopes(
                state.limits.max_batch_events,
                state.limits.max_event_bytes,
                events,
            )?,
        ))
    })();
    let (topic, envelopes) = match prepared {
        Ok(p) => p,
        Err(problem) => return problem.into_response(),
    };
    let scope = format!("batch\n{topic}");
    idempotent(&state, &scope, &headers, &body, async {
        let request = PublishBatchRequest::new(topic.into_string(), envelopes);
        match state.publish_batch.clone().oneshot(request).await {
            Ok(ack) => (StatusCode::ACCEPTED, Json(ack)).into_response(),
            Err(err) => partial_or_failed(err),
        }
    })
    .await
}

/// A batch that failed part way is answered 207 with every event's outcome
/// (delivered, failed, notSent, unknown), so the client resends exactly the
/// events that are safe to resend; one that delivered nothing is a problem.
fn partial_or_failed(err: BoxError) -> Response {
    let outcome = err
        .downcast_ref::<KafkaProducerError>()
        .and_then(|e| e.batch())
        .filter(|b| b.delivered + b.unknown > 0)
        .cloned();
    let Some(outcome) = outcome else {
        return failed(err).into_response();
    };
    tracing::warn!(target: "gateway::http", error = %err, "batch published in part");
    let events: Vec<Value> = outcome
        .events
        .iter()
        .enumerate()
        .map(|(index, e)| {
            let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
            v["index"] = json!(index);
            v
        })
        .collect();
    (
        StatusCode::MULTI_STATUS,
        Json(json!({
            "total": outcome.total,
            "delivered": outcome.delivered,
            "failed": outcome.failed,
            "unknown": outcome.unknown,
            "events": events,
        })),
    )
        .into_response()
}

async fn upload(
    State(state): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), Problem> {
    refuse_when_stopping(&state)?;
    // Bounded: each upload buffers up to a few parts (5 MiB or more each).
    let _place = state.uploads.clone().try_acquire_owned().map_err(|_| {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many uploads in flight",
        )
        .retry_after(1)
    })?;
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
        .await
        .map_err(s3_failed)?;
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
) -> Result<Response, Problem> {
    if !state.s3.exists(key.as_str()).await.map_err(s3_failed)? {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "no such object",
        ));
    }
    let url = state
        .s3
        .presign_get(key.as_str(), state.presign_expiry)
        .await
        .map_err(s3_failed)?;
    Ok((
        StatusCode::TEMPORARY_REDIRECT,
        [(header::LOCATION, url.url)],
    )
        .into_response())
}

async fn delete(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<StatusCode, Problem> {
    refuse_when_stopping(&state)?;
    state.s3.delete(key.as_str()).await.map_err(s3_failed)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn live() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness with the dependencies' full details: for `/debug/health` (behind the
/// token) and the log, never for `/health/ready`.
async fn health_details(state: &AppState) -> (bool, Value) {
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
        Err(e) => (
            false,
            json!({ "isHealthy": false, "lastError": e.to_string() }),
        ),
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
    (
        is_ready,
        json!({
            "ready": is_ready,
            "shuttingDown": stopping,
            "kafka": kafka_json,
            "s3": s3_json,
            "consumer": consumer,
        }),
    )
}

/// Keeps states and counts; drops what names the infrastructure (endpoints,
/// buckets, brokers) and raw error text, which may carry either.
fn redact_health(mut v: Value) -> Value {
    const HIDDEN: &[&str] = &["endpoint", "bucket"];
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                map.retain(|k, _| !HIDDEN.contains(&k.as_str()));
                for (k, child) in map.iter_mut() {
                    let is_error = k == "lastError" || k == "failure" || k == "error";
                    if is_error && !child.is_null() {
                        *child = Value::String("see the log or /debug/health".into());
                    } else {
                        walk(child);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut v);
    v
}

async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let (is_ready, details) = health_details(&state).await;
    let status = if is_ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(redact_health(details)))
}

/// The whole readiness report, internals included; routed only when a token
/// is set (and then behind it).
async fn debug_health(State(state): State<AppState>) -> Json<Value> {
    Json(health_details(&state).await.1)
}

async fn metrics_text(State(state): State<AppState>) -> Result<Response, Infallible> {
    // One scrape: every snapshot of this moment, rendered as OpenMetrics text by
    // prometheus-client (keel::prometheus). `KEEL_GATEWAY_METRICS_KEEL_NAMES=1`
    // adds the pre-0.2 family names for dashboards not migrated yet.
    let mut scrape = Exposition::new();
    scrape.keel_names(state.keel_metric_names);
    scrape.layers(&state.metrics);
    if let Some(c) = state.consumer.read().await.as_ref() {
        // From librdkafka's statistics (every second): no broker request.
        let lags: Vec<PartitionLagSample> = c
            .statistics_lag()
            .into_iter()
            .map(|l| PartitionLagSample {
                topic: l.partition.topic.to_string(),
                partition: l.partition.partition,
                lag: l.lag,
            })
            .collect();
        scrape.consumer(c.group_id(), &c.metrics(), c.in_flight(), &lags);
    }
    scrape.publish(&state.kafka.publish_metrics());
    scrape.s3(&state.s3.metrics());
    scrape.breakers(&state.breakers);
    let text = scrape.render();
    Ok(([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response())
}
