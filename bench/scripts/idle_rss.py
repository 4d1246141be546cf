#!/usr/bin/env python3
"""Broker RSS per idle MQTT connection.

Opens N MQTT 3.1.1 connections (CONNECT, wait for CONNACK, keep-alive 0, then
idle) to a broker already running, and reports the broker's RSS growth per
connection, read from /proc/PID/status before and after.

    idle_rss.py --port 1883 --pid $(pidof tarta) -n 10000
"""
import argparse, resource, socket, struct, sys, time


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit("no VmRSS")


def connect_packet(cid):
    cid = cid.encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x00"  # level 4, clean session, keep-alive 0
    payload = struct.pack("!H", len(cid)) + cid
    body = var + payload
    return bytes([0x10, len(body)]) + body


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--settle", type=float, default=2.0)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    time.sleep(a.settle)
    before = rss_kb(a.pid)
    socks, failed = [], 0
    t0 = time.time()
    for i in range(a.n):
        try:
            s = socket.create_connection((a.host, a.port), timeout=10)
            s.sendall(connect_packet(f"idle-{i}"))
            ack = s.recv(4)
            if len(ack) != 4 or ack[0] != 0x20 or ack[3] != 0:
                failed += 1
                s.close()
                continue
            socks.append(s)
        except OSError as e:
            failed += 1
            if failed < 5:
                print(f"connect {i}: {e}", file=sys.stderr)
    elapsed = time.time() - t0
    time.sleep(a.settle)
    after = rss_kb(a.pid)
    n = len(socks)
    per = (after - before) * 1024 / max(n, 1)
    print(f"connections={n} failed={failed} connect_s={elapsed:.1f} "
          f"rss_before_kb={before} rss_after_kb={after} bytes_per_conn={per:.0f}")
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
