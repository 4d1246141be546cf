//! Address ranges in CIDR notation (`10.0.0.0/8`, `fd00::/8`, or a bare
//! address for a single host), as written in `trusted_proxies` lists: the
//! peers whose PROXY header ([`crate::proxy`]) or `X-Forwarded-For` is
//! believed.
//!
//! A dual-stack socket reports an IPv4 peer as the IPv4-mapped IPv6 address
//! `::ffff:a.b.c.d`, so containment treats the two spellings as one address:
//! `10.0.0.0/8` contains `::ffff:10.1.2.3`, and `::ffff:10.0.0.0/104` contains
//! `10.1.2.3`. Parsing is strict: a range with host bits set beyond its prefix
//! (`10.0.0.1/8`) is most likely a typo, and is refused rather than guessed at.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A network address and a prefix length, host bits clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// The address as 128 bits (IPv4 as IPv4-mapped IPv6) and the prefix on the
/// same scale.
fn widen(addr: IpAddr, prefix: u8) -> (u128, u32) {
    match addr {
        IpAddr::V4(v4) => (u128::from(v4.to_ipv6_mapped()), 96 + u32::from(prefix)),
        IpAddr::V6(v6) => (u128::from(v6), u32::from(prefix)),
    }
}

/// The mask of the first `prefix` bits of 128.
fn mask(prefix: u32) -> u128 {
    u128::MAX.checked_shl(128 - prefix.min(128)).unwrap_or(0)
}

impl Cidr {
    /// Whether `ip` is in the range. IPv4 and IPv4-mapped IPv6 spellings of
    /// an address are the same address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, prefix) = widen(self.addr, self.prefix);
        let (ip, _) = widen(ip, 0);
        (net ^ ip) & mask(prefix) == 0
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `address/prefix`, or a bare address for a single host (`/32`, `/128`).
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR range"))?;
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= width)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0 to {width}"))?,
            Some(_) => return Err(format!("{s:?}: prefix length must be 0 to {width}")),
        };
        let (bits, wide) = widen(addr, prefix);
        if bits & !mask(wide) != 0 {
            return Err(format!("{s} has host bits set"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use quickcheck::{QuickCheck, TestResult};
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn containment() {
        let c = cidr("10.0.0.0/8");
        assert!(c.contains(ip("10.0.0.0")) && c.contains(ip("10.255.255.255")));
        assert!(!c.contains(ip("11.0.0.0")) && !c.contains(ip("9.255.255.255")));
        assert!(c.contains(ip("::ffff:10.1.2.3")), "mapped matches IPv4");
        assert!(
            !c.contains(ip("::10.1.2.3")),
            "IPv4-compatible is not mapped"
        );
        assert!(!c.contains(ip("a00::")));
        let host = cidr("192.168.1.7");
        assert_eq!(host, cidr("192.168.1.7/32"));
        assert!(host.contains(ip("192.168.1.7")) && host.contains(ip("::ffff:192.168.1.7")));
        assert!(!host.contains(ip("192.168.1.6")) && !host.contains(ip("192.168.1.8")));
        let all4 = cidr("0.0.0.0/0");
        assert!(all4.contains(ip("0.0.0.0")) && all4.contains(ip("255.255.255.255")));
        assert!(all4.contains(ip("::ffff:1.2.3.4")));
        assert!(!all4.contains(ip("::1")) && !all4.contains(ip("2001:db8::1")));
        let all = cidr("::/0");
        for a in [
            "::",
            "::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "1.2.3.4",
        ] {
            assert!(all.contains(ip(a)), "{a}");
        }
        let lo = cidr("::1");
        assert_eq!(lo, cidr("::1/128"));
        assert!(lo.contains(ip("::1")) && !lo.contains(ip("::")) && !lo.contains(ip("::2")));
        assert!(!lo.contains(ip("127.0.0.1")));
        let ula = cidr("fd00::/8");
        assert!(ula.contains(ip("fd12:3456::1")) && ula.contains(ip("fdff::")));
        assert!(!ula.contains(ip("fc00::1")) && !ula.contains(ip("fe80::1")));
        let mapped = cidr("::ffff:10.0.0.0/104");
        assert!(
            mapped.contains(ip("10.9.8.7")),
            "IPv4 matches a mapped range"
        );
        assert!(!mapped.contains(ip("11.0.0.0")));
        let odd = cidr("172.16.0.0/12");
        assert!(odd.contains(ip("172.31.255.255")) && !odd.contains(ip("172.32.0.0")));
    }

    #[test]
    fn parse_errors_name_the_input() {
        let e = |s: &str| s.parse::<Cidr>().unwrap_err();
        assert_eq!(e("10.0.0.1/8"), "10.0.0.1/8 has host bits set");
        assert_eq!(e("fd00::1/8"), "fd00::1/8 has host bits set");
        assert_eq!(
            e("::ffff:10.0.0.1/104"),
            "::ffff:10.0.0.1/104 has host bits set"
        );
        for bad in [
            "",
            "/8",
            "10.0.0/8",
            "10.0.0.0.0",
            "example.com",
            " 10.0.0.0/8",
            "fd00::/8 ",
        ] {
            assert!(e(bad).contains(&format!("{bad:?}")), "{bad:?}");
        }
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
        ] {
            assert!(e(bad).contains("prefix length"), "{bad:?}");
        }
        assert!(e("10.0.0.0/8/8").contains("prefix length"));
        assert!(e("10.0.0.0/256").contains("0 to 32"));
        assert!(e("::/300").contains("0 to 128"));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "10.0.0.0/8",
            "192.168.1.7/32",
            "0.0.0.0/0",
            "::/0",
            "fd00::/8",
            "::1/128",
        ] {
            assert_eq!(cidr(s).to_string(), s);
        }
        assert_eq!(cidr("192.168.1.7").to_string(), "192.168.1.7/32");
        assert_eq!(cidr("FD00::/8").to_string(), "fd00::/8");
    }

    #[test]
    fn an_address_is_in_every_prefix_of_itself() {
        fn prop(v4: u32, v6: u128, other: u128) -> TestResult {
            let cases = [
                (IpAddr::V4(Ipv4Addr::from(v4)), 32),
                (IpAddr::V6(Ipv6Addr::from(v6)), 128),
            ];
            for (addr, width) in cases {
                let (bits, _) = widen(addr, 0);
                for p in 0..=width {
                    let net = match addr {
                        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(v4 & (mask(96 + p) as u32))),
                        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(v6 & mask(p))),
                    };
                    let c: Cidr = format!("{net}/{p}").parse().unwrap();
                    if !c.contains(addr) || c.to_string().parse::<Cidr>() != Ok(c) {
                        return TestResult::error(format!("{c} vs {addr}"));
                    }
                    if let IpAddr::V4(v4) = addr {
                        if !c.contains(IpAddr::V6(v4.to_ipv6_mapped())) {
                            return TestResult::error(format!("{c} vs mapped {addr}"));
                        }
                    }
                    // An address differing in the first prefix bits is outside.
                    let other = IpAddr::V6(Ipv6Addr::from(other));
                    let (o, _) = widen(other, 0);
                    let (_, wide) = widen(net, p as u8);
                    if c.contains(other) != ((o ^ bits) & mask(wide) == 0) {
                        return TestResult::error(format!("{c} vs other {other}"));
                    }
                }
            }
            TestResult::passed()
        }
        QuickCheck::new()
            .tests(1_000)
            .quickcheck(prop as fn(u32, u128, u128) -> TestResult);
    }
}
