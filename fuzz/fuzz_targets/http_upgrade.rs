//! `tarta_proto::ws::handshake` on arbitrary bytes (the request a WebSocket
//! listener has received so far), with the default `HandshakeConfig` and
//! with one that trusts the peer as a proxy, allows one origin and requires
//! a subprotocol.
//!
//! Never panics, and:
//! - an upgrade consumes at most what was received, and its response is a
//!   101 with the RFC 6455 accept key;
//! - a rejection is a complete HTTP response with the status it reports;
//! - a plain HTTP request (another path) consumes at most what was received,
//!   is never for the WebSocket path, and its path and query are the
//!   request target split at its first `?`;
//! - the answer is stable as bytes arrive: if a prefix (cut where the input
//!   says) already gets an answer other than `NeedMore`, the whole input gets
//!   the same one (except that an incomplete prefix of `max_request` bytes
//!   gets 431 where the whole input may get 400 for a malformed byte further
//!   on); if the whole input needs more, so does every prefix.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use tarta_proto::ws::{handshake, Handshake, HandshakeConfig};

const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

fn check(buf: &[u8], cfg: &HandshakeConfig) -> Handshake {
    let h = handshake(buf, cfg, PEER);
    match &h {
        Handshake::NeedMore => assert!(buf.len() < cfg.max_request, "NeedMore at the size limit"),
        Handshake::Upgrade {
            response,
            consumed,
            forwarded_for,
            ..
        } => {
            assert!(
                *consumed <= buf.len() && *consumed > 0,
                "consumed {consumed}"
            );
            assert!(response.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
            assert!(response.ends_with(b"\r\n\r\n"));
            if let Some(ip) = forwarded_for {
                assert!(cfg.trusted_proxies.contains(&PEER));
                assert!(!cfg.trusted_proxies.contains(ip));
            }
        }
        Handshake::Http(r) => {
            assert!(
                r.consumed <= buf.len() && r.consumed > 0,
                "consumed {}",
                r.consumed
            );
            assert_ne!(
                r.path, cfg.path,
                "the WebSocket path handed over as plain HTTP"
            );
            assert!(!r.path.contains('?'), "query left in the path {:?}", r.path);
            let target = if r.query.is_empty() {
                r.path.clone()
            } else {
                format!("{}?{}", r.path, r.query)
            };
            let received = target.is_empty()
                || buf[..r.consumed]
                    .windows(target.len())
                    .any(|w| w == target.as_bytes());
            assert!(
                received,
                "request target {target:?} is not what was received"
            );
        }
        Handshake::Respond {
            status, response, ..
        } => {
            let head = format!("HTTP/1.1 {status} ");
            assert!(response.starts_with(head.as_bytes()), "{status}");
            assert!(response.windows(4).any(|w| w == b"\r\n\r\n"));
        }
    }
    h
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, req)) = data.split_first() else {
        return;
    };
    let proxy = HandshakeConfig {
        require_subprotocol: true,
        origins: vec!["https://example.com".into()],
        trusted_proxies: vec![PEER, IpAddr::V6(Ipv6Addr::LOCALHOST)],
        max_request: 1024,
        ..HandshakeConfig::default()
    };
    for cfg in [HandshakeConfig::default(), proxy] {
        let whole = check(req, &cfg);
        let k = req.len() * usize::from(cut) / 255;
        let prefix = check(&req[..k], &cfg);
        match (&prefix, &whole) {
            (Handshake::NeedMore, _) => {}
            // A prefix of `max_request` bytes that is still incomplete is
            // refused as too large; had the whole input arrived in one read,
            // its first malformed byte may be seen first (400 instead of 431).
            (
                Handshake::Respond {
                    status: 431,
                    why: "request too large",
                    ..
                },
                w,
            ) if k >= cfg.max_request => {
                assert!(
                    matches!(
                        w,
                        Handshake::Respond {
                            status: 400 | 431,
                            ..
                        }
                    ),
                    "an incomplete prefix was too large, the whole input gave {w:?}"
                );
            }
            (p, w) => assert_eq!(p, w, "the answer to a prefix of {k} bytes changed"),
        }
        if whole == Handshake::NeedMore {
            assert_eq!(prefix, Handshake::NeedMore);
        }
    }
});
