//! Contract tests for the six layers: each honours `poll_ready`, clones as its docs
//! say, passes the inner error through (typed, back through `into_inner`), and the
//! six compose in any order. The last module runs the stack on an axum `Router`.
//!
//! Everything runs on tokio's paused clock: timeouts and backoffs fire when the
//! runtime is idle, never after a real sleep.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use keel_layers::ServiceBuilderExt;
use keel_layers::batch::{self, BatchSizeLayer};
use keel_layers::circuit_breaker::{
    CircuitBreakerError, CircuitBreakerHandle, CircuitBreakerLayer, CircuitState,
};
use keel_layers::classify::{ByError, Classification, ClassifiedError};
use keel_layers::logging::LoggingLayer;
use keel_layers::metrics::{MetricsHandle, MetricsLayer};
use keel_layers::retry::{RetryBudget, RetryLayer, RetryPolicy};
use keel_layers::timeout::{TimeoutError, TimeoutLayer};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

// ---------------------------------------------------------------------------
// A scripted inner service
// ---------------------------------------------------------------------------

/// The scripted service's error: a number, so a test can tell which one came back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ScriptError(u32);

impl fmt::Display for ScriptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "scripted failure {}", self.0)
    }
}

impl std::error::Error for ScriptError {}

impl ClassifiedError for ScriptError {
    fn classification(&self) -> Classification {
        Classification::failure("script")
    }
}

/// What the next call does.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Answers with the batch length.
    Ok,
    /// Fails with `ScriptError(n)`.
    Err(u32),
    /// Never answers.
    Hang,
}

/// What `poll_ready` answers.
#[derive(Clone, Copy, Debug)]
enum Readiness {
    Ready,
    Pending,
    Fail(u32),
}

#[derive(Debug)]
struct State {
    readiness: Readiness,
    waker: Option<Waker>,
    steps: VecDeque<Step>,
    calls: usize,
    /// Calls made on an instance that had not been polled ready since its last call.
    violations: usize,
}

/// The script shared by a scripted service and all its clones.
#[derive(Clone, Debug)]
struct Script(Arc<Mutex<State>>);

impl Script {
    fn new() -> Self {
        Script(Arc::new(Mutex::new(State {
            readiness: Readiness::Ready,
            waker: None,
            steps: VecDeque::new(),
            calls: 0,
            violations: 0,
        })))
    }

    fn service(&self) -> Scripted {
        Scripted {
            script: self.clone(),
            polled_ready: false,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("script lock")
    }

    /// Sets the readiness and wakes whoever waits for it.
    fn set_readiness(&self, readiness: Readiness) {
        let waker = {
            let mut state = self.state();
            state.readiness = readiness;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Queues steps; once the queue is empty, calls succeed.
    fn push(&self, steps: impl IntoIterator<Item = Step>) {
        self.state().steps.extend(steps);
    }

    fn clear(&self) {
        self.state().steps.clear();
    }

    fn calls(&self) -> usize {
        self.state().calls
    }

    fn violations(&self) -> usize {
        self.state().violations
    }
}

/// A `Service<Vec<u32>>` answering with the batch length, or as scripted.
#[derive(Debug)]
struct Scripted {
    script: Script,
    polled_ready: bool,
}

impl Clone for Scripted {
    /// A clone has not been polled ready (tower's rule: readiness is per instance).
    fn clone(&self) -> Self {
        self.script.service()
    }
}

type ScriptFuture = Pin<Box<dyn Future<Output = Result<usize, ScriptError>> + Send>>;

impl Service<Vec<u32>> for Scripted {
    type Response = usize;
    type Error = ScriptError;
    type Future = ScriptFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ScriptError>> {
        let mut state = self.script.state();
        match state.readiness {
            Readiness::Ready => {
                self.polled_ready = true;
                Poll::Ready(Ok(()))
            }
            Readiness::Pending => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Readiness::Fail(n) => Poll::Ready(Err(ScriptError(n))),
        }
    }

    fn call(&mut self, batch: Vec<u32>) -> ScriptFuture {
        let mut state = self.script.state();
        if !std::mem::take(&mut self.polled_ready) {
            state.violations += 1;
        }
        state.calls += 1;
        let step = state.steps.pop_front().unwrap_or(Step::Ok);
        let len = batch.len();
        Box::pin(async move {
            match step {
                Step::Ok => Ok(len),
                Step::Err(n) => Err(ScriptError(n)),
                Step::Hang => std::future::pending().await,
            }
        })
    }
}

/// A waker that counts its wake-ups.
#[derive(Debug, Default)]
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A retry policy whose backoffs are short and that has no budget.
fn quick_retries() -> RetryPolicy {
    RetryPolicy::new()
        .base(Duration::from_millis(10))
        .max_attempts(3)
        .without_budget()
        .jitter_seed(7)
}

// ---------------------------------------------------------------------------
// Per-layer contract: poll_ready and errors
// ---------------------------------------------------------------------------

/// Generates the readiness and error contract tests for one layer. `$wrap` builds
/// the layered service around a `Scripted`; `$unwrap` gets the inner error back.
macro_rules! layer_contract {
    ($name:ident, $wrap:expr, $unwrap:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(start_paused = true)]
            async fn waits_for_inner_readiness_before_calling() {
                let script = Script::new();
                script.set_readiness(Readiness::Pending);
                let mut svc = ($wrap)(script.service());

                let counter = Arc::new(CountingWaker::default());
                let waker = Waker::from(counter.clone());
                let mut cx = Context::from_waker(&waker);
                assert!(svc.poll_ready(&mut cx).is_pending());
                assert!(svc.poll_ready(&mut cx).is_pending());
                assert_eq!(script.calls(), 0);

                // The inner service kept the caller's waker: the layer passed its
                // context down instead of parking the caller on a waker of its own.
                script.set_readiness(Readiness::Ready);
                assert_eq!(counter.0.load(Ordering::SeqCst), 1);
                assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));

                assert_eq!(svc.call(vec![1, 2, 3]).await.unwrap(), 3);
                assert_eq!((script.calls(), script.violations()), (1, 0));
            }

            #[tokio::test(start_paused = true)]
            async fn propagates_readiness_errors_typed() {
                let script = Script::new();
                script.set_readiness(Readiness::Fail(7));
                let mut svc = ($wrap)(script.service());
                let mut cx = Context::from_waker(Waker::noop());
                match svc.poll_ready(&mut cx) {
                    Poll::Ready(Err(e)) => assert_eq!(($unwrap)(e), Some(ScriptError(7))),
                    other => panic!("expected the inner readiness error, got {other:?}"),
                }
                assert_eq!(script.calls(), 0);
            }

            #[tokio::test(start_paused = true)]
            async fn passes_inner_errors_through_typed() {
                let script = Script::new();
                // Enough failures to outlast any retries.
                script.push([Step::Err(42); 8]);
                let svc = ($wrap)(script.service());
                let err = svc.oneshot(vec![1]).await.unwrap_err();
                assert_eq!(($unwrap)(err), Some(ScriptError(42)));
                assert!(script.calls() >= 1);
                assert_eq!(script.violations(), 0);
            }

            #[tokio::test(start_paused = true)]
            async fn clones_wrap_clones_of_the_inner_service() {
                let script = Script::new();
                let svc = ($wrap)(script.service());
                let copy = svc.clone();
                assert_eq!(svc.oneshot(vec![1, 2]).await.unwrap(), 2);
                assert_eq!(copy.oneshot(vec![1]).await.unwrap(), 1);
                assert_eq!((script.calls(), script.violations()), (2, 0));
            }
        }
    };
}

layer_contract!(
    circuit_breaker,
    |inner: Scripted| CircuitBreakerLayer::new().layer(inner),
    |e: CircuitBreakerError<ScriptError>| e.into_inner()
);
layer_contract!(
    retry,
    |inner: Scripted| RetryLayer::new(quick_retries()).layer(inner),
    |e: ScriptError| Some(e)
);
layer_contract!(
    timeout,
    |inner: Scripted| TimeoutLayer::new(Duration::from_secs(1)).layer(inner),
    |e: TimeoutError<ScriptError>| e.into_inner()
);
layer_contract!(
    timeout_covering_readiness,
    |inner: Scripted| TimeoutLayer::new(Duration::from_secs(1))
        .covering_readiness(true)
        .layer(inner),
    |e: TimeoutError<ScriptError>| e.into_inner()
);
layer_contract!(
    metrics,
    |inner: Scripted| MetricsLayer::new().layer(inner),
    |e: ScriptError| Some(e)
);
layer_contract!(
    batch_size,
    |inner: Scripted| BatchSizeLayer::new().layer(inner),
    |e: batch::Error<ScriptError>| e.into_inner()
);
layer_contract!(
    logging,
    |inner: Scripted| LoggingLayer::new("Contract", "call").layer(inner),
    |e: ScriptError| Some(e)
);

// ---------------------------------------------------------------------------
// Per-layer contract: what clones share
// ---------------------------------------------------------------------------

mod clones {
    use super::*;

    /// Clones of a breaker service (and services of clones of its layer) share one
    /// breaker: failures through one open it for all.
    #[tokio::test(start_paused = true)]
    async fn circuit_breaker_clones_share_the_breaker() {
        let script = Script::new();
        let layer = CircuitBreakerLayer::builder()
            .consecutive_failures(2)
            .build();
        let first = layer.layer(script.service());
        let second = first.clone();
        let third = layer.clone().layer(script.service());

        script.push([Step::Err(1), Step::Err(2)]);
        first.clone().oneshot(vec![1]).await.unwrap_err();
        second.clone().oneshot(vec![1]).await.unwrap_err();
        assert_eq!(layer.handle().state(), CircuitState::Open);

        let err = third.oneshot(vec![1]).await.unwrap_err();
        assert!(matches!(err, CircuitBreakerError::Open { .. }));
        let err = first.oneshot(vec![1]).await.unwrap_err();
        assert!(err.is_rejected());
        assert_eq!(
            script.calls(),
            2,
            "an open breaker does not call the inner service"
        );
    }

    /// Clones of a retry service share the policy's budget.
    #[tokio::test(start_paused = true)]
    async fn retry_clones_share_the_budget() {
        let script = Script::new();
        let budget = RetryBudget::builder()
            .ratio(0.0)
            .min_per_sec(0)
            .capacity(1)
            .initial(1)
            .build();
        let policy = quick_retries().budget(budget.clone());
        let first = RetryLayer::new(policy).layer(script.service());
        let second = first.clone();

        // The one token pays the first clone's retry…
        script.push([Step::Err(1)]);
        assert_eq!(first.oneshot(vec![1]).await.unwrap(), 1);
        assert_eq!(script.calls(), 2);
        // …so the second clone finds the shared bucket empty and does not retry.
        script.push([Step::Err(2)]);
        assert_eq!(second.oneshot(vec![1]).await.unwrap_err(), ScriptError(2));
        assert_eq!(script.calls(), 3);
        assert!(!budget.try_withdraw());
    }

    /// A timeout clone shares nothing: it starts with a fresh readiness clock.
    #[tokio::test(start_paused = true)]
    async fn timeout_clones_share_nothing() {
        let script = Script::new();
        script.set_readiness(Readiness::Pending);
        let mut first = TimeoutLayer::new(Duration::from_secs(1))
            .covering_readiness(true)
            .layer(script.service());
        // The first instance waits past its deadline…
        std::future::poll_fn(|cx| first.poll_ready(cx))
            .await
            .unwrap();
        // …its clone, made now, has its own clock and is still waiting.
        let mut second = first.clone();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(second.poll_ready(&mut cx).is_pending());

        let err = first.call(vec![1]).await.unwrap_err();
        assert!(err.is_elapsed());
        assert_eq!(
            script.calls(),
            0,
            "an expired wait never calls the inner service"
        );

        script.set_readiness(Readiness::Ready);
        std::future::poll_fn(|cx| second.poll_ready(cx))
            .await
            .unwrap();
        assert_eq!(second.call(vec![1, 2]).await.unwrap(), 2);
        assert_eq!((script.calls(), script.violations()), (1, 0));
    }

    /// Clones of a metrics service (and services of clones of its layer) count into
    /// one set of metrics.
    #[tokio::test(start_paused = true)]
    async fn metrics_clones_share_the_counters() {
        let script = Script::new();
        let layer = MetricsLayer::new();
        let first = layer.layer(script.service());
        let second = first.clone();
        let third = layer.clone().layer(script.service());

        first.oneshot(vec![1]).await.unwrap();
        script.push([Step::Err(3)]);
        second.oneshot(vec![1]).await.unwrap_err();
        third.oneshot(vec![1]).await.unwrap();

        let snapshot = layer.handle().snapshot();
        assert_eq!(
            (snapshot.calls, snapshot.successes, snapshot.failures),
            (3, 2, 1)
        );
    }

    /// A batch-size clone keeps the same limits (plain copies).
    #[tokio::test(start_paused = true)]
    async fn batch_size_clones_keep_the_limits() {
        let script = Script::new();
        let first = BatchSizeLayer::new().max(2).layer(script.service());
        let second = first.clone();
        assert_eq!((second.max(), second.allows_empty()), (2, false));
        let err = second.oneshot(vec![1, 2, 3]).await.unwrap_err();
        assert_eq!(
            err.rejection(),
            Some(batch::BatchSizeError::TooLarge { len: 3, max: 2 })
        );
        assert_eq!(first.oneshot(vec![1, 2]).await.unwrap(), 2);
        assert_eq!(script.calls(), 1);
    }

    /// Logging clones share the settings: both log with the layer's component.
    #[tokio::test(start_paused = true)]
    async fn logging_clones_share_the_settings() {
        let lines = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Sink(sink.clone()))
            .event_format(keel_layers::logging::JsonLogFormat::new())
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let script = Script::new();
        let first = LoggingLayer::new("ContractComponent", "clone")
            .success_message("clone call done")
            .layer(script.service());
        let second = first.clone();
        first.oneshot(vec![1]).await.unwrap();
        second.oneshot(vec![1]).await.unwrap();

        let text = String::from_utf8(lines.lock().unwrap().clone()).unwrap();
        let logged: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("clone call done"))
            .collect();
        assert_eq!(logged.len(), 2, "{text}");
        assert!(logged.iter().all(|l| l.contains("\"ContractComponent\"")));
    }

    #[derive(Debug)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------
// Composition in any order
// ---------------------------------------------------------------------------

mod composition {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Kind {
        Logging,
        Metrics,
        Batch,
        Breaker,
        Retry,
        Timeout,
    }

    impl Kind {
        fn named(name: &str) -> Kind {
            match name {
                "logging" => Kind::Logging,
                "metrics" => Kind::Metrics,
                "batch" => Kind::Batch,
                "breaker" => Kind::Breaker,
                "retry" => Kind::Retry,
                "timeout" => Kind::Timeout,
                other => panic!("unknown layer {other}"),
            }
        }
    }

    /// The six layers (all classifying with `ByError`), their handles and the script.
    struct Parts {
        script: Script,
        logging: LoggingLayer<ByError>,
        metrics: MetricsLayer<ByError>,
        stats: MetricsHandle,
        batch: BatchSizeLayer,
        breaker: CircuitBreakerLayer<ByError>,
        breaker_handle: CircuitBreakerHandle,
        retry: RetryLayer<ByError>,
        timeout: TimeoutLayer,
    }

    impl Parts {
        fn new() -> Self {
            let metrics = MetricsLayer::new().classifier(ByError);
            let breaker = CircuitBreakerLayer::builder().classifier(ByError).build();
            Parts {
                script: Script::new(),
                logging: LoggingLayer::new("Contract", "compose").classifier(ByError),
                stats: metrics.handle(),
                metrics,
                batch: BatchSizeLayer::new().max(10),
                breaker_handle: breaker.handle(),
                breaker,
                retry: RetryLayer::new(quick_retries()).classifier(ByError),
                timeout: TimeoutLayer::new(Duration::from_secs(1)),
            }
        }
    }

    /// Stacks the six layers in the order given (outermost first) around the
    /// scripted service and runs the scenarios.
    macro_rules! check_order {
        ($($layer:ident),+) => {{
            let parts = Parts::new();
            let order = [$(Kind::named(stringify!($layer))),+];
            assert_eq!(order.len(), 6);
            let svc = ServiceBuilder::new()
                $(.layer(parts.$layer.clone()))+
                .service(parts.script.service());
            run_scenarios(svc, &order, &parts).await;
        }};
    }

    fn failures_of(stats: &MetricsHandle, class: &str) -> u64 {
        stats
            .snapshot()
            .failures_by_class
            .get(class)
            .copied()
            .unwrap_or(0)
    }

    /// Runs the same scenarios on any order; what each layer sees is derived from
    /// where it sits (`outside(a, b)`: `a` wraps `b`).
    async fn run_scenarios<S>(svc: S, order: &[Kind], parts: &Parts)
    where
        S: Service<Vec<u32>, Response = usize> + Clone,
        S::Error: ClassifiedError + fmt::Debug,
    {
        use Kind::*;
        let pos = |kind: Kind| order.iter().position(|k| *k == kind).unwrap();
        let outside = |a: Kind, b: Kind| pos(a) < pos(b);
        let script = &parts.script;
        let stats = &parts.stats;
        let breaker = &parts.breaker_handle;
        let context = format!("order {order:?}");

        // 1. A plain success passes every layer once.
        assert_eq!(
            svc.clone().oneshot(vec![1, 2, 3]).await.unwrap(),
            3,
            "{context}"
        );
        assert_eq!(script.calls(), 1, "{context}");
        let s = stats.snapshot();
        assert_eq!((s.calls, s.successes, s.failures), (1, 1, 0), "{context}");

        // 2. A transient inner failure: the retry recovers it wherever it sits;
        //    metrics see the failed attempt only from inside the retry.
        script.push([Step::Err(1)]);
        assert_eq!(
            svc.clone().oneshot(vec![1, 2, 3]).await.unwrap(),
            3,
            "{context}"
        );
        assert_eq!(script.calls(), 3, "{context}");
        assert_eq!(
            failures_of(stats, "script"),
            u64::from(outside(Retry, Metrics)),
            "{context}"
        );
        assert_eq!(breaker.stats().consecutive_failures, 0, "{context}");

        // 3. A hung call: the timeout fires after 1 s (paused clock). Inside the
        //    retry, the timed-out attempt is retried and succeeds; outside, the
        //    caller gets `Elapsed`.
        script.push([Step::Hang]);
        let result = svc.clone().oneshot(vec![1, 2, 3]).await;
        let retried = outside(Retry, Timeout);
        if retried {
            assert_eq!(result.unwrap(), 3, "{context}");
            assert_eq!(script.calls(), 5, "{context}");
        } else {
            assert_eq!(
                result.unwrap_err().classification().class,
                "timeout",
                "{context}"
            );
            assert_eq!(script.calls(), 4, "{context}");
        }
        let retry_between = |a: Kind, b: Kind| outside(a, Retry) && outside(Retry, b);
        let metrics_saw_timeout = outside(Metrics, Timeout) && !retry_between(Metrics, Timeout);
        assert_eq!(
            failures_of(stats, "timeout"),
            u64::from(metrics_saw_timeout),
            "{context}"
        );
        // Metrics inside the timeout see their call dropped, not failed.
        assert_eq!(
            stats.snapshot().cancelled,
            u64::from(outside(Timeout, Metrics)),
            "{context}"
        );
        let mut breaker_streak = u32::from(outside(Breaker, Timeout) && !retried);
        assert_eq!(
            breaker.stats().consecutive_failures,
            breaker_streak,
            "{context}"
        );

        // 4. An empty batch is rejected before the inner service, never retried;
        //    the layers outside the batch check count a "batch_size" failure.
        let err = svc.clone().oneshot(vec![]).await.unwrap_err();
        assert_eq!(err.classification().class, "batch_size", "{context}");
        assert_eq!(script.calls(), if retried { 5 } else { 4 }, "{context}");
        assert_eq!(
            failures_of(stats, "batch_size"),
            u64::from(outside(Metrics, Batch)),
            "{context}"
        );
        breaker_streak += u32::from(outside(Breaker, Batch));
        assert_eq!(
            breaker.stats().consecutive_failures,
            breaker_streak,
            "{context}"
        );

        // 5. A forced-open breaker fails fast wherever it sits, never retried.
        breaker.force_open();
        let calls = script.calls();
        let err = svc.clone().oneshot(vec![1]).await.unwrap_err();
        assert_eq!(err.classification().class, "circuit_open", "{context}");
        assert_eq!(script.calls(), calls, "{context}");
        assert_eq!(
            failures_of(stats, "circuit_open"),
            u64::from(outside(Metrics, Breaker)),
            "{context}"
        );
        breaker.reset();

        // 6. And it all still works.
        assert_eq!(svc.clone().oneshot(vec![9]).await.unwrap(), 1, "{context}");
        assert_eq!(script.calls(), calls + 1, "{context}");
        assert_eq!(stats.snapshot().in_flight, 0, "{context}");
        assert_eq!(breaker.state(), CircuitState::Closed, "{context}");
        assert_eq!(
            script.violations(),
            0,
            "{context}: a layer called an unready service"
        );
        script.clear();
    }

    #[tokio::test(start_paused = true)]
    async fn recommended_order() {
        check_order!(logging, metrics, batch, breaker, retry, timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn reverse_order() {
        check_order!(timeout, retry, breaker, batch, metrics, logging);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_outermost_timeout_outside_the_breaker() {
        check_order!(retry, timeout, metrics, breaker, logging, batch);
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_outermost_metrics_innermost() {
        check_order!(breaker, batch, timeout, logging, retry, metrics);
    }

    #[tokio::test(start_paused = true)]
    async fn batch_outermost_breaker_innermost() {
        check_order!(batch, retry, logging, timeout, metrics, breaker);
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_outermost_retry_innermost() {
        check_order!(timeout, logging, breaker, metrics, batch, retry);
    }
}

// ---------------------------------------------------------------------------
// The stack on an axum Router
// ---------------------------------------------------------------------------

mod axum_router {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::error_handling::HandleErrorLayer;
    use axum::http::{Request, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use keel_layers::classify::TowerHttp;
    use std::convert::Infallible;

    /// The error the keel layers add around the router's `Infallible`.
    type KeelError = TimeoutError<CircuitBreakerError<Infallible>>;

    /// axum needs `Infallible` errors: keel's errors become responses.
    fn to_response(err: KeelError) -> Response {
        match err {
            TimeoutError::Elapsed { .. } => StatusCode::GATEWAY_TIMEOUT.into_response(),
            TimeoutError::Inner(CircuitBreakerError::Inner(never)) => match never {},
            TimeoutError::Inner(_rejected) => {
                (StatusCode::SERVICE_UNAVAILABLE, "circuit open").into_response()
            }
        }
    }

    /// `/missing` answers 404, `/unavailable` 503; both count in `handled`.
    fn routes(handled: &Arc<AtomicUsize>) -> Router {
        let (on_missing, on_unavailable) = (handled.clone(), handled.clone());
        Router::new()
            .route(
                "/missing",
                get(move || async move {
                    on_missing.fetch_add(1, Ordering::SeqCst);
                    StatusCode::NOT_FOUND
                }),
            )
            .route(
                "/unavailable",
                get(move || async move {
                    on_unavailable.fetch_add(1, Ordering::SeqCst);
                    StatusCode::SERVICE_UNAVAILABLE
                }),
            )
    }

    fn get_request(path: &str) -> Request<Body> {
        Request::get(path).body(Body::empty()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_503_counts_as_a_failure_and_a_404_does_not() {
        let metrics = MetricsLayer::new().classifier(TowerHttp::server_errors());
        let stats = metrics.handle();
        let breaker = CircuitBreakerLayer::builder()
            .consecutive_failures(2)
            .classifier(TowerHttp::server_errors())
            .build();
        let breaker_handle = breaker.handle();
        let handled = Arc::new(AtomicUsize::new(0));
        let app = routes(&handled).layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|err: KeelError| async move {
                    to_response(err)
                }))
                .logging(
                    LoggingLayer::new("Gateway", "request").classifier(TowerHttp::server_errors()),
                )
                .metrics(metrics)
                .keel_timeout(Duration::from_secs(5))
                .circuit_breaker(breaker),
        );

        // 404s are answers, not failures: they neither count as failures nor trip
        // the breaker, however many there are.
        for _ in 0..3 {
            let res = app.clone().oneshot(get_request("/missing")).await.unwrap();
            assert_eq!(res.status(), StatusCode::NOT_FOUND);
        }
        let s = stats.snapshot();
        assert_eq!((s.calls, s.successes, s.failures), (3, 3, 0));
        assert_eq!(breaker_handle.stats().consecutive_failures, 0);

        // A 503 is a failure of class "service_unavailable" for the metrics and for the breaker.
        let res = app
            .clone()
            .oneshot(get_request("/unavailable"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        let s = stats.snapshot();
        assert_eq!((s.calls, s.successes, s.failures), (4, 3, 1));
        assert_eq!(s.failures_by_class.get("service_unavailable"), Some(&1));
        assert_eq!(s.histograms.failure.count, 1);
        assert_eq!(breaker_handle.stats().consecutive_failures, 1);
        assert_eq!(breaker_handle.state(), CircuitState::Closed);

        // A second one in a row opens the breaker; the next request fails fast
        // without reaching the handler, mapped to a 503 by `to_response`.
        app.clone()
            .oneshot(get_request("/unavailable"))
            .await
            .unwrap();
        assert_eq!(breaker_handle.state(), CircuitState::Open);
        assert_eq!(handled.load(Ordering::SeqCst), 5);
        let res = app.clone().oneshot(get_request("/missing")).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(handled.load(Ordering::SeqCst), 5);
        let s = stats.snapshot();
        assert_eq!((s.calls, s.failures, s.in_flight), (6, 3, 0));
    }

    /// All six layers around a router used as a service. Retry needs a `Clone`
    /// request and the batch check a `BatchLen` one, which `http::Request` is not, so
    /// the stack takes the caller's request type and builds the HTTP request inside.
    #[tokio::test(start_paused = true)]
    async fn all_six_around_a_router() {
        #[derive(Clone, Debug)]
        struct Lookup {
            path: &'static str,
            ids: Vec<u32>,
        }

        impl keel_layers::batch::BatchLen for Lookup {
            fn batch_len(&self) -> usize {
                self.ids.len()
            }
        }

        let handled = Arc::new(AtomicUsize::new(0));
        let router = routes(&handled);

        let metrics = MetricsLayer::new().classifier(TowerHttp::server_errors());
        let stats = metrics.handle();
        let breaker = CircuitBreakerLayer::builder()
            .classifier(TowerHttp::server_errors())
            .build();
        let breaker_handle = breaker.handle();
        let svc = ServiceBuilder::new()
            .logging(LoggingLayer::new("Gateway", "lookup").classifier(TowerHttp::server_errors()))
            .metrics(metrics)
            .batch_size(100)
            .circuit_breaker(breaker)
            .keel_retry_with(
                RetryLayer::new(quick_retries()).classifier(TowerHttp::server_errors()),
            )
            .keel_timeout(Duration::from_secs(5))
            .map_request(|lookup: Lookup| get_request(lookup.path))
            .service(router);

        let res = svc
            .clone()
            .oneshot(Lookup {
                path: "/missing",
                ids: vec![1],
            })
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        assert_eq!(handled.load(Ordering::SeqCst), 1, "a 404 is not retried");

        let res = svc
            .clone()
            .oneshot(Lookup {
                path: "/unavailable",
                ids: vec![1],
            })
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            handled.load(Ordering::SeqCst),
            4,
            "a 503 is retried: 3 attempts"
        );

        let err = svc
            .clone()
            .oneshot(Lookup {
                path: "/missing",
                ids: vec![],
            })
            .await
            .unwrap_err();
        assert!(err.rejection().is_some());
        assert_eq!(handled.load(Ordering::SeqCst), 4);

        let s = stats.snapshot();
        assert_eq!((s.calls, s.successes, s.failures), (3, 1, 2));
        assert_eq!(s.failures_by_class.get("service_unavailable"), Some(&1));
        // The breaker (outside the retry) saw one failed call, the 503.
        assert_eq!(breaker_handle.stats().consecutive_failures, 1);
    }
}
