//! What an upload takes and gives back: [`UploadBody`] (bytes, a string, a file or
//! an async stream of unknown length), [`UploadOptions`] (content type, metadata,
//! cache control, ACL, server-side encryption, tagging), [`UploadOutput`] (key,
//! bucket, location, ETag, version), [`UploadProgress`] events, and the
//! [`MultipartUploader`] contract between the S3 service and the multipart engine.
//!
//! ```
//! use keel::s3::upload::{CannedAcl, ServerSideEncryption, UploadBody, UploadOptions};
//!
//! let options = UploadOptions::new()
//!     .content_type("application/pdf")
//!     .metadata("user-id", "123")
//!     .cache_control("max-age=31536000")
//!     .acl(CannedAcl::Private)
//!     .server_side_encryption(ServerSideEncryption::kms("alias/media"))
//!     .tag("team", "billing");
//! assert_eq!(options.tagging_header().as_deref(), Some("team=billing"));
//!
//! let body = UploadBody::from("hello");
//! assert_eq!(body.known_length(), Some(5));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, Stream, StreamExt};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::client::S3Client;
use super::config::S3Config;
use super::error::S3ServiceError;
use super::key::ObjectKey;

/// A stream of body chunks, as the multipart engine consumes it.
pub type BodyStream = BoxStream<'static, io::Result<Bytes>>;

/// The body of an upload. Build it with `From` (bytes, `Vec<u8>`, strings),
/// [`UploadBody::file`], [`UploadBody::stream`] or [`UploadBody::reader`].
pub struct UploadBody {
    pub(crate) source: BodySource,
}

pub(crate) enum BodySource {
    Bytes(Bytes),
    File(PathBuf),
    Stream(BodyStream),
}

impl fmt::Debug for UploadBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            BodySource::Bytes(b) => f.debug_tuple("UploadBody::Bytes").field(&b.len()).finish(),
            BodySource::File(p) => f.debug_tuple("UploadBody::File").field(p).finish(),
            BodySource::Stream(_) => f.write_str("UploadBody::Stream(..)"),
        }
    }
}

impl UploadBody {
    /// The contents of a file, read as the upload goes (never wholly in memory).
    pub fn file(path: impl Into<PathBuf>) -> Self {
        UploadBody {
            source: BodySource::File(path.into()),
        }
    }

    /// A stream of chunks of unknown total length.
    pub fn stream<S>(stream: S) -> Self
    where
        S: Stream<Item = io::Result<Bytes>> + Send + 'static,
    {
        UploadBody {
            source: BodySource::Stream(stream.boxed()),
        }
    }

    /// Anything `AsyncRead`, read in chunks as the upload goes.
    pub fn reader<R>(reader: R) -> Self
    where
        R: tokio::io::AsyncRead + Send + 'static,
    {
        UploadBody::stream(tokio_util::io::ReaderStream::with_capacity(
            Box::pin(reader) as Pin<Box<dyn tokio::io::AsyncRead + Send>>,
            64 * 1024,
        ))
    }

    /// The body as a stream of chunks (a file is opened when the stream is first
    /// polled and read in 64 KiB chunks).
    pub fn into_stream(self) -> BodyStream {
        match self.source {
            BodySource::Bytes(bytes) => futures::stream::once(async move { Ok(bytes) }).boxed(),
            BodySource::File(path) => {
                futures::stream::once(async move { tokio::fs::File::open(path).await })
                    .map(|opened| match opened {
                        Ok(file) => {
                            tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024).boxed()
                        }
                        Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
                    })
                    .flatten()
                    .boxed()
            }
            BodySource::Stream(stream) => stream,
        }
    }

    /// The length when known without reading (bytes and strings).
    pub fn known_length(&self) -> Option<u64> {
        match &self.source {
            BodySource::Bytes(b) => Some(b.len() as u64),
            _ => None,
        }
    }
}

impl From<Bytes> for UploadBody {
    fn from(bytes: Bytes) -> Self {
        UploadBody {
            source: BodySource::Bytes(bytes),
        }
    }
}

impl From<Vec<u8>> for UploadBody {
    fn from(bytes: Vec<u8>) -> Self {
        Bytes::from(bytes).into()
    }
}

impl From<&'static [u8]> for UploadBody {
    fn from(bytes: &'static [u8]) -> Self {
        Bytes::from_static(bytes).into()
    }
}

impl From<String> for UploadBody {
    fn from(text: String) -> Self {
        Bytes::from(text).into()
    }
}

impl From<&'static str> for UploadBody {
    fn from(text: &'static str) -> Self {
        Bytes::from_static(text.as_bytes()).into()
    }
}

/// A canned ACL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CannedAcl {
    /// `private`
    Private,
    /// `public-read`
    PublicRead,
    /// `public-read-write`
    PublicReadWrite,
    /// `authenticated-read`
    AuthenticatedRead,
    /// `aws-exec-read`
    AwsExecRead,
    /// `bucket-owner-read`
    BucketOwnerRead,
    /// `bucket-owner-full-control`
    BucketOwnerFullControl,
}

impl CannedAcl {
    /// The SDK's value.
    pub fn to_sdk(self) -> aws_sdk_s3::types::ObjectCannedAcl {
        use aws_sdk_s3::types::ObjectCannedAcl as A;
        match self {
            CannedAcl::Private => A::Private,
            CannedAcl::PublicRead => A::PublicRead,
            CannedAcl::PublicReadWrite => A::PublicReadWrite,
            CannedAcl::AuthenticatedRead => A::AuthenticatedRead,
            CannedAcl::AwsExecRead => A::AwsExecRead,
            CannedAcl::BucketOwnerRead => A::BucketOwnerRead,
            CannedAcl::BucketOwnerFullControl => A::BucketOwnerFullControl,
        }
    }
}

/// Server-side encryption of the stored object.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ServerSideEncryption {
    /// SSE-S3 (`AES256`).
    Aes256,
    /// SSE-KMS (`aws:kms`), with the bucket's default key or the given key id.
    Kms {
        /// The KMS key id or alias; `None` for the default key.
        key_id: Option<String>,
    },
}

impl ServerSideEncryption {
    /// SSE-KMS with a given key id or alias.
    pub fn kms(key_id: impl Into<String>) -> Self {
        ServerSideEncryption::Kms {
            key_id: Some(key_id.into()),
        }
    }
}

/// Options of an upload; every field defaults to "not set" (the bucket's
/// defaults apply).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UploadOptions {
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// User metadata (`x-amz-meta-*`).
    pub metadata: BTreeMap<String, String>,
    /// `Cache-Control`.
    pub cache_control: Option<String>,
    /// `Content-Disposition`.
    pub content_disposition: Option<String>,
    /// `Content-Encoding`.
    pub content_encoding: Option<String>,
    /// Canned ACL.
    pub acl: Option<CannedAcl>,
    /// Server-side encryption.
    pub server_side_encryption: Option<ServerSideEncryption>,
    /// Object tags.
    pub tags: BTreeMap<String, String>,
}

impl UploadOptions {
    /// No options set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `Content-Type`.
    pub fn content_type(mut self, value: impl Into<String>) -> Self {
        self.content_type = Some(value.into());
        self
    }

    /// Adds one user metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets `Cache-Control`.
    pub fn cache_control(mut self, value: impl Into<String>) -> Self {
        self.cache_control = Some(value.into());
        self
    }

    /// Sets `Content-Disposition`.
    pub fn content_disposition(mut self, value: impl Into<String>) -> Self {
        self.content_disposition = Some(value.into());
        self
    }

    /// Sets `Content-Encoding`.
    pub fn content_encoding(mut self, value: impl Into<String>) -> Self {
        self.content_encoding = Some(value.into());
        self
    }

    /// Sets the canned ACL.
    pub fn acl(mut self, acl: CannedAcl) -> Self {
        self.acl = Some(acl);
        self
    }

    /// Sets server-side encryption.
    pub fn server_side_encryption(mut self, sse: ServerSideEncryption) -> Self {
        self.server_side_encryption = Some(sse);
        self
    }

    /// Adds one tag.
    pub fn tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.insert(key.into(), value.into());
        self
    }

    /// The `x-amz-tagging` header value (URL-encoded `k=v&k2=v2`), if any tags.
    pub fn tagging_header(&self) -> Option<String> {
        if self.tags.is_empty() {
            return None;
        }
        let mut out = String::new();
        for (k, v) in &self.tags {
            if !out.is_empty() {
                out.push('&');
            }
            out.extend(utf8_percent_encode(k, QUERY_VALUE));
            out.push('=');
            out.extend(utf8_percent_encode(v, QUERY_VALUE));
        }
        Some(out)
    }
}

/// Characters kept as they are in a query value: unreserved ones.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Characters kept in a URL path: unreserved ones and `/`.
const PATH: &AsciiSet = &QUERY_VALUE.remove(b'/');

/// Applies [`UploadOptions`] to an SDK request builder that has the usual
/// object-creation setters (`PutObject`, `CreateMultipartUpload`).
macro_rules! apply_upload_options {
    ($options:expr, $builder:expr) => {{
        let o: &UploadOptions = $options;
        let mut b = $builder;
        if let Some(v) = &o.content_type {
            b = b.content_type(v);
        }
        if let Some(v) = &o.cache_control {
            b = b.cache_control(v);
        }
        if let Some(v) = &o.content_disposition {
            b = b.content_disposition(v);
        }
        if let Some(v) = &o.content_encoding {
            b = b.content_encoding(v);
        }
        if !o.metadata.is_empty() {
            b = b.set_metadata(Some(
                o.metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ));
        }
        if let Some(acl) = o.acl {
            b = b.acl(acl.to_sdk());
        }
        match &o.server_side_encryption {
            Some(ServerSideEncryption::Aes256) => {
                b = b.server_side_encryption(aws_sdk_s3::types::ServerSideEncryption::Aes256);
            }
            Some(ServerSideEncryption::Kms { key_id }) => {
                b = b
                    .server_side_encryption(aws_sdk_s3::types::ServerSideEncryption::AwsKms)
                    .set_ssekms_key_id(key_id.clone());
            }
            None => {}
        }
        if let Some(tagging) = o.tagging_header() {
            b = b.tagging(tagging);
        }
        b
    }};
}

impl UploadOptions {
    /// Applies the options to a `PutObject` request.
    pub fn apply_to_put_object(
        &self,
        builder: aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder,
    ) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder {
        apply_upload_options!(self, builder)
    }

    /// Applies the options to a `CreateMultipartUpload` request (for the multipart
    /// engine: the options of a multipart upload go on its creation).
    pub fn apply_to_create_multipart_upload(
        &self,
        builder: aws_sdk_s3::operation::create_multipart_upload::builders::CreateMultipartUploadFluentBuilder,
    ) -> aws_sdk_s3::operation::create_multipart_upload::builders::CreateMultipartUploadFluentBuilder
    {
        apply_upload_options!(self, builder)
    }
}

/// What an upload produced.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct UploadOutput {
    /// The bucket.
    pub bucket: String,
    /// The key.
    pub key: ObjectKey,
    /// The object's URL (see [`object_url`]).
    pub location: String,
    /// The ETag as the server sent it (quotes included).
    pub etag: Option<String>,
    /// The version id, on a versioned bucket.
    pub version_id: Option<String>,
    /// Bytes uploaded.
    pub size: u64,
    /// Number of parts, for a multipart upload; `None` for a single PutObject.
    pub parts: Option<u32>,
}

impl UploadOutput {
    /// An output for `key` in `bucket` with `location` computed from `config`.
    pub fn new(config: &S3Config, bucket: &str, key: ObjectKey, size: u64) -> Self {
        UploadOutput {
            bucket: bucket.to_owned(),
            location: object_url(config, bucket, &key),
            key,
            etag: None,
            version_id: None,
            size,
            parts: None,
        }
    }

    /// Sets the ETag.
    pub fn with_etag(mut self, etag: Option<String>) -> Self {
        self.etag = etag;
        self
    }

    /// Sets the version id.
    pub fn with_version_id(mut self, version_id: Option<String>) -> Self {
        self.version_id = version_id;
        self
    }

    /// Sets the number of parts.
    pub fn with_parts(mut self, parts: u32) -> Self {
        self.parts = Some(parts);
        self
    }
}

/// The URL of an object: `{endpoint}/{bucket}/{key}` for path-style addressing,
/// `https://{bucket}.s3.{region}.amazonaws.com/{key}` (or the custom endpoint's
/// virtual-host form) otherwise. The key is percent-encoded, `/` kept.
pub fn object_url(config: &S3Config, bucket: &str, key: &ObjectKey) -> String {
    let key = utf8_percent_encode(key.as_str(), PATH);
    match config.endpoint() {
        Some(endpoint) if config.force_path_style() => {
            format!("{}/{bucket}/{key}", endpoint.trim_end_matches('/'))
        }
        Some(endpoint) => match endpoint.split_once("://") {
            Some((scheme, host)) => {
                format!("{scheme}://{bucket}.{}/{key}", host.trim_end_matches('/'))
            }
            None => format!("{endpoint}/{bucket}/{key}"),
        },
        None if config.force_path_style() => {
            format!(
                "https://s3.{}.amazonaws.com/{bucket}/{key}",
                config.region()
            )
        }
        None => format!(
            "https://{bucket}.s3.{}.amazonaws.com/{key}",
            config.region()
        ),
    }
}

/// One progress event of an upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct UploadProgress {
    /// Bytes acknowledged by the server so far (monotonic).
    pub bytes_sent: u64,
    /// The total, when known.
    pub total: Option<u64>,
    /// The part just completed, for multipart uploads.
    pub part_number: Option<u32>,
}

impl UploadProgress {
    /// A progress event.
    pub fn new(bytes_sent: u64, total: Option<u64>, part_number: Option<u32>) -> Self {
        UploadProgress {
            bytes_sent,
            total,
            part_number,
        }
    }
}

/// Receives [`UploadProgress`] events; cloning shares the callback.
#[derive(Clone)]
pub struct ProgressListener(Arc<dyn Fn(UploadProgress) + Send + Sync>);

impl ProgressListener {
    /// Wraps a callback. It runs on the upload's task: keep it quick.
    pub fn new(f: impl Fn(UploadProgress) + Send + Sync + 'static) -> Self {
        ProgressListener(Arc::new(f))
    }

    /// Reports one event.
    pub fn report(&self, event: UploadProgress) {
        (self.0)(event)
    }
}

impl fmt::Debug for ProgressListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProgressListener(..)")
    }
}

/// One large upload handed by the S3 service to the multipart engine.
///
/// The service has already checked the key and read the first
/// `threshold` bytes: `body` yields them again, then the rest of the source.
#[non_exhaustive]
pub struct MultipartUploadRequest {
    /// The client (SDK client, config, shutdown gate).
    pub client: S3Client,
    /// The bucket.
    pub bucket: String,
    /// The checked key.
    pub key: ObjectKey,
    /// The body, from its first byte.
    pub body: BodyStream,
    /// The total length, when known (files, bytes).
    pub content_length: Option<u64>,
    /// The upload options (apply with
    /// [`UploadOptions::apply_to_create_multipart_upload`]).
    pub options: UploadOptions,
    /// Where progress events go, if anywhere.
    pub progress: Option<ProgressListener>,
}

impl fmt::Debug for MultipartUploadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultipartUploadRequest")
            .field("bucket", &self.bucket)
            .field("key", &self.key)
            .field("content_length", &self.content_length)
            .field("options", &self.options)
            .field("progress", &self.progress.is_some())
            .finish_non_exhaustive()
    }
}

impl MultipartUploadRequest {
    /// A request with every field given.
    pub fn new(
        client: S3Client,
        bucket: String,
        key: ObjectKey,
        body: BodyStream,
        content_length: Option<u64>,
        options: UploadOptions,
        progress: Option<ProgressListener>,
    ) -> Self {
        MultipartUploadRequest {
            client,
            bucket,
            key,
            body,
            content_length,
            options,
            progress,
        }
    }
}

/// The future a [`MultipartUploader`] returns.
pub type MultipartFuture =
    Pin<Box<dyn Future<Output = Result<UploadOutput, S3ServiceError>> + Send + 'static>>;

/// The engine that carries out uploads above the multipart threshold.
///
/// The S3 service decides single PutObject or multipart; the engine (in
/// `s3::multipart`) does the parts, their concurrency, retries, progress and the
/// abort on failure or drop. Implementations are shared behind an `Arc`.
pub trait MultipartUploader: Send + Sync + fmt::Debug + 'static {
    /// The part size the engine starts with; the service reads this many bytes
    /// before deciding (at least the threshold).
    fn threshold(&self) -> u64;

    /// Uploads `request` as a multipart upload.
    fn upload(&self, request: MultipartUploadRequest) -> MultipartFuture;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoint: Option<&str>, path_style: bool) -> S3Config {
        let mut b = S3Config::builder()
            .region("eu-west-1")
            .bucket("media")
            .force_path_style(path_style);
        if let Some(e) = endpoint {
            b = b.endpoint(e);
        }
        b.build().unwrap()
    }

    #[test]
    fn location_follows_addressing_style() {
        let key = ObjectKey::new("a b/ü.txt").unwrap();
        assert_eq!(
            object_url(&config(Some("http://127.0.0.1:8014/"), true), "media", &key),
            "http://127.0.0.1:8014/media/a%20b/%C3%BC.txt"
        );
        assert_eq!(
            object_url(&config(None, false), "media", &key),
            "https://media.s3.eu-west-1.amazonaws.com/a%20b/%C3%BC.txt"
        );
        assert_eq!(
            object_url(
                &config(Some("https://s3.example.com"), false),
                "media",
                &key
            ),
            "https://media.s3.example.com/a%20b/%C3%BC.txt"
        );
    }

    #[test]
    fn tagging_is_url_encoded_and_sorted() {
        let options = UploadOptions::new().tag("b", "x y").tag("a", "1&2");
        assert_eq!(options.tagging_header().as_deref(), Some("a=1%262&b=x%20y"));
        assert_eq!(UploadOptions::new().tagging_header(), None);
    }

    #[test]
    fn body_lengths() {
        assert_eq!(UploadBody::from(vec![0u8; 10]).known_length(), Some(10));
        assert_eq!(
            UploadBody::from(String::from("abc")).known_length(),
            Some(3)
        );
        assert_eq!(UploadBody::file("/tmp/x").known_length(), None);
        let s = UploadBody::stream(futures::stream::empty());
        assert_eq!(s.known_length(), None);
        assert!(format!("{s:?}").contains("Stream"));
    }

    #[tokio::test]
    async fn bodies_stream_their_bytes() {
        let dir = std::env::temp_dir().join(format!("keel-upload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("body.bin");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        for body in [UploadBody::file(&path), UploadBody::from(data.clone())] {
            let chunks: Vec<Bytes> = body.into_stream().map(|c| c.unwrap()).collect().await;
            assert_eq!(chunks.concat(), data);
        }
        let missing = UploadBody::file(dir.join("missing")).into_stream();
        let results: Vec<_> = missing.collect().await;
        assert_eq!(results.len(), 1);
        assert!(results[0].is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
