//! Inputs for the WebSocket suite: masked client frames as a browser sends
//! them, the decoder loop the connection task runs, and server headers.

use bytes::BytesMut;
use tarta_proto::ws::frame::OP_BINARY;
use tarta_proto::ws::{frame_header, FrameDecoder, WsError, WsEvent};

/// Unmask sizes: 16 B to 64 KiB.
pub const SIZES: [usize; 7] = [16, 64, 256, 1024, 4096, 16 * 1024, 64 * 1024];

pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A payload-like buffer of `len` bytes.
pub fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 253) as u8).collect()
}

/// A masked client frame (RFC 6455 §5.2).
pub fn client_frame(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut v = vec![if fin { 0x80 } else { 0 } | opcode];
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
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    v
}

/// `frames` binary frames of `payload_len` bytes each, back to back, each
/// with its own mask.
pub fn client_stream(frames: usize, payload_len: usize) -> Vec<u8> {
    let payload = data(payload_len);
    let mut out = Vec::new();
    for i in 0..frames {
        let mask = (0x9e37_79b9_u32.wrapping_mul(i as u32 + 1)).to_be_bytes();
        out.extend(client_frame(OP_BINARY, true, &payload, mask));
    }
    out
}

/// Runs the decoder over `buf` until it needs more bytes, as the connection
/// task does after a read; returns the number of MQTT bytes handed out.
pub fn decode_all(dec: &mut FrameDecoder, buf: &mut BytesMut) -> Result<usize, WsError> {
    let mut n = 0;
    while let Some(ev) = dec.next(buf)? {
        if let WsEvent::Data(d) = ev {
            n += d.len();
        }
    }
    Ok(n)
}

/// A server binary frame header for `len` payload bytes; returns its length.
pub fn server_header(len: u64, out: &mut [u8; 10]) -> usize {
    frame_header(OP_BINARY, len, out)
}
