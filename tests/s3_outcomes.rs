//! Honest S3 outcomes (issue 12, items 5-8), against the real test servers and
//! the fault proxy in front of them: the caller's broken bodies do not open the
//! breaker; no multipart upload is left behind (shutdown, a dropped runtime, a
//! lost CreateMultipartUpload answer, a sweep); timeouts that fit the work
//! (throttled to 1 Mbit/s, stalled mid-body); a server that ignores `Range`.
//! Start the servers with `scripts/up`.

mod support;
mod transfer_support;

use std::io;
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use bytes::Bytes;
use futures::StreamExt;
use keel::s3::download::RangedDownloader;
use keel::s3::error::{S3ErrorKind, S3Operation};
use keel::s3::multipart::{MultipartEngine, ProgressListener, RetryPolicy, TransferConfig};
use keel::s3::upload::{UploadBody, UploadOptions};
use keel::s3::{S3, S3Client, S3Config};
use keel_layers::circuit_breaker::CircuitState;
use support::S3Server;
use transfer_support::proxy::{FaultProxy, Matcher};
use transfer_support::{
    assert_same_bytes, client, data, data_stream, fresh_bucket, open_multipart_uploads,
};

const MIB: u64 = 1024 * 1024;
const KIB: u64 = 1024;

/// 1 Mbit/s in bytes per second.
const ONE_MEGABIT: u64 = 1_000_000 / 8;

fn fast_retries() -> RetryPolicy {
    RetryPolicy::default()
        .max_retries(2)
        .initial_backoff(Duration::from_millis(20))
        .max_backoff(Duration::from_millis(50))
}

/// A facade over `bucket` on `server`, sending to `endpoint`.
async fn facade(server: &S3Server, endpoint: &str, bucket: &str) -> S3Client {
    let config = S3Config::builder()
        .region(&server.region)
        .bucket(bucket)
        .endpoint(endpoint)
        .credentials(&server.access_key, &server.secret_key)
        .build()
        .expect("s3 config");
    S3Client::connect(config).await.expect("s3 client")
}

/// A body that sends `good` bytes, then fails as a client that went away does.
fn aborted_body(good: u64) -> UploadBody {
    let failure = futures::stream::once(async {
        Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the client went away",
        ))
    });
    UploadBody::stream(data_stream(1, good).chain(failure))
}

/// A body that sends `good` bytes, then nothing, for ever.
fn stalled_body(good: u64) -> UploadBody {
    UploadBody::stream(data_stream(2, good).chain(futures::stream::pending()))
}

/// Waits (at most `limit`) for `moto` to list `count` open uploads in `bucket`.
async fn wait_for_uploads(client: &Client, bucket: &str, count: usize, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let open = open_multipart_uploads(client, bucket).await.len();
        if open == count || Instant::now() >= deadline {
            return open;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_upload_bodies_are_the_callers_and_never_open_the_breaker() {
    for server in support::s3_servers() {
        let check = client(&server, &server.endpoint);
        let bucket = fresh_bucket(&check, "body").await;
        let s3 = S3::new(facade(&server, &server.endpoint, &bucket).await);
        // Above the 5 MiB threshold, so every one goes through the multipart
        // engine and the transfer stack's breaker (5 failures open it).
        for round in 0..7 {
            let error = s3
                .upload(
                    format!("body/{round}"),
                    aborted_body(6 * MIB),
                    UploadOptions::new(),
                )
                .await
                .expect_err("the body fails");
            assert_eq!(error.kind(), &S3ErrorKind::Body, "{}: {error}", server.name);
            assert_eq!(error.operation(), S3Operation::Upload, "{error}");
            assert!(!error.is_retryable(), "{error}");
        }
        let breaker = s3.circuit_breaker().expect("default stack has a breaker");
        assert_eq!(breaker.state(), CircuitState::Closed, "{}", server.name);
        let out = s3
            .upload(
                "body/good",
                Bytes::from(data(3, 6 * MIB)),
                UploadOptions::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("{}: a good upload after them: {e}", server.name));
        assert_eq!(out.size, 6 * MIB);
        if server.name == "moto" {
            // Every failed upload was aborted.
            assert_eq!(
                open_multipart_uploads(&check, &bucket).await,
                Vec::<String>::new()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_in_flight_uploads_leaves_no_upload_on_the_server() {
    let server = support::moto();
    let check = client(&server, &server.endpoint);
    let bucket = fresh_bucket(&check, "inflight").await;
    let s3 = S3::new(facade(&server, &server.endpoint, &bucket).await);
    let uploading = tokio::spawn({
        let s3 = s3.clone();
        async move {
            s3.upload("stalled/one", stalled_body(6 * MIB), UploadOptions::new())
                .await
        }
    });
    assert_eq!(
        wait_for_uploads(&check, &bucket, 1, Duration::from_secs(20)).await,
        1
    );
    assert_eq!(s3.upload_registry().in_flight().len(), 1);

    let report = s3.abort_in_flight_uploads(Duration::from_secs(10)).await;
    assert_eq!(
        (report.aborted, report.failed, report.left),
        (1, 0, 0),
        "{report:?}"
    );
    assert_eq!(
        open_multipart_uploads(&check, &bucket).await,
        Vec::<String>::new()
    );
    assert!(s3.upload_registry().in_flight().is_empty());
    uploading.abort();
}

#[test]
fn an_upload_dropped_with_its_runtime_is_still_aborted() {
    let server = support::moto();
    let checks = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let check = client(&server, &server.endpoint);
    let bucket = checks.block_on(fresh_bucket(&check, "rtdrop"));

    let engine = MultipartEngine::new(
        client(&server, &server.endpoint),
        TransferConfig::default().retry(fast_retries()),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.spawn({
        let engine = engine.clone();
        let bucket = bucket.clone();
        async move {
            engine
                .upload(
                    &bucket,
                    "dropped/with-runtime",
                    stalled_body(6 * MIB),
                    &UploadOptions::new(),
                    &ProgressListener::none(),
                )
                .await
        }
    });
    let open = checks.block_on(wait_for_uploads(
        &check,
        &bucket,
        1,
        Duration::from_secs(20),
    ));
    assert_eq!(open, 1, "the upload was created");
    assert_eq!(engine.registry().in_flight().len(), 1);

    // Shutting the runtime down drops the upload future on it.
    drop(runtime);

    let open = checks.block_on(wait_for_uploads(
        &check,
        &bucket,
        0,
        Duration::from_secs(20),
    ));
    assert_eq!(
        open, 0,
        "the upload was aborted after its runtime was dropped"
    );
    // The abort thread counts the upload once it has read the server's answer,
    // which may come just after the listing above: wait for it, briefly.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while (engine.registry().aborted() == 0 || !engine.registry().in_flight().is_empty())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(engine.registry().aborted(), 1);
    assert!(engine.registry().in_flight().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_create_answer_leaves_no_stray_upload() {
    let server = support::moto();
    let proxy = FaultProxy::start(&server.endpoint).await;
    let via_proxy = client(&server, &proxy.endpoint());
    let bucket = fresh_bucket(&via_proxy, "stray").await;
    // The server creates an upload, its answer is lost, the retry creates another.
    proxy.lose_answer(Matcher::CreateMultipartUpload, 1);
    let engine = MultipartEngine::new(
        via_proxy.clone(),
        TransferConfig::default().retry(fast_retries()),
    );
    let receipt = engine
        .upload(
            &bucket,
            "stray/key",
            UploadBody::stream(data_stream(4, 6 * MIB)),
            &UploadOptions::new(),
            &ProgressListener::none(),
        )
        .await
        .expect("upload after a lost Create answer");
    assert_eq!(receipt.size, 6 * MIB);
    let creates: Vec<_> = proxy
        .seen()
        .into_iter()
        .filter(|s| {
            s.method == "POST" && s.target.contains("uploads") && !s.target.contains("uploadId=")
        })
        .collect();
    assert_eq!(creates.len(), 2, "{creates:?}");
    assert_eq!(creates[0].fault, Some("lose_answer"));
    assert_eq!(
        creates[0].status,
        Some(200),
        "the first Create was done by the server"
    );
    let check = client(&server, &server.endpoint);
    assert_eq!(
        open_multipart_uploads(&check, &bucket).await,
        Vec::<String>::new()
    );
    assert!(
        proxy.seen().iter().any(|s| s.is_abort()),
        "the stray was aborted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_aborts_uploads_older_than_the_given_age() {
    let server = support::moto();
    let check = client(&server, &server.endpoint);
    let bucket = fresh_bucket(&check, "sweep").await;
    for i in 0..3 {
        check
            .create_multipart_upload()
            .bucket(&bucket)
            .key(format!("left/{i}"))
            .send()
            .await
            .expect("create");
    }
    let engine = MultipartEngine::new(
        check.clone(),
        TransferConfig::default().retry(fast_retries()),
    );
    // The age is the server's `initiated` time. moto reports the same fixed time
    // (2010-11-10) for every upload, so "younger than 30 years" keeps them all
    // and "older than 1 s" takes them all.
    let thirty_years = Duration::from_secs(30 * 365 * 24 * 3600);
    let kept = engine
        .abort_stale_uploads(&bucket, None, thirty_years)
        .await
        .expect("sweep");
    assert_eq!(kept.aborted, 0, "uploads younger than the age stay");
    assert_eq!(open_multipart_uploads(&check, &bucket).await.len(), 3);
    let other_prefix = engine
        .abort_stale_uploads(&bucket, Some("elsewhere/"), Duration::from_secs(1))
        .await
        .expect("sweep");
    assert_eq!(other_prefix.aborted, 0, "uploads under another prefix stay");
    assert_eq!(open_multipart_uploads(&check, &bucket).await.len(), 3);

    let facade = S3::new(facade(&server, &server.endpoint, &bucket).await);
    let swept = facade
        .abort_stale_uploads(Duration::from_secs(1))
        .await
        .expect("sweep");
    assert_eq!((swept.aborted, swept.failed), (3, 0), "{swept:?}");
    assert_eq!(
        open_multipart_uploads(&check, &bucket).await,
        Vec::<String>::new()
    );
}

/// A client whose SDK attempt timeout is `attempt` (keel's `S3Client` sets 30 s).
fn with_attempt_timeout(client: Client, attempt: Duration) -> Client {
    let config = client
        .config()
        .to_builder()
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(attempt)
                .build(),
        )
        .build();
    Client::from_conf(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_throttled_to_one_megabit_succeeds_within_its_size_aware_bound() {
    let server = support::s3s_fs();
    let proxy = FaultProxy::start(&server.endpoint).await;
    let bucket = fresh_bucket(&client(&server, &proxy.endpoint()), "throttle").await;
    // A short SDK attempt timeout (2 s) and a short fixed share (1 s): a fixed
    // per-attempt timeout of either would fail a 512 KiB part at 1 Mbit/s (4 s).
    let sdk = with_attempt_timeout(client(&server, &proxy.endpoint()), Duration::from_secs(2));
    let size = 512 * KIB;
    let config = TransferConfig::default()
        .threshold(256 * KIB)
        .retry(RetryPolicy::never())
        .part_timeout(Duration::from_secs(1))
        .min_throughput(64 * KIB)
        .idle_timeout(Duration::from_secs(2));
    assert_eq!(
        config.part_attempt_limit(size),
        Some(Duration::from_secs(9))
    );
    proxy.throttle(ONE_MEGABIT);

    let fixed = MultipartEngine::new(sdk.clone(), config.clone().min_throughput(u64::MAX));
    let started = Instant::now();
    let error = fixed
        .upload(
            &bucket,
            "throttled/fixed",
            UploadBody::from(Bytes::from(data(5, size))),
            &UploadOptions::new(),
            &ProgressListener::none(),
        )
        .await
        .expect_err("a fixed 1 s bound fails the slow part");
    assert_eq!(error.kind(), &S3ErrorKind::Timeout, "{error}");
    let took = started.elapsed();
    eprintln!("512 KiB part at 1 Mbit/s, fixed 1 s bound: Timeout after {took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");

    let fitted = MultipartEngine::new(sdk.clone(), config.clone());
    let started = Instant::now();
    let receipt = fitted
        .upload(
            &bucket,
            "throttled/fitted",
            UploadBody::from(Bytes::from(data(5, size))),
            &UploadOptions::new(),
            &ProgressListener::none(),
        )
        .await
        .expect("the size-aware bound lets the slow part through");
    let took = started.elapsed();
    assert_eq!((receipt.size, receipt.parts), (size, 1));
    assert!(
        took > Duration::from_secs(3),
        "the proxy throttled it: {took:?}"
    );
    eprintln!("512 KiB part at 1 Mbit/s: {took:?}");

    // Downloading at the same pace: slow but never idle, so it succeeds.
    let downloader = RangedDownloader::new(sdk, config);
    let mut out = Vec::new();
    let started = Instant::now();
    let got = downloader
        .download_to_writer(
            &bucket,
            "throttled/fitted",
            &mut out,
            &ProgressListener::none(),
        )
        .await
        .expect("a throttled download is not idle");
    eprintln!(
        "512 KiB download at 1 Mbit/s, idle 2 s: {:?}",
        started.elapsed()
    );
    assert_eq!(got.size, size);
    assert_same_bytes(&out, &data(5, size), "throttled download");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_stalled_mid_body_fails_within_the_idle_timeout() {
    let server = support::s3s_fs();
    let proxy = FaultProxy::start(&server.endpoint).await;
    let via_proxy = client(&server, &proxy.endpoint());
    let bucket = fresh_bucket(&via_proxy, "stall").await;
    let size = 6 * MIB;
    client(&server, &server.endpoint)
        .put_object()
        .bucket(&bucket)
        .key("stalled")
        .body(Bytes::from(data(6, size)).into())
        .send()
        .await
        .expect("put");
    let idle = Duration::from_millis(500);

    // Ranged download: every attempt stalls after 64 KiB.
    proxy.stall_response(Matcher::Get, 100, 64 * KIB);
    let downloader = RangedDownloader::new(
        via_proxy.clone(),
        TransferConfig::default()
            .retry(
                RetryPolicy::default()
                    .max_retries(1)
                    .initial_backoff(Duration::from_millis(10)),
            )
            .idle_timeout(idle),
    );
    let started = Instant::now();
    let mut sink = Vec::new();
    let error = tokio::time::timeout(
        Duration::from_secs(20),
        downloader.download_to_writer(&bucket, "stalled", &mut sink, &ProgressListener::none()),
    )
    .await
    .expect("no hang")
    .expect_err("a stalled body fails");
    assert_eq!(error.kind(), &S3ErrorKind::Timeout, "{error}");
    // Two attempts of one idle timeout each, plus the backoff.
    let took = started.elapsed();
    eprintln!("ranged download stalled after 64 KiB, idle 500 ms, 1 retry: Timeout after {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // The facade's streaming body and collect_bytes.
    let s3 = S3::builder(facade(&server, &proxy.endpoint(), &bucket).await)
        .body_idle_timeout(Some(idle))
        .build();
    let download = s3.download("stalled").await.expect("headers arrive");
    let started = Instant::now();
    let error = tokio::time::timeout(Duration::from_secs(20), download.body.collect_bytes())
        .await
        .expect("no hang")
        .expect_err("a stalled body fails");
    assert_eq!(error.kind(), &S3ErrorKind::Timeout, "{error}");
    let took = started.elapsed();
    eprintln!("facade collect_bytes stalled after 64 KiB, idle 500 ms: Timeout after {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_ignores_range_is_refused_without_buffering_the_object() {
    // moto: dropping the signed Range header would fail s3s-fs's signature check.
    let server = support::moto();
    let proxy = FaultProxy::start(&server.endpoint).await;
    let via_proxy = client(&server, &proxy.endpoint());
    let bucket = fresh_bucket(&via_proxy, "norange").await;
    let size = 64 * MIB;
    client(&server, &server.endpoint)
        .put_object()
        .bucket(&bucket)
        .key("big")
        .body(Bytes::from(data(7, size)).into())
        .send()
        .await
        .expect("put");
    proxy.ignore_range(Matcher::RangedGet, 1000);
    let downloader = RangedDownloader::new(
        via_proxy,
        TransferConfig::default()
            .part_size(8 * MIB)
            .retry(fast_retries()),
    );
    let before = proxy.answered_bytes();
    let mut sink = Vec::new();
    let error = downloader
        .download_to_writer(&bucket, "big", &mut sink, &ProgressListener::none())
        .await
        .expect_err("a whole object answered to a ranged GET is refused");
    assert_eq!(error.kind(), &S3ErrorKind::InvalidResponse, "{error}");
    assert!(!error.is_retryable());
    assert!(sink.is_empty(), "no byte of the wrong answer was delivered");
    let forwarded = proxy.answered_bytes() - before;
    eprintln!(
        "64 MiB object, 8 MiB ranges, 4 in flight, Range ignored: {forwarded} bytes forwarded by the proxy before the refusal"
    );
    // Without the bound each of the 4 ranges in flight buffered the whole 64 MiB.
    assert!(forwarded < 4 * 8 * MIB, "{forwarded}");
}

/// Resets the process's peak resident memory (Linux `clear_refs` 5) and returns
/// the resident memory now, in bytes; `None` where that is not possible.
fn reset_peak_memory() -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    status_kib("VmRSS:").map(|k| k * 1024)
}

/// The peak resident memory since the last reset, in bytes.
fn peak_memory() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_ignores_range_and_sends_no_length_is_cut_at_the_part_size() {
    let server = support::moto();
    let proxy = FaultProxy::start(&server.endpoint).await;
    let via_proxy = client(&server, &proxy.endpoint());
    let bucket = fresh_bucket(&via_proxy, "nolength").await;
    let size = 64 * MIB;
    client(&server, &server.endpoint)
        .put_object()
        .bucket(&bucket)
        .key("big")
        .body(Bytes::from(data(8, size)).into())
        .send()
        .await
        .expect("put");
    // Only the byte count can stop this one: no Content-Length to refuse.
    proxy.ignore_range_without_length(Matcher::RangedGet, 1000);
    let baseline = reset_peak_memory();
    let downloader = RangedDownloader::new(
        via_proxy,
        TransferConfig::default()
            .part_size(8 * MIB)
            .retry(RetryPolicy::never()),
    );
    let before = proxy.answered_bytes();
    let mut sink = Vec::new();
    let error = downloader
        .download_to_writer(&bucket, "big", &mut sink, &ProgressListener::none())
        .await
        .expect_err("more bytes than the range asked for are refused");
    assert_eq!(error.kind(), &S3ErrorKind::InvalidResponse, "{error}");
    assert!(
        error
            .to_string()
            .contains("more than the 8388608 bytes asked for"),
        "{error}"
    );
    assert!(sink.is_empty(), "no byte of the wrong answer was delivered");
    if let (Some(baseline), Some(peak)) = (baseline, peak_memory()) {
        // A figure, not an assertion: tests running beside this one share the
        // process (run it alone with --test-threads=1 for RELIABILITY.md).
        eprintln!(
            "peak memory growth during the download: {} KiB",
            peak.saturating_sub(baseline) / 1024
        );
    }
    // Let the proxy notice the closed connections.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let forwarded = proxy.answered_bytes() - before;
    eprintln!(
        "64 MiB object, 8 MiB ranges, 4 in flight, Range ignored, no Content-Length: {forwarded} bytes forwarded by the proxy before the client closed"
    );
    // 4 ranges in flight would have buffered 4 x 64 MiB; each stops past 8 MiB
    // (what the socket buffers held on top is counted too).
    assert!(forwarded < 4 * 16 * MIB, "{forwarded}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_object_size_is_refused_before_any_range_is_planned() {
    let server = support::s3s_fs();
    let proxy = FaultProxy::start(&server.endpoint).await;
    let via_proxy = client(&server, &proxy.endpoint());
    let bucket = fresh_bucket(&via_proxy, "absurd").await;
    client(&server, &server.endpoint)
        .put_object()
        .bucket(&bucket)
        .key("small")
        .body(Bytes::from_static(b"twelve bytes").into())
        .send()
        .await
        .expect("put");
    // HEAD claims 6 TiB, over S3's 5 TiB limit.
    proxy.claim_length(Matcher::Head, 1, 6 * 1024 * 1024 * MIB);
    let downloader = RangedDownloader::new(via_proxy, TransferConfig::default());
    let mut sink = Vec::new();
    let error = downloader
        .download_to_writer(&bucket, "small", &mut sink, &ProgressListener::none())
        .await
        .expect_err("an absurd size is refused");
    assert_eq!(error.kind(), &S3ErrorKind::InvalidResponse, "{error}");
    assert_eq!(error.operation(), S3Operation::Head, "{error}");
    assert!(
        proxy.seen().iter().all(|s| s.method != "GET"),
        "no range was fetched: {:?}",
        proxy.seen()
    );
    assert_eq!(keel::s3::download::MAX_OBJECT_SIZE, 5 * 1024 * 1024 * MIB);
}
