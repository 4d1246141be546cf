//! Sessions: persistent queueing, redelivery with DUP, take-over across
//! shards, wills, client ids, keep-alive.

use crate::harness::{connect_packet, has_disconnect, id_on, rq, Broker, Raw};
use rumqttc::{LastWill, QoS};
use std::time::{Duration, Instant};
use tarta_proto::mqtt::{Packet, Protocol, Publish, QoS as Q, SubOptions, Subscribe};

const T: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(500);

fn subscribe(r: &mut Raw, filter: &str, qos: Q) {
    r.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            filter.into(),
            SubOptions {
                qos,
                ..Default::default()
            },
        )],
        properties: Default::default(),
    }));
    match r.recv() {
        Some(Packet::SubAck(a)) => assert_eq!(a.codes, vec![qos as u8]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

fn publish(r: &mut Raw, topic: &str, qos: Q, pid: u16, payload: &'static [u8]) {
    r.send(&Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: pid,
        properties: Default::default(),
        payload: bytes::Bytes::from_static(payload),
    }));
}

#[tokio::test]
async fn persistent_session_queues_while_offline_and_resumes() {
    let b = Broker::start();
    let id = id_on(1, "persist");
    let mut o = rq::opts(b.port, &id);
    o.set_clean_session(false);
    let mut sub = rq::connect(o.clone()).await;
    sub.subscribe("persist/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let mut publ = rq::connect(rq::opts(b.port, &id_on(0, "persist-pub"))).await;
    for i in 0..3 {
        publ.client
            .publish(format!("persist/{i}"), QoS::AtLeastOnce, false, "q")
            .await
            .unwrap();
        publ.wait_ack().await;
    }
    publ.client
        .publish("persist/qos0", QoS::AtMostOnce, false, "dropped")
        .await
        .unwrap();
    tokio::time::sleep(QUIET).await;

    // Back: session present, the three QoS 1 messages, not the QoS 0 one.
    let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
    let mut present = None;
    let mut topics = Vec::new();
    let deadline = Instant::now() + T;
    while Instant::now() < deadline && topics.len() < 3 {
        match tokio::time::timeout(T, el.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)))) => {
                present = Some(a.session_present)
            }
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => topics.push(p.topic),
            Ok(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(present, Some(true));
    assert_eq!(topics, vec!["persist/0", "persist/1", "persist/2"]);
    drop(client);
}

#[test]
fn clean_session_discards_state() {
    let b = Broker::start();
    let id = id_on(0, "clean");
    let (mut r, ack) = Raw::connect(b.port, connect_packet(Protocol::V311, &id, false, 0));
    assert!(!ack.session_present);
    subscribe(&mut r, "clean/t", Q::AtLeastOnce);
    drop(r);
    std::thread::sleep(QUIET);
    let (_r, ack) = Raw::connect(b.port, connect_packet(Protocol::V311, &id, false, 0));
    assert!(ack.session_present, "persistent session kept");
    drop(_r);
    std::thread::sleep(QUIET);
    let (_r, ack) = Raw::connect(b.port, connect_packet(Protocol::V311, &id, true, 0));
    assert!(
        !ack.session_present,
        "clean session 1 starts afresh (MQTT-3.2.2-1)"
    );
    drop(_r);
    std::thread::sleep(QUIET);
    let (_r, ack) = Raw::connect(b.port, connect_packet(Protocol::V311, &id, false, 0));
    assert!(!ack.session_present, "the clean session was not kept");
}

#[test]
fn unacknowledged_messages_are_redelivered_with_dup_on_reconnect() {
    let b = Broker::start();
    let id = id_on(1, "dup");
    let (mut sub, _) = Raw::connect(b.port, connect_packet(Protocol::V311, &id, false, 0));
    subscribe(&mut sub, "dup/1", Q::AtLeastOnce);
    subscribe(&mut sub, "dup/2", Q::ExactlyOnce);
    let (mut publ, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V311, &id_on(0, "dup-pub"), true, 0),
    );
    publish(&mut publ, "dup/1", Q::AtLeastOnce, 1, b"one");
    publish(&mut publ, "dup/2", Q::ExactlyOnce, 2, b"two");
    let first: Vec<Publish> = (0..2)
        .map(|_| match sub.recv() {
            Some(Packet::Publish(p)) => p,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(first.iter().all(|p| !p.dup));
    drop(sub); // no PUBACK, no PUBREC
    std::thread::sleep(QUIET);
    let (mut sub, ack) = Raw::connect(b.port, connect_packet(Protocol::V311, &id, false, 0));
    assert!(ack.session_present);
    let again: Vec<Publish> = (0..2)
        .map(|_| match sub.recv() {
            Some(Packet::Publish(p)) => p,
            other => panic!("{other:?}"),
        })
        .collect();
    for (a, b) in first.iter().zip(&again) {
        assert!(b.dup, "MQTT-3.3.1-1: redelivery has DUP set");
        assert_eq!(
            (a.packet_id, &a.topic, &a.payload),
            (b.packet_id, &b.topic, &b.payload)
        );
    }
    // Finish the QoS 2 handshake; PUBREL is resent after a reconnect too.
    let pid2 = again[1].packet_id;
    sub.send(&Packet::PubRec(tarta::session::ack(pid2, 0)));
    match sub.recv() {
        Some(Packet::PubRel(a)) => assert_eq!(a.packet_id, pid2),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    drop(sub);
    std::thread::sleep(QUIET);
    let (mut sub, _) = Raw::connect(b.port, connect_packet(Protocol::V311, &id, false, 0));
    let mut rest = Vec::new();
    sub.s
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    while let Some(p) = sub.recv() {
        rest.push(p);
    }
    assert!(
        rest.iter()
            .any(|p| matches!(p, Packet::PubRel(a) if a.packet_id == pid2)),
        "{rest:?}"
    );
    assert!(
        !rest
            .iter()
            .any(|p| matches!(p, Packet::Publish(x) if x.qos == Q::ExactlyOnce)),
        "no QoS 2 PUBLISH after PUBREC"
    );
}

#[test]
fn qos2_inbound_is_exactly_once_even_when_the_publisher_resends() {
    let b = Broker::start();
    let (mut sub, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V311, &id_on(1, "eo-sub"), true, 0),
    );
    subscribe(&mut sub, "eo/t", Q::ExactlyOnce);
    let (mut publ, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V311, &id_on(0, "eo-pub"), true, 0),
    );
    publish(&mut publ, "eo/t", Q::ExactlyOnce, 9, b"once");
    assert!(matches!(publ.recv(), Some(Packet::PubRec(a)) if a.packet_id == 9));
    // The same packet again (DUP) before PUBREL: acknowledged, not routed again.
    publish(&mut publ, "eo/t", Q::ExactlyOnce, 9, b"once");
    assert!(matches!(publ.recv(), Some(Packet::PubRec(a)) if a.packet_id == 9));
    publ.send(&Packet::PubRel(tarta::session::ack(9, 0)));
    assert!(matches!(publ.recv(), Some(Packet::PubComp(a)) if a.packet_id == 9));
    let mut got = 0;
    sub.s
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    while let Some(p) = sub.recv() {
        if let Packet::Publish(p) = p {
            assert_eq!(&p.payload[..], b"once");
            got += 1;
            sub.send(&Packet::PubRec(tarta::session::ack(p.packet_id, 0)));
        }
    }
    assert_eq!(got, 1);
}

#[test]
fn take_over_closes_the_old_connection_on_any_shard() {
    let b = Broker::start();
    // Several connections for one id: the kernel spreads them over both
    // shards, and each is moved to the id's home shard, taking over.
    for home in 0..2 {
        let id = id_on(home, "takeover");
        let (mut old, _) = Raw::connect(b.port, connect_packet(Protocol::V311, &id, false, 0));
        subscribe(&mut old, "take/t", Q::AtLeastOnce);
        for _ in 0..4 {
            let (new, ack) = Raw::connect(b.port, connect_packet(Protocol::V311, &id, false, 0));
            assert!(
                ack.session_present,
                "the session moves to the new connection"
            );
            let (_, closed) = old.until_closed(T);
            assert!(closed, "MQTT-3.1.4-3: the old connection is closed");
            old = new;
        }
        // The session (and its subscription) still works on the last one.
        let (mut publ, _) = Raw::connect(
            b.port,
            connect_packet(Protocol::V311, &id_on(1 - home, "tk-pub"), true, 0),
        );
        publish(&mut publ, "take/t", Q::AtLeastOnce, 1, b"after");
        assert!(matches!(old.recv(), Some(Packet::Publish(p)) if &p.payload[..] == b"after"));
    }
    assert!(crate::harness::sys_counter(b.port, "connections_handed_off") > 0);
}

#[tokio::test]
async fn will_is_published_on_abnormal_close_not_after_disconnect() {
    let b = Broker::start();
    let mut watcher = rq::connect(rq::opts(b.port, &id_on(0, "will-watch"))).await;
    watcher.subscribe("will/#", QoS::AtLeastOnce).await;

    let mut o = rq::opts(b.port, &id_on(1, "will-c"));
    o.set_last_will(LastWill::new("will/lost", "gone", QoS::AtLeastOnce, false));
    let c = rq::connect(o).await;
    // Abnormal: the client's event loop (and socket) is dropped, no DISCONNECT.
    c.task.abort();
    let p = watcher
        .next_publish(T)
        .await
        .expect("will after abnormal close");
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("will/lost", &b"gone"[..])
    );

    let (mut c, _) = Raw::connect(b.port, will_connect("will/clean"));
    c.send(&Packet::Disconnect(Default::default()));
    let (_, closed) = c.until_closed(T);
    assert!(closed);
    assert!(
        watcher.next_publish(QUIET * 2).await.is_none(),
        "MQTT-3.1.2-10: no will after DISCONNECT"
    );
}

fn will_connect(topic: &str) -> tarta_proto::mqtt::Connect {
    let mut c = connect_packet(Protocol::V311, &id_on(1, topic), true, 0);
    c.will = Some(tarta_proto::mqtt::Will {
        topic: topic.into(),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: Q::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    c
}

#[test]
fn empty_client_id_is_assigned_with_clean_session_and_refused_without() {
    let b = Broker::start();
    let (mut r, ack) = Raw::connect(b.port, connect_packet(Protocol::V311, "", true, 0));
    assert_eq!(ack.code, 0);
    subscribe(&mut r, "anon/t", Q::AtMostOnce);
    let (mut r2, ack) = Raw::connect(b.port, connect_packet(Protocol::V311, "", false, 0));
    assert_eq!(ack.code, 0x02, "MQTT-3.1.3-8: identifier rejected");
    assert!(r2.until_closed(T).1);
    // 5.0: the assigned id comes back in the CONNACK.
    let (_r, ack) = Raw::connect(b.port, connect_packet(Protocol::V5, "", true, 0));
    assert_eq!(ack.code, 0);
    let assigned = ack
        .properties
        .assigned_client_identifier()
        .expect("assigned id");
    assert!(!assigned.is_empty());
}

#[test]
fn keep_alive_is_enforced_at_one_and_a_half_times() {
    let b = Broker::start();
    let (mut r, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V311, &id_on(0, "ka"), true, 2),
    );
    let start = Instant::now();
    let (_, closed) = r.until_closed(Duration::from_secs(10));
    let waited = start.elapsed();
    assert!(closed, "silent client is closed");
    assert!(
        waited >= Duration::from_millis(2900),
        "not before 1.5 x 2 s: {waited:?}"
    );
    assert!(
        waited <= Duration::from_secs(6),
        "soon after 1.5 x 2 s: {waited:?}"
    );

    // A client that pings stays connected.
    let (mut r, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V311, &id_on(1, "ka-ping"), true, 2),
    );
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(1500));
        r.send(&Packet::PingReq);
        assert!(matches!(r.recv(), Some(Packet::PingResp)));
    }
    assert!(crate::harness::sys_counter(b.port, "closed_keepalive") >= 1);
}

#[test]
fn v5_disconnect_reason_on_keep_alive_timeout() {
    let b = Broker::start();
    let (mut r, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V5, &id_on(0, "ka5"), true, 1),
    );
    let (seen, closed) = r.until_closed(Duration::from_secs(10));
    assert!(closed);
    assert!(
        has_disconnect(&seen, 0x8D),
        "DISCONNECT 0x8D before closing: {seen:?}"
    );
}

#[test]
fn a_slow_subscriber_loses_no_qos1_message_publishers_wait_instead() {
    // DESIGN: QoS 1/2 are never dropped while the subscriber is connected;
    // past `max_queued_messages` the publishers' reads pause.
    let cfg = crate::errors::write_config("max_queued_messages = 200\n");
    let b = Broker::start_with(&["--config", &cfg]);
    let (mut sub, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V311, &id_on(1, "slow-sub"), true, 0),
    );
    subscribe(&mut sub, "slow/t", Q::AtLeastOnce);
    let (mut publ, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V311, &id_on(0, "slow-pub"), true, 0),
    );
    const N: u16 = 3000;
    let writer = std::thread::spawn(move || {
        for i in 1..=N {
            publish(&mut publ, "slow/t", Q::AtLeastOnce, i, b"payload");
        }
        // Every publish is acknowledged in the end.
        let mut acks = 0;
        while acks < N {
            match publ.recv() {
                Some(Packet::PubAck(_)) => acks += 1,
                Some(_) => {}
                None => break,
            }
        }
        acks
    });
    // The subscriber stalls, then reads and acknowledges everything.
    std::thread::sleep(Duration::from_secs(2));
    let mut got = 0u16;
    while got < N {
        match sub.recv() {
            Some(Packet::Publish(p)) => {
                got += 1;
                sub.send(&Packet::PubAck(tarta::session::ack(p.packet_id, 0)));
            }
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(got, N, "every acknowledged QoS 1 message is delivered");
    assert_eq!(writer.join().unwrap(), N);
    assert_eq!(crate::harness::sys_counter(b.port, "queue_dropped"), 0);
}
