//! The HTTP/1.1 side of a WebSocket listener: the upgrade handshake
//! (RFC 6455 §4.2) with MQTT subprotocol negotiation, an optional Origin
//! allow-list, `X-Forwarded-For` from trusted proxies, and plain `GET
//! /health`. Anything else gets a precise HTTP status.

use std::net::IpAddr;
use tungstenite::handshake::derive_accept_key;

/// Subprotocols we speak, in order of preference (MQTT-6.0.0-3/4).
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    /// The WebSocket path (default `/mqtt`).
    pub path: String,
    /// Refuse clients that offer no subprotocol (default: accept them).
    pub require_subprotocol: bool,
    /// Allowed `Origin` values; empty means any. Requests without an
    /// Origin header (non-browser clients) are always allowed.
    pub origins: Vec<String>,
    /// Peers whose `X-Forwarded-For` header is believed.
    pub trusted_proxies: Vec<IpAddr>,
    /// Largest request accepted, in bytes.
    pub max_request: usize,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            path: "/mqtt".into(),
            require_subprotocol: false,
            origins: Vec::new(),
            trusted_proxies: Vec::new(),
            max_request: 8192,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// The request is not complete yet.
    NeedMore,
    /// Switch to WebSocket: send `response`; the request was `consumed` bytes.
    Upgrade {
        response: Vec<u8>,
        consumed: usize,
        protocol: Option<&'static str>,
        /// The client address a trusted proxy reported.
        forwarded_for: Option<IpAddr>,
    },
    /// Answer with `response` and close. `status` 200 is a health check;
    /// any other is a rejected handshake, for `why`.
    Respond {
        status: u16,
        response: Vec<u8>,
        why: &'static str,
    },
    /// A plain HTTP request for another path (metrics, the dashboard, the
    /// admin API): the caller answers it (404 if it serves nothing there).
    Http(HttpRequest),
}

/// A plain HTTP request on a WebSocket (or HTTP) listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// What follows `?`, if anything.
    pub query: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The request's length in bytes (a body is not read).
    pub consumed: usize,
}

/// An HTTP/1.1 response that closes the connection.
pub fn http_response(status: u16, content_type: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let text = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut r = format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn respond(status: u16, why: &'static str, extra: &str) -> Handshake {
    let body = if status == 200 {
        "ok\n".to_string()
    } else {
        format!("{why}\n")
    };
    let response = http_response(status, "text/plain", extra, body.as_bytes());
    Handshake::Respond {
        status,
        response,
        why,
    }
}

fn header<'a>(req: &'a httparse::Request<'_, '_>, name: &str) -> Option<&'a str> {
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
}

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Looks at the bytes received so far on a WebSocket listener.
pub fn handshake(buf: &[u8], cfg: &HandshakeConfig, peer: IpAddr) -> Handshake {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= cfg.max_request => {
            return respond(431, "request too large", "")
        }
        Ok(httparse::Status::Partial) => return Handshake::NeedMore,
        Err(httparse::Error::TooManyHeaders) => return respond(431, "too many headers", ""),
        Err(_) => return respond(400, "malformed HTTP request", ""),
    };
    if consumed > cfg.max_request {
        return respond(431, "request too large", "");
    }
    if req.version != Some(1) {
        return respond(400, "HTTP/1.1 is required", "");
    }
    let (path, query) = req
        .path
        .unwrap_or("")
        .split_once('?')
        .unwrap_or((req.path.unwrap_or(""), ""));
    if path == "/health" && req.method == Some("GET") {
        return respond(200, "health", "");
    }
    if path != cfg.path {
        return Handshake::Http(HttpRequest {
            method: req.method.unwrap_or("").to_string(),
            path: path.to_string(),
            query: query.to_string(),
            authorization: header(&req, "authorization").map(str::to_string),
            consumed,
        });
    }
    if req.method != Some("GET") {
        return respond(405, "only GET is served here", "Allow: GET\r\n");
    }
    if !has_token(header(&req, "upgrade"), "websocket") {
        return respond(
            426,
            "a WebSocket upgrade is required",
            "Upgrade: websocket\r\n",
        );
    }
    if !has_token(header(&req, "connection"), "upgrade") {
        return respond(400, "Connection: Upgrade is required", "");
    }
    if header(&req, "sec-websocket-version") != Some("13") {
        return respond(
            426,
            "unsupported WebSocket version",
            "Sec-WebSocket-Version: 13\r\n",
        );
    }
    let key = match header(&req, "sec-websocket-key") {
        Some(k) if k.len() == 24 && k.ends_with("==") => k,
        _ => return respond(400, "missing or invalid Sec-WebSocket-Key", ""),
    };
    if !cfg.origins.is_empty() {
        if let Some(origin) = header(&req, "origin") {
            if !cfg.origins.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
                return respond(403, "origin not allowed", "");
            }
        }
    }
    let offered: Vec<&str> = header(&req, "sec-websocket-protocol")
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let protocol = offered.iter().find_map(|o| {
        SUBPROTOCOLS
            .iter()
            .find(|p| o.eq_ignore_ascii_case(p))
            .copied()
    });
    if protocol.is_none() && (!offered.is_empty() || cfg.require_subprotocol) {
        return respond(
            400,
            "subprotocol mqtt is required",
            "Sec-WebSocket-Protocol: mqtt\r\n",
        );
    }
    let forwarded_for = if cfg.trusted_proxies.contains(&peer) {
        header(&req, "x-forwarded-for").and_then(|v| {
            v.split(',')
                .rev()
                .filter_map(|s| s.trim().parse::<IpAddr>().ok())
                .find(|ip| !cfg.trusted_proxies.contains(ip))
        })
    } else {
        None
    };
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        derive_accept_key(key.as_bytes())
    );
    if let Some(p) = protocol {
        response.push_str("Sec-WebSocket-Protocol: ");
        response.push_str(p);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    Handshake::Upgrade {
        response: response.into_bytes(),
        consumed,
        protocol,
        forwarded_for,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn req(path: &str, extra: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn status(h: &Handshake) -> u16 {
        match h {
            Handshake::Upgrade { .. } => 101,
            Handshake::Respond { status, .. } => *status,
            Handshake::Http(_) => 1,
            Handshake::NeedMore => 0,
        }
    }

    #[test]
    fn upgrade_with_rfc_example_key_and_subprotocol() {
        let cfg = HandshakeConfig::default();
        let r = req("/mqtt", "Sec-WebSocket-Protocol: foo, mqtt\r\n");
        match handshake(r.as_bytes(), &cfg, LOCAL) {
            Handshake::Upgrade {
                response,
                consumed,
                protocol,
                ..
            } => {
                let text = String::from_utf8(response).unwrap();
                assert!(
                    text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
                    "{text}"
                );
                assert!(text.contains("Sec-WebSocket-Protocol: mqtt\r\n"));
                assert_eq!(consumed, r.len());
                assert_eq!(protocol, Some("mqtt"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejections_have_precise_statuses() {
        let cfg = HandshakeConfig {
            origins: vec!["https://app.example".into()],
            ..Default::default()
        };
        let s = |r: String| status(&handshake(r.as_bytes(), &cfg, LOCAL));
        // Another path is for the caller (metrics, dashboard, admin API).
        assert_eq!(s(req("/other", "")), 1);
        match handshake(
            b"POST /api/x?a=1 HTTP/1.1\r\nAuthorization: Basic eA==\r\n\r\n",
            &cfg,
            LOCAL,
        ) {
            Handshake::Http(r) => {
                assert_eq!(
                    (r.method.as_str(), r.path.as_str(), r.query.as_str()),
                    ("POST", "/api/x", "a=1")
                );
                assert_eq!(r.authorization.as_deref(), Some("Basic eA=="));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s(req("/mqtt", "Origin: https://evil.example\r\n")), 403);
        assert_eq!(s(req("/mqtt", "Origin: https://app.example\r\n")), 101);
        assert_eq!(s(req("/mqtt", "Sec-WebSocket-Protocol: chat\r\n")), 400);
        assert_eq!(s("GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n".into()), 426);
        assert_eq!(
            s(req("/mqtt", "").replace("Version: 13", "Version: 8")),
            426
        );
        assert_eq!(
            s(req("/mqtt", "")
                .replace("POST", "GET")
                .replacen("GET", "POST", 1)),
            405
        );
        assert_eq!(s("\x01\x02garbage\r\n\r\n".into()), 400);
        assert_eq!(s("GET /health HTTP/1.1\r\n\r\n".into()), 200);
        assert_eq!(s("GET /mqtt HTTP/1.1\r\nHost".into()), 0, "incomplete");
        let big = format!("GET /mqtt HTTP/1.1\r\nX: {}", "a".repeat(9000));
        assert_eq!(s(big), 431);
    }

    #[test]
    fn no_subprotocol_is_configurable() {
        let r = req("/mqtt", "");
        assert_eq!(
            status(&handshake(r.as_bytes(), &HandshakeConfig::default(), LOCAL)),
            101
        );
        let strict = HandshakeConfig {
            require_subprotocol: true,
            ..Default::default()
        };
        assert_eq!(status(&handshake(r.as_bytes(), &strict, LOCAL)), 400);
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let cfg = HandshakeConfig {
            trusted_proxies: vec![proxy],
            ..Default::default()
        };
        let r = req("/mqtt", "X-Forwarded-For: 203.0.113.7, 10.0.0.1\r\n");
        let ff = |peer| match handshake(r.as_bytes(), &cfg, peer) {
            Handshake::Upgrade { forwarded_for, .. } => forwarded_for,
            other => panic!("{other:?}"),
        };
        assert_eq!(ff(proxy), Some("203.0.113.7".parse().unwrap()));
        assert_eq!(ff(LOCAL), None, "an untrusted peer's header is ignored");
    }
}
