//! Access control with a Mosquitto-format ACL file.

use crate::errors::write_config;
use crate::harness::{connect_packet, id_on, Broker, Raw};
use std::time::Duration;
use tarta_proto::mqtt::{Packet, Protocol, Publish, QoS};

const ACL: &str = "\
# anonymous clients
topic read public/#
topic write public/in
pattern readwrite clients/%c/#
user alice
topic readwrite secret/#
topic deny secret/hidden
";

fn sub(r: &mut Raw, filter: &str) -> u8 {
    r.subscribe_code(3, filter, QoS::AtLeastOnce)
}

fn publ(r: &mut Raw, topic: &str) -> Option<u8> {
    r.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic.into(),
        packet_id: 5,
        properties: Default::default(),
        payload: bytes::Bytes::from_static(b"x"),
    }));
    match r.recv() {
        Some(Packet::PubAck(a)) => Some(a.reason),
        _ => None,
    }
}

fn start() -> Broker {
    let path = write_config("");
    std::fs::write(&path, ACL).unwrap();
    Broker::start_with(&["--acl-file", &path])
}

#[test]
fn denied_subscribe_gets_0x80_and_denied_publish_is_dropped_v311() {
    let b = start();
    let (mut r, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V311, &id_on(1, "acl-r"), true, 0),
    );
    assert_eq!(sub(&mut r, "public/#"), 1);
    assert_eq!(sub(&mut r, "secret/#"), 0x80, "SUBACK failure (3.1.1)");
    assert_eq!(sub(&mut r, "#"), 0x80);
    let me = id_on(1, "acl-r");
    assert_eq!(
        sub(&mut r, &format!("clients/{me}/#")),
        1,
        "pattern with %c"
    );

    let (mut w, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V311, &id_on(0, "acl-w"), true, 0),
    );
    assert_eq!(publ(&mut w, "public/in"), Some(0));
    assert_eq!(
        publ(&mut w, "public/other"),
        Some(0),
        "3.1.1 has no negative PUBACK"
    );
    r.s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut got = Vec::new();
    while let Some(Packet::Publish(p)) = r.recv() {
        got.push(p.topic.to_string());
    }
    assert_eq!(got, vec!["public/in"], "the denied publish was dropped");
}

#[test]
fn v5_denials_carry_0x87_and_users_and_deny_rules_apply() {
    let b = start();
    let mut c = connect_packet(Protocol::V5, &id_on(0, "alice"), true, 0);
    c.username = Some("alice".into());
    let (mut alice, ack) = Raw::connect(b.port, c);
    assert_eq!(ack.code, 0);
    assert_eq!(
        sub(&mut alice, "public/#"),
        0x87,
        "alice's section replaces the anonymous one"
    );
    assert_eq!(sub(&mut alice, "secret/hidden"), 0x87, "deny wins");
    assert_eq!(
        sub(&mut alice, "secret/#"),
        1,
        "granted, deliveries filtered"
    );
    assert_eq!(publ(&mut alice, "public/in"), Some(0x87), "PUBACK 0x87");
    assert_eq!(publ(&mut alice, "secret/hidden"), Some(0x87));
    assert_eq!(publ(&mut alice, "secret/open"), Some(0));
    // The deny rule filters what secret/# delivers.
    alice
        .s
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut got = Vec::new();
    while let Some(p) = alice.recv() {
        if let Packet::Publish(p) = p {
            got.push(p.topic.to_string());
        }
    }
    assert_eq!(got, vec!["secret/open"]);
}
