//! A 256 MiB upload to s3s-fs through keel's multipart engine, beside the raw
//! SDK's single PutObject and a raw sequential multipart upload, with each
//! variant's peak memory.
//!
//! Run: `scripts/up`, then
//! `cargo bench --no-default-features --features s3 --bench s3_upload`
//! (`KEEL_BENCH_ROUNDS`, default 3; `KEEL_S3FS_ENDPOINT` as for the tests).
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
const SIZE: u64 = 256 * MIB;
const VARIANTS: [&str; 4] = [
    "keel stream",
    "keel 16MiBx4",
    "raw put",
    "raw sequential multipart",
];

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
    let mut data = Vec::with_capacity(SIZE as usize);
    for _ in 0..(SIZE / MIB) {
        data.extend_from_slice(&block);
    }
    Bytes::from(data)
}

fn streamed_body() -> UploadBody {
    let block = block();
    let chunk = 64 * 1024usize;
    let chunks = SIZE as usize / chunk;
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

/// Runs one upload in this (child) process and prints `RESULT secs hwm_kib start_kib`.
async fn child(variant: &str, bucket: &str) {
    let start_kib = status_kib("VmRSS:");
    let server = support::s3s_fs();
    let client = transfer_support::client(&server, &server.endpoint);
    let key = format!("bench/{}", variant.replace(' ', "-"));
    let elapsed = match variant {
        "keel stream" | "keel 16MiBx4" => {
            let config = if variant == "keel stream" {
                TransferConfig::default()
            } else {
                TransferConfig::default().part_size(16 * MIB)
            };
            let engine = MultipartEngine::new(client.clone(), config);
            let body = streamed_body();
            let started = Instant::now();
            let receipt = engine
                .upload(
                    bucket,
                    &key,
                    body,
                    &UploadOptions::new(),
                    &ProgressListener::none(),
                )
                .await
                .expect("keel upload");
            assert_eq!(receipt.size, SIZE);
            started.elapsed()
        }
        "raw put" => {
            let data = whole_object();
            let started = Instant::now();
            client
                .put_object()
                .bucket(bucket)
                .key(&key)
                .content_length(SIZE as i64)
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
    let head = client
        .head_object()
        .bucket(bucket)
        .key(&key)
        .send()
        .await
        .expect("head");
    assert_eq!(
        head.content_length(),
        Some(SIZE as i64),
        "{variant}: stored size"
    );
    client
        .delete_object()
        .bucket(bucket)
        .key(&key)
        .send()
        .await
        .expect("delete");
    println!("RESULT {} {hwm_kib} {start_kib}", elapsed.as_secs_f64());
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
    let rounds: usize = std::env::var("KEEL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let server = support::s3s_fs();
    let bucket = runtime.block_on(async {
        let client = transfer_support::client(&server, &server.endpoint);
        transfer_support::fresh_bucket(&client, "bench").await
    });
    let exe = std::env::current_exe().expect("current exe");
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let mut peaks: Vec<u64> = vec![0; VARIANTS.len()];
    let mut baselines: Vec<u64> = vec![0; VARIANTS.len()];
    for round in 0..rounds {
        for (index, variant) in VARIANTS.iter().enumerate() {
            let output = Command::new(&exe)
                .env("KEEL_BENCH_VARIANT", variant)
                .env("KEEL_BENCH_BUCKET", &bucket)
                .output()
                .expect("run child");
            let stdout = String::from_utf8_lossy(&output.stdout);
            let stderr = String::from_utf8_lossy(&output.stderr);
            if let Some(line) = stderr.lines().find(|l| l.starts_with("COMPLETE ")) {
                eprintln!("  (its CompleteMultipartUpload took {} s)", &line[9..]);
            }
            let Some(line) = stdout.lines().find(|l| l.starts_with("RESULT ")) else {
                panic!(
                    "{variant} failed: {}\n{}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr)
                );
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let secs: f64 = fields[1].parse().expect("secs");
            let hwm: u64 = fields[2].parse().expect("hwm");
            let start: u64 = fields[3].parse().expect("start");
            eprintln!(
                "round {round} {variant:<26} {secs:7.3} s  peak RSS {:6.1} MiB",
                hwm as f64 / 1024.0
            );
            times[index].push(secs);
            peaks[index] = peaks[index].max(hwm);
            baselines[index] = baselines[index].max(start);
        }
    }
    let medians: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
    let keel = medians[0];
    println!(
        "\n256 MiB upload to s3s-fs ({}), median of {rounds} rounds, each in its own process",
        server.endpoint
    );
    println!(
        "{:<26} {:>9} {:>10} {:>16} {:>14}",
        "variant", "median s", "MiB/s", "time / keel's", "peak RSS MiB"
    );
    for (index, variant) in VARIANTS.iter().enumerate() {
        let speed = SIZE as f64 / MIB as f64 / medians[index];
        println!(
            "{:<26} {:>9.3} {:>10.1} {:>15.2}x {:>14.1}",
            variant,
            medians[index],
            speed,
            medians[index] / keel,
            peaks[index] as f64 / 1024.0
        );
    }
    let budget_mib = 5.0 * (4.0 + 2.0) + 64.0;
    println!(
        "\nkeel stream throughput: {:.2}x raw put, {:.2}x raw sequential multipart; keel peak RSS {:.1} MiB (process start {:.1} MiB) vs budget {budget_mib:.0} MiB = 5 MiB x (4 + 2) + 64 MiB",
        medians[2] / keel,
        medians[3] / keel,
        peaks[0] as f64 / 1024.0,
        baselines[0] as f64 / 1024.0,
    );
}
