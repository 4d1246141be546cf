//! `$SYS/broker/...` the Mosquitto 2.0 way: the whole broker (every shard's
//! metrics, summed) under Mosquitto's topic names, published retained by
//! shard 0 every `sys_interval`, so existing dashboards and
//! `mosquitto_sub -t '$SYS/#'` habits work. The per-shard tree stays under
//! `$SYS/tarta/shard/N/...`.
//!
//! Load figures are Mosquitto's: exponentially decaying averages of the
//! rate per minute over 1, 5 and 15 minutes.

use super::metrics::Metrics;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Resident memory in bytes, refreshed by the runtime off the shards
/// (reading /proc is file I/O).
pub static RSS_BYTES: AtomicU64 = AtomicU64::new(0);
/// The largest resident size seen.
pub static RSS_MAX: AtomicU64 = AtomicU64::new(0);
/// Open file descriptors, counted every few seconds by the same thread
/// (listing /proc/self/fd costs ~1 ms per 1,000 descriptors: not per scrape).
pub static OPEN_FDS: AtomicU64 = AtomicU64::new(0);

/// The rates that get load averages: (topic part, total).
const RATES: [&str; 7] = [
    "messages/received",
    "messages/sent",
    "publish/received",
    "publish/sent",
    "bytes/received",
    "bytes/sent",
    "connections",
];

/// Sums over shards, at one moment.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    rates: [u64; RATES.len()],
}

/// Shard 0's memory of the previous publication.
#[derive(Debug, Default)]
pub struct SysState {
    prev: Option<(u64, Totals)>,
    load: [[f64; 3]; RATES.len()],
    max_connected: u64,
}

fn sum(all: &[std::sync::Arc<Metrics>], f: impl Fn(&Metrics) -> u64) -> u64 {
    all.iter().map(|m| f(m)).sum()
}

impl SysState {
    /// The `$SYS/broker/...` topics and values at broker second `now`.
    pub fn topics(
        &mut self,
        all: &[std::sync::Arc<Metrics>],
        now: u64,
        version: &str,
    ) -> Vec<(String, String)> {
        let connected = sum(all, |m| m.sessions_online.get());
        let total = sum(all, |m| m.sessions.get());
        self.max_connected = self.max_connected.max(connected);
        let t = Totals {
            rates: [
                sum(all, |m| m.packets_received.get()),
                sum(all, |m| m.packets_sent.get()),
                sum(all, |m| m.messages_received.get()),
                sum(all, |m| m.messages_sent.get()),
                sum(all, |m| m.bytes_received.get()),
                sum(all, |m| m.bytes_sent.get()),
                sum(all, |m| m.connections_accepted.get()),
            ],
        };
        if let Some((at, prev)) = self.prev {
            let interval = now.saturating_sub(at).max(1) as f64;
            for (i, l) in self.load.iter_mut().enumerate() {
                let per_min = t.rates[i].saturating_sub(prev.rates[i]) as f64 / interval * 60.0;
                for (k, minutes) in [1.0, 5.0, 15.0].iter().enumerate() {
                    let e = (-interval / (minutes * 60.0)).exp();
                    l[k] = l[k] * e + per_min * (1.0 - e);
                }
            }
        }
        self.prev = Some((now, t));
        let dropped = sum(all, |m| {
            m.qos0_dropped.get() + m.queue_dropped.get() + m.publish_rate_dropped.get()
        });
        let mut v: Vec<(String, String)> = vec![
            ("version".into(), format!("tarta version {version}")),
            ("uptime".into(), format!("{now} seconds")),
            ("clients/total".into(), total.to_string()),
            ("clients/connected".into(), connected.to_string()),
            ("clients/active".into(), connected.to_string()),
            (
                "clients/disconnected".into(),
                total.saturating_sub(connected).to_string(),
            ),
            (
                "clients/inactive".into(),
                total.saturating_sub(connected).to_string(),
            ),
            ("clients/maximum".into(), self.max_connected.to_string()),
            ("messages/received".into(), t.rates[0].to_string()),
            ("messages/sent".into(), t.rates[1].to_string()),
            ("publish/messages/received".into(), t.rates[2].to_string()),
            ("publish/messages/sent".into(), t.rates[3].to_string()),
            ("publish/messages/dropped".into(), dropped.to_string()),
            ("bytes/received".into(), t.rates[4].to_string()),
            ("bytes/sent".into(), t.rates[5].to_string()),
            (
                "subscriptions/count".into(),
                sum(all, |m| m.subscriptions.get()).to_string(),
            ),
            (
                "retained messages/count".into(),
                all.first().map_or(0, |m| m.retained.get()).to_string(),
            ),
            (
                "messages/stored".into(),
                sum(all, |m| m.queued.get()).to_string(),
            ),
            (
                "store/messages/count".into(),
                sum(all, |m| m.queued.get()).to_string(),
            ),
            ("heap/current".into(), RSS_BYTES.load(Relaxed).to_string()),
            ("heap/maximum".into(), RSS_MAX.load(Relaxed).to_string()),
        ];
        for (i, name) in RATES.iter().enumerate() {
            for (k, w) in ["1min", "5min", "15min"].iter().enumerate() {
                v.push((
                    format!("load/{name}/{w}"),
                    format!("{:.2}", self.load[i][k]),
                ));
            }
        }
        v.into_iter()
            .map(|(k, val)| (format!("$SYS/broker/{k}"), val))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn sums_over_shards_and_averages_rates_per_minute() {
        let all: Vec<Arc<Metrics>> = (0..2).map(|_| Arc::new(Metrics::default())).collect();
        all[0].sessions.set(3);
        all[1].sessions.set(4);
        all[0].sessions_online.set(2);
        all[1].sessions_online.set(1);
        let mut s = SysState::default();
        let get = |v: &[(String, String)], k: &str| {
            v.iter()
                .find(|(t, _)| t == &format!("$SYS/broker/{k}"))
                .map(|(_, x)| x.clone())
                .unwrap()
        };
        let v = s.topics(&all, 10, "0.1.0");
        assert_eq!(get(&v, "clients/total"), "7");
        assert_eq!(get(&v, "clients/connected"), "3");
        assert_eq!(get(&v, "clients/disconnected"), "4");
        assert_eq!(get(&v, "uptime"), "10 seconds");
        // 600 PUBLISH received in 60 s: 600 a minute, approached at the
        // 1-minute average's pace.
        all[1].messages_received.set(600);
        let v = s.topics(&all, 70, "0.1.0");
        assert_eq!(get(&v, "publish/messages/received"), "600");
        let one: f64 = get(&v, "load/publish/received/1min").parse().unwrap();
        let fifteen: f64 = get(&v, "load/publish/received/15min").parse().unwrap();
        assert!(
            (one - 600.0 * (1.0 - (-1.0f64).exp())).abs() < 0.01,
            "{one}"
        );
        assert!(fifteen < one && fifteen > 0.0);
    }
}
