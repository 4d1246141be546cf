//! Bridges as the broker sees them. A bridge is a persistent session,
//! `$bridge/NAME`, homed on the shard of that id, whose subscriptions are
//! the bridge's out rules (no local, retain as published). While the link
//! is up the runtime attaches its outgoing connection to the session like
//! a client's, so the session's queue, inflight window, packet ids and the
//! write-ahead log do what they do for any persistent client: a message for
//! the remote is logged before the local publisher's acknowledgement and
//! leaves the log only with the remote's PUBACK/PUBCOMP. MQTT's
//! acknowledgements are symmetric, so the remote's PUBACK/PUBREC/PUBCOMP
//! are the session's client's, and the broker's PUBACK/PUBREC/PUBREL/
//! PUBCOMP go to the remote as they are. What differs: topics are mapped
//! both ways (`config::bridge::Bridge::map_out`/`map_in`), the buffer has a
//! byte bound with an overflow policy, and the link's state is published.

use super::client::{self, Flow, SubBatch};
use super::conn::{CloseReason, Conn};
use super::{SessionEntry, Shard, State};
use crate::config::bridge::{Bridge, Overflow};
use crate::session::{Delivery, Session};
use crate::store::record::Rec;
use bytes::Bytes;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use tarta_proto::mqtt::{Packet, Protocol, Publish, QoS, SubOptions};
use tarta_proto::topic::TopicFilter;
use tarta_proto::ByteStr;
use tracing::warn;

/// One bridge's state and counters, shared by every shard (the home shard
/// writes them; publishers' shards read `full` and count `rejected`).
#[derive(Default)]
pub struct BridgeStatus {
    /// The link is up (CONNACK received, session attached).
    pub connected: AtomicBool,
    /// The buffer is at its bound (`reject_new` refuses new messages).
    pub full: AtomicBool,
    /// Messages buffered for the remote: queued and in flight.
    pub queued: AtomicU64,
    pub queued_bytes: AtomicU64,
    /// The broker second the oldest buffered message was published here
    /// (0: none buffered, or it was recovered from the log at start).
    pub oldest_at: AtomicU64,
    /// Messages the remote acknowledged (or, QoS 0, that were sent).
    pub forwarded: AtomicU64,
    /// Messages from the remote published here.
    pub received: AtomicU64,
    /// Dropped: the oldest when full (`drop_oldest`), QoS 0 while full.
    pub dropped: AtomicU64,
    /// Refused to local publishers because the buffer was full (`reject_new`).
    pub rejected: AtomicU64,
    /// Refused by the remote (an acknowledgement with an error reason).
    pub remote_refused: AtomicU64,
    /// Links established.
    pub connects: AtomicU64,
}

/// Every bridge's status (index = `Config::bridges` index).
#[derive(Default)]
pub struct Bridges {
    pub status: Vec<BridgeStatus>,
    /// How many bridges are full: a publish checks the rules only then.
    pub full: AtomicUsize,
}

impl Bridges {
    pub fn new(n: usize) -> Bridges {
        Bridges {
            status: (0..n).map(|_| BridgeStatus::default()).collect(),
            full: AtomicUsize::new(0),
        }
    }
}

/// What a delivery weighs in a bridge's buffer (as `Session::bytes` counts).
fn weight(d: &Delivery) -> u64 {
    (d.msg.payload.len() + d.msg.topic.len()) as u64
}

/// The remote's limits from its CONNACK.
pub struct RemoteLimits {
    pub protocol: Protocol,
    pub receive_maximum: u16,
    pub maximum_packet_size: u32,
    pub topic_alias_maximum: u16,
}

impl SessionEntry {
    /// The bridge this session is (index in `Config::bridges`).
    pub fn bridge(&self) -> Option<usize> {
        self.rare.as_ref().and_then(|r| r.bridge).map(usize::from)
    }
}

impl Shard {
    fn bridge_status(&self, idx: usize) -> Option<Arc<Bridges>> {
        let b = self.bridges.borrow().clone();
        (idx < b.status.len()).then_some(b)
    }

    /// At start, before clients are served: creates (or finds, recovered
    /// from the log) the session of every bridge homed here and makes its
    /// subscriptions exactly the out rules.
    pub fn bridge_setup(&self) {
        for (idx, b) in self.cfg.bridges.iter().enumerate() {
            let id = b.session_id();
            if super::home_shard(&id, self.n) != self.id {
                continue;
            }
            let mut st = self.st.borrow_mut();
            let st = &mut *st;
            let key = ByteStr::from(id.clone());
            let sid = match st.clients.get(&key, &st.sessions) {
                Some(sid) => sid,
                None => {
                    let session = Session::new(key, true, 1, usize::MAX);
                    let sid = st.sessions.insert(Box::new(SessionEntry {
                        session,
                        conn: None,
                        acl: None,
                        generation: 0,
                        expiry: u32::MAX,
                        rare: None,
                        congested: false,
                    }));
                    st.clients.insert(sid, &st.sessions);
                    sid
                }
            };
            if let Some(e) = st.sessions.get_mut(sid) {
                e.rare_mut().bridge = Some(idx as u16);
                e.expiry = u32::MAX;
                e.acl = None;
                e.session.persistent = true;
                e.session.set_max_queued(usize::MAX);
            }
            st.bridge_sids[idx] = Some(sid);
            self.log_session(st, sid, crate::store::unix_now().max(1), None);
            let wanted: Vec<(ByteStr, SubOptions)> = b
                .rules
                .iter()
                .filter(|r| r.out())
                .map(|r| {
                    let opts = SubOptions {
                        qos: if b.queue_qos0 {
                            r.qos.max(QoS::AtLeastOnce)
                        } else {
                            r.qos
                        },
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: 1,
                    };
                    (ByteStr::from(r.local_filter.clone()), opts)
                })
                .collect();
            let stale: Vec<ByteStr> = st.sessions.get(sid).map_or(Vec::new(), |e| {
                e.session
                    .subs
                    .keys()
                    .filter(|f| !wanted.iter().any(|(w, _)| w == *f))
                    .cloned()
                    .collect()
            });
            for f in stale {
                client::unsubscribe_one(self, st, sid, &f);
            }
            let mut batch = SubBatch::default();
            for (raw, opts) in &wanted {
                let Ok(filter) = TopicFilter::new(raw.clone()) else {
                    continue;
                };
                let same = st
                    .sessions
                    .get(sid)
                    .and_then(|e| e.session.subs.get(raw))
                    .is_some_and(|(o, _)| o == opts);
                if !same {
                    batch.add(self, st, sid, raw, &filter, *opts, None, false);
                }
            }
            let (retained, _) = batch.finish(self, st, sid);
            for d in retained {
                self.deliver_to(st, sid, d, false);
            }
            self.bridge_refresh(st, idx);
            self.bridge_state_topic(st, idx, false);
        }
    }

    /// The link is up: `conn` becomes the session's connection and what was
    /// in flight is sent again (DUP), then the queue.
    pub fn bridge_attach(&self, idx: usize, conn: &Rc<Conn>, remote: &RemoteLimits) -> bool {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        let Some(sid) = st.bridge_sids.get(idx).copied().flatten() else {
            return false;
        };
        let Some(entry) = st.sessions.get_mut(sid) else {
            return false;
        };
        if let Some(old) = entry.conn.take() {
            old.request_close(CloseReason::TakenOver);
        }
        entry.conn = Some(conn.clone());
        entry.generation = entry.generation.wrapping_add(1);
        let max = self.cfg.bridges.get(idx).map_or(1, |b| b.max_inflight);
        entry.session.window = remote.receive_maximum.min(max).max(1);
        {
            let mut cs = conn.state.borrow_mut();
            cs.protocol = remote.protocol;
            cs.connected = true;
            cs.session = Some(sid);
            cs.max_packet_out = remote.maximum_packet_size;
            cs.alias_max_out = remote.topic_alias_maximum;
            cs.link = true;
        }
        // Online: logged with no offline time (it does not expire anyway).
        self.log_session(st, sid, 0, None);
        if let Some(entry) = st.sessions.get_mut(sid) {
            let log = st.log.as_mut().filter(|_| entry.session.logged);
            let bridge = self.cfg.bridges.get(idx);
            let mut out =
                super::conn::ConnOutbox::logged(conn, self.now.get(), log, sid).mapped(bridge);
            entry.session.resume(&mut out);
        }
        if let Some(b) = self.bridge_status(idx) {
            b.status[idx].connected.store(true, Relaxed);
            b.status[idx].connects.fetch_add(1, Relaxed);
        }
        self.bridge_state_topic(st, idx, true);
        conn.wake();
        true
    }

    /// The link is down: the session stays, offline, and keeps buffering.
    pub fn bridge_detach(&self, idx: usize, conn: &Rc<Conn>, why: &CloseReason) {
        client::on_closed(self, conn, why);
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        if let Some(sid) = st.bridge_sids.get(idx).copied().flatten() {
            if let Some(e) = st.sessions.get_mut(sid) {
                e.session.set_max_queued(usize::MAX);
            }
        }
        if let Some(b) = self.bridge_status(idx) {
            b.status[idx].connected.store(false, Relaxed);
        }
        self.bridge_state_topic(st, idx, false);
        self.bridge_refresh(st, idx);
    }

    /// A packet from the remote other than CONNACK, SUBACK, UNSUBACK and
    /// PINGRESP (which the link handles): a PUBLISH is mapped to its local
    /// topic and published as the bridge's session; acknowledgements go to
    /// the session.
    pub fn bridge_packet(&self, idx: usize, conn: &Rc<Conn>, p: Packet) -> Flow {
        let Some(b) = self.cfg.bridges.get(idx) else {
            return Flow::Close(CloseReason::Shutdown);
        };
        let status = self.bridge_status(idx);
        let count = |f: fn(&BridgeStatus) -> &AtomicU64| {
            if let Some(s) = &status {
                f(&s.status[idx]).fetch_add(1, Relaxed);
            }
        };
        let flow = match p {
            Packet::Publish(mut pb) => match b.map_in(&pb.topic) {
                Some(local) => {
                    count(|s| &s.received);
                    pb.topic = ByteStr::from(local);
                    client::on_packet(self, conn, Packet::Publish(pb))
                }
                None => {
                    // Outside every in rule: acknowledged, not published.
                    ack_unrouted(conn, &pb);
                    Flow::Continue
                }
            },
            Packet::PubAck(a) if a.reason >= 0x80 => {
                self.bridge_refused(b, idx, a.reason);
                client::on_packet(self, conn, Packet::PubAck(a))
            }
            Packet::PubRec(a) if a.reason >= 0x80 => {
                self.bridge_refused(b, idx, a.reason);
                client::on_packet(self, conn, Packet::PubRec(a))
            }
            p @ (Packet::PubAck(_) | Packet::PubComp(_)) => {
                count(|s| &s.forwarded);
                client::on_packet(self, conn, p)
            }
            p @ (Packet::PubRec(_) | Packet::PubRel(_)) => client::on_packet(self, conn, p),
            other => Flow::Close(CloseReason::Protocol(format!(
                "unexpected {} from the remote",
                packet_name(&other)
            ))),
        };
        let mut st = self.st.borrow_mut();
        self.bridge_refresh(&mut st, idx);
        flow
    }

    /// The remote refused a message (its acknowledgement's reason): it is
    /// done with it, so the buffer lets it go. Counted; logged at powers of two.
    fn bridge_refused(&self, b: &Bridge, idx: usize, reason: u8) {
        let Some(all) = self.bridge_status(idx) else {
            return;
        };
        let n = all.status[idx].remote_refused.fetch_add(1, Relaxed) + 1;
        if n.is_power_of_two() {
            warn!(bridge = %b.name, reason = format!("{reason:#04x}"), refused = n, "the remote refused a forwarded message");
        }
    }

    /// Before a delivery enters a bridge's buffer: QoS 0 kept as QoS 1 with
    /// `queue_qos0`, and the byte bound. False: not buffered.
    pub(super) fn bridge_admit(
        &self,
        st: &mut State,
        sid: usize,
        idx: usize,
        d: &mut Delivery,
    ) -> bool {
        let Some(b) = self.cfg.bridges.get(idx) else {
            return true;
        };
        if b.queue_qos0 && d.qos == QoS::AtMostOnce {
            d.qos = QoS::AtLeastOnce;
        }
        let w = weight(d);
        let Some(e) = st.sessions.get_mut(sid) else {
            return false;
        };
        if e.session.bytes() + w <= b.max_buffer_bytes {
            return true;
        }
        let status = self.bridge_status(idx);
        let dropped = |n: u64| {
            if let Some(s) = &status {
                s.status[idx].dropped.fetch_add(n, Relaxed);
            }
        };
        if d.qos == QoS::AtMostOnce {
            dropped(1);
            return false;
        }
        if b.overflow == Overflow::RejectNew {
            // Publishers here and on other shards are refused once they
            // see the bridge full; what was already on its way is kept.
            return true;
        }
        let mut n = 0;
        while e.session.bytes() + w > b.max_buffer_bytes {
            if e.session.drop_oldest().is_none() {
                break;
            }
            n += 1;
        }
        let next = e.session.next_pid();
        let pid = if next == 1 { u16::MAX } else { next - 1 };
        for _ in 0..n {
            // Replayed as "the front of the queue was discarded".
            let rec = Rec::Sent {
                sid: sid as u32,
                pid,
                discarded: true,
            };
            self.log_rec(st, sid, rec, false);
        }
        dropped(n);
        true
    }

    /// Publishes the buffer's figures and the `full` flag.
    pub(super) fn bridge_refresh(&self, st: &mut State, idx: usize) {
        let (Some(b), Some(all)) = (self.cfg.bridges.get(idx), self.bridge_status(idx)) else {
            return;
        };
        let Some(e) = st.bridge_sids[idx].and_then(|sid| st.sessions.get(sid)) else {
            return;
        };
        let s = &all.status[idx];
        let bytes = e.session.bytes();
        s.queued.store(
            (e.session.queued_len() + e.session.inflight_len()) as u64,
            Relaxed,
        );
        s.queued_bytes.store(bytes, Relaxed);
        // The broker second of the oldest (0: none, or recovered at start).
        s.oldest_at.store(
            e.session.oldest().map_or(0, |d| u64::from(d.msg.stamp)),
            Relaxed,
        );
        let full = b.overflow == Overflow::RejectNew && bytes >= b.max_buffer_bytes;
        if s.full.swap(full, Relaxed) != full {
            if full {
                all.full.fetch_add(1, Relaxed);
                warn!(bridge = %b.name, bytes, "bridge buffer full: new messages for it are refused");
            } else {
                all.full.fetch_sub(1, Relaxed);
            }
        }
    }

    /// Whether a QoS 1/2 message on `topic` (from bridge `own`'s session,
    /// if it came over one) must be
    /// refused because a `reject_new` bridge it would cross is full.
    pub fn bridge_rejects(&self, topic: &str, own: Option<usize>) -> bool {
        if self.cfg.bridges.is_empty() {
            return false;
        }
        let all = self.bridges.borrow().clone();
        if all.full.load(Relaxed) == 0 {
            return false;
        }
        for (idx, b) in self.cfg.bridges.iter().enumerate() {
            let s = &all.status[idx];
            if own != Some(idx) && s.full.load(Relaxed) && b.goes_out(topic) {
                s.rejected.fetch_add(1, Relaxed);
                return true;
            }
        }
        false
    }

    /// Retained `$SYS/broker/connection/NAME/state`: 1 up, 0 down
    /// (Mosquitto's bridge notification topic).
    fn bridge_state_topic(&self, st: &mut State, idx: usize, up: bool) {
        let Some(b) = self.cfg.bridges.get(idx) else {
            return;
        };
        let msg = self.broker_message(
            format!("$SYS/broker/connection/{}/state", b.name),
            Bytes::from_static(if up { b"1" } else { b"0" }),
            QoS::AtLeastOnce,
        );
        self.route(st, msg);
    }
}

/// A remote PUBLISH no in rule maps: acknowledged so the remote lets go of
/// it (QoS 2: PUBREC; its PUBREL is answered like any unknown id).
fn ack_unrouted(conn: &Conn, p: &Publish) {
    let protocol = conn.state.borrow().protocol;
    let a = crate::session::ack(p.packet_id, 0);
    let pkt = match p.qos {
        QoS::AtMostOnce => return,
        QoS::AtLeastOnce => Packet::PubAck(a),
        QoS::ExactlyOnce => Packet::PubRec(a),
    };
    conn.out.borrow_mut().push_packet(&pkt, protocol);
    conn.wake();
}

pub fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect(_) => "DISCONNECT",
        Packet::Auth(_) => "AUTH",
    }
}
