//! `tarta_proto::proxy::parse` on arbitrary bytes (what a PROXY-protocol
//! listener has received so far).
//!
//! Never panics, and:
//! - a header consumes at most what was received and at most `MAX_HEADER`;
//!   parsing just those bytes gives the same header (it never reads past it);
//! - the answer is stable as bytes arrive: for every prefix, the answer is
//!   `NeedMore` or the whole input's answer (a refusal stays a refusal, for
//!   the same reason); if the whole input needs more, so does every prefix.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tarta_proto::proxy::{parse, Parsed, MAX_HEADER};

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Ok(Parsed::Done { consumed, .. }) = whole {
        assert!(consumed <= data.len() && consumed <= MAX_HEADER && consumed > 0);
        assert_eq!(
            parse(&data[..consumed]),
            whole,
            "parsing just the header differs"
        );
    }
    if let Err(e) = &whole {
        let _ = e.to_string();
    }
    // Every prefix of the first 128 bytes (the signatures, a v1 line, a v2
    // fixed header and address block), then a few further cuts.
    let n = data.len();
    let further = [n / 2, n * 3 / 4, n.saturating_sub(1)];
    for k in (0..n.min(128)).chain(further.into_iter().filter(|&k| k >= 128 && k < n)) {
        match parse(&data[..k]) {
            Ok(Parsed::NeedMore) => {}
            prefix => assert_eq!(prefix, whole, "the answer to a prefix of {k} bytes changed"),
        }
    }
});
