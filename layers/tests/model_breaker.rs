//! Model-based test of the circuit breaker.
//!
//! Random configurations (consecutive-failure threshold, an optional count window
//! with a failure rate and minimum calls, open wait with optional backoff, probe
//! count, optional maximum half-open wait) and random histories — calls that succeed, fail or are ignored, calls
//! left in flight and finished or dropped later, time passing on tokio's paused
//! clock, forced states — run against a real [`CircuitBreaker`] and against a
//! plain reference model of the documented rules (see the module docs of
//! `keel_layers::circuit_breaker`). After every step the breaker's answer (passed,
//! `Open` with the exact remaining wait, `ForcedOpen`, `HalfOpenFull`), whether
//! the inner service was called, its state, the watch channel and its counters
//! must match the model.
//!
//! Not covered here: the time window and the slow-call rule (their unit tests are
//! in `src/circuit_breaker/tests.rs`), and concurrency (histories are sequential;
//! in-flight calls are interleaved, not racing threads).

use std::collections::VecDeque;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_layers::circuit_breaker::{
    CircuitBreakerError, CircuitBreakerLayer, CircuitState, ResponseFuture,
};
use keel_layers::classify::{Classification, Classify, classify_fn};
use proptest::prelude::*;
use tower::{Layer, Service};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Res {
    Ok,
    Fail,
    Ignore,
}

#[derive(Clone, Debug)]
struct Conf {
    consecutive: u32,
    /// (length, failure rate, minimum calls)
    window: Option<(u32, f64, Option<u32>)>,
    open_wait_s: u64,
    /// Backoff with multiplier 2 up to this many seconds.
    backoff_max_s: Option<u64>,
    probes: u32,
    /// The maximum half-open wait, if any.
    max_half_open_s: Option<u64>,
}

fn conf() -> impl Strategy<Value = Conf> {
    (
        0u32..5,
        proptest::option::weighted(
            0.6,
            (
                1u32..8,
                prop_oneof![Just(0.25), Just(0.5), Just(1.0)],
                proptest::option::of(1u32..10),
            ),
        ),
        1u64..10,
        proptest::option::of(1u64..40),
        1u32..4,
        proptest::option::of(1u64..20),
    )
        .prop_map(
            |(consecutive, window, open_wait_s, backoff_max_s, probes, max_half_open_s)| Conf {
                consecutive,
                window,
                open_wait_s,
                backoff_max_s,
                probes,
                max_half_open_s,
            },
        )
}

#[derive(Clone, Debug)]
enum Op {
    /// Call and finish at once.
    Call(Res),
    /// Call and keep the response future for later.
    Start(Res),
    /// Finish the `n`-th kept future (modulo their number).
    Finish(usize),
    /// Drop the `n`-th kept future unfinished.
    Drop(usize),
    Advance(Duration),
    ForceOpen,
    ForceClosed,
    MetricsOnly,
    Reset,
}

fn res() -> impl Strategy<Value = Res> {
    prop_oneof![3 => Just(Res::Ok), 3 => Just(Res::Fail), 1 => Just(Res::Ignore)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => res().prop_map(Op::Call),
        3 => res().prop_map(Op::Start),
        3 => any::<usize>().prop_map(Op::Finish),
        1 => any::<usize>().prop_map(Op::Drop),
        4 => (0u64..15_000).prop_map(|ms| Op::Advance(Duration::from_millis(ms))),
        1 => prop_oneof![
            Just(Op::ForceOpen),
            Just(Op::ForceClosed),
            Just(Op::MetricsOnly),
            Just(Op::Reset)
        ],
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Permit {
    Counted(u64),
    Probe(u64),
    Untracked,
}

/// What the model expects a call to get.
#[derive(Debug, PartialEq)]
enum Admit {
    Pass(Permit),
    Open(Duration),
    ForcedOpen,
    HalfOpenFull(u32),
}

/// The reference model, written from the documented rules.
#[derive(Debug)]
struct Model {
    conf: Conf,
    now: Duration,
    state: CircuitState,
    /// Bumped by every transition; outcomes of calls admitted earlier are not counted.
    generation: u64,
    streak: u32,
    /// The window's outcomes (true = failed), newest last, at most `len`.
    window: VecDeque<bool>,
    /// Outcomes recorded in the window since it was last cleared.
    recorded: u64,
    open_until: Duration,
    /// When a half-open breaker reopens by itself (`None`: never).
    half_open_until: Option<Duration>,
    reopens: u32,
    probes_admitted: u32,
    probes_succeeded: u32,
}

impl Model {
    fn new(conf: Conf) -> Self {
        Model {
            conf,
            now: Duration::ZERO,
            state: CircuitState::Closed,
            generation: 0,
            streak: 0,
            window: VecDeque::new(),
            recorded: 0,
            open_until: Duration::ZERO,
            half_open_until: None,
            reopens: 0,
            probes_admitted: 0,
            probes_succeeded: 0,
        }
    }

    fn minimum_calls(&self) -> u64 {
        let (len, _, min) = self.conf.window.expect("window");
        u64::from(min.unwrap_or(len).min(len).max(1))
    }

    fn open_wait(&self) -> Duration {
        let base = self.conf.open_wait_s;
        match self.conf.backoff_max_s {
            None => Duration::from_secs(base),
            Some(max) => {
                let grown = base.saturating_mul(1u64.checked_shl(self.reopens).unwrap_or(u64::MAX));
                Duration::from_secs(grown.min(max))
            }
        }
    }

    fn transition(&mut self, to: CircuitState) {
        let from = self.state;
        match to {
            CircuitState::Open => {
                self.reopens = if from == CircuitState::HalfOpen {
                    self.reopens + 1
                } else {
                    0
                };
                self.open_until = self.now + self.open_wait();
            }
            CircuitState::HalfOpen => {
                self.half_open_until = self
                    .conf
                    .max_half_open_s
                    .map(|s| self.now + Duration::from_secs(s));
            }
            CircuitState::Closed | CircuitState::MetricsOnly => {
                if to == CircuitState::Closed {
                    self.reopens = 0;
                }
                self.window.clear();
                self.recorded = 0;
            }
            _ => {}
        }
        if !(from == CircuitState::Closed && to == CircuitState::Open) {
            self.streak = 0;
        }
        self.probes_admitted = 0;
        self.probes_succeeded = 0;
        self.generation += 1;
        self.state = to;
    }

    fn admit(&mut self) -> Admit {
        loop {
            return match self.state {
                CircuitState::Closed | CircuitState::MetricsOnly => {
                    Admit::Pass(Permit::Counted(self.generation))
                }
                CircuitState::ForcedClosed => Admit::Pass(Permit::Untracked),
                CircuitState::ForcedOpen => Admit::ForcedOpen,
                CircuitState::Open if self.now < self.open_until => {
                    Admit::Open(self.open_until - self.now)
                }
                CircuitState::Open => {
                    self.transition(CircuitState::HalfOpen);
                    continue;
                }
                CircuitState::HalfOpen
                    if self.half_open_until.is_some_and(|until| self.now >= until) =>
                {
                    // Reopened by the half-open limit: the wait counts from the limit.
                    let until = self.half_open_until.expect("limit");
                    self.transition(CircuitState::Open);
                    self.open_until = until + self.open_wait();
                    continue;
                }
                CircuitState::HalfOpen if self.probes_admitted >= self.conf.probes => {
                    Admit::HalfOpenFull(self.conf.probes)
                }
                CircuitState::HalfOpen => {
                    self.probes_admitted += 1;
                    Admit::Pass(Permit::Probe(self.generation))
                }
            };
        }
    }

    fn counting(&self) -> bool {
        matches!(self.state, CircuitState::Closed | CircuitState::MetricsOnly)
    }

    /// Settles a permit; `None` is a dropped future.
    fn record(&mut self, permit: Permit, outcome: Option<Res>) {
        match permit {
            Permit::Untracked => {}
            Permit::Counted(generation) => {
                let Some(outcome) = outcome.filter(|o| *o != Res::Ignore) else {
                    return;
                };
                if generation != self.generation || !self.counting() {
                    return;
                }
                let failed = outcome == Res::Fail;
                let mut trip = false;
                if self.conf.consecutive > 0 {
                    if failed {
                        self.streak += 1;
                        trip = self.streak >= self.conf.consecutive;
                    } else {
                        self.streak = 0;
                    }
                }
                if let Some((len, rate, _)) = self.conf.window {
                    self.window.push_back(failed);
                    if self.window.len() > len as usize {
                        self.window.pop_front();
                    }
                    self.recorded += 1;
                    if failed || self.recorded == self.minimum_calls() {
                        let calls = self.window.len() as u64;
                        let failures = self.window.iter().filter(|f| **f).count() as u64;
                        if calls >= self.minimum_calls()
                            && failures > 0
                            && failures as f64 / calls as f64 >= rate
                        {
                            trip = true;
                        }
                    }
                }
                if trip && self.state == CircuitState::Closed {
                    self.transition(CircuitState::Open);
                }
            }
            Permit::Probe(generation) => {
                if generation != self.generation || self.state != CircuitState::HalfOpen {
                    return;
                }
                match outcome {
                    None | Some(Res::Ignore) => self.probes_admitted -= 1,
                    Some(Res::Fail) => self.transition(CircuitState::Open),
                    Some(Res::Ok) => {
                        self.probes_succeeded += 1;
                        if self.probes_succeeded >= self.conf.probes {
                            self.transition(CircuitState::Closed);
                        }
                    }
                }
            }
        }
    }
}

/// The inner service: answers as told, counting its calls.
#[derive(Clone)]
struct Inner(Arc<AtomicUsize>);

impl Service<Res> for Inner {
    type Response = ();
    type Error = Res;
    type Future = Ready<Result<(), Res>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Res>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Res) -> Self::Future {
        self.0.fetch_add(1, Ordering::SeqCst);
        ready(if req == Res::Ok { Ok(()) } else { Err(req) })
    }
}

fn classifier() -> impl Classify<(), Res> + Clone {
    classify_fn(|r: Result<&(), &Res>| match r {
        Ok(()) => Classification::SUCCESS,
        Err(Res::Ignore) => Classification::IGNORED,
        Err(_) => Classification::failure("model"),
    })
}

fn expect_answer(
    expected: &Admit,
    got: Result<(), CircuitBreakerError<Res>>,
    res: Res,
    step: usize,
) {
    match (expected, got) {
        (Admit::Pass(_), Ok(())) if res == Res::Ok => {}
        (Admit::Pass(_), Err(CircuitBreakerError::Inner(e))) if e == res => {}
        (Admit::Open(wait), Err(CircuitBreakerError::Open { remaining_wait })) => {
            assert_eq!(*wait, remaining_wait, "step {step}: remaining wait")
        }
        (Admit::ForcedOpen, Err(CircuitBreakerError::ForcedOpen)) => {}
        (Admit::HalfOpenFull(n), Err(CircuitBreakerError::HalfOpenFull { permitted_probes }))
            if *n == permitted_probes => {}
        (expected, got) => panic!("step {step}: expected {expected:?}, got {got:?}"),
    }
}

fn run(conf: Conf, ops: Vec<Op>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut builder = CircuitBreakerLayer::builder()
            .consecutive_failures(conf.consecutive)
            .open_wait(Duration::from_secs(conf.open_wait_s))
            .half_open_probes(conf.probes);
        if let Some((len, rate, min)) = conf.window {
            builder = builder.count_window(len).failure_rate(rate);
            if let Some(min) = min {
                builder = builder.minimum_calls(min);
            }
        }
        if let Some(s) = conf.max_half_open_s {
            builder = builder.max_half_open_wait(Duration::from_secs(s));
        }
        if let Some(max) = conf.backoff_max_s {
            builder = builder.open_backoff(2.0, Duration::from_secs(max));
        }
        let layer = builder.classifier(classifier()).build();
        let handle = layer.handle();
        let watch = handle.subscribe();
        let calls = Arc::new(AtomicUsize::new(0));
        let mut svc = layer.layer(Inner(calls.clone()));
        let mut model = Model::new(conf.clone());
        type Kept<C> = (ResponseFuture<Ready<Result<(), Res>>, C>, Permit, Res);
        let mut kept: Vec<Kept<_>> = Vec::new();
        let mut expected_calls = 0;

        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Call(res) | Op::Start(res) => {
                    let expected = model.admit();
                    let fut = svc.call(res);
                    if matches!(expected, Admit::Pass(_)) {
                        expected_calls += 1;
                    }
                    match (expected, op) {
                        (Admit::Pass(permit), Op::Start(_)) => kept.push((fut, permit, res)),
                        (Admit::Pass(permit), _) => {
                            let got = fut.await;
                            expect_answer(&Admit::Pass(permit), got, res, step);
                            model.record(permit, Some(res));
                        }
                        (rejected, _) => expect_answer(&rejected, fut.await, res, step),
                    }
                }
                Op::Finish(n) if !kept.is_empty() => {
                    let (fut, permit, res) = kept.remove(n % kept.len());
                    expect_answer(&Admit::Pass(permit), fut.await, res, step);
                    model.record(permit, Some(res));
                }
                Op::Drop(n) if !kept.is_empty() => {
                    let (fut, permit, _) = kept.remove(n % kept.len());
                    drop(fut);
                    model.record(permit, None);
                }
                Op::Finish(_) | Op::Drop(_) => {}
                Op::Advance(d) => {
                    tokio::time::advance(d).await;
                    model.now += d;
                }
                Op::ForceOpen => {
                    handle.force_open();
                    model.transition(CircuitState::ForcedOpen);
                }
                Op::ForceClosed => {
                    handle.force_closed();
                    model.transition(CircuitState::ForcedClosed);
                }
                Op::MetricsOnly => {
                    handle.metrics_only();
                    model.transition(CircuitState::MetricsOnly);
                }
                Op::Reset => {
                    handle.reset();
                    model.transition(CircuitState::Closed);
                }
            }
            assert_eq!(
                handle.state(),
                model.state,
                "step {step}: state ({model:?})"
            );
            assert_eq!(*watch.borrow(), model.state, "step {step}: watched state");
            assert_eq!(
                calls.load(Ordering::SeqCst),
                expected_calls,
                "step {step}: inner calls"
            );
            let stats = handle.stats();
            let streak = match model.state {
                CircuitState::Closed | CircuitState::MetricsOnly | CircuitState::Open => {
                    model.streak
                }
                _ => 0,
            };
            assert_eq!(stats.consecutive_failures, streak, "step {step}: streak");
            if model.conf.window.is_some() {
                let failures = model.window.iter().filter(|f| **f).count() as u32;
                assert_eq!(
                    stats.window_calls,
                    model.window.len() as u32,
                    "step {step}: window calls"
                );
                assert_eq!(
                    stats.window_failures, failures,
                    "step {step}: window failures"
                );
            }
        }
    });
}

proptest! {
    // 1000 configurations × up to 80 steps: a few seconds in a debug build.
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn breaker_matches_its_model(conf in conf(), ops in proptest::collection::vec(op(), 1..80)) {
        run(conf, ops);
    }
}
