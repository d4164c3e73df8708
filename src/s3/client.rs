//! S3 client (being written).
