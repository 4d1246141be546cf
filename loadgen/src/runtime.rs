//! The runtime layer of a worker process: one glommio executor per thread,
//! each with its shared read buffer, its timer wheel and its statistics.
//! glommio is imported here and in `conn` only (docs/GLOMMIO-NOTES.md: keep the
//! runtime swappable).
//!
//! - [`Shared`]: the process-wide state the worker's main thread and the
//!   executors share (phase, window times, per-thread counters).
//! - [`Exec`]: one executor's state, reachable only from its own thread.
//! - The *tick* task drives every timer of its executor: no connection owns
//!   a timer. A connection registers its next deadline in the executor's
//!   wheel and is woken when it is due (publish schedule, keep-alive,
//!   timeouts); a phase change wakes every registered connection.

use crate::cli::Settings;
use crate::conn;
use crate::stats::{DeliveryTotals, Latency, Tracker};
use crate::tls::TlsClient;
use bytes::{Bytes, BytesMut};
use glommio::{LocalExecutorBuilder, Placement};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Duration;

pub const SETUP: u8 = 0;
pub const RUN: u8 = 1;
pub const CLOSE: u8 = 2;

/// The shard-wide read chunk (see `conn`).
pub const READ_CHUNK: usize = 64 * 1024;

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process of the
/// machine, so a timestamp written by one process is comparable in another.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Counters one executor publishes for the worker's main thread.
#[derive(Default)]
#[repr(align(128))]
pub struct ThreadCounters {
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    pub settled: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub inflight: AtomicU64,
    pub errors: AtomicU64,
    pub active: AtomicU64,
}

/// State shared by the worker's threads.
pub struct Shared {
    pub settings: Settings,
    pub phase: AtomicU8,
    /// Messages sent from here on are measured (latency, delivered rate).
    pub measure_start_ns: AtomicU64,
    /// Publishers stop at this time.
    pub pub_end_ns: AtomicU64,
    pub counters: Vec<ThreadCounters>,
    /// Latencies since the last progress report.
    pub interval: Mutex<Latency>,
    /// The `$share` group's streams, one tracker per publisher.
    pub group: Mutex<Vec<Tracker>>,
    pub zero_payload: Bytes,
    /// Executors that have started; they connect once `connect_go` is set
    /// (so the worker can measure its RSS before any connection exists).
    pub started: AtomicU64,
    pub connect_go: std::sync::atomic::AtomicBool,
    /// `--tls`: the configuration every connection of the process shares.
    pub tls: Option<TlsClient>,
}

impl Shared {
    pub fn new(settings: Settings) -> Result<Self, String> {
        let tls = match &settings.tls {
            Some(t) => Some(TlsClient::new(t)?),
            None => None,
        };
        let threads = settings.threads;
        let zero_payload = Bytes::from(vec![0u8; settings.payload]);
        let group = match settings.scenario {
            crate::plan::Scenario::Shared { publishers, .. } => {
                vec![Tracker::new(); publishers as usize]
            }
            _ => Vec::new(),
        };
        Ok(Shared {
            settings,
            phase: AtomicU8::new(SETUP),
            measure_start_ns: AtomicU64::new(u64::MAX),
            pub_end_ns: AtomicU64::new(u64::MAX),
            counters: (0..threads).map(|_| ThreadCounters::default()).collect(),
            interval: Mutex::new(Latency::new()),
            group: Mutex::new(group),
            zero_payload,
            started: AtomicU64::new(0),
            connect_go: std::sync::atomic::AtomicBool::new(false),
            tls,
        })
    }
}

/// An executor's statistics (only its own thread touches them).
#[derive(Default)]
pub struct Local {
    pub connected: u64,
    pub failed: u64,
    pub settled: u64,
    pub sent: u64,
    pub sent_window: u64,
    pub acked: u64,
    pub received: u64,
    /// Deliveries of messages sent inside the measurement window.
    pub received_window: u64,
    pub inflight: u64,
    /// Deliveries that were not loadgen messages of this run.
    pub foreign: u64,
    /// v5 PUBACK/PUBREC with a reason code >= 0x80.
    pub publish_refused: u64,
    pub subs_ok: u64,
    pub subs_refused: u64,
    /// TLS clients that got their CONNACK, and those of them whose
    /// handshake resumed a session (`--tls-resume`).
    pub tls_handshakes: u64,
    pub tls_resumed: u64,
    pub latency: Latency,
    pub interval: Latency,
    /// TCP connect to CONNACK (or SUBACK), µs.
    pub connect_us: Latency,
    /// Setup failures by reason.
    pub failures: BTreeMap<String, u64>,
    /// Failures of established connections by reason.
    pub errors: BTreeMap<String, u64>,
    pub delivery: DeliveryTotals,
    pub sent_by_pub: Vec<(u32, u64)>,
    pub live_subs: Vec<u32>,
    pub first_connect_ns: u64,
    pub last_connected_ns: u64,
    pub error_count: u64,
}

impl Local {
    pub fn fail_setup(&mut self, why: String) {
        self.failed += 1;
        self.settled += 1;
        *self.failures.entry(why).or_default() += 1;
    }

    pub fn fail_run(&mut self, why: String) {
        self.error_count += 1;
        *self.errors.entry(why).or_default() += 1;
    }
}

/// One executor's state.
pub struct Exec {
    pub shared: Arc<Shared>,
    pub thread: usize,
    pub settings: Settings,
    /// The shard-wide read buffer: reads land here and only an incomplete
    /// packet is copied to its connection.
    pub rbuf: RefCell<BytesMut>,
    /// TLS clients: the plaintext of what was read (used like `rbuf`).
    pub pbuf: RefCell<BytesMut>,
    /// Deadline (ms of CLOCK_MONOTONIC) -> connections to wake.
    wheel: RefCell<BTreeMap<u64, Vec<Waker>>>,
    phase: Cell<u8>,
    pub measure_start_ns: Cell<u64>,
    pub pub_end_ns: Cell<u64>,
    pub local: RefCell<Local>,
    /// Connection tasks alive / still in setup.
    pub active: Cell<u64>,
    pub connecting: Cell<u64>,
    rng: Cell<u64>,
    pub prefix: String,
}

impl Exec {
    fn new(shared: Arc<Shared>, thread: usize) -> Self {
        let settings = shared.settings.clone();
        let prefix = crate::plan::topic_prefix(&settings.topic_prefix, settings.run_id);
        Exec {
            thread,
            rbuf: RefCell::new(BytesMut::new()),
            pbuf: RefCell::new(BytesMut::new()),
            wheel: RefCell::new(BTreeMap::new()),
            phase: Cell::new(SETUP),
            measure_start_ns: Cell::new(u64::MAX),
            pub_end_ns: Cell::new(u64::MAX),
            local: RefCell::new(Local::default()),
            active: Cell::new(0),
            connecting: Cell::new(0),
            rng: Cell::new(
                now_ns() ^ (u64::from(settings.run_id) << 32) ^ ((thread as u64 + 1) * 0x9E37_79B9),
            ),
            prefix,
            settings,
            shared,
        }
    }

    pub fn phase(&self) -> u8 {
        self.phase.get()
    }

    /// Wakes `waker` at `deadline_ms` (or at the next phase change).
    pub fn register(&self, deadline_ms: u64, waker: &Waker) {
        self.wheel
            .borrow_mut()
            .entry(deadline_ms)
            .or_default()
            .push(waker.clone());
    }

    /// xorshift64*: WebSocket masks and nonces (not cryptographic; RFC 6455
    /// masking only guards proxies against crafted payloads).
    pub fn random(&self) -> u64 {
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn wake_due(&self, now_ms: u64, all: bool) {
        if all {
            // Wake everyone but keep the entries: each connection believes
            // its deadline is registered and will not register it again.
            let wakers: Vec<Waker> = self.wheel.borrow().values().flatten().cloned().collect();
            for w in wakers {
                w.wake();
            }
        }
        let due = {
            let mut w = self.wheel.borrow_mut();
            let later = w.split_off(&(now_ms + 1));
            std::mem::replace(&mut *w, later)
        };
        for (_, wakers) in due {
            for w in wakers {
                w.wake();
            }
        }
    }

    /// Copies the counters to the shared atomics.
    fn publish(&self) {
        let c = &self.shared.counters[self.thread];
        let mut l = self.local.borrow_mut();
        let r = Ordering::Relaxed;
        c.connected.store(l.connected, r);
        c.failed.store(l.failed, r);
        c.settled.store(l.settled, r);
        c.sent.store(l.sent, r);
        c.received.store(l.received, r);
        c.inflight.store(l.inflight, r);
        c.errors.store(l.error_count, r);
        c.active.store(self.active.get(), r);
        if l.interval.count() > 0 {
            if let Ok(mut i) = self.shared.interval.lock() {
                i.merge(&l.interval);
            }
            l.interval.reset();
        }
    }
}

/// Drives the executor's timers and follows the process-wide phase.
async fn tick(ex: Rc<Exec>, fast: bool, done: Rc<Cell<bool>>) {
    let period = Duration::from_millis(if fast { 1 } else { 10 });
    let mut last_publish = 0;
    // LOADGEN_DEBUG=1: one line per executor and second on stderr.
    let debug = std::env::var_os("LOADGEN_DEBUG").is_some();
    while !done.get() {
        glommio::timer::sleep(period).await;
        let shared_phase = ex.shared.phase.load(Ordering::Acquire);
        let changed = shared_phase != ex.phase.get();
        if changed {
            ex.measure_start_ns
                .set(ex.shared.measure_start_ns.load(Ordering::Acquire));
            ex.pub_end_ns
                .set(ex.shared.pub_end_ns.load(Ordering::Acquire));
            ex.phase.set(shared_phase);
        }
        let now_ms = now_ns() / 1_000_000;
        ex.wake_due(now_ms, changed);
        if debug && now_ms / 1000 != last_publish / 1000 {
            eprintln!(
                "tick t{} phase {} active {} wheel {}",
                ex.thread,
                ex.phase.get(),
                ex.active.get(),
                ex.wheel.borrow().len()
            );
        }
        if now_ms >= last_publish + 50 {
            last_publish = now_ms;
            ex.publish();
        }
    }
    ex.publish();
}

/// Runs this executor's clients until the phase is CLOSE and every
/// connection has ended; returns its statistics.
async fn exec_main(shared: Arc<Shared>, thread: usize) -> Local {
    let ex = Rc::new(Exec::new(shared, thread));
    let s = &ex.settings;
    let clients = s
        .scenario
        .clients_of(s.proc_index, s.procs, thread, s.threads);
    let has_publisher = clients
        .iter()
        .any(|k| matches!(s.scenario.role(*k), crate::plan::Role::Pub { .. }));
    let done = Rc::new(Cell::new(false));
    glommio::spawn_local(tick(ex.clone(), has_publisher, done.clone())).detach();
    ex.shared.started.fetch_add(1, Ordering::AcqRel);
    while !ex.shared.connect_go.load(Ordering::Acquire) {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }

    // Connect at this executor's share of --connect-rate, with at most
    // --connect-concurrency attempts in progress.
    let rate = (s.connect_rate / (s.procs * s.threads) as f64).max(0.001);
    let start = now_ns();
    for (i, &k) in clients.iter().enumerate() {
        if ex.phase() == CLOSE {
            let left = (clients.len() - i) as u64;
            let mut l = ex.local.borrow_mut();
            l.failed += left;
            l.settled += left;
            *l.failures
                .entry("not attempted: run stopped".into())
                .or_default() += left;
            break;
        }
        let due = start + (i as f64 / rate * 1e9) as u64;
        let now = now_ns();
        if due > now + 1_000_000 {
            glommio::timer::sleep(Duration::from_nanos(due - now)).await;
        }
        while ex.connecting.get() >= u64::from(s.connect_concurrency) && ex.phase() != CLOSE {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        ex.active.set(ex.active.get() + 1);
        ex.connecting.set(ex.connecting.get() + 1);
        // Spawn the connection future itself (not wrapped: docs/GLOMMIO-NOTES.md).
        glommio::spawn_local(conn::run(ex.clone(), k)).detach();
    }
    while !(ex.phase() == CLOSE && ex.active.get() == 0) {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    if std::env::var_os("LOADGEN_DEBUG").is_some() {
        eprintln!("exec {} done", ex.thread);
    }
    done.set(true);
    glommio::timer::sleep(Duration::from_millis(15)).await;
    ex.publish();
    ex.local.take()
}

/// Starts one executor thread per `settings.threads`.
pub fn start(shared: &Arc<Shared>) -> Result<Vec<glommio::ExecutorJoinHandle<Local>>, String> {
    let n = shared.settings.threads;
    let cpus = available_cpus();
    let mut handles = Vec::with_capacity(n);
    for t in 0..n {
        let placement = if shared.settings.pin && !cpus.is_empty() {
            Placement::Fixed(cpus[(t + shared.settings.proc_index * n) % cpus.len()])
        } else {
            Placement::Unbound
        };
        let sh = shared.clone();
        let h = LocalExecutorBuilder::new(placement)
            .name(&format!("loadgen-{t}"))
            // No DMA file I/O here: keep the per-executor io memory small.
            .io_memory(1 << 20)
            .spawn(move || exec_main(sh, t))
            .map_err(|e| format!("cannot start executor thread {t}: {e}"))?;
        handles.push(h);
    }
    Ok(handles)
}

/// The CPUs this process may run on.
pub fn available_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|c| libc::CPU_ISSET(*c, &set))
            .collect()
    }
}
