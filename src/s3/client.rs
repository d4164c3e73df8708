//! [`S3Client`]: the configured aws-sdk-s3 client, its health check and its
//! graceful shutdown.
//!
//! What [`S3Client::connect`] sets up, and why:
//!
//! - **Keep-alive pooling.** The SDK's hyper client keeps up to
//!   [`pool_max_idle_per_host`](S3Config::pool_max_idle_per_host) (default 50) idle
//!   connections per host for reuse, dropped after
//!   [`pool_idle_timeout`](S3Config::pool_idle_timeout). hyper has no cap on
//!   *open* connections; keel bounds concurrency itself (parts in flight, the
//!   caller's concurrency), so the pool holds what that concurrency needs.
//! - **Timeouts.** Connect timeout and a per-attempt request timeout (30 s each by
//!   default) on every HTTP request, through the SDK's `TimeoutConfig`.
//! - **One owner of retries.** The SDK's own retries are switched off
//!   (`max_attempts = 1`): keel's `RetryLayer` (S3 preset: 1, 2, 4 s, cap 10 s, 3
//!   retries, honouring `SlowDown`/`Retry-After`) is the only place that retries,
//!   so attempts never multiply (3 SDK attempts inside 4 keel attempts would be
//!   12 requests) and every retry is logged and counted once.
//! - **Custom endpoints.** `AWS_S3_ENDPOINT` with path-style addressing and request
//!   checksum calculation / response checksum validation "when required": the
//!   SDK's default checksums (since early 2025) break many S3-compatible servers
//!   and presigned URLs.
//! - **A region, always.** Presigning without a region silently yields a URL that
//!   never verifies (aws-sdk-rust #861); [`S3Config`] always has one.
//! - **Credentials.** Static ones from the config, else the standard AWS chain.
//!
//! [`S3Client::health`] runs a `HeadBucket`; [`S3Client::shutdown`] stops new
//! operations, waits (with a timeout) for the ones in flight, and reports what was
//! left. Cloning an `S3Client` is cheap and shares the SDK client, its connection
//! pool and the shutdown state.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use keel::s3::{client::S3Client, config::S3Config};
//! use std::time::Duration;
//!
//! let client = S3Client::connect(S3Config::from_env()?).await?;
//! let health = client.health().await;
//! println!("S3 healthy: {} in {:?}", health.healthy, health.latency);
//! let report = client.shutdown(Duration::from_secs(10)).await;
//! assert!(report.drained);
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_smithy_http_client::tls;
use tokio::sync::Notify;

use super::config::S3Config;
use super::error::{S3ErrorKind, S3Operation, S3ServiceError};

/// The configured S3 client. See the [module docs](self).
#[derive(Clone)]
pub struct S3Client {
    sdk: aws_sdk_s3::Client,
    config: Arc<S3Config>,
    gate: Arc<Gate>,
}

// By hand: the SDK client's `Debug` prints the static access key id.
impl std::fmt::Debug for S3Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Client")
            .field("config", &self.config)
            .field("gate", &self.gate)
            .finish_non_exhaustive()
    }
}

impl S3Client {
    /// Builds the client: loads credentials (static from the config, or the
    /// standard AWS chain) and configures pooling, timeouts, retries and the
    /// endpoint as described in the [module docs](self).
    pub async fn connect(config: S3Config) -> Result<Self, S3ServiceError> {
        Self::connect_with(config, |builder| builder).await
    }

    /// Like [`connect`](Self::connect), letting `customize` adjust the SDK config
    /// last (add an interceptor, a different HTTP client, ...). Re-enabling SDK
    /// retries here would multiply attempts with keel's retry layer.
    pub async fn connect_with(
        config: S3Config,
        customize: impl FnOnce(aws_sdk_s3::config::Builder) -> aws_sdk_s3::config::Builder,
    ) -> Result<Self, S3ServiceError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region().to_owned()));
        if let Some(credentials) = config.credentials() {
            loader = loader.credentials_provider(credentials.clone());
        }
        let shared = loader.load().await;
        let sdk_config = customize(sdk_config_builder(&config, &shared)).build();
        tracing::info!(
            component = "S3Client",
            region = config.region(),
            bucket = config.bucket(),
            endpoint = config.endpoint().unwrap_or("aws"),
            force_path_style = config.force_path_style(),
            "S3 client configured"
        );
        Ok(S3Client::from_sdk(
            config,
            aws_sdk_s3::Client::from_conf(sdk_config),
        ))
    }

    /// Wraps an SDK client built elsewhere. keel's retry layer assumes the SDK
    /// does not retry too; configure `sdk` with `RetryConfig::disabled()`.
    pub fn from_sdk(config: S3Config, sdk: aws_sdk_s3::Client) -> Self {
        S3Client {
            sdk,
            config: Arc::new(config),
            gate: Arc::new(Gate::default()),
        }
    }

    /// The SDK client, for operations keel does not wrap.
    pub fn sdk(&self) -> &aws_sdk_s3::Client {
        &self.sdk
    }

    /// The config the client was built from.
    pub fn config(&self) -> &S3Config {
        &self.config
    }

    /// The configured bucket.
    pub fn bucket(&self) -> &str {
        self.config.bucket()
    }

    /// Registers one operation in flight, so [`shutdown`](Self::shutdown) waits for
    /// it; the returned guard ends it when dropped. Fails with
    /// [`S3ErrorKind::ShuttingDown`] once shutdown has begun.
    pub fn begin(&self, operation: S3Operation) -> Result<InFlight, S3ServiceError> {
        self.gate.count.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight {
            gate: Arc::clone(&self.gate),
        };
        if self.gate.closed.load(Ordering::SeqCst) {
            drop(guard);
            return Err(S3ServiceError::new(operation, S3ErrorKind::ShuttingDown)
                .with_bucket(self.bucket()));
        }
        Ok(guard)
    }

    /// Operations in flight now.
    pub fn in_flight(&self) -> usize {
        self.gate.count.load(Ordering::SeqCst)
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.gate.closed.load(Ordering::SeqCst)
    }

    /// Checks that the bucket answers (`HeadBucket`), returning the round trip.
    pub async fn check(&self) -> Result<Duration, S3ServiceError> {
        let _guard = self.begin(S3Operation::HealthCheck)?;
        let started = Instant::now();
        self.sdk
            .head_bucket()
            .bucket(self.bucket())
            .send()
            .await
            .map_err(|e| {
                S3ServiceError::from_sdk(S3Operation::HealthCheck, self.bucket(), None, e)
            })?;
        Ok(started.elapsed())
    }

    /// A health report for readiness probes (a `HeadBucket` on the bucket).
    pub async fn health(&self) -> S3Health {
        let started = Instant::now();
        let result = self.check().await;
        S3Health {
            healthy: result.is_ok(),
            bucket: self.bucket().to_owned(),
            endpoint: self.config.endpoint().map(str::to_owned),
            latency: started.elapsed(),
            in_flight: self.in_flight(),
            shutting_down: self.is_shutting_down(),
            last_error: result.err().map(|e| e.to_string()),
        }
    }

    /// Graceful shutdown: from now on new operations fail with
    /// [`S3ErrorKind::ShuttingDown`]; waits up to `timeout` for the operations in
    /// flight to end. The connection pool closes when the last clone of the client
    /// is dropped. Calling it again waits again.
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        self.gate.closed.store(true, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let drained = tokio::time::timeout(timeout, self.gate.idle())
            .await
            .is_ok();
        let report = ShutdownReport {
            drained,
            still_in_flight: self.in_flight(),
            waited: started.elapsed(),
        };
        if drained {
            tracing::info!(
                component = "S3Client",
                waited_ms = report.waited.as_millis() as u64,
                "S3 client shut down"
            );
        } else {
            tracing::warn!(
                component = "S3Client",
                still_in_flight = report.still_in_flight,
                "S3 client shutdown timed out with operations in flight"
            );
        }
        report
    }
}

/// The SDK config keel uses (see the module docs).
fn sdk_config_builder(
    config: &S3Config,
    shared: &aws_config::SdkConfig,
) -> aws_sdk_s3::config::Builder {
    let http_client = aws_smithy_http_client::Builder::new()
        .pool_max_idle_per_host(config.pool_max_idle_per_host())
        .pool_idle_timeout(config.pool_idle_timeout())
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .build_https();
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(config.connect_timeout())
        .operation_attempt_timeout(config.request_timeout())
        .build();
    let mut builder = aws_sdk_s3::config::Builder::from(shared)
        .http_client(http_client)
        .retry_config(RetryConfig::disabled())
        .timeout_config(timeouts)
        .force_path_style(config.force_path_style());
    if let Some(endpoint) = config.endpoint() {
        builder = builder.endpoint_url(endpoint);
    }
    if config.checksums_when_required() {
        builder = builder
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    }
    builder
}

#[derive(Debug, Default)]
struct Gate {
    closed: AtomicBool,
    count: AtomicUsize,
    idle: Notify,
}

impl Gate {
    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One operation in flight; see [`S3Client::begin`]. Ends when dropped.
#[derive(Debug)]
#[must_use = "the operation counts as in flight only while the guard lives"]
pub struct InFlight {
    gate: Arc<Gate>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.gate.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.gate.idle.notify_waiters();
        }
    }
}

/// A health report; see [`S3Client::health`].
///
/// Serializes to JSON in camelCase, like the Kafka health report, with the
/// latency in whole milliseconds: `{"healthy", "bucket", "endpoint",
/// "latencyMs", "inFlight", "shuttingDown", "lastError"}`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct S3Health {
    /// Whether `HeadBucket` succeeded.
    pub healthy: bool,
    /// The bucket checked.
    pub bucket: String,
    /// The custom endpoint, if any.
    pub endpoint: Option<String>,
    /// How long the check took (serialized as `latencyMs`).
    #[serde(rename = "latencyMs", serialize_with = "serialize_millis")]
    pub latency: Duration,
    /// Operations in flight when the check ended.
    pub in_flight: usize,
    /// Whether shutdown has begun.
    pub shutting_down: bool,
    /// Why the check failed.
    pub last_error: Option<String>,
}

/// A duration as whole milliseconds (saturating), the unit of every `...Ms` field.
fn serialize_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What [`S3Client::shutdown`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// `true` when every operation in flight ended before the timeout.
    pub drained: bool,
    /// Operations still in flight when shutdown returned.
    pub still_in_flight: usize,
    /// How long shutdown waited.
    pub waited: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offline_client() -> S3Client {
        let config = S3Config::builder()
            .bucket("unit-test")
            .endpoint("http://127.0.0.1:9")
            .credentials("a", "b")
            .build()
            .unwrap();
        let shared = aws_config::SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .build();
        let sdk = aws_sdk_s3::Client::from_conf(sdk_config_builder(&config, &shared).build());
        S3Client::from_sdk(config, sdk)
    }

    #[test]
    fn sdk_config_disables_sdk_retries_and_sets_timeouts() {
        let client = offline_client();
        let conf = client.sdk().config();
        assert_eq!(conf.retry_config().unwrap().max_attempts(), 1);
        let timeouts = conf.timeout_config().unwrap();
        assert_eq!(timeouts.connect_timeout(), Some(Duration::from_secs(30)));
        assert_eq!(
            timeouts.operation_attempt_timeout(),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            conf.request_checksum_calculation(),
            Some(&RequestChecksumCalculation::WhenRequired)
        );
        assert_eq!(
            conf.response_checksum_validation(),
            Some(&ResponseChecksumValidation::WhenRequired)
        );
        assert_eq!(conf.region().map(|r| r.as_ref()), Some("us-east-1"));
    }

    #[test]
    fn health_serializes_in_camel_case_with_milliseconds() {
        let health = S3Health {
            healthy: false,
            bucket: "b".into(),
            endpoint: Some("http://127.0.0.1:9".into()),
            latency: Duration::from_micros(1_500_700),
            in_flight: 2,
            shutting_down: true,
            last_error: Some("down".into()),
        };
        assert_eq!(
            serde_json::to_value(&health).unwrap(),
            serde_json::json!({
                "healthy": false,
                "bucket": "b",
                "endpoint": "http://127.0.0.1:9",
                "latencyMs": 1500,
                "inFlight": 2,
                "shuttingDown": true,
                "lastError": "down",
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_in_flight_operations() {
        let client = offline_client();
        let op = client.begin(S3Operation::Upload).unwrap();
        assert_eq!(client.in_flight(), 1);
        let waiter = {
            let client = client.clone();
            tokio::spawn(async move { client.shutdown(Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(client.is_shutting_down());
        // New operations are refused while shutting down.
        let refused = client.begin(S3Operation::Download).unwrap_err();
        assert_eq!(refused.kind(), &S3ErrorKind::ShuttingDown);
        drop(op);
        let report = waiter.await.unwrap();
        assert!(report.drained);
        assert_eq!(report.still_in_flight, 0);
        assert_eq!(report.waited, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_gives_up_after_the_timeout() {
        let client = offline_client();
        let _op = client.begin(S3Operation::Upload).unwrap();
        let report = client.shutdown(Duration::from_secs(3)).await;
        assert!(!report.drained);
        assert_eq!(report.still_in_flight, 1);
        assert_eq!(report.waited, Duration::from_secs(3));
    }
}
