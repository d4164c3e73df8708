//! The `keel-retry-*` headers a record carries through the ladder, and
//! [`RetryState`], their typed form.
//!
//! The record's own key, payload and headers travel unchanged; these are
//! replaced at every hop. Values are UTF-8 text (numbers in decimal, times in
//! milliseconds since the Unix epoch). No payload is ever copied into them.

use super::error::RetryTopicError;
use crate::kafka::consumer::{ConsumedEvent, ReceivedMessage, truncate_utf8};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use serde::{Deserialize, Serialize};

/// Prefix of every retry header; headers with it are dropped before a hop writes
/// the new ones.
pub const PREFIX: &str = "keel-retry-";
/// Topic the record was first consumed from (the main topic).
pub const ORIGINAL_TOPIC: &str = "keel-retry-original-topic";
/// Partition of the main topic.
pub const ORIGINAL_PARTITION: &str = "keel-retry-original-partition";
/// Offset in the main topic.
pub const ORIGINAL_OFFSET: &str = "keel-retry-original-offset";
/// Handler calls made so far, over every hop.
pub const ATTEMPTS: &str = "keel-retry-attempts";
/// Index of the rung (retry topic) the record is in, from 0.
pub const RUNG: &str = "keel-retry-rung";
/// When the record may be handled again.
pub const DUE_AT: &str = "keel-retry-due-at";
/// `1` when the record did not fail but waits behind an earlier record of its
/// key (key-preserving mode).
pub const HELD: &str = "keel-retry-held";
/// Time of the first failure.
pub const FIRST_FAILURE_AT: &str = "keel-retry-first-failure-at";
/// Class of the first failure (`error`, `timeout`, `panic`, ...).
pub const FIRST_ERROR_KIND: &str = "keel-retry-first-error-kind";
/// Message of the first failure (at most [`MAX_HISTORY_MESSAGE`] bytes).
pub const FIRST_ERROR_MESSAGE: &str = "keel-retry-first-error-message";
/// Time of the last failure.
pub const LAST_FAILURE_AT: &str = "keel-retry-last-failure-at";
/// Class of the last failure.
pub const LAST_ERROR_KIND: &str = "keel-retry-last-error-kind";
/// Message of the last failure.
pub const LAST_ERROR_MESSAGE: &str = "keel-retry-last-error-message";
/// Every failure so far, as a JSON array of [`Failure`] (one entry per hop, so
/// at most the ladder's length plus one).
pub const HISTORY: &str = "keel-retry-history";

/// Longest error text kept per failure, in bytes: the history grows by one entry
/// per hop and must stay small next to the record.
pub const MAX_HISTORY_MESSAGE: usize = 256;

/// One failure on the way through the ladder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// When it failed, ms since the Unix epoch.
    pub at_ms: u64,
    /// Topic the record was handled from (main or retry topic).
    pub topic: String,
    /// Handler calls made from that topic.
    pub attempts: u32,
    /// Class of the error (`error`, `permanent`, `timeout`, `panic`...).
    pub kind: String,
    /// Rust type of the error.
    pub error_type: String,
    /// The error's message with its causes, cut to [`MAX_HISTORY_MESSAGE`].
    pub message: String,
}

impl Failure {
    /// A failure with its message cut to [`MAX_HISTORY_MESSAGE`].
    pub fn new(
        at_ms: u64,
        topic: impl Into<String>,
        attempts: u32,
        kind: impl Into<String>,
        error_type: impl Into<String>,
        message: &str,
    ) -> Self {
        Failure {
            at_ms,
            topic: topic.into(),
            attempts,
            kind: kind.into(),
            error_type: error_type.into(),
            message: truncate_utf8(message, MAX_HISTORY_MESSAGE).into_owned(),
        }
    }
}

/// Where a record is on the ladder: what its `keel-retry-*` headers say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryState {
    /// The main topic.
    pub original_topic: String,
    /// Its partition.
    pub original_partition: i32,
    /// The record's offset there.
    pub original_offset: i64,
    /// Handler calls made so far.
    pub attempts: u32,
    /// The rung the record is in (or goes to).
    pub rung: usize,
    /// When it may be handled, ms since the Unix epoch.
    pub due_at_ms: u64,
    /// Waiting behind an earlier record of its key, not failed itself.
    pub held: bool,
    /// Its failures, oldest first.
    pub history: Vec<Failure>,
}

impl RetryState {
    /// The state of a consumed event: `None` when it comes from the main topic.
    /// A handler uses it to see where a record is (`history.len()` is how often it
    /// failed).
    pub fn of(event: &ConsumedEvent) -> Result<Option<Self>, RetryTopicError> {
        Self::from_message(event.message())
    }

    /// The state in `message`'s headers; `None` when it has no retry headers.
    pub fn from_message(message: &ReceivedMessage) -> Result<Option<Self>, RetryTopicError> {
        let Some(topic) = message.header(ORIGINAL_TOPIC) else {
            return Ok(None);
        };
        let text = |name: &'static str| -> Result<&str, RetryTopicError> {
            let raw = message.header(name).ok_or(RetryTopicError::BadHeader {
                header: name,
                problem: "missing".into(),
            })?;
            std::str::from_utf8(raw).map_err(|_| RetryTopicError::BadHeader {
                header: name,
                problem: "not UTF-8".into(),
            })
        };
        fn number<T: std::str::FromStr>(
            name: &'static str,
            value: &str,
        ) -> Result<T, RetryTopicError> {
            value.parse().map_err(|_| RetryTopicError::BadHeader {
                header: name,
                problem: "not a number".into(),
            })
        }
        let original_topic = std::str::from_utf8(topic)
            .map_err(|_| RetryTopicError::BadHeader {
                header: ORIGINAL_TOPIC,
                problem: "not UTF-8".into(),
            })?
            .to_string();
        let history = match message.header(HISTORY) {
            None => Vec::new(),
            Some(raw) => serde_json::from_slice(raw).map_err(|e| RetryTopicError::BadHeader {
                header: HISTORY,
                problem: e.to_string(),
            })?,
        };
        Ok(Some(RetryState {
            original_topic,
            original_partition: number(ORIGINAL_PARTITION, text(ORIGINAL_PARTITION)?)?,
            original_offset: number(ORIGINAL_OFFSET, text(ORIGINAL_OFFSET)?)?,
            attempts: number(ATTEMPTS, text(ATTEMPTS)?)?,
            rung: number(RUNG, text(RUNG)?)?,
            due_at_ms: number(DUE_AT, text(DUE_AT)?)?,
            held: message.header(HELD) == Some(b"1"),
            history,
        }))
    }

    /// `message`'s own headers without any `keel-retry-*` one, then this state's.
    pub(crate) fn headers(&self, message: &ReceivedMessage) -> OwnedHeaders {
        let mut h = OwnedHeaders::new();
        if let Some(originals) = message.headers() {
            for original in originals.iter() {
                if !original.key.starts_with(PREFIX) {
                    h = h.insert(original);
                }
            }
        }
        self.append(h)
    }

    /// Appends this state's headers to `h`.
    pub(crate) fn append(&self, mut h: OwnedHeaders) -> OwnedHeaders {
        let text = |h: OwnedHeaders, key: &str, value: &str| {
            h.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        };
        h = text(h, ORIGINAL_TOPIC, &self.original_topic);
        h = text(h, ORIGINAL_PARTITION, &self.original_partition.to_string());
        h = text(h, ORIGINAL_OFFSET, &self.original_offset.to_string());
        h = text(h, ATTEMPTS, &self.attempts.to_string());
        h = text(h, RUNG, &self.rung.to_string());
        h = text(h, DUE_AT, &self.due_at_ms.to_string());
        if self.held {
            h = text(h, HELD, "1");
        }
        if let (Some(first), Some(last)) = (self.history.first(), self.history.last()) {
            h = text(h, FIRST_FAILURE_AT, &first.at_ms.to_string());
            h = text(h, FIRST_ERROR_KIND, &first.kind);
            h = text(h, FIRST_ERROR_MESSAGE, &first.message);
            h = text(h, LAST_FAILURE_AT, &last.at_ms.to_string());
            h = text(h, LAST_ERROR_KIND, &last.kind);
            h = text(h, LAST_ERROR_MESSAGE, &last.message);
        }
        // Serializing plain strings and numbers cannot fail.
        let history = serde_json::to_string(&self.history).unwrap_or_else(|_| "[]".into());
        text(h, HISTORY, &history)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{OwnedMessage, Timestamp};

    fn message(headers: OwnedHeaders) -> ReceivedMessage {
        ReceivedMessage::new(OwnedMessage::new(
            Some(b"{}".to_vec()),
            Some(b"k".to_vec()),
            "orders.retry.1s".into(),
            Timestamp::NotAvailable,
            0,
            3,
            Some(headers),
        ))
    }

    #[test]
    fn state_survives_a_round_trip_and_replaces_old_headers() {
        let mut state = RetryState {
            original_topic: "orders".into(),
            original_partition: 2,
            original_offset: 41,
            attempts: 1,
            rung: 0,
            due_at_ms: 1_000,
            held: false,
            history: vec![Failure::new(10, "orders", 1, "error", "E", "boom")],
        };
        let own = OwnedHeaders::new().insert(Header {
            key: "event-type",
            value: Some(b"order.created".as_slice()),
        });
        let first = message(state.append(own));
        assert_eq!(RetryState::from_message(&first).unwrap().unwrap(), state);
        // The next hop keeps the record's own headers, replaces the retry ones.
        state.rung = 1;
        state.attempts = 2;
        state.history.push(Failure::new(
            20,
            "orders.retry.1s",
            1,
            "timeout",
            "T",
            "slow",
        ));
        let second = message(state.headers(&first));
        assert_eq!(RetryState::from_message(&second).unwrap().unwrap(), state);
        let names: Vec<String> = second
            .headers()
            .unwrap()
            .iter()
            .map(|h| h.key.to_string())
            .collect();
        assert_eq!(names.iter().filter(|n| *n == RUNG).count(), 1);
        assert_eq!(names[0], "event-type");
        assert_eq!(second.header(FIRST_ERROR_MESSAGE), Some(b"boom".as_slice()));
        assert_eq!(second.header(LAST_ERROR_KIND), Some(b"timeout".as_slice()));
    }

    #[test]
    fn no_headers_is_none_and_bad_ones_are_typed_errors() {
        assert_eq!(
            RetryState::from_message(&message(OwnedHeaders::new())).unwrap(),
            None
        );
        let bad = OwnedHeaders::new()
            .insert(Header {
                key: ORIGINAL_TOPIC,
                value: Some(b"orders".as_slice()),
            })
            .insert(Header {
                key: ORIGINAL_PARTITION,
                value: Some(b"x".as_slice()),
            });
        assert!(matches!(
            RetryState::from_message(&message(bad)),
            Err(RetryTopicError::BadHeader {
                header: ORIGINAL_PARTITION,
                ..
            })
        ));
    }

    #[test]
    fn long_errors_are_cut() {
        let f = Failure::new(0, "t", 1, "error", "E", &"x".repeat(10_000));
        assert!(f.message.len() <= MAX_HISTORY_MESSAGE + 20);
    }
}
