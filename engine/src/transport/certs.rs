//! Builds a listener's rustls `ServerConfig` from its PEM files (at start
//! and on SIGHUP, in the main thread: file reads never happen on a shard).
//!
//! Crypto provider: *ring*. It builds with the C compiler alone (aws-lc-rs,
//! rustls's default, needs a longer C build), and on x86-64 its AES-GCM,
//! ChaCha20-Poly1305, X25519 and P-256 are assembly like aws-lc's. Without
//! aws-lc, rustls offers no post-quantum hybrid key exchange, so a
//! handshake costs one X25519 (or P-256) exchange, not X25519MLKEM768.
//! TLS 1.2 and 1.3 only (rustls has nothing older).

use crate::config::{ListenProtocol, Listener, TlsFiles};
use rustls::crypto::CryptoProvider;
use rustls::server::{ProducesTickets, ServerConfig, WebPkiClientVerifier};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// The crypto provider every TLS listener uses: ring, with the cipher
/// suites in the server's order of preference, AES-128-GCM with SHA-256
/// first. Most clients list AES-256-GCM-SHA384 first; its SHA-384 runs in
/// software (no CPU instruction), while SHA-256 has one (SHA-NI) on
/// current x86-64 and ARMv8. A full TLS 1.3 handshake hashes its
/// transcript and derives its keys with that hash: in a connect-storm
/// profile SHA-512 blocks were 8.5% of the broker's CPU.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::*;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// A session-ticket key generator for one listener, kept across reloads
/// (tickets issued before a SIGHUP stay valid) and stateless (no session
/// cache shared between shards).
pub fn ticketer() -> Result<Arc<dyn ProducesTickets>, String> {
    rustls::crypto::ring::Ticketer::new().map_err(|e| format!("cannot create a TLS ticketer: {e}"))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificate file {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid certificate file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read private key {}: {e}", path.display()))
}

/// The server configuration of a TLS listener.
pub fn server_config(
    l: &Listener,
    files: &TlsFiles,
    ticketer: Arc<dyn ProducesTickets>,
) -> Result<Arc<ServerConfig>, String> {
    let provider = provider();
    let chain = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| format!("invalid CA certificate in {}: {e}", ca.display()))?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let v = if files.require_client_cert {
                v
            } else {
                v.allow_unauthenticated()
            };
            let v = v
                .build()
                .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "certificate {} and key {} do not form a usable pair: {e}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    cfg.alpn_protocols = vec![match l.protocol {
        ListenProtocol::Mqtt => b"mqtt".to_vec(),
        ListenProtocol::Ws | ListenProtocol::Http => b"http/1.1".to_vec(),
    }];
    // The order above, not the client's, picks the suite.
    cfg.ignore_client_order = true;
    cfg.ticketer = ticketer;
    cfg.send_tls13_tickets = 1;
    Ok(Arc::new(cfg))
}

/// The client configuration of a bridge's TLS link: the remote's
/// certificate is checked against `ca` (else the system's roots in
/// `/etc/ssl/certs/ca-certificates.crt`); `cert` and `key` identify this
/// broker to the remote, if given.
pub fn client_config(
    tls: Option<&crate::config::bridge::BridgeTls>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
    let ca = tls
        .and_then(|t| t.ca.clone())
        .unwrap_or_else(|| SYSTEM_ROOTS.into());
    let mut roots = RootCertStore::empty();
    for c in read_certs(&ca)? {
        // The system bundle holds a few certificates webpki cannot use.
        if roots.add(c).is_err() && tls.and_then(|t| t.ca.as_ref()).is_some() {
            return Err(format!("invalid CA certificate in {}", ca.display()));
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots);
    let cfg = match tls.map(|t| (&t.cert, &t.key)) {
        Some((Some(cert), Some(key))) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .map_err(|e| format!("client certificate {}: {e}", cert.display()))?,
        Some((None, None)) | None => builder.with_no_client_auth(),
        Some(_) => return Err("tls: cert and key go together".into()),
    };
    Ok(Arc::new(cfg))
}
