//! Replaying dead-lettered records to the topic they came from (or another one).
//!
//! # Why
//!
//! A dead-letter topic is a parking place: once the bug that sent records there is
//! fixed, they must go back to be handled. Copying them by hand (kcat, a script) is
//! where records get lost or doubled: a copy killed half-way and started again
//! republishes what it had already sent. [`Replay`] does it the way Kafka Streams
//! does exactly-once: a **transactional producer** writes a batch of records and,
//! in the same transaction, the replay's own consumer-group offsets on the
//! dead-letter topic ([`send_offsets_to_transaction`]). Either both commit or
//! neither does, so a replay that is stopped, crashes or is killed (`kill -9`) and
//! is started again with the same group goes on from the last committed batch,
//! and every record lands exactly once for a `read_committed` reader (keel's
//! consumer reads committed data by default in librdkafka; set
//! `isolation.level=read_committed` on other readers). A second replay with the same
//! group fences the first (same `transactional.id`): a zombie cannot commit.
//!
//! # What is written
//!
//! Each record keeps its key, its payload and its original headers, in order. The
//! dead-letter provenance headers (`keel-dlq-*`, see [`headers`])
//! are dropped, so the record looks as it did before it failed, and two headers are
//! set: [`REPLAY_COUNT`](super::headers::REPLAY_COUNT) (1 on the first replay, one
//! more each time a replayed record is dead-lettered and replayed again) and
//! [`REPLAYED_FROM`](super::headers::REPLAYED_FROM) (`<dlq topic>/<partition>@<offset>`).
//! The destination is the record's [`ORIGINAL_TOPIC`](super::headers::ORIGINAL_TOPIC)
//! header and partition ([`ORIGINAL_PARTITION`](super::headers::ORIGINAL_PARTITION)),
//! or, with [`Replay::to`], another topic, partitioned by key. A record without
//! the header and no `to` stops the replay with [`ReplayError::Unroutable`] before
//! anything past it is committed.
//!
//! # How far
//!
//! A replay reads each partition of the dead-letter topic from the group's committed
//! offset (the beginning the first time) up to its end *as it was when the replay
//! started*; records dead-lettered meanwhile wait for the next run. Records a
//! [filter](Replay::filter) rejects are skipped, and their offsets are committed
//! too: the progress belongs to the group, so use one group per filter. A
//! [dry run](Replay::dry_run) reads and reports (through
//! [`on_record`](Replay::on_record)) what it would replay, commits nothing and
//! writes nothing. [`Replay::rate`] caps the records written per second.
//!
//! # Example
//!
//! ```no_run
//! use keel::kafka::dead_letter::replay::Replay;
//! use rdkafka::ClientConfig;
//!
//! # async fn f() -> Result<(), keel::kafka::dead_letter::replay::ReplayError> {
//! let mut client = ClientConfig::new();
//! client.set("bootstrap.servers", "127.0.0.1:9092");
//! let report = Replay::new(client, "orders.dlq")
//!     .filter_header("keel-dlq-error-kind", "timeout")
//!     .rate(500.0)
//!     .run()
//!     .await?;
//! println!("{} records replayed in {:?}", report.replayed, report.elapsed);
//! # Ok(()) }
//! ```
//!
//! [`send_offsets_to_transaction`]: rdkafka::producer::Producer::send_offsets_to_transaction

use super::headers;
use super::publisher::is_consumer_only;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest wait of one broker request (metadata, offsets, transaction steps).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A record of the dead-letter topic, as a [filter](Replay::filter) sees it.
pub struct ReplayRecord<'a> {
    message: &'a BorrowedMessage<'a>,
}

impl fmt::Debug for ReplayRecord<'_> {
    // Key and payload stay out of Debug output (they may be personal data).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayRecord")
            .field("partition", &self.partition())
            .field("offset", &self.offset())
            .field("original_topic", &self.original_topic())
            .finish_non_exhaustive()
    }
}

impl<'a> ReplayRecord<'a> {
    /// Its partition in the dead-letter topic.
    pub fn partition(&self) -> i32 {
        self.message.partition()
    }

    /// Its offset in the dead-letter topic.
    pub fn offset(&self) -> i64 {
        self.message.offset()
    }

    /// Its key.
    pub fn key(&self) -> Option<&'a [u8]> {
        self.message.key()
    }

    /// Its payload.
    pub fn payload(&self) -> Option<&'a [u8]> {
        self.message.payload()
    }

    /// The value of its first header named `name`.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.message
            .headers()?
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
    }

    /// [`header`](Self::header) as UTF-8 text.
    pub fn header_str(&self, name: &str) -> Option<&'a str> {
        std::str::from_utf8(self.header(name)?).ok()
    }

    /// The topic it was dead-lettered from ([`headers::ORIGINAL_TOPIC`]).
    pub fn original_topic(&self) -> Option<&'a str> {
        self.header_str(headers::ORIGINAL_TOPIC)
    }
}

/// What a replay did (so far, when given to [`Replay::on_progress`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Records read from the dead-letter topic.
    pub read: u64,
    /// Records written (in committed transactions), or, in a dry run, records that
    /// would have been.
    pub replayed: u64,
    /// Records a filter rejected.
    pub skipped: u64,
    /// Records written per destination topic.
    pub by_topic: BTreeMap<String, u64>,
    /// Transactions committed.
    pub transactions: u64,
    /// Whether every partition was read to the end it had when the replay started
    /// (`false` when the replay gave up waiting: see [`Replay::idle_timeout`]).
    pub complete: bool,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// From the start of the replay.
    pub elapsed: Duration,
}

impl ReplayReport {
    /// Records written per second of the replay.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.replayed as f64 / secs
        } else {
            0.0
        }
    }
}

/// Why a replay stopped early. Whatever was committed before stays committed; a
/// new run with the same group goes on from there.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// A setting is not usable.
    #[error("invalid replay settings: {0}")]
    Config(String),
    /// The dead-letter topic does not exist (or has no partitions).
    #[error("topic {0} not found")]
    UnknownTopic(String),
    /// A record names no original topic and no destination was given.
    #[error(
        "record {topic}/{partition}@{offset} has no {} header; give a destination topic",
        headers::ORIGINAL_TOPIC
    )]
    Unroutable {
        /// The dead-letter topic.
        topic: String,
        /// The record's partition.
        partition: i32,
        /// The record's offset.
        offset: i64,
    },
    /// A Kafka call failed; the open transaction (if any) was aborted.
    #[error("{context}: {source}")]
    Kafka {
        /// What was being done.
        context: &'static str,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
    /// The replay's thread ended abnormally.
    #[error("replay task failed: {0}")]
    Task(String),
}

fn kafka(context: &'static str) -> impl FnOnce(KafkaError) -> ReplayError {
    move |source| ReplayError::Kafka { context, source }
}

type Filter = Arc<dyn Fn(&ReplayRecord<'_>) -> bool + Send + Sync>;
type Progress = Arc<dyn Fn(&ReplayReport) + Send + Sync>;
type OnRecord = Arc<dyn Fn(&ReplayRecord<'_>, &str) + Send + Sync>;

/// Replays the records of a dead-letter topic; see [the module docs](self).
///
/// | setting | default |
/// |---|---|
/// | [`to`](Self::to) | each record's original topic and partition |
/// | [`group_id`](Self::group_id) | `keel-dlq-replay.<from>` |
/// | [`transactional_id`](Self::transactional_id) | `keel-dlq-replay.<group id>` |
/// | [`filter`](Self::filter) | none (every record) |
/// | [`dry_run`](Self::dry_run) | off |
/// | [`rate`](Self::rate) | unlimited |
/// | [`batch`](Self::batch) | 500 records (or 1 s) per transaction |
/// | [`idle_timeout`](Self::idle_timeout) | 10 s |
#[derive(Clone)]
pub struct Replay {
    client: ClientConfig,
    from: String,
    to: Option<String>,
    group_id: Option<String>,
    transactional_id: Option<String>,
    filters: Vec<Filter>,
    dry_run: bool,
    rate: Option<f64>,
    batch: usize,
    idle_timeout: Duration,
    on_progress: Option<Progress>,
    on_record: Option<OnRecord>,
}

impl fmt::Debug for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replay")
            .field("from", &self.from)
            .field("to", &self.to)
            .field("group_id", &self.group_id())
            .field("filters", &self.filters.len())
            .field("dry_run", &self.dry_run)
            .field("rate", &self.rate)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl Replay {
    /// A replay of dead-letter topic `from`, over `client` (bootstrap servers,
    /// security and any librdkafka property; properties of only the consumer or only
    /// the producer are dropped from the other).
    pub fn new(client: ClientConfig, from: impl Into<String>) -> Self {
        Replay {
            client,
            from: from.into(),
            to: None,
            group_id: None,
            transactional_id: None,
            filters: Vec::new(),
            dry_run: false,
            rate: None,
            batch: 500,
            idle_timeout: Duration::from_secs(10),
            on_progress: None,
            on_record: None,
        }
    }

    /// Writes every record to `topic` (partitioned by key) instead of its original
    /// topic.
    pub fn to(mut self, topic: impl Into<String>) -> Self {
        self.to = Some(topic.into());
        self
    }

    /// The consumer group whose committed offsets on the dead-letter topic are the
    /// replay's progress (default `keel-dlq-replay.<from>`).
    pub fn group_id(&self) -> String {
        self.group_id
            .clone()
            .unwrap_or_else(|| format!("keel-dlq-replay.{}", self.from))
    }

    /// Sets the consumer group (see [`group_id`](Self::group_id)).
    pub fn group(mut self, group_id: impl Into<String>) -> Self {
        self.group_id = Some(group_id.into());
        self
    }

    /// The producer's `transactional.id` (default `keel-dlq-replay.<group id>`):
    /// a replay started with the same id fences an older one still running.
    pub fn transactional_id(mut self, id: impl Into<String>) -> Self {
        self.transactional_id = Some(id.into());
        self
    }

    /// Replays only the records `keep` accepts (all filters must accept).
    pub fn filter<F>(mut self, keep: F) -> Self
    where
        F: Fn(&ReplayRecord<'_>) -> bool + Send + Sync + 'static,
    {
        self.filters.push(Arc::new(keep));
        self
    }

    /// Replays only records whose header `name` is exactly `value` (for example
    /// `keel-dlq-error-kind` = `timeout`, or `keel-dlq-original-partition` = `3`).
    pub fn filter_header(self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let (name, value) = (name.into(), value.into());
        self.filter(move |r| r.header(&name) == Some(value.as_bytes()))
    }

    /// Reads and reports without writing or committing anything.
    pub fn dry_run(mut self, yes: bool) -> Self {
        self.dry_run = yes;
        self
    }

    /// Writes at most `per_second` records per second (ignored unless positive
    /// and finite). Default unlimited.
    pub fn rate(mut self, per_second: f64) -> Self {
        self.rate = (per_second.is_finite() && per_second > 0.0).then_some(per_second);
        self
    }

    /// Records per transaction (at least 1; default 500). A transaction also ends
    /// after 1 s, so progress is committed at least every second at low rates.
    pub fn batch(mut self, records: usize) -> Self {
        self.batch = records.max(1);
        self
    }

    /// Gives up when no record arrives for this long before the end is reached
    /// (records deleted by retention, a partition without a leader); the report
    /// then says `complete: false`. Default 10 s.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Runs `report` after each committed transaction (and at the end of a dry run)
    /// with the counts so far.
    pub fn on_progress<F>(mut self, report: F) -> Self
    where
        F: Fn(&ReplayReport) + Send + Sync + 'static,
    {
        self.on_progress = Some(Arc::new(report));
        self
    }

    /// Runs `seen` for each record that is (or in a dry run would be) replayed,
    /// with its destination topic.
    pub fn on_record<F>(mut self, seen: F) -> Self
    where
        F: Fn(&ReplayRecord<'_>, &str) + Send + Sync + 'static,
    {
        self.on_record = Some(Arc::new(seen));
        self
    }

    /// Runs the replay to the end the topic had when it started (on a blocking
    /// thread: the transaction calls block).
    pub async fn run(self) -> Result<ReplayReport, ReplayError> {
        tokio::task::spawn_blocking(move || self.run_blocking())
            .await
            .map_err(|e| ReplayError::Task(e.to_string()))?
    }

    /// [`run`](Self::run) on the calling thread.
    pub fn run_blocking(self) -> Result<ReplayReport, ReplayError> {
        if self.from.is_empty() || self.to.as_deref() == Some("") {
            return Err(ReplayError::Config("empty topic name".into()));
        }
        let group = self.group_id();
        let mut consumer_config = self.client.clone();
        consumer_config
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed");
        // Bounded prefetch, as keel's consumer (librdkafka's default is 64 MiB).
        if self.client.get("queued.max.messages.kbytes").is_none() {
            consumer_config.set("queued.max.messages.kbytes", "16384");
        }
        let consumer: BaseConsumer = consumer_config
            .create()
            .map_err(kafka("creating the consumer"))?;
        let producer = if self.dry_run {
            None
        } else {
            let mut config = ClientConfig::new();
            for (k, v) in self.client.config_map() {
                if !is_consumer_only(k) {
                    config.set(k, v);
                }
            }
            let id = self
                .transactional_id
                .clone()
                .unwrap_or_else(|| format!("keel-dlq-replay.{group}"));
            config
                .set("transactional.id", id)
                .set("enable.idempotence", "true")
                .set("acks", "all");
            // Back-to-back transactions: the first request of the next one often
            // meets CONCURRENT_TRANSACTIONS while the broker writes the last one's
            // markers (KAFKA-5477); librdkafka's 100 ms retry backoff then adds
            // 100 ms to a transaction of a few milliseconds.
            if self.client.get("retry.backoff.ms").is_none() {
                config.set("retry.backoff.ms", "10");
            }
            let producer: BaseProducer = config
                .create()
                .map_err(kafka("creating the transactional producer"))?;
            // First: fences an older replay of this group and aborts (or finishes)
            // its open transaction, so the offsets read next are settled.
            producer
                .init_transactions(REQUEST_TIMEOUT)
                .map_err(kafka("initialising transactions"))?;
            Some(producer)
        };
        let mut run = Run::start(self, consumer, producer)?;
        let result = run.replay();
        if result.is_err()
            && let Some(producer) = &run.producer
        {
            // Nothing written after the last commit becomes visible.
            let _ = producer.abort_transaction(REQUEST_TIMEOUT);
        }
        result
    }
}

/// Spaces writes `1 / rate` apart; a pause does not earn a burst.
#[derive(Debug)]
pub(crate) struct Pacer {
    interval: Duration,
    next: Option<Instant>,
}

impl Pacer {
    pub(crate) fn new(per_second: f64) -> Self {
        Pacer {
            interval: Duration::from_secs_f64(1.0 / per_second),
            next: None,
        }
    }

    /// How long to wait at `now` before the next write.
    pub(crate) fn delay(&mut self, now: Instant) -> Duration {
        let due = match self.next {
            Some(next) if next > now => next,
            _ => now,
        };
        self.next = Some(due + self.interval);
        due - now
    }
}

/// Partition state of a running replay.
#[derive(Debug)]
struct Part {
    /// Next offset to read (and to commit).
    next: i64,
    /// End at the start of the replay (high watermark).
    end: i64,
    paused: bool,
}

struct Run {
    replay: Replay,
    /// Shared with the loop, which holds each message it polled while the run
    /// handles it.
    consumer: Arc<BaseConsumer>,
    producer: Option<BaseProducer>,
    parts: BTreeMap<i32, Part>,
    pacer: Option<Pacer>,
    report: ReplayReport,
    started: Instant,
}

impl Run {
    fn start(
        replay: Replay,
        consumer: BaseConsumer,
        producer: Option<BaseProducer>,
    ) -> Result<Self, ReplayError> {
        let from = replay.from.clone();
        let metadata = consumer
            .fetch_metadata(Some(&from), REQUEST_TIMEOUT)
            .map_err(kafka("reading the topic's metadata"))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == from && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(ReplayError::UnknownTopic(from));
        }
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition(&from, *p);
        }
        let committed = consumer
            .committed_offsets(tpl, REQUEST_TIMEOUT)
            .map_err(kafka("reading the replay's committed offsets"))?;
        let mut parts = BTreeMap::new();
        let mut assign = TopicPartitionList::new();
        for p in partitions {
            let (low, end) = consumer
                .fetch_watermarks(&from, p, REQUEST_TIMEOUT)
                .map_err(kafka("reading the topic's watermarks"))?;
            let next = match committed.find_partition(&from, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o.max(low),
                _ => low,
            };
            assign
                .add_partition_offset(&from, p, Offset::Offset(next))
                .map_err(kafka("assigning the topic"))?;
            parts.insert(
                p,
                Part {
                    next,
                    end,
                    paused: false,
                },
            );
        }
        consumer
            .assign(&assign)
            .map_err(kafka("assigning the topic"))?;
        tracing::info!(
            topic = %from,
            group = %replay.group_id(),
            dry_run = replay.dry_run,
            to_read = parts.values().map(|p| (p.end - p.next).max(0)).sum::<i64>(),
            "dead-letter replay started"
        );
        Ok(Run {
            pacer: replay.rate.map(Pacer::new),
            report: ReplayReport {
                dry_run: replay.dry_run,
                ..ReplayReport::default()
            },
            replay,
            consumer: Arc::new(consumer),
            producer,
            parts,
            started: Instant::now(),
        })
    }

    fn done(&self) -> bool {
        self.parts.values().all(|p| p.next >= p.end)
    }

    fn replay(&mut self) -> Result<ReplayReport, ReplayError> {
        let consumer = self.consumer.clone();
        let mut last_record = Instant::now();
        let mut complete = self.done();
        while !complete {
            if let Some(producer) = &self.producer {
                producer
                    .begin_transaction()
                    .map_err(kafka("beginning a transaction"))?;
            }
            let batch_started = Instant::now();
            let mut in_batch = 0usize;
            let mut idle = false;
            while in_batch < self.replay.batch && batch_started.elapsed() < Duration::from_secs(1) {
                if self.done() {
                    complete = true;
                    break;
                }
                let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                    if last_record.elapsed() >= self.replay.idle_timeout {
                        idle = true;
                        break;
                    }
                    continue;
                };
                let message = message.map_err(kafka("reading the dead-letter topic"))?;
                last_record = Instant::now();
                if self.take(&message)? {
                    in_batch += 1;
                }
            }
            self.commit()?;
            if idle {
                tracing::warn!(topic = %self.replay.from, "dead-letter replay gave up waiting for records before the end");
                break;
            }
        }
        self.report.complete = complete;
        self.report.elapsed = self.started.elapsed();
        tracing::info!(
            topic = %self.replay.from,
            read = self.report.read,
            replayed = self.report.replayed,
            skipped = self.report.skipped,
            complete,
            "dead-letter replay finished"
        );
        Ok(self.report.clone())
    }

    /// Handles one record read; whether it was written (or would be).
    fn take(&mut self, message: &BorrowedMessage<'_>) -> Result<bool, ReplayError> {
        let (p, offset) = (message.partition(), message.offset());
        let Some(part) = self.parts.get_mut(&p) else {
            return Ok(false);
        };
        if offset >= part.end {
            // Past the end this run covers: leave it (uncommitted) for the next.
            if !part.paused {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&self.replay.from, p);
                let _ = self.consumer.pause(&tpl);
                part.paused = true;
            }
            return Ok(false);
        }
        part.next = offset + 1;
        self.report.read += 1;
        let record = ReplayRecord { message };
        if !self.replay.filters.iter().all(|keep| keep(&record)) {
            self.report.skipped += 1;
            return Ok(false);
        }
        let (topic, partition) = match &self.replay.to {
            Some(to) => (to.clone(), None),
            None => match record.original_topic() {
                Some(t) if !t.is_empty() => (
                    t.to_string(),
                    record
                        .header_str(headers::ORIGINAL_PARTITION)
                        .and_then(|p| p.parse::<i32>().ok()),
                ),
                _ => {
                    return Err(ReplayError::Unroutable {
                        topic: self.replay.from.clone(),
                        partition: p,
                        offset,
                    });
                }
            },
        };
        if let Some(seen) = &self.replay.on_record {
            seen(&record, &topic);
        }
        if let Some(producer) = &self.producer {
            if let Some(pacer) = &mut self.pacer {
                std::thread::sleep(pacer.delay(Instant::now()));
            }
            let headers = replay_headers(message, &self.replay.from);
            let mut out: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&topic).headers(headers);
            if let Some(partition) = partition {
                out = out.partition(partition);
            }
            if let Some(key) = message.key() {
                out = out.key(key);
            }
            if let Some(payload) = message.payload() {
                out = out.payload(payload);
            }
            loop {
                match producer.send(out) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        out = back;
                        producer.poll(Duration::from_millis(50));
                    }
                    Err((e, _)) => return Err(kafka("writing a replayed record")(e)),
                }
            }
            producer.poll(Duration::ZERO);
        }
        self.report.replayed += 1;
        *self.report.by_topic.entry(topic).or_default() += 1;
        Ok(true)
    }

    /// Commits the open transaction with the replay's offsets (a dry run commits
    /// nothing).
    fn commit(&mut self) -> Result<(), ReplayError> {
        let Some(producer) = &self.producer else {
            if self.done()
                && let Some(progress) = &self.replay.on_progress
            {
                self.report.elapsed = self.started.elapsed();
                progress(&self.report);
            }
            return Ok(());
        };
        let mut offsets = TopicPartitionList::new();
        for (p, part) in &self.parts {
            offsets
                .add_partition_offset(&self.replay.from, *p, Offset::Offset(part.next))
                .map_err(kafka("preparing the offsets"))?;
        }
        let group = self
            .consumer
            .group_metadata()
            .ok_or_else(|| ReplayError::Config("the consumer has no group metadata".into()))?;
        // rust-rdkafka's flush (inside commit_transaction) polls in steps of up to
        // 100 ms; serving the delivery reports here first saves that wait.
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        while producer.in_flight_count() > 0 && Instant::now() < deadline {
            producer.poll(Duration::from_millis(1));
        }
        producer
            .send_offsets_to_transaction(&offsets, &group, REQUEST_TIMEOUT)
            .map_err(kafka("adding the offsets to the transaction"))?;
        producer
            .commit_transaction(REQUEST_TIMEOUT)
            .map_err(kafka("committing the transaction"))?;
        self.report.transactions += 1;
        self.report.elapsed = self.started.elapsed();
        if let Some(progress) = &self.replay.on_progress {
            progress(&self.report);
        }
        Ok(())
    }
}

/// The record's headers without the dead-letter provenance, plus the replay
/// headers.
fn replay_headers(message: &BorrowedMessage<'_>, from: &str) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    let mut count = 0u32;
    if let Some(hs) = message.headers() {
        for h in hs.iter() {
            if h.key == headers::REPLAY_COUNT {
                count = h
                    .value
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                continue;
            }
            if h.key.starts_with("keel-dlq-") || h.key == headers::REPLAYED_FROM {
                continue;
            }
            out = out.insert(h);
        }
    }
    let count = count.saturating_add(1).to_string();
    let source = format!("{from}/{}@{}", message.partition(), message.offset());
    out.insert(Header {
        key: headers::REPLAY_COUNT,
        value: Some(count.as_bytes()),
    })
    .insert(Header {
        key: headers::REPLAYED_FROM,
        value: Some(source.as_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_spaces_writes_and_a_pause_earns_no_burst() {
        let mut pacer = Pacer::new(100.0); // 10 ms apart
        let t0 = Instant::now();
        assert_eq!(pacer.delay(t0), Duration::ZERO);
        assert_eq!(pacer.delay(t0), Duration::from_millis(10));
        assert_eq!(
            pacer.delay(t0 + Duration::from_millis(5)),
            Duration::from_millis(15)
        );
        // A long pause: the next write goes at once, the one after 10 ms later.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(pacer.delay(later), Duration::ZERO);
        assert_eq!(pacer.delay(later), Duration::from_millis(10));
    }

    #[test]
    fn settings_and_defaults() {
        let r = Replay::new(ClientConfig::new(), "orders.dlq");
        assert_eq!(r.group_id(), "keel-dlq-replay.orders.dlq");
        assert_eq!(r.batch, 500);
        assert_eq!(r.rate, None);
        let r = r.group("g").rate(f64::NAN).batch(0).rate(-1.0);
        assert_eq!((r.group_id().as_str(), r.rate, r.batch), ("g", None, 1));
        assert_eq!(r.rate(250.0).rate, Some(250.0));
    }

    #[test]
    fn an_empty_topic_name_is_a_typed_error() {
        let err = Replay::new(ClientConfig::new(), "")
            .run_blocking()
            .unwrap_err();
        assert!(matches!(err, ReplayError::Config(_)), "{err}");
        let err = Replay::new(ClientConfig::new(), "a.dlq")
            .to("")
            .run_blocking()
            .unwrap_err();
        assert!(matches!(err, ReplayError::Config(_)), "{err}");
    }
}
