//! One connection's task: read into the shard-wide buffer, decode, hand
//! packets to the broker, and write the connection's queue with vectored
//! non-blocking sends.
//!
//! Memory: an idle connection holds no read buffer. `poll_read` borrows the
//! shard's buffer only for the duration of the call (glommio tries
//! `recv(MSG_DONTWAIT)` first and otherwise arms a poll that holds no
//! buffer); the bytes read are split off zero-copy and only an incomplete
//! packet is copied into the connection's `partial`.

use super::Rt;
use crate::broker::client::{self, Flow};
use crate::broker::conn::{CloseReason, Conn};
use crate::broker::metrics::Metrics;
use crate::broker::{home_shard, Handoff, ShardMsg};
use bytes::{Bytes, BytesMut};
use futures_lite::io::AsyncWrite;
use glommio::net::TcpStream;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;
use tarta_proto::mqtt::{self, Connect};
use tracing::{debug, warn};

/// Reads that make progress before the task yields to others.
const BUDGET: u32 = 16;
/// Iovecs per sendmsg.
const IOV_MAX: usize = 64;

enum Outcome {
    Close(CloseReason),
    Handoff(Box<Connect>, Bytes),
}

struct Io {
    stream: TcpStream,
    /// An incomplete packet (empty, and unallocated, between packets).
    partial: BytesMut,
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
    /// An outcome decided before the first poll (adopted connections).
    early: Option<Box<Outcome>>,
    /// The closing sequence, boxed: rare, and it holds a timer.
    closing: Option<Pin<Box<dyn Future<Output = ()>>>>,
}

pub fn run(rt: Rc<Rt>, stream: TcpStream, conn: Rc<Conn>, initial: Option<Initial>) -> ConnTask {
    let mut io = Io {
        stream,
        partial: BytesMut::new(),
    };
    let early = initial
        .and_then(|init| start_adopted(&rt, &conn, &mut io, init))
        .map(Box::new);
    ConnTask {
        rt,
        conn,
        io: Some(io),
        early,
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
            let outcome = match this.early.take() {
                Some(o) => *o,
                None => match io.poll(cx, &this.rt, &this.conn) {
                    Poll::Ready(o) => o,
                    Poll::Pending => return Poll::Pending,
                },
            };
            let Some(io) = this.io.take() else {
                return Poll::Ready(());
            };
            match outcome {
                Outcome::Close(why) => {
                    this.closing = Some(Box::pin(close(
                        this.rt.clone(),
                        io,
                        this.conn.clone(),
                        why,
                    )));
                }
                Outcome::Handoff(connect, rest) => {
                    handoff(&this.rt, io, &this.conn, connect, rest);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// Replays the CONNECT (and any bytes after it) of a handed-off connection.
fn start_adopted(rt: &Rt, conn: &Rc<Conn>, io: &mut Io, init: Initial) -> Option<Outcome> {
    match client::connect(&rt.shard, conn, init.connect) {
        Flow::Close(why) => Some(Outcome::Close(why)),
        Flow::Continue | Flow::Handoff(_) if init.rest.is_empty() => None,
        Flow::Continue | Flow::Handoff(_) => io.process(rt, conn, BytesMut::from(&init.rest[..])),
    }
}

impl Io {
    fn poll(&mut self, cx: &mut Context<'_>, rt: &Rt, conn: &Rc<Conn>) -> Poll<Outcome> {
        conn.set_waker(cx.waker());
        let max_queued = rt.shard.cfg.max_queued_bytes;
        for _ in 0..BUDGET {
            if let Some(why) = conn.close_reason() {
                return Poll::Ready(Outcome::Close(why));
            }
            if let Err(e) = self.flush(cx, conn) {
                debug!("write failed: {e}");
                return Poll::Ready(Outcome::Close(CloseReason::PeerGone));
            }
            if conn.out.borrow().len() >= max_queued {
                // The client is not reading: stop reading from it too. The
                // pending write wakes us when the socket drains.
                return Poll::Pending;
            }
            if rt.shard.backlogged() {
                rt.shard.paused.borrow_mut().push(cx.waker().clone());
                return Poll::Pending;
            }
            let data = match self.read(cx, rt) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(d)) if d.is_empty() => {
                    return Poll::Ready(Outcome::Close(CloseReason::PeerGone))
                }
                Poll::Ready(Ok(d)) => d,
                Poll::Ready(Err(e)) => {
                    debug!("read failed: {e}");
                    return Poll::Ready(Outcome::Close(CloseReason::PeerGone));
                }
            };
            if let Some(o) = self.process(rt, conn, data) {
                return Poll::Ready(o);
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Reads into the shard-wide buffer and splits off what was read.
    fn read(&mut self, cx: &mut Context<'_>, rt: &Rt) -> Poll<io::Result<BytesMut>> {
        let mut rb = rt.rbuf.borrow_mut();
        if rb.len() < 4096 {
            *rb = BytesMut::zeroed(super::READ_CHUNK);
        }
        match futures_lite::io::AsyncRead::poll_read(Pin::new(&mut self.stream), cx, &mut rb[..]) {
            Poll::Ready(Ok(n)) => Poll::Ready(Ok(rb.split_to(n))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Decodes and handles every complete packet in `data` (after what is
    /// left over from earlier reads).
    fn process(&mut self, rt: &Rt, conn: &Rc<Conn>, mut data: BytesMut) -> Option<Outcome> {
        let use_partial = !self.partial.is_empty();
        if use_partial {
            self.partial.extend_from_slice(&data);
        }
        let buf = if use_partial {
            &mut self.partial
        } else {
            &mut data
        };
        let max = rt.shard.cfg.max_packet_size;
        loop {
            let protocol = conn.state.borrow().protocol;
            match mqtt::decode(buf, protocol, max) {
                Ok(Some(p)) => match client::on_packet(&rt.shard, conn, p) {
                    Flow::Continue => {}
                    Flow::Close(why) => {
                        conn.request_close(why);
                        break;
                    }
                    Flow::Handoff(c) => return Some(Outcome::Handoff(c, buf.split().freeze())),
                },
                Ok(None) => break,
                Err(e) => {
                    conn.request_close(client::on_decode_error(conn, &e));
                    break;
                }
            }
        }
        if use_partial {
            if self.partial.is_empty() {
                self.partial = BytesMut::new();
            }
        } else if !data.is_empty() && !conn.is_closing() {
            // Keep only the incomplete packet, not the shard's read chunk.
            self.partial = BytesMut::from(&data[..]);
        }
        None
    }

    /// Writes as much of the queue as the socket takes without blocking.
    /// When it would block, registers for writability with glommio.
    fn flush(&mut self, cx: &mut Context<'_>, conn: &Conn) -> io::Result<()> {
        let fd = self.stream.as_raw_fd();
        let mut q = conn.out.borrow_mut();
        while !q.is_empty() {
            let mut iov = [IoSlice::new(&[]); IOV_MAX];
            let n = q.iovecs(&mut iov);
            match sendmsg(fd, &iov[..n]) {
                Ok(w) => q.advance(w),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // glommio retries the send and, if still blocked, arms a
                    // writability poll that wakes this task.
                    let first = iov[0].to_vec();
                    match Pin::new(&mut self.stream).poll_write(cx, &first) {
                        Poll::Ready(Ok(w)) => q.advance(w),
                        Poll::Ready(Err(e)) => return Err(e),
                        Poll::Pending => return Ok(()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// sendmsg(MSG_DONTWAIT) with iovecs: glommio has no vectored write and
/// leaves sockets in blocking mode (GLOMMIO.md).
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
    let client_id = conn.state.borrow().client_id.clone();
    if why.is_bad_input() {
        Metrics::inc(&rt.shard.metrics.closed_bad_input);
        warn!(shard = rt.shard.id, peer = %conn.peer, client_id = %client_id, reason = ?why, "closing connection: bad input");
    } else {
        debug!(shard = rt.shard.id, peer = %conn.peer, client_id = %client_id, reason = ?why, "closing connection");
    }
    client::server_disconnect(&conn, &why);
    client::on_closed(&rt.shard, &conn, &why);
    // Flush what is queued (CONNACK refusals, DISCONNECT), for a short while.
    let flushed = glommio::timer::timeout(Duration::from_secs(1), async {
        poll_fn(|cx| {
            conn.set_waker(cx.waker());
            match io.flush(cx, &conn) {
                Err(_) => Poll::Ready(()),
                Ok(()) if conn.out.borrow().is_empty() => Poll::Ready(()),
                Ok(()) => Poll::Pending,
            }
        })
        .await;
        Ok(())
    })
    .await;
    if flushed.is_err() {
        debug!(client_id = %client_id, "gave up flushing on close");
    }
    let _ = io.stream.shutdown(std::net::Shutdown::Both).await;
}

/// Moves the connection to the home shard of its client id.
fn handoff(rt: &Rt, io: Io, conn: &Conn, connect: Box<Connect>, rest: Bytes) {
    Metrics::dec(&rt.shard.metrics.connections_current);
    Metrics::inc(&rt.shard.metrics.connections_handed_off);
    // SAFETY: dup(2) of a descriptor we own; the copy is owned from here on.
    let fd = unsafe { libc::dup(io.stream.as_raw_fd()) };
    if fd < 0 {
        warn!(peer = %conn.peer, "cannot hand off connection: {}", io::Error::last_os_error());
        return;
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    drop(io);
    let home = home_shard(&connect.client_id, rt.shard.n);
    let h = Handoff {
        fd,
        peer: conn.peer,
        connect,
        rest,
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
        connect,
        rest,
    } = h;
    // SAFETY: `fd` is a connected TCP socket we own.
    let stream = unsafe { TcpStream::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
    let conn = rt.shard.new_conn(peer);
    debug!(shard = rt.shard.id, peer = %peer, client_id = %connect.client_id, "adopted connection");
    glommio::spawn_local(run(
        rt.clone(),
        stream,
        conn,
        Some(Initial { connect, rest }),
    ))
    .detach();
}
