//! TLS for one connection: rustls's *unbuffered* server API, fed from the
//! shard's buffers. No I/O here: the connection task hands in the bytes it
//! read and writes out what lands in the wire queue.
//!
//! Why the unbuffered API: the buffered `ServerConnection` keeps its own
//! input and output buffers per connection; here ciphertext is read into
//! the shard-wide read buffer, only an incomplete record is kept (and
//! copied out), and encrypted records go straight into the connection's
//! wire queue. An idle TLS connection holds the rustls state (keys and
//! handshake leftovers), no buffers (docs/BENCHMARKS.md measures it).
//!
//! Output: everything queued for one flush is gathered (up to
//! [`WRITE_CHUNK`]) and encrypted in one `encrypt` call, so it leaves in as
//! few records as the 16 KiB record limit allows. The gathering copy goes
//! into a shard-wide scratch buffer; records are written into a shard-wide
//! chunk and queued as shared slices of it (no allocation per flush).

use crate::broker::conn::OutQueue;
use bytes::{Buf, BytesMut};
use rustls::server::{ServerConfig, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use std::cell::RefCell;
use std::io::IoSlice;
use std::sync::Arc;

/// Plaintext encrypted per step of a flush (four full records).
pub const WRITE_CHUNK: usize = 64 * 1024;
/// Record overhead reserved per 16 KiB record: header (5), explicit nonce
/// (TLS 1.2 GCM: 8), tag (16), TLS 1.3 content type (1), rounded up.
const RECORD_OVERHEAD: usize = 32;
const MAX_FRAGMENT: usize = 16 * 1024;
/// Size of the shard-wide chunk that records are encrypted into.
const OUT_CHUNK: usize = 128 * 1024;

thread_local! {
    /// Plaintext gathered from a connection's queue for one `encrypt`.
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Encrypted records are written here and split off as shared slices.
    static OUT: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// One connection's TLS state.
pub struct Tls {
    conn: UnbufferedServerConnection,
    /// Received bytes that do not complete a record yet (unallocated
    /// while empty).
    inbuf: BytesMut,
    /// The handshake is done: application data may be written.
    ready: bool,
    /// The peer sent close_notify.
    peer_closed: bool,
    /// close_notify is queued.
    close_sent: bool,
}

/// What happened to the bytes handed to [`Tls::read`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReadOutcome {
    /// The handshake completed during this read.
    pub handshake_done: bool,
    /// The peer closed the TLS session (close_notify).
    pub peer_closed: bool,
}

impl Tls {
    pub fn new(cfg: Arc<ServerConfig>) -> Result<Tls, rustls::Error> {
        Ok(Tls {
            conn: UnbufferedServerConnection::new(cfg)?,
            inbuf: BytesMut::new(),
            ready: false,
            peer_closed: false,
            close_sent: false,
        })
    }

    /// The handshake is done.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Takes bytes from the socket: application data is decrypted and
    /// appended to `plain`, handshake records are queued on `wire`.
    /// An error means the connection must be closed.
    pub fn read(
        &mut self,
        data: BytesMut,
        plain: &mut BytesMut,
        wire: &mut OutQueue,
    ) -> Result<ReadOutcome, rustls::Error> {
        let mut buf = if self.inbuf.is_empty() {
            data
        } else {
            self.inbuf.extend_from_slice(&data);
            std::mem::take(&mut self.inbuf)
        };
        let was_ready = self.ready;
        let r = self.pump(&mut buf, Some(plain), wire, None);
        if !buf.is_empty() {
            // Keep only the incomplete record, not the shard's read chunk.
            self.inbuf = BytesMut::from(&buf[..]);
        }
        r?;
        Ok(ReadOutcome {
            handshake_done: !was_ready && self.ready,
            peer_closed: self.peer_closed,
        })
    }

    /// Encrypts up to [`WRITE_CHUNK`] bytes of `src` into `wire` (nothing
    /// before the handshake is done). Returns how many plaintext bytes
    /// were taken from `src`.
    pub fn write(
        &mut self,
        src: &mut OutQueue,
        wire: &mut OutQueue,
    ) -> Result<usize, rustls::Error> {
        if !self.ready || self.close_sent || src.is_empty() {
            return Ok(0);
        }
        GATHER.with(|g| {
            let mut g = g.borrow_mut();
            g.clear();
            let mut iov = [IoSlice::new(&[]); 64];
            let n = src.iovecs(&mut iov);
            for s in &iov[..n] {
                let take = s.len().min(WRITE_CHUNK - g.len());
                g.extend_from_slice(&s[..take]);
                if g.len() == WRITE_CHUNK {
                    break;
                }
            }
            let mut empty = BytesMut::new();
            self.pump(&mut empty, None, wire, Some(&g))?;
            src.advance(g.len());
            Ok(g.len())
        })
    }

    /// close_notify is queued.
    pub fn close_queued(&self) -> bool {
        self.close_sent
    }

    /// Queues close_notify (once, after the handshake).
    pub fn close(&mut self, wire: &mut OutQueue) {
        if !self.ready || self.close_sent {
            return;
        }
        let mut empty = BytesMut::new();
        let _ = self.pump(&mut empty, None, wire, Some(&[]));
    }

    /// The subject common name of the client's certificate, if it sent one.
    pub fn peer_common_name(&self) -> Option<String> {
        let der = self.conn.peer_certificates()?.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let cn = cert.subject().iter_common_name().next()?;
        cn.as_str().ok().map(str::to_owned)
    }

    /// Drives rustls until it needs more input (or, with `send`, until it
    /// has encrypted `send`; an empty `send` queues close_notify).
    fn pump(
        &mut self,
        buf: &mut BytesMut,
        mut plain: Option<&mut BytesMut>,
        wire: &mut OutQueue,
        send: Option<&[u8]>,
    ) -> Result<(), rustls::Error> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut buf[..]);
            let stop = match state? {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec?;
                        discard += rec.discard;
                        match plain.as_deref_mut() {
                            Some(p) => p.extend_from_slice(rec.payload),
                            // Only reads bring application data.
                            None => return Err(rustls::Error::General("unexpected data".into())),
                        }
                    }
                    false
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    let mut out = vec![0u8; 4096];
                    let n = match e.encode(&mut out) {
                        Ok(n) => n,
                        Err(EncodeError::InsufficientSize(s)) => {
                            out.resize(s.required_size, 0);
                            e.encode(&mut out)
                                .map_err(|e| rustls::Error::General(e.to_string()))?
                        }
                        Err(e) => return Err(rustls::Error::General(e.to_string())),
                    };
                    wire.push_bytes(&out[..n]);
                    false
                }
                // Queued on `wire`: the connection task writes it next.
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    false
                }
                ConnectionState::BlockedHandshake => true,
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    false
                }
                ConnectionState::Closed => true,
                ConnectionState::WriteTraffic(mut w) => {
                    self.ready = true;
                    if let Some(data) = send {
                        if data.is_empty() {
                            encrypt_into(wire, RECORD_OVERHEAD, |out| w.queue_close_notify(out))?;
                            self.close_sent = true;
                        } else {
                            let need =
                                data.len() + data.len().div_ceil(MAX_FRAGMENT) * RECORD_OVERHEAD;
                            encrypt_into(wire, need, |out| w.encrypt(data, out))?;
                        }
                    }
                    true
                }
                _ => true,
            };
            buf.advance(discard);
            if stop {
                return Ok(());
            }
        }
    }
}

/// Runs `f` on a slice of the shard's output chunk of at least `need`
/// bytes (more if `f` says so) and queues what it wrote, shared.
fn encrypt_into(
    wire: &mut OutQueue,
    mut need: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> Result<(), rustls::Error> {
    OUT.with(|o| {
        let mut o = o.borrow_mut();
        loop {
            if o.len() < need {
                // Reuses the chunk in place once every slice of it was
                // written and dropped, else allocates a new one.
                o.clear();
                o.reserve(need.max(OUT_CHUNK));
                let cap = o.capacity();
                o.resize(cap, 0);
            }
            match f(&mut o[..need]) {
                Ok(n) => {
                    wire.push_shared(o.split_to(n).freeze());
                    return Ok(());
                }
                Err(EncryptError::InsufficientSize(s)) if s.required_size > need => {
                    need = s.required_size;
                }
                Err(e) => return Err(rustls::Error::General(e.to_string())),
            }
        }
    })
}
