//! The gateway's `/metrics`, read by a real Prometheus parser: the Python
//! `prometheus_client` package's OpenMetrics parser
//! (`prometheus_client.openmetrics.parser.text_string_to_metric_families`), which
//! `scripts/up` installs into `$KEEL_CACHE/venv` with moto
//! (scripts/moto-requirements.txt).
//!
//! Against the real broker and s3s-fs: events are published through the gateway
//! and handled by its consumer, then the test checks what the parser returns —
//! labelled series of the semantic-convention families, `_bucket{le=…}` histograms
//! whose buckets are cumulative and end in `_count`, and counts that equal the
//! number of calls made.

mod gateway_support;
mod openmetrics_support;
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use gateway_support::*;
use hyper::StatusCode;
use openmetrics_support::*;
use serde_json::{Value, json};

/// The samples of `family` named `sample` whose labels include `labels`.
fn samples<'a>(
    family: &'a Value,
    sample: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = &'a Value> + 'a {
    family["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .filter(move |s| s["name"] == sample && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
}

/// The one sample of `family` named `sample` with these labels (plus any others).
fn one(family: &Value, sample: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Value> = samples(family, sample, labels).collect();
    assert_eq!(
        found.len(),
        1,
        "{sample} {labels:?}: {} samples in {}",
        found.len(),
        family
    );
    found[0]["value"].as_f64().expect("a number")
}

/// Every histogram of the family: buckets cumulative, `+Inf` equal to `_count`,
/// `_sum` non-negative. Returns how many label sets were checked.
fn check_histograms(family: &Value) -> usize {
    assert_eq!(family["type"], "histogram", "{}", family["name"]);
    assert_eq!(family["unit"], "seconds", "{}", family["name"]);
    let name = family["name"].as_str().unwrap();
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let key = |labels: &Value| {
        let mut l = labels.as_object().unwrap().clone();
        l.remove("le");
        serde_json::to_string(&l).unwrap()
    };
    for s in samples(family, &format!("{name}_bucket"), &[]) {
        let le = s["labels"]["le"].as_str().expect("a bucket has le");
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().expect("le is a number")
        };
        series
            .entry(key(&s["labels"]))
            .or_default()
            .push((bound, s["value"].as_f64().unwrap()));
    }
    assert!(!series.is_empty(), "{name} has no _bucket samples");
    for (labels, buckets) in &series {
        assert!(buckets.len() > 1, "{name}{labels}: one bucket only");
        assert!(
            buckets.windows(2).all(|w| w[0].0 < w[1].0),
            "{name}{labels}: le not ascending"
        );
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name}{labels}: buckets not cumulative: {buckets:?}"
        );
        let (last_bound, last) = *buckets.last().unwrap();
        assert_eq!(last_bound, f64::INFINITY, "{name}{labels}: no +Inf bucket");
        let count = samples(family, &format!("{name}_count"), &[])
            .find(|s| key(&s["labels"]) == *labels)
            .unwrap_or_else(|| panic!("{name}{labels}: no _count"))["value"]
            .as_f64()
            .unwrap();
        assert_eq!(last, count, "{name}{labels}: +Inf bucket != _count");
        let sum = samples(family, &format!("{name}_sum"), &[])
            .find(|s| key(&s["labels"]) == *labels)
            .unwrap_or_else(|| panic!("{name}{labels}: no _sum"))["value"]
            .as_f64()
            .unwrap();
        assert!(
            sum >= 0.0 && (count > 0.0 || sum == 0.0),
            "{name}{labels}: sum {sum}"
        );
    }
    series.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_with_prometheus_client_and_add_up() {
    const ORDERS: usize = 5;
    require_prometheus_client();
    let brokers = support::kafka_brokers();
    let s3 = support::s3s_fs();
    let topic = unique("metrics-prom");
    let gw = Gateway::start(&[
        ("KAFKA_BROKERS", brokers),
        ("KAFKA_GROUP_ID", unique("metrics-prom-group")),
        ("KEEL_GATEWAY_TOPICS", topic.clone()),
        ("AWS_S3_ENDPOINT", s3.endpoint.clone()),
        ("AWS_S3_BUCKET", unique("metrics-prom")),
        ("AWS_ACCESS_KEY_ID", s3.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.clone()),
        ("KEEL_GATEWAY_CREATE_BUCKET", "true".to_string()),
        // The poison event: tried twice (one retry, 50 ms apart), then dead-lettered.
        ("KEEL_GATEWAY_MAX_RETRIES", "1".to_string()),
        ("KEEL_GATEWAY_RETRY_INITIAL_MS", "50".to_string()),
    ]);
    wait_status(
        &gw.url("/health/ready"),
        StatusCode::OK,
        Duration::from_secs(60),
    )
    .await;

    let mut bodies: Vec<Value> = (0..ORDERS)
        .map(|i| json!({ "eventType": "order.created", "key": format!("o-{i}"), "payload": { "i": i } }))
        .collect();
    bodies.push(json!({ "eventType": "demo.poison", "payload": {} }));
    for body in &bodies {
        let answer = post_json(&gw.url(&format!("/events/{topic}")), body.clone()).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text());
    }
    wait_metric(
        &gw,
        "messaging_process_duration_seconds_count{event_type=\"order.created\",outcome=\"success\"}",
        ORDERS as f64,
        Duration::from_secs(60),
    )
    .await;
    wait_metric(
        &gw,
        "keel_kafka_consumer_messages_total{outcome=\"dead_lettered\"}",
        1.0,
        Duration::from_secs(60),
    )
    .await;

    // Lag from librdkafka's statistics: a series per partition of the topic,
    // down to 0 once everything is handled and committed.
    let lag_query = format!("keel_kafka_consumer_lag{{topic=\"{topic}\"}}");
    let start = std::time::Instant::now();
    loop {
        let m = metrics(&gw).await;
        if has(&m, &lag_query) && value(&m, &lag_query) == 0.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "lag of {topic} never 0: {:?}",
            m.iter()
                .filter(|(k, _)| k.starts_with("keel_kafka_consumer_lag"))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let answer = get(&gw.url("/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let text = answer.text();
    let families = parse_with_prometheus_client(&text);
    let family = |name: &str| {
        families
            .get(name)
            .unwrap_or_else(|| panic!("no family {name}; families: {:?}", families.keys()))
    };

    // Handler durations: one series per event type and outcome; the counts are
    // the handler calls made (5 successes; the poison event's two attempts).
    let process = family("messaging_process_duration_seconds");
    assert!(
        check_histograms(process) >= 8,
        "4 event types x 2+ outcomes"
    );
    let order_ok = [
        ("messaging_system", "kafka"),
        ("event_type", "order.created"),
        ("outcome", "success"),
    ];
    assert_eq!(
        one(
            process,
            "messaging_process_duration_seconds_count",
            &order_ok
        ),
        ORDERS as f64
    );
    let bucket_1s: Vec<_> = samples(
        process,
        "messaging_process_duration_seconds_bucket",
        &order_ok,
    )
    .filter(|s| s["labels"]["le"] == "1.0")
    .collect();
    assert_eq!(bucket_1s.len(), 1, "a le=\"1.0\" bucket");
    let poison = [("event_type", "demo.poison")];
    assert_eq!(
        one(
            process,
            "messaging_process_duration_seconds_count",
            &[poison[0], ("outcome", "failure")]
        ),
        2.0,
        "first attempt + one retry"
    );
    let failures = family("messaging_process_failures");
    assert_eq!(failures["type"], "counter");
    let by_class: f64 = samples(failures, "messaging_process_failures_total", &poison)
        .map(|s| s["value"].as_f64().unwrap())
        .sum();
    assert_eq!(
        by_class, 2.0,
        "failures by error_type add up to the failed calls"
    );

    // The sums add up across families: every handler call is a message finished
    // or a retry of one.
    let handler_calls: f64 = samples(process, "messaging_process_duration_seconds_count", &[])
        .map(|s| s["value"].as_f64().unwrap())
        .sum();
    let finished: f64 = samples(
        family("keel_kafka_consumer_messages"),
        "keel_kafka_consumer_messages_total",
        &[],
    )
    .map(|s| s["value"].as_f64().unwrap())
    .sum();
    let retries = one(
        family("keel_kafka_consumer_retries"),
        "keel_kafka_consumer_retries_total",
        &[],
    );
    assert_eq!(finished, (ORDERS + 1) as f64);
    assert_eq!(
        handler_calls,
        finished + retries,
        "calls = messages + retries"
    );
    assert_eq!(
        one(
            family("messaging_client_consumed_messages"),
            "messaging_client_consumed_messages_total",
            &[("messaging_system", "kafka")]
        ),
        (ORDERS + 1) as f64
    );

    // The runtime's own processing times (all attempts of a message): one
    // histogram per outcome, counting messages, not handler calls.
    let processing = family("keel_kafka_consumer_processing_duration_seconds");
    assert_eq!(processing["type"], "histogram");
    assert_eq!(processing["unit"], "seconds");
    assert_eq!(
        check_histograms(processing),
        3,
        "processed, dead_lettered, dropped"
    );
    let count = |outcome: &str| {
        one(
            processing,
            "keel_kafka_consumer_processing_duration_seconds_count",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(count("processed"), ORDERS as f64);
    assert_eq!(count("dead_lettered"), 1.0);
    assert_eq!(count("dropped"), 0.0);
    // The poison event waited out a 50 ms backoff before it was dead-lettered.
    let poison_sum = one(
        processing,
        "keel_kafka_consumer_processing_duration_seconds_sum",
        &[("outcome", "dead_lettered")],
    );
    assert!(
        poison_sum >= 0.05,
        "dead-lettered after >= 50 ms: {poison_sum}"
    );

    // Publish: the event stack's duration histogram and the sent counter.
    let send = family("messaging_client_operation_duration_seconds");
    check_histograms(send);
    assert_eq!(
        one(
            send,
            "messaging_client_operation_duration_seconds_count",
            &[("messaging_operation_name", "send"), ("outcome", "success")]
        ),
        bodies.len() as f64
    );
    let sent = family("messaging_client_sent_messages");
    assert_eq!(sent["type"], "counter");
    let sent_ok: Vec<&Value> = samples(sent, "messaging_client_sent_messages_total", &[])
        .filter(|s| s["labels"].get("error_type").is_none())
        .collect();
    assert_eq!(sent_ok.len(), 1);
    assert!(
        sent_ok[0]["value"].as_f64().unwrap() >= bodies.len() as f64,
        "every accepted event was sent"
    );

    // HTTP: one series per route and method.
    let http = family("http_server_request_duration_seconds");
    check_histograms(http);
    assert_eq!(
        one(
            http,
            "http_server_request_duration_seconds_count",
            &[
                ("http_request_method", "POST"),
                ("http_route", "/events/{topic}"),
                ("outcome", "success"),
            ]
        ),
        bodies.len() as f64
    );

    let lag = family("keel_kafka_consumer_lag");
    assert_eq!(lag["type"], "gauge");
    let of_topic = [("topic", topic.as_str())];
    let partitions: Vec<&Value> = samples(lag, "keel_kafka_consumer_lag", &of_topic).collect();
    assert!(!partitions.is_empty(), "{lag}");
    assert!(
        partitions
            .iter()
            .all(|s| s["labels"]["partition"].is_string())
    );

    // Breakers by name.
    let breakers = family("keel_circuit_breaker_state");
    assert_eq!(breakers["type"], "gauge");
    for name in ["http_api", "kafka_publish", "s3"] {
        assert_eq!(
            one(breakers, "keel_circuit_breaker_state", &[("breaker", name)]),
            0.0
        );
    }
    // No family of the pre-0.2 names unless asked for.
    assert!(!families.contains_key("kafka_consumer_processed"));
    assert!(!text.contains("handler_order_created"));
}
