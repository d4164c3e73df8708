//! The Python `prometheus_client` package's OpenMetrics parser
//! (`prometheus_client.openmetrics.parser.text_string_to_metric_families`), run on
//! a scrape: the families, samples and exemplars it sees, as JSON. `scripts/up`
//! installs it into `$KEEL_CACHE/venv` with moto (scripts/moto-requirements.txt).
//! Shared by `tests/metrics_prometheus.rs` and `tests/gateway_otel.rs`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

/// Parses OpenMetrics text from stdin with prometheus_client and prints every
/// family as JSON: name, type, unit and samples (name, labels, value).
const PARSER: &str = r#"
import json, math, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({
        "name": f.name, "type": f.type, "unit": f.unit,
        "samples": [
            {"name": s.name, "labels": s.labels,
             "value": None if math.isnan(s.value) else s.value,
             "exemplar": None if s.exemplar is None else {
                 "labels": s.exemplar.labels, "value": s.exemplar.value,
                 "timestamp": None if s.exemplar.timestamp is None
                     else float(s.exemplar.timestamp)}}
            for s in f.samples
        ],
    })
print(json.dumps(out))
"#;

/// The Python that has prometheus_client: `KEEL_PYTHON`, or the venv `scripts/up`
/// installs (`$KEEL_CACHE/venv`, default `~/.cache/keel/venv`).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KEEL_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("KEEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/keel")
        });
    cache.join("venv/bin/python")
}

/// Fails at once, with the way to install it, when the Python or its
/// prometheus_client is missing.
pub fn require_prometheus_client() {
    let python = python();
    let out = Command::new(&python)
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): scripts/up installs it with prometheus-client; {}",
                python.display(),
                crate::support::START_HINT
            )
        });
    assert!(
        out.status.success(),
        "prometheus_client is not installed in {}: rerun scripts/up (scripts/moto-requirements.txt lists it), or point KEEL_PYTHON at a Python that has it\n{}",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Families by name, as the Python parser saw them.
pub fn parse_with_prometheus_client(text: &str) -> BTreeMap<String, Value> {
    let python = python();
    let mut child = Command::new(&python)
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): scripts/up installs it with prometheus-client; {}",
                python.display(),
                crate::support::START_HINT
            )
        });
    // A parser that exits early (a broken install) closes its stdin: its stderr
    // below says why.
    let _ = child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes());
    let out = child.wait_with_output().expect("parser exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'prometheus_client'"),
        "prometheus_client is not installed in {}: rerun scripts/up (scripts/moto-requirements.txt lists it)",
        python.display()
    );
    assert!(
        out.status.success(),
        "prometheus_client refused /metrics: {stderr}\n--- text ---\n{text}"
    );
    let families: Vec<Value> = serde_json::from_slice(&out.stdout).expect("parser prints JSON");
    families
        .into_iter()
        .map(|f| (f["name"].as_str().unwrap().to_string(), f))
        .collect()
}
