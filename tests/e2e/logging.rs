//! Logging never blocks a shard: with stderr a pipe nobody reads, the
//! broker goes on serving and counts the lines it dropped; `--log-format
//! json` writes one JSON object per line.

use crate::harness::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tarta_proto::mqtt::{Packet, Protocol, QoS};

/// Starts tarta with `args`; returns it and its TCP port. stderr is left
/// to the caller.
fn spawn(args: &[&str], stderr: Stdio) -> (std::process::Child, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tarta"))
        .args(["--tcp", "127.0.0.1:0", "--shards", "2", "--no-pin"])
        .args(["--sys-interval", "1", "--no-persistence"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut port = 0;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("tarta listening mqtt/tcp ") {
            port = rest.rsplit(':').next().unwrap().parse().unwrap();
        }
        if line.starts_with("tarta started") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    assert!(port != 0);
    (child, port)
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_stderr_nobody_reads_does_not_stall_the_broker() {
    // stderr is a pipe whose reader never reads: it fills after 64 KiB.
    let (child, port) = spawn(&["--log", "trace"], Stdio::piped());
    let mut child = Kill(child);
    let _unread = child.0.stderr.take().unwrap();
    let (mut sub, _) = Raw::connect(port, connect_packet(Protocol::V311, "canary-sub", true, 0));
    sub.send(&Packet::Subscribe(tarta_proto::mqtt::Subscribe {
        packet_id: 1,
        filters: vec![("canary".into(), Default::default())],
        properties: Default::default(),
    }));
    assert!(matches!(sub.recv(), Some(Packet::SubAck(_))));
    let (mut publ, _) = Raw::connect(port, connect_packet(Protocol::V311, "canary-pub", true, 0));
    // Who reads the broker's count of dropped lines.
    let (mut sys, _) = Raw::connect(port, connect_packet(Protocol::V311, "sys", true, 0));
    sys.send(&Packet::Subscribe(tarta_proto::mqtt::Subscribe {
        packet_id: 1,
        filters: vec![("$SYS/tarta/log_lines_dropped".into(), Default::default())],
        properties: Default::default(),
    }));
    assert!(matches!(sys.recv(), Some(Packet::SubAck(_))));
    // Log lines by the thousand (trace level: every packet) until the
    // broker reports dropping some, while the canary's messages must keep
    // arriving.
    let start = Instant::now();
    let mut n = 0u32;
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no dropped log lines reported"
        );
        for _ in 0..20 {
            let (c, _) = Raw::connect(port, connect_packet(Protocol::V311, "churn", true, 0));
            drop(c);
        }
        n += 1;
        publ.send(&Packet::Publish(tarta_proto::mqtt::Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "canary".into(),
            packet_id: 0,
            properties: Default::default(),
            payload: bytes::Bytes::from(n.to_string()),
        }));
        match sub.recv_timeout(Duration::from_secs(2)) {
            Some(Packet::Publish(p)) => assert_eq!(p.payload, n.to_string().as_bytes()),
            other => panic!("canary message {n} did not arrive: {other:?}"),
        }
        if let Some(Packet::Publish(p)) = sys.recv_timeout(Duration::from_millis(1)) {
            let dropped: u64 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
            if dropped > 0 && start.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
    }
}

#[test]
fn json_log_lines_are_json_objects() {
    let dir = TempDir::new("json-log");
    let path = dir.0.join("stderr");
    let (child, port) = spawn(
        &["--log", "debug", "--log-format", "json"],
        Stdio::from(std::fs::File::create(&path).unwrap()),
    );
    let _child = Kill(child);
    let (c, _) = Raw::connect(port, connect_packet(Protocol::V311, "json-client", true, 0));
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&path).unwrap();
        if text.contains("json-client") {
            for line in text.lines() {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(
                    v.get("level").is_some() && v.get("fields").is_some(),
                    "{line}"
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no log line for the client: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
