//! Making sure dead-letter topics exist before the consumer starts.

use super::error::DeadLetterTopicError;
use super::publisher::is_consumer_only;
use crate::kafka::client::partition_leaders;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use std::sync::Arc;
use std::time::Duration;

/// How keel creates missing dead-letter topics at start.
///
/// Without it a dead-letter topic must exist already, or the broker must create
/// topics on demand (`auto.create.topics.enable`, off in most production clusters,
/// and then with the broker's default partition count). With it, keel sends a
/// CreateTopics request for every dead-letter topic before the consumer subscribes
/// (a topic that already exists is left as it is) and waits until each partition
/// has a leader; anything else is a [`DeadLetterTopicError`].
///
/// Defaults:
/// - **partitions**: as many as the source topic has (read from metadata), so the
///   dead-letter topic takes the same load and a key lands in one partition;
/// - **replication factor**: the broker's default (`default.replication.factor`);
/// - **timeout**: 10 s for the whole request, and again for the leaders.
///
/// Cheap to clone; clones share nothing.
///
/// # Example
///
/// ```no_run
/// use keel::kafka::consumer::{BoxError, ConsumedEvent, KafkaConsumer, StartOptions};
/// use keel::kafka::dead_letter::DeadLetterTopics;
/// use rdkafka::ClientConfig;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let mut client = ClientConfig::new();
/// client.set("bootstrap.servers", "127.0.0.1:9092");
/// let options = StartOptions::new(["orders"]);
/// let handler = tower::service_fn(|_event: ConsumedEvent| async { Ok::<_, BoxError>(()) });
/// let consumer = KafkaConsumer::builder(client, "orders-service")
///     // `orders.dlq` with 3 partitions, replicated 3 times, unless it exists.
///     .ensure_dlq_topics(&options, DeadLetterTopics::new().partitions(3).replication(3))
///     .await?
///     .start(options, handler)?;
/// # drop(consumer);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterTopics {
    partitions: Option<i32>,
    replication: Option<i32>,
    timeout: Duration,
}

impl Default for DeadLetterTopics {
    fn default() -> Self {
        DeadLetterTopics {
            partitions: None,
            replication: None,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }
}

/// A dead-letter topic that exists, with its partition count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnsuredTopic {
    /// The dead-letter topic.
    pub topic: String,
    /// Its partition count, as metadata shows it.
    pub partitions: usize,
    /// Whether keel created it (`false`: it existed already).
    pub created: bool,
}

impl DeadLetterTopics {
    /// Default timeout of the CreateTopics request and of waiting for leaders: 10 s.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// The defaults: partitions as the source topic, the broker's replication
    /// factor, 10 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// Partitions of each created topic (default: as many as its source topic).
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.partitions = Some(partitions);
        self
    }

    /// Replication factor of each created topic (default: the broker's
    /// `default.replication.factor`).
    pub fn replication(mut self, replication: i32) -> Self {
        self.replication = Some(replication);
        self
    }

    /// Timeout of the CreateTopics request, and again of waiting for leaders
    /// (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Makes sure the dead-letter topic `<source><suffix>` of every source topic
    /// exists, through an admin client built from `client` (brokers, security;
    /// consumer-only properties are dropped). Creates the missing ones, leaves
    /// existing ones as they are, and waits until every partition has a leader.
    pub async fn ensure(
        &self,
        client: &ClientConfig,
        sources: &[String],
        suffix: &str,
    ) -> Result<Vec<EnsuredTopic>, DeadLetterTopicError> {
        if self.partitions.is_some_and(|p| p < 1) || self.replication.is_some_and(|r| r < 1) {
            return Err(DeadLetterTopicError::Config(format!(
                "partitions ({:?}) and replication ({:?}) must be at least 1",
                self.partitions, self.replication
            )));
        }
        let mut config = ClientConfig::new();
        for (k, v) in client.config_map() {
            if !is_consumer_only(k) {
                config.set(k, v);
            }
        }
        // The admin client is a producer to librdkafka, which would let its
        // metadata requests auto-create the topics they name.
        config.set("allow.auto.create.topics", "false");
        let admin: Arc<AdminClient<DefaultClientContext>> =
            Arc::new(config.create().map_err(DeadLetterTopicError::Client)?);
        let mut ensured = Vec::with_capacity(sources.len());
        for source in sources {
            ensured.push(self.ensure_one(&admin, source, suffix).await?);
        }
        Ok(ensured)
    }

    async fn ensure_one(
        &self,
        admin: &Arc<AdminClient<DefaultClientContext>>,
        source: &str,
        suffix: &str,
    ) -> Result<EnsuredTopic, DeadLetterTopicError> {
        let topic = format!("{source}{suffix}");
        let partitions = match self.partitions {
            Some(p) => p,
            None => self.source_partitions(admin, source).await?,
        };
        let replication = TopicReplication::Fixed(self.replication.unwrap_or(-1));
        let new = NewTopic::new(&topic, partitions, replication);
        let options = AdminOptions::new()
            .request_timeout(Some(self.timeout))
            .operation_timeout(Some(self.timeout));
        let results = admin
            .create_topics([&new], &options)
            .await
            .map_err(|source| DeadLetterTopicError::Request {
                topic: topic.clone(),
                source,
            })?;
        let mut created = true;
        for result in results {
            match result {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => created = false,
                Err((_, code)) => {
                    return Err(DeadLetterTopicError::Refused {
                        topic: topic.clone(),
                        code,
                    });
                }
            }
        }
        let expect = created.then_some(partitions);
        let count = partition_leaders(fetch(admin, &topic), &topic, expect, self.timeout)
            .await
            .ok_or_else(|| DeadLetterTopicError::NotReady {
                topic: topic.clone(),
                timeout: self.timeout,
            })?;
        tracing::info!(
            dlq_topic = %topic,
            partitions = count,
            created,
            "dead-letter topic ready"
        );
        Ok(EnsuredTopic {
            topic,
            partitions: count,
            created,
        })
    }

    async fn source_partitions(
        &self,
        admin: &Arc<AdminClient<DefaultClientContext>>,
        source: &str,
    ) -> Result<i32, DeadLetterTopicError> {
        let admin = admin.clone();
        let name = source.to_string();
        let timeout = self.timeout;
        let metadata =
            tokio::task::spawn_blocking(move || admin.inner().fetch_metadata(Some(&name), timeout))
                .await;
        let fail = |message: String| DeadLetterTopicError::SourceTopic {
            topic: source.to_string(),
            message,
        };
        let metadata = match metadata {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Err(join) => return Err(fail(join.to_string())),
        };
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == source)
            .ok_or_else(|| fail("not in the metadata answer".into()))?;
        if let Some(e) = t.error() {
            return Err(fail(RDKafkaErrorCode::from(e).to_string()));
        }
        match t.partitions().len() {
            0 => Err(fail("it has no partitions".into())),
            n => Ok(i32::try_from(n).unwrap_or(i32::MAX)),
        }
    }
}

/// A blocking metadata request for `topic` through `admin`.
fn fetch(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    topic: &str,
) -> impl Fn() -> Option<rdkafka::metadata::Metadata> + Clone + Send + 'static {
    let admin = admin.clone();
    let topic = topic.to_string();
    move || {
        admin
            .inner()
            .fetch_metadata(Some(&topic), Duration::from_secs(1))
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn invalid_counts_are_refused_before_any_io() {
        let err = DeadLetterTopics::new()
            .partitions(0)
            .ensure(&ClientConfig::new(), &["t".into()], ".dlq")
            .await
            .unwrap_err();
        assert!(matches!(err, DeadLetterTopicError::Config(_)), "{err}");
        let err = DeadLetterTopics::new()
            .replication(0)
            .ensure(&ClientConfig::new(), &["t".into()], ".dlq")
            .await
            .unwrap_err();
        assert!(matches!(err, DeadLetterTopicError::Config(_)), "{err}");
    }

    #[test]
    fn defaults_follow_the_source_topic_and_the_broker() {
        let d = DeadLetterTopics::default();
        assert_eq!(d.partitions, None);
        assert_eq!(d.replication, None);
        assert_eq!(d.timeout, Duration::from_secs(10));
    }
}
