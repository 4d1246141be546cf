//! # Tarta: a thread-per-core MQTT broker
//!
//! # Layout
//! - [`config`]: flags and TOML file, parsed once into a read-only `Config`.
//! - [`runtime`]: the only glommio user: executors, listeners, connection
//!   tasks, the mesh pump, the ticker, shutdown.
//! - [`broker`]: one shard's state and what it does with packets: sessions,
//!   local topic index, routing table, retained messages. No I/O.
//! - [`security`]: password files and the ACL, read at start and on SIGHUP.
//! - [`session`]: one client's QoS state machine. No I/O, no clock.
//! - [`passwd_tool`]: `tarta passwd`, the password-file tool.
//! - [`exporter`]: the Prometheus exposition of the shards' metrics.
//! - [`logging`]: the non-blocking, lossy log writer (`--log-format`).
//! - [`mesh`]: bounded crossbeam channels between shards plus doorbells.
//! - [`wheel`]: the timer wheel for keep-alive and CONNECT timeouts.
//! - [`transport`]: the layers between a socket and MQTT (PROXY header,
//!   TLS, WebSocket) as state without I/O; TLS certificates.
//! - `tarta_proto` (engine/proto): the MQTT codec, topics, topic index, ACLs.
//!
//! See docs/ARCHITECTURE.md for the map and its invariants.

pub mod broker;
pub mod config;
pub mod exporter;
pub mod logging;
pub mod mesh;
pub mod passwd_tool;
pub mod runtime;
pub mod security;
pub mod session;
pub mod store;
pub mod transport;
pub mod wheel;

pub use broker::home_shard;

#[cfg(test)]
mod layering {
    //! Architecture invariants that a grep can check.

    fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// glommio is used only by `runtime` (one module to change if we move
    /// runtimes); the protocol core and the broker logic do no I/O.
    #[test]
    fn glommio_only_in_the_runtime_layer() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        rust_files(&root.join("src"), &mut files);
        rust_files(&root.join("proto/src"), &mut files);
        assert!(files.len() > 10);
        for f in files {
            if f.components().any(|c| c.as_os_str() == "runtime") {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap();
            // Built at run time so this file does not match itself.
            let (path, import) = (["glommio", "::"].concat(), ["use ", "glommio"].concat());
            let uses = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .any(|l| l.contains(&path) || l.contains(&import));
            assert!(!uses, "{} uses glommio outside runtime/", f.display());
        }
    }
}
