//! Encoding: [`encode`] appends a packet to a write buffer, [`encoded_len`]
//! computes its exact size without encoding, and [`encode_publish_header`]
//! writes a PUBLISH without its payload so one shared payload can follow it
//! in a vectored write. Lengths are computed first, then `out` is reserved
//! once; nothing else is allocated.
//!
//! Encoding for 3.x drops 5.0-only fields (properties, reason codes). The
//! compact 5.0 forms are used where allowed (an ack with reason 0 and no
//! properties is 2 bytes; DISCONNECT with reason 0 and no properties is empty).
//! Callers keep packets within MQTT's limits (strings and binary fields up to
//! 65535 bytes, remaining length up to 268435455).

use super::packet::*;
use super::properties::{Properties, Property};
use bytes::{BufMut, BytesMut};

/// Appends `packet` to `out`. A CONNECT is encoded for its own
/// `Connect::protocol`; every other packet for `protocol`. AUTH exists only
/// in 5.0 and is always encoded in the 5.0 form.
pub fn encode(packet: &Packet, protocol: Protocol, out: &mut BytesMut) {
    let v5 = protocol.is_v5();
    let remaining = remaining_len(packet, protocol);
    out.reserve(1 + vbi_len(remaining) + remaining);
    if let Packet::Publish(p) = packet {
        encode_publish_header(p, protocol, out);
        out.put_slice(&p.payload);
        return;
    }
    out.put_u8(first_byte(packet));
    put_vbi(out, remaining);
    match packet {
        Packet::Connect(c) => put_connect(c, out),
        Packet::ConnAck(c) => {
            out.put_u8(u8::from(c.session_present && protocol != Protocol::V31));
            out.put_u8(c.code);
            if v5 {
                put_properties(&c.properties, out);
            }
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            out.put_u16(a.packet_id);
            if v5 && (a.reason != 0 || !a.properties.is_empty()) {
                out.put_u8(a.reason);
                if !a.properties.is_empty() {
                    put_properties(&a.properties, out);
                }
            }
        }
        Packet::Subscribe(s) => {
            out.put_u16(s.packet_id);
            if v5 {
                put_properties(&s.properties, out);
            }
            for (filter, o) in &s.filters {
                put_binary(out, filter.as_bytes());
                let mut opts = o.qos as u8;
                if v5 {
                    opts |= u8::from(o.no_local) << 2
                        | u8::from(o.retain_as_published) << 3
                        | (o.retain_handling & 0x03) << 4;
                }
                out.put_u8(opts);
            }
        }
        Packet::SubAck(s) => {
            out.put_u16(s.packet_id);
            if v5 {
                put_properties(&s.properties, out);
            }
            out.put_slice(&s.codes);
        }
        Packet::Unsubscribe(u) => {
            out.put_u16(u.packet_id);
            if v5 {
                put_properties(&u.properties, out);
            }
            for filter in &u.filters {
                put_binary(out, filter.as_bytes());
            }
        }
        Packet::UnsubAck(u) => {
            out.put_u16(u.packet_id);
            if v5 {
                put_properties(&u.properties, out);
                out.put_slice(&u.codes);
            }
        }
        Packet::Disconnect(d) => {
            if v5 && (d.reason != 0 || !d.properties.is_empty()) {
                out.put_u8(d.reason);
                if !d.properties.is_empty() {
                    put_properties(&d.properties, out);
                }
            }
        }
        Packet::Auth(a) => {
            if a.reason != 0 || !a.properties.is_empty() {
                out.put_u8(a.reason);
                put_properties(&a.properties, out);
            }
        }
        Packet::Publish(_) | Packet::PingReq | Packet::PingResp => {}
    }
}

/// Appends a PUBLISH without its payload; the remaining length written
/// includes the payload, which the caller sends right after.
pub fn encode_publish_header(p: &Publish, protocol: Protocol, out: &mut BytesMut) {
    PublishHeader::of(p).encode(protocol, out);
}

/// What a PUBLISH header is made of, by reference: a delivery encodes its
/// header from the shared message without cloning topic or payload.
#[derive(Debug, Clone, Copy)]
pub struct PublishHeader<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: &'a [u8],
    pub packet_id: u16,
    pub properties: &'a Properties,
    pub payload_len: usize,
}

impl<'a> PublishHeader<'a> {
    pub fn of(p: &'a Publish) -> Self {
        PublishHeader {
            dup: p.dup,
            qos: p.qos,
            retain: p.retain,
            topic: p.topic.as_bytes(),
            packet_id: p.packet_id,
            properties: &p.properties,
            payload_len: p.payload.len(),
        }
    }

    fn remaining(&self, v5: bool) -> usize {
        let id = if self.qos == QoS::AtMostOnce { 0 } else { 2 };
        let props = if v5 {
            properties_field_len(self.properties)
        } else {
            0
        };
        2 + self.topic.len() + id + props + self.payload_len
    }

    /// The whole packet's size, payload included.
    pub fn packet_len(&self, protocol: Protocol) -> usize {
        let remaining = self.remaining(protocol.is_v5());
        1 + vbi_len(remaining) + remaining
    }

    /// Appends everything before the payload.
    pub fn encode(&self, protocol: Protocol, out: &mut BytesMut) {
        let v5 = protocol.is_v5();
        let remaining = self.remaining(v5);
        out.reserve(1 + vbi_len(remaining) + remaining - self.payload_len);
        out.put_u8(0x30 | u8::from(self.dup) << 3 | (self.qos as u8) << 1 | u8::from(self.retain));
        put_vbi(out, remaining);
        put_binary(out, self.topic);
        if self.qos != QoS::AtMostOnce {
            out.put_u16(self.packet_id);
        }
        if v5 {
            put_properties(self.properties, out);
        }
    }
}

/// The exact number of bytes [`encode`] appends for `packet`.
pub fn encoded_len(packet: &Packet, protocol: Protocol) -> usize {
    let remaining = remaining_len(packet, protocol);
    1 + vbi_len(remaining) + remaining
}

fn first_byte(packet: &Packet) -> u8 {
    match packet {
        Packet::Connect(_) => 0x10,
        Packet::ConnAck(_) => 0x20,
        Packet::Publish(p) => 0x30 | u8::from(p.dup) << 3 | (p.qos as u8) << 1 | u8::from(p.retain),
        Packet::PubAck(_) => 0x40,
        Packet::PubRec(_) => 0x50,
        Packet::PubRel(_) => 0x62,
        Packet::PubComp(_) => 0x70,
        Packet::Subscribe(_) => 0x82,
        Packet::SubAck(_) => 0x90,
        Packet::Unsubscribe(_) => 0xA2,
        Packet::UnsubAck(_) => 0xB0,
        Packet::PingReq => 0xC0,
        Packet::PingResp => 0xD0,
        Packet::Disconnect(_) => 0xE0,
        Packet::Auth(_) => 0xF0,
    }
}

/// The remaining length (everything after the fixed header).
fn remaining_len(packet: &Packet, protocol: Protocol) -> usize {
    let v5 = protocol.is_v5();
    let props = |p: &Properties| if v5 { properties_field_len(p) } else { 0 };
    match packet {
        Packet::Connect(c) => connect_len(c),
        Packet::ConnAck(c) => 2 + props(&c.properties),
        Packet::Publish(p) => publish_len(p, v5),
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            match (v5, a.reason, a.properties.is_empty()) {
                (false, _, _) | (true, 0, true) => 2,
                (true, _, true) => 3,
                (true, _, false) => 3 + properties_field_len(&a.properties),
            }
        }
        Packet::Subscribe(s) => {
            2 + props(&s.properties) + s.filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>()
        }
        Packet::SubAck(s) => 2 + props(&s.properties) + s.codes.len(),
        Packet::Unsubscribe(u) => {
            2 + props(&u.properties) + u.filters.iter().map(|f| 2 + f.len()).sum::<usize>()
        }
        Packet::UnsubAck(u) => {
            2 + if v5 {
                properties_field_len(&u.properties) + u.codes.len()
            } else {
                0
            }
        }
        Packet::PingReq | Packet::PingResp => 0,
        Packet::Disconnect(d) => match (v5, d.reason, d.properties.is_empty()) {
            (false, _, _) | (true, 0, true) => 0,
            (true, _, true) => 1,
            (true, _, false) => 1 + properties_field_len(&d.properties),
        },
        Packet::Auth(a) => {
            if a.reason == 0 && a.properties.is_empty() {
                0
            } else {
                1 + properties_field_len(&a.properties)
            }
        }
    }
}

fn publish_len(p: &Publish, v5: bool) -> usize {
    let id = if p.qos == QoS::AtMostOnce { 0 } else { 2 };
    let props = if v5 {
        properties_field_len(&p.properties)
    } else {
        0
    };
    2 + p.topic.len() + id + props + p.payload.len()
}

fn protocol_name(protocol: Protocol) -> &'static [u8] {
    match protocol {
        Protocol::V31 => b"MQIsdp",
        Protocol::V311 | Protocol::V5 => b"MQTT",
    }
}

fn connect_len(c: &Connect) -> usize {
    let v5 = c.protocol.is_v5();
    let props = |p: &Properties| if v5 { properties_field_len(p) } else { 0 };
    let mut n = 2 + protocol_name(c.protocol).len() + 1 + 1 + 2;
    n += props(&c.properties) + 2 + c.client_id.len();
    if let Some(w) = &c.will {
        n += props(&w.properties) + 2 + w.topic.len() + 2 + w.payload.len();
    }
    n += c.username.as_ref().map_or(0, |u| 2 + u.len());
    n += c.password.as_ref().map_or(0, |p| 2 + p.len());
    n
}

fn put_connect(c: &Connect, out: &mut BytesMut) {
    let v5 = c.protocol.is_v5();
    put_binary(out, protocol_name(c.protocol));
    let bridge = if c.bridge && !v5 { 0x80 } else { 0 };
    out.put_u8(c.protocol.level() | bridge);
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos as u8) << 3 | u8::from(w.retain) << 5;
    }
    flags |= u8::from(c.password.is_some()) << 6 | u8::from(c.username.is_some()) << 7;
    out.put_u8(flags);
    out.put_u16(c.keep_alive);
    if v5 {
        put_properties(&c.properties, out);
    }
    put_binary(out, c.client_id.as_bytes());
    if let Some(w) = &c.will {
        if v5 {
            put_properties(&w.properties, out);
        }
        put_binary(out, w.topic.as_bytes());
        put_binary(out, &w.payload);
    }
    if let Some(u) = &c.username {
        put_binary(out, u.as_bytes());
    }
    if let Some(p) = &c.password {
        put_binary(out, p);
    }
}

fn vbi_len(v: usize) -> usize {
    match v {
        0..=0x7F => 1,
        0x80..=0x3FFF => 2,
        0x4000..=0x1F_FFFF => 3,
        _ => 4,
    }
}

fn put_vbi(out: &mut BytesMut, mut v: usize) {
    debug_assert!(v <= 268_435_455, "variable byte integer out of range");
    loop {
        let byte = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            out.put_u8(byte);
            return;
        }
        out.put_u8(byte | 0x80);
    }
}

/// Two-byte length prefix, then the bytes (strings and binary data).
fn put_binary(out: &mut BytesMut, b: &[u8]) {
    debug_assert!(
        b.len() <= usize::from(u16::MAX),
        "string or binary field over 65535 bytes"
    );
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

fn property_len(p: &Property) -> usize {
    1 + match p {
        Property::PayloadFormatIndicator(_)
        | Property::RequestProblemInformation(_)
        | Property::RequestResponseInformation(_)
        | Property::MaximumQoS(_)
        | Property::RetainAvailable(_)
        | Property::WildcardSubscriptionAvailable(_)
        | Property::SubscriptionIdentifierAvailable(_)
        | Property::SharedSubscriptionAvailable(_) => 1,
        Property::ServerKeepAlive(_)
        | Property::ReceiveMaximum(_)
        | Property::TopicAliasMaximum(_)
        | Property::TopicAlias(_) => 2,
        Property::MessageExpiryInterval(_)
        | Property::SessionExpiryInterval(_)
        | Property::WillDelayInterval(_)
        | Property::MaximumPacketSize(_) => 4,
        Property::SubscriptionIdentifier(v) => vbi_len(*v as usize),
        Property::ContentType(s)
        | Property::ResponseTopic(s)
        | Property::AssignedClientIdentifier(s)
        | Property::AuthenticationMethod(s)
        | Property::ResponseInformation(s)
        | Property::ServerReference(s)
        | Property::ReasonString(s) => 2 + s.len(),
        Property::CorrelationData(b) | Property::AuthenticationData(b) => 2 + b.len(),
        Property::UserProperty(k, v) => 4 + k.len() + v.len(),
    }
}

/// The property block's size including its length prefix.
fn properties_field_len(props: &Properties) -> usize {
    let n: usize = props.iter().map(property_len).sum();
    vbi_len(n) + n
}

fn put_properties(props: &Properties, out: &mut BytesMut) {
    put_vbi(out, props.iter().map(property_len).sum());
    for p in props.iter() {
        out.put_u8(p.id());
        match p {
            Property::PayloadFormatIndicator(v)
            | Property::RequestProblemInformation(v)
            | Property::RequestResponseInformation(v)
            | Property::MaximumQoS(v)
            | Property::RetainAvailable(v)
            | Property::WildcardSubscriptionAvailable(v)
            | Property::SubscriptionIdentifierAvailable(v)
            | Property::SharedSubscriptionAvailable(v) => out.put_u8(*v),
            Property::ServerKeepAlive(v)
            | Property::ReceiveMaximum(v)
            | Property::TopicAliasMaximum(v)
            | Property::TopicAlias(v) => out.put_u16(*v),
            Property::MessageExpiryInterval(v)
            | Property::SessionExpiryInterval(v)
            | Property::WillDelayInterval(v)
            | Property::MaximumPacketSize(v) => out.put_u32(*v),
            Property::SubscriptionIdentifier(v) => put_vbi(out, *v as usize),
            Property::ContentType(s)
            | Property::ResponseTopic(s)
            | Property::AssignedClientIdentifier(s)
            | Property::AuthenticationMethod(s)
            | Property::ResponseInformation(s)
            | Property::ServerReference(s)
            | Property::ReasonString(s) => put_binary(out, s.as_bytes()),
            Property::CorrelationData(b) | Property::AuthenticationData(b) => put_binary(out, b),
            Property::UserProperty(k, v) => {
                put_binary(out, k.as_bytes());
                put_binary(out, v.as_bytes());
            }
        }
    }
}
