//! One trace through the gateway (feature `otel`), against the real broker and
//! s3s-fs started by `scripts/up`.
//!
//! The gateway runs as a child process, so its spans cannot be read from an
//! in-memory exporter here: the test runs a small OTLP/HTTP receiver
//! (`POST /v1/traces`, protobuf, decoded with `opentelemetry-proto`) and points
//! the gateway's `OTEL_EXPORTER_OTLP_ENDPOINT` at it. An HTTP request that
//! carries a `traceparent` must give one trace: the gateway's SERVER span (HTTP
//! semantic conventions), keel's PRODUCER `send <topic>` span and the consumer's
//! CONSUMER `process <topic>` span, all with the client's trace id. The
//! gateway's `/metrics`, read by the Python `prometheus_client` OpenMetrics
//! parser, then links the buckets of that request's route and of its handler to
//! that trace (exemplars).
#![cfg(all(feature = "otel", feature = "s3"))]

mod gateway_support;
mod openmetrics_support;
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use hyper::{Method, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::{Value, json};

use gateway_support::*;

/// A received span and the `service.name` of its resource.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: Span,
}

/// An OTLP/HTTP receiver on a free local port: every span it was sent.
struct Receiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<Received>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

fn text(value: &Option<AnyValue>) -> Option<String> {
    match value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

async fn receiver() -> Receiver {
    let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
    let requests: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = {
        let (spans, requests) = (spans.clone(), requests.clone());
        axum::Router::new().route(
            "/v1/traces",
            post(move |headers: axum::http::HeaderMap, body: Bytes| {
                let (spans, requests) = (spans.clone(), requests.clone());
                async move {
                    let content_type = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    requests.lock().unwrap().push(content_type.clone());
                    if content_type != "application/x-protobuf" {
                        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new());
                    }
                    let Ok(export) = ExportTraceServiceRequest::decode(body) else {
                        return (StatusCode::BAD_REQUEST, Vec::new());
                    };
                    let mut out = spans.lock().unwrap();
                    for rs in export.resource_spans {
                        let service = rs
                            .resource
                            .iter()
                            .flat_map(|r| &r.attributes)
                            .find(|kv| kv.key == "service.name")
                            .and_then(|kv| text(&kv.value))
                            .unwrap_or_default();
                        for ss in rs.scope_spans {
                            for span in ss.spans {
                                out.push(Received {
                                    service: service.clone(),
                                    span,
                                });
                            }
                        }
                    }
                    // An empty ExportTraceServiceResponse.
                    (StatusCode::OK, Vec::new())
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver {
        endpoint,
        spans,
        requests,
    }
}

impl Receiver {
    fn of_trace(&self, trace: &[u8]) -> Vec<Received> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.span.trace_id == trace)
            .cloned()
            .collect()
    }

    /// Waits (up to 60 s) until the trace has a span named `name`.
    async fn wait_for(&self, trace: &[u8], name: &str) -> Received {
        for _ in 0..600 {
            if let Some(r) = self
                .of_trace(trace)
                .into_iter()
                .find(|r| r.span.name == name)
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let names: Vec<_> = self
            .of_trace(trace)
            .into_iter()
            .map(|r| r.span.name)
            .collect();
        panic!(
            "no span {name:?} in the trace within 60 s; its spans: {names:?}; requests: {:?}",
            self.requests.lock().unwrap()
        );
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| text(&kv.value))
}

fn assert_attr(span: &Span, key: &str, expected: &str) {
    assert_eq!(
        attr(span, key).as_deref(),
        Some(expected),
        "attribute {key} of span {:?}; its attributes: {:?}",
        span.name,
        span.attributes
    );
}

/// Whether `span` descends from the span `ancestor` among `all`.
fn descends_from(all: &[Received], span: &Span, ancestor: &[u8]) -> bool {
    let mut at = span.parent_span_id.clone();
    for _ in 0..16 {
        if at == ancestor {
            return true;
        }
        match all.iter().find(|r| r.span.span_id == at) {
            Some(r) => at = r.span.parent_span_id.clone(),
            None => return false,
        }
    }
    false
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_with_a_traceparent_is_one_trace_through_kafka_to_the_handler() {
    openmetrics_support::require_prometheus_client();
    let brokers = support::kafka_brokers();
    let s3 = support::s3s_fs();
    let otlp = receiver().await;
    let topic = unique("gw-otel");
    let group = unique("gw-otel-group");
    let service = unique("gw-otel-service");
    let gw = Gateway::start(&[
        ("KAFKA_BROKERS", brokers),
        ("KAFKA_GROUP_ID", group.clone()),
        ("KEEL_GATEWAY_TOPICS", topic.clone()),
        ("AWS_S3_ENDPOINT", s3.endpoint.clone()),
        ("AWS_S3_BUCKET", unique("gw-otel")),
        ("AWS_ACCESS_KEY_ID", s3.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.clone()),
        ("KEEL_GATEWAY_CREATE_BUCKET", "true".to_string()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint.clone()),
        ("OTEL_SERVICE_NAME", service.clone()),
        // Export every 200 ms rather than every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_string()),
    ]);
    wait_status(
        &gw.url("/health/ready"),
        StatusCode::OK,
        Duration::from_secs(60),
    )
    .await;

    // The client's trace: a random trace id, its span id.
    let trace = uuid::Uuid::new_v4().as_bytes().to_vec();
    let client_span = [0x1au8, 0x2b, 0x3c, 0x4d, 0x5e, 0x6f, 0x70, 0x81];
    let traceparent = format!("00-{}-{}-01", hex(&trace), hex(&client_span));
    let published = send_with(
        Method::POST,
        &gw.url(&format!("/events/{topic}")),
        full(
            json!({ "eventType": "order.created", "key": "o-42", "payload": { "orderId": "o-42" } })
                .to_string(),
        ),
        &[
            ("content-type", "application/json"),
            ("traceparent", traceparent.as_str()),
            ("user-agent", "keel-otel-test"),
        ],
    )
    .await
    .expect("the gateway answers");
    assert_eq!(
        published.status,
        StatusCode::ACCEPTED,
        "{}",
        published.text()
    );
    let offset = published.json()["offset"].as_i64().expect("an offset");

    // The SERVER span: the child of the client's span, HTTP conventions.
    let server = otlp.wait_for(&trace, "POST /events/{topic}").await;
    assert_eq!(server.service, service);
    let s = &server.span;
    assert_eq!(s.kind, SpanKind::Server as i32, "{s:?}");
    assert_eq!(s.parent_span_id, client_span);
    assert_attr(s, "http.request.method", "POST");
    assert_attr(s, "http.route", "/events/{topic}");
    assert_attr(s, "url.path", &format!("/events/{topic}"));
    assert_attr(s, "url.scheme", "http");
    assert_attr(s, "http.response.status_code", "202");
    assert_attr(s, "server.address", "127.0.0.1");
    assert_attr(s, "network.protocol.version", "1.1");
    assert_attr(s, "user_agent.original", "keel-otel-test");
    assert_eq!(attr(s, "error.type"), None);

    // The PRODUCER span, inside the request.
    let send_name = format!("send {topic}");
    let producer = otlp.wait_for(&trace, &send_name).await;
    let p = &producer.span;
    assert_eq!(p.kind, SpanKind::Producer as i32, "{p:?}");
    assert_attr(p, "messaging.system", "kafka");
    assert_attr(p, "messaging.operation.type", "send");
    assert_attr(p, "messaging.destination.name", &topic);
    assert_attr(p, "messaging.kafka.message.key", "o-42");
    assert_attr(p, "messaging.kafka.offset", &offset.to_string());

    // The CONSUMER span of the gateway's handler: the child of the producer's.
    let process = otlp.wait_for(&trace, &format!("process {topic}")).await;
    let c = &process.span;
    assert_eq!(c.kind, SpanKind::Consumer as i32, "{c:?}");
    assert_eq!(c.parent_span_id, p.span_id);
    assert_attr(c, "messaging.system", "kafka");
    assert_attr(c, "messaging.operation.type", "process");
    assert_attr(c, "messaging.destination.name", &topic);
    assert_attr(c, "messaging.consumer.group.name", &group);
    assert_attr(c, "messaging.kafka.offset", &offset.to_string());
    assert_attr(c, "messaging.kafka.message.key", "o-42");
    assert_eq!(attr(c, "error.type"), None);

    let all = otlp.of_trace(&trace);
    assert!(
        descends_from(&all, p, &s.span_id),
        "the send span is within the request's span"
    );
    for r in &all {
        assert_eq!(r.service, service, "{:?}", r.span.name);
        assert_eq!(r.span.trace_id, trace);
    }

    // Exemplars: the route's and the handler's buckets point at this trace.
    let trace_hex = hex(&trace);
    let mut text = String::new();
    for _ in 0..100 {
        text = get(&gw.url("/metrics")).await.text();
        if text.lines().any(|l| {
            l.starts_with("messaging_process_duration_seconds_bucket") && l.contains(&trace_hex)
        }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let families = openmetrics_support::parse_with_prometheus_client(&text);
    let exemplars = |family: &str, labels: &[(&str, &str)]| -> Vec<Value> {
        families
            .get(family)
            .unwrap_or_else(|| panic!("no family {family} in\n{text}"))["samples"]
            .as_array()
            .expect("samples")
            .iter()
            .filter(|s| {
                s["name"] == format!("{family}_bucket")
                    && labels.iter().all(|(k, v)| s["labels"][*k] == *v)
            })
            .filter_map(|s| s["exemplar"].as_object().cloned())
            .filter(|e| e["labels"]["trace_id"] == trace_hex.as_str())
            .map(Value::Object)
            .collect()
    };
    let route = "/events/{topic}";
    for (family, labels) in [
        (
            "http_server_request_duration_seconds",
            vec![("http_route", route), ("outcome", "success")],
        ),
        (
            "messaging_process_duration_seconds",
            vec![("event_type", "order.created"), ("outcome", "success")],
        ),
    ] {
        let found = exemplars(family, &labels);
        assert_eq!(
            found.len(),
            1,
            "one bucket of {family} {labels:?} carries trace {trace_hex}:\n{text}"
        );
        let e = &found[0];
        let span_id = e["labels"]["span_id"].as_str().expect("a span id");
        // The span may still be in the gateway's export batch.
        let mut span_ids = Vec::new();
        for _ in 0..50 {
            span_ids = otlp
                .of_trace(&trace)
                .iter()
                .map(|r| hex(&r.span.span_id))
                .collect();
            if span_ids.iter().any(|id| id == span_id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            span_ids.iter().any(|id| id == span_id),
            "{family}: span {span_id} is one of the trace's spans {span_ids:?}"
        );
        assert!(e["value"].as_f64().expect("a latency") > 0.0, "{e}");
        assert!(e["timestamp"].as_f64().expect("a timestamp") > 1.6e9, "{e}");
    }

    // An upload in another trace: its S3 call is a CLIENT span under the request.
    let upload_trace = uuid::Uuid::new_v4().as_bytes().to_vec();
    let upload_parent = format!("00-{}-{}-01", hex(&upload_trace), hex(&client_span));
    let uploaded = send_with(
        Method::PUT,
        &gw.url("/files/otel/a.txt"),
        full("hello"),
        &[
            ("content-type", "text/plain"),
            ("traceparent", upload_parent.as_str()),
        ],
    )
    .await
    .expect("the gateway answers");
    assert!(uploaded.status.is_success(), "{}", uploaded.text());
    let put = otlp.wait_for(&upload_trace, "S3.PutObject").await;
    // The SDK's span of the same name is INTERNAL: look for keel's CLIENT span.
    let all = otlp.of_trace(&upload_trace);
    let keel_put = all
        .iter()
        .find(|r| r.span.name == "S3.PutObject" && r.span.kind == SpanKind::Client as i32)
        .unwrap_or_else(|| panic!("keel's S3.PutObject span: {put:?}"));
    assert_attr(&keel_put.span, "rpc.system", "aws-api");
    assert_attr(&keel_put.span, "rpc.method", "PutObject");
    assert_attr(&keel_put.span, "aws.s3.key", "otel/a.txt");
    let upload_server = otlp.wait_for(&upload_trace, "PUT /files/{*key}").await;
    assert!(descends_from(
        &all,
        &keel_put.span,
        &upload_server.span.span_id
    ));
    drop(gw);
}
