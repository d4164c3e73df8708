//! [`S3Config`]: where and how to reach S3, checked once and immutable after.
//!
//! Read from the environment with [`S3Config::from_env`] (the seed's variable
//! names) or built in code with [`S3Config::builder`]:
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `AWS_REGION` | region to sign for (also needed to presign) | required in production, else `us-east-1` |
//! | `AWS_S3_BUCKET` | the bucket every operation uses | required in production, else `keel-dev` |
//! | `AWS_S3_ENDPOINT` | a custom endpoint (s3s, moto, LocalStack, ...), `http(s)://host[:port]` | AWS |
//! | `AWS_S3_FORCE_PATH_STYLE` | `true`/`false` (also `1`/`0`, `yes`/`no`) | `true` when `AWS_S3_ENDPOINT` is set, else `false` |
//! | `KEEL_ENV` (or `APP_ENV`) | `production` (or `prod`) turns on production mode | development |
//!
//! Credentials come from the standard AWS chain (environment, profile, web
//! identity, ECS, IMDS) when the client is built, unless the builder was given
//! static ones. In production mode a missing region or bucket is an error naming
//! the variable; in development the defaults above are used and logged. Every
//! value is checked here, so a bad endpoint fails at start, not on the first
//! request.
//!
//! The config is immutable: it has getters only, and [`S3Config::to_builder`] makes
//! a modified copy.
//!
//! ```
//! use keel::s3::config::S3Config;
//! use std::time::Duration;
//!
//! let config = S3Config::builder()
//!     .region("eu-west-1")
//!     .bucket("media")
//!     .endpoint("http://127.0.0.1:8014")
//!     .request_timeout(Duration::from_secs(10))
//!     .build()
//!     .unwrap();
//! assert!(config.force_path_style()); // custom endpoint: path style by default
//! assert_eq!(config.pool_max_idle_per_host(), 50);
//!
//! let err = S3Config::from_lookup(|name| match name {
//!     "KEEL_ENV" => Some("production".to_string()),
//!     "AWS_REGION" => Some("eu-west-1".to_string()),
//!     _ => None,
//! })
//! .unwrap_err();
//! assert_eq!(err.to_string(), "AWS_S3_BUCKET is required in production mode");
//! ```

use std::fmt;
use std::time::Duration;

use aws_sdk_s3::config::Credentials;

/// The region used in development mode when `AWS_REGION` is not set.
pub const DEFAULT_DEV_REGION: &str = "us-east-1";
/// The bucket used in development mode when `AWS_S3_BUCKET` is not set.
pub const DEFAULT_DEV_BUCKET: &str = "keel-dev";
/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default timeout of one HTTP request (one attempt).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of idle keep-alive connections kept per host.
pub const DEFAULT_POOL_MAX_IDLE_PER_HOST: usize = 50;
/// Default time an idle keep-alive connection is kept.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Production or development: decides whether missing values are errors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Environment {
    /// Missing values get development defaults.
    #[default]
    Development,
    /// `AWS_REGION` and `AWS_S3_BUCKET` are required.
    Production,
}

impl Environment {
    /// Reads `KEEL_ENV`, then `APP_ENV`: `production` or `prod` (any case) means
    /// production; anything else, or nothing, development.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let value = lookup("KEEL_ENV")
            .filter(|v| !v.trim().is_empty())
            .or_else(|| lookup("APP_ENV"));
        match value.as_deref().map(|v| v.trim().to_ascii_lowercase()) {
            Some(v) if v == "production" || v == "prod" => Environment::Production,
            _ => Environment::Development,
        }
    }
}

/// A config value that is missing or wrong. Names the environment variable (or,
/// for the builder, the variable the setting corresponds to).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum S3ConfigError {
    /// A value required in production mode is missing.
    #[error("{var} is required in production mode")]
    Missing {
        /// The variable.
        var: &'static str,
    },
    /// A value is present but unusable.
    #[error("{var}={value:?} is invalid: {reason}")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Where and how to reach S3. Immutable; see the [module docs](self).
#[derive(Clone)]
pub struct S3Config {
    environment: Environment,
    region: String,
    bucket: String,
    endpoint: Option<String>,
    force_path_style: bool,
    checksums_when_required: bool,
    connect_timeout: Duration,
    request_timeout: Duration,
    pool_max_idle_per_host: usize,
    pool_idle_timeout: Duration,
    credentials: Option<Credentials>,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_config(
            f,
            "S3Config",
            [
                ("environment", &self.environment),
                ("region", &self.region),
                ("bucket", &self.bucket),
                ("force_path_style", &self.force_path_style),
                ("checksums_when_required", &self.checksums_when_required),
            ],
            self.endpoint.as_deref(),
            self.credentials.is_some(),
            [
                ("connect_timeout", &self.connect_timeout),
                ("request_timeout", &self.request_timeout),
                ("pool_max_idle_per_host", &self.pool_max_idle_per_host),
                ("pool_idle_timeout", &self.pool_idle_timeout),
            ],
        )
    }
}

/// `Debug` of a config or its builder without secrets: the endpoint's user
/// info and the static credentials (the SDK's `Credentials` hides only the
/// secret key, not the access key id) are redacted.
fn debug_config(
    f: &mut fmt::Formatter<'_>,
    name: &str,
    first: [(&str, &dyn fmt::Debug); 5],
    endpoint: Option<&str>,
    static_credentials: bool,
    rest: [(&str, &dyn fmt::Debug); 4],
) -> fmt::Result {
    let mut d = f.debug_struct(name);
    for (field, value) in first {
        d.field(field, value);
    }
    d.field("endpoint", &endpoint.map(redact_user_info));
    for (field, value) in rest {
        d.field(field, value);
    }
    d.field(
        "credentials",
        &static_credentials.then_some("static (redacted)"),
    );
    d.finish()
}

impl S3Config {
    /// A builder with the documented defaults.
    pub fn builder() -> S3ConfigBuilder {
        S3ConfigBuilder::default()
    }

    /// Reads the process environment (see the [module docs](self)).
    pub fn from_env() -> Result<Self, S3ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads variables through `lookup` (the environment, a file, a test map).
    /// Empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, S3ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let mut builder = S3Config::builder().environment(Environment::from_lookup(get));
        if let Some(region) = get("AWS_REGION") {
            builder = builder.region(region);
        }
        if let Some(bucket) = get("AWS_S3_BUCKET") {
            builder = builder.bucket(bucket);
        }
        if let Some(endpoint) = get("AWS_S3_ENDPOINT") {
            builder = builder.endpoint(endpoint);
        }
        if let Some(value) = get("AWS_S3_FORCE_PATH_STYLE") {
            builder = builder.force_path_style(parse_bool("AWS_S3_FORCE_PATH_STYLE", &value)?);
        }
        builder.build()
    }

    /// A builder holding this config's values, to derive a modified copy.
    pub fn to_builder(&self) -> S3ConfigBuilder {
        S3ConfigBuilder {
            environment: self.environment,
            region: Some(self.region.clone()),
            bucket: Some(self.bucket.clone()),
            endpoint: self.endpoint.clone(),
            force_path_style: Some(self.force_path_style),
            checksums_when_required: Some(self.checksums_when_required),
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            pool_max_idle_per_host: self.pool_max_idle_per_host,
            pool_idle_timeout: self.pool_idle_timeout,
            credentials: self.credentials.clone(),
        }
    }

    /// Production or development.
    pub fn environment(&self) -> Environment {
        self.environment
    }

    /// The region to sign for.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The custom endpoint, if any.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// Whether requests use path-style addressing (`http://host/bucket/key`).
    pub fn force_path_style(&self) -> bool {
        self.force_path_style
    }

    /// Whether request checksums are computed, and response checksums validated,
    /// only when an operation requires them (on by default for custom endpoints:
    /// the SDK's default checksums break many S3-compatible servers).
    pub fn checksums_when_required(&self) -> bool {
        self.checksums_when_required
    }

    /// TCP (and TLS) connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Timeout of one HTTP request (one attempt).
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Idle keep-alive connections kept per host.
    pub fn pool_max_idle_per_host(&self) -> usize {
        self.pool_max_idle_per_host
    }

    /// How long an idle keep-alive connection is kept.
    pub fn pool_idle_timeout(&self) -> Duration {
        self.pool_idle_timeout
    }

    /// Static credentials, when given; otherwise the standard AWS chain is used.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }
}

fn parse_bool(var: &'static str, value: &str) -> Result<bool, S3ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(S3ConfigError::Invalid {
            var,
            value: value.to_string(),
            reason: "expected true or false",
        }),
    }
}

fn check_endpoint(endpoint: &str) -> Result<(), S3ConfigError> {
    let invalid = |reason| S3ConfigError::Invalid {
        var: "AWS_S3_ENDPOINT",
        value: endpoint.to_string(),
        reason,
    };
    let uri: http::Uri = endpoint.parse().map_err(|_| invalid("not a valid URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(invalid("the scheme must be http or https")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("the URL has no host"));
    }
    Ok(())
}

fn check_region(region: &str) -> Result<(), S3ConfigError> {
    let ok = region
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok && !region.is_empty() {
        Ok(())
    } else {
        Err(S3ConfigError::Invalid {
            var: "AWS_REGION",
            value: region.to_string(),
            reason: "a region is letters, digits and '-'",
        })
    }
}

fn check_bucket(bucket: &str) -> Result<(), S3ConfigError> {
    let invalid = |reason| S3ConfigError::Invalid {
        var: "AWS_S3_BUCKET",
        value: bucket.to_string(),
        reason,
    };
    if !(3..=63).contains(&bucket.len()) {
        return Err(invalid("a bucket name is 3 to 63 characters"));
    }
    let allowed = bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_'));
    if !allowed {
        return Err(invalid(
            "a bucket name is lowercase letters, digits, '-', '.' and '_'",
        ));
    }
    Ok(())
}

/// Builds an [`S3Config`]; every setting has the default documented on its method.
#[derive(Clone)]
pub struct S3ConfigBuilder {
    environment: Environment,
    region: Option<String>,
    bucket: Option<String>,
    endpoint: Option<String>,
    force_path_style: Option<bool>,
    checksums_when_required: Option<bool>,
    connect_timeout: Duration,
    request_timeout: Duration,
    pool_max_idle_per_host: usize,
    pool_idle_timeout: Duration,
    credentials: Option<Credentials>,
}

// By hand: the derived `Debug` would print the access key id and an
// endpoint's user info.
impl fmt::Debug for S3ConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_config(
            f,
            "S3ConfigBuilder",
            [
                ("environment", &self.environment),
                ("region", &self.region),
                ("bucket", &self.bucket),
                ("force_path_style", &self.force_path_style),
                ("checksums_when_required", &self.checksums_when_required),
            ],
            self.endpoint.as_deref(),
            self.credentials.is_some(),
            [
                ("connect_timeout", &self.connect_timeout),
                ("request_timeout", &self.request_timeout),
                ("pool_max_idle_per_host", &self.pool_max_idle_per_host),
                ("pool_idle_timeout", &self.pool_idle_timeout),
            ],
        )
    }
}

/// `scheme://user:pass@host` shown as `scheme://[redacted]@host`.
fn redact_user_info(endpoint: &str) -> std::borrow::Cow<'_, str> {
    let authority_start = endpoint.find("://").map_or(0, |i| i + 3);
    let authority_end = endpoint[authority_start..]
        .find('/')
        .map_or(endpoint.len(), |i| authority_start + i);
    match endpoint[authority_start..authority_end].rfind('@') {
        Some(at) => std::borrow::Cow::Owned(format!(
            "{}[redacted]{}",
            &endpoint[..authority_start],
            &endpoint[authority_start + at..]
        )),
        None => std::borrow::Cow::Borrowed(endpoint),
    }
}

impl Default for S3ConfigBuilder {
    fn default() -> Self {
        S3ConfigBuilder {
            environment: Environment::Development,
            region: None,
            bucket: None,
            endpoint: None,
            force_path_style: None,
            checksums_when_required: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            pool_max_idle_per_host: DEFAULT_POOL_MAX_IDLE_PER_HOST,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            credentials: None,
        }
    }
}

impl S3ConfigBuilder {
    /// Production or development (default development).
    pub fn environment(mut self, environment: Environment) -> Self {
        self.environment = environment;
        self
    }

    /// Region (`AWS_REGION`; required in production, else `us-east-1`).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Bucket (`AWS_S3_BUCKET`; required in production, else `keel-dev`).
    pub fn bucket(mut self, bucket: impl Into<String>) -> Self {
        self.bucket = Some(bucket.into());
        self
    }

    /// Custom endpoint (`AWS_S3_ENDPOINT`; default: AWS).
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Path-style addressing (`AWS_S3_FORCE_PATH_STYLE`; default: on with a custom
    /// endpoint, off without).
    pub fn force_path_style(mut self, on: bool) -> Self {
        self.force_path_style = Some(on);
        self
    }

    /// Checksums only when required (default: on with a custom endpoint, off —
    /// the SDK's defaults — without).
    pub fn checksums_when_required(mut self, on: bool) -> Self {
        self.checksums_when_required = Some(on);
        self
    }

    /// Connect timeout (default 30 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Timeout of one HTTP request (default 30 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Idle keep-alive connections kept per host (default 50).
    pub fn pool_max_idle_per_host(mut self, max: usize) -> Self {
        self.pool_max_idle_per_host = max;
        self
    }

    /// How long idle connections are kept (default 90 s).
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool_idle_timeout = timeout;
        self
    }

    /// Static credentials instead of the standard AWS chain (default: the chain).
    pub fn credentials(mut self, access_key_id: &str, secret_access_key: &str) -> Self {
        self.credentials = Some(Credentials::new(
            access_key_id,
            secret_access_key,
            None,
            None,
            "keel-static",
        ));
        self
    }

    /// Checks every value and builds the config.
    pub fn build(self) -> Result<S3Config, S3ConfigError> {
        let production = self.environment == Environment::Production;
        let region = match self.region {
            Some(region) => region,
            None if production => return Err(S3ConfigError::Missing { var: "AWS_REGION" }),
            None => {
                tracing::info!(
                    component = "S3Config",
                    region = DEFAULT_DEV_REGION,
                    "AWS_REGION not set; using the development default"
                );
                DEFAULT_DEV_REGION.to_string()
            }
        };
        check_region(&region)?;
        let bucket = match self.bucket {
            Some(bucket) => bucket,
            None if production => {
                return Err(S3ConfigError::Missing {
                    var: "AWS_S3_BUCKET",
                });
            }
            None => {
                tracing::info!(
                    component = "S3Config",
                    bucket = DEFAULT_DEV_BUCKET,
                    "AWS_S3_BUCKET not set; using the development default"
                );
                DEFAULT_DEV_BUCKET.to_string()
            }
        };
        check_bucket(&bucket)?;
        if let Some(endpoint) = &self.endpoint {
            check_endpoint(endpoint)?;
        }
        let custom = self.endpoint.is_some();
        let zero = |var, d: Duration| {
            if d.is_zero() {
                Err(S3ConfigError::Invalid {
                    var,
                    value: "0".to_string(),
                    reason: "a timeout must be more than zero",
                })
            } else {
                Ok(())
            }
        };
        zero("connect_timeout", self.connect_timeout)?;
        zero("request_timeout", self.request_timeout)?;
        Ok(S3Config {
            environment: self.environment,
            region,
            bucket,
            endpoint: self.endpoint,
            force_path_style: self.force_path_style.unwrap_or(custom),
            checksums_when_required: self.checksums_when_required.unwrap_or(custom),
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            pool_max_idle_per_host: self.pool_max_idle_per_host,
            pool_idle_timeout: self.pool_idle_timeout,
            credentials: self.credentials,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<S3Config, S3ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        S3Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn development_defaults() {
        let config = from(&[]).unwrap();
        assert_eq!(config.environment(), Environment::Development);
        assert_eq!(config.region(), "us-east-1");
        assert_eq!(config.bucket(), "keel-dev");
        assert_eq!(config.endpoint(), None);
        assert!(!config.force_path_style());
        assert!(!config.checksums_when_required());
        assert_eq!(config.connect_timeout(), Duration::from_secs(30));
        assert_eq!(config.request_timeout(), Duration::from_secs(30));
        assert_eq!(config.pool_max_idle_per_host(), 50);
    }

    #[test]
    fn production_requires_region_and_bucket() {
        assert_eq!(
            from(&[("KEEL_ENV", "production"), ("AWS_S3_BUCKET", "b-1")]).unwrap_err(),
            S3ConfigError::Missing { var: "AWS_REGION" }
        );
        assert_eq!(
            from(&[("APP_ENV", "PROD"), ("AWS_REGION", "eu-west-1")]).unwrap_err(),
            S3ConfigError::Missing {
                var: "AWS_S3_BUCKET"
            }
        );
        let config = from(&[
            ("KEEL_ENV", "production"),
            ("AWS_REGION", "ap-south-1"),
            ("AWS_S3_BUCKET", "my-bucket"),
        ])
        .unwrap();
        assert_eq!(config.environment(), Environment::Production);
        assert_eq!(config.bucket(), "my-bucket");
        // An empty value counts as missing.
        assert!(
            from(&[
                ("KEEL_ENV", "production"),
                ("AWS_REGION", " "),
                ("AWS_S3_BUCKET", "b-1")
            ])
            .is_err()
        );
    }

    #[test]
    fn custom_endpoint_turns_on_path_style_and_lenient_checksums() {
        let config = from(&[("AWS_S3_ENDPOINT", "http://localhost:4566")]).unwrap();
        assert!(config.force_path_style());
        assert!(config.checksums_when_required());
        let config = from(&[
            ("AWS_S3_ENDPOINT", "http://localhost:4566"),
            ("AWS_S3_FORCE_PATH_STYLE", "false"),
        ])
        .unwrap();
        assert!(!config.force_path_style());
        let config = from(&[("AWS_S3_FORCE_PATH_STYLE", "1")]).unwrap();
        assert!(config.force_path_style());
    }

    #[test]
    fn invalid_values_name_the_variable() {
        let err = from(&[("AWS_S3_FORCE_PATH_STYLE", "maybe")]).unwrap_err();
        assert!(matches!(
            err,
            S3ConfigError::Invalid {
                var: "AWS_S3_FORCE_PATH_STYLE",
                ..
            }
        ));
        for endpoint in ["localhost:4566", "ftp://h", "not a url"] {
            let err = from(&[("AWS_S3_ENDPOINT", endpoint)]).unwrap_err();
            assert!(err.to_string().starts_with("AWS_S3_ENDPOINT="), "{err}");
        }
        let err = from(&[("AWS_S3_BUCKET", "Upper_Case")]).unwrap_err();
        assert!(err.to_string().contains("AWS_S3_BUCKET"));
        let err = from(&[("AWS_REGION", "eu west")]).unwrap_err();
        assert!(err.to_string().contains("AWS_REGION"));
    }

    #[test]
    fn builder_round_trips_and_redacts_credentials() {
        let config = S3Config::builder()
            .bucket("media")
            .credentials("AKID", "very-secret")
            .request_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let copy = config.to_builder().bucket("other").build().unwrap();
        assert_eq!(copy.bucket(), "other");
        assert_eq!(copy.request_timeout(), Duration::from_secs(5));
        assert!(copy.credentials().is_some());
        assert!(!format!("{config:?}").contains("very-secret"));
        let builder = config
            .to_builder()
            .endpoint("http://user:pw@127.0.0.1:9000/x");
        let shown = format!("{builder:?}");
        assert!(
            !shown.contains("very-secret") && !shown.contains("AKID"),
            "{shown}"
        );
        assert!(
            shown.contains("http://[redacted]@127.0.0.1:9000/x"),
            "{shown}"
        );
        assert!(!shown.contains("pw"), "{shown}");
        assert!(
            S3Config::builder()
                .request_timeout(Duration::ZERO)
                .build()
                .is_err()
        );
    }
}
