//! `tarta_proto::mqtt::decode` on arbitrary bytes.
//!
//! Input: one selector byte, then a byte stream decoded packet after packet.
//! The selector's low two bits pick the protocol level the stream is decoded
//! at (0: 3.1, 1: 3.1.1, 2 and 3: 5.0); with its top bit set the maximum
//! packet size is small (8..=256 bytes, from bits 2-6), else `u32::MAX`.
//!
//! Never panics; for every packet decoded:
//! - `frame_len` of the stream gave that packet's size, and every shorter
//!   prefix of it decodes to `Ok(None)` without consuming anything;
//! - encode -> decode gives an equal packet, consuming exactly the encoding;
//!   encoding that again gives the same bytes; `encoded_len` is exact;
//!   `encode_publish_header` + payload equals `encode` for a PUBLISH.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tarta_proto::mqtt::{
    decode, encode, encode_publish_header, encoded_len, frame_len, Packet, Protocol,
};

/// More packets than that in one input add nothing.
const MAX_PACKETS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, stream)) = data.split_first() else {
        return;
    };
    let protocol = match sel & 0x03 {
        0 => Protocol::V31,
        1 => Protocol::V311,
        _ => Protocol::V5,
    };
    let max = if sel & 0x80 != 0 {
        8 * (1 + u32::from((sel >> 2) & 0x1F))
    } else {
        u32::MAX
    };
    let mut buf = BytesMut::from(stream);
    for _ in 0..MAX_PACKETS {
        let before = buf.clone();
        let framed = frame_len(&before);
        match decode(&mut buf, protocol, max) {
            Ok(Some(packet)) => {
                let size = before.len() - buf.len();
                assert_eq!(framed, Ok(Some(size)), "frame_len disagrees with decode");
                check_prefixes(&before[..size], protocol, max);
                check_round_trip(&packet, protocol);
            }
            Ok(None) => {
                assert_eq!(buf, before, "Ok(None) consumed bytes");
                return;
            }
            Err(e) => {
                // Exercise the error's reason code and message.
                let _ = (e.reason_code(), e.to_string());
                return;
            }
        }
    }
});

/// Every proper prefix of a complete packet is incomplete: `Ok(None)`, nothing consumed.
fn check_prefixes(packet: &[u8], protocol: Protocol, max: u32) {
    // The fixed header (1 + up to 4 bytes), then a few cuts through the body.
    let n = packet.len();
    let cuts = [0, 1, 2, 3, 4, 5, n / 2, n.saturating_sub(1)];
    for &k in cuts.iter().filter(|&&k| k < n) {
        let mut b = BytesMut::from(&packet[..k]);
        match decode(&mut b, protocol, max) {
            Ok(None) => assert_eq!(b.len(), k, "a prefix consumed bytes"),
            other => panic!("prefix of {k} of a {n}-byte packet decoded to {other:?}"),
        }
    }
}

fn encode_vec(packet: &Packet, protocol: Protocol) -> BytesMut {
    let mut out = BytesMut::new();
    encode(packet, protocol, &mut out);
    assert_eq!(
        out.len(),
        encoded_len(packet, protocol),
        "encoded_len is not the encoded size of {packet:?}"
    );
    assert_eq!(
        frame_len(&out),
        Ok(Some(out.len())),
        "frame_len of an encoding"
    );
    if let Packet::Publish(p) = packet {
        let mut split = BytesMut::new();
        encode_publish_header(p, protocol, &mut split);
        split.extend_from_slice(&p.payload);
        assert_eq!(split, out, "encode_publish_header + payload != encode");
    }
    out
}

fn check_round_trip(packet: &Packet, protocol: Protocol) {
    let first = encode_vec(packet, protocol);
    let mut buf = first.clone();
    let again = match decode(&mut buf, protocol, u32::MAX) {
        Ok(Some(p)) => p,
        other => panic!("re-decoding the encoding of {packet:?} ({first:02x?}) gave {other:?}"),
    };
    assert!(buf.is_empty(), "{} bytes left after re-decoding", buf.len());
    assert_eq!(&again, packet, "decode(encode(p)) != p for {first:02x?}");
    let second = encode_vec(&again, protocol);
    assert_eq!(second, first, "encode(decode(encode(p))) != encode(p)");
}
