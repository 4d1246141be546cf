//! Unmasking client frames in place (RFC 6455 §5.3), a word at a time.
//! tungstenite's mask module is private; this is small, property-tested
//! against the byte loop, and benchmarked in bench/.

/// XORs `buf` with `mask`, starting at byte `offset` of the mask cycle
/// (a frame's payload may arrive in several reads). Returns the offset
/// for the next byte.
pub fn unmask(buf: &mut [u8], mask: [u8; 4], offset: usize) -> usize {
    let mut m = mask;
    m.rotate_left(offset % 4);
    let word = u32::from_ne_bytes(m);
    let wide = u64::from(word) | (u64::from(word) << 32);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut v = [0u8; 8];
        v.copy_from_slice(c);
        let x = u64::from_ne_bytes(v) ^ wide;
        c.copy_from_slice(&x.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
    (offset + buf.len()) % 4
}

/// The plain byte loop (reference for tests and benchmarks).
pub fn unmask_bytewise(buf: &mut [u8], mask: [u8; 4], offset: usize) -> usize {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[(offset + i) % 4];
    }
    (offset + buf.len()) % 4
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::quickcheck;

    quickcheck! {
        fn word_unmask_equals_byte_loop(data: Vec<u8>, mask: (u8, u8, u8, u8), offset: u8) -> bool {
            let mask = [mask.0, mask.1, mask.2, mask.3];
            let (mut a, mut b) = (data.clone(), data);
            let oa = unmask(&mut a, mask, offset as usize);
            let ob = unmask_bytewise(&mut b, mask, offset as usize);
            a == b && oa == ob
        }

        fn unmasking_in_pieces_equals_at_once(data: Vec<u8>, cut: usize, mask: (u8, u8, u8, u8)) -> bool {
            let mask = [mask.0, mask.1, mask.2, mask.3];
            let cut = if data.is_empty() { 0 } else { cut % data.len() };
            let mut whole = data.clone();
            unmask(&mut whole, mask, 0);
            let mut parts = data;
            let (x, y) = parts.split_at_mut(cut);
            let off = unmask(x, mask, 0);
            unmask(y, mask, off);
            parts == whole
        }
    }
}
