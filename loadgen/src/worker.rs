//! A worker process (`loadgen __worker`, started by the coordinator): runs
//! its share of the clients on its executor threads and talks to the
//! coordinator in lines.
//!
//! stdin (coordinator -> worker): first line the [`Settings`] as JSON, then
//! `go MEASURE_START_NS PUB_END_NS` and `stop`. End of input means stop.
//!
//! stdout (worker -> coordinator): `progress {json}` about every 200 ms,
//! `ready {json}` once every client has connected (or failed), and
//! `result {json}` at the end.

use crate::cli::Settings;
use crate::runtime::{self, Local, Shared, CLOSE, RUN};
use crate::stats::{DeliveryTotals, Latency};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub connected: u64,
    pub failed: u64,
    pub settled: u64,
    pub clients: u64,
    pub sent: u64,
    pub received: u64,
    pub inflight: u64,
    pub errors: u64,
    pub active: u64,
    /// Latencies recorded since the previous progress line.
    pub interval: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub clients: u64,
    pub connected: u64,
    pub failures: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub subs_ok: u64,
    pub subs_refused: u64,
    pub tls_handshakes: u64,
    pub tls_resumed: u64,
    pub sent: u64,
    /// Publishes sent inside the measurement window.
    pub sent_window: u64,
    pub acked: u64,
    pub received: u64,
    pub received_window: u64,
    pub foreign: u64,
    pub publish_refused: u64,
    pub delivery: DeliveryTotals,
    pub sent_by_pub: Vec<(u32, u64)>,
    pub live_subs: Vec<u32>,
    pub latency: Vec<(u64, u64)>,
    pub connect_us: Vec<(u64, u64)>,
    pub first_connect_ns: u64,
    pub last_connected_ns: u64,
    pub rss_kb: u64,
    /// RSS growth from start-up to every connection open (per-connection cost).
    pub rss_ready_kb: u64,
}

enum Cmd {
    Go(u64, u64),
    Stop,
}

fn emit(kind: &str, v: &impl Serialize) {
    let line = match serde_json::to_string(v) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("loadgen worker: cannot encode {kind}: {e}");
            return;
        }
    };
    let mut out = std::io::stdout().lock();
    // The coordinator may be gone; then there is no one to tell.
    let _ = writeln!(out, "{kind} {line}");
    let _ = out.flush();
}

/// Raises the soft open-files limit to the hard one.
pub fn raise_nofile() -> u64 {
    // SAFETY: get/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
        r.rlim_cur
    }
}

pub fn main() -> i32 {
    let stdin = std::io::stdin();
    let mut first = String::new();
    if let Err(e) = stdin.lock().read_line(&mut first) {
        eprintln!("loadgen worker: cannot read settings: {e}");
        return 1;
    }
    let settings: Settings = match serde_json::from_str(&first) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("loadgen worker: bad settings line: {e}");
            return 1;
        }
    };
    raise_nofile();
    let clients: u64 = (0..settings.threads)
        .map(|t| {
            settings
                .scenario
                .clients_of(settings.proc_index, settings.procs, t, settings.threads)
                .len() as u64
        })
        .sum();
    let shared = match Shared::new(settings) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("loadgen worker: {e}");
            return 1;
        }
    };
    let handles = match runtime::start(&shared) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("loadgen worker: {e}");
            return 1;
        }
    };
    // Baseline RSS once the executors run, before any connection.
    for _ in 0..5000 {
        if shared.started.load(Ordering::Acquire) >= shared.settings.threads as u64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let rss_base_kb = crate::procfs::self_rss_kb();
    shared.connect_go.store(true, Ordering::Release);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            let mut w = line.split_whitespace();
            match w.next() {
                Some("go") => {
                    let a = w.next().and_then(|x| x.parse().ok()).unwrap_or(0);
                    let b = w.next().and_then(|x| x.parse().ok()).unwrap_or(0);
                    let _ = tx.send(Cmd::Go(a, b));
                }
                Some("stop") => {
                    let _ = tx.send(Cmd::Stop);
                }
                _ => {}
            }
        }
        // End of input: the coordinator is gone or done.
        let _ = tx.send(Cmd::Stop);
    });

    let mut ready_sent = false;
    let mut rss_ready_kb = 0;
    loop {
        let mut p = Progress {
            clients,
            ..Default::default()
        };
        for c in &shared.counters {
            let r = Ordering::Relaxed;
            p.connected += c.connected.load(r);
            p.failed += c.failed.load(r);
            p.settled += c.settled.load(r);
            p.sent += c.sent.load(r);
            p.received += c.received.load(r);
            p.inflight += c.inflight.load(r);
            p.errors += c.errors.load(r);
            p.active += c.active.load(r);
        }
        if let Ok(mut i) = shared.interval.lock() {
            p.interval = i.buckets();
            i.reset();
        }
        emit("progress", &p);
        if !ready_sent && p.settled >= clients {
            ready_sent = true;
            rss_ready_kb = crate::procfs::self_rss_kb().saturating_sub(rss_base_kb);
            emit("ready", &p);
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Cmd::Go(start, end)) => {
                shared.measure_start_ns.store(start, Ordering::Release);
                shared.pub_end_ns.store(end, Ordering::Release);
                shared.phase.store(RUN, Ordering::Release);
            }
            Ok(Cmd::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    shared.phase.store(CLOSE, Ordering::Release);
    let rss_kb = crate::procfs::self_rss_kb();
    let mut locals = Vec::new();
    let mut exit = 0;
    for (t, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(l) => locals.push(l),
            Err(e) => {
                eprintln!("loadgen worker: executor thread {t} failed: {e}");
                exit = 1;
            }
        }
    }
    let mut r = merge(clients, locals);
    if let Ok(g) = shared.group.lock() {
        for t in g.iter() {
            t.add_to(&mut r.delivery);
        }
    }
    r.rss_kb = rss_kb;
    r.rss_ready_kb = rss_ready_kb;
    emit("result", &r);
    exit
}

fn merge(clients: u64, locals: Vec<Local>) -> WorkerResult {
    let mut r = WorkerResult {
        clients,
        ..Default::default()
    };
    let mut lat = Latency::new();
    let mut conn = Latency::new();
    for l in locals {
        r.connected += l.connected;
        for (k, v) in l.failures {
            *r.failures.entry(k).or_default() += v;
        }
        for (k, v) in l.errors {
            *r.errors.entry(k).or_default() += v;
        }
        r.subs_ok += l.subs_ok;
        r.subs_refused += l.subs_refused;
        r.tls_handshakes += l.tls_handshakes;
        r.tls_resumed += l.tls_resumed;
        r.sent += l.sent;
        r.sent_window += l.sent_window;
        r.acked += l.acked;
        r.received += l.received;
        r.received_window += l.received_window;
        r.foreign += l.foreign;
        r.publish_refused += l.publish_refused;
        r.delivery.merge(&l.delivery);
        r.sent_by_pub.extend(l.sent_by_pub);
        r.live_subs.extend(l.live_subs);
        lat.merge(&l.latency);
        conn.merge(&l.connect_us);
        if l.first_connect_ns > 0
            && (r.first_connect_ns == 0 || l.first_connect_ns < r.first_connect_ns)
        {
            r.first_connect_ns = l.first_connect_ns;
        }
        r.last_connected_ns = r.last_connected_ns.max(l.last_connected_ns);
    }
    r.latency = lat.buckets();
    r.connect_us = conn.buckets();
    r
}
