//! The admin API's questions, as one shard answers them: its clients, one
//! client, disconnecting one, the retained topics. A request arrives on any
//! shard's HTTP listener; that shard asks every shard (itself directly, the
//! others over the mesh as `ShardMsg::Admin`) and collects the answers in an
//! `AdminWait` the HTTP task polls. Nothing waits on a shard: answers are
//! plain data built from the shard's own state.

use super::conn::CloseReason;
use super::{home_shard, Shard, ShardMsg, State};
use std::collections::BinaryHeap;
use std::task::Waker;

/// A question for one shard.
#[derive(Debug, Clone)]
pub enum AdminQuery {
    /// The shard's sessions with client ids after `after`, the first
    /// `limit` in order (a page).
    Clients { after: String, limit: usize },
    /// One client (asked of its home shard).
    Client(String),
    /// Close one client's connection (5.0: DISCONNECT 0x98).
    Disconnect(String),
    /// Retained topics matching `filter`, after `after`, at most `limit`
    /// (the shard's replica holds them all: asked of one shard).
    Retained {
        filter: String,
        after: String,
        limit: usize,
    },
}

/// One client as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub client_id: String,
    pub username: Option<String>,
    pub connected: bool,
    pub peer: Option<String>,
    pub protocol: Option<&'static str>,
    /// Index of the listener it connected through.
    pub listener: Option<u16>,
    pub shard: usize,
    /// Seconds since the connection was accepted.
    pub connected_for: Option<u64>,
    pub persistent: bool,
    pub subscriptions: usize,
    pub queued: usize,
    pub inflight: usize,
    /// Filters and their QoS (only for `Client`).
    pub filters: Vec<(String, u8)>,
}

/// A shard's answer.
#[derive(Debug, Clone)]
pub enum AdminReply {
    Clients(Vec<ClientInfo>),
    Client(Option<ClientInfo>),
    Disconnected(bool),
    Retained(Vec<(String, usize)>),
}

/// An admin message between shards.
#[derive(Debug)]
pub enum AdminMsg {
    Query { id: u64, q: AdminQuery },
    Reply { id: u64, r: AdminReply },
}

/// Answers collected for one request.
#[derive(Debug, Default)]
pub struct AdminWait {
    pub waiting: usize,
    pub replies: Vec<AdminReply>,
    pub waker: Option<Waker>,
}

fn protocol_name(p: tarta_proto::mqtt::Protocol) -> &'static str {
    use tarta_proto::mqtt::Protocol;
    match p {
        Protocol::V31 => "3.1",
        Protocol::V311 => "3.1.1",
        Protocol::V5 => "5.0",
    }
}

impl Shard {
    fn client_info(&self, st: &State, sid: usize, filters: bool) -> Option<ClientInfo> {
        let e = st.sessions.get(sid)?;
        let conn = e.conn.as_ref();
        let cs = conn.map(|c| c.state.borrow());
        Some(ClientInfo {
            client_id: e.session.client_id.to_string(),
            username: e.username().map(|u| u.to_string()),
            connected: conn.is_some(),
            peer: conn.map(|c| c.peer().to_string()),
            protocol: cs.as_ref().map(|s| protocol_name(s.protocol)),
            listener: cs.as_ref().map(|s| s.listener),
            shard: self.id,
            connected_for: conn.map(|c| self.now.get().saturating_sub(c.accepted_at())),
            persistent: e.session.persistent,
            subscriptions: e.session.subs.len(),
            queued: e.session.queued_len(),
            inflight: e.session.inflight_len(),
            filters: if filters {
                e.session
                    .subs
                    .iter()
                    .map(|(f, (o, _))| (f.to_string(), o.qos as u8))
                    .collect()
            } else {
                Vec::new()
            },
        })
    }

    /// Answers a question about this shard's state.
    pub fn admin_answer(&self, q: &AdminQuery) -> AdminReply {
        let st = self.st.borrow();
        self.answer(&st, q)
    }

    fn answer(&self, st: &State, q: &AdminQuery) -> AdminReply {
        match q {
            AdminQuery::Clients { after, limit } => {
                // The `limit` smallest ids after `after`: a bounded heap,
                // so a page costs one walk and `limit` entries.
                let mut heap: BinaryHeap<(&str, usize)> = BinaryHeap::new();
                for (sid, e) in st.sessions.iter() {
                    let id = &*e.session.client_id;
                    if id <= after.as_str() {
                        continue;
                    }
                    if heap.len() < *limit {
                        heap.push((id, sid));
                    } else if heap.peek().is_some_and(|(top, _)| id < *top) {
                        heap.pop();
                        heap.push((id, sid));
                    }
                }
                AdminReply::Clients(
                    heap.into_sorted_vec()
                        .into_iter()
                        .filter_map(|(_, sid)| self.client_info(st, sid, false))
                        .collect(),
                )
            }
            AdminQuery::Client(id) => {
                let sid = st
                    .clients
                    .get(&tarta_proto::ByteStr::from(id.clone()), &st.sessions);
                AdminReply::Client(sid.and_then(|sid| self.client_info(st, sid, true)))
            }
            AdminQuery::Disconnect(id) => {
                let conn = st
                    .clients
                    .get(&tarta_proto::ByteStr::from(id.clone()), &st.sessions)
                    .and_then(|sid| st.sessions.get(sid))
                    .and_then(|e| e.conn.clone());
                AdminReply::Disconnected(match conn {
                    Some(c) => {
                        c.request_close(CloseReason::Administrative);
                        c.wake();
                        true
                    }
                    None => false,
                })
            }
            AdminQuery::Retained {
                filter,
                after,
                limit,
            } => {
                // The `limit` smallest topics after `after`, without
                // sorting them all (a max-heap of `limit`).
                let mut heap: BinaryHeap<(String, usize)> = BinaryHeap::new();
                st.retained.matching(filter, |m| {
                    let t = m.topic.as_str();
                    if t <= after.as_str() {
                        return;
                    }
                    if heap.len() < *limit {
                        heap.push((t.to_string(), m.payload.len()));
                    } else if heap.peek().is_some_and(|(top, _)| t < top.as_str()) {
                        heap.pop();
                        heap.push((t.to_string(), m.payload.len()));
                    }
                });
                AdminReply::Retained(heap.into_sorted_vec())
            }
        }
    }

    /// Sends question `id` to `shards` (not this one) and registers the
    /// wait for their answers plus `local` (this shard's, if any).
    pub fn admin_ask(&self, id: u64, q: &AdminQuery, shards: &[usize], local: Option<AdminReply>) {
        let mut st = self.st.borrow_mut();
        let mut wait = AdminWait::default();
        for &s in shards {
            if s == self.id {
                continue;
            }
            wait.waiting += 1;
            let msg = AdminMsg::Query { id, q: q.clone() };
            self.push_out(&mut st, s, ShardMsg::Admin(Box::new(msg)));
        }
        wait.replies.extend(local);
        self.admin_waits.borrow_mut().insert(id, wait);
    }

    /// The shard that holds `client_id`'s session.
    pub fn home_of(&self, client_id: &str) -> usize {
        home_shard(client_id, self.n)
    }

    /// An admin message from shard `from`.
    pub(crate) fn on_admin(&self, st: &mut State, from: usize, m: AdminMsg) {
        match m {
            AdminMsg::Query { id, q } => {
                let r = self.answer(st, &q);
                self.push_out(
                    st,
                    from,
                    ShardMsg::Admin(Box::new(AdminMsg::Reply { id, r })),
                );
            }
            AdminMsg::Reply { id, r } => {
                if let Some(w) = self.admin_waits.borrow_mut().get_mut(&id) {
                    w.replies.push(r);
                    w.waiting = w.waiting.saturating_sub(1);
                    if w.waiting == 0 {
                        if let Some(k) = w.waker.take() {
                            k.wake();
                        }
                    }
                }
            }
        }
    }
}
