//! Inputs for the retained suite: a million retained topics, the
//! [`RetainTree`] that indexes them, and the scan it replaces (a `HashMap`
//! from topic to message, every key tested with `topic::matches`, as
//! `broker::retained` did).
//!
//! Two shapes of `n` topics, `sensors/{group}/{member}/temp`:
//! - [`Shape::Wide`]: groups of 1000 (`sensors/{i / 1000}/{i % 1000}/temp`),
//!   the shape the memory figures are quoted for;
//! - [`Shape::Narrow`]: groups of 10, so that each of [`FILTERS`] matches
//!   exactly 10 topics whatever `n` is.

use std::collections::HashMap;
use std::num::NonZeroU64;
use tarta_proto::retain_tree::RetainTree;
use tarta_proto::topic;

/// The stored value: the size of the broker's `Arc<Message>`, with the same
/// niche, but no allocation of its own, so memory figures count the index
/// alone.
pub type Value = NonZeroU64;
pub type Tree = RetainTree<Value>;
/// The old index: topic -> message.
pub type Map = HashMap<Box<str>, Value>;

/// Filters matching exactly 10 topics of a [`Shape::Narrow`] set (n >= 80).
pub const FILTERS: [(&str, &str); 2] = [("plus", "sensors/7/+/temp"), ("hash", "sensors/7/#")];

#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// `sensors/{i / 1000}/{i % 1000}/temp`
    Wide,
    /// `sensors/{i / 10}/{i % 10}/temp`
    Narrow,
}

impl Shape {
    fn group(self) -> usize {
        match self {
            Shape::Wide => 1000,
            Shape::Narrow => 10,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Shape::Wide => "sensors/{i/1000}/{i%1000}/temp",
            Shape::Narrow => "sensors/{i/10}/{i%10}/temp",
        }
    }
}

/// The `i`-th topic of a set of this shape.
pub fn topic(shape: Shape, i: usize) -> String {
    let g = shape.group();
    format!("sensors/{}/{}/temp", i / g, i % g)
}

fn value(i: usize) -> Value {
    NonZeroU64::MIN.saturating_add(i as u64)
}

/// The tree holding `n` topics of `shape`, topic i with value i + 1.
pub fn build_tree(shape: Shape, n: usize) -> Tree {
    let mut tree = Tree::new();
    for i in 0..n {
        tree.insert(&topic(shape, i), value(i));
    }
    tree
}

/// The map holding the same.
pub fn build_map(shape: Shape, n: usize) -> Map {
    (0..n)
        .map(|i| (topic(shape, i).into_boxed_str(), value(i)))
        .collect()
}

/// Topics matching `filter`, from the tree.
pub fn tree_count(tree: &Tree, filter: &str) -> usize {
    let mut n = 0;
    tree.for_each_match(filter, |_| n += 1);
    n
}

/// Topics matching `filter`, the old way: a lookup for a filter without
/// wildcards, else `topic::matches` on every stored topic.
pub fn scan_count(map: &Map, filter: &str) -> usize {
    if !filter.contains(['+', '#']) {
        return usize::from(map.contains_key(filter));
    }
    map.keys().filter(|t| topic::matches(filter, t)).count()
}

/// A retained message replacing the one stored under `topic`.
pub fn tree_replace(tree: &mut Tree, topic: &str) {
    tree.insert(topic, NonZeroU64::MAX);
}

/// The same in the map (the topic is copied, as the old index stored it).
pub fn map_replace(map: &mut Map, topic: &str) {
    map.insert(topic.into(), NonZeroU64::MAX);
}
