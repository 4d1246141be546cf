//! TLS under MQTT or WebSocket (`--tls`), without I/O: the rustls client
//! configuration (ring provider), built once per process and shared by its
//! connections, and the per-connection state that `conn` drives from its
//! non-blocking read and write paths with rustls's buffered
//! [`ClientConnection`].
//!
//! Data flow of a TLS connection:
//! - read: the socket fills the executor's read buffer, [`TlsState::feed`]
//!   hands it to rustls (`read_tls` from the slice, `process_new_packets`)
//!   and appends the plaintext to the executor's plaintext buffer; only
//!   rustls keeps bytes between reads (a partial record).
//! - write: MQTT (or WebSocket frames) go to the connection's `out` as for
//!   plain TCP; [`TlsState::encrypt`] moves them into rustls and the
//!   records into `cipher`, which `conn` writes to the socket.
//!
//! Memory: only TLS clients have a `TlsState` (boxed). Idle, it holds the
//! rustls connection (keys, a 4 KiB receive buffer rustls keeps) and no
//! `cipher` buffer.

use crate::cli::TlsSettings;
use bytes::{Buf, BufMut, BytesMut};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::io::{Read, Write};
use std::sync::Arc;

/// What every TLS connection of a process shares.
pub struct TlsClient {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

/// The name loadgen sends as SNI and verifies when `--server-name` is not
/// given: the host, or `localhost` when the host is an IP address (a test
/// broker's certificate usually names `localhost`; `--server-name
/// 127.0.0.1` verifies an IP address entry instead).
pub fn default_server_name(host: &str) -> String {
    if host.parse::<std::net::IpAddr>().is_ok() {
        "localhost".into()
    } else {
        host.into()
    }
}

impl TlsClient {
    pub fn new(s: &TlsSettings) -> Result<TlsClient, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?;
        let mut config = match (&s.ca_pem, s.insecure) {
            (_, true) => {
                let schemes = provider
                    .signature_verification_algorithms
                    .supported_schemes();
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoVerify(schemes)))
                    .with_no_client_auth()
            }
            (Some(pem), false) => builder
                .with_root_certificates(roots(pem)?)
                .with_no_client_auth(),
            (None, false) => return Err("--tls needs --cafile or --insecure".into()),
        };
        // Off by default: every connection a full handshake (the cost a
        // broker pays per new client), unless --tls-resume.
        config.resumption = if s.resume {
            Resumption::in_memory_sessions(256)
        } else {
            Resumption::disabled()
        };
        let server_name = ServerName::try_from(s.server_name.clone()).map_err(|_| {
            format!(
                "--server-name {:?} is neither a DNS name nor an IP address",
                s.server_name
            )
        })?;
        Ok(TlsClient {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// The CA certificates of `--cafile`.
fn roots(pem: &str) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let c = c.map_err(|e| format!("--cafile: bad PEM: {e}"))?;
        store
            .add(c)
            .map_err(|e| format!("--cafile: unusable CA certificate: {e}"))?;
    }
    if store.is_empty() {
        return Err("--cafile: no CERTIFICATE in the file".into());
    }
    Ok(store)
}

/// `--insecure`: accepts any certificate. Handshake signatures are not
/// checked either: without a verified certificate they prove nothing, and
/// skipping them keeps loadgen's CPU for driving the broker (the broker
/// signs either way).
#[derive(Debug)]
struct NoVerify(Vec<SignatureScheme>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.clone()
    }
}

/// What to check, for the errors a wrong setting causes.
fn hint(e: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            " (is --cafile the CA that signed the broker's certificate?)"
        }
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => " (see --server-name)",
        _ => "",
    }
}

/// One connection's TLS layer.
pub struct TlsState {
    conn: ClientConnection,
    /// Records waiting for the socket (empty and unallocated when idle).
    pub cipher: BytesMut,
    /// The broker sent close_notify: no more data will come.
    pub peer_closed: bool,
    close_sent: bool,
}

impl TlsState {
    /// A new client connection; its ClientHello is ready in `cipher` after
    /// the first [`TlsState::encrypt`].
    pub fn new(c: &TlsClient) -> Result<TlsState, String> {
        let conn = ClientConnection::new(c.config.clone(), c.server_name.clone())
            .map_err(|e| format!("TLS: {e}"))?;
        Ok(TlsState {
            conn,
            cipher: BytesMut::new(),
            peer_closed: false,
            close_sent: false,
        })
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// The handshake resumed a session (`--tls-resume`).
    pub fn resumed(&self) -> bool {
        self.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    /// Takes bytes read from the socket, appends the plaintext they
    /// complete to `plain`. Errors are the report's reason text.
    pub fn feed(&mut self, mut input: &[u8], plain: &mut BytesMut) -> Result<(), String> {
        while !input.is_empty() && !self.peer_closed {
            // rustls copies at most ~4 KiB per call into its record buffer;
            // processing after each call keeps that buffer from filling.
            match self.conn.read_tls(&mut input) {
                Ok(0) => return Err("TLS: record buffer full".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("TLS: {e}")),
            }
            let io = match self.conn.process_new_packets() {
                Ok(io) => io,
                Err(e) => {
                    let why = if self.conn.is_handshaking() {
                        format!("TLS handshake failed: {e}{}", hint(&e))
                    } else {
                        format!("TLS error: {e}")
                    };
                    // The alert rustls queued, for the last write.
                    self.drain();
                    return Err(why);
                }
            };
            let n = io.plaintext_bytes_to_read();
            if n > 0 {
                let start = plain.len();
                plain.resize(start + n, 0);
                self.conn
                    .reader()
                    .read_exact(&mut plain[start..])
                    .map_err(|e| format!("TLS: {e}"))?;
            }
            if io.peer_has_closed() {
                self.peer_closed = true;
            }
        }
        Ok(())
    }

    /// Moves plaintext from `out` into TLS records in `cipher`, while
    /// `cipher` holds less than `high` bytes (what stays in `out` is the
    /// writer's back-pressure, as without TLS). With `closing`, once `out`
    /// is empty, adds close_notify.
    pub fn encrypt(&mut self, out: &mut BytesMut, high: usize, closing: bool) {
        loop {
            self.drain();
            if out.is_empty() || self.cipher.len() >= high {
                break;
            }
            // Before the handshake completes rustls keeps the plaintext
            // (up to its 64 KiB limit); afterwards it encrypts at once.
            match self.conn.writer().write(&out[..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.advance(n),
            }
        }
        if closing && out.is_empty() && !self.close_sent && !self.conn.is_handshaking() {
            self.conn.send_close_notify();
            self.close_sent = true;
            self.drain();
        }
    }

    /// rustls's pending records -> `cipher`.
    fn drain(&mut self) {
        let mut w = (&mut self.cipher).writer();
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut w).is_err() {
                break;
            }
        }
    }

    /// Nothing left to write: neither records in `cipher` nor any that
    /// rustls has yet to hand over.
    pub fn idle(&self) -> bool {
        self.cipher.is_empty() && !self.conn.wants_write()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::quickcheck;
    use rustls::{ServerConfig, ServerConnection};
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    struct Pki {
        ca_pem: String,
        cert: CertificateDer<'static>,
        key: Vec<u8>,
    }

    /// A CA (of its own name) and a certificate for `localhost` signed by it.
    fn pki() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, format!("loadgen test CA {n}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = p.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        Pki {
            ca_pem: ca.pem(),
            cert: cert.der().clone(),
            key: key.serialize_der(),
        }
    }

    fn server(pki: &Pki) -> ServerConnection {
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![pki.cert.clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key.clone())),
                )
                .unwrap();
        let mut s = ServerConnection::new(Arc::new(config)).unwrap();
        s.set_buffer_limit(None);
        s
    }

    /// Feeds the client's records to the server (rustls takes ~4 KiB per
    /// `read_tls`); returns the plaintext the server received.
    fn to_server_side(server: &mut ServerConnection, mut wire: &[u8]) -> Result<Vec<u8>, String> {
        let mut got = Vec::new();
        while !wire.is_empty() {
            server.read_tls(&mut wire).unwrap();
            let io = server
                .process_new_packets()
                .map_err(|e| format!("server: {e}"))?;
            let mut buf = vec![0u8; io.plaintext_bytes_to_read()];
            server.reader().read_exact(&mut buf).unwrap();
            got.extend(buf);
        }
        Ok(got)
    }

    fn settings(ca_pem: Option<String>, insecure: bool, name: &str) -> TlsSettings {
        TlsSettings {
            ca_pem,
            insecure,
            server_name: name.into(),
            resume: false,
        }
    }

    /// Runs client and server in memory, the client's input cut into
    /// pieces of the given sizes; the client sends `to_server` from the
    /// start (kept by rustls until the handshake ends), the server sends
    /// `to_client` once it can. Returns what each side received, or the
    /// client's error.
    fn exchange(
        client: &TlsClient,
        server: &mut ServerConnection,
        to_server: &[u8],
        to_client: &[u8],
        cuts: &[u16],
    ) -> Result<(Vec<u8>, Vec<u8>), String> {
        let mut c = TlsState::new(client)?;
        let mut out = BytesMut::from(to_server);
        let mut plain = BytesMut::new();
        let mut got = Vec::new();
        let mut sent = false;
        let mut cuts = cuts.iter().cycle();
        for _ in 0..200 {
            // Client -> server, in records of at most `high` bytes at once.
            c.encrypt(&mut out, 1024, false);
            let wire = std::mem::take(&mut c.cipher);
            got.extend(to_server_side(server, &wire)?);
            if !server.is_handshaking() && !sent {
                server.writer().write_all(to_client).unwrap();
                sent = true;
            }
            // Server -> client, cut into pieces.
            let mut wire = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            let mut rest = &wire[..];
            while !rest.is_empty() {
                let n = cuts
                    .next()
                    .map_or(rest.len(), |c| usize::from(*c) % 5000 + 1)
                    .min(rest.len());
                c.feed(&rest[..n], &mut plain)?;
                rest = &rest[n..];
            }
            let all_up = out.is_empty() && got.len() == to_server.len() && c.idle();
            if sent && all_up && plain.len() == to_client.len() {
                break;
            }
        }
        Ok((got, plain.to_vec()))
    }

    #[test]
    fn verified_handshake_and_data() {
        let pki = pki();
        let client =
            TlsClient::new(&settings(Some(pki.ca_pem.clone()), false, "localhost")).unwrap();
        let up: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let down: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        let (got, plain) = exchange(&client, &mut server(&pki), &up, &down, &[]).unwrap();
        assert_eq!(got, up);
        assert_eq!(plain, down);
    }

    #[test]
    fn wrong_ca_and_wrong_name_fail_clearly() {
        let pki = pki();
        let other = pki_other_ca();
        let client = TlsClient::new(&settings(Some(other), false, "localhost")).unwrap();
        let e = exchange(&client, &mut server(&pki), b"x", b"y", &[]).unwrap_err();
        assert!(
            e.starts_with("TLS handshake failed: invalid peer certificate"),
            "{e}"
        );
        assert!(e.contains("UnknownIssuer"), "{e}");
        assert!(e.ends_with("(is --cafile the CA that signed the broker's certificate?)"));
        let client =
            TlsClient::new(&settings(Some(pki.ca_pem.clone()), false, "broker.example")).unwrap();
        let e = exchange(&client, &mut server(&pki), b"x", b"y", &[]).unwrap_err();
        assert!(
            e.starts_with("TLS handshake failed: invalid peer certificate"),
            "{e}"
        );
        assert!(
            e.contains("broker.example") && e.ends_with("(see --server-name)"),
            "{e}"
        );
    }

    fn pki_other_ca() -> String {
        pki().ca_pem
    }

    #[test]
    fn insecure_accepts_any_certificate() {
        let pki = pki();
        let client = TlsClient::new(&settings(None, true, "whatever.example")).unwrap();
        let (got, plain) = exchange(&client, &mut server(&pki), b"hello", b"world", &[]).unwrap();
        assert_eq!((&got[..], &plain[..]), (&b"hello"[..], &b"world"[..]));
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(TlsClient::new(&settings(None, false, "localhost")).is_err());
        let e = TlsClient::new(&settings(Some("not pem".into()), false, "localhost"))
            .err()
            .unwrap();
        assert!(e.contains("no CERTIFICATE"), "{e}");
        let pki = pki();
        assert!(TlsClient::new(&settings(Some(pki.ca_pem), false, "bad name!")).is_err());
        assert_eq!(default_server_name("127.0.0.1"), "localhost");
        assert_eq!(default_server_name("broker.lan"), "broker.lan");
    }

    #[test]
    fn close_notify_both_ways() {
        let pki = pki();
        let client = TlsClient::new(&settings(None, true, "localhost")).unwrap();
        let mut srv = server(&pki);
        let mut c = TlsState::new(&client).unwrap();
        let mut out = BytesMut::from(&b"bye"[..]);
        let mut plain = BytesMut::new();
        let mut got = Vec::new();
        for i in 0..10 {
            // DISCONNECT and close_notify come after the handshake.
            c.encrypt(&mut out, 1 << 20, i > 0 && !c.is_handshaking());
            let wire = std::mem::take(&mut c.cipher);
            got.extend(to_server_side(&mut srv, &wire).unwrap());
            let mut wire = Vec::new();
            while srv.wants_write() {
                srv.write_tls(&mut wire).unwrap();
            }
            c.feed(&wire, &mut plain).unwrap();
        }
        assert!(c.close_sent && c.idle());
        assert_eq!(got, b"bye");
        let mut buf = [0u8; 16];
        assert_eq!(srv.reader().read(&mut buf).unwrap(), 0, "close_notify seen");
        srv.send_close_notify();
        let mut wire = Vec::new();
        while srv.wants_write() {
            srv.write_tls(&mut wire).unwrap();
        }
        c.feed(&wire, &mut plain).unwrap();
        assert!(c.peer_closed);
    }

    quickcheck! {
        /// Any cutting of the server's bytes yields the same plaintext.
        fn any_split_same_plaintext(cuts: Vec<u16>) -> bool {
            thread_local!(static PKI: Pki = pki());
            PKI.with(|pki| {
                let client = TlsClient::new(&settings(Some(pki.ca_pem.clone()), false, "localhost")).unwrap();
                let down: Vec<u8> = (0..40_000u32).map(|i| (i * 13) as u8).collect();
                let (got, plain) = exchange(&client, &mut server(pki), b"connect", &down, &cuts).unwrap();
                got == b"connect" && plain == down
            })
        }
    }
}
