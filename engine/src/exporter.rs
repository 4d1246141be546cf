//! The Prometheus exposition (`GET /metrics`, text format 0.0.4): every
//! shard's counters and gauges, read directly (they are atomics only their
//! shard writes) and labelled `shard`, the listeners' open connections,
//! and the process's memory, CPU and descriptors. Encoded with the
//! `prometheus` crate's `TextEncoder`. Reading `/proc` is file I/O: the
//! runtime calls [`render`] on a blocking thread, never on a shard.

use crate::broker::metrics::SYNC_BUCKETS_US;
use crate::broker::metrics::{Kind, Metrics};
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};

use prometheus::TextEncoder;
use std::sync::Arc;

/// Metrics every shard holds a full copy of: exported once, from shard 0.
const REPLICATED: [&str; 1] = ["retained"];

/// One listener as the scrape sees it.
#[derive(Debug, Clone)]
pub struct ListenerStat {
    pub addr: String,
    /// tcp, ws, tls, wss or http.
    pub transport: &'static str,
    pub open: u64,
}

/// What one scrape reads.
#[derive(Debug, Clone)]
pub struct Sources {
    pub shards: Arc<Vec<Arc<Metrics>>>,
    pub listeners: Vec<ListenerStat>,
    /// Log lines dropped by the non-blocking writer.
    pub log_dropped: u64,
    pub version: &'static str,
    pub bridges: Vec<BridgeStat>,
}

/// One bridge as the scrape sees it.
#[derive(Debug, Clone, Default)]
pub struct BridgeStat {
    pub name: String,
    pub up: bool,
    pub queued: u64,
    pub queued_bytes: u64,
    /// Seconds since the oldest buffered message was published (0: none).
    pub oldest_age: u64,
    pub forwarded: u64,
    pub received: u64,
    pub dropped: u64,
    pub rejected: u64,
    pub remote_refused: u64,
    pub connects: u64,
}

impl BridgeStat {
    /// A bridge's figures now (`now`: the broker second).
    pub fn of(name: &str, s: &crate::broker::bridge::BridgeStatus, now: u64) -> BridgeStat {
        use std::sync::atomic::Ordering::Relaxed;
        let queued = s.queued.load(Relaxed);
        BridgeStat {
            name: name.to_string(),
            up: s.connected.load(Relaxed),
            queued,
            queued_bytes: s.queued_bytes.load(Relaxed),
            // Recovered at start (no time known): counted from the start.
            oldest_age: if queued > 0 {
                now.saturating_sub(s.oldest_at.load(Relaxed))
            } else {
                0
            },
            forwarded: s.forwarded.load(Relaxed),
            received: s.received.load(Relaxed),
            dropped: s.dropped.load(Relaxed),
            rejected: s.rejected.load(Relaxed),
            remote_refused: s.remote_refused.load(Relaxed),
            connects: s.connects.load(Relaxed),
        }
    }
}

/// The bridge families: (name, help, kind, value).
type BridgeFamily = (&'static str, &'static str, Kind, fn(&BridgeStat) -> u64);
const BRIDGE_FAMILIES: [BridgeFamily; 10] = [
    (
        "tarta_bridge_up",
        "1 while the bridge's link is up.",
        Kind::Gauge,
        |b| u64::from(b.up),
    ),
    (
        "tarta_bridge_queued_messages",
        "Messages buffered for the remote (queued and in flight).",
        Kind::Gauge,
        |b| b.queued,
    ),
    (
        "tarta_bridge_queued_bytes",
        "Topic and payload bytes buffered for the remote.",
        Kind::Gauge,
        |b| b.queued_bytes,
    ),
    (
        "tarta_bridge_oldest_queued_age_seconds",
        "Age of the oldest buffered message (0: none).",
        Kind::Gauge,
        |b| b.oldest_age,
    ),
    (
        "tarta_bridge_forwarded",
        "Messages the remote acknowledged.",
        Kind::Counter,
        |b| b.forwarded,
    ),
    (
        "tarta_bridge_received",
        "Messages from the remote published here.",
        Kind::Counter,
        |b| b.received,
    ),
    (
        "tarta_bridge_dropped",
        "Messages dropped: the oldest of a full drop_oldest buffer, QoS 0 when full.",
        Kind::Counter,
        |b| b.dropped,
    ),
    (
        "tarta_bridge_rejected",
        "Messages refused to local publishers: the reject_new buffer was full.",
        Kind::Counter,
        |b| b.rejected,
    ),
    (
        "tarta_bridge_remote_refused",
        "Forwarded messages the remote refused (an error reason code).",
        Kind::Counter,
        |b| b.remote_refused,
    ),
    (
        "tarta_bridge_connects",
        "Links established.",
        Kind::Counter,
        |b| b.connects,
    ),
];

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

fn metric(kind: Kind, value: f64, pairs: &[(&str, &str)]) -> Metric {
    let mut m = Metric::default();
    m.set_label(labels(pairs));
    match kind {
        Kind::Counter => {
            let mut c = Counter::default();
            c.set_value(value);
            m.set_counter(c);
        }
        Kind::Gauge => {
            let mut g = Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
    }
    m
}

fn family(name: &str, help: &str, kind: Kind, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    // Prometheus's conventions: counters end in _total.
    f.set_name(match kind {
        Kind::Counter => format!("{name}_total"),
        Kind::Gauge => name.to_string(),
    });
    f.set_help(help.to_string());
    f.set_field_type(match kind {
        Kind::Counter => MetricType::COUNTER,
        Kind::Gauge => MetricType::GAUGE,
    });
    for m in metrics {
        f.mut_metric().push(m);
    }
    f
}

fn families(s: &Sources) -> Vec<MetricFamily> {
    let mut out = Vec::new();
    let values: Vec<Vec<(&str, u64)>> = s.shards.iter().map(|m| m.snapshot()).collect();
    for (i, (name, kind, help)) in Metrics::DESCRIPTORS.iter().enumerate() {
        let mut ms = Vec::new();
        for (shard, v) in values.iter().enumerate() {
            if REPLICATED.contains(name) && shard > 0 {
                break;
            }
            let shard = shard.to_string();
            ms.push(metric(*kind, v[i].1 as f64, &[("shard", &shard)]));
        }
        out.push(family(&format!("tarta_{name}"), help, *kind, ms));
    }
    // Closes by reason.
    let mut ms = Vec::new();
    for (shard, m) in s.shards.iter().enumerate() {
        let shard = shard.to_string();
        for (i, reason) in crate::broker::conn::CLOSE_LABELS.iter().enumerate() {
            ms.push(metric(
                Kind::Counter,
                m.closed[i].get() as f64,
                &[("shard", &shard), ("reason", reason)],
            ));
        }
    }
    out.push(family(
        "tarta_connections_closed",
        "Connections closed, by reason (client_disconnect, peer_gone, bad_input, keepalive, taken_over, refused, limit, transport, http, administrative, storage, shutdown).",
        Kind::Counter,
        ms,
    ));
    // By QoS.
    for (name, help, pick) in [
        (
            "tarta_publish_received_by_qos",
            "PUBLISH packets received from clients, by QoS.",
            (|m: &Metrics| &m.received_qos)
                as fn(&Metrics) -> &[crate::broker::metrics::Counter; 3],
        ),
        (
            "tarta_publish_sent_by_qos",
            "PUBLISH packets sent to clients, by QoS.",
            |m: &Metrics| &m.sent_qos,
        ),
    ] {
        let mut ms = Vec::new();
        for (shard, m) in s.shards.iter().enumerate() {
            let shard = shard.to_string();
            for (q, c) in pick(m).iter().enumerate() {
                let q = q.to_string();
                ms.push(metric(
                    Kind::Counter,
                    c.get() as f64,
                    &[("shard", &shard), ("qos", &q)],
                ));
            }
        }
        out.push(family(name, help, Kind::Counter, ms));
    }
    // The log sync latency histogram.
    let mut f = MetricFamily::default();
    f.set_name("tarta_log_sync_seconds".into());
    f.set_help("Write-ahead log syncs by duration (the O_DSYNC write with fsync = always; fdatasync with fsync = interval).".into());
    f.set_field_type(MetricType::HISTOGRAM);
    for (shard, m) in s.shards.iter().enumerate() {
        let mut h = Histogram::default();
        let mut cumulative = 0;
        let mut buckets = Vec::new();
        for (i, le) in SYNC_BUCKETS_US.iter().enumerate() {
            cumulative += m.sync_buckets[i].get();
            let mut b = Bucket::default();
            b.set_upper_bound(*le as f64 / 1e6);
            b.set_cumulative_count(cumulative);
            buckets.push(b);
        }
        h.set_bucket(buckets);
        h.set_sample_count(m.sync_count.get());
        h.set_sample_sum(m.sync_sum_us.get() as f64 / 1e6);
        let mut mm = Metric::default();
        mm.set_label(labels(&[("shard", &shard.to_string())]));
        mm.set_histogram(h);
        f.mut_metric().push(mm);
    }
    out.push(f);
    let ms = s
        .listeners
        .iter()
        .map(|l| {
            metric(
                Kind::Gauge,
                l.open as f64,
                &[("listener", &l.addr), ("transport", l.transport)],
            )
        })
        .collect();
    out.push(family(
        "tarta_listener_connections",
        "Connections open now on a listener (all shards).",
        Kind::Gauge,
        ms,
    ));
    for (name, help, kind, value) in BRIDGE_FAMILIES {
        if s.bridges.is_empty() {
            break;
        }
        let ms = s
            .bridges
            .iter()
            .map(|b| metric(kind, value(b) as f64, &[("bridge", &b.name)]))
            .collect();
        out.push(family(name, help, kind, ms));
    }
    out.push(family(
        "tarta_log_lines_dropped",
        "Log lines dropped because stderr could not keep up.",
        Kind::Counter,
        vec![metric(Kind::Counter, s.log_dropped as f64, &[])],
    ));
    out.push(family(
        "tarta_build_info",
        "The running version (always 1).",
        Kind::Gauge,
        vec![metric(Kind::Gauge, 1.0, &[("version", s.version)])],
    ));
    process(&mut out);
    out
}

/// The process's own figures, from /proc (Prometheus's standard names).
fn process(out: &mut Vec<MetricFamily>) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name (which may contain spaces).
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf with constant names.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
        )
    };
    // `family` gives counters their `_total` (process_cpu_seconds_total).
    let one = |name: &str, help: &str, kind: Kind, v: f64| {
        family(name, help, kind, vec![metric(kind, v, &[])])
    };
    // utime and stime: fields 14 and 15 of stat (11 and 12 after the name).
    let cpu = (num(11) + num(12)) as f64 / ticks;
    out.push(one(
        "process_cpu_seconds",
        "User and system CPU time spent in seconds.",
        Kind::Counter,
        cpu,
    ));
    out.push(one(
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        Kind::Gauge,
        (num(21) * page) as f64,
    ));
    out.push(one(
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
        Kind::Gauge,
        num(20) as f64,
    ));
    // Counted every 5 s by the runtime's memory thread (listing
    // /proc/self/fd is O(descriptors)); counted here only without it.
    let fds = match crate::broker::sys::OPEN_FDS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64),
        n => n,
    };
    out.push(one(
        "process_open_fds",
        "Number of open file descriptors (refreshed every 5 s).",
        Kind::Gauge,
        fds as f64,
    ));
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        out.push(one(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            Kind::Gauge,
            lim.rlim_cur as f64,
        ));
    }
}

/// The text exposition (format 0.0.4) of everything in `s`.
pub fn render(s: Sources) -> String {
    let mut out = String::with_capacity(32 * 1024);
    if TextEncoder::new()
        .encode_utf8(&families(&s), &mut out)
        .is_err()
    {
        out.clear();
    }
    out
}

/// The Content-Type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_labels_and_process() {
        let shards: Vec<Arc<Metrics>> = (0..2).map(|_| Arc::new(Metrics::default())).collect();
        shards[0].messages_received.set(5);
        shards[1].messages_received.set(7);
        shards[1].connections_current.set(3);
        shards[0].retained.set(9);
        shards[1].retained.set(9);
        let text = render(Sources {
            shards: Arc::new(shards),
            listeners: vec![ListenerStat {
                addr: "127.0.0.1:1883".into(),
                transport: "tcp",
                open: 3,
            }],
            log_dropped: 0,
            version: "0.1.0",
            bridges: vec![BridgeStat {
                name: "cloud".into(),
                up: true,
                queued: 4,
                forwarded: 10,
                ..Default::default()
            }],
        });
        assert!(
            text.contains("tarta_bridge_up{bridge=\"cloud\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tarta_bridge_queued_messages{bridge=\"cloud\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("tarta_bridge_forwarded_total{bridge=\"cloud\"} 10"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE tarta_messages_received_total counter"),
            "{text}"
        );
        assert!(
            text.contains("tarta_messages_received_total{shard=\"0\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("tarta_messages_received_total{shard=\"1\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE tarta_connections_current gauge"),
            "{text}"
        );
        assert!(
            text.contains("tarta_connections_current{shard=\"1\"} 3"),
            "{text}"
        );
        assert!(text.contains("tarta_retained{shard=\"0\"} 9"), "{text}");
        assert!(!text.contains("tarta_retained{shard=\"1\"}"), "{text}");
        assert!(
            text.contains(
                "tarta_listener_connections{listener=\"127.0.0.1:1883\",transport=\"tcp\"} 3"
            ),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
        assert!(text.contains("process_open_fds "), "{text}");
        assert!(
            text.contains("tarta_connections_closed_total{shard=\"0\",reason=\"peer_gone\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("tarta_log_sync_seconds_bucket{shard=\"0\",le=\"0.0001\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("tarta_publish_received_by_qos_total{shard=\"1\",qos=\"2\"} 0"),
            "{text}"
        );
    }
}
