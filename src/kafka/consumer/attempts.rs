//! Counting handler calls per message, for the retries metric and the dead-letter
//! `keel-dlq-attempts` header.
//!
//! Per-message retry is keel-layers' [`RetryLayer`](keel_layers::retry::RetryLayer)
//! (the runtime uses [`RetryPolicy::kafka`](keel_layers::retry::RetryPolicy::kafka):
//! 1, 2, 4, 8 s ... capped at 30 s, no jitter, no budget). A retry layer sees
//! requests, not messages, so this layer sits *inside* it and counts each call in the
//! [`ConsumedEvent`], whose clones share the count.

use super::event::ConsumedEvent;
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// Counts every call in the event; put it inside the retry layer. Cheap to clone;
/// clones share nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct CountAttemptsLayer;

impl<S> Layer<S> for CountAttemptsLayer {
    type Service = CountAttempts<S>;
    fn layer(&self, inner: S) -> CountAttempts<S> {
        CountAttempts { inner }
    }
}

/// The service of [`CountAttemptsLayer`].
#[derive(Clone, Debug)]
pub struct CountAttempts<S> {
    inner: S,
}

impl<S> CountAttempts<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        CountAttempts { inner }
    }
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Service<ConsumedEvent>> Service<ConsumedEvent> for CountAttempts<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, event: ConsumedEvent) -> S::Future {
        event.count_attempt();
        self.inner.call(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::consumer::error::{BoxError, HandlerError, HandlerErrors};
    use crate::kafka::consumer::event::test_event;
    use keel_layers::retry::{RetryLayer, RetryPolicy};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::time::Instant;
    use tower::{ServiceBuilder, ServiceExt};

    /// The runtime's retry stack around a handler failing `failures` times.
    fn stack(
        failures: u32,
        permanent: bool,
        calls: Arc<Mutex<Vec<(u32, Instant)>>>,
    ) -> impl Service<ConsumedEvent, Response = (), Error = BoxError> {
        let handler = tower::service_fn(move |ev: ConsumedEvent| {
            let calls = calls.clone();
            async move {
                let n = {
                    let mut calls = calls.lock().unwrap();
                    calls.push((ev.attempts_made(), Instant::now()));
                    calls.len() as u32
                };
                if n > failures {
                    Ok(())
                } else if permanent {
                    Err::<(), BoxError>(Box::new(HandlerError::permanent("bad input")))
                } else {
                    Err("transient".into())
                }
            }
        });
        ServiceBuilder::new()
            .layer(RetryLayer::new(RetryPolicy::kafka().without_budget()).classifier(HandlerErrors))
            .layer(CountAttemptsLayer)
            .service(handler)
    }

    #[tokio::test(start_paused = true)]
    async fn fails_twice_then_succeeds_after_1_and_2_seconds() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let event = test_event("t");
        stack(2, false, calls.clone())
            .oneshot(event.clone())
            .await
            .unwrap();
        let calls = calls.lock().unwrap();
        let attempts: Vec<u32> = calls.iter().map(|c| c.0).collect();
        assert_eq!(attempts, vec![1, 2, 3]);
        assert_eq!(event.attempts_made(), 3);
        assert_eq!(calls[1].1 - start, Duration::from_secs(1));
        assert_eq!(calls[2].1 - start, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn the_kafka_schedule_is_1_2_4_8_seconds_then_gives_up() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let event = test_event("t");
        assert!(
            stack(u32::MAX, false, calls.clone())
                .oneshot(event.clone())
                .await
                .is_err()
        );
        let calls = calls.lock().unwrap();
        let at: Vec<u64> = calls.iter().map(|c| (c.1 - start).as_secs()).collect();
        assert_eq!(at, vec![0, 1, 3, 7, 15]);
        assert_eq!(event.attempts_made(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let event = test_event("t");
        assert!(
            stack(u32::MAX, true, calls.clone())
                .oneshot(event.clone())
                .await
                .is_err()
        );
        assert_eq!(event.attempts_made(), 1);
    }
}
