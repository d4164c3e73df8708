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
/// different spelling of the same value).
fn json_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (a, b) {
        (V::Number(x), V::Number(y)) => {
            x == y
                || match (x.as_f64(), y.as_f64()) {
                    (Some(x), Some(y)) => {
                        x == y || (x - y).abs() <= f64::EPSILON * x.abs().max(1.0)
                    }
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
                if name == "KAFKA_RDKAFKA_SASL_PASSWORD" && value.len() >= 8 {
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

/// A fuzz target's body.
pub type Check = fn(&[u8]);

/// The targets by name, for the corpus smoke test.
pub const TARGETS: &[(&str, Check)] = &[
    ("envelope_decode", envelope_decode),
    ("object_key", object_key),
    ("kafka_config", kafka_config),
    ("s3_config", s3_config),
    ("presign_expiry", presign_expiry),
    ("s3_error", s3_error),
];
