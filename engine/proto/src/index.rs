//! The topic trie: which (filter, key) entries match a published topic.
//!
//! [`TopicIndex`] maps `(filter, key) -> value`; e.g. key = session id and
//! value = subscription options, or key = shard number. It is the broker's
//! hot path, so [`TopicIndex::for_each_match`] does not allocate: it walks the
//! topic's levels with `split('/')`, looping down a single branch and
//! recursing only where a node has both a matching literal child and a `+`
//! child.
//!
//! Each node has literal children, a `+` child, the entries of filters ending
//! at the node (`a/b`) and the entries of filters ending with `#` below the
//! node (`a/b/#`). Every entry set keeps its filter string once, so a match
//! hands out `&str` without rebuilding it.
//!
//! Deep filters come from the network (a 65535-byte filter has up to 32768
//! levels), so nothing here recurses per level: insert and remove are loops,
//! dropping nodes uses an explicit stack, and matching recurses only at the
//! branch points described above.
//!
//! Filters are expected to be valid plain filters (the contents of a
//! [`crate::topic::TopicFilter`], with any `$share/{group}/` prefix already
//! removed). Other input gives some answer, never a panic: a `#` that is not
//! the last level is treated as a literal level, which no topic matches.

use std::collections::HashMap;

/// foldhash: several times cheaper than SipHash on this per-message path,
/// and seeded per map, so clients cannot choose colliding topic levels.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::hash::Hash;
use std::str::Split;

/// A map from `(topic filter, key)` to `V`, searchable by topic name.
pub struct TopicIndex<K, V> {
    root: Node<K, V>,
    len: usize,
}

struct Node<K, V> {
    literal: FastMap<Box<str>, Node<K, V>>,
    plus: Option<Box<Node<K, V>>>,
    /// Filters ending at this node.
    exact: Option<Entries<K, V>>,
    /// Filters ending with `#` right below this node (`#` itself at the root).
    multi: Option<Entries<K, V>>,
}

/// The keys subscribed with one filter, and that filter's text.
struct Entries<K, V> {
    filter: Box<str>,
    map: FastMap<K, V>,
}

#[derive(Clone, Copy)]
enum Slot {
    Exact,
    Multi,
}

/// The trie path of `filter` (its levels, without a trailing `#`) and the
/// slot where the filter ends. `None` is the empty path (the filter `#`).
fn path(filter: &str) -> (Option<&str>, Slot) {
    if filter == "#" {
        (None, Slot::Multi)
    } else if let Some(prefix) = filter.strip_suffix("/#") {
        (Some(prefix), Slot::Multi)
    } else {
        (Some(filter), Slot::Exact)
    }
}

fn levels(path: Option<&str>) -> impl Iterator<Item = &str> {
    path.into_iter().flat_map(|p| p.split('/'))
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node {
            literal: FastMap::default(),
            plus: None,
            exact: None,
            multi: None,
        }
    }
}

impl<K, V> Node<K, V> {
    fn child(&self, level: &str) -> Option<&Node<K, V>> {
        if level == "+" {
            self.plus.as_deref()
        } else {
            self.literal.get(level)
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<K, V>> {
        if level == "+" {
            self.plus.as_deref_mut()
        } else {
            self.literal.get_mut(level)
        }
    }

    fn slot(&self, slot: Slot) -> &Option<Entries<K, V>> {
        match slot {
            Slot::Exact => &self.exact,
            Slot::Multi => &self.multi,
        }
    }

    fn slot_mut(&mut self, slot: Slot) -> &mut Option<Entries<K, V>> {
        match slot {
            Slot::Exact => &mut self.exact,
            Slot::Multi => &mut self.multi,
        }
    }

    fn children(&self) -> usize {
        self.literal.len() + usize::from(self.plus.is_some())
    }

    fn has_entries(&self) -> bool {
        self.exact.is_some() || self.multi.is_some()
    }
}

impl<K, V> Drop for Node<K, V> {
    /// Drops the subtree with an explicit stack: the default recursive drop
    /// could overflow the stack on a filter with tens of thousands of levels.
    fn drop(&mut self) {
        if self.literal.is_empty() && self.plus.is_none() {
            return;
        }
        let mut stack: Vec<Node<K, V>> = Vec::new();
        stack.extend(self.literal.drain().map(|(_, n)| n));
        stack.extend(self.plus.take().map(|n| *n));
        while let Some(mut node) = stack.pop() {
            stack.extend(node.literal.drain().map(|(_, n)| n));
            stack.extend(node.plus.take().map(|n| *n));
            // `node` is now childless: its own `drop` returns at once.
        }
    }
}

impl<K: Eq + Hash + Clone, V> Default for TopicIndex<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Eq + Hash + Clone, V> TopicIndex<K, V> {
    pub fn new() -> Self {
        TopicIndex {
            root: Node::default(),
            len: 0,
        }
    }

    /// Number of `(filter, key)` entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the value of `(filter, key)`, returning the previous one.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let (path, slot) = path(filter);
        let mut node = &mut self.root;
        for level in levels(path) {
            node = if level == "+" {
                node.plus.get_or_insert_with(Box::default)
            } else {
                if !node.literal.contains_key(level) {
                    node.literal.insert(level.into(), Node::default());
                }
                // Always `Some`: the child was inserted just above.
                node.literal.get_mut(level)?
            };
        }
        let entries = node.slot_mut(slot).get_or_insert_with(|| Entries {
            filter: filter.into(),
            map: FastMap::default(),
        });
        let old = entries.map.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `(filter, key)`, returning its value. Nodes left without
    /// entries or children are freed, so subscribe/unsubscribe churn does not
    /// grow the trie.
    pub fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        let (path, slot) = path(filter);
        let node = self.node_mut(path)?;
        let entries = node.slot_mut(slot).as_mut()?;
        let value = entries.map.remove(key)?;
        if entries.map.is_empty() {
            *node.slot_mut(slot) = None;
        }
        let emptied = !node.has_entries() && node.children() == 0;
        self.len -= 1;
        if emptied {
            self.prune(path);
        }
        Some(value)
    }

    /// Frees the chain of nodes that ends at the (now empty, childless) node
    /// at `path`: cuts the edge below the deepest ancestor that must stay
    /// (the root, or a node with entries or with another child).
    fn prune(&mut self, path: Option<&str>) {
        let mut keep_depth = 0;
        let mut node = &self.root;
        for (depth, level) in levels(path).enumerate() {
            if depth > 0 && (node.has_entries() || node.children() > 1) {
                keep_depth = depth;
            }
            match node.child(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        let mut node = &mut self.root;
        let mut steps = levels(path);
        for _ in 0..keep_depth {
            match steps.next().and_then(|level| node.child_mut(level)) {
                Some(child) => node = child,
                None => return,
            }
        }
        match steps.next() {
            Some("+") => node.plus = None,
            Some(level) => {
                node.literal.remove(level);
            }
            None => {}
        }
    }

    fn node(&self, path: Option<&str>) -> Option<&Node<K, V>> {
        let mut node = &self.root;
        for level in levels(path) {
            node = node.child(level)?;
        }
        Some(node)
    }

    fn node_mut(&mut self, path: Option<&str>) -> Option<&mut Node<K, V>> {
        let mut node = &mut self.root;
        for level in levels(path) {
            node = node.child_mut(level)?;
        }
        Some(node)
    }

    fn entries(&self, filter: &str) -> Option<&Entries<K, V>> {
        let (path, slot) = path(filter);
        self.node(path)?.slot(slot).as_ref()
    }

    pub fn get(&self, filter: &str, key: &K) -> Option<&V> {
        self.entries(filter)?.map.get(key)
    }

    pub fn get_mut(&mut self, filter: &str, key: &K) -> Option<&mut V> {
        let (path, slot) = path(filter);
        self.node_mut(path)?
            .slot_mut(slot)
            .as_mut()?
            .map
            .get_mut(key)
    }

    /// Whether any key is stored on exactly this filter.
    pub fn contains_filter(&self, filter: &str) -> bool {
        self.entries(filter).is_some()
    }

    /// How many keys are stored on exactly this filter.
    pub fn keys_on(&self, filter: &str) -> usize {
        self.entries(filter).map_or(0, |e| e.map.len())
    }

    /// Calls `f(filter, key, value)` once for every entry whose filter matches
    /// `topic`, with the rules of [`crate::topic::matches`] (including: a
    /// topic starting with `$` is not matched by a first-level `+` or `#`).
    /// Does not allocate.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&str, &K, &V)) {
        walk(&self.root, topic.split('/'), topic.starts_with('$'), &mut f);
    }

    /// Number of trie nodes besides the root; zero once every entry is removed.
    pub fn node_count(&self) -> usize {
        let mut count = 0;
        let mut stack = vec![&self.root];
        while let Some(node) = stack.pop() {
            count += node.children();
            stack.extend(node.literal.values());
            stack.extend(node.plus.as_deref());
        }
        count
    }
}

fn emit<K, V>(entries: &Option<Entries<K, V>>, f: &mut impl FnMut(&str, &K, &V)) {
    if let Some(e) = entries {
        for (k, v) in &e.map {
            f(&e.filter, k, v);
        }
    }
}

/// Reports the entries below `node` that match the rest of the topic,
/// `levels`. `no_wildcards` is set at the root for a `$` topic.
fn walk<K, V, F: FnMut(&str, &K, &V)>(
    mut node: &Node<K, V>,
    mut levels: Split<'_, char>,
    mut no_wildcards: bool,
    f: &mut F,
) {
    loop {
        let Some(level) = levels.next() else {
            // The topic ends here: filters ending here match, and so do
            // `…/#` filters (their `#` matches the parent level).
            emit(&node.exact, f);
            emit(&node.multi, f);
            return;
        };
        let (literal, plus) = if no_wildcards {
            (node.literal.get(level), None)
        } else {
            emit(&node.multi, f);
            (node.literal.get(level), node.plus.as_deref())
        };
        no_wildcards = false;
        node = match (literal, plus) {
            (Some(literal), Some(plus)) => {
                walk(plus, levels.clone(), false, f);
                literal
            }
            (Some(next), None) | (None, Some(next)) => next,
            (None, None) => return,
        };
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::topic::matches;
    use quickcheck::{Arbitrary, Gen, QuickCheck};
    use std::collections::{BTreeSet, HashMap};

    fn matched<K: Eq + Hash + Clone + Ord, V>(
        index: &TopicIndex<K, V>,
        topic: &str,
    ) -> BTreeSet<(String, K)> {
        let mut out = BTreeSet::new();
        let mut calls = 0;
        index.for_each_match(topic, |filter, key, _| {
            calls += 1;
            out.insert((filter.to_owned(), key.clone()));
        });
        assert_eq!(calls, out.len(), "an entry was reported twice");
        out
    }

    fn index_of(filters: &[&str]) -> TopicIndex<u32, ()> {
        let mut index = TopicIndex::new();
        for f in filters {
            index.insert(f, 0, ());
        }
        index
    }

    fn filters_matching(index: &TopicIndex<u32, ()>, topic: &str) -> Vec<String> {
        matched(index, topic).into_iter().map(|(f, _)| f).collect()
    }

    #[test]
    fn dollar_topics() {
        let index = index_of(&["#", "+/x", "+/#", "$SYS/#", "$SYS/+", "+"]);
        assert_eq!(filters_matching(&index, "$SYS/x"), ["$SYS/#", "$SYS/+"]);
        assert_eq!(filters_matching(&index, "$SYS"), ["$SYS/#"]);
        assert_eq!(filters_matching(&index, "a/x"), ["#", "+/#", "+/x"]);
        assert_eq!(filters_matching(&index, "a"), ["#", "+", "+/#"]);
    }

    #[test]
    fn parent_and_empty_levels() {
        let index = index_of(&["a/#", "a/+/b", "a/+", "+/+/+", "/#"]);
        assert_eq!(filters_matching(&index, "a"), ["a/#"]);
        assert_eq!(filters_matching(&index, "a//b"), ["+/+/+", "a/#", "a/+/b"]);
        assert_eq!(filters_matching(&index, "a/"), ["a/#", "a/+"]);
        assert_eq!(filters_matching(&index, "/"), ["/#"]);
        assert_eq!(filters_matching(&index, "b"), Vec::<String>::new());
    }

    #[test]
    fn spec_examples() {
        let index = index_of(&[
            "sport/tennis/player1/#",
            "sport/#",
            "sport/tennis/+",
            "sport/+",
            "+/+",
            "/+",
            "+",
        ]);
        assert_eq!(
            filters_matching(&index, "sport/tennis/player1"),
            ["sport/#", "sport/tennis/+", "sport/tennis/player1/#"]
        );
        assert_eq!(
            filters_matching(&index, "sport/tennis/player1/score/wimbledon"),
            ["sport/#", "sport/tennis/player1/#"]
        );
        assert_eq!(filters_matching(&index, "sport"), ["+", "sport/#"]);
        assert_eq!(
            filters_matching(&index, "sport/"),
            ["+/+", "sport/#", "sport/+"]
        );
        assert_eq!(filters_matching(&index, "/finance"), ["+/+", "/+"]);
    }

    #[test]
    fn map_api() {
        let mut index: TopicIndex<&str, u8> = TopicIndex::default();
        assert!(index.is_empty());
        assert_eq!(index.insert("a/+", "s1", 0), None);
        assert_eq!(index.insert("a/+", "s1", 1), Some(0));
        assert_eq!(index.insert("a/+", "s2", 2), None);
        assert_eq!(index.insert("a/#", "s1", 3), None);
        assert_eq!(index.len(), 3);
        assert_eq!(index.keys_on("a/+"), 2);
        assert_eq!(index.keys_on("a"), 0);
        assert!(index.contains_filter("a/#"));
        assert!(!index.contains_filter("a"));
        assert_eq!(index.get("a/+", &"s1"), Some(&1));
        if let Some(v) = index.get_mut("a/+", &"s1") {
            *v = 9;
        }
        assert_eq!(index.get("a/+", &"s1"), Some(&9));
        assert_eq!(index.get("a/#", &"s2"), None);
        assert_eq!(index.remove("a/#", &"s2"), None);
        assert_eq!(index.remove("a/b", &"s1"), None);
        assert_eq!(index.remove("a/+", &"s1"), Some(9));
        assert_eq!(index.remove("a/+", &"s1"), None);
        assert!(index.contains_filter("a/+"));
        assert_eq!(index.remove("a/+", &"s2"), Some(2));
        assert!(!index.contains_filter("a/+"));
        assert_eq!(index.node_count(), 1, "`a` still holds `a/#`");
        assert_eq!(index.remove("a/#", &"s1"), Some(3));
        assert_eq!(index.node_count(), 0);
        assert!(index.is_empty());
    }

    #[test]
    fn pruning_keeps_shared_prefixes() {
        let mut index = index_of(&["a/b/c/d", "a/b", "a/x/y"]);
        assert_eq!(index.node_count(), 6);
        index.remove("a/b/c/d", &0);
        assert_eq!(index.node_count(), 4); // a, a/b, a/x, a/x/y
        index.remove("a/x/y", &0);
        assert_eq!(index.node_count(), 2);
        assert_eq!(filters_matching(&index, "a/b"), ["a/b"]);
        index.remove("a/b", &0);
        assert_eq!(index.node_count(), 0);
    }

    #[test]
    fn odd_input_does_not_panic() {
        let mut index = index_of(&["a/#/b", "", "#/#", "a//"]);
        for topic in ["", "a", "a/#/b", "a//", "#"] {
            let _ = filters_matching(&index, topic);
        }
        for f in ["a/#/b", "", "#/#", "a//", "nope"] {
            index.remove(f, &0);
        }
        assert!(index.is_empty());
        assert_eq!(index.node_count(), 0);
    }

    /// A 32768-level filter and topic, on a thread with a small stack: no
    /// per-level recursion in insert, match, remove or drop.
    #[test]
    fn deep_filters_do_not_overflow_the_stack() {
        let run = || {
            let deep_literal = vec!["a"; 32_768].join("/");
            let deep_plus = vec!["+"; 32_768].join("/");
            let mut index = TopicIndex::new();
            index.insert(&deep_literal, 1u8, ());
            index.insert(&deep_plus, 2u8, ());
            index.insert(&format!("{deep_literal}/#"), 3u8, ());
            let mut n = 0;
            index.for_each_match(&deep_literal, |_, _, _| n += 1);
            assert_eq!(n, 3);
            assert_eq!(index.remove(&deep_plus, &2), Some(()));
            let spare = index_of(&[deep_plus.as_str()]);
            drop(spare);
            drop(index);
        };
        let handle = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(run)
            .unwrap();
        handle.join().unwrap();
    }

    // ---- property tests -------------------------------------------------

    const FILTER_LEVELS: &[&str] = &["a", "b", "$SYS", "", "+", "#"];
    const TOPIC_LEVELS: &[&str] = &["a", "b", "$SYS", "", "c"];

    /// A valid filter of 1-5 levels over a small alphabet.
    #[derive(Clone, Debug)]
    struct Filter(String);

    impl Arbitrary for Filter {
        fn arbitrary(g: &mut Gen) -> Self {
            Filter(crate::testgen::filter(g, FILTER_LEVELS, 5))
        }
    }

    /// A topic name of 1-6 levels over a small alphabet.
    #[derive(Clone, Debug)]
    struct Topic(String);

    impl Arbitrary for Topic {
        fn arbitrary(g: &mut Gen) -> Self {
            let n = 1 + usize::arbitrary(g) % 6;
            let levels: Vec<&str> = (0..n).map(|_| *g.choose(TOPIC_LEVELS).unwrap()).collect();
            let topic = levels.join("/");
            Topic(if topic.is_empty() { "/".into() } else { topic })
        }
    }

    fn qc() -> QuickCheck {
        QuickCheck::new().tests(2_000).rng(Gen::new(30))
    }

    #[test]
    fn matches_agree_with_brute_force() {
        fn prop(entries: Vec<(Filter, u8)>, topics: Vec<Topic>) -> bool {
            for (f, _) in &entries {
                assert!(crate::topic::check_filter(&f.0).is_ok(), "{f:?}");
            }
            let mut index = TopicIndex::new();
            for (f, k) in &entries {
                index.insert(&f.0, k % 4, ());
            }
            topics.iter().all(|t| {
                let expected: BTreeSet<(String, u8)> = entries
                    .iter()
                    .filter(|(f, _)| matches(&f.0, &t.0))
                    .map(|(f, k)| (f.0.clone(), k % 4))
                    .collect();
                matched(&index, &t.0) == expected
            })
        }
        qc().quickcheck(prop as fn(Vec<(Filter, u8)>, Vec<Topic>) -> bool);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(Filter, u8, u32),
        Remove(Filter, u8),
    }

    impl Arbitrary for Op {
        fn arbitrary(g: &mut Gen) -> Self {
            let filter = Filter::arbitrary(g);
            let key = u8::arbitrary(g) % 3;
            if bool::arbitrary(g) {
                Op::Insert(filter, key, u32::arbitrary(g))
            } else {
                Op::Remove(filter, key)
            }
        }
    }

    #[test]
    fn agrees_with_a_hashmap_model_and_frees_all_nodes() {
        fn prop(ops: Vec<Op>) -> bool {
            let mut index = TopicIndex::new();
            let mut model: HashMap<(String, u8), u32> = HashMap::new();
            for op in &ops {
                match op {
                    Op::Insert(f, k, v) => {
                        let got = index.insert(&f.0, *k, *v);
                        assert_eq!(got, model.insert((f.0.clone(), *k), *v));
                    }
                    Op::Remove(f, k) => {
                        assert_eq!(index.remove(&f.0, k), model.remove(&(f.0.clone(), *k)));
                    }
                }
                assert_eq!(index.len(), model.len());
            }
            for ((f, k), v) in &model {
                assert_eq!(index.get(f, k), Some(v));
                assert!(index.contains_filter(f));
                let keys = model.keys().filter(|(g, _)| g == f).count();
                assert_eq!(index.keys_on(f), keys);
            }
            for (f, k) in model.keys() {
                assert!(index.remove(f, k).is_some());
            }
            index.is_empty() && index.node_count() == 0
        }
        qc().quickcheck(prop as fn(Vec<Op>) -> bool);
    }

    #[test]
    fn insert_then_remove_everything_frees_all_nodes() {
        fn prop(entries: Vec<(Filter, u8)>) -> bool {
            let mut index = TopicIndex::new();
            for (f, k) in &entries {
                index.insert(&f.0, *k, ());
            }
            // Remove in a different order from insertion.
            for (f, k) in entries.iter().rev() {
                index.remove(&f.0, k);
            }
            index.is_empty() && index.node_count() == 0
        }
        qc().quickcheck(prop as fn(Vec<(Filter, u8)>) -> bool);
    }
}
