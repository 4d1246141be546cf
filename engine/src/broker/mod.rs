//! One shard's broker state and its routing: sessions homed here, the local
//! topic index, the replicated routing table, retained messages, and the
//! outbox of batches for other shards.
//!
//! Architecture invariant: this module never touches glommio, a socket or
//! the clock. The runtime drives it: it feeds packets (`client`), mesh
//! batches (`Shard::on_mesh`) and ticks (`Shard::on_tick`), and it drains the
//! connections' write queues and the outbox.

pub mod admin;
pub mod bridge;
pub mod client;
pub mod clients;
pub mod conn;
mod durable;
pub mod metrics;
pub mod retained;
mod route_cache;
mod shared;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod sim_tests;
pub mod sys;
mod tick;

use crate::config::Config;
use crate::security::SecurityCell;
use crate::session::{Delivery, Enqueued, Message, Session};
use crate::store::log::Log;
use crate::store::record::Rec;
use crate::transport::Layers;
use crate::wheel::Wheel;
use bytes::Bytes;
use clients::Clients;
use conn::{Conn, ConnOutbox};
use metrics::Metrics;
use retained::Retained;
use route_cache::{Lookup, RouteCache, Routed};
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::Waker;
use tarta_proto::acl::{Acl, ClientAcl};
use tarta_proto::index::TopicIndex;
use tarta_proto::mqtt::{Connect, Packet, QoS, SubOptions, Will};
use tarta_proto::ByteStr;

/// What shards send each other (batched per destination).
pub enum ShardMsg {
    /// A message for the receiver's local subscribers.
    Publish(Arc<Message>),
    /// A retained message for its topic's owner shard, which orders the
    /// writes to that topic (and logs them) and updates every replica.
    Retain(Arc<Message>),
    /// The owner's retained message for its topic: update the replica.
    Replica(Arc<Message>),
    /// Answer `DurAck(seq)` once everything this shard logged before it is
    /// durable (a publisher on the sender waits for its acknowledgement).
    DurBarrier(u32),
    DurAck(u32),
    /// The sender has persistent sessions (true) or no longer has any:
    /// only then do messages forwarded to it wait for its log.
    Durable(bool),
    /// The sender has its first local subscriber on this filter.
    RouteAdd(ByteStr),
    /// The sender's last local subscriber on this filter left.
    RouteDel(ByteStr),
    /// Answer with `RouteAck(seq)` once the route changes before it are applied.
    RouteBarrier(u64),
    RouteAck(u64),
    /// The sender has its first connected member of shared subscription
    /// (group, filter).
    ShareAdd(ByteStr, ByteStr),
    /// The sender's last connected member of (group, filter) left.
    ShareDel(ByteStr, ByteStr),
    /// Deliver to one local member of shared subscription (group, filter):
    /// the publishing shard chose this shard. `hops` bounds re-forwarding.
    Shared {
        key: Arc<(ByteStr, ByteStr)>,
        msg: Arc<Message>,
        hops: u8,
    },
    /// A connection whose CONNECT named a client id homed on the receiver.
    Handoff(Box<Handoff>),
    /// An admin API question or answer.
    Admin(Box<admin::AdminMsg>),
}

pub struct Handoff {
    pub fd: OwnedFd,
    pub peer: SocketAddr,
    /// The listener that accepted it (index in `Config::listeners`).
    pub listener: u16,
    pub connect: Box<Connect>,
    /// MQTT bytes read after the CONNECT packet.
    pub rest: Bytes,
    /// The transport layers (PROXY/TLS/WebSocket state, undecoded input,
    /// unwritten output), if the connection has any.
    pub layers: Option<Box<Layers>>,
    /// Counted in its address's connections (released when it closes).
    pub addr_counted: bool,
}

/// The home shard of a client id: where its session lives. Stable and
/// documented so operators (and tests) can tell where a client will land.
pub fn home_shard(client_id: &str, shards: usize) -> usize {
    // FNV-1a, 64 bit.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in client_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

/// A subscription in the local index.
#[derive(Debug, Clone)]
pub struct Sub {
    pub opts: SubOptions,
    pub sub_id: Option<u32>,
    /// The ACL allows the filter but denies some topics under it: check
    /// read access per delivered message.
    pub filtered: bool,
}

pub struct SessionEntry {
    pub session: Session,
    pub conn: Option<Rc<Conn>>,
    /// The ACL rules resolved for this client (None: no ACL configured).
    /// Boxed: every session pays for the field, few clients have rules.
    pub acl: Option<Box<ClientAcl>>,
    /// Bumped at every (re)connection: timers of an older one are stale.
    pub generation: u32,
    /// Session Expiry Interval in seconds (0: ends with the connection;
    /// u32::MAX: never).
    pub expiry: u32,
    /// What few sessions have (a will waiting for its delay, the username
    /// of a persistent session): boxed, so that the others pay 8 bytes.
    pub rare: Option<Box<Rare>>,
    /// Its queue is above `max_queued_messages` while connected: the shard
    /// holds publishers back until it drains (see `Shard::congestion`).
    pub congested: bool,
}

#[derive(Default)]
pub struct Rare {
    /// A will waiting for its Will Delay Interval (5.0).
    pub will: Option<Will>,
    /// The client's username: its ACL is resolved again from it after a
    /// reload (and, logged with a persistent session, after a restart).
    pub username: Option<ByteStr>,
    /// Its inbound publish budget (only with `max_publish_rate` or
    /// `max_publish_bytes_rate`).
    pub throttle: Option<Throttle>,
    /// The session is this bridge's (index in `Config::bridges`).
    pub bridge: Option<u16>,
}

/// A client's inbound publish budget: two token buckets (messages and
/// bytes), each holding at most one second's worth.
pub struct Throttle {
    msgs: f64,
    bytes: f64,
    at: std::time::Instant,
}

impl Throttle {
    /// Takes one message of `len` bytes. Ok, or Err(how long until the
    /// budget is back in the black): QoS 0 is then dropped (nothing taken),
    /// QoS 1/2 taken anyway (the publisher is paused that long).
    pub fn take(
        slot: &mut Option<Throttle>,
        l: &crate::config::Limits,
        len: usize,
        force: bool,
    ) -> Result<(), std::time::Duration> {
        let now = std::time::Instant::now();
        let (rate, brate) = (
            f64::from(l.max_publish_rate),
            l.max_publish_bytes_rate as f64,
        );
        let t = slot.get_or_insert(Throttle {
            msgs: rate,
            bytes: brate,
            at: now,
        });
        let dt = now.duration_since(t.at).as_secs_f64();
        t.at = now;
        t.msgs = (t.msgs + dt * rate).min(rate);
        t.bytes = (t.bytes + dt * brate).min(brate);
        let (m, b) = (t.msgs - 1.0, t.bytes - len as f64);
        let short = |left: f64, r: f64| {
            if r > 0.0 && left < 0.0 {
                -left / r
            } else {
                0.0
            }
        };
        let wait = short(m, rate).max(short(b, brate));
        if wait > 0.0 && !force {
            return Err(std::time::Duration::from_secs_f64(wait));
        }
        if rate > 0.0 {
            t.msgs = m;
        }
        if brate > 0.0 {
            t.bytes = b;
        }
        if wait > 0.0 {
            Err(std::time::Duration::from_secs_f64(wait))
        } else {
            Ok(())
        }
    }
}

impl SessionEntry {
    pub fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }

    fn tidy(&mut self) {
        if self.rare.as_ref().is_some_and(|r| {
            r.will.is_none() && r.username.is_none() && r.throttle.is_none() && r.bridge.is_none()
        }) {
            self.rare = None;
        }
    }

    pub fn pending_will(&self) -> Option<&Will> {
        self.rare.as_ref().and_then(|r| r.will.as_ref())
    }

    pub fn take_will(&mut self) -> Option<Will> {
        let w = self.rare.as_mut().and_then(|r| r.will.take());
        self.tidy();
        w
    }

    pub fn set_will(&mut self, w: Option<Will>) {
        match w {
            Some(w) => self.rare_mut().will = Some(w),
            None => {
                if let Some(r) = self.rare.as_mut() {
                    r.will = None;
                }
                self.tidy();
            }
        }
    }

    pub fn username(&self) -> Option<&ByteStr> {
        self.rare.as_ref().and_then(|r| r.username.as_ref())
    }

    pub fn set_username(&mut self, u: Option<ByteStr>) {
        match u {
            // Its own copy: the CONNECT's would keep its read chunk alive.
            Some(u) => self.rare_mut().username = Some(ByteStr::from(u.as_str().to_owned())),
            None => {
                if let Some(r) = self.rare.as_mut() {
                    r.username = None;
                }
                self.tidy();
            }
        }
    }
}

/// Things that happen at a given broker second.
enum TimerEvent {
    /// The offline session expires (if still at this generation).
    SessionExpiry { sid: usize, generation: u32 },
    /// Its delayed will is due (if still at this generation).
    Will { sid: usize, generation: u32 },
}

/// One matching subscription, before merging per session.
#[derive(Clone)]
pub(crate) struct Match {
    sid: usize,
    /// The subscription's QoS (the message's caps it at delivery).
    qos: QoS,
    rap: bool,
    no_local: bool,
    sub_id: Option<u32>,
    filtered: bool,
}

/// This shard's connected members of one shared subscription.
#[derive(Default)]
pub struct ShareLocal {
    /// (session, options, subscription identifier), in join order.
    pub members: Vec<(usize, SubOptions, Option<u32>)>,
    next: usize,
}

/// Which shards have connected members of one shared subscription
/// (replicated on every shard), and the round-robin position.
pub struct ShareRoute {
    shards: Vec<u16>,
    next: Cell<usize>,
}

/// A SUBACK held until every other shard has applied this shard's route
/// changes, so that a publish anywhere after the SUBACK reaches the new
/// subscription.
struct HeldSuback {
    seq: u64,
    conn: Weak<Conn>,
    sid: usize,
    suback: Packet,
    retained: Vec<Delivery>,
}

pub struct State {
    pub clients: Clients,
    /// Boxed: the slab grows by doubling, and an idle client should not
    /// pay for that slack on a few hundred bytes.
    pub sessions: Slab<Box<SessionEntry>>,
    pub index: TopicIndex<usize, Sub>,
    /// Which other shards have subscribers, by filter.
    pub routes: TopicIndex<u16, ()>,
    pub retained: Retained,
    /// Per destination shard, messages waiting for the mesh pump.
    pub outbox: Vec<Vec<ShardMsg>>,
    pub wheel: Wheel<(u64, Weak<Conn>)>,
    /// Connections accepted since the last tick, not yet in the wheel: one
    /// handed to its home shard within the second leaves no wheel entry
    /// behind (a wheel entry's `Weak` would keep its memory until the
    /// CONNECT timeout).
    fresh: Vec<Weak<Conn>>,
    route_seq: u64,
    route_acked: Vec<u64>,
    held: Vec<HeldSuback>,
    scratch: Vec<Match>,
    /// Bumped by every change to `index` or `routes` (invalidates `cache`).
    pub route_gen: u64,
    cache: RouteCache,
    timers: std::collections::BTreeMap<(u64, u64), TimerEvent>,
    timer_seq: u64,
    /// Shared subscriptions: local members by (group, filter).
    pub shares: HashMap<(ByteStr, ByteStr), ShareLocal>,
    /// Shared subscriptions: filter -> group -> shards with members.
    share_routes: TopicIndex<ByteStr, ShareRoute>,
    /// Mesh messages set aside while a local subscriber is congested, by
    /// sending shard, in order; taken up again before the channels.
    stalled: std::collections::VecDeque<(usize, Vec<ShardMsg>)>,
    /// The write-ahead log (None: persistence off).
    pub log: Option<Log>,
    /// Durability barriers: the last one sent to the other shards, whether
    /// one is wanted (sent with the next outbox flush), and the last one
    /// each shard acknowledged.
    dur_issued: u32,
    dur_want: bool,
    /// Barriers asked for so far (a packet that asked gates its connection).
    dur_reqs: u64,
    /// QoS 2 messages from persistent sessions, routed once their log
    /// epoch is durable: (epoch, message, its id in the log).
    held2: Vec<(u32, Arc<Message>)>,
    /// Routed QoS 2 messages waiting for their destinations' logs (this
    /// shard's epoch, the durability barrier) before `Routed` is logged.
    routed2: Vec<(u32, u16, Arc<Message>)>,
    /// Logged sessions homed here; which other shards have some; and
    /// whether the next SUBACK must wait until the others know this shard
    /// has some (so that their publishes wait for its log).
    logged_sessions: usize,
    durable_peers: Vec<bool>,
    announce: bool,
    /// After a restart: messages to route again once the other shards'
    /// routes are known (route barrier number), and the identities of the
    /// QoS 2 messages already queued here (not queued twice).
    reroute: Option<(u64, Vec<Arc<Message>>)>,
    seen_uids: std::collections::HashSet<u64>,
    next_uid: u64,
    dur_acked: Vec<u32>,
    /// The session of each bridge homed here (index = `Config::bridges`).
    pub bridge_sids: Vec<Option<usize>>,
}

pub struct Shard {
    pub id: usize,
    pub n: usize,
    pub cfg: Arc<Config>,
    /// Password files and the ACL (replaced on SIGHUP).
    pub security: Arc<SecurityCell>,
    /// The security generation this shard's clients' ACLs were resolved with.
    pub security_seen: Cell<u64>,
    /// The ACL of that generation.
    pub acl: RefCell<Option<Arc<Acl>>>,
    pub st: RefCell<State>,
    /// Written by this shard only; read by scrapes from any thread.
    pub metrics: Arc<Metrics>,
    /// Every shard's metrics (shard 0 sums them into `$SYS/broker/...`).
    pub all_metrics: RefCell<Arc<Vec<Arc<Metrics>>>>,
    /// Shard 0: the previous `$SYS/broker` publication (load averages).
    pub sys: RefCell<sys::SysState>,
    /// Admin API requests waiting for other shards' answers, by id.
    pub admin_waits: Rc<RefCell<HashMap<u64, admin::AdminWait>>>,
    /// Numbers admin requests (with the shard id in the low bits).
    pub admin_seq: Cell<u64>,
    /// Seconds since the shard started (set by the runtime's ticker).
    pub now: Cell<u64>,
    /// Wakes the runtime's mesh pump when the outbox gets work.
    pub pump_waker: Cell<Option<Waker>>,
    /// Connections waiting for the outbox to drain (backpressure).
    pub paused: RefCell<Vec<Waker>>,
    /// Salt for assigned client ids.
    pub next_conn_id: Cell<u64>,
    pub shutting_down: Cell<bool>,
    /// Connected sessions whose queue is above `max_queued_messages`.
    pub congested: Cell<usize>,
    /// Connections waiting for the log (or other shards' logs) to make
    /// their output durable.
    pub gate_waiters: RefCell<Vec<Waker>>,
    /// Every bridge's status, shared by the shards (set by the runtime).
    pub bridges: RefCell<Arc<bridge::Bridges>>,
}

/// Messages queued towards one shard beyond which QoS 0 is dropped and
/// publishers' reads pause.
const OUTBOX_HIGH: usize = 64 * 1024;

impl Shard {
    pub fn new(id: usize, n: usize, cfg: Arc<Config>, security: Arc<SecurityCell>) -> Shard {
        let current = security.load();
        Shard {
            id,
            n,
            security_seen: Cell::new(current.generation),
            acl: RefCell::new(current.acl.clone()),
            security,
            st: RefCell::new(State {
                clients: Clients::default(),
                sessions: Slab::new(),
                index: TopicIndex::new(),
                routes: TopicIndex::new(),
                retained: Retained::default(),
                outbox: (0..n).map(|_| Vec::new()).collect(),
                wheel: Wheel::new(0),
                fresh: Vec::new(),
                route_seq: 0,
                route_acked: vec![0; n],
                held: Vec::new(),
                scratch: Vec::new(),
                route_gen: 0,
                cache: RouteCache::default(),
                timers: Default::default(),
                timer_seq: 0,
                shares: HashMap::new(),
                share_routes: TopicIndex::new(),
                stalled: Default::default(),
                log: None,
                dur_issued: 0,
                dur_want: false,
                dur_reqs: 0,
                held2: Vec::new(),
                routed2: Vec::new(),
                logged_sessions: 0,
                durable_peers: vec![false; n],
                announce: false,
                reroute: None,
                seen_uids: Default::default(),
                next_uid: 0,
                dur_acked: vec![0; n],
                bridge_sids: vec![None; cfg.bridges.len()],
            }),
            metrics: Arc::new(Metrics::default()),
            all_metrics: RefCell::new(Arc::new(Vec::new())),
            sys: RefCell::new(Default::default()),
            admin_waits: Default::default(),
            admin_seq: Cell::new(0),
            now: Cell::new(0),
            pump_waker: Cell::new(None),
            paused: RefCell::new(Vec::new()),
            next_conn_id: Cell::new(0),
            shutting_down: Cell::new(false),
            congested: Cell::new(0),
            gate_waiters: RefCell::new(Vec::new()),
            bridges: RefCell::new(Arc::new(bridge::Bridges::new(cfg.bridges.len()))),
            cfg,
        }
    }

    /// A new connection on this shard; it enters the timer wheel at the
    /// next tick (CONNECT timeout) unless its CONNECT has scheduled it.
    pub fn new_conn(&self, peer: SocketAddr) -> Rc<Conn> {
        let conn = Rc::new(Conn::new(peer, self.now.get()));
        self.st.borrow_mut().fresh.push(Rc::downgrade(&conn));
        Metrics::inc(&self.metrics.connections_current);
        conn
    }

    /// (Re)schedules the connection's deadline in the timer wheel; older
    /// entries for it become stale and are skipped.
    pub fn schedule(&self, st: &mut State, conn: &Rc<Conn>) {
        if let Some(at) = conn.deadline(self.cfg.connect_timeout) {
            conn.set_wheel_at(Some(at));
            st.wheel.insert(at, (at, Rc::downgrade(conn)));
        }
    }

    /// The client id of a connection's session (empty before CONNECT).
    pub fn client_id(&self, conn: &Conn) -> ByteStr {
        let Some(sid) = conn.state.borrow().session else {
            return ByteStr::default();
        };
        self.st
            .borrow()
            .sessions
            .get(sid)
            .map(|e| ByteStr::from(e.session.client_id.to_string()))
            .unwrap_or_default()
    }

    /// Whether publishers on this shard should stop reading for now.
    pub fn backlogged(&self) -> bool {
        self.congested.get() > 0
            || self
                .st
                .borrow()
                .outbox
                .iter()
                .any(|q| q.len() >= OUTBOX_HIGH)
    }

    /// Backpressure for QoS 1/2 (DESIGN: never dropped while the client is
    /// connected; publishers' reads pause instead). A connected session's
    /// queue may grow past `max_queued_messages` (up to 8 times, its hard
    /// bound); while any session here is past it, this shard stops reading
    /// from publishers and from the mesh, so other shards' publishers pause
    /// too. Below half the bound, everything resumes.
    pub fn congestion(&self, entry: &mut SessionEntry) {
        let soft = self.cfg.max_queued_messages;
        let q = entry.session.queued_len();
        // A bridge buffers by design (its bound is `max_buffer_bytes`):
        // draining a backlog must not hold the local publishers back.
        let over = entry.conn.is_some() && q >= soft && entry.bridge().is_none();
        if over && !entry.congested {
            entry.congested = true;
            self.congested.set(self.congested.get() + 1);
        } else if entry.congested && (entry.conn.is_none() || q <= soft / 2) {
            entry.congested = false;
            self.congested.set(self.congested.get().saturating_sub(1));
            if self.congested.get() == 0 {
                for w in self.paused.take() {
                    w.wake();
                }
                if let Some(w) = self.pump_waker.take() {
                    w.wake();
                }
            }
        }
        if let Some(c) = &entry.conn {
            // A subscriber with messages in flight must keep reading: its
            // acknowledgements are what drains the congestion.
            c.acking.set(entry.session.inflight_len() > 0);
        }
    }

    pub fn push_out(&self, st: &mut State, to: usize, m: ShardMsg) {
        let q = &mut st.outbox[to];
        q.push(m);
        if q.len() == 1 {
            if let Some(w) = self.pump_waker.take() {
                w.wake();
            }
        }
    }

    /// Routes a message published on this shard: to local subscribers, and
    /// to every other shard with a matching route (all shards if retained).
    pub fn route(&self, st: &mut State, msg: Arc<Message>) {
        if msg.retain {
            // This replica at once (a SUBSCRIBE here sees it); the owner's
            // order wins on every replica, this one included.
            st.retained.set(&msg);
            let owner = home_shard(&msg.topic, self.n);
            if owner == self.id {
                self.owner_retain(st, &msg, None);
            } else {
                self.push_out(st, owner, ShardMsg::Retain(msg.clone()));
                // The owner logs it, whoever subscribes.
                self.want_barrier(st, &msg, None);
            }
        }
        let (mask, wide) = self.deliver_local(st, &msg, true);
        self.route_shared(st, &msg);
        if self.n == 1 {
            return;
        }
        for to in 0..self.n {
            let hit = if to < 128 {
                mask & (1 << to) != 0
            } else {
                wide.contains(&(to as u16))
            };
            if hit && to != self.id {
                self.forward(st, to, &msg);
            }
        }
    }

    /// The local subscriptions matching `topic` (into `out`, sorted by
    /// session) and the other shards with a matching route: from the route
    /// cache, or walked and (on a repeated miss) cached. The routing table
    /// is walked on a miss only if `want_remote` or the entry is to be
    /// cached (a cached entry serves later local publishes too).
    fn matches(
        &self,
        st: &mut State,
        topic: &str,
        out: &mut Vec<Match>,
        want_remote: bool,
    ) -> (u128, Vec<u16>) {
        let gen = st.route_gen;
        let (hash, admit) = match st.cache.lookup(topic, gen) {
            Lookup::Hit(r) => {
                out.extend_from_slice(&r.local);
                return (r.remote, r.wide.clone());
            }
            Lookup::Miss { hash, admit } => (hash, admit),
        };
        let start = out.len();
        st.index.for_each_match(topic, |_, sid, sub| {
            out.push(Match {
                sid: *sid,
                qos: sub.opts.qos,
                rap: sub.opts.retain_as_published,
                no_local: sub.opts.no_local,
                sub_id: sub.sub_id,
                filtered: sub.filtered,
            });
        });
        out[start..].sort_unstable_by_key(|m| m.sid);
        let mut mask: u128 = 0;
        let mut wide: Vec<u16> = Vec::new();
        if self.n > 1 && (want_remote || admit) {
            st.routes.for_each_match(topic, |_, shard, _| {
                if *shard < 128 {
                    mask |= 1 << *shard;
                } else if !wide.contains(shard) {
                    wide.push(*shard);
                }
            });
        }
        if admit {
            let routed = Routed {
                local: out[start..].to_vec(),
                remote: mask,
                wide: wide.clone(),
            };
            st.cache.fill(hash, gen, topic, routed);
        }
        (mask, wide)
    }

    fn forward(&self, st: &mut State, to: usize, msg: &Arc<Message>) {
        if msg.qos == QoS::AtMostOnce && st.outbox[to].len() >= OUTBOX_HIGH {
            Metrics::inc(&self.metrics.qos0_dropped);
            return;
        }
        self.push_out(st, to, ShardMsg::Publish(msg.clone()));
        self.want_barrier(st, msg, Some(to));
    }

    /// Delivers to this shard's subscribers: once per session, at the
    /// highest granted QoS of its matching subscriptions, carrying every
    /// matching subscription identifier. With `want_remote` (a message
    /// published here), also returns the other shards with a matching route
    /// (see `matches`); a message from another shard needs none.
    pub fn deliver_local(
        &self,
        st: &mut State,
        msg: &Arc<Message>,
        want_remote: bool,
    ) -> (u128, Vec<u16>) {
        let mut scratch = std::mem::take(&mut st.scratch);
        scratch.clear();
        let remote = self.matches(st, &msg.topic, &mut scratch, want_remote);
        let origin = msg.origin;
        let me = self.id as u16;
        let mut i = 0;
        while i < scratch.len() {
            let sid = scratch[i].sid;
            let mut qos = QoS::AtMostOnce;
            let mut rap = false;
            let mut filtered = true;
            let mut sub_ids = Vec::new();
            let mut any = false;
            while i < scratch.len() && scratch[i].sid == sid {
                let m = &scratch[i];
                i += 1;
                if m.no_local && origin == Some((me, sid)) {
                    continue;
                }
                any = true;
                qos = qos.max(m.qos.min(msg.qos));
                rap |= m.rap;
                filtered &= m.filtered;
                if let Some(id) = m.sub_id {
                    sub_ids.push(id);
                }
            }
            if !any {
                continue;
            }
            let d = Delivery {
                msg: msg.clone(),
                qos,
                retain: rap && msg.retain,
                sub_ids,
                share: None,
            };
            self.deliver_to(st, sid, d, filtered);
        }
        st.scratch = scratch;
        remote
    }

    /// Hands one delivery to a session; `check_acl` asks for a per-message
    /// read check (the subscription's filter overlaps a deny rule).
    pub fn deliver_to(&self, st: &mut State, sid: usize, mut d: Delivery, check_acl: bool) {
        if d.msg.uid != 0 && st.seen_uids.contains(&d.msg.uid) {
            // Routed again after a crash: already in this shard's queues.
            return;
        }
        let bridge = st.sessions.get(sid).and_then(|e| e.bridge());
        if let Some(idx) = bridge {
            if !self.bridge_admit(st, sid, idx, &mut d) {
                return;
            }
        }
        let Some(entry) = st.sessions.get_mut(sid) else {
            return;
        };
        if check_acl {
            if let Some(acl) = &entry.acl {
                if !acl.can_read(&d.msg.topic) {
                    Metrics::inc(&self.metrics.acl_denied);
                    return;
                }
            }
        }
        let logged = entry.session.logged && st.log.is_some();
        if logged && entry.session.accepts(d.qos, entry.conn.is_some()) {
            // A persistent destination: the delivery is logged, and the
            // subscriber sees it only once that is durable.
            if let Some(log) = st.log.as_mut() {
                let mid = log.message(&d.msg);
                let rec = Rec::Enq {
                    sid: sid as u32,
                    mid,
                    qos: d.qos,
                    retain: d.retain,
                    share: d.share.is_some(),
                    sub_ids: d.sub_ids.clone(),
                };
                log.append(&rec, true);
                if let Some(c) = &entry.conn {
                    c.gate.set(log.gate());
                }
            }
        }
        let log = if logged { st.log.as_mut() } else { None };
        let qos = d.qos as usize;
        let r = match &entry.conn {
            Some(conn) => {
                if d.qos == QoS::AtMostOnce && conn.queued() >= self.cfg.max_queued_bytes {
                    Metrics::inc(&self.metrics.qos0_dropped);
                    return;
                }
                let mapped = bridge.and_then(|i| self.cfg.bridges.get(i));
                let mut out = ConnOutbox::logged(conn, self.now.get(), log, sid).mapped(mapped);
                let r = entry.session.deliver(d, Some(&mut out));
                if out.discarded > 0 {
                    Metrics::inc(&self.metrics.expired_or_oversize);
                }
                r
            }
            None => entry.session.deliver(d, None),
        };
        self.congestion(entry);
        match r {
            Enqueued::Sent => {
                Metrics::inc(&self.metrics.messages_sent);
                self.metrics.sent_qos[qos].add(1);
            }
            Enqueued::Queued => {}
            Enqueued::Dropped if entry.conn.is_some() || entry.session.persistent => {
                Metrics::inc(&self.metrics.queue_dropped)
            }
            Enqueued::Dropped => {}
        }
        if let Some(idx) = bridge {
            self.bridge_refresh(st, idx);
        }
    }

    /// Broadcasts a route change for `filter` to every other shard.
    pub fn route_change(&self, st: &mut State, filter: &ByteStr, add: bool) {
        for to in 0..self.n {
            if to != self.id {
                let m = if add {
                    ShardMsg::RouteAdd(filter.clone())
                } else {
                    ShardMsg::RouteDel(filter.clone())
                };
                self.push_out(st, to, m);
            }
        }
    }

    /// Sends a SUBACK now, or holds it until the other shards have applied
    /// this shard's route changes.
    pub fn suback(
        &self,
        st: &mut State,
        conn: &Rc<Conn>,
        sid: usize,
        suback: Packet,
        retained: Vec<Delivery>,
        routes_changed: bool,
    ) {
        if routes_changed {
            st.route_seq += 1;
            let seq = st.route_seq;
            for to in 0..self.n {
                if to != self.id {
                    self.push_out(st, to, ShardMsg::RouteBarrier(seq));
                }
            }
        }
        let min_acked = self.min_acked(st);
        if min_acked < st.route_seq {
            conn.held.set(true);
            st.held.push(HeldSuback {
                seq: st.route_seq,
                conn: Rc::downgrade(conn),
                sid,
                suback,
                retained,
            });
            return;
        }
        self.send_suback(st, conn, sid, suback, retained);
    }

    fn min_acked(&self, st: &State) -> u64 {
        (0..self.n)
            .filter(|j| *j != self.id)
            .map(|j| st.route_acked[j])
            .min()
            .unwrap_or(u64::MAX)
    }

    fn send_suback(
        &self,
        st: &mut State,
        conn: &Rc<Conn>,
        sid: usize,
        suback: Packet,
        retained: Vec<Delivery>,
    ) {
        if conn.held.replace(false) {
            conn.resumed.set(true);
        }
        if conn.is_closing() {
            return;
        }
        let protocol = conn.state.borrow().protocol;
        conn.out.borrow_mut().push_packet(&suback, protocol);
        conn.wake();
        for d in retained {
            self.deliver_to(st, sid, d, false);
        }
    }

    /// Applies a batch from shard `from`. Handoffs are returned for the
    /// runtime to start.
    pub fn on_mesh(&self, from: usize, batch: Vec<ShardMsg>, handoffs: &mut Vec<Box<Handoff>>) {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        let mut it = batch.into_iter();
        while let Some(m) = it.next() {
            let delivers = matches!(m, ShardMsg::Publish(_) | ShardMsg::Shared { .. });
            if delivers && self.congested.get() > 0 {
                // Backpressure: stop between messages; the rest waits here
                // (ahead of anything newer) until the congestion clears.
                let mut rest = vec![m];
                rest.extend(it);
                st.stalled.push_front((from, rest));
                return;
            }
            match m {
                ShardMsg::Publish(msg) => {
                    self.deliver_local(st, &msg, false);
                }
                ShardMsg::Retain(msg) => self.owner_retain(st, &msg, Some(from)),
                ShardMsg::Replica(msg) => st.retained.set(&msg),
                ShardMsg::DurBarrier(seq) => self.dur_barrier(st, from, seq),
                ShardMsg::DurAck(seq) => self.dur_ack(st, from, seq),
                ShardMsg::Durable(on) => st.durable_peers[from] = on,
                ShardMsg::RouteAdd(f) => {
                    st.routes.insert(&f, from as u16, ());
                    st.route_gen += 1;
                }
                ShardMsg::RouteDel(f) => {
                    st.routes.remove(&f, &(from as u16));
                    st.route_gen += 1;
                }
                ShardMsg::RouteBarrier(seq) => self.push_out(st, from, ShardMsg::RouteAck(seq)),
                ShardMsg::RouteAck(seq) => {
                    st.route_acked[from] = st.route_acked[from].max(seq);
                    self.release_held(st);
                }
                ShardMsg::ShareAdd(g, f) => self.share_route_update(st, &(g, f), from, true),
                ShardMsg::ShareDel(g, f) => self.share_route_update(st, &(g, f), from, false),
                ShardMsg::Shared { key, msg, hops } => self.deliver_shared(st, key, msg, hops),
                ShardMsg::Handoff(h) => handoffs.push(h),
                ShardMsg::Admin(m) => self.on_admin(st, from, *m),
            }
        }
    }

    /// After a restart: asks every other shard for a route barrier; once
    /// all have answered (`startup_done`), their routes and restored
    /// sessions are known here and clients may be served.
    pub fn startup_barrier(&self) -> u64 {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        st.route_seq += 1;
        let seq = st.route_seq;
        for to in 0..self.n {
            if to != self.id {
                self.push_out(st, to, ShardMsg::RouteBarrier(seq));
            }
        }
        seq
    }

    pub fn startup_done(&self, seq: u64) -> bool {
        let st = self.st.borrow();
        self.min_acked(&st) >= seq
    }

    /// Takes up mesh messages set aside during congestion. Returns true
    /// when none are left (the channels may be drained again).
    pub fn resume_stalled(&self, handoffs: &mut Vec<Box<Handoff>>) -> bool {
        loop {
            if self.congested.get() > 0 {
                return false;
            }
            let next = self.st.borrow_mut().stalled.pop_front();
            match next {
                Some((from, msgs)) => self.on_mesh(from, msgs, handoffs),
                None => return true,
            }
        }
    }

    pub fn has_stalled(&self) -> bool {
        !self.st.borrow().stalled.is_empty()
    }

    fn release_held(&self, st: &mut State) {
        let min_acked = self.min_acked(st);
        if st
            .reroute
            .as_ref()
            .is_some_and(|(seq, _)| *seq <= min_acked)
        {
            if let Some((_, msgs)) = st.reroute.take() {
                self.reroute(st, msgs);
            }
        }
        if st.held.iter().all(|h| h.seq > min_acked) {
            return;
        }
        let held = std::mem::take(&mut st.held);
        for h in held {
            if h.seq > min_acked {
                st.held.push(h);
                continue;
            }
            if let Some(conn) = h.conn.upgrade() {
                self.send_suback(st, &conn, h.sid, h.suback, h.retained);
            }
        }
    }
}

impl Shard {
    /// A client's ACL under the current rules (None: no ACL file).
    pub fn client_acl(&self, client_id: &str, username: Option<&str>) -> Option<Box<ClientAcl>> {
        self.acl
            .borrow()
            .as_ref()
            .map(|a| Box::new(a.for_client(client_id, username)))
    }

    /// After a SIGHUP reload: re-resolves every session's ACL, so that the
    /// new rules apply to the next publish and subscription at once.
    /// (Subscriptions already granted keep delivering.)
    pub fn check_security(&self) {
        let g = self.security.generation();
        if g == self.security_seen.get() {
            return;
        }
        self.security_seen.set(g);
        *self.acl.borrow_mut() = self.security.load().acl.clone();
        let mut st = self.st.borrow_mut();
        for (_, e) in st.sessions.iter_mut() {
            let user = e.username().map(|u| u.to_string());
            e.acl = self.client_acl(&e.session.client_id, user.as_deref());
        }
    }
}
