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

pub use tarta_proto::ws::frame::client_frame;

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
