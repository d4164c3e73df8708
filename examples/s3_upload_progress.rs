//! Upload a large stream to S3 with a progress bar, then download it back.
//!
//! ```text
//! cargo run --example s3_upload_progress            # embedded S3 server
//! cargo run --example s3_upload_progress -- 200     # 200 MiB
//! AWS_S3_ENDPOINT=http://127.0.0.1:8014 AWS_S3_BUCKET=... AWS_ACCESS_KEY_ID=... \
//!   AWS_SECRET_ACCESS_KEY=... cargo run --example s3_upload_progress
//! ```
//!
//! The body is generated as a stream of unknown length, so keel reads up to the
//! multipart threshold, then hands the rest to the multipart engine (4 parts in
//! flight, memory bounded by part size times parts in flight). Progress events
//! drive an `indicatif` bar.

#[path = "gateway/embedded.rs"]
mod embedded;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use keel::s3::multipart::{MultipartEngine, TransferConfig};
use keel::s3::upload::{ProgressListener, UploadProgress};
use keel::s3::{S3, S3Client, S3Config, UploadBody, UploadOptions};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(64);
    let total = mib * 1024 * 1024;

    // Real S3 when AWS_S3_ENDPOINT is set, else an in-process s3s-fs server.
    let mut server = None;
    let config = if std::env::var("AWS_S3_ENDPOINT").is_ok() {
        S3Config::from_env()?
    } else {
        let base = S3Config::from_env()?;
        let s = embedded::EmbeddedS3::start(base.bucket()).await?;
        let config = base
            .to_builder()
            .endpoint(s.endpoint())
            .credentials(s.access_key(), s.secret_key())
            .build()?;
        server = Some(s);
        config
    };
    let client = S3Client::connect(config).await?;
    let engine = MultipartEngine::new(
        client.sdk().clone(),
        TransferConfig::default()
            .part_size(8 * 1024 * 1024)
            .parts_in_flight(4),
    );
    let s3 = S3::builder(client).multipart(Arc::new(engine)).build();

    let bar = ProgressBar::new(total);
    bar.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    )?);
    let progress = {
        let bar = bar.clone();
        ProgressListener::new(move |p: UploadProgress| {
            bar.set_position(p.bytes_sent);
            if let Some(part) = p.part_number {
                bar.set_message(format!("part {part}"));
            }
        })
    };

    // 1 MiB chunks of a simple pattern, as a stream of unknown length.
    let chunk = 1024 * 1024;
    let body = futures::stream::iter(
        (0..mib).map(move |i| Ok::<_, std::io::Error>(Bytes::from(vec![(i % 251) as u8; chunk]))),
    );
    let key = format!("examples/progress-{}.bin", uuid::Uuid::new_v4().simple());
    let started = Instant::now();
    let out = s3
        .upload_with_progress(
            key.as_str(),
            UploadBody::stream(body),
            UploadOptions::new().content_type("application/octet-stream"),
            progress,
        )
        .await?;
    bar.finish_with_message("done");
    let secs = started.elapsed().as_secs_f64();
    println!(
        "uploaded {} bytes in {} part(s) in {secs:.2} s ({:.1} MiB/s)",
        out.size,
        out.parts.unwrap_or(1),
        mib as f64 / secs
    );

    let back = s3.download_bytes(key.as_str()).await?;
    let same = back.len() as u64 == total
        && back
            .chunks(chunk)
            .enumerate()
            .all(|(i, c)| c.iter().all(|b| *b == (i as u64 % 251) as u8));
    println!("downloaded {} bytes, identical: {same}", back.len());
    s3.delete(key.as_str()).await?;
    s3.shutdown(Duration::from_secs(5)).await;
    if let Some(s) = server {
        s.stop().await;
    }
    if !same {
        return Err("the object came back different".into());
    }
    Ok(())
}
