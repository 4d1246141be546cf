//! The retained-message index: a trie of topic *names*, searched with topic
//! *filters*.
//!
//! [`RetainTree`] maps a topic name to a value (in the broker, the retained
//! message, which carries its own topic, so the tree does not keep whole
//! topics). [`RetainTree::for_each_match`] answers a SUBSCRIBE's filter by
//! walking only the branches the filter can reach: a literal level is one
//! lookup, `+` visits the children of the nodes it reaches, `#` the subtrees it
//! covers. Its cost follows what it visits, not the number of stored topics.
//!
//! The trie is path-compressed on level boundaries: an edge holds one or more
//! whole levels (`"12/temp"`), and a node exists only where a topic ends or
//! where topics branch, so a topic costs about one edge (its own tail, one
//! `Box<str>`) however many levels it has. Invariants: siblings have distinct
//! first levels; a node other than the root has a value or at least two
//! children (removal merges and frees nodes, so memory follows live topics);
//! the root never has a value (a topic has at least one level).
//!
//! A node's children are a boxed slice sorted by first level while there are
//! at most [`WIDE`] of them (exact size, binary search), then a vector grown
//! by eighths with a hash index of positions (4 bytes a slot; foldhash,
//! seeded per index, since publishers choose the levels), back to a slice at
//! [`NARROW`]. An edge is 32 bytes with an `Arc` value; 1M topics
//! `sensors/{i/1000}/{i%1000}/temp` take 54 bytes each, 44 in groups of 10,
//! against 72 for a `HashMap<Box<str>, Arc<_>>` (`bench/benches/retained.rs`).
//!
//! Topic names come from the network (a 65535-byte name has up to 32768
//! levels), so nothing here recurses per level: insert and remove are loops,
//! matching, iteration and drop use explicit stacks.
//!
//! Topics are expected to be valid topic names and filters valid plain filters
//! (a [`crate::topic::TopicFilter`] without any `$share/{group}/` prefix).
//! Other input gives the answer of [`crate::topic::matches`] (e.g. a `#` that
//! is not the last level matches everything below it), never a panic.

use hashbrown::HashTable;
use std::hash::BuildHasher;
use std::mem;

/// Most children kept in a sorted slice; one more adds a hash index.
const WIDE: usize = 16;
/// Children with a hash index that shrink to this many lose it again.
const NARROW: usize = 8;

/// Values by topic name, searchable by topic filter.
pub struct RetainTree<V> {
    root: Node<V>,
    len: usize,
}

struct Node<V> {
    /// `None` for a leaf: a leaf costs one pointer, not an empty collection.
    children: Option<Box<Children<V>>>,
    value: Option<V>,
}

/// An edge and the node it leads to. `label` is one or more whole levels
/// joined by `/` (`""` is one empty level).
struct Edge<V> {
    label: Box<str>,
    node: Node<V>,
}

enum Children<V> {
    /// Sorted by first level, at most [`WIDE`], no spare capacity.
    Few(Box<[Edge<V>]>),
    Many(Box<Wide<V>>),
}

/// Many children: the edges in a dense vector, found through a hash table
/// of their positions, keyed by first level. Four bytes per table slot
/// rather than a whole edge: a table is between 44 % and 87 % full.
struct Wide<V> {
    edges: Vec<Edge<V>>,
    index: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

/// Where the first level of `levels` ends. A plain loop: levels are short,
/// shorter than what makes `memchr` pay off.
fn level_end(levels: &str) -> Option<usize> {
    levels.bytes().position(|b| b == b'/')
}

/// The first level of `levels` (all of it if it has a single level).
fn first_level(levels: &str) -> &str {
    match level_end(levels) {
        Some(end) => &levels[..end],
        None => levels,
    }
}

/// `levels` as its first level and the levels after it, if any.
fn split_first(levels: &str) -> (&str, Option<&str>) {
    match level_end(levels) {
        Some(end) => (&levels[..end], Some(&levels[end + 1..])),
        None => (levels, None),
    }
}

/// What is left of `rest` below `label`: `Some(None)` if `rest` is exactly
/// `label`, `Some(Some(tail))` if it continues below it, `None` if `label`
/// is not a prefix of whole levels of `rest`.
fn strip_label<'t>(rest: &'t str, label: &str) -> Option<Option<&'t str>> {
    let tail = rest.strip_prefix(label)?;
    if tail.is_empty() {
        Some(None)
    } else {
        tail.strip_prefix('/').map(Some)
    }
}

/// Byte length of the longest common prefix of whole levels of `a` and `b`,
/// whose first levels must be equal.
fn common_levels(a: &str, b: &str) -> usize {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    let n = x.iter().zip(y).take_while(|(p, q)| p == q).count();
    let ends_level = |s: &[u8]| s.len() == n || s[n] == b'/';
    if ends_level(x) && ends_level(y) {
        n
    } else {
        // The last `/` of the common bytes ends a level in both.
        x[..n].iter().rposition(|&c| c == b'/').unwrap_or(0)
    }
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: None,
            value: None,
        }
    }
}

impl<V> Node<V> {
    fn children(&self) -> &[Edge<V>] {
        match self.children.as_deref() {
            None => &[],
            Some(Children::Few(edges)) => edges,
            Some(Children::Many(wide)) => &wide.edges,
        }
    }

    fn children_mut(&mut self) -> &mut [Edge<V>] {
        match self.children.as_deref_mut() {
            None => &mut [],
            Some(Children::Few(edges)) => edges,
            Some(Children::Many(wide)) => &mut wide.edges,
        }
    }

    /// The position in [`Node::children`] of the child whose first level is
    /// `level`.
    fn find(&self, level: &str) -> Option<usize> {
        match self.children.as_deref()? {
            Children::Few(edges) => edges
                .binary_search_by(|e| first_level(&e.label).cmp(level))
                .ok(),
            Children::Many(wide) => wide.find(level),
        }
    }

    fn child(&self, level: &str) -> Option<&Edge<V>> {
        self.children().get(self.find(level)?)
    }

    /// Adds `edge`, whose first level no child has.
    fn add_child(&mut self, edge: Edge<V>) {
        let Some(children) = self.children.as_deref_mut() else {
            self.children = Some(Box::new(Children::Few(Box::new([edge]))));
            return;
        };
        match children {
            Children::Few(edges) => {
                let level = first_level(&edge.label);
                let (Ok(i) | Err(i)) = edges.binary_search_by(|e| first_level(&e.label).cmp(level));
                let mut v = Vec::from(mem::take(edges));
                if v.len() < WIDE {
                    v.reserve_exact(1);
                    v.insert(i, edge);
                    *edges = v.into_boxed_slice();
                } else {
                    let mut wide = Wide {
                        edges: Vec::with_capacity(2 * WIDE),
                        index: HashTable::with_capacity(2 * WIDE),
                        hasher: foldhash::fast::RandomState::default(),
                    };
                    for e in v {
                        wide.push(e);
                    }
                    wide.push(edge);
                    *children = Children::Many(Box::new(wide));
                }
            }
            Children::Many(wide) => wide.push(edge),
        }
    }

    /// Removes and returns the child at `pos` (from [`Node::find`]).
    fn remove_at(&mut self, pos: usize) -> Option<Edge<V>> {
        let children = self.children.as_deref_mut()?;
        let edge = match children {
            Children::Few(edges) => {
                if pos >= edges.len() {
                    return None;
                }
                let mut v = Vec::from(mem::take(edges));
                let edge = v.remove(pos);
                *edges = v.into_boxed_slice();
                edge
            }
            Children::Many(wide) => {
                let edge = wide.swap_remove(pos)?;
                if wide.edges.len() <= NARROW {
                    let mut v = mem::take(&mut wide.edges);
                    v.sort_unstable_by(|a, b| first_level(&a.label).cmp(first_level(&b.label)));
                    *children = Children::Few(v.into_boxed_slice());
                }
                edge
            }
        };
        if self.children().is_empty() {
            self.children = None;
        }
        Some(edge)
    }

    /// Takes every child, leaving none.
    fn take_children(&mut self) -> Vec<Edge<V>> {
        match self.children.take().map(|c| *c) {
            None => Vec::new(),
            Some(Children::Few(edges)) => Vec::from(edges),
            Some(Children::Many(wide)) => wide.edges,
        }
    }
}

impl<V> Wide<V> {
    fn find(&self, level: &str) -> Option<usize> {
        let hash = self.hasher.hash_one(level);
        let edges = &self.edges;
        let pos = self.index.find(hash, |&i| {
            edges
                .get(i as usize)
                .is_some_and(|e| first_level(&e.label) == level)
        })?;
        Some(*pos as usize)
    }

    fn push(&mut self, edge: Edge<V>) {
        // Grow by an eighth, not double: the vector is most of a wide
        // node's memory.
        if self.edges.len() == self.edges.capacity() {
            self.edges.reserve_exact(self.edges.len() / 8 + 1);
        }
        // At most one child per stored topic, each over 32 bytes: fewer
        // than 2^32 of them fit in any memory.
        let pos = self.edges.len() as u32;
        let hash = self.hasher.hash_one(first_level(&edge.label));
        self.edges.push(edge);
        let (edges, hasher) = (&self.edges, &self.hasher);
        self.index
            .insert_unique(hash, pos, |&i| rehash(edges, hasher, i));
    }

    /// Removes the edge at `pos`, moving the last one into its place.
    fn swap_remove(&mut self, pos: usize) -> Option<Edge<V>> {
        let hash = self
            .hasher
            .hash_one(first_level(&self.edges.get(pos)?.label));
        if let Ok(entry) = self.index.find_entry(hash, |&i| i as usize == pos) {
            entry.remove();
        }
        let edge = self.edges.swap_remove(pos);
        if let Some(moved) = self.edges.get(pos) {
            let last = self.edges.len();
            let hash = self.hasher.hash_one(first_level(&moved.label));
            if let Some(i) = self.index.find_mut(hash, |&i| i as usize == last) {
                *i = pos as u32;
            }
        }
        let len = self.edges.len();
        if self.edges.capacity() > 2 * len {
            self.edges.shrink_to(len + len / 8);
        }
        if self.index.capacity() > 4 * len {
            let (edges, hasher) = (&self.edges, &self.hasher);
            self.index.shrink_to(0, |&i| rehash(edges, hasher, i));
        }
        Some(edge)
    }
}

/// The hash of the edge at position `i` (for the table's resizing).
fn rehash<V>(edges: &[Edge<V>], hasher: &foldhash::fast::RandomState, i: u32) -> u64 {
    edges
        .get(i as usize)
        .map_or(0, |e| hasher.hash_one(first_level(&e.label)))
}

impl<V> Drop for Node<V> {
    /// Drops the subtree with an explicit stack: the default recursive drop
    /// could overflow the stack on a topic with tens of thousands of levels.
    fn drop(&mut self) {
        if self.children.is_none() {
            return;
        }
        let mut stack = vec![self.take_children()];
        while let Some(edges) = stack.pop() {
            for mut edge in edges {
                if edge.node.children.is_some() {
                    stack.push(edge.node.take_children());
                }
                // `edge` is childless now: dropping it does not recurse.
            }
        }
    }
}

impl<V> Edge<V> {
    /// Cuts the label after `at` bytes (the end of a level inside it): the
    /// levels after it move, with the node, below a new valueless node.
    fn split(&mut self, at: usize) {
        let tail = Edge {
            label: self.label[at + 1..].into(),
            node: mem::take(&mut self.node),
        };
        self.label = self.label[..at].into();
        self.node.add_child(tail);
    }

    /// Merges the node into this edge if it has no value and one child.
    fn merge(&mut self) {
        if self.node.value.is_some() || self.node.children().len() != 1 {
            return;
        }
        if let Some(child) = self.node.take_children().pop() {
            let mut label = String::with_capacity(self.label.len() + 1 + child.label.len());
            label.push_str(&self.label);
            label.push('/');
            label.push_str(&child.label);
            self.label = label.into_boxed_str();
            self.node = child.node;
        }
    }
}

/// Removes `rest`, a child's whole label, from `parent`: the value, then the
/// node if it has no children, or the node merged into its edge if it has
/// one.
fn take_child<V>(parent: &mut Node<V>, rest: &str) -> Option<V> {
    let pos = parent.find(first_level(rest))?;
    let edge = parent.children_mut().get_mut(pos)?;
    if *edge.label != *rest {
        return None;
    }
    let value = edge.node.value.take()?;
    if edge.node.children.is_none() {
        parent.remove_at(pos);
    } else {
        edge.merge();
    }
    Some(value)
}

impl<V> Default for RetainTree<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> RetainTree<V> {
    pub fn new() -> Self {
        RetainTree {
            root: Node::default(),
            len: 0,
        }
    }

    /// Number of stored topics.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `value` under `topic`, returning the value it replaces.
    pub fn insert(&mut self, topic: &str, value: V) -> Option<V> {
        let mut node = &mut self.root;
        let mut rest = topic;
        loop {
            let Some(pos) = node.find(first_level(rest)) else {
                node.add_child(Edge {
                    label: rest.into(),
                    node: Node {
                        children: None,
                        value: Some(value),
                    },
                });
                self.len += 1;
                return None;
            };
            // Always `Some`: the position was just found.
            let edge = node.children_mut().get_mut(pos)?;
            let common = common_levels(&edge.label, rest);
            if common < edge.label.len() {
                edge.split(common);
            }
            if common == rest.len() {
                let old = edge.node.value.replace(value);
                self.len += usize::from(old.is_none());
                return old;
            }
            rest = &rest[common + 1..];
            node = &mut edge.node;
        }
    }

    /// Removes `topic`, returning its value. The nodes it leaves without a
    /// value and with fewer than two children are freed or merged.
    pub fn remove(&mut self, topic: &str) -> Option<V> {
        let pos = self.root.find(first_level(topic))?;
        let value = match strip_label(topic, &self.root.children().get(pos)?.label)? {
            None => take_child(&mut self.root, topic),
            Some(mut rest) => {
                // Find the edge into the topic's parent node: look one step
                // ahead, then step.
                let mut edge = self.root.children_mut().get_mut(pos)?;
                loop {
                    let pos = edge.node.find(first_level(rest))?;
                    let Some(next) = strip_label(rest, &edge.node.children().get(pos)?.label)?
                    else {
                        break;
                    };
                    edge = edge.node.children_mut().get_mut(pos)?;
                    rest = next;
                }
                let value = take_child(&mut edge.node, rest);
                edge.merge();
                value
            }
        }?;
        self.len -= 1;
        Some(value)
    }

    pub fn get(&self, topic: &str) -> Option<&V> {
        let mut node = &self.root;
        let mut rest = topic;
        loop {
            let edge = node.child(first_level(rest))?;
            match strip_label(rest, &edge.label)? {
                None => return edge.node.value.as_ref(),
                Some(tail) => {
                    node = &edge.node;
                    rest = tail;
                }
            }
        }
    }

    /// Calls `f` with the value of every topic that `filter` matches, with
    /// the rules of [`crate::topic::matches`]: `+` is one level (possibly
    /// empty), `#` its parent level and everything below, and a filter
    /// starting with `+` or `#` does not match topics starting with `$`
    /// (MQTT-4.7.2-1). Each match is reported once, in no particular order.
    /// Allocates only its stacks, and only for a `+` whose matches go on
    /// below or a `#` over nodes with children.
    pub fn for_each_match<'a>(&'a self, filter: &str, mut f: impl FnMut(&'a V)) {
        let mut walk = Walk {
            pending: Vec::new(),
            below: Vec::new(),
            f: &mut f,
        };
        let mut next = walk.visit(&self.root, filter, true);
        while let Some((node, rest)) = next.or_else(|| walk.pending.pop()) {
            next = walk.visit(node, rest, false);
        }
    }

    /// Every value, in no particular order.
    pub fn iter(&self) -> Iter<'_, V> {
        Iter {
            stack: vec![self.root.children().iter()],
            remaining: self.len,
        }
    }
}

impl<'a, V> IntoIterator for &'a RetainTree<V> {
    type Item = &'a V;
    type IntoIter = Iter<'a, V>;

    fn into_iter(self) -> Iter<'a, V> {
        self.iter()
    }
}

/// A node to visit and the filter levels left for it.
type Next<'a, 'f, V> = (&'a Node<V>, &'f str);

/// The state of one [`RetainTree::for_each_match`].
struct Walk<'a, 'f, 'c, V, F> {
    /// Nodes still to visit (for the children a `+` matched).
    pending: Vec<Next<'a, 'f, V>>,
    /// The subtree being reported for a `#`.
    below: Vec<std::slice::Iter<'a, Edge<V>>>,
    f: &'c mut F,
}

impl<'a, 'f, V, F: FnMut(&'a V)> Walk<'a, 'f, '_, V, F> {
    /// Reports or queues what matches `rest` (the filter levels not yet
    /// matched) below `node`; returns the one node to visit next for a
    /// literal level.
    fn visit(&mut self, node: &'a Node<V>, rest: &'f str, root: bool) -> Option<Next<'a, 'f, V>> {
        let (level, after) = split_first(rest);
        // A first-level wildcard does not match `$` topics (MQTT-4.7.2-1).
        let eligible = |e: &&Edge<V>| !(root && e.label.starts_with('$'));
        match level {
            "#" => {
                // `#` matches its parent level too (`a/#` matches `a`).
                if let Some(v) = &node.value {
                    (self.f)(v);
                }
                for edge in node.children().iter().filter(eligible) {
                    self.report_all(edge);
                }
                None
            }
            "+" => {
                for edge in node.children().iter().filter(eligible) {
                    if let Some(next) = self.follow(edge, after) {
                        self.pending.push(next);
                    }
                }
                None
            }
            _ => self.follow(node.child(level)?, after),
        }
    }

    /// Matches the levels of `edge` after its first (already matched by
    /// the filter level before `filter`): reports its node if the filter
    /// ends there, returns it if the filter goes on.
    fn follow(
        &mut self,
        edge: &'a Edge<V>,
        mut filter: Option<&'f str>,
    ) -> Option<Next<'a, 'f, V>> {
        let mut label = split_first(&edge.label).1;
        while let Some(levels) = label {
            // `None`: the topics are longer than the filter.
            let (wanted, next_filter) = split_first(filter?);
            let (level, next_label) = split_first(levels);
            if wanted == "#" {
                self.report_all(edge);
                return None;
            }
            if wanted != "+" && wanted != level {
                return None;
            }
            label = next_label;
            filter = next_filter;
        }
        match filter {
            Some(rest) => Some((&edge.node, rest)),
            None => {
                if let Some(v) = &edge.node.value {
                    (self.f)(v);
                }
                None
            }
        }
    }

    /// Reports the value of `edge`'s node and of every node below it.
    fn report_all(&mut self, edge: &'a Edge<V>) {
        if let Some(v) = &edge.node.value {
            (self.f)(v);
        }
        self.below.push(edge.node.children().iter());
        while let Some(children) = self.below.last_mut() {
            let Some(edge) = children.next() else {
                self.below.pop();
                continue;
            };
            if let Some(v) = &edge.node.value {
                (self.f)(v);
            }
            if edge.node.children.is_some() {
                self.below.push(edge.node.children().iter());
            }
        }
    }
}

/// The values of a [`RetainTree`], from [`RetainTree::iter`].
pub struct Iter<'a, V> {
    stack: Vec<std::slice::Iter<'a, Edge<V>>>,
    remaining: usize,
}

impl<'a, V> Iterator for Iter<'a, V> {
    type Item = &'a V;

    fn next(&mut self) -> Option<&'a V> {
        while let Some(children) = self.stack.last_mut() {
            let Some(edge) = children.next() else {
                self.stack.pop();
                continue;
            };
            if edge.node.children.is_some() {
                self.stack.push(edge.node.children().iter());
            }
            if let Some(v) = &edge.node.value {
                self.remaining -= 1;
                return Some(v);
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl<V> ExactSizeIterator for Iter<'_, V> {}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::topic::matches;
    use quickcheck::{Arbitrary, Gen, QuickCheck};
    use std::collections::{BTreeSet, HashMap};

    /// A tree whose values are the topics themselves (as the broker's
    /// messages carry theirs).
    fn tree_of(topics: &[&str]) -> RetainTree<String> {
        let mut tree = RetainTree::new();
        for t in topics {
            tree.insert(t, t.to_string());
        }
        tree.check();
        tree
    }

    fn matched(tree: &RetainTree<String>, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        tree.for_each_match(filter, |t| out.push(t.clone()));
        let n = out.len();
        out.sort();
        out.dedup();
        assert_eq!(n, out.len(), "a topic was reported twice for {filter}");
        out
    }

    impl<V> RetainTree<V> {
        /// Nodes besides the root.
        fn node_count(&self) -> usize {
            let mut count = 0;
            let mut stack = vec![&self.root];
            while let Some(node) = stack.pop() {
                count += node.children().len();
                stack.extend(node.children().iter().map(|e| &e.node));
            }
            count
        }

        /// Asserts the structural invariants (see the module documentation).
        fn check(&self) {
            assert!(self.root.value.is_none());
            let mut values = 0;
            let mut stack = vec![(&self.root, true)];
            while let Some((node, root)) = stack.pop() {
                values += usize::from(node.value.is_some());
                let n = node.children().len();
                assert!(root || node.value.is_some() || n >= 2, "a node to merge");
                match node.children.as_deref() {
                    None => {}
                    Some(Children::Few(edges)) => {
                        assert!(!edges.is_empty() && edges.len() <= WIDE);
                        for pair in edges.windows(2) {
                            assert!(first_level(&pair[0].label) < first_level(&pair[1].label));
                        }
                    }
                    Some(Children::Many(wide)) => {
                        assert!(wide.edges.len() > NARROW);
                        assert_eq!(wide.index.len(), wide.edges.len());
                        let positions: BTreeSet<u32> = wide.index.iter().copied().collect();
                        assert_eq!(positions.len(), wide.edges.len());
                        assert!(positions.iter().all(|&i| (i as usize) < wide.edges.len()));
                    }
                }
                for (i, edge) in node.children().iter().enumerate() {
                    assert_eq!(node.find(first_level(&edge.label)), Some(i));
                    stack.push((&edge.node, false));
                }
            }
            assert_eq!(values, self.len);
            assert_eq!(self.iter().count(), self.len);
        }
    }

    #[test]
    fn compact_layout() {
        // An edge with an `Arc`-sized value: label, children pointer, value.
        assert_eq!(mem::size_of::<Edge<std::sync::Arc<u8>>>(), 32);
        assert_eq!(mem::size_of::<Children<std::sync::Arc<u8>>>(), 16);
    }

    #[test]
    fn map_api() {
        let mut tree = RetainTree::default();
        assert!(tree.is_empty());
        assert_eq!(tree.insert("a/b", 1), None);
        assert_eq!(tree.insert("a/b", 2), Some(1));
        assert_eq!(tree.insert("a", 3), None);
        assert_eq!(tree.insert("a/b/c", 4), None);
        assert_eq!(tree.len(), 3);
        assert_eq!(tree.get("a/b"), Some(&2));
        assert_eq!(tree.get("a"), Some(&3));
        assert_eq!(tree.get("a/b/c"), Some(&4));
        for absent in ["a/", "a/b/", "b", "a/c", "a/b/c/d", "", "/"] {
            assert_eq!(tree.get(absent), None, "{absent}");
            assert_eq!(tree.remove(absent), None, "{absent}");
        }
        tree.check();
        let mut all: Vec<i32> = tree.iter().copied().collect();
        all.sort();
        assert_eq!(all, [2, 3, 4]);
        assert_eq!(tree.iter().len(), 3);
        assert_eq!((&tree).into_iter().count(), 3);
        assert_eq!(tree.remove("a/b"), Some(2));
        assert_eq!(tree.remove("a/b"), None);
        tree.check();
        assert_eq!(tree.remove("a"), Some(3));
        tree.check();
        assert_eq!(tree.node_count(), 1, "one edge `a/b/c`");
        assert_eq!(tree.remove("a/b/c"), Some(4));
        assert!(tree.is_empty());
        assert_eq!(tree.node_count(), 0);
        assert!(tree.root.children.is_none());
    }

    #[test]
    fn edges_split_and_merge() {
        let mut tree = tree_of(&["a/b/c/d"]);
        assert_eq!(tree.node_count(), 1);
        tree.insert("a/b/x", "a/b/x".into());
        // `a/b` -> {`c/d`, `x`}
        assert_eq!(tree.node_count(), 3);
        tree.insert("a/b", "a/b".into());
        assert_eq!(tree.node_count(), 3);
        tree.insert("a", "a".into());
        // `a` -> `b` -> {`c/d`, `x`}
        assert_eq!(tree.node_count(), 4);
        tree.check();
        assert_eq!(matched(&tree, "a/+/c/+"), ["a/b/c/d"]);
        assert_eq!(matched(&tree, "a/b/c"), Vec::<String>::new());
        assert_eq!(matched(&tree, "a/b/c/#"), ["a/b/c/d"]);
        assert_eq!(matched(&tree, "a/+/+/d"), ["a/b/c/d"]);
        assert_eq!(matched(&tree, "a/+/+/e"), Vec::<String>::new());
        tree.remove("a/b");
        tree.remove("a/b/x");
        tree.check();
        // `a` -> `b/c/d`
        assert_eq!(tree.node_count(), 2);
        tree.remove("a");
        tree.check();
        assert_eq!(tree.node_count(), 1);
        assert_eq!(matched(&tree, "#"), ["a/b/c/d"]);
    }

    #[test]
    fn dollar_topics() {
        let tree = tree_of(&["$SYS/x", "$SYS", "a/x", "$", "a/$x", "x$/y"]);
        for (filter, expected) in [
            ("#", &["a/$x", "a/x", "x$/y"][..]),
            ("+/x", &["a/x"]),
            ("+/#", &["a/$x", "a/x", "x$/y"]),
            ("+", &[]),
            ("$SYS/#", &["$SYS", "$SYS/x"]),
            ("$SYS/+", &["$SYS/x"]),
            ("$SYS", &["$SYS"]),
            ("$", &["$"]),
            ("a/+", &["a/$x", "a/x"]),
            ("a/#", &["a/$x", "a/x"]),
        ] {
            assert_eq!(matched(&tree, filter), expected, "{filter}");
        }
    }

    #[test]
    fn parent_and_empty_levels() {
        let topics = ["a", "a/", "a//b", "/a", "/", "//", "a/b", "b/a/c", ""];
        let tree = tree_of(&topics);
        for filter in [
            "a/#", "a/+", "a/+/b", "+/+", "/+", "+", "#", "/#", "+/#", "//", "/", "+/+/+", "a//b",
            "a/", "", "+/a/#", "a/b/#", "b/#", "b/+/c",
        ] {
            let expected: Vec<String> = topics
                .iter()
                .filter(|t| matches(filter, t))
                .map(|t| t.to_string())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            assert_eq!(matched(&tree, filter), expected, "{filter}");
        }
        assert_eq!(matched(&tree, "a/#"), ["a", "a/", "a//b", "a/b"]);
        assert_eq!(matched(&tree, "+/+"), ["/", "/a", "a/", "a/b"]);
        assert_eq!(matched(&tree, "a/+/b"), ["a//b"]);
    }

    /// The non-normative examples of MQTT 3.1.1 §4.7.1.2 and §4.7.1.3, from
    /// the topic side.
    #[test]
    fn spec_examples() {
        let tree = tree_of(&[
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "sport/tennis/player1/score/wimbledon",
            "sport/tennis/player2",
            "sport",
            "sport/",
            "/finance",
        ]);
        assert_eq!(
            matched(&tree, "sport/tennis/player1/#"),
            [
                "sport/tennis/player1",
                "sport/tennis/player1/ranking",
                "sport/tennis/player1/score/wimbledon"
            ]
        );
        assert_eq!(matched(&tree, "sport/#").len(), 6);
        assert_eq!(
            matched(&tree, "sport/tennis/+"),
            ["sport/tennis/player1", "sport/tennis/player2"]
        );
        assert_eq!(matched(&tree, "sport/+"), ["sport/"]);
        assert_eq!(matched(&tree, "+/+"), ["/finance", "sport/"]);
        assert_eq!(matched(&tree, "/+"), ["/finance"]);
        assert_eq!(matched(&tree, "+"), ["sport"]);
    }

    #[test]
    fn wide_nodes_become_tables_and_back() {
        let mut tree = RetainTree::new();
        let topics: Vec<String> = (0..100).map(|i| format!("w/{i}/x")).collect();
        for t in &topics {
            tree.insert(t, t.clone());
            tree.check();
        }
        assert!(matches!(
            tree.root.child("w").unwrap().node.children.as_deref(),
            Some(Children::Many(_))
        ));
        assert_eq!(matched(&tree, "w/42/+"), ["w/42/x"]);
        assert_eq!(matched(&tree, "w/+/x").len(), 100);
        assert_eq!(matched(&tree, "w/#").len(), 100);
        assert_eq!(tree.get("w/99/x"), Some(&"w/99/x".to_string()));
        for t in &topics[..97] {
            assert_eq!(tree.remove(t).as_ref(), Some(t));
            tree.check();
        }
        assert!(matches!(
            tree.root.child("w").unwrap().node.children.as_deref(),
            Some(Children::Few(_))
        ));
        assert_eq!(matched(&tree, "w/+/x"), ["w/97/x", "w/98/x", "w/99/x"]);
        for t in &topics[97..] {
            tree.remove(t);
        }
        assert!(tree.is_empty());
        assert_eq!(tree.node_count(), 0);
    }

    #[test]
    fn odd_input_does_not_panic() {
        let odd = ["a/#/b", "", "#", "+", "a/+", "a//", "é/ü", "é"];
        let mut tree = tree_of(&odd);
        for filter in odd.iter().chain(&["a/#/b/#", "+/+/+/+", "é/+", "\u{e9}"]) {
            let expected: BTreeSet<String> = odd
                .iter()
                .filter(|t| matches(filter, t))
                .map(|t| t.to_string())
                .collect();
            let got: BTreeSet<String> = matched(&tree, filter).into_iter().collect();
            assert_eq!(got, expected, "{filter}");
        }
        for t in odd {
            assert_eq!(tree.remove(t), Some(t.to_string()));
            tree.check();
        }
        assert_eq!(tree.node_count(), 0);
    }

    /// 32768-level topics on a thread with a small stack: no per-level
    /// recursion in insert, match, remove, iteration or drop.
    #[test]
    fn deep_topics_do_not_overflow_the_stack() {
        let run = || {
            let deep = vec!["a"; 32_768].join("/");
            let mut tree = RetainTree::new();
            // A chain of nodes, one per level, each with a value and a
            // sibling `b`: as deep as a trie of these topics gets.
            let mut topic = String::new();
            for i in 0..2_000 {
                if i > 0 {
                    topic.push('/');
                }
                topic.push('a');
                tree.insert(&topic, 1u8);
                tree.insert(&format!("{topic}/b"), 2u8);
            }
            tree.insert(&deep, 3u8);
            let plus = vec!["+"; 2_001].join("/");
            let mut n = 0;
            tree.for_each_match("#", |_| n += 1);
            assert_eq!(n, 4_001);
            n = 0;
            tree.for_each_match(&plus, |_| n += 1);
            assert_eq!(n, 1, "2000 `a` and a `b`");
            n = 0;
            tree.for_each_match(&format!("{}/#", &deep[..2 * 1_999 + 1]), |_| n += 1);
            assert_eq!(n, 3, "2000 `a`, with a `b`, and the deep one");
            assert_eq!(tree.iter().count(), 4_001);
            assert_eq!(tree.get(&deep), Some(&3));
            assert_eq!(tree.remove(&deep), Some(3));
            tree.insert(&deep, 3u8);
            drop(tree);
        };
        let handle = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(run)
            .unwrap();
        handle.join().unwrap();
    }

    // ---- property tests -------------------------------------------------

    const TOPIC_LEVELS: &[&str] = &["a", "b", "$SYS", "", "c", "$"];
    const FILTER_LEVELS: &[&str] = &["a", "b", "$SYS", "", "c", "+", "#"];

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

    /// A valid plain filter of 1-7 levels over the same alphabet.
    #[derive(Clone, Debug)]
    struct Filter(String);

    impl Arbitrary for Filter {
        fn arbitrary(g: &mut Gen) -> Self {
            Filter(crate::testgen::filter(g, FILTER_LEVELS, 7))
        }
    }

    /// A tree holding `topics` (each its own value), checked, and the same set.
    fn stored_tree<'a>(
        topics: impl IntoIterator<Item = &'a str>,
    ) -> (RetainTree<String>, BTreeSet<String>) {
        let mut tree = RetainTree::new();
        let mut stored = BTreeSet::new();
        for t in topics {
            tree.insert(t, t.to_string());
            stored.insert(t.to_string());
        }
        tree.check();
        (tree, stored)
    }

    fn qc() -> QuickCheck {
        QuickCheck::new().tests(2_000).rng(Gen::new(30))
    }

    fn agrees(tree: &RetainTree<String>, stored: &BTreeSet<String>, filters: &[Filter]) -> bool {
        filters.iter().all(|f| {
            crate::topic::check_plain_filter(&f.0).unwrap();
            let expected: Vec<String> = stored
                .iter()
                .filter(|t| matches(&f.0, t))
                .cloned()
                .collect();
            let ok = matched(tree, &f.0) == expected;
            if !ok {
                eprintln!("filter {:?} on {stored:?}", f.0);
            }
            ok
        })
    }

    /// `for_each_match` returns exactly `{t | matches(filter, t)}`, before
    /// and after removing some of the topics.
    #[test]
    fn matches_agree_with_the_reference_matcher() {
        fn prop(topics: Vec<Topic>, removed: Vec<usize>, filters: Vec<Filter>) -> bool {
            let (mut tree, mut stored) = stored_tree(topics.iter().map(|t| t.0.as_str()));
            if !agrees(&tree, &stored, &filters) {
                return false;
            }
            if !topics.is_empty() {
                for i in &removed {
                    let t = &topics[i % topics.len()].0;
                    assert_eq!(tree.remove(t).is_some(), stored.remove(t));
                }
            }
            tree.check();
            agrees(&tree, &stored, &filters)
        }
        qc().quickcheck(prop as fn(Vec<Topic>, Vec<usize>, Vec<Filter>) -> bool);
    }

    /// Topics `{a|b|$x}/{0..40}/{0..40}` and some of their prefixes: nodes
    /// wide enough to turn into hash tables and back.
    #[derive(Clone, Debug)]
    struct WideTopic(String);

    impl Arbitrary for WideTopic {
        fn arbitrary(g: &mut Gen) -> Self {
            let first = *g.choose(&["a", "b", "$x"]).unwrap();
            let mut t = format!("{first}/{}", u8::arbitrary(g) % 40);
            if u8::arbitrary(g) % 4 != 0 {
                t = format!("{t}/{}", u8::arbitrary(g) % 40);
            }
            WideTopic(t)
        }
    }

    #[test]
    fn wide_nodes_agree_with_the_reference_matcher() {
        fn prop(topics: Vec<WideTopic>, removed: Vec<usize>) -> bool {
            let filters: Vec<Filter> = [
                "#", "+/#", "a/#", "+/7", "a/+", "b/+/+", "+/+/3", "$x/+/3", "a/7/#", "b/39",
                "a/+/#", "+/+",
            ]
            .iter()
            .map(|f| Filter(f.to_string()))
            .collect();
            let (mut tree, mut stored) = stored_tree(topics.iter().map(|t| t.0.as_str()));
            if !agrees(&tree, &stored, &filters) {
                return false;
            }
            for (n, i) in removed.iter().enumerate() {
                if topics.is_empty() {
                    break;
                }
                let t = &topics[i % topics.len()].0;
                assert_eq!(tree.remove(t).is_some(), stored.remove(t));
                if n % 16 == 0 {
                    tree.check();
                }
            }
            tree.check();
            agrees(&tree, &stored, &filters)
        }
        QuickCheck::new()
            .tests(120)
            .rng(Gen::new(600))
            .quickcheck(prop as fn(Vec<WideTopic>, Vec<usize>) -> bool);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(Topic, u32),
        Remove(Topic),
    }

    impl Arbitrary for Op {
        fn arbitrary(g: &mut Gen) -> Self {
            if bool::arbitrary(g) {
                Op::Insert(Topic::arbitrary(g), u32::arbitrary(g))
            } else {
                Op::Remove(Topic::arbitrary(g))
            }
        }
    }

    /// Any sequence of inserts and removes: the same answers as a `HashMap`,
    /// the invariants hold after every step, and removing everything frees
    /// every node.
    #[test]
    fn agrees_with_a_hashmap_model_and_frees_all_nodes() {
        fn prop(ops: Vec<Op>) -> bool {
            let mut tree = RetainTree::new();
            let mut model: HashMap<String, u32> = HashMap::new();
            for op in &ops {
                match op {
                    Op::Insert(t, v) => {
                        assert_eq!(tree.insert(&t.0, *v), model.insert(t.0.clone(), *v));
                    }
                    Op::Remove(t) => assert_eq!(tree.remove(&t.0), model.remove(&t.0)),
                }
                assert_eq!(tree.len(), model.len());
                tree.check();
            }
            for (t, v) in &model {
                assert_eq!(tree.get(t), Some(v));
            }
            let mut values: Vec<u32> = tree.iter().copied().collect();
            let mut expected: Vec<u32> = model.values().copied().collect();
            values.sort();
            expected.sort();
            assert_eq!(values, expected);
            for t in model.keys() {
                assert!(tree.remove(t).is_some());
            }
            tree.is_empty() && tree.node_count() == 0 && tree.root.children.is_none()
        }
        qc().quickcheck(prop as fn(Vec<Op>) -> bool);
    }
}
