//! The shard mesh: one bounded crossbeam channel per ordered pair of shards
//! (so messages between two shards stay in order) carrying batches, and one
//! doorbell per shard that wakes its executor when a batch arrives.
//!
//! Measured on this machine (docs/GLOMMIO-NOTES.md): crossbeam plus the receiver's
//! stored waker moves 11.5M msgs/s, faster than glommio's own channels.
//! The doorbell is rung only when the receiver is not already notified, so
//! a busy receiver costs the sender one atomic swap per batch.

use atomic_waker::AtomicWaker;
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Waker;

/// Wakes one shard's mesh task from any thread.
#[derive(Default)]
pub struct Doorbell {
    rung: AtomicBool,
    waker: AtomicWaker,
}

impl Doorbell {
    pub fn ring(&self) {
        if !self.rung.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Registers the receiving task and clears the bell. The caller must
    /// drain its queues after this call, so a ring that raced is not lost.
    pub fn arm(&self, waker: &Waker) {
        self.waker.register(waker);
        self.rung.store(false, Ordering::Release);
    }
}

/// One shard's ends of the mesh.
pub struct MeshEnds<T> {
    pub me: usize,
    /// `tx[j]` sends to shard j (`None` for `me`).
    pub tx: Vec<Option<Sender<Vec<T>>>>,
    /// `rx[j]` receives from shard j (`None` for `me`).
    pub rx: Vec<Option<Receiver<Vec<T>>>>,
    /// Every shard's doorbell, indexed by shard.
    pub bells: Vec<Arc<Doorbell>>,
}

impl<T> MeshEnds<T> {
    /// Sends a batch to shard `to`; gives it back when that queue is full.
    pub fn try_send(&self, to: usize, batch: Vec<T>) -> Result<(), Vec<T>> {
        let Some(Some(tx)) = self.tx.get(to) else {
            return Err(batch);
        };
        match tx.try_send(batch) {
            Ok(()) => {
                self.bells[to].ring();
                Ok(())
            }
            Err(TrySendError::Full(b)) | Err(TrySendError::Disconnected(b)) => Err(b),
        }
    }

    pub fn bell(&self) -> &Doorbell {
        &self.bells[self.me]
    }
}

/// Builds the full mesh for `n` shards; element i belongs to shard i.
pub fn build<T>(n: usize, capacity: usize) -> (Vec<MeshEnds<T>>, Vec<Arc<Doorbell>>) {
    let bells: Vec<Arc<Doorbell>> = (0..n).map(|_| Arc::new(Doorbell::default())).collect();
    let mut ends: Vec<MeshEnds<T>> = (0..n)
        .map(|me| MeshEnds {
            me,
            tx: (0..n).map(|_| None).collect(),
            rx: (0..n).map(|_| None).collect(),
            bells: bells.clone(),
        })
        .collect();
    for from in 0..n {
        for to in 0..n {
            if from != to {
                let (tx, rx) = bounded(capacity);
                ends[from].tx[to] = Some(tx);
                ends[to].rx[from] = Some(rx);
            }
        }
    }
    (ends, bells)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_arrive_in_order_and_full_queue_gives_batch_back() {
        let (ends, _) = build::<u32>(2, 2);
        assert!(ends[0].try_send(1, vec![1, 2]).is_ok());
        assert!(ends[0].try_send(1, vec![3]).is_ok());
        assert_eq!(ends[0].try_send(1, vec![4]), Err(vec![4]));
        let rx = ends[1].rx[0].as_ref().map(|r| r.try_recv());
        assert_eq!(rx, Some(Ok(vec![1, 2])));
        assert!(ends[0].try_send(0, vec![9]).is_err(), "no channel to self");
    }
}
