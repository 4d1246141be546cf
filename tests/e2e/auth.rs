//! Authentication against a Mosquitto-format password file (written by
//! `tarta passwd`), over TCP, WebSocket and TLS; the ACL per authenticated
//! user; SIGHUP reload of both; the graceful close.

use crate::harness::*;
use crate::tls::{client_config, tls_open, Pki};
use bytes::BytesMut;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tarta_proto::mqtt::{self, Connect, Packet, Protocol, QoS};

/// What a refused login waits before its CONNACK in these tests.
const DELAY_MS: u64 = 250;

fn tarta_passwd(args: &[&str]) {
    let st = Command::new(env!("CARGO_BIN_EXE_tarta"))
        .arg("passwd")
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "tarta passwd {args:?}");
}

/// A directory with `pw` (alice:secret, bob:hunter2 at 5000 iterations).
fn users(tag: &str) -> TempDir {
    let d = TempDir::new(tag);
    let pw = d.0.join("pw");
    let pw = pw.to_str().unwrap();
    tarta_passwd(&["-c", "-b", pw, "alice", "secret"]);
    tarta_passwd(&["-b", "-I", "5000", pw, "bob", "hunter2"]);
    d
}

fn start(dir: &Path, top: &str, listeners: &str) -> Broker {
    let cfg = dir.join("tarta.toml");
    let text = format!(
        "password_file = {:?}\nauth_failure_delay_ms = {DELAY_MS}\n{top}\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\nprotocol = \"ws\"\n\n{listeners}",
        dir.join("pw")
    );
    std::fs::write(&cfg, text).unwrap();
    Broker::start_bare(
        Command::new(env!("CARGO_BIN_EXE_tarta")),
        &["--config", cfg.to_str().unwrap()],
    )
}

fn login(protocol: Protocol, id: &str, user: Option<&str>, pass: Option<&str>) -> Connect {
    let mut c = connect_packet(protocol, id, true, 30);
    c.username = user.map(Into::into);
    c.password = pass.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()));
    c
}

/// CONNECT over any byte stream; the CONNACK code (None: closed without one).
fn connack_over(s: &mut (impl Read + Write), c: Connect) -> Option<u8> {
    let protocol = c.protocol;
    s.write_all(&encode(&Packet::Connect(Box::new(c)), protocol))
        .unwrap();
    let mut buf = BytesMut::new();
    loop {
        if let Ok(Some(p)) = mqtt::decode(&mut buf, protocol, u32::MAX) {
            return match p {
                Packet::ConnAck(a) => Some(a.code),
                _ => None,
            };
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Over {
    Tcp,
    Ws,
    Tls,
}

fn connack(b: &Broker, over: Over, ca: &Path, c: Connect) -> u8 {
    match over {
        Over::Tcp => Raw::connect(b.port, c).1.code,
        Over::Ws => WsRaw::connect(b.ws_port, c).1.code,
        Over::Tls => {
            let mut s = tls_open(b.port_of("tls"), client_config(ca, None)).unwrap();
            connack_over(&mut s, c).expect("CONNACK over TLS")
        }
    }
}

#[test]
fn credentials_are_checked_over_tcp_ws_and_tls_in_311_and_5() {
    let d = users("auth-creds");
    let pki = Pki::new("auth");
    let (c, k) = pki.issue("server", "localhost", true);
    let tls =
        format!("[[listener]]\nbind = \"127.0.0.1:0\"\ntls = {{ cert = {c:?}, key = {k:?} }}\n");
    let b = start(&d.0, "", &tls);
    let ca = pki.ca();
    for over in [Over::Tcp, Over::Ws, Over::Tls] {
        for protocol in [Protocol::V311, Protocol::V5] {
            let v5 = protocol.is_v5();
            let bad = if v5 { 0x86 } else { 0x04 };
            let unauthorized = if v5 { 0x87 } else { 0x05 };
            let case = |user, pass| {
                let t = Instant::now();
                let id = format!("c-{}", rand_u64());
                let code = connack(&b, over, &ca, login(protocol, &id, user, pass));
                (code, t.elapsed())
            };
            let what = format!("{over:?} {protocol:?}");
            assert_eq!(case(Some("alice"), Some("secret")).0, 0, "{what}");
            assert_eq!(case(Some("bob"), Some("hunter2")).0, 0, "{what}");
            let (code, took) = case(Some("alice"), Some("Secret"));
            assert_eq!(code, bad, "{what}: wrong password");
            assert!(
                took >= Duration::from_millis(DELAY_MS),
                "{what}: answered in {took:?}"
            );
            assert_eq!(
                case(Some("mallory"), Some("secret")).0,
                bad,
                "{what}: unknown user"
            );
            assert_eq!(case(Some("alice"), None).0, bad, "{what}: no password");
            assert_eq!(case(None, None).0, unauthorized, "{what}: anonymous");
        }
    }
    // Counted, and logged at most once a second per shard.
    std::thread::sleep(Duration::from_millis(1500));
    let admin = login(Protocol::V311, "sys-reader", Some("alice"), Some("secret"));
    assert_eq!(
        sys_counter_as(b.port, admin.clone(), "auth_failed"),
        3 * 2 * 3
    );
    assert_eq!(
        sys_counter_as(b.port, admin, "auth_anonymous_refused"),
        3 * 2
    );
    let lines = b.log().matches("login refused").count();
    assert!((1..=3 * 2 * 4).contains(&lines), "{lines} log lines");
}

fn subscribe(r: &mut Raw, pid: u16, filter: &str) -> u8 {
    r.subscribe_code(pid, filter, QoS::AtLeastOnce)
}

const ACL: &str = "\
topic read public/#
user alice
topic readwrite secret/#
pattern readwrite home/%u/#
";

#[test]
fn a_claimed_username_is_not_an_identity_and_the_acl_follows_the_verified_one() {
    let d = users("auth-acl");
    let acl = d.0.join("acl");
    std::fs::write(&acl, ACL).unwrap();
    let b = start(
        &d.0,
        &format!("allow_anonymous = true\nacl_file = {acl:?}\n"),
        "",
    );
    let v = Protocol::V311;
    // Claiming alice without her password: refused, with or without a
    // wrong one.
    assert_eq!(
        Raw::connect(b.port, login(v, "x1", Some("alice"), None))
            .1
            .code,
        4
    );
    assert_eq!(
        Raw::connect(b.port, login(v, "x2", Some("alice"), Some("guess")))
            .1
            .code,
        4
    );
    // Anonymous clients are allowed here, with the anonymous rules only.
    let (mut anon, a) = Raw::connect(b.port, login(v, "anon", None, None));
    assert_eq!(a.code, 0);
    assert_eq!(subscribe(&mut anon, 1, "public/#"), 1);
    assert_eq!(subscribe(&mut anon, 2, "secret/#"), 0x80);
    assert_eq!(subscribe(&mut anon, 3, "home/alice/#"), 0x80);
    // Alice, verified: her rules and her %u pattern.
    let (mut alice, a) = Raw::connect(b.port, login(v, "al", Some("alice"), Some("secret")));
    assert_eq!(a.code, 0);
    assert_eq!(subscribe(&mut alice, 1, "secret/#"), 1);
    assert_eq!(subscribe(&mut alice, 2, "home/alice/#"), 1);
    assert_eq!(subscribe(&mut alice, 3, "home/bob/#"), 0x80);
    let (mut bob, a) = Raw::connect(b.port, login(v, "bo", Some("bob"), Some("hunter2")));
    assert_eq!(a.code, 0);
    assert_eq!(subscribe(&mut bob, 1, "home/bob/#"), 1);
    assert_eq!(subscribe(&mut bob, 2, "secret/#"), 0x80);
}

fn wait_log(b: &Broker, what: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.log().matches(what).count() < count {
        assert!(Instant::now() < deadline, "no log line {what:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_reloads_passwords_and_acl_while_clients_stay_connected() {
    let d = users("auth-hup");
    let pw: PathBuf = d.0.join("pw");
    let acl = d.0.join("acl");
    std::fs::write(&acl, "user alice\ntopic readwrite old/#\n").unwrap();
    let b = start(&d.0, &format!("acl_file = {acl:?}\n"), "");
    let v = Protocol::V311;
    let (mut alice, a) = Raw::connect(b.port, login(v, "al", Some("alice"), Some("secret")));
    assert_eq!(a.code, 0);
    assert_eq!(subscribe(&mut alice, 1, "new/#"), 0x80);
    assert_eq!(
        Raw::connect(b.port, login(v, "ca", Some("carol"), Some("pw3")))
            .1
            .code,
        4
    );

    tarta_passwd(&["-b", pw.to_str().unwrap(), "carol", "pw3"]);
    std::fs::write(&acl, "user alice\ntopic readwrite new/#\n").unwrap();
    let hup = |b: &Broker| unsafe { libc::kill(b.child.id() as i32, libc::SIGHUP) };
    hup(&b);
    wait_log(&b, "password files and ACL reloaded", 1);
    // The new rules apply to alice's next subscription on the same
    // connection; carol may log in.
    assert_eq!(subscribe(&mut alice, 2, "new/#"), 1);
    assert_eq!(subscribe(&mut alice, 3, "old/#"), 0x80);
    assert_eq!(
        Raw::connect(b.port, login(v, "ca", Some("carol"), Some("pw3")))
            .1
            .code,
        0
    );

    // A broken file: the current set stays, and the log says why.
    std::fs::write(&pw, "carol\n").unwrap();
    hup(&b);
    wait_log(&b, "not reloaded, keeping the current ones", 1);
    assert!(b.log().contains("line 1: expected username:hash"));
    assert_eq!(
        Raw::connect(b.port, login(v, "ca2", Some("carol"), Some("pw3")))
            .1
            .code,
        0
    );
    alice.send(&Packet::PingReq);
    assert!(matches!(alice.recv(), Some(Packet::PingResp)));
}

/// Writes `bytes` again and again for `d`; every write must succeed.
fn keep_writing(s: &mut std::net::TcpStream, bytes: &[u8], d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        s.write_all(bytes)
            .unwrap_or_else(|e| panic!("the server reset the connection: {e}"));
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_client_that_keeps_writing_still_reads_the_reason() {
    let d = users("auth-graceful");
    let b = start(&d.0, "receive_maximum = 2\n", "");
    // 5.0: three unacknowledged QoS 2 messages where Receive Maximum is 2
    // gets DISCONNECT 0x93; the client keeps sending PUBRELs.
    let (mut r, a) = Raw::connect(
        b.port,
        login(Protocol::V5, "qos2", Some("alice"), Some("secret")),
    );
    assert_eq!(a.code, 0);
    for pid in 1..=3u16 {
        r.send(&Packet::Publish(mqtt::Publish {
            dup: false,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: "t".into(),
            packet_id: pid,
            properties: Default::default(),
            payload: bytes::Bytes::from_static(b"x"),
        }));
    }
    let pubrel = encode(
        &Packet::PubRel(mqtt::Ack {
            packet_id: 1,
            reason: 0,
            properties: Default::default(),
        }),
        Protocol::V5,
    );
    keep_writing(&mut r.s, &pubrel, Duration::from_millis(600));
    let (got, closed) = r.until_closed(Duration::from_secs(5));
    assert!(has_disconnect(&got, 0x93), "{got:?}");
    assert!(closed);

    // A refused CONNECT followed by more packets: the CONNACK still arrives.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", b.port)).unwrap();
    let c = login(Protocol::V311, "guess", Some("alice"), Some("nope"));
    s.write_all(&encode(&Packet::Connect(Box::new(c)), Protocol::V311))
        .unwrap();
    let ping = encode(&Packet::PingReq, Protocol::V311);
    keep_writing(&mut s, &ping, Duration::from_millis(DELAY_MS + 500));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    assert_eq!(
        head,
        [0x20, 0x02, 0x00, 0x04],
        "CONNACK bad user name or password"
    );
}

#[test]
fn a_client_certificate_authenticates_on_its_listener() {
    let d = users("auth-cert");
    let pki = Pki::new("auth-cert");
    let (sc, sk) = pki.issue("server", "localhost", true);
    let (dc, dk) = pki.issue("device7", "device-7", false);
    let acl = d.0.join("acl");
    std::fs::write(&acl, "user device-7\ntopic readwrite devices/device-7/#\n").unwrap();
    let tls = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\ntls = {{ cert = {sc:?}, key = {sk:?}, client_ca = {:?}, require_client_cert = true, identity_as_username = true }}\n",
        pki.ca()
    );
    let b = start(&d.0, &format!("acl_file = {acl:?}\n"), &tls);
    // The certificate is the credential: no password needed, and the ACL
    // sees its CN.
    let mut s = tls_open(b.port_of("tls"), client_config(&pki.ca(), Some((&dc, &dk)))).unwrap();
    assert_eq!(
        connack_over(&mut s, login(Protocol::V311, "d7", None, None)),
        Some(0)
    );
    // Without one, on the plain listener: refused.
    assert_eq!(
        Raw::connect(b.port, login(Protocol::V311, "d7b", None, None))
            .1
            .code,
        5
    );
    // Claiming the CN as a username on the plain listener does not help.
    let c = login(Protocol::V311, "d7c", Some("device-7"), Some("x"));
    assert_eq!(Raw::connect(b.port, c).1.code, 4);
}

#[test]
fn listeners_override_the_password_file_and_anonymous_access() {
    let d = users("auth-per-listener");
    let other = d.0.join("other.pw");
    tarta_passwd(&["-c", "-b", other.to_str().unwrap(), "carol", "pw3"]);
    // The start() listeners use the global file (alice, bob; anonymous
    // refused); a third allows anonymous clients; a fourth has its own file.
    let extra = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nallow_anonymous = true\n\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\npassword_file = {other:?}\n"
    );
    let b = start(&d.0, "", &extra);
    let tcp = b.ports_of("tcp");
    let (global, open, own) = (tcp[0], tcp[1], tcp[2]);
    let v = Protocol::V311;
    let code = |port, user: Option<&str>, pass: Option<&str>| {
        Raw::connect(port, login(v, &format!("c{}", rand_u64()), user, pass))
            .1
            .code
    };
    assert_eq!(code(global, None, None), 5);
    assert_eq!(code(global, Some("alice"), Some("secret")), 0);
    assert_eq!(
        code(open, None, None),
        0,
        "anonymous allowed on this listener"
    );
    assert_eq!(
        code(open, Some("alice"), Some("wrong")),
        4,
        "still checked when given"
    );
    assert_eq!(code(own, Some("carol"), Some("pw3")), 0, "its own file");
    assert_eq!(
        code(own, Some("alice"), Some("secret")),
        4,
        "not the global file"
    );
    assert_eq!(code(own, None, None), 5);
}
