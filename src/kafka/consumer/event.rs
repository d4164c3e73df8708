//! What a handler receives: the decoded envelope plus the Kafka message it came in.

use super::decode::EventEnvelope;
use bytes::Bytes;
use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Headers};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

pub use rdkafka::message::Timestamp;

/// One Kafka header of a fetched message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageHeader {
    /// Header name.
    pub key: String,
    /// Header value; `None` for a null header.
    pub value: Option<Bytes>,
}

/// A fetched Kafka message, copied out of librdkafka's buffers: raw key, payload,
/// headers and where it came from. This is what the dead-letter queue republishes,
/// unchanged.
#[derive(Clone, Debug)]
pub struct ReceivedMessage {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    key: Option<Bytes>,
    payload: Option<Bytes>,
    headers: Vec<MessageHeader>,
    timestamp: Timestamp,
}

impl ReceivedMessage {
    /// A message built by hand (tests, replays).
    pub fn new(
        topic: impl Into<Arc<str>>,
        partition: i32,
        offset: i64,
        key: Option<Bytes>,
        payload: Option<Bytes>,
        headers: Vec<MessageHeader>,
        timestamp: Timestamp,
    ) -> Self {
        ReceivedMessage {
            topic: topic.into(),
            partition,
            offset,
            key,
            payload,
            headers,
            timestamp,
        }
    }

    pub(crate) fn from_borrowed(m: &BorrowedMessage<'_>, topic: Arc<str>) -> Self {
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| MessageHeader {
                        key: h.key.to_string(),
                        value: h.value.map(Bytes::copy_from_slice),
                    })
                    .collect()
            })
            .unwrap_or_default();
        ReceivedMessage {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(Bytes::copy_from_slice),
            payload: m.payload().map(Bytes::copy_from_slice),
            headers,
            timestamp: m.timestamp(),
        }
    }

    /// Topic the message was fetched from.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// Partition the message was fetched from.
    pub fn partition(&self) -> i32 {
        self.partition
    }
    /// Offset of the message in its partition.
    pub fn offset(&self) -> i64 {
        self.offset
    }
    /// Raw key.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }
    /// Raw payload.
    pub fn payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }
    /// All headers, in their original order.
    pub fn headers(&self) -> &[MessageHeader] {
        &self.headers
    }
    /// The value of the last header called `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|h| h.key == name)
            .and_then(|h| h.value.as_deref())
    }
    /// Broker or producer timestamp.
    pub fn timestamp(&self) -> Timestamp {
        self.timestamp
    }
}

#[derive(Debug)]
struct EventInner {
    envelope: EventEnvelope,
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
    attempt: u32,
}

impl ConsumedEvent {
    /// An event for the given message (attempt 1).
    pub fn new(envelope: EventEnvelope, message: ReceivedMessage) -> Self {
        ConsumedEvent {
            inner: Arc::new(EventInner {
                envelope,
                message,
                attempts: AtomicU32::new(0),
            }),
            attempt: 1,
        }
    }

    /// The decoded envelope.
    pub fn envelope(&self) -> &EventEnvelope {
        &self.inner.envelope
    }
    /// The event type the registry routes on.
    pub fn event_type(&self) -> &str {
        &self.inner.envelope.event_type
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
    pub fn headers(&self) -> &[MessageHeader] {
        self.inner.message.headers()
    }
    /// Timestamp of the message.
    pub fn timestamp(&self) -> Timestamp {
        self.inner.message.timestamp()
    }
    /// Which attempt this call is (1 for the first call, 2 for the first retry...).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// How many times the handler was called for this message so far.
    pub fn attempts_made(&self) -> u32 {
        self.inner.attempts.load(Ordering::Relaxed)
    }

    /// A clone for attempt number `attempt`, counted as made.
    pub(crate) fn for_attempt(&self, attempt: u32) -> Self {
        self.inner.attempts.fetch_add(1, Ordering::Relaxed);
        ConsumedEvent {
            inner: self.inner.clone(),
            attempt,
        }
    }
}
