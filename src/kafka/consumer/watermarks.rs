//! High watermarks per partition from librdkafka's statistics, for the lag.
//!
//! librdkafka reports, for every partition it fetches, the high watermark of its
//! last fetch response (`hi_offset`) in the statistics JSON it emits every
//! `statistics.interval.ms` (1 s by default in keel). Reading the lag from there
//! costs no broker request, where asking the broker costs one round trip per
//! partition ([`KafkaConsumer::lag`](super::KafkaConsumer::lag)).

use super::tracker::TopicPartition;
use std::collections::HashMap;
use std::sync::Mutex;

/// The last high watermark librdkafka reported per partition.
#[derive(Debug, Default)]
pub(crate) struct Watermarks {
    high: Mutex<HashMap<TopicPartition, i64>>,
}

impl Watermarks {
    /// Reads the partitions of one statistics JSON; the map is replaced whole, so
    /// partitions librdkafka no longer reports fall out. Malformed JSON is ignored.
    pub(crate) fn on_stats(&self, json: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Stats {
            #[serde(default)]
            topics: HashMap<String, Topic>,
        }
        #[derive(serde::Deserialize)]
        struct Topic {
            #[serde(default)]
            partitions: HashMap<String, Partition>,
        }
        #[derive(serde::Deserialize)]
        struct Partition {
            partition: i32,
            #[serde(default = "unknown")]
            hi_offset: i64,
        }
        fn unknown() -> i64 {
            -1
        }
        let Ok(stats) = serde_json::from_slice::<Stats>(json) else {
            return;
        };
        let mut high = HashMap::new();
        for (topic, t) in stats.topics {
            for p in t.partitions.into_values() {
                // Partition -1 is librdkafka's internal "unassigned" entry; -1 offsets
                // are not known yet.
                if p.partition >= 0 && p.hi_offset >= 0 {
                    high.insert(
                        TopicPartition::new(topic.as_str(), p.partition),
                        p.hi_offset,
                    );
                }
            }
        }
        *self.high.lock().unwrap_or_else(|e| e.into_inner()) = high;
    }

    /// The last reported high watermark of `tp`.
    pub(crate) fn high(&self, tp: &TopicPartition) -> Option<i64> {
        let high = self.high.lock().unwrap_or_else(|e| e.into_inner());
        high.get(tp).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hi_offset_of_real_partitions_only() {
        let w = Watermarks::default();
        w.on_stats(
            br#"{"name":"c","topics":{"orders":{"topic":"orders","partitions":{
                "0":{"partition":0,"hi_offset":42,"consumer_lag":3},
                "1":{"partition":1,"hi_offset":-1},
                "-1":{"partition":-1,"hi_offset":7}}}}}"#,
        );
        assert_eq!(w.high(&TopicPartition::new("orders", 0)), Some(42));
        assert_eq!(w.high(&TopicPartition::new("orders", 1)), None);
        assert_eq!(w.high(&TopicPartition::new("orders", -1)), None);
        // Garbage leaves the last reading; a new reading replaces it whole.
        w.on_stats(b"not json");
        assert_eq!(w.high(&TopicPartition::new("orders", 0)), Some(42));
        w.on_stats(br#"{"topics":{}}"#);
        assert_eq!(w.high(&TopicPartition::new("orders", 0)), None);
    }
}
