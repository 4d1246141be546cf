//! # tarta-bench: criterion suites for Tarta's hot paths
//!
//! Each suite in `benches/` measures one hot path; its inputs and the work it
//! times live here, so `tests/smoke.rs` runs every suite's functions once on
//! tiny inputs and they cannot rot.
//!
//! # Layout
//! - [`codec`]: MQTT packets to decode and encode (PUBLISH, CONNECT, SUBSCRIBE).
//! - [`topic_index`]: realistic filter sets, topics from the same space, and
//!   the naive matcher the trie is compared with.
//! - [`ws_frame`]: masked client WebSocket frames and their decoding.
//! - [`retained`]: a million retained topics, the retained-message trie and
//!   the scan it replaces.
//! - [`router`]: a real `Shard` with one publisher and N subscribers.
//! - [`hop`]: the cross-shard hop (mesh channel + doorbell) between two
//!   running glommio executors.
//!
//! Results and the commands that produced them: `bench/RESULTS.md`.

pub mod codec;
pub mod hop;
pub mod retained;
pub mod router;
pub mod topic_index;
pub mod ws_frame;

use bytes::BytesMut;

/// `wire` as the runtime's read buffer would hold it: a `BytesMut` whose
/// storage is already shared (the runtime splits every packet off one
/// shard-wide buffer). A fresh `Vec`-backed `BytesMut` would make the first
/// `split_to` allocate its shared header, which the broker never pays per
/// packet.
pub fn read_buffer(wire: &[u8]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(wire.len());
    buf.extend_from_slice(wire);
    // Promotes the storage to the shared representation.
    drop(buf.split_to(0));
    buf
}

/// A small deterministic generator (xorshift64*), so every run and every
/// suite sees the same filters and topics without a `rand` dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}
