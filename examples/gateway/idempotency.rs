//! `Idempotency-Key` on publish: a client that retries after a timeout gets the
//! first answer again instead of a second event.
//!
//! The first request with a key publishes and its successful answer is kept
//! (status and body) for [`TTL`]; a retry with the same key and the same body gets
//! that answer back with `Idempotent-Replayed: true`. The same key with another
//! body is refused (422); a retry while the first is still running gets 409. A
//! failed publish is not kept, so the client can retry it. The memory is bounded
//! (entries and bytes, oldest evicted first) and per process: behind a load
//! balancer, route by key or put the cache in a shared store.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use crate::problem::Problem;

/// How long a kept answer is replayed.
pub const TTL: Duration = Duration::from_secs(24 * 3600);
/// Most answers kept.
pub const MAX_ENTRIES: usize = 100_000;
/// Most bytes of answer bodies kept.
pub const MAX_BYTES: usize = 32 * 1024 * 1024;
/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 255;

#[derive(Debug)]
enum Entry {
    InFlight {
        fingerprint: u64,
    },
    Done {
        fingerprint: u64,
        status: StatusCode,
        body: Bytes,
        at: Instant,
    },
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, Entry>,
    /// Completed keys, oldest first (for eviction).
    order: VecDeque<(String, Instant)>,
    bytes: usize,
}

/// The cache of answers by key. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct IdempotencyCache {
    inner: Arc<Mutex<Inner>>,
}

/// What to do with a request that carries a key.
#[derive(Debug)]
pub enum Begin {
    /// Publish; then [`Claim::finish`] with the answer.
    New(Claim),
    /// Answer this (a replay, or a problem).
    Answer(Response),
}

/// The right to publish for a key; released (forgotten) if dropped unfinished.
#[derive(Debug)]
pub struct Claim {
    cache: IdempotencyCache,
    key: String,
    done: bool,
}

/// The key of a request, if it has one; a malformed key is a problem.
pub fn key_of(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| {
            !k.is_empty() && k.len() <= MAX_KEY_LEN && k.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| {
            Problem::invalid(format!(
                "Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters"
            ))
        })?;
    Ok(Some(key.to_string()))
}

fn fingerprint(body: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    body.hash(&mut h);
    h.finish()
}

impl IdempotencyCache {
    /// Starts a request for `scope` (route and topic) and `key` with `body`.
    pub fn begin(&self, scope: &str, key: &str, body: &[u8]) -> Begin {
        let full = format!("{scope}\n{key}");
        let fp = fingerprint(body);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.expire(Instant::now());
        match inner.map.get(&full) {
            Some(Entry::InFlight { .. }) => Begin::Answer(
                Problem::new(
                    StatusCode::CONFLICT,
                    "idempotency-conflict",
                    "a request with this Idempotency-Key is still in progress",
                )
                .retry_after(1)
                .into_response(),
            ),
            Some(Entry::Done { fingerprint, .. }) if *fingerprint != fp => Begin::Answer(
                Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency-mismatch",
                    "this Idempotency-Key was used with a different body",
                )
                .into_response(),
            ),
            Some(Entry::Done { status, body, .. }) => {
                let mut res = (*status, body.clone()).into_response();
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                res.headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
                Begin::Answer(res)
            }
            None => {
                inner
                    .map
                    .insert(full.clone(), Entry::InFlight { fingerprint: fp });
                Begin::New(Claim {
                    cache: self.clone(),
                    key: full,
                    done: false,
                })
            }
        }
    }

    /// Answers kept now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap().map.len()
    }
}

impl Inner {
    fn expire(&mut self, now: Instant) {
        while let Some((key, at)) = self.order.front() {
            let over = self.order.len() > MAX_ENTRIES || self.bytes > MAX_BYTES;
            if !over && now.saturating_duration_since(*at) < TTL {
                break;
            }
            let (key, at) = (key.clone(), *at);
            self.order.pop_front();
            // The key may have been kept again later: only the entry of this time.
            if let Some(Entry::Done { at: kept, body, .. }) = self.map.get(&key)
                && *kept == at
            {
                self.bytes -= body.len();
                self.map.remove(&key);
            }
        }
    }
}

impl Claim {
    /// Keeps a successful answer for replay; forgets a failed one so the client
    /// can retry.
    pub fn finish(mut self, status: StatusCode, body: &Bytes) {
        self.done = true;
        let mut inner = self.cache.inner.lock().unwrap_or_else(|e| e.into_inner());
        let fp = match inner.map.remove(&self.key) {
            Some(Entry::InFlight { fingerprint }) => fingerprint,
            _ => return,
        };
        if status.is_success() {
            let at = Instant::now();
            inner.bytes += body.len();
            inner.map.insert(
                self.key.clone(),
                Entry::Done {
                    fingerprint: fp,
                    status,
                    body: body.clone(),
                    at,
                },
            );
            inner.order.push_back((std::mem::take(&mut self.key), at));
            inner.expire(at);
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.done {
            let mut inner = self.cache.inner.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(inner.map.get(&self.key), Some(Entry::InFlight { .. })) {
                inner.map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(b: &Begin) -> Option<StatusCode> {
        match b {
            Begin::New(_) => None,
            Begin::Answer(r) => Some(r.status()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn replays_conflicts_and_expires() {
        let cache = IdempotencyCache::default();
        let Begin::New(claim) = cache.begin("t", "k", b"{}") else {
            panic!("first use must publish");
        };
        assert_eq!(
            status(&cache.begin("t", "k", b"{}")),
            Some(StatusCode::CONFLICT)
        );
        claim.finish(StatusCode::ACCEPTED, &Bytes::from_static(b"{\"ok\":1}"));
        assert_eq!(
            status(&cache.begin("t", "k", b"{}")),
            Some(StatusCode::ACCEPTED)
        );
        assert_eq!(
            status(&cache.begin("t", "k", b"{\"x\":1}")),
            Some(StatusCode::UNPROCESSABLE_ENTITY)
        );
        // Another scope is another key.
        assert!(matches!(cache.begin("u", "k", b"{}"), Begin::New(_)));
        tokio::time::advance(TTL + Duration::from_secs(1)).await;
        assert!(matches!(cache.begin("t", "k", b"{}"), Begin::New(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_and_dropped_claims_are_forgotten() {
        let cache = IdempotencyCache::default();
        let Begin::New(claim) = cache.begin("t", "k", b"{}") else {
            panic!()
        };
        claim.finish(StatusCode::SERVICE_UNAVAILABLE, &Bytes::new());
        let Begin::New(claim) = cache.begin("t", "k", b"{}") else {
            panic!("a failed publish must be retryable")
        };
        drop(claim);
        assert_eq!(cache.len(), 0, "a dropped claim is forgotten");
        let again = cache.begin("t", "k", b"{}");
        assert!(matches!(again, Begin::New(_)));
        assert_eq!(cache.len(), 1, "the in-flight claim of the last begin");
    }

    #[test]
    fn keys_are_checked() {
        let mut h = HeaderMap::new();
        assert_eq!(key_of(&h).unwrap(), None);
        h.insert("idempotency-key", HeaderValue::from_static("abc-123"));
        assert_eq!(key_of(&h).unwrap().as_deref(), Some("abc-123"));
        h.insert("idempotency-key", HeaderValue::from_static("a b"));
        assert!(key_of(&h).is_err());
        h.insert(
            "idempotency-key",
            HeaderValue::from_str(&"x".repeat(256)).unwrap(),
        );
        assert!(key_of(&h).is_err());
    }
}
