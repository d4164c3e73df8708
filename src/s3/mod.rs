//! S3: every operation as a Tower service, with multipart uploads that clean up.

pub mod client;
pub mod config;
pub mod download;
pub mod error;
pub mod key;
pub mod multipart;
pub mod presign;
pub mod service;
pub mod upload;
