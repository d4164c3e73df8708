//! Exemplars: for each histogram bucket, the trace of the latest call that landed
//! in it, so a dashboard can jump from a slow bucket to a trace.
//!
//! keel-layers knows nothing of any tracing system: an [`ExemplarSource`] tells
//! the layer which trace the completing call belongs to (keel's `otel` feature
//! has one that reads the current OpenTelemetry span), and exporters read the
//! exemplars from [`Histogram::exemplars`](super::Histogram::exemplars).

use serde::{Serialize, Serializer};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The trace a call ran in: a W3C trace id and span id.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceRef {
    /// The trace id, 16 bytes.
    pub trace_id: [u8; 16],
    /// The span id, 8 bytes.
    pub span_id: [u8; 8],
}

impl TraceRef {
    /// The trace id as 32 lowercase hex digits, as in a `traceparent` header.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

impl fmt::Debug for TraceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceRef")
            .field("trace_id", &self.trace_id_hex())
            .field("span_id", &self.span_id_hex())
            .finish()
    }
}

impl Serialize for TraceRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("TraceRef", 2)?;
        st.serialize_field("trace_id", &self.trace_id_hex())?;
        st.serialize_field("span_id", &self.span_id_hex())?;
        st.end()
    }
}

/// Where exemplars come from: asked once per completed call, on the thread that
/// completes it, for the trace that call belongs to (`None`: no exemplar, for
/// example when the trace is not sampled).
///
/// Any `Fn() -> Option<TraceRef> + Send + Sync` closure is one.
pub trait ExemplarSource: Send + Sync + 'static {
    /// The trace of the call completing now, if any.
    fn current(&self) -> Option<TraceRef>;
}

impl<F> ExemplarSource for F
where
    F: Fn() -> Option<TraceRef> + Send + Sync + 'static,
{
    fn current(&self) -> Option<TraceRef> {
        self()
    }
}

/// A shared [`ExemplarSource`], as the layer's config holds it.
#[derive(Clone)]
pub(super) struct SharedSource(pub(super) Arc<dyn ExemplarSource>);

impl fmt::Debug for SharedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ExemplarSource")
    }
}

/// The exemplar of one histogram bucket: the latest call recorded in it that had
/// a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Exemplar {
    /// The call's trace.
    pub trace: TraceRef,
    /// The call's latency.
    #[serde(serialize_with = "secs")]
    pub latency: Duration,
    /// When the call completed, unix milliseconds.
    pub unix_ms: u64,
}

fn secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// An exemplar as a recorder keeps it: times on the layer's clock.
#[derive(Clone, Copy, Debug)]
pub(super) struct Stored {
    pub(super) trace: TraceRef,
    pub(super) latency: u64,
    pub(super) at: u64,
}
