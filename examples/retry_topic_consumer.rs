//! A consumer *process* with retry topics, for `tests/kafka_retry_topics.rs`: it
//! consumes one topic with keel's [`RetryTopics`] and appends one line per
//! handled event to a file, so that a test can kill it with `SIGKILL` in the
//! middle of the ladder and still know what it handled.
//!
//! Each line is `pid unix_ms seq topic failures`, written with one unbuffered
//! `write` before the handler returns. The event's payload carries `seq`; an event
//! whose `seq` is a multiple of `--fail-every` fails `--failures` times (counted by
//! its retry history, so across processes) before it succeeds.
//!
//! ```text
//! cargo run --example retry_topic_consumer -- --brokers 127.0.0.1:9092 --topic T \
//!     --group G --out handled.txt [--fail-every 10] [--failures 2] [--ladder-ms 1000,2000]
//! ```
//!
//! `SIGTERM` (or Ctrl-C) shuts down gracefully; `SIGKILL` is the crash the test injects.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel::kafka::consumer::retry_topic::{RetryState, RetryTopics};
use keel::kafka::consumer::{BoxError, ConsumedEvent, KafkaConsumer, StartOptions};
use rdkafka::ClientConfig;

struct Args {
    brokers: String,
    topic: String,
    group: String,
    out: String,
    fail_every: u64,
    failures: usize,
    ladder_ms: Vec<u64>,
}

fn usage() -> ! {
    eprintln!(
        "usage: retry_topic_consumer --brokers B --topic T --group G --out FILE \
         [--fail-every 10] [--failures 2] [--ladder-ms 1000,2000]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        brokers: String::new(),
        topic: String::new(),
        group: String::new(),
        out: String::new(),
        fail_every: 10,
        failures: 2,
        ladder_ms: vec![1_000, 2_000],
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
            "--fail-every" => args.fail_every = number(&value).max(1),
            "--failures" => args.failures = number(&value) as usize,
            "--ladder-ms" => args.ladder_ms = value.split(',').map(number).collect(),
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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args();
    let out = Arc::new(Mutex::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.out)?,
    ));
    let (fail_every, failures) = (args.fail_every, args.failures);
    let handler = tower::service_fn(move |event: ConsumedEvent| {
        let out = out.clone();
        async move {
            let seq = event.envelope().payload()["seq"].as_u64().unwrap_or(0);
            let failed = RetryState::of(&event)?.map_or(0, |s| s.history.len());
            if seq.is_multiple_of(fail_every) && failed < failures {
                return Err::<(), BoxError>(
                    format!("seq {seq} fails (failure {})", failed + 1).into(),
                );
            }
            let millis = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
            let text = format!(
                "{} {millis} {seq} {} {failed}\n",
                std::process::id(),
                event.topic()
            );
            out.lock()
                .map_err(|_| "output lock poisoned")?
                .write_all(text.as_bytes())?;
            Ok(())
        }
    });
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &args.brokers)
        .set("session.timeout.ms", "6000");
    let consumer = RetryTopics::delays(args.ladder_ms.iter().map(|ms| Duration::from_millis(*ms)))?
        .start(
            KafkaConsumer::builder(client, args.group.clone()),
            StartOptions::new([args.topic.as_str()]).from_beginning(true),
            handler,
        )?;
    eprintln!(
        "retry_topic_consumer {}: consuming {}",
        std::process::id(),
        args.topic
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    consumer.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}
