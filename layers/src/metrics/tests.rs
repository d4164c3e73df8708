use super::*;
use crate::classify::{Classification, classify_fn};
use std::collections::BTreeMap;
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
    MetricsLayer::builder()
        .clock(LatencyClock::tokio())
        .percentiles(true)
        .build()
}

async fn run<S: Service<Req>>(svc: &mut S, req: Req) -> Result<S::Response, S::Error> {
    svc.ready().await?.call(req).await
}

#[tokio::test(start_paused = true)]
async fn counters_exact_after_a_scripted_sequence() {
    let layer = paused().classifier(http_like());
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
    assert_eq!(s.latency.unwrap().count, 10);
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
    assert_eq!(s.latency.unwrap().count, 1);
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
    let l = handle.snapshot().latency.unwrap();
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
    let l = handle.snapshot().latency.unwrap();
    assert_eq!(l.count, 11, "previous interval still counts");
    assert!(within(l.max, 100));

    // One more interval: the 100 ms calls have left the window.
    tokio::time::advance(Duration::from_secs(60)).await;
    let l = handle.snapshot().latency.unwrap();
    assert_eq!(l.count, 1);
    assert!(within(l.max, 1));

    // Two more: nothing left; totals are unaffected.
    tokio::time::advance(Duration::from_secs(120)).await;
    let s = handle.snapshot();
    assert_eq!(s.latency, Some(LatencySummary::default()));
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
        MetricsLayer::new().classifier(classify_fn(|r: Result<&(), &&'static str>| match r {
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
    assert!(json["latency"].is_null());
    assert_eq!(json["histograms"]["failure"]["count"], 1);
    assert!(json["histograms"]["bounds"][0].is_f64());
    assert!(json["last_success_unix_ms"].is_null());
}

#[tokio::test(start_paused = true)]
async fn histograms_by_outcome_add_up() {
    let layer = MetricsLayer::builder()
        .clock(LatencyClock::tokio())
        .buckets(&[
            Duration::from_millis(50),
            Duration::from_millis(10),
            Duration::ZERO,
            Duration::from_millis(10),
        ])
        .build()
        .classifier(http_like());
    let handle = layer.handle();
    let mut svc = layer.layer(scripted());
    for req in [
        (5, Ok(200)),
        (10, Ok(200)),
        (20, Ok(200)),
        (60, Ok(503)),
        (7, Ok(404)),
    ] {
        let _ = run(&mut svc, req).await;
    }
    let s = handle.snapshot();
    let h = &s.histograms;
    // Zero and duplicate bounds dropped, the rest sorted.
    assert_eq!(
        h.bounds,
        [Duration::from_millis(10), Duration::from_millis(50)]
    );
    // A call of exactly a bound's latency is in that bound's bucket (`le`).
    assert_eq!(h.success.buckets, [2, 1, 0]);
    assert_eq!(h.failure.buckets, [0, 0, 1]);
    assert_eq!(h.ignored.buckets, [1, 0, 0]);
    assert_eq!(h.success.sum(), Duration::from_millis(35));
    assert_eq!(
        (h.success.count, h.failure.count, h.ignored.count),
        (s.successes, s.failures, s.ignored)
    );
    assert_eq!(h.count(), s.calls);
    let cumulative: Vec<_> = h.success.cumulative(&h.bounds).collect();
    assert_eq!(
        cumulative,
        [
            (Some(Duration::from_millis(10)), 2),
            (Some(Duration::from_millis(50)), 3),
            (None, 3)
        ]
    );
    // Percentiles are off unless asked for.
    assert_eq!(s.latency, None);
    assert_eq!(s.latency_sum, Duration::from_millis(102));
}

#[test]
fn threads_record_apart_and_the_snapshot_adds_them_up() {
    const THREADS: u64 = 4;
    const CALLS: u64 = 5_000;
    let layer = MetricsLayer::new().classifier(classify_fn(|r: Result<&u64, &()>| match r {
        Ok(n) if n % 10 == 0 => Classification::failure("tenth"),
        _ => Classification::SUCCESS,
    }));
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|n: u64| async move { Ok::<_, ()>(n) }));
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            let mut svc = svc.clone();
            scope.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    for n in 0..CALLS {
                        svc.ready().await.unwrap().call(n).await.unwrap();
                    }
                });
            });
        }
    });
    let s = handle.snapshot();
    assert_eq!(s.calls, THREADS * CALLS);
    assert_eq!(s.failures, THREADS * CALLS / 10);
    assert_eq!(s.failures_by_class["tenth"], THREADS * CALLS / 10);
    assert_eq!(s.successes + s.failures, s.calls);
    assert_eq!(s.histograms.count(), s.calls);
    assert_eq!(s.in_flight, 0);
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test]
async fn a_call_ending_on_another_thread_is_counted_once() {
    let layer = MetricsLayer::new();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|()| async { Ok::<_, ()>(()) }));
    let fut = svc.ready().await.unwrap().call(());
    assert_eq!(handle.in_flight(), 1);
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(fut)
    })
    .join()
    .unwrap()
    .unwrap();
    let s = handle.snapshot();
    assert_eq!((s.calls, s.successes, s.in_flight), (1, 1, 0));
    assert_eq!(handle.in_flight(), 0);
}

#[test]
fn registry_takes_labels_and_refuses_duplicates() {
    let registry = MetricsRegistry::new();
    let a = MetricsLayer::new().handle();
    registry
        .register_with_labels(
            "messaging.process.duration",
            [("event_type", "order.created")],
            a.clone(),
        )
        .unwrap();
    registry
        .register_with_labels(
            "messaging.process.duration",
            [("event_type", "order.paid")],
            a.clone(),
        )
        .unwrap();
    assert_eq!(
        registry.register_with_labels(
            "messaging.process.duration",
            [("event_type", "order.paid")],
            a.clone()
        ),
        Err(RegistryError::Duplicate(
            "messaging.process.duration".into()
        ))
    );
    assert!(matches!(
        registry.register("s3-get", a.clone()),
        Err(RegistryError::InvalidName(_))
    ));
    assert!(matches!(
        registry.register_with_labels("ok", [("bad label", "x")], a.clone()),
        Err(RegistryError::InvalidName(_))
    ));
    let snapshots = registry.snapshots();
    assert_eq!(snapshots.len(), 2);
    assert_eq!(
        snapshots[1].labels,
        [("event_type".to_string(), "order.paid".to_string())]
    );
    assert!(
        is_valid_metric_name("a.b_c1") && !is_valid_metric_name("1a") && !is_valid_metric_name("")
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
    assert_eq!(s.latency.unwrap().count, 3);
    assert!(within(s.latency.unwrap().max, 30) && within(s.latency.unwrap().p50, 20));
    assert_eq!(s.latency_sum, Duration::from_millis(60));
    // A 20 s call (two intervals): it ends in a fresh window, alone.
    svc.ready().await.unwrap().call(20_000).await.unwrap();
    let s = handle.snapshot();
    assert_eq!(s.calls, 4);
    assert_eq!(s.latency.unwrap().count, 1);
    assert!(within(s.latency.unwrap().max, 20_000));
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

#[tokio::test(start_paused = true)]
async fn exemplars_keep_the_latest_traced_call_per_bucket() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU8, Ordering};
    // The source hands out trace n (0: no trace, as for an unsampled span).
    let current = Arc::new(AtomicU8::new(0));
    let source = {
        let current = current.clone();
        move || match current.load(Ordering::Relaxed) {
            0 => None,
            n => Some(TraceRef {
                trace_id: [n; 16],
                span_id: [n; 8],
            }),
        }
    };
    let layer = MetricsLayer::builder()
        .clock(LatencyClock::tokio())
        .buckets(&[Duration::from_millis(10), Duration::from_millis(50)])
        .exemplars(source)
        .build()
        .classifier(http_like());
    let handle = layer.handle();
    let mut svc = layer.layer(scripted());
    for (trace, req) in [
        (1, (5, Ok(200))),  // success, bucket 0
        (2, (8, Ok(200))),  // success, bucket 0: replaces trace 1
        (0, (9, Ok(200))),  // success, bucket 0, untraced: keeps trace 2
        (3, (30, Ok(200))), // success, bucket 1
        (4, (60, Ok(503))), // failure, +Inf bucket
    ] {
        current.store(trace, Ordering::Relaxed);
        let _ = run(&mut svc, req).await;
    }
    let h = handle.snapshot().histograms;
    let traces = |h: &Histogram| -> Vec<Option<(u8, u128)>> {
        h.exemplars
            .iter()
            .map(|e| e.map(|e| (e.trace.trace_id[0], e.latency.as_millis())))
            .collect()
    };
    assert_eq!(traces(&h.success), [Some((2, 8)), Some((3, 30)), None]);
    assert_eq!(traces(&h.failure), [None, None, Some((4, 60))]);
    assert_eq!(traces(&h.ignored), [None, None, None]);
    let e = h.success.exemplars[0].expect("exemplar");
    assert_eq!(e.trace.trace_id_hex(), "02".repeat(16));
    assert_eq!(e.trace.span_id_hex(), "02".repeat(8));
    assert!(e.unix_ms > 1_600_000_000_000, "a wall time: {}", e.unix_ms);
    // Serialized with the trace as hex.
    let json = serde_json::to_value(&h.success).unwrap();
    assert_eq!(json["exemplars"][1]["trace"]["trace_id"], "03".repeat(16));

    // Without a source the snapshot carries no exemplars at all.
    let plain = paused();
    let plain_handle = plain.handle();
    let mut svc = plain.layer(scripted());
    let _ = run(&mut svc, (5, Ok(200))).await;
    assert!(
        plain_handle
            .snapshot()
            .histograms
            .success
            .exemplars
            .is_empty()
    );
}
