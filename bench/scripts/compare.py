#!/usr/bin/env python3
"""Tarta vs Mosquitto vs rumqttd, side by side, with the bundled loadgen.

Starts each broker on its own free ports with comparable settings, runs the
same loadgen scenarios against each, alternating A B C for --rounds rounds
(so drift on a shared machine hits all brokers alike), and prints medians and
ratios (Tarta / peer). Installs what is missing (Mosquitto from Debian,
rumqttd with `cargo install`) unless --no-install.

    bench/compare            # full run (about 15 minutes)
    bench/compare --quick    # under 3 minutes
    bench/compare --json results.json

The fair throughput figure on a small machine where loadgen competes with
the broker for CPU is messages per broker CPU-second (`msgs_per_broker_cpu_s`).
"""
import argparse, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


CERTS = None  # (dir with ca.pem, server.pem, server.key), made once per run


def certs():
    """A test CA and an ECDSA P-256 server certificate for localhost/127.0.0.1."""
    global CERTS
    if CERTS:
        return CERTS
    d = tempfile.mkdtemp(prefix="compare-certs-")
    def run(*a):
        subprocess.run(["openssl", *a], cwd=d, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=compare CA")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    CERTS = d
    return d


def sh(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, **kw)


def ensure_tools(args):
    if not shutil.which("mosquitto") and not os.path.exists("/usr/sbin/mosquitto"):
        if args.no_install:
            sys.exit("mosquitto is missing (apt-get install mosquitto)")
        sh(["apt-get", "install", "-y", "-q", "mosquitto"], check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if "rumqttd" in args.brokers.split(",") and not shutil.which("rumqttd"):
        if args.no_install:
            sys.exit("rumqttd is missing (cargo install rumqttd)")
        # Without --locked: rumqttd's lockfile no longer builds.
        sh(["cargo", "install", "rumqttd"], check=True)
    for name, path in (("tarta", args.tarta), ("loadgen", args.loadgen)):
        if not os.path.exists(path):
            sh(["cargo", "build", "--release", "-p", "tarta" if name == "tarta" else "loadgen"], cwd=ROOT, check=True)


class Broker:
    """One broker process on fresh ports."""

    def __init__(self, name, args):
        self.name, self.args = name, args
        self.dir = tempfile.mkdtemp(prefix=f"compare-{name}-")
        self.port, self.ws_port = free_port(), free_port()
        self.tls_port, self.wss_port = free_port(), free_port()
        self.proc = None

    def start(self):
        log = open(os.path.join(self.dir, "log"), "w")
        c = certs()
        pem, key = os.path.join(c, "server.pem"), os.path.join(c, "server.key")
        if self.name.startswith("tarta"):
            cmd = [self.args.tarta, "--tcp", f"127.0.0.1:{self.port}", "--ws", f"127.0.0.1:{self.ws_port}",
                   "--mqtts", f"127.0.0.1:{self.tls_port}", "--wss", f"127.0.0.1:{self.wss_port}",
                   "--cert", pem, "--key", key,
                   "--shards", "2", "--no-pin", "--log", "warn", "--sys-interval", "0",
                   "--data-dir", os.path.join(self.dir, "data")]
            # Variants: tarta-mem (no persistence), tarta-interval / tarta-never (fsync policy).
            cmd += {"tarta-mem": ["--no-persistence"], "tarta-interval": ["--fsync", "interval"],
                    "tarta-never": ["--fsync", "never"]}.get(self.name, [])
        elif self.name.startswith("mosquitto"):
            conf = os.path.join(self.dir, "mosquitto.conf")
            with open(conf, "w") as f:
                # user root: as root, Mosquitto would switch to its own user, which
                # cannot read the key in our private temporary directory.
                f.write(f"user root\nlistener {self.port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 10000\n"
                        f"listener {self.ws_port} 127.0.0.1\nprotocol websockets\nsocket_domain ipv4\n"
                        f"listener {self.tls_port} 127.0.0.1\ncertfile {pem}\nkeyfile {key}\n"
                        f"listener {self.wss_port} 127.0.0.1\nprotocol websockets\nsocket_domain ipv4\n"
                        f"certfile {pem}\nkeyfile {key}\n")
                if self.name == "mosquitto-persist":
                    # Mosquitto's strongest setting: write its database after every change.
                    f.write(f"persistence true\npersistence_location {self.dir}/\n"
                            "autosave_on_changes true\nautosave_interval 1\n")
            cmd = [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", conf]
        else:
            conf = os.path.join(self.dir, "rumqttd.toml")
            with open(conf, "w") as f:
                f.write(f"""id = 0
[router]
id = 0
max_connections = 20010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:{self.port}"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 2097152
    max_inflight_count = 100
    dynamic_filters = true
""")
            cmd = [shutil.which("rumqttd"), "-c", conf, "-q"]
        # A/B variants of the vendored glommio patch (docs/GLOMMIO-NOTES.md):
        # tarta-timer brings back upstream's preemption timers, tarta-upstream
        # also its membarrier per park.
        env = dict(os.environ)
        env.update({"tarta-timer": {"GLOMMIO_PREEMPT_TIMER": "1"},
                    "tarta-upstream": {"GLOMMIO_PREEMPT_TIMER": "1", "GLOMMIO_MEMBARRIER": "1"}}
                   .get(self.name, {}))
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
        if not wait_port(self.port):
            self.stop()
            raise RuntimeError(f"{self.name} did not start; see {self.dir}/log")
        time.sleep(0.5)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def loadgen(args, broker, scenario, extra, transport="tcp"):
    out = os.path.join(broker.dir, f"{scenario}-{time.time_ns()}.json")
    port = {"tcp": broker.port, "ws": broker.ws_port, "tls": broker.tls_port, "wss": broker.wss_port}[transport]
    tls = []
    if transport in ("tls", "wss"):
        tls = ["--tls", "--cafile", os.path.join(certs(), "ca.pem")]
    lg_transport = {"tls": "tcp", "wss": "ws"}.get(transport, transport)
    cmd = [args.loadgen, scenario, "--port", str(port), "--transport", lg_transport,
           "--broker-pid", str(broker.proc.pid), "--json", out, "--quiet"] + tls + extra
    r = sh(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
    try:
        with open(out) as f:
            res = json.load(f)
    except (OSError, ValueError):
        print(r.stderr[-2000:], file=sys.stderr)
        return None
    res["exit"] = r.returncode
    return res


def scenarios(quick):
    d = "3" if quick else "10"
    w = "1" if quick else "2"
    base = ["--duration", d, "--warmup", w]
    fan_subs = "200" if quick else "1000"
    fan_rate = "2000" if quick else "500"  # deliveries/s offered: 400k (quick) / 500k
    s = [
        # name, loadgen subcommand, args, figures to report, brokers, fresh broker, transport
        ("QoS 0 pairs (10, max rate, 64 B)", "pairs", base + ["-n", "10", "--rate", "0", "--qos", "0"],
         ["delivered_per_s", "msgs_per_broker_cpu_s"], None, False, "tcp"),
        ("QoS 1 pairs (10, max rate, 64 B)", "pairs", base + ["-n", "10", "--rate", "0", "--qos", "1"],
         ["delivered_per_s", "msgs_per_broker_cpu_s"], None, False, "tcp"),
        (f"fan-out 1->{fan_subs} (QoS 0, 64 B)", "fanout", base + ["-p", "1", "-s", fan_subs, "--rate", fan_rate, "--qos", "0"],
         ["delivered_per_s", "msgs_per_broker_cpu_s"], None, False, "tcp"),
        ("latency: 100 pairs x 100 msg/s (QoS 0)", "pairs", base + ["-n", "100", "--rate", "100", "--qos", "0"],
         ["latency_us.p50", "latency_us.p99"], None, False, "tcp"),
        ("QoS 0 pairs over WebSocket (10, max rate)", "pairs", base + ["-n", "10", "--rate", "0", "--qos", "0"],
         ["delivered_per_s", "msgs_per_broker_cpu_s"], ["tarta", "mosquitto"], False, "ws"),
        ("1 MiB message, QoS 1, TCP: delivery time", "pairs", ["-n", "1", "--rate", "1", "--qos", "1", "--payload", "1048576", "--duration", "3", "--warmup", "0", "--drain-timeout", "60"],
         ["latency_us.p50"], ["tarta", "mosquitto"], False, "tcp"),
        # The first message goes out about a second in: a 1 s window can end
        # before it arrives. Mosquitto 2.0.11 sends WebSocket data at ~40 KiB/s
        # (a 1 MiB delivery takes ~25 s, tests/interop/big_timing.mjs), past
        # any window: it is left out here.
        ("1 MiB message, QoS 1, WebSocket: delivery time", "pairs", ["-n", "1", "--rate", "1", "--qos", "1", "--payload", "1048576", "--duration", "3", "--warmup", "0", "--drain-timeout", "90", "--ack-timeout", "90"],
         ["latency_us.p50"], ["tarta"], False, "ws"),
    ]
    # Ordinary load (issue: efficient at every load): broker CPU per
    # message and latency at 1,000 and 10,000 msgs/s in total.
    for pairs, rate in [("10", "100"), ("100", "10"), ("10", "1000"), ("100", "100")]:
        total = int(pairs) * int(rate)
        for qos in ["0", "1"]:
            s.append((f"light load: {pairs} pairs x {rate}/s = {total:,} msgs/s (QoS {qos})", "pairs",
                      base + ["-n", pairs, "--rate", rate, "--qos", qos],
                      ["broker_cpu_us_per_msg", "latency_us.p50", "latency_us.p99"], None, False, "tcp"))
    # A fleet reconnecting at once after a network blip.
    s.append(("connect storm (19,000 at once, 2 loadgen processes)", "conn",
              ["-n", "19000", "--procs", "2", "--duration", "1", "--connect-rate", "1000000"],
              ["connect_rate_per_s", "connections_per_broker_cpu_s"], None, True, "tcp"))
    conns = ["10000"] if quick else ["10000", "19000"]
    for n in conns:
        procs = "2" if int(n) > 15000 else "1"
        s.append((f"RSS per idle connection ({n})", "conn", ["-n", n, "--procs", procs, "--duration", "2", "--connect-rate", "5000"],
                  ["broker_rss_per_connection_b"], None, True, "tcp"))
    # Durability: QoS 1 between persistent sessions, Tarta with its log
    # (fsync always, the default) against itself in memory and Mosquitto
    # with and without its persistence.
    dur = ["tarta", "tarta-mem", "tarta-interval", "mosquitto", "mosquitto-persist"]
    s.append(("QoS 1 pairs, persistent sessions (10, max rate, 64 B)", "pairs",
              base + ["-n", "10", "--rate", "0", "--qos", "1", "--clean-session", "false"],
              ["delivered_per_s", "msgs_per_broker_cpu_s", "latency_us.p50"], dur, False, "tcp"))
    # TLS (Tarta and Mosquitto: rumqttd is not configured for TLS here).
    tm = ["tarta", "mosquitto"]
    s += [
        ("QoS 0 pairs over mqtts (10, max rate, 64 B)", "pairs", base + ["-n", "10", "--rate", "0", "--qos", "0"],
         ["delivered_per_s", "msgs_per_broker_cpu_s"], tm, False, "tls"),
        ("QoS 0 pairs over wss (10, max rate, 64 B)", "pairs", base + ["-n", "10", "--rate", "0", "--qos", "0"],
         ["delivered_per_s", "msgs_per_broker_cpu_s"], tm, False, "wss"),
        ("QoS 1 pairs over mqtts (10, max rate, 64 B)", "pairs", base + ["-n", "10", "--rate", "0", "--qos", "1"],
         ["delivered_per_s", "msgs_per_broker_cpu_s"], tm, False, "tls"),
        ("RSS per idle TLS connection (10000)", "conn", ["-n", "10000", "--duration", "2", "--connect-rate", "2000"],
         ["broker_rss_per_connection_b"], tm, True, "tls"),
        ("TLS handshakes (connect storm, 5000, ECDSA P-256)", "conn", ["-n", "5000", "--duration", "1", "--connect-rate", "100000"],
         ["connect_rate_per_s", "connections_per_broker_cpu_s"], tm, True, "tls"),
    ]
    return s


def pick(res, key):
    if key == "broker_cpu_us_per_msg":
        # Broker CPU microseconds per delivered message.
        v = pick(res, "msgs_per_broker_cpu_s")
        return 1e6 / v if v else None
    cur = res
    for k in key.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs, one round: under 3 minutes")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--brokers", default="tarta,mosquitto,rumqttd")
    ap.add_argument("--tarta", default=os.path.join(ROOT, "target/release/tarta"))
    ap.add_argument("--loadgen", default=os.path.join(ROOT, "target/release/loadgen"))
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--only", help="run only scenarios whose title contains this text (comma-separated)")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    ensure_tools(args)
    names = args.brokers.split(",")
    results = {}  # scenario -> broker -> figure -> [values]
    started = time.time()
    for title, cmd, extra, figures, only, fresh, transport in scenarios(args.quick):
        if args.only and not any(w.strip() in title for w in args.only.split(",")):
            continue
        brokers = [n for n in names if only is None or n in only]
        for r in range(rounds):
            for name in brokers:  # A B C, A B C, ...
                b = Broker(name, args)
                try:
                    b.start()
                    res = loadgen(args, b, cmd, extra, transport)
                finally:
                    b.stop()
                if res is None:
                    continue
                for fig in figures:
                    v = pick(res, fig)
                    if v is not None:
                        results.setdefault(title, {}).setdefault(name, {}).setdefault(fig, []).append(v)
                print(f"[{time.time() - started:5.0f}s] {title} | {name} | round {r + 1}: " +
                      ", ".join(f"{f}={pick(res, f)}" for f in figures) + (f" (loadgen exit {res['exit']})" if res["exit"] else ""),
                      file=sys.stderr)
    # Report: medians and ratios.
    lines = [f"# compare: {rounds} round(s), brokers {', '.join(names)}, {time.strftime('%Y-%m-%d %H:%M')}", ""]
    lines.append("| scenario | figure | " + " | ".join(names) + " | " + " | ".join(f"Tarta/{n}" for n in names if n != "tarta") + " |")
    lines.append("|---|---|" + "---|" * (len(names) * 2 - 1))
    for title, per in results.items():
        figs = sorted({f for b in per.values() for f in b})
        for fig in figs:
            med = {n: statistics.median(per[n][fig]) if n in per and fig in per[n] else None for n in names}
            def fmt(v):
                return "-" if v is None else (f"{v:,.0f}" if abs(v) >= 10 else f"{v:.2f}")
            ratios = []
            for n in names:
                if n == "tarta":
                    continue
                t, p = med.get("tarta"), med.get(n)
                ratios.append("-" if not t or not p else f"{t / p:.2f}x")
            lines.append(f"| {title} | {fig} | " + " | ".join(fmt(med[n]) for n in names) + " | " + " | ".join(ratios) + " |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": rounds, "results": results}, f, indent=2)
    print(f"\n(total {time.time() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
