//! The monotonic clock the metrics layer reads at the start and end of every call.

use std::fmt;
use std::time::Duration;

/// Where [`Metrics`](super::Metrics) and [`Logging`](crate::logging::Logging) read time: the CPU's time-stamp counter through
/// the [`quanta`](https://docs.rs/quanta) crate (the default), or tokio's clock.
///
/// Two readings per call are most of the layer's cost. On x86-64 with an invariant
/// TSC, a quanta reading is an `rdtsc` plus a multiply, about half the cost of
/// `Instant::now()` (measured in `benches/observability.rs`: `calibration/*`);
/// elsewhere quanta falls back to the OS clock. Use [`LatencyClock::tokio`] in tests
/// that pause and advance tokio's clock (`#[tokio::test(start_paused = true)]`).
///
/// Cloning shares the calibration; all readings are nanoseconds since the clock was
/// created.
#[derive(Clone)]
pub struct LatencyClock {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Tsc {
        clock: quanta::Clock,
        origin: quanta::Instant,
    },
    Tokio {
        origin: tokio::time::Instant,
    },
}

impl fmt::Debug for LatencyClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            Kind::Tsc { .. } => "LatencyClock::Tsc",
            Kind::Tokio { .. } => "LatencyClock::Tokio",
        })
    }
}

impl Default for LatencyClock {
    fn default() -> Self {
        Self::tsc()
    }
}

impl LatencyClock {
    /// The time-stamp counter via quanta (the default). Calibrates once per process.
    pub fn tsc() -> Self {
        Self::from_quanta(quanta::Clock::new())
    }

    /// tokio's clock ([`tokio::time::Instant`]): follows a paused test clock, and is
    /// `std::time::Instant` otherwise.
    pub fn tokio() -> Self {
        LatencyClock {
            kind: Kind::Tokio {
                origin: tokio::time::Instant::now(),
            },
        }
    }

    fn from_quanta(clock: quanta::Clock) -> Self {
        let origin = clock.now();
        LatencyClock {
            kind: Kind::Tsc { clock, origin },
        }
    }

    /// A quanta mock clock, advanced by hand.
    #[cfg(test)]
    pub(super) fn mock() -> (Self, std::sync::Arc<quanta::Mock>) {
        let (clock, mock) = quanta::Clock::mock();
        (Self::from_quanta(clock), mock)
    }

    /// Nanoseconds since this clock was created.
    #[inline]
    pub(crate) fn now_nanos(&self) -> u64 {
        let since = match &self.kind {
            Kind::Tsc { clock, origin } => clock.now().saturating_duration_since(*origin),
            Kind::Tokio { origin } => {
                tokio::time::Instant::now().saturating_duration_since(*origin)
            }
        };
        nanos(since)
    }
}

#[inline]
pub(super) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
