//! Per-shard counters and gauges. Only the shard's own thread writes them
//! (a relaxed load and store: no locked instruction on the hot path); any
//! thread may read them, so a scrape sums every shard's values without
//! asking the shards. Published as `$SYS/tarta/shard/{id}/{name}` and as
//! Prometheus metrics `tarta_{name}` (counters with `_total`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// One value, written by one thread, read by any.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
    /// Only from the owning shard's thread.
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed)
    }
    /// Only from the owning shard's thread.
    pub fn add(&self, n: u64) {
        self.set(self.get().wrapping_add(n))
    }
}

/// Upper bounds (microseconds) of the log sync histogram's buckets.
pub const SYNC_BUCKETS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// Counters only go up; gauges go up and down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

macro_rules! metrics {
    ($($kind:ident $name:ident: $doc:literal),* $(,)?) => {
        #[derive(Debug, Default)]
        pub struct Metrics {
            $(#[doc = $doc] pub $name: Counter,)*
            /// Connections closed, by `CloseReason::label`.
            pub closed: [Counter; 12],
            /// PUBLISH received from clients, by QoS.
            pub received_qos: [Counter; 3],
            /// PUBLISH sent to clients, by QoS.
            pub sent_qos: [Counter; 3],
            /// Write-ahead log syncs (the O_DSYNC write with fsync = always,
            /// fdatasync with interval), by duration: `SYNC_BUCKETS_US`.
            pub sync_buckets: [Counter; SYNC_BUCKETS_US.len()],
            pub sync_count: Counter,
            pub sync_sum_us: Counter,
        }
        impl Metrics {
            /// (name, value) of every metric.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.get()),)*]
            }
            /// (name, kind, help) of every metric, in order.
            pub const DESCRIPTORS: &'static [(&'static str, Kind, &'static str)] =
                &[$((stringify!($name), metrics!(@kind $kind), $doc),)*];
        }
    };
    (@kind counter) => { Kind::Counter };
    (@kind gauge) => { Kind::Gauge };
}

metrics! {
    counter connections_accepted: "TCP connections accepted on this shard.",
    gauge connections_current: "Connections currently open on this shard.",
    counter connections_handed_off: "Connections moved to their client id's home shard.",
    counter closed_bad_input: "Connections closed for malformed packets or protocol errors.",
    counter closed_keepalive: "Connections closed for keep-alive or CONNECT timeout.",
    counter refused_fd_limit: "Connections refused because the process ran out of file descriptors.",
    counter messages_received: "PUBLISH packets received from clients.",
    counter messages_sent: "PUBLISH packets queued to clients.",
    counter qos0_dropped: "QoS 0 messages dropped under overload (slow client or full mesh queue).",
    counter expired_or_oversize: "Deliveries discarded: message expired, or larger than the client's maximum packet size.",
    counter queue_dropped: "QoS 1/2 messages dropped because a session's queue bound was reached.",
    counter share_undeliverable: "Messages for a shared subscription whose members all went away.",
    counter acl_denied: "PUBLISH and SUBSCRIBE requests denied by the ACL.",
    gauge sessions: "Sessions (online and offline) homed on this shard.",
    gauge sessions_online: "Sessions with a connection (refreshed every sys_interval).",
    gauge subscriptions: "Subscriptions of this shard's sessions (shared subscriptions not included).",
    gauge retained: "Retained messages (every shard holds them all).",
    gauge queued: "QoS 1/2 messages queued or in flight for this shard's sessions (refreshed every sys_interval).",
    counter packets_received: "MQTT packets received from clients.",
    counter mesh_batches: "Batches sent to other shards over the mesh.",
    counter mesh_messages: "Messages (publishes, routes, barriers, handoffs...) sent to other shards over the mesh.",
    counter mesh_full: "Times a batch could not be sent because the queue to another shard was full (the sender holds back and retries).",
    counter packets_sent: "MQTT packets queued to clients.",
    counter bytes_received: "Bytes read from client sockets (before TLS and WebSocket decoding).",
    counter bytes_sent: "Bytes written to client sockets.",
    counter route_cache_hits: "Publishes routed from the route cache (no topic-index walk).",
    counter ws_upgrades: "WebSocket handshakes completed.",
    counter ws_rejected: "WebSocket handshakes refused with an HTTP error status.",
    counter http_health: "GET /health requests answered on WebSocket ports.",
    counter http_requests: "Other HTTP requests answered (GET /metrics, the admin API, unknown paths: 404).",
    counter admin_refused: "Admin API requests refused for a missing or wrong bearer token.",
    counter tls_handshakes: "TLS handshakes completed.",
    counter tls_failed: "TLS connections closed for a failed handshake or a TLS error (bad ClientHello, plain client on a TLS port, unknown or expired client certificate, bad record).",
    counter proxy_untrusted: "Connections closed on a PROXY protocol listener because the peer is not in trusted_proxies.",
    counter proxy_malformed: "Connections closed for a malformed or missing PROXY protocol header.",
    counter auth_failed: "Logins refused for an unknown user or a wrong password (CONNACK 0x04 / 0x86).",
    counter auth_anonymous_refused: "Logins refused for missing credentials where they are required (CONNACK 0x05 / 0x87).",
    counter limit_connections: "Connections refused: max_connections (all listeners) reached.",
    counter limit_address_connections: "Connections refused: max_connections_per_address reached for the client's address.",
    counter limit_address_rate: "Connections refused: the client's address opened more than connection_rate_per_address per second (beyond its burst).",
    counter limit_client_id: "CONNECTs refused: client id longer than max_client_id_length.",
    counter limit_subscriptions: "SUBSCRIBE filters refused: the client has max_subscriptions_per_client.",
    counter limit_topic: "PUBLISH topics and SUBSCRIBE filters refused: more than max_topic_levels levels or max_topic_length bytes.",
    counter publish_rate_dropped: "QoS 0 messages dropped: the client published beyond max_publish_rate or max_publish_bytes_rate.",
    counter publish_rate_paused: "Times a QoS 1/2 publisher was paused (not read) for publishing beyond its rate.",
    counter refused_listener_full: "Connections refused because their listener reached max_connections.",
    counter refused_storage: "QoS 1/2 publishes refused (5.0: reason 0x97; 3.x: closed without the acknowledgement) while the log could not be written.",
    counter log_commits: "Write-ahead log batches made durable (one write, and one fdatasync with fsync = always, each).",
    counter log_bytes: "Bytes written to the write-ahead log.",
    counter log_write_errors: "Failed write-ahead log writes or syncs (retried every second; nothing acknowledged meanwhile).",
    counter log_compactions: "Write-ahead log snapshots written (older segments deleted).",
    counter log_quarantined: "Log segments moved aside or records skipped as corrupt at start-up.",
}

thread_local! {
    /// Counted where no shard is at hand (the write queue, the socket
    /// writer): packets and bytes sent by this thread's shard, moved into
    /// its `Metrics` every second (`absorb_local`).
    static LOCAL: [std::cell::Cell<u64>; 2] = const { [const { std::cell::Cell::new(0) }; 2] };
}

/// A thread-local count (see `LOCAL`).
#[derive(Debug, Clone, Copy)]
pub enum Local {
    PacketsSent = 0,
    BytesSent = 1,
}

pub fn count_local(which: Local, n: u64) {
    LOCAL.with(|l| {
        let c = &l[which as usize];
        c.set(c.get().wrapping_add(n));
    });
}

impl Metrics {
    /// Takes this thread's local counts into the shard's metrics.
    pub fn absorb_local(&self) {
        LOCAL.with(|l| {
            self.packets_sent
                .add(l[Local::PacketsSent as usize].replace(0));
            self.bytes_sent.add(l[Local::BytesSent as usize].replace(0));
        });
    }

    /// One log sync that took `us` microseconds.
    pub fn observe_sync(&self, us: u64) {
        if let Some(i) = SYNC_BUCKETS_US.iter().position(|b| us <= *b) {
            self.sync_buckets[i].add(1);
        }
        self.sync_count.add(1);
        self.sync_sum_us.add(us);
    }

    pub fn inc(c: &Counter) {
        c.add(1);
    }
    pub fn dec(c: &Counter) {
        c.set(c.get().saturating_sub(1));
    }
}
