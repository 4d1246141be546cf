//! Rebuilding a shard's state from its log: records in, an [`Image`] out
//! (sessions with their subscriptions, queues and packet ids, retained
//! messages). Pure: the same records always give the same image.

use super::record::Rec;
use crate::session::{Delivery, Message, Session};
use std::collections::HashSet;

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use std::sync::Arc;
use tarta_proto::mqtt::{Publish, Will};
use tarta_proto::ByteStr;

/// A persistent session as the log left it.
pub struct SessionImage {
    /// Its number in the log.
    pub sid: u32,
    /// Subscriptions (`session.subs`), queue, packet ids, incoming QoS 2 ids.
    pub session: Session,
    pub username: Option<ByteStr>,
    pub expiry: u32,
    /// Unix second it went offline (0: it was connected).
    pub offline_at: u64,
    /// The will still to publish, with its delay.
    pub will: Option<(Will, u32)>,
}

#[derive(Default)]
pub struct Image {
    pub sessions: Vec<SessionImage>,
    pub retained: Vec<Arc<Message>>,
    /// Above every message id the log used.
    pub next_mid: u64,
    /// Records that referred to a session or message the log did not have
    /// (after a corrupt record was skipped).
    pub orphans: u64,
    /// QoS 2 messages accepted but maybe not routed (`Held`, no `Routed`):
    /// routed again after the restart.
    pub reroute: Vec<Arc<Message>>,
    /// Identities (`Message::uid`) of the QoS 2 messages this log queued:
    /// routing one of them again does not queue it twice.
    pub seen: HashSet<u64>,
}

/// Messages by id: ids are handed out in order, so mostly a vector from
/// the first id seen (a map for the rare id below it).
#[derive(Default)]
struct Msgs {
    base: Option<u64>,
    dense: Vec<Option<Arc<Message>>>,
    sparse: HashMap<u64, Arc<Message>>,
}

impl Msgs {
    fn insert(&mut self, mid: u64, m: Arc<Message>) {
        let base = *self.base.get_or_insert(mid);
        match mid.checked_sub(base).map(|i| i as usize) {
            Some(i) if i < self.dense.len() + (1 << 20) => {
                if i >= self.dense.len() {
                    self.dense.resize(i + 1, None);
                }
                self.dense[i] = Some(m);
            }
            _ => {
                self.sparse.insert(mid, m);
            }
        }
    }

    fn get(&self, mid: &u64) -> Option<&Arc<Message>> {
        let i = self
            .base
            .and_then(|b| mid.checked_sub(b))
            .map(|i| i as usize);
        match i.and_then(|i| self.dense.get(i)) {
            Some(Some(m)) => Some(m),
            _ => self.sparse.get(mid),
        }
    }

    fn clear(&mut self) {
        *self = Msgs::default();
    }
}

pub struct Replay {
    sessions: HashMap<u32, SessionImage>,
    msgs: Msgs,
    retained: HashMap<ByteStr, Arc<Message>>,
    held: HashMap<u64, Arc<Message>>,
    seen: HashSet<u64>,
    /// Unix second of this run's broker second 0.
    epoch_unix: u64,
    next_mid: u64,
    orphans: u64,
}

/// The marker of a delivery that came through a shared subscription (only
/// whether it did matters after a restart).
fn share_marker() -> Arc<(ByteStr, ByteStr)> {
    Arc::new((ByteStr::default(), ByteStr::default()))
}

/// A message from its record; `expires` (unix second, 0: never) becomes a
/// broker second of this run (0 if already past).
pub fn message(p: Publish, expires: u64, uid: u64, epoch_unix: u64) -> Arc<Message> {
    Arc::new(Message {
        topic: p.topic,
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        properties: p.properties,
        origin: None,
        expires_at: (expires != 0).then(|| expires.saturating_sub(epoch_unix)),
        uid,
        stamp: 0,
    })
}

impl Replay {
    pub fn new(epoch_unix: u64) -> Replay {
        Replay {
            sessions: HashMap::default(),
            msgs: Msgs::default(),
            retained: HashMap::default(),
            held: HashMap::default(),
            seen: HashSet::new(),
            epoch_unix,
            next_mid: 1,
            orphans: 0,
        }
    }

    fn session(&mut self, sid: u32) -> Option<&mut Session> {
        match self.sessions.get_mut(&sid) {
            Some(s) => Some(&mut s.session),
            None => {
                self.orphans += 1;
                None
            }
        }
    }

    pub fn apply(&mut self, rec: Rec) {
        match rec {
            Rec::SnapBegin => {
                // A snapshot states everything: start from nothing.
                self.sessions.clear();
                self.msgs.clear();
                self.retained.clear();
                self.held.clear();
            }
            Rec::SnapEnd => {}
            Rec::Session {
                sid,
                client_id,
                username,
                expiry,
                offline_at,
                will,
            } => {
                let img = self.sessions.entry(sid).or_insert_with(|| SessionImage {
                    sid,
                    session: Session::new(client_id.clone(), true, 1, usize::MAX),
                    username: None,
                    expiry,
                    offline_at,
                    will: None,
                });
                if *img.session.client_id != *client_id {
                    // A sid is only reused after its SessionDel.
                    img.session = Session::new(client_id, true, 1, usize::MAX);
                }
                img.session.logged = true;
                img.username = username;
                img.expiry = expiry;
                img.offline_at = offline_at;
                img.will = will;
            }
            Rec::SessionDel { sid } => {
                self.sessions.remove(&sid);
            }
            Rec::Sub {
                sid,
                filter,
                opts,
                sub_id,
            } => {
                if let Some(s) = self.session(sid) {
                    s.subs.insert(filter, (opts, sub_id));
                }
            }
            Rec::Unsub { sid, filter } => {
                if let Some(s) = self.session(sid) {
                    s.subs.remove(&filter);
                }
            }
            Rec::Msg {
                mid,
                expires,
                uid,
                publish,
            } => {
                self.next_mid = self.next_mid.max(mid + 1);
                let m = message(publish, expires, uid, self.epoch_unix);
                self.msgs.insert(mid, m);
            }
            Rec::Enq {
                sid,
                mid,
                qos,
                retain,
                share,
                sub_ids,
            } => {
                let Some(msg) = self.msgs.get(&mid).cloned() else {
                    self.orphans += 1;
                    return;
                };
                if msg.uid != 0 {
                    self.seen.insert(msg.uid);
                }
                if let Some(s) = self.session(sid) {
                    s.restore_enqueue(Delivery {
                        msg,
                        qos,
                        retain,
                        sub_ids,
                        share: share.then(share_marker),
                    });
                }
            }
            Rec::Sent {
                sid,
                pid,
                discarded,
            } => {
                if let Some(s) = self.session(sid) {
                    s.restore_sent(pid, discarded);
                }
            }
            Rec::Ack { sid, pid } => {
                if let Some(s) = self.session(sid) {
                    s.restore_ack(pid);
                }
            }
            Rec::Rel { sid, pid } => {
                if let Some(s) = self.session(sid) {
                    s.restore_rel(pid);
                }
            }
            Rec::Unshare { sid } => {
                if let Some(s) = self.session(sid) {
                    s.take_where(|d| d.share.is_some());
                }
            }
            Rec::In2 { sid, pid } => {
                if let Some(s) = self.session(sid) {
                    s.incoming_qos2(pid);
                }
            }
            Rec::In2Rel { sid, pid } => {
                if let Some(s) = self.session(sid) {
                    s.release_incoming(pid);
                }
            }
            Rec::NextPid { sid, pid } => {
                if let Some(s) = self.session(sid) {
                    s.restore_next_pid(pid);
                }
            }
            Rec::Retain { mid } => match self.msgs.get(&mid) {
                Some(m) if m.payload.is_empty() => {
                    self.retained.remove(&m.topic);
                }
                Some(m) => {
                    self.retained.insert(m.topic.clone(), m.clone());
                }
                None => self.orphans += 1,
            },
            Rec::RetainDel { topic } => {
                self.retained.remove(&topic);
            }
            Rec::Held { mid, sid, pid } => {
                match self.msgs.get(&mid) {
                    Some(m) => {
                        self.held.insert(m.uid, m.clone());
                    }
                    None => self.orphans += 1,
                }
                if sid != u32::MAX {
                    if let Some(s) = self.session(sid) {
                        s.incoming_qos2(pid);
                    }
                }
            }
            Rec::Routed { uid } => {
                self.held.remove(&uid);
            }
        }
    }

    pub fn finish(self) -> Image {
        let mut sessions: Vec<SessionImage> = self.sessions.into_values().collect();
        // Deterministic order (tests, and the order sessions are restored in).
        sessions.sort_by_key(|s| s.sid);
        for s in &mut sessions {
            s.session.restore_clear_shares();
        }
        let retained: Vec<Arc<Message>> = self
            .retained
            .into_values()
            .filter(|m| m.expires_at != Some(0))
            .collect();
        let mut reroute: Vec<(u64, Arc<Message>)> = self.held.into_iter().collect();
        reroute.sort_by_key(|(uid, _)| *uid);
        Image {
            sessions,
            retained,
            next_mid: self.next_mid,
            orphans: self.orphans,
            reroute: reroute.into_iter().map(|(_, m)| m).collect(),
            seen: self.seen,
        }
    }
}
