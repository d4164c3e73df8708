//! One breaker per key: [`KeyedCircuitBreakerLayer`], [`KeyedCircuitBreaker`].

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::breaker::{Breaker, Config};
use super::error::CircuitBreakerError;
use super::future::{ResponseFuture, Tracker};
use super::handle::CircuitBreakerHandle;
use crate::classify::Classify;

struct Entry {
    breaker: Arc<Breaker>,
    last_used: u64,
}

struct Map<K> {
    entries: HashMap<K, Entry>,
    clock: u64,
}

/// The bounded set of per-key breakers.
pub(crate) struct KeyedBreakers<K> {
    config: Arc<Config>,
    max_keys: usize,
    map: Mutex<Map<K>>,
}

impl<K: Hash + Eq + Clone + fmt::Debug> KeyedBreakers<K> {
    /// The breaker of `key`, created (evicting the least recently used one when
    /// full) if needed. A short critical section: one hash lookup, and on a miss at
    /// capacity one scan of at most `max_keys` entries.
    fn get_or_create(&self, key: &K) -> Arc<Breaker> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.clock += 1;
        let now = map.clock;
        if let Some(entry) = map.entries.get_mut(key) {
            entry.last_used = now;
            return entry.breaker.clone();
        }
        if map.entries.len() >= self.max_keys {
            let oldest = map
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                map.entries.remove(&oldest);
            }
        }
        let label: Arc<str> = format!("{key:?}").into();
        let breaker = Breaker::new(self.config.clone(), Some(label));
        map.entries.insert(
            key.clone(),
            Entry {
                breaker: breaker.clone(),
                last_used: now,
            },
        );
        breaker
    }

    fn get(&self, key: &K) -> Option<Arc<Breaker>> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.entries.get(key).map(|e| e.breaker.clone())
    }

    fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .len()
    }
}

/// A handle on the breakers of a [`KeyedCircuitBreakerLayer`].
pub struct KeyedCircuitBreakerHandle<K> {
    breakers: Arc<KeyedBreakers<K>>,
}

impl<K> Clone for KeyedCircuitBreakerHandle<K> {
    fn clone(&self) -> Self {
        KeyedCircuitBreakerHandle {
            breakers: self.breakers.clone(),
        }
    }
}

impl<K> fmt::Debug for KeyedCircuitBreakerHandle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerHandle")
            .field("max_keys", &self.breakers.max_keys)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone + fmt::Debug> KeyedCircuitBreakerHandle<K> {
    /// The handle of `key`'s breaker, if it exists (a key gets a breaker on its
    /// first call, and loses it when evicted).
    pub fn get(&self, key: &K) -> Option<CircuitBreakerHandle> {
        self.breakers
            .get(key)
            .map(|breaker| CircuitBreakerHandle { breaker })
    }

    /// How many keys currently have a breaker (at most `max_keys`).
    pub fn len(&self) -> usize {
        self.breakers.len()
    }

    /// `true` when no key has a breaker yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Wraps services in a [`KeyedCircuitBreaker`]; built by
/// [`CircuitBreakerBuilder::per_key`](super::CircuitBreakerBuilder::per_key).
///
/// Clones of the layer, and all services it makes, share one set of per-key breakers.
pub struct KeyedCircuitBreakerLayer<K, F, C> {
    breakers: Arc<KeyedBreakers<K>>,
    key_fn: F,
    classifier: C,
}

impl<K, F: Clone, C: Clone> Clone for KeyedCircuitBreakerLayer<K, F, C> {
    fn clone(&self) -> Self {
        KeyedCircuitBreakerLayer {
            breakers: self.breakers.clone(),
            key_fn: self.key_fn.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<K, F, C> fmt::Debug for KeyedCircuitBreakerLayer<K, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerLayer")
            .field("max_keys", &self.breakers.max_keys)
            .finish_non_exhaustive()
    }
}

impl<K, F, C> KeyedCircuitBreakerLayer<K, F, C> {
    pub(crate) fn new(config: Arc<Config>, key_fn: F, max_keys: usize, classifier: C) -> Self {
        KeyedCircuitBreakerLayer {
            breakers: Arc::new(KeyedBreakers {
                config,
                max_keys: max_keys.max(1),
                map: Mutex::new(Map {
                    entries: HashMap::new(),
                    clock: 0,
                }),
            }),
            key_fn,
            classifier,
        }
    }

    /// A handle on the per-key breakers.
    pub fn handle(&self) -> KeyedCircuitBreakerHandle<K> {
        KeyedCircuitBreakerHandle {
            breakers: self.breakers.clone(),
        }
    }
}

impl<S, K, F: Clone, C: Clone> Layer<S> for KeyedCircuitBreakerLayer<K, F, C> {
    type Service = KeyedCircuitBreaker<S, K, F, C>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedCircuitBreaker {
            inner,
            breakers: self.breakers.clone(),
            key_fn: self.key_fn.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// A circuit breaker per key of the request (see [`CircuitBreaker`](super::CircuitBreaker)
/// for the rules each breaker follows).
///
/// Each call first finds its key's breaker in a bounded map under a short mutex;
/// the breaker itself is then lock-free as usual.
pub struct KeyedCircuitBreaker<S, K, F, C> {
    inner: S,
    breakers: Arc<KeyedBreakers<K>>,
    key_fn: F,
    classifier: C,
}

impl<S: Clone, K, F: Clone, C: Clone> Clone for KeyedCircuitBreaker<S, K, F, C> {
    fn clone(&self) -> Self {
        KeyedCircuitBreaker {
            inner: self.inner.clone(),
            breakers: self.breakers.clone(),
            key_fn: self.key_fn.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<S: fmt::Debug, K, F, C> fmt::Debug for KeyedCircuitBreaker<S, K, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreaker")
            .field("inner", &self.inner)
            .field("max_keys", &self.breakers.max_keys)
            .finish_non_exhaustive()
    }
}

impl<S, K, F, C> KeyedCircuitBreaker<S, K, F, C> {
    /// A handle on the per-key breakers.
    pub fn handle(&self) -> KeyedCircuitBreakerHandle<K> {
        KeyedCircuitBreakerHandle {
            breakers: self.breakers.clone(),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, K, F, C, Req> Service<Req> for KeyedCircuitBreaker<S, K, F, C>
where
    S: Service<Req>,
    K: Hash + Eq + Clone + fmt::Debug,
    F: Fn(&Req) -> K,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = CircuitBreakerError<S::Error>;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(CircuitBreakerError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let breaker = self.breakers.get_or_create(&(self.key_fn)(&req));
        match breaker.admit() {
            Ok(permit) => ResponseFuture::called(
                self.inner.call(req),
                Tracker::new(&breaker, permit, self.classifier.clone()),
            ),
            Err(rejection) => ResponseFuture::rejected(rejection, self.classifier.clone()),
        }
    }
}
