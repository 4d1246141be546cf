//! The cross-shard hop: a producer glommio executor sends batches of
//! `ShardMsg` over the real mesh (`tarta::mesh::build`: a bounded crossbeam
//! channel plus the receiver's `Doorbell`) to a consumer executor whose task
//! arms the doorbell and drains, as the broker's mesh pump does.
//!
//! The messages are `ShardMsg::RouteAck(n)`: the real batch type
//! (`Vec<ShardMsg>`, one allocation per batch, freed on the consumer), but
//! no `Arc<Message>` whose reference count would add its own cross-core
//! traffic. On a full queue the producer either sleeps 200 µs and retries,
//! as the pump does, or retries at once ([`Retry`]); those retries are
//! counted.
//!
//! Both executors are `Placement::Unbound` (the machine is shared; see
//! docs/GLOMMIO-NOTES.md on pinned shards and busy neighbours) and live for the whole
//! benchmark, so only the hop is timed, not executor start-up.

use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tarta::broker::ShardMsg;
use tarta::mesh::{build, Doorbell, MeshEnds};

/// The broker's default `mesh_capacity` (batches per channel).
pub const CAPACITY: usize = 1024;

/// What the producer does when the channel is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Sleep 200 µs and retry, as the broker's mesh pump does.
    Sleep,
    /// Retry at once (busy): measures the hop itself, not the back-off.
    Spin,
}

const PRODUCER: usize = 0;
const CONSUMER: usize = 1;

enum Cmd {
    /// Send `batches` batches of `batch` messages each.
    Send {
        batches: u64,
        batch: usize,
    },
    Stop,
}

/// Two running executors joined by the mesh.
pub struct Hop {
    ctl: mpsc::Sender<Cmd>,
    ctl_bell: Arc<Doorbell>,
    /// Messages the consumer should have received when the current run ends.
    target: Arc<AtomicU64>,
    done: mpsc::Receiver<u64>,
    sent: u64,
    /// Times the producer found the channel full (and slept 200 µs).
    full: Arc<AtomicU64>,
    producer: Option<ExecutorJoinHandle<()>>,
    consumer: Option<ExecutorJoinHandle<()>>,
}

/// Waits (without blocking the executor) for the next command.
async fn next_cmd(rx: &mpsc::Receiver<Cmd>, bell: &Doorbell) -> Cmd {
    poll_fn(|cx| {
        bell.arm(cx.waker());
        match rx.try_recv() {
            Ok(cmd) => Poll::Ready(cmd),
            Err(mpsc::TryRecvError::Empty) => Poll::Pending,
            Err(mpsc::TryRecvError::Disconnected) => Poll::Ready(Cmd::Stop),
        }
    })
    .await
}

/// The producer shard: sends what it is told, counting in `full` how often
/// the channel was full.
async fn produce(
    ends: MeshEnds<ShardMsg>,
    ctl: mpsc::Receiver<Cmd>,
    bell: Arc<Doorbell>,
    full: Arc<AtomicU64>,
    retry: Retry,
) {
    let mut seq = 0u64;
    while let Cmd::Send { batches, batch } = next_cmd(&ctl, &bell).await {
        for _ in 0..batches {
            let mut b: Vec<ShardMsg> = Vec::with_capacity(batch);
            for _ in 0..batch {
                seq += 1;
                b.push(ShardMsg::RouteAck(seq));
            }
            while let Err(back) = ends.try_send(CONSUMER, b) {
                full.fetch_add(1, Ordering::Relaxed);
                b = back;
                match retry {
                    Retry::Sleep => glommio::timer::sleep(Duration::from_micros(200)).await,
                    Retry::Spin => std::hint::spin_loop(),
                }
            }
        }
    }
    // Dropping the senders disconnects the channel; the ring makes the
    // consumer notice.
    let bell = ends.bells[CONSUMER].clone();
    drop(ends);
    bell.ring();
}

/// The consumer shard: drains on every doorbell ring and reports when the
/// running total reaches `target`.
async fn consume(mut ends: MeshEnds<ShardMsg>, target: Arc<AtomicU64>, done: mpsc::Sender<u64>) {
    let Some(rx) = ends.rx[PRODUCER].take() else {
        return;
    };
    let bell = ends.bells[CONSUMER].clone();
    let mut received = 0u64;
    let mut reported = 0u64;
    poll_fn(|cx| {
        bell.arm(cx.waker());
        loop {
            match rx.try_recv() {
                Ok(batch) => received += batch.len() as u64,
                Err(e) if e.is_disconnected() => return Poll::Ready(()),
                Err(_) => break,
            }
        }
        let t = target.load(Ordering::Acquire);
        if t > reported && received >= t {
            reported = t;
            // The benchmark thread waits on the other end; if it is gone
            // there is nobody to tell.
            let _ = done.send(received);
        }
        Poll::Pending
    })
    .await
}

impl Hop {
    /// Starts both executors (`capacity` batches per channel).
    pub fn start(capacity: usize, retry: Retry) -> Result<Hop, String> {
        let (mut ends, _bells) = build::<ShardMsg>(2, capacity);
        let consumer_ends = ends.pop().ok_or("mesh without shard 1")?;
        let producer_ends = ends.pop().ok_or("mesh without shard 0")?;
        let (ctl, ctl_rx) = mpsc::channel();
        let ctl_bell = Arc::new(Doorbell::default());
        let target = Arc::new(AtomicU64::new(0));
        let (done_tx, done) = mpsc::channel();

        let t = target.clone();
        let consumer = LocalExecutorBuilder::new(Placement::Unbound)
            .name("bench-consumer")
            .io_memory(512 * 1024)
            .spawn(move || consume(consumer_ends, t, done_tx))
            .map_err(|e| format!("consumer executor: {e}"))?;
        let bell = ctl_bell.clone();
        let full = Arc::new(AtomicU64::new(0));
        let f = full.clone();
        let producer = LocalExecutorBuilder::new(Placement::Unbound)
            .name("bench-producer")
            .io_memory(512 * 1024)
            .spawn(move || produce(producer_ends, ctl_rx, bell, f, retry))
            .map_err(|e| format!("producer executor: {e}"))?;
        Ok(Hop {
            ctl,
            ctl_bell,
            target,
            done,
            sent: 0,
            full,
            producer: Some(producer),
            consumer: Some(consumer),
        })
    }

    /// Sends `batches` batches of `batch` messages and waits until the
    /// consumer has drained them all; returns the time from the command to
    /// the consumer's report (end to end).
    pub fn run(&mut self, batches: u64, batch: usize) -> Result<Duration, String> {
        self.sent += batches * batch as u64;
        self.target.store(self.sent, Ordering::Release);
        let start = Instant::now();
        self.ctl
            .send(Cmd::Send { batches, batch })
            .map_err(|_| "producer executor is gone")?;
        self.ctl_bell.ring();
        let got = self
            .done
            .recv_timeout(Duration::from_secs(60))
            .map_err(|e| format!("consumer did not report: {e}"))?;
        let elapsed = start.elapsed();
        if got != self.sent {
            return Err(format!("consumer saw {got} messages, {} sent", self.sent));
        }
        Ok(elapsed)
    }

    /// How often, so far, the producer found the channel full (each time
    /// it slept 200 µs before retrying).
    pub fn full_count(&self) -> u64 {
        self.full.load(Ordering::Relaxed)
    }

    /// Messages sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Stops both executors.
    pub fn stop(mut self) -> Result<(), String> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), String> {
        // If the producer is already gone, joining it reports why.
        let _ = self.ctl.send(Cmd::Stop);
        self.ctl_bell.ring();
        if let Some(p) = self.producer.take() {
            p.join().map_err(|e| format!("producer: {e}"))?;
        }
        if let Some(c) = self.consumer.take() {
            c.join().map_err(|e| format!("consumer: {e}"))?;
        }
        Ok(())
    }
}

impl Drop for Hop {
    fn drop(&mut self) {
        // Errors were already reported by `stop` if it was called.
        let _ = self.shutdown();
    }
}
