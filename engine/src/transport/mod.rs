//! The layers between a socket and MQTT, as state without I/O:
//!
//! ```text
//! socket -> [PROXY header] -> [TLS] -> [WebSocket] -> MQTT
//! ```
//!
//! mqtt, ws, mqtts and wss are four stackings of the same parts; each
//! listener may add the PROXY stage in front. A plain MQTT connection has
//! no [`Layers`] at all (the fast path: socket bytes are MQTT bytes). The
//! runtime's connection task reads the socket, passes the bytes down the
//! layers and writes what they queue; a connection handed to its home
//! shard carries its `Layers` whole (TLS session, WebSocket decoder,
//! undecoded input, *and output not yet written*, such as TLS 1.3 session
//! tickets).
//!
//! Output goes up the same way: MQTT packets are queued on the
//! connection's `OutQueue`; the WebSocket layer frames everything queued
//! into one binary frame (`Ws::out`); TLS encrypts that (or the MQTT queue
//! directly) into `wire`, which is what the socket gets.
//!
//! Architecture invariant: no socket, no runtime, no clock here.

pub mod certs;
pub mod tls;

use crate::broker::conn::OutQueue;
use bytes::BytesMut;
use tarta_proto::ws::FrameDecoder;

/// The WebSocket layer of a connection.
pub struct Ws {
    /// The HTTP upgrade is done; frames flow.
    pub open: bool,
    pub decoder: FrameDecoder,
    /// Bytes not yet decoded (an incomplete request, header or control frame).
    pub raw: BytesMut,
    /// Framed bytes waiting to be written (or encrypted, under TLS). MQTT
    /// data is framed at flush time.
    pub out: OutQueue,
    pub close_sent: bool,
}

impl Ws {
    pub fn new(max_frame: u64) -> Ws {
        Ws {
            open: false,
            decoder: FrameDecoder::new(max_frame),
            raw: BytesMut::new(),
            out: OutQueue::default(),
            close_sent: false,
        }
    }
}

/// Every layer of a connection above the socket (boxed: a plain MQTT
/// connection has none).
pub struct Layers {
    /// A PROXY protocol header is expected and not read yet.
    pub proxy: bool,
    /// Socket bytes held for the PROXY stage (an incomplete header).
    pub pre: BytesMut,
    pub tls: Option<Box<tls::Tls>>,
    pub ws: Option<Ws>,
    /// Ciphertext for the socket (TLS only).
    pub wire: OutQueue,
    /// The client certificate's common name, when the listener uses it
    /// as the username (`identity_as_username`).
    pub identity: Option<Box<str>>,
}

impl Layers {
    /// Bytes queued below MQTT (framed, or encrypted, not yet written).
    pub fn pending(&self) -> usize {
        self.wire.len() + self.ws.as_ref().map_or(0, |w| w.out.len())
    }
}

#[cfg(test)]
mod tests {
    /// A WebSocket or TLS connection pays for its `Layers` box; a TLS one
    /// also for `Tls` (rustls's state, most of it) and rustls's own heap
    /// (keys, handshake leftovers): docs/BENCHMARKS.md measures the total.
    #[test]
    fn layer_state_stays_in_its_size_classes() {
        use std::mem::size_of;
        assert!(
            size_of::<super::Layers>() <= 160,
            "{}",
            size_of::<super::Layers>()
        );
        assert!(
            size_of::<super::tls::Tls>() <= 1152,
            "{}",
            size_of::<super::tls::Tls>()
        );
    }
}
