//! The MQTT codec: one encoder/decoder for MQTT 3.1, 3.1.1 and 5.0.
//!
//! - [`packet`]: the packet types (shared by every protocol level).
//! - [`Properties`] / [`Property`]: MQTT 5.0 properties.
//! - [`decode`] / [`frame_len`]: zero-copy decoding from a `BytesMut` read buffer.
//! - [`encode`] / [`encoded_len`] / [`encode_publish_header`]: encoding.
//! - [`DecodeError`]: why a byte stream was rejected (and the reason code to send).
//! - [`reason`]: MQTT 5.0 reason codes and MQTT 3.x return codes.

mod decode;
mod encode;
mod error;
pub mod packet;
mod properties;
pub mod reason;

#[cfg(test)]
mod tests;

pub use decode::{decode, frame_len};
pub use encode::{encode, encode_publish_header, encoded_len, PublishHeader};
pub use error::DecodeError;
pub use packet::*;
pub use properties::{Properties, Property};
