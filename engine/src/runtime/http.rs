//! Plain HTTP on WebSocket and HTTP listeners: `GET /metrics` (Prometheus)
//! and the admin API (`/api/...`, JSON, with a bearer token). (`GET
//! /health` is answered by the handshake itself.) A request is answered
//! and the connection closed; nothing here blocks a shard: the scrape reads
//! every shard's atomics and /proc on the shard's blocking thread, and an
//! admin question goes to the shards over the mesh (`broker::admin`) while
//! this connection waits.

use super::Rt;
use crate::broker::admin::{AdminQuery, AdminReply, ClientInfo};
use crate::broker::metrics::Metrics;
use crate::exporter::{self, ListenerStat, Sources};
use serde_json::json;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
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
                bridges: {
                    let all = rt.shard.bridges.borrow().clone();
                    let now = rt.shard.now.get();
                    rt.shard
                        .cfg
                        .bridges
                        .iter()
                        .zip(all.status.iter())
                        .map(|(b, s)| exporter::BridgeStat::of(&b.name, s, now))
                        .collect()
                },
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
        "/" | "/index.html"
            if rt.shard.cfg.dashboard && ep.cfg.protocol == crate::config::ListenProtocol::Ws =>
        {
            Reply::Now(200, dashboard(&ep.cfg.ws.path))
        }
        p if p.starts_with("/api/") && ep.cfg.metrics => admin(rt, req),
        _ => {
            if ep.cfg.protocol == crate::config::ListenProtocol::Ws {
                // On a WebSocket port, a request for another path is a
                // refused handshake as far as the counters go.
                Metrics::inc(&rt.shard.metrics.ws_rejected);
            }
            text(404, "no such path\n")
        }
    }
}

/// The dashboard page, pointed at this listener's WebSocket path (relative,
/// so that it works under a reverse proxy's prefix).
fn dashboard(ws_path: &str) -> Vec<u8> {
    const PAGE: &str = include_str!("dashboard.html");
    let rel = ws_path.trim_start_matches('/');
    let page = PAGE.replace("__WS_PATH__", &rel.replace(['"', '\\', '<'], ""));
    let csp = "Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; \
               style-src 'unsafe-inline'; connect-src 'self' ws: wss:; img-src 'self' data:\r\n\
               X-Content-Type-Options: nosniff\r\n";
    http_response(200, "text/html; charset=utf-8", csp, page.as_bytes())
}

fn json_reply(status: u16, v: &serde_json::Value) -> (u16, Vec<u8>) {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    (status, http_response(status, "application/json", "", &body))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `%XX` and `+` decoding of a path segment or query value.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(q: &str, key: &str) -> Option<String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| decode(v))
}

/// The admin API: off (404) without `admin_token`; 401 without it.
fn admin(rt: &Rt, req: &HttpRequest) -> Reply {
    let Some(token) = rt.shard.cfg.admin_token.as_deref() else {
        return text(
            404,
            "no such path (the admin API is off: set admin_token)\n",
        );
    };
    let given = req
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
        Metrics::inc(&rt.shard.metrics.admin_refused);
        let body = b"{\"error\": \"missing or wrong bearer token\"}\n";
        return Reply::Now(
            401,
            http_response(
                401,
                "application/json",
                "WWW-Authenticate: Bearer realm=\"tarta\"\r\n",
                body,
            ),
        );
    }
    let parts: Vec<&str> = req.path.trim_end_matches('/').split('/').skip(2).collect();
    let method = req.method.as_str();
    let all: Vec<usize> = (0..rt.shard.n).collect();
    let (q, shards) = match (method, parts.as_slice()) {
        ("GET", ["clients"]) => {
            let limit = query_param(&req.query, "limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(1000usize)
                .clamp(1, 10_000);
            let after = query_param(&req.query, "after").unwrap_or_default();
            (AdminQuery::Clients { after, limit }, all)
        }
        ("GET", ["clients", id]) => {
            let id = decode(id);
            let home = rt.shard.home_of(&id);
            (AdminQuery::Client(id), vec![home])
        }
        ("POST", ["clients", id, "disconnect"]) => {
            let id = decode(id);
            let home = rt.shard.home_of(&id);
            (AdminQuery::Disconnect(id), vec![home])
        }
        ("GET", ["retained"]) => {
            let limit = query_param(&req.query, "limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(100usize)
                .clamp(1, 1000);
            let q = AdminQuery::Retained {
                filter: query_param(&req.query, "filter").unwrap_or_else(|| "#".into()),
                after: query_param(&req.query, "after").unwrap_or_default(),
                limit,
            };
            // Every shard holds every retained message: this one answers.
            (q, vec![rt.shard.id])
        }
        (_, ["clients"] | ["clients", _] | ["clients", _, "disconnect"] | ["retained"]) => {
            return text(405, "method not allowed\n");
        }
        _ => return text(404, "no such API path\n"),
    };
    if let AdminQuery::Retained { filter, .. } = &q {
        if tarta_proto::topic::TopicFilter::new(filter.as_str().into()).is_err() {
            let (status, bytes) = json_reply(400, &json!({"error": "invalid topic filter"}));
            return Reply::Now(status, bytes);
        }
    }
    let shard = &rt.shard;
    let seq = shard.admin_seq.get() + 1;
    shard.admin_seq.set(seq);
    let id = (seq << 10) | shard.id as u64;
    let local = shards.contains(&shard.id).then(|| shard.admin_answer(&q));
    shard.admin_ask(id, &q, &shards, local);
    let waits = shard.admin_waits.clone();
    let names: Vec<&'static str> = rt.endpoints.iter().map(|e| e.cfg.name()).collect();
    Reply::Later(Box::pin(async move {
        let got = glommio::timer::timeout(Duration::from_secs(5), async {
            std::future::poll_fn(|cx| {
                let mut w = waits.borrow_mut();
                match w.get_mut(&id) {
                    Some(e) if e.waiting > 0 => {
                        e.waker = Some(cx.waker().clone());
                        std::task::Poll::Pending
                    }
                    _ => std::task::Poll::Ready(()),
                }
            })
            .await;
            Ok(())
        })
        .await;
        let replies = waits
            .borrow_mut()
            .remove(&id)
            .map(|w| w.replies)
            .unwrap_or_default();
        if got.is_err() {
            return json_reply(503, &json!({"error": "a shard did not answer in time"}));
        }
        render(q, replies, &names)
    }))
}

fn render(q: AdminQuery, replies: Vec<AdminReply>, names: &[&'static str]) -> (u16, Vec<u8>) {
    let client = |c: &ClientInfo| {
        let mut v = json!({
            "client_id": c.client_id,
            "username": c.username,
            "connected": c.connected,
            "peer": c.peer,
            "protocol": c.protocol,
            "transport": c.listener.and_then(|l| names.get(usize::from(l)).copied()),
            "shard": c.shard,
            "connected_for_secs": c.connected_for,
            "persistent": c.persistent,
            "subscriptions": c.subscriptions,
            "queued": c.queued,
            "inflight": c.inflight,
        });
        if let AdminQuery::Client(_) = q {
            v["filters"] = json!(c
                .filters
                .iter()
                .map(|(f, qos)| json!({"filter": f, "qos": qos}))
                .collect::<Vec<_>>());
        }
        v
    };
    match &q {
        AdminQuery::Clients { limit, .. } => {
            // Each shard sent its first `limit`: the page is the first
            // `limit` of them all.
            let mut all: Vec<&ClientInfo> = replies
                .iter()
                .flat_map(|r| match r {
                    AdminReply::Clients(v) => v.iter().collect(),
                    _ => Vec::new(),
                })
                .collect();
            all.sort_by(|a, b| a.client_id.cmp(&b.client_id));
            let more = all.len() > *limit;
            all.truncate(*limit);
            let next = more
                .then(|| all.last().map(|c| c.client_id.clone()))
                .flatten();
            let list: Vec<_> = all.iter().map(|c| client(c)).collect();
            json_reply(
                200,
                &json!({"count": list.len(), "clients": list, "next_after": next}),
            )
        }
        AdminQuery::Client(id) => match replies.iter().find_map(|r| match r {
            AdminReply::Client(Some(c)) => Some(c),
            _ => None,
        }) {
            Some(c) => json_reply(200, &client(c)),
            None => json_reply(404, &json!({"error": "no such client", "client_id": id})),
        },
        AdminQuery::Disconnect(id) => {
            let done = replies
                .iter()
                .any(|r| matches!(r, AdminReply::Disconnected(true)));
            if done {
                json_reply(200, &json!({"disconnected": true, "client_id": id}))
            } else {
                json_reply(
                    404,
                    &json!({"error": "no such connected client", "client_id": id}),
                )
            }
        }
        AdminQuery::Retained { limit, .. } => {
            let topics: Vec<(String, usize)> = replies
                .into_iter()
                .flat_map(|r| match r {
                    AdminReply::Retained(v) => v,
                    _ => Vec::new(),
                })
                .collect();
            let next = (topics.len() == *limit)
                .then(|| topics.last().map(|t| t.0.clone()))
                .flatten();
            let list: Vec<_> = topics
                .iter()
                .map(|(t, n)| json!({"topic": t, "payload_bytes": n}))
                .collect();
            json_reply(200, &json!({"topics": list, "next_after": next}))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_and_query_parameters() {
        assert_eq!(decode("a%2Fb+c%zz%4"), "a/b c%zz%4");
        assert_eq!(
            query_param("filter=s%2F%23&limit=5", "filter").as_deref(),
            Some("s/#")
        );
        assert_eq!(query_param("a&limit=5", "limit").as_deref(), Some("5"));
        assert_eq!(query_param("a=1", "b"), None);
    }
}
