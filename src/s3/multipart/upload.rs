//! The upload engine: one PutObject below the threshold, concurrent multipart above.

use std::pin::Pin;
use std::sync::Arc;

use aws_sdk_s3::Client;
use aws_sdk_s3::operation::create_multipart_upload::builders::CreateMultipartUploadFluentBuilder;
use aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use tokio::task::JoinSet;

use super::body::{PartReader, UploadBody};
use super::error::TransferError;
use super::guard::AbortOnDrop;
use super::plan::{self, MAX_PARTS, MIB};
use super::progress::{ProgressListener, TransferProgress};
use super::retry::{RetryPolicy, TransferCounters, TransferStats, with_retries};

/// What an upload sets on the object: content type, metadata, cache control, ACL,
/// server-side encryption, tagging. Applied to the PutObject of a small upload or to
/// the CreateMultipartUpload of a large one (parts carry none of it).
pub trait ApplyUploadOptions: Send + Sync {
    /// Sets the options on a PutObject request.
    fn apply_to_put(&self, request: PutObjectFluentBuilder) -> PutObjectFluentBuilder;
    /// Sets the options on a CreateMultipartUpload request.
    fn apply_to_create(
        &self,
        request: CreateMultipartUploadFluentBuilder,
    ) -> CreateMultipartUploadFluentBuilder;
}

/// No options: the server's defaults.
impl ApplyUploadOptions for () {
    fn apply_to_put(&self, request: PutObjectFluentBuilder) -> PutObjectFluentBuilder {
        request
    }

    fn apply_to_create(
        &self,
        request: CreateMultipartUploadFluentBuilder,
    ) -> CreateMultipartUploadFluentBuilder {
        request
    }
}

/// Settings of uploads, copies and ranged downloads.
///
/// | setting | default | why |
/// |---|---|---|
/// | `threshold` | 5 MiB | as the seed: smaller objects go in one PutObject |
/// | `part_size` | 5 MiB | as the seed and `@aws-sdk/lib-storage`; S3's minimum. Grows to fit 10,000 parts (see [`plan`](super::plan)). 8-16 MiB sends fewer requests on fast links |
/// | `parts_in_flight` | 4 | as lib-storage's `queueSize`: memory is about `part_size x parts_in_flight` |
/// | `retry` | 3 retries, 1 s, 2 s, 4 s, cap 10 s | as the seed; per request, see [`RetryPolicy`] |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferConfig {
    threshold: u64,
    part_size: u64,
    parts_in_flight: usize,
    retry: RetryPolicy,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            threshold: 5 * MIB,
            part_size: 5 * MIB,
            parts_in_flight: 4,
            retry: RetryPolicy::default(),
        }
    }
}

impl TransferConfig {
    /// Objects of at least this many bytes go multipart (default 5 MiB).
    pub fn threshold(mut self, bytes: u64) -> Self {
        self.threshold = bytes;
        self
    }

    /// The size of the first parts (default 5 MiB; clamped to 5 MiB..=5 GiB).
    pub fn part_size(mut self, bytes: u64) -> Self {
        self.part_size = plan::clamp_part_size(bytes);
        self
    }

    /// Parts (or ranges) in flight at once (default 4, at least 1).
    pub fn parts_in_flight(mut self, parts: usize) -> Self {
        self.parts_in_flight = parts.max(1);
        self
    }

    /// How each request is retried.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The multipart threshold.
    pub fn get_threshold(&self) -> u64 {
        self.threshold
    }

    /// The first part size.
    pub fn get_part_size(&self) -> u64 {
        self.part_size
    }

    /// Parts in flight.
    pub fn get_parts_in_flight(&self) -> usize {
        self.parts_in_flight
    }

    /// The retry policy.
    pub fn get_retry(&self) -> &RetryPolicy {
        &self.retry
    }
}

/// What a finished upload reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadReceipt {
    /// The bucket.
    pub bucket: String,
    /// The key.
    pub key: String,
    /// The object's ETag.
    pub e_tag: Option<String>,
    /// The object's version, in a versioned bucket.
    pub version_id: Option<String>,
    /// The object's location, when S3 reports one (multipart only).
    pub location: Option<String>,
    /// Bytes uploaded.
    pub size: u64,
    /// Parts of the multipart upload; 0 for a single PutObject.
    pub parts: u32,
    /// Requests, retries, throttling, backoff and the peak of parts in flight.
    pub stats: TransferStats,
}

/// Uploads objects: one PutObject below the threshold, concurrent multipart above,
/// with per-part retry, progress events, and no multipart upload left behind on
/// failure or cancellation.
///
/// # Memory
///
/// The next part is read only when fewer than `parts_in_flight` parts are being
/// sent, so a file, reader or stream body holds at most `parts_in_flight` part
/// buffers (about `part_size x parts_in_flight`; the first 5 MiB of a stream of
/// unknown length are read ahead to choose between PutObject and multipart). A
/// [`UploadBody::Bytes`] body is sent from the caller's memory without copies.
///
/// # Cancellation
///
/// Dropping the upload future aborts the part tasks and spawns an
/// AbortMultipartUpload on the current Tokio runtime, so no multipart upload is
/// left behind (outside a runtime the abort is impossible and is logged). A
/// failure (retries exhausted, a permanent error, a body that fails to read)
/// stops the other parts, waits for them, then aborts before returning the error.
///
/// # Retries
///
/// Every request is retried by [`RetryPolicy`]; a part is re-sent from the buffer
/// it already holds. Build the client with the SDK's own retries disabled, or the
/// attempts multiply.
///
/// Cloning shares the SDK client (its connection pool) and copies the config.
#[derive(Clone, Debug)]
pub struct MultipartUploader {
    client: Client,
    config: TransferConfig,
}

impl MultipartUploader {
    /// An uploader over `client` with `config`.
    pub fn new(client: Client, config: TransferConfig) -> Self {
        MultipartUploader { client, config }
    }

    /// The SDK client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The config.
    pub fn config(&self) -> &TransferConfig {
        &self.config
    }

    /// Uploads `body` to `bucket`/`key` with `options`, reporting to `progress`.
    pub async fn upload(
        &self,
        bucket: &str,
        key: &str,
        body: UploadBody,
        options: &dyn ApplyUploadOptions,
        progress: &ProgressListener,
    ) -> Result<UploadReceipt, TransferError> {
        let counters = TransferCounters::default();
        let read_error = |e| TransferError::io("reading the upload body", bucket, key, e);
        let mut reader = body.open().await.map_err(read_error)?;
        let threshold = self.config.threshold;
        let single = match reader.length() {
            Some(length) if length < threshold || length == 0 => {
                Some(read_whole(&mut reader, length, bucket, key).await?)
            }
            Some(_) => None,
            None => {
                let probe_size = usize::try_from(threshold.max(1)).unwrap_or(usize::MAX);
                let probe = reader.next_part(probe_size).await.map_err(read_error)?;
                if reader.is_finished() {
                    Some(probe)
                } else {
                    reader.unread(probe);
                    None
                }
            }
        };
        match single {
            Some(data) => {
                self.put_single(bucket, key, data, options, progress, counters)
                    .await
            }
            None => {
                self.put_multipart(bucket, key, reader, options, progress, counters)
                    .await
            }
        }
    }

    async fn put_single(
        &self,
        bucket: &str,
        key: &str,
        data: Bytes,
        options: &dyn ApplyUploadOptions,
        progress: &ProgressListener,
        counters: TransferCounters,
    ) -> Result<UploadReceipt, TransferError> {
        let size = data.len() as u64;
        let output = {
            let _flight = counters.enter_flight();
            with_retries(&self.config.retry, &counters, "PutObject", || {
                let request = self
                    .client
                    .put_object()
                    .bucket(bucket)
                    .key(key)
                    .content_length(size as i64)
                    .body(ByteStream::from(data.clone()));
                options.apply_to_put(request).send()
            })
            .await
            .map_err(|e| TransferError::request("PutObject", bucket, key, e))?
        };
        progress.emit(TransferProgress {
            bytes: size,
            total: Some(size),
            part_number: 1,
            parts_done: 1,
        });
        tracing::debug!(bucket, key, size, "uploaded with one PutObject");
        Ok(UploadReceipt {
            bucket: bucket.to_string(),
            key: key.to_string(),
            e_tag: output.e_tag().map(str::to_string),
            version_id: output.version_id().map(str::to_string),
            location: None,
            size,
            parts: 0,
            stats: counters.snapshot(),
        })
    }

    async fn put_multipart(
        &self,
        bucket: &str,
        key: &str,
        reader: PartReader,
        options: &dyn ApplyUploadOptions,
        progress: &ProgressListener,
        counters: TransferCounters,
    ) -> Result<UploadReceipt, TransferError> {
        let fixed_part_size = match reader.length() {
            Some(length) => Some(
                plan::part_size_for_length(length, self.config.part_size).ok_or_else(|| {
                    TransferError::TooLarge {
                        bucket: bucket.to_string(),
                        key: key.to_string(),
                        reason: format!("{length} bytes is over the 5 TiB object limit"),
                    }
                })?,
            ),
            None => None,
        };
        let created = with_retries(
            &self.config.retry,
            &counters,
            "CreateMultipartUpload",
            || {
                let request = self
                    .client
                    .create_multipart_upload()
                    .bucket(bucket)
                    .key(key);
                options.apply_to_create(request).send()
            },
        )
        .await
        .map_err(|e| TransferError::request("CreateMultipartUpload", bucket, key, e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| {
                TransferError::missing("CreateMultipartUpload", bucket, key, "an upload id")
            })?
            .to_string();
        tracing::debug!(bucket, key, upload_id, "multipart upload created");

        let target = Arc::new(PartTarget {
            client: self.client.clone(),
            bucket: bucket.to_string(),
            key: key.to_string(),
            upload_id,
            retry: self.config.retry.clone(),
            counters: counters.clone(),
        });
        // Declared before the part tasks so that, when the future is dropped, the
        // tasks are aborted first and the abort request goes out after them.
        let mut guard = AbortOnDrop::new(
            self.client.clone(),
            bucket,
            key,
            &target.upload_id,
            self.config.retry.clone(),
        );
        let mut tasks = JoinSet::new();
        let sent = self
            .send_parts(&target, reader, fixed_part_size, progress, &mut tasks)
            .await;
        let result = match sent {
            Ok((parts, size)) => target.complete(parts, size).await,
            Err(error) => Err(error),
        };
        match result {
            Ok(output) => {
                guard.disarm();
                let size = output.size;
                tracing::debug!(bucket, key, size, "multipart upload completed");
                Ok(UploadReceipt {
                    bucket: bucket.to_string(),
                    key: key.to_string(),
                    e_tag: output.e_tag,
                    version_id: output.version_id,
                    location: output.location,
                    size,
                    parts: output.parts,
                    stats: counters.snapshot(),
                })
            }
            Err(error) => {
                tasks.shutdown().await;
                tracing::warn!(bucket, key, error = %error, "multipart upload failed, aborting it");
                guard.abort_now().await;
                Err(error)
            }
        }
    }

    /// Reads parts and sends them, at most `parts_in_flight` at once; returns the
    /// completed parts in order and the body's size.
    ///
    /// Reading the next part and reaping finished parts run side by side, so a slow
    /// body neither hides a failed part nor delays progress events.
    async fn send_parts(
        &self,
        target: &Arc<PartTarget>,
        reader: PartReader,
        fixed_part_size: Option<u64>,
        progress: &ProgressListener,
        tasks: &mut JoinSet<Result<(CompletedPart, u64), TransferError>>,
    ) -> Result<(Vec<CompletedPart>, u64), TransferError> {
        let (bucket, key) = (target.bucket.as_str(), target.key.as_str());
        let announced = reader.length();
        // The reader is here between reads and inside `reading` during one.
        let mut idle_reader = Some(reader);
        let mut reading: Option<PendingRead> = None;
        let mut body_size: Option<u64> = None;
        let mut completed = Vec::new();
        let mut next_part = 0u32;
        let mut sent = 0u64;
        loop {
            if body_size.is_none() && tasks.len() < self.config.parts_in_flight {
                if let Some(mut reader) = idle_reader.take() {
                    let size = fixed_part_size.unwrap_or_else(|| {
                        plan::part_size_for_unknown_length(next_part + 1, self.config.part_size)
                    });
                    let size = usize::try_from(size).unwrap_or(usize::MAX);
                    reading = Some(Box::pin(async move {
                        let part = reader.next_part(size).await;
                        (reader, part)
                    }));
                }
            }
            tokio::select! {
                (reader, part) = async { reading.as_mut().expect("guarded").await }, if reading.is_some() => {
                    reading = None;
                    let data = part.map_err(|e| TransferError::io("reading the upload body", bucket, key, e))?;
                    check_length(announced, &reader, bucket, key)?;
                    if reader.is_finished() {
                        body_size = Some(reader.bytes_read());
                    }
                    idle_reader = Some(reader);
                    if data.is_empty() {
                        continue;
                    }
                    next_part += 1;
                    if next_part > MAX_PARTS {
                        return Err(TransferError::TooLarge {
                            bucket: bucket.to_string(),
                            key: key.to_string(),
                            reason: format!("the body needs more than {MAX_PARTS} parts"),
                        });
                    }
                    let target = Arc::clone(target);
                    let number = next_part;
                    tasks.spawn(async move { target.upload_part(number, data).await });
                }
                Some(joined) = tasks.join_next() => {
                    let (part, length) = joined.map_err(|source| TransferError::Task {
                        bucket: bucket.to_string(),
                        key: key.to_string(),
                        source,
                    })??;
                    sent += length;
                    let part_number = part.part_number().and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
                    completed.push(part);
                    progress.emit(TransferProgress {
                        bytes: sent,
                        total: announced.or(body_size),
                        part_number,
                        parts_done: completed.len() as u32,
                    });
                }
                else => break,
            }
        }
        completed.sort_by_key(|part| part.part_number());
        Ok((completed, body_size.unwrap_or(sent)))
    }
}

/// A read of the next part in progress; it owns the reader until it finishes.
type PendingRead = Pin<Box<dyn Future<Output = (PartReader, std::io::Result<Bytes>)> + Send>>;

/// Checks the bytes read against the announced length: never past it, and all of
/// it once the body has ended.
fn check_length(
    announced: Option<u64>,
    reader: &PartReader,
    bucket: &str,
    key: &str,
) -> Result<(), TransferError> {
    let Some(expected) = announced else {
        return Ok(());
    };
    let actual = reader.bytes_read();
    if actual > expected || (reader.is_finished() && actual != expected) {
        return Err(TransferError::LengthMismatch {
            bucket: bucket.to_string(),
            key: key.to_string(),
            expected,
            actual,
        });
    }
    Ok(())
}

/// Reads a whole body of announced `length` (below the threshold) into memory.
async fn read_whole(
    reader: &mut PartReader,
    length: u64,
    bucket: &str,
    key: &str,
) -> Result<Bytes, TransferError> {
    // One byte more than announced, to notice a body that runs long.
    let size = usize::try_from(length.saturating_add(1)).unwrap_or(usize::MAX);
    let data = reader
        .next_part(size)
        .await
        .map_err(|e| TransferError::io("reading the upload body", bucket, key, e))?;
    check_length(Some(length), reader, bucket, key)?;
    Ok(data)
}

/// Where the parts of one multipart upload go; shared by its part tasks.
#[derive(Debug)]
struct PartTarget {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    retry: RetryPolicy,
    counters: TransferCounters,
}

struct Completed {
    e_tag: Option<String>,
    version_id: Option<String>,
    location: Option<String>,
    parts: u32,
    size: u64,
}

impl PartTarget {
    async fn upload_part(
        &self,
        part_number: u32,
        data: Bytes,
    ) -> Result<(CompletedPart, u64), TransferError> {
        let _flight = self.counters.enter_flight();
        let length = data.len() as u64;
        let output = with_retries(&self.retry, &self.counters, "UploadPart", || {
            self.client
                .upload_part()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&self.upload_id)
                .part_number(part_number as i32)
                .content_length(length as i64)
                .body(ByteStream::from(data.clone()))
                .send()
        })
        .await
        .map_err(|e| TransferError::request("UploadPart", &self.bucket, &self.key, e))?;
        let e_tag = output.e_tag().ok_or_else(|| {
            TransferError::missing("UploadPart", &self.bucket, &self.key, "an ETag")
        })?;
        let part = CompletedPart::builder()
            .part_number(part_number as i32)
            .e_tag(e_tag)
            .build();
        Ok((part, length))
    }

    async fn complete(
        &self,
        parts: Vec<CompletedPart>,
        size: u64,
    ) -> Result<Completed, TransferError> {
        let count = parts.len() as u32;
        let upload = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        let output = with_retries(
            &self.retry,
            &self.counters,
            "CompleteMultipartUpload",
            || {
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .upload_id(&self.upload_id)
                    .multipart_upload(upload.clone())
                    .send()
            },
        )
        .await
        .map_err(|e| {
            TransferError::request("CompleteMultipartUpload", &self.bucket, &self.key, e)
        })?;
        Ok(Completed {
            e_tag: output.e_tag().map(str::to_string),
            version_id: output.version_id().map(str::to_string),
            location: output.location().map(str::to_string),
            parts: count,
            size,
        })
    }
}
