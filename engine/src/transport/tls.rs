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
    /// The handshake completed during this read (the client's Finished
    /// arrived: its certificate, if any, is verified). The server may
    /// write earlier (TLS 1.3 "0.5-RTT").
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
        let was_handshaking = self.conn.is_handshaking();
        let r = guard(|| self.pump(&mut buf, Some(plain), wire, None));
        if let Err(e) = r {
            // rustls queued a fatal alert (protocol_version, unknown_ca,
            // certificate_required, ...): send it before closing. rustls
            // must see the same input buffer again (its handshake
            // deframer remembers positions in it).
            let _ = guard(|| {
                self.alert(&mut buf, wire);
                Ok(())
            });
            return Err(e);
        }
        if !buf.is_empty() {
            // Keep only the incomplete record, not the shard's read chunk.
            self.inbuf = BytesMut::from(&buf[..]);
        }
        Ok(ReadOutcome {
            handshake_done: was_handshaking && !self.conn.is_handshaking(),
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
            guard(|| self.pump(&mut empty, None, wire, Some(&g)))?;
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
        let _ = guard(|| self.pump(&mut empty, None, wire, Some(&[])));
    }

    /// After an error: queues the alert rustls has for the peer, if any.
    fn alert(&mut self, buf: &mut BytesMut, wire: &mut OutQueue) {
        for _ in 0..4 {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut buf[..]);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    let mut out = vec![0u8; 512];
                    let n = match e.encode(&mut out) {
                        Ok(n) => n,
                        Err(EncodeError::InsufficientSize(s)) if s.required_size <= 64 * 1024 => {
                            out.resize(s.required_size, 0);
                            match e.encode(&mut out) {
                                Ok(n) => n,
                                Err(_) => return,
                            }
                        }
                        Err(_) => return,
                    };
                    wire.push_bytes(&out[..n]);
                }
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                _ => return,
            }
        }
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
            let state = match state {
                Ok(s) => s,
                Err(e) => {
                    buf.advance(discard);
                    return Err(e);
                }
            };
            let stop = match state {
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

/// Runs a call into rustls so that a panic in it (a bug there, or a misuse
/// here) closes this connection instead of taking the shard down.
fn guard<T>(f: impl FnOnce() -> Result<T, rustls::Error>) -> Result<T, rustls::Error> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(rustls::Error::General("internal error in TLS".into())))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

    fn configs(alpn: &[u8]) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        configs_with(alpn, false)
    }

    /// With `client_auth`, the server requires a client certificate from
    /// a CA the client has no certificate of.
    fn configs_with(
        alpn: &[u8],
        client_auth: bool,
    ) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let der = CertificateDer::from(cert.der().to_vec());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if client_auth {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from(cert.der().to_vec()))
                .unwrap();
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(v)
        } else {
            builder.with_no_client_auth()
        };
        let server = builder
            .with_single_cert(
                vec![der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![alpn.to_vec()];
        let mut server = server;
        server.alpn_protocols = vec![b"mqtt".to_vec()];
        (Arc::new(server), Arc::new(client))
    }

    fn drain(q: &mut OutQueue) -> Vec<u8> {
        let mut v = Vec::new();
        while !q.is_empty() {
            let mut iov = [IoSlice::new(&[]); 64];
            let n = q.iovecs(&mut iov);
            let len: usize = iov[..n].iter().map(|s| s.len()).sum();
            for s in &iov[..n] {
                v.extend_from_slice(s);
            }
            q.advance(len);
        }
        v
    }

    /// Moves the client's output into the server; returns the plaintext
    /// the server got.
    fn to_server(
        c: &mut rustls::ClientConnection,
        s: &mut Tls,
        wire: &mut OutQueue,
    ) -> Result<Vec<u8>, rustls::Error> {
        let mut bytes = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut bytes).unwrap();
        }
        let mut plain = BytesMut::new();
        s.read(BytesMut::from(&bytes[..]), &mut plain, wire)?;
        Ok(plain.to_vec())
    }

    fn to_client(c: &mut rustls::ClientConnection, wire: &mut OutQueue) -> Vec<u8> {
        let bytes = drain(wire);
        let mut rd = &bytes[..];
        let mut out = Vec::new();
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
            let _ = std::io::Read::read_to_end(&mut c.reader(), &mut out);
        }
        out
    }

    /// Feeds what the server queued to the client; returns its error.
    fn client_error(
        c: &mut rustls::ClientConnection,
        wire: &mut OutQueue,
    ) -> Option<rustls::Error> {
        let bytes = drain(wire);
        let mut rd = &bytes[..];
        let mut err = None;
        while !rd.is_empty() && err.is_none() {
            c.read_tls(&mut rd).unwrap();
            err = c.process_new_packets().err();
        }
        err
    }

    #[test]
    fn handshake_data_both_ways_and_one_record_per_flush() {
        let (sc, cc) = configs(b"mqtt");
        let mut s = Tls::new(sc).unwrap();
        let mut c =
            rustls::ClientConnection::new(cc, ServerName::try_from("localhost").unwrap()).unwrap();
        let mut wire = OutQueue::default();
        std::io::Write::write_all(&mut c.writer(), b"CONNECT").unwrap();
        for _ in 0..4 {
            let got = to_server(&mut c, &mut s, &mut wire).unwrap();
            to_client(&mut c, &mut wire);
            if !got.is_empty() {
                assert_eq!(got, b"CONNECT");
                break;
            }
        }
        assert!(s.is_ready() && !c.is_handshaking());
        // Many small packets queued: one flush, one record.
        let mut q = OutQueue::default();
        for i in 0..100u8 {
            q.push_bytes(&[0x30, 2, 0, i]);
        }
        assert_eq!(s.write(&mut q, &mut wire).unwrap(), 400);
        let bytes = drain(&mut wire);
        assert_eq!(bytes[0], 23, "application data record");
        let len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
        assert_eq!(bytes.len(), 5 + len, "a single record");
        let mut rd = &bytes[..];
        c.read_tls(&mut rd).unwrap();
        c.process_new_packets().unwrap();
        let mut out = Vec::new();
        let _ = std::io::Read::read_to_end(&mut c.reader(), &mut out);
        assert_eq!(out.len(), 400);
        assert_eq!(&out[396..], &[0x30, 2, 0, 99]);
        // A large queue goes out in full records.
        let mut q = OutQueue::default();
        q.push_shared(bytes::Bytes::from(vec![7u8; 200_000]));
        let mut sent = 0;
        while !q.is_empty() {
            sent += s.write(&mut q, &mut wire).unwrap();
        }
        assert_eq!(sent, 200_000);
        assert_eq!(to_client(&mut c, &mut wire).len(), 200_000);
        // close_notify reaches the client.
        s.close(&mut wire);
        to_client(&mut c, &mut wire);
        assert!(s.close_queued());
    }

    /// The client's last flight (an empty Certificate, Finished) is
    /// refused with an alert. (tests/e2e/tls.rs drives the same case over
    /// a socket, where handing rustls an empty buffer for the alert made
    /// its handshake deframer panic.)
    #[test]
    fn a_missing_client_certificate_is_refused_with_an_alert() {
        let (sc, cc) = configs_with(b"mqtt", true);
        let mut s = Tls::new(sc).unwrap();
        let mut c =
            rustls::ClientConnection::new(cc, ServerName::try_from("localhost").unwrap()).unwrap();
        let mut wire = OutQueue::default();
        let mut failed = None;
        for _ in 0..4 {
            match to_server(&mut c, &mut s, &mut wire) {
                Ok(_) => {
                    let bytes = drain(&mut wire);
                    let mut rd = &bytes[..];
                    while !rd.is_empty() {
                        c.read_tls(&mut rd).unwrap();
                        c.process_new_packets().unwrap();
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        assert!(
            matches!(failed, Some(rustls::Error::NoCertificatesPresented)),
            "{failed:?}"
        );
        let err = client_error(&mut c, &mut wire);
        assert!(
            matches!(err, Some(rustls::Error::AlertReceived(_))),
            "{err:?}"
        );
    }

    #[test]
    fn a_refused_handshake_sends_its_alert() {
        let (sc, cc) = configs(b"not-mqtt");
        let mut s = Tls::new(sc).unwrap();
        let mut c =
            rustls::ClientConnection::new(cc, ServerName::try_from("localhost").unwrap()).unwrap();
        let mut wire = OutQueue::default();
        assert!(to_server(&mut c, &mut s, &mut wire).is_err());
        // The client learns why (under TLS 1.3 the alert is encrypted).
        let err = client_error(&mut c, &mut wire);
        assert_eq!(
            err,
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::NoApplicationProtocol
            ))
        );
    }
}
