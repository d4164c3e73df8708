//! Non-blocking retries through retry topics: a failed record waits in
//! `<topic>.retry.<delay>` while its partition moves on.
//!
//! # Why
//!
//! By default a failed handler is retried in place with backoff (1, 2, 4, 8 s,
//! capped at 30 s): order is kept, but the whole partition waits behind one bad
//! record. Spring's `@RetryableTopic` and Karafka's delayed consumption take the
//! other side of that trade: the record is parked in a retry topic and the main
//! partition goes on. [`RetryTopics`] does that, opt-in per consumer:
//!
//! ```text
//! orders ──fail×N──▶ orders.retry.1s ──fail──▶ orders.retry.10s ──fail──▶ … ──▶ orders.dlq
//!   │ (committed only once the retry record is acknowledged)      (whole history in headers)
//!   ▼ goes on at once
//! ```
//!
//! - **The hop**: after `in_place_attempts` handler calls (default 1; the first
//!   ones retried in place with the runtime's backoff) a record that failed with a
//!   retryable error is written, key, payload and headers unchanged, to rung 0 with
//!   [`headers`]: the original topic, partition and offset, the attempt count, the
//!   first and last failure (time, class, type, message: never the payload), the
//!   due time, and the whole history as JSON. The handler answers `Ok` only once
//!   the broker acknowledged that write, so the main offset is committed only
//!   then: at-least-once across the hop. Permanent failures (and undecodable
//!   records) skip the ladder and go to the dead-letter topic at once.
//! - **Consuming the retry topics** is keel's job: a companion consumer in group
//!   `<group>.retry` subscribes to every rung. Its poll thread keeps each retry
//!   partition's head record in memory, paused, until the record is due (then
//!   hands it to a task running the same handler), and after it seeks back to the
//!   next record and resumes. Nothing sleeps, the main topic is never held, and
//!   the poll thread polls at least every `poll_timeout` (50 ms), so
//!   `max.poll.interval.ms` is never exceeded however long the delays. A record
//!   is never handed out before its due time (wall clock) and, measured, at most a
//!   few ms after (RELIABILITY.md, "Retry topics").
//! - **Each rung is one attempt.** A record failing there goes to the next rung;
//!   after the last, to `<topic><dlq suffix>` (`orders.dlq`) with the retry
//!   headers (whole history) and the usual `keel-dlq-*` provenance naming the
//!   *main* topic, partition and offset. A write that fails is retried (1 s
//!   doubling to 30 s) while its partition waits, uncommitted.
//! - **Ordering trade-off**: a record in a retry topic is overtaken by the later
//!   records of its partition, including those of its own key. When that matters,
//!   turn on [`key_preserving`](RetryTopics::key_preserving): while a key has a
//!   record on the ladder, later records of that key (per main partition) are not
//!   handled but *held* (sent along the ladder behind it, header
//!   `keel-retry-held: 1`) and handled only once every earlier one of the key is
//!   done. The set of waiting keys is in memory and bounded by
//!   [`max_held`](RetryTopics::max_held) records (default 10,000; each costs its
//!   key and an offset); when it is full, the main partition waits until a record
//!   leaves the ladder (back-pressure, order kept). It lives in one process: the
//!   main partition and the retry partitions of a key must be consumed by the same
//!   process (true with one member). When retry partitions are revoked the set is
//!   cleared (a key never waits for a record handled elsewhere), and after a
//!   restart or a rebalance records already on the ladder are no longer ordered
//!   against new ones.
//! - **Topics**: create them first with [`ensure_topics`](RetryTopics::ensure_topics)
//!   (one per rung and source topic, partitioned like the source), or rely on the
//!   broker's auto-creation; the retry consumer refreshes its metadata every 5 s
//!   to find topics created later.
//!
//! # Example
//!
//! ```no_run
//! use keel::kafka::consumer::retry_topic::RetryTopics;
//! use keel::kafka::consumer::{BoxError, ConsumedEvent, KafkaConsumer, StartOptions};
//! use rdkafka::ClientConfig;
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut client = ClientConfig::new();
//! client.set("bootstrap.servers", "127.0.0.1:9092");
//! let retries = RetryTopics::delays([1, 10, 60, 600].map(Duration::from_secs))?
//!     .key_preserving(true);
//! retries.ensure_topics(&client, &["orders".to_string()]).await?;
//! let handler = tower::service_fn(|event: ConsumedEvent| async move {
//!     println!("{} at offset {}", event.event_type(), event.offset());
//!     Ok::<_, BoxError>(())
//! });
//! let consumer = retries.start(
//!     KafkaConsumer::builder(client, "orders-service"),
//!     StartOptions::new(["orders"]),
//!     handler,
//! )?;
//! // ...
//! consumer.shutdown(Duration::from_secs(10)).await?;
//! # Ok(()) }
//! ```

mod due;
mod error;
mod gate;
pub mod headers;
mod hop;
mod ladder;
mod poll;
mod publisher;

pub use error::RetryTopicError;
pub use gate::DEFAULT_CAPACITY as DEFAULT_MAX_HELD;
pub use headers::{Failure, RetryState};
pub use hop::RetryHop;
pub use ladder::{Ladder, MAX_RUNGS, delay_name};

use super::{
    BoxError, ConsumedEvent, ConsumerError, KafkaConsumer, KafkaConsumerBuilder, StartOptions,
};
use crate::kafka::dead_letter::{DeadLetterTopics, EnsuredTopic};
use gate::KeyGate;
use publisher::RetryPublisher;
use rdkafka::consumer::Consumer;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;
use tower::Service;

/// Retry-topic settings; see [the module docs](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryTopics {
    ladder: Ladder,
    in_place: u32,
    key_preserving: bool,
    max_held: usize,
}

impl RetryTopics {
    /// Retry topics over `ladder`: 1 in-place attempt, key-preserving off, at
    /// most [`DEFAULT_MAX_HELD`] held records.
    pub fn new(ladder: Ladder) -> Self {
        RetryTopics {
            ladder,
            in_place: 1,
            key_preserving: false,
            max_held: DEFAULT_MAX_HELD,
        }
    }

    /// [`new`](Self::new) over a ladder of `delays` (see [`Ladder::new`]).
    pub fn delays(delays: impl IntoIterator<Item = Duration>) -> Result<Self, RetryTopicError> {
        Ok(Self::new(Ladder::new(delays)?))
    }

    /// Handler calls on the main topic before the hop (default 1: hop at the
    /// first failure). The earlier ones are retried in place with the runtime's
    /// retry policy; this sets the start options' `max_retries` to `n - 1`.
    pub fn in_place_attempts(mut self, n: u32) -> Self {
        self.in_place = n.max(1);
        self
    }

    /// Holds later records of a key while the key has a record on the ladder
    /// (default off); see [the module docs](self).
    pub fn key_preserving(mut self, yes: bool) -> Self {
        self.key_preserving = yes;
        self
    }

    /// Most records tracked by the key-preserving mode (default
    /// [`DEFAULT_MAX_HELD`], at least 1).
    pub fn max_held(mut self, records: usize) -> Self {
        self.max_held = records.max(1);
        self
    }

    /// The ladder.
    pub fn ladder(&self) -> &Ladder {
        &self.ladder
    }

    /// Creates the missing retry topics of `sources` (one per rung, partitioned
    /// like its source) and waits for their leaders.
    pub async fn ensure_topics(
        &self,
        client: &rdkafka::ClientConfig,
        sources: &[String],
    ) -> Result<Vec<EnsuredTopic>, ConsumerError> {
        let mut out = Vec::new();
        for delay in self.ladder.delays() {
            let suffix = format!(".retry.{}", delay_name(*delay));
            out.extend(
                DeadLetterTopics::new()
                    .ensure(client, sources, &suffix)
                    .await?,
            );
        }
        Ok(out)
    }

    /// Starts the main consumer from `builder` with `handler` wrapped in
    /// [`RetryHop`], and the retry consumer (group `<group>.retry`) over every
    /// rung of `options.topics`. Needs a Tokio runtime.
    pub fn start<S>(
        self,
        builder: KafkaConsumerBuilder,
        mut options: StartOptions,
        handler: S,
    ) -> Result<RetryTopicConsumer, ConsumerError>
    where
        S: Service<ConsumedEvent, Response = ()> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| ConsumerError::Config("retry topics need a Tokio runtime".into()))?;
        if options.topics.is_empty() {
            return Err(ConsumerError::Config("no topics to consume".into()));
        }
        let producer_base = builder.dlq_client.as_ref().unwrap_or(&builder.client);
        let publisher = RetryPublisher::new(producer_base, &builder.group_id, &builder.dlq_suffix)
            .map_err(|e| ConsumerError::Config(e.to_string()))?;
        let shared = Arc::new(Shared {
            ladder: self.ladder.clone(),
            publisher: publisher.clone(),
            gate: self
                .key_preserving
                .then(|| Arc::new(KeyGate::new(self.max_held))),
            in_place: self.in_place,
            enable_dlq: options.enable_dlq,
            metrics: Arc::default(),
        });
        let topics = self.ladder.topics(&options.topics);

        let mut client = builder.client.clone();
        client
            .set("group.id", format!("{}.retry", builder.group_id))
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        if client.get("auto.commit.interval.ms").is_none() {
            client.set("auto.commit.interval.ms", "200");
        }
        if client.get("topic.metadata.refresh.interval.ms").is_none() {
            client.set("topic.metadata.refresh.interval.ms", "5000");
        }
        let (context, slots) = poll::new_slots(shared.gate.clone());
        let consumer: rdkafka::consumer::BaseConsumer<poll::RetryContext> = client
            .create_with_context(context)
            .map_err(|e| ConsumerError::kafka("creating the retry consumer", e))?;
        let names: Vec<&str> = topics.keys().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|e| ConsumerError::kafka("subscribing to the retry topics", e))?;

        options.max_retries = self.in_place - 1;
        let main = builder
            .clone()
            .start(options, RetryHop::new(handler.clone(), shared.clone()))?;

        let stop = Arc::new(AtomicBool::new(false));
        let drain = Arc::new(AtomicBool::new(false));
        let (ended_tx, ended) = oneshot::channel();
        let retry_loop = poll::RetryLoop {
            consumer,
            slots,
            handler,
            shared: shared.clone(),
            topics,
            rt,
            poll_interval: builder.poll_timeout,
            stop: stop.clone(),
            drain: drain.clone(),
        };
        std::thread::Builder::new()
            .name("keel-kafka-retry".into())
            .spawn(move || {
                retry_loop.run();
                let _ = ended_tx.send(());
            })
            .map_err(|e| ConsumerError::Config(format!("cannot start the retry thread: {e}")))?;
        tracing::info!(group_id = %builder.group_id, ladder = ?self.ladder.delays(), key_preserving = self.key_preserving, "retry topics started");
        Ok(RetryTopicConsumer {
            main: Some(main),
            shared,
            stop,
            drain,
            ended: Some(ended),
        })
    }
}

/// What the main hop and the retry consumer share.
pub(crate) struct Shared {
    pub(crate) ladder: Ladder,
    pub(crate) publisher: RetryPublisher,
    pub(crate) gate: Option<Arc<KeyGate>>,
    pub(crate) in_place: u32,
    pub(crate) enable_dlq: bool,
    pub(crate) metrics: Arc<RetryMetrics>,
}

/// Counters of the retry topics.
#[derive(Debug, Default)]
pub(crate) struct RetryMetrics {
    pub(crate) hopped: AtomicU64,
    pub(crate) moved: AtomicU64,
    pub(crate) held: AtomicU64,
    pub(crate) recovered: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) publish_failures: AtomicU64,
    dispatched: AtomicU64,
    min_late: AtomicU64,
    max_late: AtomicU64,
}

impl RetryMetrics {
    pub(crate) fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A record handed out `ms` after its due time.
    pub(crate) fn lateness(&self, ms: u64) {
        if self.dispatched.fetch_add(1, Ordering::Relaxed) == 0 {
            self.min_late.store(ms, Ordering::Relaxed);
        } else {
            self.min_late.fetch_min(ms, Ordering::Relaxed);
        }
        self.max_late.fetch_max(ms, Ordering::Relaxed);
    }
}

/// A copy of the retry-topic counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryMetricsSnapshot {
    /// Records sent from the main topic to rung 0.
    pub hopped: u64,
    /// Records sent from one rung to the next after failing there.
    pub moved: u64,
    /// Records sent along the ladder behind an earlier record of their key.
    pub held: u64,
    /// Records handled successfully from a retry topic.
    pub recovered: u64,
    /// Records dead-lettered after the last rung (or for a permanent failure there).
    pub dead_lettered: u64,
    /// Failed writes to a retry or dead-letter topic (each retried).
    pub publish_failures: u64,
    /// Retry records handed to the handler.
    pub dispatched: u64,
    /// Smallest lateness of a handed-out record past its due time.
    pub min_lateness: Duration,
    /// Largest lateness.
    pub max_lateness: Duration,
}

/// A consumer with retry topics: the main consumer and the retry consumer.
#[derive(Debug)]
pub struct RetryTopicConsumer {
    main: Option<KafkaConsumer>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    drain: Arc<AtomicBool>,
    ended: Option<oneshot::Receiver<()>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("ladder", &self.ladder)
            .field("in_place", &self.in_place)
            .finish_non_exhaustive()
    }
}

impl RetryTopicConsumer {
    /// The main consumer (pause, lag, metrics, state...).
    pub fn main(&self) -> &KafkaConsumer {
        self.main.as_ref().expect("present until shutdown")
    }

    /// The retry-topic counters.
    pub fn metrics(&self) -> RetryMetricsSnapshot {
        let m = &self.shared.metrics;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RetryMetricsSnapshot {
            hopped: get(&m.hopped),
            moved: get(&m.moved),
            held: get(&m.held),
            recovered: get(&m.recovered),
            dead_lettered: get(&m.dead_lettered),
            publish_failures: get(&m.publish_failures),
            dispatched: get(&m.dispatched),
            min_lateness: Duration::from_millis(get(&m.min_late)),
            max_lateness: Duration::from_millis(get(&m.max_late)),
        }
    }

    /// Records tracked by the key-preserving mode now (0 when it is off).
    pub fn held_records(&self) -> usize {
        self.shared.gate.as_ref().map_or(0, |g| g.len())
    }

    /// Shuts the main consumer down (see [`KafkaConsumer::shutdown`]), then lets
    /// the retry consumer finish the records it is handling, commits and leaves,
    /// all within `timeout`. Records not due yet stay in their retry topics.
    pub async fn shutdown(mut self, timeout: Duration) -> Result<(), ConsumerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let main = self.main.take().expect("present until shutdown");
        let result = main.shutdown(timeout).await;
        self.drain.store(true, Ordering::SeqCst);
        if let Some(ended) = self.ended.take()
            && tokio::time::timeout_at(deadline, ended).await.is_err()
        {
            self.stop.store(true, Ordering::SeqCst);
            result?;
            return Err(ConsumerError::ShutdownTimedOut(timeout));
        }
        self.shared.publisher.flush(Duration::from_secs(1));
        result
    }
}

impl Drop for RetryTopicConsumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
