//! `tarta_proto::ws::FrameDecoder` on arbitrary bytes, fed whole and in chunks.
//!
//! Input: two selector bytes, then the byte stream a client would send after
//! the upgrade. The first selector byte picks the decoder's maximum payload
//! (`u64::MAX`, or 2^(b & 31)); both seed the chunk sizes (0..=31 bytes, with
//! an occasional empty read) the stream is fed in, so partial headers and
//! partial payloads are exercised.
//!
//! Never panics; the stream fed in chunks gives exactly what it gives when fed
//! at once: the same payload bytes (however split into `Data` events), the
//! same control events, the same error, the same decoder state and the same
//! unconsumed bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tarta_proto::ws::{FrameDecoder, WsError, WsEvent};

/// Events in a bounded input are bounded; this is only a safety net.
const MAX_EVENTS: usize = 100_000;

#[derive(Debug, PartialEq, Eq, Default)]
struct Outcome {
    data: Vec<u8>,
    control: Vec<WsEvent>,
    error: Option<WsError>,
}

impl Outcome {
    /// Pulls events until the decoder needs more bytes or fails. False once it failed.
    fn pull(&mut self, dec: &mut FrameDecoder, buf: &mut BytesMut) -> bool {
        for _ in 0..MAX_EVENTS {
            let len = buf.len();
            match dec.next(buf) {
                Ok(Some(WsEvent::Data(d))) => {
                    assert!(!d.is_empty(), "empty Data event");
                    assert!(
                        buf.len() + d.len() <= len,
                        "Data event not taken from the buffer"
                    );
                    self.data.extend_from_slice(&d);
                }
                Ok(Some(ev)) => self.control.push(ev),
                Ok(None) => return true,
                Err(e) => {
                    self.error = Some(e);
                    return false;
                }
            }
        }
        panic!("more than {MAX_EVENTS} events");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&[a, b], stream)) = data.split_first_chunk::<2>() else {
        return;
    };
    let max_payload = if a & 0x80 != 0 {
        u64::MAX
    } else {
        1u64 << (a & 31)
    };

    // All at once.
    let mut whole_dec = FrameDecoder::new(max_payload);
    let mut whole_buf = BytesMut::from(stream);
    let mut whole = Outcome::default();
    whole.pull(&mut whole_dec, &mut whole_buf);

    // In chunks whose sizes come from a generator seeded by the selector.
    let mut seed = u32::from_le_bytes([a, b, a ^ 0x5a, b ^ 0xa5]) | 1;
    let mut next_size = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        if seed.is_multiple_of(11) {
            0
        } else {
            (seed >> 8) as usize % 32
        }
    };
    let mut dec = FrameDecoder::new(max_payload);
    let mut buf = BytesMut::new();
    let mut chunked = Outcome::default();
    let mut pos = 0;
    while pos < stream.len() {
        let n = next_size().min(stream.len() - pos);
        buf.extend_from_slice(&stream[pos..pos + n]);
        pos += n;
        if !chunked.pull(&mut dec, &mut buf) {
            break;
        }
    }
    if stream.is_empty() {
        chunked.pull(&mut dec, &mut buf);
    }
    buf.extend_from_slice(&stream[pos..]);

    assert_eq!(chunked, whole, "chunked feeding changed the outcome");
    assert_eq!(dec, whole_dec, "chunked feeding changed the decoder state");
    assert_eq!(
        buf, whole_buf,
        "chunked feeding changed what is left unconsumed"
    );
});
