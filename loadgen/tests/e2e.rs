//! End-to-end: the real `loadgen` binary against a real Tarta (and, when
//! installed, Mosquitto), short scenarios of every kind, asserting the
//! figures of the `--json` report.
//!
//! The Tarta binary is `$CARGO_MANIFEST_DIR/../target/release/tarta` or
//! `../target/debug/tarta`, whichever exists (release first); if neither
//! does, the test builds it with `cargo build -p tarta --release --target-dir
//! ../target` first (a clean clone in CI). Mosquitto cases run when
//! `/usr/sbin/mosquitto` (or `mosquitto` on PATH) exists and are skipped
//! with a note otherwise. Tarta-over-WebSocket cases run only with
//! `TARTA_WS=1` (Tarta started with `--ws 127.0.0.1:0`).

// Test helpers outside #[test] functions: clippy.toml's allow-in-tests does
// not reach them, and a failed setup step should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

struct Broker {
    /// The guard shell (see [`spawn_guarded`]).
    child: Child,
    /// The broker's own PID (for `--broker-pid`).
    pid: u32,
    tcp: u16,
    ws: Option<u16>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bin args` under a small shell that kills it when this test
/// process goes away (its stdin, a pipe we never write to, reaches end of
/// file): the brokers live in statics, which Rust never drops. The shell
/// first prints `loadgen-e2e-pid PID`; the broker's stdout follows.
fn spawn_guarded(
    bin: &Path,
    args: &[&str],
) -> (
    Child,
    u32,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
) {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"b="$0"; "$b" "$@" </dev/null & p=$!; echo "loadgen-e2e-pid $p"; while read -r _; do :; done; kill $p; wait $p"#)
        .arg(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start broker");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let pid = first
        .strip_prefix("loadgen-e2e-pid ")
        .and_then(|p| p.trim().parse().ok())
        .expect("broker pid");
    (child, pid, lines)
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tarta_binary() -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _g = BUILD.lock().unwrap();
    for p in ["target/release/tarta", "target/debug/tarta"] {
        let p = workspace().join(p);
        if p.exists() {
            return p;
        }
    }
    eprintln!("tarta binary not found: building it (cargo build -p tarta --release)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "-p", "tarta", "--release", "--target-dir"])
        .arg(workspace().join("target"))
        .current_dir(workspace())
        .status()
        .expect("run cargo");
    assert!(st.success(), "cargo build -p tarta failed");
    workspace().join("target/release/tarta")
}

/// Reads `tarta listening mqtt/KIND ADDR` lines until `tarta started`.
fn start_tarta(ws: bool) -> Broker {
    // In memory: these tests measure loadgen, and run brokers in parallel.
    let mut args = vec![
        "--tcp",
        "127.0.0.1:0",
        "--shards",
        "2",
        "--no-pin",
        "--no-persistence",
    ];
    if ws {
        args.extend(["--ws", "127.0.0.1:0"]);
    }
    let (child, pid, mut lines) = spawn_guarded(&tarta_binary(), &args);
    let (mut tcp, mut wsp) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        if let Some(rest) = line.strip_prefix("tarta listening mqtt/") {
            let (kind, addr) = rest.split_once(' ').unwrap();
            let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
            if kind == "tcp" {
                tcp = Some(port);
            } else if kind == "ws" {
                wsp = Some(port);
            }
        }
        if line.starts_with("tarta started") {
            break;
        }
    }
    // Keep draining stdout so the broker never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    Broker {
        child,
        pid,
        tcp: tcp.expect("tarta printed no TCP listener"),
        ws: wsp,
    }
}

fn tarta() -> &'static Broker {
    static B: OnceLock<Broker> = OnceLock::new();
    B.get_or_init(|| start_tarta(std::env::var("TARTA_WS").as_deref() == Ok("1")))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn mosquitto_bin() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/sbin/mosquitto");
    if p.exists() {
        return Some(p);
    }
    Command::new("mosquitto")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()
        .map(|_| PathBuf::from("mosquitto"))
}

/// Mosquitto with a TCP and a WebSocket listener.
fn mosquitto() -> Option<&'static Broker> {
    static B: OnceLock<Option<Broker>> = OnceLock::new();
    B.get_or_init(|| {
        let bin = mosquitto_bin()?;
        let (tcp, ws) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("loadgen-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {tcp} 127.0.0.1\nallow_anonymous true\nlistener {ws} 127.0.0.1\nprotocol websockets\nsocket_domain ipv4\nallow_anonymous true\n"
            ),
        )
        .unwrap();
        let (child, pid, lines) = spawn_guarded(&bin, &["-c", conf.to_str()?]);
        std::thread::spawn(move || for _ in lines {});
        // Both listeners: Mosquitto listens on TCP before its WebSocket
        // listener is up (a test once met a refused WebSocket connection).
        let deadline = Instant::now() + Duration::from_secs(10);
        for p in [tcp, ws] {
            while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
                assert!(Instant::now() < deadline, "mosquitto did not start");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Some(Broker {
            child,
            pid,
            tcp,
            ws: Some(ws),
        })
    })
    .as_ref()
}

/// Runs loadgen with `args` (plus short timings) and returns its exit code
/// and JSON report.
fn loadgen(args: &[&str]) -> (i32, Value) {
    let json = std::env::temp_dir().join(format!(
        "loadgen-e2e-{}-{}.json",
        std::process::id(),
        next_id()
    ));
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .args([
            "--duration",
            "1",
            "--warmup",
            "0.5",
            "--threads",
            "1",
            "--quiet",
            "--json",
        ])
        .arg(&json)
        .output()
        .expect("run loadgen");
    let took = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "loadgen {} ({:.1}s)\n{stdout}{}",
        args.join(" "),
        took.as_secs_f64(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(40), "loadgen took {took:?}");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("report")).expect("valid JSON");
    let _ = std::fs::remove_file(&json);
    (out.status.code().unwrap_or(-1), v)
}

fn next_id() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// A run where every message must arrive exactly once.
fn assert_complete(code: i32, v: &Value, deliveries_per_msg: u64) {
    assert_eq!(code, 0, "exit code; problems: {}", v["problems"]);
    assert_eq!(v["ok"], true);
    let sent = u(v, "sent");
    assert!(sent > 0, "nothing sent");
    assert_eq!(u(v, "received"), sent * deliveries_per_msg);
    assert_eq!(u(v, "expected"), sent * deliveries_per_msg);
    assert_eq!(u(v, "lost"), 0);
    assert_eq!(u(v, "duplicated"), 0);
    assert_eq!(u(v, "connect_failures"), 0);
    assert!(v["latency_us"]["p50"].as_u64().unwrap() > 0);
    assert!(v["latency_us"]["max"].as_u64().unwrap() >= v["latency_us"]["p99"].as_u64().unwrap());
    for k in [
        "scenario",
        "sent",
        "received",
        "lost",
        "duplicated",
        "reordered",
        "delivered_per_s",
        "latency_us",
        "broker_cpu_s",
        "broker_rss_kb",
        "msgs_per_broker_cpu_s",
        "loadgen_cpu_s",
        "connections",
        "connect_failures",
    ] {
        assert!(v.get(k).is_some(), "stable key {k} missing");
    }
}

fn port(p: u16) -> String {
    p.to_string()
}

#[test]
fn tarta_pairs_qos_0_1_2() {
    let b = tarta();
    let pid = b.pid.to_string();
    for (qos, proto) in [("0", "3.1.1"), ("1", "3.1.1"), ("2", "5")] {
        let (code, v) = loadgen(&[
            "pairs",
            "-n",
            "5",
            "--port",
            &port(b.tcp),
            "--qos",
            qos,
            "--protocol",
            proto,
            "--rate",
            "200",
            "--broker-pid",
            &pid,
        ]);
        assert_complete(code, &v, 1);
        assert_eq!(v["scenario"], "pairs");
        assert_eq!(u(&v, "connections"), 10);
        assert!(v["broker_cpu_s"].as_f64().is_some());
        assert!(u(&v, "broker_rss_kb") > 0);
    }
}

#[test]
fn tarta_fanout_and_fanin() {
    let b = tarta();
    let (code, v) = loadgen(&[
        "fanout",
        "-p",
        "2",
        "-s",
        "8",
        "--port",
        &port(b.tcp),
        "--qos",
        "1",
        "--rate",
        "100",
    ]);
    assert_complete(code, &v, 8);
    let (code, v) = loadgen(&[
        "fanin",
        "-p",
        "8",
        "-s",
        "2",
        "--port",
        &port(b.tcp),
        "--qos",
        "2",
        "--protocol",
        "5",
        "--rate",
        "100",
    ]);
    assert_complete(code, &v, 2);
}

#[test]
fn tarta_conn_over_two_processes() {
    let b = tarta();
    let (code, v) = loadgen(&[
        "conn",
        "-n",
        "400",
        "--procs",
        "2",
        "--port",
        &port(b.tcp),
        "--connect-rate",
        "2000",
        "--broker-pid",
        &b.pid.to_string(),
    ]);
    assert_eq!(code, 0, "{}", v["problems"]);
    assert_eq!(u(&v, "connections"), 400);
    assert_eq!(u(&v, "connect_failures"), 0);
    assert!(v["connect_rate_per_s"].as_f64().unwrap() > 0.0);
}

/// Tarta has no `$share` yet: the refusal is reported, the run ends.
#[test]
fn tarta_shared_refusal_is_reported() {
    let b = tarta();
    let (code, v) = loadgen(&[
        "shared",
        "-p",
        "1",
        "-s",
        "2",
        "--port",
        &port(b.tcp),
        "--qos",
        "1",
    ]);
    if u(&v, "subscriptions_refused") == 0 {
        // Tarta learned $share: then it must deliver everything once.
        assert_complete(code, &v, 1);
        return;
    }
    assert_eq!(code, 2);
    assert_eq!(u(&v, "subscriptions_refused"), 2);
    assert!(v["problems"].to_string().contains("$share"));
}

#[test]
fn unreachable_broker_fails_fast() {
    let p = free_port();
    let start = Instant::now();
    let (code, v) = loadgen(&["pairs", "-n", "3", "--port", &port(p)]);
    assert_eq!(code, 2);
    assert_eq!(u(&v, "connections"), 0);
    assert_eq!(u(&v, "connect_failures"), 6);
    assert_eq!(v["failures_by_reason"]["connection refused"], 6);
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// A broker that accepts TCP but never answers CONNECT: CONNACK timeout.
#[test]
fn silent_broker_times_out() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    let keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        l.set_nonblocking(true).unwrap();
        let end = Instant::now() + Duration::from_secs(8);
        while Instant::now() < end {
            if let Ok((s, _)) = l.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let (code, v) = loadgen(&[
        "conn",
        "-n",
        "4",
        "--port",
        &port(p),
        "--connect-timeout",
        "1",
    ]);
    assert_eq!(code, 2);
    assert_eq!(v["failures_by_reason"]["no CONNACK (timeout)"], 4);
    keep.join().unwrap();
}

#[test]
fn mosquitto_tcp_ws_and_shared() {
    let Some(b) = mosquitto() else {
        eprintln!("SKIPPED: mosquitto not installed");
        return;
    };
    let ws = b.ws.unwrap();
    let (code, v) = loadgen(&[
        "pairs",
        "-n",
        "3",
        "--port",
        &port(ws),
        "--transport",
        "ws",
        "--qos",
        "1",
        "--rate",
        "100",
    ]);
    assert_complete(code, &v, 1);
    let (code, v) = loadgen(&[
        "fanout",
        "-p",
        "1",
        "-s",
        "3",
        "--port",
        &port(ws),
        "--transport",
        "ws",
        "--qos",
        "2",
        "--protocol",
        "5",
        "--rate",
        "100",
    ]);
    assert_complete(code, &v, 3);
    for proto in ["5", "3.1.1"] {
        let (code, v) = loadgen(&[
            "shared",
            "-p",
            "2",
            "-s",
            "3",
            "--port",
            &port(b.tcp),
            "--qos",
            "1",
            "--protocol",
            proto,
            "--rate",
            "100",
        ]);
        assert_complete(code, &v, 1);
    }
}

#[test]
fn tarta_ws_when_enabled() {
    if std::env::var("TARTA_WS").as_deref() != Ok("1") {
        eprintln!("SKIPPED: set TARTA_WS=1 once Tarta serves WebSocket");
        return;
    }
    let b = tarta();
    let ws = b.ws.expect("tarta printed no mqtt/ws listener");
    for qos in ["0", "1", "2"] {
        let (code, v) = loadgen(&[
            "pairs",
            "-n",
            "3",
            "--port",
            &port(ws),
            "--transport",
            "ws",
            "--qos",
            qos,
            "--rate",
            "100",
        ]);
        assert_complete(code, &v, 1);
    }
    let (code, v) = loadgen(&[
        "fanout",
        "-p",
        "1",
        "-s",
        "4",
        "--port",
        &port(ws),
        "--transport",
        "ws",
        "--qos",
        "1",
        "--rate",
        "100",
    ]);
    assert_complete(code, &v, 4);
}

/// The independent count: `tests/interop/run.sh` (Mosquitto + mosquitto_sub).
#[test]
fn interop_script_against_mosquitto() {
    if mosquitto_bin().is_none()
        || Command::new("mosquitto_sub")
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
    {
        eprintln!("SKIPPED: mosquitto / mosquitto_sub not installed");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/run.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_loadgen"))
        .output()
        .expect("run interop script");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "interop script failed");
    assert!(text.contains("ok - "));
}
