//! S3: every operation as a Tower service, with multipart uploads that clean up.
//!
//! - [`config`]: [`S3Config`] from the environment or a builder.
//! - [`client`]: [`S3Client`], the configured aws-sdk-s3 client, health, shutdown.
//! - [`key`]: [`ObjectKey`], checked before any request.
//! - [`error`]: [`S3ServiceError`], classified for keel's layers.
//! - [`service`]: [`S3Service`], every operation as one `tower::Service<S3Request>`.
//! - [`facade`]: [`S3`], the typed facade over the layered stack.
//! - [`upload`], [`presign`], [`metrics`]: what uploads take and give, presigned
//!   URLs, counters.
//! - [`multipart`], [`download`]: the multipart upload engine and concurrent ranged
//!   downloads.
//! - `otel` (feature `otel`): every S3 call in a CLIENT span `S3.<Call>` with the
//!   semantic conventions' `rpc.*` and `aws.s3.*` attributes.

pub mod client;
pub mod config;
pub mod download;
pub mod error;
pub mod facade;
pub mod key;
pub mod metrics;
pub mod multipart;
pub(crate) mod otel;
pub mod presign;
pub mod service;
pub mod upload;

pub use client::S3Client;
pub use config::S3Config;
pub use error::{S3ErrorKind, S3Operation, S3ServiceError};
pub use facade::S3;
pub use key::{KeyPolicy, ObjectKey};
pub use service::{S3Request, S3Response, S3Service};
pub use upload::{UploadBody, UploadOptions, UploadOutput};
