//! The ladder: which delay each retry topic stands for, and the topic names.

use super::error::RetryTopicError;
use std::collections::HashMap;
use std::time::Duration;

/// Most rungs a ladder may have: each rung adds a topic and a history entry.
pub const MAX_RUNGS: usize = 16;

/// The delays of the retry topics, in order: a record that fails on the main
/// topic goes to rung 0 (`<topic>.retry.<delays[0]>`), one that fails there to
/// rung 1, and so on; a failure on the last rung goes to the dead-letter topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ladder {
    delays: Vec<Duration>,
}

impl Ladder {
    /// A ladder of `delays`: 1 to [`MAX_RUNGS`] delays, each at least 1 ms,
    /// distinct once named (`1s` and `1000ms` are one topic).
    pub fn new(delays: impl IntoIterator<Item = Duration>) -> Result<Self, RetryTopicError> {
        let delays: Vec<Duration> = delays.into_iter().collect();
        if delays.is_empty() || delays.len() > MAX_RUNGS {
            return Err(RetryTopicError::Config(format!(
                "a retry ladder needs 1 to {MAX_RUNGS} delays, not {}",
                delays.len()
            )));
        }
        let mut names = std::collections::HashSet::new();
        for d in &delays {
            if d.as_millis() < 1 {
                return Err(RetryTopicError::Config(format!(
                    "retry delay {d:?} is shorter than 1 ms"
                )));
            }
            if !names.insert(delay_name(*d)) {
                return Err(RetryTopicError::Config(format!(
                    "retry delay {} appears twice in the ladder",
                    delay_name(*d)
                )));
            }
        }
        Ok(Ladder { delays })
    }

    /// Number of rungs.
    pub fn len(&self) -> usize {
        self.delays.len()
    }

    /// Always false: a ladder has at least one rung.
    pub fn is_empty(&self) -> bool {
        self.delays.is_empty()
    }

    /// The delay of rung `rung`.
    pub fn delay(&self, rung: usize) -> Option<Duration> {
        self.delays.get(rung).copied()
    }

    /// The delays, in order.
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }

    /// The retry topic of `source` for rung `rung`: `<source>.retry.<delay>`.
    pub fn topic(&self, source: &str, rung: usize) -> Option<String> {
        self.delay(rung)
            .map(|d| format!("{source}.retry.{}", delay_name(d)))
    }

    /// Every retry topic of every source, mapped to its source and rung.
    pub(crate) fn topics(&self, sources: &[String]) -> HashMap<String, (String, usize)> {
        sources
            .iter()
            .flat_map(|s| {
                (0..self.len()).filter_map(move |r| Some((self.topic(s, r)?, (s.clone(), r))))
            })
            .collect()
    }
}

/// `1h`, `10m`, `1s`, `250ms`: the largest unit that divides the delay.
pub fn delay_name(delay: Duration) -> String {
    let ms = delay.as_millis();
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_named_after_their_delay() {
        let ladder = Ladder::new([1, 10, 60, 600].map(Duration::from_secs)).unwrap();
        let names: Vec<String> = (0..4).map(|r| ladder.topic("orders", r).unwrap()).collect();
        assert_eq!(
            names,
            [
                "orders.retry.1s",
                "orders.retry.10s",
                "orders.retry.1m",
                "orders.retry.10m"
            ]
        );
        assert_eq!(ladder.topic("orders", 4), None);
        assert_eq!(delay_name(Duration::from_millis(1500)), "1500ms");
        assert_eq!(delay_name(Duration::from_secs(7200)), "2h");
        let all = ladder.topics(&["a".to_string()]);
        assert_eq!(all["a.retry.1m"], ("a".to_string(), 2));
    }

    #[test]
    fn bad_ladders_are_refused() {
        assert!(Ladder::new([]).is_err());
        assert!(Ladder::new([Duration::from_micros(10)]).is_err());
        assert!(Ladder::new([Duration::from_secs(1), Duration::from_millis(1000)]).is_err());
        assert!(Ladder::new((1..=17).map(Duration::from_secs)).is_err());
    }
}
