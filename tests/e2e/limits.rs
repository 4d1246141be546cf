//! Limits: each one hit by one client (or one address) while a canary
//! client's QoS 1 stream keeps flowing with no gap over a second.
//! Abusers connect from other loopback addresses (127.0.0.2, ...) than
//! the canary (127.0.0.1), so per-address limits tell them apart.

use crate::harness::*;
use bytes::BytesMut;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tarta_proto::mqtt::{self, Packet, Protocol, QoS, SubOptions, Subscribe};

/// The broker binary: the one cargo built for the tests, or `TARTA_BIN`
/// (a release build, for measuring).
fn tarta_bin() -> String {
    std::env::var("TARTA_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tarta").to_string())
}

fn start(top: &str) -> (Broker, TempDir) {
    let d = TempDir::new("limits");
    let cfg = d.0.join("tarta.toml");
    std::fs::write(
        &cfg,
        format!("{top}\n[[listener]]\nbind = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    let b = Broker::start_bare(
        Command::new(tarta_bin()),
        &["--config", cfg.to_str().unwrap()],
    );
    (b, d)
}

/// A TCP connection from `src` (a loopback address).
fn open_from(src: Ipv4Addr, port: u16) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((src, 0)).into()).unwrap();
    s.connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())
        .unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// CONNECT (3.1.1) from `src`: Some(CONNACK code), or None if the broker
/// closed the connection without one.
fn connect_from(src: Ipv4Addr, port: u16, id: &str) -> (TcpStream, Option<u8>) {
    let mut s = open_from(src, port);
    let c = connect_packet(Protocol::V311, id, true, 30);
    // The broker may already have closed it: a failed write is a refusal.
    if s.write_all(&encode(&Packet::Connect(Box::new(c)), Protocol::V311))
        .is_err()
    {
        return (s, None);
    }
    let mut buf = BytesMut::new();
    loop {
        if let Ok(Some(Packet::ConnAck(a))) = mqtt::decode(&mut buf, Protocol::V311, u32::MAX) {
            return (s, Some(a.code));
        }
        let mut chunk = [0u8; 256];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return (s, None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A QoS 1 stream from 127.0.0.1 through the broker, one message every
/// 20 ms; records the longest time between two deliveries.
struct Canary {
    started: Instant,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u32, Duration)>,
}

impl Canary {
    fn start(port: u16) -> Canary {
        Canary::start_as(port, None)
    }

    /// With credentials (a broker with a password file).
    fn start_as(port: u16, login: Option<(&str, &str)>) -> Canary {
        let c = |id: &str| {
            let mut c = connect_packet(Protocol::V311, id, true, 0);
            if let Some((u, p)) = login {
                c.username = Some(u.into());
                c.password = Some(bytes::Bytes::copy_from_slice(p.as_bytes()));
            }
            c
        };
        let (mut sub, a) = Raw::connect(port, c("canary-sub"));
        assert_eq!(a.code, 0);
        sub.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(
                "canary".into(),
                SubOptions {
                    qos: QoS::AtLeastOnce,
                    ..Default::default()
                },
            )],
            properties: Default::default(),
        }));
        assert!(matches!(sub.recv(), Some(Packet::SubAck(_))));
        let (mut publ, _) = Raw::connect(port, c("canary-pub"));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut n, mut worst) = (0u32, Duration::ZERO);
            let mut last = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                n += 1;
                let pid = (n % 60000 + 1) as u16;
                publ.send(&Packet::Publish(mqtt::Publish {
                    dup: false,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    topic: "canary".into(),
                    packet_id: pid,
                    properties: Default::default(),
                    payload: bytes::Bytes::from(n.to_string()),
                }));
                assert!(
                    matches!(publ.recv(), Some(Packet::PubAck(_))),
                    "canary PUBACK {n}"
                );
                match sub.recv() {
                    Some(Packet::Publish(p)) => {
                        assert_eq!(p.payload, n.to_string().as_bytes());
                        sub.send(&Packet::PubAck(mqtt::Ack {
                            packet_id: p.packet_id,
                            reason: 0,
                            properties: Default::default(),
                        }));
                    }
                    other => panic!("canary message {n}: {other:?}"),
                }
                let now = Instant::now();
                worst = worst.max(now - last);
                last = now;
                std::thread::sleep(Duration::from_millis(20));
            }
            (n, worst)
        });
        Canary {
            started: Instant::now(),
            stop,
            thread,
        }
    }

    /// Stops it; asserts it flowed with no gap over a second.
    fn check(self) {
        self.finish();
    }

    /// Stops it and returns (messages, longest gap), asserting as `check`.
    fn finish(self) -> (u32, Duration) {
        // At least a second and a half of it, whatever the test took.
        let min = Duration::from_millis(1500);
        std::thread::sleep(min.saturating_sub(self.started.elapsed()));
        self.stop.store(true, Ordering::Relaxed);
        let (n, worst) = self.thread.join().unwrap();
        eprintln!("canary: {n} messages, longest gap {worst:?}");
        assert!(n > 10, "canary sent only {n}");
        assert!(worst < Duration::from_secs(1), "canary gap {worst:?}");
        (n, worst)
    }
}

fn counter(b: &Broker, name: &str) -> u64 {
    std::thread::sleep(Duration::from_millis(1200));
    sys_counter(b.port, name)
}

const ABUSER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const FLOODER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

#[test]
fn connections_per_address_and_their_rate() {
    let (b, _d) = start(
        "limits_exempt = [\"127.0.0.1/32\"]\nmax_connections_per_address = 5\n\
         connection_rate_per_address = 5\nconnection_burst_per_address = 8\n",
    );
    let canary = Canary::start(b.port);
    // Five open from one address; the sixth is closed without a CONNACK.
    let held: Vec<_> = (0..5)
        .map(|i| {
            let (s, code) = connect_from(ABUSER, b.port, &format!("a{i}"));
            assert_eq!(code, Some(0), "connection {i}");
            s
        })
        .collect();
    assert_eq!(connect_from(ABUSER, b.port, "a5").1, None);
    // Another address is not affected.
    let (_other, code) = connect_from(FLOODER, b.port, "f0");
    assert_eq!(code, Some(0));
    // One closes: room for one more.
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let (_again, code) = connect_from(ABUSER, b.port, "a6");
    assert_eq!(code, Some(0));
    // A flood of new connections from one address: the burst (8, one
    // taken above), then 5 a second.
    let mut ok = 0;
    for i in 0..30 {
        let (s, code) = connect_from(FLOODER, b.port, &format!("f{}", i + 1));
        ok += u32::from(code == Some(0));
        drop(s);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!((7..=12).contains(&ok), "{ok} of 30 admitted");
    canary.check();
    assert!(counter(&b, "limit_address_connections") >= 1);
    assert!(counter(&b, "limit_address_rate") >= 18);
}

#[test]
fn connections_in_total() {
    let (b, _d) = start("max_connections = 6\n");
    let canary = Canary::start(b.port);
    // The canary holds two; the $SYS reader needs one at the end.
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..6 {
        let (s, code) = connect_from(ABUSER, b.port, &format!("t{i}"));
        match code {
            Some(0) => held.push(s),
            _ => refused += 1,
        }
    }
    assert_eq!((held.len(), refused), (4, 2));
    canary.check();
    held.pop();
    assert!(counter(&b, "limit_connections") >= 2);
}

fn v5(port: u16, id: &str) -> Raw {
    let (r, a) = Raw::connect(port, connect_packet(Protocol::V5, id, true, 30));
    assert_eq!(a.code, 0);
    r
}

fn publish(r: &mut Raw, topic: &str, qos: QoS, pid: u16, payload: &[u8]) {
    r.send(&Packet::Publish(mqtt::Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: pid,
        properties: Default::default(),
        payload: bytes::Bytes::copy_from_slice(payload),
    }));
}

fn suback(r: &mut Raw, pid: u16, filter: &str) -> u8 {
    r.subscribe_code(pid, filter, QoS::AtMostOnce)
}

#[test]
fn client_id_subscriptions_and_topics() {
    let (b, _d) = start(
        "max_client_id_length = 24\nmax_subscriptions_per_client = 3\n\
         max_topic_levels = 5\nmax_topic_length = 40\n",
    );
    let canary = Canary::start(b.port);
    // Client id.
    let (_, a) = Raw::connect(
        b.port,
        connect_packet(Protocol::V5, &"x".repeat(25), true, 30),
    );
    assert_eq!(a.code, 0x85);
    let (_, a) = Raw::connect(
        b.port,
        connect_packet(Protocol::V311, &"x".repeat(25), true, 30),
    );
    assert_eq!(a.code, 0x02);
    let mut r = v5(b.port, &"x".repeat(24));
    // Subscriptions: three, then quota exceeded (re-subscribing is fine).
    for (i, f) in ["s/1", "s/2", "s/3"].iter().enumerate() {
        assert_eq!(suback(&mut r, i as u16 + 1, f), 0);
    }
    assert_eq!(suback(&mut r, 4, "s/4"), 0x97);
    assert_eq!(suback(&mut r, 5, "s/1"), 0);
    // Topic levels and length, in filters and in names.
    let mut t = v5(b.port, "topics");
    assert_eq!(suback(&mut t, 1, "a/b/c/d/e"), 0);
    assert_eq!(suback(&mut t, 2, "a/b/c/d/e/f"), 0x8F);
    assert_eq!(suback(&mut t, 3, &"l".repeat(41)), 0x8F);
    publish(&mut t, "a/b/c/d/e/f", QoS::AtLeastOnce, 7, b"x");
    match t.recv() {
        Some(Packet::PubAck(a)) => assert_eq!((a.packet_id, a.reason), (7, 0x90)),
        other => panic!("{other:?}"),
    }
    publish(&mut t, &"n".repeat(41), QoS::AtLeastOnce, 8, b"x");
    match t.recv() {
        Some(Packet::PubAck(a)) => assert_eq!((a.packet_id, a.reason), (8, 0x90)),
        other => panic!("{other:?}"),
    }
    canary.check();
    assert_eq!(counter(&b, "limit_client_id"), 2);
    assert_eq!(counter(&b, "limit_subscriptions"), 1);
    assert_eq!(counter(&b, "limit_topic"), 4);
}

#[test]
fn publish_rate_pauses_qos1_and_drops_qos0() {
    let (b, _d) = start("max_publish_rate = 50\nmax_publish_bytes_rate = 1000000\n");
    let canary = Canary::start(b.port);
    let mut sub = v5(b.port, "rate-sub");
    assert_eq!(suback(&mut sub, 1, "flood/#"), 0);
    // QoS 0: 300 at once; about a second's worth (50) gets through.
    let mut q0 = v5(b.port, "rate-q0");
    for _ in 0..300 {
        publish(&mut q0, "flood/0", QoS::AtMostOnce, 0, b"x");
    }
    let got = drain(&mut sub, Duration::from_millis(500)).len();
    assert!((40..=70).contains(&got), "{got} QoS 0 messages passed");
    // QoS 1: 150 as fast as the broker reads them: all acknowledged and
    // delivered, paced at 50 a second (the first 50 at once).
    let mut q1 = v5(b.port, "rate-q1");
    let t = Instant::now();
    for i in 0..150u16 {
        publish(&mut q1, "flood/1", QoS::AtLeastOnce, i + 1, b"y");
    }
    let mut acked = 0;
    while acked < 150 {
        match q1.recv() {
            Some(Packet::PubAck(_)) => {
                acked += 1;
            }
            other => panic!("after {acked} PUBACKs: {other:?}"),
        }
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1800),
        "150 QoS 1 at 50/s took {took:?}"
    );
    let delivered = drain(&mut sub, Duration::from_millis(500)).len();
    assert_eq!(delivered, 150);
    canary.check();
    assert!(counter(&b, "publish_rate_dropped") >= 200);
    assert!(counter(&b, "publish_rate_paused") >= 1);
}

/// A storm of logins with costly hashes (all at once, from many sockets)
/// while a canary's QoS 1 stream flows: hashing runs off the shards, so the
/// canary sees no gap. `TARTA_STORM_CLIENTS` and `TARTA_STORM_ITERATIONS`
/// scale it (docs/BENCHMARKS.md "Password storm": 5000 x 10000).
#[test]
fn a_password_storm_does_not_stall_connected_clients() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (clients, iterations) = (
        env("TARTA_STORM_CLIENTS", 400),
        env("TARTA_STORM_ITERATIONS", 2000),
    );
    let d = TempDir::new("storm");
    let pw = d.0.join("pw");
    let st = Command::new(tarta_bin())
        .args(["passwd", "-c", "-b", "-I", &iterations.to_string()])
        .arg(&pw)
        .args(["fleet", "fleet-pw"])
        .status()
        .unwrap();
    assert!(st.success());
    let (b, _d) = start(&format!(
        "password_file = {pw:?}\nallow_anonymous = false\n"
    ));
    let canary = Canary::start_as(b.port, Some(("fleet", "fleet-pw")));
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let threads = 4;
    let handles: Vec<_> = (0..threads)
        .map(|k| {
            let port = b.port;
            std::thread::spawn(move || {
                let mut socks = Vec::new();
                for i in (k..clients).step_by(threads) {
                    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                    let mut c = connect_packet(Protocol::V311, &format!("storm-{i}"), true, 0);
                    c.username = Some("fleet".into());
                    // One in ten guesses wrong.
                    let p: &[u8] = if i % 10 == 0 { b"guess" } else { b"fleet-pw" };
                    c.password = Some(bytes::Bytes::copy_from_slice(p));
                    s.write_all(&encode(&Packet::Connect(Box::new(c)), Protocol::V311))
                        .unwrap();
                    socks.push((i, s));
                }
                let mut ok = 0;
                for (i, mut s) in socks {
                    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                    let mut head = [0u8; 4];
                    s.read_exact(&mut head).unwrap();
                    let want = if i % 10 == 0 { 4 } else { 0 };
                    assert_eq!(head, [0x20, 2, 0, want], "client {i}");
                    ok += 1;
                }
                ok
            })
        })
        .collect();
    let answered: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let took = t.elapsed();
    let (n, worst) = canary.finish();
    eprintln!(
        "password storm: {clients} logins at {iterations} iterations answered in {took:?}; \
         canary {n} messages, longest gap {worst:?}"
    );
    assert_eq!(answered, clients);
}
