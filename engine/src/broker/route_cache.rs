//! Recently published topics and what they matched: the local
//! subscriptions (unmerged, sorted by session) and the other shards with a
//! matching route. A hit replaces two trie walks (the local index and the
//! replicated routing table) by one hash and one string compare.
//!
//! Direct-mapped (one entry per slot), so it never grows. A topic is cached
//! the second time it misses in its slot in a row (a workload of topics
//! seen once pays one hash, never an allocation). Any change to the index
//! or the routing table bumps the shard's generation, which invalidates
//! every entry at once.

use super::Match;
use std::hash::BuildHasher;

const SLOTS: usize = 1024;

pub struct Routed {
    /// Matching local subscriptions, sorted by session (not yet merged:
    /// "no local" depends on the publisher).
    pub local: Vec<Match>,
    /// Other shards with a matching route (bit per shard, shards < 128).
    pub remote: u128,
    /// Shards >= 128 with a matching route.
    pub wide: Vec<u16>,
}

enum Slot {
    Empty,
    /// Missed once with this hash.
    Seen(u64),
    Full {
        hash: u64,
        gen: u64,
        topic: Box<str>,
        routed: Routed,
    },
}

pub struct RouteCache {
    slots: Vec<Slot>,
    hasher: foldhash::fast::RandomState,
    pub hits: u64,
}

impl Default for RouteCache {
    fn default() -> Self {
        RouteCache {
            slots: (0..SLOTS).map(|_| Slot::Empty).collect(),
            hasher: foldhash::fast::RandomState::default(),
            hits: 0,
        }
    }
}

/// What a lookup found.
pub enum Lookup<'a> {
    Hit(&'a Routed),
    /// Not cached; `fill` with the computed routes if `admit`.
    Miss {
        hash: u64,
        admit: bool,
    },
}

impl RouteCache {
    pub fn lookup(&mut self, topic: &str, gen: u64) -> Lookup<'_> {
        let hash = self.hasher.hash_one(topic);
        let i = (hash as usize) % SLOTS;
        let (hit, admit) = match &self.slots[i] {
            Slot::Full {
                hash: h,
                gen: g,
                topic: t,
                ..
            } => {
                let same = *h == hash && **t == *topic;
                (same && *g == gen, same)
            }
            Slot::Seen(h) => (false, *h == hash),
            Slot::Empty => (false, false),
        };
        if hit {
            self.hits += 1;
            return match &self.slots[i] {
                Slot::Full { routed, .. } => Lookup::Hit(routed),
                _ => Lookup::Miss { hash, admit: false },
            };
        }
        if !admit {
            self.slots[i] = Slot::Seen(hash);
        }
        Lookup::Miss { hash, admit }
    }

    pub fn fill(&mut self, hash: u64, gen: u64, topic: &str, routed: Routed) {
        self.slots[(hash as usize) % SLOTS] = Slot::Full {
            hash,
            gen,
            topic: topic.into(),
            routed,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(remote: u128) -> Routed {
        Routed {
            local: Vec::new(),
            remote,
            wide: Vec::new(),
        }
    }

    #[test]
    fn admits_on_the_second_miss_and_invalidates_by_generation() {
        let mut c = RouteCache::default();
        let Lookup::Miss { admit: false, .. } = c.lookup("a/b", 1) else {
            panic!("first miss must not admit")
        };
        let Lookup::Miss { hash, admit: true } = c.lookup("a/b", 1) else {
            panic!("second miss admits")
        };
        c.fill(hash, 1, "a/b", routed(0b110));
        match c.lookup("a/b", 1) {
            Lookup::Hit(r) => assert_eq!(r.remote, 0b110),
            Lookup::Miss { .. } => panic!("cached"),
        }
        // A new generation (subscription change): a miss that refills.
        let Lookup::Miss { admit: true, .. } = c.lookup("a/b", 2) else {
            panic!("stale entry must miss and be refilled")
        };
        assert_eq!(c.hits, 1);
    }

    #[test]
    fn a_different_topic_never_hits_another_topics_entry() {
        let mut c = RouteCache::default();
        for t in ["x/1", "x/1"] {
            if let Lookup::Miss { hash, admit: true } = c.lookup(t, 7) {
                c.fill(hash, 7, t, routed(1));
            }
        }
        for i in 0..5000 {
            let t = format!("y/{i}");
            assert!(matches!(c.lookup(&t, 7), Lookup::Miss { .. }), "{t}");
        }
    }
}
