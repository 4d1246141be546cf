//! Writes a data directory with a large stored state, for the recovery
//! benchmark (docs/BENCHMARKS.md "Durability"): retained messages and
//! persistent sessions, each with a subscription and queued QoS 1 messages.
//!
//!     cargo run --release -p tarta-bench --bin store_gen -- \
//!         --dir /tmp/big --retained 1000000 --sessions 100000 --queued 10 --shards 2

use bytes::Bytes;
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use tarta::session::{Delivery, Message, Session};
use tarta::store::replay::{Image, SessionImage};
use tarta_proto::mqtt::{QoS, SubOptions};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 1_000_000)]
    retained: usize,
    #[arg(long, default_value_t = 100_000)]
    sessions: usize,
    #[arg(long, default_value_t = 10)]
    queued: usize,
    #[arg(long, default_value_t = 64)]
    payload: usize,
    #[arg(long, default_value_t = 2)]
    shards: usize,
}

fn message(topic: String, payload: &Bytes, retain: bool) -> Arc<Message> {
    Arc::new(Message {
        topic: topic.into(),
        payload: payload.clone(),
        qos: QoS::AtLeastOnce,
        retain,
        properties: Default::default(),
        origin: None,
        expires_at: None,
        uid: 0,
        stamp: 0,
    })
}

fn main() -> Result<(), String> {
    let a = Args::parse();
    let payload = Bytes::from(vec![b'p'; a.payload]);
    let mut images: Vec<Image> = (0..a.shards).map(|_| Image::default()).collect();
    for i in 0..a.retained {
        let topic = format!("sensors/{}/{}/temp", i / 1000, i % 1000);
        let shard = tarta::home_shard(&topic, a.shards);
        images[shard].retained.push(message(topic, &payload, true));
    }
    let opts = SubOptions {
        qos: QoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
    };
    for i in 0..a.sessions {
        let id = format!("device-{i}");
        let mut s = Session::new(id.as_str().into(), true, 64, 10_000);
        s.logged = true;
        s.subs.insert(format!("cmd/{i}/#").into(), (opts, None));
        for k in 0..a.queued {
            s.restore_enqueue(Delivery {
                msg: message(format!("cmd/{i}/{k}"), &payload, false),
                qos: QoS::AtLeastOnce,
                retain: false,
                sub_ids: vec![],
                share: None,
            });
        }
        let shard = tarta::home_shard(&id, a.shards);
        images[shard].sessions.push(SessionImage {
            sid: 0,
            session: s,
            username: None,
            expiry: u32::MAX,
            offline_at: tarta::store::unix_now(),
            will: None,
        });
    }
    tarta::store::disk::create(&a.dir, &mut images, tarta::store::unix_now())?;
    let bytes: u64 = walk(&a.dir);
    let stored = a.retained + a.sessions * a.queued;
    println!(
        "{} retained, {} sessions x {} queued: {} bytes on disk, {:.1} bytes per stored message ({} B payload)",
        a.retained,
        a.sessions,
        a.queued,
        bytes,
        bytes as f64 / stored.max(1) as f64,
        a.payload
    );
    Ok(())
}

fn walk(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let m = e
                        .metadata()
                        .map(|m| (m.is_dir(), m.len()))
                        .unwrap_or((false, 0));
                    if m.0 {
                        walk(&e.path())
                    } else {
                        m.1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}
