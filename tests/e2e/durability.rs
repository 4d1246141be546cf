//! Durability: the broker is SIGKILLed mid-traffic and restarted on the
//! same port with the same data directory. Blocking byte-level clients
//! built on Tarta's own codec know exactly which packets were
//! acknowledged, so the tests can check that every acknowledged message
//! arrives (QoS 1: at least once; QoS 2: exactly once) and that persistent
//! sessions, their subscriptions and queues, and retained messages survive,
//! also when the shard count changes.
//!
//! `TARTA_E2E_NO_KILL=1` runs the two kill loops against one broker
//! started with `--no-persistence` and never killed: at each "kill" the
//! clients drop their connections instead. That checks the clients' own
//! bookkeeping (resends, the exactly-once receiver) apart from the
//! write-ahead log: when a kill loop fails, run it this way to tell a test
//! bug from a durability bug.

use crate::harness::{connect_packet, id_on, rand_u64, Broker, TempDir};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tarta_proto::mqtt::{
    self, Ack, ConnAck, Connect, Packet, Properties, Property, Protocol, Publish, QoS, SubOptions,
    Subscribe,
};

/// Kill cycles per loop (then one last cycle without a kill that drains).
const CYCLES: usize = 20;
/// Messages a publisher keeps unacknowledged at most.
const WINDOW: usize = 32;
const SESSION_EXPIRY: u32 = 3600;
const QUIET: Duration = Duration::from_millis(500);

fn no_kill() -> bool {
    std::env::var("TARTA_E2E_NO_KILL").is_ok_and(|v| v == "1")
}

// ---------------------------------------------------------------- broker

/// A broker that can be killed and started again on the same port with
/// the same data directory.
struct Node {
    // Before `dir`: the broker dies before its directory is removed.
    broker: Option<Broker>,
    dir: TempDir,
    /// 0 until the first start reports the port.
    port: u16,
    persistent: bool,
    starts: usize,
}

impl Node {
    fn new(tag: &str, persistent: bool) -> Node {
        Node {
            broker: None,
            dir: TempDir::new(tag),
            port: 0,
            persistent,
            starts: 0,
        }
    }

    fn start(&mut self, shards: usize) {
        let mut args: Vec<String> = [
            "--tcp",
            &format!("127.0.0.1:{}", self.port),
            "--shards",
            &shards.to_string(),
            "--no-pin",
            "--sys-interval",
            "0",
            "--log",
            "info",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.persistent {
            let data = self.dir.0.join("data");
            args.extend(["--data-dir".into(), data.display().to_string()]);
            args.extend(["--fsync".into(), "always".into()]);
        } else {
            args.push("--no-persistence".into());
        }
        let log = self.dir.0.join("broker.log");
        let b = Broker::try_start_args(&args, &log, Duration::from_secs(30)).unwrap_or_else(|e| {
            panic!(
                "start #{} of tarta failed: {e}\n(the durability tests need the \
                 write-ahead log: --data-dir, --fsync)",
                self.starts + 1
            )
        });
        assert_ne!(b.port, 0, "tarta did not report its tcp port");
        if self.port == 0 {
            self.port = b.port;
        }
        assert_eq!(b.port, self.port, "restarted on another port");
        self.starts += 1;
        self.broker = Some(b);
    }

    /// SIGKILL: no shutdown, no flush, nothing.
    fn kill(&mut self) {
        if let Some(mut b) = self.broker.take() {
            b.kill();
        }
    }
}

// ---------------------------------------------------------------- client

/// A blocking MQTT connection on Tarta's codec.
struct Conn {
    s: TcpStream,
    buf: BytesMut,
    protocol: Protocol,
    timeout: Option<Duration>,
}

#[derive(Debug)]
enum Rx {
    Packet(Packet),
    Timeout,
    Closed(String),
}

fn connect_pkt(protocol: Protocol, id: &str, clean: bool) -> Connect {
    let mut c = connect_packet(protocol, id, clean, 60);
    if protocol.is_v5() && !clean {
        c.properties = Properties(vec![Property::SessionExpiryInterval(SESSION_EXPIRY)]);
    }
    c
}

fn ack(packet_id: u16) -> Ack {
    Ack {
        packet_id,
        reason: 0,
        properties: Properties::default(),
    }
}

fn publish_pkt(topic: &str, qos: QoS, packet_id: u16, payload: Bytes, retain: bool) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain,
        topic: topic.into(),
        packet_id,
        properties: Properties::default(),
        payload,
    })
}

impl Conn {
    fn open(port: u16, c: &Connect) -> Result<(Conn, ConnAck), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        let _ = s.set_nodelay(true);
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        let mut conn = Conn {
            s,
            buf: BytesMut::new(),
            protocol: c.protocol,
            timeout: None,
        };
        conn.send(&Packet::Connect(Box::new(c.clone())))
            .map_err(|e| format!("send CONNECT: {e}"))?;
        match conn.recv(Duration::from_secs(10)) {
            Rx::Packet(Packet::ConnAck(a)) if a.code == 0 => Ok((conn, a)),
            other => Err(format!("expected a successful CONNACK, got {other:?}")),
        }
    }

    /// Connects, retrying for a while (a broker just started, or a
    /// connection refused while it dies, is not a failure of the test).
    fn connect(port: u16, c: &Connect) -> (Conn, ConnAck) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match Conn::open(port, c) {
                Ok(r) => return r,
                Err(e) if Instant::now() >= deadline => {
                    panic!("{}: cannot connect: {e}", c.client_id)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn send(&mut self, p: &Packet) -> std::io::Result<()> {
        self.send_all(std::slice::from_ref(p))
    }

    /// Encodes `ps` into one buffer: one write.
    fn send_all(&mut self, ps: &[Packet]) -> std::io::Result<()> {
        if ps.is_empty() {
            return Ok(());
        }
        let mut b = BytesMut::new();
        for p in ps {
            mqtt::encode(p, self.protocol, &mut b);
        }
        self.s.write_all(&b)
    }

    fn recv(&mut self, within: Duration) -> Rx {
        loop {
            match mqtt::decode(&mut self.buf, self.protocol, u32::MAX) {
                Ok(Some(p)) => return Rx::Packet(p),
                Ok(None) => {}
                Err(e) => return Rx::Closed(format!("undecodable input: {e:?}")),
            }
            if self.timeout != Some(within) {
                if let Err(e) = self.s.set_read_timeout(Some(within)) {
                    return Rx::Closed(e.to_string());
                }
                self.timeout = Some(within);
            }
            let mut chunk = [0u8; 16384];
            match self.s.read(&mut chunk) {
                Ok(0) => return Rx::Closed("closed by the server".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Rx::Timeout
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Rx::Closed(e.to_string()),
            }
        }
    }

    /// Subscribes (packet id 1) and waits for the SUBACK; returns its
    /// codes and any PUBLISH that came first (answered).
    fn subscribe(&mut self, filter: &str, qos: QoS) -> (Vec<u8>, Vec<Publish>) {
        let sub = Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(
                filter.into(),
                SubOptions {
                    qos,
                    ..Default::default()
                },
            )],
            properties: Properties::default(),
        });
        self.send(&sub).expect("send SUBSCRIBE");
        let mut early = Vec::new();
        loop {
            match self.recv(Duration::from_secs(10)) {
                Rx::Packet(Packet::SubAck(a)) => return (a.codes, early),
                Rx::Packet(p) => early.extend(self.answer(p)),
                other => panic!("no SUBACK for {filter}: {other:?}"),
            }
        }
    }

    /// Publishes one QoS 1 message (packet id 1) and waits for its PUBACK.
    fn publish_acked(&mut self, topic: &str, payload: &[u8], retain: bool) {
        let p = publish_pkt(
            topic,
            QoS::AtLeastOnce,
            1,
            Bytes::copy_from_slice(payload),
            retain,
        );
        self.send(&p).expect("send PUBLISH");
        match self.recv(Duration::from_secs(10)) {
            Rx::Packet(Packet::PubAck(a)) if a.packet_id == 1 && a.reason < 0x80 => {}
            other => panic!("no PUBACK for {topic}: {other:?}"),
        }
    }

    /// Acknowledges a delivery (PUBACK, PUBREC, PUBCOMP for a PUBREL);
    /// returns it if it was a PUBLISH.
    fn answer(&mut self, p: Packet) -> Option<Publish> {
        match p {
            Packet::Publish(p) => {
                let a = match p.qos {
                    QoS::AtMostOnce => None,
                    QoS::AtLeastOnce => Some(Packet::PubAck(ack(p.packet_id))),
                    QoS::ExactlyOnce => Some(Packet::PubRec(ack(p.packet_id))),
                };
                if let Some(a) = a {
                    let _ = self.send(&a);
                }
                Some(p)
            }
            Packet::PubRel(a) => {
                let _ = self.send(&Packet::PubComp(ack(a.packet_id)));
                None
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Every PUBLISH received (and acknowledged) until `quiet` passes
    /// without a packet.
    fn collect(&mut self, quiet: Duration) -> Vec<Publish> {
        let mut v = Vec::new();
        loop {
            match self.recv(quiet) {
                Rx::Packet(p) => v.extend(self.answer(p)),
                Rx::Timeout => return v,
                Rx::Closed(why) => panic!("connection lost while collecting: {why}"),
            }
        }
    }

    fn disconnect(mut self) {
        let _ = self.send(&Packet::Disconnect(Default::default()));
        let _ = self.s.shutdown(Shutdown::Write);
        let _ = self.recv(Duration::from_secs(2));
    }
}

fn seq_of(p: &Publish) -> Option<u64> {
    std::str::from_utf8(&p.payload).ok()?.parse().ok()
}

// ---------------------------------------------------------------- publisher

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREC received, PUBREL sent; waiting for PUBCOMP.
    Released,
}

/// A publisher that lives across broker restarts, like a real client with
/// a persistent session: what was not acknowledged is sent again on
/// resumption (PUBLISH with DUP and the same packet id, or PUBREL).
struct Publisher {
    topic: &'static str,
    qos: QoS,
    next_seq: u64,
    next_pid: u16,
    /// Packet id -> (sequence number, stage).
    inflight: HashMap<u16, (u64, Stage)>,
    /// Sequence numbers the broker accepted: PUBACK, or PUBREC (success).
    acked: BTreeSet<u64>,
    completed: u64,
    refused: u64,
    resent: u64,
    /// Acknowledgements for packet ids not in flight; PUBCOMPs saying the
    /// broker had forgotten the id (0x92).
    stray: u64,
    not_found: u64,
    errors: Vec<String>,
    /// For the post-mortem: the cycle now, the cycle each message was
    /// first sent in, and (cycle, sent again with DUP before) of each
    /// acknowledgement.
    cycle: usize,
    sent_in: Vec<usize>,
    acked_in: HashMap<u64, (usize, bool)>,
    dup_sent: BTreeSet<u64>,
}

impl Publisher {
    fn new(topic: &'static str, qos: QoS) -> Publisher {
        Publisher {
            topic,
            qos,
            next_seq: 0,
            next_pid: 0,
            inflight: HashMap::new(),
            acked: BTreeSet::new(),
            completed: 0,
            refused: 0,
            resent: 0,
            stray: 0,
            not_found: 0,
            errors: Vec::new(),
            cycle: 0,
            sent_in: Vec::new(),
            acked_in: HashMap::new(),
            dup_sent: BTreeSet::new(),
        }
    }

    fn alloc_pid(&mut self) -> u16 {
        loop {
            self.next_pid = self.next_pid.wrapping_add(1);
            if self.next_pid != 0 && !self.inflight.contains_key(&self.next_pid) {
                return self.next_pid;
            }
        }
    }

    fn message(&self, pid: u16, seq: u64, dup: bool) -> Packet {
        let mut p = publish_pkt(
            self.topic,
            self.qos,
            pid,
            Bytes::from(seq.to_string()),
            false,
        );
        if let Packet::Publish(p) = &mut p {
            p.dup = dup;
        }
        p
    }

    /// Resends what is unacknowledged, then (if `new`) publishes as fast as
    /// the window allows, until the connection ends or `until`; without
    /// `new`, until nothing is in flight. Returns why it stopped.
    fn run(&mut self, c: &mut Conn, new: bool, until: Instant) -> String {
        let mut again: Vec<(u64, u16, Stage)> = self
            .inflight
            .iter()
            .map(|(&pid, &(seq, stage))| (seq, pid, stage))
            .collect();
        again.sort_unstable();
        let pkts: Vec<Packet> = again
            .iter()
            .map(|&(seq, pid, stage)| match stage {
                Stage::Published => self.message(pid, seq, true),
                Stage::Released => Packet::PubRel(ack(pid)),
            })
            .collect();
        self.resent += pkts.len() as u64;
        for &(seq, _, stage) in &again {
            if stage == Stage::Published {
                self.dup_sent.insert(seq);
            }
        }
        if let Err(e) = c.send_all(&pkts) {
            return format!("resend: {e}");
        }
        loop {
            if Instant::now() >= until {
                return "deadline".into();
            }
            if new {
                let mut batch = Vec::new();
                while self.inflight.len() < WINDOW {
                    let pid = self.alloc_pid();
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.sent_in.push(self.cycle);
                    self.inflight.insert(pid, (seq, Stage::Published));
                    batch.push(self.message(pid, seq, false));
                }
                if let Err(e) = c.send_all(&batch) {
                    return format!("send: {e}");
                }
            } else if self.inflight.is_empty() {
                return "done".into();
            }
            match c.recv(Duration::from_millis(50)) {
                Rx::Packet(p) => {
                    if let Err(e) = self.on_packet(c, p) {
                        return e;
                    }
                }
                Rx::Timeout => {}
                Rx::Closed(why) => return why,
            }
        }
    }

    fn on_packet(&mut self, c: &mut Conn, p: Packet) -> Result<(), String> {
        match p {
            Packet::PubAck(a) if self.qos == QoS::AtLeastOnce => {
                match self.inflight.remove(&a.packet_id) {
                    Some((seq, _)) if a.reason < 0x80 => {
                        self.acked.insert(seq);
                        let dup = self.dup_sent.contains(&seq);
                        self.acked_in.insert(seq, (self.cycle, dup));
                    }
                    Some(_) => self.refused += 1,
                    None => self.stray += 1,
                }
            }
            Packet::PubRec(a) if self.qos == QoS::ExactlyOnce => {
                match self.inflight.get_mut(&a.packet_id) {
                    Some((seq, stage)) if a.reason < 0x80 => {
                        if *stage == Stage::Published {
                            self.acked.insert(*seq);
                            let dup = self.dup_sent.contains(seq);
                            self.acked_in.insert(*seq, (self.cycle, dup));
                            *stage = Stage::Released;
                        }
                        c.send(&Packet::PubRel(ack(a.packet_id)))
                            .map_err(|e| format!("send PUBREL: {e}"))?;
                    }
                    Some(_) => {
                        self.inflight.remove(&a.packet_id);
                        self.refused += 1;
                    }
                    None => self.stray += 1,
                }
            }
            Packet::PubComp(a) if self.qos == QoS::ExactlyOnce => {
                match self.inflight.get(&a.packet_id) {
                    Some((_, Stage::Released)) => {
                        self.inflight.remove(&a.packet_id);
                        self.completed += 1;
                        if a.reason == 0x92 {
                            self.not_found += 1;
                        }
                    }
                    _ => self.stray += 1,
                }
            }
            Packet::Disconnect(d) => return Err(format!("DISCONNECT {:#x}", d.reason)),
            other => self.errors.push(format!("publisher got {other:?}")),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- subscriber

/// A subscriber that lives across broker restarts. As a QoS 2 receiver it
/// remembers the packet ids it has answered with PUBREC until their PUBREL
/// (across reconnections), and a PUBLISH with such an id is a resend, not
/// a new message.
struct Subscriber {
    topic: &'static str,
    qos: QoS,
    /// Sequence number -> times handed to the "application".
    counts: BTreeMap<u64, u32>,
    deliveries: u64,
    /// QoS 2: packet id -> sequence number, between PUBREC and PUBREL.
    awaiting_rel: HashMap<u16, u64>,
    /// PUBLISHes recognised as resends of an id awaiting PUBREL.
    resends: u64,
    errors: Vec<String>,
    /// For the post-mortem: the cycle now, and the one each message
    /// first arrived in.
    cycle: usize,
    got_in: HashMap<u64, usize>,
}

impl Subscriber {
    fn new(topic: &'static str, qos: QoS) -> Subscriber {
        Subscriber {
            topic,
            qos,
            counts: BTreeMap::new(),
            deliveries: 0,
            awaiting_rel: HashMap::new(),
            resends: 0,
            errors: Vec::new(),
            cycle: 0,
            got_in: HashMap::new(),
        }
    }

    /// Reads and acknowledges until the connection ends or `until`; with
    /// `finish` set, also once nothing came for a second.
    fn run(&mut self, c: &mut Conn, finish: &AtomicBool, until: Instant) -> String {
        let mut last = Instant::now();
        loop {
            if Instant::now() >= until {
                return "deadline".into();
            }
            match c.recv(Duration::from_millis(50)) {
                Rx::Packet(p) => {
                    last = Instant::now();
                    if let Err(e) = self.on_packet(c, p) {
                        return e;
                    }
                }
                Rx::Timeout => {
                    if finish.load(Ordering::SeqCst) && last.elapsed() >= Duration::from_secs(1) {
                        return "done".into();
                    }
                }
                Rx::Closed(why) => return why,
            }
        }
    }

    fn deliver(&mut self, seq: u64) {
        *self.counts.entry(seq).or_default() += 1;
        self.got_in.entry(seq).or_insert(self.cycle);
        self.deliveries += 1;
    }

    fn on_packet(&mut self, c: &mut Conn, p: Packet) -> Result<(), String> {
        match p {
            Packet::Publish(p) => {
                let pid = p.packet_id;
                let Some(seq) = seq_of(&p) else {
                    self.errors.push(format!("payload not a number: {p:?}"));
                    return Ok(());
                };
                if &*p.topic != self.topic || p.qos != self.qos {
                    self.errors.push(format!("unexpected delivery {p:?}"));
                }
                let answer = match p.qos {
                    QoS::AtMostOnce => return Ok(()),
                    QoS::AtLeastOnce => {
                        self.deliver(seq);
                        Packet::PubAck(ack(pid))
                    }
                    QoS::ExactlyOnce => {
                        match self.awaiting_rel.get(&pid) {
                            Some(&was) => {
                                self.resends += 1;
                                if was != seq {
                                    self.errors.push(format!(
                                        "packet id {pid} awaiting PUBREL (message {was}) \
                                         reused for message {seq}"
                                    ));
                                }
                            }
                            None => {
                                self.deliver(seq);
                                self.awaiting_rel.insert(pid, seq);
                            }
                        }
                        Packet::PubRec(ack(pid))
                    }
                };
                c.send(&answer).map_err(|e| format!("send ack: {e}"))
            }
            Packet::PubRel(a) => {
                self.awaiting_rel.remove(&a.packet_id);
                c.send(&Packet::PubComp(ack(a.packet_id)))
                    .map_err(|e| format!("send PUBCOMP: {e}"))
            }
            Packet::Disconnect(d) => Err(format!("DISCONNECT {:#x}", d.reason)),
            other => {
                self.errors.push(format!("subscriber got {other:?}"));
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------- kill loop

/// CYCLES times: start the broker, (re)connect a persistent subscriber and
/// a persistent publisher (homed on different shards), publish as fast as
/// the window allows, SIGKILL the broker after 100-600 ms. Then a last
/// cycle without a kill: the publisher finishes what is in flight, the
/// subscriber drains. Every acknowledged message must have arrived (and,
/// if `exactly_once`, none twice).
fn kill_loop(tag: &str, protocol: Protocol, qos: QoS, topic: &'static str, exactly_once: bool) {
    let no_kill = no_kill();
    let mut node = Node::new(tag, !no_kill);
    node.start(2);
    let sub_id = id_on(0, &format!("{tag}-sub"));
    let pub_id = id_on(1, &format!("{tag}-pub"));
    let mut sub = Subscriber::new(topic, qos);
    let mut publ = Publisher::new(topic, qos);
    let mut anomalies = Vec::new();
    let t0 = Instant::now();
    for cycle in 0..=CYCLES {
        let last = cycle == CYCLES;
        (sub.cycle, publ.cycle) = (cycle, cycle);
        if cycle > 0 && !no_kill {
            node.start(2);
        }
        let (mut sc, sa) = Conn::connect(node.port, &connect_pkt(protocol, &sub_id, false));
        assert_eq!(
            sa.session_present,
            cycle > 0,
            "{tag}: subscriber's session present at cycle {cycle}"
        );
        if cycle == 0 {
            let (codes, _) = sc.subscribe(topic, qos);
            assert_eq!(codes, vec![qos as u8], "{tag}: SUBACK");
        }
        let (mut pc, pa) = Conn::connect(node.port, &connect_pkt(protocol, &pub_id, false));
        assert_eq!(
            pa.session_present,
            cycle > 0,
            "{tag}: publisher's session present at cycle {cycle}"
        );
        let clones = [sc.s.try_clone(), pc.s.try_clone()];
        let finish = AtomicBool::new(false);
        let until = Instant::now() + Duration::from_secs(if last { 20 } else { 10 });
        let (sub_end, pub_end, kill_at) = std::thread::scope(|s| {
            let hs = s.spawn(|| {
                let r = sub.run(&mut sc, &finish, until);
                (r, Instant::now())
            });
            let hp = s.spawn(|| {
                let r = publ.run(&mut pc, !last, until);
                (r, Instant::now())
            });
            let join = |h: std::thread::ScopedJoinHandle<'_, _>| {
                h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
            };
            if last {
                let pe = join(hp);
                finish.store(true, Ordering::SeqCst);
                (join(hs), pe, None)
            } else {
                std::thread::sleep(Duration::from_millis(100 + rand_u64() % 501));
                let kill_at = Instant::now();
                if no_kill {
                    for c in clones.iter().flatten() {
                        let _ = c.shutdown(Shutdown::Both);
                    }
                } else {
                    node.kill();
                }
                (join(hs), join(hp), Some(kill_at))
            }
        });
        for (who, (why, at)) in [("subscriber", &sub_end), ("publisher", &pub_end)] {
            let early = kill_at.is_some_and(|k| *at < k);
            if early || why == "deadline" {
                anomalies.push(format!("cycle {cycle}: {who} stopped early: {why}"));
            }
        }
        if last && pub_end.0 != "done" {
            anomalies.push(format!(
                "last cycle: {} messages still unacknowledged ({})",
                publ.inflight.len(),
                pub_end.0
            ));
        }
    }
    node.kill();

    let received = sub.counts.len();
    let duplicates = sub.deliveries - received as u64;
    let missing: Vec<u64> = publ
        .acked
        .iter()
        .filter(|s| !sub.counts.contains_key(s))
        .copied()
        .collect();
    let twice: Vec<(u64, u32)> = sub
        .counts
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(&s, &n)| (s, n))
        .collect();
    let unsent: Vec<u64> = sub
        .counts
        .keys()
        .filter(|&&s| s >= publ.next_seq)
        .copied()
        .collect();
    println!(
        "{tag}: {CYCLES} {} in {:.1} s: sent {}, acked {}, received {received} distinct \
         ({} deliveries, {duplicates} duplicates, {} QoS 2 resends recognised), \
         publisher resent {}, refused {}, stray acks {}, PUBCOMP 0x92 {}",
        if no_kill {
            "disconnections (TARTA_E2E_NO_KILL)"
        } else {
            "kills"
        },
        t0.elapsed().as_secs_f64(),
        publ.next_seq,
        publ.acked.len(),
        sub.deliveries,
        sub.resends,
        publ.resent,
        publ.refused,
        publ.stray,
        publ.not_found,
    );
    let mut failures: Vec<String> = anomalies
        .iter()
        .chain(&sub.errors)
        .chain(&publ.errors)
        .cloned()
        .collect();
    if !unsent.is_empty() {
        failures.push(format!("received, never sent: {unsent:?}"));
    }
    if !missing.is_empty() {
        failures.push(format!(
            "{} acknowledged messages never arrived:\n{}",
            missing.len(),
            post_mortem(&missing, &publ, &sub)
        ));
    }
    if exactly_once && !twice.is_empty() {
        let seqs: Vec<u64> = twice.iter().map(|t| t.0).collect();
        failures.push(format!(
            "{} QoS 2 messages received more than once, e.g. (seq, times) {:?}:\n{}",
            twice.len(),
            &twice[..twice.len().min(10)],
            post_mortem(&seqs, &publ, &sub)
        ));
    }
    assert!(failures.is_empty(), "{tag}:\n{}", failures.join("\n"));
    assert!(
        publ.acked.len() >= CYCLES,
        "{tag}: only {} messages acknowledged: too little traffic to prove anything",
        publ.acked.len()
    );
}

/// Where the lost (or doubled) messages sit: runs of consecutive sequence
/// numbers, the cycles they were sent, acknowledged (and whether after a
/// DUP resend) and first received in, and their received neighbours.
fn post_mortem(seqs: &[u64], publ: &Publisher, sub: &Subscriber) -> String {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &s in seqs {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == s => *end = s,
            _ => runs.push((s, s)),
        }
    }
    let mut out = String::new();
    for &(a, b) in runs.iter().take(10) {
        type How = (usize, Option<(usize, bool)>, Option<usize>);
        let mut how: BTreeMap<How, u64> = BTreeMap::new();
        for s in a..=b {
            let sent = publ.sent_in.get(s as usize).copied().unwrap_or(usize::MAX);
            let acked = publ.acked_in.get(&s).copied();
            let got = sub.got_in.get(&s).copied();
            *how.entry((sent, acked, got)).or_default() += 1;
        }
        let before = sub.counts.range(..a).next_back().map(|(&s, _)| s);
        let after = sub.counts.range(b + 1..).next().map(|(&s, _)| s);
        let at = |s: Option<u64>| s.and_then(|s| sub.got_in.get(&s).map(|c| (s, *c)));
        out += &format!(
            "  {a}..={b}: (sent in cycle, Some((acked in cycle, after a DUP resend)), \
             first received in cycle) -> count: {how:?}; received neighbours (seq, cycle): \
             {:?} {:?}\n",
            at(before),
            at(after)
        );
    }
    if runs.len() > 10 {
        out += &format!("  ... {} runs in all\n", runs.len());
    }
    out
}

#[test]
fn kill_loop_qos1_v311() {
    kill_loop("dur-q1", Protocol::V311, QoS::AtLeastOnce, "dur/q1", false);
}

#[test]
fn kill_loop_qos2_v5() {
    kill_loop("dur-q2", Protocol::V5, QoS::ExactlyOnce, "dur/q2", true);
}

// ---------------------------------------------------------------- restarts

/// (topic, payload, retain) of what arrived, sorted.
fn summary(ps: &[Publish]) -> Vec<(String, String, bool)> {
    let mut v: Vec<_> = ps
        .iter()
        .map(|p| {
            (
                p.topic.to_string(),
                String::from_utf8_lossy(&p.payload).into_owned(),
                p.retain,
            )
        })
        .collect();
    v.sort();
    v
}

fn retained_set(port: u16, filter: &str) -> Vec<(String, String, bool)> {
    let id = format!("dur-look-{}", rand_u64());
    let (mut c, _) = Conn::connect(port, &connect_pkt(Protocol::V311, &id, true));
    let (codes, mut got) = c.subscribe(filter, QoS::AtLeastOnce);
    assert_eq!(codes, vec![1]);
    got.extend(c.collect(QUIET));
    c.disconnect();
    summary(&got)
}

#[test]
fn retained_and_subscriptions_survive_restart() {
    let mut node = Node::new("dur-ret", true);
    node.start(2);
    let port = node.port;
    let s3_id = id_on(0, "dur-ret-s3");
    let s5_id = id_on(0, "dur-ret-s5");
    let pub_id = id_on(1, "dur-ret-pub");

    // A 3.1.1 persistent session that stays connected until the kill, and
    // a 5.0 one that is offline by then.
    let (mut s3, a) = Conn::connect(port, &connect_pkt(Protocol::V311, &s3_id, false));
    assert!(!a.session_present);
    assert_eq!(s3.subscribe("dur/live/#", QoS::AtLeastOnce).0, vec![1]);
    let (mut s5, a) = Conn::connect(port, &connect_pkt(Protocol::V5, &s5_id, false));
    assert!(!a.session_present);
    assert_eq!(s5.subscribe("dur/live/+", QoS::ExactlyOnce).0, vec![2]);
    s5.disconnect();

    let (mut p, _) = Conn::connect(port, &connect_pkt(Protocol::V311, &pub_id, true));
    p.publish_acked("dur/ret/a", b"A", true);
    p.publish_acked("dur/ret/b", b"B", true);
    p.publish_acked("dur/ret/c/d", b"CD", true);
    p.publish_acked("dur/ret/gone", b"X", true);
    p.publish_acked("dur/ret/gone", b"", true); // cleared
    p.publish_acked("dur/ret/a", b"A2", true); // replaced
    p.publish_acked("dur/live/before", b"queued", false);
    let got = summary(&s3.collect(QUIET));
    assert_eq!(
        got,
        vec![("dur/live/before".into(), "queued".into(), false)]
    );
    let want_retained = vec![
        ("dur/ret/a".to_string(), "A2".to_string(), true),
        ("dur/ret/b".into(), "B".into(), true),
        ("dur/ret/c/d".into(), "CD".into(), true),
    ];
    assert_eq!(retained_set(port, "dur/ret/#"), want_retained, "before");

    node.kill();
    drop((s3, p));
    node.start(2);

    assert_eq!(
        retained_set(port, "dur/ret/#"),
        want_retained,
        "retained after the restart"
    );
    let (mut s3, a) = Conn::connect(port, &connect_pkt(Protocol::V311, &s3_id, false));
    assert!(a.session_present, "3.1.1 session after the restart");
    let (mut s5, a) = Conn::connect(port, &connect_pkt(Protocol::V5, &s5_id, false));
    assert!(a.session_present, "5.0 session after the restart");
    // The offline session's queued message; the connected one's delivery
    // was acknowledged, though a redelivery would be allowed (QoS 1).
    let early5 = summary(&s5.collect(QUIET));
    assert_eq!(
        early5,
        vec![("dur/live/before".into(), "queued".into(), false)],
        "5.0 session's queue after the restart"
    );
    let early3 = summary(&s3.collect(QUIET));
    assert!(
        early3.iter().all(|(t, _, _)| t == "dur/live/before"),
        "{early3:?}"
    );

    // No SUBSCRIBE since the restart: the sessions' subscriptions route.
    let (mut p, _) = Conn::connect(port, &connect_pkt(Protocol::V311, &pub_id, true));
    p.publish_acked("dur/live/after", b"routed", false);
    let want = vec![("dur/live/after".to_string(), "routed".to_string(), false)];
    assert_eq!(summary(&s3.collect(QUIET)), want, "3.1.1 session");
    assert_eq!(summary(&s5.collect(QUIET)), want, "5.0 session");
    println!(
        "retained_and_subscriptions_survive_restart: {} retained, 2 sessions, \
         3.1.1 redeliveries after the kill: {}",
        want_retained.len(),
        early3.len()
    );
}

#[test]
fn restart_with_other_shard_count() {
    let mut node = Node::new("dur-shards", true);
    node.start(2);
    let port = node.port;
    // One session for every (home with 2 shards, home with 3 shards); 1
    // shard is home to all.
    let mut ids: Vec<String> = Vec::new();
    let mut homes = BTreeSet::new();
    for i in 0.. {
        let id = format!("dur-sc-{i}");
        if homes.insert((tarta::home_shard(&id, 2), tarta::home_shard(&id, 3))) {
            ids.push(id);
        }
        if homes.len() == 6 {
            break;
        }
    }
    let proto = |i: usize| {
        if i % 2 == 0 {
            Protocol::V311
        } else {
            Protocol::V5
        }
    };
    for (i, id) in ids.iter().enumerate() {
        let (mut c, a) = Conn::connect(port, &connect_pkt(proto(i), id, false));
        assert!(!a.session_present);
        assert_eq!(
            c.subscribe(&format!("dur/sc/{i}"), QoS::AtLeastOnce).0,
            vec![1]
        );
        c.disconnect();
    }
    const N: usize = 5;
    let publish_batch = |port: u16, batch: &str| {
        let (mut p, _) = Conn::connect(
            port,
            &connect_pkt(Protocol::V311, &format!("dur-sc-pub-{batch}"), true),
        );
        for i in 0..ids.len() {
            for k in 0..N {
                p.publish_acked(
                    &format!("dur/sc/{i}"),
                    format!("{batch}-{k}").as_bytes(),
                    false,
                );
            }
        }
        p.disconnect();
    };
    publish_batch(port, "b1");
    let (mut p, _) = Conn::connect(port, &connect_pkt(Protocol::V311, "dur-sc-ret", true));
    p.publish_acked("dur/sc-ret/x", b"RX", true);
    p.publish_acked("dur/sc-ret/y", b"RY", true);
    p.disconnect();
    let want_retained = vec![
        ("dur/sc-ret/x".to_string(), "RX".to_string(), true),
        ("dur/sc-ret/y".into(), "RY".into(), true),
    ];

    let mut redelivered = 0;
    for (shards, batch, earlier) in [(1, "b1", None), (3, "b2", Some("b1"))] {
        node.kill();
        node.start(shards);
        for (i, id) in ids.iter().enumerate() {
            let (mut c, a) = Conn::connect(port, &connect_pkt(proto(i), id, false));
            assert!(
                a.session_present,
                "{id} ({:?}) with {shards} shards",
                proto(i)
            );
            let got = c.collect(QUIET);
            c.disconnect();
            let mut payloads: Vec<String> = got
                .iter()
                .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
                .collect();
            // QoS 1: what was delivered before the kill may come again.
            if let Some(e) = earlier {
                let before = payloads.len();
                payloads.retain(|p| !p.starts_with(e));
                redelivered += before - payloads.len();
            }
            payloads.sort();
            payloads.dedup();
            let want: Vec<String> = (0..N).map(|k| format!("{batch}-{k}")).collect();
            assert_eq!(
                payloads,
                want,
                "{id} ({:?}): queue after a restart with {shards} shards",
                proto(i)
            );
            assert!(got
                .iter()
                .all(|p| p.topic.as_str() == format!("dur/sc/{i}")));
        }
        assert_eq!(
            retained_set(port, "dur/sc-ret/#"),
            want_retained,
            "retained with {shards} shards"
        );
        if shards == 1 {
            publish_batch(port, "b2");
        }
    }
    println!(
        "restart_with_other_shard_count: {} sessions x {N} queued, 2 -> 1 -> 3 shards; \
         redelivered after the second kill: {redelivered}",
        ids.len()
    );
}
