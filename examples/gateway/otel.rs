//! OpenTelemetry for the gateway (feature `otel`): an OTLP trace exporter set up
//! from the standard variables, and a SERVER span per HTTP request.
//!
//! Traces are exported only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and `OTEL_SDK_DISABLED` is not
//! `true`; then spans go by OTLP/HTTP (protobuf) to `<endpoint>/v1/traces`,
//! batched (`OTEL_BSP_*` tune the batches), with `service.name` from
//! `OTEL_SERVICE_NAME` (default `keel-gateway`) and `OTEL_RESOURCE_ATTRIBUTES`.
//!
//! ```text
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 OTEL_SERVICE_NAME=orders-gateway \
//!   cargo run --features otel --example gateway
//! ```
//!
//! Each request runs in a SERVER span named `<method> <route>` with the HTTP
//! semantic conventions (semconv 1.27, stable HTTP attributes), the child of the
//! client's `traceparent` when it sends one. keel's publish spans (PRODUCER) and
//! the consumer's handler spans (CONSUMER, `process <topic>`) continue that trace
//! across Kafka.

use std::sync::OnceLock;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};

/// The provider, kept to flush the last spans at exit.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The `tracing` layer that exports spans by OTLP, when the variables ask for it.
pub fn layer<S>() -> Option<OpenTelemetryLayer<S, SdkTracer>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let endpoint =
        var("OTEL_EXPORTER_OTLP_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))?;
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    // The exporter reads the endpoint (and OTEL_EXPORTER_OTLP_HEADERS,
    // OTEL_EXPORTER_OTLP_TIMEOUT) itself.
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("OpenTelemetry: no OTLP exporter for {endpoint}: {e}");
            return None;
        }
    };
    let service = var("OTEL_SERVICE_NAME").unwrap_or_else(|| "keel-gateway".to_string());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    let tracer = provider.tracer("keel-gateway");
    let _ = PROVIDER.set(provider);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Some(tracing_opentelemetry::layer().with_tracer(tracer))
}

/// Exports the spans still batched (at exit).
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(e) = provider.shutdown()
    {
        eprintln!("OpenTelemetry: flushing the last spans failed: {e}");
    }
}

/// Reads W3C headers from a request.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The request's SERVER span, handed down to [`record_route`].
#[derive(Clone)]
struct ServerSpan(tracing::Span);

/// The method as the conventions write it: the known ones, else `_OTHER`.
fn method_name(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
}

/// Middleware (outermost): runs the request in a SERVER span, the child of the
/// client's `traceparent`, and records the answer's status.
pub async fn server_span(mut req: Request, next: Next) -> Response {
    // No exporter: no span (the JSON logs stay as they are).
    if PROVIDER.get().is_none() {
        return next.run(req).await;
    }
    let method = method_name(req.method());
    let (host, port) = match req.headers().get(axum::http::header::HOST) {
        Some(h) => {
            let h = h.to_str().unwrap_or("");
            match h.rsplit_once(':') {
                Some((host, port)) => (host.to_string(), port.parse::<i64>().ok()),
                None => (h.to_string(), None),
            }
        }
        None => (String::new(), None),
    };
    let span = tracing::info_span!(
        target: "gateway::http",
        "http_request",
        "otel.name" = method,
        "otel.kind" = "server",
        "otel.status_code" = Empty,
        "http.request.method" = method,
        "http.route" = Empty,
        "http.response.status_code" = Empty,
        "url.path" = req.uri().path(),
        "url.scheme" = "http",
        "server.address" = Empty,
        "server.port" = Empty,
        "network.protocol.version" = version(req.version()),
        "user_agent.original" = Empty,
        "error.type" = Empty,
    );
    if !host.is_empty() {
        span.record("server.address", host.as_str());
    }
    if let Some(port) = port {
        span.record("server.port", port);
    }
    if let Some(agent) = req
        .headers()
        .get(axum::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
    {
        span.record("user_agent.original", agent);
    }
    let parent = TraceContextPropagator::new().extract(&Headers(req.headers()));
    if parent.span().span_context().is_valid() {
        // Fails only without an OpenTelemetry layer: nothing to continue then.
        let _ = span.set_parent(parent);
    }
    req.extensions_mut().insert(ServerSpan(span.clone()));
    let res = next.run(req).instrument(span.clone()).await;
    let status = res.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    // Server spans: only 5xx are errors (a 4xx is the client's).
    if status.is_server_error() {
        span.record("error.type", status.as_str());
        span.record("otel.status_code", "error");
    }
    res
}

fn version(v: axum::http::Version) -> &'static str {
    use axum::http::Version;
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_11 => "1.1",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "",
    }
}

/// Route layer: once the router matched, names the SERVER span `<method> <route>`
/// and records `http.route` (the template, never the concrete path).
pub async fn record_route(req: Request, next: Next) -> Response {
    if let (Some(route), Some(ServerSpan(span))) = (
        req.extensions().get::<MatchedPath>(),
        req.extensions().get::<ServerSpan>(),
    ) {
        span.record("http.route", route.as_str());
        // The OpenTelemetry span has started by now (it is the parent of the
        // layers' spans), so `otel.name` would no longer rename it: rename it
        // through the OpenTelemetry API.
        let name = format!("{} {}", method_name(req.method()), route.as_str());
        span.context().span().update_name(name);
    }
    next.run(req).await
}
