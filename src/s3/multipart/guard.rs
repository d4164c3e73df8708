//! Aborts a multipart upload that did not complete, even when its future is
//! dropped or its runtime shuts down, and keeps the list of uploads in flight so a
//! shutdown path can abort them all ([`UploadRegistry`]).

use crate::s3::otel::{Call, traced};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::Client;
use tokio::task::JoinSet;

use super::retry::{RetryPolicy, TransferCounters, with_retries};
use crate::s3::error::{S3ErrorKind, S3Operation, S3ServiceError};

/// The multipart uploads of one engine that are created and not yet completed or
/// aborted. Cloning shares the list.
///
/// Every multipart upload registers here from CreateMultipartUpload until it
/// completes or its abort is answered. [`abort_all`](Self::abort_all) is for
/// shutdown paths (SIGTERM): it aborts whatever is still in flight within a total
/// budget, so a process that stops mid-upload leaves no billed parts behind.
#[derive(Clone, Debug, Default)]
pub struct UploadRegistry {
    inner: Arc<RegistryInner>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    next: AtomicU64,
    uploads: Mutex<HashMap<u64, Abort>>,
    aborted: AtomicU64,
    abort_failures: AtomicU64,
}

/// One multipart upload in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlightUpload {
    /// The bucket.
    pub bucket: String,
    /// The key.
    pub key: String,
    /// The upload id.
    pub upload_id: String,
}

/// What [`UploadRegistry::abort_all`] (or a sweep) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AbortReport {
    /// Uploads aborted (or found already gone).
    pub aborted: usize,
    /// Uploads whose abort failed after its retries.
    pub failed: usize,
    /// Uploads not aborted because the budget ran out.
    pub left: usize,
}

impl UploadRegistry {
    /// The uploads in flight now.
    pub fn in_flight(&self) -> Vec<InFlightUpload> {
        let uploads = self.inner.uploads.lock().unwrap_or_else(|e| e.into_inner());
        uploads
            .values()
            .map(|a| InFlightUpload {
                bucket: a.bucket.clone(),
                key: a.key.clone(),
                upload_id: a.upload_id.clone(),
            })
            .collect()
    }

    /// Aborts answered since the start (on failure, drop, shutdown or sweep).
    pub fn aborted(&self) -> u64 {
        self.inner.aborted.load(Ordering::Relaxed)
    }

    /// Aborts that failed after their retries (logged at error level): each one
    /// is a multipart upload left behind until a lifecycle rule or
    /// [`MultipartEngine::abort_stale_uploads`](super::MultipartEngine::abort_stale_uploads)
    /// removes it.
    pub fn abort_failures(&self) -> u64 {
        self.inner.abort_failures.load(Ordering::Relaxed)
    }

    /// Aborts every upload in flight, concurrently, within `budget` in total.
    /// The part tasks of those uploads are not waited for: a part that lands after
    /// the abort is refused by the server (`NoSuchUpload`).
    pub async fn abort_all(&self, budget: Duration) -> AbortReport {
        let pending: Vec<(u64, Abort)> = {
            let uploads = self.inner.uploads.lock().unwrap_or_else(|e| e.into_inner());
            uploads.iter().map(|(id, a)| (*id, a.clone())).collect()
        };
        let total = pending.len();
        let done = Arc::new(Mutex::new(AbortReport::default()));
        let work = futures::future::join_all(pending.into_iter().map(|(id, abort)| {
            let done = Arc::clone(&done);
            async move {
                let ok = abort.send(self).await;
                let mut report = done.lock().unwrap_or_else(|e| e.into_inner());
                if ok {
                    self.remove(id);
                    report.aborted += 1;
                } else {
                    report.failed += 1;
                }
            }
        }));
        let _ = tokio::time::timeout(budget, work).await;
        let mut report = *done.lock().unwrap_or_else(|e| e.into_inner());
        report.left = total - report.aborted - report.failed;
        report
    }

    fn register(&self, abort: Abort) -> u64 {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner
            .uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, abort);
        id
    }

    fn remove(&self, id: u64) {
        self.inner
            .uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

/// Owns the duty to abort one multipart upload (or copy) until it is disarmed, and
/// the part tasks that upload into it.
///
/// [`abort_now`](Self::abort_now) stops the part tasks, waits for them, then aborts
/// (after a failure). Dropping the guard while armed (the upload future was
/// dropped, or its runtime is shutting down and drops every task) hands the same
/// work to a short-lived thread with its own runtime: a task spawned on a runtime
/// that is shutting down would never run, and the upload would be left behind.
#[derive(Debug)]
pub(crate) struct AbortOnDrop<T: Send + 'static> {
    abort: Option<Abort>,
    registry: UploadRegistry,
    id: u64,
    /// The part tasks of this upload.
    pub(crate) tasks: JoinSet<T>,
}

#[derive(Clone, Debug)]
pub(crate) struct Abort {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    retry: RetryPolicy,
    /// Shared by every clone: the drop guard's thread and
    /// [`UploadRegistry::abort_all`] may both try; one request is sent and both
    /// see its outcome (a second abort of a gone upload is `NoSuchUpload` on S3,
    /// but some servers answer 500).
    outcome: Arc<tokio::sync::OnceCell<bool>>,
}

impl Abort {
    pub(crate) fn new(
        client: Client,
        bucket: &str,
        key: &str,
        upload_id: &str,
        retry: RetryPolicy,
    ) -> Self {
        Abort {
            client,
            bucket: bucket.to_string(),
            key: key.to_string(),
            upload_id: upload_id.to_string(),
            retry,
            outcome: Arc::default(),
        }
    }

    /// Aborts once for all clones (see `outcome`); `true` once the upload is gone.
    pub(crate) async fn send(&self, registry: &UploadRegistry) -> bool {
        *self.outcome.get_or_init(|| self.send_once(registry)).await
    }

    /// Sends AbortMultipartUpload with retries; `true` once the upload is gone
    /// (aborted now, or `NoSuchUpload`: aborted or completed already). Counts and
    /// logs the outcome.
    async fn send_once(&self, registry: &UploadRegistry) -> bool {
        let counters = TransferCounters::default();
        let (bucket, key) = (self.bucket.as_str(), self.key.as_str());
        let result = with_retries(&self.retry, &counters, || async {
            let send = (self.client.abort_multipart_upload())
                .bucket(bucket)
                .key(key)
                .upload_id(&self.upload_id)
                .send();
            let call =
                Call::new("AbortMultipartUpload", bucket, Some(key)).upload_id(&self.upload_id);
            traced(call, send).await.map_err(|e| {
                S3ServiceError::from_sdk(S3Operation::AbortMultipartUpload, bucket, Some(key), e)
            })
        })
        .await;
        match result {
            Ok(_) => {
                registry.inner.aborted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    bucket,
                    key,
                    upload_id = self.upload_id,
                    "multipart upload aborted"
                );
                true
            }
            Err(error) if error.kind() == &S3ErrorKind::NotFound => {
                tracing::debug!(
                    bucket,
                    key,
                    upload_id = self.upload_id,
                    "multipart upload already gone"
                );
                true
            }
            Err(error) => {
                registry
                    .inner
                    .abort_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    bucket,
                    key,
                    upload_id = self.upload_id,
                    error = %error,
                    "aborting the multipart upload failed; its parts stay until a sweep or a lifecycle rule removes them"
                );
                false
            }
        }
    }
}

impl<T: Send + 'static> AbortOnDrop<T> {
    pub(crate) fn new(
        client: Client,
        bucket: &str,
        key: &str,
        upload_id: &str,
        retry: RetryPolicy,
        registry: &UploadRegistry,
    ) -> Self {
        let abort = Abort::new(client, bucket, key, upload_id, retry);
        let id = registry.register(abort.clone());
        AbortOnDrop {
            abort: Some(abort),
            registry: registry.clone(),
            id,
            tasks: JoinSet::new(),
        }
    }

    /// The upload completed: nothing to abort.
    pub(crate) fn disarm(&mut self) {
        self.abort = None;
        self.registry.remove(self.id);
    }

    /// Stops the part tasks, then aborts and waits for the answer. Stays armed until
    /// the abort has been answered, so dropping this future midway still aborts.
    pub(crate) async fn abort_now(&mut self) {
        self.tasks.shutdown().await;
        if let Some(abort) = &self.abort {
            abort.send(&self.registry).await;
        }
        self.abort = None;
        self.registry.remove(self.id);
    }
}

impl<T: Send + 'static> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        let Some(abort) = self.abort.take() else {
            return;
        };
        tracing::warn!(
            bucket = abort.bucket,
            key = abort.key,
            upload_id = abort.upload_id,
            "multipart transfer dropped before completing; aborting it"
        );
        let mut tasks = std::mem::take(&mut self.tasks);
        let registry = self.registry.clone();
        let id = self.id;
        // Its own thread and runtime: the caller's runtime may be shutting down
        // (then it drops whatever is spawned on it) or absent.
        let spawned = std::thread::Builder::new()
            .name("keel-s3-abort".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        registry.inner.abort_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %error, upload_id = abort.upload_id, "no runtime to abort the multipart upload");
                        return;
                    }
                };
                runtime.block_on(async {
                    // Part tasks first, so no part lands after the abort.
                    tasks.shutdown().await;
                    if abort.send(&registry).await {
                        registry.remove(id);
                    }
                });
            });
        if let Err(error) = spawned {
            self.registry
                .inner
                .abort_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %error, "no thread to abort the multipart upload");
        }
    }
}
