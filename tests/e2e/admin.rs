//! The admin API: list clients (across shards), inspect one, disconnect
//! one, list retained topics (paged); refused without the bearer token;
//! off without `admin_token`.

use crate::harness::*;
use std::process::Command;
use std::time::Duration;
use tarta_proto::mqtt::{self, Packet, Protocol, QoS, SubOptions};

const TOKEN: &str = "test-admin-token-0123456789";

/// (status, JSON body) of `method path` with `token` as bearer.
fn call(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let (status, body) = http(port, method, path, token);
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

fn start(top: &str) -> (Broker, TempDir) {
    let d = TempDir::new("admin");
    let cfg = d.0.join("tarta.toml");
    std::fs::write(
        &cfg,
        format!(
            "{top}\n[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nbind = \"127.0.0.1:0\"\nprotocol = \"ws\"\n"
        ),
    )
    .unwrap();
    let b = Broker::start_bare(
        Command::new(env!("CARGO_BIN_EXE_tarta")),
        &["--config", cfg.to_str().unwrap()],
    );
    (b, d)
}

#[test]
fn list_inspect_disconnect_and_retained_pages() {
    let (b, _d) = start(&format!("admin_token = \"{TOKEN}\""));
    let ws = b.ws_port;
    let (a_id, b_id) = (id_on(0, "adm-a"), id_on(1, "adm-b"));
    let (mut a, _) = Raw::connect(b.port, connect_packet(Protocol::V5, &a_id, true, 30));
    a.send(&Packet::Subscribe(mqtt::Subscribe {
        packet_id: 1,
        filters: vec![(
            "x/#".into(),
            SubOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        )],
        properties: Default::default(),
    }));
    assert!(matches!(a.recv(), Some(Packet::SubAck(_))));
    let (mut bc, _) = WsRaw::connect(ws, connect_packet(Protocol::V311, &b_id, false, 30));
    for i in 0..5 {
        bc.send_frame(
            0x2,
            true,
            &encode(
                &Packet::Publish(mqtt::Publish {
                    dup: false,
                    qos: QoS::AtMostOnce,
                    retain: true,
                    topic: format!("r/{i}").as_str().into(),
                    packet_id: 0,
                    properties: Default::default(),
                    payload: bytes::Bytes::from_static(b"abc"),
                }),
                Protocol::V311,
            ),
        );
    }
    std::thread::sleep(Duration::from_millis(300));

    // Refused without the token, or with a wrong one.
    assert_eq!(call(ws, "GET", "/api/clients", None).0, 401);
    assert_eq!(
        call(ws, "GET", "/api/clients", Some("wrong-token-0123456789")).0,
        401
    );

    // Every client, from both shards.
    let (st, v) = call(ws, "GET", "/api/clients", Some(TOKEN));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["count"], 2, "{v}");
    let find = |id: &str| {
        v["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["client_id"] == id)
            .cloned()
            .unwrap()
    };
    let ca = find(&a_id);
    assert_eq!(
        (
            ca["shard"].as_u64(),
            ca["protocol"].as_str(),
            ca["transport"].as_str()
        ),
        (Some(0), Some("5.0"), Some("tcp"))
    );
    assert_eq!(ca["subscriptions"], 1);
    let cb = find(&b_id);
    assert_eq!(
        (
            cb["shard"].as_u64(),
            cb["transport"].as_str(),
            cb["persistent"].as_bool()
        ),
        (Some(1), Some("ws"), Some(true))
    );

    // Pages: one client at a time, in id order.
    let (mut ids, mut after) = (Vec::new(), String::new());
    loop {
        let (st, page) = call(
            ws,
            "GET",
            &format!("/api/clients?limit=1&after={after}"),
            Some(TOKEN),
        );
        assert_eq!(st, 200, "{page}");
        let got = page["clients"].as_array().unwrap();
        assert!(got.len() <= 1);
        if let Some(c) = got.first() {
            ids.push(c["client_id"].as_str().unwrap().to_string());
        }
        match page["next_after"].as_str() {
            Some(n) => after = n.to_string(),
            None => break,
        }
    }
    let mut want = vec![a_id.clone(), b_id.clone()];
    want.sort();
    assert_eq!(ids, want);

    // One client, with its subscriptions (asked of its home shard, from
    // whichever shard took the HTTP request).
    let (st, c) = call(ws, "GET", &format!("/api/clients/{a_id}"), Some(TOKEN));
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["filters"][0]["filter"], "x/#");
    assert_eq!(c["filters"][0]["qos"], 1);
    assert_eq!(call(ws, "GET", "/api/clients/nobody", Some(TOKEN)).0, 404);

    // Disconnect: the 5.0 client hears 0x98 (administrative action).
    let (st, r) = call(
        ws,
        "POST",
        &format!("/api/clients/{a_id}/disconnect"),
        Some(TOKEN),
    );
    assert_eq!(st, 200, "{r}");
    let (got, closed) = a.until_closed(Duration::from_secs(5));
    assert!(has_disconnect(&got, 0x98), "{got:?}");
    assert!(closed);
    assert_eq!(
        call(ws, "GET", &format!("/api/clients/{a_id}"), Some(TOKEN)).0,
        404
    );
    assert_eq!(
        call(ws, "POST", "/api/clients/nobody/disconnect", Some(TOKEN)).0,
        404
    );
    assert_eq!(call(ws, "DELETE", "/api/clients", Some(TOKEN)).0, 405);

    // Retained topics, two at a time, in order.
    let (st, p1) = call(
        ws,
        "GET",
        "/api/retained?filter=r%2F%23&limit=2",
        Some(TOKEN),
    );
    assert_eq!(st, 200, "{p1}");
    let topics = |p: &serde_json::Value| -> Vec<String> {
        p["topics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["topic"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(topics(&p1), ["r/0", "r/1"]);
    assert_eq!(p1["topics"][0]["payload_bytes"], 3);
    assert_eq!(p1["next_after"], "r/1");
    let (_, p2) = call(
        ws,
        "GET",
        "/api/retained?filter=r%2F%23&limit=2&after=r%2F1",
        Some(TOKEN),
    );
    assert_eq!(topics(&p2), ["r/2", "r/3"]);
    let (_, p3) = call(
        ws,
        "GET",
        "/api/retained?filter=r%2F%23&limit=2&after=r%2F3",
        Some(TOKEN),
    );
    assert_eq!(topics(&p3), ["r/4"]);
    assert!(p3["next_after"].is_null());
    assert_eq!(
        call(ws, "GET", "/api/retained?filter=a%2B", Some(TOKEN)).0,
        400
    );
    assert!(sys_counter(b.port, "admin_refused") >= 2);
}

#[test]
fn the_admin_api_is_off_without_a_token() {
    let (b, _d) = start("");
    assert_eq!(call(b.ws_port, "GET", "/api/clients", Some(TOKEN)).0, 404);
}
