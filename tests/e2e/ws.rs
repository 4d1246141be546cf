//! MQTT over WebSocket: the handshake, framing rules and close codes with a
//! byte-level client, and MQTT behaviour with rumqttc's WebSocket transport,
//! across shards and across transports.

use crate::harness::{connect_packet, encode, id_on, rq, rq_ws_opts, ws_request, Broker, WsRaw};
use rumqttc::QoS;
use std::time::Duration;
use tarta_proto::mqtt::{Packet, Protocol, Publish, QoS as Q, SubOptions, Subscribe};

const T: Duration = Duration::from_secs(5);

fn status(b: &Broker, req: &str) -> String {
    let (_, head) = WsRaw::handshake(b.ws_port, req);
    head.lines().next().unwrap_or("").to_string()
}

#[test]
fn handshake_answers_with_precise_statuses() {
    let b = Broker::start();
    let ok = status(&b, &ws_request("/mqtt", "Sec-WebSocket-Protocol: mqtt\r\n"));
    assert_eq!(ok, "HTTP/1.1 101 Switching Protocols");
    let (_, head) = WsRaw::handshake(
        b.ws_port,
        &ws_request("/mqtt", "Sec-WebSocket-Protocol: mqttv3.1\r\n"),
    );
    assert!(head.contains("Sec-WebSocket-Protocol: mqttv3.1"), "{head}");
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "RFC 6455 example key"
    );
    let (_, head) = WsRaw::handshake(b.ws_port, &ws_request("/mqtt", ""));
    assert!(
        head.starts_with("HTTP/1.1 101") && !head.contains("Sec-WebSocket-Protocol"),
        "none offered: accepted by default"
    );
    assert!(status(&b, &ws_request("/elsewhere", "")).starts_with("HTTP/1.1 404"));
    assert!(
        status(&b, &ws_request("/mqtt", "Sec-WebSocket-Protocol: chat\r\n"))
            .starts_with("HTTP/1.1 400")
    );
    assert!(status(&b, "GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n").starts_with("HTTP/1.1 426"));
    let v8 = ws_request("/mqtt", "").replace("Version: 13", "Version: 8");
    assert!(status(&b, &v8).starts_with("HTTP/1.1 426"));
    assert!(status(&b, "POST /mqtt HTTP/1.1\r\nHost: x\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(status(&b, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").starts_with("HTTP/1.1 200"));
    let huge = format!("GET /mqtt HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000));
    assert!(status(&b, &huge).starts_with("HTTP/1.1 431"));
    assert!(crate::harness::sys_counter(b.port, "ws_rejected") >= 6);
}

#[test]
fn origin_allow_list_and_strict_subprotocol_are_configurable() {
    let cfg = crate::errors::write_config(
        "ws_origins = [\"https://app.example\"]\nws_require_subprotocol = true\n",
    );
    let b = Broker::start_with(&["--config", &cfg]);
    let p = "Sec-WebSocket-Protocol: mqtt\r\n";
    assert!(status(
        &b,
        &ws_request("/mqtt", &format!("{p}Origin: https://evil.example\r\n"))
    )
    .starts_with("HTTP/1.1 403"));
    assert!(status(
        &b,
        &ws_request("/mqtt", &format!("{p}Origin: https://app.example\r\n"))
    )
    .starts_with("HTTP/1.1 101"));
    assert!(status(&b, &ws_request("/mqtt", "")).starts_with("HTTP/1.1 400"));
}

#[test]
fn several_packets_per_frame_and_packets_across_frames() {
    let b = Broker::start();
    let (mut sub, ack) = WsRaw::connect(
        b.ws_port,
        connect_packet(Protocol::V311, &id_on(1, "wsf-sub"), true, 0),
    );
    assert_eq!(ack.code, 0);
    // SUBSCRIBE and PINGREQ in one frame (MQTT-6.0.0-2).
    let mut two = encode(
        &Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(
                "wsf/#".into(),
                SubOptions {
                    qos: Q::AtLeastOnce,
                    ..Default::default()
                },
            )],
            properties: Default::default(),
        }),
        Protocol::V311,
    );
    two.extend(encode(&Packet::PingReq, Protocol::V311));
    sub.send_frame(0x2, true, &two);
    assert!(matches!(sub.recv(), Some(Packet::SubAck(_))));
    assert!(matches!(sub.recv(), Some(Packet::PingResp)));

    // A PUBLISH split over a fragmented message, with a ping in between (MQTT-6.0.0-3).
    let (mut publ, _) = WsRaw::connect(
        b.ws_port,
        connect_packet(Protocol::V311, &id_on(0, "wsf-pub"), true, 0),
    );
    let p = encode(
        &Packet::Publish(Publish {
            dup: false,
            qos: Q::AtLeastOnce,
            retain: false,
            topic: "wsf/x".into(),
            packet_id: 7,
            properties: Default::default(),
            payload: bytes::Bytes::from(vec![b'z'; 300]),
        }),
        Protocol::V311,
    );
    publ.send_frame(0x2, false, &p[..3]);
    publ.send_frame(0x9, true, b"hi");
    publ.send_frame(0x0, false, &p[3..200]);
    publ.send_frame(0x0, true, &p[200..]);
    // The pong comes first, then the PUBACK.
    assert_eq!(publ.recv_frame(), Some((0xA, b"hi".to_vec())));
    assert!(matches!(publ.recv(), Some(Packet::PubAck(a)) if a.packet_id == 7));
    match sub.recv() {
        Some(Packet::Publish(m)) => assert_eq!((m.topic.as_str(), m.payload.len()), ("wsf/x", 300)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn framing_violations_close_with_their_codes() {
    let b = Broker::start();
    let cases: [(&str, Vec<u8>, u16); 3] = [
        (
            "text frame (MQTT-6.0.0-1)",
            crate::harness::client_frame(0x1, true, b"\x10"),
            1003,
        ),
        ("unmasked frame", vec![0x82, 0x02, 0xc0, 0x00], 1002),
        (
            "reserved opcode",
            crate::harness::client_frame(0x3, true, b"x"),
            1002,
        ),
    ];
    for (what, bytes, code) in cases {
        let (mut c, _) = WsRaw::connect(
            b.ws_port,
            connect_packet(Protocol::V311, &id_on(0, "wsbad"), true, 0),
        );
        std::io::Write::write_all(&mut c.s, &bytes).unwrap();
        let (op, payload) = c.recv_frame().expect(what);
        assert_eq!(op, 0x8, "{what}: close frame");
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), code, "{what}");
        assert!(c.recv_frame().is_none(), "{what}: then the socket closes");
    }
    assert!(crate::harness::sys_counter(b.port, "closed_bad_input") >= 3);
}

#[test]
fn close_handshake_is_answered_and_publishes_the_will() {
    let b = Broker::start();
    let (mut watch, _) = WsRaw::connect(
        b.ws_port,
        connect_packet(Protocol::V311, &id_on(1, "wsw-watch"), true, 0),
    );
    watch.send_frame(
        0x2,
        true,
        &encode(
            &Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: vec![("wsw/will".into(), SubOptions::default())],
                properties: Default::default(),
            }),
            Protocol::V311,
        ),
    );
    assert!(matches!(watch.recv(), Some(Packet::SubAck(_))));
    let mut c = connect_packet(Protocol::V311, &id_on(0, "wsw"), true, 0);
    c.will = Some(tarta_proto::mqtt::Will {
        topic: "wsw/will".into(),
        payload: bytes::Bytes::from_static(b"ws gone"),
        qos: Q::AtMostOnce,
        retain: false,
        properties: Default::default(),
    });
    let (mut c, _) = WsRaw::connect(b.ws_port, c);
    c.send_frame(0x8, true, &1000u16.to_be_bytes());
    assert_eq!(
        c.recv_frame(),
        Some((0x8, 1000u16.to_be_bytes().to_vec())),
        "close echoed"
    );
    assert!(c.recv_frame().is_none());
    // No MQTT DISCONNECT was sent: the will goes out.
    assert!(matches!(watch.recv(), Some(Packet::Publish(p)) if &p.payload[..] == b"ws gone"));
}

#[tokio::test]
async fn tcp_and_websocket_clients_talk_across_shards_both_ways() {
    let b = Broker::start();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let mut ws_sub = rq::connect(rq_ws_opts(b.ws_port, &id_on(1, "x-ws-sub"))).await;
        ws_sub.subscribe("x/tcp2ws", qos).await;
        let mut tcp_sub = rq::connect(rq::opts(b.port, &id_on(1, "x-tcp-sub"))).await;
        tcp_sub.subscribe("x/ws2tcp", qos).await;
        let tcp_pub = rq::connect(rq::opts(b.port, &id_on(0, "x-tcp-pub"))).await;
        let ws_pub = rq::connect(rq_ws_opts(b.ws_port, &id_on(0, "x-ws-pub"))).await;
        for i in 0..20 {
            tcp_pub
                .client
                .publish("x/tcp2ws", qos, false, format!("t{i}"))
                .await
                .unwrap();
            ws_pub
                .client
                .publish("x/ws2tcp", qos, false, format!("w{i}"))
                .await
                .unwrap();
        }
        let a: Vec<_> = ws_sub
            .drain_publishes(Duration::from_millis(700))
            .await
            .into_iter()
            .map(|p| p.payload)
            .collect();
        let b2: Vec<_> = tcp_sub
            .drain_publishes(Duration::from_millis(700))
            .await
            .into_iter()
            .map(|p| p.payload)
            .collect();
        assert_eq!(
            a,
            (0..20)
                .map(|i| bytes::Bytes::from(format!("t{i}")))
                .collect::<Vec<_>>(),
            "{qos:?} TCP -> WS"
        );
        assert_eq!(
            b2,
            (0..20)
                .map(|i| bytes::Bytes::from(format!("w{i}")))
                .collect::<Vec<_>>(),
            "{qos:?} WS -> TCP"
        );
        for c in [ws_sub, tcp_sub, tcp_pub, ws_pub] {
            c.disconnect().await;
        }
    }
}

#[tokio::test]
async fn websocket_sessions_retained_and_takeover_match_tcp() {
    let b = Broker::start();
    // Retained, published over TCP, delivered to a WS subscriber.
    let tcp = rq::connect(rq::opts(b.port, &id_on(0, "wsr-pub"))).await;
    tcp.client
        .publish("wsr/t", QoS::AtLeastOnce, true, "kept")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Persistent WS session, queued while away.
    let id = id_on(1, "wsr-sub");
    let mut o = rq_ws_opts(b.ws_port, &id);
    o.set_clean_session(false);
    let mut s = rq::connect(o.clone()).await;
    s.subscribe("wsr/#", QoS::AtLeastOnce).await;
    let p = s.next_publish(T).await.unwrap();
    assert!(p.retain && &p.payload[..] == b"kept");
    s.disconnect().await;
    tcp.client
        .publish("wsr/q", QoS::AtLeastOnce, false, "while away")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Comes back over TCP: same session (transport does not matter).
    let mut back = rq::opts(b.port, &id);
    back.set_clean_session(false);
    let mut s = rq::connect(back).await;
    let p = s.next_publish(T).await.unwrap();
    assert_eq!(&p.payload[..], b"while away");
    // And a WS connection with the same id takes it over.
    let _ws = rq::connect(o).await;
    assert!(
        s.task.await.unwrap().is_some(),
        "the TCP connection was closed by take-over"
    );
}

#[tokio::test]
async fn one_mebibyte_message_to_a_websocket_subscriber() {
    let b = Broker::start();
    let mut sub = rq::connect(rq_ws_opts(b.ws_port, &id_on(1, "wsbig-sub"))).await;
    sub.subscribe("wsbig", QoS::AtLeastOnce).await;
    let publ = rq::connect(rq::opts(b.port, &id_on(0, "wsbig-pub"))).await;
    let payload: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 253) as u8).collect();
    let start = std::time::Instant::now();
    publ.client
        .publish("wsbig", QoS::AtLeastOnce, false, payload.clone())
        .await
        .unwrap();
    let p = sub
        .next_publish(Duration::from_secs(20))
        .await
        .expect("1 MiB over WS");
    assert!(p.payload[..] == payload[..]);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn forwarded_for_from_a_trusted_proxy_is_the_logged_peer() {
    let cfg = crate::errors::write_config("ws_trusted_proxies = [\"127.0.0.1\"]\n");
    let b = Broker::start_with(&["--config", &cfg]);
    let req = ws_request(
        "/mqtt",
        "Sec-WebSocket-Protocol: mqtt\r\nX-Forwarded-For: 203.0.113.9\r\n",
    );
    let (mut c, head) = WsRaw::handshake(b.ws_port, &req);
    assert!(head.starts_with("HTTP/1.1 101"));
    c.send_frame(
        0x2,
        true,
        &encode(
            &Packet::Connect(Box::new(connect_packet(Protocol::V311, "xff", true, 0))),
            Protocol::V311,
        ),
    );
    assert!(matches!(c.recv(), Some(Packet::ConnAck(_))));
    c.send_frame(0x2, true, &[0x00, 0x00]); // malformed: logged with the peer
    let _ = c.recv_frame();
    std::thread::sleep(Duration::from_millis(300));
    assert!(b.log().contains("203.0.113.9"), "{}", b.log());
}

/// tungstenite as an independent raw WebSocket client.
mod with_tungstenite {
    use crate::harness::{connect_packet, encode, id_on, Broker};
    use tarta_proto::mqtt::{self, Packet, Protocol};
    use tungstenite::client::IntoClientRequest;
    use tungstenite::protocol::frame::coding::CloseCode;
    use tungstenite::{Message, WebSocket};

    type Ws = WebSocket<std::net::TcpStream>;

    fn open(b: &Broker, protocol: Option<&str>) -> Result<Ws, tungstenite::Error> {
        let mut req = format!("ws://127.0.0.1:{}/mqtt", b.ws_port).into_client_request()?;
        if let Some(p) = protocol {
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
        }
        let s = std::net::TcpStream::connect(("127.0.0.1", b.ws_port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let (ws, resp) = tungstenite::client::client(req, s).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::ConnectionClosed,
        })?;
        if let Some(p) = protocol {
            assert_eq!(resp.headers().get("Sec-WebSocket-Protocol").unwrap(), p);
        }
        Ok(ws)
    }

    fn recv_packet(ws: &mut Ws) -> Packet {
        loop {
            match ws.read().unwrap() {
                Message::Binary(b) => {
                    let mut buf = bytes::BytesMut::from(&b[..]);
                    return mqtt::decode(&mut buf, Protocol::V311, u32::MAX)
                        .unwrap()
                        .unwrap();
                }
                Message::Pong(_) | Message::Ping(_) => {}
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn mqtt_ping_pong_and_close_codes_with_tungstenite() {
        let b = Broker::start();
        let mut ws = open(&b, Some("mqtt")).expect("upgrade with subprotocol mqtt");
        let c = connect_packet(Protocol::V311, &id_on(0, "tung"), true, 0);
        ws.send(Message::Binary(
            encode(&Packet::Connect(Box::new(c)), Protocol::V311).into(),
        ))
        .unwrap();
        assert!(matches!(recv_packet(&mut ws), Packet::ConnAck(a) if a.code == 0));
        // WebSocket ping is answered with a pong carrying the same data.
        ws.send(Message::Ping(bytes::Bytes::from_static(b"x")))
            .unwrap();
        match ws.read().unwrap() {
            Message::Pong(p) => assert_eq!(&p[..], b"x"),
            other => panic!("{other:?}"),
        }
        // MQTT PINGREQ over WebSocket.
        ws.send(Message::Binary(
            encode(&Packet::PingReq, Protocol::V311).into(),
        ))
        .unwrap();
        assert!(matches!(recv_packet(&mut ws), Packet::PingResp));
        // A text frame closes with 1003 (MQTT-6.0.0-1).
        ws.send(Message::Text("hello".into())).unwrap();
        loop {
            match ws.read() {
                Ok(Message::Close(Some(f))) => {
                    assert_eq!(f.code, CloseCode::Unsupported);
                    break;
                }
                Ok(Message::Close(None)) => panic!("close without a code"),
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }

        // Wrong path: the handshake fails with 404.
        let mut req = format!("ws://127.0.0.1:{}/nope", b.ws_port)
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
        let s = std::net::TcpStream::connect(("127.0.0.1", b.ws_port)).unwrap();
        match tungstenite::client::client(req, s) {
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                assert_eq!(r.status(), 404)
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        // Clean close handshake from the client.
        let mut ws = open(&b, None).expect("no subprotocol is accepted by default");
        ws.close(None).unwrap();
        loop {
            match ws.read() {
                Ok(Message::Close(_)) | Err(tungstenite::Error::ConnectionClosed) => break,
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
    }
}
