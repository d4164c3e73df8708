//! What a handler receives: the decoded envelope plus the Kafka message it came in.

use crate::kafka::envelope::EventEnvelope;
use bytes::Bytes;
use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use std::fmt;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

pub use rdkafka::message::Timestamp;

/// A fetched Kafka message, copied out of librdkafka's buffers: raw key, payload,
/// headers and where it came from. This is what the dead-letter queue republishes,
/// unchanged.
///
/// The messages of one poll cycle are copied into one shared buffer (one
/// allocation per batch, not several per message); cloning a message is cheap
/// (reference counts) and keeps that buffer alive, so a handler that stores
/// messages for long keeps their whole batch (at most 64 messages) in memory.
#[derive(Clone, Debug)]
pub struct ReceivedMessage {
    topic: Arc<str>,
    /// This message's part of its batch's buffer; `spans` index it.
    data: Bytes,
    spans: MessageSpans,
}

impl ReceivedMessage {
    /// Copies an owned message (tests, replays).
    pub fn new(message: OwnedMessage) -> Self {
        let mut buffer = CopyBuffer::with_capacity(0);
        let spans = buffer.copy(&message);
        ReceivedMessage::from_spans(&buffer.freeze(), message.topic().into(), spans)
    }

    /// The message described by `spans`, reading its bytes from `data` (the frozen
    /// [`CopyBuffer`] it was copied into).
    pub(crate) fn from_spans(data: &Bytes, topic: Arc<str>, copied: CopiedSpans) -> Self {
        ReceivedMessage {
            topic,
            data: data.slice(copied.within),
            spans: copied.spans,
        }
    }

    /// Topic the message was fetched from.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// Partition the message was fetched from.
    pub fn partition(&self) -> i32 {
        self.spans.partition
    }
    /// Offset of the message in its partition.
    pub fn offset(&self) -> i64 {
        self.spans.offset
    }
    /// Raw key.
    pub fn key(&self) -> Option<&[u8]> {
        Some(&self.data[self.spans.key.clone()?])
    }
    /// Raw payload.
    pub fn payload(&self) -> Option<&[u8]> {
        Some(&self.data[self.spans.payload.clone()?])
    }
    /// The payload as [`Bytes`] sharing the message's buffer (no copy).
    pub fn payload_bytes(&self) -> Option<Bytes> {
        Some(self.data.slice(self.spans.payload.clone()?))
    }
    /// Whether the message's headers could not be read (a header name that is not
    /// UTF-8). Its [`headers`](Self::headers) are then `None`; the runtime
    /// dead-letters such a message as undecodable (class `decode`), without its
    /// original headers.
    pub fn has_unreadable_headers(&self) -> bool {
        self.spans.unreadable_headers
    }

    /// All headers, in their original order (rdkafka's [`Headers`] trait).
    pub fn headers(&self) -> Option<MessageHeaders<'_>> {
        let (count, range) = self.spans.headers.clone()?;
        Some(MessageHeaders {
            count,
            encoded: &self.data[range],
        })
    }
    /// The value of the last header called `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers()?
            .entries()
            .filter(|h| h.key == name)
            .last()
            .and_then(|h| h.value)
    }
    /// Broker or producer timestamp.
    pub fn timestamp(&self) -> Timestamp {
        self.spans.timestamp
    }
    /// A copy as an rdkafka [`OwnedMessage`] (implements [`rdkafka::Message`]).
    pub fn to_owned_message(&self) -> OwnedMessage {
        let headers = self.headers().map(|hs| {
            hs.iter()
                .fold(OwnedHeaders::new_with_capacity(hs.count()), |acc, h| {
                    acc.insert(h)
                })
        });
        OwnedMessage::new(
            self.payload().map(<[u8]>::to_vec),
            self.key().map(<[u8]>::to_vec),
            self.topic.to_string(),
            self.spans.timestamp,
            self.spans.partition,
            self.spans.offset,
            headers,
        )
    }
}

/// The headers of a [`ReceivedMessage`], in their original order; read them
/// through rdkafka's [`Headers`] trait (`count`, `get`, `iter`).
#[derive(Clone, Copy)]
pub struct MessageHeaders<'a> {
    count: usize,
    /// Per header: name length (u32 LE), name, value length (u32 LE, `u32::MAX`
    /// for no value), value.
    encoded: &'a [u8],
}

impl fmt::Debug for MessageHeaders<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|h| (h.key, h.value.map(<[u8]>::len))))
            .finish()
    }
}

const NO_VALUE: u32 = u32::MAX;

fn take_u32(data: &[u8], at: &mut usize) -> Option<u32> {
    let bytes = data.get(*at..*at + 4)?;
    *at += 4;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn take_bytes<'a>(data: &'a [u8], at: &mut usize, len: usize) -> Option<&'a [u8]> {
    let bytes = data.get(*at..*at + len)?;
    *at += len;
    Some(bytes)
}

impl<'a> MessageHeaders<'a> {
    /// The headers in order, borrowing the message (not this view).
    pub fn entries(self) -> impl Iterator<Item = Header<'a, &'a [u8]>> {
        let data = self.encoded;
        let mut at = 0;
        std::iter::from_fn(move || {
            let name_len = take_u32(data, &mut at)? as usize;
            let name = take_bytes(data, &mut at, name_len)?;
            let value = match take_u32(data, &mut at)? {
                NO_VALUE => None,
                len => Some(take_bytes(data, &mut at, len as usize)?),
            };
            // Names were copied from `&str`s, so this always succeeds.
            let key = std::str::from_utf8(name).ok()?;
            Some(Header { key, value })
        })
        .take(self.count)
    }
}

impl Headers for MessageHeaders<'_> {
    fn count(&self) -> usize {
        self.count
    }

    fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
        self.entries().nth(idx)
    }
}

/// A message's metadata and where its parts lie in its bytes.
#[derive(Clone, Debug)]
struct MessageSpans {
    partition: i32,
    offset: i64,
    timestamp: Timestamp,
    /// Ranges from the start of the message's bytes.
    key: Option<Range<usize>>,
    payload: Option<Range<usize>>,
    /// Header count and encoded headers.
    headers: Option<(usize, Range<usize>)>,
    /// A header name was not UTF-8: the headers were dropped and the message is
    /// treated as undecodable.
    unreadable_headers: bool,
}

/// Where one copied message lies in a [`CopyBuffer`].
#[derive(Clone, Debug)]
pub(crate) struct CopiedSpans {
    /// The message's bytes in the buffer.
    within: Range<usize>,
    spans: MessageSpans,
}

/// One buffer the messages of a poll cycle are copied into: a single allocation
/// per batch instead of several per message (and fewer frees on the lane's
/// thread, which are costly for memory allocated on the poll thread).
#[derive(Debug, Default)]
pub(crate) struct CopyBuffer {
    data: Vec<u8>,
}

impl CopyBuffer {
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        CopyBuffer {
            data: Vec::with_capacity(bytes),
        }
    }

    /// Bytes copied so far.
    pub(crate) fn len(&self) -> usize {
        self.data.len()
    }

    /// Appends `bytes`; their range from `base`.
    fn push(&mut self, base: usize, bytes: &[u8]) -> Range<usize> {
        let start = self.data.len();
        self.data.extend_from_slice(bytes);
        start - base..self.data.len() - base
    }

    /// Copies key, payload and headers of `m`; returns where they went.
    pub(crate) fn copy<M: Message>(&mut self, m: &M) -> CopiedSpans {
        let base = self.data.len();
        let key = m.key().map(|k| self.push(base, k));
        let payload = m.payload().map(|p| self.push(base, p));
        let mut unreadable_headers = false;
        let headers = m.headers().and_then(|hs| {
            let start = self.data.len() - base;
            let mut count = 0;
            for i in 0..hs.count() {
                // rdkafka's header accessors unwrap the name as UTF-8 and panic on
                // any other bytes (any producer can write such a name): catch that
                // here, on the poll thread, and let the lane dead-letter the
                // message as undecodable instead of losing the thread.
                let h = match catch_unwind(AssertUnwindSafe(|| hs.try_get(i))) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(_) => {
                        self.data.truncate(base + start);
                        unreadable_headers = true;
                        return None;
                    }
                };
                // Kafka lengths are i32, so they fit a u32 below `NO_VALUE`.
                self.data
                    .extend_from_slice(&(h.key.len() as u32).to_le_bytes());
                self.data.extend_from_slice(h.key.as_bytes());
                match h.value {
                    Some(v) => {
                        self.data.extend_from_slice(&(v.len() as u32).to_le_bytes());
                        self.data.extend_from_slice(v);
                    }
                    None => self.data.extend_from_slice(&NO_VALUE.to_le_bytes()),
                }
                count += 1;
            }
            Some((count, start..self.data.len() - base))
        });
        CopiedSpans {
            within: base..self.data.len(),
            spans: MessageSpans {
                partition: m.partition(),
                offset: m.offset(),
                timestamp: m.timestamp(),
                key,
                payload,
                headers,
                unreadable_headers,
            },
        }
    }

    /// The key of a message copied here (before [`CopyBuffer::freeze`]).
    pub(crate) fn key_of(&self, copied: &CopiedSpans) -> Option<&[u8]> {
        let message = &self.data[copied.within.clone()];
        copied.spans.key.clone().map(|r| &message[r])
    }

    /// The shared, immutable buffer the copied messages are read from.
    pub(crate) fn freeze(self) -> Bytes {
        Bytes::from(self.data)
    }
}

#[derive(Debug)]
struct EventInner {
    /// `None`: a record that is not a keel envelope, delivered by a consumer
    /// that does not require one (see `record.rs`).
    envelope: Option<EventEnvelope>,
    message: ReceivedMessage,
    attempts: AtomicU32,
}

/// The request of a handler service: a decoded event envelope and the message
/// context (topic, partition, offset, key, headers, timestamp).
///
/// Cloning is cheap (one `Arc`); clones share the count of attempts made so far,
/// which the retry layer increments and the dead-letter layer reports.
#[derive(Clone, Debug)]
pub struct ConsumedEvent {
    inner: Arc<EventInner>,
}

impl ConsumedEvent {
    /// An event for the given message (attempt 1).
    pub fn new(envelope: EventEnvelope, message: ReceivedMessage) -> Self {
        ConsumedEvent {
            inner: Arc::new(EventInner {
                envelope: Some(envelope),
                message,
                attempts: AtomicU32::new(0),
            }),
        }
    }

    /// A record without a keel envelope (a foreign producer's), attempt 1.
    pub fn from_record(message: ReceivedMessage) -> Self {
        ConsumedEvent {
            inner: Arc::new(EventInner {
                envelope: None,
                message,
                attempts: AtomicU32::new(0),
            }),
        }
    }

    /// The decoded envelope.
    ///
    /// A consumer that does not require envelopes
    /// ([`require_envelope(false)`](super::KafkaConsumerBuilder::require_envelope),
    /// as the [`Kafka`](crate::kafka::Kafka) facade does) also delivers records
    /// that are not one; for those this is an empty envelope (event type `""`,
    /// payload `null`, nil id): tell them apart with
    /// [`try_envelope`](Self::try_envelope).
    pub fn envelope(&self) -> &EventEnvelope {
        self.inner
            .envelope
            .as_ref()
            .unwrap_or_else(|| super::record::empty_envelope())
    }
    /// The decoded envelope, `None` for a record that is not a keel envelope.
    pub fn try_envelope(&self) -> Option<&EventEnvelope> {
        self.inner.envelope.as_ref()
    }
    /// The event type the registry routes on (`""` for a record without an
    /// envelope).
    pub fn event_type(&self) -> &str {
        self.inner
            .envelope
            .as_ref()
            .map_or("", EventEnvelope::event_type)
    }
    /// The Kafka message the event came in.
    pub fn message(&self) -> &ReceivedMessage {
        &self.inner.message
    }
    /// Topic of the message.
    pub fn topic(&self) -> &str {
        self.inner.message.topic()
    }
    /// Partition of the message.
    pub fn partition(&self) -> i32 {
        self.inner.message.partition()
    }
    /// Offset of the message.
    pub fn offset(&self) -> i64 {
        self.inner.message.offset()
    }
    /// Raw key of the message.
    pub fn key(&self) -> Option<&[u8]> {
        self.inner.message.key()
    }
    /// Headers of the message.
    pub fn headers(&self) -> Option<MessageHeaders<'_>> {
        self.inner.message.headers()
    }
    /// Timestamp of the message.
    pub fn timestamp(&self) -> Timestamp {
        self.inner.message.timestamp()
    }
    /// How many times the handler was called for this message so far; inside a
    /// handler, the number of the current attempt (1 for the first call, 2 for the
    /// first retry...).
    pub fn attempts_made(&self) -> u32 {
        self.inner.attempts.load(Ordering::Relaxed)
    }

    /// Counts one more handler call; returns the attempt number.
    pub(crate) fn count_attempt(&self) -> u32 {
        self.inner.attempts.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// An event of type `event_type` at `t/0@7`, for unit tests.
#[cfg(test)]
pub(crate) fn test_event(event_type: &str) -> ConsumedEvent {
    let envelope = EventEnvelope::new(event_type.to_string(), serde_json::json!({"n": 1}));
    let message = OwnedMessage::new(None, None, "t".into(), Timestamp::NotAvailable, 0, 7, None);
    ConsumedEvent::new(envelope, ReceivedMessage::new(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(offset: i64, key: Option<&[u8]>, payload: &[u8], headers: bool) -> OwnedMessage {
        let headers = headers.then(|| {
            OwnedHeaders::new()
                .insert(Header {
                    key: "a",
                    value: Some(&b"one"[..]),
                })
                .insert(Header::<&[u8]> {
                    key: "empty",
                    value: None,
                })
                .insert(Header {
                    key: "a",
                    value: Some(&format!("last-{offset}").into_bytes()[..]),
                })
        });
        OwnedMessage::new(
            Some(payload.to_vec()),
            key.map(<[u8]>::to_vec),
            "t".into(),
            Timestamp::CreateTime(1_000 + offset),
            3,
            offset,
            headers,
        )
    }

    fn header_list(hs: &MessageHeaders<'_>) -> Vec<(String, Option<Vec<u8>>)> {
        hs.iter()
            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
            .collect()
    }

    /// Several messages copied into one buffer read back exactly as they were,
    /// each from its own part of the shared buffer.
    #[test]
    fn messages_copied_into_one_buffer_read_back_unchanged() {
        let originals = [
            message(7, Some(b"k1"), b"{\"n\":1}", true),
            message(8, None, b"", false),
            message(9, Some(b""), b"payload three", true),
        ];
        let mut buffer = CopyBuffer::with_capacity(0);
        let spans: Vec<CopiedSpans> = originals.iter().map(|m| buffer.copy(m)).collect();
        assert_eq!(buffer.key_of(&spans[0]), Some(&b"k1"[..]));
        assert_eq!(buffer.key_of(&spans[1]), None);
        let data = buffer.freeze();
        let topic: Arc<str> = "t".into();
        for (original, spans) in originals.iter().zip(spans) {
            let copy = ReceivedMessage::from_spans(&data, topic.clone(), spans);
            assert_eq!(copy.topic(), "t");
            assert_eq!(copy.partition(), 3);
            assert_eq!(copy.offset(), original.offset());
            assert_eq!(copy.timestamp(), original.timestamp());
            assert_eq!(copy.key(), original.key());
            assert_eq!(copy.payload(), original.payload());
            match (copy.headers(), original.headers()) {
                (None, None) => {}
                (Some(c), Some(o)) => {
                    assert_eq!(c.count(), o.count());
                    let expected: Vec<_> = o
                        .iter()
                        .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                        .collect();
                    assert_eq!(header_list(&c), expected);
                    assert!(c.try_get(o.count()).is_none());
                }
                other => panic!("headers differ: {other:?}"),
            }
            // And back to an rdkafka message, unchanged.
            let owned = copy.to_owned_message();
            assert_eq!(owned.payload(), original.payload());
            assert_eq!(owned.key(), original.key());
            assert_eq!(
                owned.headers().map(|h| h.count()),
                original.headers().map(|h| h.count())
            );
        }
    }

    #[test]
    fn header_returns_the_last_value_of_a_name() {
        let copy = ReceivedMessage::new(message(5, None, b"x", true));
        assert_eq!(copy.header("a"), Some(&b"last-5"[..]));
        assert_eq!(copy.header("empty"), None);
        assert_eq!(copy.header("missing"), None);
        assert_eq!(
            format!("{:?}", copy.headers().unwrap()),
            r#"[("a", Some(3)), ("empty", None), ("a", Some(6))]"#
        );
    }
}
