//! Inputs for the MQTT codec suite: PUBLISH (QoS 0/1/2, 3.1.1 and 5.0 with
//! properties), CONNECT (3.1.1, and 5.0 with a will and properties),
//! SUBSCRIBE (1 or many filters), and a stream of small PUBLISH packets.

use bytes::{Bytes, BytesMut};
use tarta_proto::mqtt::{
    self, Connect, DecodeError, Packet, Properties, Property, Protocol, Publish, QoS, SubOptions,
    Subscribe, Will,
};
use tarta_proto::ByteStr;

/// The broker's default maximum packet size (16 MiB).
pub const MAX_PACKET: u32 = 16 * 1024 * 1024;

/// Payload sizes of the PUBLISH benchmarks: 16 B, 256 B, 4 KiB, 64 KiB.
pub const PAYLOAD_SIZES: [usize; 4] = [16, 256, 4 * 1024, 64 * 1024];

pub const TOPIC: &str = "site/42/device/1337/temp";

/// Short name for benchmark ids.
pub fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::V31 => "v3.1",
        Protocol::V311 => "v3.1.1",
        Protocol::V5 => "v5",
    }
}

/// The properties a 5.0 publisher typically sets: message expiry, content
/// type, payload format and two user properties (a trace id and a source).
pub fn publish_properties() -> Properties {
    Properties(vec![
        Property::PayloadFormatIndicator(0),
        Property::MessageExpiryInterval(3600),
        Property::ContentType(ByteStr::from("application/json")),
        Property::UserProperty(
            ByteStr::from("trace-id"),
            ByteStr::from("0af7651916cd43dd8448eb211c80319c"),
        ),
        Property::UserProperty(ByteStr::from("source"), ByteStr::from("bench")),
    ])
}

/// A PUBLISH on [`TOPIC`] with `payload_len` bytes; 5.0 packets carry
/// [`publish_properties`].
pub fn publish(protocol: Protocol, qos: QoS, payload_len: usize) -> Publish {
    let payload: Vec<u8> = (0..payload_len).map(|i| (i * 31 % 251) as u8).collect();
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: ByteStr::from(TOPIC),
        packet_id: if qos == QoS::AtMostOnce { 0 } else { 4242 },
        properties: if protocol.is_v5() {
            publish_properties()
        } else {
            Properties::default()
        },
        payload: Bytes::from(payload),
    }
}

/// A CONNECT: for 3.1.1 a plain one (client id, user name, password,
/// keep-alive); for 5.0 also a will with properties and the usual CONNECT
/// properties.
pub fn connect(protocol: Protocol) -> Connect {
    let v5 = protocol.is_v5();
    let (properties, will) = if v5 {
        let props = Properties(vec![
            Property::SessionExpiryInterval(3600),
            Property::ReceiveMaximum(100),
            Property::MaximumPacketSize(1 << 20),
            Property::TopicAliasMaximum(0),
            Property::RequestProblemInformation(1),
            Property::UserProperty(ByteStr::from("region"), ByteStr::from("eu-west-1")),
        ]);
        let will = Will {
            topic: ByteStr::from("site/42/device/1337/status"),
            payload: Bytes::from_static(b"{\"online\":false,\"reason\":\"lost\"}"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties(vec![
                Property::WillDelayInterval(30),
                Property::MessageExpiryInterval(86_400),
                Property::ContentType(ByteStr::from("application/json")),
                Property::UserProperty(ByteStr::from("kind"), ByteStr::from("lwt")),
            ]),
        };
        (props, Some(will))
    } else {
        (Properties::default(), None)
    };
    Connect {
        protocol,
        clean_start: true,
        keep_alive: 60,
        client_id: ByteStr::from("sensor-site42-device1337"),
        will,
        username: Some(ByteStr::from("device-1337")),
        password: Some(Bytes::from_static(b"s3cr3t-t0k3n-0123456789abcdef")),
        properties,
        bridge: false,
    }
}

/// A SUBSCRIBE with `n` filters of realistic shape (5.0: with a
/// subscription identifier).
pub fn subscribe(protocol: Protocol, n: usize) -> Subscribe {
    let filters = (0..n)
        .map(|i| {
            let f = match i % 4 {
                0 => format!("site/{}/device/{}/temp", i % 97, i),
                1 => format!("site/{}/+/+/temp", i % 97),
                2 => format!("site/{}/#", i),
                _ => format!("site/{}/device/{}/+", i % 97, i),
            };
            let opts = SubOptions {
                qos: QoS::AtLeastOnce,
                ..SubOptions::default()
            };
            (ByteStr::from(f), opts)
        })
        .collect();
    Subscribe {
        packet_id: 7,
        filters,
        properties: if protocol.is_v5() {
            Properties(vec![Property::SubscriptionIdentifier(12)])
        } else {
            Properties::default()
        },
    }
}

/// The wire bytes of `packet` (a CONNECT is encoded for its own protocol).
pub fn wire(packet: &Packet, protocol: Protocol) -> Vec<u8> {
    let mut out = BytesMut::new();
    mqtt::encode(packet, protocol, &mut out);
    out.to_vec()
}

/// Decodes the one packet in `buf` (the work of a decode benchmark).
pub fn decode_one(buf: &mut BytesMut, protocol: Protocol) -> Result<Option<Packet>, DecodeError> {
    mqtt::decode(buf, protocol, MAX_PACKET)
}

/// Encodes `packet` into `out`, reusing its capacity (the work of an encode
/// benchmark). Returns the encoded length.
pub fn encode_into(packet: &Packet, protocol: Protocol, out: &mut BytesMut) -> usize {
    out.clear();
    mqtt::encode(packet, protocol, out);
    out.len()
}

/// Encodes only the PUBLISH header, as the broker does for each delivery
/// (the payload is then sent by reference). Returns the header length.
pub fn encode_header_into(p: &Publish, protocol: Protocol, out: &mut BytesMut) -> usize {
    out.clear();
    mqtt::encode_publish_header(p, protocol, out);
    out.len()
}

/// `n` small 3.1.1 QoS 0 PUBLISH packets (topics vary, 16-byte payloads)
/// back to back, as one read might bring them.
pub fn publish_stream(n: usize) -> Vec<u8> {
    let mut out = BytesMut::new();
    for i in 0..n {
        let mut p = publish(Protocol::V311, QoS::AtMostOnce, 16);
        p.topic = ByteStr::from(format!("site/{}/device/{}/temp", i % 13, i));
        mqtt::encode(&Packet::Publish(p), Protocol::V311, &mut out);
    }
    out.to_vec()
}

/// Decodes every packet in `buf` (the work of the stream benchmark);
/// returns how many there were. Stops at the first error.
pub fn decode_all(buf: &mut BytesMut, protocol: Protocol) -> usize {
    let mut n = 0;
    while let Ok(Some(p)) = mqtt::decode(buf, protocol, MAX_PACKET) {
        std::hint::black_box(p);
        n += 1;
    }
    n
}
