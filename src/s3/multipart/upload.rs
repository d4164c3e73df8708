//! The upload engine: one PutObject below the threshold, concurrent multipart above.

use crate::s3::otel::{Call, traced};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tracing::Instrument as _;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures::TryFutureExt;
use futures::future::Either;
use tokio::task::JoinSet;

use super::body::PartReader;
use super::guard::{Abort, AbortOnDrop, AbortReport, UploadRegistry};
use super::plan::{self, MAX_PARTS, MIB};
use super::progress::{ProgressListener, TransferProgress};
use super::retry::{RetryPolicy, TransferCounters, TransferStats, with_retries, within};
use crate::s3::error::{S3ErrorKind, S3Operation, S3ServiceError};
use crate::s3::upload::{
    BodyStream, MultipartFuture, MultipartUploadRequest, MultipartUploader, UploadBody,
    UploadOptions, UploadOutput, UploadProgress,
};

/// The error for a request that cannot be made as asked (a body of the wrong
/// length, an object over S3's limits).
pub(crate) fn invalid(
    operation: S3Operation,
    bucket: &str,
    key: &str,
    message: String,
) -> S3ServiceError {
    S3ServiceError::new(operation, S3ErrorKind::InvalidRequest)
        .with_bucket(bucket)
        .with_key(key)
        .with_message(message)
}

/// The error for an answer that lacks something the transfer needs.
pub(crate) fn missing(
    operation: S3Operation,
    bucket: &str,
    key: &str,
    what: &str,
) -> S3ServiceError {
    S3ServiceError::new(
        operation,
        S3ErrorKind::Service {
            code: None,
            status: None,
        },
    )
    .with_bucket(bucket)
    .with_key(key)
    .with_message(format!("the answer has no {what}"))
}

/// Settings of uploads, copies and ranged downloads.
///
/// | setting | default | why |
/// |---|---|---|
/// | `threshold` | 5 MiB | as the seed: smaller objects go in one PutObject |
/// | `part_size` | 5 MiB | as the seed and `@aws-sdk/lib-storage`; S3's minimum. Grows to fit 10,000 parts (see [`plan`](super::plan)). 8-16 MiB sends fewer requests on fast links |
/// | `parts_in_flight` | 4 | as lib-storage's `queueSize`: memory is about `part_size x parts_in_flight` |
/// | `retry` | 3 retries, 1 s, 2 s, 4 s, cap 10 s | as the seed; per request, see [`RetryPolicy`] |
/// | `part_timeout` | 30 s | the fixed share of one UploadPart attempt's bound (see below); as keel's client's request timeout |
/// | `min_throughput` | 64 KiB/s | the size share: a part of `n` bytes gets `n / min_throughput` more (half of 1 Mbit/s) |
/// | `idle_timeout` | 30 s | a download body that sends no byte for this long fails with [`S3ErrorKind::Timeout`] and the range is retried |
///
/// # Timeouts that fit the work
///
/// A fixed timeout per attempt fails every part once parts grow with the object
/// (a 1 TB stream needs 100 MiB parts; at 10 Mbit/s one takes 80 s), yet without
/// a bound a stalled connection holds its slot, and the whole upload, for ever.
/// So one UploadPart attempt of `n` bytes may last
/// `part_timeout + n / min_throughput` (30 s + 80 s for a 5 MiB part, 30 s +
/// 27 min for a 100 MiB one), and the SDK's own per-attempt timeout (keel's
/// [`S3Client`](crate::s3::client::S3Client) sets 30 s) is raised to that bound
/// for UploadPart only. A part that runs over it fails with
/// [`S3ErrorKind::Timeout`], retried like a cut connection. Downloads read their
/// body with an idle (stall) timeout instead: any pace is fine as long as bytes
/// keep coming. Turn the part bound off with
/// [`without_part_timeout`](Self::without_part_timeout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferConfig {
    threshold: u64,
    part_size: u64,
    parts_in_flight: usize,
    retry: RetryPolicy,
    part_timeout: Option<Duration>,
    min_throughput: u64,
    idle_timeout: Duration,
}

/// The default [`TransferConfig::part_timeout`]: 30 s per UploadPart attempt,
/// plus the part's size at [`DEFAULT_MIN_THROUGHPUT`].
pub const DEFAULT_PART_TIMEOUT: Duration = Duration::from_secs(30);

/// The default [`TransferConfig::min_throughput`]: 64 KiB/s, half of 1 Mbit/s.
pub const DEFAULT_MIN_THROUGHPUT: u64 = 64 * 1024;

/// The default [`TransferConfig::idle_timeout`]: 30 s without a byte.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            threshold: 5 * MIB,
            part_size: 5 * MIB,
            parts_in_flight: 4,
            retry: RetryPolicy::default(),
            part_timeout: Some(DEFAULT_PART_TIMEOUT),
            min_throughput: DEFAULT_MIN_THROUGHPUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
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

    /// The fixed share of the longest time one UploadPart attempt may take before
    /// it is given up and retried (default [`DEFAULT_PART_TIMEOUT`], 30 s);
    /// the part's size at [`min_throughput`](Self::min_throughput) is added.
    pub fn part_timeout(mut self, limit: Duration) -> Self {
        self.part_timeout = Some(limit);
        self
    }

    /// No part timeout: a part attempt lasts as long as the client lets it.
    pub fn without_part_timeout(mut self) -> Self {
        self.part_timeout = None;
        self
    }

    /// The part timeout, if any.
    pub fn get_part_timeout(&self) -> Option<Duration> {
        self.part_timeout
    }

    /// The slowest pace (bytes per second) a part upload is allowed on top of the
    /// part timeout (default [`DEFAULT_MIN_THROUGHPUT`], 64 KiB/s; at least 1).
    pub fn min_throughput(mut self, bytes_per_second: u64) -> Self {
        self.min_throughput = bytes_per_second.max(1);
        self
    }

    /// The minimum throughput.
    pub fn get_min_throughput(&self) -> u64 {
        self.min_throughput
    }

    /// How long a download body may send nothing before the range fails with
    /// [`S3ErrorKind::Timeout`] (default [`DEFAULT_IDLE_TIMEOUT`], 30 s).
    pub fn idle_timeout(mut self, limit: Duration) -> Self {
        self.idle_timeout = limit;
        self
    }

    /// The idle timeout of download bodies.
    pub fn get_idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// The bound of one UploadPart attempt of `bytes`: the part timeout plus
    /// `bytes / min_throughput`; `None` without a part timeout.
    pub fn part_attempt_limit(&self, bytes: u64) -> Option<Duration> {
        let base = self.part_timeout?;
        let pace = Duration::from_secs_f64(bytes as f64 / self.min_throughput.max(1) as f64);
        Some(base.saturating_add(pace))
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

/// One entry of ListMultipartUploads.
#[derive(Debug)]
struct ListedUpload {
    key: String,
    upload_id: String,
    initiated: Option<std::time::SystemTime>,
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
/// body of bytes is sent from the caller's memory without copies.
///
/// # Cancellation
///
/// Dropping the upload future aborts the part tasks and sends an
/// AbortMultipartUpload from a short-lived thread with its own runtime, so no
/// multipart upload is left behind even when the caller's runtime is shutting
/// down and drops every task. A failure (retries exhausted, a permanent error, a
/// body that fails to read) stops the other parts, waits for them, then aborts
/// before returning the error. A failed abort is retried, logged at error level
/// and counted ([`UploadRegistry::abort_failures`]); the upload stays in the
/// [`registry`](Self::registry) so a shutdown path can try again with
/// [`UploadRegistry::abort_all`]. A CreateMultipartUpload that needed a retry
/// (the first answer may have been lost after the server created an upload) is
/// followed by a ListMultipartUploads of the key, and uploads of the key
/// initiated since the first attempt, other than the one kept, are aborted.
/// [`abort_stale_uploads`](Self::abort_stale_uploads) sweeps what other
/// processes left behind.
///
/// # Retries
///
/// Every request is retried by [`RetryPolicy`]; a part is re-sent from the buffer
/// it already holds, and a part attempt that outlasts its size-aware bound
/// ([`TransferConfig::part_attempt_limit`]: 30 s plus the part at 64 KiB/s) is
/// given up and retried. Build the
/// client with the SDK's own retries disabled, or the attempts multiply.
///
/// A CompleteMultipartUpload whose answer is lost (the connection breaks after the
/// server got the request) may have completed: its retry is then refused (S3
/// answers `NoSuchUpload`). The engine then asks HeadObject and reports success when the
/// object has the upload's size and multipart ETag (the MD5 of the part MD5s and
/// the part count), instead of failing an upload that is in fact stored.
///
/// # Payload signing
///
/// SigV4 signs the SHA-256 of every body, about 45 % of the client's CPU in
/// `benches/s3_upload.rs` (perf). Over TLS that hash adds nothing (TLS already
/// protects the bytes in transit), so when keel's S3 service uploads through this
/// engine to an `https` endpoint (or AWS's default endpoints) the parts and the
/// PutObject are sent as `UNSIGNED-PAYLOAD`; over plain `http` they stay signed.
/// An engine built with [`new`](Self::new) over a bare SDK client cannot see the
/// client's endpoint and always signs.
///
/// Cloning shares the SDK client (its connection pool) and copies the config.
#[derive(Clone, Debug)]
pub struct MultipartEngine {
    client: Client,
    config: TransferConfig,
    sign_payload: bool,
    registry: UploadRegistry,
}

/// Whether bodies sent to `endpoint` need a signed payload: yes unless the
/// endpoint is `https` (`None` is AWS's default endpoints, always `https`).
fn payload_needs_signing(endpoint: Option<&str>) -> bool {
    endpoint.is_some_and(|url| {
        !url.get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
    })
}

impl MultipartEngine {
    /// An uploader over `client` with `config`.
    pub fn new(client: Client, config: TransferConfig) -> Self {
        MultipartEngine {
            client,
            config,
            sign_payload: true,
            registry: UploadRegistry::default(),
        }
    }

    /// Registers this engine's uploads in `registry` (shared with a facade or a
    /// shutdown path) instead of its own.
    pub fn with_registry(mut self, registry: UploadRegistry) -> Self {
        self.registry = registry;
        self
    }

    /// The uploads in flight, for a shutdown path:
    /// `engine.registry().abort_all(budget)`.
    pub fn registry(&self) -> &UploadRegistry {
        &self.registry
    }

    /// Aborts the multipart uploads of `bucket` (all of them, or those under
    /// `prefix`) initiated more than `older_than` ago, with ListMultipartUploads
    /// page by page. For uploads that a crashed process (or any other client) left
    /// behind; keel's own uploads abort themselves. An upload that another process
    /// is still sending and that is older than `older_than` is aborted too: pick
    /// an age longer than any upload takes (a day is common).
    pub async fn abort_stale_uploads(
        &self,
        bucket: &str,
        prefix: Option<&str>,
        older_than: Duration,
    ) -> Result<AbortReport, S3ServiceError> {
        let cutoff = std::time::SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(std::time::UNIX_EPOCH);
        let mut report = AbortReport::default();
        for upload in self.list_uploads(bucket, prefix).await? {
            if upload.initiated.is_some_and(|at| at > cutoff) {
                continue;
            }
            let abort = Abort::new(
                self.client.clone(),
                bucket,
                &upload.key,
                &upload.upload_id,
                self.config.retry.clone(),
            );
            if abort.send(&self.registry).await {
                report.aborted += 1;
            } else {
                report.failed += 1;
            }
        }
        Ok(report)
    }

    /// Every multipart upload of `bucket` under `prefix`, all pages.
    async fn list_uploads(
        &self,
        bucket: &str,
        prefix: Option<&str>,
    ) -> Result<Vec<ListedUpload>, S3ServiceError> {
        let counters = TransferCounters::default();
        let operation = S3Operation::ListMultipartUploads;
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
        // A server that pages for ever is cut off: 10,000 pages of 1,000 uploads.
        for _ in 0..10_000 {
            let page = with_retries(&self.config.retry, &counters, || {
                self.client
                    .list_multipart_uploads()
                    .bucket(bucket)
                    .set_prefix(prefix.map(str::to_owned))
                    .set_key_marker(key_marker.clone())
                    .set_upload_id_marker(id_marker.clone())
                    .send()
                    .map_err(|e| S3ServiceError::from_sdk(operation, bucket, prefix, e))
            })
            .await?;
            out.extend(page.uploads().iter().filter_map(|u| {
                Some(ListedUpload {
                    key: u.key()?.to_string(),
                    upload_id: u.upload_id()?.to_string(),
                    initiated: u
                        .initiated()
                        .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                })
            }));
            let next = (
                page.next_key_marker().map(str::to_owned),
                page.next_upload_id_marker().map(str::to_owned),
            );
            if page.is_truncated() != Some(true) || (next.0.is_none() && next.1.is_none()) {
                break;
            }
            (key_marker, id_marker) = next;
        }
        Ok(out)
    }

    /// After a CreateMultipartUpload that needed more than one attempt, an
    /// earlier attempt may have created an upload whose answer was lost. Aborts
    /// the uploads of `key`, other than `keep` and this engine's own uploads in
    /// flight, initiated (by the server's clock, next to `keep`'s time) within the
    /// `elapsed` time the Create attempts took.
    async fn abort_strays(&self, bucket: &str, key: &str, elapsed: Duration, keep: &str) {
        let uploads = match self.list_uploads(bucket, Some(key)).await {
            Ok(uploads) => uploads,
            Err(error) => {
                tracing::warn!(bucket, key, error = %error, "cannot list uploads to find one left by a lost CreateMultipartUpload answer");
                return;
            }
        };
        // The server's clock, not ours: `keep`'s initiated time anchors the window.
        let anchor = uploads
            .iter()
            .find(|u| u.upload_id == keep)
            .and_then(|u| u.initiated)
            .unwrap_or_else(std::time::SystemTime::now);
        // S3 stores `initiated` to the second.
        let slack = Duration::from_secs(2);
        let from = anchor
            .checked_sub(elapsed + slack)
            .unwrap_or(std::time::UNIX_EPOCH);
        let to = anchor + slack;
        let ours: Vec<String> = self
            .registry
            .in_flight()
            .into_iter()
            .map(|u| u.upload_id)
            .collect();
        for upload in uploads {
            let in_window = upload.initiated.is_some_and(|at| at >= from && at <= to);
            if upload.key != key
                || upload.upload_id == keep
                || ours.contains(&upload.upload_id)
                || !in_window
            {
                continue;
            }
            tracing::warn!(
                bucket,
                key,
                upload_id = upload.upload_id,
                "aborting the upload of a CreateMultipartUpload whose answer was lost"
            );
            Abort::new(
                self.client.clone(),
                bucket,
                key,
                &upload.upload_id,
                self.config.retry.clone(),
            )
            .send(&self.registry)
            .await;
        }
    }

    /// Sends unsigned payloads when `endpoint`, the client's endpoint URL (`None`:
    /// AWS's default endpoints), is `https`.
    fn for_endpoint(mut self, endpoint: Option<&str>) -> Self {
        self.sign_payload = payload_needs_signing(endpoint);
        self
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
    ///
    /// The key is used as given: check it with [`ObjectKey`](crate::s3::key::ObjectKey)
    /// first (the S3 service does).
    pub async fn upload(
        &self,
        bucket: &str,
        key: &str,
        body: UploadBody,
        options: &UploadOptions,
        progress: &ProgressListener,
    ) -> Result<UploadReceipt, S3ServiceError> {
        let reader = PartReader::open(body)
            .await
            .map_err(|e| S3ServiceError::io(S3Operation::Upload, bucket, key, e))?;
        self.upload_from(bucket, key, reader, options, progress)
            .await
    }

    /// Uploads a stream of chunks whose total is `length` when known (then checked:
    /// a body that runs short or long fails and leaves nothing behind).
    pub async fn upload_stream(
        &self,
        bucket: &str,
        key: &str,
        body: BodyStream,
        length: Option<u64>,
        options: &UploadOptions,
        progress: &ProgressListener,
    ) -> Result<UploadReceipt, S3ServiceError> {
        let reader = PartReader::from_stream(body, length);
        self.upload_from(bucket, key, reader, options, progress)
            .await
    }

    async fn upload_from(
        &self,
        bucket: &str,
        key: &str,
        mut reader: PartReader,
        options: &UploadOptions,
        progress: &ProgressListener,
    ) -> Result<UploadReceipt, S3ServiceError> {
        let counters = TransferCounters::default();
        let read_error = |e| S3ServiceError::body(S3Operation::Upload, bucket, key, e);
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
        options: &UploadOptions,
        progress: &ProgressListener,
        counters: TransferCounters,
    ) -> Result<UploadReceipt, S3ServiceError> {
        let size = data.len() as u64;
        let output = {
            let _flight = counters.enter_flight();
            with_retries(&self.config.retry, &counters, || {
                let request = self
                    .client
                    .put_object()
                    .bucket(bucket)
                    .key(key)
                    .content_length(size as i64)
                    .body(ByteStream::from(data.clone()));
                let request = options.apply_to_put_object(request);
                let sent = if self.sign_payload {
                    Either::Left(request.send())
                } else {
                    Either::Right(request.customize().disable_payload_signing().send())
                };
                let sent = traced(Call::new("PutObject", bucket, Some(key)), sent);
                async move {
                    sent.await.map_err(|e| {
                        S3ServiceError::from_sdk(S3Operation::Upload, bucket, Some(key), e)
                    })
                }
            })
            .await?
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
        options: &UploadOptions,
        progress: &ProgressListener,
        counters: TransferCounters,
    ) -> Result<UploadReceipt, S3ServiceError> {
        let fixed_part_size = match reader.length() {
            Some(length) => Some(
                plan::part_size_for_length(length, self.config.part_size).ok_or_else(|| {
                    invalid(
                        S3Operation::Upload,
                        bucket,
                        key,
                        format!("{length} bytes is over S3's 5 TiB object limit"),
                    )
                })?,
            ),
            None => None,
        };
        let operation = S3Operation::CreateMultipartUpload;
        let started = std::time::Instant::now();
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let created = with_retries(&self.config.retry, &counters, || {
            attempts.fetch_add(1, Ordering::Relaxed);
            let request = self
                .client
                .create_multipart_upload()
                .bucket(bucket)
                .key(key);
            let sent = options.apply_to_create_multipart_upload(request).send();
            let sent = traced(Call::new("CreateMultipartUpload", bucket, Some(key)), sent);
            async move {
                sent.await
                    .map_err(|e| S3ServiceError::from_sdk(operation, bucket, Some(key), e))
            }
        })
        .await?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| missing(operation, bucket, key, "upload id"))?
            .to_string();
        tracing::debug!(bucket, key, upload_id, "multipart upload created");
        // The guard registers the upload before anything else can fail.
        let mut guard = AbortOnDrop::new(
            self.client.clone(),
            bucket,
            key,
            &upload_id,
            self.config.retry.clone(),
            &self.registry,
        );
        if attempts.load(Ordering::Relaxed) > 1 {
            self.abort_strays(bucket, key, started.elapsed(), &upload_id)
                .await;
        }

        let target = Arc::new(PartTarget {
            client: self.client.clone(),
            bucket: bucket.to_string(),
            key: key.to_string(),
            upload_id,
            retry: self.config.retry.clone(),
            config: self.config.clone(),
            sign_payload: self.sign_payload,
            counters: counters.clone(),
        });
        // The guard owns the part tasks: dropped with the future, it stops them
        // first and sends the abort after them.
        let sent = self
            .send_parts(&target, reader, fixed_part_size, progress, &mut guard.tasks)
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
        tasks: &mut JoinSet<Result<(CompletedPart, u64), S3ServiceError>>,
    ) -> Result<(Vec<CompletedPart>, u64), S3ServiceError> {
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
            if body_size.is_none()
                && tasks.len() < self.config.parts_in_flight
                && let Some(mut reader) = idle_reader.take()
            {
                let size = fixed_part_size.unwrap_or_else(|| {
                    plan::part_size_for_unknown_length(next_part + 1, self.config.part_size)
                });
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                reading = Some(Box::pin(async move {
                    let part = reader.next_part(size).await;
                    (reader, part)
                }));
            }
            tokio::select! {
                (reader, part) = async { reading.as_mut().expect("guarded").await }, if reading.is_some() => {
                    reading = None;
                    let data = part.map_err(|e| S3ServiceError::body(S3Operation::Upload, bucket, key, e))?;
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
                        let message = format!("the body needs more than {MAX_PARTS} parts");
                        return Err(invalid(S3Operation::Upload, bucket, key, message));
                    }
                    let target = Arc::clone(target);
                    let number = next_part;
                    // The part's spans join the upload's trace.
                    tasks.spawn(async move { target.upload_part(number, data).await }.in_current_span());
                }
                Some(joined) = tasks.join_next() => {
                    let (part, length) = joined.map_err(|e| {
                        S3ServiceError::new(S3Operation::UploadPart, S3ErrorKind::Service { code: None, status: None })
                            .with_bucket(bucket)
                            .with_key(key)
                            .with_message("the part task ended abnormally")
                            .with_source(e)
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
) -> Result<(), S3ServiceError> {
    let Some(expected) = announced else {
        return Ok(());
    };
    let actual = reader.bytes_read();
    if actual > expected || (reader.is_finished() && actual != expected) {
        let message = if actual > expected {
            format!("the body runs past the announced {expected} bytes")
        } else {
            format!("the body ended after {actual} of the announced {expected} bytes")
        };
        // The caller's body is wrong, not the server: kind Body.
        return Err(S3ServiceError::new(S3Operation::Upload, S3ErrorKind::Body)
            .with_bucket(bucket)
            .with_key(key)
            .with_message(message));
    }
    Ok(())
}

/// Reads a whole body of announced `length` (below the threshold) into memory.
async fn read_whole(
    reader: &mut PartReader,
    length: u64,
    bucket: &str,
    key: &str,
) -> Result<Bytes, S3ServiceError> {
    // One byte more than announced, to notice a body that runs long.
    let size = usize::try_from(length.saturating_add(1)).unwrap_or(usize::MAX);
    let data = reader
        .next_part(size)
        .await
        .map_err(|e| S3ServiceError::body(S3Operation::Upload, bucket, key, e))?;
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
    config: TransferConfig,
    sign_payload: bool,
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
    ) -> Result<(CompletedPart, u64), S3ServiceError> {
        let _flight = self.counters.enter_flight();
        let length = data.len() as u64;
        let (bucket, key) = (self.bucket.as_str(), self.key.as_str());
        let operation = S3Operation::UploadPart;
        let limit = self.config.part_attempt_limit(length);
        // The SDK's own per-attempt timeout (30 s in keel's client) would cut a
        // large part on a slow link: raise it past keel's size-aware bound.
        let timeouts = {
            let base = self.client.config().timeout_config();
            let mut builder = aws_sdk_s3::config::timeout::TimeoutConfig::builder();
            builder.set_connect_timeout(base.and_then(|t| t.connect_timeout()));
            if let Some(limit) = limit {
                builder = builder.operation_attempt_timeout(limit + Duration::from_secs(1));
            }
            builder.build()
        };
        let output = with_retries(&self.retry, &self.counters, || {
            let request = self
                .client
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(&self.upload_id)
                .part_number(part_number as i32)
                .content_length(length as i64)
                .body(ByteStream::from(data.clone()));
            let request = request.customize().config_override(
                aws_sdk_s3::config::Builder::default().timeout_config(timeouts.clone()),
            );
            let sent = if self.sign_payload {
                Either::Left(request.send())
            } else {
                Either::Right(request.disable_payload_signing().send())
            };
            let call = Call::new("UploadPart", bucket, Some(key))
                .upload_id(&self.upload_id)
                .part_number(part_number);
            let sent = traced(call, sent);
            let sent = async move {
                sent.await
                    .map_err(|e| S3ServiceError::from_sdk(operation, bucket, Some(key), e))
            };
            within(limit, sent, || {
                let limit = limit.unwrap_or_default();
                S3ServiceError::new(operation, S3ErrorKind::Timeout)
                    .with_bucket(bucket)
                    .with_key(key)
                    .with_message(format!(
                        "part {part_number} ({length} bytes) was not answered within its bound of {limit:?}"
                    ))
            })
        })
        .await?;
        let e_tag = output
            .e_tag()
            .ok_or_else(|| missing(operation, bucket, key, "ETag"))?;
        let part = CompletedPart::builder()
            .part_number(part_number as i32)
            .e_tag(e_tag)
            .build();
        Ok((part, length))
    }

    /// Completes the upload. When an attempt's answer is lost (the connection broke
    /// after the request was sent) the server may have completed it already, and
    /// the retry is refused (S3: 404 `NoSuchUpload`; s3s-fs: 403 `AccessDenied`) or
    /// the retries run out. Then the object is checked with HeadObject (see
    /// [`Self::confirm_completed`]) before the upload is reported as failed.
    async fn complete(
        &self,
        parts: Vec<CompletedPart>,
        size: u64,
    ) -> Result<Completed, S3ServiceError> {
        let count = parts.len() as u32;
        let expected_e_tag = multipart_e_tag(&parts);
        let upload = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        let (bucket, key) = (self.bucket.as_str(), self.key.as_str());
        let operation = S3Operation::CompleteMultipartUpload;
        let answer_lost = AtomicBool::new(false);
        let result = with_retries(&self.retry, &self.counters, || {
            let sent = self
                .client
                .complete_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(&self.upload_id)
                .multipart_upload(upload.clone())
                .send();
            let call = Call::new("CompleteMultipartUpload", bucket, Some(key));
            let sent = traced(call.upload_id(&self.upload_id), sent);
            let answer_lost = &answer_lost;
            async move {
                sent.await.map_err(|e| {
                    let error = S3ServiceError::from_sdk(operation, bucket, Some(key), e);
                    if matches!(error.kind(), S3ErrorKind::Transport | S3ErrorKind::Timeout) {
                        answer_lost.store(true, Ordering::Relaxed);
                    }
                    error
                })
            }
        })
        .await;
        match result {
            Ok(output) => Ok(Completed {
                e_tag: output.e_tag().map(str::to_string),
                version_id: output.version_id().map(str::to_string),
                location: output.location().map(str::to_string),
                parts: count,
                size,
            }),
            Err(error) if answer_lost.load(Ordering::Relaxed) => {
                self.confirm_completed(count, size, expected_e_tag, error)
                    .await
            }
            Err(error) => Err(error),
        }
    }

    /// After a lost CompleteMultipartUpload answer and a failed retry: reports the
    /// upload as completed only when HeadObject shows an object of `size` bytes
    /// whose ETag is the multipart ETag of these parts (`"<MD5 of the part
    /// MD5s>-<parts>"`), which only these bytes can give. When the part ETags are
    /// not MD5s (SSE-KMS, some servers) nothing proves the object is this upload's
    /// rather than an older one of the same size, so the upload is reported as
    /// failed (a retry overwrites; a false success would lose data). Anything else
    /// returns `failed`, the retry's error, saying what was found.
    async fn confirm_completed(
        &self,
        count: u32,
        size: u64,
        expected_e_tag: Option<String>,
        failed: S3ServiceError,
    ) -> Result<Completed, S3ServiceError> {
        let (bucket, key) = (self.bucket.as_str(), self.key.as_str());
        let failed_because = |found: String| {
            let message = format!(
                "{} (an earlier CompleteMultipartUpload attempt broke off without an answer; {found})",
                failed.message().unwrap_or("the retry failed")
            );
            failed.with_message(message)
        };
        let Some(expected_e_tag) = expected_e_tag else {
            return Err(failed_because(
                "the part ETags are not MD5s, so the stored object cannot be confirmed as this upload's"
                    .to_string(),
            ));
        };
        let head = with_retries(&self.retry, &self.counters, || {
            let sent = self.client.head_object().bucket(bucket).key(key).send();
            let sent = traced(Call::new("HeadObject", bucket, Some(key)), sent);
            async move {
                sent.await
                    .map_err(|e| S3ServiceError::from_sdk(S3Operation::Head, bucket, Some(key), e))
            }
        })
        .await;
        let head = match head {
            Ok(head) => head,
            Err(error) => return Err(failed_because(format!("HeadObject failed: {error}"))),
        };
        let stored_size = head.content_length().and_then(|n| u64::try_from(n).ok());
        let stored_e_tag = head.e_tag().unwrap_or_default();
        let e_tag_matches = stored_e_tag
            .trim_matches('"')
            .eq_ignore_ascii_case(&expected_e_tag);
        if stored_size != Some(size) || !e_tag_matches {
            return Err(failed_because(format!(
                "the object there ({stored_size:?} bytes, ETag {stored_e_tag}) is not this upload's ({size} bytes, ETag {expected_e_tag})"
            )));
        }
        tracing::info!(
            bucket,
            key,
            upload_id = self.upload_id,
            "CompleteMultipartUpload's answer was lost; HeadObject confirms the object"
        );
        Ok(Completed {
            e_tag: head.e_tag().map(str::to_string),
            version_id: head.version_id().map(str::to_string),
            location: None,
            parts: count,
            size,
        })
    }
}

/// The ETag S3 gives an object made of `parts`: the MD5 of the binary part MD5s
/// (the part ETags), a dash and the part count. `None` when a part ETag is not an
/// MD5 (SSE-KMS or SSE-C parts, some servers).
fn multipart_e_tag(parts: &[CompletedPart]) -> Option<String> {
    use md5::Digest;
    let mut hasher = md5::Md5::new();
    for part in parts {
        let hex = part.e_tag()?.trim_matches('"');
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut digest = [0u8; 16];
        for (byte, pair) in digest.iter_mut().zip(hex.as_bytes().chunks(2)) {
            let pair = std::str::from_utf8(pair).ok()?;
            *byte = u8::from_str_radix(pair, 16).ok()?;
        }
        hasher.update(digest);
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("{hex}-{}", parts.len()))
}

/// The engine behind the S3 service's uploads above the threshold: the service
/// checks the key, reads the first `threshold` bytes and hands over the body from
/// its first byte; the engine does parts, concurrency, retries, progress and the
/// abort. The request's client is used (its SDK client), with this engine's config.
impl MultipartUploader for MultipartEngine {
    fn threshold(&self) -> u64 {
        self.config.threshold
    }

    fn upload(&self, request: MultipartUploadRequest) -> MultipartFuture {
        let config = self.config.clone();
        let registry = self.registry.clone();
        Box::pin(async move {
            let MultipartUploadRequest {
                client,
                bucket,
                key,
                body,
                content_length,
                options,
                progress,
            } = request;
            let engine = MultipartEngine::new(client.sdk().clone(), config)
                .with_registry(registry)
                .for_endpoint(client.config().endpoint());
            let listener = match progress {
                Some(listener) => ProgressListener::callback(move |event| {
                    listener.report(UploadProgress::new(
                        event.bytes,
                        event.total,
                        Some(event.part_number),
                    ))
                }),
                None => ProgressListener::none(),
            };
            let receipt = engine
                .upload_stream(
                    &bucket,
                    key.as_str(),
                    body,
                    content_length,
                    &options,
                    &listener,
                )
                .await?;
            let output = UploadOutput::new(client.config(), &bucket, key, receipt.size)
                .with_etag(receipt.e_tag)
                .with_version_id(receipt.version_id);
            Ok(match receipt.parts {
                0 => output,
                parts => output.with_parts(parts),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(number: i32, e_tag: &str) -> CompletedPart {
        CompletedPart::builder()
            .part_number(number)
            .e_tag(e_tag)
            .build()
    }

    #[test]
    fn the_multipart_e_tag_is_the_md5_of_the_part_md5s_and_the_count() {
        // The part ETags are MD5("hello") and MD5("world").
        let parts = [
            part(1, "\"5d41402abc4b2a76b9719d911017c592\""),
            part(2, "7D793037A0760186574B0282F2F435E7"),
        ];
        assert_eq!(
            multipart_e_tag(&parts).as_deref(),
            Some("065947336a2f2a95ba8899f3675c3be6-2")
        );
    }

    #[test]
    fn part_e_tags_that_are_not_md5s_give_no_multipart_e_tag() {
        let parts = [
            part(1, "\"5d41402abc4b2a76b9719d911017c592\""),
            part(2, "\"kms-encrypted-part\""),
        ];
        assert_eq!(multipart_e_tag(&parts), None);
        assert_eq!(
            multipart_e_tag(&[part(1, "zz41402abc4b2a76b9719d911017c592")]),
            None
        );
    }

    #[tokio::test]
    async fn a_lost_complete_with_non_md5_part_e_tags_stays_an_error_without_asking() {
        use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
        // Nothing listens on port 1: had the check sent HeadObject, the message
        // would say that HeadObject failed.
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url("http://127.0.0.1:1")
            .credentials_provider(Credentials::new("key", "secret", None, None, "test"))
            .force_path_style(true)
            .build();
        let target = PartTarget {
            client: Client::from_conf(config),
            bucket: "bucket".into(),
            key: "key".into(),
            upload_id: "upload".into(),
            retry: RetryPolicy::default().max_retries(0),
            config: TransferConfig::default().without_part_timeout(),
            sign_payload: true,
            counters: TransferCounters::default(),
        };
        let failed =
            S3ServiceError::new(S3Operation::CompleteMultipartUpload, S3ErrorKind::Transport)
                .with_message("connection reset");
        let Err(error) = target.confirm_completed(2, 10, None, failed).await else {
            panic!("an upload that cannot be confirmed must not be reported as stored");
        };
        assert_eq!(*error.kind(), S3ErrorKind::Transport);
        let message = error.message().unwrap_or_default();
        assert!(message.contains("cannot be confirmed"), "{message}");
        assert!(!message.contains("HeadObject failed"), "{message}");
    }

    #[test]
    fn payloads_are_unsigned_only_over_tls() {
        assert!(!payload_needs_signing(None), "AWS's default endpoints");
        assert!(!payload_needs_signing(Some("https://minio.internal:9000")));
        assert!(!payload_needs_signing(Some("HTTPS://S3.EXAMPLE.COM")));
        assert!(payload_needs_signing(Some("http://127.0.0.1:8014")));
        assert!(payload_needs_signing(Some("localhost:9000")));
        assert!(payload_needs_signing(Some("https:/")));
    }

    /// The head of one request sent to a one-shot HTTP server that answers
    /// `200 OK` with an ETag, after an upload of `body` through `engine`.
    async fn request_head_of_upload(sign_payload: bool, body: &'static [u8]) -> String {
        use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut received = Vec::new();
            let mut chunk = [0u8; 4096];
            let head_end = loop {
                let n = stream.read(&mut chunk).await.unwrap();
                received.extend_from_slice(&chunk[..n]);
                if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end + 4;
                }
            };
            let head = String::from_utf8_lossy(&received[..head_end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while received.len() < head_end + length {
                let n = stream.read(&mut chunk).await.unwrap();
                received.extend_from_slice(&chunk[..n]);
            }
            let answer = "HTTP/1.1 200 OK\r\nETag: \"e\"\r\nContent-Length: 0\r\n\r\n";
            stream.write_all(answer.as_bytes()).await.unwrap();
            head
        });
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(format!("http://{address}"))
            .credentials_provider(Credentials::new("key", "secret", None, None, "test"))
            .force_path_style(true)
            .build();
        let mut engine = MultipartEngine::new(Client::from_conf(config), TransferConfig::default());
        engine.sign_payload = sign_payload;
        let receipt = engine
            .upload(
                "bucket",
                "key",
                UploadBody::from(body.to_vec()),
                &UploadOptions::new(),
                &ProgressListener::none(),
            )
            .await
            .unwrap();
        assert_eq!(receipt.e_tag.as_deref(), Some("\"e\""));
        server.await.unwrap()
    }

    #[tokio::test]
    async fn an_unsigned_engine_sends_unsigned_payload_and_a_signed_one_the_body_hash() {
        let unsigned = request_head_of_upload(false, b"hello").await;
        assert!(
            unsigned.contains("x-amz-content-sha256: unsigned-payload"),
            "{unsigned}"
        );
        let signed = request_head_of_upload(true, b"hello").await;
        // SHA-256("hello")
        let hash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert!(
            signed.contains(&format!("x-amz-content-sha256: {hash}")),
            "{signed}"
        );
    }

    #[test]
    fn the_part_timeout_defaults_to_thirty_seconds_and_can_be_changed_or_removed() {
        let config = TransferConfig::default();
        assert_eq!(config.get_part_timeout(), Some(Duration::from_secs(30)));
        let config = config.part_timeout(Duration::from_secs(5));
        assert_eq!(config.get_part_timeout(), Some(Duration::from_secs(5)));
        assert_eq!(config.without_part_timeout().get_part_timeout(), None);
    }

    #[test]
    fn the_part_bound_grows_with_the_part_size() {
        let config = TransferConfig::default();
        assert_eq!(config.get_min_throughput(), 64 * 1024);
        assert_eq!(config.get_idle_timeout(), Duration::from_secs(30));
        // 30 s, plus 5 MiB at 64 KiB/s (80 s); 100 MiB parts get 1,600 s more.
        assert_eq!(
            config.part_attempt_limit(5 * MIB),
            Some(Duration::from_secs(110))
        );
        assert_eq!(
            config.part_attempt_limit(100 * MIB),
            Some(Duration::from_secs(1630))
        );
        let slow_link = config.clone().min_throughput(0);
        assert_eq!(slow_link.get_min_throughput(), 1, "never divides by zero");
        assert_eq!(config.without_part_timeout().part_attempt_limit(MIB), None);
    }
}
