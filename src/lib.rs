//! keel: production-grade Kafka and S3 clients built as a Tower middleware stack.
//!
//! Publishing to Kafka, consuming-and-handling Kafka events and every S3 operation
//! are `tower::Service`s; resilience and observability are the reusable layers of
//! [`layers`] (the `keel-layers` crate), stacked with `tower::ServiceBuilder`.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub use keel_layers as layers;
/// The `tower` crate keel's services and layers implement, re-exported so that
/// `ServiceExt`, `ServiceBuilder` and `Layer` need no dependency of your own.
pub use tower;

pub mod prelude;

#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "prometheus")]
pub mod prometheus;
#[cfg(feature = "s3")]
pub mod s3;

/// The README's code blocks, compiled as doc tests so that the quick start
/// never drifts from the API.
#[cfg(all(doctest, feature = "kafka", feature = "s3"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
