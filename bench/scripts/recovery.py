#!/usr/bin/env python3
"""Recovery time: start-up to serving with a large stored state.

Writes a data directory with `store_gen` (N retained messages, S persistent
sessions with Q queued QoS 1 messages each), starts Tarta on it, and
measures the time from exec to the first CONNACK (the shards have replayed
their logs, restored their state and exchanged routes), then checks that a
session's queue is there. Reports disk bytes per stored message and RSS.

    bench/scripts/recovery.py --retained 1000000 --sessions 100000 --queued 10
"""
import argparse, os, shutil, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_packet(client_id, clean):
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04" + bytes([0x02 if clean else 0x00]) + b"\x00\x3c"
    payload = len(cid).to_bytes(2, "big") + cid
    body = var + payload
    return bytes([0x10, len(body)]) + body


def try_connack(port, client_id, clean=True, timeout=0.5):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        return None
    try:
        s.sendall(connect_packet(client_id, clean))
        data = s.recv(4)
        return s, data
    except OSError:
        s.close()
        return None


def read_publishes(s, want, timeout=10):
    """Counts PUBLISH packets (QoS 1: acknowledged) until `want` or timeout."""
    s.settimeout(timeout)
    buf, got, end = b"", 0, time.time() + timeout
    while got < want and time.time() < end:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 2:
            mult, ln, i = 1, 0, 1
            while True:
                b = buf[i]; ln += (b & 0x7F) * mult; mult *= 128; i += 1
                if not b & 0x80:
                    break
            if len(buf) < i + ln:
                break
            ptype, body = buf[0] >> 4, buf[i:i + ln]
            buf = buf[i + ln:]
            if ptype == 3:
                got += 1
                tl = int.from_bytes(body[:2], "big")
                pid = body[2 + tl:4 + tl]
                s.sendall(b"\x40\x02" + pid)
    return got


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--retained", type=int, default=1_000_000)
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--queued", type=int, default=10)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tarta", default=os.path.join(ROOT, "target/release/tarta"))
    ap.add_argument("--store-gen", default=os.path.join(ROOT, "target/release/store_gen"))
    args = ap.parse_args()
    # Always built: store_gen must write the log format this tarta reads.
    subprocess.run(["cargo", "build", "--release", "-p", "tarta", "-p", "tarta-bench"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="tarta-recovery-")
    data = os.path.join(work, "data")
    gen = subprocess.run([args.store_gen, "--dir", data, "--retained", str(args.retained),
                          "--sessions", str(args.sessions), "--queued", str(args.queued),
                          "--shards", str(args.shards)], check=True, capture_output=True, text=True)
    print(gen.stdout.strip())
    times = []
    for run in range(args.runs):
        port = free_port()
        t0 = time.time()
        p = subprocess.Popen([args.tarta, "--tcp", f"127.0.0.1:{port}", "--shards", str(args.shards),
                              "--no-pin", "--log", "info", "--sys-interval", "0", "--data-dir", data],
                             stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "log"), "a"))
        conn = None
        while time.time() - t0 < 120:
            r = try_connack(port, "probe", True)
            if r and len(r[1]) == 4 and r[1][0] == 0x20:
                conn = r[0]
                break
            time.sleep(0.005)
        serving = time.time() - t0
        rss = int(open(f"/proc/{p.pid}/status").read().split("VmRSS:")[1].split()[0])
        conn.close()
        # A session's queue came back.
        s, ack = try_connack(port, f"device-{run}", False, timeout=5)
        got = read_publishes(s, args.queued)
        s.close()
        p.terminate(); p.wait(10)
        times.append(serving)
        print(f"run {run + 1}: serving after {serving:.2f} s; RSS {rss / 1024:.0f} MiB; "
              f"device-{run} session present={ack[2] & 1}, {got}/{args.queued} queued messages back")
    times.sort()
    print(f"median start-up to serving: {times[len(times) // 2]:.2f} s ({args.runs} runs)")
    print(open(os.path.join(work, "log")).read()[-1500:], file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
