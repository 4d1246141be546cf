//! Metrics: a real Prometheus server (Debian's, started here) scrapes
//! Tarta's `/metrics` while the test connects and disconnects a known
//! number of clients; `promtool check metrics` accepts the exposition;
//! `$SYS/broker/...` (Mosquitto's names) agrees with what the test did.

use crate::harness::*;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tarta_proto::mqtt::{self, Packet, Protocol, QoS};

/// GET `path` from 127.0.0.1:`port`: (status, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    http(port, "GET", path, None)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Prometheus {
    child: Child,
    port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Debian's prometheus scraping 127.0.0.1:`target` every second.
    fn start(dir: &std::path::Path, target: u16) -> Prometheus {
        let cfg = dir.join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: tarta\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("prometheus.log")).unwrap(),
            ))
            .spawn()
            .expect("prometheus (apt-get install prometheus)");
        let p = Prometheus { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::panic::catch_unwind(|| http_get(port, "/-/ready").0).unwrap_or(0) != 200 {
            assert!(Instant::now() < deadline, "prometheus did not get ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// The value of a PromQL expression with one result (None: no result).
    fn query(&self, q: &str) -> Option<f64> {
        let enc: String = q
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) = http_get(self.port, &format!("/api/v1/query?query={enc}"));
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse().ok())
    }

    /// Waits until `q` evaluates to `want`.
    fn wait_for(&self, q: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.query(q);
            if got == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{q}: {got:?}, want {want}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// `promtool check metrics` on `text`: its complaints, if any.
fn promtool(text: &str) -> Result<(), String> {
    let mut c = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The retained value of `$SYS/broker/{name}` once it equals `want`.
fn wait_sys(port: u16, name: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while Instant::now() < deadline {
        let (mut r, _) = Raw::connect(
            port,
            connect_packet(Protocol::V311, &format!("sys-{}", rand_u64()), true, 0),
        );
        r.send(&Packet::Subscribe(mqtt::Subscribe {
            packet_id: 1,
            filters: vec![(
                format!("$SYS/broker/{name}").as_str().into(),
                Default::default(),
            )],
            properties: Default::default(),
        }));
        while let Some(p) = r.recv_timeout(Duration::from_millis(1500)) {
            if let Packet::Publish(p) = p {
                last = String::from_utf8_lossy(&p.payload).into_owned();
                if last == want {
                    return;
                }
            }
        }
    }
    panic!("$SYS/broker/{name}: {last:?}, want {want:?}");
}

#[test]
fn prometheus_scrapes_what_the_test_does_and_sys_agrees() {
    let d = TempDir::new("metrics");
    let cfg = d.0.join("tarta.toml");
    std::fs::write(
        &cfg,
        "http = [\"127.0.0.1:0\"]\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\nprotocol = \"ws\"\nmetrics = false\n",
    )
    .unwrap();
    let b = Broker::start_bare(
        Command::new(env!("CARGO_BIN_EXE_tarta")),
        &["--config", cfg.to_str().unwrap()],
    );
    let http = b.port_of("http");
    // The exposition passes promtool; the public WebSocket port, with
    // metrics = false, does not serve it.
    let (status, text) = http_get(http, "/metrics");
    assert_eq!(status, 200);
    promtool(&text).unwrap();
    assert_eq!(http_get(b.ws_port, "/metrics").0, 404);
    assert_eq!(http_get(http, "/health").0, 200);

    let prom = Prometheus::start(&d.0, http);
    prom.wait_for("up{job=\"tarta\"}", 1.0);
    let tcp = "sum(tarta_listener_connections{transport=\"tcp\"})";
    prom.wait_for(tcp, 0.0);
    let mut clients: Vec<Raw> = (0..7)
        .map(|i| {
            Raw::connect(
                b.port,
                connect_packet(Protocol::V311, &format!("m{i}"), true, 0),
            )
            .0
        })
        .collect();
    prom.wait_for(tcp, 7.0);
    clients.truncate(4);
    prom.wait_for(tcp, 4.0);
    prom.wait_for(
        "sum(tarta_connections_closed_total{reason=\"peer_gone\"})",
        3.0,
    );
    // Ten PUBLISH: counted by Prometheus and by $SYS.
    for i in 0..10u16 {
        clients[0].send(&Packet::Publish(mqtt::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "m/t".into(),
            packet_id: i + 1,
            properties: Default::default(),
            payload: bytes::Bytes::from_static(b"x"),
        }));
        assert!(matches!(clients[0].recv(), Some(Packet::PubAck(_))));
    }
    prom.wait_for("sum(tarta_messages_received_total)", 10.0);
    // Mosquitto's names: 4 clients plus the reader itself.
    wait_sys(b.port, "clients/connected", "5");
    wait_sys(b.port, "publish/messages/received", "10");
    wait_sys(
        b.port,
        "version",
        &format!("tarta version {}", env!("CARGO_PKG_VERSION")),
    );
    // Process figures are there too.
    assert!(prom.query("process_resident_memory_bytes").unwrap_or(0.0) > 1e6);
    assert!(prom.query("process_open_fds").unwrap_or(0.0) > 5.0);
}
