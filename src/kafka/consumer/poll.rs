//! The poll thread: the only code that fetches from librdkafka.
//!
//! One dedicated OS thread owns a `BaseConsumer` and calls `poll` with a short
//! timeout in a loop. It never waits on a waker that librdkafka must fire (the cause
//! of `StreamConsumer`'s lost wakeups, rust-rdkafka #638/#665/#848); rebalance
//! callbacks run on it, between polls, with direct access to the offset tracker.
//! Fetched messages are copied out and routed to the bounded lane queues in
//! batches: one poll cycle gathers what librdkafka already holds (up to
//! [`MAX_BATCH`] messages, without waiting) and hands each lane its share at once,
//! so a lane is woken once per batch rather than once per message. A full lane
//! holds the thread up to `backpressure_after` (serving commands meanwhile); if it
//! stays full, the thread holds that lane's unsent batches and pauses fetching of
//! the partitions that feed it (librdkafka `pause`; [`super::backpressure`]), while
//! the other partitions go on; it keeps polling, so rebalances and
//! `max.poll.interval.ms` are served however slow the handler; once the lane is
//! half empty it seeks those partitions back to the next undispatched offset and
//! resumes them. Completions come back on a
//! channel, a batch at a time, and become commits: stored offsets (auto-commit
//! mode) or explicit commits (manual mode), always only up to the lowest unfinished
//! offset of each partition.

use super::backpressure::Backpressure;
use super::error::ConsumerError;
use super::event::{CopiedSpans, CopyBuffer, ReceivedMessage};
use super::metrics::ConsumerMetrics;
use super::ownership::Ownership;
use super::scheduler::{ProcessingOrder, lane_for};
use super::tracker::{Dispatch, OffsetTracker, TopicPartition};
use super::watermarks::Watermarks;
use crate::kafka::client::ConnectionTracker;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A message on its way to a lane.
#[derive(Debug)]
pub(crate) struct Work {
    pub(crate) tp: TopicPartition,
    pub(crate) epoch: u64,
    pub(crate) message: ReceivedMessage,
}

/// Messages for one lane from one poll cycle, in fetch order: the lane is woken
/// once per batch, not once per message. At most [`PollLoop::batch_max`] long.
pub(crate) type Batch = Vec<Work>;

/// Most messages one poll cycle gathers (over all lanes) before handing them out.
pub(crate) const MAX_BATCH: usize = 64;

/// The batch length and number of queue slots of a lane of `lane_capacity`
/// messages: batches of up to `min(lane_capacity, MAX_BATCH)` messages, and as many
/// slots as whole batches fit in `lane_capacity` (at least one), so a lane never
/// queues more than `lane_capacity` messages (rounded up to one batch).
pub(crate) fn lane_shape(lane_capacity: usize) -> (usize, usize) {
    let batch_max = lane_capacity.clamp(1, MAX_BATCH);
    (batch_max, (lane_capacity / batch_max).max(1))
}

/// Most bytes reserved up front for copying one batch (a batch of large messages
/// grows its buffer as needed).
const MAX_COPY_CAPACITY: usize = 1 << 20;

/// A lane finished (handled or dead-lettered or gave up on) a message.
#[derive(Debug)]
pub(crate) struct Completion {
    pub(crate) tp: TopicPartition,
    pub(crate) epoch: u64,
    pub(crate) offset: i64,
}

type Ack = oneshot::Sender<Result<(), ConsumerError>>;

/// How often auto-commit mode hands finished offsets to librdkafka.
const STORE_INTERVAL: Duration = Duration::from_millis(10);

/// Longest a revocation waits for lanes to report what they finished.
const REPORT_GRACE: Duration = Duration::from_millis(500);

/// How often a failed seek before resume is retried.
const RESEEK_INTERVAL: Duration = Duration::from_millis(100);

/// Requests from the runtime handle to the poll thread.
#[derive(Debug)]
pub(crate) enum Command {
    Pause(Option<TopicPartition>, Ack),
    Resume(Option<TopicPartition>, Ack),
    /// Stop fetching; keep committing completions until `Finish`.
    Stop,
    /// Final commit, close the consumer, then answer.
    Finish(oneshot::Sender<()>),
}

/// State shared by the handle, the poll thread and the rebalance callbacks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) tracker: Mutex<OffsetTracker>,
    pub(crate) completions: Mutex<mpsc::UnboundedReceiver<Vec<Completion>>>,
    pub(crate) metrics: Arc<ConsumerMetrics>,
    pub(crate) running: AtomicBool,
    pub(crate) paused_all: AtomicBool,
    pub(crate) paused: Mutex<HashSet<TopicPartition>>,
    pub(crate) aborted: AtomicBool,
    /// Partitions whose fetching is paused because a lane they feed is full.
    pub(crate) backpressured: Mutex<HashSet<TopicPartition>>,
    pub(crate) manual_commit: bool,
    /// The assignments still owned (the revocation barrier).
    pub(crate) ownership: Arc<Ownership>,
    /// How long a revocation waits for handlers of the revoked partitions.
    pub(crate) revoke_timeout: Duration,
    /// Lowest offset fetched but not dispatched, per partition, during
    /// backpressure (where to seek on resume). Shared with the rebalance callback,
    /// which discards the positions of revoked partitions.
    pub(crate) rewind: Mutex<HashMap<TopicPartition, i64>>,
    /// Partitions whose seek before resume failed: they stay paused, and the seek
    /// to this position is retried before they resume.
    pub(crate) reseek: Mutex<HashMap<TopicPartition, i64>>,
    /// High watermarks from librdkafka's statistics, for the lag.
    pub(crate) watermarks: Watermarks,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    pub(crate) fn new(
        completions: mpsc::UnboundedReceiver<Vec<Completion>>,
        metrics: Arc<ConsumerMetrics>,
        manual_commit: bool,
        ownership: Arc<Ownership>,
        revoke_timeout: Duration,
    ) -> Self {
        Shared {
            tracker: Mutex::new(OffsetTracker::new()),
            completions: Mutex::new(completions),
            metrics,
            running: AtomicBool::new(true),
            paused_all: AtomicBool::new(false),
            paused: Mutex::new(HashSet::new()),
            aborted: AtomicBool::new(false),
            backpressured: Mutex::new(HashSet::new()),
            manual_commit,
            ownership,
            revoke_timeout,
            rewind: Mutex::new(HashMap::new()),
            reseek: Mutex::new(HashMap::new()),
            watermarks: Watermarks::default(),
        }
    }

    pub(crate) fn rewind(&self) -> MutexGuard<'_, HashMap<TopicPartition, i64>> {
        lock(&self.rewind)
    }

    pub(crate) fn reseek(&self) -> MutexGuard<'_, HashMap<TopicPartition, i64>> {
        lock(&self.reseek)
    }

    /// The revocation barrier for `revoked` (see [`super::ownership`]): their
    /// queued messages are dropped from now on, handlers still running for them
    /// get up to `revoke_timeout` to finish (then are abandoned), and the tracker,
    /// the backpressure rewind and the pending re-seeks forget them. Returns the
    /// finished positions not committed yet, for the caller to commit before the
    /// partitions go.
    pub(crate) fn revoke(&self, revoked: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        let epochs: Vec<u64> = {
            let tracker = self.tracker();
            revoked.iter().filter_map(|tp| tracker.epoch(tp)).collect()
        };
        self.ownership.withdraw(&epochs);
        // Handle dropped without a shutdown: nobody waits for the handlers.
        let wait = if self.aborted.load(Ordering::SeqCst) {
            Duration::ZERO
        } else {
            self.revoke_timeout
        };
        let started = Instant::now();
        let abandoned = self.ownership.wait_idle(&epochs, wait);
        // Completions other lanes finished but have not reported yet come at their
        // next message; a short wait for them saves redoing them (not needed for
        // correctness, so bounded by `REPORT_GRACE`).
        if !self
            .ownership
            .wait_reported(REPORT_GRACE.min(wait.saturating_sub(started.elapsed())))
        {
            tracing::debug!("a lane did not report its finished offsets before the revoke");
        }
        if abandoned > 0 {
            self.metrics.record_revoke_abandoned(abandoned);
            tracing::warn!(
                abandoned,
                timeout = ?self.revoke_timeout,
                "handlers of revoked partitions still running at the revoke timeout: abandoned (not committed; the new owner handles those messages again)"
            );
        }
        {
            let mut rewind = self.rewind();
            let mut reseek = self.reseek();
            let mut backpressured = lock(&self.backpressured);
            for tp in revoked {
                rewind.remove(tp);
                reseek.remove(tp);
                // A partition assigned again starts unpaused: the old assignment's
                // full lane no longer counts for it.
                backpressured.remove(tp);
            }
        }
        let mut tracker = self.tracker();
        self.drain_completions(&mut tracker);
        // The whole finished position, even if it was handed out before: in
        // auto-commit mode that only *stored* it (librdkafka commits it later, not
        // necessarily before the partition goes), and an async commit may still
        // be under way. A synchronous commit of it is what makes the barrier.
        revoked
            .iter()
            .filter_map(|tp| {
                let position = tracker.commit_position(tp);
                tracker.revoke(tp);
                position.map(|pos| (tp.clone(), pos))
            })
            .collect()
    }

    pub(crate) fn tracker(&self) -> MutexGuard<'_, OffsetTracker> {
        lock(&self.tracker)
    }

    /// The tracker with every completion reported so far applied.
    pub(crate) fn current_tracker(&self) -> MutexGuard<'_, OffsetTracker> {
        let mut tracker = self.tracker();
        self.drain_completions(&mut tracker);
        tracker
    }

    pub(crate) fn paused(&self) -> MutexGuard<'_, HashSet<TopicPartition>> {
        lock(&self.paused)
    }

    /// Applies every reported completion to the tracker (caller holds the tracker).
    fn drain_completions(&self, tracker: &mut OffsetTracker) {
        let mut rx = lock(&self.completions);
        while let Ok(batch) = rx.try_recv() {
            for c in batch {
                tracker.complete(&c.tp, c.epoch, c.offset);
            }
        }
    }
}

fn tpl_of(positions: &[(TopicPartition, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(positions.len());
    for (tp, offset) in positions {
        // Adding a partition to a fresh list cannot fail for a valid offset.
        let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset));
    }
    tpl
}

/// The consumer context: rebalance hooks that commit before partitions go away,
/// and the connection state fed by librdkafka's events.
#[derive(Debug)]
pub(crate) struct KeelConsumerContext {
    pub(crate) shared: Arc<Shared>,
    pub(crate) connection: Arc<ConnectionTracker>,
}

impl ClientContext for KeelConsumerContext {
    fn stats_raw(&self, statistics: &[u8]) {
        self.connection.on_stats_raw(statistics);
        self.shared.watermarks.on_stats(statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.connection.on_error(&error, reason);
    }
}

impl ConsumerContext for KeelConsumerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let revoked: Vec<TopicPartition> = revoked
            .elements()
            .iter()
            .map(|e| TopicPartition::new(e.topic(), e.partition()))
            .collect();
        // Barrier first: nothing of these partitions is handled after this returns.
        let commits = self.shared.revoke(&revoked);
        if commits.is_empty() || self.shared.aborted.load(Ordering::SeqCst) {
            return;
        }
        // Unfinished messages of revoked partitions are not committed: their new
        // owner handles them again (at-least-once).
        let tpl = tpl_of(&commits);
        // In auto-commit mode librdkafka commits the *stored* offsets itself when
        // the partitions go, after this callback: store the same positions, or it
        // could commit an older stored one over ours (the new owner would redo).
        if !self.shared.manual_commit
            && let Err(e) = consumer.store_offsets(&tpl)
        {
            tracing::warn!(error = %e, "storing offsets on revoke failed");
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                tracing::info!(partitions = ?commits, "committed offsets of revoked partitions")
            }
            Err(e) => tracing::warn!(error = %e, partitions = ?commits, "commit on revoke failed"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assigned) => {
                // The group coordinator answered: connected.
                self.connection.confirm_connected();
                let paused_all = self.shared.paused_all.load(Ordering::SeqCst);
                let paused = self.shared.paused();
                let backpressured = lock(&self.shared.backpressured);
                let mut to_pause = TopicPartitionList::new();
                let mut to_resume = TopicPartitionList::new();
                {
                    let mut tracker = self.shared.tracker();
                    for e in assigned.elements() {
                        let tp = TopicPartition::new(e.topic(), e.partition());
                        if paused_all || paused.contains(&tp) || backpressured.contains(&tp) {
                            to_pause.add_partition(e.topic(), e.partition());
                        } else {
                            to_resume.add_partition(e.topic(), e.partition());
                        }
                        let epoch = tracker.assign(tp);
                        self.shared.ownership.grant(epoch);
                    }
                }
                tracing::info!(partitions = assigned.count(), "partitions assigned");
                // librdkafka may keep the pause of a partition paused under its
                // previous assignment (a full lane then); the revoke forgot that
                // pause, so nothing would resume it: start it unpaused.
                if to_resume.count() > 0
                    && let Err(e) = consumer.resume(&to_resume)
                {
                    tracing::warn!(error = %e, "could not resume newly assigned partitions");
                }
                if to_pause.count() > 0
                    && let Err(e) = consumer.pause(&to_pause)
                {
                    tracing::warn!(error = %e, "could not keep newly assigned partitions paused");
                }
            }
            Rebalance::Revoke(revoked) => {
                tracing::info!(partitions = revoked.count(), "partitions revoked");
            }
            Rebalance::Error(e) => {
                // librdkafka gave up (part of) the assignment without a revoke
                // callback: forget whatever is no longer assigned, so the tracker
                // does not keep committing for it (the group generation is gone,
                // so nothing is committed for those partitions).
                let assigned: HashSet<TopicPartition> = match consumer.assignment() {
                    Ok(tpl) => tpl
                        .elements()
                        .iter()
                        .map(|e| TopicPartition::new(e.topic(), e.partition()))
                        .collect(),
                    Err(_) => HashSet::new(),
                };
                let lost: Vec<TopicPartition> = self
                    .shared
                    .tracker()
                    .partitions()
                    .filter(|tp| !assigned.contains(*tp))
                    .cloned()
                    .collect();
                let dropped = self.shared.revoke(&lost);
                tracing::warn!(error = %e, lost = ?lost, uncommitted = ?dropped, "rebalance error: partitions no longer assigned are forgotten");
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if result.is_ok() {
            self.connection.confirm_connected();
        }
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed, will retry");
            let mut tracker = self.shared.tracker();
            for el in offsets.elements() {
                tracker.forget_committed(&TopicPartition::new(el.topic(), el.partition()));
            }
        }
    }
}

pub(crate) type KeelBaseConsumer = BaseConsumer<KeelConsumerContext>;

/// One message from librdkafka, waiting at most `timeout`; errors are logged.
fn next_message(consumer: &KeelBaseConsumer, timeout: Duration) -> Option<BorrowedMessage<'_>> {
    match consumer.poll(timeout)? {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(error = %e, "kafka consumer error");
            None
        }
    }
}

/// Everything the poll thread owns.
pub(crate) struct PollLoop {
    pub(crate) consumer: Arc<KeelBaseConsumer>,
    pub(crate) shared: Arc<Shared>,
    /// Bounded lane queues of batches (see [`lane_shape`]).
    pub(crate) lanes: Vec<mpsc::Sender<Batch>>,
    /// Longest batch handed to a lane, and most messages gathered per poll cycle.
    pub(crate) batch_max: usize,
    /// Bytes to reserve for copying the next batch (the size of the last one).
    pub(crate) copy_capacity: usize,
    pub(crate) order: ProcessingOrder,
    pub(crate) commands: mpsc::UnboundedReceiver<Command>,
    pub(crate) rt: tokio::runtime::Handle,
    pub(crate) poll_timeout: Duration,
    pub(crate) commit_interval: Duration,
    /// The partition of the last message, to share its topic name (`Arc<str>`)
    /// without a lookup per message.
    pub(crate) last_tp: Option<TopicPartition>,
    pub(crate) topics: HashMap<String, Arc<str>>,
    /// How long a full lane may block polling before fetching is paused instead.
    pub(crate) backpressure_after: Duration,
    /// Batches held for lanes that stayed full, and the partitions paused for them.
    pub(crate) backpressure: Backpressure,
    /// When a failed seek was last retried.
    pub(crate) last_reseek: Instant,
    /// The ownership generation whose revocations were applied to `backpressure`.
    pub(crate) seen_generation: u64,
}

enum Next {
    Continue,
    /// Graceful stop: drain, then finish.
    Stop,
    /// The handle is gone without a shutdown: stop without committing.
    Abort,
}

impl PollLoop {
    pub(crate) fn run(mut self) {
        let mut last_commit = Instant::now();
        let mut next = Next::Continue;
        while matches!(next, Next::Continue) {
            next = self.serve_commands();
            if !matches!(next, Next::Continue) {
                break;
            }
            self.flush(false, &mut last_commit);
            self.retry_seeks();
            next = self.poll_once();
        }
        let done = match next {
            Next::Stop => self.drain(&mut last_commit),
            _ => None,
        };
        if done.is_none() {
            self.shared.aborted.store(true, Ordering::SeqCst);
        }
        self.shared.running.store(false, Ordering::SeqCst);
        // Closing the consumer leaves the group (revoke hook commits unless aborted).
        let PollLoop {
            consumer, lanes, ..
        } = self;
        drop(lanes);
        drop(consumer);
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    fn serve_commands(&mut self) -> Next {
        loop {
            match self.commands.try_recv() {
                Ok(cmd) => match self.command(cmd) {
                    Next::Continue => {}
                    other => return other,
                },
                Err(mpsc::error::TryRecvError::Empty) => return Next::Continue,
                Err(mpsc::error::TryRecvError::Disconnected) => return Next::Abort,
            }
        }
    }

    fn command(&mut self, cmd: Command) -> Next {
        match cmd {
            Command::Pause(tp, ack) => {
                let _ = ack.send(self.pause(tp));
                Next::Continue
            }
            Command::Resume(tp, ack) => {
                let _ = ack.send(self.resume(tp));
                Next::Continue
            }
            Command::Stop => Next::Stop,
            // Finish before Stop: treat as a stop; the handle sends Finish again.
            Command::Finish(done) => {
                drop(done);
                Next::Stop
            }
        }
    }

    fn targets(&self, tp: &Option<TopicPartition>) -> Result<TopicPartitionList, ConsumerError> {
        match tp {
            Some(tp) => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&tp.topic, tp.partition);
                Ok(tpl)
            }
            None => self
                .consumer
                .assignment()
                .map_err(|e| ConsumerError::kafka("reading the assignment", e)),
        }
    }

    fn pause(&self, tp: Option<TopicPartition>) -> Result<(), ConsumerError> {
        let tpl = self.targets(&tp)?;
        match &tp {
            None => self.shared.paused_all.store(true, Ordering::SeqCst),
            Some(tp) => {
                self.shared.paused().insert(tp.clone());
            }
        }
        if tpl.count() > 0 {
            self.consumer
                .pause(&tpl)
                .map_err(|e| ConsumerError::kafka("pausing", e))?;
        }
        tracing::info!(partition = ?tp, "consumption paused");
        Ok(())
    }

    fn resume(&mut self, tp: Option<TopicPartition>) -> Result<(), ConsumerError> {
        let tpl = self.targets(&tp)?;
        match &tp {
            None => {
                self.shared.paused_all.store(false, Ordering::SeqCst);
                self.shared.paused().clear();
            }
            Some(tp) => {
                self.shared.paused().remove(tp);
            }
        }
        // Partitions paused for a full lane stay paused; relieving it resumes them.
        let mut resume = TopicPartitionList::new();
        for e in tpl.elements() {
            let tp = TopicPartition::new(e.topic(), e.partition());
            if !self.backpressure.is_paused(&tp) {
                resume.add_partition(e.topic(), e.partition());
            }
        }
        if resume.count() > 0 {
            self.seek_and_resume(&resume);
        }
        tracing::info!(partition = ?tp, "consumption resumed");
        Ok(())
    }

    /// Seeks each partition of `tpl` to one past the last message handed to a
    /// worker (or to the first fetched-but-dropped one), then resumes it.
    ///
    /// librdkafka drops the messages it had prefetched for a paused partition;
    /// seeking *before* resuming makes fetching restart exactly where handing out
    /// stopped, so nothing is skipped (re-fetched duplicates are dropped by the
    /// tracker).
    fn seek_and_resume(&mut self, tpl: &TopicPartitionList) {
        let positions: Vec<(TopicPartition, i64)> = {
            let tracker = self.shared.tracker();
            let mut rewind = self.shared.rewind();
            let reseek = self.shared.reseek();
            tpl.elements()
                .iter()
                .filter_map(|e| {
                    let tp = TopicPartition::new(e.topic(), e.partition());
                    let rewind = rewind.remove(&tp);
                    // A seek that failed before is still owed.
                    let pos = reseek
                        .get(&tp)
                        .copied()
                        .or(tracker.resume_position(&tp))
                        .or(rewind)?;
                    Some((tp, pos))
                })
                .collect()
        };
        let mut resume = TopicPartitionList::with_capacity(tpl.count());
        let failed = self.seek_all(positions);
        for e in tpl.elements() {
            let tp = TopicPartition::new(e.topic(), e.partition());
            if !failed.contains(&tp) {
                resume.add_partition(e.topic(), e.partition());
            }
        }
        if resume.count() > 0
            && let Err(e) = self.consumer.resume(&resume)
        {
            tracing::warn!(error = %e, "resume failed");
        }
    }

    /// Seeks each partition to its position. A partition whose seek fails must
    /// not resume (librdkafka would go on after the messages it dropped while
    /// paused, skipping them): it stays paused, its position is kept in
    /// `reseek`, counted, and retried by [`PollLoop::retry_seeks`]. Returns the
    /// partitions that failed.
    fn seek_all(&self, positions: Vec<(TopicPartition, i64)>) -> HashSet<TopicPartition> {
        let mut failed = HashSet::new();
        for (tp, pos) in positions {
            match self.consumer.seek(
                &tp.topic,
                tp.partition,
                Offset::Offset(pos),
                Duration::from_secs(5),
            ) {
                Ok(()) => {
                    self.shared.reseek().remove(&tp);
                }
                Err(e) => {
                    self.shared.metrics.record_seek_failure();
                    tracing::warn!(%tp, offset = pos, error = %e, "seek before resume failed: the partition stays paused, the seek is retried");
                    self.shared.reseek().insert(tp.clone(), pos);
                    failed.insert(tp);
                }
            }
        }
        failed
    }

    /// Retries the seeks that failed (every 100 ms) and resumes the partitions
    /// whose seek now succeeds, unless a pause (the user's or backpressure) holds
    /// them.
    fn retry_seeks(&mut self) {
        if self.last_reseek.elapsed() < RESEEK_INTERVAL {
            return;
        }
        self.last_reseek = Instant::now();
        let pending: Vec<(TopicPartition, i64)> = self
            .shared
            .reseek()
            .iter()
            .map(|(tp, pos)| (tp.clone(), *pos))
            .collect();
        if pending.is_empty() {
            return;
        }
        if self.shared.paused_all.load(Ordering::SeqCst) {
            return; // the resume that ends the pause seeks them
        }
        // Partitions held by the user or by a full lane: their resume seeks them.
        let mut user_paused = self.shared.paused().clone();
        user_paused.extend(self.backpressure.paused().iter().cloned());
        let tried: Vec<TopicPartition> = pending.iter().map(|(tp, _)| tp.clone()).collect();
        let pending: Vec<(TopicPartition, i64)> = pending
            .into_iter()
            .filter(|(tp, _)| !user_paused.contains(tp))
            .collect();
        let failed = self.seek_all(pending);
        let mut resume = TopicPartitionList::new();
        for tp in tried {
            if !failed.contains(&tp) && !user_paused.contains(&tp) {
                resume.add_partition(&tp.topic, tp.partition);
            }
        }
        if resume.count() > 0
            && let Err(e) = self.consumer.resume(&resume)
        {
            tracing::warn!(error = %e, "resume after a retried seek failed");
        }
    }

    /// Applies completions; stores or commits the positions that moved.
    fn flush(&self, final_commit: bool, last_commit: &mut Instant) {
        let commits = {
            let mut tracker = self.shared.tracker();
            self.shared.drain_completions(&mut tracker);
            // Manual mode commits every `commit_interval`; auto-commit mode stores
            // at most every 10 ms (librdkafka commits stored offsets every
            // `auto.commit.interval.ms` anyway), not once per message.
            let every = if self.shared.manual_commit {
                self.commit_interval
            } else {
                STORE_INTERVAL
            };
            if !final_commit && last_commit.elapsed() < every {
                return;
            }
            tracker.take_commits()
        };
        if commits.is_empty() {
            return;
        }
        *last_commit = Instant::now();
        let tpl = tpl_of(&commits);
        let result = if self.shared.manual_commit || final_commit {
            let mode = if final_commit {
                CommitMode::Sync
            } else {
                CommitMode::Async
            };
            self.consumer.commit(&tpl, mode)
        } else {
            self.consumer.store_offsets(&tpl)
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "storing or committing offsets failed, will retry");
            let mut tracker = self.shared.tracker();
            for (tp, _) in &commits {
                tracker.forget_committed(tp);
            }
        }
    }

    /// After a revocation: held batches lose the messages of revoked assignments
    /// (the lanes would drop them anyway), and partitions no longer assigned stop
    /// counting as paused for a full lane (they are not resumed or sought later).
    fn forget_revoked(&mut self) {
        let generation = self.shared.ownership.generation();
        if generation == self.seen_generation {
            return;
        }
        self.seen_generation = generation;
        if !self.backpressure.any() {
            return;
        }
        let ownership = &self.shared.ownership;
        for held in &mut self.backpressure.held {
            for batch in held.iter_mut() {
                batch.retain(|work| ownership.owns(work.epoch));
            }
            held.retain(|batch| !batch.is_empty());
        }
        let gone: Vec<TopicPartition> = {
            let tracker = self.shared.tracker();
            self.backpressure
                .paused()
                .iter()
                .filter(|tp| tracker.epoch(tp).is_none())
                .cloned()
                .collect()
        };
        if !gone.is_empty() {
            self.backpressure.forget(&gone);
            self.publish_backpressured();
        }
    }

    fn poll_once(&mut self) -> Next {
        self.forget_revoked();
        if let Some(next) = self.relieve_backpressure() {
            return next;
        }
        let timeout = if self.backpressure.any() {
            // Check the full lane again soon; keep polling to serve rebalances.
            self.poll_timeout.min(Duration::from_millis(10))
        } else {
            self.poll_timeout
        };
        // A handle of our own: fetched messages borrow it while `self` changes.
        let consumer = self.consumer.clone();
        let Some(message) = next_message(&consumer, timeout) else {
            return Next::Continue;
        };
        // Gather what librdkafka already has (up to `batch_max`), copying every
        // message into one buffer, then wake each lane once for its whole batch.
        let mut buffer = CopyBuffer::with_capacity(self.copy_capacity);
        let mut routed = Vec::with_capacity(self.batch_max);
        let mut next = Some(message);
        while let Some(message) = next {
            self.route(message, &mut buffer, &mut routed);
            next = if routed.len() < self.batch_max {
                next_message(&consumer, Duration::ZERO)
            } else {
                None
            };
        }
        // Room for a batch like this one next time, without regrowing.
        self.copy_capacity = buffer.len().next_power_of_two().min(MAX_COPY_CAPACITY);
        let data = buffer.freeze();
        let mut batches: Vec<Batch> = Vec::new();
        for (lane, tp, epoch, spans) in routed {
            if batches.len() <= lane {
                batches.resize_with(lane + 1, Vec::new);
            }
            let message = ReceivedMessage::from_spans(&data, tp.topic.clone(), spans);
            batches[lane].push(Work { tp, epoch, message });
        }
        self.hand_out(batches)
    }

    /// The partition of `message`, sharing the topic name with earlier messages.
    fn partition_of(&mut self, message: &BorrowedMessage<'_>) -> TopicPartition {
        if let Some(last) = &self.last_tp
            && last.partition == message.partition()
            && &*last.topic == message.topic()
        {
            return last.clone();
        }
        let topic = match self.topics.get(message.topic()) {
            Some(t) => t.clone(),
            None => {
                let t: Arc<str> = message.topic().into();
                self.topics.insert(message.topic().to_string(), t.clone());
                t
            }
        };
        let tp = TopicPartition {
            topic,
            partition: message.partition(),
        };
        self.last_tp = Some(tp.clone());
        tp
    }

    /// Records `message` as dispatched, copies it into `buffer` and notes its lane
    /// (dropping re-fetched duplicates and messages of partitions no longer
    /// assigned).
    fn route(
        &mut self,
        message: BorrowedMessage<'_>,
        buffer: &mut CopyBuffer,
        routed: &mut Vec<(usize, TopicPartition, u64, CopiedSpans)>,
    ) {
        let tp = self.partition_of(&message);
        if self.backpressure.is_paused(&tp) {
            // Fetched before the backpressure pause took effect: not dispatched, so
            // fetch it again when the pause ends.
            let offset = message.offset();
            self.shared
                .rewind()
                .entry(tp)
                .and_modify(|o| *o = (*o).min(offset))
                .or_insert(offset);
            return;
        }
        let epoch = match self.shared.tracker().dispatch(&tp, message.offset()) {
            Dispatch::Accepted { epoch } => epoch,
            skipped => {
                tracing::debug!(%tp, offset = message.offset(), ?skipped, "fetched message dropped");
                return;
            }
        };
        let spans = buffer.copy(&message);
        drop(message);
        let lane = lane_for(
            self.order,
            self.lanes.len(),
            &tp.topic,
            tp.partition,
            buffer.key_of(&spans),
        );
        routed.push((lane, tp, epoch, spans));
    }

    /// Sends each lane its batch. A full lane is waited for (see
    /// [`PollLoop::wait_for_room`]); once one stays full, its batches are held and
    /// only the partitions that feed it pause; the other lanes go on.
    fn hand_out(&mut self, batches: Vec<Batch>) -> Next {
        for (lane, batch) in batches.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            if self.backpressure.is_blocked(lane) {
                // Behind the batches it already holds: the lane's order is kept.
                self.hold(lane, batch);
                continue;
            }
            let next = match self.lanes[lane].try_send(batch) {
                Ok(()) => Next::Continue,
                Err(mpsc::error::TrySendError::Full(batch)) => self.wait_for_room(lane, batch),
                Err(mpsc::error::TrySendError::Closed(_)) => Next::Abort,
            };
            if !matches!(next, Next::Continue) {
                return next;
            }
        }
        Next::Continue
    }

    /// A lane is full. Short bursts are absorbed by waiting (serving commands) up to
    /// `backpressure_after`; a lane still full after that is sustained backpressure:
    /// hold the batch and pause its partitions. Pausing on every full lane would
    /// thrash (each resume seeks and re-fetches).
    fn wait_for_room(&mut self, lane: usize, batch: Batch) -> Next {
        let rt = self.rt.clone();
        let sender = self.lanes[lane].clone();
        let patience = self.backpressure_after;
        let (next, unsent) = rt.block_on(async {
            let mut reserve = std::pin::pin!(sender.reserve_owned());
            let mut give_up = std::pin::pin!(tokio::time::sleep(patience));
            loop {
                tokio::select! {
                    permit = &mut reserve => {
                        return match permit {
                            Ok(permit) => {
                                permit.send(batch);
                                (Next::Continue, None)
                            }
                            Err(_) => (Next::Abort, None),
                        };
                    }
                    () = &mut give_up => return (Next::Continue, Some(batch)),
                    cmd = self.commands.recv() => match cmd {
                        Some(cmd) => match self.command(cmd) {
                            Next::Continue => {}
                            other => return (other, None),
                        },
                        None => return (Next::Abort, None),
                    },
                }
            }
        });
        if let Some(batch) = unsent {
            self.hold(lane, batch);
        }
        next
    }

    /// Holds `batch` until `lane` has room and pauses fetching of its partitions
    /// (only those: the others go on), but keeps polling so rebalances and the
    /// poll interval are served.
    fn hold(&mut self, lane: usize, batch: Batch) {
        let newly = self.backpressure.hold(lane, batch);
        if newly.is_empty() {
            return;
        }
        self.publish_backpressured();
        let mut tpl = TopicPartitionList::new();
        for tp in &newly {
            tpl.add_partition(&tp.topic, tp.partition);
        }
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::warn!(error = %e, "backpressure pause failed");
        }
        tracing::debug!(lane, partitions = ?newly, "lane full: fetching of its partitions paused");
    }

    /// Shares the backpressured partitions with the rebalance callback (which keeps
    /// them paused if they are assigned again).
    fn publish_backpressured(&self) {
        *lock(&self.shared.backpressured) = self.backpressure.paused().clone();
    }

    /// Sends the held batches once their lanes have room, and resumes the
    /// partitions a lane paused once it is at most half full (hysteresis).
    fn relieve_backpressure(&mut self) -> Option<Next> {
        if !self.backpressure.any() {
            return None;
        }
        let blocked: Vec<usize> = self.backpressure.blocked_lanes().collect();
        for lane in blocked {
            let sender = &self.lanes[lane];
            let held = &mut self.backpressure.held[lane];
            while let Some(batch) = held.pop_front() {
                match sender.try_send(batch) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(batch)) => {
                        held.push_front(batch);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return Some(Next::Abort),
                }
            }
            if !held.is_empty() || sender.capacity() * 2 < sender.max_capacity() {
                continue;
            }
            let freed = self.backpressure.release(lane);
            self.publish_backpressured();
            self.resume_after_backpressure(freed);
        }
        None
    }

    /// Resumes `freed` partitions that are still assigned and not paused by the
    /// user (the user's resume seeks those).
    fn resume_after_backpressure(&mut self, freed: Vec<TopicPartition>) {
        if freed.is_empty() {
            return;
        }
        let assigned: HashSet<TopicPartition> = match self.consumer.assignment() {
            Ok(tpl) => tpl
                .elements()
                .iter()
                .map(|e| TopicPartition::new(e.topic(), e.partition()))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "backpressure resume: no assignment");
                HashSet::new()
            }
        };
        let paused_all = self.shared.paused_all.load(Ordering::SeqCst);
        let user_paused = self.shared.paused().clone();
        let mut tpl = TopicPartitionList::new();
        for tp in &freed {
            if !assigned.contains(tp) {
                self.shared.rewind().remove(tp);
            } else if !paused_all && !user_paused.contains(tp) {
                tpl.add_partition(&tp.topic, tp.partition);
            }
        }
        if tpl.count() > 0 {
            self.seek_and_resume(&tpl);
        }
        tracing::debug!(partitions = ?freed, "lane drained: fetching resumed");
    }

    /// After Stop: keep committing what lanes finish until Finish (or the handle is
    /// dropped). Returns the sender to answer once the consumer is closed.
    fn drain(&mut self, last_commit: &mut Instant) -> Option<oneshot::Sender<()>> {
        let rt = self.rt.clone();
        loop {
            self.flush(false, last_commit);
            let cmd = rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(20), self.commands.recv()).await
            });
            match cmd {
                Err(_elapsed) => {}
                Ok(Some(Command::Finish(done))) => {
                    self.flush(true, last_commit);
                    return Some(done);
                }
                Ok(Some(Command::Pause(_, ack) | Command::Resume(_, ack))) => {
                    let _ = ack.send(Err(ConsumerError::NotRunning));
                }
                Ok(Some(Command::Stop)) => {}
                Ok(None) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(lanes: usize) -> (Shared, mpsc::UnboundedSender<Vec<Completion>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Shared::new(
            rx,
            Arc::default(),
            false,
            Arc::new(Ownership::new(lanes)),
            Duration::from_millis(50),
        );
        (shared, tx)
    }

    #[test]
    fn revoke_commits_finished_work_forgets_the_partition_and_its_rewind() {
        let (shared, completions) = shared(1);
        let (gone, kept) = (TopicPartition::new("t", 0), TopicPartition::new("t", 1));
        let (e_gone, e_kept) = {
            let mut t = shared.tracker();
            (t.assign(gone.clone()), t.assign(kept.clone()))
        };
        shared.ownership.grant(e_gone);
        shared.ownership.grant(e_kept);
        {
            let mut t = shared.tracker();
            for o in 0..4 {
                t.dispatch(&gone, o);
            }
            t.dispatch(&kept, 0);
            // Stored before (auto-commit mode): still committed again on revoke.
            let _ = t.take_commits();
        }
        shared.rewind().insert(gone.clone(), 2);
        shared.rewind().insert(kept.clone(), 1);
        shared.reseek().insert(gone.clone(), 2);
        // Offsets 0 and 1 finished; 2 and 3 were queued (dropped by the lane).
        completions
            .send(vec![
                Completion {
                    tp: gone.clone(),
                    epoch: e_gone,
                    offset: 0,
                },
                Completion {
                    tp: gone.clone(),
                    epoch: e_gone,
                    offset: 1,
                },
            ])
            .unwrap();
        let commits = shared.revoke(std::slice::from_ref(&gone));
        assert_eq!(
            commits,
            [(gone.clone(), 2)],
            "finished work, up to the first unfinished"
        );
        assert!(!shared.ownership.owns(e_gone));
        assert!(shared.ownership.owns(e_kept));
        let t = shared.tracker();
        assert_eq!(
            t.partitions().cloned().collect::<Vec<_>>(),
            std::slice::from_ref(&kept)
        );
        assert!(
            !shared.rewind().contains_key(&gone),
            "stale rewind position kept"
        );
        assert_eq!(shared.rewind().get(&kept), Some(&1));
        assert!(shared.reseek().is_empty());
    }

    #[test]
    fn revoke_waits_for_a_running_handler_then_abandons_it_at_the_timeout() {
        let (shared, _completions) = shared(1);
        let tp = TopicPartition::new("t", 0);
        let epoch = shared.tracker().assign(tp.clone());
        shared.ownership.grant(epoch);
        shared.tracker().dispatch(&tp, 0);
        let mut view = shared.ownership.view();
        assert!(shared.ownership.begin(0, epoch, &mut view));
        // The handler never ends: abandoned after `revoke_timeout` (50 ms), its
        // offset not committed.
        let started = Instant::now();
        let commits = shared.revoke(std::slice::from_ref(&tp));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(commits, [(tp, 0)]);
        assert_eq!(shared.metrics.snapshot().revoke_abandoned, 1);
    }

    /// A consumer with keel's context on a mock cluster (topic `t`, two
    /// partitions), neither subscribed nor assigned.
    fn mock_consumer(
        shared: Arc<Shared>,
    ) -> (
        rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        Arc<KeelBaseConsumer>,
    ) {
        let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        mock.create_topic("t", 2, 1).expect("topic");
        let consumer: KeelBaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("group.id", "keel-poll-unit")
            .set("enable.auto.commit", "false")
            .create_with_context(KeelConsumerContext {
                shared,
                connection: ConnectionTracker::new(
                    "consumer",
                    crate::kafka::config::KafkaLogLevel::Warn,
                ),
            })
            .expect("consumer");
        (mock, Arc::new(consumer))
    }

    #[test]
    fn a_rebalance_error_forgets_the_partitions_no_longer_assigned() {
        let (shared, _completions) = shared(1);
        let shared = Arc::new(shared);
        let (_mock, consumer) = mock_consumer(shared.clone());
        let (kept, lost) = (TopicPartition::new("t", 0), TopicPartition::new("t", 1));
        for tp in [&kept, &lost] {
            let epoch = shared.tracker().assign(tp.clone());
            shared.ownership.grant(epoch);
            shared.tracker().dispatch(tp, 0);
        }
        shared.rewind().insert(lost.clone(), 0);
        // librdkafka still holds `t/0` only.
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Beginning)
            .expect("partition");
        consumer.assign(&tpl).expect("assign");

        consumer.context().post_rebalance(
            &consumer,
            &Rebalance::Error(KafkaError::Rebalance(
                rdkafka::types::RDKafkaErrorCode::Fail,
            )),
        );

        let partitions: Vec<TopicPartition> = shared.tracker().partitions().cloned().collect();
        assert_eq!(
            partitions,
            std::slice::from_ref(&kept),
            "the tracker must not keep committing for a partition the error took away"
        );
        assert!(
            !shared.rewind().contains_key(&lost),
            "stale rewind position kept"
        );
    }

    #[test]
    fn a_failed_seek_keeps_its_partition_paused_and_is_retried_until_it_succeeds() {
        let (shared, _completions) = shared(1);
        let shared = Arc::new(shared);
        let (_mock, consumer) = mock_consumer(shared.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (_commands_tx, commands) = mpsc::unbounded_channel();
        let mut poll = PollLoop {
            consumer: consumer.clone(),
            shared: shared.clone(),
            lanes: Vec::new(),
            batch_max: 1,
            copy_capacity: 0,
            order: ProcessingOrder::Partition,
            commands,
            rt: rt.handle().clone(),
            poll_timeout: Duration::from_millis(10),
            commit_interval: Duration::from_millis(200),
            last_tp: None,
            topics: HashMap::new(),
            backpressure_after: Duration::from_millis(100),
            backpressure: Backpressure::new(1),
            last_reseek: Instant::now(),
            seen_generation: 0,
        };
        let tp = TopicPartition::new("t", 1);

        // Not assigned: librdkafka refuses the seek.
        let failed = poll.seek_all(vec![(tp.clone(), 5)]);
        assert!(
            failed.contains(&tp),
            "a seek of an unassigned partition must fail"
        );
        assert_eq!(shared.metrics.snapshot().seek_failures, 1);
        assert_eq!(
            shared.reseek().get(&tp),
            Some(&5),
            "the position is kept for a retry"
        );

        // Not yet due: nothing is tried.
        poll.retry_seeks();
        assert_eq!(shared.reseek().get(&tp), Some(&5));

        // Assigned (and paused, as a partition waiting for its seek is): the
        // retry succeeds, forgets the position and counts no new failure.
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 1, Offset::Beginning)
            .expect("partition");
        consumer.assign(&tpl).expect("assign");
        consumer.pause(&tpl).expect("pause");
        poll.last_reseek = Instant::now() - RESEEK_INTERVAL * 2;
        poll.retry_seeks();
        assert!(
            shared.reseek().is_empty(),
            "a seek that now succeeds must be forgotten"
        );
        assert_eq!(shared.metrics.snapshot().seek_failures, 1);
    }
}
