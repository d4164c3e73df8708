//! S3 transfers against each real test server (s3s-fs and moto): streamed
//! multipart uploads with bounded concurrency and progress, ranged downloads,
//! multipart copies. Start the servers with `scripts/up`.

mod support;
mod transfer_support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use keel::s3::client::S3Client;
use keel::s3::config::S3Config;
use keel::s3::download::RangedDownloader;
use keel::s3::error::{S3ErrorKind, S3Operation};
use keel::s3::key::ObjectKey;
use keel::s3::multipart::{
    CopyConfig, MultipartCopier, MultipartEngine, ProgressListener, TransferConfig,
    TransferProgress,
};
use keel::s3::upload::{
    MultipartUploadRequest, MultipartUploader, UploadBody, UploadOptions, UploadProgress,
};
use transfer_support::proxy::FaultProxy;
use transfer_support::{
    assert_same_bytes, client, data, data_stream, fresh_bucket, get_bytes, open_multipart_uploads,
};

const MIB: u64 = 1024 * 1024;

/// Content type and metadata, to check they reach the object.
fn test_options() -> UploadOptions {
    UploadOptions::new()
        .content_type("application/x-keel-test")
        .metadata("origin", "keel-tests")
}

fn recording_listener() -> (ProgressListener, Arc<Mutex<Vec<TransferProgress>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let listener = ProgressListener::callback({
        let events = Arc::clone(&events);
        move |event| events.lock().unwrap().push(event)
    });
    (listener, events)
}

fn assert_progress_rises_to(events: &[TransferProgress], total: u64, parts: u32, what: &str) {
    assert_eq!(events.len(), parts as usize, "{what}: one event per part");
    for pair in events.windows(2) {
        assert!(
            pair[1].bytes > pair[0].bytes,
            "{what}: progress went {pair:?}"
        );
        assert_eq!(
            pair[1].parts_done,
            pair[0].parts_done + 1,
            "{what}: parts_done"
        );
    }
    let last = events.last().expect("progress events");
    assert_eq!(last.bytes, total, "{what}: progress ends at the total");
    assert_eq!(
        last.total,
        Some(total),
        "{what}: the last event knows the total"
    );
    let mut numbers: Vec<u32> = events.iter().map(|e| e.part_number).collect();
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        (1..=parts).collect::<Vec<_>>(),
        "{what}: every part reported once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_64_mib_upload_goes_multipart_four_parts_at_a_time_and_round_trips() {
    for server in support::s3_servers() {
        let what = server.name;
        // A pass-through proxy counts the UploadPart requests in flight on the wire.
        let proxy = FaultProxy::start(&server.endpoint).await;
        let client = client(&server, &proxy.endpoint());
        let bucket = fresh_bucket(&client, "stream").await;
        let key = "streams/sixty-four.bin";
        let length = 64 * MIB;
        let config = TransferConfig::default();
        assert_eq!(config.get_part_size(), 5 * MIB);
        assert_eq!(config.get_parts_in_flight(), 4);

        let uploader = MultipartEngine::new(client.clone(), config.clone());
        let (listener, events) = recording_listener();
        let body = UploadBody::stream(data_stream(1, length)); // length unknown to keel
        let receipt = uploader
            .upload(&bucket, key, body, &test_options(), &listener)
            .await
            .unwrap_or_else(|e| panic!("{what}: upload failed: {e}"));

        assert_eq!(receipt.size, length, "{what}");
        assert_eq!(receipt.parts, 13, "{what}: 64 MiB in 5 MiB parts");
        // keel's own count: parts between "started" and "answered", signing included.
        assert_eq!(receipt.stats.max_in_flight, 4, "{what}: keel's own count");
        // On the wire, a part only counts once signed and sent; on a loaded 2-core
        // machine the fourth may still be hashing when the first is answered. Never
        // more than four, and truly concurrent.
        let on_wire = proxy.max_parts_in_flight();
        assert!(
            (2..=4).contains(&on_wire),
            "{what}: {on_wire} UploadParts on the wire at once"
        );
        assert_eq!(
            proxy.seen().iter().filter(|s| s.is_upload_part()).count(),
            13,
            "{what}: one UploadPart per part, none retried"
        );
        assert_progress_rises_to(&events.lock().unwrap(), length, 13, what);

        let head = client
            .head_object()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        assert_eq!(head.content_length(), Some(length as i64), "{what}");
        assert_eq!(
            head.content_type(),
            Some("application/x-keel-test"),
            "{what}"
        );
        let expected_metadata = HashMap::from([("origin".to_string(), "keel-tests".to_string())]);
        assert_eq!(head.metadata(), Some(&expected_metadata), "{what}");

        let expected = data(1, length);
        assert_same_bytes(&get_bytes(&client, &bucket, key).await, &expected, what);

        // The same object through the ranged downloader: 13 ranges, 4 at a time.
        let downloader = RangedDownloader::new(client.clone(), config);
        let (listener, events) = recording_listener();
        let mut downloaded = Vec::new();
        let receipt = downloader
            .download_to_writer(&bucket, key, &mut downloaded, &listener)
            .await
            .unwrap_or_else(|e| panic!("{what}: ranged download failed: {e}"));
        assert_eq!(receipt.parts, 13, "{what}");
        assert_eq!(receipt.stats.max_in_flight, 4, "{what}");
        assert_same_bytes(&downloaded, &expected, what);
        assert_progress_rises_to(&events.lock().unwrap(), length, 13, what);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bodies_go_in_one_put_object() {
    for server in support::s3_servers() {
        let what = server.name;
        let client = client(&server, &server.endpoint);
        let bucket = fresh_bucket(&client, "small").await;
        let uploader = MultipartEngine::new(client.clone(), TransferConfig::default());
        let (listener, events) = recording_listener();

        let bytes = data(2, 3 * MIB);
        let receipt = uploader
            .upload(
                &bucket,
                "small/bytes",
                UploadBody::from(bytes.clone()),
                &test_options(),
                &listener,
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(receipt.parts, 0, "{what}: one PutObject");
        assert_eq!(receipt.stats.requests, 1, "{what}");
        assert_same_bytes(
            &get_bytes(&client, &bucket, "small/bytes").await,
            &bytes,
            what,
        );
        let head = client
            .head_object()
            .bucket(&bucket)
            .key("small/bytes")
            .send()
            .await
            .unwrap();
        assert_eq!(
            head.content_type(),
            Some("application/x-keel-test"),
            "{what}"
        );

        // A stream of unknown length that ends below the threshold.
        let receipt = uploader
            .upload(
                &bucket,
                "small/stream",
                UploadBody::stream(data_stream(3, MIB + 17)),
                &UploadOptions::new(),
                &listener,
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(receipt.parts, 0, "{what}");
        assert_same_bytes(
            &get_bytes(&client, &bucket, "small/stream").await,
            &data(3, MIB + 17),
            what,
        );

        let receipt = uploader
            .upload(
                &bucket,
                "small/text",
                UploadBody::from("hello, keel"),
                &UploadOptions::new(),
                &listener,
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(receipt.size, 11, "{what}");
        assert_eq!(
            get_bytes(&client, &bucket, "small/text").await,
            b"hello, keel",
            "{what}"
        );

        let receipt = uploader
            .upload(
                &bucket,
                "small/empty",
                UploadBody::from(Vec::new()),
                &UploadOptions::new(),
                &listener,
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!((receipt.size, receipt.parts), (0, 0), "{what}");

        let events = events.lock().unwrap();
        assert_eq!(events.len(), 4, "{what}: one event per PutObject");
        assert_eq!(events[0].bytes, 3 * MIB, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_upload_in_known_length_parts_and_download_to_files() {
    let dir = std::env::temp_dir().join(format!("keel-transfer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for server in support::s3_servers() {
        let what = server.name;
        let client = client(&server, &server.endpoint);
        let bucket = fresh_bucket(&client, "file").await;
        let source = dir.join(format!("{what}-source.bin"));
        let expected = data(4, 12 * MIB + 5);
        std::fs::write(&source, &expected).unwrap();

        let config = TransferConfig::default().parts_in_flight(2);
        let uploader = MultipartEngine::new(client.clone(), config.clone());
        let (listener, events) = recording_listener();
        let receipt = uploader
            .upload(
                &bucket,
                "files/twelve.bin",
                UploadBody::file(&source),
                &UploadOptions::new(),
                &listener,
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(receipt.parts, 3, "{what}");
        assert!(receipt.stats.max_in_flight <= 2, "{what}");
        assert!(receipt.e_tag.is_some(), "{what}");
        // A known length: every event carries the total.
        let events = events.lock().unwrap().clone();
        assert!(
            events.iter().all(|e| e.total == Some(12 * MIB + 5)),
            "{what}"
        );
        assert_progress_rises_to(&events, 12 * MIB + 5, 3, what);

        let target = dir.join(format!("{what}-download.bin"));
        let downloader = RangedDownloader::new(client.clone(), config);
        let receipt = downloader
            .download_to_file(
                &bucket,
                "files/twelve.bin",
                &target,
                &ProgressListener::none(),
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(receipt.parts, 3, "{what}");
        assert_same_bytes(&std::fs::read(&target).unwrap(), &expected, what);

        // A missing object fails with the server's code and leaves no file behind.
        let missing = dir.join(format!("{what}-missing.bin"));
        let error = downloader
            .download_to_file(&bucket, "files/none", &missing, &ProgressListener::none())
            .await
            .expect_err("missing object");
        assert_eq!(error.kind(), &S3ErrorKind::NotFound, "{what}: {error}");
        assert!(!missing.exists(), "{what}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_go_multipart_above_the_threshold() {
    for server in support::s3_servers() {
        let what = server.name;
        let client = client(&server, &server.endpoint);
        let bucket = fresh_bucket(&client, "copy").await;
        let length = 12 * MIB + 3;
        let expected = data(5, length);
        let uploader = MultipartEngine::new(client.clone(), TransferConfig::default());
        uploader
            .upload(
                &bucket,
                "copy/source",
                UploadBody::from(expected.clone()),
                &test_options(),
                &ProgressListener::none(),
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));

        // Threshold lowered from 5 GiB to 5 MiB: three UploadPartCopy ranges.
        let copier = MultipartCopier::new(
            client.clone(),
            CopyConfig::default().threshold(5 * MIB).part_size(5 * MIB),
        );
        let (listener, events) = recording_listener();
        let receipt = copier
            .copy(
                &bucket,
                "copy/source",
                &bucket,
                "copy/multipart target",
                &listener,
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: multipart copy: {e}"));
        assert_eq!((receipt.parts, receipt.size), (3, length), "{what}");
        assert_progress_rises_to(&events.lock().unwrap(), length, 3, what);
        assert_same_bytes(
            &get_bytes(&client, &bucket, "copy/multipart target").await,
            &expected,
            what,
        );
        let head = client
            .head_object()
            .bucket(&bucket)
            .key("copy/multipart target")
            .send()
            .await
            .unwrap();
        assert_eq!(
            head.content_type(),
            Some("application/x-keel-test"),
            "{what}: attributes carried"
        );

        // Default threshold: one CopyObject.
        let copier = MultipartCopier::new(client.clone(), CopyConfig::default());
        let receipt = copier
            .copy(
                &bucket,
                "copy/source",
                &bucket,
                "copy/single",
                &ProgressListener::none(),
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: copy: {e}"));
        assert_eq!(receipt.parts, 0, "{what}");
        assert_same_bytes(
            &get_bytes(&client, &bucket, "copy/single").await,
            &expected,
            what,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_shorter_than_announced_fails_and_leaves_no_upload() {
    let server = support::moto();
    let proxy = FaultProxy::start(&server.endpoint).await;
    let client = client(&server, &proxy.endpoint());
    let bucket = fresh_bucket(&client, "short").await;
    let uploader = MultipartEngine::new(client.clone(), TransferConfig::default());
    let body = data_stream(6, 11 * MIB).boxed();
    let error = uploader
        .upload_stream(
            &bucket,
            "short/body",
            body,
            Some(20 * MIB),
            &UploadOptions::new(),
            &ProgressListener::none(),
        )
        .await
        .expect_err("the body runs short");
    assert_eq!(error.kind(), &S3ErrorKind::Body, "{error}");
    assert_eq!(error.operation(), S3Operation::Upload, "{error}");
    let expected = format!(
        "the body ended after {} of the announced {} bytes",
        11 * MIB,
        20 * MIB
    );
    assert_eq!(error.message(), Some(expected.as_str()));
    assert!(
        proxy
            .seen()
            .iter()
            .any(|s| s.is_abort() && s.status == Some(204)),
        "aborted: {:?}",
        proxy.seen()
    );
    assert!(open_multipart_uploads(&client, &bucket).await.is_empty());
}

/// The contract the S3 service uses: the engine behind `MultipartUploader`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_contract_uploads_through_the_engine() {
    for server in support::s3_servers() {
        let what = server.name;
        let sdk = client(&server, &server.endpoint);
        let bucket = fresh_bucket(&sdk, "contract").await;
        let config = S3Config::builder()
            .region("us-east-1")
            .bucket(&bucket)
            .endpoint(&server.endpoint)
            .force_path_style(true)
            .credentials(&server.access_key, &server.secret_key)
            .build()
            .unwrap();
        let s3 = S3Client::from_sdk(config, sdk.clone());
        let engine: Arc<dyn MultipartUploader> =
            Arc::new(MultipartEngine::new(sdk.clone(), TransferConfig::default()));
        assert_eq!(engine.threshold(), 5 * MIB);

        let events: Arc<Mutex<Vec<UploadProgress>>> = Arc::default();
        let listener = keel::s3::upload::ProgressListener::new({
            let events = Arc::clone(&events);
            move |event| events.lock().unwrap().push(event)
        });
        let length = 11 * MIB;
        let key = ObjectKey::new("contract/eleven.bin").unwrap();
        let request = MultipartUploadRequest::new(
            s3,
            bucket.clone(),
            key.clone(),
            data_stream(20, length).boxed(),
            Some(length),
            test_options(),
            Some(listener),
        );
        let output = engine
            .upload(request)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(output.key, key, "{what}");
        assert_eq!(output.size, length, "{what}");
        assert_eq!(output.parts, Some(3), "{what}");
        assert!(output.etag.is_some(), "{what}");
        assert_eq!(
            output.location,
            format!("{}/{bucket}/contract/eleven.bin", server.endpoint),
            "{what}"
        );
        let events = events.lock().unwrap().clone();
        assert_eq!(events.len(), 3, "{what}");
        assert_eq!(events[2].bytes_sent, length, "{what}");
        assert_eq!(events[2].total, Some(length), "{what}");
        assert_same_bytes(
            &get_bytes(&sdk, &bucket, "contract/eleven.bin").await,
            &data(20, length),
            what,
        );
    }
}

/// Every upload option reaches a multipart object (moto keeps and reports them all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_options_reach_a_multipart_object() {
    use keel::s3::upload::{CannedAcl, ServerSideEncryption};
    let server = support::moto();
    let client = client(&server, &server.endpoint);
    let bucket = fresh_bucket(&client, "options").await;
    let options = test_options()
        .cache_control("max-age=60")
        .content_disposition("attachment; filename=\"report.bin\"")
        .acl(CannedAcl::Private)
        .server_side_encryption(ServerSideEncryption::Aes256)
        .tag("team", "storage")
        .tag("tier", "cold data");
    let engine = MultipartEngine::new(client.clone(), TransferConfig::default());
    let receipt = engine
        .upload(
            &bucket,
            "options/obj",
            UploadBody::stream(data_stream(30, 6 * MIB)),
            &options,
            &ProgressListener::none(),
        )
        .await
        .unwrap();
    assert_eq!(receipt.parts, 2, "multipart");
    let head = client
        .head_object()
        .bucket(&bucket)
        .key("options/obj")
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_type(), Some("application/x-keel-test"));
    assert_eq!(head.cache_control(), Some("max-age=60"));
    assert_eq!(
        head.content_disposition(),
        Some("attachment; filename=\"report.bin\"")
    );
    assert_eq!(
        head.server_side_encryption(),
        Some(&aws_sdk_s3::types::ServerSideEncryption::Aes256)
    );
    let tagging = client
        .get_object_tagging()
        .bucket(&bucket)
        .key("options/obj")
        .send()
        .await
        .unwrap();
    let mut tags: Vec<(String, String)> = tagging
        .tag_set()
        .iter()
        .map(|t| (t.key().to_string(), t.value().to_string()))
        .collect();
    tags.sort();
    assert_eq!(
        tags,
        vec![
            ("team".to_string(), "storage".to_string()),
            ("tier".to_string(), "cold data".to_string())
        ]
    );
}

/// The facade with the engine plugged in: `s3.upload` of a 64 MiB stream goes
/// multipart through the engine and comes back byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_facade_uploads_a_streamed_64_mib_object_through_the_engine() {
    for server in support::s3_servers() {
        let what = server.name;
        let sdk = client(&server, &server.endpoint);
        let bucket = fresh_bucket(&sdk, "facade").await;
        let config = S3Config::builder()
            .region("us-east-1")
            .bucket(&bucket)
            .endpoint(&server.endpoint)
            .force_path_style(true)
            .credentials(&server.access_key, &server.secret_key)
            .build()
            .unwrap();
        let engine = Arc::new(MultipartEngine::new(sdk.clone(), TransferConfig::default()));
        let s3 = keel::s3::S3::builder(S3Client::from_sdk(config, sdk.clone()))
            .multipart(engine)
            .build();
        let events: Arc<Mutex<Vec<UploadProgress>>> = Arc::default();
        let listener = keel::s3::upload::ProgressListener::new({
            let events = Arc::clone(&events);
            move |event| events.lock().unwrap().push(event)
        });
        let length = 64 * MIB;
        let output = s3
            .upload_with_progress(
                "facade/sixty-four.bin",
                UploadBody::stream(data_stream(40, length)),
                test_options(),
                listener,
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(output.parts, Some(13), "{what}");
        assert_eq!(output.size, length, "{what}");
        let events = events.lock().unwrap().clone();
        assert_eq!(events.len(), 13, "{what}");
        assert!(
            events.windows(2).all(|w| w[1].bytes_sent > w[0].bytes_sent),
            "{what}: progress rises"
        );
        assert_eq!(events[12].bytes_sent, length, "{what}");
        assert_eq!(events[12].total, Some(length), "{what}");
        assert_same_bytes(
            &get_bytes(&sdk, &bucket, "facade/sixty-four.bin").await,
            &data(40, length),
            what,
        );
    }
}
