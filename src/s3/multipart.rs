//! S3 multipart (being written).
