//! The coordinator (the process the user starts): spawns `--procs` worker
//! processes, steps them through the phases, samples /proc (broker and
//! workers), prints the progress line, merges the results and writes the
//! report.
//!
//! Phases, each bounded in time so that the run always ends:
//! 1. setup: workers connect their clients (and subscribe); ends when every
//!    client has connected or failed, or after `connect_timeout + clients /
//!    connect_rate + 30 s`.
//! 2. run: `go` with the window (warm-up, then `--duration`).
//! 3. drain: after publishing stops, until nothing is in flight and no
//!    delivery arrived for a second, or `--drain-timeout`.
//! 4. stop: workers disconnect and send their results (20 s at most, then
//!    they are killed).

use crate::cli::{Common, ProtocolArg, Settings, TlsSettings, Transport};
use crate::plan::Scenario;
use crate::procfs::{self, ProcSample};
use crate::report::{BrokerSample, Report, RunSettings};
use crate::runtime::now_ns;
use crate::stats::Latency;
use crate::worker::{Progress, WorkerResult};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::ToSocketAddrs;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

enum Msg {
    Progress(usize, Progress),
    Ready(usize, Progress),
    Result(usize, Box<WorkerResult>),
    Exit(usize),
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    last: Progress,
    ready: bool,
    result: Option<WorkerResult>,
    exited: bool,
}

impl Worker {
    fn send(&mut self, line: &str) {
        if let Some(s) = &mut self.stdin {
            if writeln!(s, "{line}").and_then(|_| s.flush()).is_err() {
                self.stdin = None;
            }
        }
    }

    fn cpu(&self) -> f64 {
        procfs::sample(self.child.id()).map_or(0.0, |s| s.cpu_s)
    }
}

/// Builds the settings from the command line; errors are usage errors.
pub fn settings(scenario: Scenario, c: &Common) -> Result<Settings, String> {
    if c.payload < crate::payload::HEADER_LEN {
        return Err(format!(
            "--payload must be at least {} bytes (publisher, sequence number and timestamp)",
            crate::payload::HEADER_LEN
        ));
    }
    if c.payload > 16 * 1024 * 1024 {
        return Err("--payload over 16 MiB".into());
    }
    if c.procs == 0 || c.procs > 64 {
        return Err("--procs must be 1..=64".into());
    }
    if c.duration <= 0.0 || c.warmup < 0.0 || c.connect_timeout <= 0.0 {
        return Err("--duration and --connect-timeout must be > 0, --warmup >= 0".into());
    }
    if c.rate < 0.0 || c.connect_rate <= 0.0 {
        return Err("--rate must be >= 0 and --connect-rate > 0".into());
    }
    if c.qos > 0 && c.inflight == 0 {
        return Err("--inflight must be at least 1".into());
    }
    let port = c.port.unwrap_or(if c.tls { 8883 } else { 1883 });
    let tls = tls_settings(c)?;
    if let Some(t) = &tls {
        // Fail here, as a usage error, rather than in every connection.
        crate::tls::TlsClient::new(t)?;
    }
    let addr = (c.host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve --host {}: {e}", c.host))?
        .find(|a| a.is_ipv4())
        .ok_or_else(|| format!("--host {} has no IPv4 address", c.host))?;
    let source_ips = match &c.source_ips {
        Some(s) => crate::cli::parse_source_ips(s)?,
        None => Vec::new(),
    };
    let threads = c
        .threads
        .unwrap_or_else(|| crate::runtime::available_cpus().len())
        .clamp(1, 256);
    let (publishers, _) = scenario.counts();
    let rate = match c.total_rate {
        Some(t) if publishers > 0 => t / f64::from(publishers),
        _ => c.rate,
    };
    let seed = now_ns() ^ u64::from(std::process::id()) << 40;
    let run_id = c.run_id.unwrap_or(seed as u32 ^ (seed >> 32) as u32);
    Ok(Settings {
        scenario,
        host: c.host.clone(),
        port,
        addr,
        sub_addr: c.sub_port.map(|p| std::net::SocketAddr::new(addr.ip(), p)),
        transport: c.transport,
        ws_path: c.ws_path.clone(),
        tls,
        v5: c.protocol == ProtocolArg::V5,
        qos: c.qos,
        payload: c.payload,
        rate,
        duration_s: c.duration,
        warmup_s: c.warmup,
        inflight: c.inflight,
        keepalive: c.keepalive,
        clean_session: c.clean_session,
        connect_rate: c.connect_rate,
        connect_concurrency: c.connect_concurrency.max(1),
        connect_timeout_s: c.connect_timeout,
        ack_timeout_s: c.ack_timeout.max(0.1),
        drain_timeout_s: c.drain_timeout.max(0.0),
        threads,
        procs: c.procs,
        pin: c.pin,
        source_ips,
        topic_prefix: c.topic_prefix.clone(),
        run_id,
        proc_index: 0,
    })
}

const NEED_CA: &str = "--tls needs --cafile FILE (the PEM CA that signed the broker's \
    certificate) or --insecure (no verification): the system's root certificates are not used";

/// `--tls` and its options; reads `--cafile`.
fn tls_settings(c: &Common) -> Result<Option<TlsSettings>, String> {
    if !c.tls {
        return Ok(None);
    }
    let ca_pem = match (&c.cafile, c.insecure) {
        (Some(path), _) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("--cafile {}: cannot read: {e}", path.display()))?,
        ),
        (None, true) => None,
        (None, false) => return Err(NEED_CA.into()),
    };
    Ok(Some(TlsSettings {
        ca_pem,
        insecure: c.insecure,
        server_name: c
            .server_name
            .clone()
            .unwrap_or_else(|| crate::tls::default_server_name(&c.host)),
        resume: c.tls_resume,
    }))
}

fn spawn(settings: &Settings, i: usize, tx: &mpsc::Sender<Msg>) -> Result<Worker, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let mut child = Command::new(exe)
        .arg("__worker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start worker process {i}: {e}"))?;
    let mut s = settings.clone();
    s.proc_index = i;
    let line = serde_json::to_string(&s).map_err(|e| format!("cannot encode settings: {e}"))?;
    let mut stdin = child.stdin.take();
    if let Some(w) = &mut stdin {
        writeln!(w, "{line}").map_err(|e| format!("cannot talk to worker {i}: {e}"))?;
    }
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| format!("worker {i} has no stdout"))?;
    let tx = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let (kind, json) = line.split_once(' ').unwrap_or((&line, ""));
            let msg = match kind {
                "progress" => serde_json::from_str(json).ok().map(|p| Msg::Progress(i, p)),
                "ready" => serde_json::from_str(json).ok().map(|p| Msg::Ready(i, p)),
                "result" => serde_json::from_str(json)
                    .ok()
                    .map(|r| Msg::Result(i, Box::new(r))),
                _ => None,
            };
            match msg {
                Some(m) => {
                    if tx.send(m).is_err() {
                        return;
                    }
                }
                None => eprintln!("loadgen: unexpected line from worker {i}: {line:.200}"),
            }
        }
        let _ = tx.send(Msg::Exit(i));
    });
    Ok(Worker {
        child,
        stdin,
        last: Progress::default(),
        ready: false,
        result: None,
        exited: false,
    })
}

#[derive(PartialEq, Eq, Clone, Copy, Debug)]
enum Phase {
    Setup,
    Run,
    Drain,
    Stop,
}

/// Runs a whole measurement; returns the process exit code.
pub fn run(settings: Settings, common: &Common) -> i32 {
    let machine = procfs::machine();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let total = settings.scenario.total_clients();
    let nofile = crate::worker::raise_nofile();
    let per_proc = total.div_ceil(settings.procs as u64);
    let mut problems = Vec::new();
    if per_proc + 64 > nofile {
        eprintln!(
            "loadgen: {per_proc} connections per process exceed the open-files limit ({nofile}); \
             use --procs {} or more",
            total.div_ceil(nofile.saturating_sub(64).max(1))
        );
        return 1;
    }
    if settings.source_ips.is_empty() && total > 28_000 {
        problems.push(format!(
            "{total} connections from one source address may exhaust the ~28k ephemeral ports: use --source-ips"
        ));
    }
    let broker_pid = common.broker_pid;
    let broker0 = broker_pid.and_then(procfs::sample);
    if broker_pid.is_some() && broker0.is_none() {
        eprintln!(
            "loadgen: --broker-pid {}: no such process",
            broker_pid.unwrap_or(0)
        );
        return 1;
    }
    let (tx, rx) = mpsc::channel();
    let mut workers = Vec::new();
    for i in 0..settings.procs {
        match spawn(&settings, i, &tx) {
            Ok(w) => workers.push(w),
            Err(e) => {
                eprintln!("loadgen: {e}");
                for w in &mut workers {
                    let _ = w.child.kill();
                    let _ = w.child.wait();
                }
                return 1;
            }
        }
    }
    drop(tx);

    let t0 = now_ns();
    let secs = |ns: u64| ns.saturating_sub(t0) as f64 / 1e9;
    let setup_deadline = t0
        + ((settings.connect_timeout_s + total as f64 / settings.connect_rate + 30.0) * 1e9) as u64;
    let mut phase = Phase::Setup;
    let mut measure_start = u64::MAX;
    let mut pub_end = u64::MAX;
    let mut drain_deadline = u64::MAX;
    let mut stop_deadline = u64::MAX;
    let mut last_received = 0;
    let mut last_change = now_ns();
    let mut interval = Latency::new();
    let mut next_print = t0 + 1_000_000_000;
    let mut prev_print = (t0, 0u64, 0u64);
    let mut broker_samples = Vec::new();
    let mut broker_at_start: Option<ProcSample> = None;
    let mut broker_at_end: Option<ProcSample> = None;
    let mut broker_rss_max = broker0.map_or(0, |s| s.rss_kb);
    let mut lg_cpu_start = 0.0;
    let mut lg_cpu_end = 0.0;
    let mut next_sample = t0;
    let mut connect_setup_end = 0u64;
    let mut broker_at_setup: Option<ProcSample> = None;
    let mut setup_timed_out = false;

    loop {
        let now = now_ns();
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(Msg::Progress(i, p)) => {
                interval.merge(&Latency::from_buckets(&p.interval));
                workers[i].last = p;
            }
            Ok(Msg::Ready(i, p)) => {
                workers[i].last = p;
                workers[i].ready = true;
            }
            Ok(Msg::Result(i, r)) => workers[i].result = Some(*r),
            Ok(Msg::Exit(i)) => {
                workers[i].exited = true;
                workers[i].stdin = None;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if let Some(pid) = broker_pid {
            if now >= next_sample {
                next_sample = now + 1_000_000_000;
                if let Some(s) = procfs::sample(pid) {
                    broker_rss_max = broker_rss_max.max(s.rss_kb);
                    broker_samples.push(BrokerSample {
                        t_s: secs(now),
                        cpu_s: s.cpu_s,
                        rss_kb: s.rss_kb,
                    });
                }
            }
        }
        match phase {
            Phase::Setup => {
                let all_ready = workers.iter().all(|w| w.ready || w.exited);
                if all_ready || now >= setup_deadline {
                    if !all_ready {
                        setup_timed_out = true;
                        problems.push(format!(
                            "setup did not finish within {:.0} s; running with the clients connected so far",
                            secs(setup_deadline)
                        ));
                    }
                    connect_setup_end = now;
                    broker_at_setup = broker_pid.and_then(procfs::sample);
                    if sum(&workers, |p| p.connected) == 0 && total > 0 {
                        problems.push(format!(
                            "no connection to {}:{} succeeded",
                            settings.host, settings.port
                        ));
                        phase = Phase::Stop;
                        stop_deadline = now + 20_000_000_000;
                        for w in &mut workers {
                            w.send("stop");
                        }
                        continue;
                    }
                    measure_start = now + (settings.warmup_s * 1e9) as u64;
                    if matches!(settings.scenario, Scenario::Conn { .. }) {
                        measure_start = now;
                    }
                    pub_end = measure_start + (settings.duration_s * 1e9) as u64;
                    for w in &mut workers {
                        w.send(&format!("go {measure_start} {pub_end}"));
                    }
                    phase = Phase::Run;
                }
            }
            Phase::Run => {
                if broker_at_start.is_none() && now >= measure_start {
                    broker_at_start = broker_pid.and_then(procfs::sample);
                    lg_cpu_start =
                        workers.iter().map(Worker::cpu).sum::<f64>() + procfs::self_cpu_s();
                }
                if now >= pub_end {
                    broker_at_end = broker_pid.and_then(procfs::sample);
                    lg_cpu_end =
                        workers.iter().map(Worker::cpu).sum::<f64>() + procfs::self_cpu_s();
                    if matches!(settings.scenario, Scenario::Conn { .. }) {
                        drain_deadline = now;
                    } else {
                        drain_deadline = now + (settings.drain_timeout_s * 1e9) as u64;
                    }
                    last_change = now;
                    phase = Phase::Drain;
                }
            }
            Phase::Drain => {
                let received = sum(&workers, |p| p.received);
                if received != last_received {
                    last_received = received;
                    last_change = now;
                }
                let quiet =
                    sum(&workers, |p| p.inflight) == 0 && now >= last_change + 1_000_000_000;
                if quiet || now >= drain_deadline {
                    if !quiet && !matches!(settings.scenario, Scenario::Conn { .. }) {
                        problems.push(format!(
                            "deliveries still arriving or acknowledgements outstanding ({} in flight) after --drain-timeout {} s",
                            sum(&workers, |p| p.inflight),
                            settings.drain_timeout_s
                        ));
                    }
                    for w in &mut workers {
                        w.send("stop");
                    }
                    phase = Phase::Stop;
                    stop_deadline = now + 20_000_000_000;
                }
            }
            Phase::Stop => {
                if workers.iter().all(|w| w.exited) {
                    break;
                }
                if now >= stop_deadline {
                    for (i, w) in workers.iter_mut().enumerate() {
                        if !w.exited {
                            problems.push(format!(
                                "worker {i} did not finish within 20 s of stop; killed"
                            ));
                            let _ = w.child.kill();
                            w.exited = true;
                        }
                    }
                    break;
                }
            }
        }
        if phase != Phase::Setup && workers.iter().any(|w| w.exited && w.result.is_none()) {
            if phase != Phase::Stop {
                problems.push("a worker process exited early (see its error above)".into());
                for w in &mut workers {
                    w.send("stop");
                }
                phase = Phase::Stop;
                stop_deadline = now + 20_000_000_000;
            }
        } else if phase == Phase::Setup && workers.iter().any(|w| w.exited && !w.ready) {
            problems.push("a worker process exited during setup (see its error above)".into());
            for w in &mut workers {
                w.send("stop");
            }
            phase = Phase::Stop;
            stop_deadline = now + 20_000_000_000;
        }
        if now >= next_print {
            next_print += 1_000_000_000;
            let (t, s0, r0) = prev_print;
            let (s1, r1) = (sum(&workers, |p| p.sent), sum(&workers, |p| p.received));
            let dt = (now - t) as f64 / 1e9;
            prev_print = (now, s1, r1);
            if !common.quiet {
                let p = interval.percentiles();
                interval.reset();
                eprintln!(
                    "[{:6.1}s] {:<5} conns {}/{} (failed {})  sent {}/s  recv {}/s  p99 {}  inflight {}",
                    secs(now),
                    format!("{phase:?}").to_lowercase(),
                    sum(&workers, |p| p.connected),
                    total,
                    sum(&workers, |p| p.failed),
                    crate::report::thousands(((s1 - s0.min(s1)) as f64 / dt) as u64),
                    crate::report::thousands(((r1 - r0.min(r1)) as f64 / dt) as u64),
                    if p.count > 0 {
                        format!("{:.2} ms", p.p99 as f64 / 1000.0)
                    } else {
                        "-".into()
                    },
                    sum(&workers, |p| p.inflight),
                );
            }
        }
    }
    // Reap the workers and take their total CPU time.
    let mut lg_cpu_total = procfs::self_cpu_s();
    for w in &mut workers {
        lg_cpu_total += reap(&mut w.child);
    }
    let _ = setup_timed_out;
    let report = build_report(
        &settings,
        machine,
        started_unix,
        &workers,
        problems,
        Timing {
            t0,
            connect_setup_end,
            measure_start,
            pub_end,
        },
        BrokerFigures {
            pid: broker_pid,
            baseline: broker0,
            at_setup: broker_at_setup,
            at_start: broker_at_start,
            at_end: broker_at_end,
            rss_max: broker_rss_max,
            samples: broker_samples,
        },
        (lg_cpu_end - lg_cpu_start, lg_cpu_total),
    );
    println!("{}", report.table());
    if let Some(path) = &common.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => {
                if let Err(e) = std::fs::write(path, s + "\n") {
                    eprintln!("loadgen: cannot write {}: {e}", path.display());
                    return 1;
                }
            }
            Err(e) => {
                eprintln!("loadgen: cannot encode the report: {e}");
                return 1;
            }
        }
    }
    if report.ok {
        0
    } else {
        2
    }
}

fn sum(workers: &[Worker], f: fn(&Progress) -> u64) -> u64 {
    workers.iter().map(|w| f(&w.last)).sum()
}

/// Waits for a worker and returns its CPU seconds (user + system).
fn reap(child: &mut Child) -> f64 {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: wait4 on our own child, filling a local rusage.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        let r = libc::wait4(pid, &mut status, 0, &mut ru);
        if r != pid {
            return 0.0;
        }
        ru
    };
    procfs::tv(ru.ru_utime) + procfs::tv(ru.ru_stime)
}

struct Timing {
    t0: u64,
    connect_setup_end: u64,
    measure_start: u64,
    pub_end: u64,
}

struct BrokerFigures {
    pid: Option<u32>,
    baseline: Option<ProcSample>,
    /// At the end of setup (every client connected and subscribed).
    at_setup: Option<ProcSample>,
    at_start: Option<ProcSample>,
    at_end: Option<ProcSample>,
    rss_max: u64,
    samples: Vec<BrokerSample>,
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    settings: &Settings,
    machine: procfs::Machine,
    started_unix: u64,
    workers: &[Worker],
    mut problems: Vec<String>,
    tm: Timing,
    b: BrokerFigures,
    (lg_cpu_window, lg_cpu_total): (f64, f64),
) -> Report {
    let mut r = WorkerResult::default();
    let mut lat = Latency::new();
    let mut conn = Latency::new();
    let mut missing = 0;
    for w in workers {
        let Some(x) = &w.result else {
            missing += 1;
            continue;
        };
        r.clients += x.clients;
        r.connected += x.connected;
        for (k, v) in &x.failures {
            *r.failures.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &x.errors {
            *r.errors.entry(k.clone()).or_default() += v;
        }
        r.subs_ok += x.subs_ok;
        r.subs_refused += x.subs_refused;
        r.tls_handshakes += x.tls_handshakes;
        r.tls_resumed += x.tls_resumed;
        r.sent += x.sent;
        r.sent_window += x.sent_window;
        r.acked += x.acked;
        r.received += x.received;
        r.received_window += x.received_window;
        r.foreign += x.foreign;
        r.publish_refused += x.publish_refused;
        r.delivery.merge(&x.delivery);
        r.sent_by_pub.extend(x.sent_by_pub.iter().copied());
        r.live_subs.extend(x.live_subs.iter().copied());
        lat.merge(&Latency::from_buckets(&x.latency));
        conn.merge(&Latency::from_buckets(&x.connect_us));
        if x.first_connect_ns > 0
            && (r.first_connect_ns == 0 || x.first_connect_ns < r.first_connect_ns)
        {
            r.first_connect_ns = x.first_connect_ns;
        }
        r.last_connected_ns = r.last_connected_ns.max(x.last_connected_ns);
        r.rss_kb += x.rss_kb;
        r.rss_ready_kb += x.rss_ready_kb;
    }
    if missing > 0 {
        problems.push(format!(
            "{missing} worker(s) sent no result: figures cover the others only"
        ));
    }
    let total = settings.scenario.total_clients();
    // Clients never settled (a worker died) count as failed.
    let settled: u64 = r.connected + r.failures.values().sum::<u64>();
    let _ = settled;
    let sent_by_pub: HashMap<u32, u64> = r.sent_by_pub.iter().copied().collect();
    let expected = settings.scenario.expected(&sent_by_pub, &r.live_subs);
    let lost = expected.saturating_sub(r.delivery.unique);
    let window_s = if tm.pub_end > tm.measure_start && tm.pub_end != u64::MAX {
        (tm.pub_end - tm.measure_start) as f64 / 1e9
    } else {
        0.0
    };
    let per_s = |n: u64| {
        if window_s > 0.0 {
            n as f64 / window_s
        } else {
            0.0
        }
    };
    let connect_span_s = if r.last_connected_ns > r.first_connect_ns {
        (r.last_connected_ns - r.first_connect_ns) as f64 / 1e9
    } else {
        0.0
    };
    let _ = tm.connect_setup_end;
    let _ = tm.t0;
    let broker_cpu = match (b.at_start, b.at_end) {
        (Some(s), Some(e)) => Some(e.cpu_s - s.cpu_s),
        _ => None,
    };
    let setup_cpu = match (b.baseline, b.at_setup) {
        (Some(s), Some(e)) => Some(e.cpu_s - s.cpu_s),
        _ => None,
    };
    let broker_rss = b.at_end.map(|s| s.rss_kb);
    let rss_per_conn = match (b.baseline, b.at_end) {
        (Some(s), Some(e)) if r.connected >= 1000 => {
            Some((e.rss_kb as f64 - s.rss_kb as f64) * 1024.0 / r.connected as f64)
        }
        _ => None,
    };
    let delivered = r.received_window;
    let threads = (settings.threads * settings.procs) as f64;
    let lg_util = if window_s > 0.0 {
        lg_cpu_window / window_s / threads.min(machine.cores as f64)
    } else {
        0.0
    };
    let qos = settings.qos;
    if r.subs_refused > 0 {
        problems.push(format!(
            "{} subscription(s) refused by the broker{}",
            r.subs_refused,
            if matches!(settings.scenario, Scenario::Shared { .. }) {
                " (does it support $share shared subscriptions?)"
            } else {
                ""
            }
        ));
    }
    if r.connected < total {
        problems.push(format!(
            "{} of {} clients did not connect",
            total - r.connected,
            total
        ));
    }
    if !r.errors.is_empty() {
        problems.push(format!(
            "{} established connection(s) failed during the run",
            r.errors.values().sum::<u64>()
        ));
    }
    if qos > 0 && lost > 0 {
        problems.push(format!("{lost} message(s) lost at QoS {qos}"));
    }
    if r.foreign > 0 {
        problems.push(format!(
            "{} delivery(ies) were not this run's messages",
            r.foreign
        ));
    }
    if lg_util > 0.9 {
        problems.push(format!(
            "loadgen used {:.0}% of its CPU: it, not the broker, may be the limit",
            lg_util * 100.0
        ));
    }
    let failed_hard = r.connected < total
        || r.subs_refused > 0
        || !r.errors.is_empty()
        || (qos > 0 && lost > 0)
        || missing > 0;
    let (publishers, subscribers) = settings.scenario.counts();
    let loadgen_rss_per_conn = if r.connected >= 1000 && r.rss_ready_kb > 0 {
        Some(r.rss_ready_kb as f64 * 1024.0 / r.connected as f64)
    } else {
        None
    };
    Report {
        scenario: settings.scenario.name().into(),
        ok: !failed_hard,
        command_line: std::env::args().collect::<Vec<_>>().join(" "),
        date: crate::report::utc(started_unix),
        machine,
        settings: RunSettings {
            host: settings.host.clone(),
            port: settings.port,
            transport: match (settings.transport, settings.tls.is_some()) {
                (Transport::Tcp, false) => "tcp".into(),
                (Transport::Ws, false) => format!("ws {}", settings.ws_path),
                (Transport::Tcp, true) => "tcp+tls".into(),
                (Transport::Ws, true) => format!("ws+tls {}", settings.ws_path),
            },
            protocol: if settings.v5 { "5" } else { "3.1.1" }.into(),
            qos,
            payload: settings.payload,
            rate_per_publisher: settings.rate,
            duration_s: settings.duration_s,
            warmup_s: settings.warmup_s,
            inflight: settings.inflight,
            keepalive: settings.keepalive,
            clean_session: settings.clean_session,
            publishers,
            subscribers,
            threads: settings.threads,
            procs: settings.procs,
            source_ips: settings.source_ips.len(),
            run_id: format!("{:08x}", settings.run_id),
        },
        connections: r.connected,
        connections_target: total,
        connect_failures: total.saturating_sub(r.connected),
        failures_by_reason: r.failures,
        errors_by_reason: r.errors,
        subscriptions_refused: r.subs_refused,
        tls_handshakes: settings.tls.as_ref().map(|_| r.tls_handshakes),
        tls_resumed: settings.tls.as_ref().map(|_| r.tls_resumed),
        connect_rate_per_s: if connect_span_s > 0.0 {
            r.connected as f64 / connect_span_s
        } else {
            0.0
        },
        connect_time_us: conn.percentiles(),
        broker_setup_cpu_s: setup_cpu,
        connections_per_broker_cpu_s: setup_cpu
            .and_then(|c| (c > 0.0).then(|| r.connected as f64 / c)),
        sent: r.sent,
        acked: r.acked,
        received: r.received,
        expected,
        lost,
        duplicated: r.delivery.duplicated,
        reordered: r.delivery.reordered,
        foreign: r.foreign,
        publish_refused: r.publish_refused,
        window_s,
        sent_per_s: per_s(r.sent_window),
        delivered_per_s: per_s(delivered),
        latency_us: lat.percentiles(),
        broker_pid: b.pid,
        broker_cpu_s: broker_cpu,
        broker_cpu_util: broker_cpu.map(|c| if window_s > 0.0 { c / window_s } else { 0.0 }),
        broker_rss_kb: broker_rss,
        broker_rss_start_kb: b.baseline.map(|s| s.rss_kb),
        broker_rss_max_kb: b.pid.map(|_| b.rss_max),
        broker_rss_per_connection_b: rss_per_conn,
        msgs_per_broker_cpu_s: broker_cpu.and_then(|c| {
            if c > 0.0 && delivered > 0 {
                Some(delivered as f64 / c)
            } else {
                None
            }
        }),
        broker_samples: b.samples,
        loadgen_cpu_s: lg_cpu_window,
        loadgen_cpu_total_s: lg_cpu_total,
        loadgen_cpu_util: lg_util,
        loadgen_saturated: lg_util > 0.9,
        loadgen_rss_kb: r.rss_kb,
        loadgen_rss_per_connection_b: loadgen_rss_per_conn,
        problems,
    }
}
