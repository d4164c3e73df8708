//! Errors of multipart uploads, copies and ranged downloads.

use aws_sdk_s3::error::{BoxError, DisplayErrorContext};
use keel_layers::classify::{Classification, ClassifiedError};

use super::retry::{AttemptError, Exhausted};

/// A transfer (upload, copy or download) failed. Every variant names the object.
///
/// By the time a caller sees this error, a failed multipart upload or copy has been
/// aborted (or its abort has been attempted and logged).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// An S3 request failed for good: a permanent error, or retries ran out.
    #[error(
        "S3 {operation} for s3://{bucket}/{key} failed ({class}) after {attempts} attempt(s): {message}"
    )]
    Request {
        /// The S3 operation, such as `UploadPart`.
        operation: &'static str,
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// What the last failure was.
        classification: Classification,
        /// Short class label (from `classification`).
        class: &'static str,
        /// Attempts made.
        attempts: u32,
        /// HTTP status of the last answer, when there was one.
        status: Option<u16>,
        /// S3 error code of the last answer, such as `NoSuchKey`.
        code: Option<String>,
        /// The error with its causes, rendered.
        message: String,
        /// The SDK error.
        #[source]
        source: BoxError,
    },
    /// Reading the body to upload, or writing a download, failed.
    #[error("{what} for s3://{bucket}/{key} failed: {source}")]
    Io {
        /// What was being done ("reading the upload body", "writing the download").
        what: &'static str,
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The body had a different length than announced.
    #[error("the body for s3://{bucket}/{key} held {actual} bytes where {expected} were announced")]
    LengthMismatch {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// Announced length.
        expected: u64,
        /// Bytes actually read (or, when the body ran long, the first byte past the end).
        actual: u64,
    },
    /// The object is over what S3 stores (5 TiB, 10,000 parts).
    #[error("s3://{bucket}/{key} is too large for S3: {reason}")]
    TooLarge {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// Which limit was passed.
        reason: String,
    },
    /// S3 answered without something the transfer needs (an upload id, a size).
    #[error("S3 {operation} for s3://{bucket}/{key} answered without {field}")]
    MissingField {
        /// The S3 operation.
        operation: &'static str,
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// What was missing.
        field: &'static str,
    },
    /// The object changed while it was being downloaded or copied in ranges.
    #[error("s3://{bucket}/{key} changed during the transfer (ETag {expected} became {actual})")]
    Changed {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// The ETag seen first.
        expected: String,
        /// The ETag seen later.
        actual: String,
    },
    /// A part task panicked or was cancelled.
    #[error("a part task of s3://{bucket}/{key} ended abnormally: {source}")]
    Task {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: tokio::task::JoinError,
    },
}

impl TransferError {
    pub(crate) fn request<E: AttemptError>(
        operation: &'static str,
        bucket: &str,
        key: &str,
        exhausted: Exhausted<E>,
    ) -> Self {
        let Exhausted {
            error,
            classification,
            attempts,
        } = exhausted;
        TransferError::Request {
            operation,
            bucket: bucket.to_string(),
            key: key.to_string(),
            classification,
            class: classification.class,
            attempts,
            status: error.status(),
            code: error.code().map(str::to_string),
            message: DisplayErrorContext(&error).to_string(),
            source: Box::new(error),
        }
    }

    pub(crate) fn io(what: &'static str, bucket: &str, key: &str, source: std::io::Error) -> Self {
        TransferError::Io {
            what,
            bucket: bucket.to_string(),
            key: key.to_string(),
            source,
        }
    }

    pub(crate) fn missing(
        operation: &'static str,
        bucket: &str,
        key: &str,
        field: &'static str,
    ) -> Self {
        TransferError::MissingField {
            operation,
            bucket: bucket.to_string(),
            key: key.to_string(),
            field,
        }
    }

    /// The S3 error code of the failed request, when S3 sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            TransferError::Request { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// The HTTP status of the failed request, when there was an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            TransferError::Request { status, .. } => *status,
            _ => None,
        }
    }
}

/// Transfers already retry each request on their own; a retry layer above must not
/// multiply that, so every transfer error reports itself as not retryable. The
/// class label (and so the metrics) stays that of the last failure.
impl ClassifiedError for TransferError {
    fn classification(&self) -> Classification {
        match self {
            TransferError::Request { classification, .. } => classification.with_retryable(false),
            TransferError::Io { .. } => Classification::permanent_failure("io"),
            TransferError::LengthMismatch { .. } | TransferError::TooLarge { .. } => {
                Classification::permanent_failure("invalid_body")
            }
            TransferError::MissingField { .. } | TransferError::Changed { .. } => {
                Classification::permanent_failure("service")
            }
            TransferError::Task { .. } => Classification::permanent_failure("task"),
        }
    }
}
