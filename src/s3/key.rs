//! S3 key (being written).
