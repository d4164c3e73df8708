//! Decoding a fetched message into an event envelope.
//!
//! TEMPORARY stand-in until `kafka::envelope` (written in parallel) lands; then this
//! module only adapts [`ReceivedMessage`] to the envelope's own decoder.

use super::event::ReceivedMessage;
use serde::Deserialize;

/// The decoded envelope of an event.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EventEnvelope {
    /// Event id.
    #[serde(alias = "id")]
    pub event_id: String,
    /// Event type, used for routing.
    pub event_type: String,
    /// Schema version.
    #[serde(default)]
    pub version: String,
    /// Payload, raw JSON.
    pub payload: serde_json::Value,
}

/// A message that is not a valid event envelope.
#[derive(Debug, thiserror::Error)]
#[error("message is not a valid event envelope: {0}")]
pub struct DecodeError(String);

pub(crate) fn decode(message: &ReceivedMessage) -> Result<EventEnvelope, DecodeError> {
    let payload = message
        .payload()
        .ok_or_else(|| DecodeError("empty payload".into()))?;
    serde_json::from_slice(payload).map_err(|e| DecodeError(e.to_string()))
}
