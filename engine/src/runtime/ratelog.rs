//! Rate-limited log lines for bad input that can arrive once per
//! connection (TLS failures, bad PROXY headers, refused connections): a
//! flood of bad clients must not turn into a flood of log lines. Per shard
//! and per kind, at most one line a second; the next line says how many
//! were suppressed in between. The counters count every occurrence.

use std::cell::Cell;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Tls = 0,
    Proxy,
    Refused,
    Storage,
    Auth,
    BadInput,
    Limit,
}
const KINDS: usize = 7;
const EVERY: Duration = Duration::from_secs(1);

thread_local! {
    static LAST: [Cell<Option<Instant>>; KINDS] = const { [const { Cell::new(None) }; KINDS] };
    static SUPPRESSED: [Cell<u64>; KINDS] = const { [const { Cell::new(0) }; KINDS] };
}

/// Whether a line of this kind may be logged now; if so, how many were
/// suppressed since the last one.
pub fn allow(kind: Kind) -> Option<u64> {
    let i = kind as usize;
    let now = Instant::now();
    let ok = LAST.with(|l| {
        let ok = l[i].get().is_none_or(|t| now.duration_since(t) >= EVERY);
        if ok {
            l[i].set(Some(now));
        }
        ok
    });
    SUPPRESSED.with(|s| {
        if ok {
            Some(s[i].replace(0))
        } else {
            s[i].set(s[i].get() + 1);
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_second_then_the_count_of_suppressed() {
        assert_eq!(allow(Kind::Proxy), Some(0));
        assert_eq!(allow(Kind::Proxy), None);
        assert_eq!(allow(Kind::Proxy), None);
        // Kinds are independent.
        assert_eq!(allow(Kind::Tls), Some(0));
        std::thread::sleep(EVERY);
        assert_eq!(allow(Kind::Proxy), Some(2));
    }
}
