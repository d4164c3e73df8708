//! No secret in an error, a `Debug` output or a log line: a run that sets
//! secrets (SASL password, SSL key password, AWS keys), misspells one, connects,
//! fails to publish and logs everything at TRACE, then greps every captured line
//! for the secret values.
#![cfg(all(feature = "kafka", feature = "s3"))]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use keel::kafka::client::KafkaClient;
use keel::kafka::config::{KafkaConfig, RedactedClientConfig};
use keel::kafka::envelope::EventEnvelope;
use keel::kafka::producer::{PublishRequest, PublishStack};
use keel::s3::client::S3Client;
use keel::s3::config::S3Config;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tower::ServiceExt;

const SASL_PASSWORD: &str = "sasl-pw-Zq81xK";
const MISSPELLED_PASSWORD: &str = "typo-pw-Wm52rT";
const SSL_KEY_PASSWORD: &str = "ssl-key-pw-Hh73pL";
const AWS_ACCESS_KEY_ID: &str = "AKIAKEELTEST7F3Q";
const AWS_SECRET_KEY: &str = "aws-secret-Yv94nB";

const SECRETS: [&str; 5] = [
    SASL_PASSWORD,
    MISSPELLED_PASSWORD,
    SSL_KEY_PASSWORD,
    AWS_ACCESS_KEY_ID,
    AWS_SECRET_KEY,
];

/// Every formatted log line of the process (librdkafka's threads included,
/// hence a global subscriber).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture() -> Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED
        .get_or_init(|| {
            let captured = Captured::default();
            let writer = captured.clone();
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .init();
            captured
        })
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_an_error_a_debug_output_or_a_log_line() {
    let captured = capture();
    let mut shown: Vec<String> = Vec::new();

    // 1. A misspelled secret property: refused by name, never by value.
    let err = KafkaConfig::from_vars([("KAFKA_RDKAFKA_SASL_PASWORD", MISSPELLED_PASSWORD)])
        .expect_err("librdkafka has no sasl.pasword");
    assert!(
        err.to_string().contains("KAFKA_RDKAFKA_SASL_PASWORD"),
        "{err}"
    );
    tracing::error!(error = %err, debug = ?err, "config refused");
    shown.extend([err.to_string(), format!("{err:?}")]);

    // An invalid value of a secret property (librdkafka quotes it in its reason).
    let err = KafkaConfig::from_vars([("KAFKA_RDKAFKA_SASL_OAUTHBEARER_METHOD", SASL_PASSWORD)])
        .expect_err("not an OAuth method");
    tracing::error!(error = %err, debug = ?err, "config refused");
    shown.extend([err.to_string(), format!("{err:?}")]);

    // 2. A valid config with secrets, against a broker that speaks no SASL:
    // librdkafka logs (debug) and errors, and a publish that fails.
    let cluster: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
    cluster.create_topic("secrets", 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let config = KafkaConfig::from_vars([
        ("KAFKA_BROKERS", bootstrap.as_str()),
        ("KAFKA_LOG_LEVEL", "debug"),
        ("KAFKA_DELIVERY_TIMEOUT", "1500"),
        ("KAFKA_RDKAFKA_DEBUG", "broker,security,conf,protocol"),
        ("KAFKA_RDKAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
        ("KAFKA_RDKAFKA_SASL_MECHANISMS", "PLAIN"),
        ("KAFKA_RDKAFKA_SASL_USERNAME", "keel"),
        ("KAFKA_RDKAFKA_SASL_PASSWORD", SASL_PASSWORD),
        ("KAFKA_RDKAFKA_SSL_KEY_PASSWORD", SSL_KEY_PASSWORD),
    ])
    .expect("a valid config");
    tracing::info!(config = ?config, "config built");
    shown.push(format!("{config:?}"));
    let producer_config = config.producer_client_config();
    tracing::info!(client = ?RedactedClientConfig(&producer_config), "librdkafka config");
    shown.push(format!("{:?}", RedactedClientConfig(&producer_config)));
    let client = KafkaClient::connect(config).expect("client");
    tracing::info!(client = ?client, "client connected");
    shown.push(format!("{client:?}"));
    let stack = PublishStack::new(&client);
    let err = stack
        .event_service()
        .oneshot(PublishRequest::new(
            "secrets",
            EventEnvelope::new("secret.test", serde_json::json!({"n": 1})),
        ))
        .await
        .expect_err("the broker does not speak SASL");
    tracing::error!(error = %err, debug = ?err, "publish failed");
    shown.extend([err.to_string(), format!("{err:?}")]);
    let health = client.health_check(Duration::from_millis(500)).await;
    tracing::warn!(health = ?health, "health");
    shown.push(format!("{health:?}"));
    let _ = client.disconnect(Duration::from_secs(2)).await;

    // 3. S3 with static AWS keys.
    let s3_config = S3Config::builder()
        .endpoint("http://127.0.0.1:9")
        .bucket("secrets-test")
        .credentials(AWS_ACCESS_KEY_ID, AWS_SECRET_KEY)
        .build()
        .expect("s3 config");
    tracing::info!(config = ?s3_config, builder = ?s3_config.to_builder(), "s3 config");
    shown.extend([
        format!("{s3_config:?}"),
        format!("{:?}", s3_config.to_builder()),
    ]);
    let s3 = S3Client::connect(s3_config).await.expect("s3 client");
    tracing::info!(client = ?s3, "s3 client");
    shown.push(format!("{s3:?}"));

    // librdkafka's threads may still be logging: give them a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    let lines: Vec<&str> = logs.lines().collect();
    assert!(
        lines.iter().any(|l| l.contains("librdkafka")),
        "librdkafka's own log lines were captured too"
    );
    for secret in SECRETS {
        for line in &lines {
            assert!(!line.contains(secret), "a log line holds a secret: {line}");
        }
        for text in &shown {
            assert!(
                !text.contains(secret),
                "an error or Debug output holds a secret: {text}"
            );
        }
    }
    println!(
        "FIGURE secrets: {} log lines and {} errors / Debug outputs checked, 0 hold one of {} secret values",
        lines.len(),
        shown.len(),
        SECRETS.len()
    );
}
