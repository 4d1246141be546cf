//! Bad input: the offender gets a clear answer and is closed; nobody else
//! is affected.

use crate::harness::{connect_packet, has_disconnect, id_on, rq, sys_counter, Broker, Raw};
use rumqttc::QoS;
use std::time::Duration;
use tarta_proto::mqtt::{Packet, Protocol};

const T: Duration = Duration::from_secs(5);

/// A healthy pair on both shards, used to show others are unaffected.
async fn healthy(b: &Broker) -> (rq::Client, rq::Client) {
    let mut sub = rq::connect(rq::opts(b.port, &id_on(1, "healthy-sub"))).await;
    sub.subscribe("healthy/t", QoS::AtLeastOnce).await;
    let publ = rq::connect(rq::opts(b.port, &id_on(0, "healthy-pub"))).await;
    (sub, publ)
}

async fn still_healthy(sub: &mut rq::Client, publ: &rq::Client, n: u32) {
    publ.client
        .publish("healthy/t", QoS::AtLeastOnce, false, format!("m{n}"))
        .await
        .unwrap();
    let p = sub.next_publish(T).await.expect("others unaffected");
    assert_eq!(&p.payload[..], format!("m{n}").as_bytes());
}

#[tokio::test]
async fn malformed_packets_close_only_the_offender() {
    let b = Broker::start();
    let (mut sub, publ) = healthy(&b).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("reserved packet type 0", vec![0x00, 0x00]),
        (
            "PUBLISH QoS 3",
            vec![0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01],
        ),
        (
            "bad SUBSCRIBE flags",
            vec![0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
        ),
        (
            "remaining length over 4 bytes",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        (
            "invalid UTF-8 topic",
            vec![0x30, 0x04, 0x00, 0x02, 0xc3, 0x28],
        ),
        (
            "wildcard in topic name",
            vec![0x30, 0x05, 0x00, 0x03, b'a', b'/', b'#'],
        ),
        ("second CONNECT", {
            let mut v = Vec::new();
            let mut bm = bytes::BytesMut::new();
            tarta_proto::mqtt::encode(
                &Packet::Connect(Box::new(connect_packet(Protocol::V311, "x", true, 0))),
                Protocol::V311,
                &mut bm,
            );
            v.extend_from_slice(&bm);
            v
        }),
    ];
    for (n, (what, bytes)) in cases.iter().enumerate() {
        let (mut bad, _) = Raw::connect(
            b.port,
            connect_packet(Protocol::V311, &id_on(n % 2, "bad"), true, 0),
        );
        bad.send_bytes(bytes);
        let (_, closed) = bad.until_closed(T);
        assert!(closed, "{what}: offender closed");
        still_healthy(&mut sub, &publ, n as u32).await;
    }
    assert!(sys_counter(b.port, "closed_bad_input") >= cases.len() as u64);
    assert!(b.log().contains("bad input"), "a log line names the reason");
}

#[test]
fn first_packet_must_be_connect() {
    let b = Broker::start();
    let mut r = Raw::open(b.port);
    r.send(&Packet::PingReq);
    assert!(r.until_closed(T).1, "MQTT-3.1.0-1");
}

#[test]
fn unsupported_protocol_level_gets_connack_0x01() {
    let b = Broker::start();
    let mut r = Raw::open(b.port);
    // CONNECT "MQTT" level 6.
    r.send_bytes(&[
        0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x06, 0x02, 0x00, 0x3c, 0x00, 0x00,
    ]);
    let (seen, closed) = r.until_closed(T);
    assert!(closed);
    assert!(
        matches!(seen.first(), Some(Packet::ConnAck(a)) if a.code == 0x01),
        "MQTT-3.1.2-2: {seen:?}"
    );
}

#[test]
fn oversized_packet_is_refused_before_its_body_arrives() {
    let b = Broker::start_with(&[]);
    let (mut r, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V5, &id_on(0, "huge"), true, 0),
    );
    // A PUBLISH announcing 200 MB; only the fixed header is sent.
    r.send_bytes(&[0x30, 0x80, 0x80, 0xe8, 0x5f]);
    let (seen, closed) = r.until_closed(T);
    assert!(closed, "closed without waiting for 200 MB");
    assert!(has_disconnect(&seen, 0x95), "{seen:?}");
}

#[test]
fn connect_timeout_closes_silent_sockets() {
    let b = Broker::start_with(&["--config", &write_config("connect_timeout = 1\n")]);
    let mut r = Raw::open(b.port);
    assert!(r.until_closed(Duration::from_secs(5)).1);
}

pub fn write_config(text: &str) -> String {
    let p = std::env::temp_dir().join(format!("tarta-e2e-{}.toml", crate::harness::rand_u64()));
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}
