//! Consume-and-handle: a consumer runtime that drives every Kafka message through a
//! handler `tower::Service<ConsumedEvent>`.
//!
//! # Why a runtime, and how it is built
//!
//! rust-rdkafka gives a stream of messages and leaves the rest to you; the seed's
//! consumer (and Karafka, Spring Kafka, Parallel Consumer) give routing, retries, a
//! dead-letter queue, safe commits, pause/resume and metrics. [`KafkaConsumer`] is
//! that runtime, with the handler a Tower service you compose with layers:
//!
//! ```text
//! poll thread (BaseConsumer) ──route──▶ lane 0 ─▶ DeadLetter(Retry(CountAttempts(handler)))
//!   │  rebalance hooks                 lane 1 ─▶ DeadLetter(Retry(CountAttempts(handler)))
//!   ◀──────── completions ─────────────  ...
//!   └─ commits: lowest unfinished offset per partition (OffsetTracker)
//! ```
//!
//! - **Polling** happens on one dedicated thread calling `BaseConsumer::poll` with a
//!   short timeout: no `StreamConsumer` waker to lose (rust-rdkafka #638/#665/#848),
//!   and rebalance callbacks run there with direct access to the offset tracker.
//! - **Bounded memory and backpressure**: lanes are bounded queues
//!   (`lane_capacity`), fed in batches: each poll cycle gathers what librdkafka has
//!   ready (at most 64 messages, never waiting for more) and wakes each lane once
//!   for its share; lanes report completions a batch at a time too. A full lane
//!   holds up the poll thread (which still serves
//!   pause, resume and stop) for at most `backpressure_after` (500 ms); if it is
//!   still full, the poll thread holds that lane's unsent batches and pauses
//!   fetching of only the partitions that feed it (one stuck partition does not
//!   stall the others), yet keeps polling, so rebalances and
//!   `max.poll.interval.ms` are served however slow the handler is; when the lane
//!   is half empty it seeks those partitions back to the next undispatched offset
//!   and resumes them. librdkafka's prefetch is capped by
//!   `queued.max.messages.kbytes` (16 MiB unless you set it).
//! - **Ordering** ([`ProcessingOrder`]): by default one message at a time per
//!   partition. Opt-in key-ordered mode handles one partition on `workers` lanes
//!   concurrently, keeping order per key.
//! - **Retries**: keel-layers' [`RetryLayer`](keel_layers::retry::RetryLayer) per
//!   message, in place (the lane waits, so order is kept), with
//!   [`RetryPolicy::kafka`]: 1 s, 2 s, 4 s, 8 s ... capped at 30 s, no jitter, no
//!   retry budget (a budget would dead-letter healthy messages during an outage),
//!   `max_retries` from the start options. Each retry is logged with its attempt and
//!   backoff, inside a span carrying the topic, partition and offset. Failures
//!   classified permanent ([`HandlerError::permanent`], decode errors) skip the
//!   retries.
//! - **Retry topics** (opt-in, [`retry_topic::RetryTopics`]): instead of waiting in
//!   place, a failed record goes to `<topic>.retry.<delay>` and the partition moves
//!   on; keel consumes the retry topics itself and dead-letters after the last rung.
//! - **Dead-letter queue** ([`DeadLetterLayer`](crate::kafka::dead_letter::DeadLetterLayer)):
//!   after the last retry the message is republished unchanged to `<topic>.dlq` with
//!   provenance headers, acknowledged before its offset may be committed. Messages
//!   that are not a valid envelope go there too (error kind `decode`) and the
//!   partition moves on, unless the consumer takes any record
//!   ([`require_envelope(false)`](KafkaConsumerBuilder::require_envelope): the
//!   handler gets a [`Record`] and picks a [`decode`] decoder; keel's envelope is
//!   one of them).
//! - **Batch handlers** ([`batch`]): one call over up to N records of one
//!   partition; only the records it says failed are retried and dead-lettered. With the DLQ disabled, a failed message is logged, counted
//!   and skipped. [`KafkaConsumerBuilder::ensure_dlq_topics`] creates missing
//!   dead-letter topics before start instead of relying on the broker's
//!   auto-creation.
//! - **At-least-once**: an offset is committed only once its message and every
//!   earlier one of its partition is handled or dead-lettered
//!   ([`tracker::OffsetTracker`]); on partition revocation the finished part is
//!   committed synchronously before the partition goes. In auto-commit mode keel
//!   *stores* those offsets (`enable.auto.offset.store=false`) and librdkafka commits
//!   them every `auto.commit.interval.ms` (keel's default: every 200 ms, its
//!   `commit_interval`, not librdkafka's 5 s); in manual mode keel commits them
//!   itself every `commit_interval`. Either way only finished offsets are ever
//!   committed, and a crash redoes at most what was in flight plus what finished
//!   in the last interval. Lanes report finished offsets within 10 ms, also while
//!   a slow message of their batch still runs.
//! - **Pause / resume** of everything or one partition. librdkafka drops prefetched
//!   messages of a paused partition, so resume first seeks each partition to one
//!   past the last message handed to a worker: nothing is skipped, and re-fetched
//!   duplicates are dropped by the tracker. Messages already queued in lanes are
//!   still handled after a pause.
//! - **Rebalances: revocation is a barrier** (see `ownership.rs`). When partitions
//!   are revoked, the rebalance callback (on the poll thread) withdraws them before
//!   librdkafka lets them go: lanes drop their queued messages of those partitions
//!   unhandled (counted in `revoked_dropped`; the new owner handles them),
//!   handlers still running on them get up to
//!   [`revoke_timeout`](KafkaConsumerBuilder::revoke_timeout) (10 s) to finish
//!   (later ones are abandoned, uncommitted, counted in `revoke_abandoned`), lanes
//!   report what they finished, and the finished positions are stored and committed
//!   synchronously; the offset tracker, the backpressure rewind positions and
//!   pending re-seeks forget the partitions. So two members never handle one
//!   partition at the same time, and a new owner starts where the old one
//!   finished. A rebalance error forgets every partition no longer assigned. A
//!   seek before resume that fails keeps its partition paused (counted in
//!   `seek_failures`) and is retried every 100 ms, instead of resuming after
//!   messages librdkafka dropped.
//! - **Assignment protocols**: all three are tested against Kafka 4.1
//!   (`tests/kafka_rebalance.rs`), set through the client config:
//!   the classic protocol with librdkafka's default eager strategies
//!   (`range,roundrobin`: every partition revoked on each rebalance),
//!   `partition.assignment.strategy=cooperative-sticky` (incremental: only moved
//!   partitions are revoked; rdkafka 0.39 calls `incremental_assign` /
//!   `incremental_unassign` for it and keel's callbacks handle the incremental
//!   lists), and the KIP-848 consumer group protocol, `group.protocol=consumer`
//!   (librdkafka 2.12.1 of rdkafka-sys 4.10, enabled by default in Kafka 4.x):
//!   the broker assigns, incrementally. With it, `session.timeout.ms` and
//!   `heartbeat.interval.ms` are broker-side group settings
//!   (`group.consumer.session.timeout.ms` ...) and `partition.assignment.strategy`
//!   is replaced by `group.remote.assignor`: librdkafka refuses to create a
//!   consumer that sets them ([`ConsumerError::Kafka`] from `start`).
//! - **Shutdown** with a timeout: stop fetching, let each lane finish its current
//!   message, commit, close. Work still running at the deadline is abandoned
//!   uncommitted (delivered again later) and the call returns
//!   [`ConsumerError::ShutdownTimedOut`]; it never hangs. Dropping the handle without
//!   shutdown stops everything without committing anything more.
//! - **Supervision**: a handler that panics (in `call` or in its future) does not
//!   take its lane down: the panic becomes a [`HandlerPanicked`] failure of class
//!   `panic`, retried and then dead-lettered like any failure, and counted
//!   (`total_panics`). A panic the runtime cannot pin on one message (on the poll
//!   thread, in a lane, in the handler's `poll_ready`) turns the consumer into
//!   [`ConsumerState::Failed`] with the cause: it is logged at error level,
//!   [`is_running`](KafkaConsumer::is_running) is false, the state watch
//!   ([`subscribe_state`](KafkaConsumer::subscribe_state)) fires, the client's health
//!   report is unhealthy with the reason, and
//!   [`shutdown`](KafkaConsumer::shutdown) returns [`ConsumerError::Failed`]. The
//!   poll thread and the lanes stop; what was finished before is committed, nothing
//!   after (the group's next member takes over). Panics are caught with
//!   `catch_unwind`, so this holds with the default `panic = "unwind"` only.
//! - **Headers that cannot be read**: rdkafka panics on a header name that is not
//!   UTF-8 (any producer can write one). keel catches that on the poll thread and
//!   dead-letters the message as undecodable (class `decode`, without its original
//!   headers); polling goes on. (The panic hook still prints that panic.)
//! - **A dead-letter topic that cannot be written** (missing with auto-creation
//!   off, a record it refuses, no write permission): the handler is not run again.
//!   The publish is retried with the retry policy's backoff in a task of its own
//!   while only that message's partition is paused; the other partitions go on,
//!   and nothing of the held partition is committed past the message. Each failure
//!   counts in `dlq_failures`; [`stuck_partitions`](KafkaConsumer::stuck_partitions),
//!   the metrics (`stuck_partitions`, `longest_stuck`) and the client's health
//!   report (`degraded`) show the partition and how long it has been stuck. Once
//!   the publish succeeds the partition resumes by itself. That is
//!   [`DeadLetterFailure::KeepRetrying`], the default;
//!   [`DeadLetterFailure::StopConsumer`] fails the consumer after a number of
//!   failed publishes instead ([`KafkaConsumerBuilder::on_dlq_failure`]). The error
//!   text in the dead-letter headers is cut to
//!   [`MAX_ERROR_MESSAGE`](crate::kafka::dead_letter::MAX_ERROR_MESSAGE) (1 KiB),
//!   so the added headers stay small next to a large message.
//! - **A bad deploy** that fails every record: a [`PoisonGuard`]
//!   ([`KafkaConsumerBuilder::poison_guard`], off by default) pauses or stops the
//!   consumer when too many records go to the DLQ within a window, instead of
//!   draining the topic into it (see [`poison_guard`]).
//! - **Unknown event types** are dead-lettered by default (class
//!   `unknown_event_type`), not skipped: in a rolling deploy an old consumer must
//!   not commit past an event type only the new version knows. Skipping is an
//!   explicit opt-in ([`UnknownEventTypes::Skip`](crate::kafka::registry::UnknownEventTypes::Skip)).
//! - **Health**: built with [`KafkaConsumer::from_client`] (or
//!   [`register_with`](KafkaConsumerBuilder::register_with)), the consumer is
//!   registered with the [`KafkaClient`]: its health check counts it
//!   (`consumerCount`, `consumersConnected`) and its
//!   [`disconnect`](KafkaClient::disconnect) shuts it down gracefully.
//!
//! # Example
//!
//! ```no_run
//! use keel::kafka::consumer::{BoxError, ConsumedEvent, ConsumerState, KafkaConsumer, StartOptions};
//! use keel::kafka::registry::HandlerRegistry;
//! use rdkafka::ClientConfig;
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = HandlerRegistry::builder()
//!     .handler_fn("user.created", |event: ConsumedEvent| async move {
//!         println!("{} at offset {}", event.event_type(), event.offset());
//!         Ok::<_, BoxError>(())
//!     })
//!     .build()?;
//! let mut client = ClientConfig::new();
//! client.set("bootstrap.servers", "127.0.0.1:9092");
//! let consumer = KafkaConsumer::builder(client, "users-service").start(
//!     StartOptions::new(["user.events"]).max_retries(3).enable_dlq(true),
//!     registry,
//! )?;
//! // ...
//! // Stop serving as soon as the consumer fails (shutdown then returns the cause).
//! let mut state = consumer.subscribe_state();
//! tokio::spawn(async move {
//!     if let Ok(failed) = state.wait_for(ConsumerState::is_failed).await {
//!         eprintln!("consumer failed: {:?}", *failed);
//!     }
//! });
//! // ...
//! consumer.shutdown(Duration::from_secs(10)).await?;
//! # Ok(()) }
//! ```

mod attempts;
mod backpressure;
pub mod batch;
mod control;
pub mod decode;
mod error;
pub(crate) mod event;
mod lane;
mod metrics;
mod ownership;
pub mod poison_guard;
mod poll;
pub mod record;
pub mod retry_topic;
pub mod scheduler;
mod state;
mod supervise;
pub mod tracker;
mod watermarks;

pub use crate::kafka::envelope::{DecodeError, EventEnvelope};
pub use attempts::{CountAttempts, CountAttemptsLayer};
pub(crate) use error::error_chain;
pub use error::{BoxError, ConsumerError, HandlerError, HandlerErrors, UnknownEventType};
pub use event::{ConsumedEvent, MessageHeaders, ReceivedMessage, Timestamp};
pub use metrics::{ConsumerMetrics, ConsumerMetricsSnapshot, ProcessingHistograms};
pub use poison_guard::{PoisonAction, PoisonGuard};
pub use record::Record;
pub use scheduler::ProcessingOrder;
pub(crate) use state::truncate_utf8;
pub use state::{ConsumerState, DeadLetterFailure, StuckPartition};
pub use supervise::HandlerPanicked;
pub use tracker::TopicPartition;

use crate::kafka::client::{ConnectionTracker, ConsumerRegistration, KafkaClient};
use crate::kafka::config::{KafkaConfig, KafkaLogLevel};
use crate::kafka::dead_letter::{DEFAULT_SUFFIX, DeadLetterPublisher, DeadLetterTopics};
use backpressure::Backpressure;
use control::{ConsumerControl, RegisteredConsumer};
use keel_layers::retry::RetryPolicy;
use lane::{LaneContext, Stack, run_lane};
use poll::{Command, KeelBaseConsumer, KeelConsumerContext, PollLoop, Shared};
use rdkafka::ClientConfig;
use rdkafka::consumer::Consumer;
use state::{StateCell, StuckPartitions};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tower::Service;

/// Default of [`KafkaConsumerBuilder::commit_interval`].
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(200);

/// What to consume and how; the seed's `start({ topics, fromBeginning, autoCommit,
/// maxRetries, enableDLQ })`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartOptions {
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// Start from the earliest offset when the group has no committed offset
    /// (`auto.offset.reset=earliest`); otherwise from the latest. Default `false`.
    pub from_beginning: bool,
    /// `true` (default): keel stores finished offsets and librdkafka commits them
    /// every `commit_interval` (200 ms by default). `false`: keel commits finished offsets itself every
    /// `commit_interval`. Both commit only finished offsets.
    pub auto_commit: bool,
    /// Retries per message after the first attempt. Default 3.
    pub max_retries: u32,
    /// Publish finally-failed and undecodable messages to `<topic>.dlq`. Default `true`.
    pub enable_dlq: bool,
}

impl StartOptions {
    /// Options for `topics` with the defaults.
    pub fn new<I, T>(topics: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        StartOptions {
            topics: topics.into_iter().map(Into::into).collect(),
            from_beginning: false,
            auto_commit: true,
            max_retries: 3,
            enable_dlq: true,
        }
    }
    /// Sets `from_beginning`.
    pub fn from_beginning(mut self, yes: bool) -> Self {
        self.from_beginning = yes;
        self
    }
    /// Sets `auto_commit`.
    pub fn auto_commit(mut self, yes: bool) -> Self {
        self.auto_commit = yes;
        self
    }
    /// Sets `max_retries`.
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }
    /// Sets `enable_dlq`.
    pub fn enable_dlq(mut self, yes: bool) -> Self {
        self.enable_dlq = yes;
        self
    }
}

/// Builds a [`KafkaConsumer`]; every setting has a documented default.
#[derive(Clone)]
pub struct KafkaConsumerBuilder {
    client: ClientConfig,
    dlq_client: Option<ClientConfig>,
    group_id: String,
    order: ProcessingOrder,
    workers: usize,
    lane_capacity: usize,
    retry_policy: RetryPolicy,
    dlq_suffix: String,
    commit_interval: Duration,
    poll_timeout: Duration,
    backpressure_after: Duration,
    revoke_timeout: Duration,
    kafka_client: Option<KafkaClient>,
    log_level: KafkaLogLevel,
    on_dlq_failure: DeadLetterFailure,
    require_envelope: bool,
    batches: Option<Arc<batch::BatchRoutes>>,
    poison_guard: PoisonGuard,
}

impl fmt::Debug for KafkaConsumerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumerBuilder")
            .field("group_id", &self.group_id)
            .field("order", &self.order)
            .field("workers", &self.workers)
            .field("lane_capacity", &self.lane_capacity)
            .field("retry_policy", &self.retry_policy)
            .field("dlq_suffix", &self.dlq_suffix)
            .field("commit_interval", &self.commit_interval)
            .field("on_dlq_failure", &self.on_dlq_failure)
            .field("require_envelope", &self.require_envelope)
            .field("poison_guard", &self.poison_guard)
            .field("registered", &self.kafka_client.is_some())
            .finish_non_exhaustive()
    }
}

impl KafkaConsumerBuilder {
    /// Processing order (default [`ProcessingOrder::Partition`]).
    pub fn order(mut self, order: ProcessingOrder) -> Self {
        self.order = order;
        self
    }
    /// Key-ordered mode on `workers` lanes.
    pub fn key_ordered(self, workers: usize) -> Self {
        self.order(ProcessingOrder::Key).workers(workers)
    }
    /// Number of lanes (default 1: strictly sequential).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }
    /// Most messages queued for each lane (default 256). Messages reach a lane in
    /// batches of up to `min(lane_capacity, 64)`; the queue holds as many whole
    /// batches as fit (at least one), plus the batch the lane is working on.
    pub fn lane_capacity(mut self, capacity: usize) -> Self {
        self.lane_capacity = capacity;
        self
    }
    /// Retry schedule (default [`RetryPolicy::kafka`]: 1 s doubling to 30 s, no
    /// jitter, no retry budget). Its attempt limit is replaced by the start options'
    /// `max_retries`. Its backoff also paces re-publishing to an unreachable DLQ.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry_policy = policy;
        self
    }
    /// Suffix of dead-letter topics (default `.dlq`).
    pub fn dlq_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.dlq_suffix = suffix.into();
        self
    }
    /// How often finished offsets are committed (default 200 ms). In manual-commit
    /// mode keel commits every `interval` (zero: after every poll); in auto-commit
    /// mode it becomes librdkafka's `auto.commit.interval.ms` unless the client
    /// configuration sets that. A crashed consumer's successor redoes at most what
    /// was finished in the last `interval` (plus a commit under way) and what was
    /// in flight.
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }
    /// Longest wait of one `poll` call (default 50 ms); bounds the latency of
    /// commands and commits when no message arrives.
    pub fn poll_timeout(mut self, timeout: Duration) -> Self {
        self.poll_timeout = timeout;
        self
    }

    /// How long a full lane may hold up polling before fetching of the partitions
    /// that feed it is paused instead (default 500 ms). Short bursts wait;
    /// sustained backpressure pauses only those partitions (the others go on), so
    /// rebalances and `max.poll.interval.ms` are served however slow the handler.
    pub fn backpressure_after(mut self, patience: Duration) -> Self {
        self.backpressure_after = patience;
        self
    }

    /// How long a revocation waits for handlers still running on messages of the
    /// revoked partitions before it lets them go (default 10 s). Queued messages
    /// of revoked partitions are dropped at once (their new owner handles them);
    /// a handler still running at this deadline is abandoned: its message is not
    /// committed, so the new owner handles it again, possibly while it still runs
    /// here (counted in [`ConsumerMetricsSnapshot::revoke_abandoned`]). Keep it
    /// below `max.poll.interval.ms` and the group's rebalance timeout: the group
    /// waits for this member meanwhile.
    pub fn revoke_timeout(mut self, timeout: Duration) -> Self {
        self.revoke_timeout = timeout;
        self
    }

    /// What to do when a message cannot be dead-lettered (default
    /// [`DeadLetterFailure::KeepRetrying`]: retry the publish with backoff, only
    /// that partition held, nothing committed past the message).
    pub fn on_dlq_failure(mut self, policy: DeadLetterFailure) -> Self {
        self.on_dlq_failure = policy;
        self
    }

    /// Whether every record must be a keel envelope (default `true`: a record
    /// that is not one is dead-lettered at once, class `decode`). With `false`
    /// such records reach the handler as a [`Record`] without an envelope
    /// ([`try_envelope`](ConsumedEvent::try_envelope) is `None`, event type
    /// `""`) and the handler decodes them ([`decode`]): topics written by other
    /// producers. The [`Kafka`](crate::kafka::Kafka) facade sets `false`.
    pub fn require_envelope(mut self, required: bool) -> Self {
        self.require_envelope = required;
        self
    }

    /// Batch handlers by topic (the facade's `on_batch`; see [`batch`]).
    pub(crate) fn batches(mut self, routes: batch::BatchRoutes) -> Self {
        self.batches = Some(Arc::new(routes));
        self
    }

    /// Replaces the consumer group (the facade's `kafka.consumer(group)`).
    pub(crate) fn group(mut self, group_id: impl Into<String>) -> Self {
        self.group_id = group_id.into();
        self
    }

    /// Pauses or stops the consumer when too many records go to the DLQ within a
    /// window (see [`poison_guard`]). Default: no guard.
    pub fn poison_guard(mut self, guard: PoisonGuard) -> Self {
        self.poison_guard = guard;
        self
    }

    /// Makes sure the dead-letter topic of every topic in `options` exists before
    /// the consumer starts: creates the missing ones as `topics` says (partitions as
    /// the source topic and the broker's replication factor by default), leaves
    /// existing ones alone, waits until each partition has a leader. Fails with
    /// [`ConsumerError::DeadLetterTopic`] if it cannot. Does nothing when the start
    /// options disable the DLQ. Uses the dead-letter producer's connection settings.
    ///
    /// Without this step a dead-letter topic must exist already or be created by the
    /// broker on demand (`auto.create.topics.enable`).
    pub async fn ensure_dlq_topics(
        self,
        options: &StartOptions,
        topics: DeadLetterTopics,
    ) -> Result<Self, ConsumerError> {
        if options.enable_dlq {
            let client = self.dlq_client.as_ref().unwrap_or(&self.client);
            topics
                .ensure(client, &options.topics, &self.dlq_suffix)
                .await?;
        }
        Ok(self)
    }

    /// Registers the consumer with `client` when it starts: the client's
    /// [`health_check`](KafkaClient::health_check) counts it (`consumerCount`,
    /// `consumersConnected`) and [`disconnect`](KafkaClient::disconnect) shuts it
    /// down gracefully. It stays registered until it is shut down or dropped.
    /// [`KafkaConsumer::from_client`] sets this. Default: not registered.
    pub fn register_with(mut self, client: &KafkaClient) -> Self {
        self.kafka_client = Some(client.clone());
        self
    }

    /// Subscribes and starts handling with `handler`. Must be called inside a tokio
    /// runtime (lanes are tokio tasks; the poll loop is its own thread).
    pub fn start<S>(self, options: StartOptions, handler: S) -> Result<KafkaConsumer, ConsumerError>
    where
        S: Service<ConsumedEvent, Response = ()> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        if options.topics.is_empty() || options.topics.iter().any(String::is_empty) {
            return Err(ConsumerError::Config(
                "at least one non-empty topic is required".into(),
            ));
        }
        if self.group_id.is_empty() {
            return Err(ConsumerError::Config(
                "the consumer group id is empty".into(),
            ));
        }
        if self.workers == 0 || self.lane_capacity == 0 {
            return Err(ConsumerError::Config(
                "workers and lane_capacity must be at least 1".into(),
            ));
        }
        let rt = tokio::runtime::Handle::try_current().map_err(|_| {
            ConsumerError::Config(
                "KafkaConsumer::start must be called inside a tokio runtime".into(),
            )
        })?;

        let metrics = Arc::new(ConsumerMetrics::default());
        let (completions_tx, completions_rx) = mpsc::unbounded_channel();
        let ownership = Arc::new(ownership::Ownership::new(self.workers));
        let shared = Arc::new(Shared::new(
            completions_rx,
            metrics.clone(),
            !options.auto_commit,
            ownership.clone(),
            self.revoke_timeout,
        ));

        let mut config = self.client.clone();
        config
            .set("group.id", &self.group_id)
            .set(
                "enable.auto.commit",
                if options.auto_commit { "true" } else { "false" },
            )
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set(
                "auto.offset.reset",
                if options.from_beginning {
                    "earliest"
                } else {
                    "latest"
                },
            );
        if config.get("queued.max.messages.kbytes").is_none() {
            config.set("queued.max.messages.kbytes", "16384");
        }
        // librdkafka's 5 s default lets a crash redo up to 5 s of finished work;
        // commit what is finished promptly (librdkafka skips a commit when no
        // stored offset moved, so an idle consumer sends none).
        if options.auto_commit && config.get("auto.commit.interval.ms").is_none() {
            config.set(
                "auto.commit.interval.ms",
                self.commit_interval
                    .as_millis()
                    .clamp(1, 86_400_000)
                    .to_string(),
            );
        }
        let connection = ConnectionTracker::new("consumer", self.log_level);
        let consumer: KeelBaseConsumer = config
            .create_with_context(KeelConsumerContext {
                shared: shared.clone(),
                connection: connection.clone(),
            })
            .map_err(|e| ConsumerError::kafka("creating the consumer", e))?;
        let topics: Vec<&str> = options.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| ConsumerError::kafka("subscribing", e))?;
        let consumer = Arc::new(consumer);

        let dlq = if options.enable_dlq {
            Some(
                DeadLetterPublisher::new(
                    self.dlq_client.as_ref().unwrap_or(&self.client),
                    self.group_id.clone(),
                    self.dlq_suffix.clone(),
                )
                .map_err(|e| ConsumerError::kafka("creating the dead-letter producer", e))?,
            )
        } else {
            None
        };
        let (lane_stop, lane_stop_rx) = watch::channel(false);
        let state = Arc::new(StateCell::new());
        let stuck = Arc::new(StuckPartitions::new());
        let poison_guard = poison_guard::PoisonGuardState::new(self.poison_guard).map(Arc::new);
        let ctx = Arc::new(LaneContext {
            completions: completions_tx,
            metrics: metrics.clone(),
            dlq: dlq.clone(),
            backoff: *self.retry_policy.schedule_config(),
            on_dlq_failure: self.on_dlq_failure,
            stuck: stuck.clone(),
            state: state.clone(),
            stop: lane_stop_rx.clone(),
            ownership,
            require_envelope: self.require_envelope,
            #[cfg(feature = "otel")]
            group: Arc::from(self.group_id.as_str()),
            poison_guard: poison_guard.clone(),
        });
        let mut lanes = Vec::with_capacity(self.workers);
        let mut lane_tasks = Vec::with_capacity(self.workers);
        let (batch_max, lane_slots) = poll::lane_shape(self.lane_capacity);
        for index in 0..self.workers {
            let (tx, rx) = mpsc::channel(lane_slots);
            let policy = self.retry_policy.clone().max_retries(options.max_retries);
            let batches = self
                .batches
                .clone()
                .map(|routes| batch::BatchLane::new(routes, options.max_retries));
            let stack = Stack::new(handler.clone(), policy, metrics.clone()).with_batches(batches);
            lanes.push(tx);
            let lane = run_lane(index, rx, stack, ctx.clone(), lane_stop_rx.clone());
            lane_tasks.push(rt.spawn(supervise::guard_lane(lane, index, state.clone())));
        }

        let (commands, commands_rx) = mpsc::unbounded_channel();
        let poll_loop = PollLoop {
            consumer: consumer.clone(),
            shared: shared.clone(),
            lanes,
            batch_max,
            copy_capacity: 0,
            order: self.order,
            commands: commands_rx,
            rt: rt.clone(),
            poll_timeout: self.poll_timeout,
            commit_interval: self.commit_interval,
            last_tp: None,
            topics: HashMap::new(),
            backpressure_after: self.backpressure_after,
            backpressure: Backpressure::new(self.workers),
            last_reseek: std::time::Instant::now(),
            seen_generation: 0,
        };
        let weak = Arc::downgrade(&consumer);
        drop(consumer);
        let poll_state = state.clone();
        let poll_shared = shared.clone();
        std::thread::Builder::new()
            .name("keel-kafka-poll".into())
            .spawn(move || {
                poll_state.running();
                // A panic here fails the consumer visibly (state, health,
                // shutdown) instead of leaving it "running" with no poll thread.
                supervise::guard_thread("the poll thread", &poll_state, || poll_loop.run());
                poll_shared.running.store(false, Ordering::SeqCst);
            })
            .map_err(|e| ConsumerError::Config(format!("cannot start the poll thread: {e}")))?;
        tracing::info!(group_id = %self.group_id, topics = ?options.topics, workers = self.workers, order = ?self.order, "kafka consumer started");

        let control = Arc::new(ConsumerControl {
            shared,
            commands: Mutex::new(Some(commands)),
            lane_tasks: Mutex::new(lane_tasks),
            lane_stop,
            dlq: Mutex::new(dlq),
            group_id: self.group_id,
            topics: options.topics,
            connection,
            state: state.clone(),
            stuck: stuck.clone(),
            finished: Default::default(),
            closed: Default::default(),
            poison_guard: poison_guard.clone(),
        });
        if let Some(guard) = poison_guard.filter(|g| g.action() == PoisonAction::Pause) {
            rt.spawn(poison_guard::watch_guard(
                Arc::downgrade(&control),
                guard.subscribe(),
            ));
        }
        rt.spawn(supervise::supervise(
            Arc::downgrade(&control),
            state.subscribe(),
            stuck.subscribe(),
            stuck,
        ));
        let registration = self
            .kafka_client
            .map(|client| client.register_consumer(Arc::new(RegisteredConsumer(control.clone()))));
        Ok(KafkaConsumer {
            control,
            consumer: weak,
            registration,
        })
    }
}

/// Lag of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition.
    pub partition: TopicPartition,
    /// The broker's high watermark (offset of the next message to be written).
    pub high_watermark: i64,
    /// The next offset this consumer will commit (lowest unfinished), when known.
    pub position: Option<i64>,
    /// `high_watermark - position`: messages not yet handled; `None` while nothing
    /// has been fetched since the partition was assigned.
    pub lag: Option<i64>,
}

/// A running consumer; see [the module docs](self).
///
/// Dropping it without [`shutdown`](KafkaConsumer::shutdown) stops polling and the
/// workers at once and commits nothing more (like a crash, but tidy).
pub struct KafkaConsumer {
    control: Arc<ConsumerControl>,
    consumer: Weak<KeelBaseConsumer>,
    /// Keeps the consumer counted by the client it is registered with.
    registration: Option<ConsumerRegistration>,
}

impl fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("group_id", &self.control.group_id)
            .field("running", &self.is_running())
            .field("paused", &self.is_paused())
            .finish_non_exhaustive()
    }
}

impl KafkaConsumer {
    /// A builder over `client` (bootstrap servers, security and any librdkafka
    /// property) for consumer group `group_id`.
    pub fn builder(client: ClientConfig, group_id: impl Into<String>) -> KafkaConsumerBuilder {
        KafkaConsumerBuilder {
            client,
            dlq_client: None,
            group_id: group_id.into(),
            order: ProcessingOrder::Partition,
            workers: 1,
            lane_capacity: 256,
            retry_policy: RetryPolicy::kafka().without_budget(),
            dlq_suffix: DEFAULT_SUFFIX.to_string(),
            commit_interval: DEFAULT_COMMIT_INTERVAL,
            poll_timeout: Duration::from_millis(50),
            backpressure_after: Duration::from_millis(500),
            revoke_timeout: Duration::from_secs(10),
            kafka_client: None,
            log_level: KafkaLogLevel::default(),
            on_dlq_failure: DeadLetterFailure::default(),
            require_envelope: true,
            batches: None,
            poison_guard: PoisonGuard::default(),
        }
    }

    /// A builder from keel's [`KafkaConfig`]: its consumer settings
    /// (`KAFKA_BROKERS`, `KAFKA_CLIENT_ID`, `KAFKA_GROUP_ID`, timeouts, pass-through
    /// properties) and its producer settings for the dead-letter producer. Fails with
    /// [`ConsumerError::Disabled`] when `ENABLE_KAFKA=false`.
    pub fn from_config(config: &KafkaConfig) -> Result<KafkaConsumerBuilder, ConsumerError> {
        if !config.enabled() {
            return Err(ConsumerError::Disabled);
        }
        let mut builder = Self::builder(config.consumer_client_config(), config.group_id());
        builder.dlq_client = Some(config.producer_client_config());
        builder.log_level = config.log_level();
        Ok(builder)
    }

    /// A builder from a [`KafkaClient`]'s config, as [`from_config`](Self::from_config),
    /// registered with that client ([`register_with`](KafkaConsumerBuilder::register_with)):
    /// its health check counts the consumer and its `disconnect` shuts it down.
    pub fn from_client(client: &KafkaClient) -> Result<KafkaConsumerBuilder, ConsumerError> {
        Ok(Self::from_config(client.config())?.register_with(client))
    }

    /// The consumer group.
    pub fn group_id(&self) -> &str {
        &self.control.group_id
    }

    /// The subscribed topics.
    pub fn topics(&self) -> &[String] {
        &self.control.topics
    }

    /// Whether the consumer is registered with a [`KafkaClient`].
    pub fn is_registered(&self) -> bool {
        self.registration.is_some()
    }

    /// The consumer's connection state, driven by librdkafka's error events and
    /// statistics (when `statistics.interval.ms` is set, as
    /// [`from_config`](Self::from_config) does) and confirmed by partition
    /// assignments and successful commits.
    pub fn connection_state(&self) -> crate::kafka::client::ConnectionState {
        self.control.connection.state()
    }

    /// Whether the consumer is running: false after shutdown and once it has
    /// [failed](ConsumerState::Failed).
    pub fn is_running(&self) -> bool {
        self.control.is_running()
    }

    /// Where the consumer is in its life: starting, running, failed (with the
    /// cause) or stopped.
    pub fn state(&self) -> ConsumerState {
        self.control.state.get()
    }

    /// A watch on [`state`](Self::state): wake up when the consumer fails or
    /// stops (`receiver.wait_for(ConsumerState::is_failed)`).
    pub fn subscribe_state(&self) -> watch::Receiver<ConsumerState> {
        self.control.state.subscribe()
    }

    /// Partitions held now because a message cannot be dead-lettered, each with
    /// its oldest such message, time stuck, failed attempts and last error.
    pub fn stuck_partitions(&self) -> Vec<StuckPartition> {
        self.control.stuck.snapshot()
    }

    /// Whether consumption as a whole is paused ([`pause`](Self::pause)).
    pub fn is_paused(&self) -> bool {
        self.control.shared.paused_all.load(Ordering::SeqCst)
    }

    /// Whether one partition is paused (by itself or by a global pause).
    pub fn is_partition_paused(&self, topic: &str, partition: i32) -> bool {
        self.is_paused()
            || self
                .control
                .shared
                .paused()
                .contains(&TopicPartition::new(topic, partition))
    }

    /// A copy of the metrics.
    pub fn metrics(&self) -> ConsumerMetricsSnapshot {
        let mut snapshot = self.control.shared.metrics.snapshot();
        let stuck = self.control.stuck.snapshot();
        snapshot.stuck_partitions = stuck.len() as u64;
        snapshot.longest_stuck = stuck.iter().map(|s| s.stuck_for).max().unwrap_or_default();
        snapshot
    }

    /// Messages handed to workers and not finished yet.
    pub fn in_flight(&self) -> usize {
        self.control.shared.current_tracker().in_flight()
    }

    /// The partitions currently assigned to this consumer.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        let mut tps: Vec<TopicPartition> = self
            .control
            .shared
            .tracker()
            .partitions()
            .cloned()
            .collect();
        tps.sort();
        tps
    }

    async fn command(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), ConsumerError>>) -> Command,
    ) -> Result<(), ConsumerError> {
        let (tx, rx) = oneshot::channel();
        self.control.send(make(tx))?;
        rx.await.map_err(|_| ConsumerError::NotRunning)?
    }

    /// Stops fetching from every assigned partition (and from partitions assigned
    /// later, until resumed). Resolves once librdkafka has paused; messages already
    /// queued in lanes are still handled.
    pub async fn pause(&self) -> Result<(), ConsumerError> {
        self.command(|ack| Command::Pause(None, ack)).await
    }

    /// Resumes every partition, from one past the last message handed to a worker.
    pub async fn resume(&self) -> Result<(), ConsumerError> {
        self.command(|ack| Command::Resume(None, ack)).await
    }

    /// Pauses one partition.
    pub async fn pause_partition(&self, topic: &str, partition: i32) -> Result<(), ConsumerError> {
        let tp = TopicPartition::new(topic, partition);
        self.command(|ack| Command::Pause(Some(tp), ack)).await
    }

    /// Resumes one partition.
    pub async fn resume_partition(&self, topic: &str, partition: i32) -> Result<(), ConsumerError> {
        let tp = TopicPartition::new(topic, partition);
        self.command(|ack| Command::Resume(Some(tp), ack)).await
    }

    /// Lag per assigned partition from librdkafka's statistics: the high
    /// watermark of the partition's last fetch response, as the last statistics
    /// reported it (every [`statistics_interval`](crate::kafka::config::KafkaConfig::statistics_interval),
    /// 1 s by default), minus this consumer's commit position. No broker request:
    /// cheap enough for every `/metrics` scrape. Up to one interval old; a
    /// partition not reported yet has `high_watermark` -1 and `lag` `None`, and
    /// so has every partition of a consumer built from a `ClientConfig` without
    /// `statistics.interval.ms` ([`from_config`](Self::from_config) sets it).
    /// [`lag`](Self::lag) asks the broker instead.
    pub fn statistics_lag(&self) -> Vec<PartitionLag> {
        let shared = &self.control.shared;
        let tracker = shared.current_tracker();
        let mut lags: Vec<PartitionLag> = tracker
            .partitions()
            .map(|tp| {
                let position = tracker.commit_position(tp);
                let high = shared.watermarks.high(tp);
                PartitionLag {
                    partition: tp.clone(),
                    high_watermark: high.unwrap_or(-1),
                    position,
                    lag: high.zip(position).map(|(h, p)| (h - p).max(0)),
                }
            })
            .collect();
        lags.sort_by(|a, b| a.partition.cmp(&b.partition));
        lags
    }

    /// Lag per assigned partition: the broker's high watermark (one request per
    /// partition, each bounded by `timeout`) minus this consumer's commit position.
    /// [`statistics_lag`](Self::statistics_lag) reads it without a request.
    pub async fn lag(&self, timeout: Duration) -> Result<Vec<PartitionLag>, ConsumerError> {
        let positions: Vec<(TopicPartition, Option<i64>)> = {
            let tracker = self.control.shared.current_tracker();
            let mut v: Vec<_> = tracker
                .partitions()
                .map(|tp| (tp.clone(), tracker.commit_position(tp)))
                .collect();
            v.sort();
            v
        };
        let consumer = self.consumer.upgrade().ok_or(ConsumerError::NotRunning)?;
        tokio::task::spawn_blocking(move || {
            positions
                .into_iter()
                .map(|(tp, position)| {
                    let (_low, high) = consumer
                        .fetch_watermarks(&tp.topic, tp.partition, timeout)
                        .map_err(|e| ConsumerError::kafka("fetching watermarks", e))?;
                    Ok(PartitionLag {
                        lag: position.map(|p| (high - p).max(0)),
                        partition: tp,
                        high_watermark: high,
                        position,
                    })
                })
                .collect()
        })
        .await
        .map_err(|_| ConsumerError::NotRunning)?
    }

    /// Graceful shutdown bounded by `timeout`: stop fetching, let each lane finish
    /// the message it is on (queued ones stay uncommitted), commit, leave the group,
    /// flush the dead-letter producer. Past the deadline the rest is abandoned
    /// uncommitted and [`ConsumerError::ShutdownTimedOut`] is returned.
    ///
    /// A consumer registered with a [`KafkaClient`] is shut down the same way by
    /// the client's `disconnect`; whichever comes second waits for the first and
    /// reports its outcome.
    pub async fn shutdown(self, timeout: Duration) -> Result<(), ConsumerError> {
        self.control.shutdown(timeout).await
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        // Without a shutdown: abort (a no-op once a shutdown has started).
        self.control.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn start_refuses_bad_settings_before_any_io() {
        let handler = tower::service_fn(|_e: ConsumedEvent| async { Ok::<_, BoxError>(()) });
        let builder = KafkaConsumer::builder(ClientConfig::new(), "g");
        let err = builder
            .clone()
            .start(StartOptions::new(Vec::<String>::new()), handler)
            .unwrap_err();
        assert!(matches!(err, ConsumerError::Config(_)));
        let err = builder
            .clone()
            .workers(0)
            .start(StartOptions::new(["t"]), handler)
            .unwrap_err();
        assert!(matches!(err, ConsumerError::Config(_)));
        let err = KafkaConsumer::builder(ClientConfig::new(), "")
            .start(StartOptions::new(["t"]), handler)
            .unwrap_err();
        assert!(matches!(err, ConsumerError::Config(_)));
    }

    #[test]
    fn disabled_kafka_gives_a_clear_error() {
        let config = KafkaConfig::builder().enabled(false).build().unwrap();
        assert!(matches!(
            KafkaConsumer::from_config(&config),
            Err(ConsumerError::Disabled)
        ));
    }

    #[test]
    fn start_options_default_like_the_seed() {
        let o = StartOptions::new(["a", "b"]);
        assert_eq!(o.topics, vec!["a", "b"]);
        assert!(!o.from_beginning && o.auto_commit && o.enable_dlq);
        assert_eq!(o.max_retries, 3);
    }
}
