//! S3 presign (being written).
