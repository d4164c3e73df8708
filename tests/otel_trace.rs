//! Trace context across Kafka (feature `otel`), against the real broker started
//! by `scripts/up`.
//!
//! A `tracing` subscriber with the `tracing-opentelemetry` layer over an SDK
//! tracer provider collects every finished span in the SDK's in-memory exporter.
//! Events are published through keel's default publish stack inside a parent
//! span, consumed by keel's consumer, and the spans are checked: one trace from
//! the parent through the PRODUCER `send` span to the CONSUMER `process` span,
//! with the messaging semantic-convention attributes (semconv 1.28+).
#![cfg(feature = "otel")]

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keel::kafka::client::KafkaClient;
use keel::kafka::config::{KafkaConfig, KafkaLogLevel};
use keel::kafka::consumer::{BoxError, ConsumedEvent, HandlerError, KafkaConsumer, StartOptions};
use keel::kafka::envelope::EventEnvelope;
use keel::kafka::error::ProducerErrorKind;
use keel::kafka::otel::TRACEPARENT;
use keel::kafka::producer::{PublishBatchRequest, PublishRequest, PublishStack};
use keel::kafka::registry::HandlerRegistry;
use opentelemetry::trace::{SpanId, SpanKind, Status, TraceContextExt, TraceId, TracerProvider};
use opentelemetry::{Key, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use tower::ServiceExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use uuid::Uuid;

/// The exporter every span of this test binary ends in. The subscriber is
/// global: the consumer's lanes run on the runtime's worker threads.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        // The simple processor exports each span as it ends.
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("keel-otel-test")));
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        exporter
    })
}

/// The finished spans of `trace`.
fn spans_of(trace: TraceId) -> Vec<SpanData> {
    exporter()
        .get_finished_spans()
        .expect("the in-memory exporter")
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect()
}

/// Waits (up to 60 s) for the span of `trace` named `name`.
async fn wait_for_span(trace: TraceId, name: &str) -> SpanData {
    for _ in 0..600 {
        if let Some(s) = spans_of(trace).into_iter().find(|s| s.name == name) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let names: Vec<_> = spans_of(trace).into_iter().map(|s| s.name).collect();
    panic!("no span {name:?} in trace {trace} within 60 s; its spans: {names:?}");
}

fn attr(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == Key::from(key.to_string()))
        .map(|kv| kv.value.clone())
}

/// Asserts that `span` has attribute `key` equal to `expected`.
fn assert_attr(span: &SpanData, key: &str, expected: Value) {
    assert_eq!(
        attr(span, key),
        Some(expected),
        "attribute {key} of span {:?}; its attributes: {:?}",
        span.name,
        span.attributes
    );
}

fn str_value(s: &str) -> Value {
    Value::String(s.to_string().into())
}

fn config(brokers: &str) -> KafkaConfig {
    KafkaConfig::builder()
        .brokers(brokers.split(',').map(str::to_string))
        .client_id("keel-otel-test")
        .group_id(unique("unused"))
        .log_level(KafkaLogLevel::Warn)
        .delivery_timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

fn client(brokers: &str) -> KafkaClient {
    KafkaClient::connect(config(brokers)).unwrap()
}

/// keel's consumer of `topic` from its start, in a group of its own.
fn start_consumer(
    brokers: &str,
    topic: &str,
    group: String,
    options: impl FnOnce(StartOptions) -> StartOptions,
    registry: HandlerRegistry,
) -> KafkaConsumer {
    let mut consumer_config = ClientConfig::new();
    consumer_config.set("bootstrap.servers", brokers);
    KafkaConsumer::builder(consumer_config, group)
        .start(
            options(StartOptions::new([topic]).from_beginning(true)),
            registry,
        )
        .unwrap()
}

/// A registry whose `order.created` handler succeeds and does nothing.
fn ok_registry() -> HandlerRegistry {
    HandlerRegistry::builder()
        .handler_fn("order.created", |_event: ConsumedEvent| async {
            Ok::<_, BoxError>(())
        })
        .build()
        .unwrap()
}

fn unique(name: &str) -> String {
    format!("keel-otel-{name}-{}", Uuid::new_v4())
}

/// A handler error of a type of its own, to see it as the span's `error.type`.
#[derive(Debug)]
struct OutOfStock;

impl std::fmt::Display for OutOfStock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("out of stock")
    }
}

impl std::error::Error for OutOfStock {}

/// Reads the first record of partition 0 of `topic` with a plain rdkafka
/// consumer; returns its headers.
fn first_record_headers(brokers: &str, topic: &str) -> Vec<(String, Vec<u8>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    for _ in 0..60 {
        match consumer.poll(Duration::from_secs(1)) {
            Some(Ok(m)) => {
                return m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    panic!("no record in {topic} within 60 s");
}

fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| std::str::from_utf8(v).expect("UTF-8 header"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_publisher_through_kafka_to_the_handler() {
    let brokers = support::kafka_brokers();
    exporter();
    let client = client(&brokers);
    let topic = unique("orders");
    let dlq_topic = format!("{topic}.dlq");
    for t in [&topic, &dlq_topic] {
        client
            .create_topic(t, 1, 1, Duration::from_secs(20))
            .await
            .expect("create topic");
    }
    let group = unique("group");
    let stack = PublishStack::new(&client);

    // The caller's span: both events are published inside it.
    let parent = tracing::info_span!("checkout");
    let trace = parent.context().span().span_context().trace_id();
    let parent_id = parent.context().span().span_context().span_id();
    assert_ne!(
        trace,
        TraceId::INVALID,
        "the OpenTelemetry layer is installed"
    );

    let good = EventEnvelope::new("order.created", json!({"sku": "a"})).with_key("customer-7");
    let bad = EventEnvelope::new("order.created", json!({"sku": "gone"}));
    let (good_ack, bad_ack) = async {
        let good_ack = stack
            .event_service()
            .oneshot(PublishRequest::new(topic.clone(), good.clone()))
            .await
            .expect("publish the good event");
        let bad_ack = stack
            .event_service()
            .oneshot(PublishRequest::new(topic.clone(), bad.clone()))
            .await
            .expect("publish the bad event");
        (good_ack, bad_ack)
    }
    .instrument(parent.clone())
    .await;
    drop(parent);

    // The PRODUCER spans: children of the caller's span, with the semconv attributes.
    let sends: Vec<SpanData> = {
        let name = format!("send {topic}");
        wait_for_span(trace, &name).await;
        spans_of(trace)
            .into_iter()
            .filter(|s| s.name == name)
            .collect()
    };
    assert_eq!(sends.len(), 2, "one send span per publish: {sends:?}");
    let send_of = |offset: i64| {
        sends
            .iter()
            .find(|s| attr(s, "messaging.kafka.offset") == Some(Value::I64(offset)))
            .unwrap_or_else(|| panic!("no send span with offset {offset}: {sends:?}"))
    };
    let good_send = send_of(good_ack.offset);
    let bad_send = send_of(bad_ack.offset);
    for send in [good_send, bad_send] {
        assert_eq!(send.span_kind, SpanKind::Producer);
        assert_eq!(send.span_context.trace_id(), trace);
        assert_ne!(send.parent_span_id, SpanId::INVALID);
        assert_attr(send, "messaging.system", str_value("kafka"));
        assert_attr(send, "messaging.destination.name", str_value(&topic));
        assert_attr(send, "messaging.operation.type", str_value("send"));
        assert_attr(send, "messaging.destination.partition.id", str_value("0"));
        assert_eq!(attr(send, "error.type"), None);
    }
    assert_attr(
        good_send,
        "messaging.kafka.message.key",
        str_value("customer-7"),
    );
    assert_eq!(attr(bad_send, "messaging.kafka.message.key"), None);
    // The stack's `publish` logging span sits between the caller's span and the
    // send span when DEBUG is on; here every level is on.
    let ancestors_reach_parent = |span: &SpanData| {
        let all = spans_of(trace);
        let mut at = span.parent_span_id;
        for _ in 0..8 {
            if at == parent_id {
                return true;
            }
            match all.iter().find(|s| s.span_context.span_id() == at) {
                Some(s) => at = s.parent_span_id,
                None => return false,
            }
        }
        false
    };
    wait_for_span(trace, "checkout").await;
    assert!(ancestors_reach_parent(good_send), "{good_send:?}");

    // The records carry the send spans' contexts.
    let headers = first_record_headers(&brokers, &topic);
    let sent_parent = format!("00-{trace}-{}-01", good_send.span_context.span_id());
    assert_eq!(header(&headers, TRACEPARENT), Some(sent_parent.as_str()));

    // Consume both: the good one succeeds, the bad one fails for good and is
    // dead-lettered.
    let handled = Arc::new(AtomicU32::new(0));
    let registry = {
        let handled = handled.clone();
        HandlerRegistry::builder()
            .handler_fn("order.created", move |event: ConsumedEvent| {
                let handled = handled.clone();
                async move {
                    handled.fetch_add(1, Ordering::SeqCst);
                    if event.envelope().payload()["sku"] == json!("gone") {
                        return Err::<(), BoxError>(HandlerError::permanent(OutOfStock).into());
                    }
                    // The handler's own spans join the trace.
                    tracing::info_span!("reserve_stock").in_scope(|| {});
                    Ok(())
                }
            })
            .build()
            .unwrap()
    };
    let consumer = start_consumer(
        &brokers,
        &topic,
        group.clone(),
        |o| o.enable_dlq(true),
        registry,
    );

    let process_name = format!("process {topic}");
    let mut processes = Vec::new();
    for _ in 0..600 {
        processes = spans_of(trace)
            .into_iter()
            .filter(|s| s.name == process_name)
            .collect();
        if processes.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(processes.len(), 2, "two process spans: {processes:?}");
    assert_eq!(handled.load(Ordering::SeqCst), 2);

    let process_of = |offset: i64| {
        processes
            .iter()
            .find(|s| attr(s, "messaging.kafka.offset") == Some(Value::I64(offset)))
            .unwrap_or_else(|| panic!("no process span with offset {offset}: {processes:?}"))
    };
    for (ack, send) in [(&good_ack, good_send), (&bad_ack, bad_send)] {
        let process = process_of(ack.offset);
        assert_eq!(process.span_kind, SpanKind::Consumer);
        // The child of the producer's span, in the caller's trace.
        assert_eq!(process.span_context.trace_id(), trace);
        assert_eq!(process.parent_span_id, send.span_context.span_id());
        assert!(process.parent_span_is_remote);
        assert_attr(process, "messaging.system", str_value("kafka"));
        assert_attr(process, "messaging.destination.name", str_value(&topic));
        assert_attr(process, "messaging.operation.type", str_value("process"));
        assert_attr(process, "messaging.consumer.group.name", str_value(&group));
        assert_attr(
            process,
            "messaging.destination.partition.id",
            str_value(&ack.partition.to_string()),
        );
    }
    let good_process = process_of(good_ack.offset);
    assert_eq!(attr(good_process, "error.type"), None);
    assert_attr(
        good_process,
        "messaging.kafka.message.key",
        str_value("customer-7"),
    );
    assert_ne!(good_process.status, Status::error(""));
    // The handler's span is the process span's child.
    let reserve = wait_for_span(trace, "reserve_stock").await;
    assert_eq!(reserve.parent_span_id, good_process.span_context.span_id());

    let bad_process = process_of(bad_ack.offset);
    assert_attr(
        bad_process,
        "error.type",
        str_value(std::any::type_name::<OutOfStock>()),
    );
    assert!(
        matches!(bad_process.status, Status::Error { .. }),
        "{:?}",
        bad_process.status
    );

    // The dead-letter record keeps the original context.
    let dead = first_record_headers(&brokers, &dlq_topic);
    let bad_parent = format!("00-{trace}-{}-01", bad_send.span_context.span_id());
    assert_eq!(header(&dead, TRACEPARENT), Some(bad_parent.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_set_by_the_caller_is_kept_and_continued_by_the_consumer() {
    let brokers = support::kafka_brokers();
    exporter();
    let client = client(&brokers);
    let topic = unique("caller");
    client
        .create_topic(&topic, 1, 1, Duration::from_secs(20))
        .await
        .expect("create topic");

    // Published inside a span of another trace: the caller's header still wins.
    let caller_trace = TraceId::from(u128::from_be_bytes(*Uuid::new_v4().as_bytes()));
    let caller_span = SpanId::from(0x00f067aa0ba902b7_u64);
    let traceparent = format!("00-{caller_trace}-{caller_span}-01");
    let event = EventEnvelope::new("order.created", json!({"sku": "b"}))
        .with_header(TRACEPARENT, traceparent.clone());
    let other = tracing::info_span!("unrelated");
    let other_trace = other.context().span().span_context().trace_id();
    assert_ne!(other_trace, TraceId::INVALID);
    PublishStack::new(&client)
        .event_service()
        .oneshot(PublishRequest::new(topic.clone(), event))
        .instrument(other)
        .await
        .expect("publish");

    let headers = first_record_headers(&brokers, &topic);
    let traceparents: Vec<_> = headers.iter().filter(|(n, _)| n == TRACEPARENT).collect();
    assert_eq!(traceparents.len(), 1, "{headers:?}");
    assert_eq!(header(&headers, TRACEPARENT), Some(traceparent.as_str()));

    let consumer = start_consumer(
        &brokers,
        &topic,
        unique("caller-group"),
        |o| o,
        ok_registry(),
    );
    let process = wait_for_span(caller_trace, &format!("process {topic}")).await;
    // The runtime's processing histogram: the bucket of this message carries its
    // trace and its `process` span (an exemplar).
    let processing = consumer.metrics().processing;
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(process.parent_span_id, caller_span);
    assert_eq!(process.span_kind, SpanKind::Consumer);
    let exemplars: Vec<_> = processing.processed.exemplars.iter().flatten().collect();
    assert_eq!(exemplars.len(), 1, "{processing:?}");
    assert_eq!(exemplars[0].trace.trace_id_hex(), caller_trace.to_string());
    assert_eq!(
        exemplars[0].trace.span_id_hex(),
        process.span_context.span_id().to_string()
    );
    assert!(
        processing
            .dead_lettered
            .exemplars
            .iter()
            .all(Option::is_none)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_sets_error_type_on_the_send_span() {
    let brokers = support::kafka_brokers();
    exporter();
    let client = client(&brokers);
    let topic = unique("too-large");
    let parent = tracing::info_span!("upload");
    let trace = parent.context().span().span_context().trace_id();
    // Larger than librdkafka's message.max.bytes (1 MB): refused before any I/O.
    let event = EventEnvelope::new("blob", json!({"data": "x".repeat(2 * 1024 * 1024)}));
    let err = PublishStack::new(&client)
        .event_service()
        .oneshot(PublishRequest::new(topic.clone(), event))
        .instrument(parent)
        .await
        .expect_err("a 2 MB event is refused");
    assert_eq!(err.kind(), ProducerErrorKind::MessageTooLarge);

    let send = wait_for_span(trace, &format!("send {topic}")).await;
    assert_eq!(send.span_kind, SpanKind::Producer);
    assert_attr(&send, "error.type", str_value("MessageTooLarge"));
    assert_attr(&send, "messaging.operation.type", str_value("send"));
    assert!(
        matches!(send.status, Status::Error { .. }),
        "{:?}",
        send.status
    );
    assert_eq!(attr(&send, "messaging.kafka.offset"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_one_send_span_whose_context_every_event_carries() {
    let brokers = support::kafka_brokers();
    exporter();
    let client = client(&brokers);
    let topic = unique("batch");
    client
        .create_topic(&topic, 1, 1, Duration::from_secs(20))
        .await
        .expect("create topic");
    let parent = tracing::info_span!("import");
    let trace = parent.context().span().span_context().trace_id();
    let events: Vec<_> = (0..3)
        .map(|i| EventEnvelope::new("order.created", json!({"i": i})))
        .collect();
    let ack = PublishStack::new(&client)
        .batch_service()
        .oneshot(PublishBatchRequest::new(topic.clone(), events))
        .instrument(parent)
        .await
        .expect("publish the batch");
    assert_eq!(ack.acks.len(), 3);

    let send = wait_for_span(trace, &format!("send {topic}")).await;
    let sends = spans_of(trace)
        .into_iter()
        .filter(|s| s.name == send.name)
        .count();
    assert_eq!(sends, 1, "one send span for the batch");
    assert_eq!(send.span_kind, SpanKind::Producer);
    assert_attr(&send, "messaging.batch.message_count", Value::I64(3));
    assert_attr(&send, "messaging.destination.name", str_value(&topic));
    assert_attr(&send, "messaging.operation.type", str_value("send"));

    let handled = Arc::new(AtomicU32::new(0));
    let registry = {
        let handled = handled.clone();
        HandlerRegistry::builder()
            .handler_fn("order.created", move |_event: ConsumedEvent| {
                let handled = handled.clone();
                async move {
                    handled.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, BoxError>(())
                }
            })
            .build()
            .unwrap()
    };
    let consumer = start_consumer(&brokers, &topic, unique("batch-group"), |o| o, registry);
    let process_name = format!("process {topic}");
    let mut processes = Vec::new();
    for _ in 0..600 {
        processes = spans_of(trace)
            .into_iter()
            .filter(|s| s.name == process_name)
            .collect();
        if processes.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(processes.len(), 3, "{processes:?}");
    assert_eq!(handled.load(Ordering::SeqCst), 3);
    for process in &processes {
        assert_eq!(process.span_kind, SpanKind::Consumer);
        assert_eq!(process.parent_span_id, send.span_context.span_id());
    }
}

/// A batch handler's call is one CONSUMER span `process <topic>` with
/// `messaging.batch.message_count`, linked to the producer span of each record
/// (three records published in three traces).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_handler_call_is_one_process_span_linked_to_every_record_trace() {
    use keel::kafka::Kafka;
    use keel::kafka::consumer::Record;
    use keel::kafka::consumer::batch::{BatchOptions, BatchResult};
    let brokers = support::kafka_brokers();
    exporter();
    let client = client(&brokers);
    let topic = unique("batch-handler");
    client
        .create_topic(&topic, 1, 1, Duration::from_secs(20))
        .await
        .expect("create topic");
    // Three records, each published in a trace of its own.
    let mut sends = Vec::new();
    for i in 0..3 {
        let parent = tracing::info_span!("order");
        let trace = parent.context().span().span_context().trace_id();
        PublishStack::new(&client)
            .event_service()
            .oneshot(PublishRequest::new(
                topic.clone(),
                EventEnvelope::new("order.created", json!({ "i": i })),
            ))
            .instrument(parent)
            .await
            .expect("publish");
        let send = wait_for_span(trace, &format!("send {topic}")).await;
        sends.push(send.span_context.clone());
    }

    let handled = Arc::new(AtomicU32::new(0));
    let kafka = Kafka::connect(config(&brokers)).unwrap();
    let consumer = {
        let handled = handled.clone();
        kafka
            .consumer(unique("batch-handler-group"))
            .from_beginning(true)
            .on_batch(
                &topic,
                BatchOptions::new(10).max_wait(Duration::from_millis(500)),
                move |records: Vec<Record>| {
                    let handled = handled.clone();
                    async move {
                        handled.fetch_add(records.len() as u32, Ordering::SeqCst);
                        BatchResult::ok()
                    }
                },
            )
            .start()
            .unwrap()
    };
    let process_name = format!("process {topic}");
    let batch_spans = || -> Vec<SpanData> {
        exporter()
            .get_finished_spans()
            .expect("the in-memory exporter")
            .into_iter()
            .filter(|s| {
                s.name == process_name && attr(s, "messaging.batch.message_count").is_some()
            })
            .collect()
    };
    let counted = |spans: &[SpanData]| -> i64 {
        spans
            .iter()
            .map(|s| match attr(s, "messaging.batch.message_count") {
                Some(Value::I64(n)) => n,
                other => panic!("a count: {other:?}"),
            })
            .sum()
    };
    let mut batches = Vec::new();
    for _ in 0..600 {
        batches = batch_spans();
        if counted(&batches) >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 3);
    // Usually one batch of three; however librdkafka delivered them, the batch
    // spans count three records and link the three producer spans.
    assert_eq!(counted(&batches), 3, "{batches:?}");
    let mut linked = Vec::new();
    for batch in &batches {
        assert_eq!(batch.span_kind, SpanKind::Consumer);
        assert_attr(batch, "messaging.operation.type", str_value("process"));
        assert_attr(batch, "messaging.destination.name", str_value(&topic));
        assert_eq!(
            batch.parent_span_id,
            SpanId::INVALID,
            "a root: its records have many traces"
        );
        linked.extend(
            batch
                .links
                .iter()
                .map(|l| (l.span_context.trace_id(), l.span_context.span_id())),
        );
    }
    for send in &sends {
        assert!(
            linked.contains(&(send.trace_id(), send.span_id())),
            "the producer span {send:?} is linked; links: {linked:?}"
        );
    }
    assert_eq!(linked.len(), 3, "one link per record's producer span");
}

/// The spans of `trace` whose name is `name` and that keel made (CLIENT kind;
/// the SDK's own spans of the same name are INTERNAL).
fn keel_calls(trace: TraceId, name: &str) -> Vec<SpanData> {
    spans_of(trace)
        .into_iter()
        .filter(|s| s.name == name && s.span_kind == SpanKind::Client)
        .collect()
}

/// Whether `span` descends from the span `ancestor` within `trace`.
fn descends_from(trace: TraceId, span: &SpanData, ancestor: SpanId) -> bool {
    let all = spans_of(trace);
    let mut at = span.parent_span_id;
    for _ in 0..12 {
        if at == ancestor {
            return true;
        }
        match all.iter().find(|s| s.span_context.span_id() == at) {
            Some(s) => at = s.parent_span_id,
            None => return false,
        }
    }
    false
}

/// A facade over a fresh bucket on moto (which answers with request ids), with
/// uploads above 5 MiB in 5 MiB parts.
async fn s3_facade(test: &str) -> (keel::s3::S3, String) {
    use keel::s3::{S3, S3Client, S3Config};
    let server = support::moto();
    let bucket = format!(
        "keel-otel-{test}-{}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    let config = S3Config::builder()
        .region(&server.region)
        .bucket(&bucket)
        .endpoint(&server.endpoint)
        .credentials(&server.access_key, &server.secret_key)
        .build()
        .unwrap();
    let client = S3Client::connect(config).await.unwrap();
    client
        .sdk()
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .unwrap_or_else(|e| panic!("create bucket {bucket}: {e:?}"));
    let s3 = S3::builder(client)
        .multipart_threshold(5 * 1024 * 1024)
        .build();
    (s3, bucket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_calls_are_client_spans_with_the_aws_conventions_and_the_sdk_spans_are_their_children() {
    use keel::s3::upload::UploadOptions;
    exporter();
    let (s3, bucket) = s3_facade("s3").await;
    let parent = tracing::info_span!("store");
    let trace = parent.context().span().span_context().trace_id();
    let parent_id = parent.context().span().span_context().span_id();

    // 6 MiB: a multipart upload of two parts (5 MiB + 1 MiB).
    let body = vec![7u8; 6 * 1024 * 1024];
    let missing = async {
        let out = s3
            .upload("dir/big.bin", body, UploadOptions::default())
            .await
            .expect("multipart upload");
        assert!(s3.exists("dir/big.bin").await.expect("exists"));
        s3.download_bytes("dir/missing.bin")
            .await
            .expect_err("no such object");
        out
    }
    .instrument(parent)
    .await;
    let _ = missing;
    wait_for_span(trace, "store").await;

    let check_common = |span: &SpanData, method: &str, key: &str| {
        assert_eq!(span.span_kind, SpanKind::Client, "{span:?}");
        assert_attr(span, "rpc.system", str_value("aws-api"));
        assert_attr(span, "rpc.service", str_value("S3"));
        assert_attr(span, "rpc.method", str_value(method));
        assert_attr(span, "aws.s3.bucket", str_value(&bucket));
        assert_attr(span, "aws.s3.key", str_value(key));
        assert!(
            matches!(attr(span, "aws.request_id"), Some(Value::String(ref id)) if !id.as_str().is_empty()),
            "aws.request_id of {span:?}"
        );
        assert!(descends_from(trace, span, parent_id), "{span:?}");
    };

    // The multipart upload: create, two parts, complete, with the upload id.
    let create = keel_calls(trace, "S3.CreateMultipartUpload");
    assert_eq!(create.len(), 1, "{create:?}");
    check_common(&create[0], "CreateMultipartUpload", "dir/big.bin");
    let mut parts = keel_calls(trace, "S3.UploadPart");
    assert_eq!(parts.len(), 2, "{parts:?}");
    parts.sort_by_key(|p| format!("{:?}", attr(p, "aws.s3.part_number")));
    let upload_id = attr(&parts[0], "aws.s3.upload_id").expect("the upload id");
    for (part, number) in parts.iter().zip([1, 2]) {
        check_common(part, "UploadPart", "dir/big.bin");
        assert_attr(part, "aws.s3.part_number", Value::I64(number));
        assert_attr(part, "aws.s3.upload_id", upload_id.clone());
        assert_eq!(attr(part, "error.type"), None);
    }
    let complete = keel_calls(trace, "S3.CompleteMultipartUpload");
    assert_eq!(complete.len(), 1, "{complete:?}");
    check_common(&complete[0], "CompleteMultipartUpload", "dir/big.bin");
    assert_attr(&complete[0], "aws.s3.upload_id", upload_id.clone());

    // The facade's span of the upload is the parent of all four calls.
    let facade = spans_of(trace)
        .into_iter()
        .find(|s| s.name == "s3 upload")
        .expect("the facade's span");
    assert_attr(&facade, "rpc.system", str_value("aws-api"));
    assert_attr(&facade, "aws.s3.key", str_value("dir/big.bin"));
    for call in create.iter().chain(&parts).chain(&complete) {
        assert!(descends_from(trace, call, facade.span_context.span_id()));
    }
    // keel's own names only with `otel-keel-fields`.
    if cfg!(feature = "otel-keel-fields") {
        assert_attr(&facade, "s3_operation", str_value("upload"));
    } else {
        assert_eq!(attr(&facade, "s3_operation"), None);
        assert_eq!(attr(&facade, "bucket"), None);
    }

    // The SDK's own spans are children of keel's (the parts ran on their own tasks).
    for part in &parts {
        let sdk_child = spans_of(trace).into_iter().find(|s| {
            s.name == "S3.UploadPart"
                && s.span_kind == SpanKind::Internal
                && s.parent_span_id == part.span_context.span_id()
        });
        assert!(
            sdk_child.is_some(),
            "the SDK's S3.UploadPart span is a child of keel's {:?}",
            part.span_context.span_id()
        );
    }

    let head = keel_calls(trace, "S3.HeadObject");
    assert!(!head.is_empty());
    check_common(&head[0], "HeadObject", "dir/big.bin");

    // A failed call: error.type is the S3 error code, the status an error.
    let get = keel_calls(trace, "S3.GetObject");
    let failed = get
        .iter()
        .find(|s| attr(s, "aws.s3.key") == Some(str_value("dir/missing.bin")))
        .unwrap_or_else(|| panic!("a GetObject span for the missing key: {get:?}"));
    check_common(failed, "GetObject", "dir/missing.bin");
    assert_attr(failed, "error.type", str_value("NoSuchKey"));
    assert!(
        matches!(failed.status, Status::Error { .. }),
        "{:?}",
        failed.status
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_field_names_are_only_on_spans_with_the_opt_in() {
    let brokers = support::kafka_brokers();
    exporter();
    let client = client(&brokers);
    let topic = unique("names");
    client
        .create_topic(&topic, 1, 1, Duration::from_secs(20))
        .await
        .expect("create topic");
    let parent = tracing::info_span!("names");
    let trace = parent.context().span().span_context().trace_id();
    let event = EventEnvelope::new("order.created", json!({"n": 1}));
    let event_id = event.event_id().to_string();
    PublishStack::new(&client)
        .event_service()
        .oneshot(PublishRequest::new(topic.clone(), event))
        .instrument(parent)
        .await
        .expect("publish");
    let publish = wait_for_span(trace, "publish").await;
    assert_attr(&publish, "messaging.destination.name", str_value(&topic));
    assert_attr(
        &publish,
        "cloudevents.event_type",
        str_value("order.created"),
    );
    assert_attr(&publish, "cloudevents.event_id", str_value(&event_id));

    let consumer = start_consumer(
        &brokers,
        &topic,
        unique("names-group"),
        |o| o,
        ok_registry(),
    );
    let process = wait_for_span(trace, &format!("process {topic}")).await;
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();

    if cfg!(feature = "otel-keel-fields") {
        assert_attr(&publish, "topic", str_value(&topic));
        assert_attr(&publish, "event_type", str_value("order.created"));
        assert_attr(&process, "topic", str_value(&topic));
        assert_attr(&process, "offset", Value::I64(0));
    } else {
        for (span, key) in [
            (&publish, "topic"),
            (&publish, "event_type"),
            (&publish, "event_id"),
            (&process, "topic"),
            (&process, "partition"),
            (&process, "offset"),
        ] {
            assert_eq!(attr(span, key), None, "{key} on {:?}", span.name);
        }
    }
    assert_attr(&process, "messaging.kafka.offset", Value::I64(0));
    assert_attr(
        &process,
        "messaging.destination.partition.id",
        str_value("0"),
    );
}
