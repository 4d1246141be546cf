//! Bridges: an edge Tarta forwarding to a remote broker (Debian's
//! Mosquitto, or another Tarta) over TCP, WebSocket (directly and through
//! nginx), WSS and an HTTP CONNECT proxy; the link cut and restored; the
//! edge killed while the link is down; overflow policies; loops.

use crate::harness::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tarta_proto::mqtt::{self, Packet, Properties, Protocol, QoS};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts on `port`.
fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Debian's Mosquitto, in memory, with a TCP and a WebSocket listener.
struct Mosquitto {
    child: Child,
    tcp: u16,
    ws: u16,
    _dir: TempDir,
}

impl Mosquitto {
    fn start() -> Mosquitto {
        let dir = TempDir::new("mosq");
        let (tcp, ws) = (free_port(), free_port());
        let conf = dir.0.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {tcp} 127.0.0.1\nlistener {ws} 127.0.0.1\nprotocol websockets\n\
                 socket_domain ipv4\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 100000\n"
            ),
        )
        .unwrap();
        let bin = ["/usr/sbin/mosquitto", "mosquitto"]
            .into_iter()
            .find(|b| !b.starts_with('/') || Path::new(b).exists())
            .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.0.join("mosquitto.log")).unwrap(),
            ))
            .spawn()
            .expect("mosquitto (Debian package mosquitto)");
        wait_listening(tcp);
        wait_listening(ws);
        Mosquitto {
            child,
            tcp,
            ws,
            _dir: dir,
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay that can be cut (every connection reset, new ones refused
/// by closing them at once) and restored: the network between the edge and
/// the remote.
struct Relay {
    port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(target: u16) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                if !up2.load(Ordering::SeqCst) {
                    drop(c);
                    continue;
                }
                let Ok(u) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let mut all = conns2.lock().unwrap();
                all.push(c.try_clone().unwrap());
                all.push(u.try_clone().unwrap());
                drop(all);
                for (mut a, mut b) in [(c.try_clone().unwrap(), u.try_clone().unwrap()), (u, c)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Relay { port, up, conns }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// An edge Tarta: a TCP listener and `bridges` (TOML), its data in `data`.
fn edge(bridges: &str, data: &Path) -> Broker {
    edge_on(0, bridges, data)
}

/// An edge Tarta whose TCP listener is on `port` (0: any).
fn edge_on(port: u16, bridges: &str, data: &Path) -> Broker {
    std::fs::create_dir_all(data).unwrap();
    let conf = data.with_extension("toml");
    std::fs::write(
        &conf,
        format!("tcp = [\"127.0.0.1:{port}\"]\nhttp = [\"127.0.0.1:0\"]\n{bridges}"),
    )
    .unwrap();
    let args: Vec<String> = [
        "--config",
        conf.to_str().unwrap(),
        "--shards",
        "2",
        "--no-pin",
        "--log",
        "debug",
        "--sys-interval",
        "1",
        "--data-dir",
        data.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Broker::try_start_args(&args, &data.with_extension("log"), Duration::from_secs(20)).unwrap()
}

/// A `[[bridge]]` table named `name` to `address` with `extra` keys and
/// one rule per (filter, direction).
fn bridge(name: &str, address: &str, extra: &str, rules: &[(&str, &str)]) -> String {
    let mut t = format!(
        "[[bridge]]\nname = \"{name}\"\naddress = {address}\nclient_id = \"edge-{name}-{}\"\n\
         reconnect_delay_ms = 100\nreconnect_delay_max_ms = 500\n{extra}\n",
        rand_u64()
    );
    for (filter, dir) in rules {
        t.push_str(&format!(
            "[[bridge.topic]]\nfilter = \"{filter}\"\ndirection = \"{dir}\"\nqos = 1\n\
             remote_prefix = \"plant7/\"\n"
        ));
    }
    t
}

/// Publishes `topic/i` payload `i` for i in `range` at QoS 1 and waits for
/// each PUBACK. Returns the PUBACK reason codes (5.0) or zeros.
fn publish_numbered(
    port: u16,
    protocol: Protocol,
    topic: &str,
    range: std::ops::Range<u32>,
) -> Vec<u8> {
    let id = format!("pub-{}", rand_u64());
    let (mut c, ack) = Raw::connect(port, connect_packet(protocol, &id, true, 60));
    assert_eq!(ack.code, 0);
    let mut codes = Vec::new();
    for i in range {
        let pid = (i % 60000 + 1) as u16;
        c.send(&Packet::Publish(mqtt::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: pid,
            payload: i.to_string().into_bytes().into(),
            properties: Properties::default(),
        }));
        match c.recv() {
            Some(Packet::PubAck(a)) if a.packet_id == pid => codes.push(a.reason),
            other => panic!("expected PUBACK {pid}, got {other:?}"),
        }
    }
    codes
}

/// A persistent QoS 1 subscriber.
fn subscriber(port: u16, id: &str, filter: &str) -> Raw {
    let (mut c, ack) = Raw::connect(port, connect_packet(Protocol::V311, id, false, 60));
    assert_eq!(ack.code, 0);
    assert_eq!(c.subscribe_code(1, filter, QoS::AtLeastOnce), 1);
    c
}

/// Receives until `n` distinct messages arrived or `within` passed
/// (acknowledging each): (topic, payload) in arrival order, duplicates too.
fn collect(c: &mut Raw, n: usize, within: Duration) -> Vec<(String, String)> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut distinct = std::collections::HashSet::new();
    while distinct.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match c.recv_timeout(left.min(Duration::from_secs(1))) {
            Some(Packet::Publish(p)) => {
                if p.qos == QoS::AtLeastOnce {
                    c.send(&Packet::PubAck(tarta_proto::mqtt::Ack {
                        packet_id: p.packet_id,
                        reason: 0,
                        properties: Properties::default(),
                    }));
                }
                let m = (
                    p.topic.to_string(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                );
                distinct.insert(m.clone());
                got.push(m);
            }
            Some(_) => {}
            None => {}
        }
    }
    got
}

/// Every message of `topic` numbered `range` exactly once per number, in
/// increasing order of first arrival (duplicates are allowed by QoS 1 only
/// after a reconnection; they must not reorder what came first).
fn assert_all_in_order(got: &[(String, String)], topic: &str, range: std::ops::Range<u32>) {
    let nums: Vec<u32> = got
        .iter()
        .filter(|(t, _)| t == topic)
        .map(|(_, p)| p.parse().unwrap())
        .collect();
    let mut first = Vec::new();
    for n in &nums {
        if !first.contains(n) {
            first.push(*n);
        }
    }
    let want: Vec<u32> = range.collect();
    assert_eq!(
        first,
        want,
        "messages of {topic} (got {} in all)",
        nums.len()
    );
}

fn sys_state(port: u16, name: &str) -> Option<String> {
    let (mut c, _) = Raw::connect(
        port,
        connect_packet(Protocol::V311, &format!("s-{}", rand_u64()), true, 60),
    );
    c.send(&Packet::Subscribe(mqtt::Subscribe {
        packet_id: 1,
        filters: vec![(
            format!("$SYS/broker/connection/{name}/state").into(),
            mqtt::SubOptions::default(),
        )],
        properties: Properties::default(),
    }));
    // A live state change may come before the SUBACK (MQTT-3.8.4 allows it).
    loop {
        match c.recv_timeout(Duration::from_secs(3)) {
            Some(Packet::Publish(p)) => {
                return Some(String::from_utf8_lossy(&p.payload).into_owned())
            }
            Some(Packet::SubAck(_)) => {}
            _ => return None,
        }
    }
}

/// Waits until the edge's bridge `name` reports `state`.
fn wait_state(port: u16, name: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while sys_state(port, name).as_deref() != Some(state) {
        assert!(
            Instant::now() < deadline,
            "bridge {name} never reached state {state}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn to_mosquitto_over_tcp_and_websocket_in_order_both_ways() {
    let m = Mosquitto::start();
    let dir = TempDir::new("bridge-both");
    let tables = [
        bridge(
            "tcp",
            &format!("\"mqtt://127.0.0.1:{}\"", m.tcp),
            "protocol = \"3.1.1\"",
            &[("sensors/tcp/#", "out"), ("cmd/tcp/#", "in")],
        ),
        bridge(
            "ws",
            &format!("\"ws://127.0.0.1:{}/mqtt\"", m.ws),
            "protocol = \"5\"",
            &[("sensors/ws/#", "out"), ("cmd/ws/#", "in")],
        ),
    ]
    .join("\n");
    let e = edge(&tables, &dir.0.join("edge"));
    wait_state(e.port, "tcp", "1");
    wait_state(e.port, "ws", "1");
    let mut cloud = subscriber(m.tcp, "cloud-sub", "plant7/sensors/#");
    let mut local = subscriber(e.port, "local-sub", "cmd/#");
    for t in ["tcp", "ws"] {
        publish_numbered(e.port, Protocol::V311, &format!("sensors/{t}/a"), 0..200);
        publish_numbered(m.tcp, Protocol::V311, &format!("plant7/cmd/{t}/x"), 0..50);
    }
    let got = collect(&mut cloud, 400, Duration::from_secs(20));
    assert_all_in_order(&got, "plant7/sensors/tcp/a", 0..200);
    assert_all_in_order(&got, "plant7/sensors/ws/a", 0..200);
    let got = collect(&mut local, 100, Duration::from_secs(20));
    assert_all_in_order(&got, "cmd/tcp/x", 0..50);
    assert_all_in_order(&got, "cmd/ws/x", 0..50);
    // Nothing more: no copies, nothing looped back.
    assert!(collect(&mut cloud, 1, Duration::from_millis(500)).is_empty());
    assert!(collect(&mut local, 1, Duration::from_millis(300)).is_empty());
}

#[test]
fn a_cut_link_loses_nothing_and_the_backlog_drains() {
    let m = Mosquitto::start();
    let relay = Relay::start(m.tcp);
    let dir = TempDir::new("bridge-cut");
    let e = edge(
        &bridge(
            "cloud",
            &format!("\"mqtt://127.0.0.1:{}\"", relay.port),
            "",
            &[("sensors/#", "out")],
        ),
        &dir.0.join("edge"),
    );
    wait_state(e.port, "cloud", "1");
    let mut cloud = subscriber(m.tcp, "cloud-sub", "plant7/#");
    let port = e.port;
    // Publishing goes on while the link is cut and restored.
    let publisher = std::thread::spawn(move || {
        publish_numbered(port, Protocol::V311, "sensors/a", 0..300);
        std::thread::sleep(Duration::from_millis(300));
        publish_numbered(port, Protocol::V311, "sensors/a", 300..600);
    });
    std::thread::sleep(Duration::from_millis(100));
    relay.cut();
    std::thread::sleep(Duration::from_millis(800));
    relay.restore();
    publisher.join().unwrap();
    let got = collect(&mut cloud, 600, Duration::from_secs(30));
    assert_all_in_order(&got, "plant7/sensors/a", 0..600);
    wait_state(e.port, "cloud", "1");
    let log = std::fs::read_to_string(dir.0.join("edge.log")).unwrap();
    assert!(log.contains("bridge link lost"), "the cut was not seen");
    // Prometheus: drained, everything acknowledged by the remote, up.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = http(e.port_of("http"), "GET", "/metrics", None);
        let value = |name: &str| -> u64 {
            let key = format!("{name}{{bridge=\"cloud\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(key.as_str()))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(u64::MAX)
        };
        let ok = value("tarta_bridge_queued_messages") == 0
            && (600..u64::MAX).contains(&value("tarta_bridge_forwarded_total"))
            && value("tarta_bridge_up") == 1
            && value("tarta_bridge_connects_total") >= 2;
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn what_the_edge_acknowledged_survives_its_sigkill_while_the_link_is_down() {
    let m = Mosquitto::start();
    let relay = Relay::start(m.tcp);
    let dir = TempDir::new("bridge-kill");
    let table = bridge(
        "cloud",
        &format!("\"mqtt://127.0.0.1:{}\"", relay.port),
        "",
        &[("sensors/#", "out")],
    );
    let mut e = edge(&table, &dir.0.join("edge"));
    wait_state(e.port, "cloud", "1");
    let mut cloud = subscriber(m.tcp, "cloud-sub", "plant7/#");
    relay.cut();
    wait_state(e.port, "cloud", "0");
    publish_numbered(e.port, Protocol::V311, "sensors/a", 0..500);
    e.kill();
    let e = edge(&table, &dir.0.join("edge"));
    relay.restore();
    let got = collect(&mut cloud, 500, Duration::from_secs(30));
    assert_all_in_order(&got, "plant7/sensors/a", 0..500);
    wait_state(e.port, "cloud", "1");
}

#[test]
fn through_nginx_as_a_websocket_reverse_proxy() {
    let m = Mosquitto::start();
    let dir = TempDir::new("bridge-nginx");
    let nginx_port = free_port();
    let conf = dir.0.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n\
             map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}\n\
             server {{\n    listen 127.0.0.1:{nginx_port};\n    location /mqtt {{\n\
             proxy_pass http://127.0.0.1:{ws};\n      proxy_http_version 1.1;\n\
             proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection $connection_upgrade;\n\
             proxy_set_header Host $host;\n      proxy_read_timeout 3600s;\n    }}\n  }}\n}}\n",
            d = dir.0.display(),
            ws = m.ws
        ),
    )
    .unwrap();
    let nginx = Command::new(
        ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|b| !b.starts_with('/') || Path::new(b).exists())
            .unwrap(),
    )
    .arg("-c")
    .arg(&conf)
    .arg("-e")
    .arg(dir.0.join("error.log"))
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("nginx");
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _nginx = Kill(nginx);
    wait_listening(nginx_port);
    let e = edge(
        &bridge(
            "cloud",
            &format!("\"ws://127.0.0.1:{nginx_port}/mqtt\""),
            "http_headers = { X-Edge = \"7\" }",
            &[("sensors/#", "out")],
        ),
        &dir.0.join("edge"),
    );
    wait_state(e.port, "cloud", "1");
    let mut cloud = subscriber(m.tcp, "cloud-sub", "plant7/#");
    publish_numbered(e.port, Protocol::V311, "sensors/a", 0..200);
    let got = collect(&mut cloud, 200, Duration::from_secs(20));
    assert_all_in_order(&got, "plant7/sensors/a", 0..200);
}

#[test]
fn failover_to_the_second_address() {
    let m = Mosquitto::start();
    let dead = free_port();
    let dir = TempDir::new("bridge-failover");
    let e = edge(
        &bridge(
            "cloud",
            &format!(
                "[\"mqtt://127.0.0.1:{dead}\", \"mqtt://127.0.0.1:{}\"]",
                m.tcp
            ),
            "",
            &[("sensors/#", "out")],
        ),
        &dir.0.join("edge"),
    );
    wait_state(e.port, "cloud", "1");
    let mut cloud = subscriber(m.tcp, "cloud-sub", "plant7/#");
    publish_numbered(e.port, Protocol::V311, "sensors/a", 0..20);
    assert_all_in_order(
        &collect(&mut cloud, 20, Duration::from_secs(10)),
        "plant7/sensors/a",
        0..20,
    );
}

/// Two brokers bridged both ways on `#`: every message crosses once.
fn no_loops(remote_port: u16, protocol: &str, dir: &TempDir) {
    let mut table = format!(
        "[[bridge]]\nname = \"peer\"\naddress = \"mqtt://127.0.0.1:{remote_port}\"\n\
         protocol = \"{protocol}\"\nclient_id = \"edge-loop-{}\"\nreconnect_delay_ms = 100\n",
        rand_u64()
    );
    table.push_str("[[bridge.topic]]\nfilter = \"#\"\ndirection = \"both\"\nqos = 1\n");
    let e = edge(&table, &dir.0.join("edge"));
    wait_state(e.port, "peer", "1");
    let mut at_edge = subscriber(e.port, "edge-sub", "t/#");
    let mut at_remote = subscriber(remote_port, "remote-sub", "t/#");
    publish_numbered(e.port, Protocol::V311, "t/from-edge", 0..20);
    publish_numbered(remote_port, Protocol::V311, "t/from-remote", 0..20);
    let edge_got = collect(&mut at_edge, 100, Duration::from_secs(3));
    let remote_got = collect(&mut at_remote, 100, Duration::from_secs(3));
    for got in [&edge_got, &remote_got] {
        for t in ["t/from-edge", "t/from-remote"] {
            let n = got.iter().filter(|(topic, _)| topic == t).count();
            assert_eq!(n, 20, "{t}: {n} copies of 20 messages ({protocol})");
        }
    }
}

/// Two Tartas, each with its own bridge out to the other on `#` (5.0):
/// the hop marker stops the cycle.
#[test]
fn two_tartas_bridged_out_to_each_other_exchange_each_message_once() {
    let (pa, pb) = (free_port(), free_port());
    let dir = TempDir::new("bridge-cycle");
    let table = |to: u16| {
        format!(
            "[[bridge]]\nname = \"peer\"\naddress = \"mqtt://127.0.0.1:{to}\"\nprotocol = \"5\"\n\
             client_id = \"cycle-{to}\"\nreconnect_delay_ms = 100\nreconnect_delay_max_ms = 200\n\
             [[bridge.topic]]\nfilter = \"#\"\ndirection = \"out\"\nqos = 1\n"
        )
    };
    let a = edge_on(pa, &table(pb), &dir.0.join("a"));
    let b = edge_on(pb, &table(pa), &dir.0.join("b"));
    wait_state(a.port, "peer", "1");
    wait_state(b.port, "peer", "1");
    let mut at_a = subscriber(a.port, "sub-a", "t/#");
    let mut at_b = subscriber(b.port, "sub-b", "t/#");
    publish_numbered(a.port, Protocol::V5, "t/from-a", 0..20);
    publish_numbered(b.port, Protocol::V311, "t/from-b", 0..20);
    for c in [&mut at_a, &mut at_b] {
        let got = collect(c, 100, Duration::from_secs(3));
        for t in ["t/from-a", "t/from-b"] {
            let n = got.iter().filter(|(topic, _)| topic == t).count();
            assert_eq!(n, 20, "{t}: {n} copies of 20 messages");
        }
    }
}

#[test]
fn both_ways_on_everything_without_loops_to_mosquitto_and_to_tarta() {
    let m = Mosquitto::start();
    no_loops(m.tcp, "3.1.1", &TempDir::new("loop-mosq311"));
    let m = Mosquitto::start();
    no_loops(m.tcp, "5", &TempDir::new("loop-mosq5"));
    let remote = Broker::start();
    no_loops(remote.port, "5", &TempDir::new("loop-tarta5"));
    let remote = Broker::start();
    no_loops(remote.port, "3.1.1", &TempDir::new("loop-tarta311"));
}

#[test]
fn a_full_buffer_rejects_new_messages_or_drops_the_oldest() {
    let dead = free_port();
    let dir = TempDir::new("bridge-full");
    // Each message weighs topic (9) + payload (1-3) bytes: ~ 100 fit.
    let tables = [
        bridge(
            "rej",
            &format!("\"mqtt://127.0.0.1:{dead}\""),
            "max_buffer_bytes = 1000\noverflow = \"reject_new\"",
            &[("rej/#", "out")],
        ),
        bridge(
            "old",
            &format!("\"mqtt://127.0.0.1:{dead}\""),
            "max_buffer_bytes = 1000\noverflow = \"drop_oldest\"",
            &[("old/#", "out")],
        ),
    ]
    .join("\n");
    let e = edge(&tables, &dir.0.join("edge"));
    // 5.0: quota exceeded once full, and nothing after it is taken.
    let codes = publish_numbered(e.port, Protocol::V5, "rej/aaaaa", 0..200);
    let first = codes.iter().position(|c| *c == 0x97).expect("no 0x97");
    assert!((60..=100).contains(&first), "refused from message {first}");
    assert!(codes[first..].iter().all(|c| *c == 0x97), "{codes:?}");
    // drop_oldest: everything is acknowledged.
    let codes = publish_numbered(e.port, Protocol::V5, "old/aaaaa", 0..200);
    assert!(codes.iter().all(|c| *c == 0), "{codes:?}");
    let m = Mosquitto::start();
    // The remote comes up where the edge looks for it.
    drop(e);
    let tables = tables.replace(&dead.to_string(), &m.tcp.to_string());
    let mut cloud = subscriber(m.tcp, "cloud-sub", "plant7/#");
    let e = edge(&tables, &dir.0.join("edge"));
    wait_state(e.port, "old", "1");
    let got = collect(&mut cloud, 1000, Duration::from_secs(5));
    let nums = |t: &str| -> Vec<u32> {
        got.iter()
            .filter(|(topic, _)| topic == t)
            .map(|(_, p)| p.parse().unwrap())
            .collect()
    };
    let rej = nums("plant7/rej/aaaaa");
    assert_eq!(
        rej,
        (0..first as u32).collect::<Vec<_>>(),
        "reject_new keeps the first ones"
    );
    let old = nums("plant7/old/aaaaa");
    assert!(old.len() >= 60 && old.len() <= 100, "{} kept", old.len());
    assert_eq!(*old.last().unwrap(), 199, "drop_oldest keeps the newest");
    assert!(old.windows(2).all(|w| w[0] + 1 == w[1]), "{old:?}");
}

/// A CONNECT proxy for one test: counts tunnels, relays bytes.
fn connect_proxy() -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let seen = seen2.clone();
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut b = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") {
                    if c.read(&mut b).unwrap_or(0) == 0 {
                        return;
                    }
                    req.push(b[0]);
                }
                let text = String::from_utf8_lossy(&req).into_owned();
                let target = text.split_whitespace().nth(1).unwrap_or("").to_string();
                seen.lock().unwrap().push(text);
                let Ok(u) = TcpStream::connect(&target) else {
                    let _ = c.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
                    return;
                };
                c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .unwrap();
                let (mut a, mut b2) = (c.try_clone().unwrap(), u.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b2);
                });
                let (mut u, mut c) = (u, c);
                let _ = std::io::copy(&mut u, &mut c);
            });
        }
    });
    (port, seen)
}

#[test]
fn wss_with_a_test_ca_through_an_http_connect_proxy() {
    let pki = crate::tls::Pki::new("bridge");
    let (cert, key) = pki.issue("server", "localhost", true);
    let remote = Broker::start_with(&[
        "--wss",
        "127.0.0.1:0",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    let wss = remote.port_of("wss");
    let (proxy, seen) = connect_proxy();
    let dir = TempDir::new("bridge-wss");
    let extra = format!(
        "protocol = \"5\"\nhttp_proxy = \"http://u:p@127.0.0.1:{proxy}\"\n\
         tls = {{ ca = \"{}\", server_name = \"localhost\" }}",
        pki.ca().display()
    );
    let e = edge(
        &bridge(
            "cloud",
            &format!("\"wss://127.0.0.1:{wss}/mqtt\""),
            &extra,
            &[("sensors/#", "out"), ("cmd/#", "in")],
        ),
        &dir.0.join("edge"),
    );
    wait_state(e.port, "cloud", "1");
    let mut cloud = subscriber(remote.port, "cloud-sub", "plant7/sensors/#");
    let mut local = subscriber(e.port, "local-sub", "cmd/#");
    publish_numbered(e.port, Protocol::V5, "sensors/a", 0..100);
    publish_numbered(remote.port, Protocol::V311, "plant7/cmd/go", 0..10);
    assert_all_in_order(
        &collect(&mut cloud, 100, Duration::from_secs(10)),
        "plant7/sensors/a",
        0..100,
    );
    assert_all_in_order(
        &collect(&mut local, 10, Duration::from_secs(10)),
        "cmd/go",
        0..10,
    );
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter()
            .any(|r| r.starts_with(&format!("CONNECT 127.0.0.1:{wss} "))
                && r.contains("Proxy-Authorization: Basic dTpw")),
        "{seen:?}"
    );
}

#[test]
fn a_wrong_ca_keeps_the_link_down_and_says_why() {
    let pki = crate::tls::Pki::new("bridge-good");
    let other = crate::tls::Pki::new("bridge-other");
    let (cert, key) = pki.issue("server", "localhost", true);
    let remote = Broker::start_with(&[
        "--mqtts",
        "127.0.0.1:0",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    let dir = TempDir::new("bridge-badca");
    let extra = format!(
        "tls = {{ ca = \"{}\", server_name = \"localhost\" }}",
        other.ca().display()
    );
    let e = edge(
        &bridge(
            "cloud",
            &format!("\"mqtts://127.0.0.1:{}\"", remote.port_of("tls")),
            &extra,
            &[("sensors/#", "out")],
        ),
        &dir.0.join("edge"),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(sys_state(e.port, "cloud").as_deref(), Some("0"));
    let log = std::fs::read_to_string(dir.0.join("edge.log")).unwrap();
    assert!(
        log.contains("bridge cannot connect") && log.contains("UnknownIssuer"),
        "{log}"
    );
}

/// A restart with other rules: the recovered session's subscriptions
/// become exactly the new out rules (the old filter forwards no more).
#[test]
fn changed_rules_replace_the_recovered_subscriptions() {
    let m = Mosquitto::start();
    let dir = TempDir::new("bridge-rules");
    let address = format!("\"mqtt://127.0.0.1:{}\"", m.tcp);
    let mut e = edge(
        &bridge("cloud", &address, "", &[("old/#", "out")]),
        &dir.0.join("edge"),
    );
    wait_state(e.port, "cloud", "1");
    e.terminate();
    let table = bridge("cloud", &address, "", &[("new/#", "out")]);
    let e = edge(&table, &dir.0.join("edge"));
    wait_state(e.port, "cloud", "1");
    let mut cloud = subscriber(m.tcp, "cloud-sub", "plant7/#");
    publish_numbered(e.port, Protocol::V311, "old/a", 0..5);
    publish_numbered(e.port, Protocol::V311, "new/a", 0..5);
    let got = collect(&mut cloud, 10, Duration::from_secs(3));
    assert_all_in_order(&got, "plant7/new/a", 0..5);
    assert!(
        !got.iter().any(|(t, _)| t.starts_with("plant7/old/")),
        "{got:?}"
    );
}
