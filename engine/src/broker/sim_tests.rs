//! Durability and retained-message cases, deterministic, on the in-process
//! harness (`sim`): crashes at every point of an exchange, torn writes,
//! compaction, replicas of retained messages.

use super::home_shard;
use super::sim::{Client, Sim};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use tarta_proto::mqtt::{
    Ack, Connect, Packet, Properties, Property, Protocol, Publish, QoS, SubOptions, Subscribe,
};

fn id_on(shard: usize, n: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| home_shard(id, n) == shard)
        .unwrap_or_default()
}

fn connect(id: &str, protocol: Protocol, clean: bool) -> Connect {
    let mut properties = Properties::default();
    if protocol.is_v5() {
        properties.push(Property::SessionExpiryInterval(3600));
    }
    Connect {
        protocol,
        clean_start: clean,
        keep_alive: 0,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties,
        bridge: false,
    }
}

fn publish(topic: &str, qos: QoS, pid: u16, payload: &str, retain: bool) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain,
        topic: topic.into(),
        packet_id: pid,
        properties: Properties::default(),
        payload: Bytes::from(payload.to_string()),
    })
}

fn subscribe(filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            filter.into(),
            SubOptions {
                qos,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
            },
        )],
        properties: Properties::default(),
    })
}

fn ack(pid: u16) -> Ack {
    Ack {
        packet_id: pid,
        reason: 0,
        properties: Properties::default(),
    }
}

/// A subscriber that acknowledges QoS 1 and returns the payloads.
fn take_qos1(sim: &mut Sim, c: &mut Client) -> Vec<String> {
    let mut got = Vec::new();
    for p in sim.recv(c) {
        if let Packet::Publish(p) = p {
            got.push(String::from_utf8_lossy(&p.payload).to_string());
            sim.send(c, Packet::PubAck(ack(p.packet_id)));
        }
    }
    got
}

#[test]
fn puback_waits_for_the_log_of_the_subscribers_shard() {
    let mut sim = Sim::new(2);
    let sub_id = id_on(1, 2, "sub");
    let pub_id = id_on(0, 2, "pub");
    let mut sub = sim.connect(connect(&sub_id, Protocol::V311, false));
    sim.send(&sub, subscribe("t", QoS::AtLeastOnce));
    sim.settle();
    assert!(sim
        .recv(&mut sub)
        .iter()
        .any(|p| matches!(p, Packet::SubAck(_))));
    sim.drop_client(sub);
    sim.settle();

    let mut p = sim.connect(connect(&pub_id, Protocol::V311, true));
    sim.settle();
    sim.recv(&mut p);
    sim.send(&p, publish("t", QoS::AtLeastOnce, 1, "one", false));
    assert!(
        sim.recv(&mut p).is_empty(),
        "PUBACK before anything is durable"
    );
    sim.mesh(); // the message and a durability barrier reach shard 1
    assert!(
        sim.recv(&mut p).is_empty(),
        "PUBACK before shard 1's log is durable"
    );
    // A crash now: nothing was acknowledged, nothing is owed.
    sim.crash(0);
    let mut sub = sim.connect(connect(&sub_id, Protocol::V311, false));
    sim.settle();
    assert!(take_qos1(&mut sim, &mut sub).is_empty());
    sim.drop_client(sub);
    sim.settle();

    let mut p = sim.connect(connect(&pub_id, Protocol::V311, true));
    sim.settle();
    sim.recv(&mut p);
    sim.send(&p, publish("t", QoS::AtLeastOnce, 2, "two", false));
    sim.settle();
    let got = sim.recv(&mut p);
    assert!(
        got.iter()
            .any(|x| matches!(x, Packet::PubAck(a) if a.packet_id == 2)),
        "{got:?}"
    );
    // Acknowledged: it survives the crash.
    sim.crash(0);
    let mut sub = sim.connect(connect(&sub_id, Protocol::V311, false));
    sim.settle();
    let got = sim.recv(&mut sub);
    assert!(matches!(got.first(), Some(Packet::ConnAck(a)) if a.session_present));
    let payloads: Vec<String> = got
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(String::from_utf8_lossy(&p.payload).to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(payloads, ["two"]);
}

#[test]
fn torn_writes_lose_only_what_was_not_acknowledged() {
    for torn in [0, 1, 9, 30, 70, 150, 400] {
        let mut sim = Sim::new(2);
        let sub_id = id_on(0, 2, "sub");
        let mut sub = sim.connect(connect(&sub_id, Protocol::V5, false));
        sim.send(&sub, subscribe("t/#", QoS::AtLeastOnce));
        sim.settle();
        sim.recv(&mut sub);
        sim.drop_client(sub);
        let mut p = sim.connect(connect(&id_on(1, 2, "pub"), Protocol::V311, true));
        sim.settle();
        sim.recv(&mut p);
        let mut acked = BTreeSet::new();
        for i in 1..=40u16 {
            sim.send(
                &p,
                publish("t/x", QoS::AtLeastOnce, i, &format!("m{i}"), false),
            );
            if i % 7 == 0 {
                sim.settle();
            }
            if i % 5 == 0 {
                sim.mesh();
            }
            for x in sim.recv(&mut p) {
                if let Packet::PubAck(a) = x {
                    acked.insert(format!("m{}", a.packet_id));
                }
            }
        }
        sim.mesh();
        sim.crash(torn);
        let mut sub = sim.connect(connect(&sub_id, Protocol::V5, false));
        sim.settle();
        let got: BTreeSet<String> = take_qos1(&mut sim, &mut sub).into_iter().collect();
        assert!(
            acked.is_subset(&got),
            "torn {torn}: acknowledged {acked:?}, recovered {got:?}"
        );
        assert!(!acked.is_empty());
    }
}

/// The publisher side of QoS 2 across broker crashes, as a client does it.
struct Qos2Pub {
    c: Client,
    /// pid -> (payload, PUBREC received, PUBCOMP received)
    msgs: BTreeMap<u16, (String, bool, bool)>,
}

/// The receiver side of QoS 2 (method B: the packet id is remembered until
/// PUBREL, so a resent PUBLISH is not delivered twice).
struct Qos2Sub {
    c: Client,
    awaiting: BTreeSet<u16>,
    delivered: BTreeMap<String, u32>,
}

fn pub_step(sim: &mut Sim, p: &mut Qos2Pub) {
    for x in sim.recv(&mut p.c) {
        match x {
            Packet::PubRec(a) => {
                if let Some(m) = p.msgs.get_mut(&a.packet_id) {
                    m.1 = true;
                }
                sim.send(&p.c, Packet::PubRel(ack(a.packet_id)));
            }
            Packet::PubComp(a) => {
                if let Some(m) = p.msgs.get_mut(&a.packet_id) {
                    m.2 = true;
                }
            }
            _ => {}
        }
    }
}

fn sub_step(sim: &mut Sim, s: &mut Qos2Sub) {
    for x in sim.recv(&mut s.c) {
        match x {
            Packet::Publish(p) => {
                if s.awaiting.insert(p.packet_id) {
                    let payload = String::from_utf8_lossy(&p.payload).to_string();
                    *s.delivered.entry(payload).or_default() += 1;
                }
                sim.send(&s.c, Packet::PubRec(ack(p.packet_id)));
            }
            Packet::PubRel(a) => {
                s.awaiting.remove(&a.packet_id);
                sim.send(&s.c, Packet::PubComp(ack(a.packet_id)));
            }
            _ => {}
        }
    }
}

/// Reconnects both after a crash; the publisher resends what it must.
fn resume(sim: &mut Sim, p: &mut Qos2Pub, s: &mut Qos2Sub, pub_id: &str, sub_id: &str) {
    s.c = sim.connect(connect(sub_id, Protocol::V5, false));
    p.c = sim.connect(connect(pub_id, Protocol::V5, false));
    let resend: Vec<(u16, String, bool)> = p
        .msgs
        .iter()
        .filter(|(_, m)| !m.2)
        .map(|(pid, m)| (*pid, m.0.clone(), m.1))
        .collect();
    for (pid, payload, recd) in resend {
        if recd {
            sim.send(&p.c, Packet::PubRel(ack(pid)));
        } else if let Packet::Publish(mut x) = publish("q2", QoS::ExactlyOnce, pid, &payload, false)
        {
            x.dup = true;
            sim.send(&p.c, Packet::Publish(x));
        }
    }
}

#[test]
fn qos2_is_delivered_exactly_once_whatever_the_crash_point() {
    for crash_at in 0..80 {
        for torn in [0, 12, 25, 60, 140] {
            let mut sim = Sim::new(2);
            let sub_id = id_on(1, 2, "q2sub");
            let pub_id = id_on(0, 2, "q2pub");
            let mut s = Qos2Sub {
                c: sim.connect(connect(&sub_id, Protocol::V5, false)),
                awaiting: BTreeSet::new(),
                delivered: BTreeMap::new(),
            };
            sim.send(&s.c, subscribe("q2", QoS::ExactlyOnce));
            let mut p = Qos2Pub {
                c: sim.connect(connect(&pub_id, Protocol::V5, false)),
                msgs: BTreeMap::new(),
            };
            sim.settle();
            sim.recv(&mut s.c);
            sim.recv(&mut p.c);
            for (pid, payload) in [(1u16, "a"), (2, "b"), (3, "c")] {
                p.msgs.insert(pid, (payload.to_string(), false, false));
                sim.send(&p.c, publish("q2", QoS::ExactlyOnce, pid, payload, false));
            }
            let mut step = 0;
            let mut crashed = false;
            for _ in 0..200 {
                for action in 0..4 {
                    if step == crash_at && !crashed {
                        crashed = true;
                        sim.crash(torn);
                        resume(&mut sim, &mut p, &mut s, &pub_id, &sub_id);
                    }
                    step += 1;
                    match action {
                        0 => {
                            sim.mesh();
                        }
                        1 => {
                            sim.commit();
                        }
                        2 => pub_step(&mut sim, &mut p),
                        _ => sub_step(&mut sim, &mut s),
                    }
                }
                if p.msgs.values().all(|m| m.2) && step > crash_at {
                    break;
                }
            }
            sim.settle();
            sub_step(&mut sim, &mut s);
            let case = format!("crash at {crash_at}, torn {torn}");
            assert!(
                p.msgs.values().all(|m| m.2),
                "{case}: publisher not done: {:?}",
                p.msgs
            );
            for payload in ["a", "b", "c"] {
                assert_eq!(
                    s.delivered.get(payload).copied(),
                    Some(1),
                    "{case}: {payload} delivered {:?}",
                    s.delivered
                );
            }
        }
    }
}

#[test]
fn retained_replicas_follow_the_owner_shard_and_survive_a_crash() {
    let n = 3;
    let mut sim = Sim::new(n);
    // A topic owned by shard 2, written at once from shards 0 and 1.
    let topic = (0..)
        .map(|i| format!("r/{i}"))
        .find(|t| home_shard(t, n) == 2)
        .unwrap_or_default();
    let mut a = sim.connect(connect(&id_on(0, n, "ra"), Protocol::V311, true));
    let mut b = sim.connect(connect(&id_on(1, n, "rb"), Protocol::V311, true));
    sim.settle();
    sim.recv(&mut a);
    sim.recv(&mut b);
    for round in 0..20 {
        sim.send(
            &a,
            publish(&topic, QoS::AtLeastOnce, 1, &format!("a{round}"), true),
        );
        sim.send(
            &b,
            publish(&topic, QoS::AtLeastOnce, 1, &format!("b{round}"), true),
        );
        sim.settle();
        let seen = sim.retained_everywhere(&topic);
        assert!(
            seen.iter().all(|x| x == &seen[2]),
            "replicas diverge: {seen:?}"
        );
        assert!(seen[2].is_some());
        sim.recv(&mut a);
        sim.recv(&mut b);
    }
    let before = sim.retained_everywhere(&topic);
    sim.crash(0);
    assert_eq!(sim.retained_everywhere(&topic), before);
    // An empty retained message clears it everywhere, durably.
    let mut c = sim.connect(connect(&id_on(0, n, "rc"), Protocol::V311, true));
    sim.send(&c, publish(&topic, QoS::AtLeastOnce, 1, "", true));
    sim.settle();
    sim.recv(&mut c);
    sim.crash(0);
    assert_eq!(sim.retained_everywhere(&topic), vec![None; n]);
}

#[test]
fn a_compacted_log_recovers_the_same_sessions_queues_and_retained() {
    let mut sim = Sim::new(2);
    let sub_id = id_on(1, 2, "csub");
    let mut sub = sim.connect(connect(&sub_id, Protocol::V311, false));
    sim.send(&sub, subscribe("c/#", QoS::AtLeastOnce));
    sim.settle();
    sim.recv(&mut sub);
    sim.drop_client(sub);
    let mut p = sim.connect(connect(&id_on(1, 2, "cpub"), Protocol::V311, true));
    for i in 1..=20u16 {
        sim.send(
            &p,
            publish(
                &format!("c/{i}"),
                QoS::AtLeastOnce,
                i,
                &format!("m{i}"),
                i % 4 == 0,
            ),
        );
    }
    sim.settle();
    sim.recv(&mut p);
    // Compact every shard's log: the snapshot replaces the segment.
    for i in 0..2 {
        let mut snap = Vec::new();
        if let Some(epoch) = sim.shards[i].compact_into(&mut snap) {
            sim.disks[i] = snap;
            if let Some(log) = sim.shards[i].st.borrow_mut().log.as_mut() {
                log.committed(epoch);
            }
        }
    }
    let retained_before = sim.retained_everywhere("c/8");
    sim.crash(0);
    assert_eq!(sim.retained_everywhere("c/8"), retained_before);
    assert!(retained_before[0].is_some());
    let mut sub = sim.connect(connect(&sub_id, Protocol::V311, false));
    sim.settle();
    let got = take_qos1(&mut sim, &mut sub);
    let want: Vec<String> = (1..=20).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "queue in order after compaction and a crash");
}

#[test]
fn a_will_pending_at_a_crash_is_published_after_the_restart() {
    let mut sim = Sim::new(2);
    let watcher_id = id_on(1, 2, "watcher");
    let mut w = sim.connect(connect(&watcher_id, Protocol::V311, false));
    sim.send(&w, subscribe("wills/#", QoS::AtLeastOnce));
    sim.settle();
    sim.recv(&mut w);
    sim.drop_client(w);
    let mut c = connect(&id_on(0, 2, "dev"), Protocol::V5, false);
    c.will = Some(tarta_proto::mqtt::Will {
        topic: "wills/dev".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
    });
    let mut dev = sim.connect(c);
    sim.settle();
    assert!(sim
        .recv(&mut dev)
        .iter()
        .any(|p| matches!(p, Packet::ConnAck(_))));
    // The broker dies while the device is connected: its will is owed.
    sim.crash(0);
    sim.tick(2);
    sim.settle();
    let mut w = sim.connect(connect(&watcher_id, Protocol::V311, false));
    sim.settle();
    assert_eq!(take_qos1(&mut sim, &mut w), ["gone"]);
    // Published once: not again after another restart.
    sim.drop_client(w);
    sim.settle();
    sim.crash(0);
    sim.tick(2);
    let mut w = sim.connect(connect(&watcher_id, Protocol::V311, false));
    sim.settle();
    assert!(take_qos1(&mut sim, &mut w).is_empty());
}

#[test]
fn a_persistent_sessions_username_survives_restarts_and_compaction() {
    let mut sim = Sim::new(2);
    let id = id_on(1, 2, "user");
    let mut c = connect(&id, Protocol::V311, false);
    c.username = Some("ann".into());
    let mut u = sim.connect(c);
    sim.settle();
    sim.recv(&mut u);
    sim.drop_client(u);
    sim.settle();
    let username = |sim: &Sim| {
        let st = sim.shards[1].st.borrow();
        st.sessions
            .iter()
            .find(|(_, e)| &*e.session.client_id == id.as_str())
            .and_then(|(_, e)| e.username().map(|u| u.to_string()))
    };
    sim.crash(0);
    assert_eq!(username(&sim).as_deref(), Some("ann"));
    let mut snap = Vec::new();
    if let Some(epoch) = sim.shards[1].compact_into(&mut snap) {
        sim.disks[1] = snap;
        if let Some(log) = sim.shards[1].st.borrow_mut().log.as_mut() {
            log.committed(epoch);
        }
    }
    sim.crash(0);
    assert_eq!(username(&sim).as_deref(), Some("ann"));
}

#[test]
fn a_failing_disk_holds_acknowledgements_refuses_new_ones_and_recovers() {
    let mut sim = Sim::new(2);
    let sub_id = id_on(1, 2, "fsub");
    let mut sub = sim.connect(connect(&sub_id, Protocol::V5, false));
    sim.send(&sub, subscribe("f/#", QoS::AtLeastOnce));
    sim.settle();
    sim.recv(&mut sub);
    sim.drop_client(sub);
    sim.settle();
    let mut p = sim.connect(connect(&id_on(0, 2, "fpub"), Protocol::V5, true));
    sim.settle();
    sim.recv(&mut p);
    sim.send(&p, publish("f/a", QoS::AtLeastOnce, 1, "held", false));
    sim.mesh();
    // Shard 1 cannot write its log.
    sim.commit_fails();
    sim.mesh();
    assert!(
        sim.recv(&mut p).is_empty(),
        "acknowledged what is not stored"
    );
    // Meanwhile a new durable publish is refused (5.0: 0x97), on any shard.
    let mut c = connect(&id_on(0, 2, "fpub2"), Protocol::V5, true);
    c.properties = Properties::default(); // a clean session: not stored
    let mut q = sim.connect(c);
    sim.mesh();
    sim.commit_fails();
    sim.recv(&mut q);
    sim.send(&q, publish("f/b", QoS::AtLeastOnce, 1, "refused", false));
    let got = sim.recv(&mut q);
    assert!(
        got.iter()
            .any(|x| matches!(x, Packet::PubAck(a) if a.reason == 0x97)),
        "{got:?}"
    );
    // The disk works again: the held acknowledgement goes, nothing lost.
    sim.settle();
    let got = sim.recv(&mut p);
    assert!(
        got.iter()
            .any(|x| matches!(x, Packet::PubAck(a) if a.packet_id == 1 && a.reason == 0)),
        "{got:?}"
    );
    sim.send(&q, publish("f/c", QoS::AtLeastOnce, 2, "after", false));
    sim.settle();
    assert!(sim
        .recv(&mut q)
        .iter()
        .any(|x| matches!(x, Packet::PubAck(a) if a.reason == 0)));
    sim.crash(0);
    let mut sub = sim.connect(connect(&sub_id, Protocol::V5, false));
    sim.settle();
    assert_eq!(take_qos1(&mut sim, &mut sub), ["held", "after"]);
}
