//! Listeners: every shard gets its own SO_REUSEPORT socket per address (the
//! kernel spreads connections across shards). They are bound up front in
//! the main thread so that port 0 resolves to one port shared by all shards.
//!
//! When the process runs out of file descriptors, the accept loop refuses
//! connections cleanly: it frees a spare descriptor, accepts and closes one
//! connection, and takes the spare back, so it neither spins nor crashes.

use super::{conn, peer_or_unspecified, ratelog, sched, Rt};
use crate::broker::metrics::Metrics;
use crate::config::{ListenProtocol, Listener};
use crate::transport::{certs, tls::Tls, Layers, Ws};
use arc_swap::ArcSwap;
use bytes::BytesMut;
use rustls::server::{ProducesTickets, ServerConfig};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// A listener as every shard sees it (shared by all shards).
pub struct Endpoint {
    pub cfg: Listener,
    /// The address bound (port 0 resolved).
    pub addr: SocketAddr,
    /// The TLS configuration new connections get (replaced on SIGHUP;
    /// connections keep the one they started with).
    pub tls: Option<ArcSwap<ServerConfig>>,
    /// Session-ticket keys, kept across reloads.
    ticketer: Option<Arc<dyn ProducesTickets>>,
    /// Connections open now, over all shards (for `max_connections`).
    open: AtomicUsize,
}

impl Endpoint {
    /// Reads the listener's certificate files. An error names the file.
    pub fn new(cfg: Listener) -> Result<Endpoint, String> {
        let (tls, ticketer) = match &cfg.tls {
            Some(files) => {
                let t = certs::ticketer()?;
                let sc = certs::server_config(&cfg, files, t.clone())
                    .map_err(|e| format!("listener {} ({}): {e}", cfg.bind, cfg.name()))?;
                (Some(ArcSwap::new(sc)), Some(t))
            }
            None => (None, None),
        };
        Ok(Endpoint {
            addr: cfg.bind,
            cfg,
            tls,
            ticketer,
            open: AtomicUsize::new(0),
        })
    }

    /// Re-reads the certificate files (SIGHUP). On error the listener keeps
    /// its current certificates.
    pub fn reload(&self) -> Result<bool, String> {
        let (Some(files), Some(cur), Some(t)) = (&self.cfg.tls, &self.tls, &self.ticketer) else {
            return Ok(false);
        };
        let sc = certs::server_config(&self.cfg, files, t.clone())
            .map_err(|e| format!("listener {} ({}): {e}", self.addr, self.cfg.name()))?;
        cur.store(sc);
        Ok(true)
    }

    /// Counts a new connection; false if the listener is full.
    fn admit(&self) -> bool {
        let max = self.cfg.max_connections;
        let n = self.open.fetch_add(1, Ordering::Relaxed);
        if max != 0 && n >= max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Connections open now on this listener, over all shards.
    pub fn open_now(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A connection of this listener closed.
    pub fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// The layers a new connection of this listener starts with (None:
    /// plain MQTT over TCP).
    fn layers(&self, max_frame: u64) -> Result<Option<Box<Layers>>, rustls::Error> {
        // An HTTP listener is a WebSocket listener that never upgrades.
        let ws = matches!(self.cfg.protocol, ListenProtocol::Ws | ListenProtocol::Http);
        if !ws && self.tls.is_none() && !self.cfg.proxy_protocol {
            return Ok(None);
        }
        let tls = match &self.tls {
            Some(sc) => Some(Box::new(Tls::new(sc.load_full())?)),
            None => None,
        };
        Ok(Some(Box::new(Layers {
            proxy: self.cfg.proxy_protocol,
            pre: BytesMut::new(),
            tls,
            ws: ws.then(|| Ws::new(max_frame)),
            wire: Default::default(),
            identity: None,
        })))
    }
}

pub struct Bound {
    /// The actual addresses (port 0 resolved).
    pub addrs: Vec<SocketAddr>,
    /// Per address, one socket per shard.
    pub fds: Vec<Vec<OwnedFd>>,
}

fn listen_socket(addr: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_port(true)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s)
}

/// Fails if another process listens on `addr` already. The shards' sockets
/// share their port with SO_REUSEPORT, which would also let a second
/// broker (a stale process, a botched restart) take half the connections
/// silently. A connection attempt tells: only a listening socket accepts
/// one. A process that just died can leave its listener open for a moment
/// (io_uring tears its ring down, and the sockets it polled, after the
/// process is gone), so a listener must still be there after 3 s.
fn probe_free(addr: SocketAddr) -> Result<(), String> {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match std::net::TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
            // A port in the ephemeral range with nothing listening can
            // connect to itself (TCP simultaneous open): a free port.
            Ok(s) if s.local_addr().ok() == Some(target) => return Ok(()),
            Ok(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(_) => {
                return Err(format!(
                    "cannot listen on {addr}: another process listens there (is another broker running?)"
                ))
            }
            Err(_) => return Ok(()),
        }
    }
}

pub fn bind_all(addrs: &[SocketAddr], shards: usize) -> Result<Bound, String> {
    let mut out = Bound {
        addrs: Vec::new(),
        fds: Vec::new(),
    };
    for &addr in addrs {
        if addr.port() != 0 {
            probe_free(addr)?;
        }
        let first = listen_socket(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let actual = first
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(addr);
        let mut fds = vec![OwnedFd::from(first)];
        for _ in 1..shards {
            let s = listen_socket(actual).map_err(|e| format!("cannot listen on {actual}: {e}"))?;
            fds.push(OwnedFd::from(s));
        }
        out.addrs.push(actual);
        out.fds.push(fds);
    }
    Ok(out)
}

/// Starts the accept loop of listener `idx` on this shard.
pub fn start(rt: Rc<Rt>, fd: OwnedFd, idx: u16) {
    if let Err(e) = socket2::SockRef::from(&fd).set_nonblocking(true) {
        warn!(
            shard = rt.shard.id,
            "listener: cannot set non-blocking: {e}"
        );
        return;
    }
    let raw = fd.as_raw_fd();
    sched::with(|s| s.spawn(Some(raw), move |_| accept_loop(rt, fd, idx)));
}

fn spare_fd() -> Option<OwnedFd> {
    // SAFETY: open(2) on a constant path; the fd is owned from here on.
    let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// accept4(2): a non-blocking, close-on-exec socket and the peer's address.
fn accept(listener: i32) -> std::io::Result<(OwnedFd, SocketAddr)> {
    // SAFETY: accept4 writes at most `len` bytes of address into `storage`;
    // a returned descriptor is owned from here on.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let fd = libc::accept4(
            listener,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let peer = socket2::SockAddr::new(storage, len).as_socket();
        Ok((
            fd,
            peer_or_unspecified(peer.ok_or_else(|| std::io::ErrorKind::Other.into())),
        ))
    }
}

/// Returns Pending once: the task runs again when the scheduler wakes it
/// (the listener became readable) or, with `again`, right away.
fn pause(again: bool) -> impl std::future::Future<Output = ()> {
    let mut done = false;
    std::future::poll_fn(move |cx| {
        if done {
            return std::task::Poll::Ready(());
        }
        done = true;
        if again {
            cx.waker().wake_by_ref();
        }
        std::task::Poll::Pending
    })
}

/// Accepts and closes every connection waiting on `listener`; returns how
/// many (readiness is checked first: this shard is the only one accepting
/// on its own SO_REUSEPORT socket).
fn refuse_pending(listener: i32) -> u64 {
    let mut refused = 0;
    loop {
        let mut pfd = libc::pollfd {
            fd: listener,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll with a zero timeout on one valid pollfd, then accept4
        // on our listening socket; the accepted fd is closed at once.
        unsafe {
            if libc::poll(&mut pfd, 1, 0) != 1 {
                return refused;
            }
            let fd = libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            );
            if fd < 0 {
                return refused;
            }
            libc::close(fd);
        }
        refused += 1;
    }
}

/// Connections accepted before the loop lets other tasks run.
const ACCEPT_BATCH: u32 = 64;

/// Sets up an accepted connection: limits, PROXY trust, layers, task.
fn admit(rt: &Rc<Rt>, fd: OwnedFd, peer: SocketAddr, idx: u16) {
    let m = &rt.shard.metrics;
    let ep = &rt.endpoints[usize::from(idx)];
    if !ep.admit() {
        Metrics::inc(&m.refused_listener_full);
        if let Some(more) = ratelog::allow(ratelog::Kind::Refused) {
            warn!(shard = rt.shard.id, listener = %ep.addr, %peer, suppressed = more, "refusing connection: listener at max_connections ({})", ep.cfg.max_connections);
        }
        return;
    }
    if let Err(r) = rt.limits.admit_total() {
        ep.closed();
        conn::refused_by_limit(rt, peer, r);
        return;
    }
    // Per address, now if the socket's peer is the client; else once a
    // PROXY header or a trusted proxy's X-Forwarded-For names it.
    let proxied = ep.cfg.proxy_protocol
        || (ep.cfg.protocol == ListenProtocol::Ws
            && ep.cfg.ws.trusted_proxies.contains(&peer.ip()));
    let mut addr_counted = false;
    if !proxied && rt.limits.applies(peer.ip()) {
        if let Err(r) = rt.limits.admit_address(peer.ip()) {
            ep.closed();
            rt.limits.release_total();
            conn::refused_by_limit(rt, peer, r);
            return;
        }
        addr_counted = true;
    }
    let release = |rt: &Rt| {
        ep.closed();
        rt.limits.release_total();
        if addr_counted {
            rt.limits.release_address(peer.ip());
        }
    };
    if ep.cfg.proxy_protocol && !ep.cfg.trusted_proxies.iter().any(|c| c.contains(peer.ip())) {
        release(rt);
        Metrics::inc(&m.proxy_untrusted);
        if let Some(more) = ratelog::allow(ratelog::Kind::Proxy) {
            warn!(shard = rt.shard.id, listener = %ep.addr, %peer, suppressed = more, "refusing connection: PROXY protocol listener, and the peer is not in trusted_proxies");
        }
        return;
    }
    let layers = match ep.layers(u64::from(rt.shard.cfg.max_packet_size)) {
        Ok(l) => l,
        Err(e) => {
            release(rt);
            Metrics::inc(&m.tls_failed);
            if let Some(more) = ratelog::allow(ratelog::Kind::Tls) {
                warn!(shard = rt.shard.id, %peer, suppressed = more, "cannot start TLS: {e}");
            }
            return;
        }
    };
    let _ = socket2::SockRef::from(&fd).set_nodelay(true);
    Metrics::inc(&m.connections_accepted);
    let c = rt.shard.new_conn(peer);
    c.state.borrow_mut().listener = idx;
    let start = conn::Start {
        listener: idx,
        layers,
        initial: None,
        addr_counted,
    };
    conn::spawn(rt, fd, c, start);
}

async fn accept_loop(rt: Rc<Rt>, listener: OwnedFd, idx: u16) {
    let raw = listener.as_raw_fd();
    let mut spare = spare_fd();
    let mut last_warn: Option<std::time::Instant> = None;
    let mut batch = 0;
    loop {
        match accept(raw) {
            Ok((fd, peer)) => {
                admit(&rt, fd, peer, idx);
                batch += 1;
                if batch == ACCEPT_BATCH {
                    batch = 0;
                    pause(true).await;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                batch = 0;
                pause(false).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let fd_limit = matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE));
                if fd_limit {
                    // accept(2) fails before looking at the queue when no
                    // descriptor is free: free the spare, accept and close
                    // what is waiting, take the spare back.
                    drop(spare.take());
                    let n = refuse_pending(raw);
                    spare = spare_fd();
                    let m = &rt.shard.metrics.refused_fd_limit;
                    m.set(m.get() + n);
                }
                let now = std::time::Instant::now();
                if last_warn.is_none_or(|t| now.duration_since(t) > Duration::from_secs(5)) {
                    last_warn = Some(now);
                    if fd_limit {
                        warn!(
                            shard = rt.shard.id,
                            refused = rt.shard.metrics.refused_fd_limit.get(),
                            "out of file descriptors (ulimit -n): refusing connections; see docs/OPERATIONS.md"
                        );
                    } else {
                        warn!(shard = rt.shard.id, "accept failed: {e}");
                    }
                }
                // Never spin while the process is out of descriptors.
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
