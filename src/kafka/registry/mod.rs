//! Routing events to handlers by event type.
//!
//! The seed registers handlers by event type before starting the consumer. Here a
//! [`HandlerRegistryBuilder`] collects them and [`build`](HandlerRegistryBuilder::build)
//! freezes them into a [`HandlerRegistry`]: an immutable map that is itself a
//! `tower::Service<ConsumedEvent>`, so retry, timeout, metrics and dead-letter layers
//! wrap the whole registry (or each handler, before registering it). Registering
//! after start is impossible by construction, and registering one type twice is an
//! error at build time rather than a silent override.
//!
//! Like tower's own services, the registry answers through a named future,
//! [`ResponseFuture`] (the routed handler's call, or an immediate answer for an
//! unknown type), and its build error, [`RegistryError`], lives in its own module.
//! Handlers themselves are type-erased (`BoxCloneSyncService`) so that handlers of
//! different types fit in one map.
//!
//! An event whose type has no handler is, by default, failed with a permanent
//! [`HandlerError::unknown_event_type`] that the dead-letter layer publishes to the
//! DLQ without retrying (class `unknown_event_type`). Skipping it would commit past
//! it: in a rolling deploy, old consumers would drop event types only the new
//! version knows, and nothing would say so. [`UnknownEventTypes::Skip`] (log a
//! warning, treat as handled) is an explicit opt-in for topics where unknown types
//! are expected and safe to ignore.
//!
//! # Example
//!
//! ```
//! use keel::kafka::consumer::{BoxError, ConsumedEvent};
//! use keel::kafka::registry::{HandlerRegistry, UnknownEventTypes};
//!
//! let registry = HandlerRegistry::builder()
//!     .handler_fn("user.created", |event: ConsumedEvent| async move {
//!         println!("user created: {:?}", event.envelope().payload());
//!         Ok::<_, BoxError>(())
//!     })
//!     .on_unknown(UnknownEventTypes::DeadLetter)
//!     .build()
//!     .expect("each event type registered once");
//! assert!(registry.handles("user.created"));
//! ```

mod error;
mod future;

pub use error::RegistryError;
pub use future::ResponseFuture;

use crate::kafka::consumer::{BoxError, ConsumedEvent, HandlerError};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

/// A registered handler, type-erased.
pub(crate) type Handler = BoxCloneSyncService<ConsumedEvent, (), HandlerError>;

/// What the registry does with an event type that has no handler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownEventTypes {
    /// Log a warning and treat the message as handled: its offset is committed and
    /// the event is gone from this group. Opt in only where that is safe.
    Skip,
    /// Fail with a permanent [`HandlerError::unknown_event_type`], so the
    /// dead-letter layer publishes it to the DLQ (the default: nothing is lost
    /// silently; with the DLQ disabled the failure is logged and counted).
    #[default]
    DeadLetter,
}

/// Collects handlers before start; see [the module docs](self).
#[derive(Default)]
pub struct HandlerRegistryBuilder {
    routes: Vec<(String, Handler)>,
    unknown: UnknownEventTypes,
}

impl fmt::Debug for HandlerRegistryBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerRegistryBuilder")
            .field(
                "event_types",
                &self.routes.iter().map(|r| &r.0).collect::<Vec<_>>(),
            )
            .field("unknown", &self.unknown)
            .finish()
    }
}

impl HandlerRegistryBuilder {
    /// Registers a handler service for `event_type`. Its errors become
    /// [`HandlerError`]s (retryable unless the handler returned a permanent
    /// `HandlerError` itself).
    pub fn handler<S>(mut self, event_type: impl Into<String>, handler: S) -> Self
    where
        S: Service<ConsumedEvent, Response = ()> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let handler = handler.map_err(|e: S::Error| HandlerError::from_boxed(e.into()));
        self.routes
            .push((event_type.into(), BoxCloneSyncService::new(handler)));
        self
    }

    /// Registers an async function as the handler for `event_type`.
    pub fn handler_fn<F, Fut, E>(self, event_type: impl Into<String>, f: F) -> Self
    where
        F: Fn(ConsumedEvent) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.handler(event_type, tower::service_fn(f))
    }

    /// Sets what happens to event types without a handler (default: skip with a log).
    pub fn on_unknown(mut self, unknown: UnknownEventTypes) -> Self {
        self.unknown = unknown;
        self
    }

    /// Freezes the registry.
    pub fn build(self) -> Result<HandlerRegistry, RegistryError> {
        let mut routes = HashMap::with_capacity(self.routes.len());
        for (event_type, handler) in self.routes {
            if routes.contains_key(&event_type) {
                return Err(RegistryError::DuplicateHandler(event_type));
            }
            routes.insert(event_type, handler);
        }
        Ok(HandlerRegistry {
            routes: Arc::new(routes),
            unknown: self.unknown,
        })
    }
}

/// Frozen map from event type to handler; a `Service<ConsumedEvent>`.
///
/// Cloning is cheap: clones share the map (`Arc`). Each call clones the matching
/// handler service, waits for it to be ready and calls it.
#[derive(Clone)]
pub struct HandlerRegistry {
    routes: Arc<HashMap<String, Handler>>,
    unknown: UnknownEventTypes,
}

impl fmt::Debug for HandlerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<_> = self.routes.keys().collect();
        types.sort();
        f.debug_struct("HandlerRegistry")
            .field("event_types", &types)
            .field("unknown", &self.unknown)
            .finish()
    }
}

impl HandlerRegistry {
    /// A builder.
    pub fn builder() -> HandlerRegistryBuilder {
        HandlerRegistryBuilder::default()
    }

    /// Whether a handler is registered for `event_type`.
    pub fn handles(&self, event_type: &str) -> bool {
        self.routes.contains_key(event_type)
    }

    /// The registered event types, sorted.
    pub fn event_types(&self) -> Vec<&str> {
        let mut types: Vec<&str> = self.routes.keys().map(String::as_str).collect();
        types.sort_unstable();
        types
    }
}

impl Service<ConsumedEvent> for HandlerRegistry {
    type Response = ();
    type Error = HandlerError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        // Readiness depends on the event type; each call waits for its handler.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: ConsumedEvent) -> ResponseFuture {
        if let Some(handler) = self.routes.get(event.event_type()) {
            return ResponseFuture::routed(handler.clone(), event);
        }
        match self.unknown {
            UnknownEventTypes::Skip => {
                tracing::warn!(
                    topic = event.topic(),
                    partition = event.partition(),
                    offset = event.offset(),
                    event_type = event.event_type(),
                    "no handler for event type, skipped"
                );
                ResponseFuture::unrouted(Ok(()))
            }
            UnknownEventTypes::DeadLetter => {
                ResponseFuture::unrouted(Err(HandlerError::unknown_event_type(event.event_type())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::consumer::event::test_event;
    use std::sync::Mutex;

    #[tokio::test]
    async fn routes_by_event_type() {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let (a, b) = (seen.clone(), seen.clone());
        let registry = HandlerRegistry::builder()
            .handler_fn("a", move |ev: ConsumedEvent| {
                let a = a.clone();
                async move {
                    a.lock().unwrap().push(format!("A:{}", ev.event_type()));
                    Ok::<_, BoxError>(())
                }
            })
            .handler_fn("b", move |ev: ConsumedEvent| {
                let b = b.clone();
                async move {
                    b.lock().unwrap().push(format!("B:{}", ev.event_type()));
                    Err::<(), _>(HandlerError::permanent("bad b"))
                }
            })
            .on_unknown(UnknownEventTypes::Skip)
            .build()
            .unwrap();
        assert_eq!(registry.event_types(), vec!["a", "b"]);
        registry.clone().oneshot(test_event("a")).await.unwrap();
        let err = registry.clone().oneshot(test_event("b")).await.unwrap_err();
        assert!(
            !err.is_retryable(),
            "a permanent HandlerError stays permanent"
        );
        // Unknown types are skipped when asked to.
        registry.clone().oneshot(test_event("c")).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec!["A:a", "B:b"]);
    }

    #[tokio::test]
    async fn unknown_types_fail_permanently_by_default() {
        let registry = HandlerRegistry::builder().build().unwrap();
        let err = registry.oneshot(test_event("nope")).await.unwrap_err();
        assert_eq!(err.class(), "unknown_event_type");
        assert!(!err.is_retryable());
    }

    #[test]
    fn duplicate_registration_is_refused() {
        let f = |_ev: ConsumedEvent| async { Ok::<_, BoxError>(()) };
        let err = HandlerRegistry::builder()
            .handler_fn("a", f)
            .handler_fn("a", f)
            .build()
            .unwrap_err();
        assert!(matches!(err, RegistryError::DuplicateHandler(t) if t == "a"));
    }
}
