use super::{Logging, NoFields};
use crate::classify::ErrorsAsFailures;
use crate::metrics::LatencyClock;
use std::sync::Arc;
use tower::Layer;
use tracing::Level;
use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};

/// What [`Logging`] logs and at which levels; shared (in an `Arc`) by every service
/// one layer builds.
#[derive(Clone, Debug)]
pub(super) struct Config {
    pub(super) component: &'static str,
    pub(super) operation: &'static str,
    pub(super) span_level: Level,
    pub(super) success_level: Level,
    pub(super) failure_level: Level,
    pub(super) ignored_level: Level,
    pub(super) success_message: &'static str,
    pub(super) failure_message: &'static str,
    pub(super) ignored_message: &'static str,
    pub(super) clock: LatencyClock,
    /// The least verbose (most severe) event level: when a subscriber filters even
    /// that out, no completion event can be logged and a call skips all the work.
    pub(super) least_verbose: Level,
}

impl Config {
    fn refresh(&mut self) {
        // `Level` orders more verbose as greater (TRACE > ERROR).
        self.least_verbose = self
            .success_level
            .min(self.failure_level)
            .min(self.ignored_level);
    }

    /// `true` if a subscriber may want a completion event from this layer; `false`
    /// when no subscriber is installed or all of them filter out every event level
    /// used here (a global check, not per target).
    #[inline]
    pub(super) fn anything_enabled(&self) -> bool {
        self.least_verbose <= STATIC_MAX_LEVEL && self.least_verbose <= LevelFilter::current()
    }
}

/// Applies [`Logging`] to a service.
///
/// Defaults:
///
/// | setting | default | set with |
/// |---|---|---|
/// | classifier | [`ErrorsAsFailures`] | [`classifier`](Self::classifier) |
/// | caller fields | none ([`NoFields`]) | [`fields`](Self::fields) |
/// | span level | `INFO` | [`span_level`](Self::span_level) |
/// | success event | `INFO`, "call succeeded" | [`on_success`](Self::on_success), [`success_message`](Self::success_message) |
/// | failure event | `ERROR`, "call failed" | [`on_failure`](Self::on_failure), [`failure_message`](Self::failure_message) |
/// | ignored event | `INFO`, "call ignored" | [`on_ignored`](Self::on_ignored), [`ignored_message`](Self::ignored_message) |
/// | clock for `duration_ms` | [`LatencyClock::tsc`] | [`clock`](Self::clock) |
///
/// Successes log at `INFO` as the seed's "Event published successfully" lines do;
/// set `on_success(Level::DEBUG)` for hot paths. Cloning the layer is cheap (an
/// `Arc` and the classifier and fields closure); its services share the settings.
#[derive(Clone)]
pub struct LoggingLayer<C = ErrorsAsFailures, F = NoFields> {
    pub(super) config: Arc<Config>,
    pub(super) classifier: C,
    pub(super) fields: F,
}

impl<C: std::fmt::Debug, F> std::fmt::Debug for LoggingLayer<C, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggingLayer")
            .field("config", &self.config)
            .field("classifier", &self.classifier)
            .finish_non_exhaustive()
    }
}

impl LoggingLayer {
    /// A layer logging calls of `operation` (for example `"publish"`) on
    /// `component` (for example `"KafkaProducer"`), with the defaults.
    pub fn new(component: &'static str, operation: &'static str) -> Self {
        let mut config = Config {
            component,
            operation,
            span_level: Level::INFO,
            success_level: Level::INFO,
            failure_level: Level::ERROR,
            ignored_level: Level::INFO,
            success_message: "call succeeded",
            failure_message: "call failed",
            ignored_message: "call ignored",
            clock: LatencyClock::tsc(),
            least_verbose: Level::ERROR,
        };
        config.refresh();
        LoggingLayer {
            config: Arc::new(config),
            classifier: ErrorsAsFailures,
            fields: NoFields,
        }
    }
}

impl<C, F> LoggingLayer<C, F> {
    fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        let config = Arc::make_mut(&mut self.config);
        change(config);
        config.refresh();
        self
    }

    /// Replaces the classifier deciding success, failure or ignored.
    pub fn classifier<C2>(self, classifier: C2) -> LoggingLayer<C2, F> {
        LoggingLayer {
            config: self.config,
            classifier,
            fields: self.fields,
        }
    }

    /// Adds caller fields from each request; see [`RequestFields`](super::RequestFields).
    /// Only what this returns is logged from the request: payloads and credentials
    /// stay out unless the caller puts them in.
    pub fn fields<F2>(self, fields: F2) -> LoggingLayer<C, F2> {
        LoggingLayer {
            config: self.config,
            classifier: self.classifier,
            fields,
        }
    }

    /// The level of the per-call span (default `INFO`).
    pub fn span_level(self, level: Level) -> Self {
        self.with(|c| c.span_level = level)
    }

    /// The level of the completion event of a success (default `INFO`).
    pub fn on_success(self, level: Level) -> Self {
        self.with(|c| c.success_level = level)
    }

    /// The level of the completion event of a failure (default `ERROR`).
    pub fn on_failure(self, level: Level) -> Self {
        self.with(|c| c.failure_level = level)
    }

    /// The level of the completion event of an ignored outcome (default `INFO`).
    pub fn on_ignored(self, level: Level) -> Self {
        self.with(|c| c.ignored_level = level)
    }

    /// The message of the completion event of a success (default "call succeeded").
    pub fn success_message(self, message: &'static str) -> Self {
        self.with(|c| c.success_message = message)
    }

    /// The message of the completion event of a failure (default "call failed").
    pub fn failure_message(self, message: &'static str) -> Self {
        self.with(|c| c.failure_message = message)
    }

    /// The clock `duration_ms` is measured with (default [`LatencyClock::tsc`]; use
    /// [`LatencyClock::tokio`] in tests on a paused tokio clock).
    pub fn clock(self, clock: LatencyClock) -> Self {
        self.with(|c| c.clock = clock)
    }

    /// The message of the completion event of an ignored outcome (default "call ignored").
    pub fn ignored_message(self, message: &'static str) -> Self {
        self.with(|c| c.ignored_message = message)
    }
}

impl<S, C: Clone, F: Clone> Layer<S> for LoggingLayer<C, F> {
    type Service = Logging<S, C, F>;

    fn layer(&self, inner: S) -> Self::Service {
        Logging {
            inner,
            config: self.config.clone(),
            classifier: self.classifier.clone(),
            fields: self.fields.clone(),
        }
    }
}
