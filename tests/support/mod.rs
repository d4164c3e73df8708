//! Where the real test servers are, and a clear failure when they are not there.
//!
//! `scripts/up` starts Apache Kafka (KRaft), s3s-fs and moto and exports nothing by
//! itself; `scripts/test` runs `up`, then the workspace tests with the variables
//! below set, then `down`. Every variable has the default that `scripts/up` uses, so
//! `scripts/up && cargo test` works too. A test that needs a server which does not
//! answer panics with the command that starts it — it never passes by skipping.
#![allow(dead_code)]

use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// The command that starts every test server.
pub const START_HINT: &str = "start the test servers with `scripts/up` (or run the whole suite with `scripts/test`); logs are in `$KEEL_RUN_DIR/logs` (default ~/.cache/keel/run/logs)";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// Panics with [`START_HINT`] unless `addr` (host:port) accepts a TCP connection.
pub fn require_reachable(what: &str, addr: &str) {
    let reachable = addr
        .to_socket_addrs()
        .ok()
        .into_iter()
        .flatten()
        .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    assert!(reachable, "{what} is not reachable at {addr}: {START_HINT}");
}

/// Bootstrap servers of the single-node Kafka broker (`KEEL_KAFKA_BROKERS`,
/// default `127.0.0.1:9092`), checked to be reachable.
pub fn kafka_brokers() -> String {
    let brokers = env_or("KEEL_KAFKA_BROKERS", "127.0.0.1:9092");
    let first = brokers.split(',').next().unwrap_or_default().to_string();
    require_reachable("Apache Kafka", &first);
    brokers
}

/// Bootstrap servers of the three-node Kafka cluster that `scripts/up --cluster`
/// starts (`KEEL_KAFKA_CLUSTER_BROKERS`, default
/// `127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094`), each checked to be reachable.
/// Not started by default: tests that need it fail with the command that starts it.
pub fn kafka_cluster_brokers() -> String {
    let brokers = env_or(
        "KEEL_KAFKA_CLUSTER_BROKERS",
        "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094",
    );
    for broker in brokers.split(',') {
        require_reachable(
            "the three-node Kafka cluster (start it with `scripts/up --cluster`)",
            broker,
        );
    }
    brokers
}

/// One S3-compatible test server.
#[derive(Clone, Debug)]
pub struct S3Server {
    /// "s3s-fs" or "moto".
    pub name: &'static str,
    /// `http://host:port`.
    pub endpoint: String,
    /// Access key id the server accepts.
    pub access_key: String,
    /// Secret key the server accepts.
    pub secret_key: String,
    /// Region to sign for.
    pub region: String,
    /// Whether the server checks SigV4 signatures and presigned-URL expiry.
    pub verifies_signatures: bool,
}

impl S3Server {
    fn require(self) -> Self {
        let addr = self
            .endpoint
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        require_reachable(self.name, &addr);
        self
    }
}

/// s3s-fs: verifies signatures and presigned-URL expiry (`KEEL_S3FS_ENDPOINT`,
/// default `http://127.0.0.1:8014`).
pub fn s3s_fs() -> S3Server {
    S3Server {
        name: "s3s-fs",
        endpoint: env_or("KEEL_S3FS_ENDPOINT", "http://127.0.0.1:8014"),
        access_key: env_or("KEEL_S3FS_ACCESS_KEY", "keeltest"),
        secret_key: env_or("KEEL_S3FS_SECRET_KEY", "keeltestsecret"),
        region: "us-east-1".to_string(),
        verifies_signatures: true,
    }
    .require()
}

/// moto server: broad S3 semantics, ListMultipartUploads included
/// (`KEEL_MOTO_ENDPOINT`, default `http://127.0.0.1:5055`).
pub fn moto() -> S3Server {
    S3Server {
        name: "moto",
        endpoint: env_or("KEEL_MOTO_ENDPOINT", "http://127.0.0.1:5055"),
        access_key: "testing".to_string(),
        secret_key: "testing".to_string(),
        region: "us-east-1".to_string(),
        verifies_signatures: false,
    }
    .require()
}

/// Both S3 servers; end-to-end S3 tests run against each.
pub fn s3_servers() -> Vec<S3Server> {
    vec![s3s_fs(), moto()]
}

fn cache_dir() -> PathBuf {
    std::env::var_os("KEEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/keel")
        })
}

/// The kcat binary (`KEEL_KCAT`, default `kcat` on PATH), checked to run.
pub fn kcat() -> PathBuf {
    let kcat = PathBuf::from(env_or("KEEL_KCAT", "kcat"));
    let ok = std::process::Command::new(&kcat)
        .arg("-V")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "kcat ({}) does not run: {START_HINT}", kcat.display());
    kcat
}

/// Directory holding Apache Kafka's jars, tools included (`KEEL_KAFKA_LIBS`,
/// default `$KEEL_CACHE/kafka/libs`); use as `java -cp '<dir>/*' ...`.
pub fn kafka_libs() -> PathBuf {
    let dir = std::env::var_os("KEEL_KAFKA_LIBS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("kafka/libs"));
    assert!(
        dir.is_dir(),
        "Kafka jars not found in {}: {START_HINT}",
        dir.display()
    );
    dir
}

/// `127.0.0.1:<port>` where nothing listens (a port the OS just handed out and
/// that was released again), for tests of what happens when a server is down.
pub fn closed_local_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    let port = listener.local_addr().expect("local address").port();
    drop(listener);
    format!("127.0.0.1:{port}")
}

/// Runs one test of the current test binary in a child process with extra
/// environment variables (e.g. a server address where nothing listens) and returns
/// its output; the child's exit status tells whether that test passed.
pub fn run_this_test_binary(test: &str, env: &[(&str, String)]) -> std::process::Output {
    let exe = std::env::current_exe().expect("path of the running test binary");
    let mut command = std::process::Command::new(exe);
    command.args(["--exact", test, "--test-threads", "1"]);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run the test binary again")
}

/// `scripts/` of the work tree: the fault tests kill and restart brokers with
/// `scripts/kafka-kill` and `scripts/kafka-start`, which find the servers through
/// `KEEL_RUN_DIR` (exported by `scripts/env`, so CI's servers and a private set on
/// other ports both work).
pub fn scripts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

/// Runs `scripts/<script> <args>`; panics with its output when it fails.
pub fn run_script(script: &str, args: &[&str]) -> std::process::Output {
    let path = scripts_dir().join(script);
    let out = std::process::Command::new(&path)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{} does not run: {e}", path.display()));
    assert!(
        out.status.success(),
        "scripts/{script} {} failed ({}):\n{}{}\n{START_HINT}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `scripts/` name of the three-node cluster's broker with node id `id`
/// (`scripts/up` gives node N the name `kafka-cluster-N`).
pub fn cluster_node_name(id: i32) -> String {
    format!("kafka-cluster-{id}")
}

/// A Kafka node killed with `SIGKILL` (`scripts/kafka-kill`). It is started again
/// on its own data by [`restart`](Self::restart) — or, whatever happens to the
/// test (a failed assertion included), when the guard is dropped — so that the
/// tests that run after this one find it answering.
#[derive(Debug)]
pub struct KilledKafkaNode {
    name: String,
    down: bool,
}

impl KilledKafkaNode {
    /// Kills node `name` (`kafka`, `kafka-cluster-1`..`3`); returns once the process
    /// is gone.
    pub fn kill(name: &str) -> Self {
        run_script("kafka-kill", &[name]);
        KilledKafkaNode {
            name: name.to_string(),
            down: true,
        }
    }

    /// The node's `scripts/` name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts the node again on its data and waits until it answers (its cluster
    /// lists every broker, the check topic's replicas are in sync); returns how long
    /// that took.
    pub fn restart(&mut self) -> Duration {
        let started = std::time::Instant::now();
        run_script("kafka-start", &[self.name.as_str()]);
        self.down = false;
        started.elapsed()
    }
}

impl Drop for KilledKafkaNode {
    fn drop(&mut self) {
        if !self.down {
            return;
        }
        // Never panic in drop (it may run while a failed assertion unwinds).
        let path = scripts_dir().join("kafka-start");
        match std::process::Command::new(&path)
            .arg(&self.name)
            .stdin(std::process::Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "could not start {} again ({}): {}{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("could not run {}: {e}", path.display()),
        }
    }
}

/// One test at a time in a test binary that kills brokers or processes: tests of a
/// binary run in parallel, and a broker killed by one would fail another. An
/// async lock (each `#[tokio::test]` has its own runtime; a tokio mutex works
/// across them and is not poisoned by a failed test).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The path of example `name` of this package, for tests that run it as a child
/// process. `cargo test --all-targets` (scripts/test, CI) builds examples after
/// the library, so the binary is used as it is when it is newer than the newest
/// build of the library; otherwise (e.g. `cargo test --test NAME` after a change)
/// it is built first with `cargo build --example NAME`, with the cargo that runs
/// the tests, into this test binary's target directory and profile. Not always
/// calling cargo matters: a build with other workspace members selected unifies
/// other dependency features, and building the example the other way would
/// rebuild dependencies.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the running test binary");
    // <target>/<profile>/deps/<test binary>
    let deps = exe
        .parent()
        .expect("test binary in <target>/<profile>/deps");
    let profile_dir = deps
        .parent()
        .expect("test binary in <target>/<profile>/deps");
    let target_dir = profile_dir.parent().expect("target directory");
    let binary = profile_dir.join("examples").join(name);
    let modified = |p: &std::path::Path| p.metadata().and_then(|m| m.modified()).ok();
    let newest_library = std::fs::read_dir(deps)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("libkeel-") && n.ends_with(".rlib")
        })
        .filter_map(|e| modified(&e.path()))
        .max();
    if let (Some(built), Some(library)) = (modified(&binary), newest_library)
        && built >= library
    {
        return binary;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "--example", name, "--target-dir"])
        .arg(target_dir);
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        command.arg("--release");
    }
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("cargo build --example {name} does not run: {e}"));
    assert!(status.success(), "cargo build --example {name} failed");
    assert!(binary.is_file(), "{} was not built", binary.display());
    binary
}
