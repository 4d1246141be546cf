//! MQTT 5.0 features, each over TCP and WebSocket, publisher and
//! subscriber on different shards. Test names and comments cite the
//! normative statements they cover (docs/CONFORMANCE.md maps them).

use crate::errors::write_config;
use crate::harness::{
    connect_packet, drain, has_disconnect, id_on, mq_connect, Broker, Mq, Transport, TRANSPORTS,
};
use bytes::Bytes;
use std::time::{Duration, Instant};
use tarta_proto::mqtt::{
    Auth, Connect, Packet, Properties, Property, Protocol, Publish, QoS, SubOptions, Subscribe,
    Unsubscribe, Will,
};

const QUIET: Duration = Duration::from_millis(600);

fn v5(id: &str, props: Vec<Property>) -> Connect {
    let mut c = connect_packet(Protocol::V5, id, true, 0);
    c.properties = Properties(props);
    c
}

fn sub(c: &mut dyn Mq, pid: u16, filters: &[(&str, SubOptions)], props: Vec<Property>) -> Vec<u8> {
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: pid,
        filters: filters.iter().map(|(f, o)| ((*f).into(), *o)).collect(),
        properties: Properties(props),
    }));
    loop {
        match c.recv() {
            Some(Packet::SubAck(a)) => return a.codes,
            Some(_) => {}
            None => panic!("no SUBACK"),
        }
    }
}

fn q(qos: QoS) -> SubOptions {
    SubOptions {
        qos,
        ..Default::default()
    }
}

fn publ(c: &mut dyn Mq, topic: &str, qos: QoS, pid: u16, payload: &[u8], props: Vec<Property>) {
    c.send(&Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: if qos == QoS::AtMostOnce { 0 } else { pid },
        properties: Properties(props),
        payload: Bytes::copy_from_slice(payload),
    }));
}

fn publishes(v: Vec<Packet>) -> Vec<Publish> {
    v.into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn pair(
    b: &Broker,
    t: Transport,
    tag: &str,
    sub_props: Vec<Property>,
) -> (Box<dyn Mq>, Box<dyn Mq>) {
    let (s, a) = mq_connect(b, t, v5(&id_on(1, &format!("{tag}-sub")), sub_props));
    assert_eq!(a.code, 0);
    let (p, a) = mq_connect(b, t, v5(&id_on(0, &format!("{tag}-pub")), vec![]));
    assert_eq!(a.code, 0);
    (s, p)
}

#[test]
fn connack_properties_mqtt_3_2_2_3() {
    let b = Broker::start_with(&["--max-keepalive", "30"]);
    for t in TRANSPORTS {
        let mut c = v5(
            &id_on(0, "props"),
            vec![Property::RequestResponseInformation(1)],
        );
        c.keep_alive = 100;
        let (_c, a) = mq_connect(&b, t, c);
        let p = &a.properties;
        assert_eq!(
            p.server_keep_alive(),
            Some(30),
            "MQTT-3.2.2-21: --max-keepalive caps it"
        );
        assert!(p.receive_maximum().is_some());
        assert!(p.maximum_packet_size().is_some());
        assert!(p.topic_alias_maximum().unwrap_or(0) > 0);
        assert_eq!(p.retain_available(), Some(1));
        assert_eq!(p.wildcard_subscription_available(), Some(1));
        assert_eq!(p.subscription_identifier_available(), Some(1));
        assert_eq!(p.shared_subscription_available(), Some(1));
        assert!(
            p.response_information().is_some(),
            "request/response information"
        );
        assert!(!a.session_present);
    }
}

#[test]
fn session_expiry_keeps_then_ends_the_session_mqtt_3_1_2_11() {
    let b = Broker::start();
    for t in TRANSPORTS {
        let id = id_on(1, &format!("sexp-{t:?}"));
        let props = || vec![Property::SessionExpiryInterval(2)];
        let mut c = v5(&id, props());
        c.clean_start = false;
        let (mut s, a) = mq_connect(&b, t, c.clone());
        assert!(!a.session_present);
        sub(&mut *s, 1, &[("sexp/t", q(QoS::AtLeastOnce))], vec![]);
        drop(s);
        std::thread::sleep(QUIET);
        let (mut p, _) = mq_connect(&b, t, v5(&id_on(0, "sexp-pub"), vec![]));
        publ(&mut *p, "sexp/t", QoS::AtLeastOnce, 1, b"kept", vec![]);
        std::thread::sleep(QUIET);
        // Back within the interval: session present, message delivered.
        let (mut s, a) = mq_connect(&b, t, c.clone());
        assert!(a.session_present);
        assert_eq!(publishes(drain(&mut *s, QUIET)).len(), 1);
        drop(s);
        // Away longer than the interval: the session is gone.
        std::thread::sleep(Duration::from_millis(3500));
        let (_s, a) = mq_connect(&b, t, c);
        assert!(!a.session_present, "expired after 2 s");
    }
}

#[test]
fn disconnect_may_not_set_expiry_after_zero_mqtt_3_14_2_2() {
    let b = Broker::start();
    for t in TRANSPORTS {
        let (mut c, _) = mq_connect(&b, t, v5(&id_on(0, "dexp"), vec![]));
        c.send(&Packet::Disconnect(tarta_proto::mqtt::Disconnect {
            reason: 0,
            properties: Properties(vec![Property::SessionExpiryInterval(60)]),
        }));
        let got = drain(&mut *c, QUIET);
        assert!(has_disconnect(&got, 0x82), "{got:?}");
    }
}

#[test]
fn message_expiry_drops_expired_and_decrements_the_rest_mqtt_3_3_2_5_and_6() {
    let b = Broker::start();
    for t in TRANSPORTS {
        let id = id_on(1, &format!("mexp-{t:?}"));
        let mut c = v5(&id, vec![Property::SessionExpiryInterval(60)]);
        c.clean_start = false;
        let (mut s, _) = mq_connect(&b, t, c.clone());
        sub(&mut *s, 1, &[("mexp/#", q(QoS::AtLeastOnce))], vec![]);
        drop(s);
        std::thread::sleep(QUIET);
        let (mut p, _) = mq_connect(&b, t, v5(&id_on(0, "mexp-pub"), vec![]));
        publ(
            &mut *p,
            "mexp/short",
            QoS::AtLeastOnce,
            1,
            b"x",
            vec![Property::MessageExpiryInterval(1)],
        );
        publ(
            &mut *p,
            "mexp/long",
            QoS::AtLeastOnce,
            2,
            b"y",
            vec![Property::MessageExpiryInterval(100)],
        );
        std::thread::sleep(Duration::from_millis(3200));
        let (mut s, _) = mq_connect(&b, t, c);
        let got = publishes(drain(&mut *s, QUIET));
        assert_eq!(got.len(), 1, "the expired one is not delivered: {got:?}");
        assert_eq!(got[0].topic.as_str(), "mexp/long");
        let left = got[0].properties.message_expiry_interval().unwrap();
        assert!((90..=98).contains(&left), "decremented by the wait: {left}");
    }
}

#[test]
fn topic_aliases_from_the_client_mqtt_3_3_2_10_to_12() {
    let b = Broker::start();
    for t in TRANSPORTS {
        let (mut s, mut p) = pair(&b, t, "ain", vec![]);
        sub(&mut *s, 1, &[("ain/#", q(QoS::AtMostOnce))], vec![]);
        publ(
            &mut *p,
            "ain/a",
            QoS::AtMostOnce,
            0,
            b"1",
            vec![Property::TopicAlias(3)],
        );
        publ(
            &mut *p,
            "",
            QoS::AtMostOnce,
            0,
            b"2",
            vec![Property::TopicAlias(3)],
        );
        publ(
            &mut *p,
            "ain/b",
            QoS::AtMostOnce,
            0,
            b"3",
            vec![Property::TopicAlias(3)],
        );
        publ(
            &mut *p,
            "",
            QoS::AtMostOnce,
            0,
            b"4",
            vec![Property::TopicAlias(3)],
        );
        let got: Vec<(String, Bytes)> = publishes(drain(&mut *s, QUIET))
            .into_iter()
            .map(|p| (p.topic.to_string(), p.payload))
            .collect();
        let want = [
            ("ain/a", "1"),
            ("ain/a", "2"),
            ("ain/b", "3"),
            ("ain/b", "4"),
        ];
        assert_eq!(got, want.map(|(t, p)| (t.to_string(), Bytes::from(p))));
        // Alias 0, beyond the maximum, and an unknown alias with no topic.
        for (alias, topic, code) in [
            (0u16, "ain/x", 0x94u8),
            (65_000, "ain/x", 0x94),
            (9, "", 0x82),
        ] {
            let (mut bad, _) = mq_connect(&b, t, v5(&id_on(0, "ain-bad"), vec![]));
            publ(
                &mut *bad,
                topic,
                QoS::AtMostOnce,
                0,
                b"x",
                vec![Property::TopicAlias(alias)],
            );
            let got = drain(&mut *bad, QUIET);
            assert!(has_disconnect(&got, code), "alias {alias}: {got:?}");
        }
    }
}

#[test]
fn topic_aliases_to_the_client_up_to_its_maximum_mqtt_3_3_2_11() {
    let b = Broker::start();
    for t in TRANSPORTS {
        let (mut s, mut p) = pair(&b, t, "aout", vec![Property::TopicAliasMaximum(2)]);
        sub(&mut *s, 1, &[("aout/#", q(QoS::AtMostOnce))], vec![]);
        for topic in ["aout/a", "aout/a", "aout/b", "aout/c", "aout/b"] {
            publ(&mut *p, topic, QoS::AtMostOnce, 0, b"x", vec![]);
        }
        let got: Vec<(String, Option<u16>)> = publishes(drain(&mut *s, QUIET))
            .into_iter()
            .map(|p| (p.topic.to_string(), p.properties.topic_alias()))
            .collect();
        let want = [
            ("aout/a", Some(1)),
            ("", Some(1)),
            ("aout/b", Some(2)),
            ("aout/c", None),
            ("", Some(2)),
        ];
        assert_eq!(got, want.map(|(t, a)| (t.to_string(), a)));
    }
}

#[test]
fn receive_maximum_both_directions_mqtt_3_3_4_7_and_9() {
    let cfg = write_config("receive_maximum = 3\n");
    let b = Broker::start_with(&["--config", &cfg]);
    for t in TRANSPORTS {
        // Broker -> client: never more unacknowledged than the client allows.
        let (mut s, mut p) = pair(&b, t, "rmax", vec![Property::ReceiveMaximum(2)]);
        sub(&mut *s, 1, &[("rmax/t", q(QoS::AtLeastOnce))], vec![]);
        for i in 0..5 {
            publ(&mut *p, "rmax/t", QoS::AtLeastOnce, i + 1, b"x", vec![]);
        }
        let first = publishes(drain(&mut *s, QUIET));
        assert_eq!(first.len(), 2, "only Receive Maximum in flight");
        for m in &first {
            s.send(&Packet::PubAck(tarta::session::ack(m.packet_id, 0)));
        }
        assert_eq!(
            publishes(drain(&mut *s, QUIET)).len(),
            2,
            "two more after two PUBACKs"
        );
        // Client -> broker: a 4th unreleased QoS 2 exceeds the broker's 3.
        let (mut c, a) = mq_connect(&b, t, v5(&id_on(0, "rmax-in"), vec![]));
        assert_eq!(a.properties.receive_maximum(), Some(3));
        for i in 1..=4 {
            publ(&mut *c, "rmax/in", QoS::ExactlyOnce, i, b"x", vec![]);
        }
        let got = drain(&mut *c, QUIET);
        assert!(has_disconnect(&got, 0x93), "{got:?}");
    }
}

#[test]
fn maximum_packet_size_to_the_client_mqtt_3_1_2_25() {
    let b = Broker::start();
    for t in TRANSPORTS {
        let (mut s, mut p) = pair(&b, t, "mps", vec![Property::MaximumPacketSize(64)]);
        sub(&mut *s, 1, &[("mps/t", q(QoS::AtLeastOnce))], vec![]);
        publ(&mut *p, "mps/t", QoS::AtLeastOnce, 1, &[b'x'; 200], vec![]);
        publ(&mut *p, "mps/t", QoS::AtLeastOnce, 2, b"small", vec![]);
        let got = publishes(drain(&mut *s, QUIET));
        assert_eq!(got.len(), 1, "the large one is discarded for this client");
        assert_eq!(&got[0].payload[..], b"small");
    }
}

fn will(topic: &str, delay: Option<u32>) -> Will {
    Will {
        topic: topic.into(),
        payload: Bytes::from_static(b"bye"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties(delay.map(Property::WillDelayInterval).into_iter().collect()),
    }
}

#[test]
fn will_delay_interval_mqtt_3_1_3_9() {
    let b = Broker::start();
    for t in TRANSPORTS {
        let (mut w, _) = mq_connect(&b, t, v5(&id_on(0, "wd-watch"), vec![]));
        sub(&mut *w, 1, &[("wd/#", q(QoS::AtLeastOnce))], vec![]);
        // Delay 2 s, session lives on: the will comes after the delay.
        let id = id_on(1, &format!("wd-{t:?}"));
        let mut c = v5(&id, vec![Property::SessionExpiryInterval(30)]);
        c.will = Some(will("wd/delayed", Some(2)));
        let (client, _) = mq_connect(&b, t, c.clone());
        let gone = Instant::now();
        drop(client);
        assert!(
            publishes(drain(&mut *w, Duration::from_millis(1000))).is_empty(),
            "not before the delay"
        );
        w.set_timeout(Duration::from_secs(5));
        let m = match w.recv() {
            Some(Packet::Publish(m)) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(m.topic.as_str(), "wd/delayed");
        assert!(gone.elapsed() >= Duration::from_millis(1900));
        w.send(&Packet::PubAck(tarta::session::ack(m.packet_id, 0)));
        // Reconnecting before the delay cancels it.
        let (client, _) = mq_connect(&b, t, c.clone());
        drop(client);
        std::thread::sleep(Duration::from_millis(500));
        let mut again = c.clone();
        again.clean_start = false;
        again.will = None;
        let (_back, _) = mq_connect(&b, t, again);
        assert!(
            publishes(drain(&mut *w, Duration::from_millis(2500))).is_empty(),
            "cancelled by reconnect"
        );
        // Session expiry 0: the session ends at once, and so does the delay.
        let mut c0 = v5(&id_on(1, "wd-now"), vec![]);
        c0.will = Some(will("wd/now", Some(60)));
        let (client, _) = mq_connect(&b, t, c0);
        drop(client);
        let got = publishes(drain(&mut *w, Duration::from_millis(1500)));
        assert_eq!(
            got.iter().map(|p| p.topic.to_string()).collect::<Vec<_>>(),
            ["wd/now"]
        );
    }
}

#[test]
fn subscription_options_mqtt_3_8_3_1() {
    let b = Broker::start();
    for t in TRANSPORTS {
        let (mut me, _) = mq_connect(&b, t, v5(&id_on(0, "opt-me"), vec![]));
        // No Local (MQTT-3.8.3-3): my own publish is not sent back to me.
        let nl = SubOptions {
            no_local: true,
            ..q(QoS::AtMostOnce)
        };
        sub(&mut *me, 1, &[("opt/nl", nl)], vec![]);
        publ(&mut *me, "opt/nl", QoS::AtMostOnce, 0, b"mine", vec![]);
        let (mut other, _) = mq_connect(&b, t, v5(&id_on(1, "opt-other"), vec![]));
        publ(&mut *other, "opt/nl", QoS::AtMostOnce, 0, b"theirs", vec![]);
        let got: Vec<Bytes> = publishes(drain(&mut *me, QUIET))
            .into_iter()
            .map(|p| p.payload)
            .collect();
        assert_eq!(got, [Bytes::from_static(b"theirs")]);

        // Retain As Published (MQTT-3.3.1-12/13) on live messages.
        let (mut s, _) = mq_connect(&b, t, v5(&id_on(1, "opt-rap"), vec![]));
        let rap = SubOptions {
            retain_as_published: true,
            ..q(QoS::AtMostOnce)
        };
        sub(
            &mut *s,
            1,
            &[("opt/rap", rap), ("opt/plain", q(QoS::AtMostOnce))],
            vec![],
        );
        for topic in ["opt/rap", "opt/plain"] {
            other.send(&Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: true,
                topic: topic.into(),
                packet_id: 0,
                properties: Properties::default(),
                payload: Bytes::from_static(b"r"),
            }));
        }
        let got: Vec<(String, bool)> = publishes(drain(&mut *s, QUIET))
            .into_iter()
            .map(|p| (p.topic.to_string(), p.retain))
            .collect();
        assert_eq!(
            got,
            [
                ("opt/rap".to_string(), true),
                ("opt/plain".to_string(), false)
            ]
        );

        // Retain Handling (MQTT-3.3.1-9..11): 0 always, 1 only if new, 2 never.
        let (mut r, _) = mq_connect(&b, t, v5(&id_on(1, "opt-rh"), vec![]));
        let rh = |h| SubOptions {
            retain_handling: h,
            ..q(QoS::AtMostOnce)
        };
        let count = |r: &mut dyn Mq, h, pid| {
            sub(r, pid, &[("opt/rap", rh(h))], vec![]);
            publishes(drain(r, QUIET)).len()
        };
        assert_eq!(count(&mut *r, 1, 1), 1, "handling 1, new subscription");
        assert_eq!(count(&mut *r, 1, 2), 0, "handling 1, existing subscription");
        assert_eq!(count(&mut *r, 0, 3), 1, "handling 0");
        assert_eq!(count(&mut *r, 2, 4), 0, "handling 2");
        // Clear the retained messages for the next transport.
        for topic in ["opt/rap", "opt/plain"] {
            other.send(&Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: true,
                topic: topic.into(),
                packet_id: 0,
                properties: Properties::default(),
                payload: Bytes::new(),
            }));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn subscription_identifiers_all_in_one_delivery_mqtt_3_3_4_3() {
    let b = Broker::start();
    for t in TRANSPORTS {
        let (mut s, mut p) = pair(&b, t, "sid", vec![]);
        sub(
            &mut *s,
            1,
            &[("sid/+", q(QoS::AtLeastOnce))],
            vec![Property::SubscriptionIdentifier(5)],
        );
        sub(
            &mut *s,
            2,
            &[("sid/#", q(QoS::AtMostOnce))],
            vec![Property::SubscriptionIdentifier(7)],
        );
        sub(&mut *s, 3, &[("sid/x", q(QoS::AtMostOnce))], vec![]);
        publ(&mut *p, "sid/x", QoS::AtLeastOnce, 1, b"x", vec![]);
        let got = publishes(drain(&mut *s, QUIET));
        assert_eq!(got.len(), 1, "one delivery");
        let mut ids: Vec<u32> = got[0].properties.subscription_identifiers().collect();
        ids.sort_unstable();
        assert_eq!(ids, [5, 7]);
        assert_eq!(got[0].qos, QoS::AtLeastOnce);
    }
}

#[test]
fn application_properties_pass_through_untouched_mqtt_3_3_2_17_to_20() {
    let b = Broker::start();
    for t in TRANSPORTS {
        let (mut s, mut p) = pair(&b, t, "pass", vec![]);
        sub(&mut *s, 1, &[("pass/req", q(QoS::AtLeastOnce))], vec![]);
        let props = vec![
            Property::PayloadFormatIndicator(1),
            Property::ContentType("application/json".into()),
            Property::ResponseTopic("pass/resp".into()),
            Property::CorrelationData(Bytes::from_static(b"\x01\x02")),
            Property::UserProperty("k".into(), "v1".into()),
            Property::UserProperty("k".into(), "v2".into()),
        ];
        publ(
            &mut *p,
            "pass/req",
            QoS::AtLeastOnce,
            1,
            b"{}",
            props.clone(),
        );
        let got = publishes(drain(&mut *s, QUIET));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].properties.0, props, "same properties, same order");
    }
}

#[test]
fn reason_codes_on_acknowledgements() {
    let b = Broker::start();
    for t in TRANSPORTS {
        let (mut c, _) = mq_connect(&b, t, v5(&id_on(0, "rc"), vec![]));
        let codes = sub(
            &mut *c,
            1,
            &[("a/#/b", q(QoS::AtMostOnce)), ("ok/+", q(QoS::ExactlyOnce))],
            vec![],
        );
        assert_eq!(codes, [0x8F, 0x02], "topic filter invalid, granted QoS 2");
        c.send(&Packet::Unsubscribe(Unsubscribe {
            packet_id: 2,
            filters: vec!["ok/+".into(), "never".into()],
            properties: Properties::default(),
        }));
        match c.recv() {
            Some(Packet::UnsubAck(a)) => {
                assert_eq!(a.codes, [0x00, 0x11], "no subscription existed")
            }
            other => panic!("{other:?}"),
        }
        c.send(&Packet::PubRel(tarta::session::ack(77, 0)));
        match c.recv() {
            Some(Packet::PubComp(a)) => assert_eq!(a.reason, 0x92, "packet identifier not found"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn enhanced_authentication_is_refused_with_0x8c() {
    let b = Broker::start();
    for t in TRANSPORTS {
        let c = v5(
            &id_on(0, "auth"),
            vec![Property::AuthenticationMethod("SCRAM-SHA-1".into())],
        );
        let (_c, a) = mq_connect(&b, t, c);
        assert_eq!(a.code, 0x8C, "bad authentication method");
        // AUTH without a method agreed at CONNECT is a protocol error.
        let (mut c, _) = mq_connect(&b, t, v5(&id_on(0, "auth2"), vec![]));
        c.send(&Packet::Auth(Auth::default()));
        let got = drain(&mut *c, QUIET);
        assert!(has_disconnect(&got, 0x82), "{got:?}");
    }
}

#[test]
fn server_disconnect_carries_a_reason_string() {
    let b = Broker::start();
    let (mut c, _) = mq_connect(&b, Transport::Tcp, v5(&id_on(0, "rs"), vec![]));
    publ(&mut *c, "bad/#", QoS::AtMostOnce, 0, b"x", vec![]);
    let got = drain(&mut *c, QUIET);
    let d = got.iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d),
        _ => None,
    });
    let d = d.expect("DISCONNECT");
    assert_eq!(d.reason, 0x82);
    assert!(d.properties.reason_string().is_some_and(|s| !s.is_empty()));
}

#[test]
fn shared_subscriptions_one_member_each_across_shards_mqtt_4_8_2() {
    let b = Broker::start();
    for t in TRANSPORTS {
        // Members on both shards, a publisher on each shard.
        let mut members: Vec<Box<dyn Mq>> = (0..4)
            .map(|i| {
                let (mut m, _) =
                    mq_connect(&b, t, v5(&id_on(i % 2, &format!("sh-{t:?}-{i}")), vec![]));
                assert_eq!(
                    sub(
                        &mut *m,
                        1,
                        &[("$share/g/sh/+", q(QoS::AtLeastOnce))],
                        vec![]
                    ),
                    [1]
                );
                m
            })
            .collect();
        let (mut p0, _) = mq_connect(&b, t, v5(&id_on(0, "sh-pub0"), vec![]));
        let (mut p1, _) = mq_connect(&b, t, v5(&id_on(1, "sh-pub1"), vec![]));
        for i in 0..40u16 {
            let p = if i % 2 == 0 { &mut p0 } else { &mut p1 };
            publ(
                &mut **p,
                "sh/x",
                QoS::AtLeastOnce,
                i + 1,
                format!("{i}").as_bytes(),
                vec![],
            );
        }
        let mut seen = Vec::new();
        let mut per_member = Vec::new();
        for m in &mut members {
            let got = publishes(drain(&mut **m, QUIET));
            for g in &got {
                m.send(&Packet::PubAck(tarta::session::ack(g.packet_id, 0)));
            }
            per_member.push(got.len());
            seen.extend(
                got.into_iter()
                    .map(|g| String::from_utf8(g.payload.to_vec()).unwrap()),
            );
        }
        seen.sort_by_key(|s| s.parse::<u32>().unwrap());
        assert_eq!(
            seen,
            (0..40).map(|i| i.to_string()).collect::<Vec<_>>(),
            "each message to exactly one member"
        );
        assert!(
            per_member.iter().all(|n| *n > 0),
            "round robin reaches every member: {per_member:?}"
        );

        // A member that goes away without acknowledging: its QoS 1 messages
        // go to another member.
        let (mut lazy, _) = mq_connect(&b, t, v5(&id_on(1, &format!("sh-lazy-{t:?}")), vec![]));
        sub(
            &mut *lazy,
            1,
            &[("$share/h/shl", q(QoS::AtLeastOnce))],
            vec![],
        );
        let (mut busy, _) = mq_connect(&b, t, v5(&id_on(0, &format!("sh-busy-{t:?}")), vec![]));
        sub(
            &mut *busy,
            1,
            &[("$share/h/shl", q(QoS::AtLeastOnce))],
            vec![],
        );
        for i in 0..10u16 {
            publ(
                &mut *p0,
                "shl",
                QoS::AtLeastOnce,
                100 + i,
                format!("{i}").as_bytes(),
                vec![],
            );
        }
        std::thread::sleep(QUIET);
        drop(lazy); // received some, acknowledged none
        let got = publishes(drain(&mut *busy, Duration::from_millis(1500)));
        let mut ids: Vec<u32> = got
            .iter()
            .map(|g| std::str::from_utf8(&g.payload).unwrap().parse().unwrap())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(
            ids,
            (0..10).collect::<Vec<_>>(),
            "all ten reach the remaining member"
        );
    }
}
