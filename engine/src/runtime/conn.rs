//! One connection's task: read into the shard-wide buffer, decode, hand
//! packets to the broker, and write the connection's queue with vectored
//! non-blocking sends. The task runs on the shard's scheduler (`sched`),
//! whose ring wakes it when the socket is readable (or writable again).
//!
//! Memory: an idle connection holds no read buffer. A read borrows the
//! shard's buffer for one `recv(MSG_DONTWAIT)`; the bytes read are split
//! off zero-copy and only an incomplete packet is copied into the
//! connection's `partial`.
//!
//! Transports: a connection with a PROXY header, TLS or WebSocket has
//! `Layers` (crate::transport); bytes read go down them (PROXY header,
//! decryption, frames) before MQTT decoding, and a flush goes up them
//! (framing, encryption) before the socket.

use super::sched::{self, TaskKey};
use super::{ratelog, Rt};
use crate::broker::client::{self, Flow};
use crate::broker::conn::{CloseReason, Conn, OutQueue};
use crate::broker::metrics::{count_local, Local, Metrics};
use crate::broker::{home_shard, Handoff, ShardMsg};
use crate::security::{Admission, Refusal};
use crate::transport::{Layers, Ws};
use bytes::{Buf, Bytes, BytesMut};
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tarta_proto::mqtt::{self, Connect, Packet};
use tarta_proto::passwd::{PasswordFile, Verdict};
use tarta_proto::proxy::{self, Parsed, Proxied};
use tarta_proto::ws::{close, frame, handshake, Handshake, WsEvent};
use tracing::{debug, warn};

/// Reads that make progress before the task yields to others.
const BUDGET: u32 = 16;
/// Iovecs per sendmsg.
const IOV_MAX: usize = 64;

enum Outcome {
    Close(CloseReason),
    Handoff(Box<Connect>, Bytes),
    /// CONNECT's password must be checked (off the shard) before it goes on.
    Authenticate(Box<Connect>, Bytes, Arc<PasswordFile>),
    /// An HTTP response being computed (a scrape): sent, then closed.
    Http(Pin<Box<dyn Future<Output = (u16, Vec<u8>)>>>),
}

/// What the task waits for before reading again.
enum Pending {
    /// Decided before the first poll (adopted connections).
    Outcome(Outcome),
    /// A password being checked on the shard's blocking thread; the
    /// connection reads nothing meanwhile.
    Auth {
        verdict: Pin<Box<dyn Future<Output = Verdict>>>,
        connect: Box<Connect>,
        rest: Bytes,
    },
    /// An HTTP response being computed.
    Http(Pin<Box<dyn Future<Output = (u16, Vec<u8>)>>>),
}

struct Io {
    fd: OwnedFd,
    /// This task in the shard's scheduler (readiness and wake-ups).
    key: TaskKey,
    /// False after a read found nothing, until the ring reports the socket
    /// readable again.
    may_read: bool,
    /// The listener that accepted the connection (`Rt::endpoints`).
    listener: u16,
    /// An incomplete MQTT packet (empty, and unallocated, between packets).
    partial: BytesMut,
    /// PROXY/TLS/WebSocket state (none for plain MQTT over TCP).
    layers: Option<Box<Layers>>,
    /// Counted in its address's connections (`limits`): released at close.
    addr_counted: bool,
}

/// A connection already past CONNECT on another shard (handoff).
pub struct Initial {
    pub connect: Box<Connect>,
    pub rest: Bytes,
}

/// A connection's task, written by hand so that its future stays small:
/// an idle connection costs this struct, its `Conn` and its session.
pub struct ConnTask {
    rt: Rc<Rt>,
    conn: Rc<Conn>,
    io: Option<Io>,
    /// An outcome decided before the first poll, or a password check.
    pending: Option<Box<Pending>>,
    /// The closing sequence, boxed: rare, and it holds a timer.
    closing: Option<Pin<Box<dyn Future<Output = ()>>>>,
}

/// How a new connection starts: which listener, which layers.
pub struct Start {
    pub listener: u16,
    pub layers: Option<Box<Layers>>,
    pub initial: Option<Initial>,
    /// Counted in its address's connections already (at accept).
    pub addr_counted: bool,
}

/// Starts a connection's task on this shard's scheduler.
pub fn spawn(rt: &Rc<Rt>, fd: OwnedFd, conn: Rc<Conn>, start: Start) {
    let raw = fd.as_raw_fd();
    let rt = rt.clone();
    sched::with(|s| s.spawn(Some(raw), move |key| run(rt, fd, key, conn, start)));
}

fn run(rt: Rc<Rt>, fd: OwnedFd, key: TaskKey, conn: Rc<Conn>, start: Start) -> ConnTask {
    let Start {
        listener,
        layers,
        initial,
        addr_counted,
    } = start;
    let mut io = Io {
        fd,
        key,
        may_read: true,
        listener,
        partial: BytesMut::new(),
        layers,
        addr_counted,
    };
    let pending = initial
        .and_then(|init| start_adopted(&rt, &conn, &mut io, init))
        .map(|o| Box::new(Pending::Outcome(o)));
    ConnTask {
        rt,
        conn,
        io: Some(io),
        pending,
        closing: None,
    }
}

impl Future for ConnTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            if let Some(f) = &mut this.closing {
                return f.as_mut().poll(cx);
            }
            let Some(io) = &mut this.io else {
                return Poll::Ready(());
            };
            if let Some(Pending::Auth { verdict, .. }) = this.pending.as_deref_mut() {
                let Poll::Ready(v) = verdict.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                let Some(p) = this.pending.take() else {
                    continue;
                };
                let Pending::Auth { connect, rest, .. } = *p else {
                    continue;
                };
                if let Some(o) = after_auth(&this.rt, &this.conn, io, v, connect, rest) {
                    this.pending = Some(Box::new(Pending::Outcome(o)));
                }
                continue;
            }
            if let Some(Pending::Http(f)) = this.pending.as_deref_mut() {
                let Poll::Ready((status, bytes)) = f.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                this.pending = None;
                if let Some(ws) = io.layers.as_deref_mut().and_then(|l| l.ws.as_mut()) {
                    ws.out.push_bytes(&bytes);
                }
                this.conn.request_close(CloseReason::Http {
                    status,
                    what: "HTTP request",
                });
                continue;
            }
            let outcome = match this.pending.take().map(|p| *p) {
                Some(Pending::Outcome(o)) => o,
                Some(p @ (Pending::Auth { .. } | Pending::Http(_))) => {
                    this.pending = Some(Box::new(p));
                    continue;
                }
                None => match io.poll(cx, &this.rt, &this.conn) {
                    Poll::Ready(o) => o,
                    Poll::Pending => return Poll::Pending,
                },
            };
            let outcome = match outcome {
                Outcome::Authenticate(connect, rest, file) => {
                    this.pending = Some(Box::new(authenticate(connect, rest, file)));
                    continue;
                }
                Outcome::Http(f) => {
                    this.pending = Some(Box::new(Pending::Http(f)));
                    continue;
                }
                o => o,
            };
            let Some(io) = this.io.take() else {
                return Poll::Ready(());
            };
            match outcome {
                Outcome::Close(why) => {
                    this.closing =
                        Some(Box::pin(close(this.rt.clone(), io, this.conn.clone(), why)));
                }
                Outcome::Handoff(connect, rest) => {
                    handoff(&this.rt, io, &this.conn, connect, rest);
                    return Poll::Ready(());
                }
                Outcome::Authenticate(..) | Outcome::Http(_) => {}
            }
        }
    }
}

/// Replays the CONNECT (and any bytes after it) of a handed-off connection.
fn start_adopted(rt: &Rt, conn: &Rc<Conn>, io: &mut Io, init: Initial) -> Option<Outcome> {
    match client::connect(&rt.shard, conn, init.connect) {
        Flow::Close(why) => return Some(Outcome::Close(why)),
        Flow::Continue | Flow::Handoff(_) | Flow::Pause(_) => {}
    }
    after_connect(rt, conn, io, init.rest)
}

/// Decodes what arrived after CONNECT (read in the same chunk, or kept by
/// the WebSocket layer).
fn after_connect(rt: &Rt, conn: &Rc<Conn>, io: &mut Io, rest: Bytes) -> Option<Outcome> {
    if !rest.is_empty() {
        let rest = BytesMut::from(&rest[..]);
        let identity = io.layers.as_deref().and_then(|l| l.identity.clone());
        if let Some(o) = process(
            &mut io.partial,
            rt,
            conn,
            rest,
            io.listener,
            identity.as_deref(),
        ) {
            return Some(o);
        }
    }
    match io.layers.as_deref().and_then(|l| l.ws.as_ref()) {
        Some(ws) if !ws.raw.is_empty() => io.ingest(rt, conn, BytesMut::new()),
        _ => None,
    }
}

/// Starts checking a CONNECT's password on the shard's blocking thread.
fn authenticate(connect: Box<Connect>, rest: Bytes, file: Arc<PasswordFile>) -> Pending {
    let user = connect.username.as_deref().unwrap_or_default().to_owned();
    let password = connect.password.clone().unwrap_or_default();
    let verdict = glommio::executor().spawn_blocking(move || file.check(&user, &password));
    Pending::Auth {
        verdict: Box::pin(verdict),
        connect,
        rest,
    }
}

/// The password check is done: the CONNECT goes on (perhaps to another
/// shard), or is refused.
fn after_auth(
    rt: &Rt,
    conn: &Rc<Conn>,
    io: &mut Io,
    v: Verdict,
    connect: Box<Connect>,
    rest: Bytes,
) -> Option<Outcome> {
    if v != Verdict::Ok {
        let why = if v == Verdict::UnknownUser {
            "unknown user"
        } else {
            "wrong password"
        };
        refuse_login(rt, conn, &connect, Refusal::BadCredentials, why);
        return Some(Outcome::Close(CloseReason::AuthRefused));
    }
    match client::on_packet(&rt.shard, conn, Packet::Connect(connect)) {
        Flow::Close(why) => Some(Outcome::Close(why)),
        Flow::Handoff(c) => Some(Outcome::Handoff(c, rest)),
        Flow::Continue | Flow::Pause(_) => after_connect(rt, conn, io, rest),
    }
}

/// Refuses a CONNECT for its credentials: CONNACK with the reason, counted,
/// logged (rate-limited); the close waits `auth_failure_delay_ms` first.
fn refuse_login(rt: &Rt, conn: &Conn, c: &Connect, r: Refusal, why: &str) {
    let m = &rt.shard.metrics;
    Metrics::inc(match r {
        Refusal::BadCredentials => &m.auth_failed,
        Refusal::NotAuthorized => &m.auth_anonymous_refused,
    });
    if let Some(more) = ratelog::allow(ratelog::Kind::Auth) {
        warn!(shard = rt.shard.id, peer = %conn.peer(), client_id = %c.client_id, username = c.username.as_deref().unwrap_or(""), suppressed = more, "login refused: {why}");
    }
    conn.state.borrow_mut().protocol = c.protocol;
    let (v3, v5) = r.codes();
    let _ = client::refuse(conn, c.protocol, v3, v5);
}

impl Io {
    fn poll(&mut self, cx: &mut Context<'_>, rt: &Rt, conn: &Rc<Conn>) -> Poll<Outcome> {
        conn.set_waker(cx.waker());
        let max_queued = rt.shard.cfg.max_queued_bytes;
        let mut waiting = false;
        for _ in 0..BUDGET {
            if let Some(why) = conn.close_reason() {
                return Poll::Ready(Outcome::Close(why));
            }
            if rt.shard.gated(conn) {
                // Its output depends on records not yet durable: it goes
                // once they are (woken then). Reading goes on.
                if !waiting {
                    rt.shard.gate_waiters.borrow_mut().push(cx.waker().clone());
                    waiting = true;
                }
            } else if let Err(e) = self.flush(conn) {
                debug!("write failed: {e}");
                return Poll::Ready(Outcome::Close(CloseReason::PeerGone));
            }
            if conn.held.get() {
                // Waiting for a SUBACK to be released (woken then).
                return Poll::Pending;
            }
            if rt.shard.backlogged() && !conn.acking.get() {
                // Backpressure: a subscriber here is congested, or the
                // mesh towards another shard is full (woken when it clears).
                rt.shard.paused.borrow_mut().push(cx.waker().clone());
                return Poll::Pending;
            }
            if conn.resumed.replace(false) {
                // Decode what was kept back (held SUBACK, backpressure).
                let identity = self.layers.as_deref().and_then(|l| l.identity.as_deref());
                let (partial, listener) = (&mut self.partial, self.listener);
                if let Some(o) = process(partial, rt, conn, BytesMut::new(), listener, identity) {
                    return Poll::Ready(o);
                }
                if let Some(o) = self.ingest(rt, conn, BytesMut::new()) {
                    return Poll::Ready(o);
                }
                continue;
            }
            if conn.queued() >= max_queued {
                // The client is not reading: stop reading from it too. The
                // pending write wakes us when the socket drains.
                return Poll::Pending;
            }
            if !self.may_read {
                if !sched::with(|s| s.take_readable(self.key)) {
                    return Poll::Pending;
                }
                self.may_read = true;
            }
            let data = match self.read(rt) {
                Poll::Pending => {
                    self.may_read = false;
                    return Poll::Pending;
                }
                Poll::Ready(Ok(d)) if d.is_empty() => {
                    return Poll::Ready(Outcome::Close(CloseReason::PeerGone))
                }
                Poll::Ready(Ok(d)) => d,
                Poll::Ready(Err(e)) => {
                    debug!("read failed: {e}");
                    return Poll::Ready(Outcome::Close(CloseReason::PeerGone));
                }
            };
            if let Some(o) = self.ingest(rt, conn, data) {
                return Poll::Ready(o);
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Reads into the shard-wide buffer and splits off what was read.
    fn read(&mut self, rt: &Rt) -> Poll<io::Result<BytesMut>> {
        let mut rb = rt.rbuf.borrow_mut();
        if rb.len() < 4096 {
            // Reuses the chunk in place once every slice of it is gone
            // (no fresh pages to fault in), else allocates a new one.
            rb.clear();
            rb.reserve(super::READ_CHUNK);
            rb.resize(super::READ_CHUNK, 0);
        }
        loop {
            // SAFETY: recv into the initialised buffer we own, bounded by its length.
            let r = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    rb.as_mut_ptr().cast(),
                    rb.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if r >= 0 {
                rt.shard.metrics.bytes_received.add(r as u64);
                if r > 0 && (r as usize) < rb.len() {
                    // A short read drained the socket: anything arriving
                    // later makes the ring report it readable, so the
                    // recv that would only say EAGAIN is skipped.
                    self.may_read = false;
                }
                return Poll::Ready(Ok(rb.split_to(r as usize)));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                // The shard's ring watches this socket and wakes the task.
                io::ErrorKind::WouldBlock => return Poll::Pending,
                _ => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Bytes from the socket: MQTT directly, or down the layers.
    fn ingest(&mut self, rt: &Rt, conn: &Rc<Conn>, data: BytesMut) -> Option<Outcome> {
        let Some(l) = &mut self.layers else {
            return process(&mut self.partial, rt, conn, data, self.listener, None);
        };
        let mut data = data;
        if l.proxy {
            data = proxy_stage(rt, conn, l, data)?;
            // The client's address is known now.
            if !self.addr_counted && !count_address(rt, conn, &mut self.addr_counted) {
                return None;
            }
        }
        if l.tls.is_some() {
            data = tls_stage(rt, conn, self.listener, l, data)?;
        }
        let identity = l.identity.as_deref();
        let Some(ws) = &mut l.ws else {
            return process(&mut self.partial, rt, conn, data, self.listener, identity);
        };
        let mut raw = if ws.raw.is_empty() {
            data
        } else {
            ws.raw.extend_from_slice(&data);
            std::mem::take(&mut ws.raw)
        };
        if !ws.open {
            match upgrade(rt, conn, self.listener, ws, &mut raw) {
                Ok(true) => {}
                Ok(false) => return None,
                Err(o) => return Some(o),
            }
            // A trusted proxy named the client (X-Forwarded-For).
            if !self.addr_counted && !count_address(rt, conn, &mut self.addr_counted) {
                return None;
            }
        }
        while !conn.is_closing() && !conn.held.get() && !conn.resumed.get() {
            match ws.decoder.next(&mut raw) {
                Ok(Some(WsEvent::Data(chunk))) => {
                    if let Some(o) =
                        process(&mut self.partial, rt, conn, chunk, self.listener, identity)
                    {
                        if matches!(o, Outcome::Handoff(..) | Outcome::Authenticate(..)) {
                            // The rest travels with the layers.
                            ws.raw = BytesMut::from(&raw[..]);
                        }
                        return Some(o);
                    }
                }
                Ok(Some(WsEvent::Ping(p))) => ws.out.push_bytes(&frame::pong_frame(&p)),
                Ok(Some(WsEvent::Pong)) => {}
                Ok(Some(WsEvent::Close(code))) => {
                    ws.out
                        .push_bytes(&frame::close_frame(code.unwrap_or(close::NORMAL), ""));
                    ws.close_sent = true;
                    conn.request_close(CloseReason::WsClosed);
                }
                Ok(None) => break,
                Err(e) => conn.request_close(CloseReason::Ws {
                    code: e.code,
                    what: e.what,
                }),
            }
        }
        if !raw.is_empty() && !conn.is_closing() {
            // Keep only the incomplete frame, not the shard's read chunk.
            ws.raw = BytesMut::from(&raw[..]);
        }
        None
    }

    /// Writes as much as the socket takes without blocking, up the layers:
    /// for WebSocket, everything the broker queued becomes one binary
    /// frame per flush; under TLS it is encrypted in as few records as fit.
    fn flush(&mut self, conn: &Conn) -> io::Result<()> {
        let Some(l) = &mut self.layers else {
            return write_queue(&self.fd, self.key, &mut conn.out.borrow_mut());
        };
        if let Some(ws) = &mut l.ws {
            if ws.open && !ws.close_sent {
                let mut out = conn.out.borrow_mut();
                if !out.is_empty() {
                    let mut h = [0u8; 10];
                    let n = frame::frame_header(frame::OP_BINARY, out.len() as u64, &mut h);
                    ws.out.push_bytes(&h[..n]);
                    ws.out.append(&mut out);
                }
            }
        }
        let r = match &mut l.tls {
            Some(tls) => loop {
                // Encrypt only what the socket takes: the plaintext waits
                // in its queue (counted, bounded) rather than as records.
                if let Err(e) = write_queue(&self.fd, self.key, &mut l.wire) {
                    break Err(e);
                }
                if !l.wire.is_empty() {
                    break Ok(());
                }
                let taken = match &mut l.ws {
                    Some(ws) => tls.write(&mut ws.out, &mut l.wire),
                    None => tls.write(&mut conn.out.borrow_mut(), &mut l.wire),
                };
                match taken {
                    Ok(0) => break Ok(()),
                    Ok(_) => {}
                    Err(e) => break Err(io::Error::other(e)),
                }
            },
            None => match &mut l.ws {
                Some(ws) => write_queue(&self.fd, self.key, &mut ws.out),
                // Only a PROXY stage: MQTT bytes go out as they are.
                None => write_queue(&self.fd, self.key, &mut conn.out.borrow_mut()),
            },
        };
        conn.wire_pending.set(l.pending() as u32);
        r
    }
}

/// Counts the connection in its client address's limits once that address
/// is known; false (and the connection closing) if over them.
fn count_address(rt: &Rt, conn: &Conn, counted: &mut bool) -> bool {
    let ip = conn.peer().ip();
    if !rt.limits.applies(ip) {
        return true;
    }
    match rt.limits.admit_address(ip) {
        Ok(()) => {
            *counted = true;
            true
        }
        Err(r) => {
            refused_by_limit(rt, conn.peer(), r);
            conn.request_close(CloseReason::LimitReached("connections per address"));
            false
        }
    }
}

/// Counts and logs (rate-limited) a connection refused by a limit.
pub fn refused_by_limit(rt: &Rt, peer: SocketAddr, r: super::limits::Refused) {
    use super::limits::Refused;
    let m = &rt.shard.metrics;
    let (c, what) = match r {
        Refused::Total => (&m.limit_connections, "max_connections reached"),
        Refused::AddressFull => (
            &m.limit_address_connections,
            "max_connections_per_address reached",
        ),
        Refused::AddressRate => (
            &m.limit_address_rate,
            "connection_rate_per_address exceeded",
        ),
    };
    Metrics::inc(c);
    if let Some(more) = ratelog::allow(ratelog::Kind::Limit) {
        warn!(shard = rt.shard.id, %peer, suppressed = more, "refusing connection: {what}");
    }
}

/// The PROXY protocol stage: reads the header (setting the client's
/// address) and returns the bytes after it; None while the header is
/// incomplete or when the connection is being closed for a bad one.
fn proxy_stage(rt: &Rt, conn: &Conn, l: &mut Layers, data: BytesMut) -> Option<BytesMut> {
    let mut buf = if l.pre.is_empty() {
        data
    } else {
        l.pre.extend_from_slice(&data);
        std::mem::take(&mut l.pre)
    };
    match proxy::parse(&buf) {
        Ok(Parsed::NeedMore) => {
            l.pre = BytesMut::from(&buf[..]);
            None
        }
        Ok(Parsed::Done { header, consumed }) => {
            l.proxy = false;
            if let Proxied::Client { src, .. } = header {
                conn.set_peer(src);
            }
            buf.advance(consumed);
            Some(buf)
        }
        Err(e) => {
            Metrics::inc(&rt.shard.metrics.proxy_malformed);
            if let Some(more) = ratelog::allow(ratelog::Kind::Proxy) {
                warn!(shard = rt.shard.id, peer = %conn.peer(), suppressed = more, "closing connection: bad PROXY protocol header: {e}");
            }
            conn.request_close(CloseReason::Transport("bad PROXY protocol header"));
            None
        }
    }
}

/// The TLS stage: decrypts, and returns the plaintext (None when the
/// connection is being closed).
fn tls_stage(
    rt: &Rt,
    conn: &Conn,
    listener: u16,
    l: &mut Layers,
    data: BytesMut,
) -> Option<BytesMut> {
    let tls = l.tls.as_mut()?;
    let mut plain = BytesMut::new();
    match tls.read(data, &mut plain, &mut l.wire) {
        Ok(o) => {
            if o.handshake_done {
                Metrics::inc(&rt.shard.metrics.tls_handshakes);
                let ep = &rt.endpoints[usize::from(listener)];
                if ep.cfg.tls.as_ref().is_some_and(|t| t.identity_as_username) {
                    match tls.peer_common_name() {
                        Some(cn) => l.identity = Some(cn.into_boxed_str()),
                        None => {
                            Metrics::inc(&rt.shard.metrics.tls_failed);
                            if let Some(more) = ratelog::allow(ratelog::Kind::Tls) {
                                warn!(shard = rt.shard.id, peer = %conn.peer(), suppressed = more, "closing TLS connection: client certificate has no common name (identity_as_username)");
                            }
                            conn.request_close(CloseReason::Transport("certificate without CN"));
                            return None;
                        }
                    }
                }
            }
            if o.peer_closed {
                conn.request_close(CloseReason::PeerGone);
            }
            Some(plain)
        }
        Err(e) => {
            Metrics::inc(&rt.shard.metrics.tls_failed);
            if let Some(more) = ratelog::allow(ratelog::Kind::Tls) {
                warn!(shard = rt.shard.id, peer = %conn.peer(), suppressed = more, "closing TLS connection: {e}");
            }
            conn.request_close(CloseReason::Transport("TLS error"));
            None
        }
    }
}

/// The HTTP part of a WebSocket connection. Returns true once upgraded
/// (with `raw` advanced past the request); an HTTP request for another
/// path is answered (`http::serve`), perhaps later (`Outcome::Http`).
fn upgrade(
    rt: &Rt,
    conn: &Conn,
    listener: u16,
    ws: &mut Ws,
    raw: &mut BytesMut,
) -> Result<bool, Outcome> {
    let m = &rt.shard.metrics;
    let peer = conn.peer();
    let cfg = &rt.endpoints[usize::from(listener)].cfg.ws;
    match handshake(raw, cfg, peer.ip()) {
        Handshake::NeedMore => {
            ws.raw = BytesMut::from(&raw[..]);
            Ok(false)
        }
        Handshake::Http(req) => {
            raw.advance(req.consumed.min(raw.len()));
            match super::http::serve(rt, listener, &req) {
                super::http::Reply::Now(status, bytes) => {
                    ws.out.push_bytes(&bytes);
                    conn.request_close(CloseReason::Http {
                        status,
                        what: "HTTP request",
                    });
                    Ok(false)
                }
                super::http::Reply::Later(f) => Err(Outcome::Http(f)),
            }
        }
        Handshake::Respond {
            status,
            response,
            why,
        } => {
            ws.out.push_bytes(&response);
            if status == 200 {
                Metrics::inc(&m.http_health);
            } else {
                Metrics::inc(&m.ws_rejected);
                debug!(shard = rt.shard.id, peer = %peer, status, why, "WebSocket handshake refused");
            }
            conn.request_close(CloseReason::Http { status, what: why });
            Ok(false)
        }
        Handshake::Upgrade {
            response,
            consumed,
            forwarded_for,
            ..
        } => {
            ws.out.push_bytes(&response);
            ws.open = true;
            raw.advance(consumed);
            if let Some(ip) = forwarded_for {
                conn.set_peer(SocketAddr::new(ip, 0));
            }
            Metrics::inc(&m.ws_upgrades);
            Ok(true)
        }
    }
}

/// Decodes and handles every complete MQTT packet in `data` (after what is
/// left over in `partial` from earlier reads). `identity`: the TLS client
/// certificate's name, which replaces CONNECT's username
/// (`identity_as_username`).
fn process(
    partial: &mut BytesMut,
    rt: &Rt,
    conn: &Rc<Conn>,
    mut data: BytesMut,
    listener: u16,
    identity: Option<&str>,
) -> Option<Outcome> {
    let use_partial = !partial.is_empty();
    if use_partial {
        partial.extend_from_slice(&data);
    }
    let buf = if use_partial {
        &mut *partial
    } else {
        &mut data
    };
    let max = rt.shard.cfg.max_packet_size;
    loop {
        if conn.held.get() {
            // Held (a SUBACK, a paused publisher): decode nothing more.
            break;
        }
        let protocol = conn.state.borrow().protocol;
        match mqtt::decode(buf, protocol, max) {
            Ok(Some(mut p)) => {
                Metrics::inc(&rt.shard.metrics.packets_received);
                if let Packet::Connect(c) = &mut p {
                    if let Some(id) = identity {
                        c.username = Some(id.into());
                        c.password = None;
                    }
                    if !conn.state.borrow().connected {
                        let sec = rt.shard.security.load();
                        let auth = sec.listeners.get(usize::from(listener));
                        let admission = auth.map_or(Admission::Accept, |a| {
                            a.admit(
                                c.username.as_deref(),
                                c.password.as_deref(),
                                identity.is_some(),
                            )
                        });
                        match admission {
                            Admission::Accept => {}
                            Admission::Refuse(r) => {
                                let why = match r {
                                    Refusal::BadCredentials => "username without a password",
                                    Refusal::NotAuthorized => "no credentials",
                                };
                                refuse_login(rt, conn, c, r, why);
                                conn.request_close(CloseReason::AuthRefused);
                                break;
                            }
                            Admission::Verify(file) => {
                                let Packet::Connect(c) = p else {
                                    break;
                                };
                                return Some(Outcome::Authenticate(c, buf.split().freeze(), file));
                            }
                        }
                    }
                }
                match client::on_packet(&rt.shard, conn, p) {
                    Flow::Continue if conn.held.get() => break,
                    Flow::Continue if rt.shard.congested.get() > 0 && !conn.acking.get() => {
                        // Stop between packets; the rest is decoded on resume.
                        conn.resumed.set(true);
                        break;
                    }
                    Flow::Continue => {}
                    Flow::Close(why) => {
                        conn.request_close(why);
                        break;
                    }
                    Flow::Handoff(c) => return Some(Outcome::Handoff(c, buf.split().freeze())),
                    Flow::Pause(d) => {
                        pause(conn, d);
                        break;
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                conn.request_close(client::on_decode_error(conn, &e));
                break;
            }
        }
    }
    if use_partial {
        if partial.is_empty() {
            *partial = BytesMut::new();
        }
    } else if !data.is_empty() && !conn.is_closing() {
        // Keep only the incomplete packet, not the shard's read chunk.
        *partial = BytesMut::from(&data[..]);
    }
    None
}

/// Reads nothing more from the connection for `d` (a publisher over its
/// rate): as a held SUBACK does, then resumes decoding what it kept.
fn pause(conn: &Rc<Conn>, d: Duration) {
    conn.held.set(true);
    let conn = conn.clone();
    glommio::spawn_local(async move {
        glommio::timer::sleep(d).await;
        conn.held.set(false);
        conn.resumed.set(true);
        conn.wake();
    })
    .detach();
}

/// Writes `q` with vectored non-blocking sends; when the socket is full,
/// asks the shard's ring to wake the task once it is writable.
fn write_queue(fd: &OwnedFd, key: TaskKey, q: &mut OutQueue) -> io::Result<()> {
    while !q.is_empty() {
        let mut iov = [IoSlice::new(&[]); IOV_MAX];
        let n = q.iovecs(&mut iov);
        match sendmsg(fd.as_raw_fd(), &iov[..n]) {
            Ok(w) => {
                count_local(Local::BytesSent, w as u64);
                q.advance(w)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                sched::with(|s| s.want_write(key));
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// sendmsg(MSG_DONTWAIT) with iovecs.
fn sendmsg(fd: i32, iov: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: IoSlice is ABI-compatible with iovec; msghdr is zeroed and
    // points at `iov`, which outlives the call.
    let r = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

async fn close(rt: Rc<Rt>, mut io: Io, conn: Rc<Conn>, why: CloseReason) {
    let client_id = rt.shard.client_id(&conn);
    if why.is_bad_input() {
        Metrics::inc(&rt.shard.metrics.closed_bad_input);
        if let Some(more) = ratelog::allow(ratelog::Kind::BadInput) {
            warn!(shard = rt.shard.id, peer = %conn.peer(), client_id = %client_id, reason = ?why, suppressed = more, "closing connection: bad input");
        }
    } else {
        debug!(shard = rt.shard.id, peer = %conn.peer(), client_id = %client_id, reason = ?why, "closing connection");
    }
    rt.shard.metrics.closed[why.label()].add(1);
    client::server_disconnect(&conn, &why);
    client::on_closed(&rt.shard, &conn, &why);
    if matches!(why, CloseReason::AuthRefused) {
        // Guessing is slow: the refusal is answered only after a while
        // (a timer: the shard goes on meanwhile).
        let delay = rt.shard.cfg.auth_failure_delay_ms;
        glommio::timer::sleep(Duration::from_millis(delay)).await;
    }
    let ws_close = match io.layers.as_deref().and_then(|l| l.ws.as_ref()) {
        Some(ws) if ws.open && !ws.close_sent => Some(why.ws_close_code()),
        _ => None,
    };
    // Flush what is queued (CONNACK refusals, DISCONNECT), for a short
    // while, then the WebSocket close frame and TLS close_notify.
    let flushed = glommio::timer::timeout(Duration::from_secs(1), async {
        poll_fn(|cx| {
            conn.set_waker(cx.waker());
            loop {
                if rt.shard.gated(&conn) {
                    // Acknowledgements go only once what they promise is durable.
                    rt.shard.gate_waiters.borrow_mut().push(cx.waker().clone());
                    return Poll::Pending;
                }
                if let Err(e) = io.flush(&conn) {
                    debug!("flush on close: {e}");
                    return Poll::Ready(());
                }
                let mqtt_done = conn.out.borrow().is_empty();
                if let Some(l) = io.layers.as_deref_mut() {
                    if let (Some(code), Some(ws)) = (ws_close, &mut l.ws) {
                        if !ws.close_sent && mqtt_done {
                            // After the MQTT bytes, the WebSocket close handshake.
                            ws.out.push_bytes(&frame::close_frame(code, ""));
                            ws.close_sent = true;
                            continue;
                        }
                    }
                    let ws_done = l.ws.as_ref().is_none_or(|w| w.out.is_empty());
                    if let Some(tls) = &mut l.tls {
                        if mqtt_done && ws_done && tls.is_ready() && !tls.close_queued() {
                            tls.close(&mut l.wire);
                            continue;
                        }
                    }
                }
                return if conn.queued() == 0 {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                };
            }
        })
        .await;
        Ok(())
    })
    .await;
    if flushed.is_err() {
        debug!(client_id = %client_id, "gave up flushing on close");
    } else if why.server_initiated() {
        drain(&io).await;
    }
    sched::with(|s| s.unwatch(io.key));
    rt.endpoints[usize::from(io.listener)].closed();
    rt.limits.release_total();
    if io.addr_counted {
        rt.limits.release_address(conn.peer().ip());
    }
    // SAFETY: shutdown(2) on the socket we own; it is closed when `io` drops.
    unsafe { libc::shutdown(io.fd.as_raw_fd(), libc::SHUT_RDWR) };
}

/// How long a closing connection's input is read and dropped (bounded in
/// time and bytes).
const DRAIN_TIME: Duration = Duration::from_secs(2);
const DRAIN_BYTES: usize = 1 << 20;

/// The graceful end of a close the server decided (a CONNACK refusal, a
/// server DISCONNECT): everything queued has been written; now the write
/// side is shut (the client reads the reason, then EOF) and whatever the
/// client still sends is read and dropped until it closes too, for a
/// bounded time. Closing with unread input would make the kernel send a
/// reset, and a client still writing (PUBRELs after a 0x93 DISCONNECT)
/// would get EPIPE or ECONNRESET instead of the reason code.
async fn drain(io: &Io) {
    let fd = io.fd.as_raw_fd();
    // SAFETY: shutdown(2) on the socket we own.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    let key = io.key;
    let mut left = DRAIN_BYTES;
    let _ = glommio::timer::timeout(DRAIN_TIME, async {
        poll_fn(|_| {
            let mut buf = [0u8; 4096];
            loop {
                // SAFETY: recv into a local buffer, bounded by its length.
                let r = unsafe {
                    libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
                };
                if r > 0 {
                    left = left.saturating_sub(r as usize);
                    if left == 0 {
                        return Poll::Ready(());
                    }
                    continue;
                }
                if r == 0 {
                    return Poll::Ready(());
                }
                match io::Error::last_os_error().kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => {
                        if !sched::with(|s| s.take_readable(key)) {
                            // The ring wakes the task when more arrives.
                            return Poll::Pending;
                        }
                    }
                    _ => return Poll::Ready(()),
                }
            }
        })
        .await;
        Ok(())
    })
    .await;
}

/// Moves the connection to the home shard of its client id, with its
/// layers (TLS session, WebSocket state, unwritten output).
fn handoff(rt: &Rt, io: Io, conn: &Conn, connect: Box<Connect>, rest: Bytes) {
    Metrics::dec(&rt.shard.metrics.connections_current);
    Metrics::inc(&rt.shard.metrics.connections_handed_off);
    // This ring stops watching the socket before the home shard's starts.
    sched::with(|s| s.unwatch(io.key));
    let home = home_shard(&connect.client_id, rt.shard.n);
    let h = Handoff {
        fd: io.fd,
        peer: conn.peer(),
        listener: io.listener,
        connect,
        rest,
        layers: io.layers,
        addr_counted: io.addr_counted,
    };
    let mut st = rt.shard.st.borrow_mut();
    rt.shard
        .push_out(&mut st, home, ShardMsg::Handoff(Box::new(h)));
}

/// Starts a connection handed to this shard by another.
pub fn adopt(rt: &Rc<Rt>, h: Handoff) {
    let Handoff {
        fd,
        peer,
        listener,
        connect,
        rest,
        layers,
        addr_counted,
    } = h;
    let conn = rt.shard.new_conn(peer);
    conn.state.borrow_mut().listener = listener;
    debug!(shard = rt.shard.id, peer = %peer, client_id = %connect.client_id, "adopted connection");
    let start = Start {
        listener,
        layers,
        initial: Some(Initial { connect, rest }),
        addr_counted,
    };
    spawn(rt, fd, conn, start);
}

#[cfg(test)]
mod tests {
    /// Every idle connection pays for these three allocations; each is kept
    /// at or under an allocator size class (docs/BENCHMARKS.md "Memory").
    #[test]
    fn idle_connection_state_stays_in_its_size_classes() {
        use std::mem::size_of;
        // Rc<Conn>: two counts (16 B) + Conn in a 160-byte block.
        assert!(size_of::<crate::broker::conn::Conn>() <= 144);
        assert!(size_of::<crate::broker::SessionEntry>() <= 192);
        assert!(size_of::<super::ConnTask>() <= 96);
    }
}
