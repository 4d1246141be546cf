//! Zero-copy decoding: [`decode`] splits one packet off the read buffer and
//! returns it with every string, topic, payload and binary field held as a
//! `Bytes` slice of that packet; [`frame_len`] peeks at a packet's size.

use super::error::DecodeError::{self, Malformed};
use super::packet::*;
use super::properties::{self as props, Properties, Property, Rules};
use crate::ByteStr;
use bytes::{Bytes, BytesMut};

type Result<T> = std::result::Result<T, DecodeError>;

const VBI_TOO_LONG: &str = "variable byte integer longer than 4 bytes";
const TRUNCATED: &str = "field runs past the end of the packet";

/// Total length (fixed header included) of the first packet in `buf`, or
/// `None` if its fixed header has not fully arrived. Only the length is
/// checked here; [`decode`] checks everything else.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>> {
    Ok(fixed_header(buf)?.map(|(header, remaining)| header + remaining))
}

/// (fixed header length, remaining length) once the fixed header is complete.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err(Malformed(VBI_TOO_LONG))
}

/// Decodes one packet from the front of `buf`.
///
/// Returns `Ok(None)` and consumes nothing if more bytes are needed; on
/// success consumes exactly that packet. A packet larger than
/// `max_packet_size` (fixed header + remaining length) is rejected as soon as
/// its fixed header is readable. A CONNECT is decoded by its own protocol
/// name and level; every other packet by `protocol` (before the CONNECT has
/// been seen any level may be passed).
///
/// No heap allocation beyond the `Vec`s a packet inherently has (filters,
/// codes, non-empty properties): a 3.1.1 QoS 0 PUBLISH allocates nothing.
pub fn decode(
    buf: &mut BytesMut,
    protocol: Protocol,
    max_packet_size: u32,
) -> Result<Option<Packet>> {
    let (Some(&first), Some((header_len, remaining))) = (buf.first(), fixed_header(buf)?) else {
        return Ok(None);
    };
    // Cannot overflow: remaining < 2^28.
    let size = header_len + remaining;
    if size as u64 > u64::from(max_packet_size) {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    check_type_and_flags(first, protocol)?;
    if buf.len() < size {
        return Ok(None);
    }
    let frame = buf.split_to(size).freeze();
    let mut r = Reader {
        data: &frame,
        pos: header_len,
        end: size,
    };
    let v5 = protocol.is_v5();
    let packet = match first >> 4 {
        1 => Packet::Connect(Box::new(connect(&mut r)?)),
        2 => Packet::ConnAck(connack(&mut r, protocol)?),
        3 => Packet::Publish(publish(&mut r, first, v5)?),
        4 => Packet::PubAck(ack(&mut r, v5)?),
        5 => Packet::PubRec(ack(&mut r, v5)?),
        6 => Packet::PubRel(ack(&mut r, v5)?),
        7 => Packet::PubComp(ack(&mut r, v5)?),
        8 => Packet::Subscribe(subscribe(&mut r, v5)?),
        9 => Packet::SubAck(suback(&mut r, v5)?),
        10 => Packet::Unsubscribe(unsubscribe(&mut r, v5)?),
        11 => Packet::UnsubAck(unsuback(&mut r, v5)?),
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 => {
            let (reason, properties) = if v5 {
                reason_and_properties(&mut r, props::DISCONNECT)?
            } else {
                Default::default()
            };
            Packet::Disconnect(Disconnect { reason, properties })
        }
        _ => {
            let (reason, properties) = reason_and_properties(&mut r, props::AUTH)?;
            Packet::Auth(Auth { reason, properties })
        }
    };
    r.finish()?;
    Ok(Some(packet))
}

/// Packet type and fixed-header flags (MQTT-2.2.2-2), checked before the body arrives.
fn check_type_and_flags(first: u8, protocol: Protocol) -> Result<()> {
    let flags = first & 0x0F;
    let expected = match first >> 4 {
        0 => return Err(Malformed("reserved packet type 0")),
        3 if flags & 0x06 == 0x06 => return Err(Malformed("PUBLISH with QoS 3 (MQTT-3.3.1-4)")),
        3 => return Ok(()),
        6 | 8 | 10 => 0b0010,
        15 if !protocol.is_v5() => return Err(Malformed("AUTH packet before MQTT 5.0")),
        _ => 0,
    };
    if flags != expected {
        return Err(Malformed("invalid fixed header flags (MQTT-2.2.2-2)"));
    }
    Ok(())
}

/// A bounds-checked cursor over one packet; slices share the packet's buffer.
struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    /// `pos <= end <= data.len()` always.
    end: usize,
}

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    fn finish(&self) -> Result<()> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(Malformed("unexpected bytes at the end of the packet"))
        }
    }

    /// The next `n` bytes' range.
    fn advance(&mut self, n: usize) -> Result<std::ops::Range<usize>> {
        let start = self.pos;
        let end = start
            .checked_add(n)
            .filter(|&e| e <= self.end)
            .ok_or(Malformed(TRUNCATED))?;
        self.pos = end;
        Ok(start..end)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let range = self.advance(N)?;
        let bytes = self.data.get(range).ok_or(Malformed(TRUNCATED))?;
        bytes.try_into().map_err(|_| Malformed(TRUNCATED))
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(u8::from_be_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn vbi(&mut self) -> Result<u32> {
        let mut value = 0u32;
        for i in 0..4 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Malformed(VBI_TOO_LONG))
    }

    fn take(&mut self, n: usize) -> Result<Bytes> {
        let range = self.advance(n)?;
        Ok(self.data.slice(range))
    }

    /// Everything left (a PUBLISH payload).
    fn rest(&mut self) -> Bytes {
        let range = self.pos..self.end;
        self.pos = self.end;
        self.data.slice(range)
    }

    /// Everything left, copied (SUBACK / UNSUBACK codes).
    fn rest_vec(&mut self) -> Vec<u8> {
        let range = self.pos..self.end;
        self.pos = self.end;
        self.data.get(range).map(<[u8]>::to_vec).unwrap_or_default()
    }

    /// Two-byte length then that many bytes (MQTT-1.5.6 binary data).
    fn binary(&mut self) -> Result<Bytes> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// MQTT UTF-8 string (MQTT-1.5.4): valid UTF-8, no U+0000.
    fn string(&mut self) -> Result<ByteStr> {
        ByteStr::from_bytes(self.binary()?)
            .map_err(|_| Malformed("string is not valid MQTT UTF-8 (MQTT-1.5.4)"))
    }

    /// A reader over the next `n` bytes; `self` skips past them.
    fn sub(&mut self, n: usize) -> Result<Reader<'a>> {
        let range = self.advance(n)?;
        Ok(Reader {
            data: self.data,
            pos: range.start,
            end: range.end,
        })
    }
}

fn nonzero_packet_id(r: &mut Reader<'_>) -> Result<u16> {
    match r.u16()? {
        0 => Err(DecodeError::Protocol(
            "packet identifier 0 (MQTT-2.3.1-1, 5.0: MQTT-2.2.1-3)",
        )),
        id => Ok(id),
    }
}

/// A 5.0 property block: length, then properties allowed by `rules`.
fn properties(r: &mut Reader<'_>, rules: Rules) -> Result<Properties> {
    let len = r.vbi()?;
    let mut p = r.sub(len as usize)?;
    let mut out = Properties::default();
    let mut seen = 0u64;
    while !p.is_empty() {
        let id = p.u8()?;
        let prop = property(&mut p, id)?;
        // Known ids are all below 64.
        let bit = 1u64 << id;
        if rules.allowed & bit == 0 {
            return Err(DecodeError::Protocol(
                "property not allowed in this packet type",
            ));
        }
        if seen & bit != 0 && rules.repeatable & bit == 0 {
            return Err(DecodeError::Protocol("property included more than once"));
        }
        seen |= bit;
        out.push(prop);
    }
    Ok(out)
}

fn flag(v: u8, what: &'static str) -> Result<u8> {
    if v > 1 {
        return Err(DecodeError::Protocol(what));
    }
    Ok(v)
}

fn nonzero<T: PartialEq + Default>(v: T, what: &'static str) -> Result<T> {
    if v == T::default() {
        return Err(DecodeError::Protocol(what));
    }
    Ok(v)
}

/// One property value (after its id), range-checked.
fn property(r: &mut Reader<'_>, id: u8) -> Result<Property> {
    type P = Property;
    Ok(match id {
        P::PAYLOAD_FORMAT_INDICATOR => {
            P::PayloadFormatIndicator(flag(r.u8()?, "payload format indicator above 1")?)
        }
        P::MESSAGE_EXPIRY_INTERVAL => P::MessageExpiryInterval(r.u32()?),
        P::CONTENT_TYPE => P::ContentType(r.string()?),
        P::RESPONSE_TOPIC => P::ResponseTopic(r.string()?),
        P::CORRELATION_DATA => P::CorrelationData(r.binary()?),
        P::SUBSCRIPTION_IDENTIFIER => {
            P::SubscriptionIdentifier(nonzero(r.vbi()?, "subscription identifier 0")?)
        }
        P::SESSION_EXPIRY_INTERVAL => P::SessionExpiryInterval(r.u32()?),
        P::ASSIGNED_CLIENT_IDENTIFIER => P::AssignedClientIdentifier(r.string()?),
        P::SERVER_KEEP_ALIVE => P::ServerKeepAlive(r.u16()?),
        P::AUTHENTICATION_METHOD => P::AuthenticationMethod(r.string()?),
        P::AUTHENTICATION_DATA => P::AuthenticationData(r.binary()?),
        P::REQUEST_PROBLEM_INFORMATION => {
            P::RequestProblemInformation(flag(r.u8()?, "request problem information above 1")?)
        }
        P::WILL_DELAY_INTERVAL => P::WillDelayInterval(r.u32()?),
        P::REQUEST_RESPONSE_INFORMATION => {
            P::RequestResponseInformation(flag(r.u8()?, "request response information above 1")?)
        }
        P::RESPONSE_INFORMATION => P::ResponseInformation(r.string()?),
        P::SERVER_REFERENCE => P::ServerReference(r.string()?),
        P::REASON_STRING => P::ReasonString(r.string()?),
        P::RECEIVE_MAXIMUM => P::ReceiveMaximum(nonzero(r.u16()?, "receive maximum 0")?),
        P::TOPIC_ALIAS_MAXIMUM => P::TopicAliasMaximum(r.u16()?),
        // Topic Alias 0 decodes: the receiver answers DISCONNECT 0x94 (MQTT-3.3.2-8).
        P::TOPIC_ALIAS => P::TopicAlias(r.u16()?),
        P::MAXIMUM_QOS => P::MaximumQoS(flag(r.u8()?, "maximum QoS above 1")?),
        P::RETAIN_AVAILABLE => P::RetainAvailable(flag(r.u8()?, "retain available above 1")?),
        P::USER_PROPERTY => P::UserProperty(r.string()?, r.string()?),
        P::MAXIMUM_PACKET_SIZE => P::MaximumPacketSize(nonzero(r.u32()?, "maximum packet size 0")?),
        P::WILDCARD_SUBSCRIPTION_AVAILABLE => P::WildcardSubscriptionAvailable(flag(
            r.u8()?,
            "wildcard subscription available above 1",
        )?),
        P::SUBSCRIPTION_IDENTIFIER_AVAILABLE => P::SubscriptionIdentifierAvailable(flag(
            r.u8()?,
            "subscription identifier available above 1",
        )?),
        P::SHARED_SUBSCRIPTION_AVAILABLE => {
            P::SharedSubscriptionAvailable(flag(r.u8()?, "shared subscription available above 1")?)
        }
        _ => return Err(Malformed("unknown property identifier")),
    })
}

fn properties_if(r: &mut Reader<'_>, v5: bool, rules: Rules) -> Result<Properties> {
    if v5 {
        properties(r, rules)
    } else {
        Ok(Properties::default())
    }
}

/// 5.0 tail of acks, DISCONNECT and AUTH: the reason code and the property
/// block may each be omitted (reason 0 / no properties).
fn reason_and_properties(r: &mut Reader<'_>, rules: Rules) -> Result<(u8, Properties)> {
    if r.is_empty() {
        return Ok((0, Properties::default()));
    }
    let reason = r.u8()?;
    if r.is_empty() {
        return Ok((reason, Properties::default()));
    }
    Ok((reason, properties(r, rules)?))
}

fn connect(r: &mut Reader<'_>) -> Result<Connect> {
    let name = r.binary()?;
    let raw_level = r.u8()?;
    // 3.x bridges (Mosquitto's try_private) set the level's top bit.
    let bridge = raw_level & 0x80 != 0 && raw_level & 0x7f < 5;
    let level = if bridge { raw_level & 0x7f } else { raw_level };
    let protocol = match (&name[..], level) {
        (b"MQIsdp", 3) => Protocol::V31,
        (b"MQTT", 4) => Protocol::V311,
        (b"MQTT", 5) => Protocol::V5,
        (b"MQIsdp" | b"MQTT", _) => return Err(DecodeError::UnsupportedProtocolVersion(raw_level)),
        _ => {
            return Err(DecodeError::Protocol(
                "protocol name is neither MQTT nor MQIsdp (MQTT-3.1.2-1)",
            ))
        }
    };
    let v5 = protocol.is_v5();
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(Malformed("CONNECT reserved flag set (MQTT-3.1.2-3)"));
    }
    let will_flag = flags & 0x04 != 0;
    let will_retain = flags & 0x20 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(Malformed(
            "will QoS or will retain set without the will flag (MQTT-3.1.2-11/13/15)",
        ));
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(Malformed("will QoS 3 (MQTT-3.1.2-14)"))?;
    if !v5 && password_flag && !username_flag {
        return Err(Malformed(
            "password flag without user name flag (MQTT-3.1.2-22)",
        ));
    }
    let keep_alive = r.u16()?;
    let properties = properties_if(r, v5, props::CONNECT)?;
    let client_id = r.string()?;
    let will = if will_flag {
        let properties = properties_if(r, v5, props::WILL)?;
        let topic = r.string()?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    // MQTT 3.1 lets the remaining length win over the user name and password
    // flags: a flagged field may be missing.
    let lenient = protocol == Protocol::V31;
    let username = if username_flag && !(lenient && r.is_empty()) {
        Some(r.string()?)
    } else {
        None
    };
    let password = if password_flag && !(lenient && r.is_empty()) {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        protocol,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
        bridge,
    })
}

fn connack(r: &mut Reader<'_>, protocol: Protocol) -> Result<ConnAck> {
    let flags = r.u8()?;
    let code = r.u8()?;
    // In 3.1 the first byte is unused; from 3.1.1 on bits 7-1 are reserved.
    if protocol != Protocol::V31 && flags & 0xFE != 0 {
        return Err(Malformed("CONNACK reserved flags set (MQTT-3.2.2-1)"));
    }
    let session_present = protocol != Protocol::V31 && flags & 0x01 != 0;
    let properties = properties_if(r, protocol.is_v5(), props::CONNACK)?;
    Ok(ConnAck {
        session_present,
        code,
        properties,
    })
}

fn publish(r: &mut Reader<'_>, first: u8, v5: bool) -> Result<Publish> {
    let qos =
        QoS::from_u8((first >> 1) & 0x03).ok_or(Malformed("PUBLISH with QoS 3 (MQTT-3.3.1-4)"))?;
    let topic = r.string()?;
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        nonzero_packet_id(r)?
    };
    let properties = properties_if(r, v5, props::PUBLISH)?;
    if topic.is_empty() && properties.topic_alias().is_none() {
        return Err(DecodeError::Protocol(
            "empty topic name without a topic alias (MQTT-4.7.3-1)",
        ));
    }
    Ok(Publish {
        dup: first & 0x08 != 0,
        qos,
        retain: first & 0x01 != 0,
        topic,
        packet_id,
        properties,
        payload: r.rest(),
    })
}

fn ack(r: &mut Reader<'_>, v5: bool) -> Result<Ack> {
    let packet_id = r.u16()?;
    let (reason, properties) = if v5 {
        reason_and_properties(r, props::ACK)?
    } else {
        Default::default()
    };
    Ok(Ack {
        packet_id,
        reason,
        properties,
    })
}

/// 5.0 subscription options (§3.8.3.1); 3.x allows only the QoS bits.
fn sub_options(opts: u8, filter: &ByteStr, v5: bool) -> Result<SubOptions> {
    if !v5 {
        if opts & 0xFC != 0 {
            return Err(Malformed(
                "SUBSCRIBE options reserved bits set (3.1.1: MQTT-3.8.3-4)",
            ));
        }
        let qos = QoS::from_u8(opts)
            .ok_or(Malformed("SUBSCRIBE requested QoS 3 (3.1.1: MQTT-3.8.3-4)"))?;
        return Ok(SubOptions {
            qos,
            ..SubOptions::default()
        });
    }
    if opts & 0xC0 != 0 {
        return Err(Malformed(
            "subscription options reserved bits set (5.0: MQTT-3.8.3-5)",
        ));
    }
    let qos =
        QoS::from_u8(opts & 0x03).ok_or(DecodeError::Protocol("subscription maximum QoS 3"))?;
    let no_local = opts & 0x04 != 0;
    let retain_handling = (opts >> 4) & 0x03;
    if retain_handling == 3 {
        return Err(DecodeError::Protocol("retain handling 3"));
    }
    if no_local && filter.starts_with("$share/") {
        return Err(DecodeError::Protocol(
            "no local on a shared subscription (5.0: MQTT-3.8.3-4)",
        ));
    }
    Ok(SubOptions {
        qos,
        no_local,
        retain_as_published: opts & 0x08 != 0,
        retain_handling,
    })
}

fn subscribe(r: &mut Reader<'_>, v5: bool) -> Result<Subscribe> {
    let packet_id = nonzero_packet_id(r)?;
    let properties = properties_if(r, v5, props::SUBSCRIBE)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let options = sub_options(r.u8()?, &filter, v5)?;
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol(
            "SUBSCRIBE without topic filters (MQTT-3.8.3-3)",
        ));
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

fn suback(r: &mut Reader<'_>, v5: bool) -> Result<SubAck> {
    let packet_id = r.u16()?;
    let properties = properties_if(r, v5, props::ACK)?;
    let codes = r.rest_vec();
    if codes.is_empty() {
        return Err(DecodeError::Protocol("SUBACK without return codes"));
    }
    Ok(SubAck {
        packet_id,
        codes,
        properties,
    })
}

fn unsubscribe(r: &mut Reader<'_>, v5: bool) -> Result<Unsubscribe> {
    let packet_id = nonzero_packet_id(r)?;
    let properties = properties_if(r, v5, props::UNSUBSCRIBE)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol(
            "UNSUBSCRIBE without topic filters (MQTT-3.10.3-2)",
        ));
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

fn unsuback(r: &mut Reader<'_>, v5: bool) -> Result<UnsubAck> {
    let packet_id = r.u16()?;
    if !v5 {
        return Ok(UnsubAck {
            packet_id,
            codes: Vec::new(),
            properties: Properties::default(),
        });
    }
    let properties = properties(r, props::ACK)?;
    let codes = r.rest_vec();
    if codes.is_empty() {
        return Err(DecodeError::Protocol("UNSUBACK without reason codes"));
    }
    Ok(UnsubAck {
        packet_id,
        codes,
        properties,
    })
}
