//! The log's records and their framing.
//!
//! A frame is `len: u32 LE | crc: u32 LE | type: u8 | body (len bytes)`,
//! where `crc` is the CRC32C of the type byte and the body. A frame that
//! does not check out ends what can be trusted of a segment (see `scan`).
//!
//! Sessions are named by their slot number in the shard's session table
//! (`sid`): a `Session` record binds a sid to a client id until the
//! `SessionDel` record that frees it. Messages are written once per log
//! (`Msg`, numbered by `mid`) and referred to by every queue that holds
//! them.

use bytes::BytesMut;
use tarta_proto::mqtt::{
    self, Packet, Properties, Protocol, Publish, PublishHeader, QoS, SubOptions, Will,
};
use tarta_proto::ByteStr;

/// Frame header: length, CRC32C, type.
pub const HEADER: usize = 9;
/// A frame body larger than this is not a frame (a corrupt length).
pub const MAX_BODY: usize = 512 << 20;

/// One log record.
#[derive(Debug, Clone, PartialEq)]
pub enum Rec {
    /// A snapshot of the shard's live state starts (compaction); the
    /// records up to `SnapEnd` describe the whole state.
    SnapBegin,
    SnapEnd,
    /// A persistent session (created or changed). `offline_at`: unix
    /// second it went offline (0: connected). `will`: the will to publish
    /// if the session's connection ended without one being sent (the
    /// connection was live at a crash, or a delayed will was pending).
    Session {
        sid: u32,
        client_id: ByteStr,
        username: Option<ByteStr>,
        expiry: u32,
        offline_at: u64,
        will: Option<(Will, u32)>,
    },
    SessionDel {
        sid: u32,
    },
    Sub {
        sid: u32,
        filter: ByteStr,
        opts: SubOptions,
        sub_id: Option<u32>,
    },
    Unsub {
        sid: u32,
        filter: ByteStr,
    },
    /// A message, referred to by `mid`. `expires`: unix second (0: never);
    /// `uid`: see `Message::uid`.
    Msg {
        mid: u64,
        expires: u64,
        uid: u64,
        publish: Publish,
    },
    /// A QoS 2 message accepted from a persistent session, to be routed
    /// once this record is durable (and again after a crash, until
    /// `Routed`); with the packet id it came with (`sid` u32::MAX: none),
    /// in the same record so that a torn write keeps both or neither.
    Held {
        mid: u64,
        sid: u32,
        pid: u16,
    },
    /// The held message with this identity (`Message::uid`) was routed.
    Routed {
        uid: u64,
    },
    /// A delivery joins the back of the session's queue.
    Enq {
        sid: u32,
        mid: u64,
        qos: QoS,
        retain: bool,
        share: bool,
        sub_ids: Vec<u32>,
    },
    /// The front of the queue was sent with `pid` (or, `discarded`,
    /// dropped: expired or too large for the client).
    Sent {
        sid: u32,
        pid: u16,
        discarded: bool,
    },
    /// The delivery in flight with `pid` is done (PUBACK, PUBCOMP, or a
    /// PUBREC with an error).
    Ack {
        sid: u32,
        pid: u16,
    },
    /// PUBREC for `pid`: PUBREL sent, waiting for PUBCOMP.
    Rel {
        sid: u32,
        pid: u16,
    },
    /// Deliveries of shared subscriptions left the session (it went
    /// offline): handed to other members.
    Unshare {
        sid: u32,
    },
    /// An incoming QoS 2 packet id was accepted (PUBREC sent).
    In2 {
        sid: u32,
        pid: u16,
    },
    /// PUBREL for an incoming QoS 2 packet id (PUBCOMP sent).
    In2Rel {
        sid: u32,
        pid: u16,
    },
    /// The next packet id the session allocates (snapshots only).
    NextPid {
        sid: u32,
        pid: u16,
    },
    /// The message `mid` is its topic's retained message.
    Retain {
        mid: u64,
    },
    RetainDel {
        topic: ByteStr,
    },
}

pub(crate) const T_SNAP_BEGIN: u8 = 1;
pub(crate) const T_SNAP_END: u8 = 2;
const T_SESSION: u8 = 3;
const T_SESSION_DEL: u8 = 4;
const T_SUB: u8 = 5;
const T_UNSUB: u8 = 6;
const T_MSG: u8 = 7;
const T_ENQ: u8 = 8;
const T_SENT: u8 = 9;
const T_ACK: u8 = 10;
const T_REL: u8 = 11;
const T_UNSHARE: u8 = 12;
const T_IN2: u8 = 13;
const T_IN2_REL: u8 = 14;
const T_NEXT_PID: u8 = 15;
const T_RETAIN: u8 = 16;
const T_RETAIN_DEL: u8 = 17;
const T_HELD: u8 = 18;
const T_ROUTED: u8 = 19;

/// Appends one framed record to `out`.
pub fn encode(rec: &Rec, out: &mut Vec<u8>) {
    framed(out, |out| body(rec, out));
}

/// Frames what `body` appends (it returns the record type).
fn framed(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>) -> u8) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    let ty = body(out);
    out[start + 8] = ty;
    let len = (out.len() - start - HEADER) as u32;
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&b[..n]);
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn opts_byte(o: &SubOptions) -> u8 {
    o.qos as u8
        | (u8::from(o.no_local) << 2)
        | (u8::from(o.retain_as_published) << 3)
        | ((o.retain_handling & 3) << 4)
}

/// A PUBLISH as MQTT 5 encodes it: the message format on disk.
fn put_publish(out: &mut Vec<u8>, p: &Publish) {
    put_publish_parts(out, &PublishHeader::of(p), &p.payload);
}

fn put_publish_parts(out: &mut Vec<u8>, h: &PublishHeader<'_>, payload: &[u8]) {
    // The header is small: encoded in a reused buffer, then copied.
    thread_local! {
        static HEAD: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
    }
    HEAD.with(|b| {
        let mut b = b.borrow_mut();
        b.clear();
        h.encode(Protocol::V5, &mut b);
        put_u32(out, (b.len() + payload.len()) as u32);
        out.extend_from_slice(&b);
    });
    out.extend_from_slice(payload);
}

/// Appends a `Msg` record straight from a message's parts (what
/// `encode(&Rec::Msg { .. })` writes, without building the record).
pub fn encode_msg(
    out: &mut Vec<u8>,
    mid: u64,
    expires: u64,
    uid: u64,
    h: &PublishHeader<'_>,
    payload: &[u8],
) {
    framed(out, |out| {
        put_u64(out, mid);
        put_u64(out, expires);
        put_u64(out, uid);
        put_publish_parts(out, h, payload);
        T_MSG
    });
}

fn body(rec: &Rec, out: &mut Vec<u8>) -> u8 {
    match rec {
        Rec::SnapBegin => T_SNAP_BEGIN,
        Rec::SnapEnd => T_SNAP_END,
        Rec::Session {
            sid,
            client_id,
            username,
            expiry,
            offline_at,
            will,
        } => {
            put_u32(out, *sid);
            put_str(out, client_id);
            match username {
                None => out.push(0),
                Some(u) => {
                    out.push(1);
                    put_str(out, u);
                }
            }
            put_u32(out, *expiry);
            put_u64(out, *offline_at);
            match will {
                None => out.push(0),
                Some((w, delay)) => {
                    out.push(1);
                    put_u32(out, *delay);
                    put_publish(out, &will_publish(w));
                }
            }
            T_SESSION
        }
        Rec::SessionDel { sid } => {
            put_u32(out, *sid);
            T_SESSION_DEL
        }
        Rec::Sub {
            sid,
            filter,
            opts,
            sub_id,
        } => {
            put_u32(out, *sid);
            put_str(out, filter);
            out.push(opts_byte(opts));
            put_u32(out, sub_id.unwrap_or(0));
            T_SUB
        }
        Rec::Unsub { sid, filter } => {
            put_u32(out, *sid);
            put_str(out, filter);
            T_UNSUB
        }
        Rec::Msg {
            mid,
            expires,
            uid,
            publish,
        } => {
            put_u64(out, *mid);
            put_u64(out, *expires);
            put_u64(out, *uid);
            put_publish(out, publish);
            T_MSG
        }
        Rec::Held { mid, sid, pid } => {
            put_u64(out, *mid);
            put_u32(out, *sid);
            put_u16(out, *pid);
            T_HELD
        }
        Rec::Routed { uid } => {
            put_u64(out, *uid);
            T_ROUTED
        }
        Rec::Enq {
            sid,
            mid,
            qos,
            retain,
            share,
            sub_ids,
        } => {
            put_u32(out, *sid);
            put_u64(out, *mid);
            out.push(*qos as u8 | (u8::from(*retain) << 2) | (u8::from(*share) << 3));
            put_u16(out, sub_ids.len().min(u16::MAX as usize) as u16);
            for id in sub_ids.iter().take(u16::MAX as usize) {
                put_u32(out, *id);
            }
            T_ENQ
        }
        Rec::Sent {
            sid,
            pid,
            discarded,
        } => {
            put_u32(out, *sid);
            put_u16(out, *pid);
            out.push(u8::from(*discarded));
            T_SENT
        }
        Rec::Ack { sid, pid } => sid_pid(out, *sid, *pid, T_ACK),
        Rec::Rel { sid, pid } => sid_pid(out, *sid, *pid, T_REL),
        Rec::In2 { sid, pid } => sid_pid(out, *sid, *pid, T_IN2),
        Rec::In2Rel { sid, pid } => sid_pid(out, *sid, *pid, T_IN2_REL),
        Rec::NextPid { sid, pid } => sid_pid(out, *sid, *pid, T_NEXT_PID),
        Rec::Unshare { sid } => {
            put_u32(out, *sid);
            T_UNSHARE
        }
        Rec::Retain { mid } => {
            put_u64(out, *mid);
            T_RETAIN
        }
        Rec::RetainDel { topic } => {
            put_str(out, topic);
            T_RETAIN_DEL
        }
    }
}

fn sid_pid(out: &mut Vec<u8>, sid: u32, pid: u16, ty: u8) -> u8 {
    put_u32(out, sid);
    put_u16(out, pid);
    ty
}

/// A will as the PUBLISH it becomes (the Will Delay Interval is kept
/// beside it: it is not a PUBLISH property).
fn will_publish(w: &Will) -> Publish {
    let mut properties = w.properties.clone();
    properties.remove(0x18);
    Publish {
        dup: false,
        qos: w.qos,
        retain: w.retain,
        topic: w.topic.clone(),
        packet_id: if w.qos == QoS::AtMostOnce { 0 } else { 1 },
        properties,
        payload: w.payload.clone(),
    }
}

/// Why a record body did not decode (the frame's CRC was right: a bug or
/// a record from an incompatible version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord(pub &'static str);

struct Rd<'a> {
    b: &'a [u8],
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BadRecord> {
        if self.b.len() < n {
            return Err(BadRecord("record too short"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, BadRecord> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, BadRecord> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, BadRecord> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, BadRecord> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self) -> Result<ByteStr, BadRecord> {
        let n = usize::from(self.u16()?);
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(|s| ByteStr::from(s.to_string()))
            .map_err(|_| BadRecord("string is not UTF-8"))
    }
    fn publish(&mut self) -> Result<Publish, BadRecord> {
        let n = self.u32()? as usize;
        // A copy: the message must not keep the segment's buffer alive.
        let mut b = BytesMut::from(self.take(n)?);
        match mqtt::decode(&mut b, Protocol::V5, u32::MAX) {
            Ok(Some(Packet::Publish(p))) => Ok(p),
            _ => Err(BadRecord("message is not a PUBLISH")),
        }
    }
}

fn qos(v: u8) -> Result<QoS, BadRecord> {
    QoS::from_u8(v & 3).ok_or(BadRecord("bad QoS"))
}

/// Decodes a record body of type `ty` (the frame already checked).
pub fn decode(ty: u8, body: &[u8]) -> Result<Rec, BadRecord> {
    let mut r = Rd { b: body };
    let rec = match ty {
        T_SNAP_BEGIN => Rec::SnapBegin,
        T_SNAP_END => Rec::SnapEnd,
        T_SESSION => {
            let sid = r.u32()?;
            let client_id = r.str()?;
            let username = match r.u8()? {
                0 => None,
                _ => Some(r.str()?),
            };
            let expiry = r.u32()?;
            let offline_at = r.u64()?;
            let will = match r.u8()? {
                0 => None,
                _ => {
                    let delay = r.u32()?;
                    let p = r.publish()?;
                    let mut properties: Properties = p.properties;
                    if delay > 0 {
                        properties.push(mqtt::Property::WillDelayInterval(delay));
                    }
                    Some((
                        Will {
                            topic: p.topic,
                            payload: p.payload,
                            qos: p.qos,
                            retain: p.retain,
                            properties,
                        },
                        delay,
                    ))
                }
            };
            Rec::Session {
                sid,
                client_id,
                username,
                expiry,
                offline_at,
                will,
            }
        }
        T_SESSION_DEL => Rec::SessionDel { sid: r.u32()? },
        T_SUB => {
            let sid = r.u32()?;
            let filter = r.str()?;
            let o = r.u8()?;
            let id = r.u32()?;
            Rec::Sub {
                sid,
                filter,
                opts: SubOptions {
                    qos: qos(o)?,
                    no_local: o & 4 != 0,
                    retain_as_published: o & 8 != 0,
                    retain_handling: (o >> 4) & 3,
                },
                sub_id: (id != 0).then_some(id),
            }
        }
        T_UNSUB => Rec::Unsub {
            sid: r.u32()?,
            filter: r.str()?,
        },
        T_MSG => Rec::Msg {
            mid: r.u64()?,
            expires: r.u64()?,
            uid: r.u64()?,
            publish: r.publish()?,
        },
        T_HELD => Rec::Held {
            mid: r.u64()?,
            sid: r.u32()?,
            pid: r.u16()?,
        },
        T_ROUTED => Rec::Routed { uid: r.u64()? },
        T_ENQ => {
            let sid = r.u32()?;
            let mid = r.u64()?;
            let f = r.u8()?;
            let n = r.u16()?;
            let mut sub_ids = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                sub_ids.push(r.u32()?);
            }
            Rec::Enq {
                sid,
                mid,
                qos: qos(f)?,
                retain: f & 4 != 0,
                share: f & 8 != 0,
                sub_ids,
            }
        }
        T_SENT => Rec::Sent {
            sid: r.u32()?,
            pid: r.u16()?,
            discarded: r.u8()? != 0,
        },
        T_ACK => Rec::Ack {
            sid: r.u32()?,
            pid: r.u16()?,
        },
        T_REL => Rec::Rel {
            sid: r.u32()?,
            pid: r.u16()?,
        },
        T_UNSHARE => Rec::Unshare { sid: r.u32()? },
        T_IN2 => Rec::In2 {
            sid: r.u32()?,
            pid: r.u16()?,
        },
        T_IN2_REL => Rec::In2Rel {
            sid: r.u32()?,
            pid: r.u16()?,
        },
        T_NEXT_PID => Rec::NextPid {
            sid: r.u32()?,
            pid: r.u16()?,
        },
        T_RETAIN => Rec::Retain { mid: r.u64()? },
        T_RETAIN_DEL => Rec::RetainDel { topic: r.str()? },
        _ => return Err(BadRecord("unknown record type")),
    };
    if !r.b.is_empty() {
        return Err(BadRecord("trailing bytes in record"));
    }
    Ok(rec)
}

/// What the bytes at some offset of a segment are.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A checked frame: its type, body and length (header included).
    Whole { ty: u8, body: &'a [u8], len: usize },
    /// The bytes end before the frame does.
    Short,
    /// Not a frame: a length out of range or a checksum that fails.
    Bad,
}

/// The frame at the start of `buf`.
pub fn frame(buf: &[u8]) -> Frame<'_> {
    if buf.len() < HEADER {
        return Frame::Short;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_BODY {
        return Frame::Bad;
    }
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if buf.len() < HEADER + len {
        return Frame::Short;
    }
    if crc32c::crc32c(&buf[8..HEADER + len]) != crc {
        return Frame::Bad;
    }
    Frame::Whole {
        ty: buf[8],
        body: &buf[HEADER..HEADER + len],
        len: HEADER + len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn publish(topic: &str, payload: &'static [u8], qos: QoS) -> Publish {
        Publish {
            dup: false,
            qos,
            retain: true,
            topic: topic.into(),
            packet_id: if qos == QoS::AtMostOnce { 0 } else { 1 },
            properties: Properties::default(),
            payload: Bytes::from_static(payload),
        }
    }

    pub(crate) fn samples() -> Vec<Rec> {
        let mut props = Properties::default();
        props.push(mqtt::Property::WillDelayInterval(30));
        vec![
            Rec::SnapBegin,
            Rec::Session {
                sid: 3,
                client_id: "dev-1".into(),
                username: Some("ann".into()),
                expiry: u32::MAX,
                offline_at: 0,
                will: Some((
                    Will {
                        topic: "w/t".into(),
                        payload: Bytes::from_static(b"gone"),
                        qos: QoS::AtLeastOnce,
                        retain: false,
                        properties: props,
                    },
                    30,
                )),
            },
            Rec::Sub {
                sid: 3,
                filter: "a/+/c".into(),
                opts: SubOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    retain_as_published: false,
                    retain_handling: 2,
                },
                sub_id: Some(7),
            },
            Rec::Msg {
                mid: 1,
                expires: 0,
                uid: 99,
                publish: publish("a/b/c", b"hello", QoS::ExactlyOnce),
            },
            Rec::Enq {
                sid: 3,
                mid: 1,
                qos: QoS::AtLeastOnce,
                retain: false,
                share: true,
                sub_ids: vec![7, 9],
            },
            Rec::Sent {
                sid: 3,
                pid: 65535,
                discarded: false,
            },
            Rec::Rel { sid: 3, pid: 65535 },
            Rec::Ack { sid: 3, pid: 65535 },
            Rec::In2 { sid: 3, pid: 9 },
            Rec::In2Rel { sid: 3, pid: 9 },
            Rec::Unsub {
                sid: 3,
                filter: "a/+/c".into(),
            },
            Rec::Unshare { sid: 3 },
            Rec::NextPid { sid: 3, pid: 4 },
            Rec::Retain { mid: 1 },
            Rec::Held {
                mid: 1,
                sid: 3,
                pid: 5,
            },
            Rec::Routed { uid: 99 },
            Rec::RetainDel {
                topic: "a/b/c".into(),
            },
            Rec::SessionDel { sid: 3 },
            Rec::SnapEnd,
        ]
    }

    #[test]
    fn every_record_round_trips() {
        for rec in samples() {
            let mut buf = Vec::new();
            encode(&rec, &mut buf);
            let Frame::Whole { ty, body, len: n } = frame(&buf) else {
                panic!("no frame for {rec:?}");
            };
            assert_eq!(n, buf.len());
            assert_eq!(decode(ty, body), Ok(rec));
        }
    }

    #[test]
    fn a_message_encoded_from_its_parts_is_the_same_record() {
        let Rec::Msg { publish, .. } = &samples()[3] else {
            panic!("sample 3 is a message")
        };
        let rec = Rec::Msg {
            mid: 4,
            expires: 5,
            uid: 6,
            publish: publish.clone(),
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode(&rec, &mut a);
        encode_msg(
            &mut b,
            4,
            5,
            6,
            &PublishHeader::of(publish),
            &publish.payload,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let mut buf = Vec::new();
        encode(&samples()[3], &mut buf);
        for i in 4..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert_eq!(frame(&bad), Frame::Bad, "byte {i}");
        }
        assert_eq!(frame(&buf[..buf.len() - 1]), Frame::Short, "incomplete");
    }
}
