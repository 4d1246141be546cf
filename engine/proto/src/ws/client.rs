//! The client side of the WebSocket upgrade (RFC 6455 §4.1), for a bridge's
//! outgoing link: the request (with the MQTT subprotocols and any headers
//! the operator configured) and the check of the server's answer.

use tungstenite::handshake::derive_accept_key;

/// The upgrade request for `path` on `host` (`host[:port]` as the Host
/// header). `key` is the base64 of 16 random bytes (`key_from`).
pub fn upgrade_request(host: &str, path: &str, key: &str, headers: &[(String, String)]) -> Vec<u8> {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n"
    );
    for (name, value) in headers {
        r.push_str(name);
        r.push_str(": ");
        r.push_str(value);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// A `Sec-WebSocket-Key` from 16 random bytes.
pub fn key_from(random: [u8; 16]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(random)
}

#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The response headers are not complete yet.
    NeedMore,
    /// 101 with the right accept key and the `mqtt` subprotocol: the
    /// response took `consumed` bytes (what follows is WebSocket frames).
    Upgraded { consumed: usize },
    /// Anything else, and why (the status line, for the log).
    Refused(String),
}

/// Checks the server's answer to a request made with `key`.
pub fn upgrade_response(buf: &[u8], key: &str) -> Answer {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let consumed = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => return Answer::NeedMore,
        Ok(httparse::Status::Partial) => return Answer::Refused("response too large".into()),
        Err(e) => return Answer::Refused(format!("invalid HTTP response: {e}")),
    };
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        let reason = resp.reason.unwrap_or("");
        return Answer::Refused(format!("HTTP {code} {reason}"));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Answer::Refused("101 without Upgrade: websocket".into());
    }
    if header("sec-websocket-accept") != Some(derive_accept_key(key.as_bytes()).as_str()) {
        return Answer::Refused("wrong Sec-WebSocket-Accept".into());
    }
    // MQTT-6.0.0-3: the server must choose the MQTT subprotocol.
    match header("sec-websocket-protocol") {
        Some(p) if p.eq_ignore_ascii_case("mqtt") => Answer::Upgraded { consumed },
        other => Answer::Refused(format!(
            "subprotocol {:?} instead of mqtt",
            other.unwrap_or("(none)")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::{handshake, Handshake, HandshakeConfig};

    #[test]
    fn our_server_accepts_the_request_and_the_client_accepts_its_answer() {
        let key = key_from([7; 16]);
        let headers = vec![("Authorization".to_string(), "Bearer x".to_string())];
        let req = upgrade_request("cloud.example:443", "/mqtt", &key, &headers);
        let text = String::from_utf8(req.clone()).unwrap();
        assert!(text.contains("\r\nAuthorization: Bearer x\r\n"), "{text}");
        let peer = "192.0.2.1".parse().unwrap();
        let Handshake::Upgrade {
            response, consumed, ..
        } = handshake(&req, &HandshakeConfig::default(), peer)
        else {
            panic!("refused");
        };
        assert_eq!(consumed, req.len());
        let mut wire = response.clone();
        wire.extend_from_slice(b"\x82\x02\x20\x00");
        assert_eq!(
            upgrade_response(&wire, &key),
            Answer::Upgraded {
                consumed: response.len()
            }
        );
        assert_eq!(upgrade_response(&response[..20], &key), Answer::NeedMore);
        // Another key: the accept value does not match.
        let other = key_from([8; 16]);
        assert!(matches!(
            upgrade_response(&response, &other),
            Answer::Refused(_)
        ));
    }

    #[test]
    fn a_refusal_carries_the_status() {
        let r = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            upgrade_response(r, "k"),
            Answer::Refused("HTTP 403 Forbidden".into())
        );
    }
}
