//! # Tarta: a thread-per-core MQTT broker
//!
//! # Layout
//! - [`config`]: flags and TOML file, parsed once into a read-only `Config`.
//! - [`runtime`]: the only glommio user: executors, listeners, connection
//!   tasks, the mesh pump, the ticker, shutdown.
//! - [`broker`]: one shard's state and what it does with packets: sessions,
//!   local topic index, routing table, retained messages. No I/O.
//! - [`session`]: one client's QoS state machine. No I/O, no clock.
//! - [`mesh`]: bounded crossbeam channels between shards plus doorbells.
//! - [`wheel`]: the timer wheel for keep-alive and CONNECT timeouts.
//! - `tarta_proto` (engine/proto): the MQTT codec, topics, topic index, ACLs.
//!
//! See docs/ARCHITECTURE.md for the map and its invariants.

pub mod broker;
pub mod config;
pub mod mesh;
pub mod runtime;
pub mod session;
pub mod wheel;

pub use broker::home_shard;
