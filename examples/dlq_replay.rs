//! Replays a dead-letter topic with [`keel::kafka::dead_letter::replay`].
//!
//! ```text
//! cargo run --example dlq_replay -- --from orders.dlq [--filter NAME=VALUE]... \
//!     [--to orders] [--dry-run] [--rate 500/s] [--group G] [--batch 500] \
//!     [--brokers 127.0.0.1:9092] [-X PROPERTY=VALUE]...
//! ```
//!
//! - `--from`: the dead-letter topic.
//! - `--filter NAME=VALUE`: replay only records whose header `NAME` is `VALUE`
//!   (repeat for several; all must match), e.g. `--filter keel-dlq-error-kind=timeout`.
//! - `--to`: write every record to this topic instead of its original topic.
//! - `--dry-run`: print what would be replayed; write and commit nothing.
//! - `--rate N/s` (or `N`): at most N records per second.
//! - `--group`: the consumer group holding the replay's progress (default
//!   `keel-dlq-replay.<from>`); use one group per filter.
//! - `--batch`: records per transaction (default 500).
//! - `--brokers`: bootstrap servers (default `$KAFKA_BROKERS`, else
//!   `127.0.0.1:9092`).
//! - `-X PROPERTY=VALUE`: any librdkafka property (security settings, say), for
//!   both the consumer and the producer.
//!
//! The replay commits its progress in the same transaction as the records it
//! writes, so it can be stopped (or killed) at any moment and run again: each
//! record lands exactly once for `read_committed` readers. It prints one line per
//! committed transaction (`committed N records (M read)`) and a summary with the
//! rate. Exit code 0 when done, 1 on an error, 2 on bad arguments.

use std::time::Duration;

use keel::kafka::dead_letter::replay::Replay;
use rdkafka::ClientConfig;

struct Args {
    from: String,
    to: Option<String>,
    filters: Vec<(String, String)>,
    dry_run: bool,
    rate: Option<f64>,
    group: Option<String>,
    batch: Option<usize>,
    brokers: String,
    properties: Vec<(String, String)>,
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "dlq_replay: {problem}\nusage: dlq_replay --from TOPIC [--filter NAME=VALUE]... [--to TOPIC] \
         [--dry-run] [--rate N/s] [--group G] [--batch N] [--brokers B] [-X PROPERTY=VALUE]..."
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        from: String::new(),
        to: None,
        filters: Vec::new(),
        dry_run: false,
        rate: None,
        group: None,
        batch: None,
        brokers: std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into()),
        properties: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--dry-run" {
            args.dry_run = true;
            continue;
        }
        let Some(value) = it.next() else {
            usage(&format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--from" => args.from = value,
            "--to" => args.to = Some(value),
            "--filter" => match value.split_once('=') {
                Some((name, v)) if !name.is_empty() => {
                    args.filters.push((name.to_string(), v.to_string()))
                }
                _ => usage("--filter takes NAME=VALUE"),
            },
            "--rate" => {
                let n = value.strip_suffix("/s").unwrap_or(&value);
                match n.parse::<f64>() {
                    Ok(r) if r.is_finite() && r > 0.0 => args.rate = Some(r),
                    _ => usage("--rate takes a positive number of records per second (N/s)"),
                }
            }
            "--group" => args.group = Some(value),
            "--batch" => match value.parse() {
                Ok(n) if n > 0 => args.batch = Some(n),
                _ => usage("--batch takes a positive number"),
            },
            "--brokers" => args.brokers = value,
            "-X" => match value.split_once('=') {
                Some((name, v)) if !name.is_empty() => {
                    args.properties.push((name.to_string(), v.to_string()))
                }
                _ => usage("-X takes PROPERTY=VALUE"),
            },
            other => usage(&format!("unknown option {other}")),
        }
    }
    if args.from.is_empty() {
        usage("--from is required");
    }
    args
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &args.brokers);
    for (name, value) in &args.properties {
        client.set(name, value);
    }
    let dry_run = args.dry_run;
    let mut replay = Replay::new(client, &args.from)
        .dry_run(dry_run)
        .idle_timeout(Duration::from_secs(10))
        .on_progress(move |r| {
            if !dry_run {
                println!(
                    "committed {} records ({} read, {} skipped)",
                    r.replayed, r.read, r.skipped
                );
            }
        });
    if dry_run {
        replay = replay.on_record(|r, to| {
            println!(
                "would replay {}@{} -> {to} (error kind {})",
                r.partition(),
                r.offset(),
                r.header_str("keel-dlq-error-kind").unwrap_or("?")
            )
        });
    }
    for (name, value) in args.filters {
        replay = replay.filter_header(name, value);
    }
    if let Some(to) = args.to {
        replay = replay.to(to);
    }
    if let Some(rate) = args.rate {
        replay = replay.rate(rate);
    }
    if let Some(group) = args.group {
        replay = replay.group(group);
    }
    if let Some(batch) = args.batch {
        replay = replay.batch(batch);
    }
    match replay.run().await {
        Ok(report) => {
            println!(
                "{} {} records of {} read ({} skipped) in {:.2} s: {:.0} records/s{}",
                if report.dry_run {
                    "would replay"
                } else {
                    "replayed"
                },
                report.replayed,
                report.read,
                report.skipped,
                report.elapsed.as_secs_f64(),
                report.rate(),
                if report.complete {
                    ""
                } else {
                    " (gave up waiting before the end)"
                }
            );
            for (topic, n) in &report.by_topic {
                println!("  {topic}: {n}");
            }
        }
        Err(e) => {
            eprintln!("dlq_replay: {e}");
            std::process::exit(1);
        }
    }
}
