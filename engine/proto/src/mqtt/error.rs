//! [`DecodeError`]: why the decoder rejected its input, and which reason code
//! the server sends for it (CONNACK or DISCONNECT in 5.0).

use std::fmt;

/// A decoding failure. The connection must be closed after any of these; the
/// read buffer's contents are then unspecified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes are not a well-formed packet (reason code 0x81).
    Malformed(&'static str),
    /// Well-formed bytes that break a protocol rule (reason code 0x82).
    Protocol(&'static str),
    /// Fixed header plus remaining length exceeds the maximum (reason code 0x95).
    PacketTooLarge { size: usize, max: u32 },
    /// A CONNECT with a protocol level this codec does not speak (reason code 0x84;
    /// 3.x servers answer with CONNACK return code 1).
    UnsupportedProtocolVersion(u8),
}

impl DecodeError {
    /// The MQTT 5.0 reason code for this error.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::Malformed(_) => super::reason::MALFORMED_PACKET,
            DecodeError::Protocol(_) => super::reason::PROTOCOL_ERROR,
            DecodeError::PacketTooLarge { .. } => super::reason::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocolVersion(_) => {
                super::reason::UNSUPPORTED_PROTOCOL_VERSION
            }
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Malformed(what) => write!(f, "malformed packet: {what}"),
            DecodeError::Protocol(what) => write!(f, "protocol error: {what}"),
            DecodeError::PacketTooLarge { size, max } => {
                write!(
                    f,
                    "packet of {size} bytes exceeds the maximum packet size of {max} bytes"
                )
            }
            DecodeError::UnsupportedProtocolVersion(level) => {
                write!(f, "unsupported protocol level {level}")
            }
        }
    }
}

impl std::error::Error for DecodeError {}
