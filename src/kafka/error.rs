//! Kafka error types: what went wrong, on which topic, and whether retrying helps.
//!
//! - [`KafkaProducerError`]: a publish failed. Carries the topic, a
//!   [`ProducerErrorKind`] and the underlying cause, and implements
//!   [`ClassifiedError`] so keel's circuit breaker, metrics and retry layers count it
//!   correctly: a message that is too large or cannot be serialized is a
//!   *permanent* failure (retrying cannot fix it), a full queue, a timeout or a
//!   transport failure is *retryable*.
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
    /// No acknowledgement within the delivery timeout (`message.timeout.ms`), or a
    /// request timed out. Retryable.
    Timeout,
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
    /// The delivery report never arrived (the producer was dropped). Retryable.
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
            C::MessageTimedOut | C::OperationTimedOut | C::RequestTimedOut => {
                ProducerErrorKind::Timeout
            }
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

    /// How a failure of this kind counts for keel's layers.
    pub fn classification(&self) -> Classification {
        use ProducerErrorKind as K;
        match self {
            K::Disabled => Classification::permanent_failure("disabled"),
            K::QueueFull => Classification::failure("queue_full")
                // librdkafka drains the queue at its own pace; a short floor avoids a
                // hot retry loop.
                .with_retry_after(Duration::from_millis(100)),
            K::MessageTooLarge => Classification::permanent_failure("message_too_large"),
            K::BatchTooLarge { .. } => Classification::permanent_failure("batch_too_large"),
            K::Timeout => Classification::failure("timeout"),
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
            K::Timeout => f.write_str("timed out waiting for the broker's acknowledgement"),
            K::Transport => f.write_str("the broker cannot be reached"),
            K::Broker(code) => write!(f, "the broker answered {code:?}"),
            K::UnknownTopic => f.write_str("unknown or invalid topic"),
            K::Authorization => f.write_str("authentication or authorization failed"),
            K::Serialization => f.write_str("the event cannot be serialized"),
            K::Transaction { .. } => f.write_str("the transaction failed"),
            K::Fatal => f.write_str("the producer hit a fatal error"),
            K::ShuttingDown => f.write_str("the producer is shutting down"),
            K::Canceled => f.write_str("the delivery report was lost"),
            K::CircuitOpen => f.write_str("the circuit breaker is open"),
            K::Other => f.write_str("Kafka error"),
        }
    }
}

/// A publish failed: the topic, what kind of failure, and the cause.
///
/// The `Display` text reads `publish to <topic> failed: <kind>: <cause>`. The cause
/// is available through [`std::error::Error::source`].
pub struct KafkaProducerError {
    // Boxed: one pointer wide, so every `Result` and response future that can
    // hold the error stays small (they are moved on every publish).
    inner: Box<ProducerErrorInner>,
}

#[derive(Debug)]
struct ProducerErrorInner {
    topic: String,
    kind: ProducerErrorKind,
    source: Option<BoxError>,
    batch: Option<BatchOutcome>,
}

impl fmt::Debug for KafkaProducerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaProducerError")
            .field("topic", &self.inner.topic)
            .field("kind", &self.inner.kind)
            .field("source", &self.inner.source)
            .field("batch", &self.inner.batch)
            .finish()
    }
}

/// How far a failed batch got: events in it, acknowledged, failed.
///
/// A non-transactional batch is not atomic: the events before and after a failed
/// one may still be delivered. Use the transactional publisher for all or nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BatchOutcome {
    /// Events in the batch.
    pub total: usize,
    /// Events the broker acknowledged.
    pub delivered: usize,
    /// Events that failed (the rest were never sent).
    pub failed: usize,
}

impl KafkaProducerError {
    /// An error of `kind` on `topic` without a further cause.
    pub fn new(topic: impl Into<String>, kind: ProducerErrorKind) -> Self {
        KafkaProducerError {
            inner: Box::new(ProducerErrorInner {
                topic: topic.into(),
                kind,
                source: None,
                batch: None,
            }),
        }
    }

    /// An error of `kind` on `topic` caused by `source`.
    pub fn with_source(
        topic: impl Into<String>,
        kind: ProducerErrorKind,
        source: impl Into<BoxError>,
    ) -> Self {
        KafkaProducerError {
            inner: Box::new(ProducerErrorInner {
                topic: topic.into(),
                kind,
                source: Some(source.into()),
                batch: None,
            }),
        }
    }

    /// An error from rdkafka, its kind derived from the error code.
    pub fn from_kafka(topic: impl Into<String>, err: KafkaError) -> Self {
        let kind = ProducerErrorKind::from_kafka_error(&err);
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

    /// Attaches how far a batch got.
    pub fn with_batch(mut self, outcome: BatchOutcome) -> Self {
        self.inner.batch = Some(outcome);
        self
    }

    /// How far the batch got, for batch publishes.
    pub fn batch(&self) -> Option<BatchOutcome> {
        self.inner.batch
    }

    /// Whether a retry may succeed.
    pub fn is_retryable(&self) -> bool {
        self.inner.kind.classification().retryable
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
                " ({} of {} events delivered, {} failed)",
                b.delivered, b.total, b.failed
            )?;
        }
        if let Some(source) = &self.inner.source {
            write!(f, ": {source}")?;
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
            ProducerErrorKind::Timeout
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
}
