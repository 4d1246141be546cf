#!/usr/bin/env python3
"""Interop checks for Tarta with the Eclipse Paho Python client (paho-mqtt 2.x).

    python3 tests/interop/paho_check.py --port PORT [--ws-port WSPORT]
        [--mqtts-port MQTTSPORT --wss-port WSSPORT --cafile CA.pem] [CHECK ...]
    python3 tests/interop/paho_check.py --list

Runs the named checks (all of them by default) against a Tarta broker on
127.0.0.1:PORT started with --shards 2 and --sys-interval 1 (the `ws-...`
checks also use its MQTT over WebSocket listener on WSPORT, path /mqtt; the
`tls-...` checks its --mqtts and --wss listeners, whose certificate CA.pem
verifies, for 127.0.0.1), prints
`ok - NAME` or `not ok - NAME: why` for each and exits 1 if any failed.
Every wait is bounded; a whole check is also bounded by a watchdog alarm.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

try:
    import paho.mqtt
    import paho.mqtt.client as mqtt
except ImportError:
    sys.exit("paho-mqtt 2.x is required: python3 -m pip install 'paho-mqtt>=2,<3'")

if int(paho.mqtt.__version__.split(".")[0]) < 2:
    sys.exit(f"paho-mqtt 2.x is required, found {paho.mqtt.__version__}")

HOST = "127.0.0.1"
# Bound on every single wait (connect, SUBACK, acks, deliveries).
WAIT = float(os.environ.get("INTEROP_WAIT", "30"))
# Bound on a whole check.
CHECK_BUDGET = int(os.environ.get("INTEROP_CHECK_BUDGET", "120"))
SHARDS = 2

V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5
VNAME = {V311: "v311", V5: "v5"}
WS_PATH = "/mqtt"
# Set from --ws-port: the broker's MQTT over WebSocket port.
WS_PORT = None
# Set from --mqtts-port, --wss-port, --cafile: MQTT over TLS, MQTT over
# secure WebSocket, and the CA that verifies the broker's certificate.
MQTTS_PORT = None
WSS_PORT = None
CAFILE = None


class CheckFailed(Exception):
    pass


def home_shard(client_id: str, shards: int) -> int:
    """Tarta's home shard of a client id: FNV-1a-64(id bytes) % shards."""
    h = 0xCBF29CE484222325
    for b in client_id.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h % shards


def pick_id(prefix: str, shard: int) -> str:
    """The first `prefix-K` homed on `shard`."""
    k = 0
    while home_shard(f"{prefix}-{k}", SHARDS) != shard:
        k += 1
    return f"{prefix}-{k}"


def rc_value(rc) -> int:
    return rc.value if hasattr(rc, "value") else int(rc)


class Conn:
    """A paho client on its own network thread with synchronous helpers."""

    def __init__(
        self, port: int, client_id: str, protocol: int, clean: bool = True, transport: str = "tcp", tls: bool = False
    ):
        self.port = port
        self.protocol = protocol
        self.clean = clean
        kwargs = {}
        if protocol != V5:
            kwargs["clean_session"] = clean
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            reconnect_on_failure=False,
            transport=transport,
            **kwargs,
        )
        if transport == "websockets":
            self.c.ws_set_options(path=WS_PATH)
        if tls:
            # Verifies the chain against CAFILE and the name (127.0.0.1).
            self.c.tls_set(ca_certs=CAFILE)
        self.name = client_id or "<empty id>"
        self.cv = threading.Condition()
        self.connack = None  # (reason code, flags, properties)
        self.subacks = {}  # mid -> list of reason codes
        self.messages = []  # (topic, payload, qos, retain)
        self.disconnected = None
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect

    # callbacks (network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self.cv:
            self.connack = (reason_code, flags, properties)
            self.cv.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cv:
            self.subacks[mid] = list(reason_codes)
            self.cv.notify_all()

    def _on_message(self, client, userdata, msg):
        with self.cv:
            self.messages.append((msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))
            self.cv.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self.cv:
            self.disconnected = reason_code
            self.cv.notify_all()

    def _wait(self, pred, what: str, timeout: float = WAIT):
        with self.cv:
            if not self.cv.wait_for(pred, timeout):
                raise CheckFailed(f"{self.name}: timed out after {timeout:.0f}s waiting for {what}")

    # operations
    def connect(self):
        if self.protocol == V5:
            self.c.connect(HOST, self.port, keepalive=30, clean_start=self.clean)
        else:
            self.c.connect(HOST, self.port, keepalive=30)
        self.c.loop_start()
        self._wait(lambda: self.connack is not None or self.disconnected is not None, "CONNACK")
        if self.connack is None:
            raise CheckFailed(f"{self.name}: disconnected before CONNACK ({self.disconnected})")
        rc = self.connack[0]
        if rc.is_failure:
            raise CheckFailed(f"{self.name}: CONNACK refused: {rc} ({rc_value(rc):#x})")
        return self

    def subscribe(self, filters):
        """Subscribes to [(filter, qos)] in one SUBSCRIBE; returns the reason codes."""
        result, mid = self.c.subscribe(filters)
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise CheckFailed(f"{self.name}: subscribe failed: {mqtt.error_string(result)}")
        self._wait(lambda: mid in self.subacks, f"SUBACK for {filters}")
        return self.subacks[mid]

    def subscribe_ok(self, filters):
        codes = self.subscribe(filters)
        want = [q for _, q in filters]
        got = [rc_value(c) for c in codes]
        if got != want:
            raise CheckFailed(f"{self.name}: SUBACK for {filters}: expected {want}, got {got}")

    def publish_all(self, topic: str, payloads, qos: int, retain: bool = False):
        infos = [self.c.publish(topic, p, qos=qos, retain=retain) for p in payloads]
        deadline = time.monotonic() + WAIT
        for i, info in enumerate(infos):
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise CheckFailed(f"{self.name}: publish {i} failed: {mqtt.error_string(info.rc)}")
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise CheckFailed(
                    f"{self.name}: publish {i} of {len(infos)} to {topic} (QoS {qos}) "
                    f"not acknowledged within {WAIT:.0f}s"
                )

    def received(self, topic_pred=lambda t: True):
        with self.cv:
            return [m for m in self.messages if topic_pred(m[0])]

    def wait_count(self, n: int, topic_pred=lambda t: True, what: str = "messages"):
        def enough():
            return sum(1 for m in self.messages if topic_pred(m[0])) >= n

        try:
            self._wait(enough, f"{n} {what}")
        except CheckFailed as e:
            raise CheckFailed(f"{e} (got {len(self.received(topic_pred))})") from None

    def close(self):
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


class Clients:
    """Closes every client it made, whatever happens."""

    def __init__(self, port):
        self.port = port
        self.all = []

    def connect(self, client_id, protocol, clean=True, ws=False, tls=False):
        if tls:
            port = WSS_PORT if ws else MQTTS_PORT
            if port is None or CAFILE is None:
                raise CheckFailed("--mqtts-port, --wss-port and --cafile are required for the tls-... checks")
            conn = Conn(port, client_id, protocol, clean, transport="websockets" if ws else "tcp", tls=True)
        elif ws:
            if WS_PORT is None:
                raise CheckFailed("--ws-port is required for the ws-... checks")
            conn = Conn(WS_PORT, client_id, protocol, clean, transport="websockets")
        else:
            conn = Conn(self.port, client_id, protocol, clean)
        self.all.append(conn)
        return conn.connect()

    def close(self):
        for conn in self.all:
            try:
                conn.close()
            except Exception:
                pass


# ------------------------------------------------------------------ checks


def qos_round_trip(port, protocol, qos, n=100):
    """Publisher homed on shard 0, subscriber on shard 1: exact messages."""
    v = VNAME[protocol]
    topic = f"paho/qos/{v}/{qos}"
    with_clients = Clients(port)
    try:
        sub = with_clients.connect(pick_id(f"p{v}q{qos}s", 1), protocol)
        pub = with_clients.connect(pick_id(f"p{v}q{qos}p", 0), protocol)
        sub.subscribe_ok([(topic, qos)])
        payloads = [f"{v}-q{qos}-{i}".encode() for i in range(n)]
        pub.publish_all(topic, payloads, qos)
        sub.wait_count(n, lambda t: t == topic)
        time.sleep(0.5)  # duplicates, if any, would arrive now
        got = sub.received(lambda t: t == topic)
        if len(got) != n:
            raise CheckFailed(f"expected {n} messages, got {len(got)}")
        if [m[1] for m in got] != payloads:
            bad = next(i for i, m in enumerate(got) if m[1] != payloads[i])
            raise CheckFailed(f"message {bad}: expected {payloads[bad]!r}, got {got[bad][1]!r}")
        bad_qos = {m[2] for m in got} - {qos}
        if bad_qos:
            raise CheckFailed(f"delivered with QoS {sorted(bad_qos)}, expected {qos}")
        if any(m[3] for m in got):
            raise CheckFailed("live messages delivered with the retain flag set")
    finally:
        with_clients.close()


def overlapping(port, protocol):
    """`X/+` at QoS 0 and `X/#` at QoS 1 by one client: one copy at QoS 1
    (at QoS 0 for a QoS 0 publication), whether the filters come in one
    SUBSCRIBE or in two."""
    v = VNAME[protocol]
    base = f"paho/ov/{v}"
    cl = Clients(port)
    try:
        one = cl.connect(pick_id(f"p{v}ov1", 1), protocol)
        two = cl.connect(pick_id(f"p{v}ov2", 1), protocol)
        pub = cl.connect(pick_id(f"p{v}ovp", 0), protocol)
        one.subscribe_ok([(f"{base}/+", 0), (f"{base}/#", 1)])
        two.subscribe_ok([(f"{base}/+", 0)])
        two.subscribe_ok([(f"{base}/#", 1)])
        q1 = [f"ov-{i}".encode() for i in range(5)]
        pub.publish_all(f"{base}/x", q1, 1)
        pub.publish_all(f"{base}/x", [b"ov-q0"], 0)
        want = [(f"{base}/x", p, 1, False) for p in q1] + [(f"{base}/x", b"ov-q0", 0, False)]
        for c, how in ((one, "one SUBSCRIBE"), (two, "two SUBSCRIBEs")):
            c.wait_count(len(want), what=f"messages ({how})")
        time.sleep(0.5)
        for c, how in ((one, "one SUBSCRIBE"), (two, "two SUBSCRIBEs")):
            got = c.received()
            if got != want:
                raise CheckFailed(
                    f"filters in {how}: expected {len(want)} messages (QoS 1 x5, QoS 0 x1), "
                    f"got {len(got)}: {[(m[1].decode(), m[2]) for m in got]}"
                )
    finally:
        cl.close()


def sys_topics(port):
    """`#` and `+/...` do not match `$SYS/...` topics (MQTT-4.7.2-1), even
    retained ones; `$SYS/#` does."""
    cl = Clients(port)
    try:
        neg = cl.connect(pick_id("psysneg", 0), V311)
        neg.subscribe_ok([("#", 0), ("+/tarta/#", 0)])
        pos = cl.connect(pick_id("psyspos", 1), V311)
        pos.subscribe_ok([("$SYS/#", 0)])
        # Live (not retained) statistics from both shards, published after
        # `neg` subscribed; with --sys-interval 1 they come every second.
        for shard in range(SHARDS):
            topic = f"$SYS/tarta/shard/{shard}/connections_current"
            pos._wait(
                lambda t=topic: any(m[0] == t and not m[3] for m in pos.messages),
                f"a live {topic} (is tarta running with --sys-interval 1?)",
            )
            value = [m[1] for m in pos.received(lambda x, t=topic: x == t)][-1]
            if not value.decode(errors="replace").isdigit():
                raise CheckFailed(f"{topic} payload is not a number: {value!r}")
        # A normal message proves `neg`'s subscriptions work.
        pos.publish_all("paho/sys/probe", [b"probe"], 1)
        neg.wait_count(1, lambda t: t == "paho/sys/probe", "paho/sys/probe")
        time.sleep(0.3)
        leaked = sorted({m[0] for m in neg.received(lambda t: t.startswith("$"))})
        if leaked:
            raise CheckFailed(f"'#' or '+/tarta/#' matched $-topics: {leaked[:5]}")
    finally:
        cl.close()


def bad_wildcard(port):
    """v5: a malformed filter gets reason code 0x8F in SUBACK; the other
    filters of the same SUBSCRIBE work and the connection stays up."""
    cl = Clients(port)
    try:
        c = cl.connect(pick_id("pwild", 1), V5)
        # paho refuses malformed filters itself; let this one through.
        c.c._filter_wildcard_len_check = lambda sub: mqtt.MQTT_ERR_SUCCESS
        filters = [("a/#/b", 0), ("paho/wild/ok", 1)]
        want = [0x8F, 0x01]  # Topic Filter invalid; Granted QoS 1
        codes = [rc_value(x) for x in c.subscribe(filters)]
        if codes != want:
            raise CheckFailed(
                f"SUBACK reason codes for {[f for f, _ in filters]}: "
                f"expected {[hex(x) for x in want]}, got {[hex(x) for x in codes]}"
            )
        pub = cl.connect(pick_id("pwildp", 0), V5)
        pub.publish_all("paho/wild/ok", [b"still-here"], 1)
        c.wait_count(1, lambda t: t == "paho/wild/ok", "paho/wild/ok")
    finally:
        cl.close()


def assigned_id(port):
    """v5: an empty client id with clean start gets AssignedClientIdentifier
    in CONNACK, and the connection works."""
    cl = Clients(port)
    try:
        c = cl.connect("", V5, clean=True)
        props = c.connack[2]
        assigned = getattr(props, "AssignedClientIdentifier", None) if props else None
        if not assigned:
            raise CheckFailed(f"CONNACK has no AssignedClientIdentifier (properties: {props})")
        c.subscribe_ok([("paho/assigned", 1)])
        c.publish_all("paho/assigned", [b"self"], 1)
        c.wait_count(1, lambda t: t == "paho/assigned", "its own message")
        # A second one gets a different id.
        d = cl.connect("", V5, clean=True)
        other = getattr(d.connack[2], "AssignedClientIdentifier", None)
        if not other or other == assigned:
            raise CheckFailed(f"second assigned id {other!r} (first {assigned!r})")
    finally:
        cl.close()


def ws_round_trip(port, protocol, ws_publishes, n=50):
    """paho over WebSocket (transport="websockets", path /mqtt) and paho over
    TCP, publisher homed on shard 0 and subscriber on shard 1: n messages at
    each QoS 0, 1, 2, exact payloads, order and QoS."""
    v = VNAME[protocol]
    tag = f"pw{v}{'w' if ws_publishes else 't'}"
    cl = Clients(port)
    try:
        sub = cl.connect(pick_id(f"{tag}s", 1), protocol, ws=not ws_publishes)
        pub = cl.connect(pick_id(f"{tag}p", 0), protocol, ws=ws_publishes)
        topics = {q: f"paho/ws/{v}/{tag}/q{q}" for q in (0, 1, 2)}
        sub.subscribe_ok([(topics[q], q) for q in (0, 1, 2)])
        payloads = {q: [f"{tag}-q{q}-{i}".encode() for i in range(n)] for q in (0, 1, 2)}
        for q in (0, 1, 2):
            pub.publish_all(topics[q], payloads[q], q)
        sub.wait_count(3 * n)
        time.sleep(0.5)  # duplicates, if any, would arrive now
        if len(sub.received()) != 3 * n:
            raise CheckFailed(f"expected {3 * n} messages in all, got {len(sub.received())}")
        for q in (0, 1, 2):
            want = [(topics[q], p, q, False) for p in payloads[q]]
            got = sub.received(lambda t, x=topics[q]: t == x)
            if got != want:
                bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                raise CheckFailed(
                    f"QoS {q}: expected {len(want)} messages, got {len(got)}; first difference at {bad}: "
                    f"expected {want[bad] if bad < len(want) else None}, got {got[bad] if bad < len(got) else None}"
                )
    finally:
        cl.close()


def tls_round_trip(port, protocol, ws, n=50):
    """paho over TLS (tls_set with the test CA), both clients on the same
    transport (mqtts, or wss with path /mqtt), publisher homed on shard 0 and
    subscriber on shard 1: n QoS 1 messages, exact payloads, order and QoS."""
    v = VNAME[protocol]
    tag = f"pt{v}{'w' if ws else 'm'}"
    topic = f"paho/tls/{v}/{'wss' if ws else 'mqtts'}"
    cl = Clients(port)
    try:
        sub = cl.connect(pick_id(f"{tag}s", 1), protocol, ws=ws, tls=True)
        pub = cl.connect(pick_id(f"{tag}p", 0), protocol, ws=ws, tls=True)
        sub.subscribe_ok([(topic, 1)])
        payloads = [f"{tag}-{i}".encode() for i in range(n)]
        pub.publish_all(topic, payloads, 1)
        sub.wait_count(n, lambda t: t == topic)
        time.sleep(0.3)  # duplicates, if any, would arrive now
        want = [(topic, p, 1, False) for p in payloads]
        got = sub.received()
        if got != want:
            bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise CheckFailed(
                f"expected {n} messages, got {len(got)}; first difference at {bad}: "
                f"expected {want[bad] if bad < len(want) else None}, got {got[bad] if bad < len(got) else None}"
            )
    finally:
        cl.close()


CHECKS = {}
for _proto in (V311, V5):
    for _q in (0, 1, 2):
        CHECKS[f"{VNAME[_proto]}-qos{_q}-cross-shard"] = (
            lambda port, p=_proto, q=_q: qos_round_trip(port, p, q)
        )
CHECKS["v311-overlapping-subs-one-copy"] = lambda port: overlapping(port, V311)
CHECKS["v5-overlapping-subs-one-copy"] = lambda port: overlapping(port, V5)
CHECKS["sys-not-matched-by-wildcards"] = sys_topics
CHECKS["v5-bad-wildcard-suback-0x8f"] = bad_wildcard
CHECKS["v5-assigned-client-id"] = assigned_id
for _proto in (V311, V5):
    CHECKS[f"ws-{VNAME[_proto]}-ws-to-tcp-qos012"] = lambda port, p=_proto: ws_round_trip(port, p, True)
    CHECKS[f"ws-{VNAME[_proto]}-tcp-to-ws-qos012"] = lambda port, p=_proto: ws_round_trip(port, p, False)
CHECKS["tls-v311-mqtts-qos1-cross-shard"] = lambda port: tls_round_trip(port, V311, ws=False)
CHECKS["tls-v5-wss-qos1-cross-shard"] = lambda port: tls_round_trip(port, V5, ws=True)


def _alarm(signum, frame):
    raise CheckFailed(f"check did not finish within {CHECK_BUDGET}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, help="Tarta's MQTT/TCP port on 127.0.0.1")
    ap.add_argument("--ws-port", type=int, help="Tarta's MQTT over WebSocket port on 127.0.0.1 (ws-... checks)")
    ap.add_argument("--mqtts-port", type=int, help="Tarta's MQTT over TLS port on 127.0.0.1 (tls-... checks)")
    ap.add_argument("--wss-port", type=int, help="Tarta's MQTT over secure WebSocket port on 127.0.0.1 (tls-... checks)")
    ap.add_argument("--cafile", help="PEM CA certificate that verifies the broker's TLS certificate (tls-... checks)")
    ap.add_argument("--list", action="store_true", help="list the checks and exit")
    ap.add_argument("checks", nargs="*", help="checks to run (default: all)")
    args = ap.parse_args()
    if args.list:
        print("\n".join(CHECKS))
        return 0
    if args.port is None:
        ap.error("--port is required")
    unknown = [c for c in args.checks if c not in CHECKS]
    if unknown:
        ap.error(f"unknown checks {unknown}; see --list")
    global WS_PORT, MQTTS_PORT, WSS_PORT, CAFILE
    WS_PORT = args.ws_port
    MQTTS_PORT, WSS_PORT, CAFILE = args.mqtts_port, args.wss_port, args.cafile
    signal.signal(signal.SIGALRM, _alarm)
    failed = 0
    for name in args.checks or list(CHECKS):
        signal.alarm(CHECK_BUDGET)
        try:
            CHECKS[name](args.port)
            signal.alarm(0)
            print(f"ok - {name}", flush=True)
        except CheckFailed as e:
            signal.alarm(0)
            failed += 1
            print(f"not ok - {name}: {e}", flush=True)
        except Exception as e:  # a client error is a failed check too
            signal.alarm(0)
            failed += 1
            print(f"not ok - {name}: {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
