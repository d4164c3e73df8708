//! Progress events of transfers.

use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;

/// How far a transfer has come, sent after every part (or range) that completed.
///
/// `bytes` only grows from one event to the next and ends at the object's size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferProgress {
    /// Bytes transferred so far (completed parts or ranges).
    pub bytes: u64,
    /// The object's size, when known. A stream of unknown length has it from the
    /// moment its end has been read, so at least the last event carries it.
    pub total: Option<u64>,
    /// The part (or range) whose completion this event reports, 1-based. A single
    /// PutObject or GetObject is reported as part 1.
    pub part_number: u32,
    /// Parts (or ranges) completed so far.
    pub parts_done: u32,
}

/// Where progress events go: nowhere (the default), a callback, or a
/// `tokio::sync::watch` channel that always holds the latest event.
///
/// Cloning shares the callback or channel.
#[derive(Clone, Default)]
pub struct ProgressListener {
    sink: Option<Arc<dyn Fn(TransferProgress) + Send + Sync>>,
}

impl fmt::Debug for ProgressListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProgressListener")
            .field("active", &self.sink.is_some())
            .finish()
    }
}

impl ProgressListener {
    /// No progress events.
    pub fn none() -> Self {
        ProgressListener::default()
    }

    /// Calls `callback` with every event, from the task that drives the transfer;
    /// keep it short (it delays the next part).
    pub fn callback(callback: impl Fn(TransferProgress) + Send + Sync + 'static) -> Self {
        ProgressListener {
            sink: Some(Arc::new(callback)),
        }
    }

    /// Sends every event into a watch channel: receivers see the latest event and
    /// memory stays constant however fast events come.
    pub fn watch(sender: watch::Sender<TransferProgress>) -> Self {
        ProgressListener::callback(move |progress| {
            sender.send_replace(progress);
        })
    }

    pub(crate) fn emit(&self, progress: TransferProgress) {
        if let Some(sink) = &self.sink {
            sink(progress);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_listeners_hold_the_latest_event() {
        let (sender, receiver) = watch::channel(TransferProgress::default());
        let listener = ProgressListener::watch(sender);
        for part in 1..=3 {
            listener.emit(TransferProgress {
                bytes: u64::from(part) * 10,
                total: Some(30),
                part_number: part,
                parts_done: part,
            });
        }
        assert_eq!(receiver.borrow().bytes, 30);
        ProgressListener::none().emit(TransferProgress::default());
    }
}
