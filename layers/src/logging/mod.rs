//! One tracing span per call and one event when it completes, plus the seed's JSON
//! log format.
//!
//! The seed logged every publish and upload as one JSON line with a timestamp, a
//! level, the component, a message, the call's own fields and `durationMs`.
//! [`Logging`] produces exactly that information through
//! [`tracing`](https://docs.rs/tracing), so it goes wherever the application's
//! subscriber sends it:
//!
//! - a span per call (target `keel_layers::logging`, level [`LoggingLayer::span_level`])
//!   with `component` and `operation`, plus the caller's fields from the request
//!   ([`RequestFields`]); the inner service runs inside it, so its own logs carry
//!   the same context;
//! - one event on completion with `component`, `operation`, `outcome`
//!   (`success` / `failure` / `ignored`), `class` (failures and ignored), `duration_ms`,
//!   and for an `Err` failure the error's `Display` as `error`, at a level chosen by
//!   the outcome (defaults: success `INFO`, failure `ERROR`, ignored `INFO`).
//!
//! Nothing from the request is logged unless the caller's [`RequestFields`] puts it
//! there: payloads, headers and credentials stay out by default. The error's
//! `Display` is logged for failures; keel's own errors do not print credentials.
//!
//! When no subscriber is installed, or every subscriber filters out all three event
//! levels, a call costs one level comparison: no span, no clock reading. (The check
//! is by level only; a subscriber that lets some target through at that level makes
//! every call open its span and read the clock twice, cheap when the span is
//! filtered out.)
//! A response future dropped before completion logs nothing.
//!
//! [`JsonLogFormat`] is a `tracing-subscriber` event formatter for the seed's line
//! format; [`json_subscriber`] and [`init_json`] set it up in one call.
//!
//! # Example
//!
//! ```
//! use keel_layers::logging::LoggingLayer;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! struct Publish { topic: &'static str, payload: Vec<u8> }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let _guard = tracing::subscriber::set_default(keel_layers::logging::json_subscriber());
//! let mut svc = ServiceBuilder::new()
//!     .layer(
//!         LoggingLayer::new("KafkaProducer", "publish")
//!             .success_message("Event published successfully")
//!             .fields(|req: &Publish| tracing::info_span!("publish", topic = req.topic)),
//!     )
//!     .service(service_fn(|req: Publish| async move {
//!         Ok::<_, std::io::Error>(req.payload.len())
//!     }));
//! // Logs {"timestamp":"…","level":"info","component":"KafkaProducer",
//! //       "message":"Event published successfully","operation":"publish",
//! //       "topic":"user.events","outcome":"success","durationMs":0}
//! let req = Publish { topic: "user.events", payload: b"secret".to_vec() };
//! svc.ready().await.unwrap().call(req).await.unwrap();
//! # }
//! ```

mod fields;
mod future;
mod json;
mod layer;

pub use fields::{NoFields, RequestFields};
pub use future::ResponseFuture;
pub use json::{JsonLogFormat, init_json, json_layer, json_subscriber};
pub use layer::LoggingLayer;

use crate::classify::{Classify, ErrorsAsFailures};
use layer::Config;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;
use tracing::Level;

/// Logs every call; see the [module docs](self).
///
/// Cloning clones the inner service, the classifier and the fields closure, and
/// shares the settings.
#[derive(Clone)]
pub struct Logging<S, C = ErrorsAsFailures, F = NoFields> {
    inner: S,
    config: Arc<Config>,
    classifier: C,
    fields: F,
}

impl<S: fmt::Debug, C: fmt::Debug, F> fmt::Debug for Logging<S, C, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Logging")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .field("classifier", &self.classifier)
            .finish_non_exhaustive()
    }
}

impl<S> Logging<S> {
    /// Wraps `inner` with the defaults of [`LoggingLayer::new`].
    pub fn new(inner: S, component: &'static str, operation: &'static str) -> Self {
        tower::Layer::layer(&LoggingLayer::new(component, operation), inner)
    }
}

impl<S, C, F> Logging<S, C, F> {
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

/// Opens the layer's span at a level chosen at run time.
macro_rules! span_at {
    ($level:expr, $($rest:tt)+) => {
        match $level {
            Level::ERROR => tracing::span!(target: "keel_layers::logging", Level::ERROR, $($rest)+),
            Level::WARN => tracing::span!(target: "keel_layers::logging", Level::WARN, $($rest)+),
            Level::INFO => tracing::span!(target: "keel_layers::logging", Level::INFO, $($rest)+),
            Level::DEBUG => tracing::span!(target: "keel_layers::logging", Level::DEBUG, $($rest)+),
            Level::TRACE => tracing::span!(target: "keel_layers::logging", Level::TRACE, $($rest)+),
        }
    };
}

impl<S, C, F, Req> Service<Req> for Logging<S, C, F>
where
    S: Service<Req>,
    S::Error: fmt::Display,
    C: Classify<S::Response, S::Error> + Clone,
    F: RequestFields<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        if !self.config.anything_enabled() {
            return ResponseFuture {
                inner: self.inner.call(req),
                logged: None,
            };
        }
        let span = open_span(&self.config, &self.fields, &req);
        let start = self.config.clock.now_nanos();
        let inner = span.in_scope(|| self.inner.call(req));
        ResponseFuture {
            inner,
            logged: Some(Box::new(future::Logged {
                span,
                start,
                config: self.config.clone(),
                classifier: self.classifier.clone(),
            })),
        }
    }
}

/// Opens the call's span (and the caller's, as its child); kept out of line so that
/// the disabled path of [`Logging::call`] stays small enough to inline.
#[inline(never)]
fn open_span<Req, F: RequestFields<Req>>(config: &Config, fields: &F, req: &Req) -> tracing::Span {
    let outer = span_at!(
        config.span_level,
        "call",
        component = config.component,
        operation = config.operation
    );
    let caller = outer.in_scope(|| fields.span(req));
    // The completion event goes into the innermost span; the subscriber's
    // registry keeps the outer one alive as the caller span's parent.
    if caller.is_none() { outer } else { caller }
}

#[cfg(test)]
mod tests;
