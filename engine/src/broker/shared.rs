//! Shared subscriptions ($share/group/filter): which shard and which member
//! gets each message. The publishing shard picks a shard with members
//! (round robin over the replicated share routes); that shard picks one of
//! its members, or passes the message on if its members just went away.

use super::metrics::Metrics;
use super::{Shard, ShardMsg, ShareRoute, State, OUTBOX_HIGH};
use crate::session::{Delivery, Message};
use std::cell::Cell;
use std::sync::Arc;
use tarta_proto::mqtt::{QoS, SubOptions};
use tarta_proto::ByteStr;

impl Shard {
    /// Shared subscriptions are decided by the publishing shard only: for
    /// each matching group, one shard with members (round robin), which
    /// then picks one of its members (round robin).
    pub(super) fn route_shared(&self, st: &mut State, msg: &Arc<Message>) {
        if st.share_routes.is_empty() {
            return;
        }
        let mut picks: Vec<(Arc<(ByteStr, ByteStr)>, u16)> = Vec::new();
        st.share_routes
            .for_each_match(&msg.topic, |filter, group, route| {
                if route.shards.is_empty() {
                    return;
                }
                let i = route.next.get();
                route.next.set(i.wrapping_add(1));
                let to = route.shards[i % route.shards.len()];
                picks.push((Arc::new((group.clone(), ByteStr::from(filter))), to));
            });
        for (key, to) in picks {
            self.send_shared(st, key, msg.clone(), to as usize, 0);
        }
    }

    fn send_shared(
        &self,
        st: &mut State,
        key: Arc<(ByteStr, ByteStr)>,
        msg: Arc<Message>,
        to: usize,
        hops: u8,
    ) {
        if to == self.id {
            self.deliver_shared(st, key, msg, hops);
        } else if msg.qos == QoS::AtMostOnce && st.outbox[to].len() >= OUTBOX_HIGH {
            Metrics::inc(&self.metrics.qos0_dropped);
        } else {
            self.push_out(st, to, ShardMsg::Shared { key, msg, hops });
        }
    }

    /// Gives `msg` to one local member of the shared subscription `key`; if
    /// none is left here (it just went away), to another shard with members.
    pub(super) fn deliver_shared(
        &self,
        st: &mut State,
        key: Arc<(ByteStr, ByteStr)>,
        msg: Arc<Message>,
        hops: u8,
    ) {
        let pick = st.shares.get_mut(&*key).and_then(|local| {
            if local.members.is_empty() {
                return None;
            }
            let i = local.next % local.members.len();
            local.next = local.next.wrapping_add(1);
            Some(local.members[i])
        });
        match pick {
            Some((sid, opts, sub_id)) => {
                let d = Delivery {
                    qos: opts.qos.min(msg.qos),
                    retain: opts.retain_as_published && msg.retain,
                    sub_ids: sub_id.into_iter().collect(),
                    share: Some(key),
                    msg,
                };
                self.deliver_to(st, sid, d, true);
            }
            None if usize::from(hops) < self.n => {
                let mut other = None;
                if let Some(route) = st.share_routes.get(&key.1, &key.0) {
                    other = route
                        .shards
                        .iter()
                        .copied()
                        .find(|s| usize::from(*s) != self.id);
                }
                match other {
                    Some(to) => self.send_shared(st, key, msg, usize::from(to), hops + 1),
                    None => Metrics::inc(&self.metrics.share_undeliverable),
                }
            }
            None => Metrics::inc(&self.metrics.share_undeliverable),
        }
    }

    /// A connected session joins shared subscription (group, filter).
    /// Returns true if this shard's routes changed.
    pub fn share_join(
        &self,
        st: &mut State,
        key: (ByteStr, ByteStr),
        sid: usize,
        opts: SubOptions,
        sub_id: Option<u32>,
    ) -> bool {
        let local = st.shares.entry(key.clone()).or_default();
        if let Some(m) = local.members.iter_mut().find(|m| m.0 == sid) {
            *m = (sid, opts, sub_id);
            return false;
        }
        local.members.push((sid, opts, sub_id));
        if local.members.len() > 1 {
            return false;
        }
        self.share_route_update(st, &key, self.id, true);
        for to in 0..self.n {
            if to != self.id {
                self.push_out(st, to, ShardMsg::ShareAdd(key.0.clone(), key.1.clone()));
            }
        }
        true
    }

    /// A session leaves shared subscription (group, filter) (unsubscribed,
    /// disconnected or ended).
    pub fn share_leave(&self, st: &mut State, key: &(ByteStr, ByteStr), sid: usize) {
        let Some(local) = st.shares.get_mut(key) else {
            return;
        };
        let before = local.members.len();
        local.members.retain(|m| m.0 != sid);
        if local.members.len() == before || !local.members.is_empty() {
            return;
        }
        st.shares.remove(key);
        self.share_route_update(st, key, self.id, false);
        for to in 0..self.n {
            if to != self.id {
                self.push_out(st, to, ShardMsg::ShareDel(key.0.clone(), key.1.clone()));
            }
        }
    }

    pub(super) fn share_route_update(
        &self,
        st: &mut State,
        key: &(ByteStr, ByteStr),
        shard: usize,
        add: bool,
    ) {
        let (group, filter) = key;
        let shard = shard as u16;
        let emptied = match st.share_routes.get_mut(filter, group) {
            Some(r) => {
                r.shards.retain(|s| *s != shard);
                if add {
                    r.shards.push(shard);
                    r.shards.sort_unstable();
                }
                r.shards.is_empty()
            }
            None => {
                if add {
                    let route = ShareRoute {
                        shards: vec![shard],
                        next: Cell::new(0),
                    };
                    st.share_routes.insert(filter, group.clone(), route);
                }
                false
            }
        };
        if emptied {
            st.share_routes.remove(filter, group);
        }
    }

    /// Hands deliveries of a departed shared-subscription member to the
    /// group again (MQTT-4.8.2: to another member).
    pub fn reshare(&self, st: &mut State, moved: Vec<Delivery>) {
        for d in moved {
            let Some(key) = d.share else { continue };
            let to = st.share_routes.get(&key.1, &key.0).and_then(|r| {
                let i = r.next.get();
                r.next.set(i.wrapping_add(1));
                (!r.shards.is_empty()).then(|| r.shards[i % r.shards.len()])
            });
            match to {
                Some(to) => self.send_shared(st, key, d.msg, usize::from(to), 0),
                None => Metrics::inc(&self.metrics.share_undeliverable),
            }
        }
    }
}
