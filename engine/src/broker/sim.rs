//! An in-process harness for the broker (after quinn-proto's `Pair`): N
//! shards, the mesh between them, a simulated clock and an in-memory disk
//! in one test process. Every step is explicit (deliver the mesh, commit
//! the logs, read a client's output, crash), so recovery, ordering and
//! take-over cases run deterministically in milliseconds.

use super::client::{self, Flow};
use super::conn::Conn;
use super::{home_shard, Shard, ShardMsg};
use crate::config::{Cli, Config};
use crate::store::disk::scan;
use crate::store::log::Log;
use crate::store::replay::{Image, Replay};
use bytes::BytesMut;
use clap::Parser;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use tarta_proto::mqtt::{self, Connect, Packet, Protocol};

/// Unix second of broker second 0 in every run of the simulation.
const EPOCH: u64 = 1_800_000_000;

pub struct Sim {
    pub n: usize,
    cfg: Arc<Config>,
    pub shards: Vec<Shard>,
    /// What each shard's log made durable: survives `crash`.
    pub disks: Vec<Vec<u8>>,
    pub now: u64,
}

/// A client connection into the simulation.
pub struct Client {
    pub conn: Rc<Conn>,
    pub shard: usize,
    pub protocol: Protocol,
    buf: BytesMut,
}

impl Sim {
    pub fn new(n: usize) -> Sim {
        let cli = Cli::parse_from(["tarta", "--shards", &n.to_string()]);
        let cfg = Arc::new(Config::load(cli).unwrap_or_else(|e| panic!("config: {e}")));
        let mut sim = Sim {
            n,
            cfg,
            shards: Vec::new(),
            disks: vec![Vec::new(); n],
            now: 0,
        };
        sim.boot();
        sim
    }

    /// Starts the shards from what the disks hold (as start-up does).
    fn boot(&mut self) {
        let mut images = Vec::new();
        for d in &mut self.disks {
            let s = scan(d);
            d.truncate(s.good_len);
            let mut r = Replay::new(EPOCH);
            for rec in s.recs {
                r.apply(rec);
            }
            images.push(r.finish());
        }
        let retained: Vec<_> = images
            .iter()
            .flat_map(|i: &Image| i.retained.iter().cloned())
            .collect();
        self.shards = (0..self.n)
            .map(|id| Shard::new(id, self.n, self.cfg.clone(), Default::default()))
            .collect();
        let failing = crate::store::log::Failing::default();
        for (shard, img) in self.shards.iter().zip(images) {
            let log = Log::new(EPOCH, img.next_mid, failing.clone());
            shard.restore(img, &retained, log);
        }
        let seqs: Vec<u64> = self.shards.iter().map(|s| s.startup_barrier()).collect();
        self.settle();
        for (s, seq) in self.shards.iter().zip(seqs) {
            assert!(s.startup_done(seq), "startup barrier not answered");
        }
    }

    /// The process dies: memory is gone, the disks keep what was durable.
    /// `torn`: bytes of each shard's unwritten batch that reached the disk
    /// anyway (a write torn by the crash).
    pub fn crash(&mut self, torn: usize) {
        for (s, d) in self.shards.iter().zip(&mut self.disks) {
            if let Some(log) = s.st.borrow_mut().log.as_mut() {
                if let Some((bytes, _)) = log.take(Waker::noop()) {
                    d.extend_from_slice(&bytes[..torn.min(bytes.len())]);
                }
            }
        }
        self.shards.clear();
        self.boot();
    }

    /// Moves every shard's outbox to its destinations, once.
    pub fn mesh(&mut self) -> bool {
        let mut moved = false;
        for from in 0..self.n {
            let batches: Vec<(usize, Vec<ShardMsg>)> = {
                let s = &self.shards[from];
                let mut st = s.st.borrow_mut();
                s.send_barriers(&mut st);
                let mut out = Vec::new();
                for to in 0..self.n {
                    if !st.outbox[to].is_empty() {
                        out.push((to, std::mem::take(&mut st.outbox[to])));
                    }
                }
                out
            };
            for (to, batch) in batches {
                moved = true;
                let mut handoffs = Vec::new();
                self.shards[to].on_mesh(from, batch, &mut handoffs);
                assert!(handoffs.is_empty(), "clients connect at home");
            }
        }
        moved
    }

    /// Every shard's log writes its pending batch (an fsync that succeeds).
    pub fn commit(&mut self) -> bool {
        let mut any = false;
        for (s, d) in self.shards.iter().zip(&mut self.disks) {
            let job =
                s.st.borrow_mut()
                    .log
                    .as_mut()
                    .and_then(|l| l.take(Waker::noop()));
            if let Some((bytes, epoch)) = job {
                d.extend_from_slice(&bytes);
                if let Some(log) = s.st.borrow_mut().log.as_mut() {
                    log.committed(epoch);
                }
                s.after_commit();
                any = true;
            }
        }
        any
    }

    /// Every shard's pending batch fails to be written (disk full, I/O
    /// error), as the runtime reports it: kept to be written again.
    pub fn commit_fails(&mut self) {
        for s in &self.shards {
            let mut st = s.st.borrow_mut();
            if let Some(log) = st.log.as_mut() {
                if let Some((bytes, _)) = log.take(Waker::noop()) {
                    log.write_failed(bytes);
                }
            }
        }
    }

    /// Mesh and commits until nothing moves.
    pub fn settle(&mut self) {
        for _ in 0..1000 {
            let a = self.mesh();
            let b = self.commit();
            if !a && !b {
                return;
            }
        }
        panic!("the simulation does not settle");
    }

    pub fn tick(&mut self, secs: u64) {
        for _ in 0..secs {
            self.now += 1;
            for s in &self.shards {
                s.on_tick(self.now);
            }
        }
    }

    /// Connects a client at its client id's home shard; returns the
    /// client and the packets it can read so far (after `settle`).
    pub fn connect(&mut self, c: Connect) -> Client {
        let shard = home_shard(&c.client_id, self.n);
        let s = &self.shards[shard];
        let conn = s.new_conn(SocketAddr::from(([127, 0, 0, 1], 1)));
        let protocol = c.protocol;
        match client::connect(s, &conn, Box::new(c)) {
            Flow::Continue => {}
            Flow::Close(why) => panic!("refused: {why:?}"),
            Flow::Handoff(_) => unreachable!("connect at home"),
            Flow::Pause(_) => unreachable!("connect does not pause"),
        }
        Client {
            conn,
            shard,
            protocol,
            buf: BytesMut::new(),
        }
    }

    pub fn send(&mut self, c: &Client, p: Packet) {
        match client::on_packet(&self.shards[c.shard], &c.conn, p) {
            Flow::Continue => {}
            Flow::Close(why) => c.conn.request_close(why),
            Flow::Handoff(_) => panic!("unexpected handoff"),
            Flow::Pause(_) => {}
        }
    }

    /// What the client can read now: nothing of its output is visible
    /// while it waits for durability (its gate), as on a real socket.
    pub fn recv(&mut self, c: &mut Client) -> Vec<Packet> {
        let s = &self.shards[c.shard];
        if !s.gated(&c.conn) {
            let mut out = c.conn.out.borrow_mut();
            loop {
                let len = {
                    let mut iov = [IoSlice::new(&[]); 64];
                    let n = out.iovecs(&mut iov);
                    for s in &iov[..n] {
                        c.buf.extend_from_slice(s);
                    }
                    iov[..n].iter().map(|s| s.len()).sum::<usize>()
                };
                if len == 0 {
                    break;
                }
                out.advance(len);
            }
        }
        let mut got = Vec::new();
        while let Ok(Some(p)) = mqtt::decode(&mut c.buf, c.protocol, u32::MAX) {
            got.push(p);
        }
        got
    }

    /// The connection ends (the client went away without DISCONNECT).
    pub fn drop_client(&mut self, c: Client) {
        let why = super::conn::CloseReason::PeerGone;
        client::on_closed(&self.shards[c.shard], &c.conn, &why);
    }

    /// The payload of `topic`'s retained message on every shard's replica.
    pub fn retained_everywhere(&self, topic: &str) -> Vec<Option<Vec<u8>>> {
        self.shards
            .iter()
            .map(|s| {
                let mut found = None;
                s.st.borrow()
                    .retained
                    .matching(topic, |m| found = Some(m.payload.to_vec()));
                found
            })
            .collect()
    }
}
