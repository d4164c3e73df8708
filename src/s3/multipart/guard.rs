//! Aborts a multipart upload that did not complete, even when its future is dropped.

use aws_sdk_s3::Client;
use tokio::task::JoinSet;

use super::retry::{RetryPolicy, TransferCounters, with_retries};
use crate::s3::error::{S3Operation, S3ServiceError};

/// Owns the duty to abort one multipart upload (or copy) until it is disarmed, and
/// the part tasks that upload into it.
///
/// [`abort_now`](Self::abort_now) stops the part tasks, waits for them, then aborts
/// (after a failure). Dropping the guard while armed (the upload future was
/// dropped) spawns the same on the current Tokio runtime: part tasks first, so no
/// part lands after the abort, then AbortMultipartUpload. Without a runtime nothing
/// can be sent; that is logged.
#[derive(Debug)]
pub(crate) struct AbortOnDrop<T: Send + 'static> {
    abort: Option<Abort>,
    /// The part tasks of this upload.
    pub(crate) tasks: JoinSet<T>,
}

#[derive(Debug)]
struct Abort {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    retry: RetryPolicy,
}

impl Abort {
    async fn send(&self) {
        let counters = TransferCounters::default();
        let (bucket, key) = (self.bucket.as_str(), self.key.as_str());
        let result = with_retries(&self.retry, &counters, || async {
            self.client
                .abort_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(&self.upload_id)
                .send()
                .await
                .map_err(|e| {
                    S3ServiceError::from_sdk(
                        S3Operation::AbortMultipartUpload,
                        bucket,
                        Some(key),
                        e,
                    )
                })
        })
        .await;
        match result {
            Ok(_) => tracing::info!(
                bucket,
                key,
                upload_id = self.upload_id,
                "multipart upload aborted"
            ),
            Err(error) => tracing::error!(
                bucket,
                key,
                upload_id = self.upload_id,
                error = %error,
                "aborting the multipart upload failed; its parts stay until a lifecycle rule removes them"
            ),
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
    ) -> Self {
        AbortOnDrop {
            abort: Some(Abort {
                client,
                bucket: bucket.to_string(),
                key: key.to_string(),
                upload_id: upload_id.to_string(),
                retry,
            }),
            tasks: JoinSet::new(),
        }
    }

    /// The upload completed: nothing to abort.
    pub(crate) fn disarm(&mut self) {
        self.abort = None;
    }

    /// Stops the part tasks, then aborts and waits for the answer. Stays armed until
    /// the abort has been answered, so dropping this future midway still aborts.
    pub(crate) async fn abort_now(&mut self) {
        self.tasks.shutdown().await;
        if let Some(abort) = &self.abort {
            abort.send().await;
        }
        self.abort = None;
    }
}

impl<T: Send + 'static> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        let Some(abort) = self.abort.take() else {
            return;
        };
        let (bucket, key, upload_id) = (&abort.bucket, &abort.key, &abort.upload_id);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                tracing::warn!(
                    bucket,
                    key,
                    upload_id,
                    "multipart transfer dropped before completing; aborting it"
                );
                let mut tasks = std::mem::take(&mut self.tasks);
                runtime.spawn(async move {
                    tasks.shutdown().await;
                    abort.send().await;
                });
            }
            Err(_) => tracing::error!(
                bucket,
                key,
                upload_id,
                "multipart transfer dropped outside a Tokio runtime; it cannot be aborted"
            ),
        }
    }
}
