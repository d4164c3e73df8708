//! The gateway's black-box test harness: builds `examples/gateway` once, starts it
//! as a child process on a free port, and talks HTTP to it. Shared by
//! `tests/gateway_*.rs`.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::time::{Instant, sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// The gateway binary, built once per test process with `cargo build`.
pub fn gateway_binary() -> PathBuf {
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
            cmd.args([
                "build",
                "--example",
                "gateway",
                "--message-format=json-render-diagnostics",
            ]);
            // The gateway of a test built with `otel` has its OTel set-up too.
            if cfg!(feature = "otel") {
                cmd.args(["--features", "otel"]);
            }
            let out = cmd
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
pub struct Gateway {
    pub child: Child,
    pub base: String,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    /// Starts the gateway with `env` on `127.0.0.1:0` and waits for its address.
    /// The variables that select real servers are removed unless `env` sets them.
    pub fn start(env: &[(&str, String)]) -> Gateway {
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

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits (polling) for the process to exit, at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
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

pub fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(
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

/// Sends with extra headers (`content-type` among them when wanted).
pub async fn send_with(
    method: Method,
    url: &str,
    body: Body,
    headers: &[(&str, &str)],
) -> Result<Answer, BoxError> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client().request(req.body(body)?).await?;
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

pub async fn get(url: &str) -> Answer {
    send(Method::GET, url, full(Bytes::new()), "text/plain")
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

pub async fn post_json(url: &str, body: Value) -> Answer {
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
pub async fn wait_status(url: &str, want: StatusCode, limit: Duration) -> Answer {
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
pub fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    pub fn valid_name(name: &str) -> bool {
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
                line.starts_with("# HELP ") || line.starts_with("# UNIT ") || line == "# EOF",
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
            || ["_sum", "_count", "_bucket", "_total"]
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

pub async fn metrics(gw: &Gateway) -> HashMap<String, f64> {
    let answer = get(&gw.url("/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let content_type = answer.headers["content-type"].to_str().unwrap().to_string();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    parse_prometheus(&answer.text())
}

/// The sum of the samples that `query` selects: `name` alone, or
/// `name{k="v",…}`, whose labels must all be on a sample (it may have more;
/// `!k` in the braces: label `k` must be absent). 0 when none matches.
pub fn value(m: &HashMap<String, f64>, query: &str) -> f64 {
    matching(m, query).sum()
}

/// Whether any sample matches `query` (see [`value`]).
pub fn has(m: &HashMap<String, f64>, query: &str) -> bool {
    matching(m, query).next().is_some()
}

fn matching<'a>(m: &'a HashMap<String, f64>, query: &'a str) -> impl Iterator<Item = f64> + 'a {
    let (name, wanted) = match query.split_once('{') {
        Some((name, rest)) => (name, rest.trim_end_matches('}')),
        None => (query, ""),
    };
    let wanted: Vec<&str> = wanted.split("\",").filter(|l| !l.is_empty()).collect();
    m.iter().filter_map(move |(series, v)| {
        let (n, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series.as_str(), ""),
        };
        let have: Vec<&str> = labels.split("\",").collect();
        let all = wanted.iter().all(|w| {
            let w = w.trim_end_matches('"');
            match w.strip_prefix('!') {
                Some(absent) => !have.iter().any(|h| h.starts_with(&format!("{absent}="))),
                None => have.iter().any(|h| h.trim_end_matches('"') == w),
            }
        });
        (n == name && all).then_some(*v)
    })
}

/// Polls `/metrics` until `series` reaches `at_least`.
pub async fn wait_metric(gw: &Gateway, series: &str, at_least: f64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let m = metrics(gw).await;
        if value(&m, series) >= at_least {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{series} did not reach {at_least}: {:?}\ngateway output:\n{}",
                value(&m, series),
                gw.output()
            );
        }
        sleep(Duration::from_millis(200)).await;
    }
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
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

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}
