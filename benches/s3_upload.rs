//! A 256 MiB upload to s3s-fs through keel's multipart engine, beside the raw
//! SDK's single PutObject and a raw sequential multipart upload, with each
//! variant's peak memory.
//!
//! Run: `scripts/up`, then
//! `cargo bench --no-default-features --features s3 --bench s3_upload`
//! (`KEEL_BENCH_ROUNDS`, default 3; `KEEL_S3FS_ENDPOINT` as for the tests;
//! `KEEL_BENCH_SERVER=moto` runs it against moto at `KEEL_MOTO_ENDPOINT`).
//!
//! `cargo bench` passes `--bench`; without it (`cargo test --all-targets` runs
//! this binary as a test) every variant runs once on a 12 MiB object, which still
//! goes through every path (keel's multipart, raw put, raw multipart) in seconds.
//!
//! With `KEEL_BENCH_SERVER_PID` (the server's process id, e.g. `pgrep -f s3s-fs`)
//! the table also shows the server's CPU time per upload; the client's CPU time
//! and the time from the last part to the end (CompleteMultipartUpload) are
//! always shown. Together they say where an upload's time goes.
//!
//! Every upload runs in a fresh child process of this binary, so each variant's
//! peak resident memory (`VmHWM` from `/proc/self/status`) is its own. Variants run
//! in turns, round after round, against the same server; the table shows the
//! median time, the throughput, keel's time relative to each, and the peak memory.
//!
//! - `keel stream`: keel with its defaults (5 MiB parts, 4 in flight), the body a
//!   stream of 64 KiB chunks of unknown length, produced while uploading (the
//!   whole object is never in memory).
//! - `keel 16MiBx4`: the same with 16 MiB parts.
//! - `raw put`: one PutObject of the 256 MiB already in memory.
//! - `raw sequential multipart`: CreateMultipartUpload, 5 MiB UploadParts one after
//!   the other (slices of the 256 MiB in memory), CompleteMultipartUpload.

#[path = "../tests/support/mod.rs"]
mod support;
#[path = "../tests/transfer_support/mod.rs"]
mod transfer_support;

use std::process::Command;
use std::time::Instant;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use keel::s3::multipart::{MultipartEngine, ProgressListener, TransferConfig};
use keel::s3::upload::{UploadBody, UploadOptions};

const MIB: u64 = 1024 * 1024;
/// The object size under `cargo bench`.
const BENCH_SIZE: u64 = 256 * MIB;
/// The object size when run as a test: above the 5 MiB threshold, so keel still
/// goes multipart (3 parts of 5 MiB, or one of 12 MiB with 16 MiB parts).
const TEST_SIZE: u64 = 12 * MIB;

/// The object size this child uploads (set by the parent).
fn size() -> u64 {
    std::env::var("KEEL_BENCH_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(BENCH_SIZE)
}

/// The server: s3s-fs, or moto with `KEEL_BENCH_SERVER=moto`.
fn server() -> support::S3Server {
    match std::env::var("KEEL_BENCH_SERVER").as_deref() {
        Ok("moto") => support::moto(),
        Ok("s3s-fs") | Err(_) => support::s3s_fs(),
        Ok(other) => panic!("KEEL_BENCH_SERVER={other}: expected s3s-fs or moto"),
    }
}
const VARIANTS: [&str; 4] = [
    "keel stream",
    "keel 16MiBx4",
    "raw put",
    "raw sequential multipart",
];

/// CPU seconds (user + system) of process `pid` ("self" for this one), from
/// `/proc/<pid>/stat`; 0 when unreadable.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses): state is field 3,
    // utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Clock ticks are 100 per second on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One 1 MiB block of pseudo-random bytes; bodies repeat it.
fn block() -> Bytes {
    transfer_support::chunk(42, 0, MIB as usize)
}

fn whole_object() -> Bytes {
    let block = block();
    let mut data = Vec::with_capacity(size() as usize);
    for _ in 0..(size() / MIB) {
        data.extend_from_slice(&block);
    }
    Bytes::from(data)
}

fn streamed_body() -> UploadBody {
    let block = block();
    let chunk = 64 * 1024usize;
    let chunks = size() as usize / chunk;
    UploadBody::stream(futures::stream::iter((0..chunks).map(move |i| {
        let offset = (i * chunk) % block.len();
        Ok(block.slice(offset..offset + chunk))
    })))
}

async fn raw_sequential_multipart(client: &Client, bucket: &str, key: &str, data: Bytes) {
    let created = client
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .expect("create");
    let upload_id = created.upload_id().expect("upload id");
    let mut parts = Vec::new();
    let part_size = (5 * MIB) as usize;
    for (index, start) in (0..data.len()).step_by(part_size).enumerate() {
        let part = data.slice(start..(start + part_size).min(data.len()));
        let number = index as i32 + 1;
        let output = client
            .upload_part()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .content_length(part.len() as i64)
            .body(ByteStream::from(part))
            .send()
            .await
            .expect("upload part");
        parts.push(
            CompletedPart::builder()
                .part_number(number)
                .e_tag(output.e_tag().expect("etag"))
                .build(),
        );
    }
    let completing = Instant::now();
    client
        .complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .expect("complete");
    // What the server spends joining the parts, for the report.
    eprintln!("COMPLETE {}", completing.elapsed().as_secs_f64());
}

/// Runs one upload in this (child) process and prints
/// `RESULT secs hwm_kib start_kib client_cpu_secs complete_secs`.
async fn child(variant: &str, bucket: &str) {
    let start_kib = status_kib("VmRSS:");
    let server = server();
    let client = transfer_support::client(&server, &server.endpoint);
    let key = format!("bench/{}", variant.replace(' ', "-"));
    let cpu_before = cpu_seconds("self");
    // When the last part was stored: the rest is CompleteMultipartUpload.
    let last_part = std::sync::Arc::new(std::sync::Mutex::new(None::<Instant>));
    let elapsed = match variant {
        "keel stream" | "keel 16MiBx4" => {
            let config = if variant == "keel stream" {
                TransferConfig::default()
            } else {
                TransferConfig::default().part_size(16 * MIB)
            };
            let engine = MultipartEngine::new(client.clone(), config);
            let body = streamed_body();
            let progress = ProgressListener::callback({
                let last_part = std::sync::Arc::clone(&last_part);
                move |_| *last_part.lock().unwrap() = Some(Instant::now())
            });
            let started = Instant::now();
            let receipt = engine
                .upload(bucket, &key, body, &UploadOptions::new(), &progress)
                .await
                .expect("keel upload");
            let finished = Instant::now();
            assert_eq!(receipt.size, size());
            if let Some(last) = *last_part.lock().unwrap() {
                eprintln!("COMPLETE {}", (finished - last).as_secs_f64());
            }
            finished - started
        }
        "raw put" => {
            let data = whole_object();
            let started = Instant::now();
            client
                .put_object()
                .bucket(bucket)
                .key(&key)
                .content_length(size() as i64)
                .body(ByteStream::from(data))
                .send()
                .await
                .expect("put");
            started.elapsed()
        }
        "raw sequential multipart" => {
            let data = whole_object();
            let started = Instant::now();
            raw_sequential_multipart(&client, bucket, &key, data).await;
            started.elapsed()
        }
        other => panic!("unknown variant {other}"),
    };
    let hwm_kib = status_kib("VmHWM:");
    let client_cpu = cpu_seconds("self") - cpu_before;
    let head = client
        .head_object()
        .bucket(bucket)
        .key(&key)
        .send()
        .await
        .expect("head");
    assert_eq!(
        head.content_length(),
        Some(size() as i64),
        "{variant}: stored size"
    );
    client
        .delete_object()
        .bucket(bucket)
        .key(&key)
        .send()
        .await
        .expect("delete");
    println!(
        "RESULT {} {hwm_kib} {start_kib} {client_cpu}",
        elapsed.as_secs_f64()
    );
}

/// What the rounds measured for one variant.
#[derive(Clone, Debug, Default)]
struct Samples {
    secs: Vec<f64>,
    client_cpu: Vec<f64>,
    server_cpu: Vec<f64>,
    complete: Vec<f64>,
    peak_kib: f64,
    start_kib: f64,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Ok(variant) = std::env::var("KEEL_BENCH_VARIANT") {
        let bucket = std::env::var("KEEL_BENCH_BUCKET").expect("KEEL_BENCH_BUCKET");
        runtime.block_on(child(&variant, &bucket));
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --all-targets` passes nothing:
    // then one quick round on a small object.
    let benching = std::env::args().any(|a| a == "--bench");
    let (size, rounds) = if benching {
        let rounds = std::env::var("KEEL_BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3usize)
            .max(1);
        (BENCH_SIZE, rounds)
    } else {
        (TEST_SIZE, 1)
    };
    let server = server();
    let bucket = runtime.block_on(async {
        let client = transfer_support::client(&server, &server.endpoint);
        transfer_support::fresh_bucket(&client, "bench").await
    });
    let exe = std::env::current_exe().expect("current exe");
    let server_pid = std::env::var("KEEL_BENCH_SERVER_PID").ok();
    let mut samples: Vec<Samples> = vec![Samples::default(); VARIANTS.len()];
    for round in 0..rounds {
        for (index, variant) in VARIANTS.iter().enumerate() {
            let server_cpu_before = server_pid.as_deref().map(cpu_seconds);
            let output = Command::new(&exe)
                .env("KEEL_BENCH_VARIANT", variant)
                .env("KEEL_BENCH_BUCKET", &bucket)
                .env("KEEL_BENCH_SIZE", size.to_string())
                .env("KEEL_BENCH_SERVER", server.name)
                .output()
                .expect("run child");
            let server_cpu = server_pid
                .as_deref()
                .map(cpu_seconds)
                .zip(server_cpu_before)
                .map(|(after, before)| after - before);
            let stdout = String::from_utf8_lossy(&output.stdout);
            let stderr = String::from_utf8_lossy(&output.stderr);
            let complete = stderr
                .lines()
                .find_map(|l| l.strip_prefix("COMPLETE "))
                .and_then(|v| v.parse::<f64>().ok());
            let Some(line) = stdout.lines().find(|l| l.starts_with("RESULT ")) else {
                panic!("{variant} failed: {}\n{stderr}", output.status);
            };
            let fields: Vec<f64> = line
                .split_whitespace()
                .skip(1)
                .map(|v| v.parse().expect("a number"))
                .collect();
            let (secs, hwm, start, client_cpu) = (fields[0], fields[1], fields[2], fields[3]);
            eprintln!(
                "round {round} {variant:<26} {secs:7.3} s  peak RSS {:6.1} MiB  client CPU {client_cpu:.2} s  server CPU {}  complete {}",
                hwm / 1024.0,
                server_cpu.map_or("-".to_string(), |c| format!("{c:.2} s")),
                complete.map_or("-".to_string(), |c| format!("{c:.3} s")),
            );
            let sample = &mut samples[index];
            sample.secs.push(secs);
            sample.client_cpu.push(client_cpu);
            sample.server_cpu.extend(server_cpu);
            sample.complete.extend(complete);
            sample.peak_kib = sample.peak_kib.max(hwm);
            sample.start_kib = sample.start_kib.max(start);
        }
    }
    let medians: Vec<f64> = samples.iter_mut().map(|s| median(&mut s.secs)).collect();
    let keel = medians[0];
    println!(
        "\n{} MiB upload to {} ({}), median of {rounds} rounds, each in its own process",
        size / MIB,
        server.name,
        server.endpoint
    );
    println!(
        "{:<26} {:>9} {:>8} {:>14} {:>13} {:>12} {:>12} {:>11}",
        "variant",
        "median s",
        "MiB/s",
        "time / keel's",
        "peak RSS MiB",
        "client CPU s",
        "server CPU s",
        "complete s"
    );
    let optional = |values: &mut Vec<f64>| {
        if values.is_empty() {
            "-".to_string()
        } else {
            format!("{:.3}", median(values))
        }
    };
    for (index, variant) in VARIANTS.iter().enumerate() {
        let sample = &mut samples[index];
        let speed = size as f64 / MIB as f64 / medians[index];
        println!(
            "{:<26} {:>9.3} {:>8.1} {:>13.2}x {:>13.1} {:>12.3} {:>12} {:>11}",
            variant,
            medians[index],
            speed,
            medians[index] / keel,
            sample.peak_kib / 1024.0,
            median(&mut sample.client_cpu),
            optional(&mut sample.server_cpu),
            optional(&mut sample.complete),
        );
    }
    let budget_mib = 5.0 * (4.0 + 2.0) + 64.0;
    println!(
        "\nkeel stream throughput: {:.2}x raw put, {:.2}x raw sequential multipart; keel peak RSS {:.1} MiB (process start {:.1} MiB) vs budget {budget_mib:.0} MiB = 5 MiB x (4 + 2) + 64 MiB",
        medians[2] / keel,
        medians[3] / keel,
        samples[0].peak_kib / 1024.0,
        samples[0].start_kib / 1024.0,
    );
}
