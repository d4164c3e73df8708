//! End-to-end tests of `examples/gateway`: each test builds the example once,
//! starts it as a child process on a free port, and drives it over HTTP — once on
//! its embedded defaults (mock Kafka cluster, in-process S3), once on the real
//! servers (`scripts/up`), plus readiness with a dedicated s3s-fs that the test
//! stops, and a graceful shutdown under load.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// The gateway binary, built once per test process with `cargo build`.
fn gateway_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            // `cargo test` runs this test with its own variables set (package
            // metadata, the library path of target/); left in place, build scripts
            // that watch them rebuild half the dependency tree.
            for (name, _) in std::env::vars_os() {
                let name = name.to_string_lossy();
                let cargo_config = ["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&name.as_ref())
                    || [
                        "CARGO_BUILD_",
                        "CARGO_PROFILE_",
                        "CARGO_NET_",
                        "CARGO_REGISTR",
                        "CARGO_TERM_",
                        "CARGO_HTTP_",
                    ]
                    .iter()
                    .any(|p| name.starts_with(p));
                if name.starts_with("CARGO_") && !cargo_config {
                    cmd.env_remove(name.as_ref());
                }
            }
            if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
                let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
                let kept: Vec<PathBuf> = std::env::split_paths(&paths)
                    .filter(|p| !p.starts_with(&target))
                    .collect();
                match std::env::join_paths(kept) {
                    Ok(joined) if !joined.is_empty() => cmd.env("LD_LIBRARY_PATH", joined),
                    _ => cmd.env_remove("LD_LIBRARY_PATH"),
                };
            }
            let out = cmd
                .args([
                    "build",
                    "--example",
                    "gateway",
                    "--message-format=json-render-diagnostics",
                ])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .stderr(Stdio::inherit())
                .output()
                .expect("run cargo build --example gateway");
            assert!(out.status.success(), "cargo build --example gateway failed");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "gateway")
                .find_map(|m| m["executable"].as_str().map(PathBuf::from))
                .expect("cargo reported the gateway executable")
        })
        .clone()
}

/// A running gateway child process; killed when dropped.
struct Gateway {
    child: Child,
    base: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    /// Starts the gateway with `env` on `127.0.0.1:0` and waits for its address.
    /// The variables that select real servers are removed unless `env` sets them.
    fn start(env: &[(&str, String)]) -> Gateway {
        let mut cmd = Command::new(gateway_binary());
        for var in [
            "KAFKA_BROKERS",
            "AWS_S3_ENDPOINT",
            "AWS_S3_BUCKET",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "KEEL_ENV",
            "APP_ENV",
            "KEEL_EMBEDDED",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("KEEL_GATEWAY_ADDR", "127.0.0.1:0")
            .env("KEEL_GATEWAY_RETRY_INITIAL_MS", "50")
            .env("RUST_LOG", "info")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the gateway");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(rest) = line.strip_prefix("keel gateway listening on ") {
                        let _ = addr_tx.send(rest.trim().to_string());
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let base = match addr_rx.recv_timeout(Duration::from_secs(120)) {
            Ok(base) => base,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the gateway printed no address; its output:\n{}",
                    lines.lock().unwrap().join("\n")
                );
            }
        };
        Gateway { child, base, lines }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits (polling) for the process to exit, at most `limit`.
    async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

struct Answer {
    status: StatusCode,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send(
    method: Method,
    url: &str,
    body: Body,
    content_type: &str,
) -> Result<Answer, BoxError> {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", content_type)
        .body(body)?;
    let res = client().request(req).await?;
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

async fn get(url: &str) -> Answer {
    send(Method::GET, url, full(Bytes::new()), "text/plain")
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

async fn post_json(url: &str, body: Value) -> Answer {
    send(
        Method::POST,
        url,
        full(body.to_string()),
        "application/json",
    )
    .await
    .unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

/// Polls `GET url` until it answers `want`, for at most `limit`.
async fn wait_status(url: &str, want: StatusCode, limit: Duration) -> Answer {
    let deadline = Instant::now() + limit;
    loop {
        let answer = send(Method::GET, url, full(Bytes::new()), "text/plain").await;
        if let Ok(a) = answer {
            if a.status == want {
                return a;
            }
            if Instant::now() > deadline {
                panic!("{url} answered {} ({}), not {want}", a.status, a.text());
            }
        } else if Instant::now() > deadline {
            panic!("{url} did not answer: {:?}", answer.err());
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// A checked parse of the Prometheus text format (0.0.4): every sample belongs to
/// a family declared once with `# TYPE`, names are valid, values are numbers.
/// Returns the samples by their full series name (`name{labels}`).
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    fn valid_name(name: &str) -> bool {
        let mut chars = name.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().expect("TYPE has a name");
            let kind = parts.next().expect("TYPE has a kind");
            assert!(valid_name(name), "line {n}: bad metric name {name:?}");
            assert!(
                ["counter", "gauge", "summary", "histogram", "untyped"].contains(&kind),
                "line {n}: bad type {kind:?}"
            );
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "line {n}: family {name} declared twice"
            );
            continue;
        }
        if line.starts_with('#') {
            assert!(
                line.starts_with("# HELP "),
                "line {n}: unknown comment {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("line {n}: no value: {line:?}"));
        let name = series.split('{').next().unwrap_or_default();
        assert!(valid_name(name), "line {n}: bad metric name {name:?}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(
                labels.starts_with('{') && labels.ends_with('}'),
                "line {n}: bad labels {labels:?}"
            );
        }
        let family_declared = types.contains_key(name)
            || ["_sum", "_count", "_bucket"]
                .iter()
                .any(|s| name.strip_suffix(s).is_some_and(|f| types.contains_key(f)));
        assert!(
            family_declared,
            "line {n}: sample of undeclared family {name}"
        );
        let value: f64 = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("line {n}: bad value {v:?}")),
        };
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "line {n}: series {series} twice"
        );
    }
    samples
}

async fn metrics(gw: &Gateway) -> HashMap<String, f64> {
    let answer = get(&gw.url("/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let content_type = answer.headers["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    parse_prometheus(&answer.text())
}

/// Polls `/metrics` until `series` reaches `at_least`.
async fn wait_metric(gw: &Gateway, series: &str, at_least: f64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let m = metrics(gw).await;
        if m.get(series).copied().unwrap_or(0.0) >= at_least {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{series} did not reach {at_least}: {:?}\ngateway output:\n{}",
                m.get(series),
                gw.output()
            );
        }
        sleep(Duration::from_millis(200)).await;
    }
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            // xorshift64: cheap, reproducible, incompressible enough
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

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
        "handler_order_created_successes_total",
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
        "handler_user_created_successes_total",
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
        "handler_demo_flaky_successes_total",
        1.0,
        Duration::from_secs(60),
    )
    .await;
    wait_metric(
        &gw,
        "kafka_consumer_dead_lettered_total",
        1.0,
        Duration::from_secs(60),
    )
    .await;
    let m = metrics(&gw).await;
    assert!(
        m["kafka_consumer_retries_total"] >= 4.0,
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
        "http_calls_total",
        "http_route_publish_successes_total",
        "http_route_upload_successes_total",
        "kafka_publish_call_successes_total",
        "kafka_publish_published_total",
        "kafka_consumer_processed_total",
        "s3_call_calls_total",
        "s3_uploads_total",
        "s3_uploaded_bytes_total",
    ] {
        assert!(m.contains_key(series), "{series} missing from /metrics");
    }
    assert!(m["kafka_publish_published_total"] >= 3.0);
    assert!(m["s3_uploaded_bytes_total"] >= data.len() as f64);

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
        if answer.text().contains("circuit breaker is open") {
            refused_by_breaker = Some((i, answer));
            break;
        }
    }
    let (attempt, refused) = refused_by_breaker.expect("the API breaker opened");
    assert!(attempt >= 5, "opened after five failures, not {attempt}");
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers.contains_key("retry-after"));
    let m = metrics(&gw).await;
    assert_eq!(m["circuit_breaker_state{breaker=\"http_api\"}"], 1.0);
    assert!(m["http_route_upload_failures_total{class=\"5xx\"}"] >= 5.0);
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
        "http_route_upload_in_flight",
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
