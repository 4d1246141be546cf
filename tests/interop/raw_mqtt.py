#!/usr/bin/env python3
"""A raw-socket MQTT 3.1.1 client for the PROXY protocol checks in run.sh.

    python3 tests/interop/raw_mqtt.py --port PORT [--bind ADDR] [--proxy v1|v2|malformed]
        --id CLIENT_ID [--topic TOPIC --payload TEXT] --expect connack|closed

Connects to 127.0.0.1:PORT (from ADDR with --bind, e.g. 127.0.0.2, to get a
client address of its own on loopback), optionally writes a PROXY protocol
header first (v1 text or v2 binary, naming this socket's own addresses;
`malformed`: a complete v1 line whose source is not an address), then a
CONNECT (clean session, keep-alive 60).

--expect connack: CONNACK with return code 0, then, with --topic, a QoS 1
PUBLISH (packet id 1) and its PUBACK, then DISCONNECT and the server's close.
--expect closed: the server closes the connection without sending a byte.

Prints one line, `ok local=ADDR:PORT ...` or `not ok local=ADDR:PORT: why`,
and exits 0 or 1. Every wait is bounded by INTEROP_WAIT seconds (default 30).
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time

WAIT = float(os.environ.get("INTEROP_WAIT", "30"))
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class Failed(Exception):
    pass


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str) -> bytes:
    body = utf8("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + utf8(client_id)
    return b"\x10" + remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes) -> bytes:
    body = utf8(topic) + struct.pack("!H", 1) + payload
    return b"\x32" + remaining_length(len(body)) + body


def proxy_header(kind: str, s: socket.socket) -> bytes:
    src_ip, src_port = s.getsockname()
    dst_ip, dst_port = s.getpeername()
    if kind == "v1":
        return f"PROXY TCP4 {src_ip} {dst_ip} {src_port} {dst_port}\r\n".encode()
    if kind == "v2":
        addrs = socket.inet_aton(src_ip) + socket.inet_aton(dst_ip) + struct.pack("!HH", src_port, dst_port)
        # Version 2, PROXY command; TCP over IPv4.
        return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(addrs)) + addrs
    if kind == "malformed":
        return f"PROXY TCP4 not-an-address {dst_ip} {src_port} {dst_port}\r\n".encode()
    raise ValueError(kind)


def recv_exact(s: socket.socket, n: int, what: str) -> bytes:
    data = b""
    deadline = time.monotonic() + WAIT
    while len(data) < n:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(n - len(data))
        except socket.timeout:
            raise Failed(f"timed out after {WAIT:.0f}s waiting for {what} (got {data!r})") from None
        except ConnectionResetError:
            raise Failed(f"connection reset while waiting for {what} (got {data!r})") from None
        if not chunk:
            raise Failed(f"connection closed while waiting for {what} (got {data!r})")
        data += chunk
    return data


def wait_closed(s: socket.socket, what: str) -> bytes:
    """Reads until the server closes; returns what it sent before."""
    data = b""
    deadline = time.monotonic() + WAIT
    while True:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(4096)
        except socket.timeout:
            raise Failed(f"still open after {WAIT:.0f}s ({what}; received {data[:16]!r})") from None
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def run(args, s: socket.socket) -> str:
    header = proxy_header(args.proxy, s) if args.proxy != "none" else b""
    try:
        s.sendall(header + connect_packet(args.id))
    except (BrokenPipeError, ConnectionResetError):
        if args.expect == "closed":
            return "closed by the server before CONNECT was written"
        raise Failed("connection closed before CONNECT was written") from None
    if args.expect == "closed":
        s.settimeout(WAIT)
        try:
            got = s.recv(4096)
        except socket.timeout:
            raise Failed(f"still open after {WAIT:.0f}s (expected the server to close it)") from None
        except ConnectionResetError:
            got = b""
        if got:
            raise Failed(f"the server answered instead of closing: {got[:16].hex(' ')}")
        return "closed by the server, nothing received"
    connack = recv_exact(s, 4, "CONNACK")
    if connack[:3] != b"\x20\x02\x00" or connack[3] != 0:
        raise Failed(f"expected CONNACK 20 02 00 00, got {connack.hex(' ')}")
    done = "connack=0"
    if args.topic:
        s.sendall(publish_packet(args.topic, args.payload.encode()))
        puback = recv_exact(s, 4, "PUBACK")
        if puback != b"\x40\x02\x00\x01":
            raise Failed(f"expected PUBACK 40 02 00 01, got {puback.hex(' ')}")
        done += " puback"
    s.sendall(b"\xe0\x00")
    rest = wait_closed(s, "after DISCONNECT")
    if rest:
        raise Failed(f"unexpected bytes after DISCONNECT: {rest[:16]!r}")
    return done + " closed"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--bind", default="127.0.0.1", help="source address (default 127.0.0.1)")
    ap.add_argument("--proxy", choices=("none", "v1", "v2", "malformed"), default="none")
    ap.add_argument("--id", required=True, help="client id")
    ap.add_argument("--topic")
    ap.add_argument("--payload", default="")
    ap.add_argument("--expect", choices=("connack", "closed"), required=True)
    args = ap.parse_args()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    local = "?"
    try:
        s.bind((args.bind, 0))
        local = "%s:%d" % s.getsockname()
        s.settimeout(WAIT)
        s.connect(("127.0.0.1", args.port))
        print(f"ok local={local} {run(args, s)}", flush=True)
        return 0
    except Failed as e:
        print(f"not ok local={local}: {e}", flush=True)
    except OSError as e:
        print(f"not ok local={local}: {type(e).__name__}: {e}", flush=True)
    finally:
        s.close()
    return 1


if __name__ == "__main__":
    sys.exit(main())
