//! Time in the shard: the one-second tick (keep-alive and expiry timers on
//! the wheel, will delays, session expiry), will messages and the `$SYS`
//! statistics.

use super::conn::CloseReason;
use super::{client, Shard, State, TimerEvent};
use crate::session::Message;
use bytes::Bytes;
use std::sync::Arc;
use tarta_proto::mqtt::{QoS, Will};
use tarta_proto::ByteStr;

impl Shard {
    /// Schedules a timer event.
    pub(super) fn at(&self, st: &mut State, when: u64, ev: TimerEvent) {
        st.timer_seq += 1;
        let seq = st.timer_seq;
        st.timers.insert((when, seq), ev);
    }

    /// An offline session: its delayed will and its expiry.
    pub fn session_offline(&self, st: &mut State, sid: usize, will_delay: Option<u32>) {
        let now = self.now.get();
        let Some(e) = st.sessions.get(sid) else {
            return;
        };
        let (generation, expiry) = (e.generation, e.expiry);
        // The clock has one-second steps: +1 so that nothing fires early.
        if let Some(delay) = will_delay {
            // Published at the delay or when the session ends, whichever is first.
            let delay = delay.min(expiry);
            self.at(
                st,
                now + u64::from(delay) + 1,
                TimerEvent::Will { sid, generation },
            );
        }
        if expiry != u32::MAX {
            self.at(
                st,
                now + u64::from(expiry) + 1,
                TimerEvent::SessionExpiry { sid, generation },
            );
        }
    }

    fn run_timers(&self, st: &mut State, now: u64) {
        while let Some(entry) = st.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ev = entry.remove();
            let (sid, generation) = match &ev {
                TimerEvent::SessionExpiry { sid, generation }
                | TimerEvent::Will { sid, generation } => (*sid, *generation),
            };
            let live = st
                .sessions
                .get(sid)
                .is_some_and(|e| e.generation == generation && e.conn.is_none());
            if !live {
                continue;
            }
            let will = st.sessions.get_mut(sid).and_then(|e| e.take_will());
            if let Some(w) = will {
                self.publish_will(st, w);
                if st.sessions.get(sid).is_some_and(|e| e.session.logged) {
                    // Published: not owed after a restart any more.
                    let since = self.offline_since(st, sid);
                    self.log_session(st, sid, since, None);
                }
            }
            if let TimerEvent::SessionExpiry { .. } = ev {
                client::drop_session(self, st, sid);
            }
        }
    }

    /// Routes a will message (after its ACL check by the caller).
    pub fn publish_will(&self, st: &mut State, w: Will) {
        let mut properties = w.properties;
        properties.remove(0x18); // Will Delay Interval is not a PUBLISH property
        let expires_at = properties
            .message_expiry_interval()
            .map(|s| self.now.get() + u64::from(s));
        let msg = Arc::new(Message {
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            properties,
            origin: None,
            expires_at,
            uid: 0,
            stamp: self.now.get() as u32,
        });
        self.route(st, msg);
    }

    /// One second passed: close connections whose deadline is gone; run
    /// session expiry and delayed wills.
    pub fn on_tick(&self, now: u64) {
        self.now.set(now);
        self.check_security();
        self.metrics.absorb_local();
        {
            let st = self.st.borrow();
            let m = &self.metrics;
            m.sessions.set(st.sessions.len() as u64);
            m.subscriptions.set(st.index.len() as u64);
            m.retained.set(st.retained.len() as u64);
            m.route_cache_hits.set(st.cache.hits);
        }
        let mut due = Vec::new();
        let mut st = self.st.borrow_mut();
        self.run_timers(&mut st, now);
        if now >= 60 && !st.seen_uids.is_empty() {
            // Other shards routed again what they held within the first
            // seconds after the restart: nothing more to recognise.
            st.seen_uids = Default::default();
        }
        for w in std::mem::take(&mut st.fresh) {
            match w.upgrade() {
                Some(c) if c.wheel_at().is_none() && !c.is_closing() => self.schedule(&mut st, &c),
                _ => {}
            }
        }
        // Entries of closed connections: gone within 16 s, not at their
        // deadline (each holds the closed connection's memory).
        st.wheel.sweep(64, |(_, w)| w.strong_count() > 0);
        st.wheel.expire(now, &mut due);
        for (at, w) in due {
            let Some(conn) = w.upgrade() else { continue };
            if conn.is_closing() || conn.wheel_at() != Some(at) {
                continue;
            }
            match conn.deadline(self.cfg.connect_timeout) {
                Some(at) if at <= now => {
                    let connected = conn.state.borrow().connected;
                    conn.request_close(if connected {
                        CloseReason::KeepAliveTimeout
                    } else {
                        CloseReason::ConnectTimeout
                    });
                }
                Some(_) => self.schedule(&mut st, &conn),
                None => conn.set_wheel_at(None),
            }
        }
    }

    /// Publishes this shard's counters as retained `$SYS` messages.
    pub fn publish_sys(&self) {
        {
            // O(sessions): only every sys_interval.
            let st = self.st.borrow();
            let (mut queued, mut online) = (0, 0);
            for (_, e) in st.sessions.iter() {
                queued += e.session.queued_len() + e.session.inflight_len();
                online += usize::from(e.conn.is_some());
            }
            self.metrics.queued.set(queued as u64);
            self.metrics.sessions_online.set(online as u64);
        }
        let mut st = self.st.borrow_mut();
        let all: Vec<(String, u64)> = self
            .metrics
            .snapshot()
            .into_iter()
            .map(|(name, v)| (format!("$SYS/tarta/shard/{}/{name}", self.id), v))
            .collect();
        let mut all: Vec<(String, String)> =
            all.into_iter().map(|(t, v)| (t, v.to_string())).collect();
        if self.id == 0 {
            // Process-wide.
            all.push((
                "$SYS/tarta/log_lines_dropped".into(),
                crate::logging::dropped_lines().to_string(),
            ));
            // The whole broker under Mosquitto's names.
            let shards = self.all_metrics.borrow().clone();
            let now = self.now.get();
            all.extend(
                self.sys
                    .borrow_mut()
                    .topics(&shards, now, env!("CARGO_PKG_VERSION")),
            );
        }
        for (topic, value) in all {
            let msg = self.broker_message(topic, Bytes::from(value), QoS::AtMostOnce);
            self.route(&mut st, msg);
        }
    }

    /// A retained message the broker itself publishes (`$SYS`).
    pub(super) fn broker_message(&self, topic: String, payload: Bytes, qos: QoS) -> Arc<Message> {
        Arc::new(Message {
            topic: ByteStr::from(topic),
            payload,
            qos,
            retain: true,
            properties: Default::default(),
            origin: None,
            expires_at: None,
            uid: 0,
            stamp: self.now.get() as u32,
        })
    }
}
