//! Server-side copy: one CopyObject below 5 GiB, UploadPartCopy ranges above.

use crate::s3::otel::{Call, traced};
use aws_sdk_s3::Client;
use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use futures::TryFutureExt;
use futures::stream::{self, StreamExt, TryStreamExt};

use super::guard::{AbortOnDrop, UploadRegistry};
use super::plan::{self, CopyRange, MIB};
use super::progress::{ProgressListener, TransferProgress};
use super::retry::{RetryPolicy, TransferCounters, TransferStats, sdk_error, with_retries};
use super::upload::missing;
use crate::s3::error::{S3Operation, S3ServiceError};

/// Settings of server-side copies.
///
/// | setting | default | why |
/// |---|---|---|
/// | `threshold` | 5 GiB | CopyObject's limit: smaller objects copy in one request |
/// | `part_size` | 512 MiB | the server moves the bytes; big ranges mean few requests. Grows to fit 10,000 parts |
/// | `parts_in_flight` | 4 | as uploads |
/// | `retry` | [`RetryPolicy::default`] | per request |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyConfig {
    threshold: u64,
    part_size: u64,
    parts_in_flight: usize,
    retry: RetryPolicy,
}

impl Default for CopyConfig {
    fn default() -> Self {
        CopyConfig {
            threshold: plan::MAX_PART_SIZE,
            part_size: 512 * MIB,
            parts_in_flight: 4,
            retry: RetryPolicy::default(),
        }
    }
}

impl CopyConfig {
    /// Objects of more than this many bytes are copied in parts (default 5 GiB,
    /// which is also the most CopyObject accepts; a higher value is lowered to it).
    pub fn threshold(mut self, bytes: u64) -> Self {
        self.threshold = bytes.min(plan::MAX_PART_SIZE);
        self
    }

    /// The size of the copied ranges (default 512 MiB; clamped to 5 MiB..=5 GiB).
    pub fn part_size(mut self, bytes: u64) -> Self {
        self.part_size = plan::clamp_part_size(bytes);
        self
    }

    /// Ranges copied at once (default 4, at least 1).
    pub fn parts_in_flight(mut self, parts: usize) -> Self {
        self.parts_in_flight = parts.max(1);
        self
    }

    /// How each request is retried.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }
}

/// What a finished copy reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyReceipt {
    /// The destination bucket.
    pub bucket: String,
    /// The destination key.
    pub key: String,
    /// The copy's ETag.
    pub e_tag: Option<String>,
    /// The copy's version, in a versioned bucket.
    pub version_id: Option<String>,
    /// Bytes copied.
    pub size: u64,
    /// Parts of the multipart copy; 0 for a single CopyObject.
    pub parts: u32,
    /// Requests, retries, throttling, backoff and peak parts in flight.
    pub stats: TransferStats,
}

/// Copies objects inside S3: CopyObject up to the threshold, multipart
/// (UploadPartCopy with byte ranges, `parts_in_flight` at a time) above it.
///
/// A multipart copy keeps the source's content type, content encoding, content
/// disposition, content language, cache control and user metadata (CopyObject
/// keeps them by itself). Every range is copied only if the source's ETag is still
/// the one seen first, so a source overwritten mid-copy fails the copy instead of
/// mixing two versions. Failure or a dropped future aborts the multipart upload.
///
/// Cloning shares the SDK client and copies the config.
#[derive(Clone, Debug)]
pub struct MultipartCopier {
    client: Client,
    config: CopyConfig,
    registry: UploadRegistry,
}

impl MultipartCopier {
    /// A copier over `client` with `config`.
    pub fn new(client: Client, config: CopyConfig) -> Self {
        MultipartCopier {
            client,
            config,
            registry: UploadRegistry::default(),
        }
    }

    /// Registers this copier's multipart copies in `registry` (for a shutdown
    /// path's [`UploadRegistry::abort_all`]).
    pub fn with_registry(mut self, registry: UploadRegistry) -> Self {
        self.registry = registry;
        self
    }

    /// Copies `source_bucket`/`source_key` to `bucket`/`key`.
    pub async fn copy(
        &self,
        source_bucket: &str,
        source_key: &str,
        bucket: &str,
        key: &str,
        progress: &ProgressListener,
    ) -> Result<CopyReceipt, S3ServiceError> {
        let counters = TransferCounters::default();
        let retry = &self.config.retry;
        let head = with_retries(retry, &counters, || {
            let send = (self.client.head_object())
                .bucket(source_bucket)
                .key(source_key)
                .send();
            traced(
                Call::new("HeadObject", source_bucket, Some(source_key)),
                send,
            )
            .map_err(sdk_error(S3Operation::Head, source_bucket, source_key))
        })
        .await?;
        let size = head
            .content_length()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| {
                missing(
                    S3Operation::Head,
                    source_bucket,
                    source_key,
                    "content length",
                )
            })?;
        let copy_source = copy_source(source_bucket, source_key);
        let ranges = if size > self.config.threshold {
            plan::plan_copy_ranges(size, self.config.part_size)
        } else {
            None
        };
        let Some(ranges) = ranges else {
            let output = with_retries(retry, &counters, || {
                let send = (self.client.copy_object())
                    .bucket(bucket)
                    .key(key)
                    .copy_source(&copy_source)
                    .send();
                traced(Call::new("CopyObject", bucket, Some(key)), send).map_err(sdk_error(
                    S3Operation::Copy,
                    bucket,
                    key,
                ))
            })
            .await?;
            progress.emit(TransferProgress {
                bytes: size,
                total: Some(size),
                part_number: 1,
                parts_done: 1,
            });
            return Ok(CopyReceipt {
                bucket: bucket.to_string(),
                key: key.to_string(),
                e_tag: output
                    .copy_object_result()
                    .and_then(|r| r.e_tag())
                    .map(str::to_string),
                version_id: output.version_id().map(str::to_string),
                size,
                parts: 0,
                stats: counters.snapshot(),
            });
        };
        let created =
            with_retries(retry, &counters, || {
                let send = with_source_attributes(
                    self.client
                        .create_multipart_upload()
                        .bucket(bucket)
                        .key(key),
                    &head,
                )
                .send();
                traced(Call::new("CreateMultipartUpload", bucket, Some(key)), send)
                    .map_err(sdk_error(S3Operation::CreateMultipartUpload, bucket, key))
            })
            .await?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| missing(S3Operation::CreateMultipartUpload, bucket, key, "upload id"))?
            .to_string();
        let mut guard: AbortOnDrop<()> = AbortOnDrop::new(
            self.client.clone(),
            bucket,
            key,
            &upload_id,
            retry.clone(),
            &self.registry,
        );
        let job = CopyJob {
            client: &self.client,
            bucket,
            key,
            upload_id: &upload_id,
            copy_source: &copy_source,
            source_e_tag: head.e_tag(),
            retry,
            counters: &counters,
        };
        let result = job
            .run(ranges, size, self.config.parts_in_flight, progress)
            .await;
        match result {
            Ok((parts, output)) => {
                guard.disarm();
                Ok(CopyReceipt {
                    bucket: bucket.to_string(),
                    key: key.to_string(),
                    e_tag: output.e_tag().map(str::to_string),
                    version_id: output.version_id().map(str::to_string),
                    size,
                    parts,
                    stats: counters.snapshot(),
                })
            }
            Err(error) => {
                tracing::warn!(bucket, key, error = %error, "multipart copy failed, aborting it");
                guard.abort_now().await;
                Err(error)
            }
        }
    }
}

/// One multipart copy in progress.
struct CopyJob<'a> {
    client: &'a Client,
    bucket: &'a str,
    key: &'a str,
    upload_id: &'a str,
    copy_source: &'a str,
    source_e_tag: Option<&'a str>,
    retry: &'a RetryPolicy,
    counters: &'a TransferCounters,
}

impl CopyJob<'_> {
    async fn run(
        &self,
        ranges: Vec<CopyRange>,
        size: u64,
        parts_in_flight: usize,
        progress: &ProgressListener,
    ) -> Result<
        (
            u32,
            aws_sdk_s3::operation::complete_multipart_upload::CompleteMultipartUploadOutput,
        ),
        S3ServiceError,
    > {
        let mut copied = 0u64;
        let mut done = 0u32;
        let mut parts: Vec<CompletedPart> = stream::iter(ranges)
            .map(|range| self.copy_range(range))
            .buffer_unordered(parts_in_flight)
            .map_ok(|(part, length)| {
                copied += length;
                done += 1;
                progress.emit(TransferProgress {
                    bytes: copied,
                    total: Some(size),
                    part_number: part
                        .part_number()
                        .and_then(|n| u32::try_from(n).ok())
                        .unwrap_or(0),
                    parts_done: done,
                });
                part
            })
            .try_collect()
            .await?;
        parts.sort_by_key(|part| part.part_number());
        let count = parts.len() as u32;
        let upload = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        let output = with_retries(self.retry, self.counters, || {
            let send = (self.client.complete_multipart_upload())
                .bucket(self.bucket)
                .key(self.key)
                .upload_id(self.upload_id)
                .multipart_upload(upload.clone())
                .send();
            let call = Call::new("CompleteMultipartUpload", self.bucket, Some(self.key));
            traced(call.upload_id(self.upload_id), send).map_err(sdk_error(
                S3Operation::CompleteMultipartUpload,
                self.bucket,
                self.key,
            ))
        })
        .await?;
        Ok((count, output))
    }

    async fn copy_range(&self, range: CopyRange) -> Result<(CompletedPart, u64), S3ServiceError> {
        let _flight = self.counters.enter_flight();
        let output = with_retries(self.retry, self.counters, || {
            let send = (self.client.upload_part_copy())
                .bucket(self.bucket)
                .key(self.key)
                .upload_id(self.upload_id)
                .part_number(range.part_number as i32)
                .copy_source(self.copy_source)
                .copy_source_range(range.header_value())
                .set_copy_source_if_match(self.source_e_tag.map(str::to_string))
                .send();
            let call = Call::new("UploadPartCopy", self.bucket, Some(self.key))
                .upload_id(self.upload_id)
                .part_number(range.part_number);
            traced(call, send).map_err(sdk_error(
                S3Operation::UploadPartCopy,
                self.bucket,
                self.key,
            ))
        })
        .await?;
        let e_tag = output
            .copy_part_result()
            .and_then(|r| r.e_tag())
            .ok_or_else(|| missing(S3Operation::UploadPartCopy, self.bucket, self.key, "ETag"))?;
        let part = CompletedPart::builder()
            .part_number(range.part_number as i32)
            .e_tag(e_tag)
            .build();
        Ok((part, range.len()))
    }
}

fn with_source_attributes(
    request: aws_sdk_s3::operation::create_multipart_upload::builders::CreateMultipartUploadFluentBuilder,
    head: &HeadObjectOutput,
) -> aws_sdk_s3::operation::create_multipart_upload::builders::CreateMultipartUploadFluentBuilder {
    request
        .set_content_type(head.content_type().map(str::to_string))
        .set_content_encoding(head.content_encoding().map(str::to_string))
        .set_content_disposition(head.content_disposition().map(str::to_string))
        .set_content_language(head.content_language().map(str::to_string))
        .set_cache_control(head.cache_control().map(str::to_string))
        .set_metadata(head.metadata().cloned())
}

/// The `x-amz-copy-source` value: `bucket/key`, percent-encoded except for `/` and
/// the unreserved characters.
pub(crate) fn copy_source(bucket: &str, key: &str) -> String {
    let mut encoded = String::with_capacity(bucket.len() + key.len() + 1);
    for byte in bucket
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(key.bytes())
    {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b'/') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_sources_are_percent_encoded_but_keep_slashes() {
        assert_eq!(
            copy_source("b", "a/b c/ü+=.txt"),
            "b/a/b%20c/%C3%BC%2B%3D.txt"
        );
        assert_eq!(
            copy_source("my-bucket", "plain_key~1"),
            "my-bucket/plain_key~1"
        );
    }

    #[test]
    fn the_copy_threshold_never_exceeds_copy_objects_limit() {
        let config = CopyConfig::default().threshold(u64::MAX);
        assert_eq!(config.threshold, plan::MAX_PART_SIZE);
        assert_eq!(
            CopyConfig::default().part_size(1).part_size,
            plan::MIN_PART_SIZE
        );
    }
}
