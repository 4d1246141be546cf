//! WebSocket client framing (RFC 6455) for MQTT over WebSocket, without I/O:
//! the HTTP/1.1 Upgrade request with `Sec-WebSocket-Protocol: mqtt`, the
//! check of the server's 101 response, masked binary frames from client to
//! server and a streaming parser for the server's frames.

use bytes::{BufMut, BytesMut};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Upgrade request for `path` on `host:port` with the given 16-byte nonce.
pub fn request(host: &str, port: u16, path: &str, nonce: &[u8; 16]) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n",
        base64(nonce)
    )
}

/// The `Sec-WebSocket-Accept` value a server must answer for `nonce`.
pub fn accept_key(nonce: &[u8; 16]) -> String {
    let key = base64(nonce);
    base64(&sha1(format!("{key}{GUID}").as_bytes()))
}

/// Outcome of looking at the bytes received after the Upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// The response head is not complete yet.
    Incomplete,
    /// Accepted; the response head was this many bytes (frames follow).
    Accepted(usize),
    /// Refused or invalid, with a short reason.
    Refused(String),
}

/// Checks the server's response to [`request`] (status 101, the accept key,
/// and the `mqtt` subprotocol when the server names one).
pub fn check_response(buf: &[u8], nonce: &[u8; 16]) -> Handshake {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > 8192 {
            return Handshake::Refused("HTTP response head over 8 KiB".into());
        }
        return Handshake::Incomplete;
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    let code = status.split_whitespace().nth(1).unwrap_or("");
    if code != "101" {
        return Handshake::Refused(format!("HTTP status {status:?} instead of 101"));
    }
    let want = accept_key(nonce);
    let mut accept_ok = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("sec-websocket-accept") {
            accept_ok = value == want;
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol")
            && !value.eq_ignore_ascii_case("mqtt")
        {
            return Handshake::Refused(format!("server chose subprotocol {value:?}"));
        }
    }
    if !accept_ok {
        return Handshake::Refused("missing or wrong Sec-WebSocket-Accept".into());
    }
    Handshake::Accepted(end + 4)
}

/// Appends one masked binary frame carrying `payload` to `out`.
pub fn encode_frame(opcode: u8, payload: &[u8], mask: [u8; 4], out: &mut BytesMut) {
    out.reserve(payload.len() + 14);
    out.put_u8(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.put_u8(0x80 | n as u8);
    } else if n <= 0xFFFF {
        out.put_u8(0x80 | 126);
        out.put_u16(n as u16);
    } else {
        out.put_u8(0x80 | 127);
        out.put_u64(n as u64);
    }
    out.put_slice(&mask);
    let start = out.len();
    out.put_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

pub const OP_CONT: u8 = 0x0;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// What the parser found besides data.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A ping with its (small) payload: answer with a pong.
    Ping(Vec<u8>),
    /// The server sent a close frame.
    Close,
    /// A protocol violation.
    Error(&'static str),
}

/// Streaming parser of server-to-client frames. Holds at most a partial
/// frame header (14 bytes) and the state of the frame being read.
#[derive(Debug, Default)]
pub struct FrameParser {
    head: [u8; 14],
    head_len: u8,
    /// Payload bytes still to come in the current frame.
    remaining: u64,
    /// Opcode of the current frame (data frames keep the first opcode).
    opcode: u8,
    /// Control frame payload being collected (pings are tiny).
    control: Vec<u8>,
}

impl FrameParser {
    /// Feeds received bytes; appends data-frame payload to `data` and
    /// returns control events. Stops at the first error or close.
    pub fn feed(&mut self, mut input: &[u8], data: &mut BytesMut, events: &mut Vec<Event>) {
        while !input.is_empty() {
            if self.remaining == 0 {
                // Reading a header.
                let need = self.header_need();
                let take = (need - self.head_len as usize).min(input.len());
                let hl = self.head_len as usize;
                self.head[hl..hl + take].copy_from_slice(&input[..take]);
                self.head_len += take as u8;
                input = &input[take..];
                if (self.head_len as usize) < self.header_need() {
                    continue;
                }
                let b0 = self.head[0];
                let b1 = self.head[1];
                if b1 & 0x80 != 0 {
                    events.push(Event::Error("server frame is masked"));
                    return;
                }
                if b0 & 0x70 != 0 {
                    events.push(Event::Error("reserved bits set"));
                    return;
                }
                let len = match b1 & 0x7F {
                    126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
                    127 => u64::from_be_bytes([
                        self.head[2],
                        self.head[3],
                        self.head[4],
                        self.head[5],
                        self.head[6],
                        self.head[7],
                        self.head[8],
                        self.head[9],
                    ]),
                    n => u64::from(n),
                };
                let op = b0 & 0x0F;
                self.head_len = 0;
                self.opcode = op;
                self.remaining = len;
                match op {
                    OP_CONT | OP_BINARY | 0x1 => {}
                    OP_CLOSE => {
                        events.push(Event::Close);
                        return;
                    }
                    OP_PING | OP_PONG => {
                        if len > 125 {
                            events.push(Event::Error("control frame over 125 bytes"));
                            return;
                        }
                        self.control.clear();
                        if len == 0 {
                            self.finish_control(events);
                        }
                    }
                    _ => {
                        events.push(Event::Error("unknown opcode"));
                        return;
                    }
                }
                continue;
            }
            let take = (self.remaining.min(input.len() as u64)) as usize;
            if self.opcode >= 0x8 {
                self.control.extend_from_slice(&input[..take]);
            } else {
                data.extend_from_slice(&input[..take]);
            }
            self.remaining -= take as u64;
            input = &input[take..];
            if self.remaining == 0 && self.opcode >= 0x8 {
                self.finish_control(events);
            }
        }
    }

    fn finish_control(&mut self, events: &mut Vec<Event>) {
        if self.opcode == OP_PING {
            events.push(Event::Ping(std::mem::take(&mut self.control)));
        }
        self.control = Vec::new();
        self.opcode = 0;
    }

    fn header_need(&self) -> usize {
        if self.head_len < 2 {
            return 2;
        }
        match self.head[1] & 0x7F {
            126 => 4,
            127 => 10,
            _ => 2,
        }
    }
}

/// Standard base64 with padding.
pub fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(input.len().div_ceil(3) * 4);
    for c in input.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        s.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    s
}

/// SHA-1 (only for the handshake's accept key, as RFC 6455 requires).
pub fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    let bits = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bits.to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 80];
        for (i, c) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::quickcheck;

    #[test]
    fn rfc6455_accept_example() {
        // RFC 6455 section 1.3: key "dGhlIHNhbXBsZSBub25jZQ==".
        let nonce: [u8; 16] = *b"the sample nonce";
        assert_eq!(base64(&nonce), "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(accept_key(&nonce), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn sha1_vectors() {
        let hex = |b: [u8; 20]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(hex(sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        let long = vec![b'a'; 1000];
        assert_eq!(hex(sha1(&long)), "291e9a6c66994949b57ba5e650361e98fc36b1ba");
    }

    #[test]
    fn response_check() {
        let nonce: [u8; 16] = *b"the sample nonce";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n\x82\x02";
        assert_eq!(
            check_response(ok, &nonce),
            Handshake::Accepted(ok.len() - 2)
        );
        assert_eq!(check_response(&ok[..20], &nonce), Handshake::Incomplete);
        let bad = b"HTTP/1.1 404 Not Found\r\n\r\n";
        assert!(matches!(check_response(bad, &nonce), Handshake::Refused(_)));
    }

    /// Unmasked server frame, for the tests.
    fn server_frame(op: u8, payload: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_frame(op, payload, [0; 4], &mut b);
        // Clear the mask bit and drop the (zero) mask key.
        let mut v = b.to_vec();
        v[1] &= 0x7F;
        let off = match v[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        v.drain(off..off + 4);
        v
    }

    quickcheck! {
        /// Any split of a stream of frames yields the same data and pings.
        fn parser_any_split(payloads: Vec<Vec<u8>>, cut: Vec<u16>) -> bool {
            let mut wire = Vec::new();
            let mut want = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                if i % 3 == 2 {
                    wire.extend(server_frame(OP_PING, &p[..p.len().min(125)]));
                } else {
                    wire.extend(server_frame(OP_BINARY, p));
                    want.extend_from_slice(p);
                }
            }
            // Also a 300-byte and a 70000-byte frame.
            let big: Vec<u8> = (0..70000u32).map(|i| i as u8).collect();
            wire.extend(server_frame(OP_BINARY, &big[..300]));
            wire.extend(server_frame(OP_BINARY, &big));
            want.extend_from_slice(&big[..300]);
            want.extend_from_slice(&big);
            let mut p = FrameParser::default();
            let mut data = BytesMut::new();
            let mut ev = Vec::new();
            let mut rest = &wire[..];
            let mut cuts = cut.iter().cycle();
            while !rest.is_empty() {
                let n = cuts.next().map_or(rest.len(), |c| usize::from(*c) % 97 + 1).min(rest.len());
                p.feed(&rest[..n], &mut data, &mut ev);
                rest = &rest[n..];
            }
            let pings = payloads.iter().enumerate().filter(|(i, _)| i % 3 == 2).count();
            data[..] == want[..] && ev.len() == pings && ev.iter().all(|e| matches!(e, Event::Ping(_)))
        }

        fn masked_frame_unmasks(payload: Vec<u8>, mask: (u8, u8, u8, u8)) -> bool {
            let mask = [mask.0, mask.1, mask.2, mask.3];
            let mut b = BytesMut::new();
            encode_frame(OP_BINARY, &payload, mask, &mut b);
            let off = match b[1] & 0x7F { 126 => 4, 127 => 10, _ => 2 };
            let body: Vec<u8> = b[off + 4..].iter().enumerate().map(|(i, x)| x ^ mask[i & 3]).collect();
            b[0] == 0x82 && b[1] & 0x80 != 0 && body == payload
        }
    }

    #[test]
    fn close_and_masked_server_frames() {
        let mut p = FrameParser::default();
        let mut d = BytesMut::new();
        let mut ev = Vec::new();
        p.feed(&server_frame(OP_CLOSE, &[3, 232]), &mut d, &mut ev);
        assert_eq!(ev, vec![Event::Close]);
        let mut p = FrameParser::default();
        let mut ev = Vec::new();
        let mut masked = BytesMut::new();
        encode_frame(OP_BINARY, b"x", [1, 2, 3, 4], &mut masked);
        p.feed(&masked, &mut d, &mut ev);
        assert_eq!(ev, vec![Event::Error("server frame is masked")]);
    }
}
