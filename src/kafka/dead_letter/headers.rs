//! Names of the provenance headers a dead-lettered message carries, and
//! [`Provenance`], which writes them and reads them back.
//!
//! The original headers come first, unchanged; these are appended. Values are UTF-8
//! text (numbers in decimal). A message dead-lettered twice (replayed, failed
//! again) carries two sets: the later one, appended last, is the one that counts,
//! so [`Provenance::read`] takes the last header of each name.
//!
//! ```
//! use keel::kafka::consumer::{ReceivedMessage, Timestamp};
//! use keel::kafka::dead_letter::DeadLetterReason;
//! use keel::kafka::dead_letter::headers::Provenance;
//! use rdkafka::message::{OwnedHeaders, OwnedMessage};
//! use std::time::UNIX_EPOCH;
//!
//! let message = ReceivedMessage::new(OwnedMessage::new(
//!     None, None, "orders".into(), Timestamp::CreateTime(5), 2, 40, None,
//! ));
//! let reason = DeadLetterReason {
//!     kind: "permanent".into(),
//!     error_type: "MyError".into(),
//!     message: "bad order".into(),
//!     attempts: 1,
//! };
//! let written = Provenance::of(&message, "billing", &reason, UNIX_EPOCH);
//! let headers = written.append_to(OwnedHeaders::new());
//! let read = Provenance::read(&headers).unwrap();
//! assert_eq!(read, written);
//! assert_eq!((read.topic.as_str(), read.partition, read.offset), ("orders", 2, 40));
//! ```

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use rdkafka::message::{Header, Headers, OwnedHeaders, Timestamp};

use super::publisher::{DeadLetterReason, MAX_ERROR_MESSAGE};
use crate::kafka::consumer::ReceivedMessage;
use crate::kafka::consumer::truncate_utf8;

/// Topic the message was consumed from.
pub const ORIGINAL_TOPIC: &str = "keel-dlq-original-topic";
/// Partition the message was consumed from.
pub const ORIGINAL_PARTITION: &str = "keel-dlq-original-partition";
/// Offset of the message in that partition.
pub const ORIGINAL_OFFSET: &str = "keel-dlq-original-offset";
/// The message's timestamp, milliseconds since the Unix epoch (absent when the
/// message had none).
pub const ORIGINAL_TIMESTAMP: &str = "keel-dlq-original-timestamp";
/// `CreateTime`, `LogAppendTime` or `NotAvailable`.
pub const ORIGINAL_TIMESTAMP_TYPE: &str = "keel-dlq-original-timestamp-type";
/// Consumer group that gave up on the message.
pub const CONSUMER_GROUP: &str = "keel-dlq-consumer-group";
/// Short class of the failure: `error`, `permanent`, `decode`,
/// `unknown_event_type`, `panic`, `timeout`, or a class set by the handler.
pub const ERROR_KIND: &str = "keel-dlq-error-kind";
/// Rust type name of the error (Spring's "exception class").
pub const ERROR_TYPE: &str = "keel-dlq-error-type";
/// The error message with its chain of causes (`outer: cause: root`), at most
/// [`MAX_ERROR_MESSAGE`](super::MAX_ERROR_MESSAGE) bytes.
pub const ERROR_MESSAGE: &str = "keel-dlq-error-message";
/// How many times the handler was called (0 for an undecodable message).
pub const ATTEMPTS: &str = "keel-dlq-attempts";
/// When the message was dead-lettered, milliseconds since the Unix epoch.
pub const FAILED_AT: &str = "keel-dlq-failed-at";

/// On a replayed record ([`replay`](super::replay)): how many times it was
/// replayed (1 the first time; a record dead-lettered again keeps it among its
/// headers, so the next replay counts on).
pub const REPLAY_COUNT: &str = "keel-replay-count";
/// On a replayed record: where it was replayed from, `<dlq topic>/<partition>@<offset>`.
pub const REPLAYED_FROM: &str = "keel-replayed-from";

/// Every provenance header, in the order they are appended.
pub const ALL: [&str; 11] = [
    ORIGINAL_TOPIC,
    ORIGINAL_PARTITION,
    ORIGINAL_OFFSET,
    ORIGINAL_TIMESTAMP,
    ORIGINAL_TIMESTAMP_TYPE,
    CONSUMER_GROUP,
    ERROR_KIND,
    ERROR_TYPE,
    ERROR_MESSAGE,
    ATTEMPTS,
    FAILED_AT,
];

/// Where a dead-lettered message came from and why it failed: what the
/// provenance headers say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provenance {
    /// [`ORIGINAL_TOPIC`].
    pub topic: String,
    /// [`ORIGINAL_PARTITION`].
    pub partition: i32,
    /// [`ORIGINAL_OFFSET`].
    pub offset: i64,
    /// [`ORIGINAL_TIMESTAMP`] with [`ORIGINAL_TIMESTAMP_TYPE`].
    pub timestamp: Timestamp,
    /// [`CONSUMER_GROUP`].
    pub consumer_group: String,
    /// [`ERROR_KIND`].
    pub error_kind: String,
    /// [`ERROR_TYPE`].
    pub error_type: String,
    /// [`ERROR_MESSAGE`], at most [`MAX_ERROR_MESSAGE`] bytes.
    pub error_message: String,
    /// [`ATTEMPTS`].
    pub attempts: u32,
    /// [`FAILED_AT`], milliseconds since the Unix epoch.
    pub failed_at_ms: u64,
}

/// A provenance header that is missing or cannot be read. Names the header,
/// never its value (a value can be anything a producer wrote).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProvenanceError {
    /// No header of that name (or one without a value).
    Missing(&'static str),
    /// Its value is not UTF-8, not a number in range, or not a timestamp type.
    Invalid(&'static str),
}

impl ProvenanceError {
    /// The header at fault.
    pub fn header(&self) -> &'static str {
        match self {
            ProvenanceError::Missing(h) | ProvenanceError::Invalid(h) => h,
        }
    }
}

impl fmt::Display for ProvenanceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProvenanceError::Missing(h) => write!(f, "dead-letter header {h} is missing"),
            ProvenanceError::Invalid(h) => write!(f, "dead-letter header {h} is not valid"),
        }
    }
}

impl std::error::Error for ProvenanceError {}

impl Provenance {
    /// The provenance of `message`, dead-lettered by `group` at `failed_at` for
    /// `reason` (its message cut to [`MAX_ERROR_MESSAGE`] bytes: an error text can
    /// be a whole response body, and the record must still fit).
    pub fn of(
        message: &ReceivedMessage,
        group: &str,
        reason: &DeadLetterReason,
        failed_at: SystemTime,
    ) -> Self {
        Provenance {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp(),
            consumer_group: group.to_string(),
            error_kind: reason.kind.clone(),
            error_type: reason.error_type.clone(),
            error_message: truncate_utf8(&reason.message, MAX_ERROR_MESSAGE).into_owned(),
            attempts: reason.attempts,
            failed_at_ms: failed_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// `headers` with the provenance headers appended ([`ORIGINAL_TIMESTAMP`]
    /// only when the message had a timestamp).
    pub fn append_to(&self, headers: OwnedHeaders) -> OwnedHeaders {
        let text = |h: OwnedHeaders, key: &str, value: &str| {
            h.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        };
        let (ts, ts_type) = match self.timestamp {
            Timestamp::NotAvailable => (None, "NotAvailable"),
            Timestamp::CreateTime(ms) => (Some(ms), "CreateTime"),
            Timestamp::LogAppendTime(ms) => (Some(ms), "LogAppendTime"),
        };
        let mut h = text(headers, ORIGINAL_TOPIC, &self.topic);
        h = text(h, ORIGINAL_PARTITION, &self.partition.to_string());
        h = text(h, ORIGINAL_OFFSET, &self.offset.to_string());
        if let Some(ts) = ts {
            h = text(h, ORIGINAL_TIMESTAMP, &ts.to_string());
        }
        h = text(h, ORIGINAL_TIMESTAMP_TYPE, ts_type);
        h = text(h, CONSUMER_GROUP, &self.consumer_group);
        h = text(h, ERROR_KIND, &self.error_kind);
        h = text(h, ERROR_TYPE, &self.error_type);
        h = text(h, ERROR_MESSAGE, &self.error_message);
        h = text(h, ATTEMPTS, &self.attempts.to_string());
        text(h, FAILED_AT, &self.failed_at_ms.to_string())
    }

    /// Reads the provenance from a dead-lettered message's headers, the last
    /// header of each name winning. For a message fetched with rdkafka directly,
    /// copy it into a [`ReceivedMessage`] first: rdkafka's own header accessors
    /// panic on a name that is not UTF-8, the copy does not.
    pub fn read<H: Headers>(headers: &H) -> Result<Self, ProvenanceError> {
        Self::read_raw(headers.iter().map(|h| (h.key.as_bytes(), h.value)))
    }

    /// [`read`](Self::read) over raw `(name, value)` pairs, whose names may be
    /// any bytes (names that are not UTF-8 never match a provenance header).
    pub fn read_raw<'a>(
        pairs: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> Result<Self, ProvenanceError> {
        let mut found: [Option<Option<&'a [u8]>>; ALL.len()] = [None; ALL.len()];
        for (name, value) in pairs {
            if let Some(i) = ALL.iter().position(|h| h.as_bytes() == name) {
                found[i] = Some(value);
            }
        }
        let text = |name: &'static str| -> Result<&'a str, ProvenanceError> {
            let i = ALL
                .iter()
                .position(|h| *h == name)
                .expect("a provenance header");
            let value = found[i].flatten().ok_or(ProvenanceError::Missing(name))?;
            std::str::from_utf8(value).map_err(|_| ProvenanceError::Invalid(name))
        };
        fn number<T: std::str::FromStr>(
            name: &'static str,
            text: &str,
        ) -> Result<T, ProvenanceError> {
            text.parse().map_err(|_| ProvenanceError::Invalid(name))
        }
        // Only read when the type says there is one: an older, stale
        // ORIGINAL_TIMESTAMP may be left from an earlier dead-lettering.
        let timestamp = match text(ORIGINAL_TIMESTAMP_TYPE)? {
            "NotAvailable" => Timestamp::NotAvailable,
            "CreateTime" => {
                Timestamp::CreateTime(number(ORIGINAL_TIMESTAMP, text(ORIGINAL_TIMESTAMP)?)?)
            }
            "LogAppendTime" => {
                Timestamp::LogAppendTime(number(ORIGINAL_TIMESTAMP, text(ORIGINAL_TIMESTAMP)?)?)
            }
            _ => return Err(ProvenanceError::Invalid(ORIGINAL_TIMESTAMP_TYPE)),
        };
        Ok(Provenance {
            topic: text(ORIGINAL_TOPIC)?.to_string(),
            partition: number(ORIGINAL_PARTITION, text(ORIGINAL_PARTITION)?)?,
            offset: number(ORIGINAL_OFFSET, text(ORIGINAL_OFFSET)?)?,
            timestamp,
            consumer_group: text(CONSUMER_GROUP)?.to_string(),
            error_kind: text(ERROR_KIND)?.to_string(),
            error_type: text(ERROR_TYPE)?.to_string(),
            error_message: text(ERROR_MESSAGE)?.to_string(),
            attempts: number(ATTEMPTS, text(ATTEMPTS)?)?,
            failed_at_ms: number(FAILED_AT, text(FAILED_AT)?)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::OwnedMessage;

    fn failed(timestamp: Timestamp, headers: Option<OwnedHeaders>, attempts: u32) -> Provenance {
        let message = ReceivedMessage::new(OwnedMessage::new(
            Some(b"v".to_vec()),
            None,
            "orders".into(),
            timestamp,
            1,
            7,
            headers,
        ));
        let reason = DeadLetterReason {
            kind: "error".into(),
            error_type: "E".into(),
            message: "x".repeat(MAX_ERROR_MESSAGE + 1),
            attempts,
        };
        Provenance::of(&message, "g", &reason, UNIX_EPOCH)
    }

    #[test]
    fn a_second_dead_lettering_reads_as_the_later_one() {
        let first = failed(Timestamp::CreateTime(5), None, 3);
        assert!(first.error_message.len() <= MAX_ERROR_MESSAGE);
        assert!(first.error_message.ends_with("…(truncated)"));
        let once = first.append_to(OwnedHeaders::new());
        assert_eq!(Provenance::read(&once), Ok(first));
        // Replayed without a timestamp, failed again: the stale timestamp of the
        // first set must not be read.
        let second = failed(Timestamp::NotAvailable, Some(once), 1);
        let twice = second.append_to(OwnedHeaders::new());
        let read = Provenance::read(&twice).unwrap();
        assert_eq!(read, second);
        assert_eq!(read.timestamp, Timestamp::NotAvailable);
        assert_eq!(read.attempts, 1);
    }

    #[test]
    fn a_missing_or_bad_header_is_named_not_shown() {
        let written = failed(Timestamp::LogAppendTime(9), None, 2);
        let pairs: Vec<(Vec<u8>, Option<Vec<u8>>)> = written
            .append_to(OwnedHeaders::new())
            .iter()
            .map(|h| (h.key.as_bytes().to_vec(), h.value.map(<[u8]>::to_vec)))
            .collect();
        let without = |name: &str| {
            Provenance::read_raw(
                pairs
                    .iter()
                    .filter(|(n, _)| n.as_slice() != name.as_bytes())
                    .map(|(n, v)| (n.as_slice(), v.as_deref())),
            )
        };
        assert_eq!(without(ATTEMPTS), Err(ProvenanceError::Missing(ATTEMPTS)));
        assert_eq!(
            without(ORIGINAL_TIMESTAMP),
            Err(ProvenanceError::Missing(ORIGINAL_TIMESTAMP))
        );
        let bad = Provenance::read_raw(
            pairs
                .iter()
                .map(|(n, v)| (n.as_slice(), v.as_deref()))
                .chain([(ORIGINAL_OFFSET.as_bytes(), Some(&b"secret-ish"[..]))]),
        )
        .unwrap_err();
        assert_eq!(bad, ProvenanceError::Invalid(ORIGINAL_OFFSET));
        assert!(!bad.to_string().contains("secret-ish"));
    }
}
