//! Retained messages. Every shard keeps a full replica (a SUBSCRIBE is
//! answered from local memory), indexed by topic level
//! (`tarta_proto::retain_tree`): a wildcard lookup visits only the part of
//! the tree its filter can match, not every retained message. Writes to a
//! topic are ordered by its owner shard (`broker::durable`).

use crate::session::Message;
use std::sync::Arc;
use tarta_proto::retain_tree::RetainTree;

#[derive(Default)]
pub struct Retained {
    tree: RetainTree<Arc<Message>>,
}

impl Retained {
    /// Stores `msg` as the topic's retained message, or clears it when the
    /// payload is empty (MQTT-3.3.1-10/11).
    pub fn set(&mut self, msg: &Arc<Message>) {
        if msg.payload.is_empty() {
            self.tree.remove(&msg.topic);
        } else {
            self.tree.insert(&msg.topic, msg.clone());
        }
    }

    /// Retained messages whose topic matches `filter`.
    pub fn matching(&self, filter: &str, f: impl FnMut(&Arc<Message>)) {
        self.tree.for_each_match(filter, f);
    }

    /// Every retained message (snapshots).
    pub fn for_each(&self, f: impl FnMut(&Arc<Message>)) {
        self.tree.iter().for_each(f);
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}
