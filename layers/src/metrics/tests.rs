use super::*;
use crate::classify::{Classification, classify_fn};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use tower::{Layer, Service, ServiceExt, service_fn};

/// Request: (latency in ms, result); the service sleeps on tokio's clock, so under a
/// paused clock the recorded latency is exact.
type Req = (u64, Result<u16, &'static str>);

fn scripted() -> impl Service<Req, Response = u16, Error = &'static str> + Clone {
    service_fn(|(ms, result): Req| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        result
    })
}

/// 5xx responses fail with class "5xx", 404 is ignored, errors are their own class.
fn http_like() -> impl Classify<u16, &'static str> + Clone {
    classify_fn(|r: Result<&u16, &&'static str>| match r {
        Ok(s) if *s >= 500 => Classification::failure("5xx"),
        Ok(404) => Classification::IGNORED,
        Ok(_) => Classification::SUCCESS,
        Err(class) => Classification::failure(class),
    })
}

/// Metrics on tokio's clock, for tests on a paused runtime.
fn paused() -> MetricsLayer {
    MetricsLayer::builder().clock(LatencyClock::tokio()).build()
}

async fn run<S: Service<Req>>(svc: &mut S, req: Req) -> Result<S::Response, S::Error> {
    svc.ready().await?.call(req).await
}

#[tokio::test(start_paused = true)]
async fn counters_exact_after_a_scripted_sequence() {
    let layer = paused().classify(http_like());
    let handle = layer.handle();
    let mut svc = layer.layer(scripted());
    let script: [Req; 9] = [
        (1, Ok(200)),
        (1, Ok(201)),
        (1, Ok(503)),
        (1, Ok(404)),
        (1, Err("timeout")),
        (1, Err("timeout")),
        (1, Err("io")),
        (1, Ok(500)),
        (1, Ok(200)),
    ];
    for req in script {
        let _ = run(&mut svc, req).await;
    }
    // A clone of the service counts into the same metrics.
    let mut clone = svc.clone();
    let _ = run(&mut clone, (1, Ok(204))).await;

    let s = handle.snapshot();
    assert_eq!(s.calls, 10);
    assert_eq!(s.successes, 4);
    assert_eq!(s.failures, 5);
    assert_eq!(s.ignored, 1);
    assert_eq!(s.cancelled, 0);
    assert_eq!(s.in_flight, 0);
    let expected: BTreeMap<&str, u64> = [("5xx", 2), ("timeout", 2), ("io", 1)].into();
    assert_eq!(s.failures_by_class, expected);
    assert_eq!(s.completed(), 10);
    assert_eq!(s.latency.count, 10);
    assert_eq!(s.latency_sum, Duration::from_millis(10));
}

#[tokio::test(start_paused = true)]
async fn in_flight_counts_running_calls_and_drops() {
    let layer = paused();
    let handle = layer.handle();
    let mut svc = layer.layer(scripted());

    let slow = svc.ready().await.unwrap().call((1_000, Ok(200)));
    let other = svc.ready().await.unwrap().call((1_000, Ok(200)));
    assert_eq!(handle.in_flight(), 2);
    drop(slow);
    assert_eq!(handle.in_flight(), 1);
    other.await.unwrap();

    let s = handle.snapshot();
    assert_eq!(
        (s.calls, s.successes, s.cancelled, s.in_flight),
        (2, 1, 1, 0)
    );
    // The dropped call recorded no latency.
    assert_eq!(s.latency.count, 1);
}

fn within(actual: Duration, expected_ms: u64) -> bool {
    // Two significant figures: within 1 % (plus one bucket step).
    let expected = Duration::from_millis(expected_ms).as_secs_f64();
    (actual.as_secs_f64() - expected).abs() <= expected * 0.011
}

#[tokio::test(start_paused = true)]
async fn quantiles_match_recorded_latencies() {
    // The calls take 500 s in all: a window long enough to hold them.
    let layer = MetricsLayer::builder()
        .window(Duration::from_secs(3_600))
        .clock(LatencyClock::tokio())
        .build();
    let handle = layer.handle();
    let mut svc = layer.layer(scripted());
    // 1 ms .. 1000 ms, once each.
    for ms in 1..=1000 {
        run(&mut svc, (ms, Ok(200))).await.unwrap();
    }
    let l = handle.snapshot().latency;
    assert_eq!(l.count, 1000);
    for (actual, expected) in [
        (l.p50, 500),
        (l.p90, 900),
        (l.p99, 990),
        (l.p999, 999),
        (l.max, 1000),
    ] {
        assert!(within(actual, expected), "{actual:?} vs {expected} ms");
    }
    assert!(within(l.mean, 500), "mean {:?}", l.mean);
}

#[tokio::test(start_paused = true)]
async fn window_rotates_lazily() {
    let layer = MetricsLayer::builder()
        .window(Duration::from_secs(60))
        .clock(LatencyClock::tokio())
        .build();
    let handle = layer.handle();
    let mut svc = layer.layer(scripted());

    for _ in 0..10 {
        run(&mut svc, (100, Ok(200))).await.unwrap();
    }
    // 1 s has passed; move into the next interval and record one fast call.
    tokio::time::advance(Duration::from_secs(60)).await;
    run(&mut svc, (1, Ok(200))).await.unwrap();
    let l = handle.snapshot().latency;
    assert_eq!(l.count, 11, "previous interval still counts");
    assert!(within(l.max, 100));

    // One more interval: the 100 ms calls have left the window.
    tokio::time::advance(Duration::from_secs(60)).await;
    let l = handle.snapshot().latency;
    assert_eq!(l.count, 1);
    assert!(within(l.max, 1));

    // Two more: nothing left; totals are unaffected.
    tokio::time::advance(Duration::from_secs(120)).await;
    let s = handle.snapshot();
    assert_eq!(s.latency, LatencySummary::default());
    assert_eq!(s.calls, 11);
    assert_eq!(s.latency_sum, Duration::from_millis(1001));
}

#[tokio::test(start_paused = true)]
async fn last_success_and_failure_times() {
    let layer = paused();
    let handle = layer.handle();
    let mut svc = layer.layer(scripted());
    let s = handle.snapshot();
    assert_eq!(
        (s.last_success_unix_ms, s.last_failure_unix_ms),
        (None, None)
    );

    run(&mut svc, (10, Ok(200))).await.unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;
    run(&mut svc, (10, Err("io"))).await.unwrap_err();

    let s = handle.snapshot();
    let success = s.last_success_unix_ms.unwrap();
    let failure = s.last_failure_unix_ms.unwrap();
    assert_eq!(failure - success, 5_010);
    // 2020-01-01 < last success: a plausible unix time in milliseconds.
    assert!(success > 1_577_836_800_000);
}

#[tokio::test]
async fn failure_classes_are_bounded() {
    let layer =
        MetricsLayer::new().classify(classify_fn(|r: Result<&(), &&'static str>| match r {
            Ok(()) => Classification::SUCCESS,
            Err(class) => Classification::failure(class),
        }));
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|class: &'static str| async move { Err(class) }));
    let classes: Vec<&'static str> = (0..40)
        .map(|i| &*Box::leak(format!("class{i}").into_boxed_str()))
        .collect();
    for class in &classes {
        let _ = svc.ready().await.unwrap().call(class).await;
    }
    let s = handle.snapshot();
    assert_eq!(s.failures, 40);
    assert_eq!(s.failures_by_class.len(), MAX_FAILURE_CLASSES);
    assert_eq!(
        s.failures_by_class[OTHER_CLASS],
        40 - (MAX_FAILURE_CLASSES as u64 - 1)
    );
    assert_eq!(s.failures_by_class.values().sum::<u64>(), 40);
}

#[tokio::test]
async fn snapshot_serializes() {
    let layer = MetricsLayer::new();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|_: ()| async { Err::<(), _>("x") }));
    let _ = svc.ready().await.unwrap().call(()).await;
    let json = serde_json::to_value(handle.snapshot()).unwrap();
    assert_eq!(json["calls"], 1);
    assert_eq!(json["failures_by_class"]["error"], 1);
    assert!(json["latency"]["p99"].is_f64());
    assert!(json["last_success_unix_ms"].is_null());
}

/// A strict line-by-line check of the Prometheus text format 0.0.4: HELP and TYPE
/// before a family's samples, each family once and contiguous, sample names
/// belonging to the declared family, well-formed and escaped labels, float values.
fn check_prometheus(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let is_name = |n: &str| is_valid_metric_name(n);
    let mut declared: HashSet<String> = HashSet::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut current: Option<(String, String)> = None; // (family, type)
    let mut samples = Vec::new();
    assert!(text.ends_with('\n'), "text must end with a newline");
    for line in text.lines() {
        assert!(!line.is_empty(), "empty line");
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let keyword = parts.next().unwrap();
            let name = parts.next().expect("name after HELP/TYPE").to_string();
            let arg = parts.next().expect("text after name");
            assert!(is_name(&name), "bad family name {name}");
            match keyword {
                "HELP" => {
                    assert!(!arg.contains('\n'));
                    if let Some((family, _)) = &current
                        && *family != name
                    {
                        finished.insert(family.clone());
                    }
                    assert!(!finished.contains(&name), "family {name} split");
                }
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "summary", "histogram", "untyped"].contains(&arg),
                        "bad type {arg}"
                    );
                    assert!(declared.insert(name.clone()), "TYPE of {name} twice");
                    if let Some((family, _)) = &current {
                        finished.insert(family.clone());
                    }
                    current = Some((name, arg.to_string()));
                }
                other => panic!("unexpected comment keyword {other}"),
            }
            continue;
        }
        assert!(!line.starts_with('#'), "malformed comment {line}");
        let (family, kind) = current.clone().expect("sample before any TYPE");
        let (series, value) = line.rsplit_once(' ').expect("sample without value");
        let value: f64 = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value {v}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("unclosed labels");
                (name.to_string(), parse_labels(body))
            }
        };
        assert!(is_name(&name), "bad sample name {name}");
        let allowed = match kind.as_str() {
            "summary" => vec![
                family.clone(),
                format!("{family}_sum"),
                format!("{family}_count"),
            ],
            _ => vec![family.clone()],
        };
        assert!(
            allowed.contains(&name),
            "sample {name} outside family {family}"
        );
        if kind == "summary" && name == family {
            assert!(
                labels.contains_key("quantile"),
                "summary sample without quantile"
            );
        }
        samples.push((name, labels, value));
    }
    samples
}

fn parse_labels(body: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    while chars.peek().is_some() {
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert!(
            is_valid_metric_name(&name) && !name.contains(':'),
            "bad label {name}"
        );
        assert_eq!(chars.next(), Some('"'), "label value must be quoted");
        let mut value = String::new();
        loop {
            match chars.next().expect("unterminated label value") {
                '\\' => match chars.next() {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => panic!("bad escape {other:?}"),
                },
                '"' => break,
                '\n' => panic!("raw newline in label value"),
                c => value.push(c),
            }
        }
        assert!(labels.insert(name, value).is_none(), "duplicate label");
        match chars.next() {
            None => break,
            Some(',') => {}
            Some(c) => panic!("unexpected {c:?} after label"),
        }
    }
    labels
}

fn value_of(
    samples: &[(String, BTreeMap<String, String>, f64)],
    name: &str,
    label: Option<(&str, &str)>,
) -> f64 {
    samples
        .iter()
        .find(|(n, labels, _)| {
            n == name && label.is_none_or(|(k, v)| labels.get(k).map(String::as_str) == Some(v))
        })
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"))
        .2
}

#[tokio::test(start_paused = true)]
async fn prometheus_text_is_valid_and_complete() {
    const WEIRD: &str = "we\"ird\\class\nx";
    let publish = paused().classify(http_like());
    let mut svc = publish.layer(scripted());
    for req in [
        (10, Ok(200)),
        (20, Err("timeout")),
        (30, Err(WEIRD)),
        (40, Ok(404)),
    ] {
        let _ = run(&mut svc, req).await;
    }
    let idle = MetricsLayer::new();

    let registry = MetricsRegistry::new();
    registry
        .register("kafka_publish", publish.handle())
        .unwrap();
    registry.register("s3_put", idle.handle()).unwrap();
    assert_eq!(
        registry.register("kafka_publish", idle.handle()),
        Err(RegistryError::Duplicate("kafka_publish".into()))
    );
    assert!(matches!(
        registry.register("s3-get", idle.handle()),
        Err(RegistryError::InvalidName(_))
    ));

    let text = registry.render();
    let samples = check_prometheus(&text);
    let v = |name: &str| value_of(&samples, name, None);
    assert_eq!(v("kafka_publish_calls_total"), 4.0);
    assert_eq!(v("kafka_publish_successes_total"), 1.0);
    assert_eq!(v("kafka_publish_ignored_total"), 1.0);
    assert_eq!(v("kafka_publish_in_flight"), 0.0);
    assert_eq!(
        value_of(
            &samples,
            "kafka_publish_failures_total",
            Some(("class", "timeout"))
        ),
        1.0
    );
    assert_eq!(
        value_of(
            &samples,
            "kafka_publish_failures_total",
            Some(("class", WEIRD))
        ),
        1.0
    );
    assert_eq!(v("kafka_publish_duration_seconds_count"), 4.0);
    assert!((v("kafka_publish_duration_seconds_sum") - 0.1).abs() < 1e-9);
    let p99 = value_of(
        &samples,
        "kafka_publish_duration_seconds",
        Some(("quantile", "0.99")),
    );
    assert!((p99 - 0.04).abs() <= 0.04 * 0.011, "p99 {p99}");
    assert!(v("kafka_publish_last_success_timestamp_seconds") > 1.5e9);
    assert!(v("kafka_publish_last_failure_timestamp_seconds") > 1.5e9);
    // The idle service: zero counters, NaN quantiles, no last-success sample.
    assert_eq!(v("s3_put_calls_total"), 0.0);
    assert!(
        value_of(
            &samples,
            "s3_put_duration_seconds",
            Some(("quantile", "0.5"))
        )
        .is_nan()
    );
    assert!(!text.contains("s3_put_last_success_timestamp_seconds"));
}

#[test]
fn render_sanitizes_names_and_skips_duplicates() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let snapshot = rt.block_on(async { MetricsLayer::new().handle().snapshot() });
    let text = render_prometheus(&[
        ("9 s3-get", &snapshot),
        ("9_s3_get", &snapshot),
        ("ok", &snapshot),
    ]);
    check_prometheus(&text);
    assert!(text.contains("_9_s3_get_calls_total 0\n"));
    assert_eq!(text.matches("# TYPE _9_s3_get_calls_total").count(), 1);
    assert!(text.contains("ok_calls_total 0\n"));
    assert!(
        is_valid_metric_name("a:b_c1") && !is_valid_metric_name("1a") && !is_valid_metric_name("")
    );
}

#[tokio::test]
async fn tsc_clock_measures_latency_and_rotates() {
    // The default clock is quanta's; its mock is advanced by the service itself.
    let (clock, mock) = LatencyClock::mock();
    let layer = MetricsLayer::builder()
        .window(Duration::from_secs(10))
        .clock(clock)
        .build();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(move |ms: u64| {
        mock.increment(Duration::from_millis(ms));
        std::future::ready(Ok::<_, std::convert::Infallible>(()))
    }));
    for ms in [10, 20, 30] {
        svc.ready().await.unwrap().call(ms).await.unwrap();
    }
    let s = handle.snapshot();
    assert_eq!(s.latency.count, 3);
    assert!(within(s.latency.max, 30) && within(s.latency.p50, 20));
    assert_eq!(s.latency_sum, Duration::from_millis(60));
    // A 20 s call (two intervals): it ends in a fresh window, alone.
    svc.ready().await.unwrap().call(20_000).await.unwrap();
    let s = handle.snapshot();
    assert_eq!(s.calls, 4);
    assert_eq!(s.latency.count, 1);
    assert!(within(s.latency.max, 20_000));
}

#[tokio::test]
async fn poll_ready_errors_pass_through_uncounted() {
    let layer = MetricsLayer::new();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|()| async { Ok::<_, &str>(()) }));
    svc.ready().await.unwrap().call(()).await.unwrap();
    let mut broken = MetricsLayer::from_handle(handle.clone()).layer(NotReady);
    assert_eq!(broken.ready().await.unwrap_err(), "not ready");
    let s = handle.snapshot();
    assert_eq!((s.calls, s.successes, s.failures), (1, 1, 0));
}

/// A service whose readiness fails.
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
