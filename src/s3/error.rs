//! S3 error (being written).
