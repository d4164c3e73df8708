//! Per-message retry with exponential backoff around a handler.
//!
//! A failed message is retried in place, blocking its lane (so order is kept), after
//! 1 s, 2 s, 4 s, 8 s ... capped at 30 s by default — the seed's Kafka policy. Each
//! retry is logged with the attempt number and the backoff. Only failures the
//! classifier marks retryable are retried ([`HandlerErrors`] by default: a
//! [`HandlerError::permanent`](super::error::HandlerError::permanent) goes to the
//! dead-letter queue at once); a `retry_after` in the classification raises the
//! delay.
//!
//! This layer is specific to [`ConsumedEvent`]: it counts attempts in the event (the
//! dead-letter layer reports them) and logs the message coordinates.

use super::error::HandlerErrors;
use super::event::ConsumedEvent;
use futures::future::BoxFuture;
use keel_layers::classify::Classify;
use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service, ServiceExt};

/// Exponential backoff: `initial * 2^(retry - 1)`, capped at `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry. Default 1 s.
    pub initial: Duration,
    /// Longest delay. Default 30 s.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay before retry number `retry` (1-based).
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = 1u32
            .checked_shl(retry.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// Retries a failed handler call with [`Backoff`]; see the module docs.
///
/// Cheap to clone; clones share nothing.
#[derive(Clone, Debug)]
pub struct MessageRetryLayer<C = HandlerErrors> {
    max_retries: u32,
    backoff: Backoff,
    classifier: C,
}

impl MessageRetryLayer {
    /// At most `max_retries` retries with the default backoff and classifier.
    pub fn new(max_retries: u32) -> Self {
        MessageRetryLayer {
            max_retries,
            backoff: Backoff::default(),
            classifier: HandlerErrors,
        }
    }
}

impl<C> MessageRetryLayer<C> {
    /// Sets the backoff.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the classifier that decides what is retryable.
    pub fn classifier<C2>(self, classifier: C2) -> MessageRetryLayer<C2> {
        MessageRetryLayer {
            max_retries: self.max_retries,
            backoff: self.backoff,
            classifier,
        }
    }
}

impl<S, C: Clone> Layer<S> for MessageRetryLayer<C> {
    type Service = MessageRetry<S, C>;
    fn layer(&self, inner: S) -> Self::Service {
        MessageRetry {
            inner,
            max_retries: self.max_retries,
            backoff: self.backoff,
            classifier: self.classifier.clone(),
        }
    }
}

/// The service of [`MessageRetryLayer`].
#[derive(Clone)]
pub struct MessageRetry<S, C = HandlerErrors> {
    inner: S,
    max_retries: u32,
    backoff: Backoff,
    classifier: C,
}

impl<S: fmt::Debug, C> fmt::Debug for MessageRetry<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageRetry")
            .field("inner", &self.inner)
            .field("max_retries", &self.max_retries)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl<S> MessageRetry<S> {
    /// Wraps `inner` with at most `max_retries` retries and the default backoff.
    pub fn new(inner: S, max_retries: u32) -> Self {
        MessageRetryLayer::new(max_retries).layer(inner)
    }
}

impl<S, C> MessageRetry<S, C> {
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

impl<S, C> Service<ConsumedEvent> for MessageRetry<S, C>
where
    S: Service<ConsumedEvent> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: fmt::Display + Send,
    C: Classify<S::Response, S::Error> + Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, event: ConsumedEvent) -> Self::Future {
        // Keep the service that was made ready for the first attempt.
        let clone = self.inner.clone();
        let mut svc = std::mem::replace(&mut self.inner, clone);
        let classifier = self.classifier.clone();
        let (max_retries, backoff) = (self.max_retries, self.backoff);
        Box::pin(async move {
            event.count_attempt();
            let mut result = svc.call(event.clone()).await;
            let mut retry = 0;
            loop {
                let verdict = classifier.classify(result.as_ref());
                if !verdict.should_retry() || retry >= max_retries {
                    return result;
                }
                retry += 1;
                let delay = verdict.retry_after.map_or(backoff.delay(retry), |floor| {
                    floor.max(backoff.delay(retry))
                });
                if let Err(e) = &result {
                    tracing::warn!(
                        topic = event.topic(),
                        partition = event.partition(),
                        offset = event.offset(),
                        event_type = event.event_type(),
                        attempt = retry + 1,
                        max_attempts = max_retries + 1,
                        backoff_ms = delay.as_millis() as u64,
                        error = %e,
                        "handler failed, retrying after backoff"
                    );
                }
                tokio::time::sleep(delay).await;
                result = match svc.ready().await {
                    Ok(ready) => {
                        event.count_attempt();
                        ready.call(event.clone()).await
                    }
                    Err(e) => Err(e),
                };
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::consumer::error::{BoxError, HandlerError};
    use crate::kafka::consumer::event::test_event;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::time::Instant;

    #[test]
    fn default_backoff_is_1_2_4_8_capped_at_30() {
        let b = Backoff::default();
        let secs: Vec<u64> = (1..=7).map(|r| b.delay(r).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(b.delay(200), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn fails_twice_then_succeeds_with_backoff() {
        let calls = Arc::new(AtomicU32::new(0));
        let seen_attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let svc = {
            let calls = calls.clone();
            let seen = seen_attempts.clone();
            tower::service_fn(move |ev: ConsumedEvent| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                seen.lock()
                    .unwrap()
                    .push((ev.attempts_made(), Instant::now()));
                async move {
                    if n < 2 {
                        Err::<(), BoxError>("transient".into())
                    } else {
                        Ok(())
                    }
                }
            })
        };
        let start = Instant::now();
        let ev = test_event("t");
        let mut retry = MessageRetry::new(svc, 3);
        retry.ready().await.unwrap().call(ev.clone()).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(ev.attempts_made(), 3);
        let seen = seen_attempts.lock().unwrap();
        let attempts: Vec<u32> = seen.iter().map(|s| s.0).collect();
        assert_eq!(attempts, vec![1, 2, 3]);
        // Retry 1 after 1 s, retry 2 after 2 more seconds.
        assert_eq!(seen[1].1 - start, Duration::from_secs(1));
        assert_eq!(seen[2].1 - start, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_retries_and_skips_permanent_errors() {
        let calls = Arc::new(AtomicU32::new(0));
        let failing = {
            let calls = calls.clone();
            tower::service_fn(move |_ev: ConsumedEvent| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), BoxError>("always".into()) }
            })
        };
        let mut retry = MessageRetryLayer::new(4)
            .backoff(Backoff {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(15),
            })
            .layer(failing);
        let start = Instant::now();
        assert!(
            retry
                .ready()
                .await
                .unwrap()
                .call(test_event("t"))
                .await
                .is_err()
        );
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        assert_eq!(start.elapsed(), Duration::from_millis(10 + 15 + 15 + 15));

        let calls = Arc::new(AtomicU32::new(0));
        let permanent = {
            let calls = calls.clone();
            tower::service_fn(move |_ev: ConsumedEvent| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), BoxError>(Box::new(HandlerError::permanent("bad"))) }
            })
        };
        let mut retry = MessageRetry::new(permanent, 4);
        assert!(
            retry
                .ready()
                .await
                .unwrap()
                .call(test_event("t"))
                .await
                .is_err()
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
