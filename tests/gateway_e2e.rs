//! End-to-end tests of `examples/gateway`: each test builds the example once,
//! starts it as a child process on a free port, and drives it over HTTP — once on
//! its embedded defaults (mock Kafka cluster, in-process S3), once on the real
//! servers (`scripts/up`), plus readiness with a dedicated s3s-fs that the test
//! stops, and a graceful shutdown under load.

mod gateway_support;
mod support;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Method, StatusCode};
use serde_json::json;
use tokio::time::sleep;

use gateway_support::*;

/// The scenario both deployments must pass: publish -> handled (seen in
/// /metrics), 20 MiB upload -> identical through the redirect, delete, ready,
/// Prometheus text, then a clean SIGTERM exit.
async fn scenario(mut gw: Gateway, topic: &str, embedded: bool) {
    let ready = wait_status(
        &gw.url("/health/ready"),
        StatusCode::OK,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        gw.output().contains("Kafka: embedded"),
        embedded,
        "{}",
        gw.output()
    );
    assert_eq!(gw.output().contains("S3:    embedded"), embedded);
    let ready = ready.json();
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["kafka"]["isHealthy"], true, "{ready}");
    // The in-process consumer is registered with the Kafka client.
    assert_eq!(ready["kafka"]["metrics"]["consumerCount"], 1, "{ready}");
    assert_eq!(ready["s3"]["healthy"], true, "{ready}");
    // Same conventions as the Kafka report: camelCase keys, latency in ms.
    assert!(ready["s3"]["latencyMs"].is_u64(), "{ready}");
    assert_eq!(ready["s3"]["shuttingDown"], false, "{ready}");
    assert!(ready["s3"]["inFlight"].is_u64(), "{ready}");
    assert!(ready["s3"].get("latency").is_none(), "{ready}");
    assert_eq!(get(&gw.url("/health/live")).await.status, StatusCode::OK);

    // A published event is handled by the in-process consumer.
    let published = post_json(
        &gw.url(&format!("/events/{topic}")),
        json!({ "eventType": "order.created", "version": "1", "key": "o-1", "payload": { "orderId": "o-1" } }),
    )
    .await;
    assert_eq!(
        published.status,
        StatusCode::ACCEPTED,
        "{}",
        published.text()
    );
    let ack = published.json();
    assert!(ack["offset"].as_i64().is_some(), "{ack}");
    wait_metric(
        &gw,
        "messaging_process_duration_seconds_count{event_type=\"order.created\",outcome=\"success\"}",
        1.0,
        Duration::from_secs(60),
    )
    .await;

    // A batch: both events acknowledged in order.
    let batch = post_json(
        &gw.url(&format!("/events/{topic}/batch")),
        json!([
            { "eventType": "user.created", "payload": { "id": 1 } },
            { "eventType": "user.created", "payload": { "id": 2 } }
        ]),
    )
    .await;
    assert_eq!(batch.status, StatusCode::ACCEPTED, "{}", batch.text());
    assert_eq!(batch.json()["acks"].as_array().map(Vec::len), Some(2));
    wait_metric(
        &gw,
        "messaging_process_duration_seconds_count{event_type=\"user.created\",outcome=\"success\"}",
        2.0,
        Duration::from_secs(60),
    )
    .await;

    // Retries and the dead-letter queue: a flaky event succeeds on its retry, a
    // poison one is retried three times, then published to `<topic>.dlq`.
    for event_type in ["demo.flaky", "demo.poison"] {
        let answer = post_json(
            &gw.url(&format!("/events/{topic}")),
            json!({ "eventType": event_type, "payload": {} }),
        )
        .await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text());
    }
    wait_metric(
        &gw,
        "messaging_process_duration_seconds_count{event_type=\"demo.flaky\",outcome=\"success\"}",
        1.0,
        Duration::from_secs(60),
    )
    .await;
    wait_metric(
        &gw,
        "keel_kafka_consumer_messages_total{outcome=\"dead_lettered\"}",
        1.0,
        Duration::from_secs(60),
    )
    .await;
    let m = metrics(&gw).await;
    assert!(
        value(&m, "keel_kafka_consumer_retries_total") >= 4.0,
        "1 flaky + 3 poison retries"
    );
    assert!(gw.output().contains("message dead-lettered"));

    // 20 MiB up, back through the presigned redirect, byte-identical.
    let data = random_bytes(20 * 1024 * 1024, 7);
    let key = format!("e2e/{}.bin", unique("file"));
    let uploaded = send(
        Method::PUT,
        &gw.url(&format!("/files/{key}")),
        full(data.clone()),
        "application/octet-stream",
    )
    .await
    .expect("upload");
    assert_eq!(uploaded.status, StatusCode::CREATED, "{}", uploaded.text());
    let out = uploaded.json();
    assert_eq!(out["size"], data.len() as u64, "{out}");
    assert!(
        out["parts"].as_u64().is_some_and(|p| p > 1),
        "went multipart: {out}"
    );
    assert!(
        gw.output().contains("upload progress"),
        "progress is logged"
    );

    let redirect = get(&gw.url(&format!("/files/{key}"))).await;
    assert_eq!(redirect.status, StatusCode::TEMPORARY_REDIRECT);
    let location = redirect.headers["location"].to_str().unwrap().to_string();
    let downloaded = get(&location).await;
    assert_eq!(downloaded.status, StatusCode::OK);
    assert!(
        downloaded.body.len() == data.len() && downloaded.body[..] == data[..],
        "identical bytes"
    );

    let deleted = send(
        Method::DELETE,
        &gw.url(&format!("/files/{key}")),
        full(Bytes::new()),
        "text/plain",
    )
    .await
    .expect("delete");
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(
        get(&gw.url(&format!("/files/{key}"))).await.status,
        StatusCode::NOT_FOUND
    );
    // An invalid key is refused before any request.
    assert_eq!(
        send(
            Method::PUT,
            &gw.url("/files/a/../b"),
            full("x"),
            "text/plain"
        )
        .await
        .expect("put")
        .status,
        StatusCode::BAD_REQUEST
    );

    // /metrics: valid Prometheus text with every service and the routes.
    let m = metrics(&gw).await;
    for series in [
        "keel_http_server_duration_seconds_count",
        "http_server_request_duration_seconds_count{http_route=\"/events/{topic}\",outcome=\"success\"}",
        "http_server_request_duration_seconds_count{http_request_method=\"PUT\",outcome=\"success\"}",
        "messaging_client_operation_duration_seconds_count{messaging_operation_name=\"send\",outcome=\"success\"}",
        "messaging_client_sent_messages_total{messaging_operation_name=\"send\",!error_type}",
        "keel_kafka_consumer_messages_total{outcome=\"processed\"}",
        "rpc_client_call_duration_seconds_count{rpc_service=\"S3\"}",
        "keel_s3_operation_duration_seconds_count{operation=\"upload\"}",
        "keel_s3_transferred_bytes_total{direction=\"upload\"}",
    ] {
        assert!(value(&m, series) > 0.0, "{series} missing or 0 in /metrics");
    }
    assert!(
        value(
            &m,
            "messaging_client_sent_messages_total{messaging_operation_name=\"send\",!error_type}"
        ) >= 3.0
    );
    assert!(
        value(&m, "keel_s3_transferred_bytes_total{direction=\"upload\"}") >= data.len() as f64
    );

    gw.sigterm();
    let status = gw
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no exit after SIGTERM:\n{}", gw.output()));
    assert!(status.success(), "exit {status:?}:\n{}", gw.output());
    assert!(gw.output().contains("gateway stopped"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_defaults_end_to_end() {
    let gw = Gateway::start(&[("KEEL_GATEWAY_TOPICS", "orders".to_string())]);
    scenario(gw, "orders", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_servers_end_to_end() {
    let brokers = support::kafka_brokers();
    let s3 = support::s3s_fs();
    let topic = unique("gw-e2e");
    let gw = Gateway::start(&[
        ("KAFKA_BROKERS", brokers),
        ("KAFKA_GROUP_ID", unique("gw-e2e-group")),
        ("KEEL_GATEWAY_TOPICS", topic.clone()),
        ("AWS_S3_ENDPOINT", s3.endpoint.clone()),
        ("AWS_S3_BUCKET", unique("gw-e2e")),
        ("AWS_ACCESS_KEY_ID", s3.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.clone()),
        ("KEEL_GATEWAY_CREATE_BUCKET", "true".to_string()),
    ]);
    scenario(gw, &topic, false).await;
}

/// A dedicated s3s-fs child on a free port, killed when dropped.
struct S3sFs {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl S3sFs {
    fn start(access_key: &str, secret_key: &str) -> S3sFs {
        let cache = std::env::var_os("KEEL_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                    .join(".cache/keel")
            });
        let binary = cache.join("s3s-fs/bin/s3s-fs");
        assert!(
            binary.is_file(),
            "{} not found: {}",
            binary.display(),
            support::START_HINT
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("temp dir");
        let child = Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", access_key, "--secret-key", secret_key])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let addr = format!("127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(std::time::Instant::now() < deadline, "s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        S3sFs {
            child,
            endpoint: format!("http://{addr}"),
            _dir: dir,
        }
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ready_turns_503_when_s3_stops() {
    let brokers = support::kafka_brokers();
    let s3 = S3sFs::start("gwready", "gwreadysecret");
    let gw = Gateway::start(&[
        ("KAFKA_BROKERS", brokers),
        ("KEEL_GATEWAY_TOPICS", unique("gw-ready")),
        ("AWS_S3_ENDPOINT", s3.endpoint.clone()),
        ("AWS_S3_BUCKET", "gw-ready".to_string()),
        ("AWS_ACCESS_KEY_ID", "gwready".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "gwreadysecret".to_string()),
        ("KEEL_GATEWAY_CREATE_BUCKET", "true".to_string()),
    ]);
    let ready = wait_status(
        &gw.url("/health/ready"),
        StatusCode::OK,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(ready.json()["s3"]["healthy"], true);

    drop(s3);
    let not_ready = wait_status(
        &gw.url("/health/ready"),
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(30),
    )
    .await;
    let body = not_ready.json();
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(body["s3"]["healthy"], false, "{body}");
    assert!(body["s3"]["lastError"].is_string(), "{body}");
    assert_eq!(body["kafka"]["isHealthy"], true, "{body}");
    // Liveness does not depend on the dependencies.
    assert_eq!(get(&gw.url("/health/live")).await.status, StatusCode::OK);

    // Uploads now fail with 5xx; after five in a row the breaker in front of the
    // API opens and answers 503 at once, while health and metrics still answer.
    let mut refused_by_breaker = None;
    for i in 0..20 {
        let answer = send(
            Method::PUT,
            &gw.url(&format!("/files/down/{i}.txt")),
            full("hello"),
            "text/plain",
        )
        .await
        .expect("the gateway answers");
        assert!(
            answer.status.is_server_error(),
            "{}: {}",
            answer.status,
            answer.text()
        );
        if answer.text().contains("the API is failing") {
            refused_by_breaker = Some((i, answer));
            break;
        }
    }
    let (attempt, refused) = refused_by_breaker.expect("the API breaker opened");
    assert!(attempt >= 5, "opened after five failures, not {attempt}");
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers.contains_key("retry-after"));
    let m = metrics(&gw).await;
    assert_eq!(
        value(&m, "keel_circuit_breaker_state{breaker=\"http_api\"}"),
        1.0
    );
    // Error types name the status (bad_gateway, service_unavailable, ...): count them all.
    let upload_failures: f64 = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with("http_server_request_failures_total{")
                && k.contains("http_request_method=\"PUT\"")
        })
        .map(|(_, v)| *v)
        .sum();
    assert!(upload_failures >= 5.0, "{m:?}");
    assert_eq!(
        get(&gw.url("/health/ready")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

/// An upload whose body trickles in, so it is in flight when SIGTERM arrives.
fn slow_body(data: Vec<u8>, chunk: usize, pause: Duration) -> Body {
    let chunks: Vec<Bytes> = data.chunks(chunk).map(Bytes::copy_from_slice).collect();
    let stream = futures::stream::unfold(chunks.into_iter(), move |mut it| async move {
        let next = it.next()?;
        sleep(pause).await;
        Some((Ok::<_, BoxError>(Frame::data(next)), it))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_under_load() {
    let shutdown_timeout = 15;
    let mut gw = Gateway::start(&[
        ("KEEL_GATEWAY_TOPICS", "orders".to_string()),
        ("KEEL_SHUTDOWN_TIMEOUT_SECS", shutdown_timeout.to_string()),
    ]);
    wait_status(
        &gw.url("/health/ready"),
        StatusCode::OK,
        Duration::from_secs(60),
    )
    .await;

    // Uploads of 8 MiB arriving over about 2 s each, and a stream of publishes.
    let mut tasks = Vec::new();
    for i in 0..3 {
        let url = gw.url(&format!("/files/shutdown/{i}.bin"));
        tasks.push(tokio::spawn(async move {
            let body = slow_body(
                random_bytes(8 * 1024 * 1024, i + 1),
                128 * 1024,
                Duration::from_millis(30),
            );
            (
                "upload",
                send(Method::PUT, &url, body, "application/octet-stream")
                    .await
                    .map(|a| a.status),
            )
        }));
    }
    let publish_url = gw.url("/events/orders");
    let publisher = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        for i in 0..200 {
            let body = json!({ "eventType": "order.created", "payload": { "i": i } });
            let outcome = send(
                Method::POST,
                &publish_url,
                full(body.to_string()),
                "application/json",
            )
            .await
            .map(|a| a.status);
            let refused = outcome.is_err();
            outcomes.push(outcome);
            if refused {
                break; // the listener is closed: later requests cannot be accepted
            }
            sleep(Duration::from_millis(10)).await;
        }
        outcomes
    });

    // Once the three uploads are being handled, ask the gateway to stop.
    wait_metric(
        &gw,
        "http_server_request_in_flight{http_request_method=\"PUT\"}",
        3.0,
        Duration::from_secs(30),
    )
    .await;
    gw.sigterm();

    let mut upload_statuses = Vec::new();
    for task in tasks {
        let (what, outcome) =
            tokio::time::timeout(Duration::from_secs(shutdown_timeout + 10), task)
                .await
                .expect("every request ends")
                .expect("task");
        match outcome {
            Ok(status) => {
                assert!(
                    status == StatusCode::CREATED || status.is_server_error(),
                    "{what}: unexpected {status}"
                );
                upload_statuses.push(status);
            }
            Err(e) => panic!("{what}: an upload in flight at SIGTERM lost its connection: {e}"),
        }
    }
    let publishes = tokio::time::timeout(Duration::from_secs(shutdown_timeout + 10), publisher)
        .await
        .expect("the publisher ends")
        .expect("task");
    let answered: Vec<StatusCode> = publishes
        .iter()
        .filter_map(|o| o.as_ref().ok().copied())
        .collect();
    let statuses: HashSet<u16> = answered.iter().map(|s| s.as_u16()).collect();
    assert!(
        statuses.iter().all(|s| *s == 202 || *s == 503),
        "publishes are accepted or refused with 503: {statuses:?}"
    );
    assert!(answered.contains(&StatusCode::ACCEPTED));

    let status = gw
        .wait_exit(Duration::from_secs(shutdown_timeout + 5))
        .await
        .unwrap_or_else(|| panic!("still running after its shutdown timeout:\n{}", gw.output()));
    // The uploads in flight at SIGTERM were allowed to finish.
    assert!(
        upload_statuses.iter().all(|s| *s == StatusCode::CREATED),
        "uploads in flight completed: {upload_statuses:?}\n{}",
        gw.output()
    );
    assert!(status.success(), "clean exit: {status:?}\n{}", gw.output());
    let out = gw.output();
    for step in [
        "shutting down",
        "HTTP server drained",
        "consumer drained and committed",
        "producer flushed",
        "gateway stopped",
    ] {
        assert!(out.contains(step), "{step:?} missing from the log:\n{out}");
    }
}
