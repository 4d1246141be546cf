//! Operations: clean shutdown, running out of file descriptors.

use crate::harness::{connect_packet, has_disconnect, id_on, Broker, Raw};
use std::process::Command;
use std::time::Duration;
use tarta_proto::mqtt::{Packet, Protocol};

#[test]
fn sigterm_shuts_down_cleanly_and_v5_clients_hear_0x8b() {
    let mut b = Broker::start();
    let (mut r, _) = Raw::connect(
        b.port,
        connect_packet(Protocol::V5, &id_on(0, "bye"), true, 0),
    );
    let status = b.terminate().expect("exits within 10 s");
    assert!(status.success(), "exit status {status:?}");
    let (seen, closed) = r.until_closed(Duration::from_secs(5));
    assert!(closed);
    assert!(has_disconnect(&seen, 0x8B), "{seen:?}");
}

#[test]
fn out_of_file_descriptors_refuses_cleanly_and_recovers() {
    // A broker allowed only 64 descriptors.
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &format!(
            "ulimit -n 64 && exec {} \"$@\"",
            env!("CARGO_BIN_EXE_tarta")
        ),
        "tarta",
    ]);
    let b = Broker::start_cmd(cmd, &[]);
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..80 {
        let mut r = Raw::open(b.port);
        r.s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        r.send(&Packet::Connect(Box::new(connect_packet(
            Protocol::V311,
            &format!("fd-{i}"),
            true,
            0,
        ))));
        match r.recv() {
            Some(Packet::ConnAck(a)) if a.code == 0 => held.push(r),
            _ => refused += 1,
        }
    }
    assert!(
        !held.is_empty() && refused > 0,
        "held {} refused {refused}",
        held.len()
    );
    assert!(b.log().contains("out of file descriptors"));
    // Still serving those it holds, and new ones once descriptors free up.
    held.truncate(5);
    std::thread::sleep(Duration::from_millis(500));
    let (mut r, ack) = Raw::connect(b.port, connect_packet(Protocol::V311, "fd-after", true, 0));
    assert_eq!(ack.code, 0);
    r.send(&Packet::PingReq);
    assert!(matches!(r.recv(), Some(Packet::PingResp)));
    for h in &mut held {
        h.send(&Packet::PingReq);
        assert!(matches!(h.recv(), Some(Packet::PingResp)));
    }
}

#[test]
fn a_second_broker_on_the_same_port_is_refused() {
    let b = Broker::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tarta"))
        .args([
            "--no-persistence",
            "--tcp",
            &format!("127.0.0.1:{}", b.port),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another process listens there"), "{err}");
}
