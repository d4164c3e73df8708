//! The seed's JSON log line as a `tracing-subscriber` event formatter.

use serde_json::Value;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats each event as one flat JSON object per line, as the seed's loggers did:
///
/// ```json
/// {"timestamp":"2026-02-11T12:00:00.000Z","level":"info","component":"KafkaProducer","message":"Event published successfully","topic":"user.events","eventId":"uuid","durationMs":45}
/// ```
///
/// - `timestamp`: RFC 3339, UTC, milliseconds;
/// - `level`: lowercase (`error`, `warn`, `info`, `debug`, `trace`);
/// - `component`: the event's `component` field, else the nearest span's;
/// - `message`: the event's message (empty string when it has none);
/// - then every field of the event's spans (root first) and of the event itself,
///   flattened into the object; a field set closer to the event wins.
///
/// Keys are converted from `snake_case` to `camelCase` (`duration_ms` becomes
/// `durationMs`, `event_id` becomes `eventId`), as in the seed; turn that off with
/// [`camel_case_keys(false)`](Self::camel_case_keys). Field values keep their JSON
/// type for integers, floats, booleans and strings; anything recorded with `?` or
/// `%` becomes a string.
///
/// Span fields are read from the span's stored formatted fields, so install the
/// formatter together with [`JsonFields`] (as [`json_subscriber`] and
/// [`json_layer`] do); spans whose stored fields are not JSON are skipped.
#[derive(Clone, Copy, Debug)]
pub struct JsonLogFormat {
    camel_case: bool,
    clock: fn() -> SystemTime,
}

impl Default for JsonLogFormat {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonLogFormat {
    /// The seed's format: camelCase keys, timestamps from the system clock.
    pub fn new() -> Self {
        JsonLogFormat {
            camel_case: true,
            clock: SystemTime::now,
        }
    }

    /// Whether `snake_case` keys become `camelCase` (default `true`).
    pub fn camel_case_keys(mut self, camel_case: bool) -> Self {
        self.camel_case = camel_case;
        self
    }

    /// Where timestamps come from (default [`SystemTime::now`]); for tests and replays.
    pub fn clock(mut self, clock: fn() -> SystemTime) -> Self {
        self.clock = clock;
        self
    }

    fn key(&self, name: &str) -> String {
        if self.camel_case {
            camel_case(name)
        } else {
            name.to_string()
        }
    }
}

/// Fields in insertion order; a later value for the same key replaces the earlier.
#[derive(Default)]
struct Fields(Vec<(String, Value)>);

impl Fields {
    fn insert(&mut self, key: String, value: Value) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        let index = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(index).1)
    }
}

struct Visitor<'a> {
    fields: &'a mut Fields,
    format: &'a JsonLogFormat,
}

impl Visitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        // Metadata that the `log` bridge attaches; not part of the line.
        if name.starts_with("log.") {
            return;
        }
        self.fields.insert(self.format.key(name), value);
    }
}

impl Visit for Visitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(
            field,
            serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number),
        );
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

impl<S, N> FormatEvent<S, N> for JsonLogFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let Some(stored) = extensions.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&stored.fields) {
                    for (key, value) in map {
                        if !key.starts_with("log.") {
                            fields.insert(self.key(&key), value);
                        }
                    }
                }
            }
        }
        event.record(&mut Visitor {
            fields: &mut fields,
            format: self,
        });

        let message = fields.take("message").unwrap_or_else(|| Value::from(""));
        let component = fields.take("component");
        let mut line = String::with_capacity(256);
        line.push_str("{\"timestamp\":\"");
        write_rfc3339_millis(&mut line, (self.clock)());
        line.push_str("\",\"level\":\"");
        line.push_str(level_name(event.metadata().level()));
        line.push('"');
        if let Some(component) = component {
            push_pair(&mut line, "component", &component);
        }
        push_pair(&mut line, "message", &message);
        for (key, value) in &fields.0 {
            push_pair(&mut line, key, value);
        }
        line.push('}');
        writeln!(writer, "{line}")
    }
}

fn push_pair(line: &mut String, key: &str, value: &Value) {
    line.push(',');
    // Serializing a string or a `Value` to a `String` cannot fail.
    line.push_str(&serde_json::to_string(key).unwrap_or_default());
    line.push(':');
    line.push_str(&serde_json::to_string(value).unwrap_or_default());
}

fn level_name(level: &tracing::Level) -> &'static str {
    match *level {
        tracing::Level::ERROR => "error",
        tracing::Level::WARN => "warn",
        tracing::Level::INFO => "info",
        tracing::Level::DEBUG => "debug",
        tracing::Level::TRACE => "trace",
    }
}

/// `duration_ms` -> `durationMs`; names without `_` are returned unchanged.
fn camel_case(name: &str) -> String {
    if !name.contains('_') {
        return name.to_string();
    }
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' && !out.is_empty() {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes `2026-02-11T12:00:00.000Z`. Times before 1970 are written as the epoch.
fn write_rfc3339_millis(out: &mut String, time: SystemTime) {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60,
        since.subsec_millis()
    );
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), after Howard
/// Hinnant's `civil_from_days`.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// A `tracing-subscriber` fmt layer writing [`JsonLogFormat`] lines to stdout, for
/// composing with other layers (`registry().with(json_layer()).with(filter)`).
/// Change the destination with `.with_writer(...)`.
pub fn json_layer<S>() -> tracing_subscriber::fmt::Layer<S, JsonFields, JsonLogFormat>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .fmt_fields(JsonFields::new())
        .event_format(JsonLogFormat::new())
}

/// A subscriber writing [`JsonLogFormat`] lines to stdout, filtered by `RUST_LOG`
/// (default `info`).
pub fn json_subscriber() -> impl Subscriber + Send + Sync + 'static {
    use tracing_subscriber::layer::SubscriberExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(json_layer())
        .with(filter)
}

/// Installs [`json_subscriber`] as the global default.
///
/// Fails if a global subscriber is set already.
pub fn init_json() -> Result<(), tracing_subscriber::util::TryInitError> {
    use tracing_subscriber::util::SubscriberInitExt as _;
    json_subscriber().try_init()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(ms: u64) -> String {
        let mut out = String::new();
        write_rfc3339_millis(&mut out, UNIX_EPOCH + Duration::from_millis(ms));
        out
    }

    #[test]
    fn timestamps() {
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(1_770_811_200_000), "2026-02-11T12:00:00.000Z");
        assert_eq!(at(951_782_400_000 + 45), "2000-02-29T00:00:00.045Z");
        assert_eq!(at(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn camel_case_keys() {
        assert_eq!(camel_case("duration_ms"), "durationMs");
        assert_eq!(camel_case("event_id"), "eventId");
        assert_eq!(camel_case("eventId"), "eventId");
        assert_eq!(camel_case("_private"), "_private");
        assert_eq!(camel_case("message"), "message");
    }
}
