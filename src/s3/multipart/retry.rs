//! Per-request retry for transfers: which SDK errors are worth another attempt,
//! how long to wait, and counters that show what happened.
//!
//! keel, not the SDK, owns retries: build the `aws_sdk_s3::Client` with the SDK's
//! retries disabled (`RetryConfig::disabled()`), or attempts multiply (SDK attempts
//! x keel attempts). A transfer retries each request (CreateMultipartUpload, every
//! UploadPart and UploadPartCopy, CompleteMultipartUpload, PutObject, every ranged
//! GET) on its own, re-sending the part's buffer it still holds, so one lost part
//! costs one part and not the whole object.

use std::error::Error as StdError;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use keel_layers::classify::Classification;

/// Error codes S3 and S3-compatible servers use to ask a client to slow down.
const THROTTLING_CODES: &[&str] = &[
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "TooManyRequests",
    "TooManyRequestsException",
];

/// Error codes that mean "try again" although the status may be a 4xx.
const TRANSIENT_CODES: &[&str] = &[
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "IDPCommunicationError",
];

/// When and how often a transfer retries one request.
///
/// Defaults follow the seed: 3 retries after 1 s, 2 s and 4 s, never more than 10 s
/// apart; a throttling answer (503 `SlowDown` and friends) waits at least
/// [`throttle_floor`](Self::throttle_floor) (1 s), and a `Retry-After` header at
/// least what it says. No jitter: parts in flight fail at different moments already.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    max_retries: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    throttle_floor: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            throttle_floor: Duration::from_secs(1),
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

    /// The least wait after a throttling answer such as 503 `SlowDown` (default 1 s).
    pub fn throttle_floor(mut self, delay: Duration) -> Self {
        self.throttle_floor = delay;
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
    /// the backoff, raised to the failure's `retry_after` and, for throttling, to the
    /// throttle floor. The floors may exceed `max_backoff`: the server asked for them.
    pub fn delay(&self, retry: u32, failure: &Classification) -> Duration {
        let mut delay = self.backoff(retry);
        if failure.class == THROTTLED {
            delay = delay.max(self.throttle_floor);
        }
        if let Some(floor) = failure.retry_after {
            delay = delay.max(floor);
        }
        delay
    }
}

/// The class label of a throttling failure.
pub const THROTTLED: &str = "throttled";

/// Classifies an SDK error: throttling (class `"throttled"`), 5xx (`"5xx"`),
/// timeouts (`"timeout"`), connection failures and cut responses (`"transport"`)
/// are retryable; a `Retry-After` header in seconds sets `retry_after`; everything
/// else (4xx such as access denied or no such key, requests that could not be built)
/// is a permanent failure.
pub fn classify_sdk_error<E>(error: &SdkError<E, HttpResponse>) -> Classification
where
    E: ProvideErrorMetadata + StdError + 'static,
{
    let classification = match error {
        SdkError::TimeoutError(_) => Classification::failure("timeout"),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => {
            Classification::failure("timeout")
        }
        SdkError::DispatchFailure(failure) if failure.is_io() || failure.is_other() => {
            Classification::failure("transport")
        }
        SdkError::DispatchFailure(_) => Classification::permanent_failure("request"),
        SdkError::ResponseError(_) => Classification::failure("transport"),
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = service.err().code().unwrap_or_default();
            if THROTTLING_CODES.contains(&code) || status == 429 {
                Classification::failure(THROTTLED)
            } else if TRANSIENT_CODES.contains(&code) || status >= 500 {
                Classification::failure("5xx")
            } else {
                Classification::permanent_failure("client")
            }
        }
        _ => Classification::permanent_failure("request"),
    };
    match error.raw_response().and_then(retry_after) {
        Some(delay) if classification.retryable => classification.with_retry_after(delay),
        _ => classification,
    }
}

fn retry_after(response: &HttpResponse) -> Option<Duration> {
    let value = response.headers().get("retry-after")?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
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

/// An error of one attempt that the retry loop can judge and report.
pub(crate) trait AttemptError: StdError + Send + Sync + 'static {
    /// Whether and when to retry.
    fn classification(&self) -> Classification;
    /// HTTP status of the answer, when there was one.
    fn status(&self) -> Option<u16>;
    /// S3 error code, when S3 sent one.
    fn code(&self) -> Option<&str>;
}

impl<E> AttemptError for SdkError<E, HttpResponse>
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    fn classification(&self) -> Classification {
        classify_sdk_error(self)
    }

    fn status(&self) -> Option<u16> {
        self.raw_response().map(|r| r.status().as_u16())
    }

    fn code(&self) -> Option<&str> {
        ProvideErrorMetadata::code(self)
    }
}

/// A request that failed for good, with its classification and how many attempts
/// were made.
#[derive(Debug)]
pub(crate) struct Exhausted<E> {
    pub(crate) error: E,
    pub(crate) classification: Classification,
    pub(crate) attempts: u32,
}

/// Runs `attempt` until it succeeds, fails permanently or runs out of retries,
/// sleeping between attempts as `policy` says and counting into `counters`.
pub(crate) async fn with_retries<T, E, F, Fut>(
    policy: &RetryPolicy,
    counters: &TransferCounters,
    operation: &'static str,
    mut attempt: F,
) -> Result<T, Exhausted<E>>
where
    E: AttemptError,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
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
            return Err(Exhausted {
                error,
                classification,
                attempts: retry + 1,
            });
        }
        retry += 1;
        let delay = policy.delay(retry, &classification);
        counters.record_backoff(delay, classification.class == THROTTLED);
        tracing::warn!(
            operation,
            class = classification.class,
            retry,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            error = %aws_sdk_s3::error::DisplayErrorContext(&error),
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
    fn throttling_and_retry_after_raise_the_delay() {
        let policy = RetryPolicy::default()
            .initial_backoff(Duration::from_millis(10))
            .throttle_floor(Duration::from_millis(500));
        let server = Classification::failure("5xx");
        assert_eq!(policy.delay(1, &server), Duration::from_millis(10));
        let throttled = Classification::failure(THROTTLED);
        assert_eq!(policy.delay(1, &throttled), Duration::from_millis(500));
        let told = Classification::failure("5xx").with_retry_after(Duration::from_secs(3));
        assert_eq!(policy.delay(2, &told), Duration::from_secs(3));
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
