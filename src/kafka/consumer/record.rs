//! Records: what a handler sees of any Kafka record, keel envelope or not.
//!
//! Most topics are not written by keel: another service's JSON, a string, Avro or
//! Protobuf behind a schema registry, Debezium change events. A consumer that
//! does not require keel's envelope
//! ([`require_envelope(false)`](super::KafkaConsumerBuilder::require_envelope), the
//! [`Kafka`](crate::kafka::Kafka) facade's choice) hands every record to its
//! handler as a [`Record`]: key, value bytes, headers, topic, partition, offset
//! and timestamp, plus the envelope when the record happens to be one. The
//! handler picks a [`Decoder`]; a value that cannot be
//! decoded is a [`RecordDecodeError`], which
//! the runtime treats as permanent (class `decode`: dead-lettered at once, never
//! retried), like an undecodable envelope.
//!
//! `Record` is [`ConsumedEvent`] under the name that says what it is here: the
//! same type, so every layer written for `Service<ConsumedEvent>` (retry,
//! timeout, metrics, dead-letter, your own) stacks on record handlers too.
//!
//! ```
//! use keel::kafka::consumer::{Record, ReceivedMessage};
//! use keel::kafka::consumer::decode::{JsonDecoder, Utf8Decoder};
//! use rdkafka::message::{OwnedMessage, Timestamp};
//!
//! #[derive(serde::Deserialize)]
//! struct Click { page: String }
//!
//! // As kcat would write it: plain JSON, no headers, no envelope.
//! let message = OwnedMessage::new(
//!     Some(br#"{"page":"/home"}"#.to_vec()), Some(b"user-1".to_vec()),
//!     "clicks".into(), Timestamp::CreateTime(1_700_000_000_000), 0, 42, None,
//! );
//! let record = Record::from_record(ReceivedMessage::new(message));
//! assert!(record.try_envelope().is_none());
//! assert_eq!(record.key(), Some(&b"user-1"[..]));
//! let click: Click = record.decode(&JsonDecoder::new()).unwrap();
//! assert_eq!(click.page, "/home");
//! assert_eq!(record.decode(&Utf8Decoder).unwrap(), r#"{"page":"/home"}"#);
//! ```

use super::decode::{Decoder, JsonDecoder, RecordDecodeError, Utf8Decoder};
use super::event::ConsumedEvent;
use crate::kafka::envelope::EventEnvelope;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use std::sync::OnceLock;

/// A consumed Kafka record, keel envelope or not; see the [module docs](self).
pub type Record = ConsumedEvent;

/// What [`ConsumedEvent::envelope`] answers for a record without an envelope.
pub(crate) fn empty_envelope() -> &'static EventEnvelope {
    static EMPTY: OnceLock<EventEnvelope> = OnceLock::new();
    EMPTY.get_or_init(|| {
        EventEnvelope::new("", serde_json::Value::Null)
            .with_event_id(uuid::Uuid::nil())
            .with_timestamp(time::OffsetDateTime::UNIX_EPOCH)
    })
}

impl ConsumedEvent {
    /// The record's value (payload) bytes; `None` for a tombstone.
    pub fn value(&self) -> Option<&[u8]> {
        self.message().payload()
    }

    /// The value as [`Bytes`] sharing the fetched buffer (no copy).
    pub fn value_bytes(&self) -> Option<Bytes> {
        self.message().payload_bytes()
    }

    /// Whether the record is a keel envelope.
    pub fn has_envelope(&self) -> bool {
        self.try_envelope().is_some()
    }

    /// Decodes the record with `decoder`. The error is permanent for the
    /// runtime: return it (`?`) and the record is dead-lettered at once with
    /// class `decode`.
    pub fn decode<D: Decoder>(&self, decoder: &D) -> Result<D::Output, RecordDecodeError> {
        decoder.decode(self)
    }

    /// The value as JSON of type `T` ([`JsonDecoder`]).
    pub fn json<T: DeserializeOwned + Send + 'static>(&self) -> Result<T, RecordDecodeError> {
        JsonDecoder::<T>::new().decode(self)
    }

    /// The value as UTF-8 text ([`Utf8Decoder`]).
    pub fn text(&self) -> Result<String, RecordDecodeError> {
        Utf8Decoder.decode(self)
    }
}
