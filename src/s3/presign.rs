//! Presigned GET and PUT URLs: time-limited links a plain HTTP client can use
//! without credentials.
//!
//! The expiry is checked before signing: at least [`MIN_PRESIGN_EXPIRY`] (one
//! second: SigV4's `X-Amz-Expires` counts whole seconds, so a shorter expiry
//! signs a URL that is dead on arrival) and at most [`MAX_PRESIGN_EXPIRY`]
//! (7 days, SigV4's limit). The client always has a region
//! (see [`S3Config`](super::config::S3Config)), so the URL is signed for the right
//! scope — presigning without one silently gives a URL no server accepts
//! (aws-sdk-rust #861). With a custom endpoint the client signs "when required"
//! only, so no checksum parameters end up in the URL.
//!
//! ```
//! use keel::s3::presign::check_expiry;
//! use std::time::Duration;
//!
//! assert!(check_expiry(Duration::from_secs(3600)).is_ok());
//! assert!(check_expiry(Duration::ZERO).is_err());
//! assert!(check_expiry(Duration::from_millis(999)).is_err());
//! assert!(check_expiry(Duration::from_secs(8 * 24 * 3600)).is_err());
//! ```

use std::fmt;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::presigning::{PresignedRequest, PresigningConfig};

use super::client::S3Client;
use super::error::{S3ErrorKind, S3Operation, S3ServiceError};
use super::key::ObjectKey;

/// The shortest expiry accepted: 1 second.
pub const MIN_PRESIGN_EXPIRY: Duration = Duration::from_secs(1);

/// The longest expiry SigV4 allows: 7 days.
pub const MAX_PRESIGN_EXPIRY: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Why an expiry is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidExpiry {
    /// Zero.
    #[error("a presigned URL expiry must be more than zero")]
    Zero,
    /// More than zero but under [`MIN_PRESIGN_EXPIRY`].
    #[error("a presigned URL expiry must be at least 1 second, got {0:?}")]
    TooShort(Duration),
    /// Over [`MAX_PRESIGN_EXPIRY`].
    #[error("a presigned URL expiry must be at most 7 days, got {0:?}")]
    TooLong(Duration),
}

/// Checks an expiry: at least 1 second, at most 7 days.
pub fn check_expiry(expiry: Duration) -> Result<(), InvalidExpiry> {
    if expiry.is_zero() {
        Err(InvalidExpiry::Zero)
    } else if expiry < MIN_PRESIGN_EXPIRY {
        Err(InvalidExpiry::TooShort(expiry))
    } else if expiry > MAX_PRESIGN_EXPIRY {
        Err(InvalidExpiry::TooLong(expiry))
    } else {
        Ok(())
    }
}

/// A presigned request: the URL, the method, and the headers the caller must send
/// with it (for a PUT, the signed `Content-Type`, if one was given).
///
/// The URL is a bearer credential until it expires: its `Debug` output (and
/// [`redacted_url`](Self::redacted_url), for logs) shows the signature, the
/// credential scope and any session token as `REDACTED`.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PresignedUrl {
    /// The URL.
    pub url: String,
    /// `GET` or `PUT`.
    pub method: String,
    /// Headers that were signed and must be sent as they are.
    pub headers: Vec<(String, String)>,
    /// How long the URL is valid from signing.
    pub expires_in: Duration,
    /// When the URL stops working (by the signer's clock).
    pub expires_at: SystemTime,
}

/// What `Debug` and logs show instead of a secret query value.
pub const REDACTED: &str = "REDACTED";

/// Query parameters of a presigned URL that grant access: never logged.
const SECRET_PARAMS: [&str; 3] = [
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
];

/// `url` with the value of every [`SECRET_PARAMS`] query parameter replaced by
/// [`REDACTED`]; everything else as it is.
pub fn redact_presigned_url(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let mut out = String::with_capacity(url.len());
    out.push_str(base);
    out.push('?');
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        let name = pair.split_once('=').map_or(pair, |(n, _)| n);
        if SECRET_PARAMS.iter().any(|s| name.eq_ignore_ascii_case(s)) {
            out.push_str(name);
            out.push('=');
            out.push_str(REDACTED);
        } else {
            out.push_str(pair);
        }
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

impl fmt::Debug for PresignedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| {
                if SECRET_PARAMS.iter().any(|s| k.eq_ignore_ascii_case(s)) {
                    (k.as_str(), REDACTED)
                } else {
                    (k.as_str(), v.as_str())
                }
            })
            .collect();
        f.debug_struct("PresignedUrl")
            .field("url", &self.redacted_url())
            .field("method", &self.method)
            .field("headers", &headers)
            .field("expires_in", &self.expires_in)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl PresignedUrl {
    /// The URL with its signature, credential and session token redacted: what
    /// to log.
    pub fn redacted_url(&self) -> String {
        redact_presigned_url(&self.url)
    }

    fn from_sdk(req: PresignedRequest, expires_in: Duration, signed_at: SystemTime) -> Self {
        PresignedUrl {
            url: req.uri().to_owned(),
            method: req.method().to_owned(),
            headers: req
                .headers()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            expires_in,
            expires_at: signed_at + expires_in,
        }
    }
}

fn presigning_config(
    operation: S3Operation,
    bucket: &str,
    key: &ObjectKey,
    expiry: Duration,
) -> Result<(PresigningConfig, SystemTime), S3ServiceError> {
    let refuse = |e: Box<dyn std::error::Error + Send + Sync>| {
        S3ServiceError::new(operation, S3ErrorKind::InvalidRequest)
            .with_bucket(bucket)
            .with_key(key.as_str())
            .with_message(e.to_string())
            .with_source(e)
    };
    check_expiry(expiry).map_err(|e| refuse(e.into()))?;
    let signed_at = SystemTime::now();
    let config = PresigningConfig::builder()
        .start_time(signed_at)
        .expires_in(expiry)
        .build()
        .map_err(|e| refuse(e.into()))?;
    Ok((config, signed_at))
}

/// A presigned GET URL for `key` in `bucket`.
pub async fn presign_get(
    client: &S3Client,
    bucket: &str,
    key: &ObjectKey,
    expiry: Duration,
) -> Result<PresignedUrl, S3ServiceError> {
    let op = S3Operation::PresignGet;
    let (config, signed_at) = presigning_config(op, bucket, key, expiry)?;
    let req = client
        .sdk()
        .get_object()
        .bucket(bucket)
        .key(key.as_str())
        .presigned(config)
        .await
        .map_err(|e| S3ServiceError::from_sdk(op, bucket, Some(key.as_str()), e))?;
    Ok(PresignedUrl::from_sdk(req, expiry, signed_at))
}

/// A presigned PUT URL for `key` in `bucket`. With a `content_type`, the uploader
/// must send that exact `Content-Type` (it is signed).
pub async fn presign_put(
    client: &S3Client,
    bucket: &str,
    key: &ObjectKey,
    expiry: Duration,
    content_type: Option<&str>,
) -> Result<PresignedUrl, S3ServiceError> {
    let op = S3Operation::PresignPut;
    let (config, signed_at) = presigning_config(op, bucket, key, expiry)?;
    let req = client
        .sdk()
        .put_object()
        .bucket(bucket)
        .key(key.as_str())
        .set_content_type(content_type.map(str::to_owned))
        .presigned(config)
        .await
        .map_err(|e| S3ServiceError::from_sdk(op, bucket, Some(key.as_str()), e))?;
    Ok(PresignedUrl::from_sdk(req, expiry, signed_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_bounds() {
        assert_eq!(check_expiry(Duration::ZERO), Err(InvalidExpiry::Zero));
        assert_eq!(
            check_expiry(Duration::from_nanos(1)),
            Err(InvalidExpiry::TooShort(Duration::from_nanos(1)))
        );
        assert_eq!(
            check_expiry(Duration::from_millis(999)),
            Err(InvalidExpiry::TooShort(Duration::from_millis(999)))
        );
        assert!(check_expiry(MIN_PRESIGN_EXPIRY).is_ok());
        assert!(check_expiry(MAX_PRESIGN_EXPIRY).is_ok());
        let over = MAX_PRESIGN_EXPIRY + Duration::from_secs(1);
        assert_eq!(check_expiry(over), Err(InvalidExpiry::TooLong(over)));
    }

    #[test]
    fn debug_and_redacted_url_hide_the_signature_credential_and_token() {
        let url = PresignedUrl {
            url: "https://s3.example.com/b/k%20x?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDSECRET%2F20261204%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261204T000000Z&X-Amz-Expires=900&X-Amz-Security-Token=TOKENSECRET&X-Amz-SignedHeaders=host&x-amz-signature=abcdef0123".into(),
            method: "GET".into(),
            headers: vec![("host".into(), "s3.example.com".into())],
            expires_in: Duration::from_secs(900),
            expires_at: SystemTime::UNIX_EPOCH,
        };
        let shown = format!("{url:?}");
        for secret in ["AKIDSECRET", "TOKENSECRET", "abcdef0123"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
            assert!(!url.redacted_url().contains(secret));
        }
        assert!(shown.contains("X-Amz-Expires=900"), "{shown}");
        assert!(shown.contains("/b/k%20x?"), "{shown}");
        assert_eq!(redact_presigned_url("https://h/k"), "https://h/k");
    }

    #[test]
    fn refused_expiry_is_an_invalid_request() {
        let key = ObjectKey::new("k").unwrap();
        let err =
            presigning_config(S3Operation::PresignGet, "b", &key, Duration::ZERO).unwrap_err();
        assert_eq!(err.kind(), &S3ErrorKind::InvalidRequest);
        assert_eq!(err.key(), Some("k"));

        // A nanosecond was a valid expiry before: now a typed refusal, before signing.
        let err = presigning_config(S3Operation::PresignGet, "b", &key, Duration::from_nanos(1))
            .unwrap_err();
        assert_eq!(err.kind(), &S3ErrorKind::InvalidRequest);
        let cause = std::error::Error::source(&err)
            .and_then(|e| e.downcast_ref::<InvalidExpiry>())
            .expect("the typed expiry error is the cause");
        assert_eq!(cause, &InvalidExpiry::TooShort(Duration::from_nanos(1)));
    }
}
