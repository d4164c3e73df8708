//! The consumer's lifecycle (graceful shutdown, abort), shared by its
//! [`KafkaConsumer`](super::KafkaConsumer) handle and by the
//! [`KafkaClient`](crate::kafka::client::KafkaClient) it is registered with, whose
//! health check counts it and whose `disconnect` closes it.

use super::error::ConsumerError;
use super::poison_guard::PoisonGuardState;
use super::poll::{Command, Shared};
use super::state::{ConsumerState, StateCell, StuckPartitions};
use crate::kafka::client::{
    CloseFuture, ConnectionState, ConnectionTracker, ConsumerHealth, ManagedConsumer,
};
use crate::kafka::dead_letter::DeadLetterPublisher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Stops a running consumer, once, from whichever side asks first.
#[derive(Debug)]
pub(crate) struct ConsumerControl {
    pub(crate) shared: Arc<Shared>,
    /// Requests to the poll thread; taken (closed) on abort, which stops the thread.
    pub(crate) commands: Mutex<Option<mpsc::UnboundedSender<Command>>>,
    pub(crate) lane_tasks: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) lane_stop: watch::Sender<bool>,
    pub(crate) dlq: Mutex<Option<DeadLetterPublisher>>,
    pub(crate) group_id: String,
    pub(crate) topics: Vec<String>,
    /// Fed by the consumer's librdkafka events (errors, statistics, assignments).
    pub(crate) connection: Arc<ConnectionTracker>,
    /// Starting, running, failed (with the cause) or stopped.
    pub(crate) state: Arc<StateCell>,
    /// Messages whose dead-letter publish keeps failing.
    pub(crate) stuck: Arc<StuckPartitions>,
    /// Set when a graceful shutdown starts: from then on dropping the handle aborts
    /// nothing.
    pub(crate) finished: AtomicBool,
    /// The outcome of the shutdown that ran (`Some(timed_out)`), so a second
    /// caller waits for the first and gets its answer.
    pub(crate) closed: tokio::sync::Mutex<Option<bool>>,
    /// The poison-rate guard, when one is configured.
    pub(crate) poison_guard: Option<Arc<PoisonGuardState>>,
}

impl ConsumerControl {
    /// Sends `command` to the poll thread; `Err` when it is gone.
    pub(crate) fn send(&self, command: Command) -> Result<(), ConsumerError> {
        match lock(&self.commands).as_ref() {
            Some(commands) => commands
                .send(command)
                .map_err(|_| ConsumerError::NotRunning),
            None => Err(ConsumerError::NotRunning),
        }
    }

    /// Graceful shutdown bounded by `timeout`; see
    /// [`KafkaConsumer::shutdown`](super::KafkaConsumer::shutdown). Runs once;
    /// later calls wait for it and report its outcome.
    pub(crate) async fn shutdown(&self, timeout: Duration) -> Result<(), ConsumerError> {
        let mut closed = self.closed.lock().await;
        if let Some(timed_out) = *closed {
            return self.outcome(timed_out, timeout);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        self.finished.store(true, Ordering::SeqCst);
        let _ = self.send(Command::Stop);
        let _ = self.lane_stop.send(true);
        let mut timed_out = false;
        let tasks = std::mem::take(&mut *lock(&self.lane_tasks));
        for mut task in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                timed_out = true;
            }
        }
        let (done_tx, done_rx) = oneshot::channel();
        let _ = self.send(Command::Finish(done_tx));
        if tokio::time::timeout_at(deadline, done_rx).await.is_err() {
            timed_out = true;
        }
        let dlq = lock(&self.dlq).take();
        if let Some(dlq) = dlq {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let flushed = tokio::task::spawn_blocking(move || dlq.flush(remaining)).await;
            if !matches!(flushed, Ok(Ok(()))) {
                timed_out = true;
            }
        }
        self.shared.running.store(false, Ordering::SeqCst);
        self.state.stopped();
        *closed = Some(timed_out);
        tracing::info!(group_id = %self.group_id, timed_out, "kafka consumer stopped");
        self.outcome(timed_out, timeout)
    }

    /// The answer of a shutdown: a failure first (it is why the consumer stopped),
    /// then a timeout.
    fn outcome(&self, timed_out: bool, timeout: Duration) -> Result<(), ConsumerError> {
        if let ConsumerState::Failed { reason } = self.state.get() {
            return Err(ConsumerError::Failed { reason });
        }
        if timed_out {
            Err(ConsumerError::ShutdownTimedOut(timeout))
        } else {
            Ok(())
        }
    }

    /// The consumer failed: stop the poll thread without committing more (what
    /// lanes finished before is committed on close in auto-commit mode; the rest is
    /// delivered again) and let the lanes stop after their current message. A later
    /// `shutdown` collects the lanes and returns the failure.
    pub(crate) fn stop_after_failure(&self) {
        self.shared.running.store(false, Ordering::SeqCst);
        drop(lock(&self.commands).take());
        let _ = self.lane_stop.send(true);
    }

    /// Whether the consumer runs: started, not stopped, not failed.
    pub(crate) fn is_running(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst) && !self.state.get().is_failed()
    }

    /// Stops everything at once without committing more (the handle was dropped
    /// without shutdown). Does nothing once a graceful shutdown has started.
    pub(crate) fn abort(&self) {
        if self.finished.swap(true, Ordering::SeqCst) {
            return;
        }
        // The poll thread sees the closed command channel and stops without
        // committing; lanes stop at once.
        self.shared.aborted.store(true, Ordering::SeqCst);
        drop(lock(&self.commands).take());
        let _ = self.lane_stop.send(true);
        for task in lock(&self.lane_tasks).iter() {
            task.abort();
        }
        self.state.stopped();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a [`KafkaClient`](crate::kafka::client::KafkaClient) holds of a registered
/// consumer.
#[derive(Debug)]
pub(crate) struct RegisteredConsumer(pub(crate) Arc<ConsumerControl>);

impl ManagedConsumer for RegisteredConsumer {
    fn name(&self) -> String {
        format!("group {} on {}", self.0.group_id, self.0.topics.join(","))
    }

    fn is_connected(&self) -> bool {
        self.0.is_running() && self.0.connection.state() == ConnectionState::Connected
    }

    fn health(&self) -> ConsumerHealth {
        let state = self.0.state.get();
        ConsumerHealth {
            name: self.name(),
            connected: self.is_connected(),
            state: match &state {
                ConsumerState::Starting => "starting",
                ConsumerState::Running => "running",
                ConsumerState::Failed { .. } => "failed",
                ConsumerState::Stopped => "stopped",
            }
            .to_string(),
            failure: match state {
                ConsumerState::Failed { reason } => Some(reason),
                _ => None,
            },
            stuck_partitions: self
                .0
                .stuck
                .snapshot()
                .into_iter()
                .map(|s| {
                    format!(
                        "{} at offset {}: dead-letter publish failing for {} s ({} attempts): {}",
                        s.partition,
                        s.offset,
                        s.stuck_for.as_secs(),
                        s.failures,
                        s.last_error
                    )
                })
                .collect(),
            poison_guard: self.0.poison_guard.as_ref().and_then(|g| g.reason()),
        }
    }

    fn close(&self, timeout: Duration) -> CloseFuture {
        let control = self.0.clone();
        Box::pin(async move { control.shutdown(timeout).await.map_err(|e| e.to_string()) })
    }
}
