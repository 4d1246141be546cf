//! The mesh pump (drains batches from other shards, sends this shard's
//! outbox, batched per destination) and the one-second ticker (timer wheel,
//! `$SYS` statistics).

use super::{conn, Rt};
use crate::broker::metrics::Metrics;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

/// Batches taken from the mesh before the pump yields to connections.
const BUDGET: usize = 64;

enum Step {
    Shutdown,
    /// A destination queue was full: try again shortly.
    Retry,
    /// Budget used up: let connection tasks run, then continue.
    Yield,
}

pub async fn mesh_pump(rt: Rc<Rt>) {
    loop {
        let step = poll_fn(|cx| {
            rt.mesh.bell().arm(cx.waker());
            rt.shard.pump_waker.set(Some(cx.waker().clone()));
            if rt.shutdown.load(Ordering::Acquire) {
                return Poll::Ready(Step::Shutdown);
            }
            let mut handoffs = Vec::new();
            let mut budget = BUDGET;
            // While a local subscriber is congested, leave other shards'
            // batches in their (bounded) channels: their publishers pause.
            // What was set aside mid-batch goes first.
            rt.shard.resume_stalled(&mut handoffs);
            for (from, rx) in rt.mesh.rx.iter().enumerate() {
                let Some(rx) = rx else { continue };
                while budget > 0 && rt.shard.congested.get() == 0 && !rt.shard.has_stalled() {
                    let Ok(batch) = rx.try_recv() else { break };
                    rt.shard.on_mesh(from, batch, &mut handoffs);
                    budget -= 1;
                }
            }
            for h in handoffs {
                conn::adopt(&rt, *h);
            }
            let mut full = false;
            {
                let mut st = rt.shard.st.borrow_mut();
                rt.shard.send_barriers(&mut st);
                for to in 0..rt.shard.n {
                    if st.outbox[to].is_empty() {
                        continue;
                    }
                    // The next batch starts with room for as many again.
                    let cap = st.outbox[to].len();
                    let batch = std::mem::replace(&mut st.outbox[to], Vec::with_capacity(cap));
                    let m = &rt.shard.metrics;
                    if let Err(batch) = rt.mesh.try_send(to, batch) {
                        st.outbox[to] = batch;
                        full = true;
                        Metrics::inc(&m.mesh_full);
                    } else {
                        Metrics::inc(&m.mesh_batches);
                        m.mesh_messages.add(cap as u64);
                    }
                }
            }
            if !rt.shard.backlogged() {
                for w in rt.shard.paused.take() {
                    w.wake();
                }
            }
            if full {
                Poll::Ready(Step::Retry)
            } else if budget == 0 {
                Poll::Ready(Step::Yield)
            } else {
                Poll::Pending
            }
        })
        .await;
        match step {
            Step::Shutdown => return,
            Step::Retry => glommio::timer::sleep(Duration::from_micros(200)).await,
            Step::Yield => futures_lite::future::yield_now().await,
        }
    }
}

pub async fn ticker(rt: Rc<Rt>) {
    let start = Instant::now();
    let sys = u64::from(rt.shard.cfg.sys_interval);
    loop {
        glommio::timer::sleep(Duration::from_secs(1)).await;
        let now = start.elapsed().as_secs();
        rt.shard.on_tick(now);
        if sys > 0 && now % sys == 0 {
            rt.shard.publish_sys();
        }
    }
}
