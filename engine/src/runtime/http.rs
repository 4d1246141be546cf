//! Plain HTTP on WebSocket and HTTP listeners: `GET /metrics` (Prometheus).
//! (`GET /health` is answered by the handshake itself.) A request is
//! answered and the connection closed; nothing here blocks a shard: the
//! scrape reads every shard's atomics and /proc on the shard's blocking
//! thread.

use super::Rt;
use crate::broker::metrics::Metrics;
use crate::exporter::{self, ListenerStat, Sources};
use std::future::Future;
use std::pin::Pin;
use tarta_proto::ws::{http_response, HttpRequest};

/// The response: (status, bytes to send), now or once computed.
pub enum Reply {
    Now(u16, Vec<u8>),
    Later(Pin<Box<dyn Future<Output = (u16, Vec<u8>)>>>),
}

fn text(status: u16, body: &str) -> Reply {
    Reply::Now(
        status,
        http_response(status, "text/plain", "", body.as_bytes()),
    )
}

/// Answers one request that arrived on listener `listener`.
pub fn serve(rt: &Rt, listener: u16, req: &HttpRequest) -> Reply {
    Metrics::inc(&rt.shard.metrics.http_requests);
    let ep = &rt.endpoints[usize::from(listener)];
    match req.path.as_str() {
        "/metrics" if ep.cfg.metrics => {
            if req.method != "GET" {
                return Reply::Now(
                    405,
                    http_response(405, "text/plain", "Allow: GET\r\n", b"only GET\n"),
                );
            }
            let sources = Sources {
                shards: rt.metrics.clone(),
                listeners: rt
                    .endpoints
                    .iter()
                    .map(|e| ListenerStat {
                        addr: e.addr.to_string(),
                        transport: e.cfg.name(),
                        open: e.open_now() as u64,
                    })
                    .collect(),
                log_dropped: crate::logging::dropped_lines(),
                version: env!("CARGO_PKG_VERSION"),
            };
            Reply::Later(Box::pin(async move {
                let body = glommio::executor()
                    .spawn_blocking(move || exporter::render(sources))
                    .await;
                (
                    200,
                    http_response(200, exporter::CONTENT_TYPE, "", body.as_bytes()),
                )
            }))
        }
        _ => text(404, "no such path\n"),
    }
}
