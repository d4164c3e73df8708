//! Decoders: how a handler reads a record's value.
//!
//! keel's envelope is one decoder among others. The built-in ones:
//!
//! | decoder                   | output                 | fails when                              |
//! |---------------------------|------------------------|-----------------------------------------|
//! | [`BytesDecoder`]          | [`Bytes`] (no copy)    | the record has no value (tombstone)     |
//! | [`Utf8Decoder`]           | `String`               | no value, or not UTF-8                  |
//! | [`JsonDecoder<T>`]        | `T: DeserializeOwned`  | no value, or not JSON of that shape     |
//! | [`EnvelopeDecoder<T>`]    | [`EventEnvelope<T>`]   | not a keel envelope, or payload not `T` |
//! | [`SchemaRegistryDecoder`] | `(schema_id, Bytes)`   | no magic byte 0 + 4-byte schema id      |
//!
//! Anything else (Avro, Protobuf, a Debezium change event) is a [`Decoder`] you
//! write over your own crate: often the schema-registry framing first, then your
//! deserializer on the bytes.
//!
//! A decode failure is a [`RecordDecodeError`]. It never retries: the
//! runtime's classifier ([`HandlerErrors`](super::HandlerErrors)) calls it a
//! permanent failure of class `decode`, so a handler that returns it (`?`) has
//! its record dead-lettered at once. Its message names the decoder and what was
//! wrong (a position, a length), never the payload.
//!
//! ```
//! use bytes::Bytes;
//! use keel::kafka::consumer::Record;
//! use keel::kafka::consumer::decode::{Decoder, RecordDecodeError, SchemaRegistryDecoder};
//!
//! /// A user decoder: schema-registry framing, then a schema check.
//! struct OnlySchema(u32);
//!
//! impl Decoder for OnlySchema {
//!     type Output = Bytes;
//!     fn decode(&self, record: &Record) -> Result<Bytes, RecordDecodeError> {
//!         let (schema_id, body) = SchemaRegistryDecoder.decode(record)?;
//!         if schema_id != self.0 {
//!             return Err(RecordDecodeError::new("OnlySchema", format!("schema {schema_id}")));
//!         }
//!         Ok(body) // hand `body` to apache-avro / prost here
//!     }
//! }
//! ```

use super::event::{MessageHeaders, ReceivedMessage};
use super::record::Record;
use crate::kafka::dead_letter::{DeadLetterReason, reason_for};
use crate::kafka::envelope::EventEnvelope;
use bytes::Bytes;
use keel_layers::classify::{Classification, ClassifiedError};
use serde::de::DeserializeOwned;
use std::fmt;
use std::marker::PhantomData;

/// Reads a [`Record`] into a value. Implement it for your formats.
pub trait Decoder: Send + Sync + 'static {
    /// What the record decodes to.
    type Output: Send + 'static;
    /// Decodes `record`; fails with a [`RecordDecodeError`] (permanent, class
    /// `decode`).
    fn decode(&self, record: &Record) -> Result<Self::Output, RecordDecodeError>;
}

/// A record that cannot be decoded: permanent, class `decode`.
///
/// Carries the decoder's name and what was wrong, never the payload (so it is
/// safe to log and to put in the dead-letter headers).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the record cannot be decoded by {decoder}: {reason}")]
pub struct RecordDecodeError {
    decoder: &'static str,
    reason: String,
}

impl RecordDecodeError {
    /// A failure of `decoder` (a short name) for `reason`.
    pub fn new(decoder: &'static str, reason: impl Into<String>) -> Self {
        RecordDecodeError {
            decoder,
            reason: reason.into(),
        }
    }
    /// The decoder that failed.
    pub fn decoder(&self) -> &'static str {
        self.decoder
    }
    /// What was wrong.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl ClassifiedError for RecordDecodeError {
    fn classification(&self) -> Classification {
        // A record that cannot be decoded now never will be.
        Classification::permanent_failure("decode")
    }
}

fn value<'a>(record: &'a Record, decoder: &'static str) -> Result<&'a [u8], RecordDecodeError> {
    record
        .value()
        .ok_or_else(|| RecordDecodeError::new(decoder, "the record has no value"))
}

/// The value's bytes as they are, without a copy.
#[derive(Clone, Copy, Debug, Default)]
pub struct BytesDecoder;

impl Decoder for BytesDecoder {
    type Output = Bytes;
    fn decode(&self, record: &Record) -> Result<Bytes, RecordDecodeError> {
        record
            .value_bytes()
            .ok_or_else(|| RecordDecodeError::new("BytesDecoder", "the record has no value"))
    }
}

/// The value as UTF-8 text.
#[derive(Clone, Copy, Debug, Default)]
pub struct Utf8Decoder;

impl Decoder for Utf8Decoder {
    type Output = String;
    fn decode(&self, record: &Record) -> Result<String, RecordDecodeError> {
        let bytes = value(record, "Utf8Decoder")?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|e| RecordDecodeError::new("Utf8Decoder", e.to_string()))
    }
}

/// The value as JSON of type `T` (no envelope: the whole value is `T`).
pub struct JsonDecoder<T>(PhantomData<fn() -> T>);

impl<T> JsonDecoder<T> {
    /// A decoder into `T`.
    pub fn new() -> Self {
        JsonDecoder(PhantomData)
    }
}

impl<T> Default for JsonDecoder<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for JsonDecoder<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for JsonDecoder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JsonDecoder<{}>", std::any::type_name::<T>())
    }
}

/// serde_json's message may quote the payload ("invalid type: string \"…\""):
/// keep only its category and position.
pub(crate) fn json_reason(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Io => "I/O error",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "JSON of another shape",
        serde_json::error::Category::Eof => "JSON cut short",
    };
    match e.line() {
        // Deserialized from a `Value` (a typed envelope payload): no position.
        0 => what.to_string(),
        line => format!("{what} at line {line} column {}", e.column()),
    }
}

impl<T: DeserializeOwned + Send + 'static> Decoder for JsonDecoder<T> {
    type Output = T;
    fn decode(&self, record: &Record) -> Result<T, RecordDecodeError> {
        serde_json::from_slice(value(record, "JsonDecoder")?)
            .map_err(|e| RecordDecodeError::new("JsonDecoder", json_reason(&e)))
    }
}

/// keel's own envelope, its payload as `T` (default: raw JSON).
pub struct EnvelopeDecoder<T = serde_json::Value>(PhantomData<fn() -> T>);

impl<T> EnvelopeDecoder<T> {
    /// A decoder of envelopes with payload `T`.
    pub fn new() -> Self {
        EnvelopeDecoder(PhantomData)
    }
}

impl<T> Default for EnvelopeDecoder<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for EnvelopeDecoder<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for EnvelopeDecoder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnvelopeDecoder<{}>", std::any::type_name::<T>())
    }
}

impl<T: DeserializeOwned + Send + 'static> Decoder for EnvelopeDecoder<T> {
    type Output = EventEnvelope<T>;
    fn decode(&self, record: &Record) -> Result<EventEnvelope<T>, RecordDecodeError> {
        let envelope = match record.try_envelope() {
            Some(envelope) => envelope.clone(),
            None => decode_envelope(record.message())
                .map_err(|e| RecordDecodeError::new("EnvelopeDecoder", e.to_string()))?,
        };
        envelope
            .decode_payload()
            .map_err(|e| RecordDecodeError::new("EnvelopeDecoder", e.to_string()))
    }
}

/// Schema-registry framing (Confluent wire format): magic byte `0`, the schema
/// id as 4 bytes big-endian, then the serialized body. Gives
/// `(schema_id, body)`; decode the body with your Avro / Protobuf / JSON Schema
/// crate (Protobuf adds message indexes at the start of the body).
#[derive(Clone, Copy, Debug, Default)]
pub struct SchemaRegistryDecoder;

/// The magic byte of the schema-registry framing.
pub const SCHEMA_REGISTRY_MAGIC: u8 = 0;

impl Decoder for SchemaRegistryDecoder {
    type Output = (u32, Bytes);
    fn decode(&self, record: &Record) -> Result<(u32, Bytes), RecordDecodeError> {
        const NAME: &str = "SchemaRegistryDecoder";
        let bytes = record
            .value_bytes()
            .ok_or_else(|| RecordDecodeError::new(NAME, "the record has no value"))?;
        match bytes.first() {
            Some(&SCHEMA_REGISTRY_MAGIC) if bytes.len() >= 5 => {
                let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
                Ok((id, bytes.slice(5..)))
            }
            Some(&SCHEMA_REGISTRY_MAGIC) => Err(RecordDecodeError::new(
                NAME,
                format!("{} bytes, shorter than the 5-byte header", bytes.len()),
            )),
            Some(other) => Err(RecordDecodeError::new(
                NAME,
                format!("magic byte {other}, expected {SCHEMA_REGISTRY_MAGIC}"),
            )),
            None => Err(RecordDecodeError::new(NAME, "the value is empty")),
        }
    }
}

fn decode_envelope(
    message: &ReceivedMessage,
) -> Result<EventEnvelope, crate::kafka::envelope::DecodeError> {
    EventEnvelope::from_parts(
        message.payload(),
        message.key(),
        message
            .headers()
            .into_iter()
            .flat_map(MessageHeaders::entries),
        message.timestamp(),
    )
}

/// The lane's first step. With `required` (keel's own consumers), a record
/// that is not an envelope is dead-lettered as `decode`; without, it reaches
/// the handler as a record with no envelope and the handler's decoder decides.
/// Either way a record whose headers cannot be read is dead-lettered.
pub(crate) fn envelope_of(
    message: &ReceivedMessage,
    required: bool,
) -> Result<Option<EventEnvelope>, DeadLetterReason> {
    if message.has_unreadable_headers() {
        return Err(DeadLetterReason {
            kind: "decode".into(),
            error_type: "keel::kafka::consumer::UnreadableHeaders".into(),
            message: "a header name is not valid UTF-8; the headers were dropped".into(),
            attempts: 0,
        });
    }
    match decode_envelope(message) {
        Ok(envelope) => Ok(Some(envelope)),
        Err(error) if required => Err(reason_for(error, 0)),
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{OwnedMessage, Timestamp};

    fn record(value: Option<&[u8]>) -> Record {
        let m = OwnedMessage::new(
            value.map(<[u8]>::to_vec),
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            1,
            None,
        );
        Record::from_record(ReceivedMessage::new(m))
    }

    #[test]
    fn schema_registry_framing_gives_the_id_and_the_body() {
        let r = record(Some(&[0, 0, 0, 1, 0x2c, b'a', b'b']));
        assert_eq!(
            SchemaRegistryDecoder.decode(&r).unwrap(),
            (300, Bytes::from_static(b"ab"))
        );
        let empty_body = record(Some(&[0, 0, 0, 0, 7]));
        assert_eq!(SchemaRegistryDecoder.decode(&empty_body).unwrap().0, 7);
        for bad in [&[1u8, 0, 0, 0, 1][..], &[0, 0, 1], &[]] {
            let e = SchemaRegistryDecoder
                .decode(&record(Some(bad)))
                .unwrap_err();
            assert_eq!(e.decoder(), "SchemaRegistryDecoder");
        }
        assert!(SchemaRegistryDecoder.decode(&record(None)).is_err());
    }

    #[test]
    fn decode_errors_are_permanent_and_never_quote_the_payload() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Order {
            id: u32,
        }
        let r = record(Some(br#"{"id":"secret-value"}"#));
        let e = JsonDecoder::<Order>::new().decode(&r).unwrap_err();
        assert!(!e.to_string().contains("secret-value"), "{e}");
        let c = e.classification();
        assert_eq!(c.class, "decode");
        assert!(!c.retryable);
        let boxed: crate::kafka::consumer::BoxError = Box::new(e);
        let c = crate::kafka::consumer::HandlerErrors::classify_error(boxed.as_ref());
        assert_eq!((c.class, c.retryable), ("decode", false));

        let bad = record(Some(&[0xff, 0xfe]));
        assert!(Utf8Decoder.decode(&bad).is_err());
        assert_eq!(Utf8Decoder.decode(&record(Some(b"hi"))).unwrap(), "hi");
        assert_eq!(
            BytesDecoder.decode(&record(Some(b"hi"))).unwrap(),
            Bytes::from_static(b"hi")
        );
        assert!(BytesDecoder.decode(&record(None)).is_err());
    }

    #[test]
    fn the_envelope_is_one_decoder_among_others() {
        let encoded = EventEnvelope::new("order.created", serde_json::json!({"id": 7}))
            .encode()
            .unwrap();
        let message = ReceivedMessage::new(encoded.to_owned_message("t", 0, 3));
        // Required or not, an envelope decodes.
        assert!(envelope_of(&message, true).unwrap().is_some());
        let plain = ReceivedMessage::new(OwnedMessage::new(
            Some(b"plain text".to_vec()),
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            4,
            None,
        ));
        // Required: dead-lettered as decode; optional: delivered without one.
        assert_eq!(envelope_of(&plain, true).unwrap_err().kind, "decode");
        assert!(envelope_of(&plain, false).unwrap().is_none());
        let rec = Record::from_record(plain);
        assert_eq!(rec.event_type(), "");
        assert_eq!(rec.envelope().event_type(), "");
        assert!(
            EnvelopeDecoder::<serde_json::Value>::new()
                .decode(&rec)
                .is_err()
        );
        let rec = Record::from_record(message);
        let env = EnvelopeDecoder::<serde_json::Value>::new()
            .decode(&rec)
            .unwrap();
        assert_eq!(env.event_type(), "order.created");
    }
}
