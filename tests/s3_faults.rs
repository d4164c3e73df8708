//! S3 transfers through a fault-injecting proxy in front of each real test server:
//! throttling, connections cut mid-part, stalled parts (the part timeout), failures
//! that outlast the retries, dropped upload futures, and CompleteMultipartUpload
//! answers lost after the server completed. Start the servers with `scripts/up`.

mod support;
mod transfer_support;

use std::time::Duration;

use aws_sdk_s3::Client;
use keel::s3::download::RangedDownloader;
use keel::s3::error::{S3ErrorKind, S3Operation, S3ServiceError, THROTTLE_DELAY_FLOOR};
use keel::s3::multipart::{
    MultipartEngine, ProgressListener, RetryPolicy, TransferConfig, TransferProgress, UploadReceipt,
};
use keel::s3::upload::{UploadBody, UploadOptions};
use transfer_support::proxy::{FaultProxy, Matcher};
use transfer_support::{
    assert_same_bytes, client, data, data_stream, fresh_bucket, get_bytes, open_multipart_uploads,
    wait_until,
};

const MIB: u64 = 1024 * 1024;

/// Uploads `len` bytes of `data(seed, ..)` as a stream of unknown length, with
/// default options and no progress listener.
async fn upload_stream(
    engine: &MultipartEngine,
    bucket: &str,
    key: &str,
    seed: u64,
    len: u64,
) -> Result<UploadReceipt, S3ServiceError> {
    engine
        .upload(
            bucket,
            key,
            UploadBody::stream(data_stream(seed, len)),
            &UploadOptions::new(),
            &ProgressListener::none(),
        )
        .await
}

/// A fault proxy in front of `server`, a client that goes through it, and a fresh
/// bucket named after `label`.
async fn behind_proxy(server: &support::S3Server, label: &str) -> (FaultProxy, Client, String) {
    let proxy = FaultProxy::start(&server.endpoint).await;
    let client = client(server, &proxy.endpoint());
    let bucket = fresh_bucket(&client, label).await;
    (proxy, client, bucket)
}

/// The object at `key` reads back as `data(seed, length)`, byte for byte.
async fn assert_object(
    client: &Client,
    bucket: &str,
    key: &str,
    seed: u64,
    length: u64,
    what: &str,
) {
    assert_same_bytes(
        &get_bytes(client, bucket, key).await,
        &data(seed, length),
        what,
    );
}

/// An upload that recovered from `faults` injected part faults of kind `fault`:
/// each cost one retry and one more UploadPart request, and nothing else.
fn assert_parts_retried(
    proxy: &FaultProxy,
    receipt: &UploadReceipt,
    fault: &str,
    faults: usize,
    parts: u32,
    what: &str,
) {
    let seen = proxy.seen();
    assert_eq!(
        seen.iter().filter(|s| s.fault == Some(fault)).count(),
        faults,
        "{what}"
    );
    assert_eq!(receipt.parts, parts, "{what}");
    assert_eq!(
        receipt.stats.retries, faults as u64,
        "{what}: {:?}",
        receipt.stats
    );
    assert_eq!(
        seen.iter().filter(|s| s.is_upload_part()).count(),
        parts as usize + faults,
        "{what}: {parts} parts + {faults} retries"
    );
}

/// `error` is the throttling of `operation` (the proxy's 503s outlasted the
/// retries); returns its message.
fn assert_throttled_in(error: &S3ServiceError, operation: S3Operation, what: &str) -> String {
    assert_eq!(error.operation(), operation, "{what}: {error}");
    assert!(
        matches!(error.kind(), S3ErrorKind::Throttled { .. }),
        "{what}: {error}"
    );
    error.message().unwrap_or_default().to_string()
}

/// Short backoff so the suite stays quick; throttling answers still wait the
/// 1 s floor, which is what the SlowDown test looks for.
fn fast_retry() -> RetryPolicy {
    RetryPolicy::default()
        .initial_backoff(Duration::from_millis(10))
        .max_backoff(Duration::from_millis(100))
}

/// After a failed or dropped upload: the proxy saw an AbortMultipartUpload that
/// the server accepted and, where the server can list them (moto), no multipart
/// upload is left in the bucket.
async fn assert_no_upload_left(proxy: &FaultProxy, server: &support::S3Server, bucket: &str) {
    let what = server.name;
    let aborted = wait_until(Duration::from_secs(20), || {
        proxy
            .seen()
            .iter()
            .any(|s| s.is_abort() && s.status == Some(204))
    })
    .await;
    assert!(
        aborted,
        "{what}: no accepted abort among {:#?}",
        proxy.seen()
    );
    if server.name == "moto" {
        let direct = client(server, &server.endpoint);
        let open = open_multipart_uploads(&direct, bucket).await;
        assert!(
            open.is_empty(),
            "{what}: multipart uploads left behind: {open:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_down_answers_are_backed_off_and_the_upload_completes() {
    for server in support::s3_servers() {
        let what = server.name;
        let (proxy, client, bucket) = behind_proxy(&server, "slow").await;
        // The next three requests, whatever they are (CreateMultipartUpload first,
        // then parts), are answered 503 SlowDown.
        proxy.slow_down(Matcher::Any, 3);
        let uploader = MultipartEngine::new(
            client.clone(),
            TransferConfig::default().retry(fast_retry()),
        );
        let length = 16 * MIB;
        let receipt = upload_stream(&uploader, &bucket, "slow/obj", 10, length)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));

        let throttled: Vec<_> = proxy
            .seen()
            .into_iter()
            .filter(|s| s.status == Some(503))
            .collect();
        assert_eq!(throttled.len(), 3, "{what}: {throttled:?}");
        assert_eq!(receipt.stats.throttled, 3, "{what}: {:?}", receipt.stats);
        assert_eq!(receipt.stats.retries, 3, "{what}");
        // Every throttled retry waited the 1 s floor, not the 10 ms backoff.
        assert_eq!(
            receipt.stats.backoff,
            THROTTLE_DELAY_FLOOR * 3,
            "{what}: {:?}",
            receipt.stats
        );
        assert_eq!(receipt.parts, 4, "{what}");
        assert_object(&client, &bucket, "slow/obj", 10, length, what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_during_a_part_is_retried_and_the_object_is_intact() {
    for server in support::s3_servers() {
        let what = server.name;
        let (proxy, client, bucket) = behind_proxy(&server, "cut").await;
        // Two UploadParts lose their connection after 1 MiB of their 5 MiB body.
        proxy.cut_body(Matcher::UploadPart, 2, MIB);
        let uploader = MultipartEngine::new(
            client.clone(),
            TransferConfig::default().retry(fast_retry()),
        );
        let length = 24 * MIB + 123;
        let receipt = upload_stream(&uploader, &bucket, "cut/obj", 11, length)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));

        assert_parts_retried(&proxy, &receipt, "cut", 2, 5, what);
        assert_eq!(receipt.stats.throttled, 0, "{what}");
        assert_object(&client, &bucket, "cut/obj", 11, length, what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_that_outlasts_the_retries_aborts_the_upload() {
    for server in support::s3_servers() {
        let what = server.name;
        let (proxy, client, bucket) = behind_proxy(&server, "fail").await;
        proxy.slow_down(Matcher::UploadPart, usize::MAX);
        let uploader = MultipartEngine::new(
            client.clone(),
            TransferConfig::default().retry(fast_retry().max_retries(2)),
        );
        let error = upload_stream(&uploader, &bucket, "fail/obj", 12, 12 * MIB)
            .await
            .expect_err("every part is throttled");
        let message = assert_throttled_in(&error, S3Operation::UploadPart, what);
        assert!(
            message.ends_with("(gave up after 3 attempts)"),
            "{what}: {message}"
        );
        assert_no_upload_left(&proxy, &server, &bucket).await;
        let missing = client
            .head_object()
            .bucket(&bucket)
            .key("fail/obj")
            .send()
            .await;
        assert!(missing.is_err(), "{what}: no object was made");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_upload_future_aborts_the_upload() {
    for server in support::s3_servers() {
        let what = server.name;
        let (proxy, client, bucket) = behind_proxy(&server, "drop").await;
        let uploader = MultipartEngine::new(client.clone(), TransferConfig::default());
        // 12 MiB, then a body that never ends: the upload cannot finish by itself.
        let body = futures::StreamExt::chain(data_stream(13, 12 * MIB), futures::stream::pending());
        let (sender, mut progress) = tokio::sync::watch::channel(TransferProgress::default());
        let listener = ProgressListener::watch(sender);
        let task = tokio::spawn({
            let bucket = bucket.clone();
            async move {
                uploader
                    .upload(
                        &bucket,
                        "drop/obj",
                        UploadBody::stream(body),
                        &UploadOptions::new(),
                        &listener,
                    )
                    .await
            }
        });
        // Wait until two parts are stored, then drop the upload future.
        tokio::time::timeout(
            Duration::from_secs(60),
            progress.wait_for(|p| p.parts_done >= 2),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: parts never completed"))
        .expect("progress channel");
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled(), "{what}");
        assert_no_upload_left(&proxy, &server, &bucket).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ranged_download_cut_mid_answer_retries_the_range() {
    for server in support::s3_servers() {
        let what = server.name;
        let (proxy, client, bucket) = behind_proxy(&server, "dlcut").await;
        let length = 17 * MIB + 9;
        let expected = data(14, length);
        let config = TransferConfig::default().retry(fast_retry());
        MultipartEngine::new(client.clone(), config.clone())
            .upload(
                &bucket,
                "dl/obj",
                UploadBody::from(expected.clone()),
                &UploadOptions::new(),
                &ProgressListener::none(),
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        // Two ranged GETs lose their connection after 1 MiB of their answer.
        proxy.cut_response(Matcher::RangedGet, 2, MIB);
        let mut downloaded = Vec::new();
        let receipt = RangedDownloader::new(client.clone(), config)
            .download_to_writer(
                &bucket,
                "dl/obj",
                &mut downloaded,
                &ProgressListener::none(),
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let seen = proxy.seen();
        assert_eq!(
            seen.iter()
                .filter(|s| s.fault == Some("cut_response"))
                .count(),
            2,
            "{what}"
        );
        assert_eq!(receipt.parts, 4, "{what}");
        assert_eq!(receipt.stats.retries, 2, "{what}: {:?}", receipt.stats);
        assert_same_bytes(&downloaded, &expected, what);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_part_is_given_up_at_the_part_timeout_and_retried() {
    for server in support::s3_servers() {
        let what = server.name;
        let (proxy, client, bucket) = behind_proxy(&server, "stall").await;
        // One UploadPart is read whole and never answered.
        proxy.stall(Matcher::UploadPart, 1);
        let config = TransferConfig::default()
            .retry(fast_retry())
            .part_timeout(Duration::from_secs(3))
            // Loopback is fast: keep the size share of the bound small (5 MiB
            // at 64 MiB/s is 80 ms), so the stall is given up after about 3 s.
            .min_throughput(64 * MIB);
        let length = 12 * MIB;
        let receipt = upload_stream(
            &MultipartEngine::new(client.clone(), config),
            &bucket,
            "stall/obj",
            15,
            length,
        )
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));

        assert_parts_retried(&proxy, &receipt, "stall", 1, 3, what);
        assert_object(&client, &bucket, "stall/obj", 15, length, what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_complete_answer_is_confirmed_by_the_object() {
    for server in support::s3_servers() {
        let what = server.name;
        let (proxy, client, bucket) = behind_proxy(&server, "lostcomplete").await;
        // The server completes the upload; its answer never reaches the client.
        proxy.lose_answer(Matcher::CompleteMultipartUpload, 1);
        let length = 12 * MIB + 7;
        let receipt = upload_stream(
            &MultipartEngine::new(
                client.clone(),
                TransferConfig::default().retry(fast_retry()),
            ),
            &bucket,
            "lost/obj",
            16,
            length,
        )
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));

        let completes: Vec<_> = proxy
            .seen()
            .into_iter()
            .filter(|s| s.method == "POST" && s.target.contains("uploadId="))
            .collect();
        assert_eq!(completes.len(), 2, "{what}: {completes:#?}");
        assert_eq!(completes[0].fault, Some("lose_answer"), "{what}");
        assert_eq!(
            completes[0].status,
            Some(200),
            "{what}: the server completed"
        );
        // S3 answers a retry for a completed upload 404 NoSuchUpload, s3s-fs 403
        // (an upload id it no longer knows); keel then confirms with HeadObject.
        // moto answers the retry with success, as S3 itself sometimes does.
        let expected_retry_status = if server.name == "moto" { 200 } else { 403 };
        assert_eq!(
            completes[1].status,
            Some(expected_retry_status),
            "{what}: the retry's answer"
        );
        if server.name != "moto" {
            assert!(
                proxy
                    .seen()
                    .iter()
                    .any(|s| s.method == "HEAD" && s.target.contains("lost/obj")),
                "{what}: the object was checked with HeadObject"
            );
        }
        assert!(
            !proxy.seen().iter().any(|s| s.is_abort()),
            "{what}: a completed upload is not aborted"
        );
        assert_eq!((receipt.parts, receipt.size), (3, length), "{what}");
        let head = client
            .head_object()
            .bucket(&bucket)
            .key("lost/obj")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(receipt.e_tag.as_deref(), head.e_tag(), "{what}");
        assert!(
            receipt
                .e_tag
                .as_deref()
                .is_some_and(|e| e.trim_matches('"').ends_with("-3")),
            "{what}: a multipart ETag, {:?}",
            receipt.e_tag
        );
        assert_object(&client, &bucket, "lost/obj", 16, length, what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_complete_with_no_object_behind_it_fails_and_aborts() {
    for server in support::s3_servers() {
        let what = server.name;
        let (proxy, client, bucket) = behind_proxy(&server, "brokencomplete").await;
        // The first CompleteMultipartUpload breaks off before the server has its
        // body (so nothing is completed), every later one is throttled.
        proxy.cut_body(Matcher::CompleteMultipartUpload, 1, 0);
        proxy.slow_down(Matcher::CompleteMultipartUpload, usize::MAX);
        let error = upload_stream(
            &MultipartEngine::new(
                client.clone(),
                TransferConfig::default().retry(fast_retry().max_retries(2)),
            ),
            &bucket,
            "broken/obj",
            17,
            12 * MIB,
        )
        .await
        .expect_err("the upload was never completed");

        let message = assert_throttled_in(&error, S3Operation::CompleteMultipartUpload, what);
        assert!(
            message.contains("broke off without an answer; HeadObject failed"),
            "{what}: {message}"
        );
        assert!(
            proxy.seen().iter().any(|s| s.method == "HEAD"
                && s.target.contains("broken/obj")
                && s.status == Some(404)),
            "{what}: HeadObject found no object"
        );
        assert_no_upload_left(&proxy, &server, &bucket).await;
    }
}
