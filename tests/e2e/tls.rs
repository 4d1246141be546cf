//! TLS (mqtts, wss), client certificates, certificate reload and the
//! PROXY protocol, against the real binary. Certificates are made here
//! (rcgen), never committed.

use crate::harness::*;
use rumqttc::{MqttOptions, QoS, TlsConfiguration, Transport};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tarta_proto::mqtt::{self, Packet, Protocol};

const T: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- certificates

/// A test CA and certificates it signed, written to a temporary directory.
pub struct Pki {
    pub dir: PathBuf,
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "tarta-pki-{name}-{}-{}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("Tarta test CA {name}"));
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = p.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        Pki {
            dir,
            ca_cert,
            ca_key,
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issues a certificate; writes `{file}.pem` and `{file}.key`.
    pub fn issue(&self, file: &str, cn: &str, server: bool) -> (PathBuf, PathBuf) {
        let sans = if server {
            vec!["localhost".to_string(), "127.0.0.1".to_string()]
        } else {
            Vec::new()
        };
        let mut p = rcgen::CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.extended_key_usages = vec![if server {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        let (c, k) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration trusting `ca`, with an optional client certificate.
pub fn client_config(ca: &Path, cert: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match cert {
        Some((c, k)) => {
            let chain = CertificateDer::pem_file_iter(c)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            b.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(k).unwrap())
                .unwrap()
        }
        None => b.with_no_client_auth(),
    };
    Arc::new(cfg)
}

/// A blocking TLS connection (raw bytes), or the handshake error.
pub fn tls_open(
    port: u16,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, String> {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut t = rustls::StreamOwned::new(conn, s);
    while t.conn.is_handshaking() {
        t.conn.complete_io(&mut t.sock).map_err(|e| e.to_string())?;
    }
    Ok(t)
}

/// Sends an MQTT 3.1.1 CONNECT over `s` and returns the CONNACK's code.
fn mqtt_connect(s: &mut impl ReadWrite, id: &str, user: Option<&str>) -> Option<u8> {
    let mut c = connect_packet(Protocol::V311, id, true, 30);
    c.username = user.map(Into::into);
    send_packet(s, &Packet::Connect(Box::new(c)));
    match recv_packet(s) {
        Some(Packet::ConnAck(a)) => Some(a.code),
        _ => None,
    }
}

pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn send_packet(s: &mut impl ReadWrite, p: &Packet) {
    let mut b = bytes::BytesMut::new();
    mqtt::encode(p, Protocol::V311, &mut b);
    s.write_all(&b).unwrap();
    s.flush().unwrap();
}

fn recv_packet(s: &mut impl ReadWrite) -> Option<Packet> {
    let mut buf = bytes::BytesMut::new();
    loop {
        if let Ok(Some(p)) = mqtt::decode(&mut buf, Protocol::V311, u32::MAX) {
            return Some(p);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

// ---------------------------------------------------------------- brokers

/// A broker with all four stackings (tcp, ws, tls, wss) on one certificate.
fn four_stackings(pki: &Pki) -> Broker {
    let (c, k) = pki.issue("server", "localhost", true);
    let (c, k) = (c.to_str().unwrap(), k.to_str().unwrap());
    Broker::start_with(&[
        "--mqtts",
        "127.0.0.1:0",
        "--wss",
        "127.0.0.1:0",
        "--cert",
        c,
        "--key",
        k,
    ])
}

/// A broker configured by a TOML file: top-level keys `top`, a plain TCP
/// listener (for `$SYS` counters), then the `listeners` tables.
fn with_config(name: &str, top: &str, listeners: &str, extra: &[&str]) -> (Broker, PathBuf) {
    let dir = std::env::temp_dir().join(format!("tarta-cfg-{name}-{}", rand_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tarta.toml");
    let text = format!("{top}\n[[listener]]\nbind = \"127.0.0.1:0\"\n\n{listeners}");
    std::fs::write(&path, text).unwrap();
    let mut args = vec!["--config", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let b = Broker::start_bare(Command::new(env!("CARGO_BIN_EXE_tarta")), &args);
    (b, dir)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stack {
    Tcp,
    Ws,
    Tls,
    Wss,
}

const STACKS: [Stack; 4] = [Stack::Tcp, Stack::Ws, Stack::Tls, Stack::Wss];

fn opts(b: &Broker, stack: Stack, id: &str, ca: &Path) -> MqttOptions {
    let tls = || TlsConfiguration::Rustls(client_config(ca, None));
    let mut o = match stack {
        Stack::Tcp => rq::opts(b.port, id),
        Stack::Ws => rq_ws_opts(b.ws_port, id),
        Stack::Tls => {
            let mut o = rq::opts(b.port_of("tls"), id);
            o.set_transport(Transport::tls_with_config(tls()));
            o
        }
        Stack::Wss => {
            let port = b.port_of("wss");
            let mut o = MqttOptions::new(id, format!("wss://localhost:{port}/mqtt"), port);
            o.set_transport(Transport::wss_with_config(tls()));
            o
        }
    };
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(4 << 20, 4 << 20);
    o
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn four_stackings_talk_to_each_other_across_shards() {
    let pki = Pki::new("four");
    let b = four_stackings(&pki);
    let ca = pki.ca();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let mut subs = Vec::new();
        for s in STACKS {
            let mut c = rq::connect(opts(&b, s, &id_on(1, &format!("fs-sub-{s:?}")), &ca)).await;
            c.subscribe(&format!("fs/{s:?}/+"), qos).await;
            subs.push(c);
        }
        let mut pubs = Vec::new();
        for s in STACKS {
            pubs.push(rq::connect(opts(&b, s, &id_on(0, &format!("fs-pub-{s:?}")), &ca)).await);
        }
        for i in 0..10 {
            for (p, from) in pubs.iter().zip(STACKS) {
                for to in STACKS {
                    let topic = format!("fs/{to:?}/{from:?}");
                    p.client
                        .publish(topic, qos, false, format!("{i}"))
                        .await
                        .unwrap();
                }
            }
        }
        for (sub, to) in subs.iter_mut().zip(STACKS) {
            let got = sub.drain_publishes(Duration::from_millis(800)).await;
            for from in STACKS {
                let topic = format!("fs/{to:?}/{from:?}");
                let seq: Vec<String> = got
                    .iter()
                    .filter(|p| p.topic == topic)
                    .map(|p| String::from_utf8(p.payload.to_vec()).unwrap())
                    .collect();
                let want: Vec<String> = (0..10).map(|i| i.to_string()).collect();
                assert_eq!(seq, want, "{qos:?} {from:?} -> {to:?}");
            }
        }
        for c in subs.into_iter().chain(pubs) {
            c.disconnect().await;
        }
    }
}

#[tokio::test]
async fn sessions_survive_a_move_between_tcp_and_tls_and_take_over_works() {
    let pki = Pki::new("sess");
    let b = four_stackings(&pki);
    let ca = pki.ca();
    let id = id_on(1, "tls-sess");
    let publ = rq::connect(opts(&b, Stack::Tcp, &id_on(0, "tls-sess-pub"), &ca)).await;
    // A persistent session over TLS, queued while away.
    let mut o = opts(&b, Stack::Tls, &id, &ca);
    o.set_clean_session(false);
    let mut s = rq::connect(o.clone()).await;
    s.subscribe("tsess/#", QoS::AtLeastOnce).await;
    s.disconnect().await;
    publ.client
        .publish("tsess/q", QoS::AtLeastOnce, false, "while away")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Back over plain TCP: the same session.
    let mut back = opts(&b, Stack::Tcp, &id, &ca);
    back.set_clean_session(false);
    let mut tcp = rq::connect(back).await;
    let p = tcp.next_publish(T).await.expect("queued message");
    assert_eq!(&p.payload[..], b"while away");
    // A TLS connection with the same id takes it over...
    let mut tls = rq::connect(o).await;
    assert!(
        tcp.task.await.unwrap().is_some(),
        "the TCP connection was closed by the take-over"
    );
    // ... and gets what follows.
    publ.client
        .publish("tsess/after", QoS::AtLeastOnce, false, "after")
        .await
        .unwrap();
    let p = tls.next_publish(T).await.expect("delivery after take-over");
    assert_eq!(&p.payload[..], b"after");
}

#[tokio::test]
async fn one_mebibyte_message_over_tls_and_wss() {
    let pki = Pki::new("big");
    let b = four_stackings(&pki);
    let ca = pki.ca();
    let payload: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    for (from, to) in [(Stack::Tls, Stack::Wss), (Stack::Wss, Stack::Tls)] {
        let mut sub = rq::connect(opts(&b, to, &id_on(1, &format!("big-sub-{to:?}")), &ca)).await;
        sub.subscribe("big/t", QoS::AtLeastOnce).await;
        let mut publ =
            rq::connect(opts(&b, from, &id_on(0, &format!("big-pub-{from:?}")), &ca)).await;
        publ.client
            .publish("big/t", QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
        publ.wait_ack().await;
        let p = sub
            .next_publish(Duration::from_secs(20))
            .await
            .expect("1 MiB delivery");
        assert!(
            p.payload[..] == payload[..],
            "{from:?} -> {to:?}: payload differs"
        );
        sub.disconnect().await;
        publ.disconnect().await;
    }
}

#[test]
fn bad_tls_input_closes_only_that_connection() {
    let pki = Pki::new("bad");
    let (c, k) = pki.issue("server", "localhost", true);
    let body = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\ntls = {{ cert = {:?}, key = {:?} }}\n",
        c, k
    );
    let (b, _dir) = with_config("bad", "connect_timeout = 2", &body, &[]);
    let port = b.port_of("tls");
    let cfg = client_config(&pki.ca(), None);
    // A healthy TLS client, connected throughout.
    let mut good = tls_open(port, cfg.clone()).unwrap();
    assert_eq!(mqtt_connect(&mut good, "good", None), Some(0));

    // 1. A plain MQTT client on the TLS port: closed at once.
    let mut plain = Raw::open(port);
    plain.send(&Packet::Connect(Box::new(connect_packet(
        Protocol::V311,
        "plain",
        true,
        30,
    ))));
    let (got, closed) = plain.until_closed(Duration::from_secs(3));
    assert!(
        got.is_empty() && closed,
        "plain client on a TLS port: {got:?} closed={closed}"
    );
    // 2. Garbage that looks like a handshake record.
    let mut g = TcpStream::connect(("127.0.0.1", port)).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    g.write_all(&[
        0x16, 0x03, 0x01, 0x00, 0x10, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ])
    .unwrap();
    let mut sink = Vec::new();
    let _ = g.read_to_end(&mut sink);
    // 3. A truncated ClientHello that then stalls: closed by connect_timeout.
    let start = Instant::now();
    let mut stall = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stall
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    stall
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .unwrap();
    let mut sink = Vec::new();
    let _ = stall.read_to_end(&mut sink);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "stalled handshake closed after {took:?} (connect_timeout 2 s)"
    );

    // The healthy client was not disturbed.
    send_packet(&mut good, &Packet::PingReq);
    assert!(matches!(recv_packet(&mut good), Some(Packet::PingResp)));
    // Counted (published every second).
    std::thread::sleep(Duration::from_millis(1500));
    assert!(sys_counter(b.port, "tls_failed") >= 2);
    assert!(sys_counter(b.port, "tls_handshakes") >= 1);
}

#[test]
fn client_certificates_name_the_user_for_the_acl() {
    let pki = Pki::new("mtls");
    let other = Pki::new("other");
    let (sc, sk) = pki.issue("server", "localhost", true);
    let (dc, dk) = pki.issue("device7", "device-7", false);
    let (xc, xk) = other.issue("stranger", "device-7", false);
    let acl = pki.dir.join("acl");
    std::fs::write(&acl, "user device-7\ntopic readwrite devices/device-7/#\n").unwrap();
    let body = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\ntls = {{ cert = {sc:?}, key = {sk:?}, client_ca = {:?}, require_client_cert = true, identity_as_username = true }}\n",
        pki.ca()
    );
    let (b, _dir) = with_config("mtls", "", &body, &["--acl-file", acl.to_str().unwrap()]);
    let port = b.port_of("tls");
    // No client certificate: the handshake fails.
    assert!(tls_open(port, client_config(&pki.ca(), None))
        .and_then(|mut s| {
            // TLS 1.3: the server's refusal may only show on first use.
            mqtt_connect(&mut s, "nocert", None).ok_or_else(|| "refused".to_string())
        })
        .is_err());
    // A certificate from another CA: refused.
    assert!(tls_open(port, client_config(&pki.ca(), Some((&xc, &xk))))
        .and_then(
            |mut s| mqtt_connect(&mut s, "stranger", None).ok_or_else(|| "refused".to_string())
        )
        .is_err());
    // device-7's certificate: its CN is the username, whatever CONNECT says.
    let mut sub = tls_open(port, client_config(&pki.ca(), Some((&dc, &dk)))).unwrap();
    assert_eq!(mqtt_connect(&mut sub, "d7-sub", Some("admin")), Some(0));
    let sub_packet = |filter: &str, pid: u16| {
        Packet::Subscribe(mqtt::Subscribe {
            packet_id: pid,
            filters: vec![(
                filter.into(),
                mqtt::SubOptions {
                    qos: mqtt::QoS::AtLeastOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                },
            )],
            properties: Default::default(),
        })
    };
    send_packet(&mut sub, &sub_packet("devices/device-7/#", 1));
    match recv_packet(&mut sub) {
        Some(Packet::SubAck(a)) => assert_eq!(a.codes, vec![1], "own topic allowed"),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    send_packet(&mut sub, &sub_packet("devices/device-8/#", 2));
    match recv_packet(&mut sub) {
        Some(Packet::SubAck(a)) => assert_eq!(a.codes, vec![0x80], "another device's topic denied"),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let mut publ = tls_open(port, client_config(&pki.ca(), Some((&dc, &dk)))).unwrap();
    assert_eq!(mqtt_connect(&mut publ, "d7-pub", None), Some(0));
    send_packet(
        &mut publ,
        &Packet::Publish(mqtt::Publish {
            dup: false,
            qos: mqtt::QoS::AtMostOnce,
            retain: false,
            topic: "devices/device-7/temp".into(),
            packet_id: 0,
            properties: Default::default(),
            payload: bytes::Bytes::from_static(b"21.5"),
        }),
    );
    match recv_packet(&mut sub) {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"21.5"),
        other => panic!("expected the device's publish, got {other:?}"),
    }
}

#[test]
fn sighup_reloads_certificates_without_dropping_connections() {
    let old = Pki::new("old");
    let new = Pki::new("new");
    let dir = old.dir.clone();
    let (c, k) = old.issue("server", "localhost", true);
    let (c, k) = (
        c.to_str().unwrap().to_string(),
        k.to_str().unwrap().to_string(),
    );
    let mut b = Broker::start_with(&["--mqtts", "127.0.0.1:0", "--cert", &c, "--key", &k]);
    let port = b.port_of("tls");
    let mut before = tls_open(port, client_config(&old.ca(), None)).unwrap();
    assert_eq!(mqtt_connect(&mut before, "before", None), Some(0));
    // Replace the files with a certificate from another CA, then SIGHUP.
    let (nc, nk) = new.issue("server", "localhost", true);
    std::fs::copy(&nc, dir.join("server.pem")).unwrap();
    std::fs::copy(&nk, dir.join("server.key")).unwrap();
    unsafe { libc::kill(b.child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + T;
    while !b.log().contains("TLS certificates reloaded") {
        assert!(Instant::now() < deadline, "no reload log line");
        std::thread::sleep(Duration::from_millis(50));
    }
    // New connections get the new certificate.
    let mut after = tls_open(port, client_config(&new.ca(), None)).unwrap();
    assert_eq!(mqtt_connect(&mut after, "after", None), Some(0));
    assert!(tls_open(port, client_config(&old.ca(), None)).is_err());
    // The connection from before is still served.
    send_packet(&mut before, &Packet::PingReq);
    assert!(matches!(recv_packet(&mut before), Some(Packet::PingResp)));
    // A broken file on reload: the current certificate stays.
    std::fs::write(dir.join("server.key"), "not a key").unwrap();
    unsafe { libc::kill(b.child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + T;
    while !b.log().contains("certificates not reloaded") {
        assert!(Instant::now() < deadline, "no reload error logged");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut still = tls_open(port, client_config(&new.ca(), None)).unwrap();
    assert_eq!(mqtt_connect(&mut still, "still", None), Some(0));
    assert!(b.terminate().is_some_and(|s| s.success()));
}

#[test]
fn tls_listener_without_readable_files_is_a_start_error_naming_the_file() {
    let out = Command::new(env!("CARGO_BIN_EXE_tarta"))
        .args([
            "--mqtts",
            "127.0.0.1:0",
            "--cert",
            "/nonexistent/cert.pem",
            "--key",
            "/nonexistent/key.pem",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/nonexistent/cert.pem"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_tarta"))
        .args(["--mqtts", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cert"));
}

// ---------------------------------------------------------------- PROXY protocol

fn proxy_v2(src: std::net::SocketAddrV4, dst: std::net::SocketAddrV4) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src.ip().octets());
    h.extend_from_slice(&dst.ip().octets());
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

#[test]
fn proxy_protocol_gives_the_client_address_and_refuses_untrusted_peers() {
    let pki = Pki::new("proxy");
    let (c, k) = pki.issue("server", "localhost", true);
    let body = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nproxy_protocol = true\ntrusted_proxies = [\"127.0.0.0/8\"]\n\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\ntls = {{ cert = {c:?}, key = {k:?} }}\nproxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\nproxy_protocol = true\ntrusted_proxies = [\"10.9.9.0/24\"]\n"
    );
    let (b, _dir) = with_config("proxy", "", &body, &[]);
    let tcp = b.ports_of("tcp");
    let (proxied, untrusted) = (tcp[1], tcp[2]);
    // v1 in front of MQTT.
    let mut s = TcpStream::connect(("127.0.0.1", proxied)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 1883\r\n")
        .unwrap();
    assert_eq!(mqtt_connect(&mut s, "via-v1", None), Some(0));
    // v2 in front of TLS.
    let mut raw = TcpStream::connect(("127.0.0.1", b.port_of("tls"))).unwrap();
    raw.write_all(&proxy_v2(
        "198.51.100.9:40002".parse().unwrap(),
        "127.0.0.1:8883".parse().unwrap(),
    ))
    .unwrap();
    raw.set_read_timeout(Some(T)).unwrap();
    let conn = rustls::ClientConnection::new(
        client_config(&pki.ca(), None),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut t = rustls::StreamOwned::new(conn, raw);
    assert_eq!(mqtt_connect(&mut t, "via-v2-tls", None), Some(0));
    // The broker saw the clients' addresses.
    drop(s);
    drop(t);
    let deadline = Instant::now() + T;
    loop {
        let log = b.log();
        if log.contains("peer=203.0.113.7:40001") && log.contains("peer=198.51.100.9:40002") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "client addresses not logged:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A malformed header from a trusted peer: closed, nothing answered.
    let mut bad = TcpStream::connect(("127.0.0.1", proxied)).unwrap();
    bad.set_read_timeout(Some(T)).unwrap();
    bad.write_all(b"PROXY TCP4 300.1.1.1 127.0.0.1 1 2\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = bad.read_to_end(&mut got);
    assert!(got.is_empty());
    // A PROXY header from a peer not in trusted_proxies: closed unanswered.
    let mut u = TcpStream::connect(("127.0.0.1", untrusted)).unwrap();
    u.set_read_timeout(Some(T)).unwrap();
    // The broker may close before the CONNECT is written (EPIPE/ECONNRESET
    // on the write is then expected): what matters is that no CONNACK comes.
    let mut c = connect_packet(Protocol::V311, "untrusted", true, 30);
    c.username = None;
    let mut wire = bytes::BytesMut::from(&b"PROXY TCP4 203.0.113.8 127.0.0.1 40003 1883\r\n"[..]);
    mqtt::encode(&Packet::Connect(Box::new(c)), Protocol::V311, &mut wire);
    let _ = u.write_all(&wire);
    if let Some(p) = recv_packet(&mut u) {
        panic!("an untrusted peer was answered: {p:?}");
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(sys_counter(b.port, "proxy_untrusted") >= 1);
    assert!(sys_counter(b.port, "proxy_malformed") >= 1);
}
