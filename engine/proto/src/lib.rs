//! # tarta-proto: Tarta's protocol core
//!
//! Everything here is deterministic: no sockets, no runtime, no clock (time is
//! passed in). That is what lets the codec, the topic index and the session
//! state machine be property-tested in microseconds.
//!
//! # Layout
//! - [`mqtt`]: the MQTT 3.1 / 3.1.1 / 5.0 codec (zero-copy on `bytes`).
//! - [`ByteStr`]: validated MQTT UTF-8 strings as `Bytes` slices.
//! - [`topic`]: topic names and filters (parse, don't validate) and the reference matcher.
//! - [`index`]: the topic trie mapping (filter, key) to values, matched per published topic.
//! - [`retain_tree`]: retained messages by topic name, searched by topic filter.
//! - [`ws`]: MQTT over WebSocket: upgrade handshake, frame decoding with in-place unmasking.
//! - [`acl`]: Mosquitto `acl_file` access control lists, resolved per client.
//! - [`proxy`]: the HAProxy PROXY protocol (v1 and v2) header a trusted load balancer sends first.
//! - [`passwd`]: Mosquitto password files (`$7$` PBKDF2-SHA512, `$6$` SHA-512).
//! - [`cidr`]: address ranges for `trusted_proxies` lists.

pub mod acl;
mod bytestr;
pub mod cidr;
pub mod index;
pub mod mqtt;
pub mod passwd;
pub mod proxy;
pub mod retain_tree;
#[cfg(test)]
mod testgen;
pub mod topic;
pub mod ws;

pub use bytestr::{ByteStr, InvalidString};
