//! The write-ahead log when the disk is full: a real full file system (a
//! small tmpfs mounted by the test; the tests run as root, as CI does).
//! Nothing is acknowledged that is not stored, the broker keeps serving,
//! and it recovers by itself when space returns.

use crate::harness::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tarta_proto::mqtt::{Packet, Properties, Property, Protocol, Publish, QoS};

/// A tmpfs of `kib` KiB, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(kib: u32) -> SmallDisk {
        let dir = std::env::temp_dir().join(format!("tarta-full-{}", rand_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "mounting a tmpfs failed: the disk-full tests need root (CI runs as root)"
        );
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fills `dir` with a file until the file system is full; returns it.
fn fill(dir: &Path) -> PathBuf {
    let f = dir.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", f.display()))
        .output();
    f
}

fn sub_opts(qos: QoS) -> tarta_proto::mqtt::SubOptions {
    tarta_proto::mqtt::SubOptions {
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
    }
}

fn publish(topic: &str, qos: QoS, pid: u16, payload: Vec<u8>) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: pid,
        properties: Properties::default(),
        payload: payload.into(),
    })
}

#[test]
fn disk_full_refuses_durable_publishes_and_recovers_when_space_returns() {
    let disk = SmallDisk::mount(4096);
    let data = disk.0.join("data");
    let data_s = data.to_string_lossy().to_string();
    let b = Broker::start_with(&["--data-dir", &data_s]);
    // A persistent subscriber, offline: every QoS 1 message to it is logged.
    let sub_id = id_on(0, "full-sub");
    let mut c = connect_packet(Protocol::V5, &sub_id, true, 60);
    c.properties.push(Property::SessionExpiryInterval(3600));
    let (mut sub, _) = Raw::connect(b.port, c.clone());
    sub.send(&Packet::Subscribe(tarta_proto::mqtt::Subscribe {
        packet_id: 1,
        filters: vec![("full/#".into(), sub_opts(QoS::AtLeastOnce))],
        properties: Properties::default(),
    }));
    assert!(matches!(sub.recv(), Some(Packet::SubAck(_))));
    drop(sub);
    std::thread::sleep(Duration::from_millis(200));

    let filler = fill(&disk.0);
    let (mut p5, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V5, &id_on(1, "full-p5"), true, 60),
    );
    // Publish until an acknowledgement does not come: its write failed and
    // is being retried (the page cache may take a little first).
    let mut acked = 0;
    let mut held = 0;
    let mut pid = 0u16;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        pid += 1;
        p5.send(&publish("full/a", QoS::AtLeastOnce, pid, vec![b'x'; 2048]));
        match p5.recv_timeout(Duration::from_secs(2)) {
            Some(Packet::PubAck(a)) if a.reason == 0 => acked += 1,
            Some(Packet::PubAck(a)) => panic!(
                "unexpected PUBACK reason {:#x} before the log failed",
                a.reason
            ),
            None => {
                held = pid;
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(held > 0, "the disk never filled up ({acked} acknowledged)");
    // While the log cannot be written, a 5.0 publisher hears 0x97 ...
    let (mut p5x, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V5, &id_on(1, "full-p5x"), true, 60),
    );
    p5x.send(&publish("full/x", QoS::AtLeastOnce, 1, b"m".to_vec()));
    match p5x.recv_timeout(Duration::from_secs(5)) {
        Some(Packet::PubAck(a)) => {
            assert_eq!(a.reason, 0x97, "quota exceeded while the disk is full")
        }
        other => {
            let log = b.log();
            let tail: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG")).collect();
            panic!(
                "expected PUBACK 0x97, got {other:?}; broker log:\n{}",
                tail.join("\n")
            )
        }
    }
    // ... a 3.1.1 publisher of a durable message is closed without its PUBACK ...
    let (mut p3, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V311, &id_on(1, "full-p3"), true, 60),
    );
    p3.send(&publish("full/b", QoS::AtLeastOnce, 1, b"m".to_vec()));
    let (got3, closed3) = p3.until_closed(Duration::from_secs(5));
    assert!(closed3, "3.1.1 publisher not closed while the disk is full");
    assert!(
        !got3.iter().any(|p| matches!(p, Packet::PubAck(_))),
        "acknowledged while the disk is full: {got3:?}"
    );
    // ... and QoS 0 and clean sessions go on.
    let (mut q0, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V311, &id_on(0, "full-q0"), true, 60),
    );
    q0.send(&Packet::PingReq);
    assert!(matches!(q0.recv(), Some(Packet::PingResp)));
    assert!(
        b.log().contains("log write failed"),
        "no log line about the failed write"
    );

    // Space returns: the retried write succeeds and the held
    // acknowledgement goes out; new publishes are accepted again.
    std::fs::remove_file(&filler).unwrap();
    match p5.recv_timeout(Duration::from_secs(10)) {
        Some(Packet::PubAck(a)) => {
            assert_eq!((a.packet_id, a.reason), (held, 0));
            acked += 1;
        }
        other => panic!("held PUBACK not released after space returned: {other:?}"),
    }
    p5x.send(&publish("full/c", QoS::AtLeastOnce, 2, b"after".to_vec()));
    match p5x.recv_timeout(Duration::from_secs(5)) {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason, 0, "still refused after space returned"),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    acked += 1;

    // Everything acknowledged reached the subscriber's queue.
    c.clean_start = false;
    let (mut sub, ack) = Raw::connect(b.port, c);
    assert!(ack.session_present);
    let mut got = 0;
    while let Some(p) = sub.recv_timeout(Duration::from_secs(2)) {
        if let Packet::Publish(p) = p {
            got += 1;
            sub.send(&Packet::PubAck(tarta_proto::mqtt::Ack {
                packet_id: p.packet_id,
                reason: 0,
                properties: Properties::default(),
            }));
        }
    }
    assert!(got >= acked, "acknowledged {acked}, subscriber got {got}");
}

/// A persistent subscriber (on shard 0) with `n` queued QoS 1 messages,
/// then the broker stops. Returns the subscriber's CONNECT.
fn stored_queue(data: &str, n: u16) -> tarta_proto::mqtt::Connect {
    let mut b = Broker::start_with(&["--data-dir", data]);
    let c = connect_packet(Protocol::V311, &id_on(0, "dmg-sub"), false, 60);
    let (mut sub, _) = Raw::connect(b.port, c.clone());
    sub.send(&Packet::Subscribe(tarta_proto::mqtt::Subscribe {
        packet_id: 1,
        filters: vec![("dmg/#".into(), sub_opts(QoS::AtLeastOnce))],
        properties: Properties::default(),
    }));
    assert!(matches!(sub.recv(), Some(Packet::SubAck(_))));
    drop(sub);
    std::thread::sleep(Duration::from_millis(200));
    let (mut p, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V311, &id_on(1, "dmg-pub"), true, 60),
    );
    for i in 1..=n {
        p.send(&publish(
            "dmg/t",
            QoS::AtLeastOnce,
            i,
            format!("m{i}").into_bytes(),
        ));
        assert!(matches!(p.recv(), Some(Packet::PubAck(_))));
    }
    assert!(b.terminate().is_some_and(|s| s.success()));
    c
}

/// Reconnects the subscriber; returns (session present, payloads).
fn drain_queue(b: &Broker, mut c: tarta_proto::mqtt::Connect) -> (bool, Vec<String>) {
    c.clean_start = false;
    let (mut sub, ack) = Raw::connect(b.port, c);
    let mut got = Vec::new();
    while let Some(Packet::Publish(p)) = sub.recv_timeout(Duration::from_secs(1)) {
        got.push(String::from_utf8_lossy(&p.payload).to_string());
        sub.send(&Packet::PubAck(tarta_proto::mqtt::Ack {
            packet_id: p.packet_id,
            reason: 0,
            properties: Properties::default(),
        }));
    }
    (ack.session_present, got)
}

fn segment_of(data: &Path, shard: usize) -> PathBuf {
    let dir = data.join("log-1").join(format!("shard-{shard}"));
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segs.sort();
    segs.pop().expect("a segment")
}

#[test]
fn a_torn_tail_is_cut_and_everything_acknowledged_recovered() {
    let dir = std::env::temp_dir().join(format!("tarta-torn-{}", rand_u64()));
    let data = dir.join("data");
    let c = stored_queue(&data.to_string_lossy(), 20);
    // A write torn by a crash: the start of a record that never completed.
    let seg = segment_of(&data, 0);
    let mut bytes = std::fs::read(&seg).unwrap();
    // After the last record (the file ends in zero padding: cut it first).
    let end = tarta::store::disk::scan(&bytes).good_len;
    bytes.truncate(end);
    bytes.extend_from_slice(&[0x40, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 8, 1, 2, 3]);
    std::fs::write(&seg, &bytes).unwrap();
    let b = Broker::start_with(&["--data-dir", &data.to_string_lossy()]);
    let (present, got) = drain_queue(&b, c);
    assert!(present);
    assert_eq!(got.len(), 20, "{got:?}");
    assert!(
        b.log().contains("log tail torn"),
        "no log line about the torn tail"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_damaged_record_is_skipped_an_unreadable_segment_quarantined_and_the_broker_starts() {
    let dir = std::env::temp_dir().join(format!("tarta-damage-{}", rand_u64()));
    let data = dir.join("data");
    let c = stored_queue(&data.to_string_lossy(), 30);
    let seg = segment_of(&data, 0);
    // One flipped byte inside a record in the middle of shard 0's segment
    // (the payload of message 15; the segment ends in zero padding).
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes
        .windows(3)
        .position(|w| w == b"m15")
        .expect("message 15 in the log");
    bytes[at + 1] ^= 0x55;
    std::fs::write(&seg, &bytes).unwrap();
    // Shard 1's segment cannot be read at all.
    let seg1 = segment_of(&data, 1);
    std::fs::remove_file(&seg1).unwrap();
    std::fs::create_dir(&seg1).unwrap();
    let b = Broker::start_with(&["--data-dir", &data.to_string_lossy()]);
    let (present, got) = drain_queue(&b, c);
    let log = b.log();
    assert!(present, "the session is gone");
    // At most the damaged record's message is missing.
    assert!(got.len() >= 29, "recovered {} of 30: {got:?}", got.len());
    assert!(
        log.contains("corrupt log records skipped"),
        "no log line for the damaged record"
    );
    assert!(
        log.contains("quarantined"),
        "no log line for the unreadable segment"
    );
    let q: Vec<_> = std::fs::read_dir(data.join("quarantine"))
        .unwrap()
        .flatten()
        .collect();
    assert!(q.len() >= 2, "quarantine holds {q:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
