//! keel's fuzz targets' bodies; see `checks.rs`.

mod checks;

/// The gateway example's request bodies, compiled from its own source.
#[path = "../../examples/gateway/body.rs"]
pub mod body;

pub use checks::*;
