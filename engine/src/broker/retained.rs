//! Retained messages. Every shard keeps a full replica: a retained publish is
//! sent to every shard, so a SUBSCRIBE is answered from local memory.

use crate::session::Message;
use std::collections::HashMap;
use std::sync::Arc;
use tarta_proto::topic;
use tarta_proto::ByteStr;

#[derive(Default)]
pub struct Retained {
    by_topic: HashMap<ByteStr, Arc<Message>>,
}

impl Retained {
    /// Stores `msg` as the topic's retained message, or clears it when the
    /// payload is empty (MQTT-3.3.1-10/11).
    pub fn set(&mut self, msg: &Arc<Message>) {
        if msg.payload.is_empty() {
            self.by_topic.remove(&msg.topic);
        } else {
            self.by_topic.insert(msg.topic.clone(), msg.clone());
        }
    }

    /// Retained messages whose topic matches `filter`.
    pub fn matching(&self, filter: &str, mut f: impl FnMut(&Arc<Message>)) {
        if !filter.contains(['+', '#']) {
            if let Some(m) = self.by_topic.get(filter) {
                f(m);
            }
            return;
        }
        for (t, m) in &self.by_topic {
            if topic::matches(filter, t) {
                f(m);
            }
        }
    }

    /// Every retained message (snapshots).
    pub fn for_each(&self, mut f: impl FnMut(&Arc<Message>)) {
        for m in self.by_topic.values() {
            f(m);
        }
    }

    pub fn len(&self) -> usize {
        self.by_topic.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_topic.is_empty()
    }
}
