//! Codec tests: quickcheck round trips over valid packets at every protocol
//! level, chunked streams, arbitrary and mutated input, and hand-written
//! cases for each well-formedness rule (named by spec statement id), known
//! byte vectors, zero-copy and allocation-free decoding.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::ByteStr;
use bytes::{Bytes, BytesMut};
use quickcheck::{Arbitrary, Gen, QuickCheck, TestResult};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use Protocol::{V31, V311, V5};

/// Large enough for any packet.
const MAX: u32 = u32::MAX;
const LEVELS: [Protocol; 3] = [V31, V311, V5];

// ---------------------------------------------------------------------------
// Helpers

fn enc(p: &Packet, v: Protocol) -> BytesMut {
    let mut out = BytesMut::new();
    encode(p, v, &mut out);
    out
}

/// Decodes one packet from `bytes`, which must hold exactly that packet.
fn dec(bytes: &[u8], v: Protocol) -> Result<Packet, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let p = decode(&mut buf, v, MAX)?.expect("complete packet");
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    Ok(p)
}

fn malformed(bytes: &[u8], v: Protocol) {
    match dec(bytes, v) {
        Err(DecodeError::Malformed(_)) => {}
        other => panic!("expected Malformed for {bytes:02x?}, got {other:?}"),
    }
}

fn protocol_error(bytes: &[u8], v: Protocol) {
    match dec(bytes, v) {
        Err(DecodeError::Protocol(_)) => {}
        other => panic!("expected Protocol error for {bytes:02x?}, got {other:?}"),
    }
}

/// A packet from a type byte and a body (remaining length < 128).
fn pkt(first: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![first, body.len() as u8];
    v.extend_from_slice(body);
    v
}

/// A 5.0 PUBLISH QoS 0 to "t" with the given raw property bytes.
fn publish_v5_props(props: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 1, b't', props.len() as u8];
    body.extend_from_slice(props);
    pkt(0x30, &body)
}

/// A 5.0 CONNECT with client id "c" and the given raw property bytes.
fn connect_v5_props(props: &[u8]) -> Vec<u8> {
    let mut body = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        5,
        0x02,
        0,
        60,
        props.len() as u8,
    ];
    body.extend_from_slice(props);
    body.extend_from_slice(&[0, 1, b'c']);
    pkt(0x10, &body)
}

/// A CONNECT with the given name, level and flags and client id "c", nothing else.
fn connect_raw(name: &[u8], level: u8, flags: u8) -> Vec<u8> {
    let mut body = vec![0, name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(&[level, flags, 0, 60]);
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(&[0, 1, b'c']);
    pkt(0x10, &body)
}

// ---------------------------------------------------------------------------
// Generators of valid packets

fn pick<T: Copy>(g: &mut Gen, xs: &[T]) -> T {
    *g.choose(xs).unwrap()
}

fn below(g: &mut Gen, n: usize) -> usize {
    usize::arbitrary(g) % n
}

/// Valid MQTT UTF-8 (multi-byte characters, no NUL), at least `min` chars.
fn string(g: &mut Gen, min: usize) -> ByteStr {
    const CHARS: &[char] = &[
        'a', 'b', 'Z', '0', '/', '+', '#', ' ', '$', 'é', '€', '😀', '\u{7f}',
    ];
    let n = min + below(g, 6);
    ByteStr::from((0..n).map(|_| pick(g, CHARS)).collect::<String>())
}

fn bytes(g: &mut Gen, max: usize) -> Bytes {
    let n = below(g, max + 1);
    Bytes::from((0..n).map(|_| u8::arbitrary(g)).collect::<Vec<u8>>())
}

fn qos(g: &mut Gen) -> QoS {
    pick(g, &[QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
}

fn nonzero_u16(g: &mut Gen) -> u16 {
    u16::arbitrary(g).max(1)
}

fn flag(g: &mut Gen) -> u8 {
    u8::from(bool::arbitrary(g))
}

/// A valid value for property `id`.
fn property(g: &mut Gen, id: u8) -> Property {
    type P = Property;
    match id {
        P::PAYLOAD_FORMAT_INDICATOR => P::PayloadFormatIndicator(flag(g)),
        P::MESSAGE_EXPIRY_INTERVAL => P::MessageExpiryInterval(u32::arbitrary(g)),
        P::CONTENT_TYPE => P::ContentType(string(g, 0)),
        P::RESPONSE_TOPIC => P::ResponseTopic(string(g, 1)),
        P::CORRELATION_DATA => P::CorrelationData(bytes(g, 8)),
        P::SUBSCRIPTION_IDENTIFIER => {
            let any = u32::arbitrary(g) % 268_435_455 + 1;
            P::SubscriptionIdentifier(pick(g, &[1, 127, 128, 16_384, 268_435_455, any]))
        }
        P::SESSION_EXPIRY_INTERVAL => P::SessionExpiryInterval(u32::arbitrary(g)),
        P::ASSIGNED_CLIENT_IDENTIFIER => P::AssignedClientIdentifier(string(g, 1)),
        P::SERVER_KEEP_ALIVE => P::ServerKeepAlive(u16::arbitrary(g)),
        P::AUTHENTICATION_METHOD => P::AuthenticationMethod(string(g, 1)),
        P::AUTHENTICATION_DATA => P::AuthenticationData(bytes(g, 8)),
        P::REQUEST_PROBLEM_INFORMATION => P::RequestProblemInformation(flag(g)),
        P::WILL_DELAY_INTERVAL => P::WillDelayInterval(u32::arbitrary(g)),
        P::REQUEST_RESPONSE_INFORMATION => P::RequestResponseInformation(flag(g)),
        P::RESPONSE_INFORMATION => P::ResponseInformation(string(g, 0)),
        P::SERVER_REFERENCE => P::ServerReference(string(g, 1)),
        P::REASON_STRING => P::ReasonString(string(g, 0)),
        P::RECEIVE_MAXIMUM => P::ReceiveMaximum(nonzero_u16(g)),
        P::TOPIC_ALIAS_MAXIMUM => P::TopicAliasMaximum(u16::arbitrary(g)),
        P::TOPIC_ALIAS => P::TopicAlias(nonzero_u16(g)),
        P::MAXIMUM_QOS => P::MaximumQoS(flag(g)),
        P::RETAIN_AVAILABLE => P::RetainAvailable(flag(g)),
        P::USER_PROPERTY => P::UserProperty(string(g, 0), string(g, 0)),
        P::MAXIMUM_PACKET_SIZE => P::MaximumPacketSize(u32::arbitrary(g).max(1)),
        P::WILDCARD_SUBSCRIPTION_AVAILABLE => P::WildcardSubscriptionAvailable(flag(g)),
        P::SUBSCRIPTION_IDENTIFIER_AVAILABLE => P::SubscriptionIdentifierAvailable(flag(g)),
        P::SHARED_SUBSCRIPTION_AVAILABLE => P::SharedSubscriptionAvailable(flag(g)),
        _ => unreachable!("unknown property id {id:#x}"),
    }
}

// Which properties each packet type may carry (MQTT 5.0 §2.2.2.2), written
// out independently of the decoder's table. An id listed twice may repeat.
const CONNECT_P: &[u8] = &[0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x27, 0x26, 0x26];
const WILL_P: &[u8] = &[0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26, 0x26];
const CONNACK_P: &[u8] = &[
    0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x27, 0x28, 0x29, 0x2A,
    0x26, 0x26,
];
const PUBLISH_P: &[u8] = &[0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x0B, 0x23, 0x26, 0x26];
const ACK_P: &[u8] = &[0x1F, 0x26, 0x26];
const SUBSCRIBE_P: &[u8] = &[0x0B, 0x26, 0x26];
const UNSUBSCRIBE_P: &[u8] = &[0x26, 0x26];
const DISCONNECT_P: &[u8] = &[0x11, 0x1C, 0x1F, 0x26, 0x26];
const AUTH_P: &[u8] = &[0x15, 0x16, 0x1F, 0x26, 0x26];

/// Empty for 3.x; for 5.0 a random subset of `ids` in random order.
fn props(g: &mut Gen, v: Protocol, ids: &[u8]) -> Properties {
    if !v.is_v5() || bool::arbitrary(g) {
        return Properties::default();
    }
    let mut list = Vec::new();
    for &id in ids {
        if below(g, 3) == 0 {
            list.push(property(g, id));
        }
    }
    for i in (1..list.len()).rev() {
        list.swap(i, below(g, i + 1));
    }
    Properties(list)
}

fn reason(g: &mut Gen, v: Protocol, codes: &[u8]) -> u8 {
    if v.is_v5() {
        pick(g, codes)
    } else {
        0
    }
}

fn connect(g: &mut Gen, v: Protocol) -> Connect {
    let will = bool::arbitrary(g).then(|| Will {
        topic: string(g, 1),
        payload: bytes(g, 10),
        qos: qos(g),
        retain: bool::arbitrary(g),
        properties: props(g, v, WILL_P),
    });
    let username = bool::arbitrary(g).then(|| string(g, 0));
    // MQTT-3.1.2-22: no password without a user name before 5.0.
    let password = (bool::arbitrary(g) && (v.is_v5() || username.is_some())).then(|| bytes(g, 8));
    Connect {
        protocol: v,
        clean_start: bool::arbitrary(g),
        keep_alive: u16::arbitrary(g),
        client_id: string(g, 0),
        will,
        username,
        password,
        properties: props(g, v, CONNECT_P),
        // 3.x bridges set the level's top bit; 5.0 has no such bit.
        bridge: !v.is_v5() && bool::arbitrary(g),
    }
}

fn publish(g: &mut Gen, v: Protocol) -> Publish {
    let qos = qos(g);
    let properties = props(g, v, PUBLISH_P);
    let min_topic = usize::from(properties.topic_alias().is_none());
    Publish {
        dup: qos != QoS::AtMostOnce && bool::arbitrary(g),
        qos,
        retain: bool::arbitrary(g),
        topic: string(g, min_topic),
        packet_id: if qos == QoS::AtMostOnce {
            0
        } else {
            nonzero_u16(g)
        },
        properties,
        payload: {
            let max = if below(g, 10) == 0 { 300 } else { 12 };
            bytes(g, max)
        },
    }
}

fn ack(g: &mut Gen, v: Protocol) -> Ack {
    Ack {
        packet_id: u16::arbitrary(g),
        reason: reason(g, v, &[0, 0, 0x10, 0x80, 0x92]),
        properties: props(g, v, ACK_P),
    }
}

fn packet(g: &mut Gen, v: Protocol) -> Packet {
    let kinds = if v.is_v5() { 15 } else { 14 };
    match below(g, kinds) {
        0 => Packet::Connect(Box::new(connect(g, v))),
        1 => Packet::ConnAck(ConnAck {
            session_present: v != V31 && bool::arbitrary(g),
            code: reason(g, v, &[0, 0x80, 0x85, 0x86]).max(if v.is_v5() {
                0
            } else {
                below(g, 6) as u8
            }),
            properties: props(g, v, CONNACK_P),
        }),
        2 => Packet::Publish(publish(g, v)),
        3 => Packet::PubAck(ack(g, v)),
        4 => Packet::PubRec(ack(g, v)),
        5 => Packet::PubRel(ack(g, v)),
        6 => Packet::PubComp(ack(g, v)),
        7 => Packet::Subscribe(Subscribe {
            packet_id: nonzero_u16(g),
            filters: (0..1 + below(g, 3))
                .map(|_| {
                    let mut o = SubOptions {
                        qos: qos(g),
                        ..SubOptions::default()
                    };
                    if v.is_v5() {
                        o.no_local = bool::arbitrary(g);
                        o.retain_as_published = bool::arbitrary(g);
                        o.retain_handling = below(g, 3) as u8;
                    }
                    (string(g, 1), o)
                })
                .collect(),
            properties: props(g, v, SUBSCRIBE_P),
        }),
        8 => Packet::SubAck(SubAck {
            packet_id: u16::arbitrary(g),
            codes: (0..1 + below(g, 3))
                .map(|_| pick(g, &[0, 1, 2, 0x80, 0x87]))
                .collect(),
            properties: props(g, v, ACK_P),
        }),
        9 => Packet::Unsubscribe(Unsubscribe {
            packet_id: nonzero_u16(g),
            filters: (0..1 + below(g, 3)).map(|_| string(g, 1)).collect(),
            properties: props(g, v, UNSUBSCRIBE_P),
        }),
        10 => Packet::UnsubAck(UnsubAck {
            packet_id: u16::arbitrary(g),
            codes: if v.is_v5() {
                (0..1 + below(g, 3))
                    .map(|_| pick(g, &[0, 0x11, 0x87]))
                    .collect()
            } else {
                Vec::new()
            },
            properties: props(g, v, ACK_P),
        }),
        11 => Packet::PingReq,
        12 => Packet::PingResp,
        13 => Packet::Disconnect(Disconnect {
            reason: reason(g, v, &[0, 0, 0x04, 0x8E]),
            properties: props(g, v, DISCONNECT_P),
        }),
        _ => Packet::Auth(Auth {
            reason: pick(g, &[0, 0x18, 0x19]),
            properties: props(g, v, AUTH_P),
        }),
    }
}

/// A valid packet for protocol level `.0`.
#[derive(Debug, Clone)]
struct Arb(Protocol, Packet);

impl Arbitrary for Arb {
    fn arbitrary(g: &mut Gen) -> Self {
        let v = pick(g, &LEVELS);
        Arb(v, packet(g, v))
    }
}

/// Several valid packets of one level and the chunk sizes to deliver them in.
#[derive(Debug, Clone)]
struct Stream(Protocol, Vec<Packet>, Vec<usize>);

impl Arbitrary for Stream {
    fn arbitrary(g: &mut Gen) -> Self {
        let v = pick(g, &LEVELS);
        let packets = (0..1 + below(g, 6)).map(|_| packet(g, v)).collect();
        let chunks = (0..1 + below(g, 20)).map(|_| 1 + below(g, 24)).collect();
        Stream(v, packets, chunks)
    }
}

fn qc() -> QuickCheck {
    QuickCheck::new().tests(3000).max_tests(30_000)
}

// ---------------------------------------------------------------------------
// Properties

fn round_trip(Arb(v, p): Arb) -> TestResult {
    let bytes = enc(&p, v);
    if bytes.len() != encoded_len(&p, v) {
        return TestResult::error(format!(
            "encoded {} bytes, encoded_len {}",
            bytes.len(),
            encoded_len(&p, v)
        ));
    }
    if frame_len(&bytes) != Ok(Some(bytes.len())) {
        return TestResult::error("frame_len disagrees");
    }
    let mut buf = bytes.clone();
    match decode(&mut buf, v, bytes.len() as u32) {
        Ok(Some(q)) if q == p && buf.is_empty() => {}
        other => return TestResult::error(format!("decoded {other:?} ({} bytes left)", buf.len())),
    }
    if let Packet::Publish(publish) = &p {
        let mut header = BytesMut::new();
        encode_publish_header(publish, v, &mut header);
        header.extend_from_slice(&publish.payload);
        if header != bytes {
            return TestResult::error("encode_publish_header + payload != encode");
        }
    }
    TestResult::passed()
}

#[test]
fn prop_round_trip_every_packet_every_level() {
    qc().quickcheck(round_trip as fn(Arb) -> TestResult);
}

fn chunked(Stream(v, packets, chunks): Stream) -> TestResult {
    let mut wire = BytesMut::new();
    for p in &packets {
        encode(p, v, &mut wire);
    }
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut sizes = chunks.iter().cycle();
    while !wire.is_empty() {
        let n = (*sizes.next().unwrap()).min(wire.len());
        buf.extend_from_slice(&wire.split_to(n));
        loop {
            match decode(&mut buf, v, MAX) {
                Ok(Some(p)) => got.push(p),
                Ok(None) => break,
                Err(e) => return TestResult::error(format!("{e}")),
            }
        }
    }
    TestResult::from_bool(got == packets && buf.is_empty())
}

#[test]
fn prop_any_chunking_of_a_stream_yields_the_same_packets() {
    qc().tests(1000)
        .quickcheck(chunked as fn(Stream) -> TestResult);
}

/// Decodes everything decodable from `bytes`; each packet must re-encode and
/// decode to itself.
fn decode_all_and_recheck(bytes: &[u8], v: Protocol, max: u32) -> TestResult {
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(p)) = decode(&mut buf, v, max) {
        let re = enc(&p, v);
        match decode(&mut re.clone(), v, MAX) {
            Ok(Some(q)) if q == p => {}
            other => return TestResult::error(format!("{p:?} re-decoded as {other:?}")),
        }
    }
    TestResult::passed()
}

fn arbitrary_bytes(bytes: Vec<u8>, level: u8, small: bool) -> TestResult {
    let v = LEVELS[usize::from(level % 3)];
    decode_all_and_recheck(&bytes, v, if small { 24 } else { MAX })
}

#[test]
fn prop_arbitrary_bytes_never_panic() {
    qc().tests(5000)
        .quickcheck(arbitrary_bytes as fn(Vec<u8>, u8, bool) -> TestResult);
}

/// Arbitrary bytes rarely get past the fixed header; mutating valid packets
/// reaches every field decoder.
fn mutated(Arb(v, p): Arb, edits: Vec<(usize, u8)>, cut: usize, level: u8) -> TestResult {
    let mut bytes = enc(&p, v).to_vec();
    for (at, b) in edits.into_iter().take(3) {
        let len = bytes.len();
        bytes[at % len] = b;
    }
    bytes.truncate(bytes.len() - cut % 3);
    // Also decode at another level: cross-level input is hostile too.
    let other = LEVELS[usize::from(level % 3)];
    let a = decode_all_and_recheck(&bytes, v, MAX);
    if a.is_error() {
        return a;
    }
    decode_all_and_recheck(&bytes, other, MAX)
}

#[test]
fn prop_mutated_packets_never_panic() {
    qc().tests(5000)
        .quickcheck(mutated as fn(Arb, Vec<(usize, u8)>, usize, u8) -> TestResult);
}

// ---------------------------------------------------------------------------
// Known byte vectors

#[test]
fn mosquitto_pub_311_connect() {
    let bytes = [
        0x10, 0x10, 0x00, 0x04, 0x4d, 0x51, 0x54, 0x54, 0x04, 0x02, 0x00, 0x3c, 0x00, 0x04, 0x74,
        0x65, 0x73, 0x74,
    ];
    // Decoded by its own level even when the connection's level is unknown yet.
    for v in LEVELS {
        let Packet::Connect(c) = dec(&bytes, v).unwrap() else {
            panic!("not a CONNECT")
        };
        assert_eq!(c.protocol, V311);
        assert_eq!(&*c.client_id, "test");
        assert_eq!(c.keep_alive, 60);
        assert!(c.clean_start);
        assert!(c.will.is_none() && c.username.is_none() && c.password.is_none());
        assert_eq!(&enc(&Packet::Connect(c), v)[..], &bytes[..]);
    }
}

#[test]
fn v31_connect_and_v5_connect_with_properties() {
    let c31 = [
        0x10, 0x12, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x0a, 0x00,
        0x04, b'a', b'b', b'c', b'd',
    ];
    let Packet::Connect(c) = dec(&c31, V311).unwrap() else {
        panic!()
    };
    assert_eq!((c.protocol, &*c.client_id, c.keep_alive), (V31, "abcd", 10));
    assert_eq!(&enc(&Packet::Connect(c), V311)[..], &c31[..]);

    // 5.0, receive maximum 20, session expiry 0x78, empty client id.
    let c5 = [
        0x10, 0x15, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x08, 0x21, 0x00,
        0x14, 0x11, 0x00, 0x00, 0x00, 0x78, 0x00, 0x00,
    ];
    let Packet::Connect(c) = dec(&c5, V5).unwrap() else {
        panic!()
    };
    assert_eq!(c.protocol, V5);
    assert_eq!(c.properties.receive_maximum(), Some(20));
    assert_eq!(c.properties.session_expiry_interval(), Some(0x78));
    assert!(c.client_id.is_empty());
    assert_eq!(&enc(&Packet::Connect(c), V5)[..], &c5[..]);
}

#[test]
fn v311_publish_and_fixed_size_packets() {
    let publish = [
        0x32, 0x0c, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x07, b'h', b'e', b'l', b'l', b'o',
    ];
    let Packet::Publish(p) = dec(&publish, V311).unwrap() else {
        panic!()
    };
    assert_eq!(
        (&*p.topic, p.qos, p.packet_id, &p.payload[..]),
        ("a/b", QoS::AtLeastOnce, 7, &b"hello"[..])
    );
    assert_eq!(dec(&[0xc0, 0x00], V311), Ok(Packet::PingReq));
    assert_eq!(dec(&[0xd0, 0x00], V5), Ok(Packet::PingResp));
    assert_eq!(
        dec(&[0xe0, 0x00], V311),
        Ok(Packet::Disconnect(Disconnect::default()))
    );
    assert_eq!(
        dec(&[0x62, 0x02, 0x12, 0x34], V311),
        Ok(Packet::PubRel(Ack {
            packet_id: 0x1234,
            reason: 0,
            properties: Properties::default()
        }))
    );
}

#[test]
fn variable_byte_integer_boundaries() {
    // MQTT 5.0 §1.5.5 table: 1..4 byte encodings.
    let cases: [(&[u8], usize); 8] = [
        (&[0x00], 0),
        (&[0x7f], 127),
        (&[0x80, 0x01], 128),
        (&[0xff, 0x7f], 16_383),
        (&[0x80, 0x80, 0x01], 16_384),
        (&[0xff, 0xff, 0x7f], 2_097_151),
        (&[0x80, 0x80, 0x80, 0x01], 2_097_152),
        (&[0xff, 0xff, 0xff, 0x7f], 268_435_455),
    ];
    for (vbi, value) in cases {
        let mut header = vec![0x30];
        header.extend_from_slice(vbi);
        assert_eq!(frame_len(&header), Ok(Some(1 + vbi.len() + value)));
        assert_eq!(frame_len(&header[..header.len() - 1]), Ok(None));
    }
    // Encoder picks the same sizes: a 16384-byte remaining length needs 3 bytes.
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: ByteStr::from("t"),
        packet_id: 0,
        properties: Properties::default(),
        payload: Bytes::from(vec![0u8; 16_384 - 3]),
    });
    let bytes = enc(&p, V311);
    assert_eq!(&bytes[..4], &[0x30, 0x80, 0x80, 0x01]);
    assert_eq!(dec(&bytes, V311), Ok(p));
    assert_eq!(frame_len(&[]), Ok(None));
}

#[test]
fn v5_compact_ack_disconnect_and_auth_forms() {
    let ack = |reason, properties| {
        Packet::PubAck(Ack {
            packet_id: 1,
            reason,
            properties,
        })
    };
    // Remaining length 2: reason 0, no properties; 3: reason only.
    assert_eq!(
        dec(&[0x40, 0x02, 0x00, 0x01], V5),
        Ok(ack(0, Properties::default()))
    );
    assert_eq!(
        dec(&[0x40, 0x03, 0x00, 0x01, 0x10], V5),
        Ok(ack(0x10, Properties::default()))
    );
    assert_eq!(
        dec(&[0x40, 0x04, 0x00, 0x01, 0x10, 0x00], V5),
        Ok(ack(0x10, Properties::default()))
    );
    assert_eq!(
        &enc(&ack(0, Properties::default()), V5)[..],
        &[0x40, 0x02, 0x00, 0x01]
    );
    assert_eq!(
        &enc(&ack(0x10, Properties::default()), V5)[..],
        &[0x40, 0x03, 0x00, 0x01, 0x10]
    );
    // 3.x drops the reason code.
    assert_eq!(
        &enc(&ack(0x10, Properties::default()), V311)[..],
        &[0x40, 0x02, 0x00, 0x01]
    );

    assert_eq!(
        dec(&[0xe0, 0x00], V5),
        Ok(Packet::Disconnect(Disconnect::default()))
    );
    assert_eq!(
        dec(&[0xe0, 0x01, 0x04], V5),
        Ok(Packet::Disconnect(Disconnect {
            reason: 0x04,
            properties: Properties::default()
        }))
    );
    assert_eq!(
        &enc(&Packet::Disconnect(Disconnect::default()), V5)[..],
        &[0xe0, 0x00]
    );
    assert_eq!(dec(&[0xf0, 0x00], V5), Ok(Packet::Auth(Auth::default())));
}

#[test]
fn v3_connack_has_no_properties_and_unsuback_no_codes() {
    let connack = Packet::ConnAck(ConnAck {
        session_present: true,
        code: 0,
        properties: Properties::default(),
    });
    assert_eq!(dec(&[0x20, 0x02, 0x01, 0x00], V311), Ok(connack.clone()));
    malformed(&[0x20, 0x03, 0x01, 0x00, 0x00], V311);
    // MQTT-3.2.2-1: reserved acknowledge flags.
    malformed(&[0x20, 0x02, 0x02, 0x00], V311);
    assert_eq!(&enc(&connack, V311)[..], &[0x20, 0x02, 0x01, 0x00]);
    // 5.0 CONNACK always carries a property length.
    assert_eq!(&enc(&connack, V5)[..], &[0x20, 0x03, 0x01, 0x00, 0x00]);

    let unsuback = Packet::UnsubAck(UnsubAck {
        packet_id: 5,
        codes: Vec::new(),
        properties: Properties::default(),
    });
    assert_eq!(dec(&[0xb0, 0x02, 0x00, 0x05], V311), Ok(unsuback));
    malformed(&[0xb0, 0x03, 0x00, 0x05, 0x00], V311);
}

// ---------------------------------------------------------------------------
// Well-formedness rules, one test each

#[test]
fn vbi_longer_than_4_bytes_is_malformed_mqtt_1_5_5() {
    let bytes = [0x30, 0x80, 0x80, 0x80, 0x80, 0x01];
    assert!(matches!(frame_len(&bytes), Err(DecodeError::Malformed(_))));
    // Reported as soon as the fourth length byte shows a continuation bit.
    malformed(&bytes[..5], V311);
    // Same inside properties (subscription identifier).
    malformed(&publish_v5_props(&[0x0b, 0x80, 0x80, 0x80, 0x80, 0x01]), V5);
}

#[test]
fn fixed_header_flags_mqtt_2_2_2_2() {
    for bad in [
        0x60, 0x63, 0x80, 0x8a, 0xa0, 0x41, 0x51, 0x71, 0xc1, 0xd8, 0xe2, 0x11, 0x24,
    ] {
        malformed(&pkt(bad, &[0x00, 0x01]), V311);
    }
    malformed(&pkt(0x00, &[]), V5);
}

#[test]
fn publish_qos_3_is_malformed_mqtt_3_3_1_4() {
    malformed(&pkt(0x36, &[0x00, 0x01, b't', 0x00, 0x01]), V311);
    // Rejected from the fixed header alone.
    assert!(matches!(
        decode(&mut BytesMut::from(&[0x36u8, 0x10][..]), V311, MAX),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn lengths_running_past_the_packet_are_malformed() {
    malformed(&pkt(0x30, &[0x00, 0x05, b't']), V311); // topic longer than the packet
    malformed(&pkt(0x40, &[0x00]), V311); // half a packet id
    malformed(&publish_v5_props(&[0x03, 0x00, 0x09, b'x']), V5); // string property
                                                                 // Property length larger than the rest of the packet.
    malformed(&pkt(0x30, &[0x00, 0x01, b't', 0x05, 0x01]), V5);
}

#[test]
fn trailing_bytes_are_malformed() {
    malformed(&pkt(0x40, &[0x00, 0x01, 0x00]), V311);
    malformed(&pkt(0xc0, &[0x00]), V311);
    malformed(&pkt(0xe0, &[0x00]), V311);
    let mut c = connect_raw(b"MQTT", 4, 0x02);
    c[1] += 1;
    c.push(0);
    malformed(&c, V311);
}

#[test]
fn strings_must_be_mqtt_utf8_mqtt_1_5_4_1_and_1_5_4_2() {
    malformed(&pkt(0x30, &[0x00, 0x02, 0xc3, 0x28]), V311); // invalid UTF-8
    malformed(&pkt(0x30, &[0x00, 0x02, b'a', 0x00]), V311); // U+0000
    malformed(&pkt(0x30, &[0x00, 0x03, 0xed, 0xa0, 0x80]), V311); // surrogate
    malformed(&pkt(0xa2, &[0x00, 0x01, 0x00, 0x01, 0xff]), V311); // UNSUBSCRIBE filter
}

#[test]
fn connect_reserved_flag_is_malformed_mqtt_3_1_2_3() {
    malformed(&connect_raw(b"MQTT", 4, 0x03), V311);
    malformed(&connect_raw(b"MQTT", 5, 0x01), V5);
}

#[test]
fn will_qos_without_will_flag_is_malformed_mqtt_3_1_2_11_and_13() {
    malformed(&connect_raw(b"MQTT", 4, 0x08), V311);
    malformed(&connect_raw(b"MQTT", 5, 0x10), V5);
}

#[test]
fn will_retain_without_will_flag_is_malformed_mqtt_3_1_2_15() {
    malformed(&connect_raw(b"MQTT", 4, 0x20), V311);
}

#[test]
fn will_qos_3_is_malformed_mqtt_3_1_2_14() {
    // Will flag, QoS 3, will topic "w", empty will payload.
    let body = [
        0, 4, b'M', b'Q', b'T', b'T', 4, 0x1c, 0, 60, 0, 1, b'c', 0, 1, b'w', 0, 0,
    ];
    malformed(&pkt(0x10, &body), V311);
    let mut ok = body;
    ok[7] = 0x14; // will QoS 2
    assert!(dec(&pkt(0x10, &ok), V311).is_ok());
}

#[test]
fn password_without_user_name_mqtt_3_1_2_22() {
    let body = |level: u8| {
        let mut b = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0x40, 0, 60];
        if level == 5 {
            b.push(0);
        }
        b.extend_from_slice(&[0, 1, b'c', 0, 2, b'p', b'w']);
        pkt(0x10, &b)
    };
    malformed(&body(4), V311);
    // Allowed in 5.0.
    let Packet::Connect(c) = dec(&body(5), V5).unwrap() else {
        panic!()
    };
    assert_eq!(
        (c.username, c.password),
        (None, Some(Bytes::from_static(b"pw")))
    );
}

#[test]
fn v31_user_name_flag_without_user_name_is_accepted() {
    // MQTT 3.1: "the Remaining Length field takes precedence over the User Name flag".
    let Packet::Connect(c) = dec(&connect_raw(b"MQIsdp", 3, 0xc2), V31).unwrap() else {
        panic!()
    };
    assert_eq!((c.username, c.password), (None, None));
    malformed(&connect_raw(b"MQTT", 4, 0x82), V311);
}

#[test]
fn protocol_name_and_level_mqtt_3_1_2_1_and_3_1_2_2() {
    assert_eq!(
        dec(&connect_raw(b"MQTT", 6, 0x02), V311),
        Err(DecodeError::UnsupportedProtocolVersion(6))
    );
    assert_eq!(
        dec(&connect_raw(b"MQTT", 3, 0x02), V311),
        Err(DecodeError::UnsupportedProtocolVersion(3))
    );
    assert_eq!(
        dec(&connect_raw(b"MQIsdp", 4, 0x02), V311),
        Err(DecodeError::UnsupportedProtocolVersion(4))
    );
    assert_eq!(
        DecodeError::UnsupportedProtocolVersion(6).reason_code(),
        reason::UNSUPPORTED_PROTOCOL_VERSION
    );
    protocol_error(&connect_raw(b"MQTX", 4, 0x02), V311);
}

#[test]
fn packet_id_zero_is_a_protocol_error_mqtt_2_3_1_1() {
    protocol_error(&pkt(0x32, &[0x00, 0x01, b't', 0x00, 0x00]), V311); // PUBLISH QoS 1
    protocol_error(&pkt(0x34, &[0x00, 0x01, b't', 0x00, 0x00, 0x00]), V5); // PUBLISH QoS 2
    protocol_error(&pkt(0x82, &[0x00, 0x00, 0x00, 0x01, b't', 0x00]), V311); // SUBSCRIBE
    protocol_error(&pkt(0xa2, &[0x00, 0x00, 0x00, 0x01, b't']), V311); // UNSUBSCRIBE
}

#[test]
fn subscribe_without_filters_mqtt_3_8_3_3() {
    protocol_error(&pkt(0x82, &[0x00, 0x01]), V311);
    protocol_error(&pkt(0x82, &[0x00, 0x01, 0x00]), V5);
}

#[test]
fn unsubscribe_without_filters_mqtt_3_10_3_2() {
    protocol_error(&pkt(0xa2, &[0x00, 0x01]), V311);
    protocol_error(&pkt(0xa2, &[0x00, 0x01, 0x00]), V5);
}

#[test]
fn v3_subscription_options_reserved_bits_mqtt_3_8_3_4() {
    malformed(&pkt(0x82, &[0x00, 0x01, 0x00, 0x01, b't', 0x04]), V311);
    malformed(&pkt(0x82, &[0x00, 0x01, 0x00, 0x01, b't', 0x03]), V311); // QoS 3
    malformed(&pkt(0x82, &[0x00, 0x01, 0x00, 0x01, b't', 0x80]), V31);
}

#[test]
fn v5_subscription_options_reserved_bits_mqtt_3_8_3_5() {
    malformed(&pkt(0x82, &[0x00, 0x01, 0x00, 0x00, 0x01, b't', 0x40]), V5);
    malformed(&pkt(0x82, &[0x00, 0x01, 0x00, 0x00, 0x01, b't', 0x80]), V5);
    let Packet::Subscribe(s) =
        dec(&pkt(0x82, &[0x00, 0x01, 0x00, 0x00, 0x01, b't', 0x2e]), V5).unwrap()
    else {
        panic!()
    };
    let o = SubOptions {
        qos: QoS::ExactlyOnce,
        no_local: true,
        retain_as_published: true,
        retain_handling: 2,
    };
    assert_eq!(s.filters, vec![(ByteStr::from("t"), o)]);
}

#[test]
fn v5_retain_handling_3_and_qos_3_are_protocol_errors() {
    protocol_error(&pkt(0x82, &[0x00, 0x01, 0x00, 0x00, 0x01, b't', 0x30]), V5);
    protocol_error(&pkt(0x82, &[0x00, 0x01, 0x00, 0x00, 0x01, b't', 0x03]), V5);
}

#[test]
fn no_local_on_shared_subscription_mqtt_3_8_3_4_v5() {
    let mut body = vec![0x00, 0x01, 0x00, 0x00, 0x09];
    body.extend_from_slice(b"$share/g/");
    body.push(0x04);
    protocol_error(&pkt(0x82, &body), V5);
}

#[test]
fn auth_before_v5_is_malformed() {
    malformed(&[0xf0, 0x00], V311);
    malformed(&[0xf0, 0x00], V31);
}

#[test]
fn empty_topic_without_alias_mqtt_4_7_3_1() {
    protocol_error(&pkt(0x30, &[0x00, 0x00, b'x']), V311);
    protocol_error(&pkt(0x30, &[0x00, 0x00, 0x00, b'x']), V5);
    // Empty topic with a topic alias is fine in 5.0.
    let ok = pkt(0x30, &[0x00, 0x00, 0x03, 0x23, 0x00, 0x07]);
    let Packet::Publish(p) = dec(&ok, V5).unwrap() else {
        panic!()
    };
    assert_eq!(
        (p.topic.is_empty(), p.properties.topic_alias()),
        (true, Some(7))
    );
}

#[test]
fn v5_property_not_allowed_in_packet_type() {
    protocol_error(&connect_v5_props(&[0x23, 0x00, 0x01]), V5); // topic alias in CONNECT
    protocol_error(&publish_v5_props(&[0x11, 0, 0, 0, 1]), V5); // session expiry in PUBLISH
    protocol_error(&pkt(0x40, &[0x00, 0x01, 0x00, 0x03, 0x23, 0x00, 0x01]), V5);
    // ... in PUBACK
}

#[test]
fn v5_single_valued_property_twice() {
    protocol_error(&publish_v5_props(&[0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2]), V5);
    protocol_error(&connect_v5_props(&[0x21, 0, 1, 0x21, 0, 2]), V5);
    // Subscription identifier: repeatable in PUBLISH, once in SUBSCRIBE.
    let Packet::Publish(p) = dec(&publish_v5_props(&[0x0b, 0x01, 0x0b, 0x02]), V5).unwrap() else {
        panic!()
    };
    assert_eq!(
        p.properties.subscription_identifiers().collect::<Vec<_>>(),
        vec![1, 2]
    );
    protocol_error(
        &pkt(
            0x82,
            &[
                0x00, 0x01, 0x04, 0x0b, 0x01, 0x0b, 0x02, 0x00, 0x01, b't', 0x00,
            ],
        ),
        V5,
    );
    // User properties repeat anywhere.
    let up = [0x26, 0, 1, b'k', 0, 1, b'v', 0x26, 0, 1, b'k', 0, 1, b'w'];
    let Packet::Connect(c) = dec(&connect_v5_props(&up), V5).unwrap() else {
        panic!()
    };
    assert_eq!(c.properties.user_properties().count(), 2);
}

/// Every (packet type, property) pair: accepted exactly when §2.2.2.2 allows it.
#[test]
fn v5_property_table_matches_the_spec() {
    const ALL: [u8; 27] = [
        0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x11, 0x12, 0x13, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1A,
        0x1C, 0x1F, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2A,
    ];
    let mut g = Gen::new(10);
    type Build = fn(Properties) -> Packet;
    let kinds: [(&str, &[u8], Build); 12] = [
        ("CONNECT", CONNECT_P, |properties| {
            Packet::Connect(Box::new(Connect {
                protocol: V5,
                clean_start: true,
                keep_alive: 0,
                client_id: ByteStr::from("c"),
                will: None,
                username: None,
                password: None,
                properties,
                bridge: false,
            }))
        }),
        ("will", WILL_P, |properties| {
            Packet::Connect(Box::new(Connect {
                protocol: V5,
                clean_start: true,
                keep_alive: 0,
                client_id: ByteStr::from("c"),
                will: Some(Will {
                    topic: ByteStr::from("w"),
                    payload: Bytes::new(),
                    qos: QoS::AtMostOnce,
                    retain: false,
                    properties,
                }),
                username: None,
                password: None,
                properties: Properties::default(),
                bridge: false,
            }))
        }),
        ("CONNACK", CONNACK_P, |properties| {
            Packet::ConnAck(ConnAck {
                session_present: false,
                code: 0,
                properties,
            })
        }),
        ("PUBLISH", PUBLISH_P, |properties| {
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: ByteStr::from("t"),
                packet_id: 0,
                properties,
                payload: Bytes::new(),
            })
        }),
        ("PUBACK", ACK_P, |p| {
            Packet::PubAck(Ack {
                packet_id: 1,
                reason: 0,
                properties: p,
            })
        }),
        ("PUBREC", ACK_P, |p| {
            Packet::PubRec(Ack {
                packet_id: 1,
                reason: 0,
                properties: p,
            })
        }),
        ("PUBREL", ACK_P, |p| {
            Packet::PubRel(Ack {
                packet_id: 1,
                reason: 0,
                properties: p,
            })
        }),
        ("PUBCOMP", ACK_P, |p| {
            Packet::PubComp(Ack {
                packet_id: 1,
                reason: 0,
                properties: p,
            })
        }),
        ("SUBSCRIBE", SUBSCRIBE_P, |properties| {
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: vec![(ByteStr::from("f"), SubOptions::default())],
                properties,
            })
        }),
        ("UNSUBSCRIBE", UNSUBSCRIBE_P, |properties| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id: 1,
                filters: vec![ByteStr::from("f")],
                properties,
            })
        }),
        ("DISCONNECT", DISCONNECT_P, |properties| {
            Packet::Disconnect(Disconnect {
                reason: 0,
                properties,
            })
        }),
        ("AUTH", AUTH_P, |properties| {
            Packet::Auth(Auth {
                reason: 0x18,
                properties,
            })
        }),
    ];
    let acks: [(&str, Build); 2] = [
        ("SUBACK", |properties| {
            Packet::SubAck(SubAck {
                packet_id: 1,
                codes: vec![0],
                properties,
            })
        }),
        ("UNSUBACK", |properties| {
            Packet::UnsubAck(UnsubAck {
                packet_id: 1,
                codes: vec![0],
                properties,
            })
        }),
    ];
    let all = kinds
        .iter()
        .copied()
        .chain(acks.iter().map(|&(name, build)| (name, ACK_P, build)));
    for (name, allowed, build) in all {
        for id in ALL {
            let p = build(Properties(vec![property(&mut g, id)]));
            let got = dec(&enc(&p, V5), V5);
            if allowed.contains(&id) {
                assert_eq!(got, Ok(p), "{name} property {id:#04x}");
            } else {
                assert!(
                    matches!(got, Err(DecodeError::Protocol(_))),
                    "{name} property {id:#04x}: {got:?}"
                );
            }
        }
    }
}

#[test]
fn v5_property_values_out_of_range() {
    protocol_error(&connect_v5_props(&[0x21, 0x00, 0x00]), V5); // receive maximum 0
    protocol_error(&connect_v5_props(&[0x27, 0, 0, 0, 0]), V5); // maximum packet size 0
    protocol_error(&connect_v5_props(&[0x17, 0x02]), V5); // request problem information 2
    protocol_error(&connect_v5_props(&[0x19, 0x02]), V5); // request response information 2
    protocol_error(&publish_v5_props(&[0x01, 0x02]), V5); // payload format indicator 2
    protocol_error(&publish_v5_props(&[0x0b, 0x00]), V5); // subscription identifier 0
                                                          // Topic alias 0 decodes; the session answers 0x94 Topic Alias invalid (MQTT-3.3.2-8).
    assert!(dec(&publish_v5_props(&[0x23, 0x00, 0x00]), V5).is_ok());
    let connack = |p: &[u8]| {
        let mut body = vec![0x00, 0x00, p.len() as u8];
        body.extend_from_slice(p);
        pkt(0x20, &body)
    };
    protocol_error(&connack(&[0x24, 0x02]), V5); // maximum QoS 2
    for id in [0x25, 0x28, 0x29, 0x2a] {
        protocol_error(&connack(&[id, 0x02]), V5); // *Available 2
    }
    assert!(dec(&connack(&[0x24, 0x01, 0x25, 0x00, 0x28, 0x01]), V5).is_ok());
}

#[test]
fn v5_unknown_property_is_malformed() {
    malformed(&publish_v5_props(&[0x05, 0x00]), V5);
    malformed(&publish_v5_props(&[0x80, 0x00]), V5);
}

// ---------------------------------------------------------------------------
// Buffering, size limit, zero copy, allocation

#[test]
fn packet_too_large_is_reported_from_the_fixed_header_alone() {
    // PUBLISH with remaining length 1000; only the fixed header has arrived.
    let mut buf = BytesMut::from(&[0x30u8, 0xe8, 0x07][..]);
    assert_eq!(
        decode(&mut buf, V311, 1002),
        Err(DecodeError::PacketTooLarge {
            size: 1003,
            max: 1002
        })
    );
    assert_eq!(
        DecodeError::PacketTooLarge {
            size: 1003,
            max: 1002
        }
        .reason_code(),
        0x95
    );
    // At exactly the limit it just waits for the body.
    assert_eq!(decode(&mut buf, V311, 1003), Ok(None));
    assert_eq!(buf.len(), 3);
}

#[test]
fn incomplete_packets_consume_nothing() {
    let p = Packet::Subscribe(Subscribe {
        packet_id: 9,
        filters: vec![(ByteStr::from("a/#"), SubOptions::default())],
        properties: Properties(vec![Property::SubscriptionIdentifier(300)]),
    });
    let bytes = enc(&p, V5);
    for n in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..n]);
        assert_eq!(decode(&mut buf, V5, MAX), Ok(None));
        assert_eq!(buf.len(), n);
    }
    assert_eq!(dec(&bytes, V5), Ok(p));
}

#[test]
fn decoded_fields_are_slices_of_the_read_buffer() {
    // 5.0 PUBLISH: topic "a/b", content type "ct", payload "hi".
    let mut buf = BytesMut::with_capacity(256);
    buf.extend_from_slice(&[
        0x30, 0x0d, 0x00, 0x03, b'a', b'/', b'b', 0x05, 0x03, 0x00, 0x02, b'c', b't',
    ]);
    buf.extend_from_slice(b"hi");
    let range = buf.as_ptr_range();
    let inside = |p: *const u8| range.contains(&p);
    let Some(Packet::Publish(p)) = decode(&mut buf, V5, MAX).unwrap() else {
        panic!()
    };
    assert_eq!(&p.payload[..], b"hi");
    assert!(inside(p.payload.as_ptr()));
    assert!(inside(p.topic.as_bytes().as_ptr()));
    assert!(inside(
        p.properties.content_type().unwrap().as_bytes().as_ptr()
    ));
}

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

/// Counts this thread's heap allocations (tests run on separate threads).
struct CountingAllocator;

// SAFETY: forwards every call to `System` unchanged.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn allocations_in(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn v311_qos0_publish_decode_does_not_allocate() {
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: true,
        topic: ByteStr::from("sensors/1/temp"),
        packet_id: 0,
        properties: Properties::default(),
        payload: Bytes::from_static(b"21.5"),
    });
    let mut buf = BytesMut::with_capacity(1024);
    for _ in 0..3 {
        encode(&p, V311, &mut buf);
    }
    // The first split turns the buffer into a shared one (one allocation per buffer).
    assert!(decode(&mut buf, V311, MAX).unwrap().is_some());
    let n = allocations_in(|| {
        let q = decode(&mut buf, V311, MAX).unwrap().unwrap();
        assert_eq!(q, p);
    });
    assert_eq!(n, 0);

    // Encoding into a buffer with room does not allocate either.
    let mut out = BytesMut::with_capacity(1024);
    let Packet::Publish(publish) = &p else {
        unreachable!()
    };
    let n = allocations_in(|| {
        encode(&p, V5, &mut out);
        encode_publish_header(publish, V5, &mut out);
    });
    assert_eq!(n, 0);
}

// ---------------------------------------------------------------------------
// API details

#[test]
fn properties_accessors_set_and_remove() {
    let mut p = Properties::default();
    assert!(p.is_empty());
    p.push(Property::TopicAlias(3));
    p.push(Property::UserProperty(
        ByteStr::from("k"),
        ByteStr::from("v"),
    ));
    p.push(Property::MessageExpiryInterval(10));
    p.set(Property::TopicAlias(4));
    assert_eq!(p.0[0], Property::TopicAlias(4));
    p.set(Property::ReasonString(ByteStr::from("why")));
    assert_eq!(p.reason_string().map(|s| s.as_str()), Some("why"));
    assert_eq!(p.topic_alias(), Some(4));
    assert_eq!(p.message_expiry_interval(), Some(10));
    p.remove(Property::TOPIC_ALIAS);
    assert_eq!(p.topic_alias(), None);
    assert_eq!(p.len(), 3);
    assert_eq!(
        p.user_properties()
            .next()
            .map(|(k, v)| (k.as_str(), v.as_str())),
        Some(("k", "v"))
    );
    assert_eq!(Property::SharedSubscriptionAvailable(1).id(), 0x2a);
    assert_eq!(Property::PayloadFormatIndicator(1).id(), 0x01);
}

#[test]
fn error_reason_codes_and_messages() {
    let e = DecodeError::Malformed("variable byte integer longer than 4 bytes");
    assert_eq!(e.reason_code(), reason::MALFORMED_PACKET);
    assert_eq!(
        e.to_string(),
        "malformed packet: variable byte integer longer than 4 bytes"
    );
    assert_eq!(
        DecodeError::Protocol("x").reason_code(),
        reason::PROTOCOL_ERROR
    );
    let boxed: Box<dyn std::error::Error> =
        Box::new(DecodeError::PacketTooLarge { size: 10, max: 5 });
    assert!(boxed.to_string().contains("10"));
}

#[test]
fn v3_encoding_drops_v5_fields() {
    let props = Properties(vec![Property::ReasonString(ByteStr::from("r"))]);
    let suback = Packet::SubAck(SubAck {
        packet_id: 1,
        codes: vec![0x80],
        properties: props.clone(),
    });
    assert_eq!(&enc(&suback, V311)[..], &[0x90, 0x03, 0x00, 0x01, 0x80]);
    let d = Packet::Disconnect(Disconnect {
        reason: 0x8e,
        properties: props,
    });
    assert_eq!(&enc(&d, V31)[..], &[0xe0, 0x00]);
    assert_eq!(encoded_len(&d, V31), 2);
}
