//! Names of the provenance headers a dead-lettered message carries.
//!
//! The original headers come first, unchanged; these are appended. Values are UTF-8
//! text (numbers in decimal).

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
