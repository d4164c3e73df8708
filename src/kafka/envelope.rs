//! The event envelope: what keel puts on and reads off a Kafka topic.
//!
//! An [`EventEnvelope`] carries an event id (a random UUID v4 unless you give
//! one), an event type, a version, a timestamp and a payload, plus an optional
//! Kafka key and extra headers. On the wire:
//!
//! - **value**: JSON, the same shape the TypeScript module used, so existing
//!   consumers keep working:
//!   `{"eventId":"…","eventType":"user.created","version":"1.0","timestamp":"2026-02-11T12:00:00Z","payload":{…}}`
//!   (the timestamp is RFC 3339, UTC);
//! - **headers**: [`HEADER_EVENT_ID`] (`keel-event-id`), [`HEADER_EVENT_TYPE`]
//!   (`keel-event-type`) and [`HEADER_EVENT_VERSION`] (`keel-event-version`) repeat
//!   the id, type and version so routers, filters and tools like kcat can read them
//!   without parsing the body; your own headers follow;
//! - **key**: the envelope's key, if any (Kafka keeps order per key).
//!
//! The payload is any `Serialize` type, or raw JSON with the default
//! `T = serde_json::Value`.
//!
//! Decoding ([`EventEnvelope::from_message`]) works on any rdkafka
//! [`Message`] (borrowed or owned) and fails with a typed [`DecodeError`]: no
//! body, not JSON, a missing or malformed field, a header that is not UTF-8 or
//! that contradicts the body, a payload of the wrong shape. When the body lacks
//! the id, type or version, the headers supply them; when it lacks the timestamp,
//! the Kafka message timestamp does.
//!
//! # Example
//!
//! ```
//! use keel::kafka::envelope::{EventEnvelope, HEADER_EVENT_TYPE};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct UserCreated { user_id: String }
//!
//! let event = EventEnvelope::new("user.created", UserCreated { user_id: "123".into() })
//!     .with_version("2.0")
//!     .with_key("123")
//!     .with_header("trace-id", "abc");
//! let encoded = event.encode().unwrap();
//! assert_eq!(encoded.header(HEADER_EVENT_TYPE), Some(&b"user.created"[..]));
//!
//! // Back from Kafka (here from the encoded parts, as a consumer would get them).
//! let message = encoded.to_owned_message("users", 0, 42);
//! let decoded = EventEnvelope::<UserCreated>::from_message(&message).unwrap();
//! assert_eq!(decoded.payload(), &UserCreated { user_id: "123".into() });
//! assert_eq!(decoded.event_id(), event.event_id());
//! assert_eq!(decoded.key(), Some(&b"123"[..]));
//! ```

use std::borrow::Cow;
use std::fmt;

use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage, Timestamp};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// Header carrying the event id (UUID text).
pub const HEADER_EVENT_ID: &str = "keel-event-id";
/// Header carrying the event type.
pub const HEADER_EVENT_TYPE: &str = "keel-event-type";
/// Header carrying the event version.
pub const HEADER_EVENT_VERSION: &str = "keel-event-version";
/// The version an envelope gets unless told otherwise.
pub const DEFAULT_VERSION: &str = "1.0";

/// One event: id, type, version, timestamp, payload, and optional key and headers.
///
/// Build with [`EventEnvelope::new`] and the `with_*` methods; read with the
/// accessors. `T` is the payload type; the default, `serde_json::Value`, is raw
/// JSON. Equality compares every field, key and headers included.
#[derive(Clone, Debug, PartialEq)]
pub struct EventEnvelope<T = serde_json::Value> {
    event_id: Uuid,
    // Cow: event types and versions are nearly always literals; borrowing them
    // saves two allocations per event.
    event_type: Cow<'static, str>,
    version: Cow<'static, str>,
    timestamp: OffsetDateTime,
    payload: T,
    key: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
}

/// The JSON body, borrowed for encoding.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BodyRef<'a, T> {
    event_id: &'a Uuid,
    event_type: &'a str,
    version: &'a str,
    #[serde(with = "time::serde::rfc3339")]
    timestamp: OffsetDateTime,
    payload: &'a T,
}

/// The JSON body, every field optional, for decoding with precise errors.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BodyOwned {
    event_id: Option<serde_json::Value>,
    event_type: Option<serde_json::Value>,
    version: Option<serde_json::Value>,
    timestamp: Option<serde_json::Value>,
    payload: Option<serde_json::Value>,
}

impl<T> EventEnvelope<T> {
    /// A new event of `event_type` with a fresh UUID v4 id, version
    /// [`DEFAULT_VERSION`], the current time, no key and no extra headers.
    pub fn new(event_type: impl Into<Cow<'static, str>>, payload: T) -> Self {
        EventEnvelope {
            event_id: Uuid::new_v4(),
            event_type: event_type.into(),
            version: Cow::Borrowed(DEFAULT_VERSION),
            timestamp: OffsetDateTime::now_utc(),
            payload,
            key: None,
            headers: Vec::new(),
        }
    }

    /// Sets the event id (for example to keep an id from upstream, or an
    /// idempotency key the caller chose).
    ///
    /// The id is what consumers deduplicate on: when a publish fails with an
    /// unknown outcome ([`ProducerErrorKind::OutcomeUnknown`](crate::kafka::error::ProducerErrorKind::OutcomeUnknown)),
    /// resend the same envelope (clones keep the id), never a new one, so that a
    /// copy that was stored after all can be recognised.
    pub fn with_event_id(mut self, id: Uuid) -> Self {
        self.event_id = id;
        self
    }

    /// Sets the version.
    pub fn with_version(mut self, version: impl Into<Cow<'static, str>>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets the timestamp.
    pub fn with_timestamp(mut self, timestamp: OffsetDateTime) -> Self {
        self.timestamp = timestamp;
        self
    }

    /// Sets the Kafka key (events with one key keep their order).
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a Kafka header. Names starting with `keel-event-` are reserved and
    /// replaced by the envelope's own values on encoding.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The event id.
    pub fn event_id(&self) -> Uuid {
        self.event_id
    }

    /// The event type, e.g. `user.created`.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The version, e.g. `1.0`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// When the event happened.
    pub fn timestamp(&self) -> OffsetDateTime {
        self.timestamp
    }

    /// The payload.
    pub fn payload(&self) -> &T {
        &self.payload
    }

    /// The payload, mutably.
    pub fn payload_mut(&mut self) -> &mut T {
        &mut self.payload
    }

    /// Takes the payload out.
    pub fn into_payload(self) -> T {
        self.payload
    }

    /// The Kafka key, if any.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// Takes the key out, leaving none.
    pub fn take_key(&mut self) -> Option<Vec<u8>> {
        self.key.take()
    }

    /// The extra headers (the `keel-event-*` headers excluded).
    pub fn headers(&self) -> &[(String, Vec<u8>)] {
        &self.headers
    }

    /// The first extra header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The timestamp in ms since the Unix epoch (the record's create time).
    pub fn timestamp_ms(&self) -> i64 {
        (self.timestamp.unix_timestamp_nanos() / 1_000_000) as i64
    }

    /// The Kafka headers, built directly: `keel-event-*` first, then the extra
    /// headers (reserved names skipped). Same content as
    /// [`EncodedEvent::owned_headers`], without the intermediate copies.
    pub fn kafka_headers(&self) -> OwnedHeaders {
        let mut id_buf = Uuid::encode_buffer();
        let id = self.event_id.hyphenated().encode_lower(&mut id_buf);
        let h = OwnedHeaders::new_with_capacity(3 + self.headers.len())
            .insert(Header {
                key: HEADER_EVENT_ID,
                value: Some(id.as_bytes()),
            })
            .insert(Header {
                key: HEADER_EVENT_TYPE,
                value: Some(self.event_type.as_bytes()),
            })
            .insert(Header {
                key: HEADER_EVENT_VERSION,
                value: Some(self.version.as_bytes()),
            });
        self.headers
            .iter()
            .filter(|(n, _)| !is_reserved(n))
            .fold(h, |h, (name, value)| {
                h.insert(Header {
                    key: name,
                    value: Some(value),
                })
            })
    }

    /// The same envelope with its payload transformed.
    pub fn map_payload<U>(self, f: impl FnOnce(T) -> U) -> EventEnvelope<U> {
        EventEnvelope {
            event_id: self.event_id,
            event_type: self.event_type,
            version: self.version,
            timestamp: self.timestamp,
            payload: f(self.payload),
            key: self.key,
            headers: self.headers,
        }
    }
}

impl<T: Serialize> EventEnvelope<T> {
    /// Encodes the envelope: JSON value, `keel-event-*` headers then the extra
    /// headers, and the key.
    pub fn encode(&self) -> Result<EncodedEvent, serde_json::Error> {
        let value = self.encode_value()?;
        let mut headers = Vec::with_capacity(3 + self.headers.len());
        let mut id_buf = Uuid::encode_buffer();
        let id = self.event_id.hyphenated().encode_lower(&mut id_buf);
        headers.push((HEADER_EVENT_ID.to_string(), id.as_bytes().to_vec()));
        headers.push((
            HEADER_EVENT_TYPE.to_string(),
            self.event_type.as_bytes().to_vec(),
        ));
        headers.push((
            HEADER_EVENT_VERSION.to_string(),
            self.version.as_bytes().to_vec(),
        ));
        headers.extend(
            self.headers
                .iter()
                .filter(|(n, _)| !is_reserved(n))
                .cloned(),
        );
        Ok(EncodedEvent {
            key: self.key.clone(),
            value,
            headers,
            timestamp_ms: self.timestamp_ms(),
        })
    }

    /// The JSON value alone.
    pub fn encode_value(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut value = Vec::with_capacity(128);
        self.encode_value_into(&mut value)?;
        Ok(value)
    }

    /// Appends the JSON value to `buf` (for callers that reuse one buffer). On
    /// error `buf` may hold part of the value.
    pub fn encode_value_into(&self, buf: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        serde_json::to_writer(
            buf,
            &BodyRef {
                event_id: &self.event_id,
                event_type: &self.event_type,
                version: &self.version,
                timestamp: self.timestamp,
                payload: &self.payload,
            },
        )
    }
    /// Turns the payload into raw JSON.
    pub fn into_json(self) -> Result<EventEnvelope<serde_json::Value>, serde_json::Error> {
        let payload = serde_json::to_value(&self.payload)?;
        Ok(self.map_payload(|_| payload))
    }
}

impl EventEnvelope<serde_json::Value> {
    /// Reads the raw JSON payload as `U`.
    pub fn decode_payload<U: DeserializeOwned>(self) -> Result<EventEnvelope<U>, DecodeError> {
        let payload = serde_json::from_value::<U>(self.payload.clone())
            .map_err(|e| DecodeError::Payload(e.to_string()))?;
        Ok(self.map_payload(|_| payload))
    }
}

fn is_reserved(name: &str) -> bool {
    name == HEADER_EVENT_ID || name == HEADER_EVENT_TYPE || name == HEADER_EVENT_VERSION
}

/// An envelope ready for Kafka: key, JSON value, headers and timestamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedEvent {
    /// The Kafka key.
    pub key: Option<Vec<u8>>,
    /// The JSON value.
    pub value: Vec<u8>,
    /// Headers, `keel-event-*` first.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The event timestamp, ms since the Unix epoch (used as the record's create time).
    pub timestamp_ms: i64,
}

impl EncodedEvent {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The headers as rdkafka headers.
    pub fn owned_headers(&self) -> OwnedHeaders {
        self.headers.iter().fold(
            OwnedHeaders::new_with_capacity(self.headers.len()),
            |h, (name, value)| {
                h.insert(Header {
                    key: name,
                    value: Some(value),
                })
            },
        )
    }

    /// An rdkafka [`OwnedMessage`] holding this event at `topic`/`partition`/`offset`,
    /// as a consumer would receive it (useful in tests and for replays).
    pub fn to_owned_message(&self, topic: &str, partition: i32, offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            Some(self.value.clone()),
            self.key.clone(),
            topic.to_string(),
            Timestamp::CreateTime(self.timestamp_ms),
            partition,
            offset,
            Some(self.owned_headers()),
        )
    }
}

/// A Kafka message that is not a valid keel event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message has no value (a tombstone or an empty record).
    #[error("the message has no value")]
    EmptyValue,
    /// The value is not JSON, or not a JSON object.
    #[error("the message value is not a JSON object: {0}")]
    NotJson(String),
    /// A required field is in neither the body nor the headers.
    #[error("the event has no {0}")]
    MissingField(&'static str),
    /// A field has the wrong type or format.
    #[error("the event field {field} is invalid: {reason}")]
    InvalidField {
        /// The JSON field name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A `keel-event-*` header is not UTF-8 or not a valid value.
    #[error("the header {name} is invalid: {reason}")]
    BadHeader {
        /// The header name.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A `keel-event-*` header and the body disagree.
    #[error("the header {name} says {header:?} but the body says {body:?}")]
    HeaderMismatch {
        /// The header name.
        name: &'static str,
        /// The header's value.
        header: String,
        /// The body's value.
        body: String,
    },
    /// The payload does not match the expected type.
    #[error("the event payload does not match the expected type: {0}")]
    Payload(String),
}

impl DecodeError {
    /// A short, stable label for metrics and dead-letter headers.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::EmptyValue => "empty_value",
            DecodeError::NotJson(_) => "not_json",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::InvalidField { .. } => "invalid_field",
            DecodeError::BadHeader { .. } => "bad_header",
            DecodeError::HeaderMismatch { .. } => "header_mismatch",
            DecodeError::Payload(_) => "payload",
        }
    }
}

impl keel_layers::classify::ClassifiedError for DecodeError {
    fn classification(&self) -> keel_layers::classify::Classification {
        // A message that cannot be decoded now never will be.
        keel_layers::classify::Classification::permanent_failure("decode")
    }
}

/// Reads the `keel-event-*` headers of a message.
#[derive(Default)]
struct KeelHeaders {
    id: Option<String>,
    event_type: Option<String>,
    version: Option<String>,
    extra: Vec<(String, Vec<u8>)>,
}

fn header_text(name: &'static str, value: Option<&[u8]>) -> Result<String, DecodeError> {
    let value = value.ok_or(DecodeError::BadHeader {
        name,
        reason: "no value".to_string(),
    })?;
    std::str::from_utf8(value)
        .map(str::to_string)
        .map_err(|e| DecodeError::BadHeader {
            name,
            reason: format!("not UTF-8: {e}"),
        })
}

fn read_headers<'h>(
    headers: impl IntoIterator<Item = Header<'h, &'h [u8]>>,
) -> Result<KeelHeaders, DecodeError> {
    let mut out = KeelHeaders::default();
    for h in headers {
        match h.key {
            HEADER_EVENT_ID => out.id = Some(header_text(HEADER_EVENT_ID, h.value)?),
            HEADER_EVENT_TYPE => out.event_type = Some(header_text(HEADER_EVENT_TYPE, h.value)?),
            HEADER_EVENT_VERSION => out.version = Some(header_text(HEADER_EVENT_VERSION, h.value)?),
            other => out
                .extra
                .push((other.to_string(), h.value.unwrap_or_default().to_vec())),
        }
    }
    Ok(out)
}

fn body_string(
    field: &'static str,
    value: Option<serde_json::Value>,
) -> Result<Option<String>, DecodeError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(DecodeError::InvalidField {
            field,
            reason: format!("expected a string, found {other}"),
        }),
    }
}

/// Picks the body's value, else the header's; both present must agree.
fn reconcile(
    field: &'static str,
    header_name: &'static str,
    body: Option<String>,
    header: Option<String>,
) -> Result<String, DecodeError> {
    match (body, header) {
        (Some(b), Some(h)) if b != h => Err(DecodeError::HeaderMismatch {
            name: header_name,
            header: h,
            body: b,
        }),
        (Some(b), _) => Ok(b),
        (None, Some(h)) => Ok(h),
        (None, None) => Err(DecodeError::MissingField(field)),
    }
}

impl<T: DeserializeOwned> EventEnvelope<T> {
    /// Decodes a Kafka message (a `BorrowedMessage` from a consumer or an
    /// `OwnedMessage`) into an envelope; see the [module docs](self) for the rules.
    pub fn from_message<M: Message>(msg: &M) -> Result<Self, DecodeError> {
        let headers = msg.headers().into_iter().flat_map(|hs| hs.iter());
        Self::from_parts(msg.payload(), msg.key(), headers, msg.timestamp())
    }

    /// [`EventEnvelope::from_message`] over the parts of a message (its headers in
    /// order).
    pub(crate) fn from_parts<'h>(
        payload: Option<&[u8]>,
        key: Option<&[u8]>,
        headers: impl IntoIterator<Item = Header<'h, &'h [u8]>>,
        kafka_timestamp: Timestamp,
    ) -> Result<Self, DecodeError> {
        let value = payload.ok_or(DecodeError::EmptyValue)?;
        if value.is_empty() {
            return Err(DecodeError::EmptyValue);
        }
        let body: BodyOwned =
            serde_json::from_slice(value).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let headers = read_headers(headers)?;

        let id_text = reconcile(
            "eventId",
            HEADER_EVENT_ID,
            body_string("eventId", body.event_id)?,
            headers.id,
        )?;
        let event_id = Uuid::parse_str(&id_text).map_err(|e| DecodeError::InvalidField {
            field: "eventId",
            reason: format!("{id_text:?} is not a UUID: {e}"),
        })?;
        let event_type = reconcile(
            "eventType",
            HEADER_EVENT_TYPE,
            body_string("eventType", body.event_type)?,
            headers.event_type,
        )?;
        let version = reconcile(
            "version",
            HEADER_EVENT_VERSION,
            body_string("version", body.version)?,
            headers.version,
        )?;
        let timestamp = match body_string("timestamp", body.timestamp)? {
            Some(text) => {
                OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| DecodeError::InvalidField {
                        field: "timestamp",
                        reason: format!("{text:?} is not RFC 3339: {e}"),
                    })?
            }
            None => match kafka_timestamp.to_millis() {
                Some(ms) => OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
                    .map_err(|e| e.to_string())
                    // RFC 3339 has four-digit years: an envelope dated outside them
                    // could never be encoded again (forwarded, replayed), so refuse
                    // it here, typed, rather than fail later (found by fuzzing).
                    .and_then(|t| {
                        (0..=9999)
                            .contains(&t.year())
                            .then_some(t)
                            .ok_or_else(|| format!("{ms} ms is outside the years 0 to 9999"))
                    })
                    .map_err(|reason| DecodeError::InvalidField {
                        field: "timestamp",
                        reason,
                    })?,
                None => return Err(DecodeError::MissingField("timestamp")),
            },
        };
        let payload = body.payload.ok_or(DecodeError::MissingField("payload"))?;
        let payload = serde_json::from_value::<T>(payload)
            .map_err(|e| DecodeError::Payload(e.to_string()))?;
        Ok(EventEnvelope {
            event_id,
            event_type: Cow::Owned(event_type),
            version: Cow::Owned(version),
            timestamp,
            payload,
            key: key.map(<[u8]>::to_vec),
            headers: headers.extra,
        })
    }
}

impl<T> fmt::Display for EventEnvelope<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} v{} ({})",
            self.event_type, self.version, self.event_id
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(value: &[u8], headers: &[(&str, &[u8])]) -> OwnedMessage {
        let h = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(*v),
            })
        });
        OwnedMessage::new(
            Some(value.to_vec()),
            Some(b"k".to_vec()),
            "t".into(),
            Timestamp::CreateTime(1_700_000_000_000),
            0,
            7,
            Some(h),
        )
    }

    #[test]
    fn round_trip_keeps_everything() {
        let id = Uuid::new_v4();
        let ts = time::macros::datetime!(2026-02-11 12:00:00.123 UTC);
        let e = EventEnvelope::new("order.created", json!({"orderId": "1", "n": [1, 2]}))
            .with_event_id(id)
            .with_version("3.1")
            .with_timestamp(ts)
            .with_key("order-1")
            .with_header("trace", "xyz");
        let enc = e.encode().unwrap();
        assert_eq!(enc.header(HEADER_EVENT_ID), Some(id.to_string().as_bytes()));
        assert_eq!(enc.header(HEADER_EVENT_VERSION), Some(&b"3.1"[..]));
        assert_eq!(enc.timestamp_ms, 1_770_811_200_123);
        let body: serde_json::Value = serde_json::from_slice(&enc.value).unwrap();
        assert_eq!(body["eventType"], "order.created");
        assert_eq!(body["eventId"], id.to_string());
        assert_eq!(body["timestamp"], "2026-02-11T12:00:00.123Z");
        let back =
            EventEnvelope::<serde_json::Value>::from_message(&enc.to_owned_message("t", 1, 2))
                .unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn direct_headers_match_encoded_headers() {
        let e = EventEnvelope::new("a.b", json!({"x": 1}))
            .with_header("h1", "v1")
            .with_header(HEADER_EVENT_ID, "spoof");
        let direct = e.kafka_headers();
        let via = e.encode().unwrap().owned_headers();
        let list = |h: &OwnedHeaders| -> Vec<(String, Vec<u8>)> {
            h.iter()
                .map(|h| (h.key.to_string(), h.value.unwrap().to_vec()))
                .collect()
        };
        assert_eq!(list(&direct), list(&via));
        assert_eq!(list(&direct).len(), 4);
        assert_eq!(e.encode_value().unwrap(), e.encode().unwrap().value);
    }

    #[test]
    fn new_events_get_distinct_v4_ids() {
        let a = EventEnvelope::new("x", ());
        let b = EventEnvelope::new("x", ());
        assert_ne!(a.event_id(), b.event_id());
        assert_eq!(a.event_id().get_version_num(), 4);
        assert_eq!(a.version(), DEFAULT_VERSION);
    }

    #[test]
    fn reserved_headers_cannot_be_spoofed() {
        let e = EventEnvelope::new("real", 1).with_header(HEADER_EVENT_TYPE, "fake");
        let enc = e.encode().unwrap();
        let types: Vec<_> = enc
            .headers
            .iter()
            .filter(|(n, _)| n == HEADER_EVENT_TYPE)
            .collect();
        assert_eq!(types.len(), 1);
        assert_eq!(types[0].1, b"real");
    }

    #[test]
    fn typed_decode_errors() {
        type E = EventEnvelope<serde_json::Value>;
        let empty = OwnedMessage::new(None, None, "t".into(), Timestamp::NotAvailable, 0, 0, None);
        assert_eq!(E::from_message(&empty), Err(DecodeError::EmptyValue));
        assert!(matches!(
            E::from_message(&message(b"not json", &[])),
            Err(DecodeError::NotJson(_))
        ));
        assert!(matches!(
            E::from_message(&message(b"[1,2]", &[])),
            Err(DecodeError::NotJson(_))
        ));
        let id = Uuid::new_v4().to_string();
        let no_type = json!({"eventId": id, "version": "1", "payload": 1}).to_string();
        assert_eq!(
            E::from_message(&message(no_type.as_bytes(), &[])),
            Err(DecodeError::MissingField("eventType"))
        );
        let no_payload = json!({"eventId": id, "eventType": "a", "version": "1"}).to_string();
        assert_eq!(
            E::from_message(&message(no_payload.as_bytes(), &[])),
            Err(DecodeError::MissingField("payload"))
        );
        let bad_id =
            json!({"eventId": "nope", "eventType": "a", "version": "1", "payload": 1}).to_string();
        assert!(matches!(
            E::from_message(&message(bad_id.as_bytes(), &[])),
            Err(DecodeError::InvalidField {
                field: "eventId",
                ..
            })
        ));
        let bad_ts = json!({"eventId": id, "eventType": "a", "version": "1", "timestamp": "yesterday", "payload": 1}).to_string();
        assert!(matches!(
            E::from_message(&message(bad_ts.as_bytes(), &[])),
            Err(DecodeError::InvalidField {
                field: "timestamp",
                ..
            })
        ));
        let ok = json!({"eventId": id, "eventType": "a", "version": "1", "payload": 1}).to_string();
        assert!(matches!(
            E::from_message(&message(ok.as_bytes(), &[(HEADER_EVENT_TYPE, b"\xff\xfe")])),
            Err(DecodeError::BadHeader {
                name: HEADER_EVENT_TYPE,
                ..
            })
        ));
        assert!(matches!(
            E::from_message(&message(ok.as_bytes(), &[(HEADER_EVENT_TYPE, b"b")])),
            Err(DecodeError::HeaderMismatch {
                name: HEADER_EVENT_TYPE,
                ..
            })
        ));
        assert!(matches!(
            EventEnvelope::<String>::from_message(&message(ok.as_bytes(), &[])),
            Err(DecodeError::Payload(_))
        ));
    }

    #[test]
    fn headers_and_message_timestamp_fill_gaps() {
        let id = Uuid::new_v4().to_string();
        let body = json!({"payload": {"a": 1}}).to_string();
        let m = message(
            body.as_bytes(),
            &[
                (HEADER_EVENT_ID, id.as_bytes()),
                (HEADER_EVENT_TYPE, b"from.header"),
                (HEADER_EVENT_VERSION, b"9"),
                ("x-extra", b"1"),
            ],
        );
        let e = EventEnvelope::<serde_json::Value>::from_message(&m).unwrap();
        assert_eq!(e.event_id().to_string(), id);
        assert_eq!(e.event_type(), "from.header");
        assert_eq!(e.version(), "9");
        assert_eq!(
            e.timestamp().unix_timestamp_nanos() / 1_000_000,
            1_700_000_000_000
        );
        assert_eq!(e.header("x-extra"), Some(&b"1"[..]));
        assert_eq!(e.headers().len(), 1);
        assert_eq!(e.key(), Some(&b"k"[..]));
        #[derive(Deserialize, Debug, PartialEq)]
        struct A {
            a: u32,
        }
        assert_eq!(e.decode_payload::<A>().unwrap().payload(), &A { a: 1 });
    }

    #[test]
    fn a_message_timestamp_outside_rfc3339_years_is_a_typed_error() {
        // Found by fuzzing (fuzz/corpus/envelope_decode/kafka_ts_year_zero): a
        // Kafka timestamp before year 0 decoded into an envelope that could not be
        // encoded again.
        let id = Uuid::new_v4().to_string();
        let body = json!({"eventId": id, "eventType": "t", "version": "1", "payload": {}});
        let body = body.to_string();
        for ms in [
            -62_167_219_201_000_i64,
            253_402_300_800_000,
            i64::MIN,
            i64::MAX,
        ] {
            let m = OwnedMessage::new(
                Some(body.as_bytes().to_vec()),
                None,
                "t".into(),
                Timestamp::CreateTime(ms),
                0,
                0,
                None,
            );
            let decoded = EventEnvelope::<serde_json::Value>::from_message(&m);
            assert!(
                matches!(
                    decoded,
                    Err(DecodeError::InvalidField {
                        field: "timestamp",
                        ..
                    })
                ),
                "{ms}: {decoded:?}"
            );
        }
        // The edges are accepted and encode again.
        for ms in [-62_167_219_200_000_i64, 253_402_300_799_999] {
            let m = OwnedMessage::new(
                Some(body.as_bytes().to_vec()),
                None,
                "t".into(),
                Timestamp::LogAppendTime(ms),
                0,
                0,
                None,
            );
            let e = EventEnvelope::<serde_json::Value>::from_message(&m).unwrap();
            assert_eq!(e.timestamp_ms(), ms);
            assert!(e.encode().is_ok());
        }
    }
}
