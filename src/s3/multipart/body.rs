//! What an upload reads from: bytes, a string, a file, an `AsyncRead` or a stream of
//! byte chunks, of known or unknown length; and the reader that cuts it into parts.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The body of an upload.
///
/// Only [`UploadBody::Bytes`] is held in memory whole; files, readers and streams are
/// read one part at a time, when a part slot is free, so memory stays near part size
/// x parts in flight whatever the object's size.
pub enum UploadBody {
    /// Bytes already in memory; parts are zero-copy slices of them.
    Bytes(Bytes),
    /// A file, read part by part; its length is taken when the upload starts.
    File(PathBuf),
    /// Any `AsyncRead`, with its length when known.
    Reader {
        /// The reader.
        reader: Pin<Box<dyn AsyncRead + Send>>,
        /// Its length, when known (used to size parts and checked at the end).
        length: Option<u64>,
    },
    /// A stream of byte chunks of any sizes, with the total length when known.
    Stream {
        /// The chunks.
        stream: BoxStream<'static, io::Result<Bytes>>,
        /// The total length, when known.
        length: Option<u64>,
    },
}

impl fmt::Debug for UploadBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UploadBody::Bytes(bytes) => f.debug_tuple("Bytes").field(&bytes.len()).finish(),
            UploadBody::File(path) => f.debug_tuple("File").field(path).finish(),
            UploadBody::Reader { length, .. } => {
                f.debug_struct("Reader").field("length", length).finish()
            }
            UploadBody::Stream { length, .. } => {
                f.debug_struct("Stream").field("length", length).finish()
            }
        }
    }
}

impl UploadBody {
    /// A body from a file path.
    pub fn file(path: impl AsRef<Path>) -> Self {
        UploadBody::File(path.as_ref().to_path_buf())
    }

    /// A body from an `AsyncRead` of unknown length.
    pub fn reader(reader: impl AsyncRead + Send + 'static) -> Self {
        UploadBody::Reader {
            reader: Box::pin(reader),
            length: None,
        }
    }

    /// A body from an `AsyncRead` of known length.
    pub fn reader_with_length(reader: impl AsyncRead + Send + 'static, length: u64) -> Self {
        UploadBody::Reader {
            reader: Box::pin(reader),
            length: Some(length),
        }
    }

    /// A body from a stream of chunks of unknown total length.
    pub fn stream<S>(stream: S) -> Self
    where
        S: Stream<Item = io::Result<Bytes>> + Send + 'static,
    {
        UploadBody::Stream {
            stream: stream.boxed(),
            length: None,
        }
    }

    /// A body from a stream of chunks of known total length.
    pub fn stream_with_length<S>(stream: S, length: u64) -> Self
    where
        S: Stream<Item = io::Result<Bytes>> + Send + 'static,
    {
        UploadBody::Stream {
            stream: stream.boxed(),
            length: Some(length),
        }
    }

    /// Opens the body for reading: the reader and the length when known.
    pub(crate) async fn open(self) -> io::Result<PartReader> {
        let (pending, source, length) = match self {
            UploadBody::Bytes(bytes) => {
                let length = bytes.len() as u64;
                (bytes, Source::Done, Some(length))
            }
            UploadBody::File(path) => {
                let file = tokio::fs::File::open(&path).await?;
                let length = file.metadata().await?.len();
                (Bytes::new(), Source::Reader(Box::pin(file)), Some(length))
            }
            UploadBody::Reader { reader, length } => (Bytes::new(), Source::Reader(reader), length),
            UploadBody::Stream { stream, length } => (Bytes::new(), Source::Stream(stream), length),
        };
        Ok(PartReader {
            pending,
            source,
            length,
            read: 0,
            finished: false,
        })
    }

    /// The length of the body when it is known without reading it (files excepted).
    pub fn known_length(&self) -> Option<u64> {
        match self {
            UploadBody::Bytes(bytes) => Some(bytes.len() as u64),
            UploadBody::File(_) => None,
            UploadBody::Reader { length, .. } | UploadBody::Stream { length, .. } => *length,
        }
    }
}

impl From<Bytes> for UploadBody {
    fn from(bytes: Bytes) -> Self {
        UploadBody::Bytes(bytes)
    }
}

impl From<Vec<u8>> for UploadBody {
    fn from(bytes: Vec<u8>) -> Self {
        UploadBody::Bytes(bytes.into())
    }
}

impl From<&'static [u8]> for UploadBody {
    fn from(bytes: &'static [u8]) -> Self {
        UploadBody::Bytes(Bytes::from_static(bytes))
    }
}

impl From<String> for UploadBody {
    fn from(text: String) -> Self {
        UploadBody::Bytes(text.into())
    }
}

impl From<&'static str> for UploadBody {
    fn from(text: &'static str) -> Self {
        UploadBody::Bytes(Bytes::from_static(text.as_bytes()))
    }
}

enum Source {
    Done,
    Reader(Pin<Box<dyn AsyncRead + Send>>),
    Stream(BoxStream<'static, io::Result<Bytes>>),
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
        let mut reader = body.open().await.unwrap();
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
        let mut reader = body.open().await.unwrap();
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
        let mut reader = UploadBody::stream(futures::stream::iter(chunks))
            .open()
            .await
            .unwrap();
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
    async fn readers_fill_whole_parts() {
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
        let mut reader = body.open().await.unwrap();
        assert_eq!(reader.next_part(10).await.unwrap().len(), 10);
        assert_eq!(reader.next_part(10).await.unwrap().len(), 10);
        assert!(!reader.is_finished());
        assert!(reader.next_part(10).await.unwrap().is_empty());
        assert!(reader.is_finished());
    }
}
