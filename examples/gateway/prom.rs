//! Prometheus text for the counters keel's services keep themselves (consumer,
//! publish, S3), beside the layer metrics of `MetricsRegistry`.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel::kafka::consumer::ConsumerMetricsSnapshot;
use keel::kafka::producer::PublishMetricsSnapshot;
use keel::s3::metrics::S3MetricsSnapshot;

/// Appends Prometheus families to a string; one family per name.
#[derive(Default)]
pub struct PromText(String);

impl PromText {
    /// A family with one unlabelled sample.
    pub fn sample(&mut self, name: &str, kind: &str, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help, [(String::new(), value)])
    }

    /// A family with labelled samples (`labels` like `op="upload"`, or empty).
    pub fn family(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: impl IntoIterator<Item = (String, f64)>,
    ) -> &mut Self {
        let out = &mut self.0;
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
        self
    }

    /// The text.
    pub fn finish(self) -> String {
        self.0
    }
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn unix_seconds(t: Option<SystemTime>) -> f64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The consumer runtime's counters.
pub fn consumer(out: &mut PromText, m: &ConsumerMetricsSnapshot, in_flight: usize) {
    out.sample(
        "kafka_consumer_processed_total",
        "counter",
        "Messages handled successfully.",
        m.total_processed as f64,
    )
    .sample(
        "kafka_consumer_failed_total",
        "counter",
        "Messages that failed after all retries.",
        m.total_failed as f64,
    )
    .sample(
        "kafka_consumer_retries_total",
        "counter",
        "Handler retries.",
        m.total_retries as f64,
    )
    .sample(
        "kafka_consumer_dead_lettered_total",
        "counter",
        "Messages published to a dead-letter topic.",
        m.total_dead_lettered as f64,
    )
    .sample(
        "kafka_consumer_decode_errors_total",
        "counter",
        "Messages that were not a valid event envelope.",
        m.total_decode_errors as f64,
    )
    .sample(
        "kafka_consumer_panics_total",
        "counter",
        "Handler panics caught (failures of class panic).",
        m.total_panics as f64,
    )
    .sample(
        "kafka_consumer_dlq_failures_total",
        "counter",
        "Dead-letter publishes that failed (retried).",
        m.dlq_failures as f64,
    )
    .sample(
        "kafka_consumer_stuck_partitions",
        "gauge",
        "Partitions held because a message cannot be dead-lettered.",
        m.stuck_partitions as f64,
    )
    .sample(
        "kafka_consumer_longest_stuck_seconds",
        "gauge",
        "How long the longest-held of those partitions has been held.",
        seconds(m.longest_stuck),
    )
    .sample(
        "kafka_consumer_in_flight",
        "gauge",
        "Messages dispatched and not finished.",
        in_flight as f64,
    )
    .sample(
        "kafka_consumer_processing_seconds_avg",
        "gauge",
        "Mean processing time (retries and DLQ included).",
        seconds(m.average_processing_time),
    )
    .sample(
        "kafka_consumer_processing_seconds_p99",
        "gauge",
        "99th percentile of the processing time.",
        seconds(m.p99_processing_time),
    )
    .sample(
        "kafka_consumer_last_processed_timestamp_seconds",
        "gauge",
        "When the last message finished (0: never).",
        unix_seconds(m.last_processed_at),
    );
}

/// The publish services' counters.
pub fn publish(out: &mut PromText, m: &PublishMetricsSnapshot) {
    out.sample(
        "kafka_publish_published_total",
        "counter",
        "Events acknowledged by the broker.",
        m.total_published as f64,
    )
    .sample(
        "kafka_publish_failed_total",
        "counter",
        "Events that failed.",
        m.total_failed as f64,
    )
    .sample(
        "kafka_publish_batches_total",
        "counter",
        "Batch publishes submitted.",
        m.total_batches as f64,
    )
    .sample(
        "kafka_publish_average_batch_size",
        "gauge",
        "Mean events per publish call.",
        m.average_batch_size,
    );
}

/// The S3 facade's counters.
pub fn s3(out: &mut PromText, m: &S3MetricsSnapshot) {
    out.sample(
        "s3_uploads_total",
        "counter",
        "Successful uploads.",
        m.total_uploads as f64,
    )
    .sample(
        "s3_downloads_total",
        "counter",
        "Successful downloads.",
        m.total_downloads as f64,
    )
    .sample(
        "s3_deletes_total",
        "counter",
        "Deleted objects.",
        m.total_deletes as f64,
    )
    .sample(
        "s3_failed_total",
        "counter",
        "Failed operations.",
        m.total_failed as f64,
    )
    .sample(
        "s3_uploaded_bytes_total",
        "counter",
        "Bytes uploaded.",
        m.bytes_uploaded as f64,
    )
    .sample(
        "s3_downloaded_bytes_total",
        "counter",
        "Bytes downloaded.",
        m.bytes_downloaded as f64,
    )
    .sample(
        "s3_last_operation_timestamp_seconds",
        "gauge",
        "When the last operation ended (0: never).",
        unix_seconds(m.last_operation_at),
    );
}
