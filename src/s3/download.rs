//! Downloads: one GET for small objects, concurrent ranged GETs for large ones,
//! delivered in order to a file, an `AsyncWrite`, or as a stream of chunks.
//!
//! # Why
//!
//! One GET of a large object is one connection and one point of failure: a cut
//! connection at 90 % restarts from zero. A ranged download asks HEAD for the size
//! and ETag, then fetches `part_size` ranges, `parts_in_flight` at a time (the same
//! [`TransferConfig`] as uploads), retries each range on its own, and delivers them
//! in order. Memory is bounded: at most `parts_in_flight` ranges are held, so about
//! `part_size x parts_in_flight` bytes, whatever the object's size. Every range is
//! fetched with `If-Match` on the ETag seen by HEAD, so an object overwritten during
//! the download fails it rather than mixing two versions.
//!
//! # A bad server cannot hang it or fill memory
//!
//! - Every body is read with an idle timeout ([`TransferConfig::idle_timeout`],
//!   30 s): a body that stops sending fails the range with
//!   [`S3ErrorKind::Timeout`] (retried), whatever the object's size, instead of
//!   hanging for ever. Slow is fine; silent is not.
//! - A range is read up to the length asked for and no further: a server that
//!   ignores `Range` and sends the whole object fails the download with
//!   [`S3ErrorKind::InvalidResponse`] after at most one part (plus one network
//!   chunk) per range in flight, instead of buffering the object once per range.
//! - A size from HEAD above [`MAX_OBJECT_SIZE`] (5 TiB, S3's limit) is refused
//!   before any range is planned.
//!
//! # Example
//!
//! ```no_run
//! use keel::s3::download::RangedDownloader;
//! use keel::s3::multipart::{ProgressListener, TransferConfig};
//!
//! # async fn run(client: aws_sdk_s3::Client) -> Result<(), keel::s3::error::S3ServiceError> {
//! let downloader = RangedDownloader::new(client, TransferConfig::default().parts_in_flight(8));
//! let receipt = downloader
//!     .download_to_file("bucket", "backups/db.dump", "db.dump", &ProgressListener::none())
//!     .await?;
//! println!("{} bytes in {} ranges", receipt.size, receipt.parts);
//! # Ok(()) }
//! ```

use crate::s3::otel::{Call, traced};
use std::path::Path;
use std::sync::Arc;

use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::TryFutureExt;
use futures::stream::{self, BoxStream, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::error::{S3ErrorKind, S3Operation, S3ServiceError};
use super::multipart::{
    ProgressListener, RetryPolicy, TransferConfig, TransferCounters, TransferProgress,
    TransferStats, missing, sdk_error, with_retries,
};

/// The largest object S3 stores (5 TiB); a larger size from HEAD is an invalid
/// answer.
pub const MAX_OBJECT_SIZE: u64 = 5 * 1024 * 1024 * 1024 * 1024;

/// What HEAD said about the object being downloaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The bucket.
    pub bucket: String,
    /// The key.
    pub key: String,
    /// The object's size in bytes.
    pub size: u64,
    /// The object's ETag (every range is fetched `If-Match` it).
    pub e_tag: Option<String>,
    /// The object's content type.
    pub content_type: Option<String>,
}

/// What a finished download reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownloadReceipt {
    /// The object.
    pub object: ObjectInfo,
    /// Bytes written.
    pub size: u64,
    /// Ranges fetched (1 for a single GET).
    pub parts: u32,
    /// Requests, retries, throttling, backoff and the peak of ranges in flight.
    pub stats: TransferStats,
}

/// An ordered stream of the object's bytes; ends early with the first error.
pub type DownloadStream = BoxStream<'static, Result<Bytes, S3ServiceError>>;

/// Downloads objects with concurrent ranged GETs; see the [module docs](self).
///
/// Objects below the config's threshold are fetched with one GET (retried as a
/// whole); larger ones in ranges of the config's part size. Cloning shares the SDK
/// client and copies the config.
#[derive(Clone, Debug)]
pub struct RangedDownloader {
    client: Client,
    config: TransferConfig,
}

impl RangedDownloader {
    /// A downloader over `client` with `config`.
    pub fn new(client: Client, config: TransferConfig) -> Self {
        RangedDownloader { client, config }
    }

    /// HEADs the object and returns its facts and an ordered stream of its bytes.
    /// The stream holds at most `parts_in_flight` ranges; the stream's counters are
    /// in `counters`.
    pub async fn download_stream(
        &self,
        bucket: &str,
        key: &str,
        progress: &ProgressListener,
        counters: &TransferCounters,
    ) -> Result<(ObjectInfo, DownloadStream), S3ServiceError> {
        let info = self.head(bucket, key, counters).await?;
        let ranges = plan_ranges(
            info.size,
            self.config.get_threshold(),
            self.config.get_part_size(),
        );
        let fetcher = Arc::new(RangeFetcher {
            client: self.client.clone(),
            info: info.clone(),
            retry: self.config.get_retry().clone(),
            counters: counters.clone(),
            whole: ranges.len() == 1,
            idle_timeout: self.config.get_idle_timeout(),
        });
        let total = info.size;
        let progress = progress.clone();
        let mut received = 0u64;
        let mut done = 0u32;
        let stream = stream::iter(ranges)
            .map(move |range| {
                let fetcher = Arc::clone(&fetcher);
                async move { fetcher.fetch(range).await }
            })
            .buffered(self.config.get_parts_in_flight())
            .map(move |result| {
                let (number, bytes) = result?;
                received += bytes.len() as u64;
                done += 1;
                progress.emit(TransferProgress {
                    bytes: received,
                    total: Some(total),
                    part_number: number,
                    parts_done: done,
                });
                Ok(bytes)
            })
            .boxed();
        Ok((info, stream))
    }

    /// Downloads the object into `writer`, in order, and flushes it.
    pub async fn download_to_writer<W>(
        &self,
        bucket: &str,
        key: &str,
        writer: &mut W,
        progress: &ProgressListener,
    ) -> Result<DownloadReceipt, S3ServiceError>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let counters = TransferCounters::default();
        let (object, mut chunks) = self
            .download_stream(bucket, key, progress, &counters)
            .await?;
        let write_error = |e| S3ServiceError::io(S3Operation::Download, bucket, key, e);
        let mut size = 0u64;
        let mut parts = 0u32;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            writer.write_all(&chunk).await.map_err(write_error)?;
            size += chunk.len() as u64;
            parts += 1;
        }
        writer.flush().await.map_err(write_error)?;
        Ok(DownloadReceipt {
            object,
            size,
            parts,
            stats: counters.snapshot(),
        })
    }

    /// Downloads the object into the file at `path` (created or truncated, synced
    /// at the end). On failure the partial file is removed.
    pub async fn download_to_file(
        &self,
        bucket: &str,
        key: &str,
        path: impl AsRef<Path>,
        progress: &ProgressListener,
    ) -> Result<DownloadReceipt, S3ServiceError> {
        let path = path.as_ref();
        let file_error = |e| S3ServiceError::io(S3Operation::Download, bucket, key, e);
        let mut file = tokio::fs::File::create(path).await.map_err(file_error)?;
        let result = match self
            .download_to_writer(bucket, key, &mut file, progress)
            .await
        {
            Ok(receipt) => file.sync_all().await.map(|()| receipt).map_err(file_error),
            Err(error) => Err(error),
        };
        if result.is_err() {
            drop(file);
            let _ = tokio::fs::remove_file(path).await;
        }
        result
    }

    async fn head(
        &self,
        bucket: &str,
        key: &str,
        counters: &TransferCounters,
    ) -> Result<ObjectInfo, S3ServiceError> {
        let head = with_retries(self.config.get_retry(), counters, || {
            let send = self.client.head_object().bucket(bucket).key(key).send();
            traced(Call::new("HeadObject", bucket, Some(key)), send).map_err(sdk_error(
                S3Operation::Head,
                bucket,
                key,
            ))
        })
        .await?;
        let size = head
            .content_length()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| missing(S3Operation::Head, bucket, key, "content length"))?;
        if size > MAX_OBJECT_SIZE {
            return Err(S3ServiceError::invalid_response(
                S3Operation::Head,
                bucket,
                key,
                format!("HEAD gave a size of {size} bytes, over S3's limit of {MAX_OBJECT_SIZE}"),
            ));
        }
        Ok(ObjectInfo {
            bucket: bucket.to_string(),
            key: key.to_string(),
            size,
            e_tag: head.e_tag().map(str::to_string),
            content_type: head.content_type().map(str::to_string),
        })
    }
}

/// One range to fetch: its 1-based number and inclusive bounds (`None` for an
/// empty object).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ByteRange {
    number: u32,
    bounds: Option<(u64, u64)>,
}

/// The ranges of an object of `size`: one whole-object GET below `threshold`,
/// `part_size` ranges from it on.
fn plan_ranges(size: u64, threshold: u64, part_size: u64) -> Vec<ByteRange> {
    if size == 0 {
        return vec![ByteRange {
            number: 1,
            bounds: None,
        }];
    }
    if size < threshold {
        return vec![ByteRange {
            number: 1,
            bounds: Some((0, size - 1)),
        }];
    }
    let part_size = part_size.max(1);
    (0..size.div_ceil(part_size))
        .map(|index| ByteRange {
            number: u32::try_from(index + 1).unwrap_or(u32::MAX),
            bounds: Some((index * part_size, ((index + 1) * part_size).min(size) - 1)),
        })
        .collect()
}

/// Fetches ranges of one object; shared by the range futures.
#[derive(Debug)]
struct RangeFetcher {
    client: Client,
    info: ObjectInfo,
    retry: RetryPolicy,
    counters: TransferCounters,
    /// One GET for the whole object: no Range header.
    whole: bool,
    /// The longest wait for the next chunk of a body.
    idle_timeout: std::time::Duration,
}

impl RangeFetcher {
    async fn fetch(&self, range: ByteRange) -> Result<(u32, Bytes), S3ServiceError> {
        let _flight = self.counters.enter_flight();
        let info = &self.info;
        let (bucket, key) = (info.bucket.as_str(), info.key.as_str());
        let operation = S3Operation::Download;
        let broken = |message: String| {
            S3ServiceError::new(operation, S3ErrorKind::Transport)
                .with_bucket(bucket)
                .with_key(key)
                .with_message(message)
        };
        let bytes = with_retries(&self.retry, &self.counters, || async {
            let mut request = self.client.get_object().bucket(bucket).key(key);
            let mut expected = 0;
            if let Some((first, last)) = range.bounds {
                expected = last - first + 1;
                if !self.whole {
                    request = request.range(format!("bytes={first}-{last}"));
                }
            }
            let send = request.set_if_match(info.e_tag.clone()).send();
            let output = traced(Call::new("GetObject", bucket, Some(key)), send)
                .await
                .map_err(sdk_error(operation, bucket, key))?;
            // A server that ignores Range answers with the whole object: refuse
            // it from the header, before reading a byte of it.
            if let Some(length) = output.content_length().and_then(|n| u64::try_from(n).ok())
                && length > expected
            {
                return Err(S3ServiceError::invalid_response(
                    operation,
                    bucket,
                    key,
                    format!("the server announced {length} bytes where {expected} were asked for (is Range ignored?)"),
                ));
            }
            let mut body = output.body;
            let mut buffer = bytes::BytesMut::with_capacity(usize::try_from(expected).unwrap_or(0));
            loop {
                let chunk = match tokio::time::timeout(self.idle_timeout, body.next()).await {
                    Err(_) => {
                        return Err(S3ServiceError::new(operation, S3ErrorKind::Timeout)
                            .with_bucket(bucket)
                            .with_key(key)
                            .with_message(format!(
                                "the body sent nothing for {:?} after {} of {expected} bytes",
                                self.idle_timeout,
                                buffer.len()
                            )));
                    }
                    Ok(None) => break,
                    // A body cut short is a transport failure: retried like a reset.
                    Ok(Some(Err(e))) => {
                        return Err(broken("the response body broke off".to_string()).with_source(e));
                    }
                    Ok(Some(Ok(chunk))) => chunk,
                };
                // Stop at the length asked for: never buffer more than one part.
                if (buffer.len() + chunk.len()) as u64 > expected {
                    return Err(S3ServiceError::invalid_response(
                        operation,
                        bucket,
                        key,
                        format!("the server sent more than the {expected} bytes asked for (is Range ignored?)"),
                    ));
                }
                buffer.extend_from_slice(&chunk);
            }
            let bytes = buffer.freeze();
            if bytes.len() as u64 != expected {
                let message = format!(
                    "{} bytes arrived where {expected} were asked for",
                    bytes.len()
                );
                return Err(broken(message));
            }
            Ok(bytes)
        })
        .await
        .map_err(|error| match error.kind() {
            S3ErrorKind::Service {
                status: Some(412), ..
            } => error.with_message(
                "the object changed during the download (its ETag no longer matches)",
            ),
            _ => error,
        })?;
        Ok((range.number, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_objects_are_one_get_large_ones_ranges() {
        assert_eq!(
            plan_ranges(0, 10, 4),
            vec![ByteRange {
                number: 1,
                bounds: None
            }]
        );
        assert_eq!(
            plan_ranges(9, 10, 4),
            vec![ByteRange {
                number: 1,
                bounds: Some((0, 8))
            }]
        );
        let ranges = plan_ranges(10, 10, 4);
        assert_eq!(
            ranges.iter().map(|r| r.bounds.unwrap()).collect::<Vec<_>>(),
            vec![(0, 3), (4, 7), (8, 9)]
        );
        assert_eq!(ranges[2].number, 3);
    }
}
