//! The runtime layer: the only place that imports glommio. It starts one
//! executor per shard, binds the listeners, runs the accept loops, the
//! connection tasks, the mesh pump and the one-second ticker, and shuts
//! everything down on SIGINT/SIGTERM.
//!
//! Keeping glommio here (docs/GLOMMIO-NOTES.md: upstream is barely maintained) means a
//! move to the community fork or another runtime touches this module only.

mod bridge;
mod conn;
mod http;
mod limits;
mod listener;
mod pump;
mod ratelog;
mod sched;
mod wal;

use crate::broker::{Shard, ShardMsg};
use crate::config::Config;
use crate::mesh::{self, MeshEnds};
use crate::security::{Security, SecurityCell};
use bytes::BytesMut;
use glommio::PoolPlacement;
use glommio::{LocalExecutorBuilder, Placement};
use listener::Endpoint;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tracing::{error, info};

/// Size of the shard-wide read buffer chunk. Reads land here; only a
/// partial packet is ever copied out to its connection.
const READ_CHUNK: usize = 64 * 1024;

/// One shard's runtime: the broker state plus its I/O resources.
pub(crate) struct Rt {
    pub shard: Shard,
    pub mesh: MeshEnds<ShardMsg>,
    /// The shard-wide read buffer (see `conn`).
    pub rbuf: RefCell<BytesMut>,
    pub shutdown: Arc<AtomicBool>,
    /// Every listener (index = `Config::listeners` index), shared by all shards.
    pub endpoints: Arc<Vec<Endpoint>>,
    /// Connection limits shared by every shard.
    pub limits: Arc<limits::ConnLimits>,
    /// Every shard's metrics (index = shard id), read by scrapes.
    pub metrics: Arc<Vec<Arc<crate::broker::metrics::Metrics>>>,
    /// Each bridge's TLS client configuration (None: no TLS address).
    pub bridge_tls: Arc<Vec<Option<Arc<rustls::ClientConfig>>>>,
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

/// Opts this process out of transparent huge pages (PR_SET_THP_DISABLE,
/// inherited by the shard threads). Pages already faulted in stay as they are.
fn disable_thp() {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r != 0 {
        tracing::debug!(
            "PR_SET_THP_DISABLE failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it
/// starts) so that `wait_for_signal` receives them.
fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised; sigwait writes the signal number.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// Runs the broker until SIGINT/SIGTERM. Returns an error if it cannot start.
pub fn run(cfg: Config) -> Result<(), String> {
    if !cfg.transparent_huge_pages {
        disable_thp();
    }
    // Password files and the ACL, read here (never on a shard).
    let security = Security::load(&cfg, 0)?;
    if security.users() > 0 {
        info!(users = security.users(), "password file read");
    }
    let security = Arc::new(SecurityCell::new(security));
    let n = cfg.shards;
    // Certificates are read here, before anything listens: a TLS listener
    // whose files are missing or invalid stops the start with their name.
    let mut endpoints = cfg
        .listeners
        .iter()
        .map(|l| Endpoint::new(l.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    if endpoints.len() > usize::from(u16::MAX) {
        return Err("too many listeners".into());
    }
    let binds: Vec<SocketAddr> = cfg.listeners.iter().map(|l| l.bind).collect();
    let bound = listener::bind_all(&binds, n)?;
    for (l, addr) in cfg.listeners.iter().zip(&bound.addrs) {
        let kind = l.name();
        // A stable line on stdout that scripts and tests wait for.
        if l.protocol == crate::config::ListenProtocol::Http {
            println!("tarta listening {kind} {addr}");
        } else {
            println!("tarta listening mqtt/{kind} {addr}");
        }
        info!(%addr, tls = l.tls.is_some(), proxy_protocol = l.proxy_protocol, "listening for MQTT over {kind}");
        if addr.ip().is_loopback() {
            info!(
                "{addr} is local-only (like Mosquitto 2); bind 0.0.0.0:{} to accept other hosts",
                addr.port()
            );
        }
    }
    for (ep, addr) in endpoints.iter_mut().zip(&bound.addrs) {
        ep.addr = *addr;
    }
    let endpoints = Arc::new(endpoints);
    let conn_limits = Arc::new(limits::ConnLimits::new(cfg.limits.clone()));
    // Every shard's metrics, for scrapes on any shard.
    let all_metrics: Arc<Vec<Arc<crate::broker::metrics::Metrics>>> =
        Arc::new((0..n).map(|_| Arc::default()).collect());
    // Bridges: their TLS files are read here, their status is shared.
    let bridge_tls = cfg
        .bridges
        .iter()
        .map(|b| {
            if b.addresses.iter().any(|a| a.scheme.tls()) {
                crate::transport::certs::client_config(b.tls.as_ref())
                    .map(Some)
                    .map_err(|e| format!("bridge {:?}: {e}", b.name))
            } else {
                Ok(None)
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bridge_tls = Arc::new(bridge_tls);
    let bridges = Arc::new(crate::broker::bridge::Bridges::new(cfg.bridges.len()));
    // Recovery, before any shard runs: every shard's log, in parallel.
    let epoch_unix = crate::store::unix_now();
    let opened = match &cfg.store {
        Some(sc) => Some(crate::store::disk::open(&sc.data_dir, n, epoch_unix)?),
        None => None,
    };
    let mut stores: Vec<Option<ShardStore>> = (0..n).map(|_| None).collect();
    let mut _lock = None;
    if let Some(o) = opened {
        let retained: Arc<Vec<Arc<crate::session::Message>>> = Arc::new(
            o.images
                .iter()
                .flat_map(|i| i.retained.iter().cloned())
                .collect(),
        );
        let mut quarantined = o.quarantined + o.corrupt_records;
        let failing = crate::store::log::Failing::default();
        for (i, (image, tail)) in o.images.into_iter().zip(o.tails).enumerate() {
            stores[i] = Some(ShardStore {
                image,
                tail,
                retained: retained.clone(),
                epoch_unix,
                quarantined: std::mem::take(&mut quarantined),
                failing: failing.clone(),
            });
        }
        _lock = Some(o.lock);
    }
    let signals = block_signals();
    memory_watch();
    let cfg = Arc::new(cfg);
    let shutdown = Arc::new(AtomicBool::new(false));
    let (ends, bells) = mesh::build::<ShardMsg>(n, cfg.mesh_capacity);
    let cpus = available_cpus();
    let mut per_shard: Vec<Vec<(OwnedFd, u16)>> = (0..n).map(|_| Vec::new()).collect();
    for (idx, per_addr) in bound.fds.into_iter().enumerate() {
        for (i, fd) in per_addr.into_iter().enumerate() {
            per_shard[i].push((fd, idx as u16));
        }
    }
    let mut handles = Vec::new();
    for (id, ((ends, fds), store)) in ends.into_iter().zip(per_shard).zip(stores).enumerate() {
        let placement = if cfg.pin {
            Placement::Fixed(cpus.get(id % cpus.len().max(1)).copied().unwrap_or(0))
        } else {
            Placement::Unbound
        };
        let (cfg, security, shutdown) = (cfg.clone(), security.clone(), shutdown.clone());
        let endpoints = endpoints.clone();
        let limits = conn_limits.clone();
        let metrics = all_metrics.clone();
        let (bridge_tls, bridges) = (bridge_tls.clone(), bridges.clone());
        let h = LocalExecutorBuilder::new(placement)
            .name(&format!("tarta-shard-{id}"))
            .io_memory(cfg.io_memory)
            // Password hashing and file syncs: one thread per shard, not
            // pinned, so the kernel may run it on whichever core is idle.
            .blocking_thread_pool_placement(PoolPlacement::Unbound(1))
            .spawn(move || async move {
                let mut shard = Shard::new(id, n, cfg, security);
                shard.metrics = metrics[id].clone();
                *shard.all_metrics.borrow_mut() = metrics.clone();
                *shard.bridges.borrow_mut() = bridges;
                let rt = Rc::new(Rt {
                    bridge_tls,
                    shard,
                    metrics,
                    mesh: ends,
                    rbuf: RefCell::new(BytesMut::new()),
                    shutdown,
                    endpoints,
                    limits,
                });
                shard_main(rt, fds, store).await;
            })
            .map_err(|e| format!("cannot start shard {id}: {e}"))?;
        handles.push(h);
    }
    println!("tarta started with {n} shards");
    loop {
        let sig = wait_for_signal(&signals);
        if sig != libc::SIGHUP {
            info!(signal = sig, "shutting down");
            break;
        }
        reload(&endpoints);
        match security.reload(&cfg) {
            Ok(s) => info!(
                users = s.users(),
                acl = s.acl.is_some(),
                "SIGHUP: password files and ACL reloaded"
            ),
            Err(e) => {
                error!("SIGHUP: password files and ACL not reloaded, keeping the current ones: {e}")
            }
        }
    }
    shutdown.store(true, Ordering::Release);
    for b in &bells {
        b.ring();
    }
    for (i, h) in handles.into_iter().enumerate() {
        if let Err(e) = h.join() {
            error!(shard = i, "shard ended with an error: {e}");
        }
    }
    info!("stopped");
    Ok(())
}

/// Refreshes the resident size `$SYS/broker/heap/*` reports, once a second,
/// and the open descriptors every 5 s, on a thread of its own (reading
/// /proc is file I/O: never on a shard).
fn memory_watch() {
    use crate::broker::sys::{OPEN_FDS, RSS_BYTES, RSS_MAX};
    use std::sync::atomic::Ordering::Relaxed;
    // SAFETY: sysconf with a constant name.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let spawned = std::thread::Builder::new()
        .name("tarta-memory".into())
        .spawn(move || {
            for round in 0u64.. {
                if round % 5 == 0 {
                    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
                        OPEN_FDS.store(dir.count() as u64, Relaxed);
                    }
                }
                if let Ok(s) = std::fs::read_to_string("/proc/self/statm") {
                    if let Some(rss) = s
                        .split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        RSS_BYTES.store(rss * page, Relaxed);
                        RSS_MAX.fetch_max(rss * page, Relaxed);
                    }
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the memory watcher: {e}");
    }
}

/// SIGHUP: re-reads every TLS listener's certificates. New connections
/// get the new ones; open connections are not touched. A listener whose
/// files fail keeps its current certificates (and the error is logged).
fn reload(endpoints: &[Endpoint]) {
    let (mut ok, mut failed) = (0, 0);
    for ep in endpoints {
        match ep.reload() {
            Ok(true) => ok += 1,
            Ok(false) => {}
            Err(e) => {
                failed += 1;
                error!("SIGHUP: certificates not reloaded, keeping the current ones: {e}");
            }
        }
    }
    info!(reloaded = ok, failed, "SIGHUP: TLS certificates reloaded");
}

/// What a shard starts its log with: the state recovered for it, where to
/// append, and every retained message (for its replica).
struct ShardStore {
    image: crate::store::replay::Image,
    tail: crate::store::disk::Tail,
    retained: Arc<Vec<Arc<crate::session::Message>>>,
    epoch_unix: u64,
    quarantined: u64,
    /// Shared by the shards: how many cannot write their log.
    failing: crate::store::log::Failing,
}

async fn shard_main(rt: Rc<Rt>, listeners: Vec<(OwnedFd, u16)>, store: Option<ShardStore>) {
    let committer = store.and_then(|s| {
        let cfg = rt.shard.cfg.store.clone()?;
        let mut log = crate::store::log::Log::new(s.epoch_unix, s.image.next_mid, s.failing);
        // The next compaction waits until the log has grown past what it holds.
        log.snapshot_len = s.tail.len;
        rt.shard.restore(s.image, &s.retained, log);
        rt.shard.metrics.log_quarantined.set(s.quarantined);
        Some(glommio::spawn_local(wal::committer(
            rt.clone(),
            s.tail,
            cfg,
        )))
    });
    let efd = match sched::init() {
        Ok(fd) => fd,
        Err(e) => {
            error!(
                shard = rt.shard.id,
                "cannot set up the connection ring (io_uring): {e}"
            );
            return;
        }
    };
    glommio::spawn_local(watch_ring(efd)).detach();
    glommio::spawn_local(sched::run()).detach();
    // Bridges' sessions and subscriptions, before the barrier: every
    // shard knows their routes before it serves a client.
    rt.shard.bridge_setup();
    // After a restart, clients are served once every shard has restored
    // its sessions and this one knows their routes.
    let barrier = committer.is_some() || !rt.shard.cfg.bridges.is_empty();
    let startup = barrier.then(|| rt.shard.startup_barrier());
    let starting = rt.clone();
    glommio::spawn_local(async move {
        if let Some(seq) = startup {
            while !starting.shard.startup_done(seq) {
                glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        for (fd, idx) in listeners {
            listener::start(starting.clone(), fd, idx);
        }
        bridge::start(&starting, &starting.bridge_tls);
    })
    .detach();
    glommio::spawn_local(pump::ticker(rt.clone())).detach();
    pump::mesh_pump(rt.clone()).await;
    // Shutdown: tell every connected client (5.0: DISCONNECT 0x8B), give
    // their tasks a moment to flush, then let the executor end.
    rt.shard.shutting_down.set(true);
    let conns: Vec<_> = rt
        .shard
        .st
        .borrow()
        .sessions
        .iter()
        .filter_map(|(_, e)| e.conn.clone())
        .collect();
    for c in conns {
        c.request_close(crate::broker::conn::CloseReason::Shutdown);
    }
    glommio::timer::sleep(std::time::Duration::from_millis(200)).await;
    if let Some(log) = rt.shard.st.borrow_mut().log.as_mut() {
        log.wake_committer();
    }
    if let Some(c) = committer {
        // The last batch written (and synced) before the process ends.
        let done = glommio::timer::timeout(std::time::Duration::from_secs(5), async {
            c.await;
            Ok(())
        })
        .await;
        if done.is_err() {
            error!(
                shard = rt.shard.id,
                "write-ahead log not flushed within 5 s at shutdown"
            );
        }
    }
}

/// Waits on the eventfd the connection ring signals on every completion
/// (a read in glommio's own ring) and wakes the scheduler.
async fn watch_ring(efd: std::os::fd::RawFd) {
    // SAFETY: `efd` is the eventfd `sched::init` created; this task owns it.
    let file = unsafe { <glommio::io::BufferedFile as std::os::fd::FromRawFd>::from_raw_fd(efd) };
    loop {
        if let Err(e) = file.read_at(0, 8).await {
            error!("connection ring eventfd: {e}");
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        sched::notify();
    }
}

pub(crate) fn peer_or_unspecified(p: std::io::Result<SocketAddr>) -> SocketAddr {
    p.unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}
