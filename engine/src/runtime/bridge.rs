//! A bridge's outgoing link: one task on the bridge's home shard that
//! connects to the remote (TCP, through an optional HTTP CONNECT proxy,
//! then optional TLS, then optional WebSocket), speaks MQTT as a client
//! (CONNECT, SUBSCRIBE for the in rules, PINGREQ), and attaches the link to
//! the bridge's session (`broker::bridge`): the session's output goes to
//! the remote and the remote's packets to the session. When the link
//! drops it is tried again after a delay that doubles up to a maximum (with
//! jitter), going through the addresses in order while they fail.
//!
//! One link per bridge, so this uses a glommio `TcpStream` and a buffered
//! rustls `ClientConnection` rather than the connection scheduler.

use super::Rt;
use crate::broker::bridge::{packet_name, RemoteLimits};
use crate::broker::client::Flow;
use crate::broker::conn::{CloseReason, Conn};
use crate::config::bridge::{Bridge, Remote};
use bytes::{Buf, BytesMut};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use std::future::Future;
use std::io::{IoSlice, Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tarta_proto::mqtt::{
    self, ConnAck, Connect, Disconnect, Packet, Properties, Property, Protocol, SubOptions,
    Subscribe,
};
use tarta_proto::ws::{self, FrameDecoder, WsEvent};
use tarta_proto::ByteStr;
use tracing::{info, warn};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Output gathered from the session before it is written: more waits.
const OUT_HIGH: usize = 256 * 1024;

/// Runs bridge `idx`'s link until shutdown.
pub(crate) async fn run(rt: Rc<Rt>, idx: usize, tls: Option<Arc<rustls::ClientConfig>>) {
    let Some(b) = rt.shard.cfg.bridges.get(idx).cloned() else {
        return;
    };
    let mut delay = b.reconnect_delay_ms;
    let mut next = 0;
    let mut failures = 0u64;
    while !rt.shutdown.load(Ordering::Relaxed) {
        let remote = &b.addresses[next % b.addresses.len()];
        let mut was_up = false;
        let result = link(&rt, idx, &b, remote, tls.clone(), &mut was_up).await;
        if rt.shutdown.load(Ordering::Relaxed) {
            return;
        }
        match (&result, was_up) {
            (Err(e), true) => warn!(bridge = %b.name, address = %remote, "bridge link lost: {e}"),
            (Err(e), false) => {
                failures += 1;
                // Every failure while the remote is unreachable would be a
                // line a second: the first few, then every 64th.
                if failures <= 3 || failures % 64 == 0 {
                    warn!(bridge = %b.name, address = %remote, failures, "bridge cannot connect: {e}");
                }
            }
            (Ok(()), _) => info!(bridge = %b.name, address = %remote, "bridge link closed"),
        }
        if was_up {
            // It worked: the same address first, with the shortest delay.
            failures = 0;
            delay = b.reconnect_delay_ms;
        } else {
            next = (next + 1) % b.addresses.len();
            delay = (delay * 2).min(b.reconnect_delay_max_ms);
        }
        glommio::timer::sleep(jitter(delay)).await;
    }
}

/// `ms` less up to a quarter, at random: links of many edges that lost the
/// same remote do not all come back in the same millisecond.
fn jitter(ms: u64) -> Duration {
    let r = u64::from_ne_bytes(random());
    Duration::from_millis(ms - (r % (ms / 4 + 1)))
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // SAFETY: getrandom writes at most `N` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), N, 0) };
    if n != N as isize {
        // Not for secrets: a WebSocket mask and a delay. Mix the clock in.
        let t = Instant::now().elapsed().as_nanos() as u64 ^ std::process::id() as u64;
        for (i, x) in b.iter_mut().enumerate() {
            *x = (t >> ((i % 8) * 8)) as u8;
        }
    }
    b
}

/// Resolves on the shard's blocking thread (getaddrinfo may block).
async fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let h = host.to_string();
    let found = glommio::executor()
        .spawn_blocking(move || {
            use std::net::ToSocketAddrs;
            (h.as_str(), port).to_socket_addrs().map(|mut a| a.next())
        })
        .await;
    match found {
        Ok(Some(a)) => Ok(a),
        Ok(None) => Err(format!("{host}: no address")),
        Err(e) => Err(format!("{host}: {e}")),
    }
}

/// One connection to the remote: set up, attached, pumped until it ends.
async fn link(
    rt: &Rc<Rt>,
    idx: usize,
    b: &Bridge,
    remote: &Remote,
    tls: Option<Arc<rustls::ClientConfig>>,
    was_up: &mut bool,
) -> Result<(), String> {
    let (host, port) = match &b.http_proxy {
        Some((h, p, _)) => (h.as_str(), *p),
        None => (remote.host.as_str(), remote.port),
    };
    let addr = resolve(host, port).await?;
    let tcp = within(CONNECT_TIMEOUT, async {
        TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))
    })
    .await?;
    let _ = tcp.set_nodelay(true);
    let mut io = Wire::new(tcp);
    let setup = async {
        if let Some((_, _, auth)) = &b.http_proxy {
            io.proxy_connect(&remote.authority(), auth.as_deref())
                .await?;
        }
        if remote.scheme.tls() {
            let cfg = tls.ok_or("no TLS configuration")?;
            let name = b
                .tls
                .as_ref()
                .and_then(|t| t.server_name.clone())
                .unwrap_or_else(|| remote.host.clone());
            io.start_tls(cfg, &name).await?;
        }
        if remote.scheme.ws() {
            io.ws_upgrade(remote, &b.http_headers).await?;
        }
        io.mqtt = true;
        io.send(&connect_packet(b), b.protocol);
        io.flush().await?;
        let connack = io.next_packet(b.protocol).await?;
        Ok::<_, String>(connack)
    };
    let connack = within(CONNECT_TIMEOUT, setup).await?;
    let limits = check_connack(b, connack)?;
    subscribe_in(&mut io, b);
    let conn = rt.shard.new_conn(addr);
    if !rt.shard.bridge_attach(idx, &conn, &limits) {
        return Err("the bridge has no session on this shard".into());
    }
    *was_up = true;
    info!(bridge = %b.name, address = %remote, "bridge connected");
    let r = pump(rt, idx, b, &mut io, &conn).await;
    let why = match &r {
        Ok(()) => CloseReason::Shutdown,
        Err(e) => CloseReason::Protocol(e.clone()),
    };
    rt.shard.bridge_detach(idx, &conn, &why);
    if r.is_ok() {
        // Shutdown: a normal DISCONNECT (the remote drops no will).
        let d = Packet::Disconnect(Disconnect {
            reason: 0,
            properties: Properties::default(),
        });
        io.send(&d, b.protocol);
        let _ = within(Duration::from_millis(500), io.flush()).await;
    }
    r
}

/// `f`, or an error once `d` has passed.
async fn within<T>(d: Duration, f: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    futures_lite::future::or(f, async {
        glommio::timer::sleep(d).await;
        Err(format!("timed out after {} ms", d.as_millis()))
    })
    .await
}

fn connect_packet(b: &Bridge) -> Packet {
    let mut properties = Properties::default();
    if b.protocol.is_v5() {
        if !b.clean_start {
            properties.push(Property::SessionExpiryInterval(u32::MAX));
        }
        // No topic aliases towards us: the topics of the remote's
        // messages are mapped before anything else looks at them.
        properties.push(Property::TopicAliasMaximum(0));
    }
    Packet::Connect(Box::new(Connect {
        protocol: b.protocol,
        clean_start: b.clean_start,
        keep_alive: b.keep_alive,
        client_id: ByteStr::from(b.client_id.clone()),
        will: None,
        username: b.username.clone().map(ByteStr::from),
        password: b
            .password
            .clone()
            .map(|p| bytes::Bytes::from(p.into_bytes())),
        properties,
        // 3.x: Mosquitto's try_private (it sends us nothing we sent it).
        bridge: !b.protocol.is_v5(),
    }))
}

fn check_connack(b: &Bridge, p: Packet) -> Result<RemoteLimits, String> {
    let Packet::ConnAck(ConnAck {
        code, properties, ..
    }) = p
    else {
        return Err(format!("{} instead of CONNACK", packet_name(&p)));
    };
    if code != 0 {
        let why = properties
            .reason_string()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        return Err(format!("refused by the remote: code {code:#04x}{why}"));
    }
    Ok(RemoteLimits {
        protocol: b.protocol,
        receive_maximum: properties.receive_maximum().unwrap_or(u16::MAX),
        maximum_packet_size: properties.maximum_packet_size().unwrap_or(0),
        topic_alias_maximum: properties.topic_alias_maximum().unwrap_or(0),
    })
}

/// SUBSCRIBE to the in rules' remote filters (no local: the remote does
/// not send back what this bridge published there).
fn subscribe_in(io: &mut Wire, b: &Bridge) {
    let filters: Vec<(ByteStr, SubOptions)> = b
        .rules
        .iter()
        .filter(|r| r.inbound())
        .map(|r| {
            let opts = SubOptions {
                qos: r.qos,
                no_local: true,
                retain_as_published: true,
                retain_handling: 0,
            };
            (ByteStr::from(r.remote_filter.clone()), opts)
        })
        .collect();
    if filters.is_empty() {
        return;
    }
    let s = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters,
        properties: Properties::default(),
    });
    io.send(&s, b.protocol);
}

enum Ev {
    Input,
    Output,
    Tick,
}

/// Moves packets both ways until the link ends (Ok: shutdown).
async fn pump(
    rt: &Rc<Rt>,
    idx: usize,
    b: &Bridge,
    io: &mut Wire,
    conn: &Rc<Conn>,
) -> Result<(), String> {
    let shard = &rt.shard;
    let ka = Duration::from_secs(u64::from(b.keep_alive));
    let mut last_heard = Instant::now();
    let mut last_sent = Instant::now();
    let mut ping_out = false;
    let mut tick = Box::pin(glommio::timer::sleep(Duration::from_secs(1)));
    let max = shard.cfg.max_packet_size;
    loop {
        if rt.shutdown.load(Ordering::Relaxed) {
            return Ok(());
        }
        if let Some(why) = conn.close_reason() {
            return match why {
                CloseReason::Shutdown => Ok(()),
                other => Err(other.description()),
            };
        }
        // The remote's packets.
        while let Some(p) = mqtt::decode(&mut io.inbuf, b.protocol, max)
            .map_err(|e| format!("from the remote: {e}"))?
        {
            last_heard = Instant::now();
            match p {
                Packet::PingResp => ping_out = false,
                Packet::SubAck(s) => {
                    for (code, r) in s.codes.iter().zip(b.rules.iter().filter(|r| r.inbound())) {
                        if *code >= 0x80 {
                            warn!(bridge = %b.name, filter = %r.remote_filter, code = format!("{code:#04x}"), "the remote refused a subscription");
                        }
                    }
                }
                Packet::UnsubAck(_) => {}
                Packet::Disconnect(d) => {
                    let why = d
                        .properties
                        .reason_string()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default();
                    return Err(format!("the remote disconnected: {:#04x}{why}", d.reason));
                }
                p => match shard.bridge_packet(idx, conn, p) {
                    Flow::Continue | Flow::Pause(_) => {}
                    Flow::Close(why) => return Err(why.description()),
                    Flow::Handoff(_) => return Err("handoff on a bridge link".into()),
                },
            }
        }
        // The session's output, once durable.
        if io.out_len() < OUT_HIGH && !conn.out.borrow().is_empty() && !shard.gated(conn) {
            io.send_queue(conn);
            last_sent = Instant::now();
        }
        let ev = std::future::poll_fn(|cx| {
            conn.set_waker(cx.waker());
            if let Poll::Ready(Err(e)) = io.poll_write(cx) {
                return Poll::Ready(Err(e));
            }
            match io.poll_fill(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(Ok(Ev::Input)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
            if conn.is_closing() {
                return Poll::Ready(Ok(Ev::Output));
            }
            if !conn.out.borrow().is_empty() && io.out_len() < OUT_HIGH {
                if !shard.gated(conn) {
                    return Poll::Ready(Ok(Ev::Output));
                }
                shard.gate_waiters.borrow_mut().push(cx.waker().clone());
            }
            if tick.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(Ev::Tick));
            }
            Poll::Pending
        })
        .await?;
        if let Ev::Tick = ev {
            tick = Box::pin(glommio::timer::sleep(Duration::from_secs(1)));
            if ka.is_zero() {
                continue;
            }
            let now = Instant::now();
            if now.duration_since(last_heard) > ka + ka / 2 {
                return Err("keep-alive: the remote is silent".into());
            }
            if !ping_out && now.duration_since(last_sent) >= ka {
                io.send(&Packet::PingReq, b.protocol);
                ping_out = true;
                last_sent = now;
            }
        }
    }
}

/// The layers between the socket and MQTT, client side.
struct Wire {
    tcp: TcpStream,
    tls: Option<Box<rustls::ClientConnection>>,
    /// WebSocket frames from the server, once upgraded.
    ws: Option<FrameDecoder>,
    /// Bytes above TLS, not yet taken by a layer above.
    raw: BytesMut,
    /// MQTT bytes from the remote.
    inbuf: BytesMut,
    /// Handshakes are done: what arrives is MQTT (framed, if WebSocket).
    mqtt: bool,
    /// Bytes for the socket, and how many of them are written.
    out: Vec<u8>,
    written: usize,
    chunk: Box<[u8; 16 * 1024]>,
    /// TLS refused plaintext: the link must end.
    broken: bool,
}

impl Wire {
    fn new(tcp: TcpStream) -> Wire {
        Wire {
            tcp,
            tls: None,
            ws: None,
            raw: BytesMut::new(),
            inbuf: BytesMut::new(),
            mqtt: false,
            out: Vec::new(),
            written: 0,
            chunk: Box::new([0; 16 * 1024]),
            broken: false,
        }
    }

    fn out_len(&self) -> usize {
        self.out.len() - self.written
    }

    /// Queues bytes of the layer above the socket: WebSocket-framed if
    /// upgraded, then encrypted if TLS.
    fn put(&mut self, data: &[u8]) {
        if self.ws.is_some() && self.mqtt {
            let frame = ws::frame::client_frame(ws::frame::OP_BINARY, true, data, random());
            self.put_tls(&frame);
        } else {
            self.put_tls(data);
        }
    }

    fn put_tls(&mut self, data: &[u8]) {
        match &mut self.tls {
            Some(t) => {
                // rustls buffers at most 64 KiB of records: encrypt in
                // pieces, moving the records out after each.
                let mut rest = data;
                while !rest.is_empty() {
                    let n = t.writer().write(rest).unwrap_or(0);
                    rest = &rest[n..];
                    while t.wants_write() {
                        if t.write_tls(&mut self.out).is_err() {
                            break;
                        }
                    }
                    if n == 0 {
                        // Cannot happen with the buffer just emptied; if it
                        // does, the link is broken: the caller sees it.
                        self.broken = true;
                        break;
                    }
                }
            }
            None => self.out.extend_from_slice(data),
        }
    }

    fn drain_tls(&mut self) {
        if let Some(t) = &mut self.tls {
            while t.wants_write() {
                if t.write_tls(&mut self.out).is_err() {
                    break;
                }
            }
        }
    }

    fn send(&mut self, p: &Packet, protocol: Protocol) {
        let mut b = BytesMut::new();
        mqtt::encode(p, protocol, &mut b);
        self.put(&b);
    }

    /// Takes everything the session queued (one WebSocket frame, one TLS
    /// write).
    fn send_queue(&mut self, conn: &Conn) {
        let mut q = conn.out.borrow_mut();
        let mut data = Vec::with_capacity(q.len());
        loop {
            let mut iov = [IoSlice::new(&[]); 64];
            let n = q.iovecs(&mut iov);
            if n == 0 {
                break;
            }
            let before = data.len();
            for s in &iov[..n] {
                data.extend_from_slice(s);
            }
            q.advance(data.len() - before);
        }
        drop(q);
        self.put(&data);
    }

    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        if self.broken {
            return Poll::Ready(Err("TLS refused data".into()));
        }
        while self.written < self.out.len() {
            match Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err("the remote closed".into())),
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(format!("write: {e}"))),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.out.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    async fn flush(&mut self) -> Result<(), String> {
        let pending = &self.out[self.written..];
        self.tcp
            .write_all(pending)
            .await
            .map_err(|e| format!("write: {e}"))?;
        self.out.clear();
        self.written = 0;
        Ok(())
    }

    /// One read from the socket, through the layers. Ready(Ok) when bytes
    /// arrived (perhaps not a whole packet).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        let n = match Pin::new(&mut self.tcp).poll_read(cx, &mut self.chunk[..]) {
            Poll::Ready(Ok(0)) => {
                return Poll::Ready(Err("the remote closed the connection".into()))
            }
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(format!("read: {e}"))),
            Poll::Pending => return Poll::Pending,
        };
        Poll::Ready(self.ingest(n))
    }

    async fn read_more(&mut self) -> Result<(), String> {
        let n = self
            .tcp
            .read(&mut self.chunk[..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the remote closed the connection".into());
        }
        self.ingest(n)
    }

    /// `n` bytes of `chunk` arrived: decrypt, unframe, hand to MQTT.
    fn ingest(&mut self, n: usize) -> Result<(), String> {
        match &mut self.tls {
            Some(t) => {
                let mut src = &self.chunk[..n];
                while !src.is_empty() {
                    t.read_tls(&mut src).map_err(|e| format!("TLS: {e}"))?;
                    t.process_new_packets().map_err(|e| format!("TLS: {e}"))?;
                    let mut plain = [0u8; 4096];
                    loop {
                        match t.reader().read(&mut plain) {
                            Ok(0) => break,
                            Ok(k) => self.raw.extend_from_slice(&plain[..k]),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(format!("TLS: {e}")),
                        }
                    }
                }
                // Alerts, key updates, handshake messages.
                self.drain_tls();
            }
            None => self.raw.extend_from_slice(&self.chunk[..n]),
        }
        if !self.mqtt {
            return Ok(());
        }
        let mut pongs = Vec::new();
        match &mut self.ws {
            None => self.inbuf.extend_from_slice(&self.raw.split()),
            Some(d) => loop {
                match d.next(&mut self.raw) {
                    Ok(None) => break,
                    Ok(Some(WsEvent::Data(b))) => self.inbuf.extend_from_slice(&b),
                    Ok(Some(WsEvent::Ping(p))) => {
                        pongs.push(ws::frame::client_frame(
                            ws::frame::OP_PONG,
                            true,
                            &p,
                            random(),
                        ));
                    }
                    Ok(Some(WsEvent::Pong)) => {}
                    Ok(Some(WsEvent::Close(code))) => {
                        return Err(format!("WebSocket closed by the remote ({code:?})"))
                    }
                    Err(e) => return Err(format!("WebSocket: {}", e.what)),
                }
            },
        }
        for p in pongs {
            self.put_tls(&p);
        }
        Ok(())
    }

    /// The next MQTT packet (during set-up).
    async fn next_packet(&mut self, protocol: Protocol) -> Result<Packet, String> {
        loop {
            if let Some(p) = mqtt::decode(&mut self.inbuf, protocol, 1 << 20)
                .map_err(|e| format!("from the remote: {e}"))?
            {
                return Ok(p);
            }
            self.read_more().await?;
        }
    }

    /// HTTP CONNECT through a proxy to `authority`.
    async fn proxy_connect(&mut self, authority: &str, auth: Option<&str>) -> Result<(), String> {
        let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(a) = auth {
            req.push_str(&format!("Proxy-Authorization: {a}\r\n"));
        }
        req.push_str("\r\n");
        self.put(req.as_bytes());
        self.flush().await?;
        loop {
            let mut headers = [httparse_header(); 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.raw) {
                Ok(httparse::Status::Complete(n)) => {
                    let code = resp.code.unwrap_or(0);
                    if code / 100 != 2 {
                        return Err(format!(
                            "proxy answered {code} {}",
                            resp.reason.unwrap_or("")
                        ));
                    }
                    self.raw.advance(n);
                    return Ok(());
                }
                Ok(httparse::Status::Partial) if self.raw.len() < 16 * 1024 => {}
                Ok(httparse::Status::Partial) => return Err("proxy response too large".into()),
                Err(e) => return Err(format!("proxy: invalid response: {e}")),
            }
            self.read_more().await?;
        }
    }

    async fn start_tls(
        &mut self,
        cfg: Arc<rustls::ClientConfig>,
        name: &str,
    ) -> Result<(), String> {
        let server = rustls_pki_types::ServerName::try_from(name.to_string())
            .map_err(|e| format!("TLS server name {name}: {e}"))?;
        let c = rustls::ClientConnection::new(cfg, server).map_err(|e| format!("TLS: {e}"))?;
        // Bytes the proxy sent after its answer belong to TLS.
        let early = self.raw.split();
        self.tls = Some(Box::new(c));
        if early.len() > self.chunk.len() {
            return Err("the proxy sent data before TLS started".into());
        }
        if !early.is_empty() {
            self.chunk[..early.len()].copy_from_slice(&early);
            self.ingest(early.len())?;
        }
        self.drain_tls();
        loop {
            self.flush().await?;
            let handshaking = self.tls.as_ref().is_some_and(|t| t.is_handshaking());
            if !handshaking {
                return Ok(());
            }
            self.read_more().await?;
        }
    }

    async fn ws_upgrade(
        &mut self,
        remote: &Remote,
        headers: &[(String, String)],
    ) -> Result<(), String> {
        let key = ws::client::key_from(random());
        let req = ws::client::upgrade_request(&remote.authority(), &remote.path, &key, headers);
        self.put(&req);
        self.flush().await?;
        loop {
            match ws::client::upgrade_response(&self.raw, &key) {
                ws::client::Answer::Upgraded { consumed } => {
                    self.raw.advance(consumed);
                    self.ws = Some(FrameDecoder::for_client(u64::from(u32::MAX)));
                    return Ok(());
                }
                ws::client::Answer::Refused(why) => {
                    return Err(format!("WebSocket upgrade: {why}"))
                }
                ws::client::Answer::NeedMore => self.read_more().await?,
            }
        }
    }
}

fn httparse_header() -> httparse::Header<'static> {
    httparse::EMPTY_HEADER
}

/// Starts the links of the bridges homed on this shard.
pub(crate) fn start(rt: &Rc<Rt>, tls: &[Option<Arc<rustls::ClientConfig>>]) {
    let st = rt.shard.st.borrow();
    for (idx, sid) in st.bridge_sids.iter().enumerate() {
        if sid.is_some() {
            let cfg = tls.get(idx).cloned().flatten();
            glommio::spawn_local(run(rt.clone(), idx, cfg)).detach();
        }
    }
}
