//! Kafka configuration: typed, validated once, immutable afterwards.
//!
//! [`KafkaConfig`] is built either from the environment ([`KafkaConfig::from_env`],
//! with the variable names of the TypeScript module keel replaces) or with a
//! [`KafkaConfigBuilder`]. [`KafkaConfigBuilder::build`] validates every value and
//! answers a [`ConfigError`] that names the variable (or builder setting) and the
//! bad value. A built config has no setters; it is shared behind an [`Arc`], so
//! cloning it is cheap and every clone sees the same values.
//!
//! # Environment variables
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `KAFKA_BROKERS` | `localhost:9092` | comma-separated `host:port` bootstrap servers |
//! | `KAFKA_CLIENT_ID` | `keel` | librdkafka `client.id` (the seed used `express-api`; keel names itself) |
//! | `KAFKA_GROUP_ID` | `keel-consumer-group` | consumer group id |
//! | `KAFKA_CONNECTION_TIMEOUT` | `10000` | ms; `socket.connection.setup.timeout.ms` |
//! | `KAFKA_REQUEST_TIMEOUT` | `30000` | ms; producer `request.timeout.ms` and the default metadata / health-check timeout |
//! | `KAFKA_RETRY_ATTEMPTS` | `5` | librdkafka `retries` (retries of a failed produce request, done by librdkafka itself) |
//! | `KAFKA_RETRY_BACKOFF_MS` | `300` | ms; librdkafka `retry.backoff.ms` |
//! | `KAFKA_DELIVERY_TIMEOUT` | `30000` | ms; librdkafka `message.timeout.ms`: the bound on waiting for a broker acknowledgement, retries included (`KAFKA_RDKAFKA_MESSAGE_TIMEOUT_MS`, when set, wins) |
//! | `KAFKA_LOG_LEVEL` | `info` | `nothing`, `error`, `warn`, `info` or `debug`: librdkafka's `log_level` and the level keel forwards to `tracing` |
//! | `ENABLE_KAFKA` | `true` | `false` makes every keel Kafka service answer a "Kafka disabled" error |
//! | `KAFKA_MAX_BATCH_SIZE` | `1000` | the largest batch a publish accepts |
//! | `KAFKA_TRANSACTIONAL_ID` | unset | `transactional.id` for [`TransactionalPublisher`](crate::kafka::producer::TransactionalPublisher) |
//! | `KAFKA_RDKAFKA_<PROPERTY>` | – | any librdkafka property, e.g. `KAFKA_RDKAFKA_SECURITY_PROTOCOL=SASL_SSL`: the suffix is lower-cased, `_` becomes `.` and `__` becomes `_` |
//!
//! Durations in the environment are whole milliseconds; booleans accept
//! `true/false`, `1/0`, `yes/no` and `on/off`.
//!
//! # Producer defaults
//!
//! The producer is idempotent with `acks=all` by default (no duplicates and no
//! reordering from librdkafka's own retries). A publish waits at most
//! [`delivery_timeout`](KafkaConfig::delivery_timeout) (30 s by default, not
//! librdkafka's 300 s) for the broker's acknowledgement, so a broker that is down
//! turns into a typed error in bounded time.
//!
//! # Pass-through properties
//!
//! Anything librdkafka understands (security, SASL, SSL, compression, batching)
//! passes through with [`KafkaConfigBuilder::rdkafka_property`] or
//! `KAFKA_RDKAFKA_*`; pass-through properties are applied last, so they override
//! keel's own mapping. [`KafkaConfigBuilder::build`] hands each one to librdkafka
//! once, so an unknown property or an invalid value fails at build time. A
//! `message.timeout.ms` (or `delivery.timeout.ms`) passed through becomes the
//! [`delivery_timeout`](KafkaConfig::delivery_timeout), so the publish stack's
//! timeout follows it.
//!
//! # Secrets
//!
//! Pass-through properties may hold secrets (`sasl.password`, SSL keys, OAuth
//! client secrets). keel prints their names, never their values: `Debug` of the
//! config lists property names only, a rejected property that may be a secret
//! ([`is_secret_property`], judged by name so that a misspelled
//! `KAFKA_RDKAFKA_SASL_PASWORD` counts) shows [`REDACTED`] as its value, also in
//! librdkafka's reason, and [`RedactedClientConfig`] prints an rdkafka
//! `ClientConfig` the same way.
//!
//! # Example
//!
//! ```
//! use keel::kafka::config::KafkaConfig;
//! use std::time::Duration;
//!
//! let config = KafkaConfig::builder()
//!     .brokers(["127.0.0.1:9092"])
//!     .client_id("orders-service")
//!     .delivery_timeout(Duration::from_secs(10))
//!     .rdkafka_property("compression.type", "lz4")
//!     .build()
//!     .expect("valid config");
//! assert_eq!(config.client_id(), "orders-service");
//! assert!(config.idempotence());
//!
//! // Bad values are typed errors naming the variable and the value.
//! let err = KafkaConfig::from_vars([("KAFKA_REQUEST_TIMEOUT", "soon")]).unwrap_err();
//! assert_eq!(err.variable(), "KAFKA_REQUEST_TIMEOUT");
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;

/// Default bootstrap servers.
pub const DEFAULT_BROKERS: &str = "localhost:9092";
/// Default `client.id`.
pub const DEFAULT_CLIENT_ID: &str = "keel";
/// Default consumer group id.
pub const DEFAULT_GROUP_ID: &str = "keel-consumer-group";
/// Default connection setup timeout (10 s).
pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_millis(10_000);
/// Default request timeout (30 s).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_millis(30_000);
/// Default number of librdkafka retries of a failed request (5).
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 5;
/// Default librdkafka retry backoff (300 ms).
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(300);
/// Default bound on waiting for a delivery acknowledgement (30 s).
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_millis(30_000);
/// Default largest batch (1,000 events).
pub const DEFAULT_MAX_BATCH_SIZE: usize = 1_000;
/// Default interval of librdkafka statistics, which drive the connection state (1 s).
pub const DEFAULT_STATISTICS_INTERVAL: Duration = Duration::from_millis(1_000);

/// Environment variable names, as the seed spells them.
pub mod env {
    /// Comma-separated bootstrap servers.
    pub const BROKERS: &str = "KAFKA_BROKERS";
    /// `client.id`.
    pub const CLIENT_ID: &str = "KAFKA_CLIENT_ID";
    /// Consumer group id.
    pub const GROUP_ID: &str = "KAFKA_GROUP_ID";
    /// Connection setup timeout, ms.
    pub const CONNECTION_TIMEOUT: &str = "KAFKA_CONNECTION_TIMEOUT";
    /// Request timeout, ms.
    pub const REQUEST_TIMEOUT: &str = "KAFKA_REQUEST_TIMEOUT";
    /// librdkafka retries.
    pub const RETRY_ATTEMPTS: &str = "KAFKA_RETRY_ATTEMPTS";
    /// librdkafka retry backoff, ms.
    pub const RETRY_BACKOFF_MS: &str = "KAFKA_RETRY_BACKOFF_MS";
    /// Delivery timeout, ms.
    pub const DELIVERY_TIMEOUT: &str = "KAFKA_DELIVERY_TIMEOUT";
    /// Log level.
    pub const LOG_LEVEL: &str = "KAFKA_LOG_LEVEL";
    /// Kafka on or off.
    pub const ENABLE_KAFKA: &str = "ENABLE_KAFKA";
    /// Largest batch.
    pub const MAX_BATCH_SIZE: &str = "KAFKA_MAX_BATCH_SIZE";
    /// `transactional.id`.
    pub const TRANSACTIONAL_ID: &str = "KAFKA_TRANSACTIONAL_ID";
    /// Prefix of pass-through librdkafka properties.
    pub const RDKAFKA_PREFIX: &str = "KAFKA_RDKAFKA_";
}

/// A configuration value that does not pass validation.
///
/// The value of a property that may hold a secret ([`is_secret_property`]) is
/// never kept: errors name it and show `[redacted]` in its place, also inside
/// librdkafka's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value could not be parsed or is out of range.
    #[error("invalid value {value:?} for {variable}: {reason}")]
    InvalidValue {
        /// The environment variable or builder setting.
        variable: String,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// librdkafka rejected a property (unknown name or invalid value).
    #[error("librdkafka rejects property {property}={value:?} (from {variable}): {reason}")]
    RdkafkaProperty {
        /// The environment variable or builder setting it came from.
        variable: String,
        /// The librdkafka property name.
        property: String,
        /// The value as given, or [`REDACTED`] when the property may hold a secret.
        value: String,
        /// librdkafka's message.
        reason: String,
    },
}

impl ConfigError {
    /// The environment variable (or builder setting) at fault.
    pub fn variable(&self) -> &str {
        match self {
            ConfigError::InvalidValue { variable, .. }
            | ConfigError::RdkafkaProperty { variable, .. } => variable,
        }
    }

    /// The bad value as given ([`REDACTED`] for a property that may hold a secret).
    pub fn value(&self) -> &str {
        match self {
            ConfigError::InvalidValue { value, .. }
            | ConfigError::RdkafkaProperty { value, .. } => value,
        }
    }

    fn invalid(variable: &str, value: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::InvalidValue {
            variable: variable.to_string(),
            value: value.into(),
            reason: reason.into(),
        }
    }
}

/// What errors and `Debug` output show instead of a value that may be a secret.
pub const REDACTED: &str = "[redacted]";

/// Whether a librdkafka property may hold a secret, judged by its name so that
/// misspelled names (`sasl.pasword`) count too: every `sasl.*` property, and any
/// name mentioning a password, secret, token, key, credential, JAAS or AWS.
/// keel never prints such a value: not in a [`ConfigError`], not in `Debug`.
///
/// ```
/// use keel::kafka::config::is_secret_property;
/// assert!(is_secret_property("sasl.password"));
/// assert!(is_secret_property("sasl.pasword"));
/// assert!(is_secret_property("ssl.key.pem"));
/// assert!(is_secret_property("sasl.oauthbearer.client.secret"));
/// assert!(!is_secret_property("compression.type"));
/// ```
pub fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.starts_with("sasl.")
        || [
            "pass",
            "secret",
            "token",
            "key",
            "credential",
            "jaas",
            "aws",
            "auth",
        ]
        .iter()
        .any(|word| name.contains(word))
}

/// `Debug` of an rdkafka [`ClientConfig`] that names every property and shows
/// the values of those that cannot be secrets ([`is_secret_property`]).
/// rdkafka's own `Debug` hides five well-known names only, so a misspelled or a
/// less common secret property would be printed.
///
/// ```
/// use keel::kafka::config::RedactedClientConfig;
/// let mut c = rdkafka::ClientConfig::new();
/// c.set("sasl.pasword", "hunter2").set("linger.ms", "5");
/// let shown = format!("{:?}", RedactedClientConfig(&c));
/// assert!(shown.contains("sasl.pasword") && shown.contains("linger.ms"));
/// assert!(!shown.contains("hunter2"));
/// ```
#[derive(Clone, Copy)]
pub struct RedactedClientConfig<'a>(pub &'a ClientConfig);

impl fmt::Debug for RedactedClientConfig<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: BTreeMap<&str, &str> = self
            .0
            .config_map()
            .into_iter()
            .map(|(k, v)| (k, if is_secret_property(k) { REDACTED } else { v }))
            .collect();
        f.debug_struct("ClientConfig")
            .field("conf_map", &shown)
            .finish_non_exhaustive()
    }
}

/// How much librdkafka logs, and the level keel forwards its lines at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum KafkaLogLevel {
    /// Nothing at all.
    Nothing,
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Informational lines, warnings and errors (the default).
    #[default]
    Info,
    /// Everything, debug included.
    Debug,
}

impl KafkaLogLevel {
    /// Parses `nothing`, `error`, `warn`, `info` or `debug` (case-insensitive;
    /// `none`, `off`, `warning` and `trace` are accepted too).
    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "nothing" | "none" | "off" => Some(KafkaLogLevel::Nothing),
            "error" => Some(KafkaLogLevel::Error),
            "warn" | "warning" => Some(KafkaLogLevel::Warn),
            "info" => Some(KafkaLogLevel::Info),
            "debug" | "trace" => Some(KafkaLogLevel::Debug),
            _ => None,
        }
    }

    /// The matching librdkafka log level, `None` for [`KafkaLogLevel::Nothing`].
    pub fn rdkafka_level(self) -> Option<RDKafkaLogLevel> {
        match self {
            KafkaLogLevel::Nothing => None,
            KafkaLogLevel::Error => Some(RDKafkaLogLevel::Error),
            KafkaLogLevel::Warn => Some(RDKafkaLogLevel::Warning),
            KafkaLogLevel::Info => Some(RDKafkaLogLevel::Info),
            KafkaLogLevel::Debug => Some(RDKafkaLogLevel::Debug),
        }
    }

    /// librdkafka's syslog-style `log_level` value.
    fn syslog_level(self) -> u8 {
        match self {
            KafkaLogLevel::Nothing => 0,
            KafkaLogLevel::Error => 3,
            KafkaLogLevel::Warn => 4,
            KafkaLogLevel::Info => 6,
            KafkaLogLevel::Debug => 7,
        }
    }
}

/// Which acknowledgement a produce request waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Acks {
    /// Every in-sync replica (the default; required by the idempotent producer).
    #[default]
    All,
    /// The partition leader only.
    Leader,
    /// No acknowledgement at all.
    None,
}

impl Acks {
    fn as_str(self) -> &'static str {
        match self {
            Acks::All => "all",
            Acks::Leader => "1",
            Acks::None => "0",
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
struct Inner {
    enabled: bool,
    brokers: Vec<String>,
    client_id: String,
    group_id: String,
    connection_timeout: Duration,
    request_timeout: Duration,
    retry_attempts: u32,
    retry_backoff: Duration,
    delivery_timeout: Duration,
    log_level: KafkaLogLevel,
    max_batch_size: usize,
    transactional_id: Option<String>,
    idempotence: bool,
    acks: Acks,
    statistics_interval: Duration,
    /// Pass-through properties: name -> (value, where it came from).
    properties: BTreeMap<String, (String, String)>,
}

/// Validated, immutable Kafka configuration.
///
/// Cloning is cheap: clones share one `Arc`'d set of values. Build one with
/// [`KafkaConfig::builder`], [`KafkaConfig::from_env`] or [`KafkaConfig::from_vars`];
/// see the [module docs](self) for every variable and default.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    inner: Arc<Inner>,
}

impl Inner {
    /// Debug output without pass-through values, which may hold secrets
    /// (`sasl.password`, SSL keys): their names only.
    fn fmt_named(&self, f: &mut fmt::Formatter<'_>, name: &str) -> fmt::Result {
        let property_names: Vec<&str> = self.properties.keys().map(String::as_str).collect();
        f.debug_struct(name)
            .field("enabled", &self.enabled)
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("group_id", &self.group_id)
            .field("connection_timeout", &self.connection_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("retry_attempts", &self.retry_attempts)
            .field("retry_backoff", &self.retry_backoff)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("log_level", &self.log_level)
            .field("max_batch_size", &self.max_batch_size)
            .field("transactional_id", &self.transactional_id)
            .field("idempotence", &self.idempotence)
            .field("acks", &self.acks)
            .field("statistics_interval", &self.statistics_interval)
            .field("rdkafka_properties", &property_names)
            .finish()
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt_named(f, "KafkaConfig")
    }
}

impl KafkaConfig {
    /// A builder holding every default.
    pub fn builder() -> KafkaConfigBuilder {
        KafkaConfigBuilder::default()
    }

    /// Reads the process environment (see the [module docs](self)) and validates it.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Like [`from_env`](Self::from_env), from any list of `(name, value)` pairs;
    /// names that are not Kafka variables are ignored.
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        KafkaConfigBuilder::from_vars(vars)?.build()
    }

    /// Whether Kafka is on (`ENABLE_KAFKA`). When it is off, every keel Kafka
    /// service answers a "Kafka disabled" error and nothing connects.
    pub fn enabled(&self) -> bool {
        self.inner.enabled
    }

    /// Bootstrap servers, `host:port` each.
    pub fn brokers(&self) -> &[String] {
        &self.inner.brokers
    }

    /// Bootstrap servers as librdkafka's comma-separated `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        self.inner.brokers.join(",")
    }

    /// `client.id`.
    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// Consumer group id.
    pub fn group_id(&self) -> &str {
        &self.inner.group_id
    }

    /// Connection setup timeout.
    pub fn connection_timeout(&self) -> Duration {
        self.inner.connection_timeout
    }

    /// Request timeout; also the default timeout of metadata requests.
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// librdkafka's retries of a failed request.
    pub fn retry_attempts(&self) -> u32 {
        self.inner.retry_attempts
    }

    /// librdkafka's backoff between retries.
    pub fn retry_backoff(&self) -> Duration {
        self.inner.retry_backoff
    }

    /// The bound on waiting for a delivery acknowledgement (`message.timeout.ms`):
    /// `KAFKA_DELIVERY_TIMEOUT`, or the `message.timeout.ms` passed through
    /// (`KAFKA_RDKAFKA_MESSAGE_TIMEOUT_MS`), which wins like every pass-through.
    pub fn delivery_timeout(&self) -> Duration {
        self.inner.delivery_timeout
    }

    /// Log level.
    pub fn log_level(&self) -> KafkaLogLevel {
        self.inner.log_level
    }

    /// Largest batch a publish accepts.
    pub fn max_batch_size(&self) -> usize {
        self.inner.max_batch_size
    }

    /// `transactional.id`, if set.
    pub fn transactional_id(&self) -> Option<&str> {
        self.inner.transactional_id.as_deref()
    }

    /// Whether the producer is idempotent (default `true`).
    pub fn idempotence(&self) -> bool {
        self.inner.idempotence
    }

    /// Producer acknowledgements (default [`Acks::All`]).
    pub fn acks(&self) -> Acks {
        self.inner.acks
    }

    /// Interval of librdkafka statistics, which drive the connection state.
    pub fn statistics_interval(&self) -> Duration {
        self.inner.statistics_interval
    }

    /// Pass-through librdkafka properties (name, value).
    pub fn rdkafka_properties(&self) -> impl Iterator<Item = (&str, &str)> {
        self.inner
            .properties
            .iter()
            .map(|(k, (v, _))| (k.as_str(), v.as_str()))
    }

    /// Properties common to every client: servers, id, timeouts, logging,
    /// statistics, then the pass-through properties (which win).
    pub fn base_client_config(&self) -> ClientConfig {
        let i = &self.inner;
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap_servers())
            .set("client.id", &i.client_id)
            .set(
                "socket.connection.setup.timeout.ms",
                millis(i.connection_timeout).to_string(),
            )
            .set("retry.backoff.ms", millis(i.retry_backoff).to_string())
            .set("log_level", i.log_level.syslog_level().to_string())
            .set(
                "statistics.interval.ms",
                millis(i.statistics_interval).to_string(),
            );
        if let Some(level) = i.log_level.rdkafka_level() {
            c.set_log_level(level);
        }
        c
    }

    /// The producer's librdkafka config: [`base_client_config`](Self::base_client_config)
    /// plus idempotence, acks, retries, request and delivery timeouts, then the
    /// pass-through properties.
    pub fn producer_client_config(&self) -> ClientConfig {
        let i = &self.inner;
        let mut c = self.base_client_config();
        c.set("enable.idempotence", i.idempotence.to_string())
            .set("acks", i.acks.as_str())
            .set("retries", i.retry_attempts.to_string())
            .set("request.timeout.ms", millis(i.request_timeout).to_string())
            .set("message.timeout.ms", millis(i.delivery_timeout).to_string());
        self.apply_properties(&mut c);
        c
    }

    /// The consumer's librdkafka config: [`base_client_config`](Self::base_client_config)
    /// plus `group.id`, then the pass-through properties. The consumer runtime
    /// adds its own settings (offset commits, partition assignment) on top.
    pub fn consumer_client_config(&self) -> ClientConfig {
        let mut c = self.base_client_config();
        c.set("group.id", &self.inner.group_id);
        self.apply_properties(&mut c);
        c
    }

    /// The admin client's librdkafka config: the base config plus pass-through
    /// properties.
    pub fn admin_client_config(&self) -> ClientConfig {
        let mut c = self.base_client_config();
        self.apply_properties(&mut c);
        c
    }

    /// `text` with the value of every property that may be a secret replaced by
    /// [`REDACTED`] (librdkafka quotes invalid values in its messages).
    fn scrub(&self, mut text: String) -> String {
        for (name, (value, _)) in &self.inner.properties {
            if !value.is_empty() && is_secret_property(name) && text.contains(value.as_str()) {
                text = text.replace(value.as_str(), REDACTED);
            }
        }
        text
    }

    /// Writes the pass-through properties into `c`.
    pub fn apply_properties(&self, c: &mut ClientConfig) {
        for (k, (v, _)) in &self.inner.properties {
            c.set(k, v);
        }
    }
}

fn millis(d: Duration) -> u128 {
    d.as_millis()
}

/// Builds a [`KafkaConfig`]; every setting starts at its documented default.
#[derive(Clone)]
pub struct KafkaConfigBuilder {
    inner: Inner,
}

impl fmt::Debug for KafkaConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt_named(f, "KafkaConfigBuilder")
    }
}

impl Default for KafkaConfigBuilder {
    fn default() -> Self {
        KafkaConfigBuilder {
            inner: Inner {
                enabled: true,
                brokers: vec![DEFAULT_BROKERS.to_string()],
                client_id: DEFAULT_CLIENT_ID.to_string(),
                group_id: DEFAULT_GROUP_ID.to_string(),
                connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
                retry_attempts: DEFAULT_RETRY_ATTEMPTS,
                retry_backoff: DEFAULT_RETRY_BACKOFF,
                delivery_timeout: DEFAULT_DELIVERY_TIMEOUT,
                log_level: KafkaLogLevel::Info,
                max_batch_size: DEFAULT_MAX_BATCH_SIZE,
                transactional_id: None,
                idempotence: true,
                acks: Acks::All,
                statistics_interval: DEFAULT_STATISTICS_INTERVAL,
                properties: BTreeMap::new(),
            },
        }
    }
}

fn parse_millis(variable: &str, value: &str) -> Result<Duration, ConfigError> {
    value
        .trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| ConfigError::invalid(variable, value, "expected whole milliseconds"))
}

fn parse_bool(variable: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::invalid(
            variable,
            value,
            "expected true or false",
        )),
    }
}

fn parse_number<T: std::str::FromStr>(variable: &str, value: &str) -> Result<T, ConfigError> {
    value
        .trim()
        .parse::<T>()
        .map_err(|_| ConfigError::invalid(variable, value, "expected a non-negative integer"))
}

/// `SECURITY_PROTOCOL` -> `security.protocol`; `__` -> `_`.
fn property_from_env_suffix(suffix: &str) -> String {
    suffix
        .to_ascii_lowercase()
        .split("__")
        .map(|part| part.replace('_', "."))
        .collect::<Vec<_>>()
        .join("_")
}

impl KafkaConfigBuilder {
    /// A builder seeded from `(name, value)` pairs with the environment variable
    /// names of the [module docs](self). Unparseable values fail here; range checks
    /// happen in [`build`](Self::build).
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut b = KafkaConfigBuilder::default();
        for (name, value) in vars {
            let (name, value) = (name.as_ref(), value.as_ref());
            match name {
                env::BROKERS => b.inner.brokers = split_brokers(value),
                env::CLIENT_ID => b.inner.client_id = value.to_string(),
                env::GROUP_ID => b.inner.group_id = value.to_string(),
                env::CONNECTION_TIMEOUT => b.inner.connection_timeout = parse_millis(name, value)?,
                env::REQUEST_TIMEOUT => b.inner.request_timeout = parse_millis(name, value)?,
                env::RETRY_ATTEMPTS => b.inner.retry_attempts = parse_number(name, value)?,
                env::RETRY_BACKOFF_MS => b.inner.retry_backoff = parse_millis(name, value)?,
                env::DELIVERY_TIMEOUT => b.inner.delivery_timeout = parse_millis(name, value)?,
                env::LOG_LEVEL => {
                    b.inner.log_level = KafkaLogLevel::parse(value).ok_or_else(|| {
                        ConfigError::invalid(
                            name,
                            value,
                            "expected nothing, error, warn, info or debug",
                        )
                    })?
                }
                env::ENABLE_KAFKA => b.inner.enabled = parse_bool(name, value)?,
                env::MAX_BATCH_SIZE => b.inner.max_batch_size = parse_number(name, value)?,
                env::TRANSACTIONAL_ID => {
                    b.inner.transactional_id = Some(value.to_string()).filter(|v| !v.is_empty())
                }
                _ => {
                    if let Some(suffix) = name.strip_prefix(env::RDKAFKA_PREFIX) {
                        if suffix.is_empty() {
                            continue;
                        }
                        let property = property_from_env_suffix(suffix);
                        b.inner
                            .properties
                            .insert(property, (value.to_string(), name.to_string()));
                    }
                }
            }
        }
        Ok(b)
    }

    /// Kafka on or off (default on).
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.inner.enabled = enabled;
        self
    }

    /// Bootstrap servers, `host:port` each (default `localhost:9092`).
    pub fn brokers<I, S>(mut self, brokers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.inner.brokers = brokers.into_iter().map(Into::into).collect();
        self
    }

    /// `client.id` (default `keel`).
    pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
        self.inner.client_id = client_id.into();
        self
    }

    /// Consumer group id (default `keel-consumer-group`).
    pub fn group_id(mut self, group_id: impl Into<String>) -> Self {
        self.inner.group_id = group_id.into();
        self
    }

    /// Connection setup timeout (default 10 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.inner.connection_timeout = timeout;
        self
    }

    /// Request timeout (default 30 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.inner.request_timeout = timeout;
        self
    }

    /// librdkafka retries of a failed request (default 5).
    pub fn retry_attempts(mut self, attempts: u32) -> Self {
        self.inner.retry_attempts = attempts;
        self
    }

    /// librdkafka backoff between retries (default 300 ms).
    pub fn retry_backoff(mut self, backoff: Duration) -> Self {
        self.inner.retry_backoff = backoff;
        self
    }

    /// The bound on waiting for a delivery acknowledgement (default 30 s).
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.inner.delivery_timeout = timeout;
        self
    }

    /// Log level (default info).
    pub fn log_level(mut self, level: KafkaLogLevel) -> Self {
        self.inner.log_level = level;
        self
    }

    /// Largest batch a publish accepts (default 1,000).
    pub fn max_batch_size(mut self, size: usize) -> Self {
        self.inner.max_batch_size = size;
        self
    }

    /// `transactional.id` for the transactional publisher (default unset).
    pub fn transactional_id(mut self, id: impl Into<String>) -> Self {
        self.inner.transactional_id = Some(id.into());
        self
    }

    /// Idempotent producer (default `true`; requires [`Acks::All`]).
    pub fn idempotence(mut self, idempotence: bool) -> Self {
        self.inner.idempotence = idempotence;
        self
    }

    /// Producer acknowledgements (default [`Acks::All`]).
    pub fn acks(mut self, acks: Acks) -> Self {
        self.inner.acks = acks;
        self
    }

    /// Interval of librdkafka statistics, which drive the connection state
    /// (default 1 s; zero turns statistics off and the state then follows errors
    /// and deliveries only).
    pub fn statistics_interval(mut self, interval: Duration) -> Self {
        self.inner.statistics_interval = interval;
        self
    }

    /// Any librdkafka property, e.g. `("security.protocol", "SASL_SSL")`; applied
    /// after keel's own mapping, so it wins.
    pub fn rdkafka_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        let origin = format!("rdkafka_property({name})");
        self.inner.properties.insert(name, (value.into(), origin));
        self
    }

    /// Validates every value and freezes the config.
    pub fn build(mut self) -> Result<KafkaConfig, ConfigError> {
        self.adopt_passed_through_delivery_timeout()?;
        if self.inner.brokers.is_empty() {
            return Err(ConfigError::invalid(
                env::BROKERS,
                "",
                "at least one host:port is required",
            ));
        }
        for broker in &self.inner.brokers {
            validate_broker(broker)?;
        }
        if self.inner.client_id.trim().is_empty() {
            return Err(ConfigError::invalid(
                env::CLIENT_ID,
                &self.inner.client_id,
                "must not be empty",
            ));
        }
        if self.inner.group_id.trim().is_empty() {
            return Err(ConfigError::invalid(
                env::GROUP_ID,
                &self.inner.group_id,
                "must not be empty",
            ));
        }
        positive_ms(
            env::CONNECTION_TIMEOUT,
            self.inner.connection_timeout,
            1_000,
            2_147_483_647,
        )?;
        positive_ms(env::REQUEST_TIMEOUT, self.inner.request_timeout, 1, 900_000)?;
        positive_ms(
            env::DELIVERY_TIMEOUT,
            self.inner.delivery_timeout,
            1,
            2_147_483_647,
        )?;
        if self.inner.retry_backoff.as_millis() > 300_000 {
            return Err(ConfigError::invalid(
                env::RETRY_BACKOFF_MS,
                self.inner.retry_backoff.as_millis().to_string(),
                "at most 300000 ms",
            ));
        }
        if self.inner.retry_attempts > i32::MAX as u32 {
            return Err(ConfigError::invalid(
                env::RETRY_ATTEMPTS,
                self.inner.retry_attempts.to_string(),
                "at most 2147483647",
            ));
        }
        if self.inner.max_batch_size == 0 {
            return Err(ConfigError::invalid(
                env::MAX_BATCH_SIZE,
                "0",
                "must be at least 1",
            ));
        }
        if self.inner.idempotence && self.inner.acks != Acks::All {
            return Err(ConfigError::invalid(
                "acks",
                self.inner.acks.as_str(),
                "the idempotent producer requires acks=all",
            ));
        }
        if self.inner.idempotence && self.inner.retry_attempts == 0 {
            return Err(ConfigError::invalid(
                env::RETRY_ATTEMPTS,
                "0",
                "the idempotent producer requires at least one retry",
            ));
        }
        if self.inner.statistics_interval.as_millis() > 86_400_000 {
            return Err(ConfigError::invalid(
                "statistics_interval",
                self.inner.statistics_interval.as_millis().to_string(),
                "at most 86400000 ms",
            ));
        }
        if let Some(id) = &self.inner.transactional_id
            && id.trim().is_empty()
        {
            return Err(ConfigError::invalid(
                env::TRANSACTIONAL_ID,
                id,
                "must not be empty",
            ));
        }
        let config = KafkaConfig {
            inner: Arc::new(self.inner),
        };
        check_with_librdkafka(&config)?;
        Ok(config)
    }
}

impl KafkaConfigBuilder {
    /// A `message.timeout.ms` (or its alias `delivery.timeout.ms`) passed
    /// through becomes the delivery timeout, so that every bound keel derives
    /// from it (the publish stack's timeout, a batch's bound) follows the value
    /// librdkafka really uses. librdkafka's `0` (no limit) is refused: keel bounds
    /// every publish.
    fn adopt_passed_through_delivery_timeout(&mut self) -> Result<(), ConfigError> {
        for name in ["message.timeout.ms", "delivery.timeout.ms"] {
            let Some((value, origin)) = self.inner.properties.get(name) else {
                continue;
            };
            let ms = value.trim().parse::<u64>().map_err(|_| {
                ConfigError::invalid(origin, value.as_str(), "expected whole milliseconds")
            })?;
            if ms == 0 || ms > 2_147_483_647 {
                return Err(ConfigError::invalid(
                    origin,
                    value.as_str(),
                    "expected between 1 and 2147483647 ms (keel bounds every publish; 0, no limit, is refused)",
                ));
            }
            self.inner.delivery_timeout = Duration::from_millis(ms);
        }
        Ok(())
    }
}

fn split_brokers(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn validate_broker(broker: &str) -> Result<(), ConfigError> {
    // Accept an optional scheme-like prefix librdkafka understands (PLAINTEXT://).
    let hostport = broker.rsplit("://").next().unwrap_or(broker);
    let Some((host, port)) = hostport.rsplit_once(':') else {
        return Err(ConfigError::invalid(
            env::BROKERS,
            broker,
            "expected host:port",
        ));
    };
    if host.is_empty() || host.chars().any(char::is_whitespace) {
        return Err(ConfigError::invalid(
            env::BROKERS,
            broker,
            "expected host:port with a non-empty host",
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(ConfigError::invalid(
            env::BROKERS,
            broker,
            "expected a port between 1 and 65535",
        )),
    }
}

fn positive_ms(variable: &str, d: Duration, min: u128, max: u128) -> Result<(), ConfigError> {
    let ms = d.as_millis();
    if ms < min || ms > max {
        return Err(ConfigError::invalid(
            variable,
            ms.to_string(),
            format!("expected between {min} and {max} ms"),
        ));
    }
    Ok(())
}

/// Hands every property to librdkafka once (no client is created) so unknown
/// names and invalid values fail at build time, with the variable they came from.
fn check_with_librdkafka(config: &KafkaConfig) -> Result<(), ConfigError> {
    use rdkafka::error::KafkaError;
    let check = |c: ClientConfig| -> Result<(), ConfigError> {
        match c.create_native_config() {
            Ok(_) => Ok(()),
            Err(KafkaError::ClientConfig(_, reason, property, value)) => {
                let variable = config
                    .inner
                    .properties
                    .get(&property)
                    .map(|(_, origin)| origin.clone())
                    .unwrap_or_else(|| property.clone());
                let value = if is_secret_property(&property) {
                    REDACTED.to_string()
                } else {
                    value
                };
                Err(ConfigError::RdkafkaProperty {
                    variable,
                    property,
                    value,
                    reason: config.scrub(reason),
                })
            }
            Err(other) => Err(ConfigError::invalid(
                "rdkafka",
                "",
                config.scrub(other.to_string()),
            )),
        }
    };
    check(config.producer_client_config())?;
    check(config.consumer_client_config())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_seed() {
        let c = KafkaConfig::from_vars(Vec::<(String, String)>::new()).unwrap();
        assert!(c.enabled());
        assert_eq!(c.brokers(), ["localhost:9092"]);
        assert_eq!(c.client_id(), "keel");
        assert_eq!(c.group_id(), "keel-consumer-group");
        assert_eq!(c.connection_timeout(), Duration::from_secs(10));
        assert_eq!(c.request_timeout(), Duration::from_secs(30));
        assert_eq!(c.retry_attempts(), 5);
        assert_eq!(c.retry_backoff(), Duration::from_millis(300));
        assert_eq!(c.delivery_timeout(), Duration::from_secs(30));
        assert_eq!(c.log_level(), KafkaLogLevel::Info);
        assert_eq!(c.max_batch_size(), 1000);
        assert!(c.idempotence());
        assert_eq!(c.acks(), Acks::All);
        let p = c.producer_client_config();
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("acks"), Some("all"));
        assert_eq!(p.get("message.timeout.ms"), Some("30000"));
        assert_eq!(p.get("socket.connection.setup.timeout.ms"), Some("10000"));
        assert_eq!(p.get("retries"), Some("5"));
        assert_eq!(p.get("retry.backoff.ms"), Some("300"));
    }

    #[test]
    fn reads_every_variable() {
        let c = KafkaConfig::from_vars([
            ("KAFKA_BROKERS", "a:1, b:2"),
            ("KAFKA_CLIENT_ID", "svc"),
            ("KAFKA_GROUP_ID", "grp"),
            ("KAFKA_CONNECTION_TIMEOUT", "5000"),
            ("KAFKA_REQUEST_TIMEOUT", "7000"),
            ("KAFKA_RETRY_ATTEMPTS", "3"),
            ("KAFKA_RETRY_BACKOFF_MS", "100"),
            ("KAFKA_DELIVERY_TIMEOUT", "9000"),
            ("KAFKA_LOG_LEVEL", "DEBUG"),
            ("ENABLE_KAFKA", "false"),
            ("KAFKA_MAX_BATCH_SIZE", "50"),
            ("KAFKA_TRANSACTIONAL_ID", "tx-1"),
            ("KAFKA_RDKAFKA_COMPRESSION_TYPE", "lz4"),
            ("UNRELATED", "x"),
        ])
        .unwrap();
        assert!(!c.enabled());
        assert_eq!(c.brokers(), ["a:1", "b:2"]);
        assert_eq!(c.bootstrap_servers(), "a:1,b:2");
        assert_eq!(c.client_id(), "svc");
        assert_eq!(c.group_id(), "grp");
        assert_eq!(c.connection_timeout(), Duration::from_secs(5));
        assert_eq!(c.request_timeout(), Duration::from_secs(7));
        assert_eq!(c.retry_attempts(), 3);
        assert_eq!(c.retry_backoff(), Duration::from_millis(100));
        assert_eq!(c.delivery_timeout(), Duration::from_secs(9));
        assert_eq!(c.log_level(), KafkaLogLevel::Debug);
        assert_eq!(c.max_batch_size(), 50);
        assert_eq!(c.transactional_id(), Some("tx-1"));
        let props: Vec<_> = c.rdkafka_properties().collect();
        assert_eq!(props, [("compression.type", "lz4")]);
        assert_eq!(
            c.producer_client_config().get("compression.type"),
            Some("lz4")
        );
        assert_eq!(c.consumer_client_config().get("group.id"), Some("grp"));
    }

    #[test]
    fn errors_name_the_variable_and_value() {
        let cases = [
            ("KAFKA_REQUEST_TIMEOUT", "soon"),
            ("KAFKA_CONNECTION_TIMEOUT", "-1"),
            ("KAFKA_RETRY_ATTEMPTS", "many"),
            ("ENABLE_KAFKA", "maybe"),
            ("KAFKA_LOG_LEVEL", "loud"),
            ("KAFKA_BROKERS", "no-port"),
            ("KAFKA_BROKERS", "host:99999"),
            ("KAFKA_BROKERS", " , "),
            ("KAFKA_REQUEST_TIMEOUT", "0"),
            ("KAFKA_MAX_BATCH_SIZE", "0"),
            ("KAFKA_CLIENT_ID", " "),
        ];
        for (var, value) in cases {
            let err = KafkaConfig::from_vars([(var, value)]).unwrap_err();
            assert_eq!(err.variable(), var, "{var}={value}: {err}");
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn librdkafka_rejects_unknown_properties_at_build() {
        let err = KafkaConfig::from_vars([("KAFKA_RDKAFKA_NO_SUCH_THING", "1")]).unwrap_err();
        assert!(matches!(err, ConfigError::RdkafkaProperty { .. }), "{err}");
        assert_eq!(err.variable(), "KAFKA_RDKAFKA_NO_SUCH_THING");
        assert_eq!(err.value(), "1");

        let err = KafkaConfig::builder()
            .rdkafka_property("security.protocol", "carrier-pigeon")
            .build()
            .unwrap_err();
        assert_eq!(err.variable(), "rdkafka_property(security.protocol)");
        assert_eq!(err.value(), "carrier-pigeon");

        let ok = KafkaConfig::builder()
            .rdkafka_property("security.protocol", "SASL_SSL")
            .rdkafka_property("sasl.mechanisms", "PLAIN")
            .build()
            .unwrap();
        assert_eq!(
            ok.producer_client_config().get("security.protocol"),
            Some("SASL_SSL")
        );
    }

    #[test]
    fn idempotence_requires_acks_all() {
        let err = KafkaConfig::builder()
            .acks(Acks::Leader)
            .build()
            .unwrap_err();
        assert_eq!(err.variable(), "acks");
        let ok = KafkaConfig::builder()
            .idempotence(false)
            .acks(Acks::Leader)
            .build()
            .unwrap();
        assert_eq!(ok.producer_client_config().get("acks"), Some("1"));
    }

    #[test]
    fn env_suffix_to_property() {
        assert_eq!(
            property_from_env_suffix("SECURITY_PROTOCOL"),
            "security.protocol"
        );
        assert_eq!(
            property_from_env_suffix("SASL_KERBEROS__X"),
            "sasl.kerberos_x"
        );
    }

    #[test]
    fn debug_hides_property_values() {
        let c = KafkaConfig::builder()
            .rdkafka_property("sasl.password", "hunter2")
            .build()
            .unwrap();
        let shown = format!("{c:?}");
        assert!(shown.contains("sasl.password"));
        assert!(!shown.contains("hunter2"));
    }

    #[test]
    fn a_passed_through_message_timeout_is_the_delivery_timeout() {
        let c = KafkaConfig::from_vars([("KAFKA_RDKAFKA_MESSAGE_TIMEOUT_MS", "2000")]).unwrap();
        assert_eq!(c.delivery_timeout(), Duration::from_secs(2));
        assert_eq!(
            c.producer_client_config().get("message.timeout.ms"),
            Some("2000")
        );
        // It wins over KAFKA_DELIVERY_TIMEOUT, like every pass-through; the alias too.
        let c = KafkaConfig::from_vars([
            ("KAFKA_DELIVERY_TIMEOUT", "9000"),
            ("KAFKA_RDKAFKA_DELIVERY_TIMEOUT_MS", "4000"),
        ])
        .unwrap();
        assert_eq!(c.delivery_timeout(), Duration::from_secs(4));
        // librdkafka's 0 (no limit) and garbage are refused, naming the variable.
        for bad in ["0", "soon"] {
            let err =
                KafkaConfig::from_vars([("KAFKA_RDKAFKA_MESSAGE_TIMEOUT_MS", bad)]).unwrap_err();
            assert_eq!(err.variable(), "KAFKA_RDKAFKA_MESSAGE_TIMEOUT_MS", "{err}");
        }
    }

    #[test]
    fn a_misspelled_secret_property_is_refused_without_its_value() {
        let secret = "s3cr3t-hunter2-value";
        let err = KafkaConfig::from_vars([("KAFKA_RDKAFKA_SASL_PASWORD", secret)]).unwrap_err();
        assert_eq!(err.variable(), "KAFKA_RDKAFKA_SASL_PASWORD");
        assert_eq!(err.value(), REDACTED);
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(shown.contains("sasl.pasword"), "{shown}");
            assert!(!shown.contains(secret), "{shown}");
        }
        // An invalid value of a secret property: librdkafka quotes it in its reason.
        let err = KafkaConfig::builder()
            .rdkafka_property("ssl.key.password", secret)
            .rdkafka_property("sasl.oauthbearer.method", secret)
            .build()
            .unwrap_err();
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains(secret), "{shown}");
        }
        // Values that cannot be secrets are still shown, to help fix them.
        let err = KafkaConfig::from_vars([("KAFKA_RDKAFKA_COMPRESSION_TYPE", "zzz")]).unwrap_err();
        assert_eq!(err.value(), "zzz");
    }

    #[test]
    fn redacted_client_config_hides_every_secret_value() {
        let c = KafkaConfig::builder()
            .rdkafka_property("sasl.username", "user-1")
            .rdkafka_property("sasl.password", "pw-1")
            .rdkafka_property("ssl.key.pem", "pem-1")
            .rdkafka_property("ssl.keystore.password", "cs-1")
            .build()
            .unwrap();
        let shown = format!("{:?}", RedactedClientConfig(&c.producer_client_config()));
        for secret in ["user-1", "pw-1", "pem-1", "cs-1"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(
            shown.contains("ssl.key.pem") && shown.contains("acks"),
            "{shown}"
        );
    }
}
