use super::*;
use crate::classify::{Classification, classify_fn};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tower::{Layer, ServiceExt, service_fn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::JsonFields;

/// Collects everything written into one buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Capture {
    fn lines(&self) -> Vec<Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }
}

fn fixed_clock() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_770_811_200_000)
}

/// A JSON subscriber at `max_level` writing into a buffer.
fn subscriber(
    max_level: tracing::Level,
) -> (Capture, impl tracing::Subscriber + Send + Sync + 'static) {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(max_level)
        .fmt_fields(JsonFields::new())
        .event_format(JsonLogFormat::new().clock(fixed_clock))
        .with_writer(capture.clone())
        .finish();
    (capture, subscriber)
}

/// One logging test at a time in this binary: each installs its own subscriber,
/// and tracing-core recomputes callsite interest and the global max level when a
/// dispatcher registers. Done concurrently, a stale recomputation from another
/// thread can disable this test's spans (seen as missing span fields).
static SUBSCRIBER_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds off the other logging tests (see [`SUBSCRIBER_TESTS`]).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    SUBSCRIBER_TESTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sets `subscriber` as this thread's default until the guard drops, serialised
/// with the other logging tests, and recomputes every callsite's interest.
fn install(
    subscriber: impl tracing::Subscriber + Send + Sync + 'static,
) -> (
    std::sync::MutexGuard<'static, ()>,
    tracing::subscriber::DefaultGuard,
) {
    let serial = serial();
    let guard = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    (serial, guard)
}

struct Publish {
    topic: &'static str,
    event_id: &'static str,
    payload: &'static str,
    /// Milliseconds the call takes.
    takes: u64,
    /// What the call returns: a status, or an error message.
    result: Result<u16, &'static str>,
}

#[derive(Debug)]
struct PublishError(&'static str);
impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "publish failed: {}", self.0)
    }
}

fn publisher() -> impl Service<Publish, Response = u16, Error = PublishError> {
    service_fn(|req: Publish| async move {
        tokio::time::sleep(Duration::from_millis(req.takes)).await;
        tracing::debug!(inside = true, "inner log line");
        req.result.map_err(PublishError)
    })
}

fn layer()
-> LoggingLayer<impl Classify<u16, PublishError> + Clone, impl RequestFields<Publish> + Clone> {
    LoggingLayer::new("KafkaProducer", "publish")
        .clock(crate::metrics::LatencyClock::tokio())
        .success_message("Event published successfully")
        .failure_message("Failed to publish event")
        .classifier(classify_fn(|r: Result<&u16, &PublishError>| match r {
            Ok(404) => Classification::IGNORED,
            Ok(_) => Classification::SUCCESS,
            Err(_) => Classification::failure("broker"),
        }))
        .fields(|req: &Publish| {
            tracing::info_span!("publish", topic = req.topic, event_id = req.event_id)
        })
}

fn request(takes: u64, result: Result<u16, &'static str>) -> Publish {
    Publish {
        topic: "user.events",
        event_id: "uuid",
        payload: "card=4111111111111111",
        takes,
        result,
    }
}

#[tokio::test(start_paused = true)]
async fn success_line_matches_the_seed_format() {
    let (capture, subscriber) = subscriber(tracing::Level::INFO);
    let _guard = install(subscriber);
    let mut svc = layer().layer(publisher());
    let req = request(45, Ok(200));
    assert_eq!(req.payload.len(), 21);
    svc.ready().await.unwrap().call(req).await.unwrap();

    let lines = capture.lines();
    assert_eq!(
        lines,
        vec![json!({
            "timestamp": "2026-02-11T12:00:00.000Z",
            "level": "info",
            "component": "KafkaProducer",
            "message": "Event published successfully",
            "operation": "publish",
            "topic": "user.events",
            "eventId": "uuid",
            "outcome": "success",
            "durationMs": 45,
        })]
    );
    // Key order as in the seed.
    let raw = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        raw.starts_with(
            r#"{"timestamp":"2026-02-11T12:00:00.000Z","level":"info","component":"KafkaProducer","message":"Event published successfully","#
        ),
        "{raw}"
    );
    assert!(!raw.contains("4111"), "payload leaked: {raw}");
}

#[tokio::test(start_paused = true)]
async fn failure_logs_at_error_with_class_and_error() {
    let (capture, subscriber) = subscriber(tracing::Level::TRACE);
    let _guard = install(subscriber);
    let mut svc = layer().layer(publisher());
    svc.ready()
        .await
        .unwrap()
        .call(request(1_500, Err("broker down")))
        .await
        .unwrap_err();

    let lines = capture.lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    // The inner service's own log line carries the call's span fields.
    assert_eq!(lines[0]["level"], "debug");
    assert_eq!(lines[0]["message"], "inner log line");
    assert_eq!(lines[0]["component"], "KafkaProducer");
    assert_eq!(lines[0]["topic"], "user.events");
    assert_eq!(lines[0]["inside"], true);
    let mut last = lines[1].clone();
    last.as_object_mut().unwrap().remove("timestamp");
    assert_eq!(
        last,
        json!({
            "level": "error",
            "component": "KafkaProducer",
            "message": "Failed to publish event",
            "operation": "publish",
            "topic": "user.events",
            "eventId": "uuid",
            "outcome": "failure",
            "class": "broker",
            "durationMs": 1500,
            "error": "publish failed: broker down",
        })
    );
}

#[tokio::test(start_paused = true)]
async fn levels_follow_the_outcome_and_are_configurable() {
    let (capture, subscriber) = subscriber(tracing::Level::TRACE);
    let _guard = install(subscriber);
    let mut svc = layer()
        .on_success(tracing::Level::DEBUG)
        .on_failure(tracing::Level::WARN)
        .on_ignored(tracing::Level::TRACE)
        .layer(publisher());
    for result in [Ok(200), Ok(404), Err("x")] {
        let _ = svc.ready().await.unwrap().call(request(1, result)).await;
    }
    let outcomes: Vec<(String, String)> = capture
        .lines()
        .into_iter()
        .filter(|l| l.get("outcome").is_some())
        .map(|l| {
            (
                l["outcome"].as_str().unwrap().to_string(),
                l["level"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected = [
        ("success", "debug"),
        ("ignored", "trace"),
        ("failure", "warn"),
    ];
    assert_eq!(
        outcomes,
        expected.map(|(o, l)| (o.to_string(), l.to_string()))
    );
}

#[tokio::test(start_paused = true)]
async fn filtered_levels_log_nothing_and_pass_results_through() {
    let (capture, subscriber) = subscriber(tracing::Level::WARN);
    let _guard = install(subscriber);
    let mut svc = layer().layer(publisher());
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call(request(1, Ok(201)))
            .await
            .unwrap(),
        201
    );
    assert!(capture.lines().is_empty());
    // The failure is still logged: its level (ERROR) passes the filter.
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request(1, Err("boom")))
        .await
        .unwrap_err();
    assert_eq!(err.0, "boom");
    let lines = capture.lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["outcome"], "failure");
    assert_eq!(lines[0]["component"], "KafkaProducer");
}

// The serial guard is meant to span the awaits (a current-thread runtime).
#[allow(clippy::await_holding_lock)]
#[tokio::test]
async fn default_layer_without_fields_and_without_subscriber() {
    let serial = serial();
    // No subscriber at all: the call goes through untouched.
    let mut svc = Logging::new(
        service_fn(|x: u32| async move { Ok::<_, std::io::Error>(x + 1) }),
        "S3",
        "put",
    );
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 2);
    assert_eq!((*svc.get_ref()).oneshot(1).await.unwrap(), 2);

    let (capture, subscriber) = subscriber(tracing::Level::INFO);
    drop(serial);
    let _guard = install(subscriber);
    svc.ready().await.unwrap().call(1).await.unwrap();
    let lines = capture.lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["component"], "S3");
    assert_eq!(lines[0]["operation"], "put");
    assert_eq!(lines[0]["message"], "call succeeded");
    assert!(lines[0]["durationMs"].is_u64());
}

#[tokio::test]
async fn snake_case_kept_when_asked() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .fmt_fields(JsonFields::new())
        .event_format(
            JsonLogFormat::new()
                .camel_case_keys(false)
                .clock(fixed_clock),
        )
        .with_writer(capture.clone())
        .finish();
    let _guard = install(subscriber);
    tracing::info!(
        duration_ms = 3u64,
        ratio = 0.5,
        ok = true,
        name = "a\"b",
        "hi {}",
        1
    );
    assert_eq!(
        capture.lines(),
        vec![json!({
            "timestamp": "2026-02-11T12:00:00.000Z",
            "level": "info",
            "message": "hi 1",
            "duration_ms": 3,
            "ratio": 0.5,
            "ok": true,
            "name": "a\"b",
        })]
    );
}

#[tokio::test]
async fn poll_ready_errors_pass_through() {
    #[derive(Clone, Debug)]
    struct NotReady;
    impl Service<()> for NotReady {
        type Response = ();
        type Error = &'static str;
        type Future = std::future::Ready<Result<(), &'static str>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Err("not ready"))
        }
        fn call(&mut self, (): ()) -> Self::Future {
            std::future::ready(Ok(()))
        }
    }
    let mut svc = Logging::new(NotReady, "C", "op");
    assert_eq!(svc.ready().await.unwrap_err(), "not ready");
    // Clones share the settings and wrap a clone of the inner service.
    let clone = svc.clone();
    assert_eq!(format!("{:?}", clone.get_ref()), "NotReady");
}
