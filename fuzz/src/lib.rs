//! keel's fuzz targets' bodies; see `checks.rs`.

mod checks;

pub use checks::*;
