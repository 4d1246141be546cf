//! Access control lists in Mosquitto's `acl_file` format.
//!
//! ```text
//! # Comment. Topic lines before any `user` line are for anonymous clients.
//! topic read $SYS/#
//!
//! user alice
//! topic readwrite home/alice/#
//! topic deny home/alice/secrets/#
//!
//! # Patterns apply to every client, wherever they appear.
//! pattern write devices/%c/status
//! pattern read inbox/%u/#
//! ```
//!
//! [`Acl::parse`] reads the file; [`Acl::for_client`] resolves, once per
//! connection, the rules that apply to one client (substituting patterns), so
//! the per-message checks of [`ClientAcl`] only match topics against filters.
//!
//! # Semantics
//!
//! Following Mosquitto 2.0 (`src/security_default.c`: `aclfile__parse`,
//! `acl__find_acls`, `mosquitto_acl_check_default`; `mosquitto.conf(5)` and the
//! `acl-file` plugin page):
//!
//! - A line whose first character is `#` is a comment; blank lines are ignored;
//!   trailing whitespace is trimmed. Words are separated by spaces.
//! - `topic [read|write|readwrite|deny] FILTER`: FILTER is the rest of the line
//!   with surrounding blanks trimmed, so it may contain spaces (the access
//!   word is then required). With a single word after `topic`, that word is
//!   the filter and access is `readwrite`: `topic read` grants readwrite on
//!   the topic named `read`, as in Mosquitto. `topic` alone is an error.
//! - `user NAME` (NAME is the rest of the line): topic lines after it apply to
//!   clients whose CONNECT username is NAME, up to the next `user` line.
//!   Sections for the same NAME add up. Topic lines before the first `user`
//!   line apply only to clients without a username; a client with a username
//!   gets only its own section (no section: no topic rules).
//! - `pattern [read|write|readwrite|deny] FILTER` applies to every client.
//!   `%c` is replaced by the client id and `%u` by the username; a pattern
//!   with `%u` does not apply to a client without a username.
//! - Filters (patterns before substitution) must be valid topic filters.
//! - An unknown first word or access word is an error (Mosquitto refuses to
//!   load such a file too).
//! - Matching follows MQTT: a `$` topic is not matched by a rule whose first
//!   level is `+` or `#` (Mosquitto: "if subscription starts with $,
//!   acl_root->topic must also start with $").
//! - No rule granting the access means denied; an empty file denies all.
//!
//! Where Tarta decides differently, on purpose:
//!
//! - **Deny always wins.** Mosquitto moves `deny` lines to the front of their
//!   list, so within the topic rules or within the patterns deny wins, but it
//!   checks a client's topic rules before the patterns, so there a topic grant
//!   beats a pattern deny. Here any matching deny rule denies.
//! - **Unsafe substitutions.** Mosquitto 2.0 denies everything not granted by
//!   topic rules to a client whose id or username contains `+` or `#`. Here a
//!   grant pattern does not apply if a value it substitutes contains `+`, `#`
//!   or `/` (so a client cannot widen or move its own space), and a deny
//!   pattern fails closed instead of being skipped: it denies everything below
//!   the levels before the placeholder (`a/%c/b` denies `a/#`; a placeholder in
//!   the first level denies everything).
//! - **SUBSCRIBE.** Mosquitto 2.0's acl_file accepts every SUBSCRIBE and only
//!   checks read access per delivered message. Here [`ClientAcl::subscribe`]
//!   refuses a filter that no single read rule covers entirely, or that a deny
//!   rule covers, and reports [`SubscribeAccess::GrantedFiltered`] when a deny
//!   rule overlaps it, so the broker checks [`ClientAcl::can_read`] per message
//!   only then. Coverage by a union of rules is not detected (`a/x` plus
//!   `a/y` do not grant `a/+`), which errs on the side of refusing. For a
//!   shared subscription the `$share/{group}/` prefix is ignored.
//! - Indented comments (`   # ...`) are accepted.

use crate::topic::{check_plain_filter, matches, split_share, TopicError};
use std::collections::HashMap;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn parse(word: &str) -> Option<Access> {
        match word {
            "read" => Some(Access::Read),
            "write" => Some(Access::Write),
            "readwrite" => Some(Access::ReadWrite),
            "deny" => Some(Access::Deny),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    access: Access,
    filter: String,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

/// What is wrong with an ACL file, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclError {
    /// 1-based line number.
    pub line: usize,
    pub kind: AclErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AclErrorKind {
    /// The first word is not `topic`, `pattern` or `user`.
    UnknownKeyword(String),
    /// The access word is not `read`, `write`, `readwrite` or `deny`.
    UnknownAccess(String),
    /// `topic` or `pattern` without a filter.
    MissingFilter,
    /// `user` without a name.
    MissingUsername,
    /// The filter is not a valid topic filter.
    InvalidFilter(String, TopicError),
}

impl fmt::Display for AclError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "acl line {}: ", self.line)?;
        match &self.kind {
            AclErrorKind::UnknownKeyword(w) => {
                write!(f, "unknown keyword {w:?} (expected topic, pattern or user)")
            }
            AclErrorKind::UnknownAccess(w) => write!(
                f,
                "unknown access {w:?} (expected read, write, readwrite or deny)"
            ),
            AclErrorKind::MissingFilter => f.write_str("missing topic filter"),
            AclErrorKind::MissingUsername => f.write_str("missing username"),
            AclErrorKind::InvalidFilter(filter, e) => {
                write!(f, "invalid topic filter {filter:?}: {e}")
            }
        }
    }
}

impl std::error::Error for AclError {}

/// Splits off the first space-separated word; the rest keeps its spaces.
fn next_word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches(' ');
    if s.is_empty() {
        return None;
    }
    Some(s.split_once(' ').unwrap_or((s, "")))
}

/// Parses the `[access] FILTER` part of a `topic` or `pattern` line.
fn parse_rule(rest: &str) -> Result<Rule, AclErrorKind> {
    let (first, after) = next_word(rest).ok_or(AclErrorKind::MissingFilter)?;
    let after = after.trim();
    let (access, filter) = if after.is_empty() {
        (Access::ReadWrite, first)
    } else {
        let access =
            Access::parse(first).ok_or_else(|| AclErrorKind::UnknownAccess(first.to_owned()))?;
        (access, after)
    };
    check_plain_filter(filter).map_err(|e| AclErrorKind::InvalidFilter(filter.to_owned(), e))?;
    Ok(Rule {
        access,
        filter: filter.to_owned(),
    })
}

impl Acl {
    /// Parses a Mosquitto `acl_file`.
    pub fn parse(text: &str) -> Result<Acl, AclError> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (index, line) in text.lines().enumerate() {
            let error = |kind| AclError {
                line: index + 1,
                kind,
            };
            let line = line.trim_end();
            if line.trim_start().starts_with('#') {
                continue;
            }
            let Some((keyword, rest)) = next_word(line) else {
                continue;
            };
            match keyword {
                "topic" => {
                    let rule = parse_rule(rest).map_err(error)?;
                    match &user {
                        Some(name) => acl.users.entry(name.clone()).or_default().push(rule),
                        None => acl.anonymous.push(rule),
                    }
                }
                "pattern" => acl.patterns.push(parse_rule(rest).map_err(error)?),
                "user" => {
                    let name = rest.trim();
                    if name.is_empty() {
                        return Err(error(AclErrorKind::MissingUsername));
                    }
                    user = Some(name.to_owned());
                }
                other => return Err(error(AclErrorKind::UnknownKeyword(other.to_owned()))),
            }
        }
        Ok(acl)
    }

    /// Resolves the rules that apply to one client: its username's topic rules
    /// (or the anonymous ones) and the patterns, substituted.
    pub fn for_client(&self, client_id: &str, username: Option<&str>) -> ClientAcl {
        let topics: &[Rule] = match username {
            Some(name) => self.users.get(name).map_or(&[][..], Vec::as_slice),
            None => &self.anonymous,
        };
        let mut client = ClientAcl::default();
        for rule in topics {
            client.add(rule.access, rule.filter.clone());
        }
        for rule in &self.patterns {
            match substitute(&rule.filter, client_id, username) {
                Substituted::Filter(filter) => client.add(rule.access, filter),
                Substituted::NotApplicable => {}
                Substituted::Unsafe { safe_prefix } => {
                    if rule.access == Access::Deny {
                        match safe_prefix {
                            Some(prefix) => client.deny.push(format!("{prefix}/#")),
                            None => client.deny_all = true,
                        }
                    }
                }
            }
        }
        if client.deny_all {
            client.read.clear();
            client.write.clear();
        }
        client
    }
}

enum Substituted {
    Filter(String),
    /// The pattern uses `%u` and the client has no username.
    NotApplicable,
    /// A substituted value contains `+`, `#` or `/` (or the result is not a
    /// valid filter). `safe_prefix`: the levels before the first placeholder,
    /// `None` if the first level holds one.
    Unsafe {
        safe_prefix: Option<String>,
    },
}

fn substitute(pattern: &str, client_id: &str, username: Option<&str>) -> Substituted {
    let uses_c = pattern.contains("%c");
    let uses_u = pattern.contains("%u");
    if uses_u && username.is_none() {
        return Substituted::NotApplicable;
    }
    let unsafe_value = |v: &str| v.contains(['+', '#', '/']);
    let mut filter = String::with_capacity(pattern.len() + client_id.len());
    let mut rest = pattern;
    while let Some(i) = rest.find('%') {
        filter.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("%c") {
            filter.push_str(client_id);
            rest = after;
        } else if let (Some(after), Some(name)) = (tail.strip_prefix("%u"), username) {
            filter.push_str(name);
            rest = after;
        } else {
            filter.push('%');
            rest = &tail[1..];
        }
    }
    filter.push_str(rest);
    let dangerous = (uses_c && unsafe_value(client_id))
        || (uses_u && username.is_some_and(unsafe_value))
        || check_plain_filter(&filter).is_err();
    if !dangerous {
        return Substituted::Filter(filter);
    }
    let safe_levels: Vec<&str> = pattern
        .split('/')
        .take_while(|level| !level.contains("%c") && !level.contains("%u"))
        .collect();
    let safe_prefix = (!safe_levels.is_empty()).then(|| safe_levels.join("/"));
    Substituted::Unsafe { safe_prefix }
}

/// The ACL rules of one connected client, resolved by [`Acl::for_client`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientAcl {
    read: Vec<String>,
    write: Vec<String>,
    deny: Vec<String>,
    deny_all: bool,
}

/// The outcome of checking a SUBSCRIBE filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeAccess {
    /// No read rule covers the whole filter, or a deny rule covers it.
    Denied,
    /// Every topic the filter matches is readable: no per-message check needed.
    Granted,
    /// Covered by a read rule but overlapped by a deny rule: check
    /// [`ClientAcl::can_read`] for each message delivered through it.
    GrantedFiltered,
}

impl ClientAcl {
    fn add(&mut self, access: Access, filter: String) {
        match access {
            Access::Read => self.read.push(filter),
            Access::Write => self.write.push(filter),
            Access::ReadWrite => {
                self.read.push(filter.clone());
                self.write.push(filter);
            }
            Access::Deny => self.deny.push(filter),
        }
    }

    fn denied(&self, topic: &str) -> bool {
        self.deny_all || self.deny.iter().any(|d| matches(d, topic))
    }

    /// Whether the client may publish to `topic` (a topic name).
    pub fn can_publish(&self, topic: &str) -> bool {
        !self.denied(topic) && self.write.iter().any(|w| matches(w, topic))
    }

    /// Whether the client may receive a message published to `topic`.
    pub fn can_read(&self, topic: &str) -> bool {
        !self.denied(topic) && self.read.iter().any(|r| matches(r, topic))
    }

    /// Whether the client may subscribe to `filter` (a valid topic filter,
    /// possibly `$share/{group}/{filter}`).
    pub fn subscribe(&self, filter: &str) -> SubscribeAccess {
        let filter = split_share(filter).map_or(filter, |(_, f)| f);
        if self.deny_all
            || !self.read.iter().any(|r| covers(r, filter))
            || self.deny.iter().any(|d| covers(d, filter))
        {
            SubscribeAccess::Denied
        } else if self.deny.iter().any(|d| overlaps(d, filter)) {
            SubscribeAccess::GrantedFiltered
        } else {
            SubscribeAccess::Granted
        }
    }
}

fn is_wildcard(level: &str) -> bool {
    level == "+" || level == "#"
}

/// Whether every topic that `filter` matches is also matched by `rule`
/// (both valid plain filters).
///
/// Topic names are never empty, so a `#` right after a leading empty level
/// (`/#`) cannot match its parent: the topic would be the empty string.
fn covers(rule: &str, filter: &str) -> bool {
    let mut r = rule.split('/');
    let mut f = filter.split('/');
    let filter_starts_empty = filter.starts_with('/');
    let mut depth = 0;
    loop {
        let first = depth == 0;
        match (r.next(), f.next()) {
            (Some("#"), fl) => {
                // `#` matches everything from here, except `$` topics at the
                // first level.
                return !(first && fl.is_some_and(|l| l.starts_with('$')));
            }
            (Some(rl), Some("#")) => {
                // The filter's `#` matches zero or more levels, or one or more
                // where zero would leave an empty topic; `+/#` covers the latter.
                let at_least_one = first || (depth == 1 && filter_starts_empty);
                return at_least_one && rl == "+" && r.next() == Some("#");
            }
            (Some("+"), Some(fl)) => {
                if first && fl.starts_with('$') {
                    return false;
                }
            }
            (Some(rl), Some(fl)) => {
                if rl != fl {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
        depth += 1;
    }
}

/// Whether some topic is matched by both `a` and `b` (valid plain filters).
fn overlaps(a: &str, b: &str) -> bool {
    let mut a_levels = a.split('/');
    let mut b_levels = b.split('/');
    // Whether a common topic's first level must be empty.
    let starts_empty = a.starts_with('/') || b.starts_with('/');
    let mut depth = 0;
    loop {
        let first = depth == 0;
        match (a_levels.next(), b_levels.next()) {
            (Some("#"), other) | (other, Some("#")) => {
                return match other {
                    // The other filter's remaining levels can always be
                    // completed into a topic, unless it needs a `$` first
                    // level that the wildcard refuses.
                    Some(l) => !(first && !is_wildcard(l) && l.starts_with('$')),
                    // The other filter has ended: `#` matches the parent,
                    // unless that is the empty topic.
                    None => !(depth == 1 && starts_empty),
                };
            }
            (Some(x), Some(y)) => {
                let literal_vs_plus = match (x, y) {
                    ("+", l) | (l, "+") => Some(l),
                    _ => None,
                };
                match literal_vs_plus {
                    Some(l) => {
                        if first && l.starts_with('$') {
                            return false;
                        }
                    }
                    None => {
                        if x != y {
                            return false;
                        }
                    }
                }
            }
            (None, None) => return true,
            _ => return false,
        }
        depth += 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use quickcheck::{Arbitrary, Gen, QuickCheck};
    use std::sync::OnceLock;

    const FILE: &str = "\
# Anonymous clients: read-only weather and broker uptime.
topic read weather/#
topic read $SYS/broker/uptime

user alice
topic readwrite home/alice/#
topic deny home/alice/secrets/#
topic write logs/alice

user bob
topic home/bob/#
  # an indented comment
topic read  living room/temperature  

# Every client: its own device space, and an inbox for users.
pattern readwrite devices/%c/#
pattern deny devices/%c/firmware
pattern read inbox/%u/+
user alice
topic read news/#
";

    fn acl() -> Acl {
        Acl::parse(FILE).unwrap()
    }

    #[test]
    fn anonymous_clients() {
        let anon = acl().for_client("sensor1", None);
        assert!(anon.can_read("weather/paris"));
        assert!(!anon.can_publish("weather/paris"));
        assert!(anon.can_read("$SYS/broker/uptime"));
        assert!(!anon.can_read("$SYS/broker/load"));
        assert!(!anon.can_read("home/alice/lamp"));
        // Patterns apply to anonymous clients too, except those with %u.
        assert!(anon.can_publish("devices/sensor1/temp"));
        assert!(!anon.can_publish("devices/sensor2/temp"));
        assert!(!anon.can_publish("devices/sensor1/firmware"));
        assert!(!anon.can_read("inbox/sensor1/x"));
    }

    #[test]
    fn users() {
        let alice = acl().for_client("phone", Some("alice"));
        assert!(alice.can_publish("home/alice/lamp"));
        assert!(alice.can_read("home/alice"));
        assert!(!alice.can_read("home/alice/secrets/pin"));
        assert!(!alice.can_publish("home/alice/secrets"));
        assert!(alice.can_publish("logs/alice"));
        assert!(!alice.can_read("logs/alice"));
        // The second `user alice` section adds up.
        assert!(alice.can_read("news/today"));
        // Users do not get the anonymous rules.
        assert!(!alice.can_read("weather/paris"));
        assert!(alice.can_read("inbox/alice/1"));
        assert!(!alice.can_read("inbox/alice/1/2"));
        assert!(!alice.can_read("inbox/bob/1"));
        assert!(alice.can_publish("devices/phone/x"));

        let bob = acl().for_client("laptop", Some("bob"));
        assert!(bob.can_publish("home/bob/door"));
        assert!(bob.can_read("home/bob/door"));
        assert!(bob.can_read("living room/temperature"));
        assert!(!bob.can_publish("living room/temperature"));
        assert!(!bob.can_read("home/alice/lamp"));

        // A username with no section gets only the patterns.
        let carol = acl().for_client("c1", Some("carol"));
        assert!(!carol.can_read("weather/x"));
        assert!(carol.can_read("inbox/carol/x"));
        assert!(carol.can_read("devices/c1/x"));
    }

    #[test]
    fn subscribe_checks() {
        use SubscribeAccess::*;
        let alice = acl().for_client("phone", Some("alice"));
        assert_eq!(alice.subscribe("home/alice/lamp"), Granted);
        assert_eq!(alice.subscribe("home/alice/lamp/+"), Granted);
        // `home/alice/secrets/state` is matched by both.
        assert_eq!(alice.subscribe("home/alice/+/state"), GrantedFiltered);
        assert_eq!(alice.subscribe("home/alice/#"), GrantedFiltered);
        assert_eq!(alice.subscribe("home/alice/+"), GrantedFiltered);
        assert_eq!(alice.subscribe("home/alice/secrets/#"), Denied);
        assert_eq!(alice.subscribe("home/alice/secrets/pin"), Denied);
        assert_eq!(alice.subscribe("home/#"), Denied);
        assert_eq!(alice.subscribe("#"), Denied);
        assert_eq!(alice.subscribe("logs/alice"), Denied, "write-only");
        assert_eq!(alice.subscribe("inbox/alice/+"), Granted);
        assert_eq!(alice.subscribe("inbox/alice/#"), Denied);
        assert_eq!(alice.subscribe("devices/phone/#"), GrantedFiltered);
        assert_eq!(alice.subscribe("devices/phone/state"), Granted);
        assert_eq!(alice.subscribe("$share/g/home/alice/lamp"), Granted);
        assert_eq!(alice.subscribe("$share/g/home/alice/#"), GrantedFiltered);
        assert_eq!(alice.subscribe("$share/g/home/#"), Denied);

        let anon = acl().for_client("s", None);
        assert_eq!(anon.subscribe("weather/#"), Granted);
        assert_eq!(anon.subscribe("$SYS/broker/uptime"), Granted);
        assert_eq!(anon.subscribe("$SYS/#"), Denied);
    }

    #[test]
    fn dollar_topics_need_dollar_rules() {
        let acl = Acl::parse("topic #\ntopic read +/+\n").unwrap();
        let c = acl.for_client("c", None);
        assert!(c.can_publish("a/b"));
        assert!(!c.can_publish("$SYS/x"));
        assert!(!c.can_read("$SYS/x"));
        assert_eq!(c.subscribe("$SYS/#"), SubscribeAccess::Denied);
        assert_eq!(c.subscribe("#"), SubscribeAccess::Granted);
    }

    #[test]
    fn unsafe_pattern_values() {
        let acl = Acl::parse(
            "topic readwrite devices/#\n\
             pattern readwrite users/%c/#\n\
             pattern deny devices/%c/config\n",
        )
        .unwrap();
        let ok = acl.for_client("d1", None);
        assert!(ok.can_read("users/d1/x"));
        assert!(!ok.can_publish("devices/d1/config"));
        assert!(ok.can_publish("devices/d2/config"));
        for bad in ["d/1", "d+", "#"] {
            let c = acl.for_client(bad, None);
            // The grant pattern does not apply...
            assert!(!c.can_read("users/d/1/x"), "{bad}");
            assert!(!c.can_read("users/d+/x"), "{bad}");
            // ...and the deny pattern fails closed over `devices/#`.
            assert!(!c.can_publish("devices/d2/status"), "{bad}");
        }
        // A deny pattern with the placeholder in the first level denies all.
        // (A pattern without placeholders applies to every client.)
        let acl = Acl::parse("pattern #\npattern deny %u/private\n").unwrap();
        assert!(acl.for_client("c", Some("u")).can_read("x"));
        assert!(!acl.for_client("c", Some("u")).can_read("u/private"));
        let c = acl.for_client("c", Some("a/b"));
        assert!(!c.can_read("x"));
        assert_eq!(c.subscribe("x"), SubscribeAccess::Denied);
        // A %u deny pattern does not apply without a username (as in Mosquitto).
        assert!(acl.for_client("c", None).can_read("x"));
    }

    #[test]
    fn pattern_substitution() {
        let acl = Acl::parse("pattern %u-%c/%x/%%c/%\n").unwrap();
        let c = acl.for_client("id", Some("me"));
        assert!(c.can_publish("me-id/%x/%id/%"));
        assert!(!c.can_publish("me-id/x/id/"));
    }

    #[test]
    fn parse_quirks_follow_mosquitto() {
        // One word after `topic` is the filter, with readwrite access.
        let acl = Acl::parse("topic read\n").unwrap();
        let c = acl.for_client("c", None);
        assert!(c.can_read("read") && c.can_publish("read"));
        // CRLF line ends and surrounding blanks.
        let acl = Acl::parse("user  u v \r\ntopic   write   a b  \r\n").unwrap();
        assert!(acl.for_client("c", Some("u v")).can_publish("a b"));
        assert!(Acl::parse("").unwrap().for_client("c", None) == ClientAcl::default());
    }

    #[test]
    fn parse_errors_have_line_numbers() {
        let err = |text: &str| Acl::parse(text).unwrap_err();
        assert_eq!(
            err("# ok\ntopic read a\n\ntopic reed a/b\n"),
            AclError {
                line: 4,
                kind: AclErrorKind::UnknownAccess("reed".into())
            }
        );
        assert_eq!(
            err("user x\ntopic\n"),
            AclError {
                line: 2,
                kind: AclErrorKind::MissingFilter
            }
        );
        assert_eq!(err("topic   \n").kind, AclErrorKind::MissingFilter);
        assert_eq!(
            err("pattern write\tx y\n").kind,
            AclErrorKind::UnknownAccess("write\tx".into())
        );
        assert_eq!(err("user\n").kind, AclErrorKind::MissingUsername);
        assert_eq!(err("user   \n").kind, AclErrorKind::MissingUsername);
        assert_eq!(
            err("topic a\nusers x\n"),
            AclError {
                line: 2,
                kind: AclErrorKind::UnknownKeyword("users".into())
            }
        );
        assert_eq!(
            err("\n\ntopic read a/#/b\n"),
            AclError {
                line: 3,
                kind: AclErrorKind::InvalidFilter("a/#/b".into(), TopicError::MisplacedMultiLevel)
            }
        );
        assert_eq!(
            err("pattern deny a/%c+\n").kind,
            AclErrorKind::InvalidFilter("a/%c+".into(), TopicError::MisplacedSingleLevel)
        );
        let e = err("\ntopic reed a\n");
        assert_eq!(
            e.to_string(),
            "acl line 2: unknown access \"reed\" (expected read, write, readwrite or deny)"
        );
    }

    #[test]
    fn covers_and_overlaps_examples() {
        assert!(covers("#", "a/b"));
        assert!(covers("#", "#"));
        assert!(covers("+/#", "#"));
        assert!(!covers("+/+", "#"));
        assert!(!covers("#", "$SYS/x"));
        assert!(covers("$SYS/#", "$SYS/+"));
        assert!(covers("a/#", "a"));
        assert!(!covers("a/+/#", "a/#"));
        assert!(covers("a/+", "a/+"));
        assert!(covers("a/+", "a/b"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("+", "$x"));
        assert!(overlaps("a/#", "a"));
        assert!(overlaps("a/+", "+/b"));
        assert!(!overlaps("a/+", "a"));
        assert!(!overlaps("#", "$SYS/x"));
        assert!(!overlaps("+/x", "$SYS/+"));
        assert!(overlaps("$SYS/#", "$SYS"));
        assert!(overlaps("#", "+/$x"));
        assert!(!overlaps("a/b", "a/c"));
        // The empty string is not a topic name.
        assert!(!overlaps("+", "/#"));
        assert!(overlaps("+/+", "/#"));
        assert!(covers("/+/#", "/#"));
        assert!(!covers("/+", "/#"));
    }

    // ---- property tests against brute force ----------------------------

    const FILTER_LEVELS: &[&str] = &["a", "b", "$SYS", "", "+", "#"];
    /// The filter alphabet's literal levels plus a fresh one.
    const TOPIC_LEVELS: &[&str] = &["a", "b", "$SYS", "", "z"];
    const MAX_TOPIC_LEVELS: usize = 4;

    /// A valid filter of 1-4 levels.
    #[derive(Clone, Debug)]
    struct Filter(String);

    impl Arbitrary for Filter {
        fn arbitrary(g: &mut Gen) -> Self {
            let n = 1 + usize::arbitrary(g) % MAX_TOPIC_LEVELS;
            let levels: Vec<&str> = (0..n)
                .map(|i| match *g.choose(FILTER_LEVELS).unwrap() {
                    "#" if i + 1 < n => "+",
                    level => level,
                })
                .collect();
            let filter = levels.join("/");
            // A single empty level is the empty string: not a filter.
            Filter(if filter.is_empty() {
                "/".into()
            } else {
                filter
            })
        }
    }

    /// Every topic of 1..=MAX_TOPIC_LEVELS levels over TOPIC_LEVELS.
    fn all_topics() -> &'static [String] {
        static ALL: OnceLock<Vec<String>> = OnceLock::new();
        ALL.get_or_init(|| {
            let mut all: Vec<String> = TOPIC_LEVELS.iter().map(|l| l.to_string()).collect();
            let mut last = all.clone();
            for _ in 1..MAX_TOPIC_LEVELS {
                last = last
                    .iter()
                    .flat_map(|t| TOPIC_LEVELS.iter().map(move |l| format!("{t}/{l}")))
                    .collect();
                all.extend(last.iter().cloned());
            }
            // A single empty level is the empty string: not a topic name.
            all.retain(|t| !t.is_empty());
            all
        })
    }

    fn qc() -> QuickCheck {
        QuickCheck::new().tests(10_000)
    }

    #[test]
    fn covers_agrees_with_brute_force() {
        fn prop(r: Filter, f: Filter) -> bool {
            let witness = all_topics()
                .iter()
                .find(|t| matches(&f.0, t) && !matches(&r.0, t));
            // `covers` must never claim coverage with a counterexample; and
            // with filters this short, a missing coverage has a witness
            // topic of at most one level more than the longer filter.
            let short = r.0.split('/').count().max(f.0.split('/').count()) < MAX_TOPIC_LEVELS;
            match (covers(&r.0, &f.0), witness) {
                (true, Some(t)) => panic!("covers({r:?}, {f:?}) but {t:?}"),
                (false, None) if short => panic!("!covers({r:?}, {f:?}) without witness"),
                _ => true,
            }
        }
        qc().quickcheck(prop as fn(Filter, Filter) -> bool);
    }

    #[test]
    fn overlaps_agrees_with_brute_force() {
        fn prop(a: Filter, b: Filter) -> bool {
            let brute = all_topics()
                .iter()
                .any(|t| matches(&a.0, t) && matches(&b.0, t));
            assert_eq!(overlaps(&a.0, &b.0), brute, "overlaps({a:?}, {b:?})");
            assert_eq!(overlaps(&b.0, &a.0), brute, "overlaps({b:?}, {a:?})");
            true
        }
        qc().quickcheck(prop as fn(Filter, Filter) -> bool);
    }

    /// Every pair of valid filters of one or two levels, against brute force.
    #[test]
    fn covers_and_overlaps_exhaustive_for_short_filters() {
        let one: Vec<String> = FILTER_LEVELS.iter().map(|l| l.to_string()).collect();
        let two = one
            .iter()
            .filter(|l| *l != "#")
            .flat_map(|a| one.iter().map(move |b| format!("{a}/{b}")));
        let filters: Vec<String> = one
            .iter()
            .cloned()
            .chain(two)
            .filter(|f| !f.is_empty())
            .collect();
        let topics = all_topics();
        for a in &filters {
            for b in &filters {
                let a_matches = |t: &&String| matches(a, t);
                let both = topics.iter().filter(a_matches).any(|t| matches(b, t));
                assert_eq!(overlaps(a, b), both, "overlaps({a:?}, {b:?})");
                let covered = topics
                    .iter()
                    .filter(|t| matches(b, t))
                    .all(|t| matches(a, t));
                assert_eq!(covers(a, b), covered, "covers({a:?}, {b:?})");
            }
        }
    }
}
