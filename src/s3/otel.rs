//! OpenTelemetry spans of the S3 services (feature `otel`; without it the calls
//! run as they are, with no span).
//!
//! Every request keel sends to S3 runs in a CLIENT span named after the AWS
//! API call (`S3.PutObject`, `S3.UploadPart`, ...), with the attributes of the
//! semantic conventions for AWS SDK calls (semconv 1.27, unchanged through 1.36):
//!
//! | attribute | value |
//! |---|---|
//! | `rpc.system` | `aws-api` |
//! | `rpc.service` | `S3` |
//! | `rpc.method` | the API call (`PutObject`, `UploadPart`, ...) |
//! | `aws.s3.bucket` | the bucket |
//! | `aws.s3.key` | the object key, when the call names one |
//! | `aws.s3.upload_id` | multipart calls |
//! | `aws.s3.part_number` | `UploadPart`, `UploadPartCopy` |
//! | `aws.request_id` | from the answer (`x-amz-request-id`), failures too |
//! | `error.type` | the S3 error code (`NoSuchKey`, `SlowDown`) or the SDK's failure (`timeout`, `dispatch`, `response`, `construction`) |
//!
//! The SDK's own spans (`S3.PutObject` with its attempts, at `DEBUG`) run inside
//! keel's, so they are its children in the trace; the parts of a multipart
//! upload, which run on their own tasks, carry the span of the upload with them.
//! The facade's span of one operation (`upload`, `download`, ...) is the parent
//! of all the calls it makes.
//!
//! keel's own field names on the facade's span (`s3_operation`, `bucket`, `key`)
//! are recorded only with the feature `otel-keel-fields`.

use std::future::Future;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::RequestId;
#[cfg(feature = "otel")]
use tracing::Instrument;
#[cfg(feature = "otel")]
use tracing::field::Empty;

#[cfg(feature = "otel")]
use crate::s3::error::S3Operation;

/// What identifies one S3 API call.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) struct Call<'a> {
    /// The API call, as AWS names it (`PutObject`).
    pub method: &'static str,
    pub bucket: &'a str,
    pub key: Option<&'a str>,
    pub upload_id: Option<&'a str>,
    pub part_number: Option<u32>,
}

impl<'a> Call<'a> {
    pub(crate) fn new(method: &'static str, bucket: &'a str, key: Option<&'a str>) -> Self {
        Call {
            method,
            bucket,
            key,
            upload_id: None,
            part_number: None,
        }
    }

    pub(crate) fn upload_id(mut self, upload_id: &'a str) -> Self {
        self.upload_id = Some(upload_id);
        self
    }

    pub(crate) fn part_number(mut self, part_number: u32) -> Self {
        self.part_number = Some(part_number);
        self
    }

    /// The CLIENT span of this call.
    #[cfg(feature = "otel")]
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::info_span!(
            target: "keel::s3",
            "s3_call",
            "otel.name" = format!("S3.{}", self.method).as_str(),
            "otel.kind" = "client",
            "otel.status_code" = Empty,
            "rpc.system" = "aws-api",
            "rpc.service" = "S3",
            "rpc.method" = self.method,
            "aws.s3.bucket" = self.bucket,
            "aws.s3.key" = self.key,
            "aws.s3.upload_id" = self.upload_id,
            "aws.s3.part_number" = self.part_number.map(i64::from),
            "aws.request_id" = Empty,
            "error.type" = Empty,
        )
    }
}

/// Without `otel`: the call as it is.
#[cfg(not(feature = "otel"))]
#[inline]
pub(crate) async fn traced<O, E>(
    _call: Call<'_>,
    send: impl Future<Output = Result<O, SdkError<E, HttpResponse>>>,
) -> Result<O, SdkError<E, HttpResponse>>
where
    O: RequestId,
    E: ProvideErrorMetadata,
{
    send.await
}

/// Runs `send` (an SDK call's `send()` future) inside the CLIENT span of `call`,
/// and records the request id and any failure on it.
#[cfg(feature = "otel")]
pub(crate) async fn traced<O, E>(
    call: Call<'_>,
    send: impl Future<Output = Result<O, SdkError<E, HttpResponse>>>,
) -> Result<O, SdkError<E, HttpResponse>>
where
    O: RequestId,
    E: ProvideErrorMetadata,
{
    let span = call.span();
    let result = send.instrument(span.clone()).await;
    if span.is_disabled() {
        return result;
    }
    if let Some(id) = result
        .as_ref()
        .map_or_else(|e| e.request_id(), |o| o.request_id())
    {
        span.record("aws.request_id", id);
    }
    if let Err(e) = &result {
        span.record("error.type", error_type(e));
        span.record("otel.status_code", "error");
    }
    result
}

/// A low-cardinality name of a failed call: the S3 error code, or what kind of
/// SDK failure it was.
#[cfg(feature = "otel")]
fn error_type<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> &str {
    match e {
        SdkError::ServiceError(_) => e.code().unwrap_or("service"),
        SdkError::TimeoutError(_) => "timeout",
        SdkError::DispatchFailure(_) => "dispatch",
        SdkError::ResponseError(_) => "response",
        SdkError::ConstructionFailure(_) => "construction",
        _ => "sdk",
    }
}

/// The AWS API call behind a keel operation (its first call for multipart ones).
#[cfg(feature = "otel")]
pub(crate) fn rpc_method(op: S3Operation) -> &'static str {
    match op {
        S3Operation::Upload | S3Operation::PresignPut => "PutObject",
        S3Operation::CreateMultipartUpload => "CreateMultipartUpload",
        S3Operation::UploadPart => "UploadPart",
        S3Operation::CompleteMultipartUpload => "CompleteMultipartUpload",
        S3Operation::AbortMultipartUpload => "AbortMultipartUpload",
        S3Operation::ListMultipartUploads => "ListMultipartUploads",
        S3Operation::Download | S3Operation::PresignGet => "GetObject",
        S3Operation::Delete => "DeleteObject",
        S3Operation::DeleteMany => "DeleteObjects",
        S3Operation::Exists | S3Operation::Head => "HeadObject",
        S3Operation::Copy => "CopyObject",
        S3Operation::UploadPartCopy => "UploadPartCopy",
        S3Operation::List => "ListObjectsV2",
        S3Operation::CreateBucket => "CreateBucket",
        _ => "HeadBucket",
    }
}

/// The facade's span of one operation (`s3 upload`, INTERNAL): the parent of the
/// calls it makes. keel's `s3_operation`, `bucket` and `key` fields only with
/// `otel-keel-fields`.
#[cfg(feature = "otel")]
pub(crate) fn operation_span(op: S3Operation, bucket: &str, key: Option<&str>) -> tracing::Span {
    let span = tracing::info_span!(
        "s3",
        "otel.name" = format!("s3 {}", op.as_str()).as_str(),
        "rpc.system" = "aws-api",
        "rpc.service" = "S3",
        "rpc.method" = rpc_method(op),
        "aws.s3.bucket" = bucket,
        "aws.s3.key" = key,
        s3_operation = Empty,
        bucket = Empty,
        key = Empty,
    );
    if cfg!(feature = "otel-keel-fields") && !span.is_disabled() {
        span.record("s3_operation", op.as_str());
        span.record("bucket", bucket);
        span.record("key", key);
    }
    span
}
