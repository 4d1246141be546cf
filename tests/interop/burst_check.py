#!/usr/bin/env python3
"""A burst of readiness larger than a shard's completion queue loses no wake-up.

Opens N MQTT 3.1.1 connections whose client ids all have their home on
shard 0 (FNV-1a of the id, as `broker::home_shard`), so every socket ends up
in one shard's connection ring (most of them handed over from the other
shard). Then, three times: stops the broker (SIGSTOP), sends a PINGREQ on
every connection, resumes it (SIGCONT) and expects every PINGRESP.

N is above the ring's 16,384 completion entries. With deferred task work
(Linux 6.1+) the kernel hands the burst over 20 readiness events per
`io_uring_enter`; without it (older kernels) the completion queue
overflows, the kernel ends the overflowed multishot polls and the shard
must re-arm them (with re-arming disabled in that mode, round 1 misses
616 of 17,000 replies: the check fails).

Finally stops the broker with SIGTERM (the server closes first, so the
client ports are not left in TIME_WAIT) and expects every connection to
see the close.

Usage: burst_check.py --port PORT --pid BROKER_PID [--n 17000] [--shards 2]
Prints `ok - ...` or `not ok - ...: why`; exit status 0 only if ok.
"""

import argparse
import os
import signal
import socket
import sys
import time

CONNACK_OK = b"\x20\x02\x00\x00"
PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"


def home_shard(client_id, shards):
    h = 0xCBF29CE484222325
    for b in client_id.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h % shards


def connect_packet(client_id):
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(body)]) + body


def read_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--n", type=int, default=17000)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    name = f"{args.n} connections on one shard: every PINGREQ of a burst answered"

    ids, i = [], 0
    while len(ids) < args.n:
        cid = f"burst-{i}"
        i += 1
        if home_shard(cid, args.shards) == 0:
            ids.append(cid)

    socks = []
    try:
        for k, cid in enumerate(ids):
            s = socket.create_connection(("127.0.0.1", args.port), timeout=10)
            s.sendall(connect_packet(cid))
            socks.append(s)
            # Read CONNACKs in batches so the backlog never fills.
            if k % 1000 == 999 or k == len(ids) - 1:
                for s2 in socks[(k // 1000) * 1000 : k + 1]:
                    if read_exact(s2, 4) != CONNACK_OK:
                        raise AssertionError(f"connection {k}: no CONNACK 0")
    except (OSError, AssertionError) as e:
        print(f"not ok - {name}: after {len(socks)} connections: {e}")
        return 1

    for r in range(args.rounds):
        os.kill(args.pid, signal.SIGSTOP)
        try:
            for s in socks:
                s.sendall(PINGREQ)
        finally:
            t0 = time.monotonic()
            os.kill(args.pid, signal.SIGCONT)
        missing = 0
        for s in socks:
            try:
                if read_exact(s, 2) != PINGRESP:
                    missing += 1
            except OSError:
                missing += 1
        if missing:
            print(f"not ok - {name}: round {r}: {missing} of {args.n} PINGRESP missing")
            return 1
        took = time.monotonic() - t0
        print(f"# round {r}: {args.n} PINGRESP in {took:.3f} s")

    os.kill(args.pid, signal.SIGTERM)
    open_after = 0
    for s in socks:
        try:
            if s.recv(1) != b"":
                open_after += 1
        except OSError:
            pass
        s.close()
    if open_after:
        print(f"not ok - {name}: {open_after} connections got data instead of a close on SIGTERM")
        return 1
    print(f"ok - {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
