//! Upload a file to S3 with aws-sdk-s3 alone, with the guarantees keel gives
//! by default (see `compare_keel_upload.rs`): one PutObject up to 5 MiB,
//! multipart above with 5 MiB parts and 4 in flight (memory bounded: each part
//! streams from the file), retries per part with backoff (the SDK's standard
//! retry, 3 retries, applies to each UploadPart request), a timeout per
//! attempt, and the multipart upload aborted on failure.
//!
//! ```text
//! AWS_S3_ENDPOINT=http://127.0.0.1:8014 AWS_S3_BUCKET=compare AWS_REGION=us-east-1 \
//!   AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... cargo run --example compare_raw_upload [file]
//! ```
//!
//! Left out (what keel has and this version does not):
//! - part size fixed at 5 MiB: files above 10,000 parts (~48.8 GiB) fail; keel raises the part size
//! - a timeout per part scaled to its size (a fixed 30 s per attempt here) and an idle timeout on the body
//! - uploads in flight tracked so shutdown can abort them; a sweep of stale multipart uploads (`S3::abort_stale_uploads`)
//! - after a lost CompleteMultipartUpload answer, the object checked against the parts' multipart ETag before success is reported
//! - circuit breaker, key validation before any request, spans, metrics, progress events
//! - a typed error naming operation, bucket and key (a boxed SDK error here)
//! - streams of unknown length (this reads a file whose size is known)

#[path = "compare/s3_common.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use common::BoxError;
use futures::{StreamExt, TryStreamExt};

// region: task
const PART_SIZE: u64 = 5 * 1024 * 1024;
const PARTS_IN_FLIGHT: usize = 4;

async fn upload_file(s3: &Client, bucket: &str, key: &str, path: &Path) -> Result<(), BoxError> {
    let size = tokio::fs::metadata(path).await?.len();
    if size <= PART_SIZE {
        let body = ByteStream::from_path(path).await?;
        s3.put_object()
            .bucket(bucket)
            .key(key)
            .body(body)
            .send()
            .await?;
        return Ok(());
    }
    let created = s3
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await?;
    let upload_id = created.upload_id().ok_or("no upload id")?;
    match upload_parts(s3, bucket, key, path, size, upload_id).await {
        Ok(parts) => {
            let parts = CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build();
            s3.complete_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .multipart_upload(parts)
                .send()
                .await?;
            Ok(())
        }
        Err(e) => {
            // Abort so the parts stop costing storage; the first error wins.
            let _ = s3
                .abort_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .send()
                .await;
            Err(e)
        }
    }
}

async fn upload_parts(
    s3: &Client,
    bucket: &str,
    key: &str,
    path: &Path,
    size: u64,
    upload_id: &str,
) -> Result<Vec<CompletedPart>, BoxError> {
    let mut parts: Vec<CompletedPart> = futures::stream::iter(0..size.div_ceil(PART_SIZE))
        .map(|i| async move {
            let offset = i * PART_SIZE;
            // A file-backed body: streamed, and re-read from the file on a retry.
            let body = ByteStream::read_from()
                .path(path)
                .offset(offset)
                .length(Length::Exact(PART_SIZE.min(size - offset)))
                .build()
                .await?;
            let number = i as i32 + 1;
            let out = s3
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(body)
                .send()
                .await?;
            let part = CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag)
                .build();
            Ok::<_, BoxError>(part)
        })
        .buffer_unordered(PARTS_IN_FLIGHT)
        .try_collect()
        .await?;
    parts.sort_by_key(|p| p.part_number());
    Ok(parts)
}
// endregion

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let path = common::sample_file().await?;
    let key = format!("compare/raw-{}.bin", uuid::Uuid::new_v4());
    common::ensure_bucket().await?;
    let bucket = common::bucket();

    // region: task
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(RetryConfig::standard().with_max_attempts(4))
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(Duration::from_secs(30))
                .build(),
        )
        .load()
        .await;
    let mut conf = aws_sdk_s3::config::Builder::from(&shared);
    if let Ok(endpoint) = std::env::var("AWS_S3_ENDPOINT") {
        conf = conf.endpoint_url(endpoint).force_path_style(true);
    }
    let s3 = Client::from_conf(conf.build());
    upload_file(&s3, &bucket, &key, &path).await?;
    // endregion

    println!("uploaded {} to s3://{bucket}/{key}", path.display());
    println!("stored size: {}", common::stored_size(&key).await?);
    common::remove_sample(&path).await;
    Ok(())
}
