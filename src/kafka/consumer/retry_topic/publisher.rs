//! Writing a record to a retry topic or, after the last rung, to the dead-letter
//! topic; each write is acknowledged by the broker before the caller goes on.

use super::error::RetryTopicError;
use super::headers::RetryState;
use crate::kafka::consumer::{ReceivedMessage, truncate_utf8};
use crate::kafka::dead_letter::{MAX_ERROR_MESSAGE, headers as dlq, is_consumer_only};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall clock, ms since the Unix epoch (the due times cross processes).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An idempotent producer (`acks=all`) for retry and dead-letter records.
/// Cloning shares it.
#[derive(Clone)]
pub(crate) struct RetryPublisher {
    producer: FutureProducer,
    group_id: Arc<str>,
    dlq_suffix: Arc<str>,
}

impl fmt::Debug for RetryPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPublisher")
            .field("group_id", &self.group_id)
            .finish_non_exhaustive()
    }
}

impl RetryPublisher {
    pub(crate) fn new(
        base: &ClientConfig,
        group_id: &str,
        dlq_suffix: &str,
    ) -> Result<Self, RetryTopicError> {
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
        let producer = config.create().map_err(|source| RetryTopicError::Kafka {
            context: "creating the retry producer",
            source,
        })?;
        Ok(RetryPublisher {
            producer,
            group_id: group_id.into(),
            dlq_suffix: dlq_suffix.into(),
        })
    }

    /// The dead-letter topic of main topic `source`.
    pub(crate) fn dlq_topic(&self, source: &str) -> String {
        format!("{source}{}", self.dlq_suffix)
    }

    /// Writes `message`'s key and payload with `headers` to `topic`; resolves on
    /// the broker's acknowledgement with the partition and offset.
    pub(crate) async fn send(
        &self,
        topic: &str,
        message: &ReceivedMessage,
        headers: OwnedHeaders,
    ) -> Result<(i32, i64), RetryTopicError> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        match self.producer.send(record, Duration::from_secs(5)).await {
            Ok(delivery) => Ok((delivery.partition, delivery.offset)),
            Err((source, _)) => Err(RetryTopicError::Publish {
                topic: topic.to_string(),
                source,
            }),
        }
    }

    /// The headers of a record leaving the ladder for the dead-letter topic: its
    /// own, the retry state (whole history) and the usual `keel-dlq-*`
    /// provenance, naming the main topic, partition and offset.
    pub(crate) fn dlq_headers(
        &self,
        message: &ReceivedMessage,
        state: &RetryState,
    ) -> OwnedHeaders {
        let mut h = state.headers(message);
        let text = |h: OwnedHeaders, key: &str, value: &str| {
            h.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        };
        h = text(h, dlq::ORIGINAL_TOPIC, &state.original_topic);
        h = text(
            h,
            dlq::ORIGINAL_PARTITION,
            &state.original_partition.to_string(),
        );
        h = text(h, dlq::ORIGINAL_OFFSET, &state.original_offset.to_string());
        h = text(h, dlq::CONSUMER_GROUP, &self.group_id);
        if let Some(last) = state.history.last() {
            h = text(h, dlq::ERROR_KIND, &last.kind);
            h = text(h, dlq::ERROR_TYPE, &last.error_type);
            h = text(
                h,
                dlq::ERROR_MESSAGE,
                &truncate_utf8(&last.message, MAX_ERROR_MESSAGE),
            );
        }
        h = text(h, dlq::ATTEMPTS, &state.attempts.to_string());
        text(h, dlq::FAILED_AT, &now_ms().to_string())
    }

    /// Waits up to `timeout` for queued records to be delivered.
    pub(crate) fn flush(&self, timeout: Duration) {
        use rdkafka::producer::Producer;
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "retry producer flush failed");
        }
    }
}
