//! [`S3`]: the typed facade — `s3.upload(key, body, opts)`, `s3.download(key)`,
//! `s3.presign_get(key, expiry)` and friends — over the layered [`S3Service`].
//!
//! Each method checks its key against the facade's [`KeyPolicy`] *before* anything
//! is sent (an invalid key costs no request), builds an [`S3Request`], runs it
//! through the stack, and records [`S3Metrics`]. Uploads pick single PutObject or
//! multipart: bytes and files by their length, streams of unknown length by
//! reading up to the threshold (5 MiB by default, as the seed) — a stream that ends
//! before it goes as one PutObject, a longer one goes to the multipart engine with
//! what was read put back in front. So memory stays bounded by the threshold here
//! and by the engine's part size times parts in flight there.
//!
//! Two stacks run the requests, both built by [`S3Builder::build`] from
//! keel-layers ([`DefaultLayers`]), outermost first:
//!
//! - the *operation* stack (every operation but multipart uploads): logging (one
//!   span and one completion event per call with operation, bucket and key),
//!   call metrics, circuit breaker (opens after 5 consecutive failures, probes
//!   after 60 s), retry (`RetryPolicy::s3()`: 1, 2, 4 s, cap 10 s, 3 retries;
//!   `SlowDown` / `Retry-After` raise the wait), timeout per attempt (the config's
//!   request timeout);
//! - the *transfer* stack (multipart uploads): logging, metrics and the same
//!   breaker, but no whole-upload retry or timeout — the engine retries and times
//!   each part itself.
//!
//! The AWS SDK's own retries are off (see [`S3Client`]), so the retry layer is the
//! one owner of attempts. Not-found answers and refused keys are `Ignored` by the
//! classification: they never trip the breaker. [`S3Builder::build_with`] puts a
//! `tower::Layer` of your choice around both instead.
//!
//! Cloning an `S3` is cheap and shares the client, the stacks (and so the state of
//! their layers, such as a circuit breaker) and the metrics.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use keel::s3::{S3, S3Client, S3Config, UploadOptions};
//! use std::time::Duration;
//!
//! let s3 = S3::new(S3Client::connect(S3Config::from_env()?).await?);
//! let out = s3
//!     .upload("uploads/hello.txt", "hello", UploadOptions::new().content_type("text/plain"))
//!     .await?;
//! println!("stored at {} (etag {:?})", out.location, out.etag);
//! assert!(s3.exists("uploads/hello.txt").await?);
//! let url = s3.presign_get("uploads/hello.txt", Duration::from_secs(3600)).await?;
//! println!("share {}", url.url);
//! s3.delete("uploads/hello.txt").await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use keel_layers::circuit_breaker::{
    CircuitBreakerError, CircuitBreakerHandle, CircuitBreakerLayer,
};
use keel_layers::classify::ByError;
use keel_layers::logging::LoggingLayer;
use keel_layers::metrics::{MetricsHandle, MetricsLayer};
use keel_layers::retry::{Retry, RetryLayer, RetryPolicy};
use keel_layers::timeout::{Timeout, TimeoutError, TimeoutLayer};
use tokio::io::AsyncWriteExt;
use tower::layer::util::{Identity, Stack};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use super::client::{S3Client, S3Health, ShutdownReport};
use super::error::{BoxError, S3ErrorKind, S3Operation, S3ServiceError};
use super::key::{IntoObjectKey, KeyPolicy, ObjectKey};
use super::metrics::{S3Metrics, S3MetricsSnapshot};
use super::multipart::{AbortReport, MultipartEngine, TransferConfig, UploadRegistry};
use super::presign::PresignedUrl;
use super::service::{
    CopyOutput, DeleteFailure, DeleteManyOutput, ListPage, MAX_DELETE_BATCH, ObjectDownload,
    ObjectSummary, OnceBody, S3Request, S3Response, S3Service, UploadPayload, UploadRequest,
};
use super::upload::{
    BodySource, MultipartUploader, ProgressListener, UploadBody, UploadOptions, UploadOutput,
};

/// Bodies longer than this go multipart, unless the engine or the builder says
/// otherwise: 5 MiB, as the seed.
pub const DEFAULT_MULTIPART_THRESHOLD: u64 = 5 * 1024 * 1024;

/// A type-erased, cloneable, `Sync` S3 stack.
pub type S3Stack = BoxCloneSyncService<S3Request, S3Response, S3ServiceError>;

/// The typed S3 facade. See the [module docs](self).
#[derive(Clone)]
pub struct S3 {
    client: S3Client,
    operations: S3Stack,
    transfers: S3Stack,
    policy: KeyPolicy,
    threshold: u64,
    metrics: S3Metrics,
    layers: Option<DefaultLayers>,
    uploads: UploadRegistry,
}

impl fmt::Debug for S3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3")
            .field("bucket", &self.client.bucket())
            .field("policy", &self.policy)
            .field("threshold", &self.threshold)
            .finish_non_exhaustive()
    }
}

/// Builds an [`S3`] facade.
#[derive(Debug)]
pub struct S3Builder {
    client: S3Client,
    policy: KeyPolicy,
    multipart: Option<Arc<dyn MultipartUploader>>,
    threshold: Option<u64>,
    metrics: S3Metrics,
    layers: Option<DefaultLayers>,
    uploads: UploadRegistry,
    body_idle_timeout: Option<Duration>,
}

impl S3Builder {
    /// The registry the multipart engine records its uploads in, for
    /// [`S3::abort_in_flight_uploads`]. The default engine uses the builder's
    /// own; give an engine set with [`multipart`](Self::multipart) the same one
    /// ([`MultipartEngine::with_registry`]) and pass it here.
    pub fn upload_registry(mut self, registry: UploadRegistry) -> Self {
        self.uploads = registry;
        self
    }

    /// How long a download body may send nothing before it fails with
    /// [`S3ErrorKind::Timeout`] (default
    /// [`DEFAULT_BODY_IDLE_TIMEOUT`](crate::s3::service::DEFAULT_BODY_IDLE_TIMEOUT),
    /// 30 s; `None` waits for ever).
    pub fn body_idle_timeout(mut self, limit: Option<Duration>) -> Self {
        self.body_idle_timeout = limit;
        self
    }

    /// The key policy strings are checked against (default
    /// [`KeyPolicy::strict`]).
    pub fn key_policy(mut self, policy: KeyPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The multipart engine for bodies above the threshold (default: a
    /// [`MultipartEngine`] with
    /// [`TransferConfig::default`](crate::s3::multipart::TransferConfig): 5 MiB
    /// threshold and parts, 4 parts in flight).
    pub fn multipart(mut self, engine: Arc<dyn MultipartUploader>) -> Self {
        self.multipart = Some(engine);
        self
    }

    /// Bodies longer than this go multipart (default: the engine's
    /// [`threshold`](MultipartUploader::threshold), else 5 MiB).
    pub fn multipart_threshold(mut self, bytes: u64) -> Self {
        self.threshold = Some(bytes);
        self
    }

    /// Shares `metrics` (for example with a `/metrics` endpoint) instead of fresh
    /// counters.
    pub fn metrics(mut self, metrics: S3Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    fn service(&self) -> S3Service {
        let service =
            S3Service::new(self.client.clone()).with_body_idle_timeout(self.body_idle_timeout);
        match &self.multipart {
            Some(engine) => service.with_multipart(Arc::clone(engine)),
            None => service,
        }
    }

    /// Builds the facade with the default stacks: [`operation_stack`] (retry,
    /// timeout per attempt of the config's request timeout) for single-request
    /// operations; the bare service for multipart uploads, whose engine retries
    /// and times its parts itself.
    pub fn build(self) -> S3 {
        let layers = self
            .layers
            .clone()
            .unwrap_or_else(|| DefaultLayers::new(self.client.config().request_timeout()));
        let service = self.service();
        let bucket = self.client.bucket().to_owned();
        let operations = layers.operations(service.clone(), &bucket);
        let transfers = layers.transfers(service, &bucket);
        let mut s3 = self.finish(operations, transfers);
        s3.layers = Some(layers);
        s3
    }

    /// Settings of the default stack (default: [`DefaultLayers::new`] with the
    /// config's request timeout); only [`build`](Self::build) uses them.
    pub fn default_layers(mut self, layers: DefaultLayers) -> Self {
        self.layers = Some(layers);
        self
    }

    /// Builds the facade with `layer` (and nothing else) around the service, for
    /// both stacks. The layer's errors are turned back into [`S3ServiceError`]s
    /// (an `S3ServiceError` or a timeout passes through typed; anything else
    /// becomes kind `Transport` with the error as its cause). With
    /// `tower::layer::util::Identity` this is the bare service.
    pub fn build_with<L>(self, layer: L) -> S3
    where
        L: Layer<S3Service>,
        L::Service: Service<S3Request, Response = S3Response> + Clone + Send + Sync + 'static,
        <L::Service as Service<S3Request>>::Error: Into<BoxError>,
        <L::Service as Service<S3Request>>::Future: Send + 'static,
    {
        let bucket = self.client.bucket().to_owned();
        let stack = layer.layer(self.service()).map_err(Into::<BoxError>::into);
        let stack = erase(stack, &bucket);
        self.finish(stack.clone(), stack)
    }

    fn finish(self, operations: S3Stack, transfers: S3Stack) -> S3 {
        let threshold = self
            .threshold
            .or_else(|| self.multipart.as_ref().map(|m| m.threshold()))
            .unwrap_or(DEFAULT_MULTIPART_THRESHOLD);
        S3 {
            client: self.client,
            operations,
            transfers,
            policy: self.policy,
            threshold,
            metrics: self.metrics,
            layers: None,
            uploads: self.uploads,
        }
    }
}

/// Boxes a stack whose errors can become [`S3ServiceError`]s.
fn erase<S>(service: S, bucket: &str) -> S3Stack
where
    S: Service<S3Request, Response = S3Response> + Clone + Send + Sync + 'static,
    S::Error: IntoS3ServiceError,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(WithErrorContext {
        inner: service,
        bucket: Arc::from(bucket),
    })
}

/// Turns a layer's error back into an [`S3ServiceError`], filling in the
/// operation, bucket and key of the request it failed.
pub trait IntoS3ServiceError {
    /// The error for a call of `operation` on `bucket` / `key`.
    fn into_s3_error(
        self,
        operation: S3Operation,
        bucket: &str,
        key: Option<&ObjectKey>,
    ) -> S3ServiceError;
}

impl IntoS3ServiceError for S3ServiceError {
    fn into_s3_error(self, _: S3Operation, _: &str, _: Option<&ObjectKey>) -> S3ServiceError {
        self
    }
}

impl<E: IntoS3ServiceError> IntoS3ServiceError for TimeoutError<E> {
    fn into_s3_error(
        self,
        operation: S3Operation,
        bucket: &str,
        key: Option<&ObjectKey>,
    ) -> S3ServiceError {
        match self {
            TimeoutError::Elapsed { after } => {
                in_context(S3ErrorKind::Timeout, operation, bucket, key)
                    .with_message(format!("no answer within {after:?}"))
            }
            TimeoutError::Inner(e) => e.into_s3_error(operation, bucket, key),
        }
    }
}

impl<E: IntoS3ServiceError> IntoS3ServiceError for CircuitBreakerError<E> {
    fn into_s3_error(
        self,
        operation: S3Operation,
        bucket: &str,
        key: Option<&ObjectKey>,
    ) -> S3ServiceError {
        match self {
            CircuitBreakerError::Inner(e) => e.into_s3_error(operation, bucket, key),
            rejected => {
                let rejected = rejected_source(rejected);
                in_context(S3ErrorKind::CircuitOpen, operation, bucket, key)
                    .with_message(rejected.to_string())
                    .with_source(rejected)
            }
        }
    }
}

/// The rejection itself as a cause (without the inner error type).
fn rejected_source<E>(
    rejected: CircuitBreakerError<E>,
) -> CircuitBreakerError<std::convert::Infallible> {
    match rejected {
        CircuitBreakerError::Open { remaining_wait } => {
            CircuitBreakerError::Open { remaining_wait }
        }
        CircuitBreakerError::HalfOpenFull { permitted_probes } => {
            CircuitBreakerError::HalfOpenFull { permitted_probes }
        }
        _ => CircuitBreakerError::ForcedOpen,
    }
}

impl IntoS3ServiceError for BoxError {
    fn into_s3_error(
        self,
        operation: S3Operation,
        bucket: &str,
        key: Option<&ObjectKey>,
    ) -> S3ServiceError {
        let err = match self.downcast::<S3ServiceError>() {
            Ok(e) => return *e,
            Err(other) => other,
        };
        let err = match err.downcast::<TimeoutError<S3ServiceError>>() {
            Ok(e) => return e.into_s3_error(operation, bucket, key),
            Err(other) => other,
        };
        in_context(S3ErrorKind::Transport, operation, bucket, key)
            .with_message(err.to_string())
            .with_source(err)
    }
}

/// A new error of `kind` for a call of `operation` on `bucket` / `key`.
fn in_context(
    kind: S3ErrorKind,
    operation: S3Operation,
    bucket: &str,
    key: Option<&ObjectKey>,
) -> S3ServiceError {
    let err = S3ServiceError::new(operation, kind).with_bucket(bucket);
    match key {
        Some(k) => err.with_key(k.as_str()),
        None => err,
    }
}

/// Maps the stack's errors to [`S3ServiceError`]s with the request's context.
#[derive(Clone, Debug)]
struct WithErrorContext<S> {
    inner: S,
    bucket: Arc<str>,
}

impl<S> Service<S3Request> for WithErrorContext<S>
where
    S: Service<S3Request, Response = S3Response>,
    S::Error: IntoS3ServiceError,
    S::Future: Send + 'static,
{
    type Response = S3Response;
    type Error = S3ServiceError;
    type Future = futures::future::BoxFuture<'static, Result<S3Response, S3ServiceError>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        let bucket = &self.bucket;
        self.inner
            .poll_ready(cx)
            .map_err(|e| e.into_s3_error(S3Operation::Readiness, bucket, None))
    }

    fn call(&mut self, request: S3Request) -> Self::Future {
        let operation = request.operation();
        let key = request.key().cloned();
        let bucket = Arc::clone(&self.bucket);
        let future = self.inner.call(request);
        Box::pin(async move {
            future
                .await
                .map_err(|e| e.into_s3_error(operation, &bucket, key.as_ref()))
        })
    }
}

/// The shared parts of the default stacks: one circuit breaker and one set of
/// call metrics for both the operation and the transfer stack.
#[derive(Clone, Debug)]
pub struct DefaultLayers {
    breaker: CircuitBreakerLayer<ByError>,
    metrics: MetricsHandle,
    attempt_timeout: Duration,
}

impl DefaultLayers {
    /// The seed's settings: a breaker that opens after 5 consecutive failures and
    /// probes again after 60 s (not-found, invalid keys and other caller mistakes
    /// never count: they are `Ignored`), call metrics over a 60 s window, and
    /// `attempt_timeout` per attempt.
    pub fn new(attempt_timeout: Duration) -> Self {
        DefaultLayers {
            breaker: CircuitBreakerLayer::builder()
                .name("s3")
                .classifier(ByError)
                .build(),
            metrics: MetricsLayer::new().handle(),
            attempt_timeout,
        }
    }

    /// Uses `breaker` instead of the default one.
    pub fn circuit_breaker(mut self, breaker: CircuitBreakerLayer<ByError>) -> Self {
        self.breaker = breaker;
        self
    }

    /// Counts into `metrics` instead of fresh call metrics.
    pub fn metrics(mut self, metrics: MetricsHandle) -> Self {
        self.metrics = metrics;
        self
    }

    /// Wraps `service` in the operation stack, outermost first: logging, metrics,
    /// circuit breaker, then [`operation_stack`] (retry, timeout per attempt).
    pub fn operations<S>(&self, service: S, bucket: &str) -> S3Stack
    where
        S: Service<S3Request, Response = S3Response, Error = S3ServiceError>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let core = operation_stack(service, self.attempt_timeout);
        erase(self.outer(bucket).service(core), bucket)
    }

    /// Wraps `service` in the transfer stack: logging, metrics, circuit breaker
    /// (no whole-call retry or timeout: the multipart engine has its own per part).
    pub fn transfers<S>(&self, service: S, bucket: &str) -> S3Stack
    where
        S: Service<S3Request, Response = S3Response, Error = S3ServiceError>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        erase(self.outer(bucket).service(service), bucket)
    }

    fn outer(&self, bucket: &str) -> ServiceBuilder<OuterLayers> {
        let fields = RequestLogFields {
            bucket: Arc::from(bucket),
        };
        ServiceBuilder::new()
            .layer(
                LoggingLayer::new("S3Service", "s3")
                    .classifier(ByError)
                    .fields(fields),
            )
            .layer(MetricsLayer::from_handle(self.metrics.clone()).classifier(ByError))
            .layer(self.breaker.clone())
    }
}

/// Logging, metrics and circuit breaker, as `ServiceBuilder` stacks them.
type OuterLayers = Stack<
    CircuitBreakerLayer<ByError>,
    Stack<MetricsLayer<ByError>, Stack<LoggingLayer<ByError, RequestLogFields>, Identity>>,
>;

/// The fields logged for every S3 call: operation, bucket and key (never bodies,
/// options or credentials).
#[derive(Clone, Debug)]
pub struct RequestLogFields {
    bucket: Arc<str>,
}

impl keel_layers::logging::RequestFields<S3Request> for RequestLogFields {
    fn span(&self, req: &S3Request) -> tracing::Span {
        // With `otel`: semantic-convention names (keel's behind `otel-keel-fields`).
        #[cfg(feature = "otel")]
        return crate::s3::otel::operation_span(
            req.operation(),
            &self.bucket,
            req.key().map(ObjectKey::as_str),
        );
        #[cfg(not(feature = "otel"))]
        tracing::info_span!(
            "s3",
            s3_operation = req.operation().as_str(),
            bucket = %self.bucket,
            key = req.key().map(ObjectKey::as_str),
        )
    }
}

/// The default stack for single-request operations, outermost first: retry
/// (`RetryPolicy::s3()`: 1, 2, 4 s, cap 10 s, 3 retries; what is retried and the
/// delay floor come from [`S3ServiceError`]'s classification, so `SlowDown` and
/// `Retry-After` are honoured) around a timeout per attempt.
///
/// The SDK does not retry (see [`S3Client`]), so this is the only place attempts
/// are made: at most 4 per call.
pub fn operation_stack<S>(service: S, attempt_timeout: Duration) -> Retry<Timeout<S>, ByError>
where
    S: Service<S3Request, Response = S3Response, Error = S3ServiceError> + Clone,
{
    ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::s3()).classifier(ByError))
        .layer(TimeoutLayer::new(attempt_timeout))
        .service(service)
}

impl S3 {
    /// A builder over `client`.
    pub fn builder(client: S3Client) -> S3Builder {
        let uploads = UploadRegistry::default();
        let engine = MultipartEngine::new(client.sdk().clone(), TransferConfig::default())
            .with_registry(uploads.clone());
        S3Builder {
            client,
            policy: KeyPolicy::strict(),
            multipart: Some(Arc::new(engine)),
            threshold: None,
            metrics: S3Metrics::default(),
            layers: None,
            uploads,
            body_idle_timeout: Some(crate::s3::service::DEFAULT_BODY_IDLE_TIMEOUT),
        }
    }

    /// A facade with the defaults.
    pub fn new(client: S3Client) -> Self {
        S3::builder(client).build()
    }

    /// The client.
    pub fn client(&self) -> &S3Client {
        &self.client
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        self.client.bucket()
    }

    /// The multipart threshold in bytes.
    pub fn multipart_threshold(&self) -> u64 {
        self.threshold
    }

    /// The counters.
    pub fn metrics(&self) -> S3MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// The shared metrics handle.
    pub fn metrics_handle(&self) -> &S3Metrics {
        &self.metrics
    }

    /// The default stack's call metrics (calls, failures by class, in flight,
    /// latency quantiles), when built with [`S3Builder::build`].
    pub fn call_metrics(&self) -> Option<&MetricsHandle> {
        self.layers.as_ref().map(|l| &l.metrics)
    }

    /// The default stack's circuit breaker (state, force open/closed, reset),
    /// when built with [`S3Builder::build`].
    pub fn circuit_breaker(&self) -> Option<CircuitBreakerHandle> {
        self.layers.as_ref().map(|l| l.breaker.handle())
    }

    /// A `HeadBucket` health report.
    pub async fn health(&self) -> S3Health {
        self.client.health().await
    }

    /// Graceful shutdown; see [`S3Client::shutdown`].
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        self.client.shutdown(timeout).await
    }

    /// Aborts every multipart upload still in flight, within `budget` in total
    /// (10 s is plenty: one AbortMultipartUpload per upload, concurrently, each
    /// retried). For shutdown paths: a process stopped by SIGTERM in the middle
    /// of an upload would otherwise leave its parts billed and invisible. The
    /// upload futures themselves are not waited for; their part requests fail
    /// with `NoSuchUpload` once aborted.
    ///
    /// ```no_run
    /// # async fn run(s3: keel::s3::S3) {
    /// // In the SIGTERM handler, after the HTTP server stopped taking requests:
    /// let report = s3.abort_in_flight_uploads(std::time::Duration::from_secs(10)).await;
    /// if report.failed + report.left > 0 {
    ///     eprintln!("{} multipart uploads may be left behind", report.failed + report.left);
    /// }
    /// # }
    /// ```
    pub async fn abort_in_flight_uploads(&self, budget: Duration) -> AbortReport {
        self.uploads.abort_all(budget).await
    }

    /// The multipart uploads in flight (see [`abort_in_flight_uploads`](Self::abort_in_flight_uploads)).
    pub fn upload_registry(&self) -> &UploadRegistry {
        &self.uploads
    }

    /// Aborts this bucket's multipart uploads initiated more than `older_than`
    /// ago (any client's: see
    /// [`MultipartEngine::abort_stale_uploads`]): a sweeper for uploads left by
    /// crashed processes. Run it from a periodic job with an age longer than any
    /// upload takes (a day is common).
    pub async fn abort_stale_uploads(
        &self,
        older_than: Duration,
    ) -> Result<AbortReport, S3ServiceError> {
        MultipartEngine::new(self.client.sdk().clone(), TransferConfig::default())
            .with_registry(self.uploads.clone())
            .abort_stale_uploads(self.bucket(), None, older_than)
            .await
    }

    fn key(&self, op: S3Operation, key: impl IntoObjectKey) -> Result<ObjectKey, S3ServiceError> {
        key.into_object_key(&self.policy).map_err(|e| {
            self.metrics.add_failed();
            S3ServiceError::invalid_key(op, self.bucket(), e)
        })
    }

    async fn call(
        &self,
        stack: &S3Stack,
        request: S3Request,
    ) -> Result<S3Response, S3ServiceError> {
        let op = request.operation();
        let started = Instant::now();
        let result = stack.clone().oneshot(request).await;
        self.metrics.record(op, started.elapsed(), result.is_ok());
        result
    }

    /// Runs `request` and takes the expected variant out of the response (a
    /// custom layer answering with another variant is an `InvalidRequest`).
    async fn call_as<T>(
        &self,
        stack: &S3Stack,
        request: S3Request,
        expected: fn(S3Response) -> Option<T>,
    ) -> Result<T, S3ServiceError> {
        let op = request.operation();
        expected(self.call(stack, request).await?).ok_or_else(|| {
            S3ServiceError::new(op, S3ErrorKind::InvalidRequest)
                .with_bucket(self.bucket())
                .with_message(format!(
                    "a layer answered {op} with another kind of response"
                ))
        })
    }

    /// Uploads `body` (bytes, a string, [`UploadBody::file`],
    /// [`UploadBody::stream`]) to `key` with `options`.
    pub async fn upload(
        &self,
        key: impl IntoObjectKey,
        body: impl Into<UploadBody>,
        options: UploadOptions,
    ) -> Result<UploadOutput, S3ServiceError> {
        self.upload_inner(key, body.into(), options, None).await
    }

    /// Like [`upload`](Self::upload), reporting progress to `progress`.
    pub async fn upload_with_progress(
        &self,
        key: impl IntoObjectKey,
        body: impl Into<UploadBody>,
        options: UploadOptions,
        progress: ProgressListener,
    ) -> Result<UploadOutput, S3ServiceError> {
        self.upload_inner(key, body.into(), options, Some(progress))
            .await
    }

    async fn upload_inner(
        &self,
        key: impl IntoObjectKey,
        body: UploadBody,
        options: UploadOptions,
        progress: Option<ProgressListener>,
    ) -> Result<UploadOutput, S3ServiceError> {
        let op = S3Operation::Upload;
        let key = self.key(op, key)?;
        let payload = prepare_payload(body, self.threshold).await.map_err(|e| {
            self.metrics.add_failed();
            S3ServiceError::io(op, self.bucket(), key.as_str(), e)
        })?;
        let stack = match payload {
            UploadPayload::Multipart { .. } => &self.transfers,
            _ => &self.operations,
        };
        let request = S3Request::Upload(UploadRequest::new(key, payload, options, progress));
        let out = self
            .call_as(stack, request, S3Response::into_uploaded)
            .await?;
        self.metrics.add_bytes_uploaded(out.size);
        Ok(out)
    }

    /// Downloads `key` as a stream ([`ObjectDownload::body`]); bytes are counted as
    /// they are read.
    pub async fn download(
        &self,
        key: impl IntoObjectKey,
    ) -> Result<ObjectDownload, S3ServiceError> {
        let op = S3Operation::Download;
        let key = self.key(op, key)?;
        let request = S3Request::Download { key };
        let mut download = *self
            .call_as(&self.operations, request, S3Response::into_downloaded)
            .await?;
        let metrics = self.metrics.clone();
        download.body = download
            .body
            .on_chunk(Arc::new(move |n| metrics.add_bytes_downloaded(n)));
        Ok(download)
    }

    /// Downloads `key` into memory.
    pub async fn download_bytes(&self, key: impl IntoObjectKey) -> Result<Bytes, S3ServiceError> {
        self.download(key).await?.body.collect_bytes().await
    }

    /// Downloads `key` to the file at `path`, returning the bytes written. The data
    /// goes to a temporary file beside `path` that is renamed over it only when
    /// complete, so `path` never holds a partial object.
    pub async fn download_to_file(
        &self,
        key: impl IntoObjectKey,
        path: impl AsRef<Path>,
    ) -> Result<u64, S3ServiceError> {
        let path = path.as_ref();
        let download = self.download(key).await?;
        let key = download.key.clone();
        let io_err = |e: io::Error| {
            S3ServiceError::io(S3Operation::Download, self.bucket(), key.as_str(), e)
                .with_message(format!("writing {}", path.display()))
        };
        let temp = temp_path(path);
        let result = write_body(download, &temp).await;
        match result {
            Ok(written) => {
                tokio::fs::rename(&temp, path).await.map_err(io_err)?;
                Ok(written)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&temp).await;
                Err(match e {
                    WriteError::Io(e) => io_err(e),
                    WriteError::Body(e) => e,
                })
            }
        }
    }

    /// A presigned GET URL for `key`, valid for `expiry` (0 < expiry <= 7 days).
    pub async fn presign_get(
        &self,
        key: impl IntoObjectKey,
        expiry: Duration,
    ) -> Result<PresignedUrl, S3ServiceError> {
        let op = S3Operation::PresignGet;
        let key = self.key(op, key)?;
        let request = S3Request::PresignGet { key, expiry };
        self.call_as(&self.operations, request, S3Response::into_presigned)
            .await
    }

    /// A presigned PUT URL for `key`, valid for `expiry` (0 < expiry <= 7 days).
    pub async fn presign_put(
        &self,
        key: impl IntoObjectKey,
        expiry: Duration,
    ) -> Result<PresignedUrl, S3ServiceError> {
        self.presign_put_with_content_type(key, expiry, None).await
    }

    /// A presigned PUT URL whose uploader must send `content_type`.
    pub async fn presign_put_with_content_type(
        &self,
        key: impl IntoObjectKey,
        expiry: Duration,
        content_type: Option<&str>,
    ) -> Result<PresignedUrl, S3ServiceError> {
        let op = S3Operation::PresignPut;
        let key = self.key(op, key)?;
        let request = S3Request::PresignPut {
            key,
            expiry,
            content_type: content_type.map(str::to_owned),
        };
        self.call_as(&self.operations, request, S3Response::into_presigned)
            .await
    }

    /// Deletes `key` (a missing key is not an error, as in S3).
    pub async fn delete(&self, key: impl IntoObjectKey) -> Result<(), S3ServiceError> {
        let op = S3Operation::Delete;
        let key = self.key(op, key)?;
        let request = S3Request::Delete { key };
        self.call_as(&self.operations, request, S3Response::into_deleted)
            .await
    }

    /// Deletes many keys, in `DeleteObjects` calls of at most 1,000.
    ///
    /// Every key is checked first: one invalid key refuses the whole call before
    /// any request. After that, keys S3 refuses, and every key of a batch whose
    /// call failed (after the stack's retries), are reported in
    /// [`DeleteManyOutput::failures`] — the other batches still run.
    pub async fn delete_many<I>(&self, keys: I) -> Result<DeleteManyOutput, S3ServiceError>
    where
        I: IntoIterator,
        I::Item: IntoObjectKey,
    {
        let op = S3Operation::DeleteMany;
        let keys = keys
            .into_iter()
            .map(|k| self.key(op, k))
            .collect::<Result<Vec<_>, _>>()?;
        let mut total = DeleteManyOutput::default();
        for chunk in keys.chunks(MAX_DELETE_BATCH) {
            let request = S3Request::DeleteMany {
                keys: chunk.to_vec(),
            };
            let result = self
                .call_as(&self.operations, request, S3Response::into_deleted_many)
                .await;
            match result {
                Ok(out) => {
                    self.metrics.add_deletes(out.deleted as u64);
                    total.merge(out);
                }
                Err(err) => {
                    let code = err
                        .code()
                        .map(str::to_owned)
                        .unwrap_or_else(|| err.classification_class().to_owned());
                    let message = err.to_string();
                    total.failures.extend(
                        chunk
                            .iter()
                            .map(|k| DeleteFailure::new(k.as_str(), code.clone(), message.clone())),
                    );
                }
            }
        }
        Ok(total)
    }

    /// Whether `key` exists (`HeadObject`): not found is `false`, any other
    /// failure an error.
    pub async fn exists(&self, key: impl IntoObjectKey) -> Result<bool, S3ServiceError> {
        let op = S3Operation::Exists;
        let key = self.key(op, key)?;
        let request = S3Request::Exists { key };
        self.call_as(&self.operations, request, S3Response::into_exists)
            .await
    }

    /// Copies `source` to `destination` within the bucket (one `CopyObject`, so
    /// sources up to 5 GiB).
    pub async fn copy(
        &self,
        source: impl IntoObjectKey,
        destination: impl IntoObjectKey,
    ) -> Result<CopyOutput, S3ServiceError> {
        self.copy_inner(None, source, destination).await
    }

    /// Copies `source` from `source_bucket` to `destination` in this bucket.
    pub async fn copy_from_bucket(
        &self,
        source_bucket: &str,
        source: impl IntoObjectKey,
        destination: impl IntoObjectKey,
    ) -> Result<CopyOutput, S3ServiceError> {
        self.copy_inner(Some(source_bucket.to_owned()), source, destination)
            .await
    }

    async fn copy_inner(
        &self,
        source_bucket: Option<String>,
        source: impl IntoObjectKey,
        destination: impl IntoObjectKey,
    ) -> Result<CopyOutput, S3ServiceError> {
        let op = S3Operation::Copy;
        let source = self.key(op, source)?;
        let destination = self.key(op, destination)?;
        let request = S3Request::Copy {
            source_bucket,
            source,
            destination,
        };
        self.call_as(&self.operations, request, S3Response::into_copied)
            .await
    }

    /// One page of the objects whose keys start with `prefix`.
    pub async fn list_page(
        &self,
        prefix: &str,
        continuation_token: Option<String>,
        max_keys: Option<i32>,
    ) -> Result<ListPage, S3ServiceError> {
        let request = S3Request::List {
            prefix: (!prefix.is_empty()).then(|| prefix.to_owned()),
            continuation_token,
            max_keys,
        };
        self.call_as(&self.operations, request, S3Response::into_listed)
            .await
    }

    /// Every object whose key starts with `prefix`, page after page.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectSummary>, S3ServiceError> {
        let mut objects = Vec::new();
        let mut token = None;
        loop {
            let page = self.list_page(prefix, token, None).await?;
            objects.extend(page.objects);
            match page.next_continuation_token {
                Some(next) => token = Some(next),
                None => return Ok(objects),
            }
        }
    }
}

impl S3ServiceError {
    fn classification_class(&self) -> &'static str {
        use keel_layers::classify::ClassifiedError;
        self.classification().class
    }
}

/// Decides single PutObject or multipart; see the module docs.
async fn prepare_payload(body: UploadBody, threshold: u64) -> io::Result<UploadPayload> {
    match body.source {
        BodySource::Bytes(bytes) if bytes.len() as u64 <= threshold => {
            Ok(UploadPayload::Bytes(bytes))
        }
        BodySource::Bytes(bytes) => {
            let len = bytes.len() as u64;
            Ok(UploadPayload::Multipart {
                body: OnceBody::new(UploadBody::from(bytes).into_stream()),
                content_length: Some(len),
            })
        }
        BodySource::File(path) => {
            let length = tokio::fs::metadata(&path).await?.len();
            if length <= threshold {
                Ok(UploadPayload::File { path, length })
            } else {
                Ok(UploadPayload::Multipart {
                    body: OnceBody::new(UploadBody::file(path).into_stream()),
                    content_length: Some(length),
                })
            }
        }
        BodySource::Stream(mut stream) => {
            let mut head = BytesMut::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                if (head.len() + chunk.len()) as u64 > threshold {
                    let head = head.freeze();
                    let rest = futures::stream::iter([Ok(head), Ok(chunk)]).chain(stream);
                    return Ok(UploadPayload::Multipart {
                        body: OnceBody::new(rest.boxed()),
                        content_length: None,
                    });
                }
                head.extend_from_slice(&chunk);
            }
            Ok(UploadPayload::Bytes(head.freeze()))
        }
    }
}

fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "download".to_owned());
    path.with_file_name(format!(".{name}.keel-partial-{}-{n}", std::process::id()))
}

/// Why writing a download to a file failed.
enum WriteError {
    /// The local file.
    Io(io::Error),
    /// The download itself.
    Body(S3ServiceError),
}

/// Writes the body to `temp`, synced to disk.
async fn write_body(download: ObjectDownload, temp: &Path) -> Result<u64, WriteError> {
    let mut file = tokio::fs::File::create(temp)
        .await
        .map_err(WriteError::Io)?;
    let mut body = download.body;
    let mut written = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(WriteError::Body)?;
        file.write_all(&chunk).await.map_err(WriteError::Io)?;
        written += chunk.len() as u64;
    }
    file.flush().await.map_err(WriteError::Io)?;
    file.sync_all().await.map_err(WriteError::Io)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(sizes: &[usize]) -> UploadBody {
        let items: Vec<io::Result<Bytes>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Ok(Bytes::from(vec![i as u8; n])))
            .collect();
        UploadBody::stream(futures::stream::iter(items))
    }

    async fn collect(payload: UploadPayload) -> Vec<u8> {
        match payload {
            UploadPayload::Bytes(b) => b.to_vec(),
            UploadPayload::Multipart { body, .. } => body
                .take()
                .unwrap()
                .map(|c| c.unwrap())
                .collect::<Vec<_>>()
                .await
                .concat(),
            UploadPayload::File { path, .. } => std::fs::read(path).unwrap(),
        }
    }

    #[tokio::test]
    async fn short_streams_go_single_long_streams_multipart_with_every_byte() {
        let p = prepare_payload(chunks(&[3, 3, 4]), 10).await.unwrap();
        assert!(matches!(&p, UploadPayload::Bytes(b) if b.len() == 10));
        let p = prepare_payload(chunks(&[3, 3, 4, 1]), 10).await.unwrap();
        assert!(matches!(
            &p,
            UploadPayload::Multipart {
                content_length: None,
                ..
            }
        ));
        let data = collect(p).await;
        assert_eq!(data, [&[0u8; 3][..], &[1; 3], &[2; 4], &[3; 1]].concat());
    }

    #[tokio::test]
    async fn bytes_and_files_go_by_length() {
        let p = prepare_payload(UploadBody::from(vec![7u8; 11]), 10)
            .await
            .unwrap();
        assert!(matches!(
            p,
            UploadPayload::Multipart {
                content_length: Some(11),
                ..
            }
        ));
        let dir = std::env::temp_dir().join(format!("keel-facade-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let small = dir.join("small");
        std::fs::write(&small, b"0123456789").unwrap();
        let p = prepare_payload(UploadBody::file(&small), 10).await.unwrap();
        assert!(matches!(p, UploadPayload::File { length: 10, .. }));
        let err = prepare_payload(UploadBody::file(dir.join("missing")), 10)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn stream_errors_surface() {
        let body = UploadBody::stream(futures::stream::iter([
            Ok(Bytes::from_static(b"ab")),
            Err(io::Error::other("boom")),
        ]));
        assert!(prepare_payload(body, 10).await.is_err());
    }

    fn exists_request() -> S3Request {
        S3Request::Exists {
            key: ObjectKey::new("k").unwrap(),
        }
    }

    /// A fake S3 answering with `failures` errors first, then `Exists(true)`.
    fn flaky(
        failures: Vec<S3ErrorKind>,
        calls: Arc<AtomicU64>,
    ) -> impl Service<
        S3Request,
        Response = S3Response,
        Error = S3ServiceError,
        Future = impl Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static {
        let failures = Arc::new(failures);
        tower::service_fn(move |_req: S3Request| {
            let n = calls.fetch_add(1, Ordering::SeqCst) as usize;
            let failures = Arc::clone(&failures);
            async move {
                match failures.get(n) {
                    Some(kind) => Err(S3ServiceError::new(S3Operation::Exists, kind.clone())),
                    None => Ok(S3Response::Exists(true)),
                }
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn slow_down_is_retried_after_the_backoff_with_a_one_second_floor() {
        let calls = Arc::new(AtomicU64::new(0));
        let throttled = S3ErrorKind::Throttled { retry_after: None };
        let stack = operation_stack(
            flaky(vec![throttled.clone(), throttled], Arc::clone(&calls)),
            Duration::from_secs(30),
        );
        let started = tokio::time::Instant::now();
        let response = stack.oneshot(exists_request()).await.unwrap();
        assert!(matches!(response, S3Response::Exists(true)));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // Backoff 1 s then 2 s (the SlowDown floor is 1 s).
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_raises_the_wait() {
        let calls = Arc::new(AtomicU64::new(0));
        let throttled = S3ErrorKind::Throttled {
            retry_after: Some(Duration::from_secs(7)),
        };
        let stack = operation_stack(
            flaky(vec![throttled], Arc::clone(&calls)),
            Duration::from_secs(30),
        );
        let started = tokio::time::Instant::now();
        stack.oneshot(exists_request()).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn three_retries_then_the_last_error() {
        let calls = Arc::new(AtomicU64::new(0));
        let stack = operation_stack(
            flaky(vec![S3ErrorKind::Transport; 10], Arc::clone(&calls)),
            Duration::from_secs(30),
        );
        let started = tokio::time::Instant::now();
        let err = stack.oneshot(exists_request()).await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 4, "1 attempt + 3 retries");
        assert_eq!(started.elapsed(), Duration::from_secs(1 + 2 + 4));
        let err = err.into_s3_error(S3Operation::Exists, "b", None);
        assert_eq!(err.kind(), &S3ErrorKind::Transport);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let calls = Arc::new(AtomicU64::new(0));
        let stack = operation_stack(
            flaky(vec![S3ErrorKind::AccessDenied], Arc::clone(&calls)),
            Duration::from_secs(30),
        );
        let err = stack.oneshot(exists_request()).await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            err.into_s3_error(S3Operation::Exists, "b", None).kind(),
            &S3ErrorKind::AccessDenied
        );
    }

    #[tokio::test(start_paused = true)]
    async fn timed_out_attempts_are_retried_and_reported_as_timeouts() {
        let calls = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&calls);
        let hanging = tower::service_fn(move |_req: S3Request| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok::<_, S3ServiceError>(S3Response::Deleted)
            }
        });
        let stack = erase(operation_stack(hanging, Duration::from_secs(30)), "media");
        let started = tokio::time::Instant::now();
        let err = stack.oneshot(exists_request()).await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(started.elapsed(), Duration::from_secs(4 * 30 + 1 + 2 + 4));
        assert_eq!(err.kind(), &S3ErrorKind::Timeout);
        assert_eq!(err.operation(), S3Operation::Exists);
        assert_eq!(err.bucket(), Some("media"));
        assert_eq!(err.key(), Some("k"));
    }

    /// The default operation stack over a fake that fails `n` times with `kind`.
    fn default_stack_failing(
        kind: S3ErrorKind,
        n: usize,
    ) -> (S3Stack, DefaultLayers, Arc<AtomicU64>) {
        let calls = Arc::new(AtomicU64::new(0));
        let layers = DefaultLayers::new(Duration::from_secs(30));
        let stack = layers.operations(flaky(vec![kind; n], Arc::clone(&calls)), "media");
        (stack, layers, calls)
    }

    #[tokio::test(start_paused = true)]
    async fn the_default_stack_opens_its_breaker_after_five_failed_calls() {
        let (stack, layers, calls) = default_stack_failing(S3ErrorKind::AccessDenied, 100);
        for _ in 0..5 {
            let err = stack.clone().oneshot(exists_request()).await.unwrap_err();
            assert_eq!(err.kind(), &S3ErrorKind::AccessDenied);
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            5,
            "permanent failures are not retried"
        );
        let err = stack.clone().oneshot(exists_request()).await.unwrap_err();
        assert_eq!(err.kind(), &S3ErrorKind::CircuitOpen);
        assert_eq!(err.key(), Some("k"));
        assert!(!err.is_retryable());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            5,
            "an open breaker calls nothing"
        );
        let snapshot = layers.metrics.snapshot();
        assert_eq!(snapshot.calls, 6);
        assert_eq!(snapshot.failures_by_class["access_denied"], 5);
        assert_eq!(snapshot.failures_by_class["circuit_open"], 1);
    }

    #[tokio::test(start_paused = true)]
    async fn not_found_never_trips_the_breaker() {
        let (stack, layers, calls) = default_stack_failing(S3ErrorKind::NotFound, 20);
        for _ in 0..20 {
            let err = stack.clone().oneshot(exists_request()).await.unwrap_err();
            assert!(err.is_not_found());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 20);
        assert_eq!(
            layers.breaker.handle().state(),
            keel_layers::circuit_breaker::CircuitState::Closed
        );
    }

    #[test]
    fn foreign_layer_errors_become_transport_errors_with_context() {
        let boxed: BoxError = Box::new(io::Error::other("layer broke"));
        let key = ObjectKey::new("k").unwrap();
        let err = boxed.into_s3_error(S3Operation::Copy, "b", Some(&key));
        assert_eq!(err.kind(), &S3ErrorKind::Transport);
        assert_eq!(err.key(), Some("k"));
        let typed: BoxError = Box::new(S3ServiceError::new(
            S3Operation::List,
            S3ErrorKind::NotFound,
        ));
        assert!(
            typed
                .into_s3_error(S3Operation::Copy, "b", None)
                .is_not_found()
        );
    }

    #[test]
    fn temp_files_sit_beside_the_target() {
        let t = temp_path(Path::new("/data/out/report.csv"));
        assert_eq!(t.parent(), Some(Path::new("/data/out")));
        assert!(
            t.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".report.csv.keel-partial-")
        );
    }
}
