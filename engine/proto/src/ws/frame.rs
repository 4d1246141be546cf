//! WebSocket frames: a pull decoder over the connection's own read buffer
//! (payloads are unmasked in place and handed out as zero-copy slices, even
//! before a large frame has fully arrived), and server frame encoding.

use super::close;
use super::mask::unmask;
use bytes::{Buf, Bytes, BytesMut};
use std::io::Cursor;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// What the client sent.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEvent {
    /// Bytes of the MQTT stream (a whole frame's payload or part of it).
    Data(BytesMut),
    Ping(Bytes),
    Pong,
    /// A close frame: the code (if any) to echo back.
    Close(Option<u16>),
}

/// A protocol violation: close the connection with `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsError {
    pub code: u16,
    pub what: &'static str,
}

fn err(code: u16, what: &'static str) -> WsError {
    WsError { code, what }
}

/// Decoder state of one connection. Plain data (`Clone + Send`), so a
/// connection can move to another shard in the middle of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameDecoder {
    max_payload: u64,
    /// Payload bytes of the current data frame still to come.
    left: u64,
    mask: [u8; 4],
    /// Position in the mask cycle for the next payload byte.
    offset: usize,
    /// The current data frame ends its message.
    fin: bool,
    /// A fragmented message is open: only continuation frames may follow.
    in_message: bool,
    /// Decoding a server's frames (a bridge's outgoing link): they must not
    /// be masked (RFC 6455 §5.1), where a client's must be.
    from_server: bool,
}

impl FrameDecoder {
    /// `max_payload`: the largest data frame accepted (larger: close 1009).
    pub fn new(max_payload: u64) -> Self {
        FrameDecoder {
            max_payload,
            left: 0,
            mask: [0; 4],
            offset: 0,
            fin: true,
            in_message: false,
            from_server: false,
        }
    }

    /// A decoder for the frames a server sends (unmasked).
    pub fn for_client(max_payload: u64) -> Self {
        FrameDecoder {
            from_server: true,
            ..FrameDecoder::new(max_payload)
        }
    }

    /// The next event from `buf`, consuming what it uses. `Ok(None)`: more
    /// bytes are needed (whatever is left in `buf` must be kept).
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<WsEvent>, WsError> {
        loop {
            if self.left > 0 {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = usize::try_from(self.left)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let mut chunk = buf.split_to(n);
                self.offset = unmask(&mut chunk, self.mask, self.offset);
                self.left -= n as u64;
                if self.left == 0 && self.fin {
                    self.in_message = false;
                }
                return Ok(Some(WsEvent::Data(chunk)));
            }
            let mut cur = Cursor::new(&buf[..]);
            let (hdr, len) = match FrameHeader::parse(&mut cur) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(None),
                Err(_) => return Err(err(close::PROTOCOL_ERROR, "invalid frame header")),
            };
            let hlen = cur.position() as usize;
            if hdr.rsv1 || hdr.rsv2 || hdr.rsv3 {
                return Err(err(
                    close::PROTOCOL_ERROR,
                    "reserved bits set without an extension",
                ));
            }
            let mask = match (hdr.mask, self.from_server) {
                (Some(m), false) => m,
                (None, true) => [0; 4],
                (None, false) => {
                    return Err(err(close::PROTOCOL_ERROR, "client frames must be masked"))
                }
                (Some(_), true) => {
                    return Err(err(
                        close::PROTOCOL_ERROR,
                        "server frames must not be masked",
                    ))
                }
            };
            match hdr.opcode {
                OpCode::Data(Data::Binary) | OpCode::Data(Data::Continue) => {
                    let cont = hdr.opcode == OpCode::Data(Data::Continue);
                    if cont && !self.in_message {
                        return Err(err(
                            close::PROTOCOL_ERROR,
                            "continuation frame without a message",
                        ));
                    }
                    if !cont && self.in_message {
                        return Err(err(
                            close::PROTOCOL_ERROR,
                            "new message inside a fragmented one",
                        ));
                    }
                    if len > self.max_payload {
                        return Err(err(close::TOO_BIG, "frame larger than the maximum"));
                    }
                    buf.advance(hlen);
                    self.left = len;
                    self.mask = mask;
                    self.offset = 0;
                    self.fin = hdr.is_final;
                    self.in_message = !hdr.is_final;
                }
                OpCode::Data(Data::Text) => {
                    return Err(err(
                        close::UNSUPPORTED_DATA,
                        "text frame: MQTT needs binary frames (MQTT-6.0.0-1)",
                    ));
                }
                OpCode::Data(Data::Reserved(_)) | OpCode::Control(Control::Reserved(_)) => {
                    return Err(err(close::PROTOCOL_ERROR, "reserved opcode"));
                }
                OpCode::Control(c) => {
                    if !hdr.is_final || len > 125 {
                        return Err(err(close::PROTOCOL_ERROR, "invalid control frame"));
                    }
                    let len = len as usize;
                    if buf.len() < hlen + len {
                        return Ok(None);
                    }
                    buf.advance(hlen);
                    let mut p = buf.split_to(len);
                    unmask(&mut p, mask, 0);
                    return match c {
                        Control::Ping => Ok(Some(WsEvent::Ping(p.freeze()))),
                        Control::Pong => Ok(Some(WsEvent::Pong)),
                        _ => parse_close(&p).map(|c| Some(WsEvent::Close(c))),
                    };
                }
            }
        }
    }
}

fn parse_close(p: &[u8]) -> Result<Option<u16>, WsError> {
    match p {
        [] => Ok(None),
        [_] => Err(err(close::PROTOCOL_ERROR, "close frame with a 1-byte body")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(err(close::PROTOCOL_ERROR, "invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(err(close::INVALID_PAYLOAD, "close reason is not UTF-8"));
            }
            Ok(Some(code))
        }
    }
}

pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PONG: u8 = 0xA;

/// Writes an unmasked, final server frame header for `len` payload bytes;
/// returns how many bytes of `out` it used.
pub fn frame_header(opcode: u8, len: u64, out: &mut [u8; 10]) -> usize {
    out[0] = 0x80 | opcode;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u64::from(u16::MAX) {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&len.to_be_bytes());
        10
    }
}

/// A masked client frame (RFC 6455 §5.2), as a browser would send it. For
/// clients, tests and benchmarks; the broker only sends server frames.
pub fn client_frame(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 14);
    v.push(if fin { 0x80 } else { 0 } | opcode);
    let len = payload.len();
    if len < 126 {
        v.push(0x80 | len as u8);
    } else if len <= 65535 {
        v.push(0x80 | 126);
        v.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        v.push(0x80 | 127);
        v.extend_from_slice(&(len as u64).to_be_bytes());
    }
    v.extend_from_slice(&mask);
    let start = v.len();
    v.extend_from_slice(payload);
    // XOR is its own inverse: the word-at-a-time unmasking masks.
    unmask(&mut v[start..], mask, 0);
    v
}

/// A complete server close frame.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut h = [0u8; 10];
    let n = frame_header(OP_CLOSE, 2 + reason.len() as u64, &mut h);
    let mut v = h[..n].to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(reason);
    v
}

/// A complete pong frame echoing `payload`.
pub fn pong_frame(payload: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 10];
    let n = frame_header(OP_PONG, payload.len() as u64, &mut h);
    let mut v = h[..n].to_vec();
    v.extend_from_slice(payload);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::{quickcheck, TestResult};

    fn decode_all(
        dec: &mut FrameDecoder,
        bytes: &[u8],
        split: &[usize],
    ) -> Result<(Vec<u8>, Vec<WsEvent>), WsError> {
        let mut data = Vec::new();
        let mut other = Vec::new();
        let mut buf = BytesMut::new();
        let mut pos = 0;
        let mut cuts: Vec<usize> = split.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.push(bytes.len());
        cuts.sort_unstable();
        for c in cuts {
            buf.extend_from_slice(&bytes[pos..c.max(pos)]);
            pos = c.max(pos);
            while let Some(ev) = dec.next(&mut buf)? {
                match ev {
                    WsEvent::Data(d) => data.extend_from_slice(&d),
                    e => other.push(e),
                }
            }
        }
        Ok((data, other))
    }

    quickcheck! {
        /// Any fragmentation of a byte stream into frames, and any split of
        /// those frames into reads, yields the same stream (MQTT-6.0.0-2/3).
        fn any_framing_and_any_split_yield_the_same_bytes(stream: Vec<u8>, frag: Vec<u8>, split: Vec<usize>, mask: u32) -> TestResult {
            let mask = mask.to_be_bytes();
            let mut wire = Vec::new();
            let mut pos = 0;
            let mut first = true;
            let sizes: Vec<usize> = frag.iter().map(|f| *f as usize).collect();
            let mut i = 0;
            loop {
                let n = sizes.get(i).copied().unwrap_or(stream.len()).min(stream.len() - pos);
                i += 1;
                let last = pos + n == stream.len();
                let op = if first { 0x2 } else { 0x0 };
                wire.extend(client_frame(op, last, &stream[pos..pos + n], mask));
                if i % 3 == 0 && !last {
                    wire.extend(client_frame(0x9, true, b"ping", mask)); // control frames may interleave
                }
                pos += n;
                first = false;
                if last { break; }
            }
            let mut dec = FrameDecoder::new(u64::MAX);
            match decode_all(&mut dec, &wire, &split) {
                Ok((data, _)) => TestResult::from_bool(data == stream && !dec.in_message),
                Err(e) => TestResult::error(format!("{e:?}")),
            }
        }

        fn arbitrary_bytes_never_panic(bytes: Vec<u8>, split: Vec<usize>) -> bool {
            let mut dec = FrameDecoder::new(1 << 20);
            let _ = decode_all(&mut dec, &bytes, &split);
            true
        }

        fn server_header_matches_tungstenite(len: u64, op: bool) -> bool {
            let len = len >> (len % 64);
            let opcode = if op { OP_BINARY } else { OP_PONG };
            let mut ours = [0u8; 10];
            let n = frame_header(opcode, len, &mut ours);
            let theirs = FrameHeader {
                opcode: if op { OpCode::Data(Data::Binary) } else { OpCode::Control(Control::Pong) },
                ..FrameHeader::default()
            };
            let mut v = Vec::new();
            theirs.format(len, &mut v).is_ok() && v == ours[..n]
        }
    }

    fn one(bytes: &[u8]) -> Result<Option<WsEvent>, WsError> {
        let mut dec = FrameDecoder::new(1000);
        let mut buf = BytesMut::from(bytes);
        dec.next(&mut buf)
    }

    #[test]
    fn violations_get_their_close_codes() {
        let m = [1, 2, 3, 4];
        assert_eq!(
            one(&client_frame(0x1, true, b"hi", m)).unwrap_err().code,
            1003,
            "text"
        );
        let mut unmasked = client_frame(0x2, true, b"x", m);
        unmasked[1] &= 0x7f;
        unmasked.drain(2..6);
        assert_eq!(one(&unmasked).unwrap_err().code, 1002, "unmasked");
        assert_eq!(
            one(&client_frame(0x0, true, b"x", m)).unwrap_err().code,
            1002,
            "stray continuation"
        );
        assert_eq!(
            one(&client_frame(0x3, true, b"x", m)).unwrap_err().code,
            1002,
            "reserved opcode"
        );
        assert_eq!(
            one(&client_frame(0x9, false, b"x", m)).unwrap_err().code,
            1002,
            "fragmented ping"
        );
        assert_eq!(
            one(&client_frame(0x2, true, &[0; 1001], m))
                .unwrap_err()
                .code,
            1009,
            "too big"
        );
        let mut rsv = client_frame(0x2, true, b"x", m);
        rsv[0] |= 0x40;
        assert_eq!(one(&rsv).unwrap_err().code, 1002, "rsv1");
        assert_eq!(
            one(&client_frame(0x8, true, &[0x03, 0xe8, 0xff], m))
                .unwrap_err()
                .code,
            1007,
            "close reason not UTF-8"
        );
        assert_eq!(
            one(&client_frame(0x8, true, &[0x03, 0xed], m))
                .unwrap_err()
                .code,
            1002,
            "close code 1005"
        );
    }

    #[test]
    fn control_frames() {
        let m = [9, 8, 7, 6];
        assert_eq!(
            one(&client_frame(0x9, true, b"abc", m)).unwrap(),
            Some(WsEvent::Ping(Bytes::from_static(b"abc")))
        );
        assert_eq!(
            one(&client_frame(0xA, true, b"", m)).unwrap(),
            Some(WsEvent::Pong)
        );
        assert_eq!(
            one(&client_frame(0x8, true, &[0x03, 0xe8], m)).unwrap(),
            Some(WsEvent::Close(Some(1000)))
        );
        assert_eq!(
            one(&client_frame(0x8, true, &[], m)).unwrap(),
            Some(WsEvent::Close(None))
        );
        // An incomplete control frame waits.
        let f = client_frame(0x9, true, b"abc", m);
        assert_eq!(one(&f[..f.len() - 1]).unwrap(), None);
    }

    #[test]
    fn payload_is_unmasked_in_place_without_copy() {
        let f = client_frame(0x2, true, &[7u8; 300], [1, 2, 3, 4]);
        let mut buf = BytesMut::from(&f[..]);
        let base = buf.as_ptr() as usize;
        let mut dec = FrameDecoder::new(1 << 20);
        match dec.next(&mut buf).unwrap() {
            Some(WsEvent::Data(d)) => {
                assert_eq!(&d[..], &[7u8; 300][..]);
                assert_eq!(d.as_ptr() as usize, base + 8, "a slice of the read buffer");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn close_and_pong_frames_encode() {
        assert_eq!(close_frame(1002, "x"), vec![0x88, 3, 0x03, 0xea, b'x']);
        assert_eq!(pong_frame(b"ab"), vec![0x8a, 2, b'a', b'b']);
    }

    #[test]
    fn a_client_decodes_unmasked_server_frames_and_refuses_masked_ones() {
        let mut h = [0u8; 10];
        let n = frame_header(OP_BINARY, 3, &mut h);
        let mut wire = BytesMut::from(&h[..n]);
        wire.extend_from_slice(b"abc");
        wire.extend_from_slice(&pong_frame(b"")[..]);
        let mut d = FrameDecoder::for_client(1024);
        assert_eq!(
            d.next(&mut wire).unwrap(),
            Some(WsEvent::Data(BytesMut::from(&b"abc"[..])))
        );
        assert_eq!(d.next(&mut wire).unwrap(), Some(WsEvent::Pong));
        let mut masked = BytesMut::from(&client_frame(OP_BINARY, true, b"x", [1, 2, 3, 4])[..]);
        let e = FrameDecoder::for_client(1024)
            .next(&mut masked)
            .unwrap_err();
        assert_eq!(e.code, close::PROTOCOL_ERROR);
    }
}
