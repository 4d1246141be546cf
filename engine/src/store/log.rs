//! The shard's side of its write-ahead log: records appended while
//! packets are handled, and the *epochs* that say what is durable.
//!
//! Appends go to a buffer. The runtime's committer takes the whole buffer
//! (one *epoch*), writes it, syncs it (policy `always`) and reports the
//! epoch durable; what was appended meanwhile is the next epoch, so every
//! batch costs one write and one fdatasync however many records it holds
//! (group commit). A connection whose output depends on a record carries
//! that record's epoch as its *gate* and writes nothing until the epoch is
//! durable: its acknowledgements go out in order, after what they promise.
//!
//! No I/O, no clock: the runtime moves the bytes and the time.

use super::record::{self, Rec};
use crate::session::Message;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Waker;

/// How many of a broker's shards cannot write their log right now (shared
/// by its shards). A durable publish is refused on every shard meanwhile:
/// its destinations may be anywhere.
pub type Failing = Arc<AtomicUsize>;
use tarta_proto::mqtt::{PublishHeader, QoS};

pub struct Log {
    buf: Vec<u8>,
    /// The epoch the records in `buf` will commit as.
    open: u32,
    /// The newest durable epoch.
    durable: u32,
    /// An epoch (`open - 1`) is being written.
    committing: bool,
    /// The last write failed (disk full, I/O error): durable publishes are
    /// refused until a retry succeeds (`set_failed`).
    failed: bool,
    /// Appends that gate the connection they were made for.
    gating: u64,
    next_mid: u64,
    /// The message last written, so that its other deliveries refer to it.
    last_msg: Option<(Arc<Message>, u64)>,
    /// Unix second of broker second 0 (expiry times on disk are absolute).
    pub epoch_unix: u64,
    /// Bytes written since the last snapshot, and that snapshot's size.
    pub since_snapshot: u64,
    pub snapshot_len: u64,
    /// Durability barriers of other shards waiting for an epoch:
    /// (epoch, shard, barrier).
    pub barriers: Vec<(u32, usize, u32)>,
    committer: Option<Waker>,
    failing: Failing,
}

impl Log {
    pub fn new(epoch_unix: u64, next_mid: u64, failing: Failing) -> Log {
        Log {
            buf: Vec::new(),
            open: 1,
            durable: 0,
            committing: false,
            failed: false,
            gating: 0,
            next_mid,
            last_msg: None,
            epoch_unix,
            since_snapshot: 0,
            snapshot_len: 0,
            barriers: Vec::new(),
            committer: None,
            failing,
        }
    }

    /// Appends a record. `gating`: the connection it was made for must not
    /// write before it is durable (see `gate`).
    pub fn append(&mut self, rec: &Rec, gating: bool) {
        let was_empty = self.buf.is_empty();
        record::encode(rec, &mut self.buf);
        self.appended(was_empty, gating);
    }

    fn appended(&mut self, was_empty: bool, gating: bool) {
        if gating {
            self.gating += 1;
        }
        if was_empty {
            if let Some(w) = self.committer.take() {
                w.wake();
            }
        }
    }

    /// Counts gating appends: compare before and after handling a packet.
    pub fn gating_appends(&self) -> u64 {
        self.gating
    }

    /// The epoch of what is being appended now: a connection's gate.
    pub fn gate(&self) -> u32 {
        self.open
    }

    /// Whether output gated on `gate` must still wait. Epochs wrap: only a
    /// gate among the epochs not yet durable blocks.
    pub fn blocks(&self, gate: u32) -> bool {
        gate.wrapping_sub(self.durable).wrapping_sub(1) < self.open.wrapping_sub(self.durable)
    }

    /// The id of `msg` in this log, writing it first if needed.
    pub fn message(&mut self, msg: &Arc<Message>) -> u64 {
        if let Some((m, mid)) = &self.last_msg {
            if Arc::ptr_eq(m, msg) {
                return *mid;
            }
        }
        let mid = self.next_mid;
        self.next_mid += 1;
        let was_empty = self.buf.is_empty();
        encode_message(&mut self.buf, msg, mid, self.epoch_unix);
        self.appended(was_empty, true);
        self.last_msg = Some((msg.clone(), mid));
        mid
    }

    /// Forgets which message was written last (a snapshot starts a new
    /// numbering scope).
    pub fn forget_messages(&mut self) {
        self.last_msg = None;
    }

    pub fn next_mid(&mut self) -> u64 {
        let mid = self.next_mid;
        self.next_mid += 1;
        mid
    }

    pub fn next_mid_value(&self) -> u64 {
        self.next_mid
    }

    /// A snapshot of the live state replaces everything appended: it is
    /// the next epoch (written to a new segment by the committer).
    pub fn begin_snapshot(&mut self) -> u32 {
        self.buf.clear();
        self.last_msg = None;
        let epoch = self.open;
        self.open = self.open.wrapping_add(1);
        self.committing = true;
        epoch
    }

    /// The snapshot is written out; message ids continue from `next_mid`.
    pub fn snapshot_done(&mut self, next_mid: u64) {
        self.next_mid = next_mid;
    }

    pub fn has_pending(&self) -> bool {
        !self.buf.is_empty()
    }

    pub fn pending_len(&self) -> usize {
        self.buf.len()
    }

    /// Nothing appended is waiting to be durable.
    pub fn idle(&self) -> bool {
        self.buf.is_empty() && !self.committing
    }

    /// The epoch that makes everything appended so far durable.
    pub fn needed(&self) -> u32 {
        if !self.buf.is_empty() {
            self.open
        } else if self.committing {
            self.open.wrapping_sub(1)
        } else {
            self.durable
        }
    }

    pub fn durable(&self) -> u32 {
        self.durable
    }

    /// The committer: the next epoch to write, if anything is appended and
    /// no write is in flight. Otherwise it is woken by the next append.
    pub fn take(&mut self, waker: &Waker) -> Option<(Vec<u8>, u32)> {
        if self.buf.is_empty() || self.committing {
            self.committer = Some(waker.clone());
            return None;
        }
        let epoch = self.open;
        self.open = self.open.wrapping_add(1);
        self.committing = true;
        let cap = self.buf.capacity().min(1 << 20);
        let buf = std::mem::replace(&mut self.buf, Vec::with_capacity(cap));
        self.since_snapshot += buf.len() as u64;
        Some((buf, epoch))
    }

    /// Wakes the committer (at shutdown: to finish).
    pub fn wake_committer(&mut self) {
        if let Some(w) = self.committer.take() {
            w.wake();
        }
    }

    /// The epoch is durable (its write and, by policy, its sync succeeded).
    pub fn committed(&mut self, epoch: u32) {
        self.durable = epoch;
        self.committing = false;
        self.set_failed(false);
    }

    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Whether any shard's log is failing (disk full, I/O errors).
    pub fn any_failed(&self) -> bool {
        self.failing.load(Ordering::Relaxed) > 0
    }

    pub fn set_failed(&mut self, failed: bool) {
        if failed != self.failed {
            self.failed = failed;
            if failed {
                self.failing.fetch_add(1, Ordering::Relaxed);
            } else {
                self.failing.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// The epoch's write failed: its bytes go back in front of what was
    /// appended since, to be written again (its connections stay gated and
    /// commit with the next epoch).
    pub fn write_failed(&mut self, mut bytes: Vec<u8>) {
        self.since_snapshot = self.since_snapshot.saturating_sub(bytes.len() as u64);
        bytes.extend_from_slice(&self.buf);
        self.buf = bytes;
        self.committing = false;
        self.set_failed(true);
    }

    /// Takes everything appended, for a snapshot's new segment.
    pub fn take_all(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// Appends a message's `Msg` record (its expiry as a unix second),
/// straight from the shared message: nothing of it is copied but bytes.
pub fn encode_message(out: &mut Vec<u8>, msg: &Message, mid: u64, epoch_unix: u64) {
    let h = PublishHeader {
        dup: false,
        qos: msg.qos,
        retain: msg.retain,
        topic: msg.topic.as_bytes(),
        packet_id: if msg.qos == QoS::AtMostOnce { 0 } else { 1 },
        properties: &msg.properties,
        payload_len: msg.payload.len(),
    };
    let expires = msg.expires_at.map_or(0, |s| epoch_unix + s);
    record::encode_msg(out, mid, expires, msg.uid, &h, &msg.payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    #[test]
    fn epochs_gate_until_durable_and_wrap() {
        let mut log = Log::new(0, 1, Default::default());
        let w = Waker::noop();
        assert!(!log.blocks(0), "an idle connection's gate");
        log.append(&Rec::SnapEnd, true);
        let g = log.gate();
        assert!(log.blocks(g));
        let (bytes, e) = log.take(w).unwrap_or_default();
        assert!(!bytes.is_empty());
        log.append(&Rec::SnapEnd, true);
        let g2 = log.gate();
        assert!(log.blocks(g) && log.blocks(g2));
        assert!(log.take(w).is_none(), "one write at a time");
        log.committed(e);
        assert!(!log.blocks(g) && log.blocks(g2));
        // A failed write keeps everything gated and goes again.
        let (bytes, _) = log.take(w).unwrap_or_default();
        log.write_failed(bytes);
        assert!(log.failed() && log.blocks(g2));
        let (_, e) = log.take(w).unwrap_or_default();
        log.committed(e);
        assert!(!log.blocks(g2) && !log.failed());
        // Wrapping epochs.
        log.open = u32::MAX;
        log.durable = u32::MAX - 1;
        log.append(&Rec::SnapEnd, true);
        let g3 = log.gate();
        assert!(log.blocks(g3) && !log.blocks(0) && !log.blocks(5));
        let (_, e) = log.take(w).unwrap_or_default();
        assert_eq!(log.gate(), 0);
        log.committed(e);
        assert!(!log.blocks(g3));
    }
}
