//! Writes the seed corpora under fuzz/corpus/<target>/ (run from anywhere):
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus
//!
//! MQTT packets come from tarta-proto's own encoder; the password files hold
//! lines written by Debian's `mosquitto_passwd` 2.0.11. Each seed's file name
//! says what it is. Existing files of the same name are overwritten; nothing
//! else in the corpus directories is touched.

use bytes::{Bytes, BytesMut};
use std::fs;
use std::path::{Path, PathBuf};
use tarta_proto::mqtt::*;
use tarta_proto::ws::frame::client_frame;
use tarta_proto::ByteStr;

fn s(v: &str) -> ByteStr {
    ByteStr::from(v)
}

fn b(v: &[u8]) -> Bytes {
    Bytes::copy_from_slice(v)
}

fn props(v: Vec<Property>) -> Properties {
    Properties(v)
}

fn user(k: &str, v: &str) -> Property {
    Property::UserProperty(s(k), s(v))
}

fn connect(protocol: Protocol) -> Packet {
    let v5 = protocol.is_v5();
    let p = |v: Vec<Property>| if v5 { props(v) } else { Properties::default() };
    Packet::Connect(Box::new(Connect {
        protocol,
        clean_start: true,
        keep_alive: 60,
        client_id: s("sensor-42"),
        will: Some(Will {
            topic: s("devices/sensor-42/status"),
            payload: b(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: p(vec![
                Property::WillDelayInterval(30),
                Property::PayloadFormatIndicator(1),
                Property::MessageExpiryInterval(3600),
                Property::ContentType(s("text/plain")),
                Property::ResponseTopic(s("replies/sensor-42")),
                Property::CorrelationData(b(b"\x01\x02")),
            ]),
        }),
        username: Some(s("alice")),
        password: Some(b(b"secret")),
        properties: p(vec![
            Property::SessionExpiryInterval(300),
            Property::ReceiveMaximum(100),
            Property::MaximumPacketSize(1 << 20),
            Property::TopicAliasMaximum(10),
            Property::RequestResponseInformation(1),
            Property::RequestProblemInformation(0),
            Property::AuthenticationMethod(s("SCRAM-SHA-1")),
            Property::AuthenticationData(b(b"n,,n=alice,r=abc")),
            user("region", "eu"),
        ]),
        bridge: false,
    }))
}

fn plain_connect(protocol: Protocol) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol,
        clean_start: false,
        keep_alive: 0,
        client_id: s(""),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
        bridge: false,
    }))
}

fn publish(qos: QoS, v5: bool) -> Packet {
    Packet::Publish(Publish {
        dup: qos == QoS::ExactlyOnce,
        qos,
        retain: qos == QoS::AtMostOnce,
        topic: s("home/kitchen/temperature"),
        packet_id: if qos == QoS::AtMostOnce { 0 } else { 7 },
        properties: if v5 {
            props(vec![
                Property::PayloadFormatIndicator(1),
                Property::MessageExpiryInterval(60),
                Property::TopicAlias(3),
                Property::ResponseTopic(s("home/kitchen/reply")),
                Property::CorrelationData(b(b"req-1")),
                Property::SubscriptionIdentifier(5),
                Property::SubscriptionIdentifier(300),
                Property::ContentType(s("application/json")),
                user("unit", "celsius"),
            ])
        } else {
            Properties::default()
        },
        payload: b(br#"{"t":21.5}"#),
    })
}

fn ack(v5: bool) -> Ack {
    Ack {
        packet_id: 7,
        reason: if v5 { 0x10 } else { 0 },
        properties: if v5 {
            props(vec![
                Property::ReasonString(s("no matching subscribers")),
                user("k", "v"),
            ])
        } else {
            Properties::default()
        },
    }
}

fn packets(protocol: Protocol) -> Vec<(&'static str, Packet)> {
    let v5 = protocol.is_v5();
    let p = |v: Vec<Property>| if v5 { props(v) } else { Properties::default() };
    let mut out = vec![
        ("connect", connect(protocol)),
        ("connect_minimal", plain_connect(protocol)),
        (
            "connack",
            Packet::ConnAck(ConnAck {
                session_present: true,
                code: 0,
                properties: p(vec![
                    Property::SessionExpiryInterval(300),
                    Property::ReceiveMaximum(20),
                    Property::MaximumQoS(1),
                    Property::RetainAvailable(1),
                    Property::MaximumPacketSize(65536),
                    Property::AssignedClientIdentifier(s("auto-1f3a")),
                    Property::TopicAliasMaximum(8),
                    Property::ReasonString(s("welcome")),
                    Property::WildcardSubscriptionAvailable(1),
                    Property::SubscriptionIdentifierAvailable(1),
                    Property::SharedSubscriptionAvailable(0),
                    Property::ServerKeepAlive(30),
                    Property::ResponseInformation(s("replies/")),
                    Property::ServerReference(s("other.example:1883")),
                    user("server", "tarta"),
                ]),
            }),
        ),
        ("publish_qos0", publish(QoS::AtMostOnce, v5)),
        ("publish_qos1", publish(QoS::AtLeastOnce, v5)),
        ("publish_qos2", publish(QoS::ExactlyOnce, v5)),
        ("puback", Packet::PubAck(ack(v5))),
        ("pubrec", Packet::PubRec(ack(v5))),
        ("pubrel", Packet::PubRel(ack(v5))),
        ("pubcomp", Packet::PubComp(ack(v5))),
        (
            "subscribe",
            Packet::Subscribe(Subscribe {
                packet_id: 9,
                filters: vec![
                    (
                        s("home/+/temperature"),
                        SubOptions {
                            qos: QoS::AtLeastOnce,
                            ..SubOptions::default()
                        },
                    ),
                    (
                        s("alerts/#"),
                        SubOptions {
                            qos: QoS::ExactlyOnce,
                            no_local: v5,
                            retain_as_published: v5,
                            retain_handling: if v5 { 2 } else { 0 },
                        },
                    ),
                    (s("$share/workers/jobs/+"), SubOptions::default()),
                ],
                properties: p(vec![Property::SubscriptionIdentifier(12), user("a", "b")]),
            }),
        ),
        (
            "suback",
            Packet::SubAck(SubAck {
                packet_id: 9,
                codes: vec![1, 2, 0x80],
                properties: p(vec![Property::ReasonString(s("partly"))]),
            }),
        ),
        (
            "unsubscribe",
            Packet::Unsubscribe(Unsubscribe {
                packet_id: 10,
                filters: vec![s("home/+/temperature"), s("alerts/#")],
                properties: p(vec![user("why", "done")]),
            }),
        ),
        (
            "unsuback",
            Packet::UnsubAck(UnsubAck {
                packet_id: 10,
                codes: if v5 { vec![0, 0x11] } else { Vec::new() },
                properties: p(vec![Property::ReasonString(s("ok"))]),
            }),
        ),
        ("pingreq", Packet::PingReq),
        ("pingresp", Packet::PingResp),
        (
            "disconnect",
            Packet::Disconnect(Disconnect {
                reason: if v5 { 0x04 } else { 0 },
                properties: p(vec![
                    Property::SessionExpiryInterval(0),
                    Property::ReasonString(s("bye")),
                    Property::ServerReference(s("b.example")),
                ]),
            }),
        ),
    ];
    if v5 {
        out.push((
            "auth",
            Packet::Auth(Auth {
                reason: 0x18,
                properties: props(vec![
                    Property::AuthenticationMethod(s("SCRAM-SHA-1")),
                    Property::AuthenticationData(b(b"c=biws,r=abc")),
                    Property::ReasonString(s("continue")),
                ]),
            }),
        ));
        out.push((
            "puback_compact",
            Packet::PubAck(Ack {
                packet_id: 3,
                reason: 0,
                properties: Properties::default(),
            }),
        ));
        out.push((
            "disconnect_compact",
            Packet::Disconnect(Disconnect::default()),
        ));
    }
    out
}

fn encode_all(ps: &[Packet], protocol: Protocol) -> Vec<u8> {
    let mut out = BytesMut::new();
    for p in ps {
        encode(p, protocol, &mut out);
    }
    out.to_vec()
}

struct Corpus {
    root: PathBuf,
    count: usize,
}

impl Corpus {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        fs::create_dir_all(&dir).expect("create corpus dir");
        fs::write(dir.join(name), bytes).expect("write seed");
        self.count += 1;
    }
}

fn mqtt(c: &mut Corpus) {
    // Selector byte: low two bits 0 = 3.1, 1 = 3.1.1, 2 = 5.0; top bit: small maximum.
    for (sel, tag, protocol) in [(1u8, "v311", Protocol::V311), (2, "v5", Protocol::V5)] {
        for (name, p) in packets(protocol) {
            let mut seed = vec![sel];
            seed.extend(encode_all(&[p], protocol));
            c.put("mqtt_decode", &format!("{tag}_{name}"), &seed);
        }
        // A session's worth of packets in one stream.
        let all: Vec<Packet> = packets(protocol).into_iter().map(|(_, p)| p).collect();
        let mut seed = vec![sel];
        seed.extend(encode_all(&all, protocol));
        c.put("mqtt_decode", &format!("{tag}_stream"), &seed);
    }
    let mut seed = vec![0u8];
    seed.extend(encode_all(
        &[connect(Protocol::V31), publish(QoS::AtLeastOnce, false)],
        Protocol::V31,
    ));
    c.put("mqtt_decode", "v31_connect_publish", &seed);
    // 3.1 lets the remaining length win over the user name and password flags.
    let mut seed = vec![0u8];
    seed.extend([0x10, 16, 0, 6]);
    seed.extend(b"MQIsdp");
    seed.extend([3, 0xC2, 0, 10, 0, 2]);
    seed.extend(b"id");
    c.put("mqtt_decode", "v31_connect_flags_without_fields", &seed);
    // Top bit of the selector: a maximum packet size of 8 * (1 + 3) = 32 bytes.
    let mut seed = vec![0x80 | (3 << 2) | 1];
    seed.extend(encode_all(
        &[publish(QoS::AtMostOnce, false)],
        Protocol::V311,
    ));
    c.put("mqtt_decode", "v311_publish_too_large", &seed);
}

fn ws(c: &mut Corpus) {
    let m = [0x37, 0xfa, 0x21, 0x3d];
    let mut connect = BytesMut::new();
    encode(&plain_connect(Protocol::V311), Protocol::V311, &mut connect);
    let mut publish_bytes = BytesMut::new();
    encode(
        &publish(QoS::AtLeastOnce, false),
        Protocol::V311,
        &mut publish_bytes,
    );
    // Selector bytes: first: max payload (top bit: unlimited; else 2^(b & 31)), both: chunk sizes.
    let seeds: Vec<(&str, [u8; 2], Vec<u8>)> = vec![
        (
            "binary_connect",
            [0x80, 0x11],
            client_frame(0x2, true, &connect, m),
        ),
        (
            "fragmented_with_ping",
            [0x10, 0x42],
            [
                client_frame(0x2, false, &publish_bytes[..5], m),
                client_frame(0x9, true, b"hb", m),
                client_frame(0x0, false, &publish_bytes[5..12], m),
                client_frame(0x0, true, &publish_bytes[12..], m),
            ]
            .concat(),
        ),
        (
            "ping_pong_close",
            [0x80, 0x03],
            [
                client_frame(0x9, true, b"", m),
                client_frame(0xA, true, b"x", m),
                client_frame(0x8, true, b"\x03\xe8bye", m),
            ]
            .concat(),
        ),
        (
            "binary_len16",
            [0x80, 0x77],
            client_frame(0x2, true, &[0x30; 300], m),
        ),
        (
            "binary_too_big",
            [0x08, 0x01],
            client_frame(0x2, true, &[0x30; 300], m),
        ),
        (
            "text_frame",
            [0x80, 0x05],
            client_frame(0x1, true, b"hello", m),
        ),
        (
            "len64_header",
            [0x80, 0x09],
            vec![0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4, 0x30, 0x00],
        ),
    ];
    for (name, sel, frames) in seeds {
        let mut seed = sel.to_vec();
        seed.extend(frames);
        c.put("ws_frame", name, &seed);
    }
}

fn http(c: &mut Corpus) {
    // The first byte says where the target cuts the request (k = len * byte / 255).
    let chrome = "GET /mqtt HTTP/1.1\r\n\
Host: broker.example.com:8080\r\n\
Connection: Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: https://example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
Sec-WebSocket-Protocol: mqtt\r\n\r\n";
    let firefox = "GET /mqtt?client=1 HTTP/1.1\r\n\
Host: localhost:9001\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: */*\r\n\
Accept-Language: en-US,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Sec-WebSocket-Version: 13\r\n\
Origin: http://localhost:9001\r\n\
Sec-WebSocket-Protocol: mqttv3.1, mqtt\r\n\
Sec-WebSocket-Extensions: permessage-deflate\r\n\
Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n\
Connection: keep-alive, Upgrade\r\n\
Sec-Fetch-Dest: empty\r\n\
Sec-Fetch-Mode: websocket\r\n\
Sec-Fetch-Site: same-origin\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
Upgrade: websocket\r\n\r\n";
    let proxied = "GET /mqtt HTTP/1.1\r\n\
Host: broker\r\n\
Upgrade: WebSocket\r\n\
Connection: upgrade\r\n\
Sec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
X-Forwarded-For: 203.0.113.9, 192.0.2.7\r\n\
X-Forwarded-Proto: https\r\n\r\n\x10\x0c";
    let health =
        "GET /health HTTP/1.1\r\nHost: broker\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
    let post = "POST /mqtt HTTP/1.1\r\nHost: broker\r\nContent-Length: 0\r\n\r\n";
    let metrics = "GET /metrics HTTP/1.1\r\nHost: broker:9001\r\nUser-Agent: Prometheus/2.53.0\r\n\
Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\
Accept-Encoding: gzip\r\nX-Prometheus-Scrape-Timeout-Seconds: 10\r\n\r\n";
    let admin = "POST /api/clients/sensor-42/disconnect?reason=maintenance HTTP/1.1\r\n\
Host: broker\r\nAuthorization: Bearer 0123456789abcdef\r\nContent-Length: 0\r\n\r\n";
    for (name, cut, req) in [
        ("chrome_upgrade", 255u8, chrome),
        ("firefox_upgrade", 200, firefox),
        ("proxied_upgrade_then_mqtt", 255, proxied),
        ("health", 128, health),
        ("post", 255, post),
        ("metrics", 255, metrics),
        ("admin_api", 100, admin),
    ] {
        let mut seed = vec![cut];
        seed.extend(req.as_bytes());
        c.put("http_upgrade", name, &seed);
    }
}

fn proxy(c: &mut Corpus) {
    const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    let v2 = |ver_cmd: u8, family: u8, body: &[u8]| {
        let mut out = V2_SIG.to_vec();
        out.extend([ver_cmd, family]);
        out.extend((body.len() as u16).to_be_bytes());
        out.extend(body);
        out.extend([0x10, 0x0c]); // the MQTT CONNECT that follows
        out
    };
    let v4_block = [192, 0, 2, 1, 198, 51, 100, 7, 0xd4, 0x31, 0x07, 0x5b];
    let mut v6_block = Vec::new();
    v6_block.extend(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets());
    v6_block.extend(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2).octets());
    v6_block.extend([0xd4, 0x31, 0x07, 0x5b]);
    // TLVs as HAProxy sends them: ALPN (0x01) and AUTHORITY (0x02).
    let mut tlv = v4_block.to_vec();
    tlv.extend([0x01, 0x00, 0x04]);
    tlv.extend(b"mqtt");
    tlv.extend([0x02, 0x00, 0x0b]);
    tlv.extend(b"example.com");
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "v1_tcp4",
            b"PROXY TCP4 192.0.2.1 198.51.100.7 54321 1883\r\n\x10\x0c".to_vec(),
        ),
        (
            "v1_tcp6",
            b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 0 65535\r\n".to_vec(),
        ),
        ("v1_unknown", b"PROXY UNKNOWN\r\n\x16\x03\x01".to_vec()),
        ("v2_proxy_tcp4", v2(0x21, 0x11, &v4_block)),
        ("v2_proxy_tcp4_tlvs", v2(0x21, 0x11, &tlv)),
        ("v2_proxy_tcp6", v2(0x21, 0x21, &v6_block)),
        ("v2_local", v2(0x20, 0x00, &[])),
        ("v2_proxy_unix", v2(0x21, 0x31, &[0u8; 216])),
        ("v2_proxy_udp4", v2(0x21, 0x12, &v4_block)),
    ];
    for (name, seed) in seeds {
        c.put("proxy_header", name, &seed);
    }
}

fn acl(c: &mut Corpus) {
    let sample = "\
# Anonymous clients: read-only weather and broker uptime.
topic read weather/#
topic read $SYS/broker/uptime

user alice
topic readwrite home/alice/#
topic deny home/alice/secrets/#
topic write logs/alice

user bob
topic home/bob/#
  # an indented comment
topic read  living room/temperature  

# Every client: its own device space, and an inbox for users.
pattern readwrite devices/%c/#
pattern deny devices/%c/firmware
pattern read inbox/%u/+
pattern write +/%u/out
user alice
topic read news/#
topic deny +/+/private
";
    c.put("acl", "sample", sample.as_bytes());
    c.put(
        "acl",
        "patterns",
        b"pattern readwrite %c/%u/#\npattern deny $SYS/%c\ntopic read /#\ntopic deny +/#\n",
    );
}

fn passwd(c: &mut Corpus) {
    // `mosquitto_passwd -c -I 101 -b pw alice secret`,
    // `mosquitto_passwd -H sha512 -b pw bob hunter2`,
    // `mosquitto_passwd -I 1000 -b pw carol 'p@ss:w$rd'`,
    // `mosquitto_passwd -c -I 2 -b pw2 dave 'open sesame'` (Debian's 2.0.11).
    // The target takes the last line, less a leading `#`, as the password to try.
    let alice = "alice:$7$101$yfBoPo0TUcKCjQQ6$uYh9dLishafmt5xuJ51sInXVuIa1l+P7brRI4Cfi82nbDibw5Aj4+S1H/2VrRW+YxcGr7RmDCXE1YYozZtNBeA==";
    let bob = "bob:$6$mw6BpWyYh4sRg+Zz$2Jyx7Mf5rLwudic92qc8dNA25JGXjRloqVqqIsrJaXT0hroxmNGQluaqO+ijK/nvLIJqldratVHBH5e+0YaTDw==";
    let carol = "carol:$7$1000$6fT9faVQpBtiZ+sw$g3E2Zj+ShHzCngjltqrHNzQsWNJfnpSbtQFV3AfU3Yor0WLikT/o+2hwL+ougwt5XFYni/ksRJELw5gMPL8HgA==";
    let dave = "dave:$7$2$1v/Fn7MZtIhNgxMe$tKi/582ZSYRc5fnAB+hah47/b2FuCBJgrJbbHgJ2YcaGhUngoXAI3MNC2ikWLBkCnnF1cs1uRqlpUr30ymkZBQ==";
    c.put(
        "passwd",
        "mosquitto_pbkdf2",
        format!("{alice}\n#secret").as_bytes(),
    );
    c.put(
        "passwd",
        "mosquitto_sha512",
        format!("{bob}\r\n#hunter2").as_bytes(),
    );
    c.put(
        "passwd",
        "mosquitto_pbkdf2_2_iterations",
        format!("{dave}\n#open sesame").as_bytes(),
    );
    c.put(
        "passwd",
        "mosquitto_file",
        format!("# users\n{alice}\n\n{bob}   \n  # carol's is dearer\n{carol}\n{dave}\n#p@ss:w$rd")
            .as_bytes(),
    );
    c.put("passwd", "plaintext", b"eve:plaintext\n");
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut c = Corpus { root, count: 0 };
    mqtt(&mut c);
    ws(&mut c);
    http(&mut c);
    proxy(&mut c);
    acl(&mut c);
    passwd(&mut c);
    println!("wrote {} seeds under {}", c.count, c.root.display());
}
