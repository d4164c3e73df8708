//! Object keys that are checked before any request is sent.
//!
//! S3 accepts almost any UTF-8 string up to 1,024 bytes as a key, but many keys that
//! S3 accepts are mistakes: an empty key, a key with a control character (a stray
//! newline from a form field), a key starting with `/` (`/a` and `a` are different
//! objects), `a//b` (an empty path segment) or `a/../b` (which some tools and proxies
//! normalise, so the object is written under one name and read under another).
//! [`ObjectKey`] refuses them up front with an [`InvalidKey`] error that names the
//! [`KeyRule`] broken, so a bad key never costs a round trip.
//!
//! The hard rules ([`KeyRule::Empty`], [`KeyRule::TooLong`],
//! [`KeyRule::ControlCharacter`]) always apply. The path-hygiene rules are on by
//! default and can be switched off one by one with a [`KeyPolicy`].
//!
//! ```
//! use keel::s3::key::{KeyPolicy, KeyRule, ObjectKey};
//!
//! let key = ObjectKey::new("uploads/2026/report.pdf").unwrap();
//! assert_eq!(key.as_str(), "uploads/2026/report.pdf");
//!
//! let err = ObjectKey::new("uploads/../secret").unwrap_err();
//! assert_eq!(err.rule, KeyRule::DotSegment);
//!
//! // A bucket laid out with leading slashes can still be used, knowingly:
//! let policy = KeyPolicy::strict().allow_leading_slash(true);
//! assert!(ObjectKey::with_policy("/legacy/path", &policy).is_ok());
//! ```

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

/// The longest key S3 accepts, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;

/// A rule an object key can break.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyRule {
    /// The key is empty, or only whitespace (which the AWS SDK refuses as a
    /// missing key).
    Empty,
    /// The key is longer than [`MAX_KEY_BYTES`] bytes of UTF-8.
    TooLong,
    /// The key contains a control character (U+0000..U+001F, U+007F..U+009F).
    ControlCharacter,
    /// The key starts with `/` (policy rule).
    LeadingSlash,
    /// The key contains `//`, an empty path segment (policy rule).
    DoubleSlash,
    /// A `/`-separated segment of the key is `.` or `..` (policy rule).
    DotSegment,
}

impl KeyRule {
    /// A short stable name for logs and metrics.
    pub const fn as_str(&self) -> &'static str {
        match self {
            KeyRule::Empty => "empty",
            KeyRule::TooLong => "too_long",
            KeyRule::ControlCharacter => "control_character",
            KeyRule::LeadingSlash => "leading_slash",
            KeyRule::DoubleSlash => "double_slash",
            KeyRule::DotSegment => "dot_segment",
        }
    }

    const fn describe(&self) -> &'static str {
        match self {
            KeyRule::Empty => "the key is empty or only whitespace",
            KeyRule::TooLong => "the key is longer than 1024 bytes",
            KeyRule::ControlCharacter => "the key contains a control character",
            KeyRule::LeadingSlash => "the key starts with '/'",
            KeyRule::DoubleSlash => "the key contains an empty segment ('//')",
            KeyRule::DotSegment => "the key contains a '.' or '..' segment",
        }
    }
}

impl fmt::Display for KeyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// A key that breaks a [`KeyRule`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid object key {}: {rule} (rule `{}`)", shown(key), rule.as_str())]
pub struct InvalidKey {
    /// The refused key, as given.
    pub key: String,
    /// The rule it breaks.
    pub rule: KeyRule,
}

/// The key for messages: debug-quoted (control characters visible), cut after
/// 64 characters so an over-long key does not flood a log line.
fn shown(key: &str) -> String {
    const SHOWN_CHARS: usize = 64;
    let mut chars = key.chars();
    let head: String = chars.by_ref().take(SHOWN_CHARS).collect();
    if chars.next().is_some() {
        format!("{head:?}… ({} bytes)", key.len())
    } else {
        format!("{head:?}")
    }
}

/// Which of the path-hygiene rules apply. The hard rules (empty, too long, control
/// characters) always apply.
///
/// The default, [`KeyPolicy::strict`], refuses leading `/`, `//` and `.`/`..`
/// segments; [`KeyPolicy::s3_only`] applies only what S3 itself cannot store or what
/// is almost always a bug (the hard rules). `Copy`, so cloning shares nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyPolicy {
    leading_slash: bool,
    double_slash: bool,
    dot_segments: bool,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        KeyPolicy::strict()
    }
}

impl KeyPolicy {
    /// Every rule applies (the default).
    pub const fn strict() -> Self {
        KeyPolicy {
            leading_slash: false,
            double_slash: false,
            dot_segments: false,
        }
    }

    /// Only the hard rules apply: empty, too long, control characters.
    pub const fn s3_only() -> Self {
        KeyPolicy {
            leading_slash: true,
            double_slash: true,
            dot_segments: true,
        }
    }

    /// Whether a key may start with `/` (default `false`).
    pub const fn allow_leading_slash(mut self, allow: bool) -> Self {
        self.leading_slash = allow;
        self
    }

    /// Whether a key may contain `//` (default `false`).
    pub const fn allow_double_slash(mut self, allow: bool) -> Self {
        self.double_slash = allow;
        self
    }

    /// Whether a key may contain `.` or `..` segments (default `false`).
    pub const fn allow_dot_segments(mut self, allow: bool) -> Self {
        self.dot_segments = allow;
        self
    }

    /// Checks `key`, returning the first rule it breaks.
    pub fn check(&self, key: &str) -> Result<(), KeyRule> {
        // Whitespace only counts as empty: the AWS SDK treats such a key as a
        // missing field and refuses the request after keel accepted it.
        if key.trim().is_empty() {
            return Err(KeyRule::Empty);
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(KeyRule::TooLong);
        }
        if key.chars().any(char::is_control) {
            return Err(KeyRule::ControlCharacter);
        }
        if !self.leading_slash && key.starts_with('/') {
            return Err(KeyRule::LeadingSlash);
        }
        if !self.double_slash && key.contains("//") {
            return Err(KeyRule::DoubleSlash);
        }
        if !self.dot_segments && key.split('/').any(|seg| seg == "." || seg == "..") {
            return Err(KeyRule::DotSegment);
        }
        Ok(())
    }
}

/// A checked S3 object key.
///
/// Built with [`ObjectKey::new`] (the default, strict [`KeyPolicy`]) or
/// [`ObjectKey::with_policy`]; also through `TryFrom<&str>`, `TryFrom<String>` and
/// `FromStr`. Cloning copies the string.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// Checks `key` against the default, strict policy.
    pub fn new(key: impl Into<String>) -> Result<Self, InvalidKey> {
        Self::with_policy(key, &KeyPolicy::strict())
    }

    /// Checks `key` against `policy`.
    pub fn with_policy(key: impl Into<String>, policy: &KeyPolicy) -> Result<Self, InvalidKey> {
        let key = key.into();
        match policy.check(&key) {
            Ok(()) => Ok(ObjectKey(key)),
            Err(rule) => Err(InvalidKey { key, rule }),
        }
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ObjectKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for ObjectKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<ObjectKey> for String {
    fn from(key: ObjectKey) -> String {
        key.0
    }
}

impl TryFrom<&str> for ObjectKey {
    type Error = InvalidKey;
    fn try_from(key: &str) -> Result<Self, InvalidKey> {
        ObjectKey::new(key)
    }
}

impl TryFrom<String> for ObjectKey {
    type Error = InvalidKey;
    fn try_from(key: String) -> Result<Self, InvalidKey> {
        ObjectKey::new(key)
    }
}

impl FromStr for ObjectKey {
    type Err = InvalidKey;
    fn from_str(key: &str) -> Result<Self, InvalidKey> {
        ObjectKey::new(key)
    }
}

/// Anything the S3 facade accepts as a key: strings are checked against the
/// facade's [`KeyPolicy`]; an [`ObjectKey`] was checked when it was built and is
/// taken as it is.
pub trait IntoObjectKey {
    /// Turns `self` into a checked key.
    fn into_object_key(self, policy: &KeyPolicy) -> Result<ObjectKey, InvalidKey>;
}

impl IntoObjectKey for ObjectKey {
    fn into_object_key(self, _policy: &KeyPolicy) -> Result<ObjectKey, InvalidKey> {
        Ok(self)
    }
}

impl IntoObjectKey for &ObjectKey {
    fn into_object_key(self, _policy: &KeyPolicy) -> Result<ObjectKey, InvalidKey> {
        Ok(self.clone())
    }
}

impl IntoObjectKey for &str {
    fn into_object_key(self, policy: &KeyPolicy) -> Result<ObjectKey, InvalidKey> {
        ObjectKey::with_policy(self, policy)
    }
}

impl IntoObjectKey for String {
    fn into_object_key(self, policy: &KeyPolicy) -> Result<ObjectKey, InvalidKey> {
        ObjectKey::with_policy(self, policy)
    }
}

impl IntoObjectKey for &String {
    fn into_object_key(self, policy: &KeyPolicy) -> Result<ObjectKey, InvalidKey> {
        ObjectKey::with_policy(self.as_str(), policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(key: &str) -> KeyRule {
        ObjectKey::new(key).unwrap_err().rule
    }

    #[test]
    fn accepts_ordinary_keys() {
        for key in [
            "a",
            "uploads/2026/report.pdf",
            "dir/",
            "with space/and+plus",
            "ünïcödé/文件.txt",
            "a.b/..c/.d./x..",
            "trailing/dot.",
        ] {
            assert_eq!(ObjectKey::new(key).unwrap().as_str(), key);
        }
    }

    #[test]
    fn empty_is_refused() {
        assert_eq!(rule(""), KeyRule::Empty);
        assert_eq!(rule(" "), KeyRule::Empty);
        assert_eq!(rule("\u{3000} "), KeyRule::Empty);
        assert_eq!(
            ObjectKey::with_policy("", &KeyPolicy::s3_only())
                .unwrap_err()
                .rule,
            KeyRule::Empty
        );
    }

    #[test]
    fn length_limit_is_in_bytes() {
        let at_limit = "k".repeat(MAX_KEY_BYTES);
        assert!(ObjectKey::new(at_limit.clone()).is_ok());
        assert_eq!(rule(&format!("{at_limit}k")), KeyRule::TooLong);
        // 512 two-byte characters are exactly 1,024 bytes; one more is over.
        let two_byte = "é".repeat(512);
        assert!(ObjectKey::new(two_byte.clone()).is_ok());
        assert_eq!(rule(&format!("{two_byte}é")), KeyRule::TooLong);
    }

    #[test]
    fn control_characters_are_refused() {
        for key in ["a\nb", "a\0", "\tkey", "del\u{7f}", "c1\u{85}"] {
            assert_eq!(rule(key), KeyRule::ControlCharacter, "{key:?}");
            assert_eq!(
                ObjectKey::with_policy(key, &KeyPolicy::s3_only())
                    .unwrap_err()
                    .rule,
                KeyRule::ControlCharacter
            );
        }
    }

    #[test]
    fn leading_slash_is_refused_by_default() {
        assert_eq!(rule("/a"), KeyRule::LeadingSlash);
        let policy = KeyPolicy::strict().allow_leading_slash(true);
        assert!(ObjectKey::with_policy("/a", &policy).is_ok());
    }

    #[test]
    fn double_slash_is_refused_by_default() {
        assert_eq!(rule("a//b"), KeyRule::DoubleSlash);
        assert_eq!(rule("a//"), KeyRule::DoubleSlash);
        let policy = KeyPolicy::strict().allow_double_slash(true);
        assert!(ObjectKey::with_policy("a//b", &policy).is_ok());
    }

    #[test]
    fn dot_segments_are_refused_by_default() {
        for key in [".", "..", "./a", "../a", "a/./b", "a/../b", "a/.", "a/.."] {
            assert_eq!(rule(key), KeyRule::DotSegment, "{key:?}");
        }
        let policy = KeyPolicy::strict().allow_dot_segments(true);
        assert!(ObjectKey::with_policy("a/../b", &policy).is_ok());
    }

    #[test]
    fn s3_only_policy_allows_path_oddities() {
        let policy = KeyPolicy::s3_only();
        for key in ["/a", "a//b", "a/../b", "//./.."] {
            assert!(ObjectKey::with_policy(key, &policy).is_ok(), "{key:?}");
        }
    }

    #[test]
    fn error_names_the_rule_and_the_key() {
        let err = ObjectKey::new("a/../b").unwrap_err();
        assert_eq!(err.key, "a/../b");
        let msg = err.to_string();
        assert!(msg.contains("dot_segment"), "{msg}");
        assert!(msg.contains("\"a/../b\""), "{msg}");
        let long = ObjectKey::new("x".repeat(2000)).unwrap_err().to_string();
        assert!(long.contains("2000 bytes") && long.len() < 200, "{long}");
    }

    #[test]
    fn conversions_check_too() {
        assert!(ObjectKey::try_from("ok").is_ok());
        assert!(ObjectKey::try_from(String::from("/no")).is_err());
        assert!("a\nb".parse::<ObjectKey>().is_err());
        let key = ObjectKey::with_policy("/x", &KeyPolicy::s3_only()).unwrap();
        // An already-checked key is taken as it is.
        assert!(key.into_object_key(&KeyPolicy::strict()).is_ok());
        assert!("/x".into_object_key(&KeyPolicy::strict()).is_err());
    }
}
