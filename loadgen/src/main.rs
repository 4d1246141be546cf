//! `loadgen`: Tarta's load generator. Drives any MQTT broker over TCP or
//! WebSocket, with or without TLS (MQTT 3.1.1 or 5), and measures it
//! honestly: connection scale, throughput, latency (HDR histograms),
//! loss/duplicates/reordering per stream, and the broker's CPU and memory
//! from /proc.
//!
//! # Layout
//! - `cli`: the command line and the [`cli::Settings`] every worker gets.
//! - `plan`: scenario planning (roles, topics, process/thread placement,
//!   expected deliveries). No I/O.
//! - `stats`: delivery trackers and latency histograms. No I/O.
//! - `payload`: the 24-byte measurement header in every payload. No I/O.
//! - `ws`: WebSocket handshake and framing. No I/O.
//! - `tls`: rustls client configuration and per-connection TLS state
//!   (`--tls`). No I/O.
//! - `runtime`: glommio executors, their timer wheel and statistics.
//! - `conn`: one client connection (the only other module using glommio).
//! - `worker`: a worker process (`loadgen __worker`), driven by lines on
//!   stdin/stdout.
//! - `coord`: the coordinator: spawns `--procs` workers, phases, /proc
//!   sampling, merging, the report.
//! - `procfs`, `report`: /proc readers; the report (table and JSON).

mod cli;
mod conn;
mod coord;
mod payload;
mod plan;
mod procfs;
mod report;
mod runtime;
mod stats;
mod tls;
mod worker;
mod ws;

use clap::Parser;

/// mimalloc: less overhead per small allocation than glibc's malloc, which
/// matters with many connections (docs/GLOMMIO-NOTES.md measured with it).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use cli::{Cli, Cmd};
use plan::Scenario;

fn main() {
    let cli = Cli::parse();
    let (scenario, common) = match cli.cmd {
        Cmd::Worker => std::process::exit(worker::main()),
        Cmd::Conn {
            connections,
            common,
        } => (Scenario::Conn { connections }, common),
        Cmd::Pairs { pairs, common } => (Scenario::Pairs { pairs }, common),
        Cmd::Fanout { ps, common } => (
            Scenario::Fanout {
                publishers: ps.publishers,
                subscribers: ps.subscribers,
            },
            common,
        ),
        Cmd::Fanin { ps, common } => (
            Scenario::Fanin {
                publishers: ps.publishers,
                subscribers: ps.subscribers,
            },
            common,
        ),
        Cmd::Shared { ps, common } => (
            Scenario::Shared {
                publishers: ps.publishers,
                subscribers: ps.subscribers,
            },
            common,
        ),
    };
    let settings = match coord::settings(scenario, &common) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
    };
    std::process::exit(coord::run(settings, &common));
}
