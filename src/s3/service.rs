//! [`S3Service`]: every S3 operation as one `tower::Service<S3Request>`.
//!
//! One service over an operation enum, rather than one service per operation, so a
//! single stack of layers (logging, metrics, circuit breaker, retry, timeout)
//! wraps them all and sees every outcome; the typed facade
//! [`S3`](super::facade::S3) turns calls like `s3.upload(key, body, opts)` into
//! [`S3Request`]s and runs them through that stack.
//!
//! Requests carry checked [`ObjectKey`]s, so an invalid key never reaches this
//! service. Each request is one S3 call (a `DeleteMany` is one `DeleteObjects` of
//! at most 1,000 keys, a `List` one page), so retrying a request retries exactly
//! one call. Requests are cheap to clone for the retry layer; a stream body is
//! sent at most once ([`OnceBody`]) — the multipart engine retries its parts
//! itself.
//!
//! The service is always ready; it registers every call with the client's
//! shutdown gate ([`S3Client::begin`]) so a graceful shutdown waits for it. Cloning
//! is cheap and shares the client.
//!
//! ```no_run
//! # async fn run(client: keel::s3::client::S3Client) -> Result<(), keel::s3::error::S3ServiceError> {
//! use keel::s3::key::ObjectKey;
//! use keel::s3::service::{S3Request, S3Response, S3Service};
//! use tower::ServiceExt;
//!
//! let service = S3Service::new(client);
//! let key = ObjectKey::new("reports/today.csv").unwrap();
//! let response = service.oneshot(S3Request::Exists { key }).await?;
//! assert!(matches!(response, S3Response::Exists(_)));
//! # Ok(()) }
//! ```

use crate::s3::otel::{Call, traced};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use bytes::Bytes;
use futures::Stream;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::client::{InFlight, S3Client};
use super::error::{S3ErrorKind, S3Operation, S3ServiceError};
use super::key::ObjectKey;
use super::presign::{self, PresignedUrl};
use super::upload::{
    BodyStream, MultipartUploadRequest, MultipartUploader, ProgressListener, UploadOptions,
    UploadOutput, UploadProgress,
};

/// The most keys one `DeleteObjects` call takes.
pub const MAX_DELETE_BATCH: usize = 1000;

/// One S3 operation. Cloning is cheap (keys, options and `Bytes` are cloned; a
/// stream body is shared, see [`OnceBody`]), so the retry layer can keep a copy.
#[derive(Clone)]
#[non_exhaustive]
pub enum S3Request {
    /// Upload an object (a single PutObject, or the multipart engine for
    /// [`UploadPayload::Multipart`]).
    Upload(UploadRequest),
    /// Download a whole object as a stream.
    Download {
        /// The object.
        key: ObjectKey,
    },
    /// Presign a GET URL.
    PresignGet {
        /// The object.
        key: ObjectKey,
        /// How long the URL is valid (0 < expiry <= 7 days).
        expiry: Duration,
    },
    /// Presign a PUT URL.
    PresignPut {
        /// The object.
        key: ObjectKey,
        /// How long the URL is valid (0 < expiry <= 7 days).
        expiry: Duration,
        /// A `Content-Type` the uploader must send, if any.
        content_type: Option<String>,
    },
    /// Delete one object (deleting a missing object succeeds, as in S3).
    Delete {
        /// The object.
        key: ObjectKey,
    },
    /// Delete up to [`MAX_DELETE_BATCH`] objects in one `DeleteObjects` call.
    DeleteMany {
        /// The objects.
        keys: Vec<ObjectKey>,
    },
    /// Whether an object exists (`HeadObject`; not found is `false`).
    Exists {
        /// The object.
        key: ObjectKey,
    },
    /// Copy an object with one `CopyObject` call (sources up to 5 GiB).
    Copy {
        /// The source bucket; `None` for the client's bucket.
        source_bucket: Option<String>,
        /// The source object.
        source: ObjectKey,
        /// The destination object, in the client's bucket.
        destination: ObjectKey,
    },
    /// List one page of objects (`ListObjectsV2`).
    List {
        /// Only keys starting with this.
        prefix: Option<String>,
        /// Where the previous page stopped.
        continuation_token: Option<String>,
        /// Page size (server default 1,000).
        max_keys: Option<i32>,
    },
}

/// An upload: the key, what to send, the options and where progress goes.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct UploadRequest {
    /// The object.
    pub key: ObjectKey,
    /// The body, as prepared by the facade.
    pub payload: UploadPayload,
    /// Content type, metadata, ACL, encryption, tagging...
    pub options: UploadOptions,
    /// Where progress events go, if anywhere.
    pub progress: Option<ProgressListener>,
}

impl UploadRequest {
    /// An upload request.
    pub fn new(
        key: ObjectKey,
        payload: UploadPayload,
        options: UploadOptions,
        progress: Option<ProgressListener>,
    ) -> Self {
        UploadRequest {
            key,
            payload,
            options,
            progress,
        }
    }
}

/// A one-shot body stream that can sit in a cloneable request: clones share it,
/// and the first [`take`](OnceBody::take) gets it. A retry of a request whose body
/// was already consumed therefore fails cleanly (kind `InvalidRequest`, not
/// retryable) instead of sending a truncated body. The facade never retries
/// multipart uploads as a whole: their parts are retried by the engine.
#[derive(Clone)]
pub struct OnceBody(Arc<std::sync::Mutex<Option<BodyStream>>>);

impl OnceBody {
    /// Wraps a stream.
    pub fn new(body: BodyStream) -> Self {
        OnceBody(Arc::new(std::sync::Mutex::new(Some(body))))
    }

    /// The stream, the first time; `None` after.
    pub fn take(&self) -> Option<BodyStream> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl fmt::Debug for OnceBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnceBody(..)")
    }
}

/// What an upload sends.
#[derive(Clone)]
#[non_exhaustive]
pub enum UploadPayload {
    /// Bytes in memory, sent with one PutObject.
    Bytes(Bytes),
    /// A file, streamed from disk with one PutObject.
    File {
        /// The file.
        path: PathBuf,
        /// Its length.
        length: u64,
    },
    /// A body above the multipart threshold, for the multipart engine.
    Multipart {
        /// The body from its first byte.
        body: OnceBody,
        /// The total length, when known.
        content_length: Option<u64>,
    },
}

impl UploadPayload {
    /// The length, when known.
    pub fn length(&self) -> Option<u64> {
        match self {
            UploadPayload::Bytes(b) => Some(b.len() as u64),
            UploadPayload::File { length, .. } => Some(*length),
            UploadPayload::Multipart { content_length, .. } => *content_length,
        }
    }
}

impl fmt::Debug for UploadPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UploadPayload::Bytes(b) => f.debug_tuple("Bytes").field(&b.len()).finish(),
            UploadPayload::File { path, length } => f
                .debug_struct("File")
                .field("path", path)
                .field("length", length)
                .finish(),
            UploadPayload::Multipart { content_length, .. } => f
                .debug_struct("Multipart")
                .field("content_length", content_length)
                .finish_non_exhaustive(),
        }
    }
}

impl S3Request {
    /// The operation, for logs, metrics and errors.
    pub fn operation(&self) -> S3Operation {
        match self {
            S3Request::Upload(_) => S3Operation::Upload,
            S3Request::Download { .. } => S3Operation::Download,
            S3Request::PresignGet { .. } => S3Operation::PresignGet,
            S3Request::PresignPut { .. } => S3Operation::PresignPut,
            S3Request::Delete { .. } => S3Operation::Delete,
            S3Request::DeleteMany { .. } => S3Operation::DeleteMany,
            S3Request::Exists { .. } => S3Operation::Exists,
            S3Request::Copy { .. } => S3Operation::Copy,
            S3Request::List { .. } => S3Operation::List,
        }
    }

    /// The object key, for operations on one object (the destination for a copy).
    pub fn key(&self) -> Option<&ObjectKey> {
        match self {
            S3Request::Upload(u) => Some(&u.key),
            S3Request::Download { key }
            | S3Request::PresignGet { key, .. }
            | S3Request::PresignPut { key, .. }
            | S3Request::Delete { key }
            | S3Request::Exists { key } => Some(key),
            S3Request::Copy { destination, .. } => Some(destination),
            S3Request::DeleteMany { .. } | S3Request::List { .. } => None,
        }
    }
}

impl fmt::Debug for S3Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            S3Request::Upload(u) => f.debug_tuple("Upload").field(u).finish(),
            S3Request::DeleteMany { keys } => f
                .debug_struct("DeleteMany")
                .field("keys", &keys.len())
                .finish(),
            S3Request::List {
                prefix,
                continuation_token,
                max_keys,
            } => f
                .debug_struct("List")
                .field("prefix", prefix)
                .field("continuation_token", &continuation_token.is_some())
                .field("max_keys", max_keys)
                .finish(),
            other => f
                .debug_struct(other.operation().as_str())
                .field("key", &other.key())
                .finish_non_exhaustive(),
        }
    }
}

/// The answer to an [`S3Request`], one variant per operation.
#[derive(Debug)]
#[non_exhaustive]
pub enum S3Response {
    /// The object was stored.
    Uploaded(UploadOutput),
    /// The object, its body still to be read.
    Downloaded(Box<ObjectDownload>),
    /// A presigned URL.
    Presigned(PresignedUrl),
    /// The object is gone (or was never there).
    Deleted,
    /// The outcome of one `DeleteObjects` call.
    DeletedMany(DeleteManyOutput),
    /// Whether the object exists.
    Exists(bool),
    /// The object was copied.
    Copied(CopyOutput),
    /// One page of a listing.
    Listed(ListPage),
}

/// `into_*` accessors: the payload of one variant, or `None` for another variant.
macro_rules! response_accessors {
    ($($(#[$doc:meta])* $name:ident => $variant:ident $(($ty:ty))?;)*) => {
        impl S3Response {
            $(
                $(#[$doc])*
                pub fn $name(self) -> Option<response_accessors!(@ty $($ty)?)> {
                    match self {
                        S3Response::$variant $((response_accessors!(@bind x $ty)))? => {
                            Some(response_accessors!(@val $(x $ty)?))
                        }
                        _ => None,
                    }
                }
            )*
        }
    };
    (@ty $ty:ty) => { $ty };
    (@ty) => { () };
    (@bind $x:ident $ty:ty) => { $x };
    (@val $x:ident $ty:ty) => { $x };
    (@val) => { () };
}

response_accessors! {
    /// The upload's output, for [`S3Response::Uploaded`].
    into_uploaded => Uploaded(UploadOutput);
    /// The download, for [`S3Response::Downloaded`].
    into_downloaded => Downloaded(Box<ObjectDownload>);
    /// The URL, for [`S3Response::Presigned`].
    into_presigned => Presigned(PresignedUrl);
    /// `()`, for [`S3Response::Deleted`].
    into_deleted => Deleted;
    /// The batch outcome, for [`S3Response::DeletedMany`].
    into_deleted_many => DeletedMany(DeleteManyOutput);
    /// Whether the object exists, for [`S3Response::Exists`].
    into_exists => Exists(bool);
    /// The copy's output, for [`S3Response::Copied`].
    into_copied => Copied(CopyOutput);
    /// The page, for [`S3Response::Listed`].
    into_listed => Listed(ListPage);
}

/// A downloaded object: its metadata, and its body as a stream of chunks.
///
/// The body is read from the connection as it is polled (nothing is buffered
/// beyond the HTTP client's own buffers). It counts as an operation in flight for
/// graceful shutdown until it ends or is dropped.
#[non_exhaustive]
pub struct ObjectDownload {
    /// The key.
    pub key: ObjectKey,
    /// `Content-Length`.
    pub content_length: Option<u64>,
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// `Cache-Control`.
    pub cache_control: Option<String>,
    /// The ETag.
    pub etag: Option<String>,
    /// The version id.
    pub version_id: Option<String>,
    /// User metadata.
    pub metadata: HashMap<String, String>,
    /// The body.
    pub body: DownloadBody,
}

impl fmt::Debug for ObjectDownload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectDownload")
            .field("key", &self.key)
            .field("content_length", &self.content_length)
            .field("content_type", &self.content_type)
            .field("etag", &self.etag)
            .field("version_id", &self.version_id)
            .finish_non_exhaustive()
    }
}

pin_project_lite::pin_project! {
    /// The body of an [`ObjectDownload`]: a `Stream` of `Bytes` chunks; a cut
    /// connection ends it with an [`S3ServiceError`] of kind `Transport`, a body
    /// that sends nothing for the idle timeout ([`DEFAULT_BODY_IDLE_TIMEOUT`],
    /// 30 s, see [`idle_timeout`](Self::idle_timeout)) with kind `Timeout`, so
    /// neither the stream nor [`collect_bytes`](Self::collect_bytes) hangs on a
    /// stalled server.
    pub struct DownloadBody {
        #[pin]
        inner: ByteStream,
        idle_limit: Option<Duration>,
        idle: Option<Pin<Box<tokio::time::Sleep>>>,
        bucket: String,
        key: ObjectKey,
        received: u64,
        on_chunk: Option<Arc<dyn Fn(u64) + Send + Sync>>,
        guard: Option<InFlight>,
    }
}

impl DownloadBody {
    fn new(inner: ByteStream, bucket: String, key: ObjectKey, guard: InFlight) -> Self {
        DownloadBody {
            inner,
            idle_limit: Some(DEFAULT_BODY_IDLE_TIMEOUT),
            idle: None,
            bucket,
            key,
            received: 0,
            on_chunk: None,
            guard: Some(guard),
        }
    }

    /// Calls `f` with the length of every chunk as it arrives (the facade counts
    /// downloaded bytes with it).
    pub fn on_chunk(mut self, f: Arc<dyn Fn(u64) + Send + Sync>) -> Self {
        self.on_chunk = Some(f);
        self
    }

    /// How long the body may send nothing before it ends with a `Timeout` error
    /// (default [`DEFAULT_BODY_IDLE_TIMEOUT`]); `None` waits for ever.
    pub fn idle_timeout(mut self, limit: Option<Duration>) -> Self {
        self.idle_limit = limit;
        self.idle = None;
        self
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Reads the whole body into memory.
    pub async fn collect_bytes(self) -> Result<Bytes, S3ServiceError> {
        use futures::TryStreamExt;
        let chunks: Vec<Bytes> = self.try_collect().await?;
        Ok(match chunks.len() {
            1 => chunks.into_iter().next().unwrap_or_default(),
            _ => Bytes::from(chunks.concat()),
        })
    }
}

impl fmt::Debug for DownloadBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DownloadBody")
            .field("key", &self.key)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl Stream for DownloadBody {
    type Item = Result<Bytes, S3ServiceError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        match this.inner.poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                // Bytes arrived: the idle clock starts again.
                *this.idle = None;
                *this.received += chunk.len() as u64;
                if let Some(f) = this.on_chunk {
                    f(chunk.len() as u64);
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.guard.take();
                Poll::Ready(Some(Err(S3ServiceError::new(
                    S3Operation::Download,
                    S3ErrorKind::Transport,
                )
                .with_bucket(this.bucket.as_str())
                .with_key(this.key.as_str())
                .with_source(e))))
            }
            Poll::Ready(None) => {
                this.guard.take();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(limit) = *this.idle_limit else {
                    return Poll::Pending;
                };
                let idle = this
                    .idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if idle.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.guard.take();
                *this.idle_limit = None;
                Poll::Ready(Some(Err(S3ServiceError::new(
                    S3Operation::Download,
                    S3ErrorKind::Timeout,
                )
                .with_bucket(this.bucket.as_str())
                .with_key(this.key.as_str())
                .with_message(format!(
                    "the body sent nothing for {limit:?} after {} bytes",
                    this.received
                )))))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let (lo, hi) = self.inner.size_hint();
        (lo as usize, hi.map(|h| h as usize))
    }
}

/// The outcome of deleting many objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeleteManyOutput {
    /// How many keys were deleted.
    pub deleted: usize,
    /// The keys that were not, with why.
    pub failures: Vec<DeleteFailure>,
}

impl DeleteManyOutput {
    /// `true` when every key was deleted.
    pub fn is_complete(&self) -> bool {
        self.failures.is_empty()
    }

    /// Adds another batch's outcome.
    pub fn merge(&mut self, other: DeleteManyOutput) {
        self.deleted += other.deleted;
        self.failures.extend(other.failures);
    }
}

/// One key a batch delete did not delete.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeleteFailure {
    /// The key.
    pub key: String,
    /// The S3 error code (`AccessDenied`, ...), or keel's error kind when the
    /// whole batch failed.
    pub code: String,
    /// The message.
    pub message: String,
}

impl DeleteFailure {
    /// A failure for `key`.
    pub fn new(
        key: impl Into<String>,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        DeleteFailure {
            key: key.into(),
            code: code.into(),
            message: message.into(),
        }
    }
}

/// What a copy produced.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CopyOutput {
    /// The destination bucket.
    pub bucket: String,
    /// The destination key.
    pub key: ObjectKey,
    /// The new object's ETag.
    pub etag: Option<String>,
    /// The new object's version id.
    pub version_id: Option<String>,
}

/// One object in a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ObjectSummary {
    /// The key, as stored (not checked against a key policy).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// The ETag.
    pub etag: Option<String>,
    /// Last modification time.
    pub last_modified: Option<SystemTime>,
}

/// One page of a listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListPage {
    /// The objects on this page.
    pub objects: Vec<ObjectSummary>,
    /// Where the next page starts; `None` on the last page.
    pub next_continuation_token: Option<String>,
}

/// Every S3 operation as a `tower::Service`. See the [module docs](self).
#[derive(Clone)]
pub struct S3Service {
    client: S3Client,
    multipart: Option<Arc<dyn MultipartUploader>>,
    body_idle_timeout: Option<Duration>,
}

/// How long a download body may send nothing before it fails with
/// [`S3ErrorKind::Timeout`]: 30 s. A slow body is fine; a silent one would hang
/// its reader for ever (the SDK's attempt timeout ends when the headers arrive).
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

impl fmt::Debug for S3Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Service")
            .field("bucket", &self.client.bucket())
            .field("multipart", &self.multipart)
            .finish()
    }
}

impl S3Service {
    /// A service over `client`, without a multipart engine (multipart payloads
    /// are refused).
    pub fn new(client: S3Client) -> Self {
        S3Service {
            client,
            multipart: None,
            body_idle_timeout: Some(DEFAULT_BODY_IDLE_TIMEOUT),
        }
    }

    /// The idle timeout of download bodies (default
    /// [`DEFAULT_BODY_IDLE_TIMEOUT`], 30 s; `None` waits for ever).
    pub fn with_body_idle_timeout(mut self, limit: Option<Duration>) -> Self {
        self.body_idle_timeout = limit;
        self
    }

    /// Sets the engine for [`UploadPayload::Multipart`] payloads.
    pub fn with_multipart(mut self, engine: Arc<dyn MultipartUploader>) -> Self {
        self.multipart = Some(engine);
        self
    }

    /// The client.
    pub fn get_ref(&self) -> &S3Client {
        &self.client
    }

    /// The client, mutably.
    pub fn get_mut(&mut self) -> &mut S3Client {
        &mut self.client
    }

    /// The client.
    pub fn into_inner(self) -> S3Client {
        self.client
    }
}

/// The future an [`S3Service`] returns.
pub type S3Future = Pin<Box<dyn Future<Output = Result<S3Response, S3ServiceError>> + Send>>;

impl tower::Service<S3Request> for S3Service {
    type Response = S3Response;
    type Error = S3ServiceError;
    type Future = S3Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: S3Request) -> Self::Future {
        let client = self.client.clone();
        let multipart = self.multipart.clone();
        let idle = self.body_idle_timeout;
        Box::pin(async move {
            let op = request.operation();
            let guard = client.begin(op)?;
            let response = run(&client, multipart.as_deref(), request, guard).await?;
            Ok(match response {
                S3Response::Downloaded(mut download) => {
                    download.body = download.body.idle_timeout(idle);
                    S3Response::Downloaded(download)
                }
                other => other,
            })
        })
    }
}

/// Characters escaped in `x-amz-copy-source`: everything but unreserved and `/`.
const COPY_SOURCE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// Maps an SDK error of any operation to an [`S3ServiceError`].
fn sdk_err<E>(
    op: S3Operation,
    bucket: &str,
    key: Option<&ObjectKey>,
) -> impl FnOnce(aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> S3ServiceError
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    move |e| S3ServiceError::from_sdk(op, bucket, key.map(ObjectKey::as_str), e)
}

async fn run(
    client: &S3Client,
    multipart: Option<&dyn MultipartUploader>,
    request: S3Request,
    guard: InFlight,
) -> Result<S3Response, S3ServiceError> {
    let sdk = client.sdk();
    let bucket = client.bucket();
    let op = request.operation();
    match request {
        S3Request::Upload(upload) => upload_one(client, multipart, upload).await,
        S3Request::Download { key } => {
            let send = sdk.get_object().bucket(bucket).key(key.as_str()).send();
            let out = traced(Call::new("GetObject", bucket, Some(key.as_str())), send)
                .await
                .map_err(sdk_err(op, bucket, Some(&key)))?;
            Ok(S3Response::Downloaded(Box::new(ObjectDownload {
                content_length: out.content_length.and_then(|l| u64::try_from(l).ok()),
                content_type: out.content_type,
                cache_control: out.cache_control,
                etag: out.e_tag,
                version_id: out.version_id,
                metadata: out.metadata.unwrap_or_default(),
                body: DownloadBody::new(out.body, bucket.to_owned(), key.clone(), guard),
                key,
            })))
        }
        S3Request::PresignGet { key, expiry } => presign::presign_get(client, bucket, &key, expiry)
            .await
            .map(S3Response::Presigned),
        S3Request::PresignPut {
            key,
            expiry,
            content_type,
        } => presign::presign_put(client, bucket, &key, expiry, content_type.as_deref())
            .await
            .map(S3Response::Presigned),
        S3Request::Delete { key } => {
            let send = sdk.delete_object().bucket(bucket).key(key.as_str()).send();
            traced(Call::new("DeleteObject", bucket, Some(key.as_str())), send)
                .await
                .map_err(sdk_err(op, bucket, Some(&key)))?;
            Ok(S3Response::Deleted)
        }
        S3Request::DeleteMany { keys } => delete_batch(client, keys).await,
        S3Request::Exists { key } => {
            let send = sdk.head_object().bucket(bucket).key(key.as_str()).send();
            match traced(Call::new("HeadObject", bucket, Some(key.as_str())), send).await {
                Ok(_) => Ok(S3Response::Exists(true)),
                Err(e) => {
                    let err = sdk_err(op, bucket, Some(&key))(e);
                    if err.is_not_found() {
                        Ok(S3Response::Exists(false))
                    } else {
                        Err(err)
                    }
                }
            }
        }
        S3Request::Copy {
            source_bucket,
            source,
            destination,
        } => {
            let from_bucket = source_bucket.as_deref().unwrap_or(bucket);
            let copy_source = format!(
                "{from_bucket}/{}",
                utf8_percent_encode(source.as_str(), COPY_SOURCE)
            );
            let send = sdk
                .copy_object()
                .bucket(bucket)
                .key(destination.as_str())
                .copy_source(copy_source)
                .send();
            let out = traced(
                Call::new("CopyObject", bucket, Some(destination.as_str())),
                send,
            )
            .await
            .map_err(sdk_err(op, bucket, Some(&destination)))?;
            Ok(S3Response::Copied(CopyOutput {
                bucket: bucket.to_owned(),
                etag: out.copy_object_result.and_then(|r| r.e_tag),
                version_id: out.version_id,
                key: destination,
            }))
        }
        S3Request::List {
            prefix,
            continuation_token,
            max_keys,
        } => {
            let send = sdk
                .list_objects_v2()
                .bucket(bucket)
                .set_prefix(prefix)
                .set_continuation_token(continuation_token)
                .set_max_keys(max_keys)
                .send();
            let out = traced(Call::new("ListObjectsV2", bucket, None), send)
                .await
                .map_err(sdk_err(op, bucket, None))?;
            let objects = out
                .contents
                .unwrap_or_default()
                .into_iter()
                .filter_map(|o| {
                    Some(ObjectSummary {
                        key: o.key?,
                        size: o.size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                        etag: o.e_tag,
                        last_modified: o.last_modified.and_then(|t| SystemTime::try_from(t).ok()),
                    })
                })
                .collect();
            let next = match out.is_truncated {
                Some(true) => out.next_continuation_token,
                _ => None,
            };
            Ok(S3Response::Listed(ListPage {
                objects,
                next_continuation_token: next,
            }))
        }
    }
}

async fn upload_one(
    client: &S3Client,
    multipart: Option<&dyn MultipartUploader>,
    upload: UploadRequest,
) -> Result<S3Response, S3ServiceError> {
    let bucket = client.bucket();
    let op = S3Operation::Upload;
    let UploadRequest {
        key,
        payload,
        options,
        progress,
    } = upload;
    let (body, length) = match payload {
        UploadPayload::Bytes(bytes) => {
            let len = bytes.len() as u64;
            (ByteStream::from(bytes), len)
        }
        UploadPayload::File { path, length } => {
            let body = ByteStream::read_from()
                .path(&path)
                .length(aws_sdk_s3::primitives::Length::Exact(length))
                .build()
                .await
                .map_err(|e| {
                    S3ServiceError::new(op, S3ErrorKind::Io)
                        .with_bucket(bucket)
                        .with_key(key.as_str())
                        .with_message(format!("cannot read {}", path.display()))
                        .with_source(e)
                })?;
            (body, length)
        }
        UploadPayload::Multipart {
            body,
            content_length,
        } => {
            let Some(body) = body.take() else {
                return Err(S3ServiceError::new(op, S3ErrorKind::InvalidRequest)
                    .with_bucket(bucket)
                    .with_key(key.as_str())
                    .with_message("the stream body was already consumed by an earlier attempt"));
            };
            let Some(engine) = multipart else {
                return Err(S3ServiceError::new(op, S3ErrorKind::InvalidRequest)
                    .with_bucket(bucket)
                    .with_key(key.as_str())
                    .with_message("the body is above the multipart threshold and no multipart engine is configured"));
            };
            let request = MultipartUploadRequest::new(
                client.clone(),
                bucket.to_owned(),
                key,
                body,
                content_length,
                options,
                progress,
            );
            return engine.upload(request).await.map(S3Response::Uploaded);
        }
    };
    let put = options
        .apply_to_put_object(client.sdk().put_object())
        .bucket(bucket)
        .key(key.as_str())
        .content_length(i64::try_from(length).unwrap_or(i64::MAX))
        .body(body);
    let out = traced(
        Call::new("PutObject", bucket, Some(key.as_str())),
        put.send(),
    )
    .await
    .map_err(|e| S3ServiceError::from_sdk(op, bucket, Some(key.as_str()), e))?;
    if let Some(progress) = &progress {
        progress.report(UploadProgress::new(length, Some(length), None));
    }
    Ok(S3Response::Uploaded(
        UploadOutput::new(client.config(), bucket, key, length)
            .with_etag(out.e_tag)
            .with_version_id(out.version_id),
    ))
}

async fn delete_batch(
    client: &S3Client,
    keys: Vec<ObjectKey>,
) -> Result<S3Response, S3ServiceError> {
    let bucket = client.bucket();
    let op = S3Operation::DeleteMany;
    if keys.is_empty() {
        return Ok(S3Response::DeletedMany(DeleteManyOutput::default()));
    }
    if keys.len() > MAX_DELETE_BATCH {
        return Err(S3ServiceError::new(op, S3ErrorKind::InvalidRequest)
            .with_bucket(bucket)
            .with_message(format!(
                "{} keys in one DeleteObjects call; at most {MAX_DELETE_BATCH}",
                keys.len()
            )));
    }
    let invalid = |e: aws_sdk_s3::error::BuildError| {
        S3ServiceError::new(op, S3ErrorKind::InvalidRequest)
            .with_bucket(bucket)
            .with_source(e)
    };
    let objects = keys
        .iter()
        .map(|k| ObjectIdentifier::builder().key(k.as_str()).build())
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    let delete = Delete::builder()
        .set_objects(Some(objects))
        .quiet(true)
        .build()
        .map_err(invalid)?;
    let send = client
        .sdk()
        .delete_objects()
        .bucket(bucket)
        .delete(delete)
        .send();
    let out = traced(Call::new("DeleteObjects", bucket, None), send)
        .await
        .map_err(|e| S3ServiceError::from_sdk(op, bucket, None, e))?;
    // Quiet mode: the answer lists failures only.
    let failures: Vec<DeleteFailure> = out
        .errors
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            DeleteFailure::new(
                e.key.unwrap_or_default(),
                e.code.unwrap_or_else(|| "Unknown".to_owned()),
                e.message.unwrap_or_default(),
            )
        })
        .collect();
    Ok(S3Response::DeletedMany(DeleteManyOutput {
        deleted: keys.len().saturating_sub(failures.len()),
        failures,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_bodies_are_taken_once_across_clones() {
        let key = ObjectKey::new("k").unwrap();
        let body = OnceBody::new(Box::pin(futures::stream::empty()));
        let request = S3Request::Upload(UploadRequest::new(
            key.clone(),
            UploadPayload::Multipart {
                body: body.clone(),
                content_length: None,
            },
            UploadOptions::new(),
            None,
        ));
        let copy = request.clone();
        assert_eq!(copy.operation(), S3Operation::Upload);
        assert!(body.take().is_some());
        assert!(body.take().is_none(), "a clone must not get the body again");
        assert_eq!(
            S3Request::Exists { key: key.clone() }.key(),
            Some(&key),
            "single-object requests expose their key"
        );
    }

    #[test]
    fn copy_source_escaping_keeps_slashes() {
        let encoded = utf8_percent_encode("dir/a b+ü.txt", COPY_SOURCE).to_string();
        assert_eq!(encoded, "dir/a%20b%2B%C3%BC.txt");
    }

    #[test]
    fn delete_many_output_merges() {
        let mut total = DeleteManyOutput::default();
        total.merge(DeleteManyOutput {
            deleted: 3,
            failures: vec![],
        });
        total.merge(DeleteManyOutput {
            deleted: 1,
            failures: vec![DeleteFailure::new("k", "AccessDenied", "no")],
        });
        assert_eq!(total.deleted, 4);
        assert!(!total.is_complete());
    }
}
