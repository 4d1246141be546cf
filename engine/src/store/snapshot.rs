//! Writing live state as log records: a snapshot (compaction, and the
//! logs rewritten at start when the shard count changed) is `SnapBegin`,
//! every persistent session and retained message, `SnapEnd`.

use super::log::encode_message;
use super::record::{encode, Rec};
use crate::session::{Message, Session};
use std::collections::HashMap;
use std::sync::Arc;
use tarta_proto::mqtt::Will;
use tarta_proto::ByteStr;

pub struct SnapWriter<'a> {
    pub out: &'a mut Vec<u8>,
    /// Messages already written in this snapshot, by address (the state
    /// holds every one of them while the snapshot is written).
    mids: HashMap<*const Message, u64>,
    next_mid: u64,
    epoch_unix: u64,
}

impl<'a> SnapWriter<'a> {
    pub fn begin(out: &'a mut Vec<u8>, next_mid: u64, epoch_unix: u64) -> Self {
        encode(&Rec::SnapBegin, out);
        SnapWriter {
            out,
            mids: HashMap::new(),
            next_mid,
            epoch_unix,
        }
    }

    /// Writes `SnapEnd`; returns the next free message id.
    pub fn end(self) -> u64 {
        encode(&Rec::SnapEnd, self.out);
        self.next_mid
    }

    fn msg(&mut self, m: &Arc<Message>) -> u64 {
        if let Some(mid) = self.mids.get(&Arc::as_ptr(m)) {
            return *mid;
        }
        let mid = self.next_mid;
        self.next_mid += 1;
        encode_message(self.out, m, mid, self.epoch_unix);
        self.mids.insert(Arc::as_ptr(m), mid);
        mid
    }

    /// One persistent session: its record, subscriptions, what is in
    /// flight (as queued then sent, in order), the queue, incoming QoS 2
    /// ids and the next packet id.
    pub fn session(
        &mut self,
        sid: u32,
        s: &Session,
        expiry: u32,
        offline_at: u64,
        will: Option<&Will>,
        username: Option<&ByteStr>,
    ) {
        let will = will.map(|w| {
            let delay = w.properties.will_delay_interval().unwrap_or(0);
            (w.clone(), delay)
        });
        encode(
            &Rec::Session {
                sid,
                client_id: s.client_id.to_string().into(),
                username: username.cloned(),
                expiry,
                offline_at,
                will,
            },
            self.out,
        );
        for (filter, (opts, sub_id)) in &s.subs {
            let rec = Rec::Sub {
                sid,
                filter: filter.clone(),
                opts: *opts,
                sub_id: *sub_id,
            };
            encode(&rec, self.out);
        }
        for (pid, d, released) in s.inflight_iter() {
            let mid = self.msg(&d.msg);
            self.enq(sid, mid, d);
            encode(
                &Rec::Sent {
                    sid,
                    pid,
                    discarded: false,
                },
                self.out,
            );
            if released {
                encode(&Rec::Rel { sid, pid }, self.out);
            }
        }
        for d in s.pending_iter() {
            let mid = self.msg(&d.msg);
            self.enq(sid, mid, d);
        }
        for pid in s.incoming_iter() {
            encode(&Rec::In2 { sid, pid }, self.out);
        }
        let pid = s.next_pid();
        encode(&Rec::NextPid { sid, pid }, self.out);
    }

    fn enq(&mut self, sid: u32, mid: u64, d: &crate::session::Delivery) {
        let rec = Rec::Enq {
            sid,
            mid,
            qos: d.qos,
            retain: d.retain,
            share: d.share.is_some(),
            sub_ids: d.sub_ids.clone(),
        };
        encode(&rec, self.out);
    }

    /// A QoS 2 message accepted but not yet routed.
    pub fn held(&mut self, m: &Arc<Message>) {
        let mid = self.msg(m);
        let rec = Rec::Held {
            mid,
            sid: u32::MAX,
            pid: 0,
        };
        encode(&rec, self.out);
    }

    pub fn retained(&mut self, m: &Arc<Message>) {
        let mid = self.msg(m);
        encode(&Rec::Retain { mid }, self.out);
    }
}
