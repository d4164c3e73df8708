//! Set-up shared by the `compare_*_upload` examples: not part of what they
//! compare (see docs/COMPARISON.md). A sample file and the bucket.
#![allow(dead_code)]

use std::path::PathBuf;

/// Errors of the examples' set-up.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A file of `COMPARE_UPLOAD_MIB` MiB (default 23: four full 5 MiB parts and a
/// short one) in the temp directory, or the path given as first argument.
pub async fn sample_file() -> Result<PathBuf, BoxError> {
    if let Some(path) = std::env::args().nth(1) {
        return Ok(path.into());
    }
    let mib: usize = std::env::var("COMPARE_UPLOAD_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(23);
    let path = std::env::temp_dir().join(format!("compare-upload-{}.bin", uuid::Uuid::new_v4()));
    let block: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut data = Vec::with_capacity(mib * block.len());
    for _ in 0..mib {
        data.extend_from_slice(&block);
    }
    tokio::fs::write(&path, data).await?;
    Ok(path)
}

/// Deletes the sample file unless it was given as an argument.
pub async fn remove_sample(path: &std::path::Path) {
    if std::env::args().nth(1).is_none() {
        let _ = tokio::fs::remove_file(path).await;
    }
}

/// `AWS_S3_BUCKET` (default `keel-dev`, keel's development default).
pub fn bucket() -> String {
    std::env::var("AWS_S3_BUCKET").unwrap_or_else(|_| "keel-dev".to_owned())
}

/// A raw SDK client for `AWS_S3_ENDPOINT` (path style), used to create the
/// bucket and check the result.
pub async fn sdk_client() -> aws_sdk_s3::Client {
    let shared = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let mut conf = aws_sdk_s3::config::Builder::from(&shared);
    if let Ok(endpoint) = std::env::var("AWS_S3_ENDPOINT") {
        conf = conf.endpoint_url(endpoint).force_path_style(true);
    }
    aws_sdk_s3::Client::from_conf(conf.build())
}

/// Creates the bucket if it is missing.
pub async fn ensure_bucket() -> Result<(), BoxError> {
    let s3 = sdk_client().await;
    if s3.head_bucket().bucket(bucket()).send().await.is_err() {
        s3.create_bucket().bucket(bucket()).send().await?;
    }
    Ok(())
}

/// The stored size of `key`, to show the upload landed.
pub async fn stored_size(key: &str) -> Result<i64, BoxError> {
    let head = sdk_client()
        .await
        .head_object()
        .bucket(bucket())
        .key(key)
        .send()
        .await?;
    Ok(head.content_length().unwrap_or(-1))
}
