#!/usr/bin/env python3
"""Bridge forwarding rate and backlog drain, Tarta beside Mosquitto.

The remote is Debian's Mosquitto (TCP and WebSocket listeners), or with
`--remote tarta` a Tarta without persistence (so that the remote is not
what limits the edges at full rate). The edge is
Tarta (bridge over TCP, and over WebSocket) or Mosquitto (its bridge speaks
TCP only), fresh for every run, in alternating rounds.

  rate:  loadgen pairs (10 pairs, QoS 1, 64 B) with the publishers on the
         edge and the subscribers on the remote (`--sub-port`), at a total
         rate of 1,000 and 10,000 msgs/s and at the publishers' maximum:
         delivered msgs/s, edge CPU (from /proc), latency end to end.
         Tarta logs and fsyncs every message before its PUBACK;
         Mosquitto's bridge queue is in memory (`persistence false`).
  drain: the edge starts with its remote down and takes a backlog of B
         QoS 1 messages (paho); then the remote starts and a paho
         subscriber counts: backlog / (last arrival - first arrival).

    bench/scripts/bridge_rate.py --rounds 3 --backlog 60000
    bench/scripts/bridge_rate.py --crash 60000 --rounds 3
"""
import argparse, os, shutil, socket, statistics, subprocess, sys, tempfile, threading, time

import paho.mqtt.client as mqtt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import free_port, wait_port as _wait  # noqa: E402


def wait_port(port):
    if not _wait(port):
        raise RuntimeError(f"nothing listens on {port}")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARTA = os.path.join(ROOT, "target", "release", "tarta")
MOSQUITTO = "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else "mosquitto"
TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def mosquitto(work, name, body):
    conf = os.path.join(work, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(body)
    return subprocess.Popen([MOSQUITTO, "-c", conf], stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(work, f"{name}.log"), "w"))


REMOTE = "mosquitto"


def remote(work, tcp=None, ws=None):
    tcp, ws = tcp or free_port(), ws or free_port()
    if REMOTE == "tarta":
        p = subprocess.Popen([TARTA, "--tcp", f"127.0.0.1:{tcp}", "--ws", f"127.0.0.1:{ws}",
                              "--no-persistence", "--no-pin"], stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(work, "remote.log"), "w"))
        wait_port(tcp)
        wait_port(ws)
        return p, tcp, ws
    p = mosquitto(work, "remote", f"listener {tcp} 127.0.0.1\nlistener {ws} 127.0.0.1\n"
                  "protocol websockets\nsocket_domain ipv4\nallow_anonymous true\n"
                  "persistence false\nmax_queued_messages 1000000\nmax_inflight_messages 100\n")
    wait_port(tcp)
    wait_port(ws)
    return p, tcp, ws


def edge(work, kind, rtcp, rws, keep=False):
    port = free_port()
    if kind == "mosquitto":
        p = mosquitto(work, "edge", f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                      "persistence false\nmax_queued_messages 1000000\nmax_inflight_messages 100\n"
                      f"connection cloud\naddress 127.0.0.1:{rtcp}\ntopic bench/# out 1\ntopic loadgen/# out 1\n"
                      "cleansession false\nrestart_timeout 1\ntry_private true\n"
                      "bridge_max_packet_size 0\n")
    else:
        addr = f"mqtt://127.0.0.1:{rtcp}" if kind.startswith("tarta-tcp") else f"ws://127.0.0.1:{rws}/mqtt"
        conf = os.path.join(work, "edge.toml")
        data = os.path.join(work, "edge-data")
        if not keep:
            shutil.rmtree(data, ignore_errors=True)
        with open(conf, "w") as f:
            # -nofsync: the log is written but not synced (Mosquitto's
            # bridge keeps its queue in memory only).
            fsync = "never" if kind.endswith("-nofsync") else "always"
            f.write(f'tcp = ["127.0.0.1:{port}"]\ndata_dir = "{data}"\nfsync = "{fsync}"\n'
                    f'[[bridge]]\nname = "cloud"\naddress = "{addr}"\nclient_id = "edge"\n'
                    'protocol = "3.1.1"\nreconnect_delay_ms = 200\nreconnect_delay_max_ms = 1000\n'
                    '[[bridge.topic]]\nfilter = "bench/#"\nqos = 1\n'
                    '[[bridge.topic]]\nfilter = "loadgen/#"\nqos = 1\n')
        p = subprocess.Popen([TARTA, "--config", conf], stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(work, "edge.log"), "w"))
    wait_port(port)
    return p, port


class Sub:
    """A QoS 1 subscriber at the remote that counts distinct messages."""

    def __init__(self, port, want):
        self.want, self.seen, self.first, self.last = want, set(), None, None
        self.done = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub{port}", clean_session=True)
        self.c.on_message = self.on_message
        ok = threading.Event()
        self.c.on_subscribe = lambda *a: ok.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe("bench/#", qos=1)
        ok.wait(5)

    def on_message(self, c, u, m):
        now = time.time()
        if m.topic == "bench/probe":
            return
        self.first = self.first or now
        self.seen.add(m.payload)
        if len(self.seen) >= self.want and not self.done.is_set():
            self.last = now
            self.done.set()

    def stop(self):
        self.c.loop_stop()
        self.c.disconnect()


def publish(port, n, topic="bench/a"):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub{time.time_ns()}", clean_session=True)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    acked = threading.Semaphore(0)
    c.on_publish = lambda *a: acked.release()
    c.connect("127.0.0.1", port)
    c.loop_start()
    for i in range(n):
        c.publish(topic, str(i).encode().ljust(64, b"."), qos=1)
    for _ in range(n):
        acked.acquire(timeout=60)
    c.loop_stop()
    c.disconnect()


def wait_link(eport, sub_port):
    """Until a probe published at the edge reaches the remote."""
    got = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe{time.time_ns()}")
    c.on_message = lambda *a: got.set()
    c.connect("127.0.0.1", sub_port)
    c.loop_start()
    c.subscribe("bench/probe", qos=1)
    time.sleep(0.2)
    end = time.time() + 20
    while not got.is_set() and time.time() < end:
        publish(eport, 1, "bench/probe")
        got.wait(0.5)
    c.loop_stop()
    c.disconnect()
    if not got.is_set():
        raise RuntimeError("the bridge never forwarded the probe")


LOADGEN = os.path.join(ROOT, "target", "release", "loadgen")


def rate(work, kind, total):
    """One loadgen run; returns its JSON."""
    r, rtcp, rws = remote(work)
    e, eport = edge(work, kind, rtcp, rws)
    try:
        wait_link(eport, rtcp)
        out = os.path.join(work, "lg.json")
        rate_args = ["--rate", "0"] if total == 0 else ["--total-rate", str(total)]
        subprocess.run([LOADGEN, "pairs", "-n", "10", "--qos", "1", "--duration", "10", "--warmup", "2",
                        "--port", str(eport), "--sub-port", str(rtcp), "--broker-pid", str(e.pid),
                        "--json", out, "--quiet"] + rate_args,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        import json
        with open(out) as f:
            return json.load(f)
    finally:
        for p in (e, r):
            p.kill()
            p.wait()


def drain(work, kind, backlog):
    rtcp, rws = free_port(), free_port()
    e, eport = edge(work, kind, rtcp, rws)
    r = None
    try:
        time.sleep(0.5)
        publish(eport, backlog)
        r, rtcp, _ = remote(work, rtcp, rws)
        sub = Sub(rtcp, backlog)
        if not sub.done.wait(300):
            raise RuntimeError(f"{kind}: {len(sub.seen)} of {backlog} drained")
        sub.stop()
        return backlog / (sub.last - sub.first)
    finally:
        for p in (e, r):
            if p:
                p.kill()
                p.wait()


def crash(work, backlog):
    """A Tarta edge takes `backlog` messages with its remote down, is
    SIGKILLed and started again on its data directory, then the remote
    comes up: (messages that arrived, drain msgs/s)."""
    rtcp, rws = free_port(), free_port()
    e, eport = edge(work, "tarta-tcp", rtcp, rws)
    r = None
    try:
        time.sleep(0.5)
        publish(eport, backlog)
        e.kill()
        e.wait()
        e, eport = edge(work, "tarta-tcp", rtcp, rws, keep=True)
        r, rtcp, _ = remote(work, rtcp, rws)
        sub = Sub(rtcp, backlog)
        sub.done.wait(300)
        sub.stop()
        drained = backlog / (sub.last - sub.first) if sub.last else 0
        return len(sub.seen), drained
    finally:
        for p in (e, r):
            if p:
                p.kill()
                p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="1000,10000,0", help="total msgs/s; 0 = the publishers' maximum")
    ap.add_argument("--backlog", type=int, default=60000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", default="tarta-tcp,tarta-ws,mosquitto")
    ap.add_argument("--crash", type=int, default=0,
                    help="only the crash run: this many messages buffered, the edge SIGKILLed")
    ap.add_argument("--remote", default="mosquitto", choices=["mosquitto", "tarta"],
                    help="the broker the edges bridge to (and the subscribers read from)")
    a = ap.parse_args()
    global REMOTE
    REMOTE = a.remote
    if a.crash:
        work = tempfile.mkdtemp(prefix="bridge-crash-")
        try:
            for rnd in range(a.rounds):
                got, drained = crash(work, a.crash)
                print(f"round {rnd + 1}: {a.crash:,} acknowledged, SIGKILL, restarted, "
                      f"{got:,} arrived, drained at {drained:,.0f} msgs/s", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    kinds = a.kinds.split(",")
    rates = [int(x) for x in a.rates.split(",")]
    work = tempfile.mkdtemp(prefix="bridge-rate-")
    res = {}
    try:
        for rnd in range(a.rounds):
            for total in rates:
                for k in kinds:
                    j = rate(work, k, total)
                    row = res.setdefault((total, k), {"delivered": [], "per_cpu": [], "p50": [], "lost": []})
                    row["delivered"].append(j["delivered_per_s"])
                    row["per_cpu"].append(j["msgs_per_broker_cpu_s"] or 0)
                    row["p50"].append(j["latency_us"]["p50"] if j.get("latency_us") else 0)
                    row["lost"].append(j["lost"])
                    print(f"round {rnd + 1} rate {total or 'max':>6} {k:10} delivered {j['delivered_per_s']:9.0f}/s  "
                          f"{j['msgs_per_broker_cpu_s'] or 0:9.0f} msgs/edge-CPU-s  lost {j['lost']}", flush=True)
            for k in kinds:
                if a.backlog:
                    d = drain(work, k, a.backlog)
                    res.setdefault(("drain", k), []).append(d)
                    print(f"round {rnd + 1} drain {k:10} {d:9.0f} msgs/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    print(f"\nmedians of {a.rounds} rounds (10 QoS 1 pairs, 64 B), remote {REMOTE}:")
    print("| offered | edge | delivered msgs/s | msgs per edge CPU-s | p50 latency | not delivered |")
    print("|---|---|---|---|---|---|")
    for total in rates:
        for k in kinds:
            r = res[(total, k)]
            print(f"| {total or 'max'} | {k} | {med(r['delivered']):,.0f} | {med(r['per_cpu']):,.0f} | "
                  f"{med(r['p50']) / 1000:.2f} ms | {med(r['lost']):,.0f} |")
    if a.backlog:
        print(f"\nbacklog of {a.backlog:,} QoS 1 messages, drain msgs/s (median):")
        for k in kinds:
            print(f"| {k} | {med(res[('drain', k)]):,.0f} |")


if __name__ == "__main__":
    sys.exit(main())
