//! Listeners: every shard gets its own SO_REUSEPORT socket per address (the
//! kernel spreads connections across shards). They are bound up front in
//! the main thread so that port 0 resolves to one port shared by all shards.
//!
//! When the process runs out of file descriptors, the accept loop refuses
//! connections cleanly: it frees a spare descriptor, accepts and closes one
//! connection, and takes the spare back, so it neither spins nor crashes.

use super::{conn, peer_or_unspecified, sched, Rt};
use crate::broker::metrics::Metrics;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::time::Duration;
use tracing::warn;

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

pub fn bind_all(addrs: &[SocketAddr], shards: usize) -> Result<Bound, String> {
    let mut out = Bound {
        addrs: Vec::new(),
        fds: Vec::new(),
    };
    for &addr in addrs {
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

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    WebSocket,
}

/// Starts the accept loop of one listener on this shard.
pub fn start(rt: Rc<Rt>, fd: OwnedFd, kind: Kind) {
    if let Err(e) = socket2::SockRef::from(&fd).set_nonblocking(true) {
        warn!(
            shard = rt.shard.id,
            "listener: cannot set non-blocking: {e}"
        );
        return;
    }
    let raw = fd.as_raw_fd();
    sched::with(|s| s.spawn(Some(raw), move |_| accept_loop(rt, fd, kind)));
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

async fn accept_loop(rt: Rc<Rt>, listener: OwnedFd, kind: Kind) {
    let raw = listener.as_raw_fd();
    let mut spare = spare_fd();
    let mut last_warn: Option<std::time::Instant> = None;
    let mut batch = 0;
    loop {
        match accept(raw) {
            Ok((fd, peer)) => {
                let _ = socket2::SockRef::from(&fd).set_nodelay(true);
                Metrics::inc(&rt.shard.metrics.connections_accepted);
                let c = rt.shard.new_conn(peer);
                conn::spawn(&rt, fd, c, kind, None);
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
