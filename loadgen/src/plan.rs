//! Scenario planning without I/O: which client does what (idle, publisher,
//! subscriber), on which topic, in which process and thread, and how many
//! deliveries the run should produce.
//!
//! Clients are numbered globally: subscribers first (`0..S`), then
//! publishers (`S..S+P`). Nothing is stored per client: every fact is
//! computed from the global index, so planning a million clients costs no
//! memory.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Scenario {
    Conn { connections: u32 },
    Pairs { pairs: u32 },
    Fanout { publishers: u32, subscribers: u32 },
    Fanin { publishers: u32, subscribers: u32 },
    Shared { publishers: u32, subscribers: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Connects and holds the connection (keep-alive only).
    Idle,
    /// Subscriber number `id` (0-based among subscribers).
    Sub { id: u32 },
    /// Publisher number `id` (0-based among publishers).
    Pub { id: u32 },
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Conn { .. } => "conn",
            Scenario::Pairs { .. } => "pairs",
            Scenario::Fanout { .. } => "fanout",
            Scenario::Fanin { .. } => "fanin",
            Scenario::Shared { .. } => "shared",
        }
    }

    /// (publishers, subscribers)
    pub fn counts(&self) -> (u32, u32) {
        match *self {
            Scenario::Conn { .. } => (0, 0),
            Scenario::Pairs { pairs } => (pairs, pairs),
            Scenario::Fanout {
                publishers,
                subscribers,
            }
            | Scenario::Fanin {
                publishers,
                subscribers,
            }
            | Scenario::Shared {
                publishers,
                subscribers,
            } => (publishers, subscribers),
        }
    }

    pub fn total_clients(&self) -> u64 {
        match *self {
            Scenario::Conn { connections } => u64::from(connections),
            _ => {
                let (p, s) = self.counts();
                u64::from(p) + u64::from(s)
            }
        }
    }

    pub fn role(&self, k: u64) -> Role {
        if let Scenario::Conn { .. } = self {
            return Role::Idle;
        }
        let (_, s) = self.counts();
        if k < u64::from(s) {
            Role::Sub { id: k as u32 }
        } else {
            Role::Pub {
                id: (k - u64::from(s)) as u32,
            }
        }
    }

    /// The process that runs client `k`. Subscribers of a `$share` group
    /// all live in process 0, so that one process sees every delivery of the
    /// group and can tell duplicates from messages delivered elsewhere.
    pub fn proc_of(&self, k: u64, procs: usize) -> usize {
        if let (Scenario::Shared { .. }, Role::Sub { .. }) = (self, self.role(k)) {
            return 0;
        }
        (k % procs as u64) as usize
    }

    /// The global indices of the clients that process `proc` runs on its
    /// thread `thread` of `threads`.
    pub fn clients_of(&self, proc: usize, procs: usize, thread: usize, threads: usize) -> Vec<u64> {
        let mut n = 0usize;
        let mut out = Vec::new();
        for k in 0..self.total_clients() {
            if self.proc_of(k, procs) == proc {
                if n % threads == thread {
                    out.push(k);
                }
                n += 1;
            }
        }
        out
    }

    /// The topic publisher `id` publishes to.
    pub fn pub_topic(&self, prefix: &str, id: u32) -> String {
        match self {
            Scenario::Fanout { .. } => format!("{prefix}/all"),
            Scenario::Fanin { .. } => format!("{prefix}/in/{id}"),
            Scenario::Shared { .. } => format!("{prefix}/sh/{id}"),
            _ => format!("{prefix}/p/{id}"),
        }
    }

    /// The filter subscriber `id` subscribes to.
    pub fn sub_filter(&self, prefix: &str, run: u32, id: u32) -> String {
        match self {
            Scenario::Fanout { .. } => format!("{prefix}/all"),
            Scenario::Fanin { .. } => format!("{prefix}/in/+"),
            Scenario::Shared { .. } => format!("$share/lg{run:08x}/{prefix}/sh/+"),
            _ => format!("{prefix}/p/{id}"),
        }
    }

    /// The publishers subscriber `id` hears from, as a range of publisher
    /// ids (a `$share` group's range is tracked once for the whole group).
    pub fn sources_of(&self, id: u32) -> std::ops::Range<u32> {
        match *self {
            Scenario::Pairs { .. } => id..id + 1,
            _ => 0..self.counts().0,
        }
    }

    /// Deliveries the run should produce, given what every publisher sent
    /// and which subscribers got their subscription acknowledged.
    pub fn expected(&self, sent_by_pub: &HashMap<u32, u64>, live_subs: &[u32]) -> u64 {
        let total: u64 = sent_by_pub.values().sum();
        match self {
            Scenario::Conn { .. } => 0,
            Scenario::Pairs { .. } => live_subs
                .iter()
                .map(|s| sent_by_pub.get(s).copied().unwrap_or(0))
                .sum(),
            Scenario::Fanout { .. } | Scenario::Fanin { .. } => total * live_subs.len() as u64,
            Scenario::Shared { .. } => {
                if live_subs.is_empty() {
                    0
                } else {
                    total
                }
            }
        }
    }
}

/// A client id unique per run and client: `lg` + run id + `-` + index
/// (at most 23 characters below 10^12 clients, as MQTT 3.1.1 asks).
pub fn client_id(run: u32, k: u64) -> String {
    format!("lg{run:08x}-{k}")
}

pub fn topic_prefix(prefix: &str, run: u32) -> String {
    format!("{prefix}/{run:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::quickcheck;

    #[test]
    fn roles_and_topics() {
        let s = Scenario::Pairs { pairs: 3 };
        assert_eq!(s.total_clients(), 6);
        assert_eq!(s.role(2), Role::Sub { id: 2 });
        assert_eq!(s.role(3), Role::Pub { id: 0 });
        assert_eq!(s.pub_topic("x", 2), s.sub_filter("x", 1, 2));
        let f = Scenario::Shared {
            publishers: 2,
            subscribers: 4,
        };
        assert!(f.sub_filter("x/1", 7, 0).starts_with("$share/lg00000007/"));
        assert!(client_id(u32::MAX, 999_999_999_999).len() <= 23);
    }

    quickcheck! {
        /// Every client is run by exactly one (process, thread).
        fn partition(n: u16, procs: u8, threads: u8, kind: u8) -> bool {
            let procs = usize::from(procs % 4) + 1;
            let threads = usize::from(threads % 3) + 1;
            let n = u32::from(n % 300);
            let s = match kind % 3 {
                0 => Scenario::Conn { connections: n },
                1 => Scenario::Pairs { pairs: n },
                _ => Scenario::Shared { publishers: n / 2, subscribers: n - n / 2 },
            };
            let mut all = Vec::new();
            for p in 0..procs {
                for t in 0..threads {
                    all.extend(s.clients_of(p, procs, t, threads));
                }
            }
            all.sort_unstable();
            all == (0..s.total_clients()).collect::<Vec<_>>()
        }
    }

    #[test]
    fn expected_counts() {
        let sent: HashMap<u32, u64> = [(0, 10), (1, 20)].into_iter().collect();
        assert_eq!(Scenario::Pairs { pairs: 2 }.expected(&sent, &[1]), 20);
        let f = Scenario::Fanout {
            publishers: 2,
            subscribers: 3,
        };
        assert_eq!(f.expected(&sent, &[0, 1, 2]), 90);
        let s = Scenario::Shared {
            publishers: 2,
            subscribers: 3,
        };
        assert_eq!(s.expected(&sent, &[]), 0);
        assert_eq!(s.expected(&sent, &[2]), 30);
    }
}
