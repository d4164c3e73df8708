//! Errors of handlers and of the consumer runtime.

use crate::kafka::envelope::DecodeError;
use keel_layers::classify::{Classification, ClassifiedError, Classify};
use rdkafka::error::KafkaError;
use std::error::Error as StdError;
use std::time::Duration;

/// A type-erased error, as handlers return it.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// A handler's failure, with how the runtime should treat it.
///
/// Any error a handler returns becomes a retryable `HandlerError` of class `"error"`;
/// return one built with [`HandlerError::permanent`] to skip the retries and go to the
/// dead-letter queue at once (bad input that no retry will fix).
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct HandlerError {
    class: &'static str,
    retryable: bool,
    error_type: &'static str,
    #[source]
    source: BoxError,
}

impl HandlerError {
    /// A failure that a retry may fix (class `"error"`).
    pub fn retryable<E: Into<BoxError>>(error: E) -> Self {
        HandlerError {
            class: "error",
            retryable: true,
            error_type: std::any::type_name::<E>(),
            source: error.into(),
        }
    }

    /// A failure that no retry will fix (class `"permanent"`).
    pub fn permanent<E: Into<BoxError>>(error: E) -> Self {
        HandlerError {
            class: "permanent",
            retryable: false,
            error_type: std::any::type_name::<E>(),
            source: error.into(),
        }
    }

    /// No handler is registered for the event type (class `"unknown_event_type"`,
    /// not retryable).
    pub fn unknown_event_type(event_type: &str) -> Self {
        HandlerError {
            class: "unknown_event_type",
            retryable: false,
            error_type: std::any::type_name::<UnknownEventType>(),
            source: Box::new(UnknownEventType(event_type.to_string())),
        }
    }

    /// Turns any boxed error into a `HandlerError`, keeping one that already is.
    pub fn from_boxed(error: BoxError) -> Self {
        match error.downcast::<HandlerError>() {
            Ok(handler_error) => *handler_error,
            Err(other) => HandlerError {
                class: "error",
                retryable: true,
                error_type: "dyn std::error::Error",
                source: other,
            },
        }
    }

    /// Sets the class label (metrics and the `keel-dlq-error-kind` header).
    pub fn with_class(mut self, class: &'static str) -> Self {
        self.class = class;
        self
    }

    /// The class label.
    pub fn class(&self) -> &'static str {
        self.class
    }
    /// Whether a retry may fix it.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
    /// The Rust type name of the original error.
    pub fn error_type(&self) -> &'static str {
        self.error_type
    }
    /// The original error.
    pub fn into_inner(self) -> BoxError {
        self.source
    }
}

impl ClassifiedError for HandlerError {
    fn classification(&self) -> Classification {
        Classification::failure(self.class).with_retryable(self.retryable)
    }
}

/// No handler is registered for an event type.
#[derive(Debug, thiserror::Error)]
#[error("no handler registered for event type {0:?}")]
pub struct UnknownEventType(pub String);

/// Classifies handler errors: a [`HandlerError`] says itself whether it is
/// retryable, a [`DecodeError`] never is, any other error is a retryable failure of
/// class `"error"`. The default classifier of
/// the consumer runtime's [`RetryLayer`](keel_layers::retry::RetryLayer).
#[derive(Clone, Copy, Debug, Default)]
pub struct HandlerErrors;

impl HandlerErrors {
    /// The classification of one boxed handler error.
    pub fn classify_error(error: &(dyn StdError + 'static)) -> Classification {
        if let Some(e) = error.downcast_ref::<HandlerError>() {
            e.classification()
        } else if error.is::<DecodeError>() || error.is::<super::decode::RecordDecodeError>() {
            Classification::permanent_failure("decode")
        } else {
            Classification::failure("error")
        }
    }
}

impl<Res> Classify<Res, BoxError> for HandlerErrors {
    fn classify(&self, result: Result<&Res, &BoxError>) -> Classification {
        match result {
            Ok(_) => Classification::SUCCESS,
            Err(e) => HandlerErrors::classify_error(e.as_ref()),
        }
    }
}

impl<Res> Classify<Res, HandlerError> for HandlerErrors {
    fn classify(&self, result: Result<&Res, &HandlerError>) -> Classification {
        match result {
            Ok(_) => Classification::SUCCESS,
            Err(e) => e.classification(),
        }
    }
}

/// An error of the consumer runtime itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The settings or start options are invalid.
    #[error("invalid consumer configuration: {0}")]
    Config(String),
    /// librdkafka refused an operation.
    #[error("kafka consumer: {context}: {source}")]
    Kafka {
        /// What the runtime was doing.
        context: &'static str,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// Kafka is disabled (`ENABLE_KAFKA=false`).
    #[error("Kafka is disabled (ENABLE_KAFKA=false)")]
    Disabled,
    /// The runtime has stopped (shut down, or its poll thread ended).
    #[error("the consumer is not running")]
    NotRunning,
    /// Shutdown did not finish within its timeout; the remaining work was abandoned
    /// (its offsets are not committed, so it will be delivered again).
    #[error("consumer shutdown did not finish within {0:?}")]
    ShutdownTimedOut(Duration),
    /// The dead-letter topics could not be created or checked before start
    /// ([`KafkaConsumerBuilder::ensure_dlq_topics`](super::KafkaConsumerBuilder::ensure_dlq_topics)).
    #[error(transparent)]
    DeadLetterTopic(#[from] crate::kafka::dead_letter::DeadLetterTopicError),
    /// The consumer stopped because of a fault: a panic on the poll thread or in a
    /// lane, or a message that could not be dead-lettered under
    /// [`DeadLetterFailure::StopConsumer`](super::DeadLetterFailure::StopConsumer).
    /// What was finished before it is committed; nothing after.
    #[error("the consumer failed: {reason}")]
    Failed {
        /// The cause (at most 1 KiB).
        reason: String,
    },
}

impl ConsumerError {
    pub(crate) fn kafka(context: &'static str, source: KafkaError) -> Self {
        ConsumerError::Kafka { context, source }
    }
}

/// Renders an error and its chain of sources as `outer: cause: root`.
pub(crate) fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_of_handler_errors() {
        let e: BoxError = Box::new(HandlerError::permanent("bad input"));
        assert!(!HandlerErrors::classify_error(e.as_ref()).retryable);
        let e: BoxError = "boom".into();
        let c = HandlerErrors::classify_error(e.as_ref());
        assert!(c.should_retry());
        assert_eq!(c.class, "error");
        let e = HandlerError::unknown_event_type("x.y");
        assert_eq!(e.class(), "unknown_event_type");
        assert!(e.to_string().contains("x.y"));
    }

    #[test]
    fn from_boxed_keeps_handler_errors() {
        let e = HandlerError::from_boxed(Box::new(HandlerError::permanent("nope")));
        assert_eq!(e.class(), "permanent");
        let e = HandlerError::from_boxed("plain".into());
        assert!(e.is_retryable());
    }
}
