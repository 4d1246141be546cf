//! Connection limits shared by every shard: connections open in the whole
//! process, and per client address the connections open and the rate of
//! new ones (a token bucket). Lock-free: the kernel spreads one address's
//! connections over all shards, so the counts live in atomics.
//!
//! Per address, the state sits in a fixed table indexed by a hash of the
//! address (64 Ki slots, 12 bytes each): no allocation per address, no
//! table to grow or expire under a flood of spoofed sources. Two addresses
//! that share a slot share its budget; with 64 Ki slots that takes tens of
//! thousands of distinct abusive addresses at once, and errs on the side
//! of refusing.

use crate::config::Limits;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

const SLOTS: usize = 1 << 16;
/// Tokens are kept in thousandths.
const MILLI: u64 = 1000;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_connections` for the whole process.
    Total,
    /// `max_connections_per_address`.
    AddressFull,
    /// `connection_rate_per_address`, beyond its burst.
    AddressRate,
}

pub struct ConnLimits {
    cfg: Limits,
    open: AtomicUsize,
    per_addr: Box<[AtomicU32]>,
    /// Per slot: milli-tokens (low 32 bits) and the refill time in ms since
    /// `epoch` (high 32 bits, wrapping).
    buckets: Box<[AtomicU64]>,
    epoch: Instant,
    hasher: foldhash::fast::FixedState,
}

impl ConnLimits {
    pub fn new(cfg: Limits) -> ConnLimits {
        let per_address =
            cfg.max_connections_per_address != 0 || cfg.connection_rate_per_address != 0;
        let slots = if per_address { SLOTS } else { 0 };
        ConnLimits {
            cfg,
            open: AtomicUsize::new(0),
            per_addr: (0..slots).map(|_| AtomicU32::new(0)).collect(),
            buckets: (0..slots).map(|_| AtomicU64::new(u64::MAX)).collect(),
            epoch: Instant::now(),
            hasher: foldhash::fast::FixedState::with_seed(0x7a17a),
        }
    }

    /// Counts a new connection in the process total.
    pub fn admit_total(&self) -> Result<(), Refused> {
        let n = self.open.fetch_add(1, Relaxed);
        if self.cfg.max_connections != 0 && n >= self.cfg.max_connections {
            self.open.fetch_sub(1, Relaxed);
            return Err(Refused::Total);
        }
        Ok(())
    }

    pub fn release_total(&self) {
        self.open.fetch_sub(1, Relaxed);
    }

    /// Whether the per-address limits apply to `ip`.
    pub fn applies(&self, ip: IpAddr) -> bool {
        !self.per_addr.is_empty() && !self.cfg.exempt.iter().any(|c| c.contains(ip))
    }

    fn slot(&self, ip: IpAddr) -> usize {
        let mut h = self.hasher.build_hasher();
        match ip.to_canonical() {
            IpAddr::V4(a) => h.write(&a.octets()),
            IpAddr::V6(a) => h.write(&a.octets()),
        }
        (h.finish() as usize) & (SLOTS - 1)
    }

    /// Counts a new connection from `ip` (which `applies`): first its rate,
    /// then how many it has open. On Ok, `release_address` must follow
    /// when it closes.
    pub fn admit_address(&self, ip: IpAddr) -> Result<(), Refused> {
        let i = self.slot(ip);
        if self.cfg.connection_rate_per_address != 0 && !self.take_token(i) {
            return Err(Refused::AddressRate);
        }
        let max = self.cfg.max_connections_per_address;
        let n = self.per_addr[i].fetch_add(1, Relaxed);
        if max != 0 && n >= max {
            self.per_addr[i].fetch_sub(1, Relaxed);
            return Err(Refused::AddressFull);
        }
        Ok(())
    }

    pub fn release_address(&self, ip: IpAddr) {
        if let Some(c) = self.per_addr.get(self.slot(ip)) {
            let _ = c.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
        }
    }

    fn take_token(&self, i: usize) -> bool {
        let rate = u64::from(self.cfg.connection_rate_per_address);
        let burst = u64::from(self.cfg.connection_burst_per_address) * MILLI;
        let now = self.epoch.elapsed().as_millis() as u32;
        let b = &self.buckets[i];
        let mut cur = b.load(Relaxed);
        loop {
            let (tokens, at) = if cur == u64::MAX {
                (burst, now)
            } else {
                (cur & 0xffff_ffff, (cur >> 32) as u32)
            };
            // rate tokens per second = rate milli-tokens per millisecond.
            let refill = u64::from(now.wrapping_sub(at)) * rate;
            let tokens = (tokens + refill).min(burst);
            if tokens < MILLI {
                return false;
            }
            let next = (u64::from(now) << 32) | (tokens - MILLI);
            match b.compare_exchange_weak(cur, next, Relaxed, Relaxed) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per: u32, rate: u32, burst: u32) -> ConnLimits {
        ConnLimits::new(Limits {
            max_connections: 3,
            max_connections_per_address: per,
            connection_rate_per_address: rate,
            connection_burst_per_address: burst,
            ..Limits::default()
        })
    }

    #[test]
    fn total_is_bounded_and_released() {
        let l = limits(0, 0, 0);
        for _ in 0..3 {
            assert_eq!(l.admit_total(), Ok(()));
        }
        assert_eq!(l.admit_total(), Err(Refused::Total));
        l.release_total();
        assert_eq!(l.admit_total(), Ok(()));
    }

    #[test]
    fn per_address_count_and_exemptions() {
        let l = limits(2, 0, 0);
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        let b: IpAddr = "203.0.113.8".parse().unwrap();
        assert!(l.applies(a) && !l.applies("127.0.0.1".parse().unwrap()));
        assert!(!l.applies("::1".parse().unwrap()));
        assert_eq!(l.admit_address(a), Ok(()));
        assert_eq!(l.admit_address(a), Ok(()));
        assert_eq!(l.admit_address(a), Err(Refused::AddressFull));
        assert_eq!(
            l.admit_address(b),
            Ok(()),
            "another address has its own budget"
        );
        l.release_address(a);
        assert_eq!(l.admit_address(a), Ok(()));
        // The v4-mapped v6 form is the same address.
        assert_eq!(
            l.admit_address("::ffff:203.0.113.7".parse().unwrap()),
            Err(Refused::AddressFull)
        );
    }

    #[test]
    fn rate_allows_the_burst_then_the_rate() {
        let l = limits(0, 10, 5);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        for _ in 0..5 {
            assert_eq!(l.admit_address(a), Ok(()));
        }
        assert_eq!(l.admit_address(a), Err(Refused::AddressRate));
        std::thread::sleep(std::time::Duration::from_millis(250));
        // 10/s: two more after 250 ms.
        assert_eq!(l.admit_address(a), Ok(()));
        assert_eq!(l.admit_address(a), Ok(()));
        assert_eq!(l.admit_address(a), Err(Refused::AddressRate));
    }
}
