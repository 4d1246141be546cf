//! The final report: every figure, as JSON (`--json`) and as a table.
//! The top-level keys listed in docs/LOADGEN.md are stable: scripts read
//! them.

use crate::procfs::Machine;
use crate::stats::Percentiles;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, Clone, Serialize)]
pub struct RunSettings {
    pub host: String,
    pub port: u16,
    pub transport: String,
    pub protocol: String,
    pub qos: u8,
    pub payload: usize,
    pub rate_per_publisher: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub inflight: u16,
    pub keepalive: u16,
    pub clean_session: bool,
    pub publishers: u32,
    pub subscribers: u32,
    pub threads: usize,
    pub procs: usize,
    pub source_ips: usize,
    pub run_id: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub ok: bool,
    pub command_line: String,
    pub date: String,
    pub machine: Machine,
    pub settings: RunSettings,
    /// Clients that got their CONNACK.
    pub connections: u64,
    pub connections_target: u64,
    pub connect_failures: u64,
    pub failures_by_reason: BTreeMap<String, u64>,
    /// Established connections that failed later, by reason.
    pub errors_by_reason: BTreeMap<String, u64>,
    pub subscriptions_refused: u64,
    /// `--tls`: completed handshakes (clients that got their CONNACK) and
    /// how many of them resumed a session; `null` without TLS.
    pub tls_handshakes: Option<u64>,
    pub tls_resumed: Option<u64>,
    pub connect_rate_per_s: f64,
    pub connect_time_us: Percentiles,
    /// Broker CPU seconds from loadgen's start to the end of setup (every
    /// client connected, TLS handshakes included, and subscribed).
    pub broker_setup_cpu_s: Option<f64>,
    /// Connections set up per broker CPU-second during setup.
    pub connections_per_broker_cpu_s: Option<f64>,
    pub sent: u64,
    pub acked: u64,
    pub received: u64,
    /// Deliveries the broker owed: what each publisher sent times the
    /// subscribers that should hear it.
    pub expected: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub foreign: u64,
    pub publish_refused: u64,
    /// Seconds of the measurement window.
    pub window_s: f64,
    pub sent_per_s: f64,
    pub delivered_per_s: f64,
    pub latency_us: Percentiles,
    pub broker_pid: Option<u32>,
    pub broker_cpu_s: Option<f64>,
    pub broker_cpu_util: Option<f64>,
    pub broker_rss_kb: Option<u64>,
    pub broker_rss_start_kb: Option<u64>,
    pub broker_rss_max_kb: Option<u64>,
    pub broker_rss_per_connection_b: Option<f64>,
    pub msgs_per_broker_cpu_s: Option<f64>,
    pub broker_samples: Vec<BrokerSample>,
    pub loadgen_cpu_s: f64,
    pub loadgen_cpu_total_s: f64,
    /// loadgen CPU in the window / (window x its threads): near 1.0 means
    /// loadgen itself was the bottleneck.
    pub loadgen_cpu_util: f64,
    pub loadgen_saturated: bool,
    pub loadgen_rss_kb: u64,
    pub loadgen_rss_per_connection_b: Option<f64>,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct BrokerSample {
    pub t_s: f64,
    pub cpu_s: f64,
    pub rss_kb: u64,
}

fn us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1} ms", v as f64 / 1000.0)
    } else if v >= 1000 {
        format!("{:.2} ms", v as f64 / 1000.0)
    } else {
        format!("{v} µs")
    }
}

/// `12345678` -> `12,345,678`.
pub fn thousands(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Report {
    pub fn table(&self) -> String {
        let mut t = String::new();
        let s = &self.settings;
        let _ = writeln!(
            t,
            "loadgen {} against {}:{} ({}, MQTT {}, QoS {}, {} B payload) on {} ({} cores, Linux {})",
            self.scenario,
            s.host,
            s.port,
            s.transport,
            s.protocol,
            s.qos,
            s.payload,
            self.machine.cpu_model,
            self.machine.cores,
            self.machine.kernel
        );
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "  {k:<26} {v}");
        };
        row(
            "connections",
            format!(
                "{} of {} ({} failed), {:.0}/s, connect p50 {} p99 {}",
                thousands(self.connections),
                thousands(self.connections_target),
                thousands(self.connect_failures),
                self.connect_rate_per_s,
                us(self.connect_time_us.p50),
                us(self.connect_time_us.p99)
            ),
        );
        if let (Some(c), Some(per)) = (self.broker_setup_cpu_s, self.connections_per_broker_cpu_s) {
            row(
                "broker CPU in setup",
                format!("{c:.2} s, {per:.0} connections per CPU-s"),
            );
        }
        if let (Some(h), Some(r)) = (self.tls_handshakes, self.tls_resumed) {
            row(
                "TLS handshakes",
                format!("{} ({} resumed)", thousands(h), thousands(r)),
            );
        }
        for (k, v) in &self.failures_by_reason {
            row("  setup failure", format!("{}: {k}", thousands(*v)));
        }
        for (k, v) in &self.errors_by_reason {
            row("  error", format!("{}: {k}", thousands(*v)));
        }
        if self.subscriptions_refused > 0 {
            row(
                "subscriptions refused",
                thousands(self.subscriptions_refused),
            );
        }
        if self.scenario != "conn" {
            row(
                "publishers / subscribers",
                format!("{} / {}", s.publishers, s.subscribers),
            );
            row(
                "sent / received",
                format!(
                    "{} / {} (expected {})",
                    thousands(self.sent),
                    thousands(self.received),
                    thousands(self.expected)
                ),
            );
            row(
                "lost / dup / reordered",
                format!(
                    "{} / {} / {}",
                    thousands(self.lost),
                    thousands(self.duplicated),
                    thousands(self.reordered)
                ),
            );
            row(
                "throughput",
                format!(
                    "{} msg/s sent, {} msg/s delivered ({:.1} s window)",
                    thousands(self.sent_per_s as u64),
                    thousands(self.delivered_per_s as u64),
                    self.window_s
                ),
            );
            let l = &self.latency_us;
            row(
                "latency",
                format!(
                    "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  ({} samples)",
                    us(l.p50),
                    us(l.p90),
                    us(l.p99),
                    us(l.p999),
                    us(l.max),
                    thousands(l.count)
                ),
            );
        } else {
            row("held for", format!("{:.1} s", self.window_s));
        }
        if let (Some(cpu), Some(rss)) = (self.broker_cpu_s, self.broker_rss_kb) {
            row(
                "broker CPU",
                format!(
                    "{cpu:.2} s in the window ({:.0}% of one core)",
                    self.broker_cpu_util.unwrap_or(0.0) * 100.0
                ),
            );
            row(
                "broker RSS",
                format!(
                    "{} kB (start {} kB, max {} kB)",
                    thousands(rss),
                    thousands(self.broker_rss_start_kb.unwrap_or(0)),
                    thousands(self.broker_rss_max_kb.unwrap_or(0))
                ),
            );
            if let Some(b) = self.broker_rss_per_connection_b {
                row("broker RSS / connection", format!("{b:.0} B"));
            }
            if let Some(m) = self.msgs_per_broker_cpu_s {
                row("msgs / broker CPU-second", thousands(m as u64));
            }
        }
        row(
            "loadgen CPU",
            format!(
                "{:.2} s in the window ({:.0}% of its {} threads){}",
                self.loadgen_cpu_s,
                self.loadgen_cpu_util * 100.0,
                s.threads * s.procs,
                if self.loadgen_saturated {
                    "  SATURATED: figures are loadgen's limit"
                } else {
                    ""
                }
            ),
        );
        if let Some(b) = self.loadgen_rss_per_connection_b {
            row("loadgen RSS / connection", format!("{b:.0} B"));
        }
        for p in &self.problems {
            let _ = writeln!(t, "  PROBLEM: {p}");
        }
        let _ = writeln!(t, "  result: {}", if self.ok { "ok" } else { "FAILED" });
        t
    }
}

/// Seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_numbers() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(12), "12");
    }
}
