//! Aborts a multipart upload that did not complete, even when its future is dropped.

use aws_sdk_s3::Client;

use super::retry::{RetryPolicy, TransferCounters, with_retries};
use crate::s3::error::{S3Operation, S3ServiceError};

/// Owns the duty to abort one multipart upload (or copy) until it is disarmed.
///
/// [`abort_now`](Self::abort_now) aborts in place (after a failure); dropping the
/// guard while armed (the upload future was dropped) spawns the abort on the current
/// Tokio runtime. Without a runtime nothing can be sent; that is logged.
#[derive(Debug)]
pub(crate) struct AbortOnDrop {
    abort: Option<Abort>,
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
    async fn send(self) {
        let counters = TransferCounters::default();
        let result = with_retries(&self.retry, &counters, || async {
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&self.upload_id)
                .send()
                .await
                .map_err(|e| {
                    S3ServiceError::from_sdk(
                        S3Operation::AbortMultipartUpload,
                        &self.bucket,
                        Some(&self.key),
                        e,
                    )
                })
        })
        .await;
        match result {
            Ok(_) => tracing::info!(
                bucket = self.bucket,
                key = self.key,
                upload_id = self.upload_id,
                "multipart upload aborted"
            ),
            Err(error) => tracing::error!(
                bucket = self.bucket,
                key = self.key,
                upload_id = self.upload_id,
                error = %error,
                "aborting the multipart upload failed; its parts stay until a lifecycle rule removes them"
            ),
        }
    }
}

impl AbortOnDrop {
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
        }
    }

    /// The upload completed: nothing to abort.
    pub(crate) fn disarm(&mut self) {
        self.abort = None;
    }

    /// Aborts now and waits for the answer.
    pub(crate) async fn abort_now(&mut self) {
        if let Some(abort) = self.abort.take() {
            abort.send().await;
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(abort) = self.abort.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                tracing::warn!(
                    bucket = abort.bucket,
                    key = abort.key,
                    upload_id = abort.upload_id,
                    "multipart transfer dropped before completing; aborting it"
                );
                runtime.spawn(abort.send());
            }
            Err(_) => tracing::error!(
                bucket = abort.bucket,
                key = abort.key,
                upload_id = abort.upload_id,
                "multipart transfer dropped outside a Tokio runtime; it cannot be aborted"
            ),
        }
    }
}
