//! Smoke tests of the real S3-compatible servers that `scripts/up` starts (s3s-fs
//! and moto), with raw clients only (aws-sdk-s3, reqwest): they show that the test
//! servers work, and that s3s-fs really checks signatures, before any keel code is
//! tested against them.

mod support;

use std::time::{Duration, SystemTime};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;

use support::S3Server;

/// A raw aws-sdk-s3 client for a test server: path-style, region us-east-1,
/// checksums only when an operation requires them (what S3-compatible servers expect).
fn client(server: &S3Server) -> Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(&server.endpoint)
        .region(Region::new(server.region.clone()))
        .credentials_provider(Credentials::new(
            &server.access_key,
            &server.secret_key,
            None,
            None,
            "keel-tests",
        ))
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    Client::from_conf(config)
}

fn unique_bucket() -> String {
    format!("keel-smoke-{}", uuid::Uuid::new_v4())
}

async fn create_bucket(client: &Client, server: &S3Server, bucket: &str) {
    client
        .create_bucket()
        .bucket(bucket)
        .send()
        .await
        .unwrap_or_else(|err| panic!("{}: create bucket {bucket}: {err:?}", server.name));
}

async fn remove_bucket(client: &Client, server: &S3Server, bucket: &str, keys: &[&str]) {
    for key in keys {
        client
            .delete_object()
            .bucket(bucket)
            .key(*key)
            .send()
            .await
            .unwrap_or_else(|err| panic!("{}: delete {key}: {err:?}", server.name));
    }
    client
        .delete_bucket()
        .bucket(bucket)
        .send()
        .await
        .unwrap_or_else(|err| panic!("{}: delete bucket {bucket}: {err:?}", server.name));
}

#[tokio::test]
async fn put_and_get_an_object_on_each_server() {
    for server in support::s3_servers() {
        let client = client(&server);
        let bucket = unique_bucket();
        let key = "dir/smoke object.txt";
        let body = format!("hello {} from keel", server.name);
        create_bucket(&client, &server, &bucket).await;
        client
            .put_object()
            .bucket(&bucket)
            .key(key)
            .content_type("text/plain")
            .body(ByteStream::from(body.clone().into_bytes()))
            .send()
            .await
            .unwrap_or_else(|err| panic!("{}: put: {err:?}", server.name));
        let got = client
            .get_object()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .unwrap_or_else(|err| panic!("{}: get: {err:?}", server.name));
        assert_eq!(got.content_type(), Some("text/plain"), "{}", server.name);
        assert_eq!(
            got.content_length(),
            Some(body.len() as i64),
            "{}",
            server.name
        );
        let bytes = got.body.collect().await.expect("read body").into_bytes();
        assert_eq!(bytes.as_ref(), body.as_bytes(), "{}", server.name);
        remove_bucket(&client, &server, &bucket, &[key]).await;
    }
}

/// The presigned URL with the last hex digit of its signature changed.
fn tamper_signature(url: &str) -> String {
    let start = url
        .find("X-Amz-Signature=")
        .expect("presigned URL has a signature")
        + "X-Amz-Signature=".len();
    let end = url[start..].find('&').map_or(url.len(), |i| start + i);
    let last = end - 1;
    let replacement = if &url[last..end] == "0" { "1" } else { "0" };
    format!("{}{}{}", &url[..last], replacement, &url[end..])
}

async fn presigned_get(
    client: &Client,
    bucket: &str,
    key: &str,
    config: PresigningConfig,
) -> String {
    client
        .get_object()
        .bucket(bucket)
        .key(key)
        .presigned(config)
        .await
        .expect("presign GET")
        .uri()
        .to_string()
}

#[tokio::test]
async fn presigned_get_works_and_s3s_fs_refuses_a_tampered_or_expired_one() {
    let http = reqwest::Client::new();
    for server in support::s3_servers() {
        let client = client(&server);
        let bucket = unique_bucket();
        let key = "presigned.bin";
        let body = b"presigned body".to_vec();
        create_bucket(&client, &server, &bucket).await;
        client
            .put_object()
            .bucket(&bucket)
            .key(key)
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .unwrap_or_else(|err| panic!("{}: put: {err:?}", server.name));

        let valid = PresigningConfig::expires_in(Duration::from_secs(600)).expect("config");
        let url = presigned_get(&client, &bucket, key, valid).await;
        let response = http.get(&url).send().await.expect("GET presigned URL");
        assert_eq!(response.status(), 200, "{}: {url}", server.name);
        assert_eq!(
            response.bytes().await.expect("body").as_ref(),
            body.as_slice()
        );

        if server.verifies_signatures {
            let tampered = tamper_signature(&url);
            assert_ne!(tampered, url);
            let response = http.get(&tampered).send().await.expect("GET tampered URL");
            assert_eq!(
                response.status(),
                403,
                "{}: tampered URL {tampered}",
                server.name
            );

            // Signed an hour ago, valid for a minute: expired without any waiting.
            let expired = PresigningConfig::builder()
                .start_time(SystemTime::now() - Duration::from_secs(3600))
                .expires_in(Duration::from_secs(60))
                .build()
                .expect("config");
            let url = presigned_get(&client, &bucket, key, expired).await;
            let response = http.get(&url).send().await.expect("GET expired URL");
            assert_eq!(response.status(), 403, "{}: expired URL {url}", server.name);
        }
        remove_bucket(&client, &server, &bucket, &[key]).await;
    }
}

/// With no S3 server at the configured address, the S3 test above fails, and its
/// message names the command that starts the servers. It runs that very test in a
/// child process of this test binary, pointed at a port where nothing listens.
#[test]
fn s3_test_without_server_fails_naming_the_start_command() {
    let out = support::run_this_test_binary(
        "put_and_get_an_object_on_each_server",
        &[(
            "KEEL_S3FS_ENDPOINT",
            format!("http://{}", support::closed_local_address()),
        )],
    );
    assert!(!out.status.success(), "the test passed without a server");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("s3s-fs is not reachable") && text.contains("scripts/up"),
        "the failure does not name the start command:\n{text}"
    );
}
