//! S3 service (being written).
