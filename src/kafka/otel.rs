//! W3C trace context across Kafka, on OpenTelemetry's semantic conventions
//! (feature `otel`).
//!
//! keel writes its spans with [`tracing`]; the
//! [`tracing-opentelemetry`](tracing_opentelemetry) layer turns them into
//! OpenTelemetry spans. With this feature:
//!
//! - every single-event publish ([`PublishEvent`](crate::kafka::producer::PublishEvent),
//!   so the default publish stack too) runs in a PRODUCER span `send <topic>`, and
//!   that span's context goes into the record's `traceparent` / `tracestate`
//!   headers. A batch ([`PublishBatch`](crate::kafka::producer::PublishBatch))
//!   runs in one `send <topic>` span with `messaging.batch.message_count`, whose
//!   context every event carries; transactional publishes inject the context of
//!   the span current at the call;
//! - the consumer reads those headers and makes the handler's span,
//!   `process <topic>` (CONSUMER), a child of the producer's span. A batch
//!   handler's call (`on_batch`) is one `process <topic>` span with
//!   `messaging.batch.message_count`, without a parent (its records may come
//!   from as many traces) and linked to the producer span of each record;
//! - a dead-letter record copies the original headers, so it keeps the context
//!   of the event that failed.
//!
//! A `traceparent` the caller set on the envelope
//! ([`EventEnvelope::with_header`](crate::kafka::envelope::EventEnvelope::with_header))
//! is never overwritten: the caller's context wins (its `tracestate` too).
//!
//! The context is written in the W3C Trace Context format
//! ([`TraceContextPropagator`]) whatever the global propagator is: the global
//! one is a no-op until the application sets one, and Kafka consumers of other
//! languages read W3C headers.
//!
//! # Semantic conventions
//!
//! Span names, kinds and attributes follow the OpenTelemetry messaging
//! conventions of semconv **1.28 and later** (`send` replaced `publish` as
//! `messaging.operation.type` in 1.28, `messaging.consumer.group.name` came in
//! 1.27; unchanged for these attributes through 1.36, the version of
//! `opentelemetry-semantic-conventions` 0.31):
//!
//! | attribute | send | process |
//! |---|---|---|
//! | `messaging.system` | `kafka` | `kafka` |
//! | `messaging.operation.type` | `send` | `process` |
//! | `messaging.operation.name` | `send` | `process` |
//! | `messaging.destination.name` | topic | topic |
//! | `messaging.destination.partition.id` | once acknowledged | yes |
//! | `messaging.kafka.offset` | once acknowledged | yes |
//! | `messaging.kafka.message.key` | when the event has a key | when the message has a key |
//! | `messaging.consumer.group.name` | | yes |
//! | `messaging.batch.message_count` | batches | |
//! | `error.type` | on failure (the error kind) | on failure (the error's type) |
//!
//! The publish stack's logging spans use the conventions' names too
//! (`messaging.destination.name`, and the event's id and type as
//! `cloudevents.event_id` / `cloudevents.event_type`). keel's own field names
//! (`topic`, `partition`, `offset`, `event_type`, `event_id`) are recorded beside
//! them only with the opt-in feature `otel-keel-fields`; without `otel` they are
//! the only ones, as before.
//!
//! Keys that are not UTF-8 are written lossily. These spans are at `INFO` level,
//! target `keel::kafka`: a filter that drops them drops the context too (the
//! publish then injects the context of the span current at the call).
//!
//! # Example
//!
//! ```no_run
//! use opentelemetry::trace::TracerProvider as _;
//! use tracing_subscriber::layer::SubscriberExt;
//!
//! // Any SDK tracer provider (an OTLP exporter in production).
//! let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
//! let subscriber = tracing_subscriber::registry()
//!     .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("my-service")));
//! tracing::subscriber::set_global_default(subscriber).unwrap();
//! // From here on, keel's publishes carry `traceparent` and its consumers
//! // continue the trace.
//! ```

use std::borrow::Cow;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use rdkafka::message::{Header, OwnedHeaders};
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::kafka::consumer::ReceivedMessage;
use crate::kafka::error::{KafkaProducerError, ProducerErrorKind};
use crate::kafka::producer::PublishAck;

/// Whether spans also carry keel's own field names (`topic`, `partition`,
/// `offset`, `event_type`, `event_id`, `s3_operation`, `bucket`, `key`) beside the
/// semantic-convention attributes: the opt-in feature `otel-keel-fields`, for
/// dashboards and log queries written against keel's names.
pub(crate) const KEEL_FIELDS: bool = cfg!(feature = "otel-keel-fields");

/// The W3C header that carries the trace and parent span ids.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header that carries vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// Whether the caller set a `traceparent` among `headers` (any case: the W3C
/// names are case-insensitive in HTTP, where such values often come from).
pub(crate) fn has_traceparent(headers: &[(String, Vec<u8>)]) -> bool {
    headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case(TRACEPARENT))
}

/// Collects what the propagator writes (two headers at most).
struct Collect(Vec<(String, String)>);

impl Injector for Collect {
    fn set(&mut self, key: &str, value: String) {
        // The propagator writes an empty `tracestate` when there is none.
        if !value.is_empty() {
            self.0.push((key.to_owned(), value));
        }
    }
}

/// Appends the W3C headers of `span`'s OpenTelemetry context to `headers`,
/// unless the caller's `event_headers` carry a `traceparent` already. A span
/// without a valid context (no OpenTelemetry layer, or a disabled span) adds
/// nothing.
pub(crate) fn inject(
    event_headers: &[(String, Vec<u8>)],
    headers: OwnedHeaders,
    span: &tracing::Span,
) -> OwnedHeaders {
    if has_traceparent(event_headers) {
        return headers;
    }
    // A disabled `send` span has no context: fall back to the caller's.
    let cx = if span.is_disabled() {
        tracing::Span::current().context()
    } else {
        span.context()
    };
    inject_context(headers, &cx)
}

/// Appends the W3C headers of `cx` to `headers` (nothing for an invalid context).
pub(crate) fn inject_context(headers: OwnedHeaders, cx: &Context) -> OwnedHeaders {
    if !cx.span().span_context().is_valid() {
        return headers;
    }
    let mut collected = Collect(Vec::with_capacity(2));
    TraceContextPropagator::new().inject_context(cx, &mut collected);
    collected.0.iter().fold(headers, |h, (key, value)| {
        h.insert(Header {
            key,
            value: Some(value.as_bytes()),
        })
    })
}

/// Reads the W3C headers of a received message.
struct MessageExtractor<'a>(&'a ReceivedMessage);

impl Extractor for MessageExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .headers()
            .map(|hs| hs.entries().map(|h| h.key).collect())
            .unwrap_or_default()
    }
}

/// The context the producer wrote into `message`'s headers (an empty context
/// when there is none or it does not parse).
pub fn extract(message: &ReceivedMessage) -> Context {
    TraceContextPropagator::new().extract(&MessageExtractor(message))
}

/// An [`ExemplarSource`](keel_layers::metrics::ExemplarSource) for
/// [`MetricsLayerBuilder::exemplars`](keel_layers::metrics::MetricsLayerBuilder::exemplars):
/// the trace and span ids of the current `tracing` span's OpenTelemetry context,
/// when it is valid and sampled (an unsampled trace has nothing to link to).
/// With keel's `prometheus` exposition, the histogram bucket of each call then
/// shows the trace of the latest call that landed there.
///
/// ```
/// use keel_layers::metrics::MetricsLayer;
///
/// let handler_metrics = MetricsLayer::builder()
///     .exemplars(keel::kafka::otel::exemplar_source())
///     .build();
/// # let _ = handler_metrics;
/// ```
pub fn exemplar_source() -> impl keel_layers::metrics::ExemplarSource {
    || {
        let span = tracing::Span::current();
        if span.is_disabled() {
            return None;
        }
        let cx = span.context();
        let trace = cx.span();
        let sc = trace.span_context();
        (sc.is_valid() && sc.is_sampled()).then(|| keel_layers::metrics::TraceRef {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
        })
    }
}

/// The PRODUCER span of one publish to `topic`.
pub(crate) fn send_span(topic: &str, key: Option<&[u8]>) -> tracing::Span {
    let span = tracing::info_span!(
        target: "keel::kafka",
        "send",
        "otel.name" = format!("send {topic}").as_str(),
        "otel.kind" = "producer",
        "otel.status_code" = Empty,
        "messaging.system" = "kafka",
        "messaging.operation.type" = "send",
        "messaging.operation.name" = "send",
        "messaging.destination.name" = topic,
        "messaging.kafka.message.key" = Empty,
        "messaging.destination.partition.id" = Empty,
        "messaging.kafka.offset" = Empty,
        "error.type" = Empty,
    );
    if let Some(key) = key.filter(|_| !span.is_disabled()) {
        span.record(
            "messaging.kafka.message.key",
            String::from_utf8_lossy(key).as_ref(),
        );
    }
    span
}

/// The PRODUCER span of one batch of `count` events to `topic` (every event
/// carries this span's context; partitions and offsets are per event, so the
/// span has none).
pub(crate) fn send_batch_span(topic: &str, count: usize) -> tracing::Span {
    tracing::info_span!(
        target: "keel::kafka",
        "send",
        "otel.name" = format!("send {topic}").as_str(),
        "otel.kind" = "producer",
        "otel.status_code" = Empty,
        "messaging.system" = "kafka",
        "messaging.operation.type" = "send",
        "messaging.operation.name" = "send",
        "messaging.destination.name" = topic,
        "messaging.batch.message_count" = count as i64,
        "error.type" = Empty,
    )
}

/// The logging layer's span of one publish: the destination, and the event's id
/// and type as the CloudEvents conventions name them (`cloudevents.event_id`,
/// `cloudevents.event_type`); keel's `topic`, `event_type` and `event_id` only
/// with `otel-keel-fields`. Never the payload, key or headers.
pub(crate) fn publish_fields_span(
    topic: &str,
    event_type: &str,
    event_id: uuid::Uuid,
) -> tracing::Span {
    let span = tracing::debug_span!(
        "publish",
        "messaging.destination.name" = topic,
        "cloudevents.event_type" = event_type,
        "cloudevents.event_id" = %event_id,
        topic = Empty,
        event_type = Empty,
        event_id = Empty,
    );
    if KEEL_FIELDS && !span.is_disabled() {
        span.record("topic", topic);
        span.record("event_type", event_type);
        span.record("event_id", tracing::field::display(event_id));
    }
    span
}

/// The logging layer's span of one batch publish (`topic` and `events` only with
/// `otel-keel-fields`).
pub(crate) fn publish_batch_fields_span(topic: &str, count: usize) -> tracing::Span {
    let span = tracing::info_span!(
        "publish_batch",
        "messaging.destination.name" = topic,
        "messaging.batch.message_count" = count as i64,
        topic = Empty,
        events = Empty,
    );
    if KEEL_FIELDS && !span.is_disabled() {
        span.record("topic", topic);
        span.record("events", count);
    }
    span
}

/// Records the broker's acknowledgement on a `send` span.
pub(crate) fn record_ack(span: &tracing::Span, ack: &PublishAck) {
    // No subscriber wants the span: spare the partition's string.
    if span.is_disabled() {
        return;
    }
    span.record(
        "messaging.destination.partition.id",
        ack.partition.to_string().as_str(),
    );
    span.record("messaging.kafka.offset", ack.offset);
}

/// Records a failed publish on a `send` span.
pub(crate) fn record_publish_error(span: &tracing::Span, error: &KafkaProducerError) {
    if span.is_disabled() {
        return;
    }
    span.record("error.type", producer_error_type(error.kind()).as_ref());
    span.record("otel.status_code", "error");
}

/// A low-cardinality name of a producer error kind (`QueueFull`,
/// `Broker(MsgSizeTooLarge)`, ...): its variant, without field values.
fn producer_error_type(kind: ProducerErrorKind) -> Cow<'static, str> {
    let name = format!("{kind:?}");
    match name.split_once([' ', '{']) {
        Some((variant, _)) => Cow::Owned(variant.trim().to_owned()),
        None => Cow::Owned(name),
    }
}

/// The CONSUMER span of one handled message, the child of the context in its
/// headers. Named `kafka_message` for `tracing` subscribers, `process <topic>`
/// for OpenTelemetry. keel's own `topic`, `partition` and `offset` fields are
/// recorded only with the feature `otel-keel-fields`.
pub(crate) fn process_span(message: &ReceivedMessage, group: &str) -> tracing::Span {
    let topic = message.topic();
    let partition = message.partition();
    let offset = message.offset();
    let span = tracing::info_span!(
        "kafka_message",
        topic = Empty,
        partition = Empty,
        offset = Empty,
        "otel.name" = format!("process {topic}").as_str(),
        "otel.kind" = "consumer",
        "otel.status_code" = Empty,
        "messaging.system" = "kafka",
        "messaging.operation.type" = "process",
        "messaging.operation.name" = "process",
        "messaging.destination.name" = topic,
        "messaging.destination.partition.id" = partition.to_string().as_str(),
        "messaging.kafka.offset" = offset,
        "messaging.consumer.group.name" = group,
        "messaging.kafka.message.key" = Empty,
        "error.type" = Empty,
    );
    if span.is_disabled() {
        return span;
    }
    if KEEL_FIELDS {
        span.record("topic", topic);
        span.record("partition", partition);
        span.record("offset", offset);
    }
    if let Some(key) = message.key() {
        span.record(
            "messaging.kafka.message.key",
            String::from_utf8_lossy(key).as_ref(),
        );
    }
    let parent = extract(message);
    if parent.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed: nothing to link then.
        let _ = span.set_parent(parent);
    }
    span
}

/// The CONSUMER span of one batch handler call over `messages` (records of one
/// partition): `process <topic>` with `messaging.batch.message_count`. Its records
/// may come from as many traces as there are records, so it has no parent and,
/// as the messaging conventions ask of batch operations, a link to the context
/// in each record's headers (one link per distinct producer span).
pub(crate) fn process_batch_span(messages: &[ReceivedMessage], group: &str) -> tracing::Span {
    let Some(first) = messages.first() else {
        return tracing::Span::none();
    };
    let topic = first.topic();
    let span = tracing::info_span!(
        parent: None,
        "kafka_batch",
        "otel.name" = format!("process {topic}").as_str(),
        "otel.kind" = "consumer",
        "messaging.system" = "kafka",
        "messaging.operation.type" = "process",
        "messaging.operation.name" = "process",
        "messaging.destination.name" = topic,
        "messaging.destination.partition.id" = first.partition().to_string().as_str(),
        "messaging.consumer.group.name" = group,
        "messaging.batch.message_count" = messages.len() as i64,
    );
    if span.is_disabled() {
        return span;
    }
    let mut linked = std::collections::HashSet::new();
    for message in messages {
        let cx = extract(message);
        let producer = cx.span().span_context().clone();
        if producer.is_valid() && linked.insert((producer.trace_id(), producer.span_id())) {
            span.add_link(producer);
        }
    }
    span
}

/// Records on the current (`process`) span that handling failed with `error_type`.
pub(crate) fn record_process_error(error_type: &str) {
    let span = tracing::Span::current();
    span.record("error.type", error_type);
    span.record("otel.status_code", "error");
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    fn names(h: &OwnedHeaders) -> Vec<String> {
        h.iter().map(|h| h.key.to_string()).collect()
    }

    /// A subscriber that turns spans into OpenTelemetry spans (no exporter:
    /// only their contexts matter here).
    fn otel_subscriber() -> impl tracing::Subscriber + Send + Sync {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("unit")))
    }

    #[test]
    fn the_send_span_context_is_written_unless_the_caller_set_a_traceparent() {
        tracing::subscriber::with_default(otel_subscriber(), || {
            let span = send_span("orders", Some(b"k1"));
            let trace_id = span.context().span().span_context().trace_id();
            let span_id = span.context().span().span_context().span_id();
            assert!(span.context().span().span_context().is_valid());

            // No header of the caller's: the send span's context is written.
            let written = inject(&[], OwnedHeaders::new(), &span);
            assert_eq!(names(&written), [TRACEPARENT]);
            let expected = format!("00-{trace_id}-{span_id}-01");
            assert_eq!(written.get(0).value, Some(expected.as_bytes()));

            // The caller's own `traceparent` (any case) stays, alone.
            let caller = "00-11111111111111111111111111111111-2222222222222222-01";
            let event_headers = vec![("TraceParent".to_string(), caller.as_bytes().to_vec())];
            let base = OwnedHeaders::new().insert(Header {
                key: "TraceParent",
                value: Some(caller.as_bytes()),
            });
            let kept = inject(&event_headers, base, &span);
            assert_eq!(names(&kept), ["TraceParent"]);
            assert_eq!(kept.get(0).value, Some(caller.as_bytes()));
        });
    }

    #[test]
    fn a_remote_context_is_written_in_w3c_form() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        let remote = SpanContext::new(
            TraceId::from(0x0af7651916cd43dd8448eb211c80319c_u128),
            SpanId::from(0xb7ad6b7169203331_u64),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "x")]).unwrap(),
        );
        let cx = Context::new().with_remote_span_context(remote);
        let written = inject_context(OwnedHeaders::new(), &cx);
        assert_eq!(names(&written), [TRACEPARENT, TRACESTATE]);
        assert_eq!(
            written.get(0).value,
            Some(&b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"[..])
        );
        assert_eq!(written.get(1).value, Some(&b"vendor=x"[..]));
    }

    #[test]
    fn an_invalid_context_adds_no_header() {
        let h = inject_context(OwnedHeaders::new(), &Context::new());
        assert_eq!(h.count(), 0);
        // No OpenTelemetry layer installed: nothing either.
        let h = inject(&[], OwnedHeaders::new(), &send_span("t", None));
        assert_eq!(h.count(), 0);
    }

    #[test]
    fn error_types_are_variant_names() {
        assert_eq!(
            producer_error_type(ProducerErrorKind::QueueFull),
            "QueueFull"
        );
        assert_eq!(
            producer_error_type(ProducerErrorKind::Broker(
                rdkafka::types::RDKafkaErrorCode::NotLeaderForPartition
            )),
            "Broker(NotLeaderForPartition)"
        );
    }
}
