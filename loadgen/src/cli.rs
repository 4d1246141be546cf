//! Command line: one subcommand per scenario, the same common options for
//! each. Parsed once into [`Settings`], which every worker process receives
//! as JSON.

use crate::plan::Scenario;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    version,
    about = "Drive an MQTT broker (Tarta, Mosquitto, EMQX, ...) and measure it: connections, throughput, latency, loss, broker CPU and memory."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Open N connections at a given rate and hold them idle.
    Conn {
        /// Connections to open.
        #[arg(short = 'n', long, default_value_t = 1000)]
        connections: u32,
        #[command(flatten)]
        common: Common,
    },
    /// N publishers -> N subscribers, each pair on its own topic.
    Pairs {
        /// Number of publisher/subscriber pairs.
        #[arg(short = 'n', long, default_value_t = 10)]
        pairs: u32,
        #[command(flatten)]
        common: Common,
    },
    /// P publishers -> S subscribers of one topic.
    Fanout {
        #[command(flatten)]
        ps: PubSub,
        #[command(flatten)]
        common: Common,
    },
    /// P publishers (one topic each) -> S subscribers of a wildcard filter.
    Fanin {
        #[command(flatten)]
        ps: PubSub,
        #[command(flatten)]
        common: Common,
    },
    /// P publishers -> S subscribers in one `$share` group.
    Shared {
        #[command(flatten)]
        ps: PubSub,
        #[command(flatten)]
        common: Common,
    },
    /// Internal: one worker process (started by loadgen itself).
    #[command(name = "__worker", hide = true)]
    Worker,
}

#[derive(Args, Debug)]
pub struct PubSub {
    /// Publishers.
    #[arg(short = 'p', long, default_value_t = 1)]
    pub publishers: u32,
    /// Subscribers.
    #[arg(short = 's', long, default_value_t = 10)]
    pub subscribers: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
pub enum Transport {
    Tcp,
    Ws,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
pub enum ProtocolArg {
    #[value(name = "3.1.1")]
    V311,
    #[value(name = "5")]
    V5,
}

#[derive(Args, Debug)]
pub struct Common {
    /// Broker host (an IPv4 address or a name).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port (default: 1883, with --tls 8883).
    #[arg(long)]
    pub port: Option<u16>,
    /// Subscribers connect to this port on --host instead (another broker:
    /// a bridge's remote, with publishers on the bridging broker).
    #[arg(long)]
    pub sub_port: Option<u16>,
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    pub transport: Transport,
    /// HTTP path of the WebSocket endpoint (with --transport ws).
    #[arg(long, default_value = "/mqtt")]
    pub ws_path: String,
    /// TLS over the transport: tcp -> MQTT over TLS (mqtts), ws -> wss.
    /// Needs --cafile or --insecure (the system's roots are not used).
    #[arg(long)]
    pub tls: bool,
    /// PEM file with the CA certificate(s) that verify the broker's
    /// certificate (with --tls).
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls",
        conflicts_with = "insecure"
    )]
    pub cafile: Option<std::path::PathBuf>,
    /// Do not verify the broker's certificate (with --tls; for benchmarks).
    #[arg(long, requires = "tls")]
    pub insecure: bool,
    /// Name sent as SNI and verified against the broker's certificate
    /// (default: --host, or "localhost" when --host is an IP address).
    #[arg(long, value_name = "NAME", requires = "tls")]
    pub server_name: Option<String>,
    /// Resume TLS sessions when a ticket is at hand (default: off, every
    /// connection makes a full handshake).
    #[arg(long, requires = "tls")]
    pub tls_resume: bool,
    #[arg(long, value_enum, default_value_t = ProtocolArg::V311)]
    pub protocol: ProtocolArg,
    /// QoS of publishes and subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload size in bytes (at least 24: sequence number and timestamp).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Messages per second per publisher (0: as fast as the window allows).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Messages per second over all publishers (overrides --rate).
    #[arg(long)]
    pub total_rate: Option<f64>,
    /// Seconds of measurement (for `conn`: seconds to hold the connections).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of publishing before measurement starts (not in latency or rates).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Unacknowledged QoS 1/2 publishes allowed per publisher.
    #[arg(long, default_value_t = 32)]
    pub inflight: u16,
    /// MQTT keep-alive in seconds (0: none).
    #[arg(long, default_value_t = 60)]
    pub keepalive: u16,
    /// Clean session (3.1.1) / clean start (5).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub clean_session: bool,
    /// New connections per second, over all processes.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Connection attempts in progress at once, per thread.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: u32,
    /// Seconds allowed for TCP connect + TLS handshake + WebSocket upgrade +
    /// CONNACK + SUBACK.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Seconds a publisher waits for an acknowledgement before it reports
    /// that the broker stopped acknowledging.
    #[arg(long, default_value_t = 10.0)]
    pub ack_timeout: f64,
    /// Most seconds to wait for outstanding deliveries after publishing stops.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
    /// Executor threads per process (default: the CPUs available).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Worker processes to spread the clients over (each may open only
    /// `ulimit -n` files).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Pin each executor thread to one CPU.
    #[arg(long)]
    pub pin: bool,
    /// Local addresses to bind clients to, round robin: `A-B` (an IPv4
    /// range) or a comma-separated list. Needed beyond ~28k connections.
    #[arg(long)]
    pub source_ips: Option<String>,
    /// PID of the broker: sample its CPU and RSS from /proc.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Topic prefix (a per-run id is appended).
    #[arg(long, default_value = "loadgen")]
    pub topic_prefix: String,
    /// The run id in client ids and topics, 8 hex digits (default: random).
    /// Fixing it gives repeated runs the same client ids, hence the same
    /// broker shards (Tarta homes a session by its client id).
    #[arg(long, value_parser = parse_run_id)]
    pub run_id: Option<u32>,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// Everything a worker needs, derived once from the command line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub scenario: Scenario,
    pub host: String,
    pub port: u16,
    pub addr: std::net::SocketAddr,
    /// `--sub-port`: where subscribers connect (None: `addr`).
    pub sub_addr: Option<std::net::SocketAddr>,
    pub transport: Transport,
    pub ws_path: String,
    /// `--tls`: TLS under the transport.
    pub tls: Option<TlsSettings>,
    pub v5: bool,
    pub qos: u8,
    pub payload: usize,
    /// Per publisher, msgs/s; 0 = unlimited.
    pub rate: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub inflight: u16,
    pub keepalive: u16,
    pub clean_session: bool,
    pub connect_rate: f64,
    pub connect_concurrency: u32,
    pub connect_timeout_s: f64,
    pub ack_timeout_s: f64,
    pub drain_timeout_s: f64,
    pub threads: usize,
    pub procs: usize,
    pub pin: bool,
    pub source_ips: Vec<Ipv4Addr>,
    pub topic_prefix: String,
    pub run_id: u32,
    /// Set per worker.
    pub proc_index: usize,
}

/// TLS options, checked by the coordinator (the CA file is read there and
/// its text passed on, so every worker uses the same certificates).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsSettings {
    /// The PEM text of `--cafile`; `None` with `--insecure`.
    pub ca_pem: Option<String>,
    pub insecure: bool,
    /// SNI and the name verified in the broker's certificate.
    pub server_name: String,
    pub resume: bool,
}

/// Parses `A-B` (IPv4 range, inclusive) or `A,B,C`.
pub fn parse_source_ips(s: &str) -> Result<Vec<Ipv4Addr>, String> {
    let bad = |x: &str| format!("--source-ips: {x:?} is not an IPv4 address");
    if let Some((a, b)) = s.split_once('-') {
        let a: Ipv4Addr = a.trim().parse().map_err(|_| bad(a))?;
        let b: Ipv4Addr = b.trim().parse().map_err(|_| bad(b))?;
        let (a, b) = (u32::from(a), u32::from(b));
        if b < a || b - a > 65535 {
            return Err(format!("--source-ips: bad range {s:?}"));
        }
        return Ok((a..=b).map(Ipv4Addr::from).collect());
    }
    s.split(',')
        .map(|x| x.trim().parse().map_err(|_| bad(x)))
        .collect()
}

fn parse_run_id(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 16).map_err(|e| format!("run id must be 8 hex digits: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ip_forms() {
        let r = parse_source_ips("127.0.0.1-127.0.0.64").unwrap();
        assert_eq!(r.len(), 64);
        assert_eq!(r[63], Ipv4Addr::new(127, 0, 0, 64));
        assert_eq!(parse_source_ips("127.0.0.2, 127.0.0.3").unwrap().len(), 2);
        assert!(parse_source_ips("127.0.0.9-127.0.0.1").is_err());
        assert!(parse_source_ips("nope").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "loadgen",
            "fanout",
            "-p",
            "2",
            "-s",
            "5",
            "--qos",
            "1",
            "--protocol",
            "5",
        ])
        .unwrap();
        assert!(matches!(c.cmd, Cmd::Fanout { .. }));
        assert!(Cli::try_parse_from(["loadgen", "pairs", "--qos", "3"]).is_err());
    }

    #[test]
    fn tls_flags() {
        let common = |args: &[&str]| {
            let mut v = vec!["loadgen", "conn"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v).map(|c| match c.cmd {
                Cmd::Conn { common, .. } => common,
                _ => unreachable!(),
            })
        };
        let c = common(&["--tls", "--cafile", "ca.pem", "--server-name", "broker"]).unwrap();
        assert!(c.tls && !c.insecure && !c.tls_resume);
        assert_eq!(c.cafile.as_deref(), Some(std::path::Path::new("ca.pem")));
        assert_eq!(c.server_name.as_deref(), Some("broker"));
        assert!(
            common(&["--tls", "--insecure", "--tls-resume"])
                .unwrap()
                .insecure
        );
        // TLS options need --tls; --cafile and --insecure exclude each other.
        assert!(common(&["--cafile", "ca.pem"]).is_err());
        assert!(common(&["--insecure"]).is_err());
        assert!(common(&["--tls-resume"]).is_err());
        assert!(common(&["--tls", "--insecure", "--cafile", "ca.pem"]).is_err());
        assert_eq!(common(&[]).unwrap().port, None);
    }

    #[test]
    fn run_id_is_hex() {
        assert_eq!(parse_run_id("0000002a"), Ok(42));
        assert_eq!(parse_run_id("ffffffff"), Ok(u32::MAX));
        assert!(parse_run_id("zz").is_err());
        assert!(parse_run_id("100000000").is_err(), "more than 32 bits");
    }
}
