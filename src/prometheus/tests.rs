use super::*;
use keel_layers::classify::{Classification, classify_fn};
use keel_layers::metrics::MetricsLayer;
use std::time::Duration;
use tower::{Layer, Service, ServiceExt, service_fn};

fn lines_with<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(prefix)).collect()
}

#[tokio::test]
async fn layer_families_have_labels_buckets_and_failures() {
    let registry = MetricsRegistry::new();
    let layer = MetricsLayer::builder()
        .buckets(&[Duration::from_secs(1)])
        .build()
        .classifier(classify_fn(|r: Result<&(), &&'static str>| match r {
            Ok(()) => Classification::SUCCESS,
            Err(class) => Classification::failure(class),
        }));
    registry
        .register_with_labels(
            "messaging.process.duration",
            [("event_type", "order.\"created\"")],
            layer.handle(),
        )
        .unwrap();
    let mut svc = layer.layer(service_fn(|fail: bool| async move {
        if fail { Err("timeout") } else { Ok(()) }
    }));
    for fail in [false, false, true] {
        let _ = svc.ready().await.unwrap().call(fail).await;
    }
    let mut scrape = Exposition::new();
    scrape.layers(&registry);
    let text = scrape.render();
    assert!(
        text.contains("# TYPE messaging_process_duration_seconds histogram\n"),
        "{text}"
    );
    assert!(text.contains("# UNIT messaging_process_duration_seconds seconds\n"));
    // The label value is escaped by the crate.
    let ok = "messaging_process_duration_seconds_bucket{le=\"1.0\",event_type=\"order.\\\"created\\\"\",outcome=\"success\"} 2";
    assert!(text.contains(ok), "{text}");
    assert!(text.contains(
        "messaging_process_duration_seconds_bucket{le=\"+Inf\",event_type=\"order.\\\"created\\\"\",outcome=\"failure\"} 1"
    ));
    assert!(text.contains(
        "messaging_process_failures_total{event_type=\"order.\\\"created\\\"\",error_type=\"timeout\"} 1"
    ));
    assert!(text.contains("messaging_process_in_flight{event_type=\"order.\\\"created\\\"\"} 0"));
    // No call was ignored: no `ignored` series (success and failure always).
    assert!(!text.contains("outcome=\"ignored\""));
    // Percentiles are off by default: no window family.
    assert!(!text.contains("duration_window"));
    // Each family appears once, and the text ends as OpenMetrics requires.
    assert_eq!(
        lines_with(&text, "# TYPE messaging_process_duration_seconds ").len(),
        1
    );
    assert!(text.ends_with("# EOF\n"));
}

#[tokio::test]
async fn percentile_window_is_optional_and_two_series_share_a_family() {
    let registry = MetricsRegistry::new();
    let a = MetricsLayer::builder().percentiles(true).build();
    let b = MetricsLayer::new();
    registry
        .register_with_labels("http.server", [("route", "/a")], a.handle())
        .unwrap();
    registry
        .register_with_labels("http.server", [("route", "/b")], b.handle())
        .unwrap();
    let mut svc = a.layer(service_fn(|()| async { Ok::<_, ()>(()) }));
    svc.ready().await.unwrap().call(()).await.unwrap();
    let mut scrape = Exposition::new();
    scrape.layers(&registry);
    let text = scrape.render();
    assert_eq!(
        lines_with(&text, "# TYPE http_server_duration_seconds ").len(),
        1
    );
    assert!(
        text.contains("http_server_duration_seconds_count{route=\"/a\",outcome=\"success\"} 1")
    );
    assert!(
        text.contains("http_server_duration_seconds_count{route=\"/b\",outcome=\"success\"} 0")
    );
    assert!(text.contains("http_server_duration_window_seconds{route=\"/a\",quantile=\"0.99\"}"));
    assert!(!text.contains("http_server_duration_window_seconds{route=\"/b\""));
}

#[test]
fn breakers_and_custom_families() {
    let breaker = keel_layers::circuit_breaker::CircuitBreakerLayer::builder()
        .name("kafka_publish")
        .build();
    let handle = breaker.handle();
    handle.force_open();
    let mut scrape = Exposition::new();
    scrape.breakers([&handle]);
    scrape.counter(
        "app.jobs",
        "Jobs.",
        [(vec![("kind".to_string(), "x".to_string())], 3)],
    );
    let text = scrape.render();
    assert!(
        text.contains("keel_circuit_breaker_state{breaker=\"kafka_publish\"} 3"),
        "{text}"
    );
    assert!(text.contains("app_jobs_total{kind=\"x\"} 3"));
}

#[tokio::test]
async fn exemplars_are_appended_to_their_bucket_lines() {
    use keel_layers::metrics::TraceRef;
    let registry = MetricsRegistry::new();
    let layer = MetricsLayer::builder()
        .buckets(&[Duration::from_secs(1)])
        .exemplars(|| {
            Some(TraceRef {
                trace_id: [0xab; 16],
                span_id: [0x01; 8],
            })
        })
        .build();
    registry
        .register_with_labels(
            "messaging.process.duration",
            [("event_type", "order.created")],
            layer.handle(),
        )
        .unwrap();
    // A twin without exemplars, whose bucket lines must stay bare.
    let plain = MetricsLayer::builder()
        .buckets(&[Duration::from_secs(1)])
        .build();
    registry
        .register_with_labels(
            "messaging.process.duration",
            [("event_type", "user.created")],
            plain.handle(),
        )
        .unwrap();
    let mut svc = layer.layer(service_fn(|()| async { Ok::<_, &'static str>(()) }));
    svc.ready().await.unwrap().call(()).await.unwrap();
    let mut other = plain.layer(service_fn(|()| async { Ok::<_, &'static str>(()) }));
    other.ready().await.unwrap().call(()).await.unwrap();

    let mut scrape = Exposition::new();
    scrape.layers(&registry);
    let text = scrape.render();
    let with: Vec<&str> = text.lines().filter(|l| l.contains(" # {")).collect();
    assert_eq!(with.len(), 1, "one bucket carries the exemplar:\n{text}");
    let line = with[0];
    let prefix = "messaging_process_duration_seconds_bucket{le=\"1.0\",event_type=\"order.created\",outcome=\"success\"} 1 # {trace_id=\"";
    assert!(line.starts_with(prefix), "{line}");
    assert!(
        line.contains(&format!(
            "{{trace_id=\"{}\",span_id=\"{}\"}} ",
            "ab".repeat(16),
            "01".repeat(8)
        )),
        "{line}"
    );
    // `<latency> <unix seconds with milliseconds>` after the labels.
    let tail: Vec<&str> = line.rsplit("} ").next().unwrap().split(' ').collect();
    assert_eq!(tail.len(), 2, "{line}");
    let latency: f64 = tail[0].parse().unwrap();
    assert!((0.0..1.0).contains(&latency), "{line}");
    let at: f64 = tail[1].parse().unwrap();
    assert!(at > 1.6e9, "{line}");
    // The rest of the text is what the encoder wrote.
    assert!(text.contains(
        "messaging_process_duration_seconds_bucket{le=\"1.0\",event_type=\"user.created\",outcome=\"success\"} 1\n"
    ));
    assert!(text.ends_with("# EOF\n"));
}
