//! Topic names and topic filters (MQTT 3.1.1 §4.7, MQTT 5.0 §4.7 and §4.8.2).
//!
//! Parse, don't validate: a [`TopicName`] or [`TopicFilter`] can only be built
//! through a check, so code holding one never checks again. Both wrap a
//! [`ByteStr`], so they stay zero-copy slices of the packet that carried them.
//!
//! [`matches`] is the reference matcher: deliberately simple, level by level.
//! The topic trie ([`crate::index`]) and the ACL code ([`crate::acl`]) are
//! property-tested against it.

use crate::ByteStr;
use std::fmt;

/// Longest topic name or filter: its length must fit the 16-bit prefix of an
/// MQTT UTF-8 string (MQTT-4.7.3-3).
pub const MAX_TOPIC_LEN: usize = 65_535;

const SHARE_PREFIX: &str = "$share/";

/// Why a string is not a topic name or topic filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    /// Zero length (MQTT-4.7.3-1).
    Empty,
    /// Longer than [`MAX_TOPIC_LEN`] bytes.
    TooLong,
    /// A topic name contains `+` or `#` (MQTT-4.7.1-1).
    WildcardInName,
    /// `#` is not alone in the last level (MQTT-4.7.1-2).
    MisplacedMultiLevel,
    /// `+` does not occupy a whole level (MQTT-4.7.1-3).
    MisplacedSingleLevel,
    /// `$share/...` without a non-empty, wildcard-free share name followed by
    /// a non-empty filter (MQTT-4.8.2-1, -2).
    InvalidShare,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TopicError::Empty => "empty topic",
            TopicError::TooLong => "topic longer than 65535 bytes",
            TopicError::WildcardInName => "topic name contains a wildcard ('+' or '#')",
            TopicError::MisplacedMultiLevel => "'#' must be alone in the last level",
            TopicError::MisplacedSingleLevel => "'+' must occupy a whole level",
            TopicError::InvalidShare => {
                "shared subscription must be $share/{non-empty name without wildcards}/{filter}"
            }
        })
    }
}

impl std::error::Error for TopicError {}

/// A topic name as a PUBLISH carries it: non-empty, at most 65535 bytes, no
/// wildcard characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TopicName(ByteStr);

impl TopicName {
    pub fn new(s: ByteStr) -> Result<TopicName, TopicError> {
        check_name(&s)?;
        Ok(TopicName(s))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn as_bytestr(&self) -> &ByteStr {
        &self.0
    }

    pub fn into_inner(self) -> ByteStr {
        self.0
    }
}

impl std::ops::Deref for TopicName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A topic filter as a SUBSCRIBE carries it, possibly a shared subscription
/// `$share/{group}/{filter}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TopicFilter(ByteStr);

impl TopicFilter {
    pub fn new(s: ByteStr) -> Result<TopicFilter, TopicError> {
        check_filter(&s)?;
        Ok(TopicFilter(s))
    }

    /// `Some((group, filter))` for a shared subscription `$share/{group}/{filter}`.
    pub fn share(&self) -> Option<(&str, &str)> {
        split_share(self.as_str())
    }

    /// Whether the filter (the part after `$share/{group}/` for a shared
    /// subscription) contains `+` or `#`.
    pub fn has_wildcards(&self) -> bool {
        let filter = self.share().map_or(self.as_str(), |(_, f)| f);
        filter.contains(['+', '#'])
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn as_bytestr(&self) -> &ByteStr {
        &self.0
    }

    pub fn into_inner(self) -> ByteStr {
        self.0
    }
}

impl std::ops::Deref for TopicFilter {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks a topic name (what [`TopicName::new`] accepts).
pub(crate) fn check_name(s: &str) -> Result<(), TopicError> {
    check_len(s)?;
    if s.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter including the `$share/` rules (what
/// [`TopicFilter::new`] accepts).
pub(crate) fn check_filter(s: &str) -> Result<(), TopicError> {
    check_len(s)?;
    if s.starts_with(SHARE_PREFIX) {
        return match split_share(s) {
            Some(_) => Ok(()),
            None => Err(TopicError::InvalidShare),
        };
    }
    check_levels(s)
}

/// Checks a plain topic filter: only the wildcard placement rules, no
/// `$share/` interpretation.
pub(crate) fn check_plain_filter(s: &str) -> Result<(), TopicError> {
    check_len(s)?;
    check_levels(s)
}

fn check_len(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        Err(TopicError::Empty)
    } else if s.len() > MAX_TOPIC_LEN {
        Err(TopicError::TooLong)
    } else {
        Ok(())
    }
}

fn check_levels(s: &str) -> Result<(), TopicError> {
    let mut levels = s.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::MisplacedMultiLevel);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedSingleLevel);
        }
    }
    Ok(())
}

/// Splits a valid shared subscription `$share/{group}/{filter}` into
/// `(group, filter)`; `None` if `s` is not one (or is a malformed one).
pub(crate) fn split_share(s: &str) -> Option<(&str, &str)> {
    let rest = s.strip_prefix(SHARE_PREFIX)?;
    let (group, filter) = rest.split_once('/')?;
    let group_ok = !group.is_empty() && !group.contains(['+', '#']);
    let filter_ok = !filter.is_empty() && check_levels(filter).is_ok();
    (group_ok && filter_ok).then_some((group, filter))
}

/// Whether `topic` (a topic name) matches `filter` (a plain topic filter, not
/// `$share/...`).
///
/// `+` matches exactly one level, possibly empty; `#` matches its parent level
/// and any number of levels below (`a/#` matches `a`); a topic starting with
/// `$` is not matched by a filter whose first level is `+` or `#`
/// (MQTT-4.7.2-1). The filter is assumed valid; anything else just gives some
/// answer, never a panic.
pub fn matches(filter: &str, topic: &str) -> bool {
    let first = filter.split('/').next().unwrap_or("");
    if topic.starts_with('$') && (first == "+" || first == "#") {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn name(s: &str) -> Result<TopicName, TopicError> {
        TopicName::new(ByteStr::from(s))
    }

    fn filter(s: &str) -> Result<TopicFilter, TopicError> {
        TopicFilter::new(ByteStr::from(s))
    }

    #[test]
    fn topic_names() {
        assert!(name("a/b").is_ok());
        assert!(name("/").is_ok());
        assert!(name("$SYS/x").is_ok());
        assert!(name("a b/ c").is_ok());
        assert_eq!(name(""), Err(TopicError::Empty));
        assert_eq!(name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(name("a#"), Err(TopicError::WildcardInName));
        assert_eq!(name(&"x".repeat(65_536)), Err(TopicError::TooLong));
        let n = name(&"x".repeat(65_535)).unwrap();
        assert_eq!(n.len(), 65_535);
        let n = name("a/b").unwrap();
        assert_eq!(n.as_str(), "a/b");
        assert_eq!(&*n, "a/b");
        assert_eq!(n.as_bytestr().as_str(), "a/b");
        assert_eq!(n.into_inner().as_str(), "a/b");
    }

    #[test]
    fn topic_filters() {
        for ok in [
            "#", "+", "a/#", "a/+/b", "+/+", "/", "//", "/#", "+/#", "$SYS/#", "a//+",
        ] {
            assert!(filter(ok).is_ok(), "{ok}");
        }
        assert_eq!(filter(""), Err(TopicError::Empty));
        assert_eq!(filter("a/#/b"), Err(TopicError::MisplacedMultiLevel));
        assert_eq!(filter("a#"), Err(TopicError::MisplacedMultiLevel));
        assert_eq!(filter("a/b#"), Err(TopicError::MisplacedMultiLevel));
        assert_eq!(filter("a+"), Err(TopicError::MisplacedSingleLevel));
        assert_eq!(filter("a/+b"), Err(TopicError::MisplacedSingleLevel));
        assert!(!filter("a/b").unwrap().has_wildcards());
        assert!(filter("a/+").unwrap().has_wildcards());
        assert!(filter("#").unwrap().has_wildcards());
    }

    #[test]
    fn shared_subscriptions() {
        let f = filter("$share/g/a/+").unwrap();
        assert_eq!(f.share(), Some(("g", "a/+")));
        assert!(f.has_wildcards());
        assert_eq!(filter("$share/g/#").unwrap().share(), Some(("g", "#")));
        assert!(!filter("$share/g/x").unwrap().has_wildcards());
        for bad in [
            "$share/g",
            "$share/g/",
            "$share//x",
            "$share/g+/x",
            "$share/g#/x",
            "$share/",
            "$share/g/a/#/b",
            "$share/g/a+",
        ] {
            assert_eq!(filter(bad), Err(TopicError::InvalidShare), "{bad}");
        }
        // Not shared subscriptions at all.
        assert_eq!(filter("$share").unwrap().share(), None);
        assert_eq!(filter("$sharex/g/a").unwrap().share(), None);
        assert_eq!(filter("a/b").unwrap().share(), None);
    }

    #[test]
    fn matching_basics() {
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a"));
        assert!(!matches("a", "a/b"));
        assert!(matches("a/+", "a/b"));
        assert!(!matches("a/+", "a"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/"));
        assert!(matches("a/#", "a/b/c"));
        assert!(!matches("a/#", "ab"));
        assert!(matches("#", "a"));
        assert!(matches("#", "/"));
        assert!(matches("+/+", "/"));
        assert!(matches("/+", "/"));
        assert!(matches("a/+/b", "a//b"));
        assert!(!matches("a/+/b", "a/b"));
    }

    #[test]
    fn dollar_topics() {
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(!matches("+/#", "$SYS/x"));
        assert!(!matches("+", "$SYS"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS"));
        assert!(matches("$SYS/+", "$SYS/x"));
        assert!(matches("$SYS/x", "$SYS/x"));
        // Only the first level counts.
        assert!(matches("a/+", "a/$x"));
        assert!(matches("a/#", "a/$x"));
    }

    /// The non-normative examples of MQTT 3.1.1 §4.7.1.2 and §4.7.1.3.
    #[test]
    fn spec_examples() {
        for t in ["sport/tennis/player1", "sport/tennis/player1/ranking"] {
            assert!(matches("sport/tennis/player1/#", t));
        }
        assert!(matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon"
        ));
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(matches("sport/tennis/+", "sport/tennis/player2"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(matches("sport/+", "sport/"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(filter("sport/tennis#").is_err());
        assert!(filter("sport/tennis/#/ranking").is_err());
        assert!(filter("sport+").is_err());
        assert!(filter("+/tennis/#").is_ok());
    }
}
