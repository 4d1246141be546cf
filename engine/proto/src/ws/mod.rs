//! MQTT over WebSocket (RFC 6455, MQTT-6.0.0): the HTTP/1.1 upgrade, frame
//! parsing with in-place unmasking, server frame encoding, and the client
//! side of the upgrade (a bridge's outgoing link). No I/O: the
//! runtime feeds bytes in and writes what comes out.

pub mod client;
pub mod frame;
pub mod handshake;
pub mod mask;

pub use frame::{close_frame, frame_header, FrameDecoder, WsError, WsEvent};
pub use handshake::{handshake, http_response, Handshake, HandshakeConfig, HttpRequest};

/// WebSocket close codes used by the broker (RFC 6455 §7.4.1).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
}
