//! The Kafka client: connection state, health, and an orderly disconnect.
//!
//! [`KafkaClient::connect`] builds the producer from a [`KafkaConfig`] and hands
//! out the publish services ([`KafkaClient::publisher`],
//! [`KafkaClient::batch_publisher`]). It tracks a [`ConnectionState`] —
//! `DISCONNECTED`, `CONNECTING`, `CONNECTED`, `DISCONNECTING`, `ERROR` — driven by
//! librdkafka's own events through [`KeelClientContext`]:
//!
//! - librdkafka **statistics** (every [`statistics_interval`](KafkaConfig::statistics_interval),
//!   1 s by default) say which brokers are `UP`: at least one up means
//!   `CONNECTED`; none up after having been connected means `ERROR`;
//! - librdkafka **error events** (`AllBrokersDown`, fatal errors, authentication
//!   failures) move the state to `ERROR` and become the health report's last error;
//! - a successful delivery or metadata request confirms `CONNECTED` at once.
//!
//! [`KafkaClient::health_check`] reports the state, uptime, whether the producer
//! and the admin client are connected, how many consumers are registered, the last
//! error, the circuit breaker's state when one is watched, and confirms all of it
//! with a metadata request bounded by a timeout.
//!
//! [`KafkaClient::disconnect`] (default timeout 10 s) flushes the producer and
//! closes every consumer registered with [`KafkaClient::register_consumer`],
//! concurrently, within the timeout.
//!
//! A client built from a config with `ENABLE_KAFKA=false` connects to nothing; its
//! publish services answer [`ProducerErrorKind::Disabled`](crate::kafka::error::ProducerErrorKind::Disabled)
//! and its health check [`KafkaClientError::Disabled`].
//!
//! Cloning a `KafkaClient` is cheap; clones share the producer, the state and the
//! consumer registry.
//!
//! # Example
//!
//! ```no_run
//! use keel::kafka::client::KafkaClient;
//! use keel::kafka::config::KafkaConfig;
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = KafkaClient::connect(KafkaConfig::from_env()?)?;
//! let health = client.health_check(Duration::from_secs(5)).await?;
//! println!("{}", serde_json::to_string(&health)?);
//! client.disconnect(KafkaClient::DEFAULT_DISCONNECT_TIMEOUT).await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::admin::AdminClient;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use serde::Serialize;

use crate::kafka::config::{KafkaConfig, KafkaLogLevel};
use crate::kafka::error::KafkaClientError;

/// Where the connection to the cluster stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConnectionState {
    /// Not connected (before the first broker answers after [`KafkaClient::disconnect`],
    /// or Kafka disabled).
    Disconnected,
    /// Created, no broker up yet.
    Connecting,
    /// At least one broker is up.
    Connected,
    /// [`KafkaClient::disconnect`] is running.
    Disconnecting,
    /// librdkafka reported an error that leaves no usable broker (all brokers
    /// down, fatal error, authentication failure). librdkafka keeps reconnecting;
    /// the state returns to `Connected` when a broker is up again.
    Error,
}

impl ConnectionState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => ConnectionState::Connecting,
            2 => ConnectionState::Connected,
            3 => ConnectionState::Disconnecting,
            4 => ConnectionState::Error,
            _ => ConnectionState::Disconnected,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            ConnectionState::Disconnected => 0,
            ConnectionState::Connecting => 1,
            ConnectionState::Connected => 2,
            ConnectionState::Disconnecting => 3,
            ConnectionState::Error => 4,
        }
    }

    /// The seed's spelling: `DISCONNECTED`, `CONNECTING`, `CONNECTED`,
    /// `DISCONNECTING`, `ERROR`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Disconnected => "DISCONNECTED",
            ConnectionState::Connecting => "CONNECTING",
            ConnectionState::Connected => "CONNECTED",
            ConnectionState::Disconnecting => "DISCONNECTING",
            ConnectionState::Error => "ERROR",
        }
    }
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The last error librdkafka (or a health check) reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LastError {
    /// What happened.
    pub message: String,
    /// When, as milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The connection state of one librdkafka client (producer, consumer or admin),
/// shared between its [`KeelClientContext`] and whoever watches it.
#[derive(Debug)]
pub struct ConnectionTracker {
    role: &'static str,
    state: AtomicU8,
    brokers_up: AtomicU64,
    last_error: Mutex<Option<LastError>>,
    log_level: KafkaLogLevel,
}

impl ConnectionTracker {
    /// A tracker for a client of `role` ("producer", "consumer", "admin"),
    /// starting in `CONNECTING`.
    pub fn new(role: &'static str, log_level: KafkaLogLevel) -> Arc<Self> {
        Arc::new(ConnectionTracker {
            role,
            state: AtomicU8::new(ConnectionState::Connecting.as_u8()),
            brokers_up: AtomicU64::new(0),
            last_error: Mutex::new(None),
            log_level,
        })
    }

    /// The role given at creation.
    pub fn role(&self) -> &'static str {
        self.role
    }

    /// The current state.
    pub fn state(&self) -> ConnectionState {
        ConnectionState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Brokers seen `UP` in the last statistics.
    pub fn brokers_up(&self) -> u64 {
        self.brokers_up.load(Ordering::Relaxed)
    }

    /// The last error seen.
    pub fn last_error(&self) -> Option<LastError> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Moves to `next` unless the client is disconnecting or disconnected (those
    /// states belong to [`KafkaClient::disconnect`]).
    fn transition(&self, next: ConnectionState) {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let cur = ConnectionState::from_u8(current);
            if cur == next
                || matches!(
                    cur,
                    ConnectionState::Disconnecting | ConnectionState::Disconnected
                )
            {
                return;
            }
            match self.state.compare_exchange_weak(
                current,
                next.as_u8(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    tracing::info!(
                        target: "keel::kafka",
                        role = self.role,
                        from = cur.as_str(),
                        to = next.as_str(),
                        "Kafka connection state changed"
                    );
                    return;
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Something succeeded against a broker (a delivery, a metadata request):
    /// the client is connected.
    pub fn confirm_connected(&self) {
        if self.state.load(Ordering::Relaxed) != ConnectionState::Connected.as_u8() {
            self.transition(ConnectionState::Connected);
        }
    }

    /// Records an error without changing the state.
    pub fn record_error(&self, message: impl Into<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(LastError {
            message: message.into(),
            at_unix_ms: unix_ms(SystemTime::now()),
        });
    }

    /// Feeds a librdkafka error event.
    pub fn on_error(&self, error: &KafkaError, reason: &str) {
        let message = format!("{error}: {reason}");
        self.record_error(message.clone());
        let fatal = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::Fatal
                    | RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
            )
        );
        if fatal {
            self.brokers_up.store(0, Ordering::Relaxed);
            self.transition(ConnectionState::Error);
            tracing::error!(target: "keel::kafka", role = self.role, error = %message, "Kafka client error");
        } else {
            tracing::warn!(target: "keel::kafka", role = self.role, error = %message, "Kafka client error");
        }
    }

    /// Feeds librdkafka's raw statistics JSON: brokers in state `UP` mean connected.
    pub fn on_stats_raw(&self, json: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Stats {
            #[serde(default)]
            brokers: HashMap<String, Broker>,
        }
        #[derive(serde::Deserialize)]
        struct Broker {
            state: String,
        }
        let Ok(stats) = serde_json::from_slice::<Stats>(json) else {
            return;
        };
        // Bootstrap entries (nodeid -1) that are UP count too: librdkafka talks
        // to them until metadata names the real brokers.
        let up = stats.brokers.values().filter(|b| b.state == "UP").count() as u64;
        self.brokers_up.store(up, Ordering::Relaxed);
        if up > 0 {
            self.transition(ConnectionState::Connected);
        } else if self.state() == ConnectionState::Connected {
            self.record_error("no broker is up");
            self.transition(ConnectionState::Error);
        }
    }

    /// Forwards a librdkafka log line to `tracing` if the configured level allows it.
    pub fn on_log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let Some(max) = self.log_level.rdkafka_level() else {
            return;
        };
        if (level as i32) > (max as i32) {
            return;
        }
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", role = self.role, facility, "{message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", role = self.role, facility, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", role = self.role, facility, "{message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", role = self.role, facility, "{message}")
            }
        }
    }
}

/// The rdkafka context of every keel client: it turns librdkafka's error events,
/// statistics and log lines into [`ConnectionState`] changes and `tracing` events.
///
/// Consumers built outside [`KafkaClient`] can use it directly (it implements
/// [`ConsumerContext`] with rdkafka's defaults) or delegate to it from their own
/// context. Cloning shares the [`ConnectionTracker`].
#[derive(Clone, Debug)]
pub struct KeelClientContext {
    tracker: Arc<ConnectionTracker>,
}

impl KeelClientContext {
    /// A context feeding a new tracker for `role`.
    pub fn new(role: &'static str, config: &KafkaConfig) -> Self {
        KeelClientContext {
            tracker: ConnectionTracker::new(role, config.log_level()),
        }
    }

    /// The tracker this context feeds.
    pub fn tracker(&self) -> &Arc<ConnectionTracker> {
        &self.tracker
    }
}

impl ClientContext for KeelClientContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.tracker.on_log(level, fac, log_message);
    }

    fn stats_raw(&self, statistics: &[u8]) {
        self.tracker.on_stats_raw(statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.tracker.on_error(&error, reason);
    }
}

impl ConsumerContext for KeelClientContext {}

/// Polls `fetch` (a blocking metadata request, run off the async workers) every
/// 50 ms until `topic` shows `partitions` partitions (at least one when `None`),
/// each with a leader. Returns the partition count, or `None` after `timeout`.
pub(crate) async fn partition_leaders<F>(
    fetch: F,
    topic: &str,
    partitions: Option<i32>,
    timeout: Duration,
) -> Option<usize>
where
    F: Fn() -> Option<rdkafka::metadata::Metadata> + Clone + Send + 'static,
{
    let deadline = Instant::now() + timeout;
    loop {
        let metadata = tokio::task::spawn_blocking(fetch.clone())
            .await
            .ok()
            .flatten();
        let ready = metadata.and_then(|m| {
            m.topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions())
                .filter(|ps| match partitions {
                    Some(n) => ps.len() == n as usize,
                    None => !ps.is_empty(),
                })
                .filter(|ps| ps.iter().all(|p| p.leader() >= 0 && p.error().is_none()))
                .map(|ps| ps.len())
        });
        if ready.is_some() {
            return ready;
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The future a [`ManagedConsumer`] returns from `close`.
pub type CloseFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>>;

/// A consumer that [`KafkaClient::disconnect`] closes and the health check counts.
///
/// keel's consumer runtime registers itself when built with
/// [`KafkaConsumer::from_client`](crate::kafka::consumer::KafkaConsumer::from_client)
/// or [`register_with`](crate::kafka::consumer::KafkaConsumerBuilder::register_with);
/// implement it for other consumers and pass them to
/// [`KafkaClient::register_consumer`].
pub trait ManagedConsumer: Send + Sync + 'static {
    /// A name for logs and errors (group and topics, say).
    fn name(&self) -> String;
    /// Whether it is connected to the cluster.
    fn is_connected(&self) -> bool;
    /// Stops fetching, finishes in-flight work, commits and closes, within `timeout`.
    fn close(&self, timeout: Duration) -> CloseFuture;
    /// Its part of the health report. The default says only whether it is
    /// connected.
    fn health(&self) -> ConsumerHealth {
        ConsumerHealth {
            name: self.name(),
            connected: self.is_connected(),
            state: if self.is_connected() {
                "running"
            } else {
                "disconnected"
            }
            .to_string(),
            failure: None,
            stuck_partitions: Vec::new(),
            poison_guard: None,
        }
    }
}

/// One registered consumer in the health report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerHealth {
    /// Its name (group and topics).
    pub name: String,
    /// Running and connected.
    pub connected: bool,
    /// `starting`, `running`, `failed` or `stopped`.
    pub state: String,
    /// Why it failed, when it did: the report is then unhealthy.
    pub failure: Option<String>,
    /// Partitions held because a message cannot be dead-lettered, each with its
    /// offset, time stuck, attempts and last error: the report is then degraded.
    pub stuck_partitions: Vec<String>,
    /// Why the consumer's poison-rate guard tripped, while it holds the consumer
    /// paused (the report is then degraded) or after it stopped it (then also in
    /// `failure`).
    pub poison_guard: Option<String>,
}

/// Keeps a consumer registered with its [`KafkaClient`]; dropping it deregisters.
#[must_use = "dropping the registration deregisters the consumer at once"]
pub struct ConsumerRegistration {
    id: u64,
    registry: Arc<ConsumerRegistry>,
}

impl fmt::Debug for ConsumerRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerRegistration")
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for ConsumerRegistration {
    fn drop(&mut self) {
        self.registry
            .consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

#[derive(Default)]
struct ConsumerRegistry {
    next_id: AtomicU64,
    consumers: Mutex<HashMap<u64, Arc<dyn ManagedConsumer>>>,
}

impl ConsumerRegistry {
    fn snapshot(&self) -> Vec<Arc<dyn ManagedConsumer>> {
        self.consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Reads a circuit breaker's state for the health report.
pub type CircuitStateFn = Arc<dyn Fn() -> String + Send + Sync>;

/// The producer keel uses: rdkafka's `FutureProducer` with [`KeelClientContext`].
pub type KeelProducer = FutureProducer<KeelClientContext>;

pub(crate) struct ClientShared {
    pub(crate) config: KafkaConfig,
    pub(crate) producer: Option<KeelProducer>,
    pub(crate) producer_tracker: Option<Arc<ConnectionTracker>>,
    /// Set by `disconnect`: publish services answer "shutting down" from then on.
    pub(crate) closed: AtomicBool,
    pub(crate) metrics: Arc<crate::kafka::producer::PublishMetrics>,
    admin: OnceLock<Result<AdminClient<KeelClientContext>, String>>,
    admin_tracker: OnceLock<Arc<ConnectionTracker>>,
    consumers: Arc<ConsumerRegistry>,
    circuit_breaker: Mutex<Option<CircuitStateFn>>,
    state_override: AtomicU8,
    started: Instant,
}

const NO_OVERRIDE: u8 = u8::MAX;

/// The Kafka client: producer, connection state, health, disconnect.
///
/// See the [module docs](self). Cloning is cheap and shares everything.
#[derive(Clone)]
pub struct KafkaClient {
    pub(crate) shared: Arc<ClientShared>,
}

impl fmt::Debug for KafkaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaClient")
            .field("state", &self.state())
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// The health report of [`KafkaClient::health_check`]. Serializes to JSON in the
/// seed's shape (`isHealthy`, `state`, `uptime`, `metrics`, ...).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaHealth {
    /// Connected and the metadata request answered.
    pub is_healthy: bool,
    /// The connection state.
    pub state: ConnectionState,
    /// Time since the client was created, in milliseconds.
    pub uptime_ms: u64,
    /// Producer, consumer and admin status.
    pub metrics: HealthMetrics,
    /// The last error librdkafka or the health check reported.
    pub last_error: Option<LastError>,
    /// Brokers in the metadata answer (0 when it failed).
    pub brokers: usize,
    /// The watched circuit breaker's state (`CLOSED`, `OPEN`, `HALF_OPEN`), if any.
    pub circuit_breaker: Option<String>,
    /// Each registered consumer: state, failure, stuck partitions.
    pub consumers: Vec<ConsumerHealth>,
    /// Healthy but not whole: a registered consumer holds a partition it cannot
    /// dead-letter from. (A failed consumer makes the report unhealthy instead.)
    pub degraded: bool,
}

/// Connection facts of the health report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthMetrics {
    /// The producer's connection is up.
    pub producer_connected: bool,
    /// Consumers registered with the client.
    pub consumer_count: usize,
    /// Registered consumers that are connected.
    pub consumers_connected: usize,
    /// The admin client exists and is connected.
    pub admin_connected: bool,
}

impl KafkaClient {
    /// The default timeout of [`disconnect`](Self::disconnect): 10 s.
    pub const DEFAULT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Creates the client and its producer. librdkafka connects in the
    /// background; watch [`state`](Self::state) or call
    /// [`health_check`](Self::health_check). With Kafka disabled nothing is
    /// created and the state stays `DISCONNECTED`.
    pub fn connect(config: KafkaConfig) -> Result<Self, KafkaClientError> {
        let (producer, producer_tracker) = if config.enabled() {
            let context = KeelClientContext::new("producer", &config);
            let tracker = context.tracker().clone();
            let producer: KeelProducer = config
                .producer_client_config()
                .create_with_context(context)
                .map_err(|source| KafkaClientError::Create {
                    role: "producer",
                    source,
                })?;
            tracing::info!(
                target: "keel::kafka",
                brokers = %config.bootstrap_servers(),
                client_id = config.client_id(),
                "Kafka producer created"
            );
            (Some(producer), Some(tracker))
        } else {
            tracing::warn!(target: "keel::kafka", "Kafka is disabled (ENABLE_KAFKA=false)");
            (None, None)
        };
        let override_state = if config.enabled() {
            NO_OVERRIDE
        } else {
            ConnectionState::Disconnected.as_u8()
        };
        Ok(KafkaClient {
            shared: Arc::new(ClientShared {
                config,
                producer,
                producer_tracker,
                closed: AtomicBool::new(false),
                metrics: Arc::new(crate::kafka::producer::PublishMetrics::new()),
                admin: OnceLock::new(),
                admin_tracker: OnceLock::new(),
                consumers: Arc::new(ConsumerRegistry::default()),
                circuit_breaker: Mutex::new(None),
                state_override: AtomicU8::new(override_state),
                started: Instant::now(),
            }),
        })
    }

    /// The config the client was built from.
    pub fn config(&self) -> &KafkaConfig {
        &self.shared.config
    }

    /// Whether Kafka is enabled.
    pub fn is_enabled(&self) -> bool {
        self.shared.config.enabled()
    }

    /// The connection state: `DISCONNECTING` / `DISCONNECTED` during and after
    /// [`disconnect`](Self::disconnect), else the producer's state.
    pub fn state(&self) -> ConnectionState {
        let o = self.shared.state_override.load(Ordering::Acquire);
        if o != NO_OVERRIDE {
            return ConnectionState::from_u8(o);
        }
        self.shared
            .producer_tracker
            .as_ref()
            .map_or(ConnectionState::Disconnected, |t| t.state())
    }

    /// Time since the client was created.
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// The underlying rdkafka producer, `None` when Kafka is disabled.
    pub fn producer(&self) -> Option<&KeelProducer> {
        self.shared.producer.as_ref()
    }

    /// The last error any of the client's own librdkafka clients reported.
    pub fn last_error(&self) -> Option<LastError> {
        let mut errors: Vec<LastError> = self
            .shared
            .producer_tracker
            .iter()
            .chain(self.shared.admin_tracker.get())
            .filter_map(|t| t.last_error())
            .collect();
        errors.sort_by_key(|e| e.at_unix_ms);
        errors.pop()
    }

    /// The admin client, created on first use.
    pub fn admin(&self) -> Result<&AdminClient<KeelClientContext>, KafkaClientError> {
        if !self.is_enabled() {
            return Err(KafkaClientError::Disabled);
        }
        let created = self.shared.admin.get_or_init(|| {
            let context = KeelClientContext::new("admin", &self.shared.config);
            let _ = self.shared.admin_tracker.set(context.tracker().clone());
            self.shared
                .config
                .admin_client_config()
                .create_with_context(context)
                .map_err(|e| e.to_string())
        });
        created.as_ref().map_err(|message| KafkaClientError::Admin {
            target: "admin client".to_string(),
            message: message.clone(),
        })
    }

    /// Creates a topic (a no-op if it exists) and waits until every partition has
    /// a leader, all within `timeout`.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        replication: i32,
        timeout: Duration,
    ) -> Result<(), KafkaClientError> {
        use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
        let admin = self.admin()?;
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replication));
        let options = AdminOptions::new()
            .request_timeout(Some(timeout))
            .operation_timeout(Some(timeout));
        let results =
            admin
                .create_topics([&topic], &options)
                .await
                .map_err(|e| KafkaClientError::Admin {
                    target: name.to_string(),
                    message: e.to_string(),
                })?;
        if let Some(tracker) = self.shared.admin_tracker.get() {
            tracker.confirm_connected();
        }
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(KafkaClientError::Admin {
                        target: topic,
                        message: format!("{code:?}"),
                    });
                }
            }
        }
        self.wait_for_leaders(name, partitions, timeout).await
    }

    /// Polls metadata until `topic` shows `partitions` partitions, each with a leader.
    async fn wait_for_leaders(
        &self,
        topic: &str,
        partitions: i32,
        timeout: Duration,
    ) -> Result<(), KafkaClientError> {
        let client = self.clone();
        let name = topic.to_string();
        let fetch = move || {
            client
                .admin()
                .ok()?
                .inner()
                .fetch_metadata(Some(&name), Duration::from_secs(1))
                .ok()
        };
        match partition_leaders(fetch, topic, Some(partitions), timeout).await {
            Some(_) => Ok(()),
            None => Err(KafkaClientError::Admin {
                target: topic.to_string(),
                message: format!("partitions have no leader after {timeout:?}"),
            }),
        }
    }

    /// Registers a consumer: the health check counts it and
    /// [`disconnect`](Self::disconnect) closes it. Keep the registration while
    /// the consumer lives; dropping it deregisters.
    pub fn register_consumer(&self, consumer: Arc<dyn ManagedConsumer>) -> ConsumerRegistration {
        let registry = self.shared.consumers.clone();
        let id = registry.next_id.fetch_add(1, Ordering::Relaxed);
        registry
            .consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, consumer);
        ConsumerRegistration { id, registry }
    }

    /// Number of registered consumers.
    pub fn consumer_count(&self) -> usize {
        self.shared
            .consumers
            .consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Makes the health report include a circuit breaker's state, read by `state`
    /// (for example the publish stack's breaker handle).
    pub fn watch_circuit_breaker(&self, state: CircuitStateFn) {
        *self
            .shared
            .circuit_breaker
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(state);
    }

    /// The watched circuit breaker's state, if one is watched.
    pub fn circuit_breaker_state(&self) -> Option<String> {
        let f = self
            .shared
            .circuit_breaker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        f.map(|f| f())
    }

    /// Checks the connection: reports the state and confirms it with a metadata
    /// request bounded by `timeout`. A failed metadata request makes the report
    /// unhealthy and becomes its last error; it is not an `Err` (use the report).
    /// `Err` only when Kafka is disabled or the client is disconnected.
    pub async fn health_check(&self, timeout: Duration) -> Result<KafkaHealth, KafkaClientError> {
        let producer = self
            .shared
            .producer
            .clone()
            .ok_or(KafkaClientError::Disabled)?;
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(KafkaClientError::Disconnected);
        }
        let metadata = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|m| m.brokers().len())
        })
        .await;
        let tracker = self
            .shared
            .producer_tracker
            .as_ref()
            .expect("an enabled client has a producer tracker");
        let brokers = match metadata {
            Ok(Ok(n)) => {
                tracker.confirm_connected();
                n
            }
            Ok(Err(e)) => {
                tracker.record_error(format!("health check metadata request failed: {e}"));
                0
            }
            Err(join) => {
                tracker.record_error(format!("health check task failed: {join}"));
                0
            }
        };
        let state = self.state();
        let consumers = self.shared.consumers.snapshot();
        let admin_connected = self
            .shared
            .admin_tracker
            .get()
            .is_some_and(|t| t.state() == ConnectionState::Connected);
        let consumer_health: Vec<ConsumerHealth> = consumers.iter().map(|c| c.health()).collect();
        let consumer_failed = consumer_health.iter().any(|c| c.failure.is_some());
        let degraded = consumer_health
            .iter()
            .any(|c| !c.stuck_partitions.is_empty() || c.poison_guard.is_some());
        Ok(KafkaHealth {
            is_healthy: brokers > 0 && state == ConnectionState::Connected && !consumer_failed,
            state,
            uptime_ms: self.uptime().as_millis() as u64,
            metrics: HealthMetrics {
                producer_connected: tracker.state() == ConnectionState::Connected,
                consumer_count: consumers.len(),
                consumers_connected: consumers.iter().filter(|c| c.is_connected()).count(),
                admin_connected,
            },
            last_error: self.last_error(),
            brokers,
            circuit_breaker: self.circuit_breaker_state(),
            consumers: consumer_health,
            degraded,
        })
    }

    /// Flushes the producer and closes every registered consumer, all within
    /// `timeout` ([`DEFAULT_DISCONNECT_TIMEOUT`](Self::DEFAULT_DISCONNECT_TIMEOUT)
    /// is 10 s). From the start of the call, publish services answer "shutting
    /// down". Calling it again is a no-op. On timeout the error says what was left.
    pub async fn disconnect(&self, timeout: Duration) -> Result<(), KafkaClientError> {
        if !self.is_enabled() {
            return Ok(());
        }
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let started = Instant::now();
        self.shared
            .state_override
            .store(ConnectionState::Disconnecting.as_u8(), Ordering::Release);
        tracing::info!(target: "keel::kafka", timeout_ms = timeout.as_millis() as u64, "Kafka client disconnecting");

        let consumers = self.shared.consumers.snapshot();
        let close_all = futures::future::join_all(consumers.iter().map(|c| {
            let name = c.name();
            let fut = c.close(timeout);
            async move { (name, tokio::time::timeout(timeout, fut).await) }
        }));
        let producer = self.shared.producer.clone();
        let flush = tokio::task::spawn_blocking(move || match producer {
            Some(p) => {
                let r = p.flush(timeout);
                (r, p.in_flight_count())
            }
            None => (Ok(()), 0),
        });
        let (closed, flushed) = futures::join!(close_all, flush);

        let mut pending = Vec::new();
        match flushed {
            Ok((Ok(()), _)) => {}
            Ok((Err(e), in_flight)) => pending.push(format!(
                "producer flush: {e} ({in_flight} messages in flight)"
            )),
            Err(join) => pending.push(format!("producer flush task: {join}")),
        }
        for (name, result) in closed {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => pending.push(format!("consumer {name}: {e}")),
                Err(_) => pending.push(format!("consumer {name}: not closed in time")),
            }
        }
        self.shared
            .state_override
            .store(ConnectionState::Disconnected.as_u8(), Ordering::Release);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        if pending.is_empty() {
            tracing::info!(target: "keel::kafka", elapsed_ms, "Kafka client disconnected");
            Ok(())
        } else {
            let pending = pending.join("; ");
            tracing::error!(target: "keel::kafka", elapsed_ms, %pending, "Kafka client disconnect incomplete");
            Err(KafkaClientError::DisconnectTimeout { timeout, pending })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> Arc<ConnectionTracker> {
        ConnectionTracker::new("producer", KafkaLogLevel::Nothing)
    }

    #[test]
    fn stats_drive_the_state() {
        let t = tracker();
        assert_eq!(t.state(), ConnectionState::Connecting);
        t.on_stats_raw(br#"{"brokers":{"b/bootstrap":{"state":"TRY_CONNECT","nodeid":-1}}}"#);
        assert_eq!(t.state(), ConnectionState::Connecting);
        t.on_stats_raw(br#"{"brokers":{"b:9092/1":{"state":"UP","nodeid":1}}}"#);
        assert_eq!(t.state(), ConnectionState::Connected);
        assert_eq!(t.brokers_up(), 1);
        t.on_stats_raw(br#"{"brokers":{"b:9092/1":{"state":"DOWN","nodeid":1}}}"#);
        assert_eq!(t.state(), ConnectionState::Error);
        assert_eq!(t.last_error().unwrap().message, "no broker is up");
        t.on_stats_raw(br#"{"brokers":{"b:9092/1":{"state":"UP","nodeid":1}}}"#);
        assert_eq!(t.state(), ConnectionState::Connected);
        t.on_stats_raw(b"not json");
        assert_eq!(t.state(), ConnectionState::Connected);
    }

    #[test]
    fn error_events_drive_the_state() {
        let t = tracker();
        t.confirm_connected();
        t.on_error(
            &KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            "one broker hiccup",
        );
        assert_eq!(t.state(), ConnectionState::Connected);
        assert!(
            t.last_error()
                .unwrap()
                .message
                .contains("one broker hiccup")
        );
        t.on_error(
            &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "2/2 brokers are down",
        );
        assert_eq!(t.state(), ConnectionState::Error);
        t.confirm_connected();
        assert_eq!(t.state(), ConnectionState::Connected);
    }

    #[test]
    fn disconnect_states_are_sticky() {
        let t = tracker();
        t.transition(ConnectionState::Disconnecting);
        t.confirm_connected();
        t.on_error(&KafkaError::Global(RDKafkaErrorCode::AllBrokersDown), "x");
        assert_eq!(t.state(), ConnectionState::Disconnecting);
    }

    #[test]
    fn states_spell_like_the_seed() {
        assert_eq!(
            serde_json::to_string(&ConnectionState::Disconnecting).unwrap(),
            "\"DISCONNECTING\""
        );
        assert_eq!(ConnectionState::Connected.to_string(), "CONNECTED");
    }

    #[tokio::test]
    async fn disabled_client_answers_disabled() {
        let config = KafkaConfig::builder().enabled(false).build().unwrap();
        let client = KafkaClient::connect(config).unwrap();
        assert_eq!(client.state(), ConnectionState::Disconnected);
        assert!(client.producer().is_none());
        assert!(matches!(
            client.health_check(Duration::from_secs(1)).await,
            Err(KafkaClientError::Disabled)
        ));
        assert!(matches!(client.admin(), Err(KafkaClientError::Disabled)));
        client.disconnect(Duration::from_secs(1)).await.unwrap();
    }
}
