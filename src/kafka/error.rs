//! Kafka error types: what went wrong, on which topic, and whether retrying helps.
//!
//! - [`KafkaProducerError`]: a publish failed. Carries the topic, a
//!   [`ProducerErrorKind`] and the underlying cause, and implements
//!   [`ClassifiedError`] so keel's circuit breaker, metrics and retry layers count it
//!   correctly: a message that is too large or cannot be serialized is a
//!   *permanent* failure (retrying cannot fix it), a full queue or a transport
//!   failure is *retryable*, and a publish whose outcome is unknown
//!   ([`ProducerErrorKind::OutcomeUnknown`]: no acknowledgement in time, the record
//!   may have been stored) is *not* retryable by default: a blind retry would
//!   duplicate it. A failed batch says what became of each event
//!   ([`BatchOutcome::events`]).
//! - [`KafkaClientError`]: the client could not be created, a health check's
//!   metadata request failed, or `disconnect` ran out of time.
//! - [`DecodeError`](crate::kafka::envelope::DecodeError) (in the envelope
//!   module): a message is not a keel event.
//! - [`ConfigError`](crate::kafka::config::ConfigError) (in the config module):
//!   a configuration value is invalid.
//!
//! # Example
//!
//! ```
//! use keel::kafka::error::{KafkaProducerError, ProducerErrorKind};
//! use keel::layers::classify::ClassifiedError;
//!
//! let err = KafkaProducerError::new("orders", ProducerErrorKind::MessageTooLarge);
//! assert_eq!(err.topic(), "orders");
//! assert!(!err.classification().retryable);
//! assert!(KafkaProducerError::new("orders", ProducerErrorKind::QueueFull)
//!     .classification()
//!     .retryable);
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use keel_layers::classify::{Classification, ClassifiedError};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use serde::ser::{Serialize, SerializeStruct, Serializer};
use uuid::Uuid;

/// A boxed error cause.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What kind of failure a publish met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProducerErrorKind {
    /// Kafka is turned off (`ENABLE_KAFKA=false`). Permanent.
    Disabled,
    /// librdkafka's local queue is full (`queue.buffering.max.messages` /
    /// `.kbytes`). Retryable once deliveries drain the queue.
    QueueFull,
    /// The message is larger than `message.max.bytes` or the broker's limit. Permanent.
    MessageTooLarge,
    /// The batch holds more events than the configured maximum. Permanent;
    /// refused before any I/O.
    BatchTooLarge {
        /// Events in the batch.
        size: usize,
        /// The largest batch accepted.
        max: usize,
    },
    /// A request timed out before the event was handed to the broker (a
    /// transaction step, a flush). Retryable. A publish whose acknowledgement did
    /// not come in time is [`OutcomeUnknown`](Self::OutcomeUnknown) instead.
    Timeout,
    /// No acknowledgement came in time, and the event **may have been stored**:
    /// librdkafka's delivery timeout (`message.timeout.ms`) expired while it was
    /// in flight, the broker's answer was lost (transport failure, request timed
    /// out, not enough replicas *after* append), the publish stack's timeout fired
    /// while the record was still in librdkafka's queue (it is often delivered
    /// later), or a transaction's commit timed out. Not retryable by keel's retry
    /// layer: a retry would duplicate a stored event. Resend only with the same
    /// event id, to consumers that deduplicate on it
    /// ([`EventEnvelope::with_event_id`](crate::kafka::envelope::EventEnvelope::with_event_id)).
    OutcomeUnknown,
    /// The broker connection failed (all brokers down, transport failure, name
    /// resolution). Retryable.
    Transport,
    /// The broker answered with an error code. Retryable when Kafka says so
    /// (not enough replicas, leader not available, ...).
    Broker(RDKafkaErrorCode),
    /// The topic does not exist or is invalid. Permanent.
    UnknownTopic,
    /// Authentication or authorization failed. Permanent.
    Authorization,
    /// The event could not be serialized to JSON. Permanent.
    Serialization,
    /// A transaction step (init, begin, commit, abort) failed.
    Transaction {
        /// The whole transaction may be retried (after an abort, when required).
        retriable: bool,
        /// The transaction must be aborted before the producer can go on.
        requires_abort: bool,
        /// The producer is unusable (fenced, fatal idempotence error). Permanent.
        fatal: bool,
    },
    /// The producer hit a fatal error (fenced, idempotence invariant broken)
    /// and must be recreated. Permanent.
    Fatal,
    /// The producer is shutting down or was purged before delivery. Permanent.
    ShuttingDown,
    /// The operation was canceled before it finished. Retryable. (A lost delivery
    /// report is [`OutcomeUnknown`](Self::OutcomeUnknown).)
    Canceled,
    /// The publish stack's circuit breaker refused the call without touching
    /// Kafka. Permanent for this call (retrying into an open breaker only burns
    /// attempts); the breaker probes again after its open wait.
    CircuitOpen,
    /// Anything else librdkafka reported. Retryable.
    Other,
}

impl ProducerErrorKind {
    /// Maps an error code from librdkafka or the broker.
    pub fn from_code(code: RDKafkaErrorCode) -> Self {
        use RDKafkaErrorCode as C;
        match code {
            C::QueueFull => ProducerErrorKind::QueueFull,
            C::MessageSizeTooLarge | C::MessageBatchTooLarge => ProducerErrorKind::MessageTooLarge,
            C::MessageTimedOut => ProducerErrorKind::OutcomeUnknown,
            C::OperationTimedOut | C::RequestTimedOut => ProducerErrorKind::Timeout,
            C::AllBrokersDown | C::BrokerTransportFailure | C::Resolve | C::NetworkException => {
                ProducerErrorKind::Transport
            }
            C::UnknownTopic
            | C::UnknownTopicOrPartition
            | C::UnknownPartition
            | C::InvalidTopic => ProducerErrorKind::UnknownTopic,
            C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication => ProducerErrorKind::Authorization,
            C::Fatal | C::ProducerFenced | C::InvalidProducerEpoch => ProducerErrorKind::Fatal,
            C::PurgeQueue | C::PurgeInflight | C::BrokerDestroy => ProducerErrorKind::ShuttingDown,
            other => ProducerErrorKind::Broker(other),
        }
    }

    /// Maps an rdkafka error.
    pub fn from_kafka_error(err: &KafkaError) -> Self {
        match err {
            KafkaError::Canceled => ProducerErrorKind::Canceled,
            KafkaError::Transaction(e) => ProducerErrorKind::Transaction {
                retriable: e.is_retriable(),
                requires_abort: e.txn_requires_abort(),
                fatal: e.is_fatal(),
            },
            other => match other.rdkafka_error_code() {
                Some(code) => Self::from_code(code),
                None => ProducerErrorKind::Other,
            },
        }
    }

    /// Maps the error of a delivery report: an event that was handed to
    /// librdkafka and failed afterwards. Errors after which the broker may have
    /// stored the event (it was in flight when the delivery timeout expired, or
    /// the answer was lost) are [`OutcomeUnknown`](Self::OutcomeUnknown), the rest
    /// as [`from_kafka_error`](Self::from_kafka_error). librdkafka keeps the
    /// message's persistence status (`rd_kafka_message_status`) to itself in
    /// rdkafka's safe API, so the code decides.
    pub fn from_delivery_error(err: &KafkaError) -> Self {
        use RDKafkaErrorCode as C;
        match err.rdkafka_error_code() {
            Some(
                C::MessageTimedOut
                | C::OperationTimedOut
                | C::RequestTimedOut
                | C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::NetworkException
                | C::NotEnoughReplicasAfterAppend,
            ) => ProducerErrorKind::OutcomeUnknown,
            _ => Self::from_kafka_error(err),
        }
    }

    /// `true` for [`OutcomeUnknown`](Self::OutcomeUnknown): the event may have been stored.
    pub fn may_have_been_delivered(&self) -> bool {
        matches!(self, ProducerErrorKind::OutcomeUnknown)
    }

    /// How a failure of this kind counts for keel's layers.
    pub fn classification(&self) -> Classification {
        use ProducerErrorKind as K;
        match self {
            K::Disabled => Classification::permanent_failure("disabled"),
            K::QueueFull => Classification::failure(CLASS_QUEUE_FULL)
                // librdkafka drains the queue at its own pace; a short floor avoids a
                // hot retry loop.
                .with_retry_after(Duration::from_millis(100)),
            K::MessageTooLarge => Classification::permanent_failure("message_too_large"),
            K::BatchTooLarge { .. } => Classification::permanent_failure("batch_too_large"),
            K::Timeout => Classification::failure("timeout"),
            K::OutcomeUnknown => Classification::permanent_failure(CLASS_OUTCOME_UNKNOWN),
            K::Transport => Classification::failure("transport"),
            K::Broker(code) => {
                Classification::failure("broker").with_retryable(broker_code_is_retriable(*code))
            }
            K::UnknownTopic => Classification::permanent_failure("unknown_topic"),
            K::Authorization => Classification::permanent_failure("authorization"),
            K::Serialization => Classification::permanent_failure("serialization"),
            K::Transaction {
                retriable, fatal, ..
            } => Classification::failure("transaction").with_retryable(*retriable && !*fatal),
            K::Fatal => Classification::permanent_failure("fatal"),
            K::ShuttingDown => Classification::permanent_failure("shutting_down"),
            K::Canceled => Classification::failure("canceled"),
            K::CircuitOpen => Classification::permanent_failure("circuit_open"),
            K::Other => Classification::failure("kafka"),
        }
    }
}

/// The [`Classification::class`] of [`ProducerErrorKind::QueueFull`]:
/// back-pressure from librdkafka's local queue, not a sign of a Kafka outage.
pub const CLASS_QUEUE_FULL: &str = "queue_full";
/// The [`Classification::class`] of [`ProducerErrorKind::OutcomeUnknown`]: a
/// failure (it counts towards opening the publish breaker) that is not retryable.
pub const CLASS_OUTCOME_UNKNOWN: &str = "outcome_unknown";

/// Broker error codes that Kafka documents as retriable.
fn broker_code_is_retriable(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::RequestTimedOut
            | C::NetworkException
            | C::CoordinatorLoadInProgress
            | C::NotCoordinator
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::KafkaStorageError
            | C::PreferredLeaderNotAvailable
            | C::OutOfOrderSequenceNumber
    )
}

impl fmt::Display for ProducerErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ProducerErrorKind as K;
        match self {
            K::Disabled => f.write_str("Kafka is disabled (ENABLE_KAFKA=false)"),
            K::QueueFull => f.write_str("the producer queue is full"),
            K::MessageTooLarge => f.write_str("the message is too large"),
            K::BatchTooLarge { size, max } => {
                write!(
                    f,
                    "the batch holds {size} events, more than the maximum of {max}"
                )
            }
            K::Timeout => f.write_str("the request timed out"),
            K::OutcomeUnknown => f.write_str(
                "no acknowledgement in time; the event may have been stored (outcome unknown)",
            ),
            K::Transport => f.write_str("the broker cannot be reached"),
            K::Broker(code) => write!(f, "the broker answered {code:?}"),
            K::UnknownTopic => f.write_str("unknown or invalid topic"),
            K::Authorization => f.write_str("authentication or authorization failed"),
            K::Serialization => f.write_str("the event cannot be serialized"),
            K::Transaction { .. } => f.write_str("the transaction failed"),
            K::Fatal => f.write_str("the producer hit a fatal error"),
            K::ShuttingDown => f.write_str("the producer is shutting down"),
            K::Canceled => f.write_str("the operation was canceled"),
            K::CircuitOpen => f.write_str("the circuit breaker is open"),
            K::Other => f.write_str("Kafka error"),
        }
    }
}

/// A publish failed: the topic, what kind of failure, and the cause.
///
/// The `Display` text reads `publish to <topic> failed: <kind>: <cause>`. The cause
/// is available through [`std::error::Error::source`]. A single-event error names
/// its event ([`event_id`](Self::event_id)); a batch error says what became of
/// every event ([`batch`](Self::batch)); a transaction whose abort failed too
/// carries that error ([`abort_error`](Self::abort_error)).
pub struct KafkaProducerError {
    // Boxed: one pointer wide, so every `Result` and response future that can
    // hold the error stays small (they are moved on every publish).
    inner: Box<ProducerErrorInner>,
}

struct ProducerErrorInner {
    topic: String,
    kind: ProducerErrorKind,
    source: Option<BoxError>,
    event_id: Option<Uuid>,
    batch: Option<BatchOutcome>,
    abort_error: Option<KafkaProducerError>,
}

impl fmt::Debug for KafkaProducerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaProducerError")
            .field("topic", &self.inner.topic)
            .field("kind", &self.inner.kind)
            .field("source", &self.inner.source)
            .field("event_id", &self.inner.event_id)
            .field("batch", &self.inner.batch)
            .field("abort_error", &self.inner.abort_error)
            .finish()
    }
}

/// What became of one event of a batch (or of a transaction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventOutcome {
    /// The broker acknowledged it. `offset` is `-1001` (unknown) when the
    /// idempotent producer learned of the write only through the broker's
    /// duplicate-sequence answer to a retry.
    Delivered {
        /// The partition it was stored in.
        partition: i32,
        /// Its offset in that partition.
        offset: i64,
    },
    /// It was not stored: librdkafka or the broker refused it, or its
    /// transaction was aborted. Resending cannot duplicate it (whether a resend
    /// can succeed, the kind's [`classification`](ProducerErrorKind::classification) says).
    Failed(ProducerErrorKind),
    /// It was never handed to Kafka: an earlier event of the batch could not be
    /// enqueued, or the batch ran out of time before its turn. Resending cannot
    /// duplicate it.
    NotSent,
    /// It may or may not have been stored (no acknowledgement in time, or its
    /// transaction's commit may have landed). Resend only with the same event
    /// id, to consumers that deduplicate on it.
    Unknown,
}

impl EventOutcome {
    /// `true` when the event was certainly not stored, so that sending it again
    /// cannot create a duplicate.
    pub fn is_safe_to_resend(&self) -> bool {
        matches!(self, EventOutcome::Failed(_) | EventOutcome::NotSent)
    }

    /// The JSON `status` label: `delivered`, `failed`, `notSent` or `unknown`.
    pub fn status(&self) -> &'static str {
        match self {
            EventOutcome::Delivered { .. } => "delivered",
            EventOutcome::Failed(_) => "failed",
            EventOutcome::NotSent => "notSent",
            EventOutcome::Unknown => "unknown",
        }
    }
}

/// One event of a batch: its id and what became of it.
///
/// Serializes (camelCase) as `{"eventId", "status", ...}` with `partition` and
/// `offset` when delivered, `error` (the kind's class label) and `retryable` when
/// failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventResult {
    /// The event's id (the envelope's, which consumers can deduplicate on).
    pub event_id: Uuid,
    /// What became of it.
    pub outcome: EventOutcome,
}

impl Serialize for EventResult {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let fields = match self.outcome {
            EventOutcome::Delivered { .. } | EventOutcome::Failed(_) => 4,
            EventOutcome::NotSent | EventOutcome::Unknown => 2,
        };
        let mut st = s.serialize_struct("EventResult", fields)?;
        st.serialize_field("eventId", &self.event_id)?;
        st.serialize_field("status", self.outcome.status())?;
        match self.outcome {
            EventOutcome::Delivered { partition, offset } => {
                st.serialize_field("partition", &partition)?;
                st.serialize_field("offset", &offset)?;
            }
            EventOutcome::Failed(kind) => {
                let c = kind.classification();
                st.serialize_field("error", c.class)?;
                st.serialize_field("retryable", &c.retryable)?;
            }
            EventOutcome::NotSent | EventOutcome::Unknown => {}
        }
        st.end()
    }
}

/// What became of a failed batch: counts, and one [`EventResult`] per event in
/// the batch's order.
///
/// A non-transactional batch is not atomic: the events before and after a failed
/// one may still be delivered. Resend exactly the events that are
/// [`safe_to_resend`](Self::safe_to_resend); the [`unknown`](Self::unknown) ones
/// may have been stored. Use the transactional publisher for all or nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Events in the batch.
    pub total: usize,
    /// Events the broker acknowledged.
    pub delivered: usize,
    /// Events certainly not stored ([`EventOutcome::Failed`] or [`EventOutcome::NotSent`]).
    pub failed: usize,
    /// Events that may or may not have been stored ([`EventOutcome::Unknown`]).
    pub unknown: usize,
    /// Every event's result, in the batch's order.
    pub events: Vec<EventResult>,
}

impl BatchOutcome {
    /// Counts `events`.
    pub fn from_events(events: Vec<EventResult>) -> Self {
        let mut outcome = BatchOutcome {
            total: events.len(),
            ..BatchOutcome::default()
        };
        for e in &events {
            match e.outcome {
                EventOutcome::Delivered { .. } => outcome.delivered += 1,
                EventOutcome::Failed(_) | EventOutcome::NotSent => outcome.failed += 1,
                EventOutcome::Unknown => outcome.unknown += 1,
            }
        }
        outcome.events = events;
        outcome
    }

    /// Every event with `outcome`, for all of `ids`.
    pub fn all(ids: impl IntoIterator<Item = Uuid>, outcome: EventOutcome) -> Self {
        Self::from_events(
            ids.into_iter()
                .map(|event_id| EventResult { event_id, outcome })
                .collect(),
        )
    }

    /// Ids of the events that were certainly not stored: sending them again
    /// cannot create duplicates.
    pub fn safe_to_resend(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.events
            .iter()
            .filter(|e| e.outcome.is_safe_to_resend())
            .map(|e| e.event_id)
    }

    /// Ids of the events that may or may not have been stored.
    pub fn unknown_ids(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.events
            .iter()
            .filter(|e| e.outcome == EventOutcome::Unknown)
            .map(|e| e.event_id)
    }
}

impl KafkaProducerError {
    /// An error of `kind` on `topic` without a further cause.
    pub fn new(topic: impl Into<String>, kind: ProducerErrorKind) -> Self {
        KafkaProducerError {
            inner: Box::new(ProducerErrorInner {
                topic: topic.into(),
                kind,
                source: None,
                event_id: None,
                batch: None,
                abort_error: None,
            }),
        }
    }

    /// An error of `kind` on `topic` caused by `source`.
    pub fn with_source(
        topic: impl Into<String>,
        kind: ProducerErrorKind,
        source: impl Into<BoxError>,
    ) -> Self {
        let mut e = Self::new(topic, kind);
        e.inner.source = Some(source.into());
        e
    }

    /// An error from rdkafka, its kind derived from the error code.
    pub fn from_kafka(topic: impl Into<String>, err: KafkaError) -> Self {
        let kind = ProducerErrorKind::from_kafka_error(&err);
        Self::with_source(topic, kind, err)
    }

    /// The error of a delivery report (the event was handed to librdkafka), its
    /// kind from [`ProducerErrorKind::from_delivery_error`].
    pub fn from_delivery(topic: impl Into<String>, err: KafkaError) -> Self {
        let kind = ProducerErrorKind::from_delivery_error(&err);
        Self::with_source(topic, kind, err)
    }

    /// "Kafka is disabled" for `topic`.
    pub fn disabled(topic: impl Into<String>) -> Self {
        Self::new(topic, ProducerErrorKind::Disabled)
    }

    /// The topic the publish was for.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// What kind of failure it was.
    pub fn kind(&self) -> ProducerErrorKind {
        self.inner.kind
    }

    /// The rdkafka error behind it, when there is one.
    pub fn kafka_error(&self) -> Option<&KafkaError> {
        self.inner.source.as_ref()?.downcast_ref::<KafkaError>()
    }

    /// Names the event a single-event publish was for.
    pub fn with_event_id(mut self, event_id: Uuid) -> Self {
        self.inner.event_id = Some(event_id);
        self
    }

    /// The event a single-event publish was for (the envelope's id).
    pub fn event_id(&self) -> Option<Uuid> {
        self.inner.event_id
    }

    /// Attaches what became of a batch's events.
    pub fn with_batch(mut self, outcome: BatchOutcome) -> Self {
        self.inner.batch = Some(outcome);
        self
    }

    /// What became of each event, for batch and transactional publishes.
    pub fn batch(&self) -> Option<&BatchOutcome> {
        self.inner.batch.as_ref()
    }

    /// Takes the batch outcome out of the error.
    pub fn take_batch(&mut self) -> Option<BatchOutcome> {
        self.inner.batch.take()
    }

    /// Attaches the error of an abort that followed this failure.
    pub fn with_abort_error(mut self, abort: KafkaProducerError) -> Self {
        self.inner.abort_error = Some(abort);
        self
    }

    /// The error of the transaction abort that followed this failure, when the
    /// abort failed too (the transactional publisher then recovers before its
    /// next transaction).
    pub fn abort_error(&self) -> Option<&KafkaProducerError> {
        self.inner.abort_error.as_ref()
    }

    /// Whether a retry may succeed (and cannot duplicate anything).
    pub fn is_retryable(&self) -> bool {
        self.inner.kind.classification().retryable
    }

    /// `true` when the event, or some event of the batch, may have been stored
    /// although the publish failed ([`ProducerErrorKind::OutcomeUnknown`], or a
    /// batch with [`unknown`](BatchOutcome::unknown) events).
    pub fn may_have_been_delivered(&self) -> bool {
        self.inner.kind.may_have_been_delivered()
            || self.inner.batch.as_ref().is_some_and(|b| b.unknown > 0)
    }
}

impl fmt::Display for KafkaProducerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "publish to {} failed: {}",
            self.inner.topic, self.inner.kind
        )?;
        if let Some(b) = &self.inner.batch {
            write!(
                f,
                " ({} of {} events delivered, {} failed",
                b.delivered, b.total, b.failed
            )?;
            if b.unknown > 0 {
                write!(f, ", {} outcome unknown", b.unknown)?;
            }
            f.write_str(")")?;
        }
        if let Some(source) = &self.inner.source {
            write!(f, ": {source}")?;
        }
        if let Some(abort) = &self.inner.abort_error {
            write!(f, "; the abort failed too: {abort}")?;
        }
        Ok(())
    }
}

impl StdError for KafkaProducerError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

impl ClassifiedError for KafkaProducerError {
    fn classification(&self) -> Classification {
        self.inner.kind.classification()
    }
}

/// A client operation failed: creation, health check or disconnect.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaClientError {
    /// Kafka is turned off (`ENABLE_KAFKA=false`).
    #[error("Kafka is disabled (ENABLE_KAFKA=false)")]
    Disabled,
    /// librdkafka could not create a client from the config.
    #[error("cannot create the Kafka {role} client: {source}")]
    Create {
        /// "producer", "consumer" or "admin".
        role: &'static str,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// A metadata request failed or timed out.
    #[error("metadata request failed: {0}")]
    Metadata(#[source] KafkaError),
    /// An admin operation failed.
    #[error("admin operation on {target} failed: {message}")]
    Admin {
        /// The topic or resource.
        target: String,
        /// What failed.
        message: String,
    },
    /// `disconnect` did not finish in time; what was left undone.
    #[error("disconnect timed out after {timeout:?}: {pending}")]
    DisconnectTimeout {
        /// The timeout given.
        timeout: Duration,
        /// What was still pending (unflushed messages, consumers not closed).
        pending: String,
    },
    /// The client was already disconnected.
    #[error("the Kafka client is disconnected")]
    Disconnected,
}

impl ClassifiedError for KafkaClientError {
    fn classification(&self) -> Classification {
        match self {
            KafkaClientError::Disabled => Classification::permanent_failure("disabled"),
            KafkaClientError::Create { .. } => Classification::permanent_failure("create"),
            KafkaClientError::Metadata(_) => Classification::failure("metadata"),
            KafkaClientError::Admin { .. } => Classification::failure("admin"),
            KafkaClientError::DisconnectTimeout { .. } => Classification::failure("timeout"),
            KafkaClientError::Disconnected => Classification::permanent_failure("disconnected"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_layers::classify::Outcome;

    #[test]
    fn permanent_and_retryable_kinds() {
        let permanent = [
            ProducerErrorKind::Disabled,
            ProducerErrorKind::MessageTooLarge,
            ProducerErrorKind::Serialization,
            ProducerErrorKind::BatchTooLarge { size: 2, max: 1 },
            ProducerErrorKind::UnknownTopic,
            ProducerErrorKind::Fatal,
        ];
        for kind in permanent {
            let c = kind.classification();
            assert_eq!(c.outcome, Outcome::Failure);
            assert!(!c.retryable, "{kind:?}");
        }
        let retryable = [
            ProducerErrorKind::QueueFull,
            ProducerErrorKind::Timeout,
            ProducerErrorKind::Transport,
            ProducerErrorKind::Broker(RDKafkaErrorCode::NotEnoughReplicas),
        ];
        for kind in retryable {
            assert!(kind.classification().should_retry(), "{kind:?}");
        }
        assert!(
            !ProducerErrorKind::Broker(RDKafkaErrorCode::InvalidRecord)
                .classification()
                .retryable
        );
    }

    #[test]
    fn codes_map_to_kinds() {
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(
            ProducerErrorKind::from_kafka_error(&e),
            ProducerErrorKind::MessageTooLarge
        );
        assert_eq!(
            ProducerErrorKind::from_code(RDKafkaErrorCode::MessageTimedOut),
            ProducerErrorKind::OutcomeUnknown
        );
        assert_eq!(
            ProducerErrorKind::from_code(RDKafkaErrorCode::QueueFull),
            ProducerErrorKind::QueueFull
        );
        assert_eq!(
            ProducerErrorKind::from_code(RDKafkaErrorCode::AllBrokersDown),
            ProducerErrorKind::Transport
        );
        assert_eq!(
            ProducerErrorKind::from_kafka_error(&KafkaError::Canceled),
            ProducerErrorKind::Canceled
        );
    }

    #[test]
    fn error_carries_topic_kind_and_cause() {
        let err = KafkaProducerError::from_kafka(
            "orders",
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
        );
        assert_eq!(err.topic(), "orders");
        assert_eq!(err.kind(), ProducerErrorKind::QueueFull);
        assert!(err.kafka_error().is_some());
        assert!(err.source().is_some());
        let text = err.to_string();
        assert!(text.starts_with("publish to orders failed: the producer queue is full"));
        assert!(err.is_retryable());
        assert_eq!(err.classification().class, "queue_full");
    }

    #[test]
    fn an_unknown_outcome_counts_as_a_failure_and_is_not_retried() {
        let c = ProducerErrorKind::OutcomeUnknown.classification();
        assert_eq!(c.outcome, Outcome::Failure);
        assert!(!c.should_retry());
        assert_eq!(c.class, CLASS_OUTCOME_UNKNOWN);
        // Delivery reports after which the event may have been stored.
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::NotEnoughReplicasAfterAppend,
        ] {
            let e = KafkaProducerError::from_delivery("t", KafkaError::MessageProduction(code));
            assert_eq!(e.kind(), ProducerErrorKind::OutcomeUnknown, "{code:?}");
            assert!(e.may_have_been_delivered());
            assert!(!e.is_retryable());
        }
        // Refusals say the event was not stored.
        let e = KafkaProducerError::from_delivery(
            "t",
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
        );
        assert_eq!(e.kind(), ProducerErrorKind::MessageTooLarge);
        assert!(!e.may_have_been_delivered());
        let e = KafkaProducerError::from_delivery(
            "t",
            KafkaError::MessageProduction(RDKafkaErrorCode::NotEnoughReplicas),
        );
        assert!(e.is_retryable() && !e.may_have_been_delivered());
    }

    #[test]
    fn a_batch_outcome_names_every_event() {
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        let outcome = BatchOutcome::from_events(vec![
            EventResult {
                event_id: ids[0],
                outcome: EventOutcome::Delivered {
                    partition: 1,
                    offset: 7,
                },
            },
            EventResult {
                event_id: ids[1],
                outcome: EventOutcome::Unknown,
            },
            EventResult {
                event_id: ids[2],
                outcome: EventOutcome::Failed(ProducerErrorKind::MessageTooLarge),
            },
            EventResult {
                event_id: ids[3],
                outcome: EventOutcome::NotSent,
            },
        ]);
        assert_eq!(
            (
                outcome.total,
                outcome.delivered,
                outcome.failed,
                outcome.unknown
            ),
            (4, 1, 2, 1)
        );
        assert_eq!(outcome.safe_to_resend().collect::<Vec<_>>(), ids[2..]);
        assert_eq!(outcome.unknown_ids().collect::<Vec<_>>(), [ids[1]]);
        let err = KafkaProducerError::new("t", ProducerErrorKind::OutcomeUnknown)
            .with_batch(outcome.clone());
        assert!(err.may_have_been_delivered());
        assert!(
            err.to_string()
                .contains("(1 of 4 events delivered, 2 failed, 1 outcome unknown)"),
            "{err}"
        );
        let json = serde_json::to_value(&outcome.events).unwrap();
        assert_eq!(
            json[0],
            serde_json::json!({"eventId": ids[0], "status": "delivered", "partition": 1, "offset": 7})
        );
        assert_eq!(
            json[1],
            serde_json::json!({"eventId": ids[1], "status": "unknown"})
        );
        assert_eq!(
            json[2],
            serde_json::json!({"eventId": ids[2], "status": "failed", "error": "message_too_large", "retryable": false})
        );
        assert_eq!(json[3]["status"], "notSent");
    }

    #[test]
    fn an_abort_error_is_reported_with_the_failure() {
        let abort = KafkaProducerError::new("t", ProducerErrorKind::Transport);
        let err =
            KafkaProducerError::new("t", ProducerErrorKind::Serialization).with_abort_error(abort);
        assert_eq!(
            err.abort_error().map(KafkaProducerError::kind),
            Some(ProducerErrorKind::Transport)
        );
        assert!(err.to_string().contains("the abort failed too"), "{err}");
    }
}
