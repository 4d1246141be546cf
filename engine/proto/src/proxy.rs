//! The HAProxy PROXY protocol, versions 1 and 2
//! (<https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt>).
//!
//! A load balancer in front of the broker (HAProxy, AWS NLB, nginx stream,
//! Traefik…) relays TCP connections, so the broker sees the balancer's address
//! instead of the client's. With the PROXY protocol, the balancer sends a
//! header before any other byte of the connection, naming the real client and
//! the address it connected to. Only a listener configured for it, and only a
//! trusted peer, may be believed: the runtime checks the peer against its
//! `trusted_proxies` ([`crate::cidr`]); this module only parses.
//!
//! [`parse`] is fed the bytes received so far. It answers as early as it can:
//! a client that is not a proxy (an MQTT CONNECT, a TLS ClientHello, an HTTP
//! request) is refused at its first byte that cannot start a PROXY header,
//! rather than after a timeout. The parse is strict: the header is the only
//! thing that decides whose address a connection gets.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Largest header accepted, in bytes. A v1 line is at most 107 bytes; a v2
/// header is 16 bytes, up to 216 bytes of addresses and then TLVs (ALPN,
/// authority, TLS details, cloud endpoint ids), which stay well under 1 KiB
/// in practice. A v2 header declaring more is refused.
pub const MAX_HEADER: usize = 4096;

/// Longest v1 line, CRLF included (`PROXY UNKNOWN` with two full IPv6
/// addresses and two ports).
const V1_MAX: usize = 107;
const V1_SIG: &[u8] = b"PROXY ";
const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// What the header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxied {
    /// The proxy relays a client: its source (client) and destination addresses.
    Client { src: SocketAddr, dst: SocketAddr },
    /// v2 LOCAL command (the proxy's own health check) or v1 `UNKNOWN` / v2
    /// unspecified or non-TCP family (UNIX, UDP): keep the socket's own peer
    /// address.
    Local,
}

/// The outcome of [`parse`] on the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not enough bytes yet to decide; call again with more.
    NeedMore,
    /// A complete header of `consumed` bytes (what follows belongs to the next layer).
    Done { header: Proxied, consumed: usize },
}

/// A malformed header (the connection is closed); the text names what was
/// wrong, for a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyError(pub &'static str);

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for ProxyError {}

fn err<T>(why: &'static str) -> Result<T, ProxyError> {
    Err(ProxyError(why))
}

/// Parses the PROXY header at the start of `buf` (v1 or v2, detected by the
/// first bytes). Never reads past the header: the caller hands
/// `buf[consumed..]` to the next layer.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.starts_with(V2_SIG) {
        v2(buf)
    } else if buf.starts_with(V1_SIG) {
        v1(buf)
    } else if V2_SIG.starts_with(buf) || V1_SIG.starts_with(buf) {
        Ok(Parsed::NeedMore)
    } else {
        err("no PROXY protocol header")
    }
}

/// `PROXY TCP4 src dst sport dport\r\n`, `TCP6` alike, or `PROXY UNKNOWN…\r\n`.
fn v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    // Like HAProxy, the line ends at its first CR, which must be followed by LF.
    let end = match window.iter().position(|&b| b == b'\r' || b == b'\n') {
        Some(end) => end,
        None if buf.len() >= V1_MAX => return err("PROXY v1 line longer than 107 bytes"),
        None => return Ok(Parsed::NeedMore),
    };
    if end + 2 > V1_MAX {
        return err("PROXY v1 line longer than 107 bytes");
    }
    match (window[end], buf.get(end + 1)) {
        (b'\r', Some(b'\n')) => {}
        (b'\r', None) => return Ok(Parsed::NeedMore),
        _ => return err("PROXY v1 line must end in CRLF"),
    }
    let consumed = end + 2;
    let done = |header| Ok(Parsed::Done { header, consumed });
    let line = window[..end].strip_prefix(V1_SIG).unwrap_or_default();
    // For UNKNOWN, the rest of the line is to be ignored.
    if line == b"UNKNOWN" || line.starts_with(b"UNKNOWN ") {
        return done(Proxied::Local);
    }
    let (true, Ok(line)) = (line.is_ascii(), std::str::from_utf8(line)) else {
        return err("PROXY v1 line is not ASCII");
    };
    let mut fields = line.split(' ');
    let fields = [(); 6].map(|()| fields.next());
    let v6 = match fields[0] {
        Some("TCP4") => false,
        Some("TCP6") => true,
        _ => return err("PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN"),
    };
    let [_, Some(src), Some(dst), Some(sport), Some(dport), None] = fields else {
        return err("PROXY v1 line must have two addresses and two ports, one space apart");
    };
    let ip = |s: &str| match v6 {
        false => s.parse::<Ipv4Addr>().map(IpAddr::V4).ok(),
        true => s.parse::<Ipv6Addr>().map(IpAddr::V6).ok(),
    };
    let (Some(src), Some(dst)) = (ip(src), ip(dst)) else {
        return err("PROXY v1 address is malformed or not of the declared family");
    };
    let (Some(sport), Some(dport)) = (port(sport), port(dport)) else {
        return err("PROXY v1 port must be decimal 0..=65535 without leading zeros");
    };
    done(Proxied::Client {
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
    })
}

/// A v1 port: decimal digits only (no sign), no leading zero, at most 65535.
fn port(s: &str) -> Option<u16> {
    let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let canonical = s == "0" || !s.starts_with('0');
    s.parse().ok().filter(|_| digits && canonical)
}

/// Signature, version/command, family/transport, 16-bit length, then the
/// address block and TLVs.
fn v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(Parsed::NeedMore);
    };
    if ver_cmd >> 4 != 2 {
        return err("PROXY v2 version must be 2");
    }
    let local = match ver_cmd & 0x0f {
        0x0 => true,
        0x1 => false,
        _ => return err("PROXY v2 command must be LOCAL or PROXY"),
    };
    let Some(&[family, hi, lo]) = buf.get(13..16) else {
        return Ok(Parsed::NeedMore);
    };
    // The family of a LOCAL header is to be ignored.
    let block = match (local, family) {
        (true, _) | (false, 0x00) => 0,
        (false, 0x11 | 0x12) => 12,
        (false, 0x21 | 0x22) => 36,
        (false, 0x31 | 0x32) => 216,
        _ => return err("PROXY v2 address family or transport is unknown"),
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    let consumed = 16 + len;
    if consumed > MAX_HEADER {
        return err("PROXY v2 header longer than MAX_HEADER");
    }
    if len < block {
        return err("PROXY v2 length is shorter than its address block");
    }
    let Some(mut rest) = buf.get(16..consumed) else {
        return Ok(Parsed::NeedMore);
    };
    // What follows the ports (TLVs) is skipped.
    let header = match (local, family) {
        (false, 0x11) => tcp::<4>(&mut rest),
        (false, 0x21) => tcp::<16>(&mut rest),
        _ => Some(Proxied::Local),
    };
    let header = header.ok_or(ProxyError("PROXY v2 address block is truncated"))?;
    Ok(Parsed::Done { header, consumed })
}

/// A TCP address block: source and destination addresses of `N` bytes, then
/// source and destination ports, in network byte order.
fn tcp<const N: usize>(rest: &mut &[u8]) -> Option<Proxied>
where
    IpAddr: From<[u8; N]>,
{
    let (src, dst) = (take::<N>(rest)?, take::<N>(rest)?);
    let (sport, dport) = (take::<2>(rest)?, take::<2>(rest)?);
    Some(Proxied::Client {
        src: SocketAddr::new(IpAddr::from(src), u16::from_be_bytes(sport)),
        dst: SocketAddr::new(IpAddr::from(dst), u16::from_be_bytes(dport)),
    })
}

fn take<const N: usize>(rest: &mut &[u8]) -> Option<[u8; N]> {
    let (head, tail) = rest.split_first_chunk::<N>()?;
    *rest = tail;
    Some(*head)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use quickcheck::{Arbitrary, Gen, QuickCheck};

    fn done(buf: &[u8]) -> (Proxied, usize) {
        match parse(buf) {
            Ok(Parsed::Done { header, consumed }) => (header, consumed),
            other => panic!("{other:?} for {buf:?}"),
        }
    }

    fn client(src: &str, dst: &str) -> Proxied {
        Proxied::Client {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
        }
    }

    fn v2(ver_cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIG.to_vec();
        out.extend([ver_cmd, family]);
        out.extend((body.len() as u16).to_be_bytes());
        out.extend(body);
        out
    }

    const V4_BLOCK: [u8; 12] = [192, 0, 2, 1, 198, 51, 100, 7, 0xd4, 0x31, 0x07, 0x5b];

    #[test]
    fn v1_examples() {
        let b = b"PROXY TCP4 192.0.2.1 198.51.100.7 54321 1883\r\n\x10\x0c";
        let want = client("192.0.2.1:54321", "198.51.100.7:1883");
        assert_eq!(done(b), (want, b.len() - 2), "the MQTT bytes are left");
        let b = b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 0 65535\r\n";
        let want = client("[2001:db8::1]:0", "[::ffff:10.0.0.1]:65535");
        assert_eq!(done(b), (want, b.len()));
        assert_eq!(done(b"PROXY UNKNOWN\r\nxyz"), (Proxied::Local, 15));
        let b = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(b.len(), 107);
        assert_eq!(done(b), (Proxied::Local, 107));
        assert_eq!(done(b"PROXY UNKNOWN \xff\xfe\r\n"), (Proxied::Local, 18));
    }

    #[test]
    fn v1_errors() {
        let e = |b: &[u8]| parse(b).unwrap_err().0;
        let bad: [(&[u8], &str); 21] = [
            (b"PROXY TCP4 192.0.2.1 198.51.100.7 54321 1883\n", "CRLF"),
            (b"PROXY TCP4 192.0.2.1 198.51.100.7 54321 1883\rx", "CRLF"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "two addresses"),
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "two addresses"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "two addresses"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "two addresses"),
            (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
            (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
            (b"PROXY UNKNOWNX\r\n", "protocol"),
            (b"PROXY \r\n", "protocol"),
            (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "address"),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "address"),
            (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "address"),
            (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "address"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \x32\xff\r\n", "ASCII"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xc3\xa9\r\n", "ASCII"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \x00\r\n", "port"),
        ];
        for (b, why) in bad {
            assert!(e(b).contains(why), "{}", e(b));
        }
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'a'; 93]].concat();
        assert_eq!(long.len(), 107);
        assert_eq!(e(&long), "PROXY v1 line longer than 107 bytes");
        assert_eq!(parse(&long[..106]), Ok(Parsed::NeedMore));
        let long = [&long[..106], b"\r\n"].concat(); // CRLF past byte 107
        assert!(e(&long).contains("107") && e(&long[..107]).contains("107"));
    }

    #[test]
    fn v2_examples() {
        // HAProxy's health check: LOCAL, UNSPEC, no addresses.
        let check = v2(0x20, 0x00, &[]);
        assert_eq!(check.len(), 16);
        assert_eq!(done(&[&check[..], b"\x10"].concat()), (Proxied::Local, 16));
        // LOCAL skips whatever it declares, whatever the family.
        assert_eq!(done(&v2(0x20, 0x11, &V4_BLOCK)), (Proxied::Local, 28));
        let want = client("192.0.2.1:54321", "198.51.100.7:1883");
        let b = v2(0x21, 0x11, &V4_BLOCK);
        assert_eq!(done(&[&b[..], b"\x10\x0c\x00"].concat()), (want, 28));
        // TLVs: ALPN "mqtt" and an AWS VPC endpoint id, then NOOP padding.
        let tlvs = b"\x01\x00\x04mqtt\xea\x00\x05\x01vpce\x04\x00\x02\x00\x00";
        let b = v2(0x21, 0x11, &[&V4_BLOCK[..], tlvs].concat());
        let b = [&b[..], b"\x16\x03\x01"].concat();
        assert_eq!(done(&b), (want, 28 + tlvs.len()));
        let mut v6 = Vec::new();
        v6.extend("2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend(Ipv6Addr::LOCALHOST.octets());
        v6.extend([0, 0, 0xff, 0xff]);
        let want = client("[2001:db8::1]:0", "[::1]:65535");
        assert_eq!(done(&v2(0x21, 0x21, &v6)), (want, 52));
        v6.extend(tlvs);
        assert_eq!(done(&v2(0x21, 0x21, &v6)), (want, 52 + tlvs.len()));
        // UNSPEC, UDP and UNIX keep the socket's address.
        assert_eq!(done(&v2(0x21, 0x00, b"ignored")), (Proxied::Local, 23));
        assert_eq!(done(&v2(0x21, 0x12, &V4_BLOCK)), (Proxied::Local, 28));
        assert_eq!(done(&v2(0x21, 0x22, &[0; 36])), (Proxied::Local, 52));
        assert_eq!(done(&v2(0x21, 0x31, &[0; 216])), (Proxied::Local, 232));
        assert_eq!(done(&v2(0x21, 0x32, &[0; 220])), (Proxied::Local, 236));
        let max = v2(0x21, 0x11, &[0; MAX_HEADER - 16]);
        assert_eq!(done(&max).1, MAX_HEADER);
    }

    #[test]
    fn v2_errors() {
        let e = |b: &[u8]| parse(b).unwrap_err().0;
        assert!(e(&v2(0x11, 0x11, &V4_BLOCK)).contains("version"));
        assert!(e(&v2(0x31, 0x11, &V4_BLOCK)).contains("version"));
        assert!(e(&v2(0x22, 0x11, &V4_BLOCK)).contains("command"));
        assert!(e(&v2(0x2f, 0x11, &V4_BLOCK)).contains("command"));
        for family in [0x01, 0x10, 0x13, 0x20, 0x30, 0x41, 0xff] {
            assert!(e(&v2(0x21, family, &V4_BLOCK)).contains("family"));
        }
        assert!(e(&v2(0x21, 0x11, &V4_BLOCK[..11])).contains("shorter"));
        assert!(e(&v2(0x21, 0x21, &V4_BLOCK)).contains("shorter"));
        assert!(e(&v2(0x21, 0x31, &[0; 215])).contains("shorter"));
        let big = v2(0x21, 0x11, &[0; MAX_HEADER - 15]);
        assert!(e(&big[..16]).contains("MAX_HEADER"), "before the body");
        assert!(e(&v2(0x20, 0x00, &[0; 0xffff])).contains("MAX_HEADER"));
        // Early refusal, one byte after the signature.
        assert!(e(&[V2_SIG, &[0x12]].concat()).contains("version"));
    }

    #[test]
    fn non_proxy_clients_are_refused_at_once() {
        let connect = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd";
        let hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        let http = b"GET /mqtt HTTP/1.1\r\n";
        for b in [&connect[..], hello, http, b"\x10", b"PO", b"\r\n\r\n\x10"] {
            assert_eq!(parse(b), Err(ProxyError("no PROXY protocol header")));
        }
        for b in [&b""[..], b"P", b"PROXY", b"\r", b"\r\n\r\n\0\r\nQUI"] {
            assert_eq!(parse(b), Ok(Parsed::NeedMore));
        }
        assert_eq!(ProxyError("x").to_string(), "x");
    }

    /// A header to encode: v1 or v2, a client of either family or Local,
    /// and extra bytes (v2 TLVs, or the ignored tail of v1 UNKNOWN).
    #[derive(Clone, Debug)]
    struct Header(bool, Proxied, Vec<u8>);

    impl Arbitrary for Header {
        fn arbitrary(g: &mut Gen) -> Self {
            let v6 = bool::arbitrary(g);
            let addr = |g: &mut Gen| {
                let ip = match v6 {
                    true => IpAddr::from(u128::arbitrary(g).to_be_bytes()),
                    false => IpAddr::from(u32::arbitrary(g).to_be_bytes()),
                };
                SocketAddr::new(ip, u16::arbitrary(g))
            };
            let header = match u8::arbitrary(g) % 8 {
                0 => Proxied::Local,
                _ => Proxied::Client {
                    src: addr(g),
                    dst: addr(g),
                },
            };
            let mut extra = Vec::arbitrary(g);
            extra.truncate(300);
            Header(bool::arbitrary(g), header, extra)
        }
    }

    fn encode(Header(is_v2, header, extra): &Header) -> Vec<u8> {
        match (is_v2, *header) {
            (false, Proxied::Local) if extra.is_empty() => b"PROXY UNKNOWN\r\n".to_vec(),
            (false, Proxied::Local) => {
                let tail = extra.iter().take(91).map(|b| b % 95 + b' ');
                let mut out = b"PROXY UNKNOWN ".to_vec();
                out.extend(tail);
                out.extend(b"\r\n");
                out
            }
            (false, Proxied::Client { src, dst }) => {
                let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
                let (s, d) = (src.ip(), dst.ip());
                let (sp, dp) = (src.port(), dst.port());
                format!("PROXY {proto} {s} {d} {sp} {dp}\r\n").into_bytes()
            }
            (true, Proxied::Local) => v2(0x20, 0x00, extra),
            (true, Proxied::Client { src, dst }) => {
                let octets = |ip| match ip {
                    IpAddr::V4(ip) => ip.octets().to_vec(),
                    IpAddr::V6(ip) => ip.octets().to_vec(),
                };
                let (sp, dp) = (src.port().to_be_bytes(), dst.port().to_be_bytes());
                let body = [&octets(src.ip())[..], &octets(dst.ip()), &sp, &dp, extra].concat();
                v2(0x21, if src.is_ipv4() { 0x11 } else { 0x21 }, &body)
            }
        }
    }

    fn qc() -> QuickCheck {
        QuickCheck::new().tests(2_000).rng(Gen::new(64))
    }

    #[test]
    fn prefixes_need_more_and_the_whole_header_is_exact() {
        fn prop(h: Header, trailing: Vec<u8>) -> bool {
            let wire = encode(&h);
            let prefixes = (0..wire.len()).all(|n| parse(&wire[..n]) == Ok(Parsed::NeedMore));
            let (header, consumed) = (h.1, wire.len());
            let want = Ok(Parsed::Done { header, consumed });
            prefixes && parse(&wire) == want && parse(&[&wire[..], &trailing].concat()) == want
        }
        qc().quickcheck(prop as fn(Header, Vec<u8>) -> bool);
    }

    #[test]
    fn never_panics() {
        fn prop(start: u8, bytes: Vec<u8>) -> bool {
            let start: &[u8] = match start % 5 {
                0 => b"",
                1 => V1_SIG,
                2 => b"PROXY TCP4 ",
                3 => V2_SIG,
                _ => b"\r\n\r\n\0\r\nQUIT\n\x21\x11",
            };
            let buf = [start, &bytes].concat();
            !matches!(parse(&buf), Ok(Parsed::Done { consumed, .. }) if consumed > buf.len())
        }
        qc().quickcheck(prop as fn(u8, Vec<u8>) -> bool);
        fn mutated(h: Header, at: usize, byte: u8) -> bool {
            let mut wire = encode(&h);
            let at = at % wire.len();
            wire[at] = byte;
            !matches!(parse(&wire), Ok(Parsed::Done { consumed, .. }) if consumed > wire.len())
        }
        qc().quickcheck(mutated as fn(Header, usize, u8) -> bool);
    }

    #[test]
    fn mqtt_and_tls_are_refused_at_the_first_bytes() {
        fn prop(tls: bool, bytes: Vec<u8>) -> bool {
            let start: &[u8] = if tls { b"\x16\x03" } else { b"\x10" };
            parse(&[start, &bytes].concat()).is_err()
        }
        qc().quickcheck(prop as fn(bool, Vec<u8>) -> bool);
    }
}
