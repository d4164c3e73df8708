//! The fuzzed functions and their invariants, shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/*.rs`, nightly) and by the stable corpus smoke test
//! (`tests/fuzz_corpus.rs`, which includes this file by path), so CI replays every
//! seed through exactly what the fuzzer runs.
//!
//! Inputs are raw bytes cut into fields by [`Input`] (length-prefixed pieces), so
//! no `arbitrary` dependency is needed on the stable side and the seed files are
//! easy to write by hand. Every check panics on a broken invariant: libFuzzer
//! reports the panic as a crash, the smoke test as a failure.

use std::time::Duration;

use keel::kafka::config::KafkaConfig;
use keel::kafka::consumer::{EventEnvelope, ReceivedMessage};
use keel::s3::presign::check_expiry;
use keel::s3::{KeyPolicy, ObjectKey, S3Config};
use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage, Timestamp};

/// Cuts fuzz bytes into fields; every read succeeds (missing bytes read as 0/empty).
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// One byte (0 when exhausted).
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    /// A little-endian u64 from up to 8 bytes.
    pub fn u64(&mut self) -> u64 {
        let n = self.data.len().min(8);
        let mut buf = [0u8; 8];
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        u64::from_le_bytes(buf)
    }

    /// A piece of at most 255 bytes, its length in the first byte.
    pub fn short(&mut self) -> &'a [u8] {
        let len = usize::from(self.byte()).min(self.data.len());
        let (piece, rest) = self.data.split_at(len);
        self.data = rest;
        piece
    }

    /// A piece of at most 65535 bytes, its length in the first two bytes (LE).
    pub fn long(&mut self) -> &'a [u8] {
        let len = usize::from(u16::from_le_bytes([self.byte(), self.byte()])).min(self.data.len());
        let (piece, rest) = self.data.split_at(len);
        self.data = rest;
        piece
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// Header names the decoder treats specially, so the fuzzer reaches them often.
const HEADER_NAMES: &[&str] = &[
    "keel-event-id",
    "keel-event-type",
    "keel-event-version",
    "content-type",
    "keel-dlq-original-topic",
    "keel-dlq-attempts",
];

/// A Kafka message as a broker could deliver it: any payload and key bytes, up to
/// 32 headers (names from [`HEADER_NAMES`] or any UTF-8 — librdkafka's Rust API
/// cannot carry other names —, values any bytes or none, duplicates allowed) and
/// any timestamp.
///
/// Layout: payload (long, or none when the flag byte is 0xFF), key (short, or none
/// when the flag byte is odd), timestamp kind and millis, then per header: a name
/// selector, a name (short), a value flag and a value (long).
pub fn message_from(data: &[u8]) -> OwnedMessage {
    let mut input = Input::new(data);
    let no_payload = input.byte() == 0xFF;
    let payload = input.long();
    let no_key = input.byte() % 2 == 1;
    let key = input.short();
    let timestamp = match input.byte() % 3 {
        0 => Timestamp::NotAvailable,
        1 => Timestamp::CreateTime(input.u64() as i64),
        _ => Timestamp::LogAppendTime(input.u64() as i64),
    };
    let mut headers: Option<OwnedHeaders> = None;
    let mut count = 0;
    while !input.is_empty() && count < 32 {
        count += 1;
        let selector = input.byte();
        let raw_name = input.short();
        let name = match HEADER_NAMES.get(usize::from(selector)) {
            Some(known) => (*known).to_string(),
            None => String::from_utf8_lossy(raw_name).into_owned(),
        };
        let has_value = !input.byte().is_multiple_of(4);
        let value = input.long();
        let hs = headers.take().unwrap_or_default();
        headers = Some(hs.insert(Header {
            key: &name,
            value: has_value.then_some(value),
        }));
    }
    OwnedMessage::new(
        (!no_payload).then(|| payload.to_vec()),
        (!no_key).then(|| key.to_vec()),
        "fuzz".to_string(),
        timestamp,
        0,
        0,
        headers,
    )
}

fn headers_of(m: &impl Message) -> Vec<(String, Option<Vec<u8>>)> {
    m.headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default()
}

/// JSON equality, numbers compared as numbers (a float may be re-encoded with a
/// different spelling of the same value), exactly: keel builds serde_json with
/// `float_roundtrip`, so a number decodes to the very f64 that was encoded.
fn json_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (a, b) {
        (V::Number(x), V::Number(y)) => {
            x == y
                || match (x.as_f64(), y.as_f64()) {
                    (Some(x), Some(y)) => x == y,
                    _ => false,
                }
        }
        (V::Array(x), V::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (V::Object(x), V::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// Event envelope decoding of a fetched message, through both paths the consumer
/// uses: the rdkafka message as fetched, and the copy the poll thread makes into
/// its batch buffer ([`ReceivedMessage`], `CopyBuffer`).
///
/// Invariants: no panic; the copy has the same key, payload, timestamp and headers
/// (order, duplicates, missing values) as the original, and decodes to the same
/// result; a decoded envelope encodes, and the encoded message decodes back to
/// an equal envelope; `DecodeError` and the envelope format without panicking.
pub fn envelope_decode(data: &[u8]) {
    let message = message_from(data);
    let copy = ReceivedMessage::new(message.clone());
    assert_eq!(copy.key(), message.key(), "key");
    assert_eq!(copy.payload(), message.payload(), "payload");
    assert_eq!(copy.timestamp(), message.timestamp(), "timestamp");
    assert!(!copy.has_unreadable_headers(), "UTF-8 names are readable");
    let original_headers = headers_of(&message);
    let copied: Vec<_> = copy
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(copied, original_headers, "copied headers");
    if let Some((name, value)) = original_headers.last() {
        let last = original_headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .unwrap();
        assert_eq!(copy.header(name), last.1.as_deref(), "header({name})");
        let _ = value;
    }
    let _ = format!("{copy:?}");
    let reowned = copy.to_owned_message();
    assert_eq!(
        headers_of(&reowned),
        original_headers,
        "to_owned_message headers"
    );

    let direct = EventEnvelope::<serde_json::Value>::from_message(&message);
    let via_copy = EventEnvelope::<serde_json::Value>::from_message(&reowned);
    match (&direct, &via_copy) {
        (Ok(a), Ok(b)) => assert_envelopes_eq(a, b),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("the copy decodes differently: {direct:?} vs {via_copy:?}"),
    }
    match direct {
        Err(e) => {
            let _ = (e.to_string(), e.kind(), format!("{e:?}"));
        }
        Ok(envelope) => {
            let _ = (envelope.to_string(), format!("{envelope:?}"));
            let encoded = envelope
                .encode()
                .unwrap_or_else(|e| panic!("a decoded envelope must encode: {e}"));
            let again = EventEnvelope::<serde_json::Value>::from_message(
                &encoded.to_owned_message("fuzz", 0, 0),
            )
            .unwrap_or_else(|e| panic!("an encoded envelope must decode: {e}"));
            assert_envelopes_eq(&envelope, &again);
        }
    }
}

fn assert_envelopes_eq(a: &EventEnvelope, b: &EventEnvelope) {
    assert_eq!(a.event_id(), b.event_id(), "event id");
    assert_eq!(a.event_type(), b.event_type(), "event type");
    assert_eq!(a.version(), b.version(), "version");
    assert_eq!(a.timestamp(), b.timestamp(), "timestamp");
    assert_eq!(a.key(), b.key(), "key");
    assert_eq!(a.headers(), b.headers(), "extra headers");
    assert!(
        json_eq(a.payload(), b.payload()),
        "payload {:?} vs {:?}",
        a.payload(),
        b.payload()
    );
}

/// `ObjectKey` from any string (lossy UTF-8 of the input, after a policy byte).
///
/// Invariants: no panic; `ObjectKey::with_policy` accepts exactly what
/// `KeyPolicy::check` accepts and keeps the string unchanged; `new`, `FromStr` and
/// `TryFrom` agree with the strict policy; whatever the strict policy accepts the
/// lenient `s3_only` policy accepts; errors format.
pub fn object_key(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.byte();
    let text = String::from_utf8_lossy(input.rest()).into_owned();
    let policy = KeyPolicy::strict()
        .allow_leading_slash(flags & 1 != 0)
        .allow_double_slash(flags & 2 != 0)
        .allow_dot_segments(flags & 4 != 0);
    let checked = policy.check(&text);
    // The AWS SDK refuses a whitespace-only key as missing: keel must refuse it first.
    if text.trim().is_empty() {
        assert!(checked.is_err(), "accepted a key of only whitespace");
    }
    match ObjectKey::with_policy(text.clone(), &policy) {
        Ok(key) => {
            assert!(checked.is_ok(), "accepted a key the policy refuses");
            assert_eq!(key.as_str(), text);
            assert_eq!(key.to_string(), text);
            let _ = format!("{key:?}");
        }
        Err(e) => {
            assert!(checked.is_err(), "refused a key the policy accepts");
            let _ = (e.to_string(), format!("{e:?}"));
        }
    }
    let strict = ObjectKey::new(text.as_str());
    assert_eq!(strict.is_ok(), KeyPolicy::strict().check(&text).is_ok());
    assert_eq!(text.parse::<ObjectKey>().is_ok(), strict.is_ok());
    assert_eq!(ObjectKey::try_from(text.as_str()).is_ok(), strict.is_ok());
    if strict.is_ok() {
        assert!(KeyPolicy::s3_only().check(&text).is_ok());
    }
}

/// Every variable the Kafka and S3 configs read (plus a pass-through property).
const VARIABLES: &[&str] = &[
    "ENABLE_KAFKA",
    "KAFKA_BROKERS",
    "KAFKA_CLIENT_ID",
    "KAFKA_GROUP_ID",
    "KAFKA_CONNECTION_TIMEOUT",
    "KAFKA_REQUEST_TIMEOUT",
    "KAFKA_RETRY_ATTEMPTS",
    "KAFKA_RETRY_BACKOFF_MS",
    "KAFKA_DELIVERY_TIMEOUT",
    "KAFKA_LOG_LEVEL",
    "KAFKA_MAX_BATCH_SIZE",
    "KAFKA_TRANSACTIONAL_ID",
    "KAFKA_RDKAFKA_COMPRESSION_TYPE",
    "KAFKA_RDKAFKA_SASL_PASSWORD",
    "KAFKA_RDKAFKA_SECURITY_PROTOCOL",
    "KAFKA_RDKAFKA_",
    "APP_ENV",
    "KEEL_ENV",
    "DEBUG",
    "AWS_REGION",
    "AWS_S3_BUCKET",
    "AWS_S3_ENDPOINT",
    "AWS_S3_FORCE_PATH_STYLE",
];

/// Up to 16 `(name, value)` pairs: a selector byte picks a known variable (or, past
/// the list, takes the next short piece as a name), then a short value.
pub fn variables_from(data: &[u8]) -> Vec<(String, String)> {
    let mut input = Input::new(data);
    let mut vars = Vec::new();
    while !input.is_empty() && vars.len() < 16 {
        let selector = input.byte();
        let name = match VARIABLES.get(usize::from(selector)) {
            Some(known) => (*known).to_string(),
            None => String::from_utf8_lossy(input.short()).into_owned(),
        };
        let value = String::from_utf8_lossy(input.short()).into_owned();
        vars.push((name, value));
    }
    vars
}

/// `KafkaConfig::from_vars` over any variables.
///
/// Invariants: no panic; a typed error (formats, and names no secret value) or a
/// config whose rdkafka client configs build without panicking.
pub fn kafka_config(data: &[u8]) {
    let vars = variables_from(data);
    match KafkaConfig::from_vars(vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        Ok(config) => {
            let _ = format!("{config:?}");
            let _ = config.producer_client_config();
            let _ = config.consumer_client_config();
            let _ = config.admin_client_config();
            let _ = config.bootstrap_servers();
        }
        Err(e) => {
            let shown = format!("{e} {e:?}");
            for (name, value) in &vars {
                // Another variable's value or name may contain the same text (and is
                // rightly shown): only a secret found nowhere else must not show.
                let elsewhere = vars.iter().any(|(n, v)| {
                    (n != name && v.contains(value.as_str()))
                        || n.to_lowercase().contains(&value.to_lowercase())
                });
                if name == "KAFKA_RDKAFKA_SASL_PASSWORD" && value.len() >= 8 && !elsewhere {
                    assert!(
                        !shown.contains(value.as_str()),
                        "a secret value in an error: {shown}"
                    );
                }
            }
        }
    }
}

/// `S3Config::from_lookup` over any variables (the last value of a name wins).
///
/// Invariants: no panic; a typed error that formats, or a config whose fields
/// read back.
pub fn s3_config(data: &[u8]) {
    let vars = variables_from(data);
    let lookup = |name: &str| {
        vars.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    match S3Config::from_lookup(lookup) {
        Ok(config) => {
            let _ = (
                config.region(),
                config.bucket(),
                config.endpoint(),
                format!("{config:?}"),
            );
            let rebuilt = config.to_builder().build();
            assert!(rebuilt.is_ok(), "a valid config must rebuild: {rebuilt:?}");
        }
        Err(e) => {
            let _ = format!("{e} {e:?}");
        }
    }
}

/// `check_expiry` over any duration (seconds from 8 bytes, nanoseconds below one
/// second from 4 more).
///
/// Invariants: no panic; accepted exactly when 1 s <= expiry <= 7 days.
pub fn presign_expiry(data: &[u8]) {
    let mut input = Input::new(data);
    let secs = input.u64();
    let nanos = (input.u64() % 1_000_000_000) as u32;
    let expiry = Duration::new(secs, nanos);
    let ok = check_expiry(expiry).map_err(|e| e.to_string()).is_ok();
    let expected = expiry >= Duration::from_secs(1) && expiry <= Duration::from_secs(7 * 24 * 3600);
    assert_eq!(ok, expected, "{expiry:?}");
}

/// The presigning client: offline (presigning signs locally, no request is sent),
/// static credentials, a custom endpoint, built once per process.
fn presign_client() -> &'static (tokio::runtime::Runtime, keel::s3::S3Client) {
    static CLIENT: std::sync::OnceLock<(tokio::runtime::Runtime, keel::s3::S3Client)> =
        std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let config = S3Config::builder()
            .region("eu-west-1")
            .bucket("fuzz-bucket")
            .endpoint("http://127.0.0.1:9")
            .credentials("AKIDFUZZEXAMPLE", "fuzz-secret-access-key")
            .build()
            .expect("a valid config");
        let client = rt
            .block_on(keel::s3::S3Client::connect(config))
            .expect("client");
        (rt, client)
    })
}

/// A presigned GET or PUT URL from any key, expiry and content type.
///
/// Layout: method byte (even: GET, odd: PUT), expiry seconds (8 bytes, kept
/// under 8 days so both sides of the 7-day limit show up), nanoseconds (8 bytes),
/// key (short, lossy UTF-8, kept only when `ObjectKey` accepts it), content type
/// (short; empty: none).
///
/// Invariants: no panic; an expiry `check_expiry` refuses is refused before
/// signing, one it accepts signs (GET, or PUT without a content type); a signed
/// URL is for the endpoint and method asked, carries `X-Amz-Expires` in whole
/// seconds, and neither its `Debug` nor its redacted form shows the signature or
/// the access key.
pub fn presign_url(data: &[u8]) {
    use keel::s3::presign::{presign_get, presign_put};
    let mut input = Input::new(data);
    let put = input.byte() % 2 == 1;
    let secs = input.u64() % (8 * 24 * 3600);
    let nanos = (input.u64() % 1_000_000_000) as u32;
    let expiry = Duration::new(secs, nanos);
    let key_text = String::from_utf8_lossy(input.short()).into_owned();
    let Ok(key) = ObjectKey::new(&key_text) else {
        return;
    };
    let content_type = String::from_utf8_lossy(input.short()).into_owned();
    let content_type = (!content_type.is_empty()).then_some(content_type.as_str());
    let (rt, client) = presign_client();
    let signed = rt.block_on(async {
        if put {
            presign_put(client, "fuzz-bucket", &key, expiry, content_type).await
        } else {
            presign_get(client, "fuzz-bucket", &key, expiry).await
        }
    });
    let expiry_ok = check_expiry(expiry).is_ok();
    let url = match signed {
        Ok(url) => url,
        Err(e) => {
            // Refused: a bad expiry always, a content type the HTTP layer
            // cannot carry possibly; never a valid request without one.
            assert!(
                !expiry_ok || (put && content_type.is_some()),
                "a valid presign request was refused: {e}"
            );
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("fuzz-secret-access-key"), "{shown}");
            return;
        }
    };
    assert!(expiry_ok, "{expiry:?} was signed");
    assert!(url.url.starts_with("http://127.0.0.1:9/"), "{}", url.url);
    assert_eq!(url.method, if put { "PUT" } else { "GET" });
    assert!(
        url.url
            .contains(&format!("X-Amz-Expires={}", expiry.as_secs())),
        "{}",
        url.url
    );
    let signature = url
        .url
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("X-Amz-Signature="))
        .expect("a signature in the URL");
    assert!(!signature.is_empty());
    for shown in [format!("{url:?}"), url.redacted_url()] {
        assert!(!shown.contains(signature), "signature shown: {shown}");
        assert!(
            !shown.contains("AKIDFUZZEXAMPLE"),
            "access key shown: {shown}"
        );
    }
}

/// S3 error codes keel classifies by name (and a few it does not).
const S3_CODES: &[&str] = &[
    "NoSuchKey",
    "NoSuchBucket",
    "NotFound",
    "NoSuchUpload",
    "AccessDenied",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "SlowDown",
    "Throttling",
    "TooManyRequests",
    "RequestTimeout",
    "InternalError",
    "InvalidRequest",
    "EntityTooLarge",
];

/// `S3ServiceError::from_sdk` over an S3 error answer: any status (100 to 999),
/// any `Retry-After` header bytes, any error code and message (what the SDK's XML
/// parser extracts from the body; keel parses no XML itself) and any body bytes.
///
/// Layout: status (2 bytes), code selector, code (short, used past the known
/// codes; empty = no code), message (short), Retry-After (short, 0xFF-prefixed =
/// none), then the body.
///
/// Invariants: no panic; NotFound codes (or a 404 without a known code) make
/// `is_not_found`; a `Retry-After` delay is capped at an hour; the error and its
/// classification format.
pub fn s3_error(data: &[u8]) {
    use aws_sdk_s3::config::http::HttpResponse;
    use aws_sdk_s3::error::{ErrorMetadata, SdkError};
    use aws_sdk_s3::operation::head_object::HeadObjectError;
    use aws_sdk_s3::primitives::SdkBody;
    use keel::layers::classify::ClassifiedError;
    use keel::s3::{S3Operation, S3ServiceError};

    let mut input = Input::new(data);
    let status = 100 + u16::from_le_bytes([input.byte(), input.byte()]) % 900;
    let selector = input.byte();
    let raw_code = String::from_utf8_lossy(input.short()).into_owned();
    let code = S3_CODES
        .get(usize::from(selector))
        .map(|c| (*c).to_string())
        .or((!raw_code.is_empty()).then_some(raw_code));
    let message = String::from_utf8_lossy(input.short()).into_owned();
    let no_retry_after = input.data.first() == Some(&0xFF);
    let retry_after = input.short();
    let body = input.rest();

    let mut response = http::Response::builder().status(status);
    if !no_retry_after {
        match http::HeaderValue::from_bytes(retry_after) {
            Ok(value) => response = response.header("retry-after", value),
            Err(_) => return, // no HTTP stack delivers such a header
        }
    }
    let response = response
        .body(SdkBody::from(body.to_vec()))
        .expect("a valid status and header");
    // The SDK's response type wants UTF-8 header values; others never reach keel.
    let Ok(raw) = HttpResponse::try_from(response) else {
        return;
    };
    let mut meta = ErrorMetadata::builder().message(message);
    if let Some(code) = &code {
        meta = meta.code(code);
    }
    let err = SdkError::service_error(HeadObjectError::generic(meta.build()), raw);
    let e = S3ServiceError::from_sdk(S3Operation::Download, "bucket", Some("key"), err);

    let _ = (e.to_string(), format!("{e:?}"), e.is_retryable(), e.code());
    let c = e.classification();
    let _ = format!("{c:?}");
    if let Some(delay) = e.retry_after() {
        assert!(delay <= Duration::from_secs(3600), "retry-after {delay:?}");
    }
    let not_found_code = matches!(
        code.as_deref(),
        Some("NoSuchKey" | "NoSuchBucket" | "NotFound" | "NoSuchUpload" | "NoSuchVersion")
    );
    // Every code keel maps to a kind by name (src/s3/error.rs); others fall back
    // to the status.
    const BY_NAME: &[&str] = &[
        "NoSuchKey",
        "NoSuchBucket",
        "NotFound",
        "NoSuchUpload",
        "NoSuchVersion",
        "AccessDenied",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "ExpiredToken",
        "InvalidToken",
        "AllAccessDisabled",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestThrottled",
        "RequestTimeout",
        "RequestTimeoutException",
    ];
    let known_code = code.as_deref().is_some_and(|c| BY_NAME.contains(&c));
    if not_found_code || (status == 404 && !known_code) {
        assert!(e.is_not_found(), "{code:?} {status}: {e:?}");
    }
}

/// `TopicName` from any string: lossy UTF-8 of the input, or (when the first byte
/// is odd) a name built from the rest over Kafka's alphabet plus a few refused
/// characters, so long valid names and the 249-character edge are reached often.
///
/// Invariants: no panic; an accepted name satisfies Kafka's rules (1-249
/// characters of `[a-zA-Z0-9._-]`, not `.` or `..`) and round-trips unchanged
/// through `as_str`, `Display`, `into_string`, `FromStr`, `TryFrom` and serde;
/// a refused name breaks exactly the rule its error names (checked in keel's
/// order: empty, character, length, dots) and the error shows its length, not
/// the name; `dead_letter` appends `.dlq` when the result fits and refuses it as
/// too long otherwise; `is_dead_letter` is `ends_with(".dlq")`.
pub fn topic_name(data: &[u8]) {
    use keel::kafka::topic::{InvalidTopic, MAX_TOPIC_CHARS, TopicName, TopicRule};

    const ALPHABET: &[u8] =
        b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-. /\\:\0\xc3";
    let mut input = Input::new(data);
    let text = if input.byte() % 2 == 1 {
        let bytes: Vec<u8> = input
            .rest()
            .iter()
            .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()])
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    } else {
        String::from_utf8_lossy(input.rest()).into_owned()
    };
    let kafka_ok = |s: &str| {
        !s.is_empty()
            && s.chars().count() <= 249
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && s != "."
            && s != ".."
    };
    let expected_rule = if text.is_empty() {
        Some(TopicRule::Empty)
    } else if !text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some(TopicRule::InvalidCharacter)
    } else if text.len() > 249 {
        Some(TopicRule::TooLong)
    } else if text == "." || text == ".." {
        Some(TopicRule::DotName)
    } else {
        None
    };
    assert_eq!(MAX_TOPIC_CHARS, 249);
    let result = TopicName::new(text.as_str());
    assert_eq!(text.parse::<TopicName>(), result, "FromStr");
    assert_eq!(TopicName::try_from(text.as_str()), result, "TryFrom<&str>");
    assert_eq!(TopicName::try_from(text.clone()), result, "TryFrom<String>");
    let from_json = serde_json::from_value::<TopicName>(serde_json::Value::String(text.clone()));
    assert_eq!(from_json.is_ok(), result.is_ok(), "serde");
    match result {
        Ok(topic) => {
            assert!(kafka_ok(&text), "accepted a name Kafka refuses: {text:?}");
            assert_eq!(expected_rule, None);
            assert_eq!(topic.as_str(), text);
            assert_eq!(topic.to_string(), text);
            assert_eq!(AsRef::<str>::as_ref(&topic), text);
            assert_eq!(
                serde_json::to_value(&topic).unwrap(),
                serde_json::Value::String(text.clone())
            );
            assert_eq!(from_json.unwrap(), topic);
            assert_eq!(TopicName::new(topic.to_string()).as_ref(), Ok(&topic));
            assert_eq!(topic.is_dead_letter(), text.ends_with(".dlq"));
            match topic.dead_letter() {
                Ok(dlq) => {
                    assert!(text.len() + 4 <= 249, "{} chars", text.len());
                    assert_eq!(dlq.as_str(), format!("{text}.dlq"));
                    assert!(dlq.is_dead_letter());
                }
                Err(e) => {
                    assert!(text.len() + 4 > 249, "{} chars: {e}", text.len());
                    assert_eq!(e.rule, TopicRule::TooLong);
                }
            }
            let _ = format!("{topic:?}");
            assert_eq!(String::from(topic.clone()), text);
            assert_eq!(topic.into_string(), text);
        }
        Err(e) => {
            let InvalidTopic { rule, len } = e.clone();
            assert!(!kafka_ok(&text), "refused a name Kafka accepts: {text:?}");
            assert_eq!(Some(rule), expected_rule, "{text:?}");
            assert_eq!(len, text.len());
            assert_eq!(e.len(), text.len());
            assert_eq!(e.is_empty(), text.is_empty());
            // The error names the rule, never the (user-given) name.
            assert_eq!(e.to_string(), format!("invalid topic name: {rule}"));
            let _ = (rule.as_str(), format!("{e:?}"));
        }
    }
}

/// Values a provenance header may plausibly hold, so reads reach success often.
const PROVENANCE_VALUES: &[&[u8]] = &[
    b"0",
    b"-1",
    b"42",
    b"+7",
    b" 1",
    b"2147483648",
    b"9223372036854775807",
    b"18446744073709551616",
    b"CreateTime",
    b"LogAppendTime",
    b"NotAvailable",
    b"orders",
    b"",
    b"\xff\xfe",
];

/// A dead-lettered message's headers and a failure: provenance headers (names
/// from `headers::ALL`) mixed with any others, names of any bytes (not UTF-8
/// too), values of any bytes (plausible ones often), duplicates, up to 64 KiB.
///
/// Layout: flags, topic (short), group (short), kind (short), error type
/// (short), error message (long), attempts, partition, offset (8 bytes each),
/// timestamp kind (byte) and millis, failure time (millis); then per header: a
/// name selector, a name (short, past the known names), a value flag and a value
/// (long, or a selector into [`PROVENANCE_VALUES`]).
///
/// Invariants: no panic; [`Provenance::read_raw`] answers what a plain model
/// says (the last header of each name counts; a missing or valueless one is
/// `Missing`, one that is not UTF-8 or not a number in range is `Invalid`, and
/// the timestamp is only read when the type says there is one); reading the
/// same headers through `OwnedHeaders` and through the consumer's copy
/// (`ReceivedMessage`) gives the same answer; and round trip: the headers keel
/// appends for a failure (after any original headers, even old provenance ones)
/// read back to exactly the provenance written, the originals still first and
/// unchanged, the error message cut to at most `MAX_ERROR_MESSAGE` bytes.
pub fn dead_letter_headers(data: &[u8]) {
    use keel::kafka::dead_letter::headers::{self, Provenance, ProvenanceError};
    use keel::kafka::dead_letter::{DeadLetterReason, MAX_ERROR_MESSAGE};
    use std::time::UNIX_EPOCH;

    let mut input = Input::new(data);
    let _flags = input.byte();
    let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let topic = lossy(input.short());
    let group = lossy(input.short());
    let reason = DeadLetterReason {
        kind: lossy(input.short()),
        error_type: lossy(input.short()),
        message: lossy(input.long()),
        attempts: input.u64() as u32,
    };
    let partition = input.u64() as i32;
    let offset = input.u64() as i64;
    let timestamp = match input.byte() % 3 {
        0 => Timestamp::NotAvailable,
        1 => Timestamp::CreateTime(input.u64() as i64),
        _ => Timestamp::LogAppendTime(input.u64() as i64),
    };
    let failed_at = UNIX_EPOCH
        .checked_add(Duration::from_millis(input.u64()))
        .unwrap_or(UNIX_EPOCH);
    let mut pairs: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    while !input.is_empty() && pairs.len() < 32 {
        let selector = input.byte();
        let name = match headers::ALL.get(usize::from(selector % 16)) {
            Some(known) if selector < 128 => known.as_bytes().to_vec(),
            _ => input.short().to_vec(),
        };
        let flag = input.byte();
        let value = match flag % 4 {
            0 => None,
            1 => Some(
                PROVENANCE_VALUES[usize::from(input.byte()) % PROVENANCE_VALUES.len()].to_vec(),
            ),
            _ => Some(input.long().to_vec()),
        };
        pairs.push((name, value));
    }

    // 1. Reading any headers, against a model.
    let raw = Provenance::read_raw(pairs.iter().map(|(n, v)| (n.as_slice(), v.as_deref())));
    let last = |name: &str| -> Option<Option<&[u8]>> {
        pairs
            .iter()
            .rev()
            .find(|(n, _)| n.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_deref())
    };
    match &raw {
        Ok(p) => {
            let text = |name: &str| std::str::from_utf8(last(name).flatten().unwrap()).unwrap();
            assert_eq!(p.topic, text(headers::ORIGINAL_TOPIC));
            assert_eq!(Ok(p.partition), text(headers::ORIGINAL_PARTITION).parse());
            assert_eq!(Ok(p.offset), text(headers::ORIGINAL_OFFSET).parse());
            assert_eq!(p.consumer_group, text(headers::CONSUMER_GROUP));
            assert_eq!(p.error_kind, text(headers::ERROR_KIND));
            assert_eq!(p.error_type, text(headers::ERROR_TYPE));
            assert_eq!(p.error_message, text(headers::ERROR_MESSAGE));
            assert_eq!(Ok(p.attempts), text(headers::ATTEMPTS).parse());
            assert_eq!(Ok(p.failed_at_ms), text(headers::FAILED_AT).parse());
            let ts_type = text(headers::ORIGINAL_TIMESTAMP_TYPE);
            let expected = match ts_type {
                "NotAvailable" => Timestamp::NotAvailable,
                "CreateTime" => {
                    Timestamp::CreateTime(text(headers::ORIGINAL_TIMESTAMP).parse().unwrap())
                }
                "LogAppendTime" => {
                    Timestamp::LogAppendTime(text(headers::ORIGINAL_TIMESTAMP).parse().unwrap())
                }
                other => panic!("accepted timestamp type {other:?}"),
            };
            assert_eq!(p.timestamp, expected);
        }
        Err(e) => {
            let _ = (e.to_string(), format!("{e:?}"));
            let name = e.header();
            assert!(headers::ALL.contains(&name));
            match e {
                ProvenanceError::Missing(_) => {
                    assert!(last(name).flatten().is_none(), "{name} is there")
                }
                ProvenanceError::Invalid(_) => {
                    let value = last(name).flatten().expect("an invalid header is there");
                    let ok = match std::str::from_utf8(value) {
                        Err(_) => false,
                        Ok(v) => match name {
                            headers::ORIGINAL_PARTITION => v.parse::<i32>().is_ok(),
                            headers::ORIGINAL_OFFSET | headers::ORIGINAL_TIMESTAMP => {
                                v.parse::<i64>().is_ok()
                            }
                            headers::ATTEMPTS => v.parse::<u32>().is_ok(),
                            headers::FAILED_AT => v.parse::<u64>().is_ok(),
                            headers::ORIGINAL_TIMESTAMP_TYPE => {
                                matches!(v, "NotAvailable" | "CreateTime" | "LogAppendTime")
                            }
                            _ => true,
                        },
                    };
                    assert!(!ok, "{name} is valid");
                }
            }
        }
    }

    // The same headers through rdkafka's OwnedHeaders (UTF-8 names only; a name
    // is read back up to its first NUL, as librdkafka keeps C strings) and
    // through the consumer's copy of a message carrying them.
    let utf8: Vec<(&str, Option<&[u8]>)> = pairs
        .iter()
        .filter_map(|(n, v)| Some((std::str::from_utf8(n).ok()?, v.as_deref())))
        .collect();
    let owned = utf8.iter().fold(OwnedHeaders::new(), |hs, (n, v)| {
        hs.insert(Header { key: n, value: *v })
    });
    let cut = |n: &str| n.split('\0').next().unwrap_or_default().to_string();
    let expected = Provenance::read_raw(
        utf8.iter()
            .map(|(n, v)| (cut(n), *v))
            .collect::<Vec<_>>()
            .iter()
            .map(|(n, v)| (n.as_bytes(), *v)),
    );
    assert_eq!(Provenance::read(&owned), expected, "through OwnedHeaders");
    let original = OwnedMessage::new(
        None,
        None,
        topic.clone(),
        timestamp,
        partition,
        offset,
        (!utf8.is_empty()).then(|| owned.clone()),
    );
    let received = ReceivedMessage::new(original);
    if let Some(hs) = received.headers() {
        assert_eq!(
            Provenance::read(&hs),
            expected,
            "through the consumer's copy"
        );
    }

    // 2. Round trip: what keel appends for a failure reads back.
    let written = Provenance::of(&received, &group, &reason, failed_at);
    assert!(written.error_message.len() <= MAX_ERROR_MESSAGE);
    if reason.message.len() <= MAX_ERROR_MESSAGE {
        assert_eq!(written.error_message, reason.message);
    } else {
        let kept = written
            .error_message
            .strip_suffix("…(truncated)")
            .expect("a cut message is marked");
        assert!(reason.message.starts_with(kept));
    }
    assert_eq!(
        (
            written.topic.as_str(),
            written.partition,
            written.offset,
            written.timestamp
        ),
        (topic.as_str(), partition, offset, timestamp)
    );
    let before = received
        .headers()
        .map(|hs| hs.iter().fold(OwnedHeaders::new(), |acc, h| acc.insert(h)));
    let original_headers: Vec<(String, Option<Vec<u8>>)> = before
        .as_ref()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    let all = written.append_to(before.unwrap_or_default());
    let read = Provenance::read(&all).unwrap_or_else(|e| panic!("written provenance: {e}"));
    assert_eq!(read, written, "round trip");
    let after: Vec<(String, Option<Vec<u8>>)> = all
        .iter()
        .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
        .collect();
    assert_eq!(
        &after[..original_headers.len()],
        &original_headers[..],
        "originals first"
    );
    let appended = after.len() - original_headers.len();
    let has_ts = !matches!(timestamp, Timestamp::NotAvailable);
    assert_eq!(appended, if has_ts { 11 } else { 10 });
    let _ = format!("{read:?}");
}

/// An accepted gateway event's envelope: within the limits, and its encoding
/// decodes back to it.
fn check_gateway_envelope(envelope: &EventEnvelope, max_event_bytes: usize) {
    use crate::body::MAX_NAME_LEN;

    assert!(!envelope.event_type().trim().is_empty(), "blank event type");
    assert!(
        envelope.event_type().len() <= MAX_NAME_LEN,
        "event type too long"
    );
    assert!(
        (1..=MAX_NAME_LEN).contains(&envelope.version().len()),
        "version length"
    );
    assert!(!envelope.payload().is_null(), "null payload");
    let value = envelope.encode_value().expect("an accepted event encodes");
    let size = value.len() + envelope.key().map_or(0, <[u8]>::len);
    assert!(size <= max_event_bytes, "{size} > {max_event_bytes} bytes");
    let encoded = envelope.encode().expect("an accepted event encodes");
    let again =
        EventEnvelope::<serde_json::Value>::from_message(&encoded.to_owned_message("fuzz", 0, 0))
            .unwrap_or_else(|e| panic!("an accepted event must decode: {e}"));
    assert_envelopes_eq(envelope, &again);
}

/// The gateway's request bodies (`examples/gateway/body.rs`, compiled here by
/// path): one event (`POST /events/{topic}`) or a batch (`.../batch`, a list or
/// `{"events": [...]}`), parsed from the JSON bytes as the gateway parses them,
/// under limits taken from the input.
///
/// Layout: flags (bit 0: batch), the event size limit (2 bytes + 64), the batch
/// count limit (1 byte + 1), then the body.
///
/// Invariants: no panic; an accepted event is within the limits (a non-blank
/// type and a version of at most 256 bytes, a payload, an encoded size at most
/// the limit) and its encoding decodes back to an equal envelope, with the
/// client's `eventId` kept; a batch is accepted only with 1 to the limit events,
/// all of them acceptable alone, and is refused as a whole otherwise (413 for
/// too many, or when every invalid event is too large; 400 with each invalid
/// event's index otherwise).
pub fn gateway_bodies(data: &[u8]) {
    use crate::body::{BatchBody, EventBody, batch_envelopes};

    let mut input = Input::new(data);
    let batch = input.byte() % 2 == 1;
    let max_event_bytes = 64 + usize::from(u16::from_le_bytes([input.byte(), input.byte()]));
    let max_batch_events = 1 + usize::from(input.byte());
    let body = input.rest();
    if !batch {
        let Ok(event) = serde_json::from_slice::<EventBody>(body) else {
            return;
        };
        let sent_id = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("eventId")?.as_str()?.parse::<uuid::Uuid>().ok());
        match event.into_envelope(max_event_bytes) {
            Ok(envelope) => {
                check_gateway_envelope(&envelope, max_event_bytes);
                if let Some(id) = sent_id {
                    assert_eq!(envelope.event_id(), id, "the client's event id");
                }
            }
            Err(e) => {
                assert!(e.errors.is_empty());
                assert!(matches!(e.status(), 400 | 413));
                assert!(!e.detail.is_empty());
            }
        }
        return;
    }
    let Ok(parsed) = serde_json::from_slice::<BatchBody>(body) else {
        return;
    };
    let events = match parsed {
        BatchBody::List(events) | BatchBody::Wrapped { events } => events,
    };
    // Each event alone, for the model.
    let alone: Vec<_> = events
        .iter()
        .map(|e| {
            serde_json::from_value::<EventBody>(e.clone())
                .map_err(|_| 400)
                .and_then(|b| b.into_envelope(max_event_bytes).map_err(|e| e.status()))
        })
        .collect();
    let count = events.len();
    match batch_envelopes(max_batch_events, max_event_bytes, events) {
        Ok(envelopes) => {
            assert!((1..=max_batch_events).contains(&count), "{count} events");
            assert_eq!(envelopes.len(), count);
            for (envelope, alone) in envelopes.iter().zip(&alone) {
                check_gateway_envelope(envelope, max_event_bytes);
                let alone = alone.as_ref().expect("accepted in a batch, refused alone");
                assert_eq!(envelope.event_type(), alone.event_type());
                assert_eq!(envelope.key(), alone.key());
            }
        }
        Err(e) => {
            if count == 0 {
                assert_eq!(e.status(), 400);
            } else if count > max_batch_events {
                assert_eq!(e.status(), 413);
                assert!(e.errors.is_empty());
            } else {
                let refused: Vec<(usize, u16)> = alone
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| r.as_ref().err().map(|s| (i, *s)))
                    .collect();
                let reported: Vec<(usize, u16)> = e
                    .errors
                    .iter()
                    .map(|v| {
                        (
                            v["index"].as_u64().unwrap() as usize,
                            v["status"].as_u64().unwrap() as u16,
                        )
                    })
                    .collect();
                assert_eq!(reported, refused, "the invalid events and their statuses");
                let all_too_large = refused.iter().all(|(_, s)| *s == 413);
                assert_eq!(e.status(), if all_too_large { 413 } else { 400 });
            }
        }
    }
}

/// A fuzz target's body.
pub type Check = fn(&[u8]);

/// The targets by name, for the corpus smoke test.
pub const TARGETS: &[(&str, Check)] = &[
    ("envelope_decode", envelope_decode),
    ("object_key", object_key),
    ("kafka_config", kafka_config),
    ("s3_config", s3_config),
    ("presign_expiry", presign_expiry),
    ("presign_url", presign_url),
    ("s3_error", s3_error),
    ("topic_name", topic_name),
    ("dead_letter_headers", dead_letter_headers),
    ("gateway_bodies", gateway_bodies),
];
