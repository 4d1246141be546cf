//! End-to-end tests: the real `tarta` binary with 2 shards, driven by
//! rumqttc (a third-party client) and by a byte-level client for bad input.
//! Publisher and subscriber are placed on different shards by choosing
//! client ids by home shard (`tarta::home_shard`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

mod acl;
mod admin;
mod auth;
mod bridge;
mod durability;
mod errors;
mod limits;
mod logging;
mod metrics;
mod ops;
mod pubsub;
mod sessions;
mod storage;
mod tls;
mod v5;
mod ws;
