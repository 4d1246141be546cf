//! One client connection: a single task that connects (TCP, optional TLS
//! handshake, optional WebSocket upgrade), sends CONNECT and SUBSCRIBE,
//! then publishes on its schedule and/or counts deliveries, and finally
//! disconnects.
//!
//! Memory per connection (the `conn` scenario holds many idle ones): the
//! task owns the glommio stream, an incomplete packet if any (`partial`,
//! unallocated between packets), an output buffer that is released once
//! written, and a few integers. No read buffer while idle: reads borrow the
//! executor's buffer only during `poll_read`. No timer: the executor's tick
//! wakes the task at its next deadline. Publisher and subscriber state is
//! boxed and exists only for those roles, and so is the TLS state (`tls`)
//! for TLS clients.
//!
//! Layers: MQTT bytes -> (`ws`: WebSocket frames) -> `out` -> (`tls`:
//! records in `TlsState::cipher`) -> socket; reads go the other way, TLS
//! plaintext through the executor's `pbuf`.

use crate::cli::Transport;
use crate::payload::{Header, HEADER_LEN};
use crate::plan::{self, Role, Scenario};
use crate::runtime::{now_ns, Exec, CLOSE, READ_CHUNK, RUN};
use crate::stats::Tracker;
use crate::tls::TlsState;
use crate::ws;
use bytes::{Buf, BytesMut};
use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use tarta_proto::mqtt::{
    self, Ack, Connect, Packet, Properties, Property, Protocol, Publish, QoS, SubOptions, Subscribe,
};
use tarta_proto::ByteStr;

/// Reads that make progress before the task yields to others.
const BUDGET: u32 = 16;
/// Largest packet accepted from the broker.
const MAX_PACKET: u32 = 64 * 1024 * 1024;
/// A publisher stops generating when this much is waiting to be written.
const OUT_HIGH: usize = 256 * 1024;
/// Seconds to flush DISCONNECT when closing.
const CLOSE_MS: u64 = 2000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// TCP connecting / TLS handshake / waiting for the WebSocket 101.
    Connecting,
    ConnAck,
    SubAck,
    Ready,
    Closing,
}

/// Why a connection ended early; the text is the key in the report.
fn io_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "connection refused".into(),
        Some(libc::ECONNRESET) => "connection reset by broker".into(),
        Some(libc::EPIPE) => "broken pipe (broker closed)".into(),
        Some(libc::ETIMEDOUT) => "TCP timed out".into(),
        Some(libc::EADDRNOTAVAIL) => {
            "no local address/port left (EADDRNOTAVAIL): use --source-ips".into()
        }
        Some(libc::EMFILE) | Some(libc::ENFILE) => {
            "too many open files (EMFILE): use --procs".into()
        }
        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => "broker unreachable".into(),
        _ => format!("I/O error: {}", e.kind()),
    }
}

struct WsState {
    nonce: [u8; 16],
    upgraded: bool,
    /// The HTTP response head while it is incomplete.
    head: BytesMut,
    parser: ws::FrameParser,
    /// MQTT bytes to wrap in the next frame.
    pending: BytesMut,
    events: Vec<ws::Event>,
}

struct Publisher {
    id: u32,
    topic: ByteStr,
    /// Next sequence number (= messages sent).
    seq: u64,
    /// Oldest sequence number not yet acknowledged (QoS 1/2).
    base: u64,
    /// Per slot (seq % window): 0 free, 1 awaiting PUBACK/PUBREC,
    /// 2 awaiting PUBCOMP.
    slots: Vec<u8>,
    inflight: u64,
    start_ns: u64,
    last_progress_ms: u64,
    done: bool,
}

struct Subscriber {
    id: u32,
    /// First publisher id `trackers[0]` stands for.
    first: u32,
    trackers: Vec<Tracker>,
    group: bool,
}

pub struct Client {
    stream: TcpStream,
    /// An incomplete packet (empty and unallocated between packets).
    partial: BytesMut,
    out: BytesMut,
    ws: Option<Box<WsState>>,
    tls: Option<Box<TlsState>>,
    k: u64,
    role: Role,
    st: St,
    protocol: Protocol,
    qos: QoS,
    tcp_up: bool,
    started_ns: u64,
    deadline_ms: u64,
    registered_ms: u64,
    /// At most 65,535,000 (u32 keeps `Client` as small as before TLS).
    keepalive_ms: u32,
    last_tx_ms: u64,
    ping_sent_ms: u64,
    window: u64,
    publ: Option<Box<Publisher>>,
    sub: Option<Box<Subscriber>>,
}

/// The connection task.
pub async fn run(ex: Rc<Exec>, k: u64) {
    let mut c = match Client::start(&ex, k) {
        Ok(c) => c,
        Err(why) => {
            ex.local.borrow_mut().fail_setup(why);
            ex.connecting.set(ex.connecting.get() - 1);
            ex.active.set(ex.active.get() - 1);
            return;
        }
    };
    poll_fn(|cx| c.poll(cx, &ex)).await;
}

fn connect_socket(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol as P, SockAddr, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(P::TCP))?;
    s.set_nonblocking(true)?;
    s.set_nodelay(true)?;
    if let Some(ip) = source {
        // Let connect() pick the port per 4-tuple, not bind() per address.
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on our own socket with a valid int option.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        s.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    match s.connect(&SockAddr::from(addr)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(s)
}

/// Writes as much of `buf` as the socket takes; whether anything went.
fn write_out(
    stream: &mut TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Result<bool, String> {
    let mut wrote = false;
    while !buf.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Err("write returned 0 (broker gone)".into()),
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                wrote = true;
            }
            Poll::Ready(Err(e)) => return Err(io_reason(&e)),
            Poll::Pending => break,
        }
    }
    Ok(wrote)
}

impl Client {
    fn start(ex: &Exec, k: u64) -> Result<Client, String> {
        let s = &ex.settings;
        let started_ns = now_ns();
        {
            let mut l = ex.local.borrow_mut();
            if l.first_connect_ns == 0 {
                l.first_connect_ns = started_ns;
            }
        }
        let source = if s.source_ips.is_empty() {
            None
        } else {
            Some(IpAddr::V4(
                s.source_ips[(k % s.source_ips.len() as u64) as usize],
            ))
        };
        let tls = match &ex.shared.tls {
            Some(c) => Some(Box::new(TlsState::new(c)?)),
            None => None,
        };
        let role = s.scenario.role(k);
        let addr = match (role, s.sub_addr) {
            (Role::Sub { .. }, Some(a)) => a,
            _ => s.addr,
        };
        let sock = connect_socket(addr, source).map_err(|e| io_reason(&e))?;
        // SAFETY: a connecting TCP socket we own; glommio owns it from here.
        let stream = unsafe { TcpStream::from_raw_fd(sock.into_raw_fd()) };
        let protocol = if s.v5 { Protocol::V5 } else { Protocol::V311 };
        let now_ms = started_ns / 1_000_000;
        let mut c = Client {
            stream,
            partial: BytesMut::new(),
            out: BytesMut::new(),
            ws: None,
            tls,
            k,
            role,
            st: St::Connecting,
            protocol,
            qos: QoS::from_u8(s.qos).unwrap_or_default(),
            tcp_up: false,
            started_ns,
            deadline_ms: now_ms + (s.connect_timeout_s * 1000.0) as u64,
            registered_ms: 0,
            keepalive_ms: u32::from(s.keepalive) * 1000,
            last_tx_ms: now_ms,
            ping_sent_ms: 0,
            window: u64::from(s.inflight.max(1)),
            publ: None,
            sub: None,
        };
        match s.transport {
            Transport::Tcp => c.queue_connect(ex),
            Transport::Ws => {
                let r = ex.random().to_le_bytes();
                let r2 = ex.random().to_le_bytes();
                let mut nonce = [0u8; 16];
                nonce[..8].copy_from_slice(&r);
                nonce[8..].copy_from_slice(&r2);
                c.out
                    .extend_from_slice(ws::request(&s.host, s.port, &s.ws_path, &nonce).as_bytes());
                c.ws = Some(Box::new(WsState {
                    nonce,
                    upgraded: false,
                    head: BytesMut::new(),
                    parser: ws::FrameParser::default(),
                    pending: BytesMut::new(),
                    events: Vec::new(),
                }));
            }
        }
        Ok(c)
    }

    /// Where MQTT bytes go: straight to the socket's buffer, or into the
    /// next WebSocket frame.
    fn tx(&mut self) -> &mut BytesMut {
        match &mut self.ws {
            Some(w) => &mut w.pending,
            None => &mut self.out,
        }
    }

    fn queue(&mut self, p: &Packet) {
        let proto = self.protocol;
        mqtt::encode(p, proto, self.tx());
    }

    fn queue_connect(&mut self, ex: &Exec) {
        let s = &ex.settings;
        let mut properties = Properties::new();
        if s.v5 && !s.clean_session {
            // Keep the session for as long as the run may take.
            properties.push(Property::SessionExpiryInterval(3600));
        }
        let c = Connect {
            protocol: self.protocol,
            clean_start: s.clean_session,
            keep_alive: s.keepalive,
            client_id: ByteStr::from(plan::client_id(s.run_id, self.k)),
            will: None,
            username: None,
            password: None,
            properties,
            bridge: false,
        };
        self.queue(&Packet::Connect(Box::new(c)));
        self.st = St::ConnAck;
    }

    /// Ends the task: records what it did.
    fn finish(&mut self, ex: &Exec, failure: Option<String>) {
        let mut l = ex.local.borrow_mut();
        match (failure, self.st) {
            (Some(why), St::Connecting | St::ConnAck | St::SubAck) => {
                l.fail_setup(why);
                ex.connecting.set(ex.connecting.get() - 1);
            }
            (Some(why), _) => l.fail_run(why),
            (None, _) => {}
        }
        if let Some(p) = &self.publ {
            l.sent_by_pub.push((p.id, p.seq));
            l.inflight -= p.inflight;
        }
        if let Some(sub) = &self.sub {
            for t in &sub.trackers {
                t.add_to(&mut l.delivery);
            }
        }
        self.publ = None;
        self.sub = None;
        self.st = St::Closing;
        ex.active.set(ex.active.get() - 1);
    }

    fn poll(&mut self, cx: &mut Context<'_>, ex: &Exec) -> Poll<()> {
        match self.step(cx, ex) {
            Ok(true) => {
                self.finish(ex, None);
                Poll::Ready(())
            }
            Ok(false) => Poll::Pending,
            Err(why) => {
                self.last_words(cx);
                self.finish(ex, Some(why));
                Poll::Ready(())
            }
        }
    }

    /// One round of work. `Ok(true)`: closed cleanly; `Err`: failed.
    fn step(&mut self, cx: &mut Context<'_>, ex: &Exec) -> Result<bool, String> {
        let now = now_ns();
        let now_ms = now / 1_000_000;
        if ex.phase() == CLOSE && self.st != St::Closing {
            if self.st != St::Ready {
                return Err("setup not finished when the run stopped".into());
            }
            if self.ws.as_ref().is_some_and(|w| !w.upgraded) {
                return Ok(true);
            }
            self.queue(&Packet::Disconnect(Default::default()));
            self.st = St::Closing;
            self.deadline_ms = now_ms + CLOSE_MS;
        }
        if !self.tcp_up {
            // The first write completes the TCP connect.
            self.flush(cx, now_ms)?;
        }
        let mut exhausted = false;
        if self.tcp_up && self.st != St::Closing {
            exhausted = true;
            for _ in 0..BUDGET {
                match self.read(cx, ex) {
                    Poll::Pending => {
                        exhausted = false;
                        break;
                    }
                    Poll::Ready(Ok(d)) if d.is_empty() => {
                        return Err(match self.st {
                            _ if self.tls_handshaking() => {
                                "closed by broker during TLS handshake".into()
                            }
                            St::Connecting if self.ws.is_some() => {
                                "closed by broker during WebSocket upgrade".into()
                            }
                            St::Connecting | St::ConnAck => {
                                "closed by broker before CONNACK".into()
                            }
                            St::SubAck => "closed by broker before SUBACK".into(),
                            _ => "closed by broker".into(),
                        });
                    }
                    Poll::Ready(Ok(d)) => self.on_bytes(ex, d, now)?,
                    Poll::Ready(Err(why)) => return Err(why),
                }
            }
        }
        // Deadlines of the setup and closing phases.
        if self.st != St::Ready && now_ms >= self.deadline_ms {
            return match self.st {
                St::Closing => Ok(true),
                St::Connecting if !self.tcp_up => Err("TCP connect timeout".into()),
                St::Connecting | St::ConnAck if self.tcp_up && self.tls_handshaking() => {
                    Err("no TLS handshake (timeout)".into())
                }
                St::Connecting => Err("no WebSocket upgrade response (timeout)".into()),
                St::ConnAck => Err(if self.tcp_up {
                    "no CONNACK (timeout)".into()
                } else {
                    "TCP connect timeout".into()
                }),
                St::SubAck => Err("no SUBACK (timeout)".into()),
                St::Ready => Ok(false),
            };
        }
        if self.st == St::Ready {
            let keepalive_ms = u64::from(self.keepalive_ms);
            if keepalive_ms > 0 {
                if self.ping_sent_ms > 0 {
                    if now_ms > self.ping_sent_ms + keepalive_ms.max(5000) {
                        return Err("no PINGRESP (broker stopped responding)".into());
                    }
                } else if now_ms >= self.last_tx_ms + keepalive_ms * 3 / 4 {
                    self.queue(&Packet::PingReq);
                    self.ping_sent_ms = now_ms;
                }
            }
            if ex.phase() == RUN && self.publ.is_some() {
                self.publish_due(ex, now)?;
            }
        }
        let wrote = self.flush(cx, now_ms)?;
        if self.st == St::Closing
            && self.out.is_empty()
            && self.tls.as_ref().is_none_or(|t| t.idle())
        {
            return Ok(true);
        }
        let more = self.publ.as_ref().is_some_and(|p| {
            !p.done && ex.settings.rate == 0.0 && self.out.is_empty() && self.can_send(p)
        });
        if exhausted || (wrote && more) {
            cx.waker().wake_by_ref();
        }
        self.arm(cx, ex, now, now_ms);
        Ok(false)
    }

    fn tls_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    fn can_send(&self, p: &Publisher) -> bool {
        self.qos() == QoS::AtMostOnce || p.seq - p.base < self.window
    }

    fn qos(&self) -> QoS {
        self.qos
    }

    /// Registers the next deadline with the executor's tick.
    fn arm(&mut self, cx: &Context<'_>, ex: &Exec, now: u64, now_ms: u64) {
        let mut d = now_ms + 5000;
        if self.st != St::Ready {
            d = d.min(self.deadline_ms);
        } else {
            let keepalive_ms = u64::from(self.keepalive_ms);
            if keepalive_ms > 0 {
                d = d.min(if self.ping_sent_ms > 0 {
                    self.ping_sent_ms + keepalive_ms.max(5000) + 1
                } else {
                    self.last_tx_ms + keepalive_ms * 3 / 4
                });
            }
            if let Some(p) = &self.publ {
                if ex.phase() == RUN && !p.done {
                    d = d.min(ex.pub_end_ns.get() / 1_000_000 + 1);
                    let rate = ex.settings.rate;
                    if rate > 0.0 && self.can_send(p) {
                        let next = p.start_ns + (p.seq as f64 * 1e9 / rate) as u64;
                        d = d.min(next.max(now) / 1_000_000);
                    }
                }
                if p.inflight > 0 {
                    d = d.min(p.last_progress_ms + (ex.settings.ack_timeout_s * 1000.0) as u64 + 1);
                }
            }
        }
        let d = d.max(now_ms + 1);
        if self.registered_ms <= now_ms || d < self.registered_ms {
            ex.register(d, cx.waker());
            self.registered_ms = d;
        }
    }

    /// Reads into the executor's buffer and splits off what was read (with
    /// TLS: its plaintext). Empty: the broker closed the connection.
    fn read(&mut self, cx: &mut Context<'_>, ex: &Exec) -> Poll<Result<BytesMut, String>> {
        if self.tls.is_some() {
            return self.read_tls(cx, ex);
        }
        let mut rb = ex.rbuf.borrow_mut();
        if rb.len() < 4096 {
            *rb = BytesMut::zeroed(READ_CHUNK);
        }
        match Pin::new(&mut self.stream).poll_read(cx, &mut rb[..]) {
            Poll::Ready(Ok(n)) => Poll::Ready(Ok(rb.split_to(n))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(io_reason(&e))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// TLS: reads records into the executor's buffer (reused at once: TLS
    /// keeps what it needs) until they yield plaintext, which is split off
    /// the executor's plaintext buffer.
    fn read_tls(&mut self, cx: &mut Context<'_>, ex: &Exec) -> Poll<Result<BytesMut, String>> {
        let Some(t) = &mut self.tls else {
            return Poll::Ready(Err("no TLS state".into()));
        };
        loop {
            if t.peer_closed {
                return Poll::Ready(Ok(BytesMut::new()));
            }
            let mut rb = ex.rbuf.borrow_mut();
            if rb.len() < 4096 {
                *rb = BytesMut::zeroed(READ_CHUNK);
            }
            let n = match Pin::new(&mut self.stream).poll_read(cx, &mut rb[..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(BytesMut::new())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(io_reason(&e))),
                Poll::Pending => return Poll::Pending,
            };
            let mut pb = ex.pbuf.borrow_mut();
            if pb.capacity() < 4096 {
                // Plaintext of one read fits: at most the read plus one
                // partial record rustls kept from the previous read.
                pb.reserve(READ_CHUNK * 2);
            }
            if let Err(why) = t.feed(&rb[..n], &mut pb) {
                pb.clear();
                return Poll::Ready(Err(why));
            }
            if !pb.is_empty() {
                return Poll::Ready(Ok(pb.split()));
            }
            // Handshake records or a partial record: read on.
        }
    }

    /// Writes as much as the socket takes. Returns whether anything was
    /// written.
    fn flush(&mut self, cx: &mut Context<'_>, now_ms: u64) -> Result<bool, String> {
        if let Some(w) = &mut self.ws {
            if w.upgraded && !w.pending.is_empty() {
                let mask = (now_ms as u32 ^ (self.k as u32).rotate_left(13)).to_le_bytes();
                ws::encode_frame(ws::OP_BINARY, &w.pending, mask, &mut self.out);
                w.pending.clear();
                if w.pending.capacity() > 64 * 1024 {
                    w.pending = BytesMut::new();
                }
            }
        }
        if self.tls.is_some() {
            return self.flush_tls(cx, now_ms);
        }
        let wrote = write_out(&mut self.stream, cx, &mut self.out)?;
        if wrote {
            self.tcp_up = true;
            self.last_tx_ms = now_ms;
        }
        if self.out.is_empty() && self.publ.is_none() && self.out.capacity() > 0 {
            // An idle connection keeps no buffer.
            self.out = BytesMut::new();
        }
        Ok(wrote)
    }

    /// TLS: `out` -> records -> socket, while the socket takes them.
    fn flush_tls(&mut self, cx: &mut Context<'_>, now_ms: u64) -> Result<bool, String> {
        let Some(t) = &mut self.tls else {
            return Ok(false);
        };
        let closing = self.st == St::Closing;
        let mut wrote = false;
        loop {
            t.encrypt(&mut self.out, OUT_HIGH, closing);
            let before = t.cipher.len();
            wrote |= write_out(&mut self.stream, cx, &mut t.cipher)?;
            // Done when the socket is full or everything went.
            if !t.cipher.is_empty() || self.out.is_empty() || t.cipher.len() == before {
                break;
            }
        }
        if wrote {
            self.tcp_up = true;
            self.last_tx_ms = now_ms;
        }
        if self.publ.is_none() {
            // An idle connection keeps no buffer.
            if t.cipher.is_empty() && t.cipher.capacity() > 0 {
                t.cipher = BytesMut::new();
            }
            if self.out.is_empty() && self.out.capacity() > 0 {
                self.out = BytesMut::new();
            }
        }
        Ok(wrote)
    }

    /// TLS: after a failure, hands the socket what is ready (an alert
    /// telling the broker why), without waiting.
    fn last_words(&mut self, cx: &mut Context<'_>) {
        if let Some(t) = &mut self.tls {
            let _ = write_out(&mut self.stream, cx, &mut t.cipher);
        }
    }

    /// Handles bytes read from the socket (WebSocket frames or MQTT).
    fn on_bytes(&mut self, ex: &Exec, mut data: BytesMut, now: u64) -> Result<(), String> {
        if let Some(w) = &mut self.ws {
            if !w.upgraded {
                w.head.extend_from_slice(&data);
                match ws::check_response(&w.head, &w.nonce) {
                    ws::Handshake::Incomplete => return Ok(()),
                    ws::Handshake::Refused(why) => {
                        return Err(format!("WebSocket upgrade refused: {why}"))
                    }
                    ws::Handshake::Accepted(n) => {
                        w.upgraded = true;
                        let head = std::mem::take(&mut w.head);
                        data = BytesMut::from(&head[n..]);
                        self.queue_connect(ex);
                        if data.is_empty() {
                            return Ok(());
                        }
                    }
                }
            }
            // Unwrap frames: their payload continues the MQTT stream.
            let Some(w) = &mut self.ws else {
                return Ok(());
            };
            w.parser.feed(&data, &mut self.partial, &mut w.events);
            let events = std::mem::take(&mut w.events);
            for e in events {
                match e {
                    ws::Event::Ping(p) => {
                        let mask = (ex.random() as u32).to_le_bytes();
                        ws::encode_frame(ws::OP_PONG, &p, mask, &mut self.out);
                    }
                    ws::Event::Close => return Err("WebSocket closed by broker".into()),
                    ws::Event::Error(why) => {
                        return Err(format!("bad WebSocket frame from broker: {why}"))
                    }
                }
            }
            let mut buf = std::mem::take(&mut self.partial);
            let r = self.decode_all(ex, &mut buf, now);
            self.partial = if buf.is_empty() { BytesMut::new() } else { buf };
            return r;
        }
        if self.partial.is_empty() {
            let r = self.decode_all(ex, &mut data, now);
            if !data.is_empty() {
                // Keep only the incomplete packet, not the executor's chunk.
                self.partial = BytesMut::from(&data[..]);
            }
            r
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(&data);
            let r = self.decode_all(ex, &mut buf, now);
            self.partial = if buf.is_empty() { BytesMut::new() } else { buf };
            r
        }
    }

    fn decode_all(&mut self, ex: &Exec, buf: &mut BytesMut, now: u64) -> Result<(), String> {
        loop {
            match mqtt::decode(buf, self.protocol, MAX_PACKET) {
                Ok(Some(p)) => self.on_packet(ex, p, now)?,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("undecodable packet from broker: {e:?}")),
            }
        }
    }

    fn on_packet(&mut self, ex: &Exec, p: Packet, now: u64) -> Result<(), String> {
        let now_ms = now / 1_000_000;
        match p {
            Packet::ConnAck(ca) if self.st == St::ConnAck => {
                if ca.code != 0 {
                    return Err(format!("CONNACK refused (code 0x{:02x})", ca.code));
                }
                if self.protocol.is_v5() {
                    for prop in ca.properties.iter() {
                        match prop {
                            Property::ReceiveMaximum(m) => {
                                self.window = self.window.min(u64::from(*m).max(1));
                            }
                            Property::ServerKeepAlive(k) => {
                                self.keepalive_ms = u32::from(*k) * 1000;
                            }
                            _ => {}
                        }
                    }
                }
                {
                    let mut l = ex.local.borrow_mut();
                    l.connected += 1;
                    if let Some(t) = &self.tls {
                        l.tls_handshakes += 1;
                        l.tls_resumed += u64::from(t.resumed());
                    }
                }
                match self.role {
                    Role::Sub { id } => {
                        let s = &ex.settings;
                        let filter = s.scenario.sub_filter(&ex.prefix, s.run_id, id);
                        let opts = SubOptions {
                            qos: self.qos,
                            ..Default::default()
                        };
                        self.queue(&Packet::Subscribe(Subscribe {
                            packet_id: 1,
                            filters: vec![(ByteStr::from(filter), opts)],
                            properties: Properties::new(),
                        }));
                        self.st = St::SubAck;
                        let group = matches!(s.scenario, Scenario::Shared { .. });
                        let src = s.scenario.sources_of(id);
                        self.sub = Some(Box::new(Subscriber {
                            id,
                            first: src.start,
                            trackers: if group {
                                Vec::new()
                            } else {
                                vec![Tracker::new(); src.len()]
                            },
                            group,
                        }));
                    }
                    Role::Pub { id } => {
                        let topic = ex.settings.scenario.pub_topic(&ex.prefix, id);
                        let slots = if self.qos == QoS::AtMostOnce {
                            Vec::new()
                        } else {
                            vec![0u8; self.window as usize]
                        };
                        self.publ = Some(Box::new(Publisher {
                            id,
                            topic: ByteStr::from(topic),
                            seq: 0,
                            base: 0,
                            slots,
                            inflight: 0,
                            start_ns: 0,
                            last_progress_ms: now_ms,
                            done: false,
                        }));
                        self.ready(ex, now);
                    }
                    Role::Idle => self.ready(ex, now),
                }
            }
            Packet::SubAck(sa) if self.st == St::SubAck => {
                let code = sa.codes.first().copied().unwrap_or(0x80);
                if code >= 0x80 {
                    ex.local.borrow_mut().subs_refused += 1;
                    return Err(format!("SUBACK refused (code 0x{code:02x})"));
                }
                let mut l = ex.local.borrow_mut();
                l.subs_ok += 1;
                if let Some(s) = &self.sub {
                    l.live_subs.push(s.id);
                }
                drop(l);
                self.ready(ex, now);
            }
            Packet::Publish(p) => self.on_publish(ex, p, now),
            Packet::PubAck(a) => self.on_ack(ex, a, 1, now_ms)?,
            Packet::PubRec(a) => self.on_ack(ex, a, 2, now_ms)?,
            Packet::PubComp(a) => self.on_ack(ex, a, 3, now_ms)?,
            Packet::PubRel(a) => self.queue(&Packet::PubComp(Ack {
                packet_id: a.packet_id,
                reason: 0,
                properties: Properties::new(),
            })),
            Packet::PingResp => self.ping_sent_ms = 0,
            Packet::Disconnect(d) => {
                return Err(format!(
                    "DISCONNECT from broker (reason 0x{:02x})",
                    d.reason
                ))
            }
            Packet::ConnAck(_) => return Err("unexpected CONNACK".into()),
            _ => {}
        }
        Ok(())
    }

    fn ready(&mut self, ex: &Exec, now: u64) {
        self.st = St::Ready;
        ex.connecting.set(ex.connecting.get() - 1);
        let mut l = ex.local.borrow_mut();
        l.settled += 1;
        l.connect_us.record((now - self.started_ns) / 1000);
        l.last_connected_ns = l.last_connected_ns.max(now);
    }

    /// A delivery: account it to its stream, measure its latency, ack it.
    fn on_publish(&mut self, ex: &Exec, p: Publish, now: u64) {
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.queue(&Packet::PubAck(Ack {
                packet_id: p.packet_id,
                reason: 0,
                properties: Properties::new(),
            })),
            QoS::ExactlyOnce => self.queue(&Packet::PubRec(Ack {
                packet_id: p.packet_id,
                reason: 0,
                properties: Properties::new(),
            })),
        }
        let mut l = ex.local.borrow_mut();
        let h = match Header::parse(&p.payload) {
            Some(h) if h.run == ex.settings.run_id => h,
            _ => {
                l.foreign += 1;
                return;
            }
        };
        let Some(sub) = &mut self.sub else {
            l.foreign += 1;
            return;
        };
        l.received += 1;
        if sub.group {
            if let Ok(mut g) = ex.shared.group.lock() {
                match g.get_mut(h.publisher as usize) {
                    Some(t) => t.record(h.seq),
                    None => l.foreign += 1,
                }
            }
        } else {
            match h
                .publisher
                .checked_sub(sub.first)
                .and_then(|i| sub.trackers.get_mut(i as usize))
            {
                Some(t) => t.record(h.seq),
                None => l.foreign += 1,
            }
        }
        if h.sent_ns >= ex.measure_start_ns.get() && h.sent_ns < ex.pub_end_ns.get() {
            l.received_window += 1;
            let us = now.saturating_sub(h.sent_ns) / 1000;
            l.latency.record(us);
            l.interval.record(us);
        }
    }

    /// PUBACK (1), PUBREC (2), PUBCOMP (3) for a publisher.
    fn on_ack(&mut self, ex: &Exec, a: Ack, kind: u8, now_ms: u64) -> Result<(), String> {
        let window = self.window;
        let Some(p) = &mut self.publ else {
            return Ok(());
        };
        if p.slots.is_empty() || a.packet_id == 0 {
            return Ok(());
        }
        // In-flight sequence numbers lie in [base, seq), fewer than 65535.
        let pid0 = u64::from(a.packet_id - 1);
        let seq = p.base + (pid0 + 65535 - p.base % 65535) % 65535;
        if seq >= p.seq {
            return Err(format!(
                "acknowledgement for unknown packet id {}",
                a.packet_id
            ));
        }
        let slot = (seq % window) as usize;
        let expect = if kind == 3 { 2 } else { 1 };
        if p.slots[slot] != expect {
            // A duplicate ack: ignore.
            return Ok(());
        }
        p.last_progress_ms = now_ms;
        let refused = self.protocol.is_v5() && a.reason >= 0x80;
        if kind == 2 && !refused {
            p.slots[slot] = 2;
            let id = a.packet_id;
            self.queue(&Packet::PubRel(Ack {
                packet_id: id,
                reason: 0,
                properties: Properties::new(),
            }));
            return Ok(());
        }
        p.slots[slot] = 0;
        p.inflight -= 1;
        let mut l = ex.local.borrow_mut();
        l.inflight -= 1;
        l.acked += 1;
        if refused {
            l.publish_refused += 1;
        }
        while p.base < p.seq && p.slots[(p.base % window) as usize] == 0 {
            p.base += 1;
        }
        Ok(())
    }

    /// Sends the messages due by now (or as many as the window and the
    /// output buffer allow when the rate is unlimited).
    fn publish_due(&mut self, ex: &Exec, now: u64) -> Result<(), String> {
        let window = self.window;
        let qos = self.qos;
        let protocol = self.protocol;
        let s = &ex.settings;
        let Some(p) = &mut self.publ else {
            return Ok(());
        };
        if p.done {
            return Ok(());
        }
        if now >= ex.pub_end_ns.get() {
            p.done = true;
            return Ok(());
        }
        if p.start_ns == 0 {
            // Spread publishers over the send period (golden-ratio offsets)
            // instead of having them all fire on the same tick.
            let period = if s.rate > 0.0 { 1e9 / s.rate } else { 0.0 };
            let frac = (f64::from(p.id) * 0.618_033_988_75).fract();
            p.start_ns = now + (frac * period) as u64;
        }
        if now < p.start_ns {
            return Ok(());
        }
        if p.inflight > 0
            && now / 1_000_000 > p.last_progress_ms + (s.ack_timeout_s * 1000.0) as u64
        {
            return Err(format!(
                "broker stopped acknowledging ({} publishes unacknowledged for {}s)",
                p.inflight, s.ack_timeout_s
            ));
        }
        let target = if s.rate > 0.0 {
            ((now - p.start_ns) as f64 * s.rate / 1e9) as u64 + 1
        } else {
            u64::MAX
        };
        let tx = match &mut self.ws {
            Some(w) => &mut w.pending,
            None => &mut self.out,
        };
        let mut n = 0u64;
        let mut hdr = [0u8; HEADER_LEN];
        while p.seq < target
            && (qos == QoS::AtMostOnce || p.seq - p.base < window)
            && tx.len() < OUT_HIGH
        {
            let packet_id = if qos == QoS::AtMostOnce {
                0
            } else {
                let slot = (p.seq % window) as usize;
                p.slots[slot] = 1;
                p.inflight += 1;
                (p.seq % 65535) as u16 + 1
            };
            let publish = Publish {
                dup: false,
                qos,
                retain: false,
                topic: p.topic.clone(),
                packet_id,
                properties: Properties::new(),
                payload: ex.shared.zero_payload.clone(),
            };
            mqtt::encode_publish_header(&publish, protocol, tx);
            Header {
                run: s.run_id,
                publisher: p.id,
                seq: p.seq,
                sent_ns: now,
            }
            .write(&mut hdr);
            tx.extend_from_slice(&hdr);
            tx.extend_from_slice(&ex.shared.zero_payload[HEADER_LEN..]);
            p.seq += 1;
            n += 1;
        }
        if n > 0 {
            let mut l = ex.local.borrow_mut();
            l.sent += n;
            if now >= ex.measure_start_ns.get() {
                l.sent_window += n;
            }
            if qos != QoS::AtMostOnce {
                l.inflight += n;
            }
            if p.inflight == n {
                p.last_progress_ms = now / 1_000_000;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards the per-connection footprint (the `conn` scenario holds
    /// thousands of these): the task future of an idle connection.
    #[test]
    fn connection_state_is_small() {
        let client = std::mem::size_of::<Client>();
        let stream = std::mem::size_of::<TcpStream>();
        eprintln!("Client {client} B (of which TcpStream {stream} B)");
        assert!(client <= 512, "Client is {client} B");
        // Adding TLS (one pointer) did not grow it: 120 B glommio stream
        // + 168 B (as before TLS).
        assert!(client <= stream + 168, "Client is {client} B");
        // TLS state exists only for TLS clients, behind one pointer.
        assert_eq!(std::mem::size_of::<Option<Box<TlsState>>>(), 8);
        let tls = std::mem::size_of::<TlsState>();
        eprintln!("TlsState {tls} B (boxed, TLS clients only; plus rustls's heap)");
        assert!(tls <= 2048, "TlsState is {tls} B");
    }
}
