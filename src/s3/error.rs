//! [`S3ServiceError`]: what failed (operation, bucket, key), how ([`S3ErrorKind`])
//! and why (the cause), classified for keel's layers.
//!
//! Every S3 failure keel returns is an `S3ServiceError`, whether it came from the
//! server (a `NoSuchKey`, a `503 SlowDown`), from the network (a reset connection, a
//! timeout) or from keel itself (an invalid key refused before any request). It
//! implements [`ClassifiedError`], so the retry layer, the circuit breaker and the
//! metrics of `keel-layers` read the same verdict:
//!
//! | kind | retryable | delay floor |
//! |---|---|---|
//! | [`Throttled`](S3ErrorKind::Throttled) (`SlowDown`, `503`, `429`, throttling codes) | yes | `Retry-After` if sent, else 1 s |
//! | [`Timeout`](S3ErrorKind::Timeout), [`Transport`](S3ErrorKind::Transport) (resets, refused connections, cut bodies) | yes | – |
//! | [`Service`](S3ErrorKind::Service) with a 5xx status or `InternalError` | yes | – |
//! | [`NotFound`](S3ErrorKind::NotFound), [`AccessDenied`](S3ErrorKind::AccessDenied), [`InvalidKey`](S3ErrorKind::InvalidKey), [`InvalidRequest`](S3ErrorKind::InvalidRequest), other 4xx | no | – |
//! | [`InvalidResponse`](S3ErrorKind::InvalidResponse) (an answer that breaks the contract: more bytes than the range asked for) | no | – |
//! | [`Body`](S3ErrorKind::Body) (the caller's upload body failed, ran short or long) | no | – |
//! | [`CircuitOpen`](S3ErrorKind::CircuitOpen), [`ShuttingDown`](S3ErrorKind::ShuttingDown) | no | – |
//!
//! Not-found and the caller's own mistakes (invalid key or request, an upload
//! body that broke off or had the wrong length) are [`Outcome::Ignored`]: they say
//! nothing about the server's health, so they never trip the circuit breaker and
//! are never retried. This table is the only place that decides it: the layers,
//! the multipart engine's retries and the gateway all read
//! [`classification`](ClassifiedError::classification).
//!
//! ```
//! use keel::s3::error::{S3ErrorKind, S3Operation, S3ServiceError};
//! use keel_layers::classify::ClassifiedError;
//!
//! let err = S3ServiceError::new(S3Operation::Upload, S3ErrorKind::Timeout)
//!     .with_bucket("media")
//!     .with_key("a.txt");
//! assert!(err.classification().should_retry());
//! assert_eq!(err.to_string(), "S3 upload of s3://media/a.txt failed: timed out");
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use keel_layers::classify::{Classification, ClassifiedError, Outcome};

use super::key::{InvalidKey, KeyRule};

/// A boxed cause.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The least wait before retrying after `SlowDown` or another throttling answer
/// that carries no `Retry-After`.
pub const THROTTLE_DELAY_FLOOR: Duration = Duration::from_secs(1);

/// The S3 operation that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum S3Operation {
    /// Upload (single PutObject or a whole multipart upload).
    Upload,
    /// CreateMultipartUpload.
    CreateMultipartUpload,
    /// UploadPart.
    UploadPart,
    /// CompleteMultipartUpload.
    CompleteMultipartUpload,
    /// AbortMultipartUpload.
    AbortMultipartUpload,
    /// ListMultipartUploads.
    ListMultipartUploads,
    /// Download (GetObject, whole or ranged).
    Download,
    /// Presigning a GET URL.
    PresignGet,
    /// Presigning a PUT URL.
    PresignPut,
    /// DeleteObject.
    Delete,
    /// DeleteObjects (batch delete).
    DeleteMany,
    /// HeadObject used as an existence check.
    Exists,
    /// HeadObject for metadata.
    Head,
    /// CopyObject (or a whole multipart copy).
    Copy,
    /// UploadPartCopy.
    UploadPartCopy,
    /// ListObjectsV2.
    List,
    /// HeadBucket used as a health check.
    HealthCheck,
    /// CreateBucket.
    CreateBucket,
    /// Building the client from the config.
    Connect,
    /// Waiting for the service stack to be ready (before any request).
    Readiness,
}

impl S3Operation {
    /// A short stable name for logs and metrics.
    pub const fn as_str(&self) -> &'static str {
        match self {
            S3Operation::Upload => "upload",
            S3Operation::CreateMultipartUpload => "create_multipart_upload",
            S3Operation::UploadPart => "upload_part",
            S3Operation::CompleteMultipartUpload => "complete_multipart_upload",
            S3Operation::AbortMultipartUpload => "abort_multipart_upload",
            S3Operation::ListMultipartUploads => "list_multipart_uploads",
            S3Operation::Download => "download",
            S3Operation::PresignGet => "presign_get",
            S3Operation::PresignPut => "presign_put",
            S3Operation::Delete => "delete",
            S3Operation::DeleteMany => "delete_many",
            S3Operation::Exists => "exists",
            S3Operation::Head => "head",
            S3Operation::Copy => "copy",
            S3Operation::UploadPartCopy => "upload_part_copy",
            S3Operation::List => "list",
            S3Operation::HealthCheck => "health_check",
            S3Operation::CreateBucket => "create_bucket",
            S3Operation::Connect => "connect",
            S3Operation::Readiness => "readiness",
        }
    }
}

impl fmt::Display for S3Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str().replace('_', " "))
    }
}

/// How an S3 operation failed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum S3ErrorKind {
    /// The object or bucket does not exist (`NoSuchKey`, `NoSuchBucket`, 404).
    NotFound,
    /// The credentials may not do this (`AccessDenied`, 403, bad signature).
    AccessDenied,
    /// The server asks us to slow down (`SlowDown`, 503, 429, throttling codes).
    Throttled {
        /// The delay the server asked for (`Retry-After`), if any.
        retry_after: Option<Duration>,
    },
    /// The key was refused before any request.
    InvalidKey(KeyRule),
    /// The request was refused before any request for another reason (an expiry
    /// out of range, an empty batch, a malformed option).
    InvalidRequest,
    /// The request or the connection timed out.
    Timeout,
    /// The circuit breaker is open: the request was not sent.
    CircuitOpen,
    /// The connection failed, was reset, or the response was cut short.
    Transport,
    /// A local file could not be read or written.
    Io,
    /// The client is shutting down and takes no new operations.
    ShuttingDown,
    /// The caller's upload body failed: its stream returned an error, or it ran
    /// shorter or longer than its announced length. Not the server's fault.
    Body,
    /// The server answered something that breaks the S3 contract (a ranged GET
    /// answered with more bytes than asked, an absurd object size). Reading stops
    /// there; retrying the same server would get the same answer.
    InvalidResponse,
    /// Another error answered by the server.
    Service {
        /// The S3 error code (`InternalError`, `InvalidArgument`, ...), when sent.
        code: Option<String>,
        /// The HTTP status.
        status: Option<u16>,
    },
}

impl fmt::Display for S3ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            S3ErrorKind::NotFound => f.write_str("not found"),
            S3ErrorKind::AccessDenied => f.write_str("access denied"),
            S3ErrorKind::Throttled {
                retry_after: Some(d),
            } => write!(f, "throttled (retry after {d:?})"),
            S3ErrorKind::Throttled { retry_after: None } => f.write_str("throttled"),
            S3ErrorKind::InvalidKey(rule) => write!(f, "invalid key: {rule}"),
            S3ErrorKind::InvalidRequest => f.write_str("invalid request"),
            S3ErrorKind::Timeout => f.write_str("timed out"),
            S3ErrorKind::CircuitOpen => f.write_str("circuit breaker open"),
            S3ErrorKind::Transport => f.write_str("transport error"),
            S3ErrorKind::Io => f.write_str("local I/O error"),
            S3ErrorKind::ShuttingDown => f.write_str("client is shutting down"),
            S3ErrorKind::Body => f.write_str("the upload body failed"),
            S3ErrorKind::InvalidResponse => f.write_str("invalid response from the server"),
            S3ErrorKind::Service { code, status } => {
                f.write_str("service error")?;
                if let Some(code) = code {
                    write!(f, " {code}")?;
                }
                if let Some(status) = status {
                    write!(f, " (HTTP {status})")?;
                }
                Ok(())
            }
        }
    }
}

/// An S3 operation that failed: which operation, on which bucket and key, how
/// ([`S3ErrorKind`]) and why ([`source`](StdError::source)).
///
/// One pointer wide (the details are boxed), so `Result<T, S3ServiceError>` stays
/// small on the happy path.
pub struct S3ServiceError(Box<Details>);

struct Details {
    operation: S3Operation,
    bucket: Option<String>,
    key: Option<String>,
    kind: S3ErrorKind,
    message: Option<String>,
    source: Option<BoxError>,
}

impl S3ServiceError {
    /// A new error with no bucket, key or cause.
    pub fn new(operation: S3Operation, kind: S3ErrorKind) -> Self {
        S3ServiceError(Box::new(Details {
            operation,
            bucket: None,
            key: None,
            kind,
            message: None,
            source: None,
        }))
    }

    /// Sets the bucket.
    pub fn with_bucket(mut self, bucket: impl Into<String>) -> Self {
        self.0.bucket = Some(bucket.into());
        self
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.0.key = Some(key.into());
        self
    }

    /// Sets a human-readable detail (the server's error message, what was wrong
    /// with a request).
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.0.message = Some(message.into());
        self
    }

    /// Sets the cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.0.source = Some(source.into());
        self
    }

    /// An invalid key refused before any request.
    pub fn invalid_key(operation: S3Operation, bucket: &str, err: InvalidKey) -> Self {
        let kind = S3ErrorKind::InvalidKey(err.rule);
        S3ServiceError::new(operation, kind)
            .with_bucket(bucket)
            .with_key(err.key.clone())
            .with_source(err)
    }

    /// Translates an AWS SDK error: the S3 error code and HTTP status decide the
    /// kind; a `Retry-After` header is kept as the throttling delay.
    pub fn from_sdk<E>(
        operation: S3Operation,
        bucket: &str,
        key: Option<&str>,
        err: SdkError<E, HttpResponse>,
    ) -> Self
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        let (kind, message) = match &err {
            SdkError::ConstructionFailure(_) => (S3ErrorKind::InvalidRequest, None),
            SdkError::TimeoutError(_) => (S3ErrorKind::Timeout, None),
            SdkError::DispatchFailure(d) if d.is_timeout() => (S3ErrorKind::Timeout, None),
            SdkError::DispatchFailure(d) if d.is_user() => (S3ErrorKind::InvalidRequest, None),
            SdkError::DispatchFailure(_) => (S3ErrorKind::Transport, None),
            SdkError::ResponseError(_) => (S3ErrorKind::Transport, None),
            SdkError::ServiceError(service) => {
                let raw = service.raw();
                let status = raw.status().as_u16();
                let retry_after = raw.headers().get("retry-after").and_then(parse_retry_after);
                let meta = service.err();
                (
                    kind_from_response(meta.code(), status, retry_after),
                    meta.message().map(str::to_owned),
                )
            }
            // SdkError is non-exhaustive.
            _ => (S3ErrorKind::Transport, None),
        };
        let mut out = S3ServiceError::new(operation, kind).with_bucket(bucket);
        out.0.key = key.map(str::to_owned);
        out.0.message = message;
        out.with_source(err)
    }

    /// An I/O error on a local file or stream.
    pub fn io(operation: S3Operation, bucket: &str, key: &str, err: std::io::Error) -> Self {
        let kind = match err.kind() {
            std::io::ErrorKind::TimedOut => S3ErrorKind::Timeout,
            _ => S3ErrorKind::Io,
        };
        S3ServiceError::new(operation, kind)
            .with_bucket(bucket)
            .with_key(key)
            .with_source(err)
    }

    /// An error of the caller's upload body (its stream failed, or ran short or
    /// long): kind [`S3ErrorKind::Body`], never counted against the server.
    pub fn body(operation: S3Operation, bucket: &str, key: &str, err: impl Into<BoxError>) -> Self {
        S3ServiceError::new(operation, S3ErrorKind::Body)
            .with_bucket(bucket)
            .with_key(key)
            .with_source(err)
    }

    /// An answer that breaks the S3 contract, described by `message`.
    pub fn invalid_response(
        operation: S3Operation,
        bucket: &str,
        key: &str,
        message: impl Into<String>,
    ) -> Self {
        S3ServiceError::new(operation, S3ErrorKind::InvalidResponse)
            .with_bucket(bucket)
            .with_key(key)
            .with_message(message)
    }

    /// The operation that failed.
    pub fn operation(&self) -> S3Operation {
        self.0.operation
    }

    /// The bucket, when known.
    pub fn bucket(&self) -> Option<&str> {
        self.0.bucket.as_deref()
    }

    /// The key, when the operation had one.
    pub fn key(&self) -> Option<&str> {
        self.0.key.as_deref()
    }

    /// How it failed.
    pub fn kind(&self) -> &S3ErrorKind {
        &self.0.kind
    }

    /// The server's message or keel's detail, when there is one.
    pub fn message(&self) -> Option<&str> {
        self.0.message.as_deref()
    }

    /// The S3 error code, for service errors that carried one.
    pub fn code(&self) -> Option<&str> {
        match &self.0.kind {
            S3ErrorKind::Service { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// `true` for [`S3ErrorKind::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self.0.kind, S3ErrorKind::NotFound)
    }

    /// Whether retrying may help (see the module docs).
    pub fn is_retryable(&self) -> bool {
        self.classification().retryable
    }

    /// The least wait before a retry, when the failure says so.
    pub fn retry_after(&self) -> Option<Duration> {
        self.classification().retry_after
    }
}

/// The kind for a server's answer, from its S3 error code and HTTP status.
fn kind_from_response(
    code: Option<&str>,
    status: u16,
    retry_after: Option<Duration>,
) -> S3ErrorKind {
    match code {
        Some("NoSuchKey" | "NoSuchBucket" | "NotFound" | "NoSuchUpload" | "NoSuchVersion") => {
            S3ErrorKind::NotFound
        }
        Some(
            "AccessDenied"
            | "SignatureDoesNotMatch"
            | "InvalidAccessKeyId"
            | "ExpiredToken"
            | "InvalidToken"
            | "AllAccessDisabled",
        ) => S3ErrorKind::AccessDenied,
        Some(
            "SlowDown"
            | "Throttling"
            | "ThrottlingException"
            | "ThrottledException"
            | "RequestLimitExceeded"
            | "TooManyRequests"
            | "TooManyRequestsException"
            | "RequestThrottled",
        ) => S3ErrorKind::Throttled { retry_after },
        Some("RequestTimeout" | "RequestTimeoutException") => S3ErrorKind::Timeout,
        _ => match status {
            404 => S3ErrorKind::NotFound,
            403 => S3ErrorKind::AccessDenied,
            429 | 503 => S3ErrorKind::Throttled { retry_after },
            _ => S3ErrorKind::Service {
                code: code.map(str::to_owned),
                status: Some(status),
            },
        },
    }
}

/// `Retry-After` in delta-seconds (HTTP dates are ignored: S3 does not send them).
fn parse_retry_after(value: &str) -> Option<Duration> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(3600)))
}

impl ClassifiedError for S3ServiceError {
    fn classification(&self) -> Classification {
        match &self.0.kind {
            S3ErrorKind::Throttled { retry_after } => Classification::failure("throttled")
                .with_retry_after(retry_after.unwrap_or(THROTTLE_DELAY_FLOOR)),
            S3ErrorKind::Timeout => Classification::failure("timeout"),
            S3ErrorKind::Transport => Classification::failure("transport"),
            S3ErrorKind::Service { code, status } => {
                let retryable = status.is_some_and(|s| s >= 500)
                    || matches!(
                        code.as_deref(),
                        Some("InternalError" | "ServiceUnavailable")
                    );
                let class = if status.is_some_and(|s| s >= 500) {
                    "5xx"
                } else {
                    "service"
                };
                Classification::failure(class).with_retryable(retryable)
            }
            S3ErrorKind::AccessDenied => Classification::permanent_failure("access_denied"),
            S3ErrorKind::Io => Classification::permanent_failure("io"),
            S3ErrorKind::CircuitOpen => Classification::permanent_failure("circuit_open"),
            S3ErrorKind::ShuttingDown => Classification::permanent_failure("shutting_down"),
            S3ErrorKind::InvalidResponse => Classification::permanent_failure("invalid_response"),
            S3ErrorKind::Body => Classification {
                outcome: Outcome::Ignored,
                retryable: false,
                class: "body",
                retry_after: None,
            },
            S3ErrorKind::NotFound => Classification {
                outcome: Outcome::Ignored,
                retryable: false,
                class: "not_found",
                retry_after: None,
            },
            S3ErrorKind::InvalidKey(_) => Classification {
                outcome: Outcome::Ignored,
                retryable: false,
                class: "invalid_key",
                retry_after: None,
            },
            S3ErrorKind::InvalidRequest => Classification {
                outcome: Outcome::Ignored,
                retryable: false,
                class: "invalid_request",
                retry_after: None,
            },
        }
    }
}

impl fmt::Display for S3ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "S3 {}", self.0.operation)?;
        match (&self.0.bucket, &self.0.key) {
            (Some(b), Some(k)) => write!(f, " of s3://{b}/{k}")?,
            (Some(b), None) => write!(f, " on bucket {b}")?,
            (None, Some(k)) => write!(f, " of key {k}")?,
            (None, None) => {}
        }
        write!(f, " failed: {}", self.0.kind)?;
        if let Some(message) = &self.0.message {
            write!(f, ": {message}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for S3ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3ServiceError")
            .field("operation", &self.0.operation)
            .field("bucket", &self.0.bucket)
            .field("key", &self.0.key)
            .field("kind", &self.0.kind)
            .field("message", &self.0.message)
            .field("source", &self.0.source)
            .finish()
    }
}

impl StdError for S3ServiceError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(code: Option<&str>, status: u16, retry_after: Option<Duration>) -> S3ServiceError {
        S3ServiceError::new(
            S3Operation::Upload,
            kind_from_response(code, status, retry_after),
        )
    }

    #[test]
    fn slow_down_is_throttled_with_a_one_second_floor() {
        let err = service(Some("SlowDown"), 503, None);
        assert_eq!(err.kind(), &S3ErrorKind::Throttled { retry_after: None });
        let c = err.classification();
        assert!(c.should_retry());
        assert_eq!(c.class, "throttled");
        assert_eq!(c.retry_after, Some(THROTTLE_DELAY_FLOOR));
    }

    #[test]
    fn retry_after_header_sets_the_floor() {
        let err = service(None, 429, parse_retry_after(" 7 "));
        assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
        let err = service(None, 503, None);
        assert!(err.is_retryable());
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn server_errors_are_retryable_client_errors_are_not() {
        assert!(service(Some("InternalError"), 500, None).is_retryable());
        assert!(service(None, 502, None).is_retryable());
        let bad = service(Some("InvalidArgument"), 400, None);
        assert!(!bad.is_retryable());
        assert_eq!(bad.code(), Some("InvalidArgument"));
        assert!(service(Some("RequestTimeout"), 400, None).is_retryable());
    }

    #[test]
    fn not_found_and_access_denied() {
        let nf = service(Some("NoSuchKey"), 404, None);
        assert!(nf.is_not_found());
        assert_eq!(nf.classification().outcome, Outcome::Ignored);
        // HEAD answers carry no body, hence no code: the status decides.
        assert!(service(None, 404, None).is_not_found());
        let denied = service(Some("SignatureDoesNotMatch"), 403, None);
        assert_eq!(denied.kind(), &S3ErrorKind::AccessDenied);
        assert!(denied.classification().is_failure());
        assert!(!denied.is_retryable());
    }

    #[test]
    fn transport_and_timeouts_are_retryable() {
        for kind in [S3ErrorKind::Transport, S3ErrorKind::Timeout] {
            assert!(S3ServiceError::new(S3Operation::Download, kind).is_retryable());
        }
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let err = S3ServiceError::from_sdk::<aws_sdk_s3::operation::get_object::GetObjectError>(
            S3Operation::Download,
            "b",
            Some("k"),
            SdkError::dispatch_failure(aws_sdk_s3::error::ConnectorError::io(reset.into())),
        );
        assert_eq!(err.kind(), &S3ErrorKind::Transport);
        assert!(err.is_retryable());
        assert!(err.source().is_some());
    }

    #[test]
    fn body_errors_are_the_callers_and_invalid_responses_are_not_retried() {
        let aborted = std::io::Error::other("client went away");
        let err = S3ServiceError::body(S3Operation::Upload, "b", "k", aborted);
        assert_eq!(err.kind(), &S3ErrorKind::Body);
        assert_eq!(err.classification().outcome, Outcome::Ignored);
        assert!(!err.is_retryable());
        assert_eq!(
            err.to_string(),
            "S3 upload of s3://b/k failed: the upload body failed"
        );
        let bad = S3ServiceError::invalid_response(S3Operation::Download, "b", "k", "too long");
        assert!(bad.classification().is_failure());
        assert!(!bad.is_retryable());
    }

    #[test]
    fn invalid_key_is_ignored_and_names_the_rule() {
        let bad = super::super::key::ObjectKey::new("").unwrap_err();
        let err = S3ServiceError::invalid_key(S3Operation::Upload, "b", bad);
        assert_eq!(err.kind(), &S3ErrorKind::InvalidKey(KeyRule::Empty));
        assert_eq!(err.classification().outcome, Outcome::Ignored);
        assert!(err.to_string().contains("invalid key: the key is empty"));
    }
}
