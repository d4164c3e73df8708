//! What a handler receives: the decoded envelope plus the Kafka message it came in.

use crate::kafka::envelope::EventEnvelope;
use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Headers, OwnedHeaders, OwnedMessage};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

pub use rdkafka::message::Timestamp;

/// A fetched Kafka message, copied out of librdkafka's buffers (an rdkafka
/// [`OwnedMessage`]): raw key, payload, headers and where it came from. This is what
/// the dead-letter queue republishes, unchanged.
#[derive(Clone, Debug)]
pub struct ReceivedMessage {
    inner: OwnedMessage,
}

impl ReceivedMessage {
    /// Wraps an owned message (tests, replays).
    pub fn new(message: OwnedMessage) -> Self {
        ReceivedMessage { inner: message }
    }

    pub(crate) fn from_borrowed(m: &BorrowedMessage<'_>) -> Self {
        ReceivedMessage { inner: m.detach() }
    }

    /// Topic the message was fetched from.
    pub fn topic(&self) -> &str {
        self.inner.topic()
    }
    /// Partition the message was fetched from.
    pub fn partition(&self) -> i32 {
        self.inner.partition()
    }
    /// Offset of the message in its partition.
    pub fn offset(&self) -> i64 {
        self.inner.offset()
    }
    /// Raw key.
    pub fn key(&self) -> Option<&[u8]> {
        self.inner.key()
    }
    /// Raw payload.
    pub fn payload(&self) -> Option<&[u8]> {
        self.inner.payload()
    }
    /// All headers, in their original order.
    pub fn headers(&self) -> Option<&OwnedHeaders> {
        self.inner.headers()
    }
    /// The value of the last header called `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.inner
            .headers()?
            .iter()
            .filter(|h| h.key == name)
            .last()
            .and_then(|h| h.value)
    }
    /// Broker or producer timestamp.
    pub fn timestamp(&self) -> Timestamp {
        self.inner.timestamp()
    }
    /// The rdkafka message (implements [`rdkafka::Message`]).
    pub fn as_message(&self) -> &OwnedMessage {
        &self.inner
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
        }
    }

    /// The decoded envelope.
    pub fn envelope(&self) -> &EventEnvelope {
        &self.inner.envelope
    }
    /// The event type the registry routes on.
    pub fn event_type(&self) -> &str {
        self.inner.envelope.event_type()
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
    pub fn headers(&self) -> Option<&OwnedHeaders> {
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
    let envelope = EventEnvelope::new(event_type, serde_json::json!({"n": 1}));
    let message = OwnedMessage::new(None, None, "t".into(), Timestamp::NotAvailable, 0, 7, None);
    ConsumedEvent::new(envelope, ReceivedMessage::new(message))
}
