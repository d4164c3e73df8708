//! Large-object transfers: concurrent multipart upload, multipart copy, and the
//! retry, progress and clean-up machinery they share.
//!
//! # Why
//!
//! The raw SDK sends one PutObject per object: the whole body in memory, one
//! connection, and a failure near the end costs everything. Transfer libraries
//! (aws-s3-transfer-manager, lib-storage, s3transfer) cut large objects into parts
//! sent concurrently and retried one by one. keel does the same and adds what they
//! leave out or get wrong: bounded memory for bodies of unknown length, progress
//! events, throttling-aware per-part retry, a per-part bound that grows with the
//! part (30 s plus the part at 64 KiB/s) for stalled connections and an idle
//! timeout on download bodies, a lost CompleteMultipartUpload answer confirmed by
//! the object rather than reported as a failure, and a multipart upload that is
//! never left behind (it is billed storage nobody sees): aborted on every
//! failure, when the upload future is dropped (even by a runtime shutting down),
//! by a shutdown path ([`UploadRegistry::abort_all`],
//! [`S3::abort_in_flight_uploads`](crate::s3::S3::abort_in_flight_uploads)),
//! after a retried CreateMultipartUpload whose first answer was lost, and by a
//! sweeper for what other processes left ([`MultipartEngine::abort_stale_uploads`]).
//!
//! Errors of the caller's body (a stream that fails, runs short or long) are
//! [`S3ErrorKind::Body`](crate::s3::error::S3ErrorKind::Body): never retried,
//! never counted by the circuit breaker.
//!
//! - [`MultipartEngine`]: one PutObject below the threshold (5 MiB), multipart
//!   above, `parts_in_flight` parts at a time (4), part size growing to stay within
//!   10,000 parts ([`plan`]).
//! - [`MultipartCopier`]: CopyObject below 5 GiB, UploadPartCopy ranges above.
//! - Ranged downloads are in [`super::download`] and share [`TransferConfig`],
//!   [`RetryPolicy`], [`TransferProgress`] and [`TransferStats`].
//!
//! # Example
//!
//! ```no_run
//! use keel::s3::multipart::{MultipartEngine, ProgressListener, RetryPolicy, TransferConfig};
//! use keel::s3::upload::{UploadBody, UploadOptions};
//!
//! # async fn run(client: aws_sdk_s3::Client) -> Result<(), keel::s3::error::S3ServiceError> {
//! let engine = MultipartEngine::new(
//!     client,
//!     TransferConfig::default()
//!         .part_size(8 * 1024 * 1024)
//!         .parts_in_flight(4)
//!         .retry(RetryPolicy::default().max_retries(3)),
//! );
//! let progress = ProgressListener::callback(|p| {
//!     println!("{} of {:?} bytes (part {})", p.bytes, p.total, p.part_number)
//! });
//! let options = UploadOptions::new().content_type("application/octet-stream");
//! let receipt = engine
//!     .upload("bucket", "backups/db.dump", UploadBody::file("db.dump"), &options, &progress)
//!     .await?;
//! println!("{} parts, {} retries", receipt.parts, receipt.stats.retries);
//! # Ok(()) }
//! ```

mod body;
mod copy;
mod guard;
pub mod plan;
mod progress;
mod retry;
mod upload;

pub use copy::{CopyConfig, CopyReceipt, MultipartCopier};
pub use guard::{AbortReport, InFlightUpload, UploadRegistry};
pub use progress::{ProgressListener, TransferProgress};
pub use retry::{RetryPolicy, TransferCounters, TransferStats};
pub use upload::{
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MIN_THROUGHPUT, DEFAULT_PART_TIMEOUT, MultipartEngine,
    TransferConfig, UploadReceipt,
};

pub(crate) use retry::{sdk_error, with_retries};
pub(crate) use upload::missing;
