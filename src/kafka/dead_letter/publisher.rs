//! Publishing a failed message, unchanged, to its dead-letter topic.

use super::future::DeadLetterPublishFuture;
use super::headers::{self, Provenance};
use crate::kafka::consumer::ReceivedMessage;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Longest error text put in the [`headers::ERROR_MESSAGE`] header, in bytes (cut
/// at a character boundary and marked `…(truncated)`).
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// Default suffix of dead-letter topics: `<topic>.dlq`.
pub const DEFAULT_SUFFIX: &str = ".dlq";

/// Why a message is dead-lettered: the facts that go into the provenance headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterReason {
    /// Short class ([`headers::ERROR_KIND`]).
    pub kind: String,
    /// Rust type name of the error ([`headers::ERROR_TYPE`]).
    pub error_type: String,
    /// Error message with its causes ([`headers::ERROR_MESSAGE`]).
    pub message: String,
    /// Handler calls made ([`headers::ATTEMPTS`]).
    pub attempts: u32,
}

/// The outcome of one attempt to enqueue a dead letter.
pub(crate) enum Enqueue {
    /// In librdkafka's queue; the broker's answer is coming.
    Delivering(DeliveryFuture),
    /// librdkafka's local queue is full: try again shortly.
    QueueFull,
    /// Refused for good.
    Failed(KafkaError),
}

/// Where a dead-lettered message landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLettered {
    /// The dead-letter topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
}

/// Publishes failed messages to `<topic><suffix>` with an idempotent producer
/// (`enable.idempotence=true`, `acks=all`) and waits for the broker's
/// acknowledgement, so the caller may commit the original offset afterwards.
///
/// Cloning is cheap and clones share the producer.
#[derive(Clone)]
pub struct DeadLetterPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    producer: FutureProducer,
    suffix: String,
    group_id: String,
}

impl fmt::Debug for DeadLetterPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterPublisher")
            .field("suffix", &self.inner.suffix)
            .field("group_id", &self.inner.group_id)
            .finish_non_exhaustive()
    }
}

impl DeadLetterPublisher {
    /// A publisher with its own idempotent producer built from `base` (brokers,
    /// security settings...; consumer-only properties are dropped). Delivery gives up
    /// after 30 s (`message.timeout.ms`) unless `base` says otherwise, so a broker
    /// outage fails a publish instead of blocking it for librdkafka's default 5 min.
    pub fn new(
        base: &ClientConfig,
        group_id: impl Into<String>,
        suffix: impl Into<String>,
    ) -> Result<Self, KafkaError> {
        let mut config = ClientConfig::new();
        for (k, v) in base.config_map() {
            if !is_consumer_only(k) {
                config.set(k, v);
            }
        }
        config.set("enable.idempotence", "true").set("acks", "all");
        if base.get("message.timeout.ms").is_none() {
            config.set("message.timeout.ms", "30000");
        }
        Ok(Self::from_producer(config.create()?, group_id, suffix))
    }

    /// A publisher over an existing producer.
    pub fn from_producer(
        producer: FutureProducer,
        group_id: impl Into<String>,
        suffix: impl Into<String>,
    ) -> Self {
        DeadLetterPublisher {
            inner: Arc::new(Inner {
                producer,
                suffix: suffix.into(),
                group_id: group_id.into(),
            }),
        }
    }

    /// The dead-letter topic of `topic`.
    pub fn dlq_topic(&self, topic: &str) -> String {
        format!("{topic}{}", self.inner.suffix)
    }

    /// Publishes `message` unchanged (key, payload, original headers) with the
    /// provenance headers of [`headers`]; the future resolves on the broker's
    /// acknowledgement. The message is enqueued at once (not when first polled).
    pub fn publish(
        &self,
        message: &ReceivedMessage,
        reason: &DeadLetterReason,
    ) -> DeadLetterPublishFuture {
        DeadLetterPublishFuture::new(self.clone(), message, reason)
    }

    /// Tries once to put `message` into librdkafka's queue for `topic`.
    pub(crate) fn enqueue(
        &self,
        topic: &str,
        message: &ReceivedMessage,
        reason: &DeadLetterReason,
    ) -> Enqueue {
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).headers(self.headers(message, reason));
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        if let Some(ms) = message.timestamp().to_millis() {
            record = record.timestamp(ms);
        }
        match self.inner.producer.send_result(record) {
            Ok(delivery) => Enqueue::Delivering(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Enqueue::QueueFull
            }
            Err((e, _)) => Enqueue::Failed(e),
        }
    }

    fn headers(&self, message: &ReceivedMessage, reason: &DeadLetterReason) -> OwnedHeaders {
        let original_count = message.headers().map_or(0, |hs| hs.count());
        let mut h = OwnedHeaders::new_with_capacity(original_count + headers::ALL.len());
        if let Some(originals) = message.headers() {
            for original in originals.iter() {
                h = h.insert(original);
            }
        }
        Provenance::of(message, &self.inner.group_id, reason, SystemTime::now()).append_to(h)
    }

    /// Waits up to `timeout` for queued dead-letter messages to be delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.producer.flush(timeout)
    }
}

pub(crate) fn is_consumer_only(key: &str) -> bool {
    key == "group.id"
        || key == "group.instance.id"
        || key.starts_with("enable.auto.")
        || key.starts_with("auto.")
        || key.starts_with("queued.")
        || key.starts_with("fetch.")
        || key.starts_with("session.")
        || key.starts_with("heartbeat.")
        || key.starts_with("max.poll.")
        || key.starts_with("partition.assignment")
        || key.starts_with("isolation.")
        || key == "enable.partition.eof"
        || key == "check.crcs"
}
