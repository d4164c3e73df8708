//! What a user of keel's services needs in scope: `use keel::prelude::*;`.
//!
//! Tower's [`Service`], [`ServiceExt`] (`oneshot`, `ready`, `map_err`...),
//! [`ServiceBuilder`] and [`Layer`]; keel-layers' [`ServiceBuilderExt`] (one
//! `ServiceBuilder` method per keel layer); and the facades with their most used
//! types.
//!
//! ```
//! use keel::prelude::*;
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let service = ServiceBuilder::new()
//!     .keel_timeout(Duration::from_secs(1))
//!     .service_fn(|n: u32| async move { Ok::<_, std::io::Error>(n + 1) });
//! assert_eq!(service.oneshot(1).await?, 2);
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
//! ```

pub use keel_layers::ServiceBuilderExt;
pub use tower::{Layer, Service, ServiceBuilder, ServiceExt};

#[cfg(feature = "kafka")]
pub use crate::kafka::consumer::decode::Decoder;
#[cfg(feature = "kafka")]
pub use crate::kafka::consumer::{BoxError, HandlerError, Record};
#[cfg(feature = "kafka")]
pub use crate::kafka::{EventEnvelope, Kafka, KafkaConfig};
#[cfg(feature = "s3")]
pub use crate::s3::{S3, UploadOptions};
