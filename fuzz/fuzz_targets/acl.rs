//! `tarta_proto::acl::Acl::parse` on arbitrary text (the input as lossy
//! UTF-8), then `for_client` and the per-topic checks on clients, topics and
//! filters derived from the text itself.
//!
//! Derived from the text: its words (and their `/`-separated levels) are the
//! candidate topic filters; topic names are those filters with each `+` level
//! replaced by a word, `#` by one or two levels and `%c`/`%u` by the client's
//! id and username; the clients are an anonymous one, one per `user` line,
//! and one whose id and username contain `+`, `#` and `/`.
//!
//! Never panics, and for every client:
//! - a filter `subscribe` grants without a per-message check (`Granted`)
//!   lets through only readable topics: `can_read(t)` for every derived topic
//!   `t` it matches (also behind `$share/{group}/`);
//! - for a topic name `t` (no wildcards), `subscribe(t)` is never
//!   `GrantedFiltered`, and is `Granted` exactly when `can_read(t)`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tarta_proto::acl::{Acl, SubscribeAccess};
use tarta_proto::topic::{matches, TopicFilter, TopicName};
use tarta_proto::ByteStr;

const MAX_WORDS: usize = 12;
const MAX_CLIENTS: usize = 4;

fn is_name(s: &str) -> bool {
    !s.contains('\0') && TopicName::new(ByteStr::from(s)).is_ok()
}

fn is_filter(s: &str) -> bool {
    !s.contains('\0') && TopicFilter::new(ByteStr::from(s)).is_ok()
}

/// Topic names from a filter: wildcards and placeholders filled in.
fn instantiate(filter: &str, fill: &str, client: &str, user: Option<&str>) -> [String; 2] {
    let one = |deep: bool| {
        let levels: Vec<String> = filter
            .split('/')
            .map(|l| match l {
                "+" => fill.to_string(),
                "#" if deep => format!("{fill}/x"),
                "#" => fill.to_string(),
                l => l.replace("%c", client).replace("%u", user.unwrap_or("u")),
            })
            .collect();
        levels.join("/")
    };
    [one(false), one(true)]
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(acl) = Acl::parse(&text) else {
        return;
    };

    let words: Vec<&str> = text
        .split_whitespace()
        .filter(|w| {
            !matches!(
                *w,
                "topic" | "pattern" | "user" | "read" | "write" | "readwrite" | "deny"
            )
        })
        .take(MAX_WORDS)
        .collect();
    let fill = words
        .iter()
        .flat_map(|w| w.split('/'))
        .find(|l| !l.is_empty() && is_name(l))
        .unwrap_or("x");

    let mut clients: Vec<(String, Option<String>)> = vec![("c1".into(), None)];
    for line in text.lines() {
        if let Some(name) = line.trim().strip_prefix("user ") {
            if clients.len() < MAX_CLIENTS {
                clients.push((format!("{fill}-id"), Some(name.trim().to_string())));
            }
        }
    }
    clients.push(("a/+#".into(), Some("b/#+".into())));

    let mut filters: Vec<String> = words
        .iter()
        .filter(|w| is_filter(w))
        .map(|w| w.to_string())
        .collect();
    filters.push("#".into());

    for (id, user) in &clients {
        let user = user.as_deref();
        let c = acl.for_client(id, user);
        let mut topics: Vec<String> = filters
            .iter()
            .flat_map(|f| instantiate(f, fill, id, user))
            .filter(|t| is_name(t))
            .collect();
        topics.push(fill.to_string());
        for t in &topics {
            let read = c.can_read(t);
            let _ = c.can_publish(t);
            if !t.starts_with("$share/") {
                let sub = c.subscribe(t);
                assert_ne!(sub, SubscribeAccess::GrantedFiltered, "topic name {t:?}");
                assert_eq!(
                    sub == SubscribeAccess::Granted,
                    read,
                    "subscribe({t:?}) is {sub:?}, can_read is {read}"
                );
            }
        }
        for f in &filters {
            let plain = match f.strip_prefix("$share/").and_then(|r| r.split_once('/')) {
                Some((_, f)) => f,
                None => f.as_str(),
            };
            for sub_filter in [f.clone(), format!("$share/g/{plain}")] {
                if !is_filter(&sub_filter) {
                    continue;
                }
                if c.subscribe(&sub_filter) != SubscribeAccess::Granted {
                    continue;
                }
                for t in topics.iter().filter(|t| matches(plain, t)) {
                    assert!(
                        c.can_read(t),
                        "{sub_filter:?} granted but {t:?} is not readable"
                    );
                }
            }
        }
    }
});
