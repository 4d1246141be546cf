//! `ByteStr`: an MQTT UTF-8 string held as a zero-copy slice of the read buffer.

use bytes::Bytes;
use std::fmt;

/// A UTF-8 string as MQTT defines it (MQTT-1.5.4): valid UTF-8 and no U+0000.
/// It is a `Bytes` slice, so cloning it is a reference-count increment.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteStr(Bytes);

/// A byte sequence that is not an MQTT UTF-8 string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidString;

impl ByteStr {
    /// Checks `bytes` (UTF-8, no NUL) and wraps it without copying.
    pub fn from_bytes(bytes: Bytes) -> Result<Self, InvalidString> {
        match std::str::from_utf8(&bytes) {
            Ok(s) if !s.contains('\0') => Ok(ByteStr(bytes)),
            _ => Err(InvalidString),
        }
    }

    /// A static string (checked).
    pub fn from_static(s: &'static str) -> Self {
        debug_assert!(!s.contains('\0'));
        ByteStr(Bytes::from_static(s.as_bytes()))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor checks (or takes a `str`) that the bytes are UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for ByteStr {
    /// Panics in debug builds only if `s` holds NUL; callers build these from
    /// validated input or constants.
    fn from(s: String) -> Self {
        debug_assert!(!s.contains('\0'));
        ByteStr(Bytes::from(s))
    }
}

impl From<&str> for ByteStr {
    fn from(s: &str) -> Self {
        ByteStr::from(s.to_owned())
    }
}

// Hash as a `str` so that maps keyed by `ByteStr` can be queried with `&str`.
impl std::hash::Hash for ByteStr {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl std::borrow::Borrow<str> for ByteStr {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl std::ops::Deref for ByteStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for ByteStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ByteStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
