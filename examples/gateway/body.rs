//! The request bodies of `POST /events/{topic}` and `POST /events/{topic}/batch`
//! and their checks, turning them into event envelopes.
//!
//! Kept apart from the HTTP handlers and free of axum (serde, serde_json, uuid
//! and keel only) so that the fuzz target `gateway_bodies` compiles this very
//! file (`#[path]`) and fuzzes what the gateway runs. `http.rs` turns a
//! [`BodyError`] into a problem answer (`problem.rs`).

use keel::kafka::envelope::EventEnvelope;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

/// Longest `eventType` and `version`, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// A refused body: 400, or 413 when it is too large.
#[derive(Clone, Debug, PartialEq)]
pub struct BodyError {
    /// 413 (too large) rather than 400.
    pub too_large: bool,
    /// What is wrong, for the client.
    pub detail: String,
    /// For a batch: `{"index", "status", "detail"}` per invalid event.
    pub errors: Vec<Value>,
}

impl BodyError {
    fn invalid(detail: impl Into<String>) -> Self {
        BodyError {
            too_large: false,
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    fn too_large(detail: impl Into<String>) -> Self {
        BodyError {
            too_large: true,
            ..BodyError::invalid(detail)
        }
    }

    /// The HTTP status: 413 or 400.
    pub fn status(&self) -> u16 {
        if self.too_large { 413 } else { 400 }
    }
}

/// The body of `POST /events/{topic}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventBody {
    event_type: String,
    #[serde(default = "default_version")]
    version: String,
    /// Required: an event without a payload is a client's mistake. (`Value`'s
    /// `null` is kept apart from a missing field by the `Option`.)
    #[serde(default, deserialize_with = "present")]
    payload: Option<Value>,
    #[serde(default)]
    key: Option<String>,
    /// The client's id for the event: a retry with the same id can be
    /// deduplicated by consumers.
    #[serde(default)]
    event_id: Option<Uuid>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

fn default_version() -> String {
    "1".to_string()
}

impl EventBody {
    /// The event as an envelope, when its names and its encoded size (envelope
    /// JSON plus key) are within bounds.
    pub fn into_envelope(self, max_event_bytes: usize) -> Result<EventEnvelope, BodyError> {
        // The type is published as sent: blank is refused, and so is a long one
        // padded with spaces.
        if self.event_type.trim().is_empty() || self.event_type.len() > MAX_NAME_LEN {
            return Err(BodyError::invalid(format!(
                "eventType must be 1 to {MAX_NAME_LEN} characters"
            )));
        }
        if self.version.is_empty() || self.version.len() > MAX_NAME_LEN {
            return Err(BodyError::invalid(format!(
                "version must be 1 to {MAX_NAME_LEN} characters"
            )));
        }
        let payload = match self.payload {
            None | Some(Value::Null) => return Err(BodyError::invalid("payload is required")),
            Some(p) => p,
        };
        let mut envelope = EventEnvelope::new(self.event_type, payload).with_version(self.version);
        if let Some(key) = self.key {
            envelope = envelope.with_key(key);
        }
        if let Some(id) = self.event_id {
            envelope = envelope.with_event_id(id);
        }
        // Checked here, before anything is enqueued: Kafka would refuse it after
        // the events before it in a batch were sent.
        let size = envelope
            .encode_value()
            .map_err(|_| BodyError::invalid("the event could not be encoded"))?
            .len()
            + envelope.key().map_or(0, <[u8]>::len);
        if size > max_event_bytes {
            return Err(BodyError::too_large(format!(
                "the event is {size} bytes encoded; at most {max_event_bytes} are accepted"
            )));
        }
        Ok(envelope)
    }
}

/// `POST /events/{topic}/batch` takes a JSON array of events, or `{"events": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum BatchBody {
    /// `[event, ...]`
    List(Vec<Value>),
    /// `{"events": [event, ...]}`
    Wrapped {
        /// The events.
        events: Vec<Value>,
    },
}

/// Checks every event of a batch before any is sent: all or nothing.
pub fn batch_envelopes(
    max_batch_events: usize,
    max_event_bytes: usize,
    events: Vec<Value>,
) -> Result<Vec<EventEnvelope>, BodyError> {
    if events.is_empty() {
        return Err(BodyError::invalid("the batch is empty"));
    }
    if events.len() > max_batch_events {
        return Err(BodyError::too_large(format!(
            "the batch has {} events; at most {max_batch_events} are accepted",
            events.len(),
        )));
    }
    let mut envelopes = Vec::with_capacity(events.len());
    let mut errors = Vec::new();
    let mut too_large = true;
    for (index, event) in events.into_iter().enumerate() {
        let checked = serde_json::from_value::<EventBody>(event)
            .map_err(|e| BodyError::invalid(format!("not a valid event: {e}")))
            .and_then(|e| e.into_envelope(max_event_bytes));
        match checked {
            Ok(envelope) => envelopes.push(envelope),
            Err(e) => {
                too_large &= e.too_large;
                errors.push(json!({ "index": index, "status": e.status(), "detail": e.detail }));
            }
        }
    }
    if errors.is_empty() {
        return Ok(envelopes);
    }
    Err(BodyError {
        too_large,
        detail: format!(
            "{} of the batch's events are invalid; none was published",
            errors.len()
        ),
        errors,
    })
}
