//! A named breaker's name in its state-change log line, its hook and its handle.
//!
//! Its own test binary, and the only test in it: tracing's scoped subscribers
//! (`set_default`) share one callsite-interest cache per process, and another test
//! registering or dropping its subscriber on another thread at the same moment
//! can leave this one's events unseen (tokio-rs/tracing#2874). Alone in a process,
//! the capture sees every event.

use std::sync::{Arc, Mutex};

use keel_layers::circuit_breaker::{CircuitBreakerLayer, CircuitState};
use tower::{Layer, ServiceExt};

/// Collects the JSON log lines of the test.
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test(start_paused = true)]
async fn a_named_breaker_carries_its_name_in_logs_hook_and_handle() {
    let capture = LogCapture::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(capture.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook_seen = seen.clone();
    let layer = CircuitBreakerLayer::builder()
        .name("kafka_publish")
        .consecutive_failures(2)
        .on_state_change(move |change| {
            hook_seen.lock().unwrap().push(change.breaker.clone());
        })
        .build();
    let handle = layer.handle();
    assert_eq!(handle.name(), Some("kafka_publish"));
    let svc = layer.layer(tower::service_fn(|_: ()| async {
        Err::<(), std::io::Error>(std::io::Error::other("down"))
    }));
    for _ in 0..2 {
        assert!(svc.clone().oneshot(()).await.is_err());
    }
    assert_eq!(handle.state(), CircuitState::Open);
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let line: serde_json::Value = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .find(|v: &serde_json::Value| v["fields"]["message"] == "circuit breaker state change")
        .unwrap_or_else(|| panic!("no state change logged: {logs}"));
    assert_eq!(line["fields"]["breaker"], "kafka_publish", "{line}");
    assert_eq!(line["fields"]["to"], "open", "{line}");
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [Some(Arc::from("kafka_publish"))]
    );
    // An unnamed breaker has no name.
    assert_eq!(CircuitBreakerLayer::new().handle().name(), None);
}
