//! The shard's connection scheduler: one io_uring ring of its own for the
//! readiness of every socket on the shard, and a small executor for the
//! connection and accept tasks.
//!
//! Why not a glommio stream and task per connection: glommio keeps a
//! stream object, an armed `Source` and a task header for each idle
//! connection (~1 KB, docs/GLOMMIO-NOTES.md). Here an idle connection costs one slot
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
//! Tasks are woken with a `Waker` that names their scheduler, slot and
//! generation: a stale waker or completion (slot reused) is ignored (at
//! worst, after 2^20 reuses of one slot, it wakes a task spuriously, which
//! a future must tolerate anyway). A waker used on another thread (a
//! bridge or cluster thread, say) finds its scheduler in a process-wide
//! registry: the key is queued there and the shard's eventfd is written,
//! so the shard wakes and polls the task on its own thread.

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
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

/// Generations wrap at 2^20 (bits 32..52 of a packed key).
const GEN_MASK: u32 = (1 << 20) - 1;
/// Schedulers in the process (bits 52..62 of a waker's data).
const MAX_SCHEDS: usize = 1 << 10;

/// A task's identity: slot index and generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskKey {
    slot: u32,
    gen: u32,
}

impl TaskKey {
    fn pack(self) -> u64 {
        (u64::from(self.gen & GEN_MASK) << 32) | u64::from(self.slot)
    }
    fn unpack(v: u64) -> TaskKey {
        TaskKey {
            slot: v as u32,
            gen: ((v >> 32) as u32) & GEN_MASK,
        }
    }
}

/// What another thread needs to wake a task of this scheduler.
struct Remote {
    /// Tasks woken from other threads, not yet taken by the scheduler.
    keys: Mutex<Vec<TaskKey>>,
    /// Set when `keys` went from empty to not empty (one eventfd write).
    pending: AtomicBool,
    /// A duplicate of the scheduler's eventfd (valid for the process's life).
    efd: OwnedFd,
}

/// Every scheduler of the process, by id (entries are never removed).
static REMOTES: RwLock<Vec<Arc<Remote>>> = RwLock::new(Vec::new());

/// Wakes task `key` of scheduler `id` from a thread that is not its own.
fn wake_remote(id: usize, key: TaskKey) {
    let remote = match REMOTES.read() {
        Ok(r) => r.get(id).cloned(),
        Err(_) => None,
    };
    let Some(r) = remote else { return };
    if let Ok(mut keys) = r.keys.lock() {
        keys.push(key);
    }
    if !r.pending.swap(true, Ordering::AcqRel) {
        let one: u64 = 1;
        // SAFETY: an 8-byte write from a local to our own eventfd.
        unsafe { libc::write(r.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
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
    /// This scheduler's id in `REMOTES` (usize::MAX before `init`).
    id: Cell<usize>,
    remote: RefCell<Option<Arc<Remote>>>,
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
        id: Cell::new(usize::MAX),
        remote: RefCell::new(None),
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
    // SAFETY: dup(2) of the eventfd just created; the copy is owned.
    let dup = unsafe { libc::fcntl(efd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    let remote = Arc::new(Remote {
        keys: Mutex::new(Vec::new()),
        pending: AtomicBool::new(false),
        efd: unsafe { OwnedFd::from_raw_fd(dup) },
    });
    let id = {
        let mut all = REMOTES
            .write()
            .map_err(|_| io::Error::other("scheduler registry poisoned"))?;
        if all.len() >= MAX_SCHEDS {
            return Err(io::Error::other("too many schedulers in one process"));
        }
        all.push(remote.clone());
        all.len() - 1
    };
    with(|s| {
        *s.ring.borrow_mut() = Some(ring);
        s.id.set(id);
        *s.remote.borrow_mut() = Some(remote);
    });
    Ok(efd)
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(clone_raw, wake_raw, wake_raw, drop_raw);

fn raw(id: usize, key: TaskKey) -> RawWaker {
    let data = ((id as u64) << 52) | key.pack();
    RawWaker::new(data as usize as *const (), &VTABLE)
}
unsafe fn clone_raw(p: *const ()) -> RawWaker {
    RawWaker::new(p, &VTABLE)
}
unsafe fn wake_raw(p: *const ()) {
    let data = p as usize as u64;
    let key = TaskKey::unpack(data & ((1 << 52) - 1));
    let id = ((data >> 52) as usize) & (MAX_SCHEDS - 1);
    let here = SCHED.try_with(|s| {
        let mine = s.id.get() == id;
        if mine {
            s.wake(key);
        }
        mine
    });
    if !matches!(here, Ok(true)) {
        wake_remote(id, key);
    }
}
unsafe fn drop_raw(_: *const ()) {}

fn waker_for(id: usize, key: TaskKey) -> Waker {
    // SAFETY: the vtable functions only decode the key from the pointer
    // value; nothing is dereferenced. Waking is valid from any thread.
    unsafe { Waker::from_raw(raw(id, key)) }
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
        self.next_gen.set((gen.wrapping_add(1) & GEN_MASK).max(1));
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
        self.take_remote();
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
            let w = waker_for(self.id.get(), key);
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

impl Sched {
    /// Wakes the tasks that other threads woke.
    fn take_remote(&self) {
        let remote = self.remote.borrow();
        let Some(r) = remote.as_ref() else { return };
        if !r.pending.swap(false, Ordering::AcqRel) {
            return;
        }
        let keys = match r.keys.lock() {
            Ok(mut k) => std::mem::take(&mut *k),
            Err(_) => return,
        };
        for key in keys {
            self.wake(key);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;
    use std::time::Duration;

    /// A waker sent to another thread and woken there gets its task
    /// polled again, on the scheduler's own thread.
    #[test]
    fn a_waker_woken_on_another_thread_polls_the_task() {
        let h = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(|| async {
                let efd = init().expect("connection ring");
                glommio::spawn_local(super::super::watch_ring(efd)).detach();
                glommio::spawn_local(run()).detach();
                let polls = Rc::new(Cell::new(0u32));
                let (tx, rx) = std::sync::mpsc::channel::<Waker>();
                let p = polls.clone();
                with(|s| {
                    s.spawn(None, move |_| {
                        poll_fn(move |cx| {
                            p.set(p.get() + 1);
                            if p.get() == 1 {
                                let _ = tx.send(cx.waker().clone());
                                return Poll::Pending;
                            }
                            Poll::Ready(())
                        })
                    })
                });
                let waker_thread = std::thread::spawn(move || {
                    let w = rx.recv_timeout(Duration::from_secs(5)).expect("waker sent");
                    std::thread::sleep(Duration::from_millis(50));
                    w.wake();
                });
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while polls.get() < 2 && std::time::Instant::now() < deadline {
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
                waker_thread.join().expect("waker thread");
                polls.get()
            })
            .expect("executor");
        assert_eq!(h.join().expect("join"), 2, "the task was polled again");
    }
}
