//! Snapshots turned into metric families, and the collector that hands them to
//! `prometheus-client`'s encoder.

use keel_layers::circuit_breaker::{CircuitBreakerHandle, CircuitState};
use keel_layers::metrics::{Exemplar, Histogram, RegisteredSnapshot};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;
#[cfg(any(feature = "kafka", feature = "s3"))]
use std::time::{SystemTime, UNIX_EPOCH};

type Labels = Vec<(String, String)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Clone, Debug)]
pub(super) struct Family {
    name: String,
    help: String,
    kind: Kind,
    seconds: bool,
    pub(super) samples: Vec<Sample>,
}

#[derive(Clone, Debug)]
pub(super) struct Sample {
    labels: Labels,
    value: Value,
}

#[derive(Clone, Debug)]
enum Value {
    Count(u64),
    Gauge(f64),
    Histogram {
        sum: f64,
        count: u64,
        buckets: Vec<(f64, u64)>,
        /// (bucket index, exemplar), in bucket order.
        exemplars: Vec<(usize, Exemplar)>,
    },
}

impl Sample {
    pub(super) fn gauge(labels: Labels, value: f64) -> Self {
        Sample {
            labels,
            value: Value::Gauge(value),
        }
    }

    pub(super) fn counter(labels: Labels, value: u64) -> Self {
        Sample {
            labels,
            value: Value::Count(value),
        }
    }
}

/// A metric or label name as Prometheus wants it: dots and any other character
/// outside `[a-zA-Z0-9_]` become `_`.
fn sanitize(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        out.insert(0, '_');
    }
    out
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (sanitize(k), (*v).to_string()))
        .collect()
}

fn with(base: &Labels, extra: &[(&str, &str)]) -> Labels {
    let mut out = base.clone();
    out.extend(labels(extra));
    out
}

/// The family called `name` (sanitized), created on first use. A later use with
/// another kind gets a family of its own under a `_<kind>` suffix, so a name
/// clash cannot produce invalid text.
pub(super) fn family<'a>(
    families: &'a mut Vec<Family>,
    name: &str,
    help: &str,
    kind: Kind,
) -> &'a mut Family {
    family_with_unit(families, name, help, kind, false)
}

fn family_with_unit<'a>(
    families: &'a mut Vec<Family>,
    name: &str,
    help: &str,
    kind: Kind,
    seconds: bool,
) -> &'a mut Family {
    let mut name = sanitize(name);
    if let Some(existing) = families.iter().position(|f| f.name == name) {
        if families[existing].kind == kind && families[existing].seconds == seconds {
            return &mut families[existing];
        }
        name.push_str(match kind {
            Kind::Counter => "_counter",
            Kind::Gauge => "_gauge",
            Kind::Histogram => "_histogram",
        });
        return family_with_unit(families, &name, help, kind, seconds);
    }
    families.push(Family {
        name,
        help: help.to_string(),
        kind,
        seconds,
        samples: Vec::new(),
    });
    families.last_mut().expect("just pushed")
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn unix_seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

fn histogram_value(h: &Histogram, bounds: &[Duration]) -> Value {
    let buckets = h
        .buckets
        .iter()
        .enumerate()
        .map(|(i, n)| (bounds.get(i).map_or(f64::INFINITY, |b| seconds(*b)), *n))
        .collect();
    Value::Histogram {
        sum: h.sum().as_secs_f64(),
        count: h.count,
        buckets,
        exemplars: h
            .exemplars
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.map(|e| (i, e)))
            .collect(),
    }
}

/// `messaging.client.operation.duration` → stem `messaging_client_operation`.
fn stem(name: &str) -> String {
    let name = sanitize(name);
    name.strip_suffix("_duration")
        .map_or(name.clone(), str::to_string)
}

pub(super) fn layers(families: &mut Vec<Family>, snapshots: &[RegisteredSnapshot]) {
    for r in snapshots {
        let stem = stem(&r.name);
        let base: Labels = r
            .labels
            .iter()
            .map(|(k, v)| (sanitize(k), v.clone()))
            .collect();
        let s = &r.snapshot;
        let h = &s.histograms;
        let duration = family_with_unit(
            families,
            &format!("{stem}_duration"),
            "Duration of completed calls, by outcome.",
            Kind::Histogram,
            true,
        );
        for (outcome, histogram) in [
            ("success", &h.success),
            ("failure", &h.failure),
            ("ignored", &h.ignored),
        ] {
            // Success and failure always (stable series for rates); `ignored`
            // once a classifier has used it, which most never do.
            if outcome == "ignored" && histogram.count == 0 {
                continue;
            }
            duration.samples.push(Sample {
                labels: with(&base, &[("outcome", outcome)]),
                value: histogram_value(histogram, &h.bounds),
            });
        }
        let failures = family(
            families,
            &format!("{stem}_failures"),
            "Failed calls, by error type (the classifier's failure class).",
            Kind::Counter,
        );
        for (class, n) in &s.failures_by_class {
            failures
                .samples
                .push(Sample::counter(with(&base, &[("error_type", class)]), *n));
        }
        family(
            families,
            &format!("{stem}_cancelled"),
            "Calls whose future was dropped before completing.",
            Kind::Counter,
        )
        .samples
        .push(Sample::counter(base.clone(), s.cancelled));
        family(
            families,
            &format!("{stem}_in_flight"),
            "Calls running now.",
            Kind::Gauge,
        )
        .samples
        .push(Sample::gauge(base.clone(), s.in_flight as f64));
        for (suffix, help, at) in [
            (
                "last_success_timestamp",
                "Unix time of the last success.",
                s.last_success_unix_ms,
            ),
            (
                "last_failure_timestamp",
                "Unix time of the last failure.",
                s.last_failure_unix_ms,
            ),
        ] {
            if let Some(ms) = at {
                family_with_unit(
                    families,
                    &format!("{stem}_{suffix}"),
                    help,
                    Kind::Gauge,
                    true,
                )
                .samples
                .push(Sample::gauge(base.clone(), unix_seconds(ms)));
            }
        }
        if let Some(l) = &s.latency {
            let window = family_with_unit(
                families,
                &format!("{stem}_duration_window"),
                "HdrHistogram percentiles of this instance over the recent window (not to be summed across instances).",
                Kind::Gauge,
                true,
            );
            for (q, v) in [
                ("0.5", l.p50),
                ("0.9", l.p90),
                ("0.99", l.p99),
                ("0.999", l.p999),
                ("1", l.max),
            ] {
                let value = if l.count == 0 { f64::NAN } else { seconds(v) };
                window
                    .samples
                    .push(Sample::gauge(with(&base, &[("quantile", q)]), value));
            }
        }
    }
}

pub(super) fn breakers<'a>(
    families: &mut Vec<Family>,
    breakers: impl IntoIterator<Item = (&'a str, &'a CircuitBreakerHandle)>,
) {
    let f = family(
        families,
        "keel_circuit_breaker_state",
        "0 closed, 1 open, 2 half-open, 3 forced open, 4 forced closed, 5 metrics only.",
        Kind::Gauge,
    );
    for (name, handle) in breakers {
        let state = match handle.state() {
            CircuitState::Closed => 0.0,
            CircuitState::Open => 1.0,
            CircuitState::HalfOpen => 2.0,
            CircuitState::ForcedOpen => 3.0,
            CircuitState::ForcedClosed => 4.0,
            CircuitState::MetricsOnly => 5.0,
        };
        f.samples
            .push(Sample::gauge(labels(&[("breaker", name)]), state));
    }
}

#[cfg(any(feature = "kafka", feature = "s3"))]
fn since_epoch_ms(t: Option<SystemTime>) -> Option<u64> {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Adds one single-sample family (used by the pre-0.2 names).
#[cfg(any(feature = "kafka", feature = "s3"))]
fn legacy(families: &mut Vec<Family>, name: &str, kind: Kind, help: &str, value: f64) {
    let (name, value) = match kind {
        // prometheus-client appends `_total` to counters itself.
        Kind::Counter => (
            name.strip_suffix("_total").unwrap_or(name),
            Value::Count(value as u64),
        ),
        _ => (name, Value::Gauge(value)),
    };
    family(families, name, help, kind).samples.push(Sample {
        labels: Vec::new(),
        value,
    });
}

/// Lag of one partition, for [`Exposition::consumer`](super::Exposition::consumer).
#[cfg(feature = "kafka")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLagSample {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Messages not handled yet; `None` while unknown.
    pub lag: Option<i64>,
}

#[cfg(feature = "kafka")]
pub(super) fn consumer(
    families: &mut Vec<Family>,
    group: &str,
    m: &crate::kafka::consumer::ConsumerMetricsSnapshot,
    in_flight: usize,
    lags: &[PartitionLagSample],
    keel_names: bool,
) {
    let semconv = labels(&[
        ("messaging.system", "kafka"),
        ("messaging.consumer.group.name", group),
    ]);
    family(
        families,
        "messaging.client.consumed.messages",
        "Messages delivered to the application (semantic conventions).",
        Kind::Counter,
    )
    .samples
    .push(Sample::counter(semconv, m.total_processed + m.total_failed));

    let base = labels(&[("group", group)]);
    let dropped = m.total_failed.saturating_sub(m.total_dead_lettered);
    let outcomes = family(
        families,
        "keel_kafka_consumer_messages",
        "Messages finished, by outcome: processed, dead_lettered, or dropped (failed with no DLQ).",
        Kind::Counter,
    );
    for (outcome, n) in [
        ("processed", m.total_processed),
        ("dead_lettered", m.total_dead_lettered),
        ("dropped", dropped),
    ] {
        outcomes
            .samples
            .push(Sample::counter(with(&base, &[("outcome", outcome)]), n));
    }
    for (name, help, n) in [
        (
            "keel_kafka_consumer_retries",
            "Handler retries.",
            m.total_retries,
        ),
        (
            "keel_kafka_consumer_decode_errors",
            "Messages that were not a valid event envelope.",
            m.total_decode_errors,
        ),
        (
            "keel_kafka_consumer_panics",
            "Handler panics caught.",
            m.total_panics,
        ),
        (
            "keel_kafka_consumer_dlq_failures",
            "Dead-letter publishes that failed (retried).",
            m.dlq_failures,
        ),
        (
            "keel_kafka_consumer_revoked_dropped",
            "Queued messages dropped because their partition was revoked.",
            m.revoked_dropped,
        ),
    ] {
        family(families, name, help, Kind::Counter)
            .samples
            .push(Sample::counter(base.clone(), n));
    }
    for (name, help, v) in [
        (
            "keel_kafka_consumer_in_flight",
            "Messages dispatched and not finished.",
            in_flight as f64,
        ),
        (
            "keel_kafka_consumer_stuck_partitions",
            "Partitions held because a message cannot be dead-lettered.",
            m.stuck_partitions as f64,
        ),
    ] {
        family(families, name, help, Kind::Gauge)
            .samples
            .push(Sample::gauge(base.clone(), v));
    }
    family_with_unit(
        families,
        "keel_kafka_consumer_longest_stuck",
        "How long the longest-held stuck partition has been held.",
        Kind::Gauge,
        true,
    )
    .samples
    .push(Sample::gauge(base.clone(), seconds(m.longest_stuck)));
    let processing = family_with_unit(
        families,
        "keel_kafka_consumer_processing_duration",
        "Time from the start of handling a message to its end (retries, backoff and dead-lettering included), by outcome: processed, dead_lettered, dropped.",
        Kind::Histogram,
        true,
    );
    let h = &m.processing;
    for (outcome, histogram) in [
        ("processed", &h.processed),
        ("dead_lettered", &h.dead_lettered),
        ("dropped", &h.dropped),
    ] {
        processing.samples.push(Sample {
            labels: with(&base, &[("outcome", outcome)]),
            value: histogram_value(histogram, &h.bounds),
        });
    }
    let lag = family(
        families,
        "keel_kafka_consumer_lag",
        "Messages not handled yet, per assigned partition: the high watermark of librdkafka's last statistics minus the commit position (-1: unknown yet).",
        Kind::Gauge,
    );
    for l in lags {
        let partition = l.partition.to_string();
        lag.samples.push(Sample::gauge(
            with(&base, &[("topic", &l.topic), ("partition", &partition)]),
            l.lag.map_or(-1.0, |n| n as f64),
        ));
    }

    if keel_names {
        let last = since_epoch_ms(m.last_processed_at).map_or(0.0, unix_seconds);
        for (name, kind, help, v) in [
            (
                "kafka_consumer_processed_total",
                Kind::Counter,
                "Messages handled successfully.",
                m.total_processed as f64,
            ),
            (
                "kafka_consumer_failed_total",
                Kind::Counter,
                "Messages that failed after all retries.",
                m.total_failed as f64,
            ),
            (
                "kafka_consumer_retries_total",
                Kind::Counter,
                "Handler retries.",
                m.total_retries as f64,
            ),
            (
                "kafka_consumer_dead_lettered_total",
                Kind::Counter,
                "Messages published to a dead-letter topic.",
                m.total_dead_lettered as f64,
            ),
            (
                "kafka_consumer_decode_errors_total",
                Kind::Counter,
                "Messages that were not a valid event envelope.",
                m.total_decode_errors as f64,
            ),
            (
                "kafka_consumer_panics_total",
                Kind::Counter,
                "Handler panics caught (failures of class panic).",
                m.total_panics as f64,
            ),
            (
                "kafka_consumer_dlq_failures_total",
                Kind::Counter,
                "Dead-letter publishes that failed (retried).",
                m.dlq_failures as f64,
            ),
            (
                "kafka_consumer_stuck_partitions",
                Kind::Gauge,
                "Partitions held because a message cannot be dead-lettered.",
                m.stuck_partitions as f64,
            ),
            (
                "kafka_consumer_longest_stuck_seconds",
                Kind::Gauge,
                "How long the longest-held of those partitions has been held.",
                seconds(m.longest_stuck),
            ),
            (
                "kafka_consumer_in_flight",
                Kind::Gauge,
                "Messages dispatched and not finished.",
                in_flight as f64,
            ),
            (
                "kafka_consumer_processing_seconds_avg",
                Kind::Gauge,
                "Mean processing time (retries and DLQ included).",
                seconds(m.average_processing_time),
            ),
            (
                "kafka_consumer_processing_seconds_p99",
                Kind::Gauge,
                "99th percentile of the processing time.",
                seconds(m.p99_processing_time),
            ),
            (
                "kafka_consumer_last_processed_timestamp_seconds",
                Kind::Gauge,
                "When the last message finished (0: never).",
                last,
            ),
        ] {
            legacy(families, name, kind, help, v);
        }
    }
}

#[cfg(feature = "kafka")]
pub(super) fn publish(
    families: &mut Vec<Family>,
    m: &crate::kafka::producer::PublishMetricsSnapshot,
    keel_names: bool,
) {
    let sent = family(
        families,
        "messaging.client.sent.messages",
        "Messages the producer attempted to send (semantic conventions); failures carry error_type.",
        Kind::Counter,
    );
    sent.samples.push(Sample::counter(
        labels(&[
            ("messaging.system", "kafka"),
            ("messaging.operation.name", "send"),
        ]),
        m.total_published,
    ));
    sent.samples.push(Sample::counter(
        labels(&[
            ("messaging.system", "kafka"),
            ("messaging.operation.name", "send"),
            ("error.type", "_OTHER"),
        ]),
        m.total_failed,
    ));
    family(
        families,
        "keel_kafka_publish_batches",
        "Batch publishes submitted.",
        Kind::Counter,
    )
    .samples
    .push(Sample::counter(Vec::new(), m.total_batches));
    if keel_names {
        for (name, kind, help, v) in [
            (
                "kafka_publish_published_total",
                Kind::Counter,
                "Events acknowledged by the broker.",
                m.total_published as f64,
            ),
            (
                "kafka_publish_failed_total",
                Kind::Counter,
                "Events that failed.",
                m.total_failed as f64,
            ),
            (
                "kafka_publish_batches_total",
                Kind::Counter,
                "Batch publishes submitted.",
                m.total_batches as f64,
            ),
            (
                "kafka_publish_average_batch_size",
                Kind::Gauge,
                "Mean events per publish call.",
                m.average_batch_size,
            ),
        ] {
            legacy(families, name, kind, help, v);
        }
    }
}

#[cfg(feature = "s3")]
pub(super) fn s3(
    families: &mut Vec<Family>,
    m: &crate::s3::metrics::S3MetricsSnapshot,
    keel_names: bool,
) {
    let duration = family_with_unit(
        families,
        "keel_s3_operation_duration",
        "Duration of S3 facade calls (a retried call counts once), by operation and outcome.",
        Kind::Histogram,
        true,
    );
    let bounds = keel_layers::metrics::DEFAULT_BUCKETS;
    for (op, l) in &m.latency {
        // Failures are counted per operation but not bucketed apart: the whole
        // histogram is labelled with the operation, the failures counted beside.
        let buckets = l
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| (bounds.get(i).map_or(f64::INFINITY, |b| seconds(*b)), *n))
            .collect();
        duration.samples.push(Sample {
            labels: labels(&[("operation", op)]),
            value: Value::Histogram {
                sum: seconds(l.total),
                count: l.count,
                buckets,
                exemplars: Vec::new(),
            },
        });
    }
    let failed = family(
        families,
        "keel_s3_operation_failures",
        "Failed S3 facade calls, by operation.",
        Kind::Counter,
    );
    for (op, l) in &m.latency {
        failed
            .samples
            .push(Sample::counter(labels(&[("operation", op)]), l.failures));
    }
    family(
        families,
        "keel_s3_failures",
        "Failed S3 facade calls.",
        Kind::Counter,
    )
    .samples
    .push(Sample::counter(Vec::new(), m.total_failed));
    let bytes = family(
        families,
        "keel_s3_transferred_bytes",
        "Bytes uploaded and downloaded, by direction.",
        Kind::Counter,
    );
    bytes.samples.push(Sample::counter(
        labels(&[("direction", "upload")]),
        m.bytes_uploaded,
    ));
    bytes.samples.push(Sample::counter(
        labels(&[("direction", "download")]),
        m.bytes_downloaded,
    ));
    if keel_names {
        let last = since_epoch_ms(m.last_operation_at).map_or(0.0, unix_seconds);
        for (name, kind, help, v) in [
            (
                "s3_uploads_total",
                Kind::Counter,
                "Successful uploads.",
                m.total_uploads as f64,
            ),
            (
                "s3_downloads_total",
                Kind::Counter,
                "Successful downloads.",
                m.total_downloads as f64,
            ),
            (
                "s3_deletes_total",
                Kind::Counter,
                "Deleted objects.",
                m.total_deletes as f64,
            ),
            (
                "s3_failed_total",
                Kind::Counter,
                "Failed operations.",
                m.total_failed as f64,
            ),
            (
                "s3_uploaded_bytes_total",
                Kind::Counter,
                "Bytes uploaded.",
                m.bytes_uploaded as f64,
            ),
            (
                "s3_downloaded_bytes_total",
                Kind::Counter,
                "Bytes downloaded.",
                m.bytes_downloaded as f64,
            ),
            (
                "s3_last_operation_timestamp_seconds",
                Kind::Gauge,
                "When the last operation ended (0: never).",
                last,
            ),
        ] {
            legacy(families, name, kind, help, v);
        }
    }
}

/// The families of one scrape, as a `prometheus-client` collector.
#[derive(Debug)]
pub(super) struct Collected(pub(super) Vec<Family>);

impl Collector for Collected {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let kind = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            let unit = f.seconds.then_some(Unit::Seconds);
            let mut metric = encoder.encode_descriptor(&f.name, &f.help, unit.as_ref(), kind)?;
            for s in &f.samples {
                let mut m = metric.encode_family(&s.labels)?;
                match &s.value {
                    Value::Count(n) => m.encode_counter::<NoLabelSet, _, u64>(n, None)?,
                    Value::Gauge(v) => m.encode_gauge(v)?,
                    Value::Histogram {
                        sum,
                        count,
                        buckets,
                        ..
                    } => m.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?,
                }
            }
        }
        Ok(())
    }
}

/// The exemplars of every histogram sample, as the text to append to its bucket
/// lines: the bucket line as the encoder writes it, and
/// ` # {trace_id="…",span_id="…"} <seconds> <unix seconds>`.
///
/// prometheus-client 0.26 lets a `Collector` pass exemplars to the encoder only
/// as its own `Exemplar` type, whose constructor is private to the crate (only
/// its `HistogramWithExemplars` metric, which keeps its own counts under a lock,
/// makes them). So the encoder writes the bucket lines, and keel finds each line
/// that carries an exemplar by encoding that one sample alone with the same
/// encoder, and appends the exemplar in the OpenMetrics syntax.
pub(super) fn exemplar_suffixes(families: &[Family]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for f in families {
        for s in &f.samples {
            let Value::Histogram { exemplars, .. } = &s.value else {
                continue;
            };
            if exemplars.is_empty() {
                continue;
            }
            let alone = Family {
                samples: vec![s.clone()],
                ..f.clone()
            };
            let text = encode(vec![alone]);
            let bucket_lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with('#') && l.contains("_bucket{"))
                .collect();
            for (i, e) in exemplars {
                if let Some(line) = bucket_lines.get(*i) {
                    out.insert((*line).to_string(), exemplar_text(e));
                }
            }
        }
    }
    out
}

fn exemplar_text(e: &Exemplar) -> String {
    let mut s = String::with_capacity(96);
    let _ = write!(
        s,
        " # {{trace_id=\"{}\",span_id=\"{}\"}} {} {}.{:03}",
        e.trace.trace_id_hex(),
        e.trace.span_id_hex(),
        dtoa(e.latency.as_secs_f64()),
        e.unix_ms / 1000,
        e.unix_ms % 1000
    );
    s
}

/// A float as the encoder writes sample values (`0.008`, `1.0`).
fn dtoa(v: f64) -> String {
    let s = format!("{v:?}");
    if s.contains(['.', 'e', 'E']) || !v.is_finite() {
        s
    } else {
        format!("{s}.0")
    }
}

/// OpenMetrics text of these families, through prometheus-client.
pub(super) fn encode(families: Vec<Family>) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Collected(families)));
    let mut out = String::new();
    // Writing into a String cannot fail; the encoder reports only fmt errors.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}
