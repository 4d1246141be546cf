//! The broker's view of one connection: its write queue, its close request
//! and its protocol state. Shared (`Rc`) between the connection's I/O task,
//! its session (for deliveries) and the shard's timer wheel.
//!
//! Architecture invariant: nothing here does I/O; the runtime's connection
//! task drains [`OutQueue`] with vectored sends and watches `close`.

use crate::config::bridge::Bridge;
use crate::session::{Delivery, Journal, Outbox};
use crate::store::log::Log;
use crate::store::record::Rec;
use bytes::{Bytes, BytesMut};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};
use std::task::Waker;
use tarta_proto::mqtt::{self, Packet, Protocol, PublishHeader, Will};
use tarta_proto::ByteStr;

/// Why a connection ends. Server-side reasons map to an MQTT 5 DISCONNECT
/// reason code, sent before closing to 5.0 clients that have had a CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// DISCONNECT from the client: no will.
    ClientDisconnect,
    /// DISCONNECT with reason 0x04 (5.0): publish the will anyway.
    ClientDisconnectWithWill,
    /// The peer closed the socket or the socket failed.
    PeerGone,
    Malformed(String),
    Protocol(String),
    PacketTooLarge(String),
    TopicAliasInvalid,
    ReceiveMaximumExceeded,
    KeepAliveTimeout,
    ConnectTimeout,
    TakenOver,
    NotAuthorized,
    /// CONNACK with a refusal code was sent.
    Refused,
    /// CONNACK refused the credentials (sent after `auth_failure_delay_ms`).
    AuthRefused,
    /// WebSocket protocol violation: closed with this WS close code.
    Ws {
        code: u16,
        what: &'static str,
    },
    /// The client sent a WebSocket close frame (without MQTT DISCONNECT).
    WsClosed,
    /// A plain HTTP request on the WebSocket port was answered (health
    /// check, or a refused handshake with this status).
    Http {
        status: u16,
        what: &'static str,
    },
    Shutdown,
    /// The transport below MQTT failed: a TLS error, a bad PROXY header
    /// (counted and logged, rate-limited, where it was found).
    Transport(&'static str),
    /// Moved to the client id's home shard (not a close for the client).
    HandedOff,
    /// A connection limit (counted and logged where it was found).
    LimitReached(&'static str),
    /// Disconnected through the admin API (5.0: 0x98).
    Administrative,
    /// A message that must be logged could not be (disk full, I/O error):
    /// a 3.x publisher is closed without its acknowledgement and resends.
    StorageFailed,
}

/// `reason` label values of `tarta_connections_closed_total`.
pub const CLOSE_LABELS: [&str; 12] = [
    "client_disconnect",
    "peer_gone",
    "bad_input",
    "keepalive",
    "taken_over",
    "refused",
    "limit",
    "transport",
    "http",
    "administrative",
    "storage",
    "shutdown",
];

impl CloseReason {
    /// The 5.0 DISCONNECT reason code the server sends, if any.
    pub fn disconnect_code(&self) -> Option<u8> {
        use mqtt::reason::*;
        Some(match self {
            CloseReason::Malformed(_) => MALFORMED_PACKET,
            CloseReason::Protocol(_) => PROTOCOL_ERROR,
            CloseReason::PacketTooLarge(_) => PACKET_TOO_LARGE,
            CloseReason::TopicAliasInvalid => TOPIC_ALIAS_INVALID,
            CloseReason::ReceiveMaximumExceeded => RECEIVE_MAXIMUM_EXCEEDED,
            CloseReason::KeepAliveTimeout => KEEP_ALIVE_TIMEOUT,
            CloseReason::TakenOver => SESSION_TAKEN_OVER,
            CloseReason::NotAuthorized => NOT_AUTHORIZED,
            CloseReason::Shutdown => SERVER_SHUTTING_DOWN,
            CloseReason::StorageFailed => QUOTA_EXCEEDED,
            CloseReason::Administrative => ADMINISTRATIVE_ACTION,
            _ => return None,
        })
    }

    /// Human-readable reason (5.0 Reason String, logs).
    pub fn description(&self) -> String {
        match self {
            CloseReason::Malformed(s)
            | CloseReason::Protocol(s)
            | CloseReason::PacketTooLarge(s) => s.clone(),
            CloseReason::TopicAliasInvalid => "invalid topic alias".into(),
            CloseReason::ReceiveMaximumExceeded => {
                "more unacknowledged QoS 2 messages than Receive Maximum".into()
            }
            CloseReason::KeepAliveTimeout => "no packet within 1.5 times the keep-alive".into(),
            CloseReason::TakenOver => "another connection took over the session".into(),
            CloseReason::Shutdown => "the server is shutting down".into(),
            CloseReason::NotAuthorized => "not authorized".into(),
            CloseReason::StorageFailed => "the broker cannot store messages right now".into(),
            CloseReason::Administrative => "disconnected by an administrator".into(),
            CloseReason::Ws { what, .. } => (*what).into(),
            other => format!("{other:?}"),
        }
    }

    /// The label of this reason in `tarta_connections_closed_total`
    /// (index into `CLOSE_LABELS`).
    pub fn label(&self) -> usize {
        match self {
            CloseReason::ClientDisconnect | CloseReason::ClientDisconnectWithWill => 0,
            CloseReason::PeerGone | CloseReason::WsClosed => 1,
            CloseReason::Malformed(_)
            | CloseReason::Protocol(_)
            | CloseReason::PacketTooLarge(_)
            | CloseReason::TopicAliasInvalid
            | CloseReason::ReceiveMaximumExceeded
            | CloseReason::Ws { .. } => 2,
            CloseReason::KeepAliveTimeout | CloseReason::ConnectTimeout => 3,
            CloseReason::TakenOver => 4,
            CloseReason::NotAuthorized | CloseReason::Refused | CloseReason::AuthRefused => 5,
            CloseReason::LimitReached(_) => 6,
            CloseReason::Transport(_) => 7,
            CloseReason::Http { .. } => 8,
            CloseReason::Administrative => 9,
            CloseReason::StorageFailed => 10,
            CloseReason::Shutdown | CloseReason::HandedOff => 11,
        }
    }

    /// The WebSocket close code sent when the server closes for this reason.
    pub fn ws_close_code(&self) -> u16 {
        use tarta_proto::ws::close;
        match self {
            CloseReason::Ws { code, .. } => *code,
            CloseReason::Shutdown => close::GOING_AWAY,
            CloseReason::Malformed(_) | CloseReason::Protocol(_) => close::PROTOCOL_ERROR,
            CloseReason::PacketTooLarge(_) => close::TOO_BIG,
            CloseReason::NotAuthorized => close::POLICY,
            _ => close::NORMAL,
        }
    }

    /// Bad input from the client (counted and logged).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            CloseReason::Malformed(_)
                | CloseReason::Protocol(_)
                | CloseReason::PacketTooLarge(_)
                | CloseReason::TopicAliasInvalid
                | CloseReason::ReceiveMaximumExceeded
                | CloseReason::Ws { .. }
        )
    }

    /// The server ended the exchange while the client may still be
    /// writing: the close drains the client's input before closing.
    pub fn server_initiated(&self) -> bool {
        !matches!(
            self,
            CloseReason::ClientDisconnect
                | CloseReason::ClientDisconnectWithWill
                | CloseReason::PeerGone
                | CloseReason::Shutdown
                | CloseReason::HandedOff
                | CloseReason::WsClosed
        )
    }

    /// Whether the will message is published (MQTT-3.1.2-8, -10).
    pub fn publishes_will(&self) -> bool {
        !matches!(
            self,
            CloseReason::ClientDisconnect
                | CloseReason::HandedOff
                | CloseReason::Refused
                | CloseReason::AuthRefused
                | CloseReason::Http { .. }
        )
    }
}

/// Bytes waiting to be written: whole segments (publish headers and shared
/// payloads, in order) followed by a tail of small control packets.
#[derive(Default)]
struct Queue {
    segs: VecDeque<Bytes>,
    tail: BytesMut,
    queued: usize,
}

impl Queue {
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.queued
    }

    pub fn push_packet(&mut self, p: &Packet, protocol: Protocol) {
        let before = self.tail.len();
        mqtt::encode(p, protocol, &mut self.tail);
        self.queued += self.tail.len() - before;
    }

    /// Appends raw bytes (already encoded).
    pub fn push_bytes(&mut self, b: &[u8]) {
        self.tail.extend_from_slice(b);
        self.queued += b.len();
    }

    /// Queues a PUBLISH as its own header plus the shared payload: the
    /// payload is referenced, never copied.
    pub fn push_publish(&mut self, h: &PublishHeader<'_>, payload: &Bytes, protocol: Protocol) {
        if !self.tail.is_empty() {
            self.segs.push_back(self.tail.split().freeze());
        }
        h.encode(protocol, &mut self.tail);
        let header = self.tail.split().freeze();
        self.queued += header.len() + payload.len();
        self.segs.push_back(header);
        if !payload.is_empty() {
            self.segs.push_back(payload.clone());
        }
    }

    /// Appends a shared segment (not copied).
    pub fn push_shared(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        if !self.tail.is_empty() {
            self.segs.push_back(self.tail.split().freeze());
        }
        self.queued += b.len();
        self.segs.push_back(b);
    }

    /// Fills `iov` with the next bytes to write; returns how many slices.
    pub fn iovecs<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for s in &self.segs {
            if n == iov.len() {
                return n;
            }
            iov[n] = IoSlice::new(s);
            n += 1;
        }
        if n < iov.len() && !self.tail.is_empty() {
            iov[n] = IoSlice::new(&self.tail);
            n += 1;
        }
        n
    }

    /// Moves everything queued in `other` to the end of this queue
    /// (segments are moved, not copied).
    pub fn append(&mut self, other: &mut Queue) {
        if !self.tail.is_empty() {
            self.segs.push_back(self.tail.split().freeze());
        }
        self.segs.append(&mut other.segs);
        if !other.tail.is_empty() {
            self.segs.push_back(other.tail.split().freeze());
        }
        other.tail = BytesMut::new();
        self.queued += other.queued;
        other.queued = 0;
    }

    /// Drops `n` written bytes from the front.
    pub fn advance(&mut self, mut n: usize) {
        self.queued -= n.min(self.queued);
        while n > 0 {
            match self.segs.front_mut() {
                Some(s) if s.len() <= n => {
                    n -= s.len();
                    self.segs.pop_front();
                }
                Some(s) => {
                    let _ = s.split_to(n);
                    return;
                }
                None => {
                    let _ = self.tail.split_to(n.min(self.tail.len()));
                    if self.tail.is_empty() {
                        // Give the memory back while idle.
                        self.tail = BytesMut::new();
                    }
                    return;
                }
            }
        }
        if self.segs.is_empty() && self.tail.is_empty() && self.tail.capacity() > 4096 {
            self.tail = BytesMut::new();
        }
    }
}

/// Queues drained by idle connections, kept for reuse (with their
/// buffers' capacity) so that a burst costs no allocation.
const POOL_MAX: usize = 1024;

thread_local! {
    // Boxes on purpose: a connection holds the box itself.
    #[allow(clippy::vec_box)]
    static POOL: RefCell<Vec<Box<Queue>>> = const { RefCell::new(Vec::new()) };
}

/// A connection's write queue. An idle connection holds none (8 bytes
/// for the pointer): the queue comes from a per-shard pool when something
/// is queued and goes back once everything is written.
#[derive(Default)]
pub struct OutQueue {
    q: Option<Box<Queue>>,
}

impl OutQueue {
    fn q(&mut self) -> &mut Queue {
        self.q
            .get_or_insert_with(|| POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default())
    }

    /// Returns a drained queue to the pool.
    fn release_if_empty(&mut self) {
        if self
            .q
            .as_ref()
            .is_some_and(|q| q.is_empty() && q.segs.is_empty())
        {
            if let Some(mut q) = self.q.take() {
                if q.tail.capacity() > 4096 {
                    q.tail = BytesMut::new();
                }
                POOL.with(|p| {
                    let mut p = p.borrow_mut();
                    if p.len() < POOL_MAX {
                        p.push(q);
                    }
                });
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.q.as_ref().is_none_or(|q| q.is_empty())
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.q.as_ref().map_or(0, |q| q.len())
    }

    pub fn push_packet(&mut self, p: &Packet, protocol: Protocol) {
        super::metrics::count_local(super::metrics::Local::PacketsSent, 1);
        self.q().push_packet(p, protocol);
    }

    /// Appends raw bytes (already encoded).
    pub fn push_bytes(&mut self, b: &[u8]) {
        self.q().push_bytes(b);
    }

    /// Queues a PUBLISH as its own header plus the shared payload: the
    /// payload is referenced, never copied (nor the topic: the header
    /// borrows it).
    pub fn push_publish(&mut self, h: &PublishHeader<'_>, payload: &Bytes, protocol: Protocol) {
        super::metrics::count_local(super::metrics::Local::PacketsSent, 1);
        self.q().push_publish(h, payload, protocol);
    }

    /// Appends a shared segment (not copied).
    pub fn push_shared(&mut self, b: Bytes) {
        self.q().push_shared(b);
    }

    /// Fills `iov` with the next bytes to write; returns how many slices.
    pub fn iovecs<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        self.q.as_ref().map_or(0, |q| q.iovecs(iov))
    }

    /// Moves everything queued in `other` to the end of this queue
    /// (segments are moved, not copied).
    pub fn append(&mut self, other: &mut OutQueue) {
        let Some(o) = other.q.as_mut() else { return };
        if o.is_empty() {
            return;
        }
        self.q().append(o);
        other.release_if_empty();
    }

    /// Drops `n` written bytes from the front.
    pub fn advance(&mut self, n: usize) {
        if let Some(q) = self.q.as_mut() {
            q.advance(n);
        }
        self.release_if_empty();
    }
}

/// Per-connection protocol state, set at CONNECT.
pub struct ConnState {
    pub protocol: Protocol,
    pub connected: bool,
    /// Session slot on this shard once connected.
    pub session: Option<usize>,
    /// Boxed: most clients have none, and every connection pays for the field.
    pub will: Option<Box<Will>>,
    /// 5.0: the largest packet the client accepts (0 = no limit).
    pub max_packet_out: u32,
    /// 5.0: topic aliases in both directions (None until first used).
    pub aliases: Option<Box<Aliases>>,
    /// 5.0: the client's Topic Alias Maximum (aliases the broker may assign).
    pub alias_max_out: u16,
    /// 5.0: the client asked for reason strings (Request Problem Information).
    pub problem_info: bool,
    /// The listener it came through (`Config::listeners` index).
    pub listener: u16,
    /// A bridge's outgoing link (the broker is the client on the wire).
    pub link: bool,
    /// The client said it is a bridge (3.x `try_private`): its own
    /// messages are not sent back to it, retain flags stay as published.
    pub peer_bridge: bool,
}

/// Topic aliases of one 5.0 connection.
#[derive(Default)]
pub struct Aliases {
    /// Client to broker: alias -> topic (index = alias - 1).
    pub inbound: Vec<Option<ByteStr>>,
    /// Broker to client: topic -> alias.
    pub outbound: std::collections::HashMap<ByteStr, u16>,
}

/// Kept within 144 bytes (a 160-byte allocation with the `Rc` counts):
/// every idle connection pays for each field.
pub struct Conn {
    /// The client's address (as a trusted proxy reported it, for WebSocket).
    peer: Cell<(IpAddr, u16)>,
    pub out: RefCell<OutQueue>,
    /// Bytes the transport holds beyond `out` (framed WebSocket data).
    pub wire_pending: Cell<u32>,
    /// A SUBACK is held for route propagation: packets after the SUBSCRIBE
    /// wait, so every answer goes out in order.
    pub held: Cell<bool>,
    /// Set when `held` clears: the task decodes what it kept back.
    pub resumed: Cell<bool>,
    /// Its session has messages in flight: keep reading (acks) even while
    /// the shard holds publishers back.
    pub acking: Cell<bool>,
    waker: Cell<Option<Waker>>,
    /// Boxed: set once, at the end.
    close: Cell<Option<Box<CloseReason>>>,
    /// Shard second of the last packet received.
    last_heard: Cell<u32>,
    /// Shard second the connection was accepted.
    accepted_at: u32,
    /// The second of this connection's live entry in the timer wheel
    /// (u32::MAX: none).
    wheel_at: Cell<u32>,
    /// Negotiated keep-alive in seconds (0 = none).
    pub keepalive: Cell<u16>,
    /// The log epoch its queued output depends on: nothing is written
    /// before that epoch is durable (`store::log`).
    pub gate: Cell<u32>,
    /// The durability barrier its output waits for: other shards' logs
    /// (a message it published reached their persistent sessions). The
    /// low 16 bits of the barrier's number (compared within a window).
    pub barrier: Cell<u16>,
    pub state: RefCell<ConnState>,
}

impl Conn {
    /// Shard second the connection was accepted.
    pub fn accepted_at(&self) -> u64 {
        u64::from(self.accepted_at)
    }

    pub fn new(peer: SocketAddr, now: u64) -> Self {
        Conn {
            peer: Cell::new((peer.ip(), peer.port())),
            out: RefCell::new(OutQueue::default()),
            wire_pending: Cell::new(0),
            held: Cell::new(false),
            resumed: Cell::new(false),
            acking: Cell::new(false),
            waker: Cell::new(None),
            close: Cell::new(None),
            last_heard: Cell::new(secs(now)),
            accepted_at: secs(now),
            wheel_at: Cell::new(u32::MAX),
            keepalive: Cell::new(0),
            gate: Cell::new(0),
            barrier: Cell::new(0),
            state: RefCell::new(ConnState {
                protocol: Protocol::V311,
                connected: false,
                session: None,
                will: None,
                max_packet_out: 0,
                aliases: None,
                alias_max_out: 0,
                problem_info: true,
                listener: 0,
                link: false,
                peer_bridge: false,
            }),
        }
    }

    pub fn peer(&self) -> SocketAddr {
        let (ip, port) = self.peer.get();
        SocketAddr::new(ip, port)
    }

    pub fn set_peer(&self, peer: SocketAddr) {
        self.peer.set((peer.ip(), peer.port()));
    }

    /// Bytes waiting to be written to this client.
    pub fn queued(&self) -> usize {
        self.out.borrow().len() + self.wire_pending.get() as usize
    }

    /// Records activity at shard second `now`.
    pub fn heard(&self, now: u64) {
        self.last_heard.set(secs(now));
    }

    /// The second of the live timer-wheel entry, if any.
    pub fn wheel_at(&self) -> Option<u64> {
        let at = self.wheel_at.get();
        (at != u32::MAX).then_some(u64::from(at))
    }

    pub fn set_wheel_at(&self, at: Option<u64>) {
        self.wheel_at.set(at.map_or(u32::MAX, secs));
    }

    pub fn set_waker(&self, w: &Waker) {
        self.waker.set(Some(w.clone()));
    }

    pub fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Asks the connection's task to close (the first reason wins).
    pub fn request_close(&self, reason: CloseReason) {
        let c = self.close.take();
        self.close.set(c.or_else(|| Some(Box::new(reason))));
        self.wake();
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        let c = self.close.take();
        let r = c.as_deref().cloned();
        self.close.set(c);
        r
    }

    pub fn is_closing(&self) -> bool {
        let c = self.close.take();
        let closing = c.is_some();
        self.close.set(c);
        closing
    }

    /// Seconds after which silence closes the connection (MQTT-3.1.2-24:
    /// one and a half times the keep-alive), or CONNECT timeout before CONNECT.
    pub fn deadline(&self, connect_timeout: u32) -> Option<u64> {
        if !self.state.borrow().connected {
            return Some(u64::from(self.accepted_at) + u64::from(connect_timeout));
        }
        match self.keepalive.get() {
            0 => None,
            // 1.5x rounded up, plus one for the one-second clock granularity.
            ka => Some(u64::from(self.last_heard.get()) + (u64::from(ka) * 3).div_ceil(2) + 1),
        }
    }
}

/// Shard seconds (since the shard started) fit 32 bits for 136 years.
fn secs(s: u64) -> u32 {
    s.min(u64::from(u32::MAX - 1)) as u32
}

/// A session's outbox onto a live connection.
pub struct ConnOutbox<'a> {
    pub conn: &'a Conn,
    pub protocol: Protocol,
    pub max_packet_out: u32,
    /// The broker second now (for Message Expiry).
    pub now: u64,
    /// Deliveries discarded: expired, or larger than the client accepts.
    pub discarded: u32,
    /// The shard's log and the session's number in it, for a logged session.
    pub log: Option<(&'a mut Log, u32)>,
    /// A bridge's session: topics are mapped to the remote's.
    pub bridge: Option<&'a Bridge>,
}

impl<'a> ConnOutbox<'a> {
    pub fn new(conn: &'a Conn, now: u64) -> Self {
        let st = conn.state.borrow();
        ConnOutbox {
            conn,
            protocol: st.protocol,
            max_packet_out: st.max_packet_out,
            now,
            discarded: 0,
            log: None,
            bridge: None,
        }
    }

    /// For a bridge's session: topics go out mapped by its rules.
    pub fn mapped(mut self, bridge: Option<&'a Bridge>) -> Self {
        self.bridge = bridge;
        self
    }

    /// An outbox that records the session's queue changes in `log`.
    pub fn logged(conn: &'a Conn, now: u64, log: Option<&'a mut Log>, sid: usize) -> Self {
        let mut o = ConnOutbox::new(conn, now);
        o.log = log.map(|l| (l, sid as u32));
        o
    }
}

impl Outbox for ConnOutbox<'_> {
    fn publish(&mut self, d: &Delivery, pid: u16, dup: bool) -> bool {
        let v5 = self.protocol.is_v5();
        let mut properties = if v5 {
            d.msg.properties.clone()
        } else {
            Default::default()
        };
        if let Some(at) = d.msg.expires_at {
            // MQTT-3.3.2-5: not delivered once expired; MQTT-3.3.2-6: the
            // forwarded interval is what is left.
            if at <= self.now && !dup {
                self.discarded += 1;
                return false;
            }
            if v5 {
                let left = at.saturating_sub(self.now).max(1);
                properties.set(mqtt::Property::MessageExpiryInterval(
                    left.min(u64::from(u32::MAX)) as u32,
                ));
            }
        }
        let mapped = self
            .bridge
            .and_then(|b| b.map_out(d.msg.topic.as_str()))
            .map(ByteStr::from);
        let full_topic = mapped.as_ref().unwrap_or(&d.msg.topic);
        let mut topic: &[u8] = full_topic.as_bytes();
        // A new alias is registered only once its packet is really queued.
        let mut new_alias = None;
        if v5 {
            for id in &d.sub_ids {
                properties.push(mqtt::Property::SubscriptionIdentifier(*id));
            }
            if let Some(b) = self.bridge {
                add_hop(&mut properties, &b.hop_id);
            }
            if let Some((alias, known)) = self.alias_for(full_topic) {
                properties.push(mqtt::Property::TopicAlias(alias));
                if known {
                    topic = &[];
                } else {
                    new_alias = Some(alias);
                }
            }
        }
        // The header by reference: no clone of the shared topic or payload.
        let h = PublishHeader {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic,
            packet_id: pid,
            properties: &properties,
            payload_len: d.msg.payload.len(),
        };
        if self.max_packet_out != 0
            && h.packet_len(self.protocol) > self.max_packet_out as usize
            && !dup
        {
            // MQTT-3.1.2-25: discard, as if it had been sent (and its
            // alias, never sent, stays unassigned).
            self.discarded += 1;
            return false;
        }
        if let Some(alias) = new_alias {
            self.register_alias(full_topic, alias);
        }
        self.conn
            .out
            .borrow_mut()
            .push_publish(&h, &d.msg.payload, self.protocol);
        self.conn.wake();
        true
    }

    fn packet(&mut self, p: Packet) {
        self.conn.out.borrow_mut().push_packet(&p, self.protocol);
        self.conn.wake();
    }

    fn journal(&mut self, ev: Journal) {
        let Some((log, sid)) = &mut self.log else {
            return;
        };
        let sid = *sid;
        match ev {
            // Not gating: after a crash the same packet id goes to the
            // same message again (ids follow from the durable records).
            Journal::Sent { pid, discarded } => log.append(
                &Rec::Sent {
                    sid,
                    pid,
                    discarded,
                },
                false,
            ),
            Journal::Ack { pid } => log.append(&Rec::Ack { sid, pid }, false),
            // PUBREL lets the client forget the packet id: only once the
            // broker cannot resend the PUBLISH.
            Journal::Rel { pid } => {
                log.append(&Rec::Rel { sid, pid }, true);
                self.conn.gate.set(log.gate());
            }
        }
    }
}

/// Appends this broker to a bridged message's hop marker.
fn add_hop(properties: &mut mqtt::Properties, id: &str) {
    use crate::config::bridge::HOPS;
    let before = properties
        .user_properties()
        .find(|(k, _)| k.as_str() == HOPS)
        .map(|(_, v)| v.as_str().to_string());
    let hops = match before {
        Some(v) => format!("{v},{id}"),
        None => id.to_string(),
    };
    properties
        .0
        .retain(|p| !matches!(p, mqtt::Property::UserProperty(k, _) if k.as_str() == HOPS));
    properties.push(mqtt::Property::UserProperty(
        ByteStr::from(HOPS),
        ByteStr::from(hops),
    ));
}

impl ConnOutbox<'_> {
    /// The outgoing topic alias for `topic`: (alias, already known to the
    /// client), or the next free alias (false) while the client's maximum is
    /// not reached; a new one counts only once `register_alias` records it.
    fn alias_for(&self, topic: &ByteStr) -> Option<(u16, bool)> {
        let st = self.conn.state.borrow();
        let max = st.alias_max_out;
        if max == 0 {
            return None;
        }
        let known = st.aliases.as_ref().map(|a| &a.outbound);
        if let Some(a) = known.and_then(|o| o.get(topic)) {
            return Some((*a, true));
        }
        let next = known.map_or(0, |o| o.len()) + 1;
        if next > usize::from(max) {
            return None;
        }
        Some((next as u16, false))
    }

    /// Records that the client learned `alias` for `topic` (its packet is queued).
    fn register_alias(&self, topic: &ByteStr, alias: u16) {
        let mut st = self.conn.state.borrow_mut();
        let aliases = st.aliases.get_or_insert_with(Default::default);
        aliases.outbound.insert(topic.clone(), alias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tarta_proto::mqtt::{Publish, QoS};

    #[test]
    fn out_queue_keeps_order_and_advances_across_segments() {
        let mut q = OutQueue::default();
        q.push_bytes(b"AB");
        let p = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "t".into(),
            packet_id: 0,
            properties: Default::default(),
            payload: Bytes::from_static(b"payload"),
        };
        q.push_publish(&PublishHeader::of(&p), &p.payload, Protocol::V311);
        q.push_bytes(b"CD");
        let mut all = Vec::new();
        let mut iov = [IoSlice::new(&[]); 8];
        let n = q.iovecs(&mut iov);
        for s in &iov[..n] {
            all.extend_from_slice(s);
        }
        assert_eq!(all.len(), q.len());
        assert_eq!(&all[..2], b"AB");
        assert_eq!(&all[2..6], &[0x30, 10, 0, 1]);
        assert_eq!(&all[7..14], b"payload");
        assert_eq!(&all[14..], b"CD");
        q.advance(5);
        let mut iov2 = [IoSlice::new(&[]); 8];
        let n = q.iovecs(&mut iov2);
        let rest: Vec<u8> = iov2[..n].iter().flat_map(|s| s.to_vec()).collect();
        assert_eq!(rest, all[5..]);
        q.advance(rest.len());
        assert!(q.is_empty());
    }

    /// A delivery too large for the client is discarded without teaching
    /// it an alias: the next message on that topic carries the topic with
    /// the alias, never an empty topic with an alias it never learned.
    #[test]
    fn an_alias_is_assigned_only_with_a_packet_that_goes_out() {
        use crate::session::{Delivery, Message, Outbox};
        use std::sync::Arc;
        let conn = Conn::new("127.0.0.1:1".parse().unwrap(), 0);
        {
            let mut st = conn.state.borrow_mut();
            st.protocol = Protocol::V5;
            st.max_packet_out = 64;
            st.alias_max_out = 4;
        }
        let delivery = |payload: &'static [u8]| Delivery {
            msg: Arc::new(Message {
                topic: "sensors/t".into(),
                payload: Bytes::from_static(payload),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: Default::default(),
                origin: None,
                expires_at: None,
                uid: 0,
                stamp: 0,
            }),
            qos: QoS::AtMostOnce,
            retain: false,
            sub_ids: Vec::new(),
            share: None,
        };
        let mut out = ConnOutbox::new(&conn, 0);
        assert!(
            !out.publish(&delivery(&[b'x'; 100]), 0, false),
            "too large: discarded"
        );
        assert!(conn.out.borrow().is_empty());
        assert!(out.publish(&delivery(b"small"), 0, false));
        assert!(out.publish(&delivery(b"again"), 0, false));
        let mut bytes = BytesMut::new();
        let mut iov = [IoSlice::new(&[]); 8];
        let q = conn.out.borrow();
        let n = q.iovecs(&mut iov);
        for s in &iov[..n] {
            bytes.extend_from_slice(s);
        }
        let first = mqtt::decode(&mut bytes, Protocol::V5, u32::MAX).unwrap();
        let second = mqtt::decode(&mut bytes, Protocol::V5, u32::MAX).unwrap();
        match (first, second) {
            (Some(Packet::Publish(a)), Some(Packet::Publish(b))) => {
                assert_eq!(
                    a.topic.as_str(),
                    "sensors/t",
                    "the first sent carries the topic"
                );
                assert_eq!(a.properties.topic_alias(), Some(1));
                assert_eq!(b.topic.as_str(), "", "then the alias alone");
                assert_eq!(b.properties.topic_alias(), Some(1));
            }
            other => panic!("{other:?}"),
        }
    }
}
