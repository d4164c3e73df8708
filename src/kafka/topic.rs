//! Topic names that are checked before any request is sent.
//!
//! Kafka refuses a topic name that is empty, longer than 249 characters, uses a
//! character outside `[a-zA-Z0-9._-]`, or is `.` or `..` — but only when the
//! request reaches a broker. librdkafka's mock cluster (and some proxies) accept
//! such names, so code tested against them breaks on the real broker. With topic
//! auto-creation on, a name taken from user input (an HTTP path, a header) can
//! also create topics without bound. [`TopicName`] applies Kafka's rules up front
//! and names the [`TopicRule`] broken, so a bad name never costs a round trip and
//! behaves the same everywhere.
//!
//! ```
//! use keel::kafka::topic::{TopicName, TopicRule};
//!
//! let topic = TopicName::new("orders.v1").unwrap();
//! assert_eq!(topic.as_str(), "orders.v1");
//! assert!(!topic.is_dead_letter());
//!
//! assert_eq!(TopicName::new("a b").unwrap_err().rule, TopicRule::InvalidCharacter);
//! assert_eq!(TopicName::new("..").unwrap_err().rule, TopicRule::DotName);
//! assert!(TopicName::new("orders.dlq").unwrap().is_dead_letter());
//! ```

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

/// The longest topic name Kafka accepts, in characters (all ASCII).
pub const MAX_TOPIC_CHARS: usize = 249;

/// The suffix of keel's dead-letter topics (`<topic>.dlq`).
pub const DEAD_LETTER_SUFFIX: &str = ".dlq";

/// A rule a topic name can break.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TopicRule {
    /// The name is empty.
    Empty,
    /// The name is longer than [`MAX_TOPIC_CHARS`] characters.
    TooLong,
    /// The name has a character outside `[a-zA-Z0-9._-]`.
    InvalidCharacter,
    /// The name is `.` or `..`.
    DotName,
}

impl TopicRule {
    /// A short stable name for logs and metrics.
    pub const fn as_str(&self) -> &'static str {
        match self {
            TopicRule::Empty => "empty",
            TopicRule::TooLong => "too_long",
            TopicRule::InvalidCharacter => "invalid_character",
            TopicRule::DotName => "dot_name",
        }
    }

    const fn describe(&self) -> &'static str {
        match self {
            TopicRule::Empty => "the topic name is empty",
            TopicRule::TooLong => "the topic name is longer than 249 characters",
            TopicRule::InvalidCharacter => "the topic name has a character outside [a-zA-Z0-9._-]",
            TopicRule::DotName => "the topic name is '.' or '..'",
        }
    }
}

impl fmt::Display for TopicRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// A topic name refused by [`TopicName::new`]. Its `Display` names the rule, not
/// the name (the name may be user input of any size); [`len`](Self::len) gives
/// the size for logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidTopic {
    /// The rule the name broke.
    pub rule: TopicRule,
    /// The name's length in bytes.
    pub len: usize,
}

impl InvalidTopic {
    /// The refused name's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when the refused name was empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Display for InvalidTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid topic name: {}", self.rule)
    }
}

impl std::error::Error for InvalidTopic {}

/// A Kafka topic name that follows Kafka's rules: 1 to 249 characters of
/// `[a-zA-Z0-9._-]`, not `.` or `..`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(String);

impl TopicName {
    /// Checks `name` against Kafka's rules.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidTopic> {
        let name = name.into();
        check(&name)?;
        Ok(TopicName(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, owned.
    pub fn into_string(self) -> String {
        self.0
    }

    /// `true` for a dead-letter topic (`<topic>.dlq`).
    pub fn is_dead_letter(&self) -> bool {
        self.0.ends_with(DEAD_LETTER_SUFFIX)
    }

    /// This topic's dead-letter topic, `<topic>.dlq`, when that name is valid
    /// (it is not when the name is longer than 245 characters).
    pub fn dead_letter(&self) -> Result<TopicName, InvalidTopic> {
        TopicName::new(format!("{}{DEAD_LETTER_SUFFIX}", self.0))
    }
}

fn check(name: &str) -> Result<(), InvalidTopic> {
    let fail = |rule| {
        Err(InvalidTopic {
            rule,
            len: name.len(),
        })
    };
    if name.is_empty() {
        return fail(TopicRule::Empty);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return fail(TopicRule::InvalidCharacter);
    }
    // All ASCII from here: bytes are characters.
    if name.len() > MAX_TOPIC_CHARS {
        return fail(TopicRule::TooLong);
    }
    if name == "." || name == ".." {
        return fail(TopicRule::DotName);
    }
    Ok(())
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for TopicName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for TopicName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl FromStr for TopicName {
    type Err = InvalidTopic;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TopicName::new(s)
    }
}

impl TryFrom<&str> for TopicName {
    type Error = InvalidTopic;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        TopicName::new(s)
    }
}

impl TryFrom<String> for TopicName {
    type Error = InvalidTopic;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        TopicName::new(s)
    }
}

impl From<TopicName> for String {
    fn from(t: TopicName) -> String {
        t.0
    }
}

impl serde::Serialize for TopicName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TopicName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TopicName::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str) -> Option<TopicRule> {
        TopicName::new(name).err().map(|e| e.rule)
    }

    #[test]
    fn kafka_rules() {
        assert_eq!(rule("orders"), None);
        assert_eq!(rule("a.b_c-D9"), None);
        assert_eq!(rule("..."), None, "only '.' and '..' are refused");
        assert_eq!(rule(".hidden"), None);
        assert_eq!(rule(&"x".repeat(249)), None);
        assert_eq!(rule(""), Some(TopicRule::Empty));
        assert_eq!(rule(&"x".repeat(250)), Some(TopicRule::TooLong));
        assert_eq!(rule(&"x".repeat(300)), Some(TopicRule::TooLong));
        assert_eq!(rule("."), Some(TopicRule::DotName));
        assert_eq!(rule(".."), Some(TopicRule::DotName));
        for bad in ["a b", "über", "a/b", "a\n", "a\0b", "a:b", "a%20b", "😀"] {
            assert_eq!(rule(bad), Some(TopicRule::InvalidCharacter), "{bad:?}");
        }
    }

    #[test]
    fn error_does_not_echo_the_name() {
        let err = TopicName::new("secret token value").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        assert_eq!(err.len(), 18);
    }

    #[test]
    fn dead_letter_names() {
        let t = TopicName::new("orders").unwrap();
        assert!(!t.is_dead_letter());
        let d = t.dead_letter().unwrap();
        assert_eq!(d.as_str(), "orders.dlq");
        assert!(d.is_dead_letter());
        let long = TopicName::new("x".repeat(246)).unwrap();
        assert_eq!(long.dead_letter().unwrap_err().rule, TopicRule::TooLong);
    }

    #[test]
    fn serde_checks_the_rules() {
        let t: TopicName = serde_json::from_str("\"orders\"").unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"orders\"");
        assert!(serde_json::from_str::<TopicName>("\"a b\"").is_err());
    }

    #[test]
    fn agrees_with_a_reference_check_on_every_short_ascii_name() {
        // Every name of up to 2 characters over a small alphabet that covers each
        // class of character.
        let alphabet = ['a', 'Z', '0', '.', '_', '-', ' ', '/', 'é'];
        let mut names = vec![String::new()];
        for c in alphabet {
            names.push(c.to_string());
            for d in alphabet {
                names.push(format!("{c}{d}"));
            }
        }
        for name in names {
            let valid = !name.is_empty()
                && name.chars().count() <= 249
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                && name != "."
                && name != "..";
            assert_eq!(TopicName::new(name.clone()).is_ok(), valid, "{name:?}");
        }
    }
}
