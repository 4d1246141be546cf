//! Per-client session state: outgoing QoS 1/2 inflight window, packet-id
//! allocation, the queue of messages waiting for the window or for the
//! client to come back, and incoming QoS 2 packet ids awaiting PUBREL.
//!
//! Architecture invariant: no I/O, no runtime, no clock. Output goes to an
//! [`Outbox`] the caller provides (the connection's write queue in the
//! broker, a `Vec` in tests).

use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use tarta_proto::mqtt::{Ack, Packet, Properties, QoS, SubOptions};
use tarta_proto::ByteStr;

/// A published message as it travels through the broker. Shared by every
/// subscriber and every shard it reaches (`Arc`): the payload is never copied.
#[derive(Debug)]
pub struct Message {
    /// A valid topic name.
    pub topic: ByteStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 properties passed through to subscribers (no topic alias or
    /// subscription identifiers: those are per delivery).
    pub properties: Properties,
    /// (shard, session id) of the publisher, for the "no local" option.
    pub origin: Option<(u16, usize)>,
    /// MQTT 5 Message Expiry: the broker second (shared clock of all
    /// shards) after which the message is no longer delivered.
    pub expires_at: Option<u64>,
    /// A QoS 2 message accepted from a persistent session: its identity,
    /// so that routing it again after a crash delivers it once (0: none).
    pub uid: u64,
    /// The broker second it was published (0: recovered from the log),
    /// for the age of a bridge's oldest buffered message.
    pub stamp: u32,
}

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Arc<Message>,
    /// min(message QoS, granted QoS).
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 subscription identifiers of every matching subscription.
    pub sub_ids: Vec<u32>,
    /// Set when it came through a shared subscription: (group, filter).
    /// Such a delivery moves to another member if this one goes away.
    pub share: Option<Arc<(ByteStr, ByteStr)>>,
}

/// Where a session's output goes.
pub trait Outbox {
    /// Sends `d` with packet id `pid` (0 for QoS 0). Returns false if the
    /// message was discarded instead (expired, or larger than the client
    /// accepts); a resend (`dup`) is never discarded.
    fn publish(&mut self, d: &Delivery, pid: u16, dup: bool) -> bool;
    /// Sends a control packet (PUBACK, PUBREC, PUBREL, PUBCOMP).
    fn packet(&mut self, p: Packet);
    /// A change to the session's queue the write-ahead log must record
    /// (only logged sessions' outboxes do anything with it).
    fn journal(&mut self, _ev: Journal) {}
}

/// Queue changes made by the session itself, in the order it makes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Journal {
    /// The front of the queue went out with `pid` (or was discarded).
    Sent { pid: u16, discarded: bool },
    /// The delivery with `pid` is done.
    Ack { pid: u16 },
    /// PUBREC for `pid`: PUBREL sent.
    Rel { pid: u16 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Sent,
    Queued,
    /// QoS 0 to an offline client, or the queue bound was reached.
    Dropped,
}

#[derive(Debug)]
struct Inflight {
    pid: u16,
    d: Delivery,
    /// QoS 2 after PUBREC: waiting for PUBCOMP.
    released: bool,
}

#[derive(Debug)]
pub struct Session {
    /// Its own copy (a `ByteStr` would keep the whole read chunk of the
    /// CONNECT alive, and takes 32 bytes to this 16).
    pub client_id: Box<str>,
    /// Kept after the connection ends (clean session 0 / session expiry > 0).
    pub persistent: bool,
    /// Its state is in the shard's write-ahead log (a `SessionDel` record
    /// must end it there).
    pub logged: bool,
    /// Subscriptions by filter (as subscribed, `$share/...` included), with
    /// their 5.0 subscription identifier.
    /// (A BTreeMap: 24 bytes when empty, where a HashMap takes 48.)
    pub subs: BTreeMap<ByteStr, (SubOptions, Option<u32>)>,
    inflight: VecDeque<Inflight>,
    pending: VecDeque<Delivery>,
    incoming_qos2: BTreeSet<u16>,
    next_pid: u16,
    /// QoS 1/2 messages in flight to the client at most.
    pub window: u16,
    /// Topic and payload bytes of what is queued and in flight.
    bytes: u64,
    /// Messages queued at most (beyond the window or while offline).
    max_queued: u32,
    /// Messages dropped because the queue was full.
    pub dropped: u32,
}

/// What a delivery weighs in a session's byte count.
fn weight(d: &Delivery) -> u64 {
    (d.msg.payload.len() + d.msg.topic.len()) as u64
}

impl Session {
    pub fn new(client_id: ByteStr, persistent: bool, window: u16, max_queued: usize) -> Self {
        Session {
            client_id: client_id.as_str().into(),
            persistent,
            logged: false,
            subs: BTreeMap::new(),
            inflight: VecDeque::new(),
            pending: VecDeque::new(),
            incoming_qos2: BTreeSet::new(),
            next_pid: 1,
            window: window.max(1),
            bytes: 0,
            max_queued: clamp(max_queued),
            dropped: 0,
        }
    }

    pub fn set_max_queued(&mut self, n: usize) {
        self.max_queued = clamp(n);
    }

    /// Topic and payload bytes of what is queued and in flight.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Drops the oldest queued message (a bridge's buffer is full); the
    /// caller journals it as discarded.
    pub fn drop_oldest(&mut self) -> Option<Delivery> {
        let d = self.pending.pop_front()?;
        self.bytes -= weight(&d);
        Some(d)
    }

    /// The oldest message queued or in flight.
    pub fn oldest(&self) -> Option<&Delivery> {
        self.inflight.front().map(|i| &i.d).or(self.pending.front())
    }

    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    pub fn queued_len(&self) -> usize {
        self.pending.len()
    }

    /// Whether `deliver` would keep a delivery of `qos` (send or queue it)
    /// rather than drop it: QoS 1/2 while the queue has room.
    pub fn accepts(&self, qos: QoS, online: bool) -> bool {
        qos != QoS::AtMostOnce
            && (self.pending.len() < self.max_queued as usize
                || (online && self.pending.is_empty() && self.window_open()))
    }

    /// Hands `d` to the client (`out` is `None` while it is offline).
    pub fn deliver(&mut self, d: Delivery, out: Option<&mut dyn Outbox>) -> Enqueued {
        match (d.qos, out) {
            (QoS::AtMostOnce, Some(out)) => {
                if out.publish(&d, 0, false) {
                    Enqueued::Sent
                } else {
                    Enqueued::Dropped
                }
            }
            (QoS::AtMostOnce, None) => Enqueued::Dropped,
            (_, Some(out)) if self.pending.is_empty() && self.window_open() => {
                if self.send_new(d, out) {
                    Enqueued::Sent
                } else {
                    Enqueued::Dropped
                }
            }
            (_, _) => {
                if self.pending.len() >= self.max_queued as usize {
                    self.dropped = self.dropped.saturating_add(1);
                    Enqueued::Dropped
                } else {
                    self.bytes += weight(&d);
                    self.pending.push_back(d);
                    Enqueued::Queued
                }
            }
        }
    }

    fn window_open(&self) -> bool {
        self.inflight.len() < usize::from(self.window)
    }

    fn send_new(&mut self, d: Delivery, out: &mut dyn Outbox) -> bool {
        let pid = self.alloc_pid();
        if !out.publish(&d, pid, false) {
            out.journal(Journal::Sent {
                pid,
                discarded: true,
            });
            return false;
        }
        out.journal(Journal::Sent {
            pid,
            discarded: false,
        });
        self.bytes += weight(&d);
        self.inflight.push_back(Inflight {
            pid,
            d,
            released: false,
        });
        true
    }

    fn alloc_pid(&mut self) -> u16 {
        // The window is far smaller than 65535, so a free id is always near.
        loop {
            let pid = self.next_pid;
            self.next_pid = if pid == u16::MAX { 1 } else { pid + 1 };
            if !self.inflight.iter().any(|i| i.pid == pid) {
                return pid;
            }
        }
    }

    /// Sends queued messages while the window allows.
    pub fn fill(&mut self, out: &mut dyn Outbox) {
        while self.window_open() {
            let Some(d) = self.pending.pop_front() else {
                break;
            };
            self.bytes -= weight(&d);
            self.send_new(d, out);
        }
    }

    /// PUBACK from the client. Returns false if no QoS 1 message had that id.
    pub fn on_puback(&mut self, pid: u16, out: &mut dyn Outbox) -> bool {
        let pos = self
            .inflight
            .iter()
            .position(|i| i.pid == pid && i.d.qos == QoS::AtLeastOnce);
        let found = pos.and_then(|p| self.remove_inflight(p)).is_some();
        if found {
            out.journal(Journal::Ack { pid });
            self.fill(out);
        }
        found
    }

    /// PUBREC from the client: answer PUBREL (again, if it is a duplicate).
    /// A 5.0 PUBREC with an error reason ends the exchange (MQTT-4.3.3).
    pub fn on_pubrec(&mut self, pid: u16, reason: u8, out: &mut dyn Outbox) -> bool {
        let Some(pos) = self
            .inflight
            .iter()
            .position(|i| i.pid == pid && i.d.qos == QoS::ExactlyOnce)
        else {
            return false;
        };
        if reason >= 0x80 {
            self.remove_inflight(pos);
            out.journal(Journal::Ack { pid });
            self.fill(out);
            return true;
        }
        if let Some(i) = self.inflight.get_mut(pos) {
            if !i.released {
                i.released = true;
                out.journal(Journal::Rel { pid });
            }
        }
        out.packet(Packet::PubRel(ack(pid, 0)));
        true
    }

    /// PUBCOMP from the client.
    pub fn on_pubcomp(&mut self, pid: u16, out: &mut dyn Outbox) -> bool {
        let pos = self
            .inflight
            .iter()
            .position(|i| i.pid == pid && i.released);
        let found = pos.and_then(|p| self.remove_inflight(p)).is_some();
        if found {
            out.journal(Journal::Ack { pid });
            self.fill(out);
        }
        found
    }

    /// Incoming QoS 2 PUBLISH: true if this packet id is new (route the
    /// message), false if it is a redelivery of one not yet released.
    pub fn incoming_qos2(&mut self, pid: u16) -> bool {
        self.incoming_qos2.insert(pid)
    }

    /// Incoming QoS 2 messages waiting for PUBREL.
    pub fn incoming_qos2_len(&self) -> usize {
        self.incoming_qos2.len()
    }

    /// Removes and returns what is in flight or queued (for a shared
    /// subscription member that went away), in order.
    pub fn take_where(&mut self, mut f: impl FnMut(&Delivery) -> bool) -> Vec<Delivery> {
        let mut out = Vec::new();
        let mut keep = VecDeque::new();
        for i in self.inflight.drain(..) {
            if !i.released && f(&i.d) {
                out.push(i.d);
            } else {
                keep.push_back(i);
            }
        }
        self.inflight = keep;
        let mut keep = VecDeque::new();
        for d in self.pending.drain(..) {
            if f(&d) {
                out.push(d);
            } else {
                keep.push_back(d);
            }
        }
        self.pending = keep;
        self.bytes -= out.iter().map(weight).sum::<u64>();
        out
    }

    fn remove_inflight(&mut self, pos: usize) -> Option<Inflight> {
        let i = self.inflight.remove(pos)?;
        self.bytes -= weight(&i.d);
        Some(i)
    }

    /// Incoming PUBREL: true if the packet id was known.
    pub fn release_incoming(&mut self, pid: u16) -> bool {
        self.incoming_qos2.remove(&pid)
    }

    /// The client is back (or a new connection took over): resend what is
    /// in flight, PUBLISH with DUP or PUBREL, in order, then queued messages.
    pub fn resume(&mut self, out: &mut dyn Outbox) {
        for i in &self.inflight {
            if i.released {
                out.packet(Packet::PubRel(ack(i.pid, 0)));
            } else {
                out.publish(&i.d, i.pid, true);
            }
        }
        self.fill(out);
    }
}

/// Rebuilding a session from the write-ahead log (`store::replay`), and
/// reading it back out for a snapshot: the same state changes, without
/// output.
impl Session {
    pub fn restore_enqueue(&mut self, d: Delivery) {
        self.bytes += weight(&d);
        self.pending.push_back(d);
    }

    /// `Journal::Sent`: the front of the queue goes out with `pid`.
    pub fn restore_sent(&mut self, pid: u16, discarded: bool) {
        self.next_pid = if pid == u16::MAX { 1 } else { pid + 1 };
        if let Some(d) = self.pending.pop_front() {
            if discarded {
                self.bytes -= weight(&d);
            } else {
                self.inflight.push_back(Inflight {
                    pid,
                    d,
                    released: false,
                });
            }
        }
    }

    pub fn restore_ack(&mut self, pid: u16) {
        if let Some(p) = self.inflight.iter().position(|i| i.pid == pid) {
            self.remove_inflight(p);
        }
    }

    pub fn restore_rel(&mut self, pid: u16) {
        if let Some(i) = self.inflight.iter_mut().find(|i| i.pid == pid) {
            i.released = true;
        }
    }

    pub fn restore_next_pid(&mut self, pid: u16) {
        self.next_pid = pid.max(1);
    }

    pub fn next_pid(&self) -> u16 {
        self.next_pid
    }

    /// What is in flight: (packet id, delivery, PUBREL sent), in order.
    pub fn inflight_iter(&self) -> impl Iterator<Item = (u16, &Delivery, bool)> {
        self.inflight.iter().map(|i| (i.pid, &i.d, i.released))
    }

    pub fn pending_iter(&self) -> impl Iterator<Item = &Delivery> {
        self.pending.iter()
    }

    /// After a restart, deliveries that came through a shared subscription
    /// are the session's own (its group membership is gone with its
    /// connection).
    pub fn restore_clear_shares(&mut self) {
        for i in &mut self.inflight {
            i.d.share = None;
        }
        for d in &mut self.pending {
            d.share = None;
        }
    }

    pub fn incoming_iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.incoming_qos2.iter().copied()
    }
}

fn clamp(n: usize) -> u32 {
    n.min(u32::MAX as usize) as u32
}

pub fn ack(packet_id: u16, reason: u8) -> Ack {
    Ack {
        packet_id,
        reason,
        properties: Properties::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec(Vec<String>);
    impl Outbox for Rec {
        fn publish(&mut self, d: &Delivery, pid: u16, dup: bool) -> bool {
            self.0.push(format!(
                "pub {} q{} id{} dup{}",
                d.msg.topic, d.qos as u8, pid, dup as u8
            ));
            true
        }
        fn packet(&mut self, p: Packet) {
            self.0.push(match p {
                Packet::PubRel(a) => format!("rel {}", a.packet_id),
                other => format!("{other:?}"),
            });
        }
    }

    fn d(topic: &str, qos: QoS) -> Delivery {
        Delivery {
            msg: Arc::new(Message {
                topic: topic.into(),
                payload: Bytes::from_static(b"x"),
                qos,
                retain: false,
                properties: Properties::default(),
                origin: None,
                expires_at: None,
                uid: 0,
                stamp: 0,
            }),
            qos,
            retain: false,
            sub_ids: Vec::new(),
            share: None,
        }
    }

    #[test]
    fn window_limits_inflight_and_acks_release_queue_in_order() {
        let mut s = Session::new("c".into(), true, 2, 10);
        let mut out = Rec::default();
        for t in ["a", "b", "c"] {
            s.deliver(d(t, QoS::AtLeastOnce), Some(&mut out));
        }
        assert_eq!(out.0, ["pub a q1 id1 dup0", "pub b q1 id2 dup0"]);
        assert_eq!(s.queued_len(), 1);
        assert!(s.on_puback(1, &mut out));
        assert_eq!(out.0.last().map(String::as_str), Some("pub c q1 id3 dup0"));
        assert!(!s.on_puback(1, &mut out), "duplicate PUBACK is unknown");
    }

    #[test]
    fn qos2_handshake_and_resume_with_dup_and_pubrel() {
        let mut s = Session::new("c".into(), true, 10, 10);
        let mut out = Rec::default();
        s.deliver(d("a", QoS::ExactlyOnce), Some(&mut out));
        s.deliver(d("b", QoS::ExactlyOnce), Some(&mut out));
        assert!(s.on_pubrec(1, 0, &mut out));
        let mut again = Rec::default();
        s.resume(&mut again);
        assert_eq!(again.0, ["rel 1", "pub b q2 id2 dup1"]);
        assert!(s.on_pubcomp(1, &mut out));
        assert!(
            !s.on_pubcomp(2, &mut out),
            "PUBCOMP before PUBREC is unknown"
        );
        assert_eq!(s.inflight_len(), 1);
    }

    #[test]
    fn offline_queue_is_bounded_and_qos0_is_not_queued() {
        let mut s = Session::new("c".into(), true, 10, 2);
        assert_eq!(s.deliver(d("a", QoS::AtMostOnce), None), Enqueued::Dropped);
        assert_eq!(s.deliver(d("a", QoS::AtLeastOnce), None), Enqueued::Queued);
        assert_eq!(s.deliver(d("b", QoS::AtLeastOnce), None), Enqueued::Queued);
        assert_eq!(s.deliver(d("c", QoS::AtLeastOnce), None), Enqueued::Dropped);
        assert_eq!(s.dropped, 1);
        let mut out = Rec::default();
        s.resume(&mut out);
        assert_eq!(out.0, ["pub a q1 id1 dup0", "pub b q1 id2 dup0"]);
    }

    #[test]
    fn incoming_qos2_ids_are_exactly_once() {
        let mut s = Session::new("c".into(), false, 10, 10);
        assert!(s.incoming_qos2(7));
        assert!(
            !s.incoming_qos2(7),
            "redelivered before PUBREL: not routed again"
        );
        assert!(s.release_incoming(7));
        assert!(!s.release_incoming(7));
        assert!(s.incoming_qos2(7), "id may be reused after PUBREL");
    }

    #[test]
    fn packet_ids_skip_those_in_flight_and_wrap() {
        let mut s = Session::new("c".into(), true, 3, 10);
        s.next_pid = u16::MAX;
        let mut out = Rec::default();
        s.deliver(d("a", QoS::AtLeastOnce), Some(&mut out));
        s.deliver(d("b", QoS::AtLeastOnce), Some(&mut out));
        assert_eq!(out.0, ["pub a q1 id65535 dup0", "pub b q1 id1 dup0"]);
    }
}
