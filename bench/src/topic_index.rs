//! Inputs for the topic index suite: filter sets of realistic shape, topics
//! from the same space, the trie, and the naive matcher it replaces.
//!
//! The space is `site/{s}/device/{d}/{metric}` with 100 devices per site and
//! `n / 100` sites, so every set size sees about the same number of matches
//! per topic (about 15) and only the number of non-matching filters grows:
//! - 75 % `site/{s}/device/{d}/{temp|humidity|alarm}` (one device),
//! - 10 % `site/{s}/device/{d}/+` (every metric of a device),
//! - 10 % `site/{s}/+/+/temp` (one metric of a site),
//! - 5 % `site/{s}/#` (a whole site),
//! - plus `#`, `+/+/alarm`, `site/+/device/+/alarm` and `$SYS/#`.

use crate::Rng;
use tarta_proto::index::TopicIndex;
use tarta_proto::topic;

/// The index under test: key = subscriber, value = subscription data.
pub type Index = TopicIndex<usize, u32>;

const DEVICES_PER_SITE: u64 = 100;
const GLOBAL: [&str; 4] = ["#", "+/+/alarm", "site/+/device/+/alarm", "$SYS/#"];

fn sites(n: usize) -> u64 {
    (n as u64 / DEVICES_PER_SITE).max(1)
}

fn metric(rng: &mut Rng) -> &'static str {
    match rng.below(100) {
        0..60 => "temp",
        60..85 => "humidity",
        _ => "alarm",
    }
}

/// One filter of the set shape for a space of `n` filters.
fn filter(rng: &mut Rng, n: usize) -> String {
    let s = rng.below(sites(n));
    let d = rng.below(DEVICES_PER_SITE);
    match rng.below(100) {
        0..75 => format!("site/{s}/device/{d}/{}", metric(rng)),
        75..85 => format!("site/{s}/device/{d}/+"),
        85..95 => format!("site/{s}/+/+/temp"),
        _ => format!("site/{s}/#"),
    }
}

/// `n` filters (at least the four global ones); duplicates are kept, each
/// entry gets its own key.
pub fn filters(n: usize) -> Vec<String> {
    let mut rng = Rng::new(0x5EED_0001);
    let mut out: Vec<String> = GLOBAL.iter().take(n).map(|s| s.to_string()).collect();
    while out.len() < n {
        out.push(filter(&mut rng, n));
    }
    out
}

/// `count` topics from the space of a set of `n` filters.
pub fn topics(n: usize, count: usize) -> Vec<String> {
    let mut rng = Rng::new(0x5EED_0002);
    (0..count)
        .map(|_| {
            let s = rng.below(sites(n));
            let d = rng.below(DEVICES_PER_SITE);
            format!("site/{s}/device/{d}/{}", metric(&mut rng))
        })
        .collect()
}

/// `count` filters for subscribe/unsubscribe churn on a set of `n`.
pub fn churn_filters(n: usize, count: usize) -> Vec<String> {
    let mut rng = Rng::new(0x5EED_0003);
    (0..count).map(|_| filter(&mut rng, n)).collect()
}

/// The trie holding `filters`, entry i under key i.
pub fn build(filters: &[String]) -> Index {
    let mut index = Index::new();
    for (key, f) in filters.iter().enumerate() {
        index.insert(f, key, 0);
    }
    index
}

/// Matches `topic` against the trie; returns the number of entries matched.
pub fn count_matches(index: &Index, topic: &str) -> usize {
    let mut n = 0;
    index.for_each_match(topic, |_, _, _| n += 1);
    n
}

/// The baseline: `topic::matches` against every filter.
pub fn naive_count(filters: &[String], topic: &str) -> usize {
    filters.iter().filter(|f| topic::matches(f, topic)).count()
}

/// One subscribe and one unsubscribe of `filter` by a new key (`key` must
/// not be in the index): the index ends as it started.
pub fn churn(index: &mut Index, filter: &str, key: usize) {
    index.insert(filter, key, 1);
    index.remove(filter, &key);
}

/// Resident set size of this process, in bytes (Linux; `None` elsewhere).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
