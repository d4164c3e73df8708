//! Batch handlers: one call over up to N records of one partition.
//!
//! Spring's batch listeners, Karafka's `consume` and KafkaJS' `eachBatch` hand a
//! handler many records at once: one database round trip or one bulk request
//! per batch instead of per record. keel's batch handler
//! ([`Kafka`](crate::kafka::Kafka)'s `on_batch`) gets a `Vec<Record>` of **one
//! partition, in offset order**, and answers a [`BatchResult`] naming the
//! records that failed. Only those go on: each is handled again *alone* (the
//! batch handler called with that one record) with the consumer's retry
//! schedule (after the first backoff), then dead-lettered if it still fails. A
//! failure that is not retryable (class `decode`, [`HandlerError::permanent`])
//! is dead-lettered at once. Records that succeeded are finished at once.
//!
//! # How batches form
//!
//! The lane that owns a partition gets its records from the poll thread in
//! groups of what librdkafka had ready (up to 64). A batch is cut from those:
//! consecutive records of one partition, at most
//! [`max_records`](BatchOptions::max_records). With
//! [`max_wait`](BatchOptions::max_wait) above zero the lane waits up to that
//! long for more records before calling the handler with fewer than
//! `max_records` (latency traded for fuller batches); meanwhile it reports what
//! it finished, and the wait ends at once on shutdown. In key-ordered mode a
//! partition's records are spread over lanes by key, so a batch holds one
//! partition's records of the keys of its lane (still in offset order).
//!
//! # Offsets
//!
//! Offsets commit as for single records: a record is finished when it
//! succeeded in its batch, or succeeded alone, or was dead-lettered; the commit
//! position of a partition only moves past finished records. A crash redoes
//! the unfinished part of a batch (at-least-once).
//!
//! ```no_run
//! use keel::kafka::consumer::batch::{BatchOptions, BatchResult};
//! use keel::kafka::consumer::Record;
//! use std::time::Duration;
//!
//! # fn f(kafka: keel::kafka::Kafka) -> Result<(), Box<dyn std::error::Error>> {
//! let consumer = kafka
//!     .consumer("indexer")
//!     .on_batch(
//!         "documents",
//!         BatchOptions::new(500).max_wait(Duration::from_millis(50)),
//!         |records: Vec<Record>| async move {
//!             let mut result = BatchResult::ok();
//!             for (i, record) in records.iter().enumerate() {
//!                 if record.value().is_none() {
//!                     result = result.fail(i, "a tombstone cannot be indexed");
//!                 }
//!             }
//!             result
//!         },
//!     )
//!     .start()?;
//! # Ok(()) }
//! ```

use super::error::{BoxError, HandlerError, HandlerErrors, error_chain};
use super::event::{ConsumedEvent, ReceivedMessage};
use super::poll::{Batch, Work};
use super::record::Record;
use super::tracker::TopicPartition;
use futures::FutureExt;
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Default of [`BatchOptions::max_records`].
pub const DEFAULT_MAX_RECORDS: usize = 100;

/// Most records (of all partitions) a lane gathers while it waits for a
/// fuller batch, beyond `max_records`: bounds its memory.
const GATHER_SLACK: usize = 64;

/// How batches of one topic are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchOptions {
    max_records: usize,
    max_wait: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_records: DEFAULT_MAX_RECORDS,
            max_wait: Duration::ZERO,
        }
    }
}

impl BatchOptions {
    /// Batches of at most `max_records` records (0 counts as 1), no waiting.
    pub fn new(max_records: usize) -> Self {
        BatchOptions {
            max_records: max_records.max(1),
            ..Self::default()
        }
    }
    /// Waits up to `wait` for more records before calling the handler with
    /// fewer than `max_records` (default zero: the records at hand).
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }
    /// Most records per batch (default 100).
    pub fn max_records(&self) -> usize {
        self.max_records
    }
    /// Longest wait for a fuller batch (default zero).
    pub fn wait(&self) -> Duration {
        self.max_wait
    }
}

/// What became of a batch: which records (by index in the batch) failed and why.
#[derive(Default)]
pub struct BatchResult {
    failed: Vec<(usize, BoxError)>,
    all: Option<BoxError>,
}

impl fmt::Debug for BatchResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchResult")
            .field(
                "failed",
                &self.failed.iter().map(|(i, _)| i).collect::<Vec<_>>(),
            )
            .field("all_failed", &self.all.is_some())
            .finish()
    }
}

impl BatchResult {
    /// Every record succeeded.
    pub fn ok() -> Self {
        Self::default()
    }
    /// Record `index` of the batch failed with `error` (classified like a
    /// single handler's error: retried unless permanent).
    pub fn fail(mut self, index: usize, error: impl Into<BoxError>) -> Self {
        self.failed.push((index, error.into()));
        self
    }
    /// Every record failed with `error` (a database down...).
    pub fn fail_all(mut self, error: impl Into<BoxError>) -> Self {
        self.all = Some(error.into());
        self
    }
    /// Whether no record failed.
    pub fn is_ok(&self) -> bool {
        self.failed.is_empty() && self.all.is_none()
    }

    /// The outcome of each of `len` records.
    fn per_record(self, len: usize) -> Vec<Result<(), BoxError>> {
        let mut out: Vec<Result<(), BoxError>> = (0..len).map(|_| Ok(())).collect();
        if let Some(all) = self.all {
            for slot in out.iter_mut() {
                *slot = Err(copy_error(all.as_ref()));
            }
        }
        // An index outside the batch names no record: ignored.
        for (index, error) in self.failed {
            if let Some(slot) = out.get_mut(index) {
                *slot = Err(error);
            }
        }
        out
    }
}

/// One error for several records: same class, same retryability, same text.
fn copy_error(error: &(dyn std::error::Error + 'static)) -> BoxError {
    let c = HandlerErrors::classify_error(error);
    let text = error_chain(error);
    let copy = if c.retryable {
        HandlerError::retryable(text)
    } else {
        HandlerError::permanent(text)
    };
    Box::new(copy.with_class(c.class))
}

/// A batch handler, type-erased.
#[derive(Clone)]
pub struct BatchHandler(Arc<dyn Fn(Vec<Record>) -> BoxFuture<'static, BatchResult> + Send + Sync>);

impl fmt::Debug for BatchHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BatchHandler")
    }
}

impl BatchHandler {
    /// Wraps `handler`.
    pub fn new<F, Fut>(handler: F) -> Self
    where
        F: Fn(Vec<Record>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = BatchResult> + Send + 'static,
    {
        BatchHandler(Arc::new(move |records| handler(records).boxed()))
    }

    /// Calls the handler; a panic fails every record (class `panic`, retried).
    async fn call(&self, records: Vec<Record>) -> Vec<Result<(), BoxError>> {
        let len = records.len();
        let handler = self.0.clone();
        let call = AssertUnwindSafe(async move { handler(records).await }).catch_unwind();
        match call.await {
            Ok(result) => result.per_record(len),
            Err(_) => (0..len)
                .map(|_| {
                    Err(Box::new(
                        HandlerError::retryable("the batch handler panicked").with_class("panic"),
                    ) as BoxError)
                })
                .collect(),
        }
    }

    /// The handler as a single-record service: how a record that failed in its
    /// batch is handled again alone.
    pub fn single(&self) -> SingleRecord {
        SingleRecord(self.clone())
    }
}

/// A [`BatchHandler`] called with one record; see [`BatchHandler::single`].
#[derive(Clone, Debug)]
pub struct SingleRecord(BatchHandler);

impl tower::Service<Record> for SingleRecord {
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<(), BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, record: Record) -> Self::Future {
        let handler = self.0.clone();
        async move {
            let handler = handler.0.clone();
            handler(vec![record])
                .await
                .per_record(1)
                .pop()
                .unwrap_or(Ok(()))
        }
        .boxed()
    }
}

/// The batch handlers of a consumer, by topic.
#[derive(Clone, Debug, Default)]
pub(crate) struct BatchRoutes {
    by_topic: HashMap<String, (BatchHandler, BatchOptions)>,
}

impl BatchRoutes {
    pub(crate) fn new(
        routes: impl IntoIterator<Item = (String, BatchHandler, BatchOptions)>,
    ) -> Self {
        BatchRoutes {
            by_topic: routes
                .into_iter()
                .map(|(topic, handler, options)| (topic, (handler, options)))
                .collect(),
        }
    }
}

type At = (TopicPartition, i64);

/// A lane's batch state: the batches cut from its current queue batch and the
/// outcome of each record of the batches already run.
pub(crate) struct BatchLane {
    routes: Arc<BatchRoutes>,
    /// Whether a failed record is handled again alone (`max_retries > 0`).
    rerun: bool,
    /// Batches not run yet, by their first record.
    pending: HashMap<At, (BatchHandler, Vec<ReceivedMessage>)>,
    /// Outcomes of records of batches that ran, until their turn comes.
    outcomes: HashMap<At, (ConsumedEvent, Result<(), BoxError>)>,
}

impl BatchLane {
    pub(crate) fn new(routes: Arc<BatchRoutes>, max_retries: u32) -> Self {
        BatchLane {
            routes,
            rerun: max_retries > 0,
            pending: HashMap::new(),
            outcomes: HashMap::new(),
        }
    }

    fn options(&self, work: &Work) -> Option<&(BatchHandler, BatchOptions)> {
        self.routes.by_topic.get(&*work.tp.topic)
    }

    /// The longest wait and smallest batch of the batch topics in `batch`.
    fn window(&self, batch: &Batch) -> Option<(Duration, usize, usize)> {
        let mut window: Option<(Duration, usize)> = None;
        let mut count = 0;
        for work in batch {
            if let Some((_, o)) = self.options(work) {
                count += 1;
                let (wait, max) = window.unwrap_or((o.max_wait, o.max_records));
                window = Some((wait.min(o.max_wait), max.min(o.max_records)));
            }
        }
        window.map(|(wait, max)| (wait, max, count))
    }

    /// Whether [`gather`](Self::gather) would wait for more records.
    pub(crate) fn would_wait(&self, batch: &Batch) -> bool {
        matches!(self.window(batch), Some((wait, max, count)) if !wait.is_zero() && count < max)
    }

    /// Adds queued batches to `batch` until its batch topics have a full batch,
    /// the window is over, the queue closes or the lane stops.
    pub(crate) async fn gather(
        &self,
        mut batch: Batch,
        queue: &mut mpsc::Receiver<Batch>,
        stop: &mut watch::Receiver<bool>,
    ) -> Batch {
        let Some((wait, max, _)) = self.window(&batch) else {
            return batch;
        };
        let deadline = tokio::time::Instant::now() + wait;
        while self.window(&batch).is_some_and(|(_, _, count)| count < max)
            && batch.len() < max + GATHER_SLACK
        {
            tokio::select! {
                biased;
                _ = stop.wait_for(|stop| *stop) => break,
                more = queue.recv() => match more {
                    Some(more) => batch.extend(more),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        batch
    }

    /// Cuts the batches of `batch`: consecutive records of one partition of a
    /// batch topic, at most `max_records` each. Forgets what an earlier queue
    /// batch left (records of a revoked partition).
    pub(crate) fn prepare(&mut self, batch: &Batch) {
        self.pending.clear();
        self.outcomes.clear();
        let mut open: HashMap<TopicPartition, At> = HashMap::new();
        for work in batch {
            let Some((handler, options)) = self.options(work).cloned() else {
                continue;
            };
            // Dead-lettered by the lane as undecodable, never batched.
            if work.message.has_unreadable_headers() {
                continue;
            }
            let at = (work.tp.clone(), work.message.offset());
            let start = match open.get(&work.tp) {
                Some(start)
                    if self
                        .pending
                        .get(start)
                        .is_some_and(|(_, m)| m.len() < options.max_records) =>
                {
                    start.clone()
                }
                _ => {
                    open.insert(work.tp.clone(), at.clone());
                    at
                }
            };
            self.pending
                .entry(start)
                .or_insert_with(|| (handler, Vec::new()))
                .1
                .push(work.message.clone());
        }
    }

    /// The outcome of the record at `at` in its batch, running the batch when
    /// `at` is its first record; `None` for a record not handled in a batch.
    ///
    /// With `otel` the batch call runs in its own CONSUMER span, linked to the
    /// trace context of each record (see `otel::process_batch_span`).
    pub(crate) async fn outcome(
        &mut self,
        at: &At,
        require_envelope: bool,
        group: &str,
    ) -> Option<(ConsumedEvent, Result<(), BoxError>)> {
        if let Some((handler, messages)) = self.pending.remove(at) {
            #[cfg(feature = "otel")]
            let span = crate::kafka::otel::process_batch_span(&messages, group);
            #[cfg(not(feature = "otel"))]
            let _ = group;
            let mut events = Vec::with_capacity(messages.len());
            for message in messages {
                // Required and not an envelope: left to the lane (dead-lettered).
                match super::decode::envelope_of(&message, require_envelope) {
                    Ok(Some(envelope)) => events.push(ConsumedEvent::new(envelope, message)),
                    Ok(None) => events.push(ConsumedEvent::from_record(message)),
                    Err(_) => {}
                }
            }
            for event in &events {
                event.count_attempt();
            }
            #[cfg(feature = "otel")]
            let results = {
                use tracing::Instrument;
                handler.call(events.clone()).instrument(span).await
            };
            #[cfg(not(feature = "otel"))]
            let results = handler.call(events.clone()).await;
            for (event, result) in events.into_iter().zip(results) {
                let key = (at.0.clone(), event.offset());
                self.outcomes.insert(key, (event, result));
            }
        }
        self.outcomes.remove(at)
    }

    /// Whether a record that failed with `error` in its batch is handled again
    /// alone (retryable, and retries allowed).
    pub(crate) fn rerun(&self, error: &BoxError) -> bool {
        self.rerun && HandlerErrors::classify_error(error.as_ref()).retryable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{OwnedMessage, Timestamp};

    fn work(partition: i32, offset: i64, topic: &str) -> Work {
        let m = OwnedMessage::new(
            Some(format!("{offset}").into_bytes()),
            None,
            topic.into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        );
        Work {
            tp: TopicPartition::new(topic, partition),
            epoch: 1,
            message: ReceivedMessage::new(m),
        }
    }

    fn lane(seen: Arc<std::sync::Mutex<Vec<Vec<i64>>>>, max: usize) -> BatchLane {
        let handler = BatchHandler::new(move |records: Vec<Record>| {
            let seen = seen.clone();
            async move {
                seen.lock()
                    .unwrap()
                    .push(records.iter().map(Record::offset).collect());
                let mut r = BatchResult::ok();
                for (i, rec) in records.iter().enumerate() {
                    if rec.offset() == 3 {
                        r = r.fail(i, "three fails");
                    }
                    if rec.offset() == 4 {
                        r = r.fail(i, HandlerError::permanent("four is permanent"));
                    }
                }
                r
            }
        });
        let routes = BatchRoutes::new([("b".to_string(), handler, BatchOptions::new(max))]);
        BatchLane::new(Arc::new(routes), 3)
    }

    /// Batches hold records of one partition, in order, at most `max_records`;
    /// each record gets its own outcome; other topics are not batched.
    #[tokio::test]
    async fn batches_are_cut_per_partition_and_outcomes_are_per_record() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut lane = lane(seen.clone(), 3);
        let batch: Batch = vec![
            work(0, 1, "b"),
            work(1, 1, "b"),
            work(0, 2, "b"),
            work(0, 3, "other"),
            work(0, 3, "b"),
            work(0, 4, "b"),
        ];
        lane.prepare(&batch);
        let mut outcomes = Vec::new();
        for w in &batch {
            let at = (w.tp.clone(), w.message.offset());
            match lane.outcome(&at, false, "group").await {
                Some((event, result)) => {
                    assert_eq!(event.attempts_made(), 1);
                    outcomes.push((
                        w.tp.partition,
                        event.offset(),
                        result.map_err(|e| lane.rerun(&e)),
                    ));
                }
                None => assert_eq!(&*w.tp.topic, "other"),
            }
        }
        assert_eq!(*seen.lock().unwrap(), [vec![1, 2, 3], vec![1], vec![4]]);
        assert_eq!(
            outcomes,
            [
                (0, 1, Ok(())),
                (1, 1, Ok(())),
                (0, 2, Ok(())),
                (0, 3, Err(true)),
                (0, 4, Err(false))
            ]
        );
    }

    #[tokio::test]
    async fn a_panicking_batch_fails_every_record_and_fail_all_copies_the_class() {
        let handler = BatchHandler::new(|records: Vec<Record>| async move {
            if records.len() > 1 {
                panic!("boom");
            }
            BatchResult::ok().fail_all(HandlerError::permanent("bad").with_class("decode"))
        });
        let events: Vec<Record> = [work(0, 1, "b"), work(0, 2, "b")]
            .into_iter()
            .map(|w| ConsumedEvent::from_record(w.message))
            .collect();
        let results = handler.call(events.clone()).await;
        assert!(results.iter().all(|r| {
            let e = r.as_ref().unwrap_err();
            HandlerErrors::classify_error(e.as_ref()).class == "panic"
        }));
        let results = handler.call(events[..1].to_vec()).await;
        let c = HandlerErrors::classify_error(results[0].as_ref().unwrap_err().as_ref());
        assert_eq!((c.class, c.retryable), ("decode", false));
    }

    /// With a window, the lane waits for more records up to `max_wait` (paused
    /// clock), then goes with what it has.
    #[tokio::test(start_paused = true)]
    async fn gather_waits_for_a_fuller_batch_up_to_the_window() {
        let handler = BatchHandler::new(|_records: Vec<Record>| async { BatchResult::ok() });
        let options = BatchOptions::new(3).max_wait(Duration::from_millis(100));
        let lane = BatchLane::new(
            Arc::new(BatchRoutes::new([("b".to_string(), handler, options)])),
            3,
        );
        let (tx, mut rx) = mpsc::channel(4);
        let (_stop_tx, mut stop) = watch::channel(false);
        assert!(lane.would_wait(&vec![work(0, 1, "b")]));
        assert!(!lane.would_wait(&vec![work(0, 1, "other")]));
        tx.send(vec![work(0, 2, "b")]).await.unwrap();
        let start = tokio::time::Instant::now();
        let batch = lane.gather(vec![work(0, 1, "b")], &mut rx, &mut stop).await;
        assert_eq!(batch.len(), 2);
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        // A full batch goes at once.
        tx.send(vec![work(0, 4, "b"), work(0, 5, "b")])
            .await
            .unwrap();
        let start = tokio::time::Instant::now();
        let batch = lane.gather(vec![work(0, 3, "b")], &mut rx, &mut stop).await;
        assert_eq!(batch.len(), 3);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
