//! [`RetryLayer`].

use super::Retry;
use super::policy::RetryPolicy;
use crate::classify::ErrorsAsFailures;
use std::sync::Arc;
use tower::Layer;

/// Wraps services in [`Retry`].
///
/// Built from a [`RetryPolicy`] (default: see there) and a classifier (default
/// [`ErrorsAsFailures`]: every `Err` is retryable). Cheap to clone; clones, and all
/// the services they build, **share the policy** (one `Arc`) **and its retry budget**.
///
/// ```
/// use keel_layers::classify::ByError;
/// use keel_layers::retry::{RetryLayer, RetryPolicy};
///
/// let layer = RetryLayer::new(RetryPolicy::s3()).classifier(ByError);
/// # let _ = layer;
/// ```
#[derive(Clone, Debug)]
pub struct RetryLayer<C = ErrorsAsFailures> {
    policy: Arc<RetryPolicy>,
    classifier: C,
}

impl Default for RetryLayer {
    fn default() -> Self {
        RetryLayer::new(RetryPolicy::default())
    }
}

impl RetryLayer {
    /// A layer retrying every `Err` under `policy`.
    pub fn new(policy: RetryPolicy) -> Self {
        RetryLayer {
            policy: Arc::new(policy),
            classifier: ErrorsAsFailures,
        }
    }
}

impl<C> RetryLayer<C> {
    /// Uses `classifier` to decide what is retried
    /// (`Classification::should_retry()`).
    pub fn classifier<C2>(self, classifier: C2) -> RetryLayer<C2> {
        RetryLayer {
            policy: self.policy,
            classifier,
        }
    }

    /// Replaces the policy.
    pub fn policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// The policy.
    pub fn get_policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

impl<S, C: Clone> Layer<S> for RetryLayer<C> {
    type Service = Retry<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::from_shared(inner, self.policy.clone(), self.classifier.clone())
    }
}
