//! The measurement header at the start of every payload loadgen publishes:
//! run id, publisher id, sequence number and send time (24 bytes, big
//! endian). The rest of the payload is zeros.

/// Bytes of the header; `--payload` may not be smaller.
pub const HEADER_LEN: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Random per loadgen run: messages of another run are ignored.
    pub run: u32,
    /// Global publisher index.
    pub publisher: u32,
    pub seq: u64,
    /// CLOCK_MONOTONIC nanoseconds at send (the same clock in every process
    /// of this machine).
    pub sent_ns: u64,
}

impl Header {
    pub fn write(&self, out: &mut [u8; HEADER_LEN]) {
        out[0..4].copy_from_slice(&self.run.to_be_bytes());
        out[4..8].copy_from_slice(&self.publisher.to_be_bytes());
        out[8..16].copy_from_slice(&self.seq.to_be_bytes());
        out[16..24].copy_from_slice(&self.sent_ns.to_be_bytes());
    }

    pub fn parse(p: &[u8]) -> Option<Header> {
        let h: &[u8; HEADER_LEN] = p.get(..HEADER_LEN)?.try_into().ok()?;
        let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
        Some(Header {
            run: u32_at(0),
            publisher: u32_at(4),
            seq: u64_at(8),
            sent_ns: u64_at(16),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::quickcheck;

    quickcheck! {
        fn round_trip(run: u32, publisher: u32, seq: u64, sent_ns: u64) -> bool {
            let h = Header { run, publisher, seq, sent_ns };
            let mut b = [0u8; HEADER_LEN];
            h.write(&mut b);
            Header::parse(&b) == Some(h)
        }
    }

    #[test]
    fn short_payload_is_none() {
        assert_eq!(Header::parse(&[0; 23]), None);
    }
}
