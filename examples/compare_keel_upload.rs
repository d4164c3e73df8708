//! Upload a file to S3 with keel. Compared with `compare_raw_upload.rs` in
//! docs/COMPARISON.md; the lines between `region: task` and `endregion` are
//! counted by `scripts/count-compare`.
//!
//! ```text
//! AWS_S3_ENDPOINT=http://127.0.0.1:8014 AWS_S3_BUCKET=compare AWS_REGION=us-east-1 \
//!   AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... cargo run --example compare_keel_upload [file]
//! ```
//!
//! What keel does by default here: one PutObject up to 5 MiB, multipart above
//! (5 MiB parts, 4 in flight, memory bounded by part size times parts in
//! flight, part size raised for files that would need more than 10,000
//! parts), retries per part (1, 2, 4 s, cap 10 s; `SlowDown`/`Retry-After`
//! honoured), a timeout per part scaled to its size, the multipart upload
//! aborted on failure and tracked for abort at shutdown, after a lost
//! CompleteMultipartUpload answer the object checked against the parts'
//! multipart ETag, a circuit breaker, key validation before any request,
//! spans, metrics and a typed error (`S3ServiceError`: operation, bucket,
//! key, kind).

#[path = "compare/s3_common.rs"]
mod common;

use common::BoxError;
use keel::s3::{S3, S3Client, S3Config, UploadBody, UploadOptions};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let path = common::sample_file().await?;
    let key = format!("compare/keel-{}.bin", uuid::Uuid::new_v4());
    common::ensure_bucket().await?;

    // region: task
    let s3 = S3::new(S3Client::connect(S3Config::from_env()?).await?);
    let out = s3
        .upload(key.as_str(), UploadBody::file(&path), UploadOptions::new())
        .await?;
    // endregion

    println!(
        "uploaded {} bytes to {} (etag {:?})",
        out.size, out.location, out.etag
    );
    println!("stored size: {}", common::stored_size(&key).await?);
    common::remove_sample(&path).await;
    Ok(())
}
