//! Property tests: a session driven through random operations, logging as
//! the broker does; the log, cut at any byte or with any one record
//! damaged, recovers exactly the state of the last complete record.

use super::disk::scan;
use super::log::encode_message;
use super::record::{encode, Rec};
use super::replay::Replay;
use super::snapshot::SnapWriter;
use crate::session::{Delivery, Journal, Message, Outbox, Session};
use bytes::Bytes;
use quickcheck::{QuickCheck, TestResult};
use std::sync::Arc;
use tarta_proto::mqtt::{Packet, Properties, QoS, SubOptions};

const SID: u32 = 7;

/// An outbox that logs what the session journals, like the broker's.
struct LogOut<'a> {
    log: &'a mut Vec<u8>,
}

impl Outbox for LogOut<'_> {
    fn publish(&mut self, _d: &Delivery, _pid: u16, _dup: bool) -> bool {
        true
    }
    fn packet(&mut self, _p: Packet) {}
    fn journal(&mut self, ev: Journal) {
        let rec = match ev {
            Journal::Sent { pid, discarded } => Rec::Sent {
                sid: SID,
                pid,
                discarded,
            },
            Journal::Ack { pid } => Rec::Ack { sid: SID, pid },
            Journal::Rel { pid } => Rec::Rel { sid: SID, pid },
        };
        encode(&rec, self.log);
    }
}

/// What must survive: subscriptions, what is in flight (id, topic,
/// released), the queue, incoming QoS 2 ids, the next packet id.
type Print = (
    Vec<(String, u8)>,
    Vec<(u16, String, bool)>,
    Vec<String>,
    Vec<u16>,
    u16,
);

fn print(s: &Session) -> Print {
    (
        s.subs
            .iter()
            .map(|(f, (o, _))| (f.to_string(), o.qos as u8))
            .collect(),
        s.inflight_iter()
            .map(|(pid, d, rel)| (pid, d.msg.topic.to_string(), rel))
            .collect(),
        s.pending_iter().map(|d| d.msg.topic.to_string()).collect(),
        s.incoming_iter().collect(),
        s.next_pid(),
    )
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Drives a logged session through `ops` random operations. Returns the
/// log and, after each operation, (log length, state).
fn run(seed: u64, ops: usize) -> (Vec<u8>, Vec<(usize, Print)>) {
    let mut rng = Rng(seed | 1);
    let mut log = Vec::new();
    let mut s = Session::new("dev".into(), true, 3, 6);
    encode(
        &Rec::Session {
            sid: SID,
            client_id: "dev".into(),
            username: None,
            expiry: u32::MAX,
            offline_at: 0,
            will: None,
        },
        &mut log,
    );
    let mut marks = vec![(log.len(), print(&s))];
    let mut online = true;
    let mut mid = 0;
    for _ in 0..ops {
        match rng.below(9) {
            0..=2 => {
                let qos = if rng.below(2) == 0 {
                    QoS::AtLeastOnce
                } else {
                    QoS::ExactlyOnce
                };
                mid += 1;
                let msg = Arc::new(Message {
                    topic: format!("t/{mid}").into(),
                    payload: Bytes::from(vec![b'x'; rng.below(40) as usize]),
                    qos,
                    retain: false,
                    properties: Properties::default(),
                    origin: None,
                    expires_at: None,
                    uid: 0,
                    stamp: 0,
                });
                let d = Delivery {
                    msg: msg.clone(),
                    qos,
                    retain: false,
                    sub_ids: vec![],
                    share: None,
                };
                if s.accepts(qos, online) {
                    encode_message(&mut log, &msg, mid, 0);
                    let rec = Rec::Enq {
                        sid: SID,
                        mid,
                        qos,
                        retain: false,
                        share: false,
                        sub_ids: vec![],
                    };
                    encode(&rec, &mut log);
                }
                let mut out = LogOut { log: &mut log };
                s.deliver(d, online.then_some(&mut out as &mut dyn Outbox));
            }
            3 => {
                let ids: Vec<(u16, bool, QoS)> =
                    s.inflight_iter().map(|(p, d, r)| (p, r, d.qos)).collect();
                if let Some(&(pid, rel, qos)) = ids.get(rng.below(ids.len() as u64 + 1) as usize) {
                    let mut out = LogOut { log: &mut log };
                    match (qos, rel) {
                        (QoS::AtLeastOnce, _) => {
                            s.on_puback(pid, &mut out);
                        }
                        (_, false) => {
                            s.on_pubrec(pid, 0, &mut out);
                        }
                        (_, true) => {
                            s.on_pubcomp(pid, &mut out);
                        }
                    }
                }
            }
            4 => {
                let pid = 1 + rng.below(5) as u16;
                if s.incoming_qos2(pid) {
                    encode(&Rec::In2 { sid: SID, pid }, &mut log);
                } else if s.release_incoming(pid) {
                    encode(&Rec::In2Rel { sid: SID, pid }, &mut log);
                }
            }
            5 => {
                let filter = format!("f/{}", rng.below(4));
                let opts = SubOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                };
                if rng.below(2) == 0 {
                    s.subs.insert(filter.clone().into(), (opts, None));
                    let rec = Rec::Sub {
                        sid: SID,
                        filter: filter.into(),
                        opts,
                        sub_id: None,
                    };
                    encode(&rec, &mut log);
                } else if s.subs.remove(filter.as_str()).is_some() {
                    encode(
                        &Rec::Unsub {
                            sid: SID,
                            filter: filter.into(),
                        },
                        &mut log,
                    );
                }
            }
            6 => {
                // Offline, or back (in-flight messages go again, then the queue).
                online = !online;
                if online {
                    s.resume(&mut LogOut { log: &mut log });
                }
            }
            _ => {
                if online {
                    s.fill(&mut LogOut { log: &mut log });
                }
            }
        }
        marks.push((log.len(), print(&s)));
    }
    (log, marks)
}

fn recover(bytes: &[u8]) -> (Option<Print>, u64, bool) {
    let sc = scan(bytes);
    let mut r = Replay::new(0);
    for rec in sc.recs {
        r.apply(rec);
    }
    let img = r.finish();
    (
        img.sessions.first().map(|s| print(&s.session)),
        sc.corrupt,
        sc.bad_tail,
    )
}

#[test]
fn any_truncation_recovers_the_state_of_the_last_complete_record() {
    fn prop(seed: u64, ops: u8, cut: u16) -> TestResult {
        let (log, marks) = run(seed, usize::from(ops));
        let t = usize::from(cut) % (log.len() + 1);
        let (got, corrupt, torn) = recover(&log[..t]);
        // The state after the last operation whose records all fit.
        let want = marks.iter().rev().find(|(len, _)| *len <= t).map(|m| &m.1);
        if corrupt != 0 {
            return TestResult::error("a cut is not corruption");
        }
        // A cut inside a record is a torn tail; between records it is not.
        if torn != (scan(&log[..t]).good_len != t) {
            return TestResult::error("torn flag");
        }
        // Between two operations' records (inside one operation's several
        // records) the state is a prefix of that operation: compare only
        // at operation boundaries, and never expect more than was written.
        if marks.iter().any(|(len, _)| *len == t) {
            return TestResult::from_bool(got.as_ref() == want);
        }
        TestResult::from_bool(got.is_some() || t < marks[0].0)
    }
    QuickCheck::new()
        .tests(400)
        .quickcheck(prop as fn(u64, u8, u16) -> TestResult);
}

#[test]
fn every_cut_is_recovered_without_error_and_the_whole_log_is_the_live_state() {
    for seed in 1..40u64 {
        let (log, marks) = run(seed * 7919, 120);
        let (got, corrupt, torn) = recover(&log);
        assert_eq!((corrupt, torn), (0, false));
        assert_eq!(got.as_ref(), marks.last().map(|m| &m.1), "seed {seed}");
        for t in 0..log.len() {
            let (_, corrupt, _) = recover(&log[..t]);
            assert_eq!(corrupt, 0);
        }
    }
}

#[test]
fn one_damaged_record_is_skipped_and_the_rest_recovered() {
    fn prop(seed: u64, which: u16, bit: u8) -> TestResult {
        let (log, _) = run(seed, 60);
        let good = scan(&log);
        // Frame boundaries.
        let mut bounds = vec![0];
        let mut at = 0;
        while at < log.len() {
            let super::record::Frame::Whole { len: n, .. } = super::record::frame(&log[at..])
            else {
                return TestResult::error("bad frame in a clean log");
            };
            at += n;
            bounds.push(at);
        }
        let k = usize::from(which) % (bounds.len() - 1);
        if k + 2 >= bounds.len() {
            // The last record damaged is a torn tail: covered above.
            return TestResult::discard();
        }
        let (start, end) = (bounds[k], bounds[k + 1]);
        // Damage the body or checksum (not the length: that is a torn log).
        let i = start + 4 + usize::from(bit) % (end - start - 4);
        let mut bad = log.clone();
        bad[i] ^= 1 << (bit % 8);
        let sc = scan(&bad);
        if sc.corrupt != 1 || sc.bad_tail {
            return TestResult::error(format!("corrupt {} torn {}", sc.corrupt, sc.bad_tail));
        }
        // Exactly the other records, replayed.
        let mut want = good.recs.clone();
        want.remove(k);
        TestResult::from_bool(sc.recs == want)
    }
    QuickCheck::new()
        .tests(300)
        .quickcheck(prop as fn(u64, u16, u8) -> TestResult);
}

#[test]
fn a_snapshot_of_the_live_session_recovers_the_same_session() {
    for seed in 1..60u64 {
        let (log, marks) = run(seed * 104_729, 150);
        let (from_log, _, _) = recover(&log);
        let mut r = Replay::new(0);
        for rec in scan(&log).recs {
            r.apply(rec);
        }
        let img = r.finish();
        let Some(s) = img.sessions.first() else {
            panic!("no session")
        };
        let mut snap = Vec::new();
        let mut w = SnapWriter::begin(&mut snap, 1, 0);
        w.session(SID, &s.session, s.expiry, s.offline_at, None, None);
        w.end();
        let (from_snap, _, _) = recover(&snap);
        assert_eq!(from_snap, from_log, "seed {seed}");
        assert_eq!(from_log.as_ref(), marks.last().map(|m| &m.1));
    }
}
