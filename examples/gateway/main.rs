//! keel's gateway: an axum service wiring keel's Kafka and S3 services together.
//!
//! ```text
//! cargo run --example gateway
//! ```
//!
//! With no configuration it runs on embedded defaults: an in-process Kafka
//! (librdkafka's mock cluster) and an in-process S3 server (s3s-fs on a temporary
//! folder, SigV4 checked). With `KAFKA_BROKERS` and `AWS_S3_ENDPOINT` (plus
//! `AWS_S3_BUCKET` and credentials) set, it uses those servers unchanged.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `KEEL_GATEWAY_ADDR` | `127.0.0.1:8080` | listen address (port 0: any free port) |
//! | `KEEL_GATEWAY_TOPICS` | `orders,users` | topics the in-process consumer handles |
//! | `KEEL_GATEWAY_PUBLISH_TOPICS` | `KEEL_GATEWAY_TOPICS` | the only topics `POST /events/{topic}` publishes to (never a `.dlq`) |
//! | `KEEL_GATEWAY_MAX_EVENT_BYTES` | `1000000` | largest event, encoded (Kafka's default `message.max.bytes` is 1048588) |
//! | `KEEL_GATEWAY_MAX_BATCH_EVENTS` | `1000` | most events in one batch |
//! | `KEEL_GATEWAY_MAX_BATCH_BYTES` | `16777216` | largest batch request body |
//! | `KEEL_GATEWAY_TOKEN` | unset | when set, every route but `/health/*` needs `Authorization: Bearer <token>` |
//! | `KEEL_GATEWAY_READ_ONLY` | `false` | refuse publish, upload and delete (403) |
//! | `KEEL_GATEWAY_HEADER_TIMEOUT_MS` | `10000` | a connection must send a request's headers within this |
//! | `KEEL_GATEWAY_BODY_IDLE_TIMEOUT_MS` | `15000` | a request body that sends nothing this long fails (408) |
//! | `KEEL_GATEWAY_REQUEST_TIMEOUT_MS` | `30000` | whole-request bound of every route but uploads (which get the idle bound): 408 while the body arrives, 504 after |
//! | `KEEL_GATEWAY_MAX_IN_FLIGHT` | `512` | API requests at once; more are shed (503 + `Retry-After`) |
//! | `KEEL_GATEWAY_MAX_UPLOADS` | `16` | uploads at once (each buffers a few parts); more get 503 |
//! | `KEEL_GATEWAY_DRAIN_SECS` | half of `KEEL_SHUTDOWN_TIMEOUT_SECS` | on SIGTERM, time for requests in flight; then connections are closed |
//! | `KEEL_GATEWAY_MAX_RETRIES` | `3` | handler retries before the DLQ |
//! | `KEEL_GATEWAY_RETRY_INITIAL_MS` | `1000` | first retry delay (doubles, capped at 30 s) |
//! | `KEEL_GATEWAY_PUBLISH_TIMEOUT_MS` | delivery timeout + 5 s | timeout layer around one publish |
//! | `KEEL_GATEWAY_PRESIGN_SECS` | `900` | lifetime of the presigned GET URLs |
//! | `KEEL_GATEWAY_CREATE_BUCKET` | `false` | create `AWS_S3_BUCKET` at start if it is missing |
//! | `KEEL_GATEWAY_METRICS_KEEL_NAMES` | `false` | `/metrics` also renders keel's pre-0.2 family names (`kafka_consumer_processed_total`, …) |
//! | `KEEL_SHUTDOWN_TIMEOUT_SECS` | `20` | budget for the whole graceful shutdown |
//! | `KEEL_EMBEDDED` | `auto` | `off`: never start the embedded servers |
//! | `RUST_LOG` | `info` | log filter (JSON lines on stdout) |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | unset | with `--features otel`: export traces by OTLP/HTTP to `<endpoint>/v1/traces` (see `otel.rs`) |
//! | `OTEL_SERVICE_NAME` | `keel-gateway` | with `--features otel`: the traces' `service.name` |
//!
//! plus keel's own `KAFKA_*` and `AWS_*` variables.

mod body;
mod breaker;
mod consume;
mod embedded;
mod http;
mod idempotency;
#[cfg(feature = "otel")]
mod otel;
mod problem;
mod serve;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel::kafka::client::KafkaClient;
use keel::kafka::config::{KafkaConfig, KafkaConfigBuilder, KafkaLogLevel};
use keel::kafka::topic::TopicName;
use keel::layers::logging::json_layer;
use keel::layers::metrics::{MetricsLayer, MetricsRegistry};
use keel::s3::facade::DefaultLayers;
use keel::s3::{S3, S3Client, S3Config};
use tokio::sync::{RwLock, watch};
use tokio::time::Instant;
use tower::BoxError;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::embedded::{EmbeddedKafka, EmbeddedS3};

struct Settings {
    addr: SocketAddr,
    topics: Vec<String>,
    max_retries: u32,
    retry_initial: Duration,
    publish_timeout: Option<Duration>,
    presign_expiry: Duration,
    create_bucket: bool,
    shutdown_timeout: Duration,
    embedded: bool,
    publish_topics: Vec<String>,
    limits: http::ApiLimits,
    token: Option<String>,
    read_only: bool,
    keel_metric_names: bool,
    transport: serve::Transport,
    drain_timeout: Duration,
}

/// A metrics layer for a route or a handler. With `otel`, each histogram bucket
/// also keeps the trace of the latest call that landed in it (an OpenMetrics
/// exemplar on `/metrics`), when that call's trace is sampled.
pub(crate) fn metrics_layer() -> MetricsLayer {
    #[cfg(feature = "otel")]
    let layer = MetricsLayer::builder()
        .exemplars(keel::kafka::otel::exemplar_source())
        .build();
    #[cfg(not(feature = "otel"))]
    let layer = MetricsLayer::new();
    layer
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parsed<T: std::str::FromStr>(name: &str, default: T) -> Result<T, BoxError>
where
    T::Err: std::fmt::Display,
{
    match var(name) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|e| format!("{name}={v:?} is not valid: {e}").into()),
    }
}

impl Settings {
    fn from_env() -> Result<Self, BoxError> {
        let topics: Vec<String> = var("KEEL_GATEWAY_TOPICS")
            .unwrap_or_else(|| "orders,users".to_string())
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        if topics.is_empty() {
            return Err("KEEL_GATEWAY_TOPICS names no topic".into());
        }
        for topic in &topics {
            TopicName::new(topic.as_str())
                .map_err(|e| format!("KEEL_GATEWAY_TOPICS: {topic:?}: {e}"))?;
        }
        let publish_topics: Vec<String> = match var("KEEL_GATEWAY_PUBLISH_TOPICS") {
            None => topics.clone(),
            Some(list) => list
                .split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect(),
        };
        for topic in &publish_topics {
            let name = TopicName::new(topic.as_str())
                .map_err(|e| format!("KEEL_GATEWAY_PUBLISH_TOPICS: {topic:?}: {e}"))?;
            if name.is_dead_letter() {
                return Err(format!(
                    "KEEL_GATEWAY_PUBLISH_TOPICS: {topic:?} is a dead-letter topic; the gateway never publishes to one"
                )
                .into());
            }
        }
        let shutdown_timeout = Duration::from_secs(parsed("KEEL_SHUTDOWN_TIMEOUT_SECS", 20)?);
        let ms = |name: &str, default: u64| parsed(name, default).map(Duration::from_millis);
        let transport = serve::Transport {
            header_timeout: ms("KEEL_GATEWAY_HEADER_TIMEOUT_MS", 10_000)?,
            body_idle_timeout: ms("KEEL_GATEWAY_BODY_IDLE_TIMEOUT_MS", 15_000)?,
            request_timeout: ms("KEEL_GATEWAY_REQUEST_TIMEOUT_MS", 30_000)?,
            max_in_flight: parsed("KEEL_GATEWAY_MAX_IN_FLIGHT", 512)?,
            max_uploads: parsed("KEEL_GATEWAY_MAX_UPLOADS", 16)?,
        };
        if transport.max_in_flight == 0 {
            return Err("KEEL_GATEWAY_MAX_IN_FLIGHT must be at least 1".into());
        }
        Ok(Settings {
            publish_topics,
            limits: http::ApiLimits {
                max_event_bytes: parsed("KEEL_GATEWAY_MAX_EVENT_BYTES", 1_000_000)?,
                max_batch_events: parsed("KEEL_GATEWAY_MAX_BATCH_EVENTS", 1000)?,
                max_batch_body_bytes: parsed("KEEL_GATEWAY_MAX_BATCH_BYTES", 16 * 1024 * 1024)?,
                max_in_flight: transport.max_in_flight,
            },
            token: var("KEEL_GATEWAY_TOKEN"),
            read_only: parsed("KEEL_GATEWAY_READ_ONLY", false)?,
            keel_metric_names: parsed("KEEL_GATEWAY_METRICS_KEEL_NAMES", false)?,
            transport,
            drain_timeout: match var("KEEL_GATEWAY_DRAIN_SECS") {
                Some(_) => Duration::from_secs(parsed("KEEL_GATEWAY_DRAIN_SECS", 10)?),
                None => shutdown_timeout / 2,
            },
            addr: parsed(
                "KEEL_GATEWAY_ADDR",
                SocketAddr::from(([127, 0, 0, 1], 8080)),
            )?,
            topics,
            max_retries: parsed("KEEL_GATEWAY_MAX_RETRIES", 3)?,
            retry_initial: Duration::from_millis(parsed("KEEL_GATEWAY_RETRY_INITIAL_MS", 1000)?),
            publish_timeout: var("KEEL_GATEWAY_PUBLISH_TIMEOUT_MS")
                .map(|_| parsed("KEEL_GATEWAY_PUBLISH_TIMEOUT_MS", 0).map(Duration::from_millis))
                .transpose()?,
            presign_expiry: Duration::from_secs(parsed("KEEL_GATEWAY_PRESIGN_SECS", 900)?),
            create_bucket: parsed("KEEL_GATEWAY_CREATE_BUCKET", false)?,
            shutdown_timeout,
            embedded: var("KEEL_EMBEDDED").is_none_or(|v| v != "off"),
        })
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,rdkafka=warn,s3s=warn,s3s_fs=warn,aws=warn,hyper=warn",
        )
    });
    let registry = tracing_subscriber::registry().with(json_layer());
    // With `otel`: spans exported by OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[cfg(feature = "otel")]
    let registry = registry.with(otel::layer());
    let _ = registry.with(filter).try_init();
}

#[tokio::main]
async fn main() -> ExitCode {
    init_logging();
    let code = match run().await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(target: "gateway", error = %e, "gateway failed");
            eprintln!("gateway failed: {e}");
            ExitCode::FAILURE
        }
    };
    // The last batched spans (the exporter blocks on its own thread).
    #[cfg(feature = "otel")]
    let _ = tokio::task::spawn_blocking(otel::shutdown).await;
    code
}

async fn run() -> Result<ExitCode, BoxError> {
    let settings = Settings::from_env()?;
    // Bind first: a port in use fails at once, before anything is started.
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {} (KEEL_GATEWAY_ADDR): {e}",
                settings.addr
            )
        })?;
    let metrics = MetricsRegistry::new();

    // Kafka: the real brokers when KAFKA_BROKERS is set, else a mock cluster.
    let mut embedded_kafka = None;
    let kafka_config = if var("KAFKA_BROKERS").is_some() || !settings.embedded {
        KafkaConfig::from_env()?
    } else {
        let mock = EmbeddedKafka::start()?;
        for topic in &settings.topics {
            mock.create_topic(topic, 3);
            mock.create_topic(&format!("{topic}.dlq"), 1);
        }
        let config = KafkaConfigBuilder::from_vars(std::env::vars())?
            .brokers(mock.bootstrap_servers().split(',').map(str::to_string))
            .log_level(KafkaLogLevel::Warn)
            .build()?;
        embedded_kafka = Some(mock);
        config
    };
    let kafka = KafkaClient::connect(kafka_config)?;
    if embedded_kafka.is_none() {
        for topic in &settings.topics {
            for name in [topic.clone(), format!("{topic}.dlq")] {
                if let Err(e) = kafka
                    .create_topic(&name, 3, 1, Duration::from_secs(15))
                    .await
                {
                    tracing::warn!(target: "gateway", topic = %name, error = %e, "could not create topic");
                }
            }
        }
    }

    // S3: the real server when AWS_S3_ENDPOINT is set, else an embedded one.
    let mut embedded_s3 = None;
    let s3_config = if var("AWS_S3_ENDPOINT").is_some() || !settings.embedded {
        S3Config::from_env()?
    } else {
        let base = S3Config::from_env()?;
        let server = EmbeddedS3::start(base.bucket()).await?;
        let config = base
            .to_builder()
            .endpoint(server.endpoint())
            .credentials(server.access_key(), server.secret_key())
            .force_path_style(true)
            .build()?;
        embedded_s3 = Some(server);
        config
    };
    let s3_client = S3Client::connect(s3_config).await?;
    if settings.create_bucket && !s3_client.health().await.healthy {
        match s3_client
            .sdk()
            .create_bucket()
            .bucket(s3_client.bucket())
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(target: "gateway", bucket = s3_client.bucket(), "bucket created")
            }
            Err(e) => {
                tracing::warn!(target: "gateway", bucket = s3_client.bucket(), error = %aws_sdk_s3::error::DisplayErrorContext(&e), "could not create bucket")
            }
        }
    }
    // keel's default S3 stack (logging, call metrics, circuit breaker, retry with
    // the seed's schedule, timeout per attempt; multipart uploads through the
    // engine, which retries its parts itself), with our breaker and metrics
    // handles so /metrics and the breaker gauge can read them.
    let s3_breaker = breaker::dependency("s3");
    let s3_breaker_handle = s3_breaker.handle();
    let s3_call_metrics = MetricsLayer::new().handle();
    metrics.register_with_labels(
        "rpc.client.call.duration",
        [("rpc.system", "aws-api"), ("rpc.service", "S3")],
        s3_call_metrics.clone(),
    )?;
    let request_timeout = s3_client.config().request_timeout();
    let s3 = S3::builder(s3_client)
        .default_layers(
            DefaultLayers::new(request_timeout)
                .circuit_breaker(s3_breaker)
                .metrics(s3_call_metrics),
        )
        .build();

    // Publishing and the in-process consumer.
    let (publish, publish_batch, publish_breaker) =
        http::publish_stacks(&kafka, &metrics, settings.publish_timeout)?;
    let consumer = consume::start(
        &kafka,
        &settings.topics,
        settings.max_retries,
        settings.retry_initial,
        consume::registry(&metrics)?,
    )?;

    let api_breaker = breaker::api();
    let shutting_down = Arc::new(AtomicBool::new(false));
    let state = http::AppState {
        kafka: kafka.clone(),
        publish,
        publish_batch,
        s3: s3.clone(),
        consumer: Arc::new(RwLock::new(Some(consumer))),
        metrics: metrics.clone(),
        shutting_down: shutting_down.clone(),
        presign_expiry: settings.presign_expiry,
        health_timeout: Duration::from_secs(3),
        // Named by their builders (`http_api`, `kafka_publish`, `s3`): the
        // `breaker` field of their logs and label of their metrics.
        breakers: vec![api_breaker.handle(), publish_breaker, s3_breaker_handle],
        keel_metric_names: settings.keel_metric_names,
        publish_topics: Arc::new(settings.publish_topics.iter().cloned().collect()),
        limits: settings.limits,
        idempotency: Default::default(),
        token: settings.token.as_deref().map(Arc::from),
        read_only: settings.read_only,
        uploads: Arc::new(tokio::sync::Semaphore::new(settings.transport.max_uploads)),
    };
    // Holds a clone of the state (so of the Kafka clients) until it is stopped.
    let app = http::app(state.clone(), api_breaker)?.layer(axum::middleware::from_fn_with_state(
        settings.transport,
        serve::request_bounds,
    ));
    let app = http::wrap(app, &metrics)?;

    let addr = listener.local_addr()?;
    banner(
        addr,
        embedded_kafka.is_some(),
        embedded_s3.as_ref(),
        &settings.topics,
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let drain = settings.drain_timeout.min(settings.shutdown_timeout);
    let server = tokio::spawn(serve::serve(
        listener,
        app,
        settings.transport,
        stop_rx,
        drain,
    ));

    let signal = shutdown_signal().await;
    let deadline = Instant::now() + settings.shutdown_timeout;
    tracing::info!(
        target: "gateway",
        signal,
        timeout_ms = settings.shutdown_timeout.as_millis() as u64,
        drain_ms = drain.as_millis() as u64,
        "shutting down: no new connections, finishing requests in flight"
    );
    shutting_down.store(true, Ordering::Release);
    let _ = stop_tx.send(true);
    let mut clean = true;

    // Requests get the drain budget; what is still open then is closed. The
    // consumer drains meanwhile (it does not depend on HTTP), with the whole
    // budget; the producer flush and S3 keep the rest.
    let consumer = state.consumer.write().await.take();
    let consumer_drained = async {
        match consumer {
            Some(consumer) => Some(consumer.shutdown(remaining(deadline)).await),
            None => None,
        }
    };
    let (served, consumer_drained) = tokio::join!(server, consumer_drained);
    match consumer_drained {
        Some(Ok(())) => tracing::info!(target: "gateway", "consumer drained and committed"),
        Some(Err(e)) => {
            clean = false;
            tracing::warn!(target: "gateway", error = %e, "consumer shutdown incomplete")
        }
        None => {}
    }
    match served {
        Ok(drained) if drained.closed_at_deadline == 0 => {
            tracing::info!(target: "gateway", "HTTP server drained")
        }
        Ok(drained) => tracing::warn!(
            target: "gateway",
            closed = drained.closed_at_deadline,
            "stalled connections closed at the drain deadline (nothing they sent was accepted)"
        ),
        Err(e) => {
            clean = false;
            tracing::error!(target: "gateway", error = %e, "HTTP server task failed")
        }
    }
    // Multipart uploads whose request was cut: abort them now rather than leave
    // their parts billed and invisible.
    let aborted = s3
        .abort_in_flight_uploads(remaining(deadline).min(Duration::from_secs(10)))
        .await;
    if aborted.aborted + aborted.failed + aborted.left > 0 {
        tracing::info!(
            target: "gateway",
            aborted = aborted.aborted,
            failed = aborted.failed,
            left = aborted.left,
            "multipart uploads in flight at shutdown aborted"
        );
    }
    if aborted.failed + aborted.left > 0 {
        clean = false;
    }

    match kafka.disconnect(remaining(deadline)).await {
        Ok(()) => tracing::info!(target: "gateway", "producer flushed, Kafka client closed"),
        Err(e) => {
            clean = false;
            tracing::warn!(target: "gateway", error = %e, "Kafka disconnect incomplete")
        }
    }
    let report = s3.shutdown(remaining(deadline)).await;
    if !report.drained {
        clean = false;
        tracing::warn!(target: "gateway", still_in_flight = report.still_in_flight, "S3 operations still in flight");
    }
    // The clients go before the embedded servers they talk to: every holder of a
    // Kafka client is gone before the mock cluster stops, or librdkafka logs the
    // brokers going down.
    drop((state, kafka, s3));
    if let Some(server) = embedded_s3 {
        // Downloads through presigned URLs may still be running: bounded too.
        let _ = tokio::time::timeout(remaining(deadline), server.stop()).await;
    }
    drop(embedded_kafka);
    tracing::info!(target: "gateway", clean, "gateway stopped");
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100))
}

/// Waits for Ctrl-C or SIGTERM; returns which.
async fn shutdown_signal() -> &'static str {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
                "SIGTERM"
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<&'static str>();
    tokio::select! {
        s = ctrl_c => s,
        s = term => s,
    }
}

fn banner(addr: SocketAddr, kafka: bool, s3: Option<&EmbeddedS3>, topics: &[String]) {
    let topic = &topics[0];
    let kafka = if kafka {
        "embedded (librdkafka mock cluster)".to_string()
    } else {
        var("KAFKA_BROKERS").unwrap_or_else(|| "KAFKA_BROKERS".into())
    };
    let s3 = match s3 {
        Some(s) => format!(
            "embedded (s3s-fs at {}, bucket {})",
            s.endpoint(),
            s.bucket()
        ),
        None => var("AWS_S3_ENDPOINT").unwrap_or_else(|| "AWS".into()),
    };
    println!(
        "\nkeel gateway listening on http://{addr}\n  Kafka: {kafka}\n  S3:    {s3}\n  consuming: {topics}\n\nTry:\n  curl -s -XPOST http://{addr}/events/{topic} -H 'content-type: application/json' -d '{{\"eventType\":\"order.created\",\"version\":\"1\",\"key\":\"o-1\",\"payload\":{{\"orderId\":\"o-1\"}}}}'\n  curl -s -XPOST http://{addr}/events/{topic}/batch -H 'content-type: application/json' -d '[{{\"eventType\":\"user.created\",\"payload\":{{\"id\":1}}}},{{\"eventType\":\"demo.poison\",\"payload\":{{}}}}]'\n  head -c 20000000 /dev/urandom > /tmp/big.bin && curl -s -T /tmp/big.bin http://{addr}/files/demo/big.bin\n  curl -sL http://{addr}/files/demo/big.bin -o /tmp/back.bin && cmp /tmp/big.bin /tmp/back.bin\n  curl -s -XDELETE http://{addr}/files/demo/big.bin\n  curl -s http://{addr}/health/ready\n  curl -s http://{addr}/metrics\n",
        topics = topics.join(", "),
    );
    tracing::info!(target: "gateway", %addr, "listening");
}
