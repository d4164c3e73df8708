//! Every S3 operation of the facade against each real S3 server that `scripts/up`
//! starts (s3s-fs, which verifies signatures, and moto, which has broad S3
//! semantics). Each test uses its own fresh bucket.
#![cfg(feature = "s3")]

mod support;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use keel::s3::config::S3Config;
use keel::s3::error::S3ErrorKind;
use keel::s3::key::KeyRule;
use keel::s3::upload::{CannedAcl, ServerSideEncryption, UploadBody, UploadOptions};
use keel::s3::{S3, S3Client};
use support::S3Server;

use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};

/// Counts the HTTP requests the SDK actually transmits.
#[derive(Debug, Clone, Default)]
struct RequestCounter(Arc<AtomicUsize>);

impl RequestCounter {
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "RequestCounter"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A bucket name unique to this test run and test.
fn unique_bucket(test: &str) -> String {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let name = format!(
        "keel-{test}-{}-{nanos}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    );
    name.chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches('-')
        .to_string()
}

fn config_for(server: &S3Server, bucket: &str) -> S3Config {
    S3Config::builder()
        .region(&server.region)
        .bucket(bucket)
        .endpoint(&server.endpoint)
        .credentials(&server.access_key, &server.secret_key)
        .build()
        .unwrap()
}

/// A facade over a fresh bucket on `server`, with a request counter.
async fn setup(server: &S3Server, test: &str) -> (S3, RequestCounter) {
    let bucket = unique_bucket(test);
    let counter = RequestCounter::default();
    let interceptor = counter.clone();
    let client = S3Client::connect_with(config_for(server, &bucket), move |b| {
        b.interceptor(interceptor)
    })
    .await
    .unwrap();
    client
        .sdk()
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{}: create bucket {bucket}: {e:?}", server.name));
    (S3::new(client), counter)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A plain HTTP/1.1 client with no AWS code in it.
async fn plain_http(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let res = client
        .request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, body)
}

#[tokio::test]
async fn every_operation_round_trips() {
    for server in support::s3_servers() {
        let name = server.name;
        let (s3, _) = setup(&server, "ops").await;

        // Upload from bytes with options, download as a stream.
        let data = pattern(300_000, 1);
        let options = UploadOptions::new()
            .content_type("application/octet-stream")
            .metadata("user-id", "123")
            .cache_control("max-age=60");
        let out = s3
            .upload("docs/bytes.bin", data.clone(), options)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(out.key.as_str(), "docs/bytes.bin");
        assert_eq!(out.bucket, s3.bucket());
        assert_eq!(out.size, data.len() as u64);
        assert!(out.etag.is_some(), "{name}: no etag");
        assert!(
            out.location
                .ends_with(&format!("/{}/docs/bytes.bin", s3.bucket()))
        );
        let download = s3.download("docs/bytes.bin").await.unwrap();
        assert_eq!(download.content_length, Some(data.len() as u64));
        assert_eq!(
            download.content_type.as_deref(),
            Some("application/octet-stream")
        );
        assert_eq!(
            download.metadata.get("user-id").map(String::as_str),
            Some("123")
        );
        let mut body = download.body;
        let mut got = Vec::new();
        while let Some(chunk) = body.next().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(got, data, "{name}: streamed download differs");

        // From a string.
        s3.upload(
            "docs/text.txt",
            String::from("hello keel"),
            UploadOptions::new().content_type("text/plain"),
        )
        .await
        .unwrap();
        assert_eq!(
            &s3.download_bytes("docs/text.txt").await.unwrap()[..],
            b"hello keel"
        );

        // From a file, and downloaded to a file.
        let dir = std::env::temp_dir().join(format!("keel-s3-ops-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src.bin");
        let file_data = pattern(1_000_000, 7);
        std::fs::write(&src, &file_data).unwrap();
        let out = s3
            .upload(
                "docs/file.bin",
                UploadBody::file(&src),
                UploadOptions::new(),
            )
            .await
            .unwrap();
        assert_eq!(out.size, file_data.len() as u64);
        let dst = dir.join("dst.bin");
        let written = s3.download_to_file("docs/file.bin", &dst).await.unwrap();
        assert_eq!(written, file_data.len() as u64);
        assert_eq!(std::fs::read(&dst).unwrap(), file_data);
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("keel-partial"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "{name}: temp files left: {leftovers:?}"
        );

        // From an async stream of unknown length.
        let chunks: Vec<io::Result<Bytes>> = pattern(200_000, 3)
            .chunks(7_000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        s3.upload(
            "docs/stream.bin",
            UploadBody::stream(futures::stream::iter(chunks)),
            UploadOptions::new(),
        )
        .await
        .unwrap();
        assert_eq!(
            s3.download_bytes("docs/stream.bin").await.unwrap().to_vec(),
            pattern(200_000, 3)
        );

        // Exists, copy, list.
        assert!(s3.exists("docs/bytes.bin").await.unwrap());
        assert!(!s3.exists("docs/missing.bin").await.unwrap());
        let copied = s3
            .copy("docs/bytes.bin", "backup/bytes copy.bin")
            .await
            .unwrap();
        assert_eq!(copied.key.as_str(), "backup/bytes copy.bin");
        assert_eq!(
            s3.download_bytes("backup/bytes copy.bin")
                .await
                .unwrap()
                .to_vec(),
            data
        );
        let mut listed: Vec<String> = s3
            .list("docs/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        listed.sort();
        assert_eq!(
            listed,
            [
                "docs/bytes.bin",
                "docs/file.bin",
                "docs/stream.bin",
                "docs/text.txt"
            ]
        );
        let sizes: Vec<u64> = s3
            .list("backup/")
            .await
            .unwrap()
            .iter()
            .map(|o| o.size)
            .collect();
        assert_eq!(sizes, [data.len() as u64]);

        // Paging: two objects per page still lists everything.
        let page = s3.list_page("docs/", None, Some(2)).await.unwrap();
        assert_eq!(page.objects.len(), 2);
        assert!(
            page.next_continuation_token.is_some(),
            "{name}: no continuation"
        );

        // Not found is an error for a download.
        let err = s3.download("docs/missing.bin").await.unwrap_err();
        assert_eq!(err.kind(), &S3ErrorKind::NotFound, "{name}: {err:?}");
        assert_eq!(err.key(), Some("docs/missing.bin"));

        // Delete.
        s3.delete("docs/text.txt").await.unwrap();
        assert!(!s3.exists("docs/text.txt").await.unwrap());

        // Health.
        let health = s3.health().await;
        assert!(health.healthy, "{name}: {health:?}");

        let m = s3.metrics();
        assert_eq!(m.total_uploads, 4, "{name}: {m:?}");
        assert_eq!(m.total_downloads, 5, "{name}: {m:?}");
        assert_eq!(m.total_deletes, 1);
        assert_eq!(m.total_failed, 1, "{name}: the missing download");
        assert_eq!(
            m.bytes_uploaded,
            (data.len() + "hello keel".len() + file_data.len() + 200_000) as u64
        );
        assert!(m.bytes_downloaded >= (data.len() * 2 + file_data.len()) as u64);
        assert!(m.last_operation_at.is_some());
        assert_eq!(m.latency["exists"].count, 3);
        // The default stack's own metrics and breaker saw the same calls: the missing
        // download is ignored (not a failure of the server), so the breaker is closed.
        let calls = s3.call_metrics().unwrap().snapshot();
        assert_eq!(calls.failures, 0, "{name}: {calls:?}");
        assert_eq!(calls.ignored, 1, "{name}: the missing download");
        // 4 uploads, 6 downloads, 3 exists, 1 copy, 3 list pages, 1 delete.
        assert_eq!(calls.calls, 18, "{name}: {calls:?}");
        assert_eq!(
            s3.circuit_breaker().unwrap().state(),
            keel::layers::circuit_breaker::CircuitState::Closed
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[tokio::test]
async fn copy_across_buckets_and_single_put_progress() {
    for server in support::s3_servers() {
        let name = server.name;
        let (source, _) = setup(&server, "copysrc").await;
        let (target, _) = setup(&server, "copydst").await;
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&events);
        let listener =
            keel::s3::upload::ProgressListener::new(move |e| seen.lock().unwrap().push(e));
        source
            .upload_with_progress(
                "a/src.txt",
                "from the other bucket",
                UploadOptions::new(),
                listener,
            )
            .await
            .unwrap();
        let events = events.lock().unwrap().clone();
        assert_eq!(events.len(), 1, "{name}: one event for a single PutObject");
        assert_eq!((events[0].bytes_sent, events[0].total), (21, Some(21)));
        let out = target
            .copy_from_bucket(source.bucket(), "a/src.txt", "b/dst.txt")
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(out.bucket, target.bucket());
        assert_eq!(
            &target.download_bytes("b/dst.txt").await.unwrap()[..],
            b"from the other bucket"
        );
        assert!(!source.exists("b/dst.txt").await.unwrap());
    }
}

#[tokio::test]
async fn upload_options_acl_encryption_and_tags_are_accepted() {
    for server in support::s3_servers() {
        let name = server.name;
        let (s3, _) = setup(&server, "opts").await;
        let options = UploadOptions::new()
            .content_type("text/csv")
            .content_disposition("attachment; filename=\"r.csv\"")
            .acl(CannedAcl::Private)
            .server_side_encryption(ServerSideEncryption::Aes256)
            .tag("team", "billing");
        s3.upload("r.csv", "a,b\n1,2\n", options)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let download = s3.download("r.csv").await.unwrap();
        assert_eq!(download.content_type.as_deref(), Some("text/csv"));
        assert_eq!(
            &download.body.collect_bytes().await.unwrap()[..],
            b"a,b\n1,2\n"
        );
    }
}

#[tokio::test]
async fn presigned_put_then_get_with_a_plain_http_client() {
    for server in support::s3_servers() {
        let name = server.name;
        let (s3, _) = setup(&server, "presign").await;
        let data = pattern(50_000, 9);
        let put = s3
            .presign_put("shared/upload.bin", Duration::from_secs(300))
            .await
            .unwrap();
        assert_eq!(put.method, "PUT");
        let (status, body) = plain_http("PUT", &put.url, &put.headers, data.clone()).await;
        assert_eq!(
            status,
            200,
            "{name}: PUT {}: {}",
            put.url,
            String::from_utf8_lossy(&body)
        );
        let get = s3
            .presign_get("shared/upload.bin", Duration::from_secs(300))
            .await
            .unwrap();
        let (status, body) = plain_http("GET", &get.url, &get.headers, Vec::new()).await;
        assert_eq!(status, 200, "{name}: GET");
        assert_eq!(body, data, "{name}: presigned GET returned other bytes");
        // And the SDK sees the object the plain client stored.
        assert_eq!(
            s3.download_bytes("shared/upload.bin")
                .await
                .unwrap()
                .to_vec(),
            data
        );

        for expiry in [Duration::ZERO, Duration::from_secs(7 * 24 * 3600 + 1)] {
            let err = s3
                .presign_get("shared/upload.bin", expiry)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), &S3ErrorKind::InvalidRequest, "{expiry:?}");
        }
        assert!(
            s3.presign_get("shared/upload.bin", Duration::from_secs(7 * 24 * 3600))
                .await
                .is_ok()
        );
    }
}

#[tokio::test]
async fn expired_and_tampered_urls_are_refused_where_signatures_are_verified() {
    let servers: Vec<S3Server> = support::s3_servers()
        .into_iter()
        .filter(|s| s.verifies_signatures)
        .collect();
    assert!(
        !servers.is_empty(),
        "no signature-verifying server configured"
    );
    for server in servers {
        let name = server.name;
        let (s3, _) = setup(&server, "expiry").await;
        s3.upload("secret.txt", "top secret", UploadOptions::new())
            .await
            .unwrap();

        // Tampered: the same signature for another key, or a changed signature.
        let url = s3
            .presign_get("secret.txt", Duration::from_secs(300))
            .await
            .unwrap()
            .url;
        let (status, _) = plain_http("GET", &url, &[], Vec::new()).await;
        assert_eq!(status, 200, "{name}: the untampered URL must work");
        let other_key = url.replacen("/secret.txt", "/secret.txx", 1);
        let (status, _) = plain_http("GET", &other_key, &[], Vec::new()).await;
        assert_eq!(status, 403, "{name}: a URL for another key was accepted");
        let sig_at = url.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
        let mut tampered = url.clone().into_bytes();
        tampered[sig_at] = if tampered[sig_at] == b'0' { b'1' } else { b'0' };
        let (status, _) = plain_http(
            "GET",
            &String::from_utf8(tampered).unwrap(),
            &[],
            Vec::new(),
        )
        .await;
        assert_eq!(status, 403, "{name}: a tampered signature was accepted");
        let put = s3
            .presign_put("secret.txt", Duration::from_secs(300))
            .await
            .unwrap();
        let longer = put.url.replace("X-Amz-Expires=300", "X-Amz-Expires=3000");
        let (status, _) = plain_http("PUT", &longer, &[], b"overwritten".to_vec()).await;
        assert_eq!(status, 403, "{name}: a lengthened expiry was accepted");

        // Expired: the server checks real time, so this waits ~2 s of it.
        let short = s3
            .presign_get("secret.txt", Duration::from_secs(1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let (status, _) = plain_http("GET", &short.url, &[], Vec::new()).await;
        assert_eq!(status, 403, "{name}: an expired URL was accepted");
        assert_eq!(
            &s3.download_bytes("secret.txt").await.unwrap()[..],
            b"top secret"
        );
    }
}

#[tokio::test]
async fn invalid_keys_are_refused_without_any_request() {
    let long = "k".repeat(1025);
    let cases: Vec<(&str, KeyRule)> = vec![
        ("", KeyRule::Empty),
        (long.as_str(), KeyRule::TooLong),
        ("line\nbreak", KeyRule::ControlCharacter),
        ("nul\0", KeyRule::ControlCharacter),
        ("/leading", KeyRule::LeadingSlash),
        ("a//b", KeyRule::DoubleSlash),
        ("a/../b", KeyRule::DotSegment),
        ("./a", KeyRule::DotSegment),
    ];
    for server in support::s3_servers() {
        let name = server.name;
        let (s3, counter) = setup(&server, "keys").await;
        let before = counter.get();
        assert!(before >= 1, "{name}: the counter must see the CreateBucket");
        for (key, rule) in &cases {
            let expect = |err: keel::s3::S3ServiceError| {
                assert_eq!(
                    err.kind(),
                    &S3ErrorKind::InvalidKey(*rule),
                    "{name}: {key:?}: {err:?}"
                );
            };
            expect(
                s3.upload(*key, "x", UploadOptions::new())
                    .await
                    .unwrap_err(),
            );
            expect(
                s3.upload(*key, UploadBody::file("/nonexistent"), UploadOptions::new())
                    .await
                    .unwrap_err(),
            );
            expect(s3.download(*key).await.unwrap_err());
            expect(
                s3.download_to_file(*key, "/tmp/keel-never-written")
                    .await
                    .unwrap_err(),
            );
            expect(s3.exists(*key).await.unwrap_err());
            expect(s3.delete(*key).await.unwrap_err());
            expect(
                s3.presign_get(*key, Duration::from_secs(60))
                    .await
                    .unwrap_err(),
            );
            expect(
                s3.presign_put(*key, Duration::from_secs(60))
                    .await
                    .unwrap_err(),
            );
            expect(s3.copy("ok/source", *key).await.unwrap_err());
            expect(s3.copy(*key, "ok/destination").await.unwrap_err());
            expect(s3.delete_many(["ok/1", *key, "ok/2"]).await.unwrap_err());
        }
        assert_eq!(
            counter.get(),
            before,
            "{name}: an invalid key caused a request"
        );
        assert!(!std::path::Path::new("/tmp/keel-never-written").exists());
        // The same counter does see valid calls.
        assert!(!s3.exists("ok/absent").await.unwrap());
        assert_eq!(counter.get(), before + 1);
        assert_eq!(s3.metrics().total_failed, (cases.len() * 11) as u64);
    }
}

#[tokio::test]
async fn delete_many_of_2500_keys_leaves_none() {
    const N: usize = 2500;
    for server in support::s3_servers() {
        let name = server.name;
        let (s3, _) = setup(&server, "bulk").await;
        let keys: Vec<String> = (0..N).map(|i| format!("bulk/{i:05}")).collect();
        futures::stream::iter(keys.iter().cloned())
            .map(|k| {
                let s3 = s3.clone();
                async move {
                    s3.upload(k, Bytes::from_static(b"x"), UploadOptions::new())
                        .await
                }
            })
            .buffer_unordered(32)
            .for_each(|r| async move {
                r.unwrap();
            })
            .await;
        s3.upload("keep/me", "stay", UploadOptions::new())
            .await
            .unwrap();
        assert_eq!(s3.list("bulk/").await.unwrap().len(), N, "{name}: setup");

        let out = s3.delete_many(&keys).await.unwrap();
        assert!(
            out.is_complete(),
            "{name}: {:?}",
            &out.failures[..out.failures.len().min(3)]
        );
        assert_eq!(out.deleted, N);
        assert!(
            s3.list("bulk/").await.unwrap().is_empty(),
            "{name}: keys left after delete-many"
        );
        assert!(
            s3.exists("keep/me").await.unwrap(),
            "{name}: deleted too much"
        );
        assert_eq!(s3.metrics().total_deletes, N as u64);
        assert_eq!(
            s3.metrics().latency["delete_many"].count,
            3,
            "{name}: 1,000 + 1,000 + 500"
        );
    }
}

#[tokio::test]
async fn errors_other_than_not_found_are_errors() {
    for server in support::s3_servers() {
        let name = server.name;
        let bucket = unique_bucket("nobucket");
        // A bucket that does not exist: not a "false", an error.
        let s3 = S3::new(
            S3Client::connect(config_for(&server, &bucket))
                .await
                .unwrap(),
        );
        let health = s3.health().await;
        assert!(!health.healthy, "{name}");
        assert!(health.last_error.is_some());
        // (s3s-fs stores a PutObject into a missing bucket, so read instead.)
        let err = s3.download("a").await.unwrap_err();
        assert_eq!(err.kind(), &S3ErrorKind::NotFound, "{name}: {err:?}");
        assert_eq!(err.bucket(), Some(bucket.as_str()));
    }
    // Wrong credentials where signatures are checked: exists is an error, not false.
    let server = support::s3s_fs();
    let (good, _) = setup(&server, "creds").await;
    let mut bad = server.clone();
    bad.secret_key = "not-the-secret".to_string();
    let s3 = S3::new(
        S3Client::connect(config_for(&bad, good.bucket()))
            .await
            .unwrap(),
    );
    let err = s3.exists("anything").await.unwrap_err();
    assert_eq!(err.kind(), &S3ErrorKind::AccessDenied, "{err:?}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn shutdown_refuses_new_operations() {
    let server = support::s3s_fs();
    let (s3, _) = setup(&server, "shutdown").await;
    s3.upload("a.txt", "a", UploadOptions::new()).await.unwrap();
    // A download whose body is still unread counts as in flight.
    let download = s3.download("a.txt").await.unwrap();
    assert_eq!(s3.client().in_flight(), 1);
    let report = s3.shutdown(Duration::from_millis(50)).await;
    assert!(!report.drained);
    assert_eq!(report.still_in_flight, 1);
    let err = s3.exists("a.txt").await.unwrap_err();
    assert_eq!(err.kind(), &S3ErrorKind::ShuttingDown);
    assert_eq!(&download.body.collect_bytes().await.unwrap()[..], b"a");
    let report = s3.shutdown(Duration::from_secs(5)).await;
    assert!(report.drained);
}
