//! Shared by the S3 transfer tests: SDK clients for the test servers, buckets,
//! deterministic test data, and the fault-injecting proxy.
#![allow(dead_code)]

pub mod proxy;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use bytes::Bytes;
use futures::stream::Stream;

use crate::support::S3Server;

/// An SDK client for `server`, sending to `endpoint` (the server itself or a proxy
/// in front of it): path-style, us-east-1, checksums only when required, and the
/// SDK's retries off (keel owns retries).
pub fn client(server: &S3Server, endpoint: &str) -> Client {
    let credentials = Credentials::new(
        &server.access_key,
        &server.secret_key,
        None,
        None,
        "keel-tests",
    );
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(server.region.clone()))
        .endpoint_url(endpoint)
        .credentials_provider(credentials)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .retry_config(RetryConfig::disabled())
        .build();
    Client::from_conf(config)
}

/// Creates a fresh bucket with a unique name and returns the name.
pub async fn fresh_bucket(client: &Client, label: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        % 1_000_000_000_000;
    let name = format!(
        "keel-{label}-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    client
        .create_bucket()
        .bucket(&name)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "create bucket {name}: {}",
                aws_sdk_s3::error::DisplayErrorContext(e)
            )
        });
    name
}

/// Chunks of deterministic pseudo-random test data: chunk `index` of `seed`.
pub fn chunk(seed: u64, index: u64, len: usize) -> Bytes {
    let mut state = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let word = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// Size of the chunks of [`data_stream`].
pub const CHUNK: usize = 64 * 1024;

/// `len` bytes of test data as a stream of [`CHUNK`]-sized chunks, generated as it
/// is read (nothing is held).
pub fn data_stream(seed: u64, len: u64) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let chunks = len.div_ceil(CHUNK as u64);
    futures::stream::iter((0..chunks).map(move |index| {
        let start = index * CHUNK as u64;
        let size = (len - start).min(CHUNK as u64) as usize;
        Ok(chunk(seed, index, size))
    }))
}

/// The same bytes as [`data_stream`], in memory.
pub fn data(seed: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let chunks = len.div_ceil(CHUNK as u64);
    for index in 0..chunks {
        let start = index * CHUNK as u64;
        let size = (len - start).min(CHUNK as u64) as usize;
        out.extend_from_slice(&chunk(seed, index, size));
    }
    out
}

/// The object's bytes, fetched with one plain GetObject.
pub async fn get_bytes(client: &Client, bucket: &str, key: &str) -> Vec<u8> {
    let output = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "get {bucket}/{key}: {}",
                aws_sdk_s3::error::DisplayErrorContext(e)
            )
        });
    output
        .body
        .collect()
        .await
        .expect("read body")
        .into_bytes()
        .to_vec()
}

/// Multipart uploads still open in `bucket` (moto answers; s3s-fs does not
/// implement ListMultipartUploads).
pub async fn open_multipart_uploads(client: &Client, bucket: &str) -> Vec<String> {
    let output = client
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "list multipart uploads: {}",
                aws_sdk_s3::error::DisplayErrorContext(e)
            )
        });
    output
        .uploads()
        .iter()
        .filter_map(|u| u.upload_id().map(str::to_string))
        .collect()
}

/// Waits (at most `limit`) until `condition` holds; returns whether it did.
pub async fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts two byte strings are equal without printing megabytes.
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    if let Some(at) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {at}");
    }
}
