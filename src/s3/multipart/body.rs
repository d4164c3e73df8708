//! The reader that cuts an upload body ([`UploadBody`] or a [`BodyStream`] of known
//! or unknown length) into parts, reading only when asked.

use std::fmt;
use std::io;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures::stream::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::s3::upload::{BodySource, BodyStream, UploadBody};

enum Source {
    Done,
    Reader(Pin<Box<dyn AsyncRead + Send>>),
    Stream(BodyStream),
}

/// Cuts a body into parts, reading only when asked.
pub(crate) struct PartReader {
    /// Bytes read (or given) but not handed out yet; handed out first.
    pending: Bytes,
    source: Source,
    length: Option<u64>,
    read: u64,
    finished: bool,
}

impl fmt::Debug for PartReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartReader")
            .field("pending", &self.pending.len())
            .field("length", &self.length)
            .field("read", &self.read)
            .field("finished", &self.finished)
            .finish()
    }
}

impl PartReader {
    /// Opens `body`: bytes are handed out as slices, a file is read part by part
    /// (its length taken now), a stream has an unknown length.
    pub(crate) async fn open(body: UploadBody) -> io::Result<PartReader> {
        Ok(match body.source {
            BodySource::Bytes(bytes) => {
                let length = bytes.len() as u64;
                PartReader::new(bytes, Source::Done, Some(length))
            }
            BodySource::File(path) => {
                let file = tokio::fs::File::open(&path).await?;
                let length = file.metadata().await?.len();
                PartReader::new(Bytes::new(), Source::Reader(Box::pin(file)), Some(length))
            }
            BodySource::Stream(stream) => PartReader::from_stream(stream, None),
        })
    }

    /// A reader over a stream of chunks whose total length is `length`, when known.
    pub(crate) fn from_stream(stream: BodyStream, length: Option<u64>) -> PartReader {
        PartReader::new(Bytes::new(), Source::Stream(stream), length)
    }

    fn new(pending: Bytes, source: Source, length: Option<u64>) -> PartReader {
        PartReader {
            pending,
            source,
            length,
            read: 0,
            finished: false,
        }
    }

    /// The announced length, when known.
    pub(crate) fn length(&self) -> Option<u64> {
        self.length
    }

    /// Bytes handed out so far.
    pub(crate) fn bytes_read(&self) -> u64 {
        self.read
    }

    /// Whether the body has ended (a read returned less than asked).
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// Gives back the part just read, to be handed out again before anything else.
    pub(crate) fn unread(&mut self, part: Bytes) {
        self.read -= part.len() as u64;
        self.finished = false;
        self.pending = if self.pending.is_empty() {
            part
        } else {
            let mut joined = BytesMut::with_capacity(part.len() + self.pending.len());
            joined.extend_from_slice(&part);
            joined.extend_from_slice(&self.pending);
            joined.freeze()
        };
    }

    /// Reads up to `size` bytes: exactly `size` unless the body ends first. An empty
    /// result means the body has ended. Bytes in memory are handed out without
    /// copying.
    pub(crate) async fn next_part(&mut self, size: usize) -> io::Result<Bytes> {
        if self.finished {
            return Ok(Bytes::new());
        }
        let part = if self.pending.len() >= size {
            self.pending.split_to(size)
        } else if matches!(self.source, Source::Done) {
            std::mem::take(&mut self.pending)
        } else {
            let mut buffer = BytesMut::with_capacity(size);
            buffer.extend_from_slice(&std::mem::take(&mut self.pending));
            self.fill(&mut buffer, size).await?;
            buffer.freeze()
        };
        self.read += part.len() as u64;
        if part.len() < size {
            self.finished = true;
        }
        Ok(part)
    }

    /// Reads from the source into `buffer` until it holds `size` bytes or the source
    /// ends; a chunk that runs past `size` leaves its tail pending.
    async fn fill(&mut self, buffer: &mut BytesMut, size: usize) -> io::Result<()> {
        match &mut self.source {
            Source::Done => {}
            Source::Reader(reader) => {
                while buffer.len() < size {
                    let mut limited = reader.as_mut().take((size - buffer.len()) as u64);
                    if limited.read_buf(buffer).await? == 0 {
                        self.source = Source::Done;
                        break;
                    }
                }
            }
            Source::Stream(stream) => {
                while buffer.len() < size {
                    let Some(chunk) = stream.next().await.transpose()? else {
                        self.source = Source::Done;
                        break;
                    };
                    let wanted = size - buffer.len();
                    if chunk.len() > wanted {
                        buffer.extend_from_slice(&chunk[..wanted]);
                        self.pending = chunk.slice(wanted..);
                    } else {
                        buffer.extend_from_slice(&chunk);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parts_of(body: UploadBody, size: usize) -> Vec<usize> {
        let mut reader = PartReader::open(body).await.unwrap();
        let mut sizes = Vec::new();
        loop {
            let part = reader.next_part(size).await.unwrap();
            if part.is_empty() {
                break;
            }
            sizes.push(part.len());
            if reader.is_finished() {
                break;
            }
        }
        sizes
    }

    #[tokio::test]
    async fn bytes_are_cut_into_slices() {
        let body = UploadBody::from(vec![7u8; 25]);
        assert_eq!(parts_of(body, 10).await, vec![10, 10, 5]);
    }

    #[tokio::test]
    async fn streams_are_regrouped_across_chunk_boundaries() {
        let chunks: Vec<io::Result<Bytes>> =
            (0..7u8).map(|i| Ok(Bytes::from(vec![i; 4]))).collect();
        let body = UploadBody::stream(futures::stream::iter(chunks));
        let mut reader = PartReader::open(body).await.unwrap();
        let first = reader.next_part(10).await.unwrap();
        assert_eq!(&first[..], &[0, 0, 0, 0, 1, 1, 1, 1, 2, 2]);
        let second = reader.next_part(10).await.unwrap();
        assert_eq!(&second[..], &[2, 2, 3, 3, 3, 3, 4, 4, 4, 4]);
        let third = reader.next_part(10).await.unwrap();
        assert_eq!(&third[..], &[5, 5, 5, 5, 6, 6, 6, 6]);
        assert!(reader.is_finished());
        assert_eq!(reader.bytes_read(), 28);
    }

    #[tokio::test]
    async fn an_unread_part_is_handed_out_again() {
        let chunks: Vec<io::Result<Bytes>> =
            (0..5u8).map(|i| Ok(Bytes::from(vec![i; 4]))).collect();
        let mut reader = PartReader::from_stream(futures::stream::iter(chunks).boxed(), None);
        let probe = reader.next_part(6).await.unwrap();
        reader.unread(probe);
        assert_eq!(reader.bytes_read(), 0);
        assert_eq!(&reader.next_part(3).await.unwrap()[..], &[0, 0, 0]);
        assert_eq!(
            &reader.next_part(8).await.unwrap()[..],
            &[0, 1, 1, 1, 1, 2, 2, 2]
        );
        assert_eq!(reader.next_part(100).await.unwrap().len(), 9);
        assert!(reader.is_finished());
    }

    #[tokio::test]
    async fn files_fill_whole_parts() {
        let (mut writer, reader) = tokio::io::duplex(3);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            writer.write_all(&[1u8; 23]).await.unwrap();
        });
        assert_eq!(
            parts_of(UploadBody::reader(reader), 10).await,
            vec![10, 10, 3]
        );
    }

    #[tokio::test]
    async fn an_exact_multiple_ends_with_an_empty_read() {
        let body = UploadBody::from(vec![1u8; 20]);
        let mut reader = PartReader::open(body).await.unwrap();
        assert_eq!(reader.next_part(10).await.unwrap().len(), 10);
        assert_eq!(reader.next_part(10).await.unwrap().len(), 10);
        assert!(!reader.is_finished());
        assert!(reader.next_part(10).await.unwrap().is_empty());
        assert!(reader.is_finished());
    }
}
