//! keel-layers: composable [Tower](https://docs.rs/tower) layers for production services.
//!
//! Every layer here is generic over any `tower::Service` — the request, response and
//! error types are the caller's — so the same circuit breaker, retry, timeout,
//! metrics, batch-size and logging layers wrap keel's Kafka and S3 services, an axum
//! `Router` or a tonic server alike. What counts as a failure is decided by a
//! [`classify::Classify`], not hard-wired to `Err`.
//!
//! This crate has no Kafka or AWS dependency; `keel` re-exports it as `keel::layers`.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod batch;
pub mod builder;
pub mod circuit_breaker;
pub mod classify;
mod constructors;
pub mod logging;
pub mod metrics;
pub mod retry;
pub mod timeout;

pub use builder::ServiceBuilderExt;
