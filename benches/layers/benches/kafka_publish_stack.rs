//! What each layer of the default publish stack costs per call, without a broker.
//!
//! The inner service is a stand-in for `PublishEvent` whose future is pending once
//! (as a delivery is) and then acknowledges; everything else is as in
//! `benches/kafka_publish.rs`: a keel envelope per call, at most 10,000 calls
//! outstanding, one current-thread runtime. Each round times the bare stand-in,
//! the full default stack ([`PublishStack::wrap_event_service`]) and each layer
//! alone, and prints the nanoseconds per call each adds to the bare stand-in.
//! On a shared machine read the figures as ranges over the rounds.
//!
//! Run: `cargo bench -p keel-benches --bench kafka_publish_stack`
//! (`KEEL_BENCH_MESSAGES` calls per variant and round, default 300,000;
//! `KEEL_BENCH_ROUNDS`, default 5).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use keel::kafka::client::KafkaClient;
use keel::kafka::config::{KafkaConfig, KafkaLogLevel};
use keel::kafka::envelope::EventEnvelope;
use keel::kafka::error::KafkaProducerError;
use keel::kafka::producer::{
    KafkaOutage, ProducerErrors, PublishAck, PublishRequest, PublishStack,
};
use keel_benches::{current_thread_runtime, load_run_size};
use keel_layers::circuit_breaker::CircuitBreakerLayer;
use keel_layers::classify::ByError;
use keel_layers::metrics::MetricsLayer;
use keel_layers::timeout::TimeoutLayer;
use tower::{Layer, Service};

/// Acknowledges every call on its second poll.
#[derive(Clone, Copy, Debug)]
struct StandIn;

struct StandInFuture {
    polled: bool,
    event_id: uuid::Uuid,
}

impl Future for StandInFuture {
    type Output = Result<PublishAck, KafkaProducerError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.polled {
            self.polled = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(PublishAck {
            event_id: self.event_id,
            partition: 0,
            offset: 0,
        }))
    }
}

impl<T> Service<PublishRequest<T>> for StandIn {
    type Response = PublishAck;
    type Error = KafkaProducerError;
    type Future = StandInFuture;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), KafkaProducerError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: PublishRequest<T>) -> StandInFuture {
        StandInFuture {
            polled: false,
            event_id: req.event.event_id(),
        }
    }
}

/// Nanoseconds per call of `n` calls through `svc`, at most 10,000 outstanding.
async fn per_call<'a, S>(mut svc: S, n: usize, payload: &'a serde_json::Value) -> f64
where
    S: Service<PublishRequest<&'a serde_json::Value>>,
    S::Future: Unpin,
{
    let began = Instant::now();
    let mut outstanding = VecDeque::with_capacity(10_000);
    for i in 0..n {
        if outstanding.len() >= 10_000 {
            let oldest: S::Future = outstanding.pop_front().unwrap();
            let _ = oldest.await;
        }
        let event = EventEnvelope::new("bench.event", payload).with_key(format!("k{}", i % 64));
        outstanding.push_back(svc.call(PublishRequest::new("bench-topic", event)));
    }
    for f in outstanding {
        let _ = f.await;
    }
    began.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let (n, rounds) = load_run_size(300_000, 1_000);
    current_thread_runtime().block_on(async {
        // The stack needs a client for its breaker registration; nothing is sent.
        let config = KafkaConfig::builder()
            .brokers(["127.0.0.1:9".to_string()])
            .log_level(KafkaLogLevel::Nothing)
            .build()
            .unwrap();
        let client = KafkaClient::connect(config).unwrap();
        let stack = PublishStack::new(&client);
        let payload = serde_json::json!({ "d": "x" });
        println!("# ns per call added to the bare stand-in ({n} calls per variant)");
        println!("| round | bare ns/call | full stack | timeout (shared timer, the stack's) | timeout (timer per call) | circuit breaker | metrics | producer errors |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for round in 0..rounds {
            let bare = per_call(StandIn, n, &payload).await;
            let full = per_call(stack.wrap_event_service(StandIn), n, &payload).await;
            let timeout = per_call(
                TimeoutLayer::new(stack.timeout())
                    .shared_timer(true)
                    .layer(StandIn),
                n,
                &payload,
            )
            .await;
            let timeout_per_call = per_call(
                TimeoutLayer::new(stack.timeout()).layer(StandIn),
                n,
                &payload,
            )
            .await;
            let breaker = per_call(
                CircuitBreakerLayer::builder()
                    .classifier(KafkaOutage)
                    .build()
                    .layer(StandIn),
                n,
                &payload,
            )
            .await;
            let metrics = per_call(MetricsLayer::new().classifier(ByError).layer(StandIn), n, &payload).await;
            let errors = per_call(ProducerErrors::new(StandIn), n, &payload).await;
            println!(
                "| {round} | {bare:.0} | +{:.0} | +{:.0} | +{:.0} | +{:.0} | +{:.0} | +{:.0} |",
                full - bare,
                timeout - bare,
                timeout_per_call - bare,
                breaker - bare,
                metrics - bare,
                errors - bare
            );
        }
    });
}
