//! Test harness: starts the real `tarta` binary on a free port, picks client
//! ids by home shard, and offers two clients: rumqttc (a real third-party
//! client) and `Raw`, a byte-level client built on Tarta's codec for the
//! cases a well-behaved client cannot produce.

use bytes::BytesMut;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tarta_proto::mqtt::{self, Connect, Packet, Properties, Protocol};

pub const SHARDS: usize = 2;

pub struct Broker {
    pub child: Child,
    pub port: u16,
    /// The MQTT over WebSocket port.
    pub ws_port: u16,
    /// Every listener the broker reported, in order: (tcp|ws|tls|wss, port).
    pub listeners: Vec<(String, u16)>,
    stderr_path: std::path::PathBuf,
}

/// (kind, port) of a `tarta listening mqtt/KIND ADDR` line.
fn listening(line: &str) -> Option<(String, u16)> {
    let rest = line.strip_prefix("tarta listening ")?;
    // `mqtt/tcp ADDR`, or `http ADDR` for an HTTP-only listener.
    let rest = rest.strip_prefix("mqtt/").unwrap_or(rest);
    let (kind, addr) = rest.split_once(' ')?;
    let port = addr.rsplit(':').next()?.parse().ok()?;
    Some((kind.to_string(), port))
}

impl Broker {
    pub fn start() -> Broker {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Broker {
        Self::start_cmd(Command::new(env!("CARGO_BIN_EXE_tarta")), extra)
    }

    /// Starts `cmd` (the tarta binary, or a shell that execs it) with the
    /// standard test flags plus `extra`.
    pub fn start_cmd(mut cmd: Command, extra: &[&str]) -> Broker {
        cmd.args(["--tcp", "127.0.0.1:0", "--ws", "127.0.0.1:0"]);
        Self::start_bare(cmd, extra)
    }

    /// Starts `cmd` with the standard test flags except the listeners
    /// (a `--config` file or `extra` gives them).
    pub fn start_bare(mut cmd: Command, extra: &[&str]) -> Broker {
        let dir =
            std::env::temp_dir().join(format!("tarta-e2e-{}-{}", std::process::id(), rand_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        let stderr_path = dir.join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        cmd.args(["--shards", "2", "--no-pin"])
            .args(["--sys-interval", "1", "--log", "debug"])
            .args(extra);
        if !extra
            .iter()
            .any(|a| *a == "--data-dir" || *a == "--no-persistence")
        {
            // Every broker its own write-ahead log (the default directory
            // is locked by whichever broker opens it first).
            cmd.arg("--data-dir").arg(dir.join("data"));
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::from(stderr));
        let mut child = cmd.spawn().expect("start tarta");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut listeners = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            listeners.extend(listening(&line));
            if line.starts_with("tarta started") {
                break;
            }
        }
        // Keep draining stdout so the broker never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let b = Broker::of(child, listeners, stderr_path);
        assert!(b.port != 0, "tarta did not report its port");
        b
    }

    /// The broker of `child`, with the listeners it reported.
    fn of(child: Child, listeners: Vec<(String, u16)>, stderr_path: std::path::PathBuf) -> Broker {
        let first = |k: &str| {
            listeners
                .iter()
                .find(|(kind, _)| kind == k)
                .map_or(0, |l| l.1)
        };
        let (port, ws_port) = (first("tcp"), first("ws"));
        Broker {
            child,
            port,
            ws_port,
            listeners,
            stderr_path,
        }
    }

    /// The port of the first listener of this kind (tcp, ws, tls, wss).
    pub fn port_of(&self, kind: &str) -> u16 {
        self.listeners
            .iter()
            .find(|(k, _)| k == kind)
            .map(|l| l.1)
            .unwrap_or_else(|| panic!("no {kind} listener"))
    }

    /// The ports of every listener of this kind, in order.
    pub fn ports_of(&self, kind: &str) -> Vec<u16> {
        self.listeners
            .iter()
            .filter(|(k, _)| k == kind)
            .map(|l| l.1)
            .collect()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

/// A client id starting with `prefix` whose home is `shard`.
pub fn id_on(shard: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| tarta::home_shard(id, SHARDS) == shard)
        .unwrap()
}

// ---------------------------------------------------------------- rumqttc

pub mod rq {
    use super::*;
    use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet as RPacket, Publish};
    use tokio::sync::mpsc;

    pub struct Client {
        pub client: AsyncClient,
        pub rx: mpsc::UnboundedReceiver<Event>,
        pub task: tokio::task::JoinHandle<Option<String>>,
    }

    pub fn opts(port: u16, id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(4 << 20, 4 << 20);
        o
    }

    /// Connects and waits for the CONNACK; events flow into `rx`. The
    /// event loop stops at the first error (reported by `task`).
    pub async fn connect(o: MqttOptions) -> Client {
        let (client, eventloop) = AsyncClient::new(o, 1000);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(drive(eventloop, tx));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Event::Incoming(RPacket::ConnAck(_)))) => break,
                Ok(Some(_)) => {}
                Ok(None) => panic!("connection failed: {:?}", task.await),
                Err(_) => panic!("no CONNACK within 10 s"),
            }
        }
        Client { client, rx, task }
    }

    async fn drive(mut el: EventLoop, tx: mpsc::UnboundedSender<Event>) -> Option<String> {
        loop {
            match el.poll().await {
                Ok(ev) => {
                    if tx.send(ev).is_err() {
                        return None;
                    }
                }
                Err(e) => return Some(e.to_string()),
            }
        }
    }

    impl Client {
        /// Subscribes and waits for the SUBACK; returns its return codes.
        pub async fn subscribe(
            &mut self,
            filter: &str,
            qos: rumqttc::QoS,
        ) -> Vec<rumqttc::SubscribeReasonCode> {
            self.client.subscribe(filter, qos).await.unwrap();
            loop {
                match self.next_event(Duration::from_secs(10)).await {
                    Some(Event::Incoming(RPacket::SubAck(s))) => return s.return_codes,
                    Some(_) => {}
                    None => panic!("no SUBACK for {filter}"),
                }
            }
        }

        pub async fn next_event(&mut self, within: Duration) -> Option<Event> {
            tokio::time::timeout(within, self.rx.recv())
                .await
                .ok()
                .flatten()
        }

        /// The next PUBLISH received within `within`.
        pub async fn next_publish(&mut self, within: Duration) -> Option<Publish> {
            let deadline = tokio::time::Instant::now() + within;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match self.next_event(left).await {
                    Some(Event::Incoming(RPacket::Publish(p))) => return Some(p),
                    Some(_) => {}
                    None => return None,
                }
            }
        }

        /// Every PUBLISH received until `quiet` passes without one.
        pub async fn drain_publishes(&mut self, quiet: Duration) -> Vec<Publish> {
            let mut v = Vec::new();
            while let Some(p) = self.next_publish(quiet).await {
                v.push(p);
            }
            v
        }

        /// Waits until an outgoing packet has been acknowledged (PUBACK/PUBCOMP).
        pub async fn wait_ack(&mut self) {
            loop {
                match self.next_event(Duration::from_secs(10)).await {
                    Some(Event::Incoming(RPacket::PubAck(_)))
                    | Some(Event::Incoming(RPacket::PubComp(_))) => return,
                    Some(_) => {}
                    None => panic!("no PUBACK/PUBCOMP"),
                }
            }
        }

        pub async fn disconnect(self) {
            let _ = self.client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        }
    }
}

// ---------------------------------------------------------------- raw

/// A byte-level MQTT client on a blocking socket.
pub struct Raw {
    pub s: TcpStream,
    buf: BytesMut,
    pub protocol: Protocol,
}

pub fn connect_packet(protocol: Protocol, id: &str, clean: bool, keep_alive: u16) -> Connect {
    Connect {
        protocol,
        clean_start: clean,
        keep_alive,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
        bridge: false,
    }
}

impl Raw {
    pub fn open(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw {
            s,
            buf: BytesMut::new(),
            protocol: Protocol::V311,
        }
    }

    /// Opens a connection and sends `c`; returns the CONNACK.
    pub fn connect(port: u16, c: Connect) -> (Raw, mqtt::ConnAck) {
        let mut r = Raw::open(port);
        r.protocol = c.protocol;
        r.send(&Packet::Connect(Box::new(c)));
        match r.recv() {
            Some(Packet::ConnAck(a)) => (r, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub fn send(&mut self, p: &Packet) {
        let mut b = BytesMut::new();
        mqtt::encode(p, self.protocol, &mut b);
        self.s.write_all(&b).unwrap();
    }

    pub fn send_bytes(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// The next packet, or None if the server closed the connection (or
    /// nothing arrived within the read timeout).
    pub fn recv(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = mqtt::decode(&mut self.buf, self.protocol, u32::MAX).unwrap() {
                return Some(p);
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next packet within `d` (None: nothing, or closed).
    pub fn recv_timeout(&mut self, d: Duration) -> Option<Packet> {
        self.s.set_read_timeout(Some(d)).unwrap();
        let p = self.recv();
        self.s
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        p
    }

    /// Reads until the server closes; returns the packets seen and whether
    /// it did close within `within`.
    pub fn until_closed(&mut self, within: Duration) -> (Vec<Packet>, bool) {
        self.s.set_read_timeout(Some(within)).unwrap();
        let start = Instant::now();
        let mut seen = Vec::new();
        loop {
            if let Ok(Some(p)) = mqtt::decode(&mut self.buf, self.protocol, u32::MAX) {
                seen.push(p);
                continue;
            }
            let mut chunk = [0u8; 4096];
            match self.s.read(&mut chunk) {
                Ok(0) => return (seen, true),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (seen, true),
                Err(_) => return (seen, start.elapsed() < within),
            }
        }
    }
}

impl Raw {
    /// SUBSCRIBE to one filter; the SUBACK's return code.
    pub fn subscribe_code(&mut self, packet_id: u16, filter: &str, qos: mqtt::QoS) -> u8 {
        self.send(&Packet::Subscribe(mqtt::Subscribe {
            packet_id,
            filters: vec![(
                filter.into(),
                mqtt::SubOptions {
                    qos,
                    ..Default::default()
                },
            )],
            properties: Properties::default(),
        }));
        match self.recv() {
            Some(Packet::SubAck(a)) => a.codes[0],
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

/// `METHOD path` over HTTP/1.1 to 127.0.0.1:`port`, with an optional
/// bearer token: (status, body).
pub fn http(port: u16, method: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Whether the server sent a DISCONNECT with `reason` among `got`.
pub fn has_disconnect(got: &[Packet], reason: u8) -> bool {
    got.iter()
        .any(|p| matches!(p, Packet::Disconnect(d) if d.reason == reason))
}

/// Reads a `$SYS` counter summed over shards, via a raw subscriber.
pub fn sys_counter(port: u16, name: &str) -> u64 {
    let c = connect_packet(Protocol::V311, &format!("sys-{}", rand_u64()), true, 0);
    sys_counter_as(port, c, name)
}

/// `sys_counter` for a client that connects with `c` (credentials).
pub fn sys_counter_as(port: u16, c: Connect, name: &str) -> u64 {
    let (mut r, a) = Raw::connect(port, c);
    assert_eq!(a.code, 0, "$SYS reader refused");
    r.send(&Packet::Subscribe(mqtt::Subscribe {
        packet_id: 1,
        filters: vec![(
            format!("$SYS/tarta/shard/+/{name}").as_str().into(),
            Default::default(),
        )],
        properties: Properties::default(),
    }));
    let mut total = 0;
    let mut got = 0;
    r.s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    while got < SHARDS {
        match r.recv() {
            Some(Packet::Publish(p)) => {
                total += std::str::from_utf8(&p.payload)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap();
                got += 1;
            }
            Some(_) => {}
            None => break,
        }
    }
    total
}

// ---------------------------------------------------------------- raw WebSocket

/// A byte-level WebSocket client: exact control over the handshake,
/// framing, masking and fragmentation.
pub struct WsRaw {
    pub s: TcpStream,
    buf: Vec<u8>,
    mqtt: BytesMut,
    pub protocol: Protocol,
}

pub fn ws_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A masked client frame.
pub fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    tarta_proto::ws::frame::client_frame(opcode, fin, payload, [0x37, 0xfa, 0x21, 0x3d])
}

pub fn encode(p: &Packet, protocol: Protocol) -> Vec<u8> {
    let mut b = BytesMut::new();
    mqtt::encode(p, protocol, &mut b);
    b.to_vec()
}

impl WsRaw {
    /// Sends `request`; returns the client and the response head.
    pub fn handshake(port: u16, request: &str) -> (WsRaw, String) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => break buf.len(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let c = WsRaw {
            s,
            buf,
            mqtt: BytesMut::new(),
            protocol: Protocol::V311,
        };
        (c, head)
    }

    /// Upgrades with subprotocol `mqtt` and sends `c` in one frame; returns the CONNACK.
    pub fn connect(port: u16, c: Connect) -> (WsRaw, mqtt::ConnAck) {
        let (mut ws, head) = WsRaw::handshake(
            port,
            &ws_request("/mqtt", "Sec-WebSocket-Protocol: mqtt\r\n"),
        );
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        ws.protocol = c.protocol;
        ws.send_frame(
            0x2,
            true,
            &encode(&Packet::Connect(Box::new(c)), ws.protocol),
        );
        match ws.recv() {
            Some(Packet::ConnAck(a)) => (ws, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub fn send_frame(&mut self, opcode: u8, fin: bool, payload: &[u8]) {
        self.s
            .write_all(&client_frame(opcode, fin, payload))
            .unwrap();
    }

    /// The next server frame (opcode, payload), or None when closed.
    pub fn recv_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    n if n < 126 => (n as usize, 2),
                    _ => (usize::MAX, 0),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let op = self.buf[0] & 0x0f;
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((op, payload));
                }
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next MQTT packet from binary frames (other frames are returned
    /// as errors so tests see them).
    pub fn recv(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = mqtt::decode(&mut self.mqtt, self.protocol, u32::MAX).unwrap() {
                return Some(p);
            }
            match self.recv_frame()? {
                (0x2, payload) | (0x0, payload) => self.mqtt.extend_from_slice(&payload),
                (0x8, _) => return None, // close frame: the connection ends
                (op, payload) => panic!("unexpected frame {op:#x} {payload:?}"),
            }
        }
    }
}

/// rumqttc options for MQTT over WebSocket.
pub fn rq_ws_opts(ws_port: u16, id: &str) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, format!("ws://127.0.0.1:{ws_port}/mqtt"), ws_port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(4 << 20, 4 << 20);
    o.set_transport(rumqttc::Transport::Ws);
    o
}

// ---------------------------------------------------------------- either transport

/// A byte-level client over TCP or WebSocket, for tests that run on both.
pub trait Mq {
    fn send(&mut self, p: &Packet);
    fn recv(&mut self) -> Option<Packet>;
    fn set_timeout(&mut self, t: Duration);
}

impl Mq for Raw {
    fn send(&mut self, p: &Packet) {
        Raw::send(self, p)
    }
    fn recv(&mut self) -> Option<Packet> {
        Raw::recv(self)
    }
    fn set_timeout(&mut self, t: Duration) {
        self.s.set_read_timeout(Some(t)).unwrap();
    }
}

impl Mq for WsRaw {
    fn send(&mut self, p: &Packet) {
        let b = encode(p, self.protocol);
        self.send_frame(0x2, true, &b);
    }
    fn recv(&mut self) -> Option<Packet> {
        WsRaw::recv(self)
    }
    fn set_timeout(&mut self, t: Duration) {
        self.s.set_read_timeout(Some(t)).unwrap();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Ws,
}

pub const TRANSPORTS: [Transport; 2] = [Transport::Tcp, Transport::Ws];

/// Connects with `c` over `t`; returns the client and the CONNACK.
pub fn mq_connect(b: &Broker, t: Transport, c: Connect) -> (Box<dyn Mq>, mqtt::ConnAck) {
    match t {
        Transport::Tcp => {
            let (r, a) = Raw::connect(b.port, c);
            (Box::new(r), a)
        }
        Transport::Ws => {
            let (r, a) = WsRaw::connect(b.ws_port, c);
            (Box::new(r), a)
        }
    }
}

/// Every packet received until `quiet` passes without one.
pub fn drain(c: &mut dyn Mq, quiet: Duration) -> Vec<Packet> {
    c.set_timeout(quiet);
    let mut v = Vec::new();
    while let Some(p) = c.recv() {
        v.push(p);
    }
    c.set_timeout(Duration::from_secs(10));
    v
}

// ---------------------------------------------------------------- restarts

/// A temporary directory, removed on drop unless the test is failing (then
/// it is kept, and its path printed, for the post-mortem).
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "tarta-e2e-{tag}-{}-{}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} (test failed)", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Broker {
    /// Starts the tarta binary with exactly `args` (none of the standard
    /// test flags), its stderr appended to `log`, and waits for `tarta
    /// started`. An error (with the end of the log) if it exits first or
    /// has not started within `within`.
    pub fn try_start_args(
        args: &[String],
        log: &std::path::Path,
        within: Duration,
    ) -> Result<Broker, String> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let _ = writeln!(f, "=== tarta {}", args.join(" "));
        let mut child = Command::new(env!("CARGO_BIN_EXE_tarta"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(f))
            .spawn()
            .map_err(|e| format!("cannot start tarta: {e}"))?;
        let stdout = child.stdout.take().unwrap();
        // Lines go through a channel so that waiting for them has a
        // deadline; the thread keeps draining stdout afterwards.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + within;
        let mut listeners = Vec::new();
        let failed = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    listeners.extend(listening(&line));
                    if line.starts_with("tarta started") {
                        break None;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    break Some(format!("tarta did not start within {within:?}"));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    break Some("tarta exited before `tarta started`".to_string());
                }
            }
        };
        if let Some(why) = failed {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            return Err(format!("{why} ({status}); its stderr ends with:\n{tail}"));
        }
        Ok(Broker::of(child, listeners, log.to_path_buf()))
    }

    /// SIGKILL (no shutdown of any kind), then reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
