//! S3 config (being written).
