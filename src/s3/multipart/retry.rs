//! Per-request retry for transfers: which SDK errors are worth another attempt,
//! how long to wait, and counters that show what happened.
//!
//! keel, not the SDK, owns retries: build the `aws_sdk_s3::Client` with the SDK's
//! retries disabled (`RetryConfig::disabled()`), or attempts multiply (SDK attempts
//! x keel attempts). A transfer retries each request (CreateMultipartUpload, every
//! UploadPart and UploadPartCopy, CompleteMultipartUpload, PutObject, every ranged
//! GET) on its own, re-sending the part's buffer it still holds, so one lost part
//! costs one part and not the whole object.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use std::error::Error as StdError;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use keel_layers::classify::{Classification, ClassifiedError};

use crate::s3::error::{S3ErrorKind, S3Operation, S3ServiceError};

/// When and how often a transfer retries one request.
///
/// Defaults follow the seed: 3 retries after 1 s, 2 s and 4 s, never more than 10 s
/// apart. What is retried and the least wait come from [`S3ServiceError`]'s
/// classification: throttling, 5xx, timeouts and broken connections are retried;
/// a throttling answer (503 `SlowDown` and friends) waits at least
/// [`THROTTLE_DELAY_FLOOR`](crate::s3::error::THROTTLE_DELAY_FLOOR) (1 s) or what its
/// `Retry-After` says, even past `max_backoff`. No jitter: parts in flight fail at
/// different moments already.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    max_retries: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn never() -> Self {
        RetryPolicy {
            max_retries: 0,
            ..RetryPolicy::default()
        }
    }

    /// Retries after the first attempt (default 3).
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// Wait before the first retry; doubles for each further retry (default 1 s).
    pub fn initial_backoff(mut self, delay: Duration) -> Self {
        self.initial_backoff = delay;
        self
    }

    /// The longest wait between two attempts (default 10 s).
    pub fn max_backoff(mut self, delay: Duration) -> Self {
        self.max_backoff = delay;
        self
    }

    /// Retries after the first attempt.
    pub fn retries(&self) -> u32 {
        self.max_retries
    }

    /// The exponential backoff before retry number `retry` (1-based), capped.
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 1u32 << retry.saturating_sub(1).min(20);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    /// The wait before retry number `retry` after a failure classified as `failure`:
    /// the backoff, raised to the failure's `retry_after` (which may exceed
    /// `max_backoff`: the server asked for it).
    pub fn delay(&self, retry: u32, failure: &Classification) -> Duration {
        let backoff = self.backoff(retry);
        failure
            .retry_after
            .map_or(backoff, |floor| backoff.max(floor))
    }
}

/// Counters shared by every request of one transfer; cloning shares them.
#[derive(Clone, Debug, Default)]
pub struct TransferCounters {
    inner: Arc<CountersInner>,
}

#[derive(Debug, Default)]
struct CountersInner {
    requests: AtomicU64,
    retries: AtomicU64,
    throttled: AtomicU64,
    backoff_micros: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// What a transfer did: requests sent, retries, throttling answers, time spent
/// waiting, and the most data requests (parts or ranges) that were in flight at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Requests sent, retries included.
    pub requests: u64,
    /// Attempts that were retries.
    pub retries: u64,
    /// Failed attempts that were throttling answers (503 `SlowDown` and friends).
    pub throttled: u64,
    /// Time spent waiting between attempts, summed over all requests.
    pub backoff: Duration,
    /// The most part uploads, part copies or range downloads in flight at once.
    pub max_in_flight: usize,
}

impl TransferCounters {
    /// A snapshot of the counters.
    pub fn snapshot(&self) -> TransferStats {
        let inner = &self.inner;
        TransferStats {
            requests: inner.requests.load(Ordering::Relaxed),
            retries: inner.retries.load(Ordering::Relaxed),
            throttled: inner.throttled.load(Ordering::Relaxed),
            backoff: Duration::from_micros(inner.backoff_micros.load(Ordering::Relaxed)),
            max_in_flight: inner.max_in_flight.load(Ordering::Relaxed),
        }
    }

    /// Marks one data request as in flight until the returned guard is dropped.
    pub(crate) fn enter_flight(&self) -> InFlight {
        let now = self.inner.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.inner.max_in_flight.fetch_max(now, Ordering::AcqRel);
        InFlight {
            counters: self.clone(),
        }
    }

    fn record_backoff(&self, delay: Duration, throttled: bool) {
        self.inner.retries.fetch_add(1, Ordering::Relaxed);
        if throttled {
            self.inner.throttled.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.inner
            .backoff_micros
            .fetch_add(micros, Ordering::Relaxed);
    }
}

/// One data request in flight; leaves the flight count when dropped.
#[derive(Debug)]
pub(crate) struct InFlight {
    counters: TransferCounters,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counters.inner.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Maps an SDK error of `operation` on `bucket`/`key` into an [`S3ServiceError`].
pub(crate) fn sdk_error<'a, E>(
    operation: S3Operation,
    bucket: &'a str,
    key: &'a str,
) -> impl FnOnce(SdkError<E, HttpResponse>) -> S3ServiceError + 'a
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    move |error| S3ServiceError::from_sdk(operation, bucket, Some(key), error)
}

/// Runs one attempt, giving it up after `limit` (when set) with the error
/// `timed_out` makes: the attempt's future is dropped, which closes its connection.
pub(crate) async fn within<T>(
    limit: Option<Duration>,
    attempt: impl Future<Output = Result<T, S3ServiceError>>,
    timed_out: impl FnOnce() -> S3ServiceError,
) -> Result<T, S3ServiceError> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, attempt)
            .await
            .unwrap_or_else(|_| Err(timed_out())),
        None => attempt.await,
    }
}

/// Runs `attempt` until it succeeds, fails permanently or runs out of retries,
/// sleeping between attempts as `policy` says and counting into `counters`. The
/// error returned is the last one, its message saying how many attempts were made.
pub(crate) async fn with_retries<T, F, Fut>(
    policy: &RetryPolicy,
    counters: &TransferCounters,
    mut attempt: F,
) -> Result<T, S3ServiceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, S3ServiceError>>,
{
    let mut retry = 0;
    loop {
        counters.inner.requests.fetch_add(1, Ordering::Relaxed);
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let classification = error.classification();
        if !classification.retryable || retry >= policy.max_retries {
            if retry == 0 {
                return Err(error);
            }
            let message = match error.message() {
                Some(message) => format!("{message} (gave up after {} attempts)", retry + 1),
                None => format!("gave up after {} attempts", retry + 1),
            };
            return Err(error.with_message(message));
        }
        retry += 1;
        let delay = policy.delay(retry, &classification);
        let throttled = matches!(error.kind(), S3ErrorKind::Throttled { .. });
        counters.record_backoff(delay, throttled);
        tracing::warn!(
            operation = error.operation().as_str(),
            class = classification.class,
            retry,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            error = %error,
            "S3 request failed, retrying after backoff"
        );
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_backoff_is_one_two_four_seconds_capped_at_ten() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.retries(), 3);
        assert_eq!(policy.backoff(1), Duration::from_secs(1));
        assert_eq!(policy.backoff(2), Duration::from_secs(2));
        assert_eq!(policy.backoff(3), Duration::from_secs(4));
        assert_eq!(policy.backoff(5), Duration::from_secs(10));
        assert_eq!(policy.backoff(64), Duration::from_secs(10));
    }

    #[test]
    fn retry_after_raises_the_delay_past_the_cap() {
        let policy = RetryPolicy::default()
            .initial_backoff(Duration::from_millis(10))
            .max_backoff(Duration::from_millis(100));
        let server = Classification::failure("5xx");
        assert_eq!(policy.delay(1, &server), Duration::from_millis(10));
        let told = Classification::failure("throttled").with_retry_after(Duration::from_secs(3));
        assert_eq!(policy.delay(2, &told), Duration::from_secs(3));
    }

    fn throttled() -> S3ServiceError {
        S3ServiceError::new(
            crate::s3::error::S3Operation::UploadPart,
            S3ErrorKind::Throttled { retry_after: None },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn throttled_attempts_wait_the_floor_and_are_counted() {
        let policy = RetryPolicy::default().initial_backoff(Duration::from_millis(10));
        let counters = TransferCounters::default();
        let mut failures = 2;
        let started = tokio::time::Instant::now();
        let result = with_retries(&policy, &counters, || {
            let fail = failures > 0;
            failures -= 1;
            async move { if fail { Err(throttled()) } else { Ok(7) } }
        })
        .await;
        assert_eq!(result.unwrap(), 7);
        let stats = counters.snapshot();
        assert_eq!((stats.requests, stats.retries, stats.throttled), (3, 2, 2));
        let floor = crate::s3::error::THROTTLE_DELAY_FLOOR;
        assert_eq!(stats.backoff, floor * 2);
        assert_eq!(started.elapsed(), floor * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn exhausted_retries_return_the_last_error_with_the_attempts() {
        let policy = RetryPolicy::default().max_retries(2);
        let counters = TransferCounters::default();
        let error = with_retries(&policy, &counters, || async { Err::<(), _>(throttled()) })
            .await
            .unwrap_err();
        assert!(matches!(error.kind(), S3ErrorKind::Throttled { .. }));
        assert_eq!(error.message(), Some("gave up after 3 attempts"));
        assert_eq!(counters.snapshot().requests, 3);

        let permanent = S3ServiceError::new(
            crate::s3::error::S3Operation::UploadPart,
            S3ErrorKind::AccessDenied,
        );
        let mut calls = 0;
        let error = with_retries(&policy, &counters, || {
            calls += 1;
            let permanent = S3ServiceError::new(permanent.operation(), permanent.kind().clone());
            async move { Err::<(), _>(permanent) }
        })
        .await
        .unwrap_err();
        assert_eq!(calls, 1, "a permanent failure is not retried");
        assert_eq!(error.message(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_attempt_times_out_and_is_retried() {
        let policy = RetryPolicy::default().initial_backoff(Duration::from_millis(10));
        let counters = TransferCounters::default();
        let limit = Some(Duration::from_secs(30));
        let started = tokio::time::Instant::now();
        let mut attempts = 0;
        let result = with_retries(&policy, &counters, || {
            attempts += 1;
            let stalls = attempts == 1;
            within(
                limit,
                async move {
                    if stalls {
                        std::future::pending::<()>().await;
                    }
                    Ok(attempts)
                },
                || {
                    S3ServiceError::new(
                        crate::s3::error::S3Operation::UploadPart,
                        S3ErrorKind::Timeout,
                    )
                },
            )
        })
        .await;
        assert_eq!(result.unwrap(), 2, "the second attempt answered");
        let stats = counters.snapshot();
        assert_eq!((stats.requests, stats.retries), (2, 1));
        // The stalled attempt was given up at the limit, then the 10 ms backoff.
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(30) + Duration::from_millis(10)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_an_attempt_runs_to_its_end() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, S3ServiceError>(5)
        };
        let result = within(None, slow, || unreachable!("no limit, no timeout")).await;
        assert_eq!(result.unwrap(), 5);
    }

    #[test]
    fn in_flight_guards_track_the_maximum() {
        let counters = TransferCounters::default();
        let a = counters.enter_flight();
        let b = counters.enter_flight();
        drop(a);
        let c = counters.enter_flight();
        drop(b);
        drop(c);
        let _d = counters.enter_flight();
        assert_eq!(counters.snapshot().max_in_flight, 2);
    }
}
