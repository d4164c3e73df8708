//! A consumer *process* for the fault suite (`tests/fault_consumer.rs`): it consumes
//! one topic with keel's [`KafkaConsumer`] and appends one line per handled event
//! to a file, so that a test can kill it with `SIGKILL` at any moment and still
//! know exactly what it handled.
//!
//! Each line is `pid unix_ms partition offset key seq event_id`, written with one
//! unbuffered `write` before the handler returns (so before keel may commit the
//! offset): a line on disk means "handled", whatever happens to the process
//! afterwards. The event's payload must carry `key` and `seq` (the tests' keyed
//! events); the rest of the envelope is not read.
//!
//! ```text
//! cargo run --example fault_consumer -- --brokers 127.0.0.1:9092 --topic T \
//!     --group G --out handled.txt [--handle-ms 1] [--workers 3] [--session-timeout-ms 6000]
//! ```
//!
//! `SIGTERM` (or Ctrl-C) shuts the consumer down gracefully (commits what it
//! finished); `SIGKILL` is the crash the tests inject.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel::kafka::consumer::{BoxError, ConsumedEvent, KafkaConsumer, StartOptions};
use keel::kafka::registry::HandlerRegistry;
use rdkafka::ClientConfig;

/// The command line, all `--name value`.
struct Args {
    brokers: String,
    topic: String,
    group: String,
    out: String,
    handle_ms: u64,
    workers: usize,
    session_timeout_ms: u64,
    event_type: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: fault_consumer --brokers B --topic T --group G --out FILE \
         [--handle-ms 0] [--workers 1] [--session-timeout-ms 6000] [--event-type order.created]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        brokers: String::new(),
        topic: String::new(),
        group: String::new(),
        out: String::new(),
        handle_ms: 0,
        workers: 1,
        // The broker's smallest allowed session (group.min.session.timeout.ms), so
        // that a killed member leaves the group soon.
        session_timeout_ms: 6_000,
        event_type: "order.created".to_string(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(name) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        let number = |v: &str| v.parse::<u64>().unwrap_or_else(|_| usage());
        match name.as_str() {
            "--brokers" => args.brokers = value,
            "--topic" => args.topic = value,
            "--group" => args.group = value,
            "--out" => args.out = value,
            "--handle-ms" => args.handle_ms = number(&value),
            "--workers" => args.workers = number(&value).max(1) as usize,
            "--session-timeout-ms" => args.session_timeout_ms = number(&value),
            "--event-type" => args.event_type = value,
            _ => usage(),
        }
    }
    if args.brokers.is_empty()
        || args.topic.is_empty()
        || args.group.is_empty()
        || args.out.is_empty()
    {
        usage()
    }
    args
}

/// One line for a handled event (see the module docs).
fn line(event: &ConsumedEvent) -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let payload = event.envelope().payload();
    let key = payload["key"].as_str().unwrap_or("-");
    let seq = payload["seq"].as_u64().unwrap_or(0);
    format!(
        "{} {millis} {} {} {key} {seq} {}\n",
        std::process::id(),
        event.partition(),
        event.offset(),
        event.envelope().event_id()
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args();
    let out: Arc<Mutex<File>> = Arc::new(Mutex::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.out)?,
    ));
    let handle = Duration::from_millis(args.handle_ms);
    let registry = HandlerRegistry::builder()
        .handler_fn(args.event_type.clone(), move |event: ConsumedEvent| {
            let out = out.clone();
            async move {
                if !handle.is_zero() {
                    tokio::time::sleep(handle).await;
                }
                // One write per line, no user-space buffer: on disk before the
                // handler returns, so before its offset can be committed.
                let text = line(&event);
                out.lock()
                    .map_err(|_| "output lock poisoned")?
                    .write_all(text.as_bytes())?;
                Ok::<_, BoxError>(())
            }
        })
        .build()?;

    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &args.brokers)
        .set("session.timeout.ms", args.session_timeout_ms.to_string());
    let consumer = KafkaConsumer::builder(client, args.group.clone())
        .workers(args.workers)
        .start(
            StartOptions::new([args.topic.as_str()]).from_beginning(true),
            registry,
        )?;
    eprintln!(
        "fault_consumer {}: consuming {} as group {}",
        std::process::id(),
        args.topic,
        args.group
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("fault_consumer {}: shutting down", std::process::id());
    consumer.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}
