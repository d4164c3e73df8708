//! S3 download (being written).
