//! The shard's connection scheduler: one io_uring ring of its own for the
//! readiness of every socket on the shard, and a small executor for the
//! connection and accept tasks.
//!
//! Why not a glommio stream and task per connection: glommio keeps a
//! stream object, an armed `Source` and a task header for each idle
//! connection (~1 KB, GLOMMIO.md). Here an idle connection costs one slot
//! (32 B) and its boxed task; its readiness is a multishot `POLL_ADD` in this
//! ring (kernel memory, re-armed only if the kernel ends it).
//!
//! How it fits in glommio: the ring signals an eventfd when it has work;
//! a glommio task reads that eventfd (a plain io_uring read in glommio's own
//! ring) and wakes the scheduler task, which reaps completions, wakes the
//! tasks they name, polls the woken tasks and submits new requests.
//! The ring defers its task work (`IORING_SETUP_DEFER_TASKRUN` where the
//! kernel has it): readiness reported by other CPUs is queued and run in
//! one `io_uring_enter` when the scheduler reaps, rather than interrupting
//! the shard for each socket (QoS 1 pairs: 1.07-1.08x msgs per CPU-s in
//! two alternating A/B runs of 5 and 8 rounds). The kernel runs at most 20
//! deferred items per enter; the rest stays flagged (`IORING_SQ_TASKRUN`)
//! and the pass reports more work (tests/interop/burst_check.py: 17,000
//! sockets readable at once on one shard, every one served).
//!
//! Tasks are woken with a `Waker` that names their slot and generation:
//! a stale waker or completion (slot reused) is ignored.

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};
use tracing::{debug, warn};

/// Submission queue entries (requests are small and submitted every pass).
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries: a burst of readiness for many connections.
const CQ_ENTRIES: u32 = 16 * 1024;
/// Tasks polled before the scheduler yields to other glommio tasks.
const BUDGET: usize = 256;

/// Completion tags (top two bits of user_data).
const TAG_READ: u64 = 1 << 62;
const TAG_WRITE: u64 = 2 << 62;
const TAG_MASK: u64 = 3 << 62;
/// Completions nobody waits for (poll removals).
const IGNORE: u64 = 0;

/// A task's identity: slot index and generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskKey {
    slot: u32,
    gen: u32,
}

impl TaskKey {
    fn pack(self) -> u64 {
        (u64::from(self.gen & 0x3fff_ffff) << 32) | u64::from(self.slot)
    }
    fn unpack(v: u64) -> TaskKey {
        TaskKey {
            slot: v as u32,
            gen: ((v >> 32) & 0x3fff_ffff) as u32,
        }
    }
}

type Task = Pin<Box<dyn Future<Output = ()>>>;

struct Slot {
    gen: u32,
    /// The socket whose readability wakes this task (-1: none).
    fd: RawFd,
    /// In the ready queue already.
    queued: bool,
    /// A one-shot writability poll is armed.
    write_armed: bool,
    /// The ring reported the socket readable since the task last asked.
    readable: bool,
    /// Taken out while the task is polled.
    task: Option<Task>,
}

/// One shard's scheduler (thread-local: one shard per thread).
pub struct Sched {
    ring: RefCell<Option<IoUring>>,
    slots: RefCell<Slab<Slot>>,
    ready: RefCell<Vec<TaskKey>>,
    /// The tasks polled in the current pass (kept for its capacity).
    batch: Cell<Vec<TaskKey>>,
    /// The glommio task that runs the scheduler.
    waker: Cell<Option<Waker>>,
    next_gen: Cell<u32>,
    /// Requests that did not fit the submission queue.
    overflow: RefCell<Vec<squeue::Entry>>,
}

thread_local! {
    static SCHED: Sched = const { Sched {
        ring: RefCell::new(None),
        slots: RefCell::new(Slab::new()),
        ready: RefCell::new(Vec::new()),
        batch: Cell::new(Vec::new()),
        waker: Cell::new(None),
        next_gen: Cell::new(1),
        overflow: RefCell::new(Vec::new()),
    } };
}

/// Runs `f` with this thread's scheduler.
pub fn with<R>(f: impl FnOnce(&Sched) -> R) -> R {
    SCHED.with(f)
}

/// Creates the ring and its eventfd; returns the eventfd the runtime waits on.
pub fn init() -> io::Result<RawFd> {
    // Deferred task work (see the module doc); plain ring before Linux 6.1.
    let ring = match IoUring::builder()
        .setup_cqsize(CQ_ENTRIES)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .build(SQ_ENTRIES)
    {
        Ok(r) => r,
        Err(e) => {
            debug!("connection ring without deferred task work ({e}): Linux 6.1+ has it");
            IoUring::builder()
                .setup_cqsize(CQ_ENTRIES)
                .build(SQ_ENTRIES)?
        }
    };
    // SAFETY: eventfd(2) with constant flags; the fd is owned by the caller.
    // Blocking on purpose: glommio's read of it then waits in the kernel.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(io::Error::last_os_error());
    }
    ring.submitter().register_eventfd(efd)?;
    with(|s| *s.ring.borrow_mut() = Some(ring));
    Ok(efd)
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(clone_raw, wake_raw, wake_raw, drop_raw);

fn raw(key: TaskKey) -> RawWaker {
    RawWaker::new(key.pack() as usize as *const (), &VTABLE)
}
unsafe fn clone_raw(p: *const ()) -> RawWaker {
    RawWaker::new(p, &VTABLE)
}
unsafe fn wake_raw(p: *const ()) {
    let key = TaskKey::unpack(p as usize as u64);
    // A waker used on another thread (never done) finds no such task there.
    let _ = SCHED.try_with(|s| s.wake(key));
}
unsafe fn drop_raw(_: *const ()) {}

fn waker_for(key: TaskKey) -> Waker {
    // SAFETY: the vtable functions only decode the key from the pointer
    // value; nothing is dereferenced.
    unsafe { Waker::from_raw(raw(key)) }
}

impl Sched {
    /// Starts a task. `fd` (if any) is watched for readability from now on
    /// and wakes the task; the task is polled soon.
    pub fn spawn<F, T>(&self, fd: Option<RawFd>, make: F)
    where
        F: FnOnce(TaskKey) -> T,
        T: Future<Output = ()> + 'static,
    {
        let gen = self.next_gen.get();
        self.next_gen
            .set((gen.wrapping_add(1) & 0x3fff_ffff).max(1));
        let slot = {
            let mut slots = self.slots.borrow_mut();
            slots.insert(Slot {
                gen,
                fd: fd.unwrap_or(-1),
                queued: false,
                write_armed: false,
                readable: false,
                task: None,
            })
        };
        let key = TaskKey {
            slot: slot as u32,
            gen,
        };
        let task: Task = Box::pin(make(key));
        if let Some(s) = self.slots.borrow_mut().get_mut(slot) {
            s.task = Some(task);
        }
        if let Some(fd) = fd {
            self.push(poll_read(fd, key));
        }
        self.wake(key);
    }

    /// Asks for a wake-up when `fd` becomes writable (once).
    pub fn want_write(&self, key: TaskKey) {
        let fd = {
            let mut slots = self.slots.borrow_mut();
            match slots.get_mut(key.slot as usize) {
                Some(s) if s.gen == key.gen && s.fd >= 0 && !s.write_armed => {
                    s.write_armed = true;
                    s.fd
                }
                _ => return,
            }
        };
        self.push(
            opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
                .build()
                .user_data(TAG_WRITE | key.pack()),
        );
    }

    /// Whether the socket was reported readable since the last call (a
    /// task that has read until EAGAIN waits for this before reading
    /// again: a task woken to write does not pay for a useless recv).
    pub fn take_readable(&self, key: TaskKey) -> bool {
        match self.slots.borrow_mut().get_mut(key.slot as usize) {
            Some(s) if s.gen == key.gen => std::mem::take(&mut s.readable),
            _ => false,
        }
    }

    /// Stops watching the task's socket before it is closed or handed to
    /// another shard. The removal is submitted at once: the ring holds a
    /// reference to the socket until then.
    pub fn unwatch(&self, key: TaskKey) {
        let write_armed = {
            let mut slots = self.slots.borrow_mut();
            match slots.get_mut(key.slot as usize) {
                Some(s) if s.gen == key.gen && s.fd >= 0 => {
                    s.fd = -1;
                    std::mem::take(&mut s.write_armed)
                }
                _ => return,
            }
        };
        self.push(
            opcode::PollRemove::new(TAG_READ | key.pack())
                .build()
                .user_data(IGNORE),
        );
        if write_armed {
            self.push(
                opcode::PollRemove::new(TAG_WRITE | key.pack())
                    .build()
                    .user_data(IGNORE),
            );
        }
        self.submit();
    }

    fn wake(&self, key: TaskKey) {
        {
            let mut slots = self.slots.borrow_mut();
            match slots.get_mut(key.slot as usize) {
                Some(s) if s.gen == key.gen && !s.queued => s.queued = true,
                _ => return,
            }
        }
        self.ready.borrow_mut().push(key);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn push(&self, e: squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        let Some(ring) = ring.as_mut() else { return };
        // SAFETY: poll requests reference no user memory.
        let full = unsafe { ring.submission().push(&e).is_err() };
        if full {
            self.overflow.borrow_mut().push(e);
        }
    }

    /// Submits what is queued (no wait).
    fn submit(&self) {
        let mut ring = self.ring.borrow_mut();
        let Some(ring) = ring.as_mut() else { return };
        loop {
            let sq = ring.submission();
            if sq.is_empty() && !sq.cq_overflow() && !sq.taskrun() {
                return;
            }
            drop(sq);
            if let Err(e) = ring.submit() {
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // The completion queue is full: what is queued stays
                    // queued until the pass has reaped (it then reports
                    // more work, so the scheduler runs again).
                    Some(libc::EBUSY) => return,
                    _ => {
                        warn!("io_uring submit failed: {e}");
                        return;
                    }
                }
            }
            let mut over = self.overflow.borrow_mut();
            if over.is_empty() {
                return;
            }
            let mut sq = ring.submission();
            while let Some(e) = over.pop() {
                // SAFETY: as in `push`.
                if unsafe { sq.push(&e).is_err() } {
                    over.push(e);
                    break;
                }
            }
        }
    }

    /// Moves completions to wake-ups; re-arms multishot polls the kernel ended.
    fn reap(&self) {
        // Runs deferred task work (posts its completions), if any is queued.
        self.submit();
        // Re-arms are rare (no allocation unless one is needed); they are
        // pushed once the completion queue is no longer borrowed.
        let mut rearm = Vec::new();
        {
            let mut ring = self.ring.borrow_mut();
            let Some(ring) = ring.as_mut() else { return };
            for cqe in ring.completion() {
                let ud = cqe.user_data();
                if ud == IGNORE {
                    continue;
                }
                let key = TaskKey::unpack(ud & !TAG_MASK);
                let fd = match self.slots.borrow_mut().get_mut(key.slot as usize) {
                    Some(s) if s.gen == key.gen => {
                        if ud & TAG_MASK == TAG_WRITE {
                            s.write_armed = false;
                            -1
                        } else {
                            s.readable = true;
                            s.fd
                        }
                    }
                    _ => -1,
                };
                // The kernel ended the multishot poll (e.g. the completion
                // queue overflowed): arm it again. An error ends it for good:
                // the task, woken, finds the error on its next read.
                if fd >= 0 && !cqueue::more(cqe.flags()) && cqe.result() >= 0 {
                    rearm.push(poll_read(fd, key));
                }
                self.wake(key);
            }
        }
        for e in rearm {
            self.push(e);
        }
    }

    /// One pass: reap, poll woken tasks (up to the budget), submit.
    /// Returns true if tasks are still waiting to run.
    fn run_once(&self, cx: &mut Context<'_>) -> bool {
        self.waker.set(Some(cx.waker().clone()));
        self.reap();
        // The batch buffer is reused from pass to pass.
        let mut batch = self.batch.take();
        {
            let mut ready = self.ready.borrow_mut();
            let n = ready.len().min(BUDGET);
            batch.extend(ready.drain(..n));
        }
        for &key in &batch {
            let task = {
                let mut slots = self.slots.borrow_mut();
                match slots.get_mut(key.slot as usize) {
                    Some(s) if s.gen == key.gen => {
                        s.queued = false;
                        s.task.take()
                    }
                    _ => None,
                }
            };
            let Some(mut task) = task else { continue };
            let w = waker_for(key);
            let mut tcx = Context::from_waker(&w);
            match task.as_mut().poll(&mut tcx) {
                Poll::Ready(()) => {
                    self.unwatch(key);
                    let mut slots = self.slots.borrow_mut();
                    if slots
                        .get(key.slot as usize)
                        .is_some_and(|s| s.gen == key.gen)
                    {
                        slots.remove(key.slot as usize);
                    }
                }
                Poll::Pending => {
                    if let Some(s) = self.slots.borrow_mut().get_mut(key.slot as usize) {
                        if s.gen == key.gen {
                            s.task = Some(task);
                        }
                    }
                }
            }
        }
        batch.clear();
        self.batch.set(batch);
        self.submit();
        // Completions, deferred work or an overflow to flush (the cause of
        // EBUSY) call for another pass.
        let unreaped = match self.ring.borrow_mut().as_mut() {
            Some(ring) => {
                let sq = ring.submission();
                let more = sq.taskrun() || sq.cq_overflow();
                drop(sq);
                more || !ring.completion().is_empty()
            }
            None => false,
        };
        unreaped || !self.ready.borrow().is_empty()
    }
}

fn poll_read(fd: RawFd, key: TaskKey) -> squeue::Entry {
    opcode::PollAdd::new(types::Fd(fd), (libc::POLLIN | libc::POLLRDHUP) as u32)
        .multi(true)
        .build()
        .user_data(TAG_READ | key.pack())
}

/// The scheduler's glommio task: runs woken tasks, forever.
pub async fn run() {
    poll_fn(|cx| {
        let more = with(|s| s.run_once(cx));
        if more {
            // Let glommio's other tasks (the mesh pump, timers) run too.
            cx.waker().wake_by_ref();
        }
        Poll::<()>::Pending
    })
    .await
}

/// Wakes the scheduler (from the eventfd reader).
pub fn notify() {
    with(|s| {
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    })
}
