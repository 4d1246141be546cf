//! `tarta_proto::passwd`: `Hash::parse`, `lines`/`render` and
//! `PasswordFile::parse` on arbitrary text (the input as lossy UTF-8).
//!
//! Cost cap: `PasswordFile::parse` hashes a decoy with the largest iteration
//! count in the file (up to 10,000,000: seconds per input). Before it is
//! called, every `$7$` entry whose count parses above `MAX_FUZZ_ITERATIONS`
//! is rewritten to `count % MAX_FUZZ_ITERATIONS + 1` (the text is then
//! re-rendered with `passwd::render`). `Hash::verify` is only called for
//! hashes of at most `MAX_VERIFY_COST` iterations.
//!
//! Never panics, and:
//! - every hash that parses prints back to a string that parses to it
//!   (`Hash::parse(&h.to_string()) == h`);
//! - `lines(render(lines(text))) == lines(text)` (what `tarta passwd` relies
//!   on to rewrite one line of a file);
//! - a fresh `Hash::pbkdf2` of a password (with a parsed hash's salt and
//!   count) verifies that password;
//! - a file that parses holds exactly its entries' users, and `check` gives
//!   each of them `Ok` exactly when its hash verifies the password (never
//!   `UnknownUser`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tarta_proto::passwd::{lines, render, Hash, Line, PasswordFile, Verdict};

/// The most iterations a `$7$` entry keeps when given to `PasswordFile::parse`.
const MAX_FUZZ_ITERATIONS: u32 = 1000;
/// The most iterations of a hash `verify` is called on.
const MAX_VERIFY_COST: u32 = 8;
const MAX_ENTRIES: usize = 32;

fn check_hash(field: &str, password: &[u8]) -> Option<Hash> {
    let h = Hash::parse(field).ok()?;
    let printed = h.to_string();
    assert_eq!(
        Hash::parse(&printed).as_ref(),
        Ok(&h),
        "{field:?} printed as {printed:?}"
    );
    let _ = format!("{h:?}");
    if h.cost() <= MAX_VERIFY_COST {
        let _ = h.verify(password);
        if let Hash::Pbkdf2Sha512 {
            iterations, salt, ..
        } = &h
        {
            let fresh = Hash::pbkdf2(password, *iterations, salt);
            assert!(
                fresh.verify(password),
                "a fresh hash does not verify its password"
            );
            assert_eq!(Hash::parse(&fresh.to_string()).as_ref(), Ok(&fresh));
        }
    }
    Some(h)
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The password tried against every hash: the input's last line, less a
    // leading `#` (so that a file can end with a comment holding it).
    let last = text.lines().last().unwrap_or("");
    let password = last.strip_prefix('#').unwrap_or(last).as_bytes().to_vec();
    let password = &password[..];

    let Ok(parsed) = lines(&text) else {
        // PasswordFile::parse reads lines first: it fails too.
        assert!(PasswordFile::parse(&text).is_err());
        return;
    };
    let rendered = render(&parsed);
    assert_eq!(
        lines(&rendered).as_ref(),
        Ok(&parsed),
        "lines(render(lines(text))) changed"
    );

    let mut capped = parsed.clone();
    let mut rewrote = false;
    let mut entries = 0;
    for line in &mut capped {
        let Line::Entry { field, .. } = line else {
            continue;
        };
        entries += 1;
        if entries > MAX_ENTRIES {
            return;
        }
        let Some(h) = check_hash(field, password) else {
            continue;
        };
        if let Hash::Pbkdf2Sha512 { iterations, .. } = &h {
            if iterations.get() > MAX_FUZZ_ITERATIONS {
                let rest = field["$7$".len()..].split_once('$').map_or("", |(_, r)| r);
                let n = iterations.get() % MAX_FUZZ_ITERATIONS + 1;
                *field = format!("$7${n}${rest}");
                rewrote = true;
            }
        }
    }
    let text = if rewrote {
        render(&capped)
    } else {
        text.into_owned()
    };

    let Ok(file) = PasswordFile::parse(&text) else {
        return;
    };
    let entries: Vec<(&String, Hash)> = capped
        .iter()
        .filter_map(|l| match l {
            Line::Entry { user, field } => Some((user, Hash::parse(field).ok()?)),
            Line::Other(_) => None,
        })
        .collect();
    assert_eq!(file.len(), entries.len(), "users in the file");
    assert_eq!(file.is_empty(), entries.is_empty());
    for (user, h) in &entries {
        assert!(file.contains(user), "{user:?} missing");
        if h.cost() > MAX_VERIFY_COST {
            continue;
        }
        let verdict = file.check(user, password);
        assert_ne!(verdict, Verdict::UnknownUser, "{user:?}");
        assert_eq!(verdict == Verdict::Ok, h.verify(password));
    }
});
