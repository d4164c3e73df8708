//! Embedded defaults: an in-process Kafka (rdkafka's `MockCluster`) and an
//! in-process S3 server (s3s + s3s-fs on a temporary folder), so the examples run
//! on a fresh machine with no set-up. Shared by the examples with `#[path]`.

#![allow(dead_code)] // each example uses the part it needs

use std::net::SocketAddr;
use std::path::Path;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use hyper_util::server::graceful::GracefulShutdown;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// An in-process Kafka: librdkafka's mock cluster. It lives on a producer-like
/// client that this value owns, so keep it alive as long as the process uses it.
pub struct EmbeddedKafka {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedKafka {
    /// Starts a one-broker mock cluster.
    pub fn start() -> Result<Self, rdkafka::error::KafkaError> {
        Ok(EmbeddedKafka {
            cluster: MockCluster::new(1)?,
        })
    }

    /// The bootstrap servers to give clients.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates `topic` with `partitions` partitions (the mock has one broker, so
    /// replication 1). Creating an existing topic is not an error here.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        if let Err(e) = self.cluster.create_topic(topic, partitions, 1) {
            tracing::debug!(topic, error = %e, "mock topic not created (exists?)");
        }
    }
}

/// The credentials the embedded S3 server checks (SigV4 is verified).
pub const EMBEDDED_ACCESS_KEY: &str = "keel-embedded";

/// An in-process S3 server: s3s-fs storing objects in a temporary folder, served
/// with hyper on `127.0.0.1:<free port>`, checking SigV4 signatures against one
/// access key. Stops (gracefully) on [`stop`](Self::stop) or when dropped; the
/// folder is removed when dropped.
pub struct EmbeddedS3 {
    addr: SocketAddr,
    secret_key: String,
    bucket: String,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    _root: tempfile::TempDir,
}

impl EmbeddedS3 {
    /// Starts the server with `bucket` created.
    pub async fn start(bucket: &str) -> std::io::Result<Self> {
        let root = tempfile::Builder::new().prefix("keel-s3-").tempdir()?;
        create_bucket_dir(root.path(), bucket)?;
        let fs = s3s_fs::FileSystem::new(root.path())
            .map_err(|e| std::io::Error::other(format!("s3s-fs: {e:?}")))?;
        // A fresh secret per process: nothing to configure, nothing to leak.
        let secret_key = uuid::Uuid::new_v4().simple().to_string();
        let service = {
            let mut builder = S3ServiceBuilder::new(fs);
            builder.set_auth(SimpleAuth::from_single(
                EMBEDDED_ACCESS_KEY,
                secret_key.as_str(),
            ));
            builder.build()
        };
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            let graceful = GracefulShutdown::new();
            loop {
                let socket = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((socket, _)) => socket,
                        Err(e) => {
                            tracing::warn!(error = %e, "embedded S3: accept failed");
                            continue;
                        }
                    },
                    _ = stopped.changed() => break,
                };
                let conn = http.serve_connection(TokioIo::new(socket), service.clone());
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            drop(listener);
            // In-flight requests finish; idle connections close at once.
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), graceful.shutdown()).await;
        });
        Ok(EmbeddedS3 {
            addr,
            secret_key,
            bucket: bucket.to_string(),
            stop,
            task: Some(task),
            _root: root,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The access key clients sign with.
    pub fn access_key(&self) -> &str {
        EMBEDDED_ACCESS_KEY
    }

    /// The secret key clients sign with.
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The bucket created at start.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Stops accepting connections and waits (at most 5 s) for requests in flight.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for EmbeddedS3 {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn create_bucket_dir(root: &Path, bucket: &str) -> std::io::Result<()> {
    // s3s-fs keeps one directory per bucket under its root.
    std::fs::create_dir_all(root.join(bucket))
}
