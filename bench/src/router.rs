//! Fan-out through the real broker code: one `Shard`, one publisher and N
//! subscribers attached the way the connection task attaches them
//! (`client::connect`, then `client::on_packet` with a SUBSCRIBE), and
//! publishes routed with `client::on_packet` (topic check, metrics, index
//! match, per-session merge, header encode, queueing).
//!
//! Subscribers are 3.1.1 clients at QoS 0, split evenly over three filters
//! that all match [`TOPIC`]: the exact topic, `site/42/+/+/temp` and
//! `site/42/#`.

use bytes::Bytes;
use clap::Parser;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use tarta::broker::client::{self, Flow};
use tarta::broker::conn::Conn;
use tarta::broker::Shard;
use tarta::config::{Cli, Config};
use tarta_proto::mqtt::{
    Connect, Packet, Properties, Protocol, Publish, QoS, SubOptions, Subscribe,
};
use tarta_proto::ByteStr;

pub const TOPIC: &str = "site/42/device/1337/temp";
const FILTERS: [&str; 3] = [TOPIC, "site/42/+/+/temp", "site/42/#"];

/// The configuration `tarta` runs with when given no flags and no file.
pub fn default_config() -> Result<Config, String> {
    let cli = Cli::try_parse_from(["tarta"]).map_err(|e| e.to_string())?;
    Config::load(cli)
}

fn peer(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 40_000))
}

fn expect_continue(flow: Flow, what: &str) -> Result<(), String> {
    match flow {
        Flow::Continue => Ok(()),
        Flow::Close(why) => Err(format!("{what}: connection closed: {why:?}")),
        Flow::Handoff(_) => Err(format!("{what}: handed off to another shard")),
        Flow::Pause(_) => Err(format!("{what}: paused by a publish rate limit")),
    }
}

/// A connected 3.1.1 client with a clean session.
fn connected(shard: &Shard, i: usize, client_id: String) -> Result<Rc<Conn>, String> {
    let conn = shard.new_conn(peer(i));
    let c = Connect {
        protocol: Protocol::V311,
        clean_start: true,
        keep_alive: 60,
        client_id: ByteStr::from(client_id),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
        bridge: false,
    };
    expect_continue(client::connect(shard, &conn, Box::new(c)), "CONNECT")?;
    Ok(conn)
}

/// One shard with a publisher and `subscribers` subscribers on [`TOPIC`].
pub struct Fanout {
    pub shard: Shard,
    pub publisher: Rc<Conn>,
    pub subscribers: Vec<Rc<Conn>>,
    topic: ByteStr,
    /// What the publisher sends; every delivery must reference it.
    pub payload: Bytes,
}

impl Fanout {
    pub fn new(subscribers: usize, payload_len: usize) -> Result<Fanout, String> {
        let shard = Shard::new(0, 1, Arc::new(default_config()?), Default::default());
        let publisher = connected(&shard, 0, "publisher".into())?;
        let mut subs = Vec::with_capacity(subscribers);
        for i in 0..subscribers {
            let conn = connected(&shard, i + 1, format!("subscriber-{i}"))?;
            let s = Subscribe {
                packet_id: 1,
                filters: vec![(ByteStr::from(FILTERS[i % 3]), SubOptions::default())],
                properties: Properties::default(),
            };
            expect_continue(
                client::on_packet(&shard, &conn, Packet::Subscribe(s)),
                "SUBSCRIBE",
            )?;
            subs.push(conn);
        }
        // A read buffer's worth of bytes; the payload is a slice of it, as
        // after decoding.
        let mut wire = vec![0u8; payload_len + 64];
        for (i, b) in wire.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let payload = Bytes::from(wire).slice(32..32 + payload_len);
        let f = Fanout {
            shard,
            publisher,
            subscribers: subs,
            topic: ByteStr::from(TOPIC),
            payload,
        };
        f.drain();
        Ok(f)
    }

    /// The publisher sends one QoS 0 PUBLISH (the work of a fan-out benchmark).
    pub fn publish(&self) -> Result<(), String> {
        let p = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: self.topic.clone(),
            packet_id: 0,
            properties: Properties::default(),
            payload: self.payload.clone(),
        };
        let flow = client::on_packet(&self.shard, &self.publisher, Packet::Publish(p));
        expect_continue(flow, "PUBLISH")
    }

    /// Empties every write queue, as the writers would after sending.
    pub fn drain(&self) {
        for c in self.subscribers.iter().chain([&self.publisher]) {
            let n = c.out.borrow().len();
            c.out.borrow_mut().advance(n);
        }
    }

    /// Bytes queued over all subscribers.
    pub fn queued(&self) -> usize {
        self.subscribers.iter().map(|c| c.out.borrow().len()).sum()
    }

    /// Publishes once and checks that every subscriber received exactly one
    /// PUBLISH whose payload segment is the publisher's own buffer (no
    /// per-subscriber copy); drains afterwards.
    pub fn check_zero_copy(&self) -> Result<(), String> {
        self.drain();
        self.publish()?;
        let want = (self.payload.as_ptr(), self.payload.len());
        let mut header_len = None;
        for (i, c) in self.subscribers.iter().enumerate() {
            let out = c.out.borrow();
            let mut iov = [IoSlice::new(&[]); 8];
            let n = out.iovecs(&mut iov);
            let shared = iov[..n]
                .iter()
                .filter(|s| (s.as_ptr(), s.len()) == want)
                .count();
            if shared != 1 {
                return Err(format!(
                    "subscriber {i}: {shared} segments reference the publisher's payload \
                     ({n} segments, {} bytes queued)",
                    out.len()
                ));
            }
            let header = out.len() - self.payload.len();
            if *header_len.get_or_insert(header) != header {
                return Err(format!("subscriber {i}: {header}-byte header"));
            }
        }
        self.drain();
        Ok(())
    }
}
