//! The broker's side of durability: what it logs, when a connection's
//! output may go (its *gate*: the log epoch and the other shards'
//! durability barriers it depends on), retained messages ordered by their
//! owner shard, restoring the state recovered at start, and snapshots.

use super::conn::Conn;
use super::{home_shard, SessionEntry, Shard, ShardMsg, State, Sub, TimerEvent};
use crate::session::Message;
use crate::store::log::Log;
use crate::store::record::Rec;
use crate::store::replay::Image;
use crate::store::snapshot::SnapWriter;
use std::collections::HashMap;
use std::sync::Arc;
use tarta_proto::acl::SubscribeAccess;
use tarta_proto::mqtt::{QoS, Will};
use tarta_proto::topic::TopicFilter;
use tracing::warn;

/// `$SYS` statistics are republished every interval: never logged.
fn is_sys(topic: &str) -> bool {
    topic.starts_with("$SYS/")
}

impl Shard {
    /// A message with acknowledgements went to another shard: the
    /// publisher's acknowledgement waits for that shard's log (a barrier).
    pub(super) fn want_barrier(&self, st: &mut State, msg: &Message, to: Option<usize>) {
        let durable = to.is_none_or(|j| st.durable_peers[j]);
        if durable && st.log.is_some() && msg.qos != QoS::AtMostOnce && !is_sys(&msg.topic) {
            st.dur_want = true;
            st.dur_reqs += 1;
        }
    }

    /// What the log and the barriers stand at, before a packet is handled.
    pub fn log_marks(&self) -> Option<(u64, u64)> {
        let st = self.st.borrow();
        st.log.as_ref().map(|l| (l.gating_appends(), st.dur_reqs))
    }

    /// After the packet: if it logged something, or forwarded a message
    /// to other shards' logs, the connection's output waits for that.
    pub fn gate_after(&self, conn: &Conn, before: Option<(u64, u64)>) {
        let Some((appends, reqs)) = before else {
            return;
        };
        let st = self.st.borrow();
        let Some(log) = &st.log else { return };
        if log.gating_appends() != appends {
            conn.gate.set(log.gate());
        }
        if st.dur_reqs != reqs {
            conn.barrier.set(st.dur_issued.wrapping_add(1) as u16);
        }
    }

    /// Before the outboxes go out: one barrier for everything forwarded
    /// since the last one, after it in every channel.
    pub fn send_barriers(&self, st: &mut State) {
        if !st.dur_want {
            return;
        }
        st.dur_want = false;
        st.dur_issued = st.dur_issued.wrapping_add(1);
        let seq = st.dur_issued;
        for to in 0..self.n {
            if to != self.id {
                self.push_out(st, to, ShardMsg::DurBarrier(seq));
            }
        }
    }

    pub(super) fn dur_barrier(&self, st: &mut State, from: usize, seq: u32) {
        match &mut st.log {
            Some(log) if !log.idle() => {
                let epoch = log.needed();
                log.barriers.push((epoch, from, seq));
            }
            _ => self.push_out(st, from, ShardMsg::DurAck(seq)),
        }
    }

    pub(super) fn dur_ack(&self, st: &mut State, from: usize, seq: u32) {
        let lag_old = st.dur_issued.wrapping_sub(st.dur_acked[from]);
        let lag_new = st.dur_issued.wrapping_sub(seq);
        if lag_new < lag_old {
            st.dur_acked[from] = seq;
        }
        self.confirm_routed(st);
        self.wake_gated();
    }

    fn wake_gated(&self) {
        for w in self.gate_waiters.take() {
            w.wake();
        }
    }

    /// Whether the connection's queued output must wait for durability.
    pub fn gated(&self, conn: &Conn) -> bool {
        let st = self.st.borrow();
        let Some(log) = &st.log else {
            return false;
        };
        log.blocks(conn.gate.get()) || self.barrier_blocks(&st, conn.barrier.get())
    }

    /// Whether durability barrier `b` (its low 16 bits) is still waiting
    /// for another shard's answer.
    fn barrier_blocks(&self, st: &State, b: u16) -> bool {
        // The other shard furthest behind.
        let Some(min) = (0..self.n)
            .filter(|j| *j != self.id)
            .map(|j| st.dur_acked[j])
            .max_by_key(|a| st.dur_issued.wrapping_sub(*a))
        else {
            return false;
        };
        let top = st.dur_issued.wrapping_add(u32::from(st.dur_want)) as u16;
        let min = min as u16;
        b.wrapping_sub(min).wrapping_sub(1) < top.wrapping_sub(min)
    }

    /// A fresh identity for a QoS 2 message (`Message::uid`).
    pub(super) fn new_uid(&self, st: &mut State) -> u64 {
        if st.next_uid == 0 {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(self.id);
            h.write_u64(crate::store::unix_now());
            st.next_uid = h.finish() | 1;
        }
        let uid = st.next_uid;
        st.next_uid = st.next_uid.wrapping_add(2);
        uid
    }

    /// A QoS 2 message from a persistent session: logged with its
    /// identity, routed once that is durable (`after_commit`); until a
    /// `Routed` record, a restart routes it again, and shards that already
    /// queued it (by identity) do not queue it twice.
    pub(super) fn hold_qos2(&self, st: &mut State, msg: Arc<Message>, sid: usize, pid: u16) {
        let Some(log) = st.log.as_mut() else {
            self.route(st, msg);
            return;
        };
        let mid = log.message(&msg);
        let sid = sid as u32;
        log.append(&Rec::Held { mid, sid, pid }, true);
        let epoch = log.gate();
        st.held2.push((epoch, msg));
    }

    /// Routes held QoS 2 messages (after their commit, or again after a
    /// restart); each is recorded `Routed` once every log it reached has
    /// made it durable (`confirm_routed`).
    pub(super) fn reroute(&self, st: &mut State, msgs: Vec<Arc<Message>>) {
        for msg in msgs {
            let reqs = st.dur_reqs;
            self.route(st, msg.clone());
            let Some(log) = st.log.as_ref() else { continue };
            let epoch = log.gate();
            let barrier = if st.dur_reqs != reqs {
                st.dur_issued.wrapping_add(1) as u16
            } else {
                0
            };
            st.routed2.push((epoch, barrier, msg));
        }
        self.confirm_routed(st);
    }

    /// Logs `Routed` for the QoS 2 messages whose deliveries are durable
    /// everywhere (until then a restart routes them again).
    fn confirm_routed(&self, st: &mut State) {
        if st.routed2.is_empty() {
            return;
        }
        let all = std::mem::take(&mut st.routed2);
        for (epoch, barrier, msg) in all {
            let waiting = st.log.as_ref().is_some_and(|l| l.blocks(epoch))
                || self.barrier_blocks(st, barrier);
            if waiting {
                st.routed2.push((epoch, barrier, msg));
            } else if let Some(log) = st.log.as_mut() {
                log.append(&Rec::Routed { uid: msg.uid }, false);
            }
        }
    }

    /// The log committed an epoch: route the QoS 2 messages it held, answer
    /// the barriers it satisfies and let gated connections write.
    pub fn after_commit(&self) {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        if let Some(log) = &st.log {
            if st.held2.first().is_some_and(|(e, _)| !log.blocks(*e)) {
                let all = std::mem::take(&mut st.held2);
                let mut ready = Vec::new();
                for (epoch, msg) in all {
                    if st.log.as_ref().is_some_and(|l| l.blocks(epoch)) {
                        st.held2.push((epoch, msg));
                    } else {
                        ready.push(msg);
                    }
                }
                self.reroute(st, ready);
            }
        }
        self.confirm_routed(st);
        let Some(log) = &mut st.log else { return };
        if !log.barriers.is_empty() {
            let all = std::mem::take(&mut log.barriers);
            let (done, wait): (Vec<_>, Vec<_>) = all
                .into_iter()
                .partition(|(epoch, _, _)| !log.blocks(*epoch));
            log.barriers = wait;
            for (_, from, seq) in done {
                self.push_out(st, from, ShardMsg::DurAck(seq));
            }
        }
        self.wake_gated();
    }

    /// The owner shard of a retained topic: it orders the writes to it
    /// (logs them), and every replica follows.
    pub(super) fn owner_retain(&self, st: &mut State, msg: &Arc<Message>, _from: Option<usize>) {
        st.retained.set(msg);
        if let (Some(log), false) = (st.log.as_mut(), is_sys(&msg.topic)) {
            if msg.payload.is_empty() {
                log.append(
                    &Rec::RetainDel {
                        topic: msg.topic.clone(),
                    },
                    true,
                );
            } else {
                let mid = log.message(msg);
                log.append(&Rec::Retain { mid }, true);
            }
        }
        for to in 0..self.n {
            if to != self.id {
                self.push_out(st, to, ShardMsg::Replica(msg.clone()));
            }
        }
    }

    /// Starts the shard's log and restores what was recovered: this
    /// shard's sessions (at their numbers in the log) and every retained
    /// message (the replica). Runs before the shard serves anyone.
    pub fn restore(&self, img: Image, retained: &[Arc<Message>], log: Log) {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        let now_unix = crate::store::unix_now();
        st.log = Some(log);
        for m in retained {
            st.retained.set(m);
        }
        st.seen_uids = img.seen;
        let reroute = img.reroute;
        let mut entries = Vec::new();
        for mut s in img.sessions {
            let id = s.session.client_id.clone();
            if home_shard(&id, self.n) != self.id {
                warn!(client_id = %id, "recovered session is not homed on this shard: ignored");
                continue;
            }
            s.session.window = self.cfg.max_inflight;
            s.session.set_max_queued(self.cfg.max_queued_messages);
            s.session.persistent = true;
            s.session.logged = true;
            let user = s.username.clone();
            let acl = self.client_acl(&id, user.as_deref());
            let entry = SessionEntry {
                session: s.session,
                conn: None,
                acl,
                generation: 0,
                expiry: s.expiry,
                rare: None,
                congested: false,
            };
            let mut entry = entry;
            entry.set_will(s.will.as_ref().map(|(w, _)| w.clone()));
            entry.set_username(user);
            entries.push((s.sid as usize, entry, s.offline_at, s.will.map(|(_, d)| d)));
        }
        let mut timers = Vec::new();
        entries.sort_by_key(|(sid, ..)| *sid);
        entries.dedup_by_key(|(sid, ..)| *sid);
        let mut slab_entries = Vec::with_capacity(entries.len());
        for (sid, entry, offline_at, will_delay) in entries {
            timers.push((sid, offline_at, will_delay));
            slab_entries.push((sid, Box::new(entry)));
        }
        // At the numbers the log knows them by.
        let slab: slab::Slab<Box<SessionEntry>> = slab_entries.into_iter().collect();
        st.sessions = slab;
        st.logged_sessions = st.sessions.len();
        if st.logged_sessions > 0 {
            self.announce_durable(st, true);
        }
        for (sid, _) in st.sessions.iter() {
            st.clients.insert(sid, &st.sessions);
        }
        let sids: Vec<usize> = st.sessions.iter().map(|(sid, _)| sid).collect();
        for sid in sids {
            let Some(e) = st.sessions.get(sid) else {
                continue;
            };
            let subs: Vec<_> = e
                .session
                .subs
                .iter()
                .map(|(f, (o, id))| (f.clone(), *o, *id))
                .collect();
            for (raw, opts, sub_id) in subs {
                let Ok(filter) = TopicFilter::new(raw.clone()) else {
                    continue;
                };
                if filter.share().is_some() {
                    // Shared groups have connected members only.
                    continue;
                }
                let filtered = st
                    .sessions
                    .get(sid)
                    .and_then(|e| e.acl.as_ref())
                    .is_some_and(|a| a.subscribe(&raw) != SubscribeAccess::Granted);
                if !st.index.contains_filter(&raw) {
                    self.route_change(st, &raw, true);
                }
                st.index.insert(
                    &raw,
                    sid,
                    Sub {
                        opts,
                        sub_id,
                        filtered,
                    },
                );
                st.route_gen += 1;
            }
        }
        // Timers: session expiry counts from when it went offline (a
        // session connected at the crash went offline now); a will not
        // yet published is due after its delay (at the earliest at the
        // first tick, once the other shards' routes are known).
        let now = self.now.get();
        for (sid, offline_at, will_delay) in timers {
            let Some(e) = st.sessions.get(sid) else {
                continue;
            };
            let generation = e.generation;
            let expiry = e.expiry;
            let gone = if offline_at == 0 {
                0
            } else {
                now_unix.saturating_sub(offline_at)
            };
            if let Some(delay) = will_delay {
                let left = u64::from(delay).saturating_sub(gone).max(1);
                self.at(st, now + left, TimerEvent::Will { sid, generation });
            }
            if expiry != u32::MAX {
                let left = u64::from(expiry).saturating_sub(gone) + 1;
                self.at(
                    st,
                    now + left,
                    TimerEvent::SessionExpiry { sid, generation },
                );
            }
            if offline_at == 0 {
                let will = st.sessions.get(sid).and_then(|e| e.pending_will().cloned());
                self.log_session(st, sid, now_unix.max(1), will.as_ref());
            }
        }
        if !reroute.is_empty() {
            if self.n == 1 {
                self.reroute(st, reroute);
            } else {
                // Routed again once every other shard has sent its routes
                // (their route changes precede their answer to this barrier).
                st.route_seq += 1;
                let seq = st.route_seq;
                for to in 0..self.n {
                    if to != self.id {
                        self.push_out(st, to, ShardMsg::RouteBarrier(seq));
                    }
                }
                st.reroute = Some((seq, reroute));
            }
        }
    }

    /// Appends a persistent session's record (gating: CONNACK and the
    /// like wait for it).
    pub(super) fn log_session(
        &self,
        st: &mut State,
        sid: usize,
        offline_at: u64,
        will: Option<&Will>,
    ) {
        let Some(log) = st.log.as_mut() else { return };
        let Some(e) = st.sessions.get_mut(sid) else {
            return;
        };
        let first = !std::mem::replace(&mut e.session.logged, true);
        let will = will.map(|w| {
            let delay = w.properties.will_delay_interval().unwrap_or(0);
            (w.clone(), delay)
        });
        log.append(
            &Rec::Session {
                sid: sid as u32,
                client_id: e.session.client_id.to_string().into(),
                username: e.username().cloned(),
                expiry: e.expiry,
                offline_at,
                will,
            },
            true,
        );
        if first {
            st.logged_sessions += 1;
            if st.logged_sessions == 1 {
                self.announce_durable(st, true);
            }
        }
    }

    /// Unix second an offline session went offline (from its expiry timer;
    /// now if it never expires).
    pub(super) fn offline_since(&self, st: &State, sid: usize) -> u64 {
        let Some(e) = st.sessions.get(sid) else {
            return crate::store::unix_now();
        };
        let epoch_unix = st.log.as_ref().map_or(0, |l| l.epoch_unix);
        st.timers
            .iter()
            .find_map(|(&(at, _), ev)| match ev {
                TimerEvent::SessionExpiry { sid: s, generation }
                    if *s == sid && *generation == e.generation =>
                {
                    Some((epoch_unix + at).saturating_sub(u64::from(e.expiry) + 1))
                }
                _ => None,
            })
            .unwrap_or_else(crate::store::unix_now)
            .max(1)
    }

    /// A logged session ends (or stops being persistent).
    pub(super) fn log_session_del(&self, st: &mut State, sid: usize) {
        let Some(e) = st.sessions.get_mut(sid) else {
            return;
        };
        if !std::mem::take(&mut e.session.logged) {
            return;
        }
        if let Some(log) = st.log.as_mut() {
            log.append(&Rec::SessionDel { sid: sid as u32 }, false);
        }
        st.logged_sessions = st.logged_sessions.saturating_sub(1);
        if st.logged_sessions == 0 {
            self.announce_durable(st, false);
        }
    }

    /// Tells the other shards whether this one has persistent sessions.
    fn announce_durable(&self, st: &mut State, on: bool) {
        for to in 0..self.n {
            if to != self.id {
                self.push_out(st, to, ShardMsg::Durable(on));
            }
        }
        // The next SUBACK waits until they know (a route barrier).
        st.announce = on;
    }

    /// Appends a record about a logged session (no-op otherwise).
    pub(super) fn log_rec(&self, st: &mut State, sid: usize, rec: Rec, gating: bool) {
        let logged = st.sessions.get(sid).is_some_and(|e| e.session.logged);
        if let (true, Some(log)) = (logged, st.log.as_mut()) {
            log.append(&rec, gating);
        }
    }

    /// The whole live state of this shard as a snapshot (compaction): it
    /// replaces what was appended and not yet written, and commits as the
    /// returned epoch.
    pub fn compact_into(&self, out: &mut Vec<u8>) -> Option<u32> {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        let log = st.log.as_mut()?;
        let epoch = log.begin_snapshot();
        let epoch_unix = log.epoch_unix;
        let next_mid = log.next_mid_value();
        // When offline sessions expire (their expiry counts from going offline).
        let mut expires: HashMap<usize, u64> = HashMap::new();
        for ((at, _), ev) in &st.timers {
            if let TimerEvent::SessionExpiry { sid, generation } = ev {
                if st
                    .sessions
                    .get(*sid)
                    .is_some_and(|e| e.generation == *generation)
                {
                    expires.insert(*sid, *at);
                }
            }
        }
        let now_unix = crate::store::unix_now();
        let mut w = SnapWriter::begin(out, next_mid, epoch_unix);
        for (sid, e) in st.sessions.iter() {
            if !e.session.logged {
                continue;
            }
            let (offline_at, will) = match &e.conn {
                Some(c) => (0, c.state.borrow().will.as_deref().cloned()),
                None => {
                    let at = match expires.get(&sid) {
                        Some(at) => (epoch_unix + at)
                            .saturating_sub(u64::from(e.expiry) + 1)
                            .max(1),
                        None => now_unix.max(1),
                    };
                    (at, e.pending_will().cloned())
                }
            };
            let user = e.username();
            w.session(
                sid as u32,
                &e.session,
                e.expiry,
                offline_at,
                will.as_ref(),
                user,
            );
        }
        st.retained.for_each(|m| {
            if home_shard(&m.topic, self.n) == self.id && !is_sys(&m.topic) {
                w.retained(m);
            }
        });
        for m in st
            .held2
            .iter()
            .map(|h| &h.1)
            .chain(st.routed2.iter().map(|r| &r.2))
        {
            w.held(m);
        }
        if let Some((_, msgs)) = &st.reroute {
            for m in msgs {
                w.held(m);
            }
        }
        let next = w.end();
        if let Some(log) = st.log.as_mut() {
            log.snapshot_done(next);
        }
        Some(epoch)
    }
}
