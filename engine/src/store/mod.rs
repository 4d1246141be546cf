//! Durability: one write-ahead log per shard.
//!
//! What is logged: persistent sessions (client id, expiry, will,
//! subscriptions), their QoS 1/2 queues and what is in flight (packet ids,
//! PUBREL state), incoming QoS 2 packet ids awaiting PUBREL, and retained
//! messages (each in the log of its topic's owner shard). QoS 0 messages
//! and clean sessions never touch it.
//!
//! - `record`: the records and their frames (length, CRC32C, type).
//! - `log`: what a shard appends while it handles packets, and the epochs
//!   (group commit) that gate acknowledgements until they are durable.
//! - `snapshot`: live state as records (compaction, rewrites).
//! - `replay`: records back into sessions and retained messages.
//! - `disk`: the data directory at start-up (std::fs before any shard
//!   runs): recovery in parallel, torn tails, quarantine, re-homing when
//!   the shard count changed.
//!
//! The runtime writes the log (`runtime::wal`): never std::fs on a shard.
//! Invariant: an acknowledgement that promises durability (PUBACK/PUBREC
//! of a message with a persistent destination or the retain flag, PUBREL,
//! PUBCOMP, SUBACK and CONNACK of a persistent session) leaves only after
//! the records it depends on are durable.

pub mod disk;
pub mod log;
pub mod record;
pub mod replay;
pub mod snapshot;
#[cfg(test)]
mod tests;

/// Seconds since the Unix epoch (the wall clock, for times stored on disk).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
