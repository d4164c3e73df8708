//! One error format for every route and every rejection: `application/problem+json`
//! (RFC 9457).
//!
//! Handlers answer [`Problem`]s; [`uniform_errors`] (a middleware around the whole
//! router) adds the request id to them, and turns every other error answer —
//! axum's own rejections (bad JSON, wrong content type), 404 and 405, a body over
//! its limit, a load-shedding 503 — into a problem too, so a client parses one
//! shape. The `detail` is always safe to show: internal causes (S3 or Kafka error
//! text) go to the log with the request id, never into the body.
//!
//! Problem types are stable URNs, `urn:keel:problem:<slug>`:
//!
//! | slug | status | meaning |
//! |---|---|---|
//! | `invalid-request` | 400 | malformed JSON, wrong types, missing or empty fields, a client's body that failed |
//! | `invalid-topic` | 400 | the topic name breaks Kafka's rules |
//! | `invalid-key` | 400 | the object key breaks keel's key rules |
//! | `unauthorized` | 401 | bearer token missing or wrong |
//! | `forbidden-topic` | 403 | a valid topic this gateway does not publish to |
//! | `read-only` | 403 | the gateway runs read-only |
//! | `not-found` | 404 | no such route or object |
//! | `method-not-allowed` | 405 | |
//! | `request-timeout` | 408 | the request or its body stalled |
//! | `payload-too-large` | 413 | an event or batch over its limit |
//! | `unsupported-media-type` | 415 | not `application/json` |
//! | `dependency-failed` | 502 | Kafka or S3 failed |
//! | `overloaded` | 503 | too many requests in flight (`Retry-After`) |
//! | `unavailable` | 503 | a dependency's breaker is open, or the gateway shuts down (`Retry-After`) |
//! | `dependency-timeout` | 504 | Kafka or S3 did not answer in time |
//! | `internal` | 500 | a bug |

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::body::BodyError;

/// The media type of a problem.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Error bodies of other layers read to turn them into a problem's detail.
const MAX_FOREIGN_BODY: usize = 4096;

/// A problem answer. Its response carries a copy in its extensions so that
/// [`uniform_errors`] can render it again with the request id.
#[derive(Clone, Debug)]
pub struct Problem {
    /// HTTP status.
    pub status: StatusCode,
    /// The slug of its `type`.
    pub slug: &'static str,
    /// Safe to show.
    pub detail: String,
    /// `Retry-After` seconds, for 503s.
    pub retry_after: Option<u32>,
    /// Extra members (a batch's per-event results, the rule a key broke).
    pub extra: Option<Value>,
    /// `true` when Kafka or S3 failed: the API breaker counts these, nothing else.
    pub server_fault: bool,
}

/// Marks a response whose failure is the server's (its dependencies'); the API
/// breaker counts only these.
#[derive(Clone, Copy, Debug)]
pub struct ServerFault;

impl Problem {
    /// A problem of `slug` with a status and a safe detail.
    pub fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status,
            slug,
            detail: detail.into(),
            retry_after: None,
            extra: None,
            server_fault: false,
        }
    }

    /// 400 `invalid-request`.
    pub fn invalid(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::BAD_REQUEST, "invalid-request", detail)
    }

    /// Sets `Retry-After`.
    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// Adds members to the body.
    pub fn with_extra(mut self, extra: Value) -> Self {
        self.extra = Some(extra);
        self
    }

    /// Marks the problem as the server's (Kafka or S3 failed).
    pub fn server_fault(mut self) -> Self {
        self.server_fault = true;
        self
    }

    fn title(&self) -> &'static str {
        self.status.canonical_reason().unwrap_or("Error")
    }

    fn body(&self, request_id: Option<&str>) -> Value {
        let mut body = json!({
            "type": format!("urn:keel:problem:{}", self.slug),
            "title": self.title(),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Some(id) = request_id {
            body["requestId"] = Value::String(id.to_string());
            body["instance"] = Value::String(format!("urn:keel:request:{id}"));
        }
        if let (Some(Value::Object(extra)), Value::Object(map)) = (&self.extra, &mut body) {
            for (k, v) in extra {
                map.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        body
    }

    /// The response, with the request id when known.
    pub fn to_response(&self, request_id: Option<&str>) -> Response {
        let mut res = Response::new(Body::from(self.body(request_id).to_string()));
        *res.status_mut() = self.status;
        let headers = res.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"keel-gateway\""),
            );
        }
        if self.server_fault {
            res.extensions_mut().insert(ServerFault);
        }
        res.extensions_mut().insert(self.clone());
        res
    }
}

/// A refused request body: 413 `payload-too-large` or 400 `invalid-request`,
/// with the batch's per-event errors.
impl From<BodyError> for Problem {
    fn from(e: BodyError) -> Self {
        let problem = if e.too_large {
            Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large", e.detail)
        } else {
            Problem::invalid(e.detail)
        };
        if e.errors.is_empty() {
            problem
        } else {
            problem.with_extra(json!({ "errors": e.errors }))
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        self.to_response(None)
    }
}

fn slug_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid-request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not-found",
        405 => "method-not-allowed",
        408 => "request-timeout",
        413 => "payload-too-large",
        415 => "unsupported-media-type",
        422 => "invalid-request",
        429 | 503 => "overloaded",
        504 => "dependency-timeout",
        500 => "internal",
        _ if status.is_server_error() => "dependency-failed",
        _ => "invalid-request",
    }
}

/// The request id of a request (set by tower-http's `SetRequestIdLayer`).
pub fn request_id(req: &Request) -> Option<String> {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Middleware: every error answer leaves as a problem with the request id.
pub async fn uniform_errors(req: Request, next: Next) -> Response {
    let id = request_id(&req);
    let res = next.run(req).await;
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    if let Some(problem) = res.extensions().get::<Problem>().cloned() {
        let mut out = problem.to_response(id.as_deref());
        copy_headers(&res, &mut out);
        return out;
    }
    // A deliberate JSON answer (readiness's 503 report) stays as it is.
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with(PROBLEM_JSON));
    if is_json {
        return res;
    }
    // Someone else's error (axum's rejections, a layer's answer): keep its status,
    // take its short text as the detail.
    let (parts, body) = res.into_parts();
    let text = match axum::body::to_bytes(body, MAX_FOREIGN_BODY).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(_) => String::new(),
    };
    let detail = if text.is_empty() || text.starts_with('{') {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string()
    } else {
        text
    };
    let mut problem = Problem::new(status, slug_for(status), detail);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        problem = problem.retry_after(1);
    }
    let mut out = problem.to_response(id.as_deref());
    for (name, value) in parts.headers.iter() {
        if name == header::RETRY_AFTER || name == header::ALLOW {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

fn copy_headers(from: &Response, to: &mut Response) {
    for (name, value) in from.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            to.headers_mut().insert(name.clone(), value.clone());
        }
    }
}
