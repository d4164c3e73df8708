use tracing::Span;

/// Caller-chosen fields for the span of one call, taken from the request.
///
/// The [`Logging`](super::Logging) layer opens its own span with `component` and
/// `operation`; if this returns an enabled span, that span is made a child of the
/// layer's, and the completion event is emitted inside it, so subscribers (and
/// [`JsonLogFormat`](super::JsonLogFormat)) see both spans' fields.
///
/// Implemented for [`NoFields`] and for every `Fn(&Req) -> Span`:
///
/// ```
/// use keel_layers::logging::LoggingLayer;
///
/// struct Publish { topic: String, event_id: String, payload: Vec<u8> }
///
/// // Log the topic and the event id, never the payload.
/// let layer = LoggingLayer::new("KafkaProducer", "publish").fields(|req: &Publish| {
///     tracing::info_span!("fields", topic = %req.topic, event_id = %req.event_id)
/// });
/// ```
pub trait RequestFields<Req> {
    /// A span carrying the fields to log for `req`, or [`Span::none`].
    fn span(&self, req: &Req) -> Span;
}

/// No caller fields: only `component` and `operation`. The default.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoFields;

impl<Req> RequestFields<Req> for NoFields {
    #[inline]
    fn span(&self, _: &Req) -> Span {
        Span::none()
    }
}

impl<Req, F> RequestFields<Req> for F
where
    F: Fn(&Req) -> Span,
{
    #[inline]
    fn span(&self, req: &Req) -> Span {
        self(req)
    }
}
