//! Black-box tests of the gateway as a service people can expose (issue 13): the
//! built binary is started as a child process and driven over HTTP and raw TCP —
//! on its embedded defaults, and against the real broker, s3s-fs and moto of
//! `scripts/up`. Every refusal is `application/problem+json` with a request id,
//! and nothing it refuses reaches Kafka (checked with an independent reader on
//! the real broker) or leaves a multipart upload on moto.

mod gateway_support;
mod support;
mod transfer_support;

use std::time::Duration;

use hyper::{Method, StatusCode};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

use gateway_support::*;

const JSON: &str = "application/json";

/// Checks that `answer` is a problem of `status` whose request id is the one
/// echoed in `x-request-id`; returns its body.
fn assert_problem(answer: &Answer, status: StatusCode, what: &str) -> Value {
    assert_eq!(answer.status, status, "{what}: {}", answer.text());
    let content_type = answer
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert_eq!(
        content_type,
        "application/problem+json",
        "{what}: {}",
        answer.text()
    );
    let body = answer.json();
    assert!(
        body["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("urn:keel:problem:")),
        "{what}: {body}"
    );
    assert_eq!(body["status"], status.as_u16(), "{what}: {body}");
    assert!(body["title"].is_string(), "{what}: {body}");
    assert!(body["detail"].is_string(), "{what}: {body}");
    let id = answer
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("x-request-id on every answer");
    assert_eq!(body["requestId"], id, "{what}: {body}");
    body
}

async fn post(gw: &Gateway, path: &str, body: impl Into<bytes::Bytes>, ct: &str) -> Answer {
    send(Method::POST, &gw.url(path), full(body), ct)
        .await
        .expect("the gateway answers")
}

fn event(event_type: &str) -> Value {
    json!({ "eventType": event_type, "payload": { "n": 1 } })
}

/// The malformed inputs of issue 13, each with the status it must get.
fn malformed() -> Vec<(&'static str, String, Vec<u8>, &'static str, StatusCode)> {
    let ok = event("order.created").to_string().into_bytes();
    let big = json!({ "eventType": "x", "payload": "a".repeat(10 * 1024 * 1024) })
        .to_string()
        .into_bytes();
    let batch_1001 = serde_json::to_vec(&vec![event("x"); 1001]).unwrap();
    let one_bad =
        serde_json::to_vec(&json!([event("x"), { "eventType": "", "payload": 1 }, event("y")]))
            .unwrap();
    let one_big = serde_json::to_vec(&json!([
        event("x"),
        { "eventType": "x", "payload": "a".repeat(1_200_000) },
        event("y")
    ]))
    .unwrap();
    vec![
        (
            "bad JSON",
            "/events/orders".into(),
            b"{bad".to_vec(),
            JSON,
            StatusCode::BAD_REQUEST,
        ),
        (
            "wrong types",
            "/events/orders".into(),
            br#"{"eventType":5,"payload":1}"#.to_vec(),
            JSON,
            StatusCode::BAD_REQUEST,
        ),
        (
            "empty body",
            "/events/orders".into(),
            Vec::new(),
            JSON,
            StatusCode::BAD_REQUEST,
        ),
        (
            "wrong content type",
            "/events/orders".into(),
            ok.clone(),
            "text/plain",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "payload missing",
            "/events/orders".into(),
            br#"{"eventType":"x"}"#.to_vec(),
            JSON,
            StatusCode::BAD_REQUEST,
        ),
        (
            "payload null",
            "/events/orders".into(),
            br#"{"eventType":"x","payload":null}"#.to_vec(),
            JSON,
            StatusCode::BAD_REQUEST,
        ),
        (
            "10 MiB event",
            "/events/orders".into(),
            big,
            JSON,
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "batch of 1,001",
            "/events/orders/batch".into(),
            batch_1001,
            JSON,
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "one invalid event in a batch",
            "/events/orders/batch".into(),
            one_bad,
            JSON,
            StatusCode::BAD_REQUEST,
        ),
        (
            "one 1.2 MB event in a batch",
            "/events/orders/batch".into(),
            one_big,
            JSON,
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "invalid topic a b",
            "/events/a%20b".into(),
            ok.clone(),
            JSON,
            StatusCode::BAD_REQUEST,
        ),
        (
            "invalid topic ..",
            "/events/..".into(),
            ok.clone(),
            JSON,
            StatusCode::BAD_REQUEST,
        ),
        (
            "invalid topic 300 chars",
            format!("/events/{}", "t".repeat(300)),
            ok.clone(),
            JSON,
            StatusCode::BAD_REQUEST,
        ),
        (
            "invalid topic über",
            "/events/%C3%BCber".into(),
            ok.clone(),
            JSON,
            StatusCode::BAD_REQUEST,
        ),
        (
            "topic outside the allow-list",
            "/events/someone-elses".into(),
            ok.clone(),
            JSON,
            StatusCode::FORBIDDEN,
        ),
        (
            "a dead-letter topic",
            "/events/orders.dlq".into(),
            ok,
            JSON,
            StatusCode::FORBIDDEN,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_malformed_input_is_a_problem_and_nothing_is_published() {
    let gw = Gateway::start(&[("KEEL_GATEWAY_TOPICS", "orders".to_string())]);
    wait_status(
        &gw.url("/health/ready"),
        StatusCode::OK,
        Duration::from_secs(60),
    )
    .await;
    let before = value(
        &metrics(&gw).await,
        "messaging_client_sent_messages_total{messaging_operation_name=\"send\",!error_type}",
    );

    for (what, path, body, ct, status) in malformed() {
        if body.len() > 4 << 20 {
            // Refused from its Content-Length, before the body is read: a client
            // still writing gets a broken pipe, so read the answer after a first
            // chunk, as a client using `Expect: 100-continue` would.
            let text = answer_before_body(&gw, &path, &body, ct).await;
            assert!(text.starts_with("HTTP/1.1 413"), "{what}: {text}");
            assert!(text.contains("application/problem+json"), "{what}: {text}");
            continue;
        }
        let answer = post(&gw, &path, body, ct).await;
        let problem = assert_problem(&answer, status, what);
        if what == "one invalid event in a batch" {
            assert_eq!(problem["errors"][0]["index"], 1, "{problem}");
        }
    }
    // Keys: `..` segments, control characters, 1,025 bytes.
    for (what, key) in [
        ("dot segment", "a/../b".to_string()),
        ("control character", "a%01b".to_string()),
        ("1,025-byte key", "k".repeat(1025)),
    ] {
        let answer = send(
            Method::PUT,
            &gw.url(&format!("/files/{key}")),
            full("x"),
            "text/plain",
        )
        .await
        .unwrap();
        let problem = assert_problem(&answer, StatusCode::BAD_REQUEST, what);
        assert_eq!(problem["type"], "urn:keel:problem:invalid-key", "{problem}");
    }
    // Unknown routes and methods are problems too.
    assert_problem(&get(&gw.url("/nope")).await, StatusCode::NOT_FOUND, "404");
    let patch = send(Method::PATCH, &gw.url("/events/orders"), full(""), JSON)
        .await
        .unwrap();
    assert_problem(&patch, StatusCode::METHOD_NOT_ALLOWED, "405");

    // A client's request id is kept and echoed.
    let answer = send_with(
        Method::POST,
        &gw.url("/events/orders"),
        full("{bad"),
        &[("content-type", JSON), ("x-request-id", "client-chosen-42")],
    )
    .await
    .unwrap();
    assert_eq!(
        assert_problem(&answer, StatusCode::BAD_REQUEST, "id")["requestId"],
        "client-chosen-42"
    );
    assert!(
        gw.output().contains("client-chosen-42"),
        "the request id is in the log"
    );

    let after = value(
        &metrics(&gw).await,
        "messaging_client_sent_messages_total{messaging_operation_name=\"send\",!error_type}",
    );
    assert_eq!(after, before, "nothing refused was published");

    // Health says states, not internals.
    let ready = get(&gw.url("/health/ready")).await;
    let text = ready.text();
    assert!(
        !text.contains("127.0.0.1"),
        "no endpoint in /health/ready: {text}"
    );
    assert!(!text.contains("\"bucket\""), "{text}");
}

/// Sends the head of a POST declaring all of `body` and its first 64 KiB, then
/// reads the answer (the server may answer before reading the rest).
async fn answer_before_body(gw: &Gateway, path: &str, body: &[u8], ct: &str) -> String {
    let addr = gw.base.trim_start_matches("http://").to_string();
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(&body[..64 * 1024]).await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let _ = timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.ends_with(b"}") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&got).into_owned()
}

fn topic_names(brokers: &str) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("a metadata client");
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("broker metadata");
    metadata
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .collect()
}

/// Every record of `topic`, read with kcat from the beginning to the end.
fn kcat_all(brokers: &str, topic: &str) -> Vec<Value> {
    let out = std::process::Command::new(support::kcat())
        .args([
            "-C",
            "-b",
            brokers,
            "-t",
            topic,
            "-o",
            "beginning",
            "-e",
            "-q",
            "-f",
            "%s\n",
        ])
        .output()
        .expect("run kcat");
    assert!(
        out.status.success(),
        "kcat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a JSON envelope"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allow_list_and_idempotency_on_the_real_broker() {
    let brokers = support::kafka_brokers();
    let s3 = support::s3s_fs();
    let topic = unique("gw-api");
    let outsider = unique("gw-api-other");
    let gw = Gateway::start(&[
        ("KAFKA_BROKERS", brokers.clone()),
        ("KAFKA_GROUP_ID", unique("gw-api-group")),
        ("KEEL_GATEWAY_TOPICS", topic.clone()),
        ("AWS_S3_ENDPOINT", s3.endpoint.clone()),
        ("AWS_S3_BUCKET", unique("gw-api")),
        ("AWS_ACCESS_KEY_ID", s3.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.clone()),
        ("KEEL_GATEWAY_CREATE_BUCKET", "true".to_string()),
    ]);
    wait_status(
        &gw.url("/health/ready"),
        StatusCode::OK,
        Duration::from_secs(60),
    )
    .await;

    let body = event("order.created").to_string();
    for (path, status) in [
        (format!("/events/{outsider}"), StatusCode::FORBIDDEN),
        (format!("/events/{topic}.dlq"), StatusCode::FORBIDDEN),
        ("/events/a%20b".to_string(), StatusCode::BAD_REQUEST),
        ("/events/..".to_string(), StatusCode::BAD_REQUEST),
        (
            format!("/events/{}", "t".repeat(300)),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let answer = post(&gw, &path, body.clone(), JSON).await;
        assert_problem(&answer, status, &path);
    }
    let invalid_batch = json!([event("x"), { "eventType": "y" }]).to_string();
    let answer = post(&gw, &format!("/events/{topic}/batch"), invalid_batch, JSON).await;
    assert_problem(
        &answer,
        StatusCode::BAD_REQUEST,
        "batch with a payload missing",
    );

    // The same Idempotency-Key twice: one record, the same answer.
    let mut answers = Vec::new();
    for _ in 0..2 {
        let answer = send_with(
            Method::POST,
            &gw.url(&format!("/events/{topic}")),
            full(body.clone()),
            &[
                ("content-type", JSON),
                ("idempotency-key", "retry-after-timeout-1"),
            ],
        )
        .await
        .unwrap();
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text());
        answers.push(answer);
    }
    assert_eq!(answers[0].json()["eventId"], answers[1].json()["eventId"]);
    assert_eq!(
        answers[1]
            .headers
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    // Another body under the same key is refused.
    let other = send_with(
        Method::POST,
        &gw.url(&format!("/events/{topic}")),
        full(event("other").to_string()),
        &[
            ("content-type", JSON),
            ("idempotency-key", "retry-after-timeout-1"),
        ],
    )
    .await
    .unwrap();
    assert_problem(&other, StatusCode::UNPROCESSABLE_ENTITY, "key reused");

    let records = kcat_all(&brokers, &topic);
    assert_eq!(
        records.len(),
        1,
        "one record for one key and nothing refused: {records:?}"
    );
    assert_eq!(records[0]["eventId"], answers[0].json()["eventId"]);
    let topics = topic_names(&brokers);
    assert!(
        !topics.contains(&outsider),
        "a refused topic was never created"
    );
    let dlq = kcat_all(&brokers, &format!("{topic}.dlq"));
    assert!(dlq.is_empty(), "nothing was written to the DLQ: {dlq:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bearer_token_and_read_only_mode() {
    let token = "tok-5f8a9c1e-not-a-real-secret";
    let gw = Gateway::start(&[
        ("KEEL_GATEWAY_TOPICS", "orders".to_string()),
        ("KEEL_GATEWAY_TOKEN", token.to_string()),
    ]);
    wait_status(
        &gw.url("/health/ready"),
        StatusCode::OK,
        Duration::from_secs(60),
    )
    .await;
    let body = event("order.created").to_string();
    let bearer = format!("Bearer {token}");
    for auth in [None, Some("Bearer wrong"), Some("Bearer "), Some(token)] {
        let mut headers = vec![("content-type", JSON)];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        let answer = send_with(
            Method::POST,
            &gw.url("/events/orders"),
            full(body.clone()),
            &headers,
        )
        .await
        .unwrap();
        let problem = assert_problem(&answer, StatusCode::UNAUTHORIZED, "no valid token");
        assert!(answer.headers.contains_key("www-authenticate"), "{problem}");
        let metrics = send_with(Method::GET, &gw.url("/metrics"), full(""), &headers[1..])
            .await
            .unwrap();
        assert_eq!(metrics.status, StatusCode::UNAUTHORIZED);
    }
    let headers = [("content-type", JSON), ("authorization", bearer.as_str())];
    let ok = send_with(
        Method::POST,
        &gw.url("/events/orders"),
        full(body.clone()),
        &headers,
    )
    .await
    .unwrap();
    assert_eq!(ok.status, StatusCode::ACCEPTED, "{}", ok.text());
    let metrics = send_with(Method::GET, &gw.url("/metrics"), full(""), &headers[1..])
        .await
        .unwrap();
    assert_eq!(metrics.status, StatusCode::OK);
    // Health stays open for probes; the details need the token.
    assert_eq!(get(&gw.url("/health/live")).await.status, StatusCode::OK);
    assert_eq!(get(&gw.url("/health/ready")).await.status, StatusCode::OK);
    assert_eq!(
        get(&gw.url("/debug/health")).await.status,
        StatusCode::UNAUTHORIZED
    );
    let debug = send_with(
        Method::GET,
        &gw.url("/debug/health"),
        full(""),
        &headers[1..],
    )
    .await
    .unwrap();
    assert_eq!(debug.status, StatusCode::OK);
    assert!(
        debug.text().contains("endpoint"),
        "details behind the token: {}",
        debug.text()
    );
    assert!(!gw.output().contains(token), "the token is never logged");

    let read_only = Gateway::start(&[
        ("KEEL_GATEWAY_TOPICS", "orders".to_string()),
        ("KEEL_GATEWAY_READ_ONLY", "true".to_string()),
    ]);
    wait_status(
        &read_only.url("/health/ready"),
        StatusCode::OK,
        Duration::from_secs(60),
    )
    .await;
    let refused = post(&read_only, "/events/orders", body, JSON).await;
    assert_eq!(
        assert_problem(&refused, StatusCode::FORBIDDEN, "read-only")["type"],
        "urn:keel:problem:read-only"
    );
    let upload = send(
        Method::PUT,
        &read_only.url("/files/a.txt"),
        full("x"),
        "text/plain",
    )
    .await
    .unwrap();
    assert_problem(&upload, StatusCode::FORBIDDEN, "read-only upload");
    let download = get(&read_only.url("/files/missing.txt")).await;
    assert_problem(&download, StatusCode::NOT_FOUND, "reads still work");
}

/// `p`-th percentile of sorted `values`.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_are_closed_while_others_are_served() {
    let gw = Gateway::start(&[
        ("KEEL_GATEWAY_TOPICS", "orders".to_string()),
        ("KEEL_GATEWAY_HEADER_TIMEOUT_MS", "2000".to_string()),
        ("KEEL_GATEWAY_BODY_IDLE_TIMEOUT_MS", "2000".to_string()),
    ]);
    wait_status(
        &gw.url("/health/live"),
        StatusCode::OK,
        Duration::from_secs(60),
    )
    .await;
    let addr = gw.base.trim_start_matches("http://").to_string();
    let opened = Instant::now();
    let mut slow = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(&addr).await.expect("connect");
        let half: &[u8] = if i % 2 == 0 {
            b"GET /health/li"
        } else {
            b"POST /events/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/js"
        };
        s.write_all(half).await.unwrap();
        slow.push(s);
    }
    for _ in 0..50 {
        let mut s = TcpStream::connect(&addr).await.expect("connect");
        s.write_all(
            b"POST /events/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"eve",
        )
        .await
        .unwrap();
        slow.push(s);
    }
    // Normal requests keep being answered meanwhile.
    let mut latencies = Vec::new();
    while opened.elapsed() < Duration::from_secs(2) {
        let t = Instant::now();
        let answer = get(&gw.url("/health/live")).await;
        latencies.push(t.elapsed());
        assert_eq!(answer.status, StatusCode::OK);
    }
    // Every slow connection is closed (half headers) or answered 408 (stalled
    // body) within the timeout plus a margin.
    let mut closed_after = Vec::new();
    let mut answered_408 = 0;
    for mut s in slow {
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        let read = timeout(Duration::from_secs(6), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(
            read.is_ok(),
            "a slow connection was still open 6 s after the timeout"
        );
        closed_after.push(opened.elapsed());
        if got.starts_with(b"HTTP/1.1 408") {
            answered_408 += 1;
            let text = String::from_utf8_lossy(&got);
            assert!(text.contains("application/problem+json"), "{text}");
        }
    }
    assert_eq!(answered_408, 50, "every stalled body gets a 408 problem");
    latencies.sort();
    closed_after.sort();
    println!(
        "figure: slow-loris 250 connections (200 half headers, 50 stalled bodies), timeouts 2 s: \
         all closed by {:.2} s; /health/live meanwhile: {} answers, p50 {:.1} ms, p99 {:.1} ms",
        closed_after.last().unwrap().as_secs_f64(),
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );
    assert_eq!(get(&gw.url("/health/live")).await.status, StatusCode::OK);
}

/// Opens an upload of `declared` bytes, sends `sent` of them and stalls.
async fn stalled_upload(addr: &str, key: &str, declared: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "PUT /files/{key} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {declared}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'z'; 64 * 1024];
    let mut left = sent;
    while left > 0 {
        let n = left.min(chunk.len());
        // The server may answer early (503 while the upload places are taken,
        // their release after a dropped client being asynchronous) and close:
        // a client that stops writing then is what this helper stands for.
        if s.write_all(&chunk[..n]).await.is_err() {
            break;
        }
        left -= n;
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_is_shed_with_retry_after_and_client_failures_never_open_the_breaker() {
    let gw = Gateway::start(&[
        ("KEEL_GATEWAY_TOPICS", "orders".to_string()),
        ("KEEL_GATEWAY_MAX_IN_FLIGHT", "2".to_string()),
        ("KEEL_GATEWAY_MAX_UPLOADS", "1".to_string()),
        ("KEEL_GATEWAY_BODY_IDLE_TIMEOUT_MS", "30000".to_string()),
    ]);
    wait_status(
        &gw.url("/health/ready"),
        StatusCode::OK,
        Duration::from_secs(60),
    )
    .await;
    let addr = gw.base.trim_start_matches("http://").to_string();
    let body = event("order.created").to_string();

    // A stalled upload takes the only upload place (uploads buffer parts in
    // memory, so they have their own bound)...
    let mut held = vec![stalled_upload(&addr, "shed/a.bin", 1 << 20, 1024).await];
    sleep(Duration::from_millis(300)).await;
    let second = send(
        Method::PUT,
        &gw.url("/files/shed/b.bin"),
        full("x"),
        "text/plain",
    )
    .await
    .unwrap();
    let problem = assert_problem(&second, StatusCode::SERVICE_UNAVAILABLE, "upload bound");
    assert_eq!(problem["detail"], "too many uploads in flight", "{problem}");
    // ...and a stalled publish the second of the two places in flight.
    let mut stalled_event = TcpStream::connect(&addr).await.unwrap();
    stalled_event
        .write_all(b"POST /events/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        .await
        .unwrap();
    held.push(stalled_event);
    sleep(Duration::from_millis(300)).await;
    let shed = post(&gw, "/events/orders", body.clone(), JSON).await;
    let problem = assert_problem(&shed, StatusCode::SERVICE_UNAVAILABLE, "shed");
    assert_eq!(problem["type"], "urn:keel:problem:overloaded", "{problem}");
    assert!(shed.headers.contains_key("retry-after"));
    // Probes and metrics are not behind the limit.
    assert_eq!(get(&gw.url("/health/live")).await.status, StatusCode::OK);
    assert_eq!(get(&gw.url("/metrics")).await.status, StatusCode::OK);
    drop(held);

    // Clients that drop their upload body mid-way: their fault, never the
    // server's — the API breaker stays closed and publishing goes on.
    for i in 0..8 {
        let mut s = stalled_upload(&addr, &format!("dropped/{i}.bin"), 8 << 20, 1 << 20).await;
        s.shutdown().await.ok();
        drop(s);
        sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let published = loop {
        let answer = post(&gw, "/events/orders", body.clone(), JSON).await;
        if answer.status == StatusCode::ACCEPTED || Instant::now() > deadline {
            break answer;
        }
        sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        published.status,
        StatusCode::ACCEPTED,
        "{}",
        published.text()
    );
    let m = metrics(&gw).await;
    assert_eq!(
        value(&m, "keel_circuit_breaker_state{breaker=\"http_api\"}"),
        0.0
    );
    assert!(has(&m, "keel_circuit_breaker_state{breaker=\"http_api\"}"));
}

async fn wait_open_uploads(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    want: usize,
    limit: Duration,
) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let open = transfer_support::open_multipart_uploads(client, bucket)
            .await
            .len();
        if open == want || Instant::now() > deadline {
            return open;
        }
        sleep(Duration::from_millis(200)).await;
    }
}

fn moto_gateway(bucket: &str, extra: &[(&str, String)]) -> Gateway {
    let moto = support::moto();
    let mut env = vec![
        ("KAFKA_BROKERS", support::kafka_brokers()),
        ("KAFKA_GROUP_ID", unique("gw-moto-group")),
        ("KEEL_GATEWAY_TOPICS", unique("gw-moto")),
        ("AWS_S3_ENDPOINT", moto.endpoint.clone()),
        ("AWS_S3_BUCKET", bucket.to_string()),
        ("AWS_ACCESS_KEY_ID", moto.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", moto.secret_key.clone()),
    ];
    env.extend(extra.iter().cloned());
    Gateway::start(&env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_upload_is_cut_with_408_and_its_multipart_upload_aborted() {
    let moto = support::moto();
    let check = transfer_support::client(&moto, &moto.endpoint);
    let bucket = transfer_support::fresh_bucket(&check, "gw-stall").await;
    let gw = moto_gateway(
        &bucket,
        &[("KEEL_GATEWAY_BODY_IDLE_TIMEOUT_MS", "2000".to_string())],
    );
    wait_status(
        &gw.url("/health/ready"),
        StatusCode::OK,
        Duration::from_secs(60),
    )
    .await;
    let addr = gw.base.trim_start_matches("http://").to_string();
    let mut s = stalled_upload(&addr, "stall/big.bin", 40 << 20, 12 << 20).await;
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let _ = timeout(Duration::from_secs(30), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "stalled upload answered: {text}"
    );
    assert!(text.contains("urn:keel:problem:request-timeout"), "{text}");
    let open = wait_open_uploads(&check, &bucket, 0, Duration::from_secs(15)).await;
    assert_eq!(open, 0, "the stalled upload's multipart upload is aborted");
    println!(
        "figure: stalled upload (12 MiB sent, idle timeout 2 s) answered 408 after {:.2} s; 0 uploads left",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_a_stalled_upload_exits_cleanly_and_leaves_no_upload() {
    let moto = support::moto();
    let check = transfer_support::client(&moto, &moto.endpoint);
    let bucket = transfer_support::fresh_bucket(&check, "gw-term").await;
    let mut gw = moto_gateway(
        &bucket,
        &[
            ("KEEL_GATEWAY_BODY_IDLE_TIMEOUT_MS", "120000".to_string()),
            ("KEEL_GATEWAY_DRAIN_SECS", "2".to_string()),
        ],
    );
    wait_status(
        &gw.url("/health/ready"),
        StatusCode::OK,
        Duration::from_secs(60),
    )
    .await;
    let addr = gw.base.trim_start_matches("http://").to_string();
    let _stalled = stalled_upload(&addr, "term/big.bin", 40 << 20, 12 << 20).await;
    assert_eq!(
        wait_open_uploads(&check, &bucket, 1, Duration::from_secs(30)).await,
        1,
        "the upload is in flight on moto"
    );
    let t = Instant::now();
    gw.sigterm();
    let status = gw
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("the gateway exits within its shutdown budget");
    let took = t.elapsed();
    assert!(status.success(), "exit {status:?}:\n{}", gw.output());
    let open = wait_open_uploads(&check, &bucket, 0, Duration::from_secs(5)).await;
    assert_eq!(
        open,
        0,
        "no multipart upload left on moto:\n{}",
        gw.output()
    );
    println!(
        "figure: SIGTERM with a stalled upload (drain 2 s): exited 0 after {:.2} s, 0 uploads left",
        took.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_loses_no_accepted_event_on_the_real_broker() {
    let brokers = support::kafka_brokers();
    let s3 = support::s3s_fs();
    let topic = unique("gw-term-load");
    let mut gw = Gateway::start(&[
        ("KAFKA_BROKERS", brokers.clone()),
        ("KAFKA_GROUP_ID", unique("gw-term-load-group")),
        ("KEEL_GATEWAY_TOPICS", topic.clone()),
        ("AWS_S3_ENDPOINT", s3.endpoint.clone()),
        ("AWS_S3_BUCKET", unique("gw-term-load")),
        ("AWS_ACCESS_KEY_ID", s3.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.clone()),
        ("KEEL_GATEWAY_CREATE_BUCKET", "true".to_string()),
        ("KEEL_SHUTDOWN_TIMEOUT_SECS", "15".to_string()),
    ]);
    wait_status(
        &gw.url("/health/ready"),
        StatusCode::OK,
        Duration::from_secs(60),
    )
    .await;
    // 8 clients publish as fast as they can, each event with its own id.
    let url = gw.url(&format!("/events/{topic}"));
    let mut clients = Vec::new();
    for c in 0..8 {
        let url = url.clone();
        clients.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut refused = 0usize;
            for i in 0..100_000 {
                let id = uuid::Uuid::new_v4().to_string();
                let body =
                    json!({ "eventType": "load", "eventId": id, "payload": { "c": c, "i": i } });
                match send(Method::POST, &url, full(body.to_string()), JSON).await {
                    Ok(a) if a.status == StatusCode::ACCEPTED => accepted.push(id),
                    Ok(a) => {
                        assert!(
                            a.status == StatusCode::SERVICE_UNAVAILABLE,
                            "accepted or refused while stopping, not {}: {}",
                            a.status,
                            a.text()
                        );
                        refused += 1;
                    }
                    Err(_) => break, // the listener is closed
                }
            }
            (accepted, refused)
        }));
    }
    sleep(Duration::from_secs(2)).await;
    gw.sigterm();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for c in clients {
        let (a, r) = timeout(Duration::from_secs(40), c)
            .await
            .expect("clients end")
            .expect("client task");
        accepted.extend(a);
        refused += r;
    }
    let status = gw
        .wait_exit(Duration::from_secs(25))
        .await
        .expect("the gateway exits");
    assert!(status.success(), "exit {status:?}:\n{}", gw.output());
    assert!(
        !accepted.is_empty(),
        "some events were accepted before SIGTERM"
    );
    let stored: std::collections::HashSet<String> = kcat_all(&brokers, &topic)
        .into_iter()
        .filter_map(|r| r["eventId"].as_str().map(str::to_string))
        .collect();
    let lost: Vec<&String> = accepted.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} accepted events lost",
        lost.len(),
        accepted.len()
    );
    println!(
        "figure: SIGTERM under load (8 clients, real broker): {} accepted, {} refused with 503, {} stored, 0 accepted lost",
        accepted.len(),
        refused,
        stored.len()
    );
}
