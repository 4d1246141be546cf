//! Mosquitto password files: `user:$7$ITERATIONS$SALT$HASH` (PBKDF2 with
//! HMAC-SHA512, what `mosquitto_passwd` 2.x writes) and the older
//! `user:$6$SALT$HASH` (SHA-512 of the password followed by the salt).
//! SALT and HASH are standard base64 with padding; the hash is 64 bytes.
//!
//! An operator's existing file works unchanged, and the files `tarta
//! passwd` writes are read by Mosquitto too. Blank lines and lines whose
//! first non-blank character is `#` are ignored; anything else that is not
//! `user:hash` is an error naming its line (a half-read password file
//! would lock users out, or worse, let them in).
//!
//! Verification compares in constant time. A user that is not in the file
//! costs the same hashing as one that is ([`PasswordFile::check`]), so the
//! time a refusal takes does not say whether the name exists.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::{digest, pbkdf2};
use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;

/// Iterations `mosquitto_passwd` 2.0 uses by default.
pub const DEFAULT_ITERATIONS: u32 = 101;
/// Bytes of salt `mosquitto_passwd` generates.
pub const SALT_LEN: usize = 12;
const HASH_LEN: usize = 64;
/// The most iterations a file may ask for: a typo must not turn one
/// CONNECT into minutes of hashing.
pub const MAX_ITERATIONS: u32 = 10_000_000;

/// One stored password hash.
#[derive(Clone, PartialEq, Eq)]
pub enum Hash {
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 {
        iterations: NonZeroU32,
        salt: Vec<u8>,
        hash: [u8; HASH_LEN],
    },
    /// `$6$`: SHA-512(password || salt).
    Sha512 { salt: Vec<u8>, hash: [u8; HASH_LEN] },
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the hash itself.
        match self {
            Hash::Pbkdf2Sha512 { iterations, .. } => {
                write!(f, "Hash($7$, {iterations} iterations)")
            }
            Hash::Sha512 { .. } => f.write_str("Hash($6$)"),
        }
    }
}

/// Why a hash string does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashError {
    /// Not `$6$...` or `$7$...` (a plaintext password, or another scheme).
    UnknownScheme,
    /// The fields are not all there.
    Truncated,
    BadIterations,
    BadSalt,
    BadHash,
    /// The system's random number generator failed (making a salt).
    NoRandom,
}

impl fmt::Display for HashError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HashError::UnknownScheme => {
                "not a $7$ (PBKDF2-SHA512) or $6$ (SHA-512) hash (a plaintext password? hash it with `tarta passwd -U FILE`)"
            }
            HashError::Truncated => "missing fields (expected $7$ITERATIONS$SALT$HASH or $6$SALT$HASH)",
            HashError::BadIterations => "the iteration count is not a number in 1..=10000000",
            HashError::BadSalt => "the salt is not valid base64",
            HashError::BadHash => "the hash is not 64 bytes of base64",
            HashError::NoRandom => "the system's random number generator failed",
        })
    }
}

impl Hash {
    /// Hashes `password` the way `mosquitto_passwd` 2.x does, with `salt`.
    pub fn pbkdf2(password: &[u8], iterations: NonZeroU32, salt: &[u8]) -> Hash {
        let mut hash = [0u8; HASH_LEN];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA512,
            iterations,
            salt,
            password,
            &mut hash,
        );
        Hash::Pbkdf2Sha512 {
            iterations,
            salt: salt.to_vec(),
            hash,
        }
    }

    /// Hashes `password` with a fresh random salt (what `tarta passwd` writes).
    pub fn new(password: &[u8], iterations: NonZeroU32) -> Result<Hash, HashError> {
        use ring::rand::SecureRandom;
        let mut salt = [0u8; SALT_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| HashError::NoRandom)?;
        Ok(Hash::pbkdf2(password, iterations, &salt))
    }

    /// Parses `$7$ITERATIONS$SALT$HASH` or `$6$SALT$HASH`.
    pub fn parse(s: &str) -> Result<Hash, HashError> {
        let decode_hash = |h: &str| -> Result<[u8; HASH_LEN], HashError> {
            let v = B64.decode(h).map_err(|_| HashError::BadHash)?;
            v.try_into().map_err(|_| HashError::BadHash)
        };
        if let Some(rest) = s.strip_prefix("$7$") {
            let mut f = rest.splitn(3, '$');
            let (Some(it), Some(salt), Some(hash)) = (f.next(), f.next(), f.next()) else {
                return Err(HashError::Truncated);
            };
            let iterations = it
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= MAX_ITERATIONS)
                .and_then(NonZeroU32::new)
                .ok_or(HashError::BadIterations)?;
            let salt = B64.decode(salt).map_err(|_| HashError::BadSalt)?;
            Ok(Hash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash: decode_hash(hash)?,
            })
        } else if let Some(rest) = s.strip_prefix("$6$") {
            let Some((salt, hash)) = rest.split_once('$') else {
                return Err(HashError::Truncated);
            };
            let salt = B64.decode(salt).map_err(|_| HashError::BadSalt)?;
            Ok(Hash::Sha512 {
                salt,
                hash: decode_hash(hash)?,
            })
        } else {
            Err(HashError::UnknownScheme)
        }
    }

    /// Whether `password` matches, compared in constant time.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => pbkdf2::verify(
                pbkdf2::PBKDF2_HMAC_SHA512,
                *iterations,
                salt,
                password,
                hash,
            )
            .is_ok(),
            Hash::Sha512 { salt, hash } => {
                let mut ctx = digest::Context::new(&digest::SHA512);
                ctx.update(password);
                ctx.update(salt);
                constant_time_eq(ctx.finish().as_ref(), hash)
            }
        }
    }

    /// Iterations of the hash function one verification costs.
    pub fn cost(&self) -> u32 {
        match self {
            Hash::Pbkdf2Sha512 { iterations, .. } => iterations.get(),
            Hash::Sha512 { .. } => 1,
        }
    }
}

impl fmt::Display for Hash {
    /// The file form, as `mosquitto_passwd` writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => write!(
                f,
                "$7${iterations}${}${}",
                B64.encode(salt),
                B64.encode(hash)
            ),
            Hash::Sha512 { salt, hash } => {
                write!(f, "$6${}${}", B64.encode(salt), B64.encode(hash))
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// What is wrong with a password file, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdError {
    /// 1-based line number.
    pub line: usize,
    pub kind: PasswdErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswdErrorKind {
    /// No `:` between the username and the hash.
    MissingColon,
    EmptyUsername,
    /// The same username twice.
    Duplicate(String),
    Hash(HashError),
}

impl fmt::Display for PasswdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: ", self.line)?;
        match &self.kind {
            PasswdErrorKind::MissingColon => f.write_str("expected username:hash"),
            PasswdErrorKind::EmptyUsername => f.write_str("empty username"),
            PasswdErrorKind::Duplicate(u) => write!(f, "user {u:?} appears twice"),
            PasswdErrorKind::Hash(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for PasswdError {}

/// One line of a password file as written: kept in order so that `tarta
/// passwd` rewrites a file changing only the line it means to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A blank or `#` line, kept as it was.
    Other(String),
    /// `user:password-field` (the field unparsed: plaintext before `-U`).
    Entry { user: String, field: String },
}

/// Splits a password file into lines without judging the password fields
/// (for editing). Errors only for a line without `user:`.
pub fn lines(text: &str) -> Result<Vec<Line>, PasswdError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_end_matches(['\r', ' ', '\t']);
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            out.push(Line::Other(line.to_string()));
            continue;
        }
        let err = |kind| PasswdError { line: i + 1, kind };
        let Some((user, field)) = line.split_once(':') else {
            return Err(err(PasswdErrorKind::MissingColon));
        };
        if user.is_empty() {
            return Err(err(PasswdErrorKind::EmptyUsername));
        }
        out.push(Line::Entry {
            user: user.to_string(),
            field: field.to_string(),
        });
    }
    Ok(out)
}

/// Renders lines back into a file (one per line, newline-terminated).
pub fn render(lines: &[Line]) -> String {
    let mut s = String::new();
    for l in lines {
        match l {
            Line::Other(t) => s.push_str(t),
            Line::Entry { user, field } => {
                s.push_str(user);
                s.push(':');
                s.push_str(field);
            }
        }
        s.push('\n');
    }
    s
}

/// A parsed password file: usernames and their hashes.
#[derive(Debug, Clone)]
pub struct PasswordFile {
    users: HashMap<String, Hash>,
    /// Verified against when the user is unknown (same cost as a real one).
    decoy: Hash,
}

/// What a credentials check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// The user is not in the file.
    UnknownUser,
    WrongPassword,
}

impl PasswordFile {
    pub fn parse(text: &str) -> Result<PasswordFile, PasswdError> {
        let mut users = HashMap::new();
        let mut max_cost = DEFAULT_ITERATIONS;
        for (i, line) in lines(text)?.into_iter().enumerate() {
            let Line::Entry { user, field } = line else {
                continue;
            };
            let err = |kind| PasswdError { line: i + 1, kind };
            let hash = Hash::parse(&field).map_err(|e| err(PasswdErrorKind::Hash(e)))?;
            max_cost = max_cost.max(hash.cost());
            if users.contains_key(&user) {
                return Err(err(PasswdErrorKind::Duplicate(user)));
            }
            users.insert(user, hash);
        }
        // The decoy costs as much as the dearest real hash, so an unknown
        // name is never answered faster than a known one.
        let iterations = NonZeroU32::new(max_cost).unwrap_or(NonZeroU32::MIN);
        let decoy = Hash::pbkdf2(b"decoy", iterations, &[0u8; SALT_LEN]);
        Ok(PasswordFile { users, decoy })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Checks a username and password (the expensive part: run it off the
    /// shard thread).
    pub fn check(&self, user: &str, password: &[u8]) -> Verdict {
        match self.users.get(user) {
            Some(h) if h.verify(password) => Verdict::Ok,
            Some(_) => Verdict::WrongPassword,
            None => {
                let _ = self.decoy.verify(password);
                Verdict::UnknownUser
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Debian's mosquitto_passwd 2.0.11:
    /// `mosquitto_passwd -b -c pw alice secret`,
    /// `mosquitto_passwd -H sha512 -b pw bob hunter2`,
    /// `mosquitto_passwd -I 1000 -b pw carol 'p@ss:w$rd'`.
    const MOSQUITTO: &str = "\
alice:$7$101$1JgfKd33XJU3HlkS$ZvpmwA/hW5Etatm0MNA5iBZ1ypvd95ErJSDdt0Xx6fVuasXI+QZigyxbR7W21jx6FCJTC8vSEU2l0fJgsFah4Q==
bob:$6$c6lUW/C1jq21VHa6$+XNSWGs+2aZVwwbgeqJK6gpDvx8rXJsWPOR2Ai1pHwj7o7mMeLp9eS1lPM7OmjYpzt7lLy4iYkLC7cBG1/27ag==
carol:$7$1000$qyEmsObvK7R/qpMO$NvA7LvLjwCBQhL+xLj87euN6PEfDfvWKJ6NJLpVgRRb5wibZteIZDLVPMlq6HaGV9F0sGqp0pZN9woRrKFhKBA==
";

    #[test]
    fn reads_what_mosquitto_passwd_writes() {
        let f = PasswordFile::parse(MOSQUITTO).unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!(f.check("alice", b"secret"), Verdict::Ok);
        assert_eq!(f.check("alice", b"Secret"), Verdict::WrongPassword);
        assert_eq!(f.check("alice", b""), Verdict::WrongPassword);
        assert_eq!(f.check("bob", b"hunter2"), Verdict::Ok);
        assert_eq!(f.check("bob", b"hunter3"), Verdict::WrongPassword);
        assert_eq!(f.check("carol", b"p@ss:w$rd"), Verdict::Ok);
        assert_eq!(f.check("mallory", b"secret"), Verdict::UnknownUser);
    }

    #[test]
    fn writes_what_it_reads_byte_for_byte() {
        for line in MOSQUITTO.lines() {
            let (_, field) = line.split_once(':').unwrap();
            assert_eq!(Hash::parse(field).unwrap().to_string(), field);
        }
        let lines = lines(MOSQUITTO).unwrap();
        assert_eq!(render(&lines), MOSQUITTO);
    }

    #[test]
    fn a_new_hash_verifies_and_round_trips() {
        let h = Hash::pbkdf2(b"pw", NonZeroU32::new(7).unwrap(), b"0123456789ab");
        assert!(h.verify(b"pw"));
        assert!(!h.verify(b"pw "));
        assert_eq!(Hash::parse(&h.to_string()).unwrap(), h);
        assert_eq!(h.cost(), 7);
        assert!(format!("{h:?}").contains("7 iterations"));
    }

    #[test]
    fn comments_and_blank_lines_are_kept_and_ignored() {
        let text = format!("# users\n\n  # indented comment\n{MOSQUITTO}");
        let f = PasswordFile::parse(&text).unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!(render(&lines(&text).unwrap()), text);
    }

    #[test]
    fn errors_name_the_line() {
        let e = |t: &str| PasswordFile::parse(t).unwrap_err();
        assert_eq!(
            e("# x\nalice\n"),
            PasswdError {
                line: 2,
                kind: PasswdErrorKind::MissingColon
            }
        );
        assert_eq!(e(":$6$a$b\n").kind, PasswdErrorKind::EmptyUsername);
        assert_eq!(
            e("alice:secret\n").kind,
            PasswdErrorKind::Hash(HashError::UnknownScheme)
        );
        assert_eq!(
            e("a:$7$0$AAAA$AAAA\n").kind,
            PasswdErrorKind::Hash(HashError::BadIterations)
        );
        assert_eq!(
            e("a:$7$99999999$AAAA$AAAA\n").kind,
            PasswdErrorKind::Hash(HashError::BadIterations)
        );
        assert_eq!(
            e("a:$7$5$!!$AAAA\n").kind,
            PasswdErrorKind::Hash(HashError::BadSalt)
        );
        assert_eq!(
            e("a:$7$5$AAAA$AAAA\n").kind,
            PasswdErrorKind::Hash(HashError::BadHash)
        );
        assert_eq!(
            e("a:$6$AAAA\n").kind,
            PasswdErrorKind::Hash(HashError::Truncated)
        );
        let one = MOSQUITTO.lines().next().unwrap();
        assert_eq!(
            e(&format!("{one}\n{one}\n")).kind,
            PasswdErrorKind::Duplicate("alice".into())
        );
        assert!(e("alice\n").to_string().starts_with("line 1: "));
    }

    #[test]
    fn arbitrary_text_never_panics() {
        fn prop(s: String) -> bool {
            let _ = PasswordFile::parse(&s);
            let _ = Hash::parse(&s);
            true
        }
        quickcheck::quickcheck(prop as fn(String) -> bool);
    }
}
