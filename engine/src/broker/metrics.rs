//! Per-shard counters. Plain `Cell`s: a shard's counters are touched only by
//! its own thread. Published as `$SYS/tarta/shard/{id}/{name}`.

use std::cell::Cell;

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        #[derive(Default)]
        pub struct Metrics { $(#[doc = $doc] pub $name: Cell<u64>,)* }
        impl Metrics {
            /// (name, value) of every counter.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.get()),)*]
            }
        }
    };
}

counters! {
    connections_accepted: "TCP connections accepted on this shard.",
    connections_current: "Connections currently open on this shard.",
    connections_handed_off: "Connections moved to their client id's home shard.",
    closed_bad_input: "Connections closed for malformed packets or protocol errors.",
    closed_keepalive: "Connections closed for keep-alive or CONNECT timeout.",
    refused_fd_limit: "Connections refused because the process ran out of file descriptors.",
    messages_received: "PUBLISH packets received from clients.",
    messages_sent: "PUBLISH packets queued to clients.",
    qos0_dropped: "QoS 0 messages dropped under overload (slow client or full mesh queue).",
    expired_or_oversize: "Deliveries discarded: message expired, or larger than the client's maximum packet size.",
    queue_dropped: "QoS 1/2 messages dropped because a session's queue bound was reached.",
    share_undeliverable: "Messages for a shared subscription whose members all went away.",
    acl_denied: "PUBLISH and SUBSCRIBE requests denied by the ACL.",
    sessions: "Sessions (online and offline) homed on this shard.",
    route_cache_hits: "Publishes routed from the route cache (no topic-index walk).",
    ws_upgrades: "WebSocket handshakes completed.",
    ws_rejected: "WebSocket handshakes refused with an HTTP error status.",
    http_health: "GET /health requests answered on WebSocket ports.",
    tls_handshakes: "TLS handshakes completed.",
    tls_failed: "TLS connections closed for a failed handshake or a TLS error (bad ClientHello, plain client on a TLS port, unknown or expired client certificate, bad record).",
    proxy_untrusted: "Connections closed on a PROXY protocol listener because the peer is not in trusted_proxies.",
    proxy_malformed: "Connections closed for a malformed or missing PROXY protocol header.",
    auth_failed: "Logins refused for an unknown user or a wrong password (CONNACK 0x04 / 0x86).",
    auth_anonymous_refused: "Logins refused for missing credentials where they are required (CONNACK 0x05 / 0x87).",
    limit_connections: "Connections refused: max_connections (all listeners) reached.",
    limit_address_connections: "Connections refused: max_connections_per_address reached for the client's address.",
    limit_address_rate: "Connections refused: the client's address opened more than connection_rate_per_address per second (beyond its burst).",
    limit_client_id: "CONNECTs refused: client id longer than max_client_id_length.",
    limit_subscriptions: "SUBSCRIBE filters refused: the client has max_subscriptions_per_client.",
    limit_topic: "PUBLISH topics and SUBSCRIBE filters refused: more than max_topic_levels levels or max_topic_length bytes.",
    publish_rate_dropped: "QoS 0 messages dropped: the client published beyond max_publish_rate or max_publish_bytes_rate.",
    publish_rate_paused: "Times a QoS 1/2 publisher was paused (not read) for publishing beyond its rate.",
    refused_listener_full: "Connections refused because their listener reached max_connections.",
    refused_storage: "QoS 1/2 publishes refused (5.0: reason 0x97; 3.x: closed without the acknowledgement) while the log could not be written.",
    log_commits: "Write-ahead log batches made durable (one write, and one fdatasync with fsync = always, each).",
    log_bytes: "Bytes written to the write-ahead log.",
    log_write_errors: "Failed write-ahead log writes or syncs (retried every second; nothing acknowledged meanwhile).",
    log_compactions: "Write-ahead log snapshots written (older segments deleted).",
    log_quarantined: "Log segments moved aside or records skipped as corrupt at start-up.",
}

impl Metrics {
    pub fn inc(c: &Cell<u64>) {
        c.set(c.get() + 1);
    }
    pub fn dec(c: &Cell<u64>) {
        c.set(c.get().saturating_sub(1));
    }
}
