#!/usr/bin/env bash
# Interop checks: Tarta against real third-party MQTT clients (Debian's
# mosquitto-clients 2.0.x, paho-mqtt 2.x for Python, MQTT.js 5 in Node.js and
# in headless Chromium, and MQTT.js through an nginx reverse proxy), over TLS
# (with certificates made here by the openssl CLI; openssl s_client), and
# behind HAProxy and nginx's stream module speaking the PROXY protocol.
#
#   bash tests/interop/run.sh [path/to/tarta]
#
# Starts its own brokers on free ports (--tcp and --ws, --shards 2 --no-pin
# --sys-interval 1), prints `ok - NAME` / `not ok - NAME: why` per check and a
# final `N passed, M failed` line; exits 1 if anything failed. See README.md.
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TARTA=${1:-$HERE/../../target/release/tarta}
# Upper bound on any single client command (a client that hangs fails its check).
CLIENT_TIMEOUT=${INTEROP_CLIENT_TIMEOUT:-60}
# Upper bound when waiting for deliveries (the machine may be busy).
WAIT=${INTEROP_WAIT:-30}

if [[ ! -x $TARTA ]]; then
    echo "tarta binary not found or not executable: $TARTA" >&2
    exit 1
fi
for tool in mosquitto_pub mosquitto_sub python3 timeout sha256sum; do
    if ! command -v "$tool" >/dev/null; then
        echo "missing required tool: $tool (see tests/interop/README.md)" >&2
        exit 1
    fi
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tarta-interop.XXXXXX")
TARTA_PID=
PORT=
WS_PORT=
# The second broker (behind nginx), the third (burst check), nginx's master
# process, and the timeout(1) running a Node.js script.
TARTA2_PID=
TARTA3_PID=
NGINX_PID=
SUITE_PID=
# The TLS broker (--mqtts, --wss), the edge broker (listener tables: client
# certificates, PROXY protocol), HAProxy and nginx (stream) in front of it.
TARTA_TLS_PID=
TARTA_EDGE_PID=
# The password-file broker and the Mosquitto broker reading tarta passwd's file.
TARTA_PW_PID=
MOSQ_PW_PID=
# The broker with a password file behind the dashboard's login check.
TARTA_DASH_PID=
HAPROXY_PID=
NGINX_STREAM_PID=
# Extra options for every mosquitto_pub/mosquitto_sub of the helpers below
# (the TLS checks set --cafile etc. with `local -a MOSQ_OPTS=(...)`).
MOSQ_OPTS=()
# The topic prefix of start_sub's pings (a check whose clients the ACL
# confines sets its own with `local SYNC=...`).
SYNC=interop/sync
BG_PIDS=()
PASSED=0
FAILED=0
WHY=

# stop_pid PID: SIGTERM, up to 5 s, then SIGKILL.
stop_pid() {
    [[ -n $1 ]] && kill -0 "$1" 2>/dev/null || return 0
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 50); do
        exited "$1" && break
        sleep 0.1
    done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

cleanup() {
    local pid
    for pid in "${BG_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    stop_pid "$SUITE_PID"
    stop_pid "$NGINX_PID"
    stop_pid "$HAPROXY_PID"
    stop_pid "$NGINX_STREAM_PID"
    stop_pid "$TARTA2_PID"
    stop_pid "$TARTA3_PID"
    stop_pid "$TARTA_TLS_PID"
    stop_pid "$TARTA_EDGE_PID"
    stop_pid "${TARTA_PW_PID:-}"
    stop_pid "${TARTA_DASH_PID:-}"
    stop_pid "${MOSQ_PW_PID:-}"
    stop_pid "$TARTA_PID"
    if [[ -n ${INTEROP_KEEP:-} ]]; then
        echo "# work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helpers

# home_shard ID N: the shard Tarta homes client ID on, FNV-1a-64(id) % N
# (same as tarta::broker::home_shard). Bash integers are signed 64-bit and
# wrap, so the final modulo is done on the unsigned value by halves.
home_shard() {
    local s=$1 n=$2 h=$((0xcbf29ce484222325)) i c
    for ((i = 0; i < ${#s}; i++)); do
        printf -v c '%d' "'${s:i:1}"
        h=$(((h ^ c) * 0x100000001b3))
    done
    local hi=$(((h >> 1) & 0x7fffffffffffffff)) lo=$((h & 1))
    echo $((((hi % n) * 2 + lo) % n))
}

# pick_id PREFIX SHARD: the first PREFIX-K (K = 0, 1, ...) homed on SHARD of 2.
# Keep PREFIX short: MQTT 3.1 allows at most 23 characters.
pick_id() {
    local k=0
    while [[ $(home_shard "$1-$k" 2) != "$2" ]]; do
        k=$((k + 1))
    done
    echo "$1-$k"
}

pub() {
    timeout "$CLIENT_TIMEOUT" mosquitto_pub -h 127.0.0.1 -p "$PORT" "${MOSQ_OPTS[@]}" "$@"
}

alive() {
    kill -0 "$1" 2>/dev/null
}

# now_ms: wall clock in milliseconds (bash 5 $EPOCHREALTIME, no fork).
now_ms() {
    local t=${EPOCHREALTIME/[.,]/}
    echo $((10#$t / 1000))
}

# wait_for SECONDS COMMAND...: polls COMMAND every 0.1 s until it succeeds;
# fails once SECONDS have passed.
wait_for() {
    local deadline=$(($(now_ms) + $1 * 1000))
    shift
    until "$@"; do
        if (($(now_ms) >= deadline)); then
            return 1
        fi
        sleep 0.1
    done
}

has_line() { grep -qxF -- "$2" "$1" 2>/dev/null; }
count_at_least() { (($(grep -c -- "$2" "$1" 2>/dev/null || true) >= $3)); }

# start_sub NAME ARGS...: starts mosquitto_sub (127.0.0.1:$PORT, $MOSQ_OPTS)
# in the background with output format "$FMT" (default '%q %r %t %p': qos,
# retain flag, topic, payload) into $WORK/NAME.out, subscribed to ARGS'
# topics plus $SYNC/NAME (default interop/sync/NAME), and waits until it is
# live: it publishes pings to $SYNC/NAME until one comes back, so every
# subscription in the same SUBSCRIBE is active. Sets SUB_PID
# (the pid of timeout(1), whose SIGTERM makes mosquitto_sub disconnect
# cleanly) and SUB_CPID (mosquitto_sub's own pid, for SIGKILL).
start_sub() {
    local name=$1
    shift
    local out=$WORK/$name.out
    : >"$out"
    rm -f "$out.pid"
    # bash -c 'echo $$; exec ...' records mosquitto_sub's own pid.
    timeout "$CLIENT_TIMEOUT" bash -c 'echo $$ >"$0.pid"; exec "$@"' "$out" \
        mosquitto_sub -h 127.0.0.1 -p "$PORT" "${MOSQ_OPTS[@]}" -F "${FMT:-%q %r %t %p}" "$@" \
        -t "$SYNC/$name" >"$out" 2>"$out.err" &
    SUB_PID=$!
    BG_PIDS+=("$SUB_PID")
    local deadline=$((SECONDS + WAIT))
    SUB_CPID=
    until [[ -s $out.pid ]] && SUB_CPID=$(<"$out.pid") && [[ -n $SUB_CPID ]]; do
        if ((SECONDS >= deadline)); then
            WHY="$name: mosquitto_sub did not start"
            return 1
        fi
        sleep 0.05
    done
    until grep -q " $SYNC/$name " "$out" 2>/dev/null; do
        if ! alive "$SUB_PID"; then
            WHY="$name: mosquitto_sub exited early: $(tr '\n' ' ' <"$out.err")"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            WHY="$name: subscriber not live after ${WAIT}s: $(tr '\n' ' ' <"$out.err")"
            return 1
        fi
        pub -t "$SYNC/$name" -m ping -q 0 >/dev/null 2>&1 || true
        sleep 0.2
    done
}

# stop_sub PID: SIGTERM (mosquitto_sub then sends DISCONNECT) and reap.
stop_sub() {
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# data_lines NAME: the subscriber's output without the sync pings.
data_lines() {
    grep -v -- " $SYNC/" "$WORK/$1.out" || true
}

# expect_output NAME EXPECTED_FILE: the subscriber got exactly these lines.
expect_output() {
    data_lines "$1" >"$WORK/$1.got"
    if ! cmp -s "$2" "$WORK/$1.got"; then
        local want got
        want=$(wc -l <"$2")
        got=$(wc -l <"$WORK/$1.got")
        WHY="$1: expected $want lines, got $got; first difference: $(diff "$2" "$WORK/$1.got" | grep -m2 '^[<>]' | tr '\n' ' ')"
        return 1
    fi
}

# run_check NAME FUNCTION ARGS...: runs a check and records the result. The
# check function returns non-zero with WHY set on failure.
run_check() {
    local name=$1
    shift
    WHY=
    if "$@"; then
        echo "ok - $name"
        PASSED=$((PASSED + 1))
    else
        echo "not ok - $name: ${WHY:-failed}"
        FAILED=$((FAILED + 1))
    fi
}

# ----------------------------------------------------------------- checks

# ------------------------------------------------------- passwords

# check_mosquitto_passwd_file: a password file written by Debian's
# mosquitto_passwd ($7$ PBKDF2 by default, $6$ with -H sha512) is Tarta's
# --password-file as it is: mosquitto_pub/sub log in with it; a wrong
# password and a missing one are refused with the 3.1.1 codes.
check_mosquitto_passwd_file() {
    local pw=$WORK/mosq.pw
    mosquitto_passwd -c -b "$pw" alice secret 2>/dev/null &&
        mosquitto_passwd -H sha512 -b "$pw" bob hunter2 2>/dev/null || {
        WHY="mosquitto_passwd failed"
        return 1
    }
    start_tarta pwauth --tcp 127.0.0.1:0 --shards 2 --no-pin --password-file "$pw" || return 1
    TARTA_PW_PID=$L_PID
    local port
    port=$(listen_ports pwauth mqtt/tcp | head -n1)
    local out=$WORK/pwauth.sub
    timeout "$CLIENT_TIMEOUT" mosquitto_sub -p "$port" -u bob -P hunter2 -t pw/t -C 1 -W "$WAIT" >"$out" 2>&1 &
    local sub=$!
    sleep 1
    if ! timeout "$CLIENT_TIMEOUT" mosquitto_pub -p "$port" -u alice -P secret -t pw/t -q 1 -m hello 2>"$WORK/pwauth.pub.err"; then
        WHY="alice ($7$) refused: $(cat "$WORK/pwauth.pub.err")"
        return 1
    fi
    if ! wait "$sub" || [[ $(cat "$out") != hello ]]; then
        WHY="bob ($6$) did not get the message: $(cat "$out")"
        return 1
    fi
    local err
    if err=$(timeout "$CLIENT_TIMEOUT" mosquitto_pub -p "$port" -u alice -P wrong -t pw/t -m x 2>&1); then
        WHY="a wrong password was accepted"
        return 1
    fi
    if [[ $err != *"bad user name or password"* ]]; then
        WHY="wrong password: unexpected error: $err"
        return 1
    fi
    if err=$(timeout "$CLIENT_TIMEOUT" mosquitto_pub -p "$port" -t pw/t -m x 2>&1); then
        WHY="an anonymous client was accepted"
        return 1
    fi
    if [[ $err != *"not authori"* ]]; then
        WHY="anonymous: unexpected error: $err"
        return 1
    fi
}

# check_tarta_passwd_for_mosquitto: a file written by `tarta passwd` is read
# by the Mosquitto broker: carol logs in there; a wrong password does not.
check_tarta_passwd_for_mosquitto() {
    local pw=$WORK/tarta.pw
    "$TARTA" passwd -c -b "$pw" carol 'c@rol pw' && "$TARTA" passwd -b -I 2000 "$pw" dave d4ve || {
        WHY="tarta passwd failed"
        return 1
    }
    local mosq=/usr/sbin/mosquitto
    [[ -x $mosq ]] || mosq=$(command -v mosquitto) || {
        WHY="no mosquitto broker"
        return 1
    }
    local port
    port=$(free_port)
    printf 'user root\nlistener %s 127.0.0.1\nallow_anonymous false\npassword_file %s\n' "$port" "$pw" >"$WORK/mosq-pw.conf"
    "$mosq" -c "$WORK/mosq-pw.conf" >"$WORK/mosq-pw.log" 2>&1 &
    MOSQ_PW_PID=$!
    local deadline=$((SECONDS + 10))
    until port_open "$port"; do
        if ((SECONDS >= deadline)) || ! alive "$MOSQ_PW_PID"; then
            WHY="mosquitto did not start: $(tail -n 3 "$WORK/mosq-pw.log")"
            return 1
        fi
        sleep 0.1
    done
    if ! timeout "$CLIENT_TIMEOUT" mosquitto_pub -p "$port" -u carol -P 'c@rol pw' -t t -m x 2>"$WORK/mosq-pw.pub"; then
        WHY="mosquitto refused carol: $(cat "$WORK/mosq-pw.pub")"
        return 1
    fi
    if ! timeout "$CLIENT_TIMEOUT" mosquitto_pub -p "$port" -u dave -P d4ve -t t -m x 2>"$WORK/mosq-pw.pub"; then
        WHY="mosquitto refused dave (2000 iterations): $(cat "$WORK/mosq-pw.pub")"
        return 1
    fi
    if timeout "$CLIENT_TIMEOUT" mosquitto_pub -p "$port" -u carol -P nope -t t -m x 2>/dev/null; then
        WHY="mosquitto accepted a wrong password"
        return 1
    fi
}

# Publisher on shard 0, subscriber on shard 1: N messages at QoS Q through
# the inter-shard mesh, exact count, order, payloads and delivered QoS.
check_qos() {
    local q=$1 n=200
    local sid pid
    sid=$(pick_id "q$q-sub" 1)
    pid=$(pick_id "q$q-pub" 0)
    start_sub "qos$q" -i "$sid" -q "$q" -t "interop/qos/$q" || return 1
    local s=$SUB_PID
    seq 1 "$n" | sed "s/^/qos$q-msg-/" >"$WORK/qos$q.payloads"
    if ! pub -i "$pid" -q "$q" -t "interop/qos/$q" -l <"$WORK/qos$q.payloads"; then
        WHY="mosquitto_pub failed"
        stop_sub "$s"
        return 1
    fi
    sed "s|^|$q 0 interop/qos/$q |" "$WORK/qos$q.payloads" >"$WORK/qos$q.want"
    wait_for "$WAIT" count_at_least "$WORK/qos$q.out" " interop/qos/$q " "$n" || true
    sleep 0.5 # duplicates, if any, would arrive now
    stop_sub "$s"
    expect_output "qos$q" "$WORK/qos$q.want"
}

# Both clients speak protocol version V (-V), across shards, QoS 1.
check_version() {
    local pv=$1 sv=$2 tag=$3 n=20
    local sid pid
    sid=$(pick_id "v$tag-s" 1)
    pid=$(pick_id "v$tag-p" 0)
    start_sub "ver$tag" -V "$sv" -i "$sid" -q 1 -t "interop/ver/$tag" || return 1
    local s=$SUB_PID
    seq 1 "$n" | sed "s/^/$tag-/" >"$WORK/ver$tag.payloads"
    if ! pub -V "$pv" -i "$pid" -q 1 -t "interop/ver/$tag" -l <"$WORK/ver$tag.payloads"; then
        WHY="mosquitto_pub -V $pv failed"
        stop_sub "$s"
        return 1
    fi
    sed "s|^|1 0 interop/ver/$tag |" "$WORK/ver$tag.payloads" >"$WORK/ver$tag.want"
    wait_for "$WAIT" count_at_least "$WORK/ver$tag.out" " interop/ver/$tag " "$n" || true
    sleep 0.3
    stop_sub "$s"
    expect_output "ver$tag" "$WORK/ver$tag.want"
}

# Retained message: a late subscriber gets it with the retain flag set; a
# live subscriber gets new publications with retain flag 0 (MQTT-3.3.1-9),
# including the empty publication that clears it; after clearing, a new
# subscriber gets nothing for the topic.
check_retained() {
    local t=interop/retain/t pid
    pid=$(pick_id "ret-pub" 0)
    pub -i "$pid" -q 1 -r -t "$t" -m "retained-1" || {
        WHY="mosquitto_pub -r failed"
        return 1
    }
    # Late subscriber (other shard): gets exactly the retained message.
    local line
    line=$(timeout "$CLIENT_TIMEOUT" mosquitto_sub -h 127.0.0.1 -p "$PORT" \
        -i "$(pick_id ret-late 1)" -q 1 -t "$t" -C 1 -W "$WAIT" -F '%r %q %t %p' 2>&1) || true
    if [[ $line != "1 1 $t retained-1" ]]; then
        WHY="late subscriber expected '1 1 $t retained-1', got '$line'"
        return 1
    fi
    # Live subscriber: retained copy first (flag 1), then live ones (flag 0).
    start_sub ret-live -i "$(pick_id ret-live 1)" -q 1 -t "$t" || return 1
    local s=$SUB_PID
    pub -i "$pid" -q 1 -r -t "$t" -m "retained-2" || {
        WHY="mosquitto_pub -r (2) failed"
        stop_sub "$s"
        return 1
    }
    pub -i "$pid" -q 1 -r -t "$t" -n || {
        WHY="mosquitto_pub -r -n failed"
        stop_sub "$s"
        return 1
    }
    printf '%s\n' "1 1 $t retained-1" "1 0 $t retained-2" "1 0 $t " >"$WORK/ret-live.want"
    wait_for "$WAIT" count_at_least "$WORK/ret-live.out" " $t" 3 || true
    sleep 0.3
    stop_sub "$s"
    expect_output ret-live "$WORK/ret-live.want" || return 1
    # After clearing: a new subscriber to the topic and to a retained
    # sentinel gets only the sentinel.
    pub -i "$pid" -q 1 -r -t interop/retain/sentinel -m here || {
        WHY="mosquitto_pub sentinel failed"
        return 1
    }
    start_sub ret-after -i "$(pick_id ret-after 1)" -q 1 -t "$t" -t interop/retain/sentinel || return 1
    s=$SUB_PID
    wait_for "$WAIT" has_line "$WORK/ret-after.out" "1 1 interop/retain/sentinel here" || true
    sleep 0.5
    stop_sub "$s"
    printf '%s\n' "1 1 interop/retain/sentinel here" >"$WORK/ret-after.want"
    expect_output ret-after "$WORK/ret-after.want" || return 1
    pub -i "$pid" -q 1 -r -t interop/retain/sentinel -n || true
}

# Will: published when the client dies (SIGKILL), not after DISCONNECT.
check_will() {
    local v=$1
    local wt=interop/will/$v watcher wid
    watcher=$(pick_id "w$v-watch" 0)
    wid=$(pick_id "w$v-cl" 1)
    start_sub "will-watch-$v" -i "$watcher" -q 1 -t "$wt" || return 1
    local w=$SUB_PID
    # 1. Killed: the will must arrive.
    start_sub "will-kill-$v" -V "$v" -i "$wid" -t interop/will/dummy \
        --will-topic "$wt" --will-payload "gone-$v" --will-qos 1 || {
        stop_sub "$w"
        return 1
    }
    local k=$SUB_PID
    kill -KILL "$SUB_CPID"
    wait "$k" 2>/dev/null || true
    if ! wait_for "$WAIT" has_line "$WORK/will-watch-$v.out" "1 0 $wt gone-$v"; then
        WHY="will not delivered within ${WAIT}s after SIGKILL: $(data_lines "will-watch-$v" | tr '\n' ' ')"
        stop_sub "$w"
        return 1
    fi
    # 2. Clean DISCONNECT (mosquitto_sub -C 1 exits after its first
    # message, the sync ping): no will.
    start_sub "will-clean-$v" -V "$v" -i "$wid" -C 1 -t interop/will/dummy \
        --will-topic "$wt" --will-payload "bad-$v" --will-qos 1 || {
        stop_sub "$w"
        return 1
    }
    local c=$SUB_PID rc=0
    wait "$c" || rc=$?
    if ((rc != 0)); then
        WHY="will client with -C 1 exited with status $rc"
        stop_sub "$w"
        return 1
    fi
    sleep 2 # a wrongly published will would be on its way by now
    pub -i "$(pick_id "w$v-pub" 0)" -q 1 -t "$wt" -m "sentinel" || true
    wait_for "$WAIT" has_line "$WORK/will-watch-$v.out" "1 0 $wt sentinel" || true
    sleep 0.3
    stop_sub "$w"
    printf '%s\n' "1 0 $wt gone-$v" "1 0 $wt sentinel" >"$WORK/will-watch-$v.want"
    expect_output "will-watch-$v" "$WORK/will-watch-$v.want"
}

# Persistent session: subscribe with -c, go away, 3 QoS 1 messages are
# published, come back with -c and the same id: all 3, in order.
check_persistent() {
    local v=$1
    local sid pid t=interop/persist/$v
    sid=$(pick_id "ps$v" 1)
    pid=$(pick_id "ps$v-pub" 0)
    local err
    # -E: exit (with DISCONNECT) once the subscription is acknowledged.
    if ! err=$(timeout "$CLIENT_TIMEOUT" mosquitto_sub -h 127.0.0.1 -p "$PORT" -V "$v" \
        -c -i "$sid" -q 1 -t "$t" -E 2>&1); then
        WHY="mosquitto_sub -c -E failed: $err"
        return 1
    fi
    printf '%s\n' "persist-1" "persist-2" "persist-3" >"$WORK/persist-$v.payloads"
    pub -V "$v" -i "$pid" -q 1 -t "$t" -l <"$WORK/persist-$v.payloads" || {
        WHY="mosquitto_pub failed"
        return 1
    }
    start_sub "persist-$v" -V "$v" -c -i "$sid" -q 1 -t "$t" || return 1
    local s=$SUB_PID
    wait_for "$WAIT" count_at_least "$WORK/persist-$v.out" " $t " 3 || true
    sleep 0.5
    stop_sub "$s"
    sed "s|^|1 0 $t |" "$WORK/persist-$v.payloads" >"$WORK/persist-$v.want"
    expect_output "persist-$v" "$WORK/persist-$v.want"
}

# 1 MiB of random bytes (-f), QoS 1, across shards, compared by sha256.
check_large() {
    local sid pid t=interop/large
    sid=$(pick_id "big-sub" 1)
    pid=$(pick_id "big-pub" 0)
    head -c 1048576 /dev/urandom >"$WORK/large.bin"
    # %x: payload as hex, so the binary payload stays on one line.
    FMT='%q %r %t %x' start_sub large -i "$sid" -q 1 -t "$t" || return 1
    local s=$SUB_PID
    pub -i "$pid" -q 1 -t "$t" -f "$WORK/large.bin" || {
        WHY="mosquitto_pub -f failed"
        stop_sub "$s"
        return 1
    }
    wait_for "$WAIT" count_at_least "$WORK/large.out" " $t " 1 || true
    sleep 0.5
    stop_sub "$s"
    data_lines large >"$WORK/large.got"
    local lines
    lines=$(wc -l <"$WORK/large.got")
    if ((lines != 1)); then
        WHY="expected 1 message, got $lines"
        return 1
    fi
    python3 -c 'import sys; l = open(sys.argv[1]).read().split(); sys.stdout.buffer.write(bytes.fromhex(l[3] if len(l) > 3 else ""))' \
        "$WORK/large.got" >"$WORK/large.recv"
    local want got
    want=$(sha256sum <"$WORK/large.bin" | cut -d' ' -f1)
    got=$(sha256sum <"$WORK/large.recv" | cut -d' ' -f1)
    if [[ $want != "$got" ]]; then
        WHY="sha256 differs: sent $want ($(wc -c <"$WORK/large.bin") bytes), got $got ($(wc -c <"$WORK/large.recv") bytes)"
        return 1
    fi
    if [[ $(cut -d' ' -f1-3 "$WORK/large.got") != "1 0 $t" ]]; then
        WHY="unexpected qos/retain/topic: $(cut -d' ' -f1-3 "$WORK/large.got")"
        return 1
    fi
}

# 10,000 QoS 1 messages from one mosquitto_pub -l, in order, none missing.
check_many() {
    local n=10000 sid pid t=interop/many
    sid=$(pick_id "many-sub" 1)
    pid=$(pick_id "many-pub" 0)
    seq 1 "$n" | sed 's/^/m-/' >"$WORK/many.payloads"
    start_sub many -i "$sid" -q 1 -t "$t" || return 1
    local s=$SUB_PID
    pub -i "$pid" -q 1 -t "$t" -l <"$WORK/many.payloads" || {
        WHY="mosquitto_pub -l failed (status $?)"
        stop_sub "$s"
        return 1
    }
    wait_for $((WAIT * 4)) count_at_least "$WORK/many.out" " $t " "$n" || true
    sleep 1
    stop_sub "$s"
    sed "s|^|1 0 $t |" "$WORK/many.payloads" >"$WORK/many.want"
    expect_output many "$WORK/many.want"
}

# The ids the checks pick really land on the intended shards: a persistent
# session for an id homed on shard 1 shows up in $SYS/tarta/shard/1/sessions.
sys_value() {
    timeout "$CLIENT_TIMEOUT" mosquitto_sub -h 127.0.0.1 -p "$PORT" -i "$(pick_id sysr 0)" \
        -t "\$SYS/tarta/shard/$1/$2" -C 1 -W "$WAIT" -F '%p' 2>/dev/null
}
sys_is() { [[ $(sys_value "$1" "$2") == "$3" ]]; }
check_placement() {
    local before
    before=$(sys_value 1 sessions) || {
        WHY="no \$SYS/tarta/shard/1/sessions"
        return 1
    }
    timeout "$CLIENT_TIMEOUT" mosquitto_sub -h 127.0.0.1 -p "$PORT" -c \
        -i "$(pick_id place 1)" -q 1 -t interop/place -E >/dev/null 2>&1 || {
        WHY="mosquitto_sub -c -E failed"
        return 1
    }
    if ! wait_for "$WAIT" sys_is 1 sessions $((before + 1)); then
        WHY="\$SYS/tarta/shard/1/sessions stayed $(sys_value 1 sessions) (was $before, expected $((before + 1)))"
        return 1
    fi
}

# check_paho NAME [OPTIONS...]: one Python paho-mqtt check, one result line.
check_paho() {
    local out rc=0
    out=$(timeout $((CLIENT_TIMEOUT * 3)) python3 "$HERE/paho_check.py" --port "$PORT" --ws-port "$WS_PORT" "${@:2}" "$1" 2>&1) || rc=$?
    if ((rc != 0)); then
        WHY=$(printf '%s\n' "$out" | grep -m1 '^not ok' | sed 's/^not ok - [^:]*: //')
        [[ -n $WHY ]] || WHY="paho_check.py exited with status $rc: $(printf '%s' "$out" | tail -n 3 | tr '\n' ' ')"
        return 1
    fi
}

# check_log_clean NAME: no panic in $WORK/NAME.err.
check_log_clean() {
    if grep -qiE 'panic|RUST_BACKTRACE' "$WORK/$1.err"; then
        WHY="broker log: $(grep -m1 -iE 'panic|RUST_BACKTRACE' "$WORK/$1.err")"
        return 1
    fi
}

# exited PID: the process is gone or a zombie waiting to be reaped.
exited() {
    [[ ! -e /proc/$1 ]] || grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}
# check_shutdown VAR: SIGTERM to the broker whose pid is in $VAR (TARTA_PID
# or TARTA2_PID), which must exit 0 within 5 s; clears VAR.
check_shutdown() {
    local pid=${!1}
    kill -TERM "$pid"
    if ! wait_for 5 exited "$pid"; then
        WHY="still running 5 s after SIGTERM"
        return 1
    fi
    local rc=0
    wait "$pid" || rc=$?
    printf -v "$1" '%s' ''
    if ((rc != 0)); then
        WHY="exit status $rc"
        return 1
    fi
}

# check_burst: a third broker; burst_check.py puts 17,000 connections on one
# shard and makes them all readable while the broker is stopped (more than
# the shard ring's 16,384 completion entries), three times; every PINGREQ
# must be answered (see the script for what each kernel does with such a
# burst). The script then stops the broker with SIGTERM.
check_burst() {
    local need=17000 out rc=0
    # Both processes hold one descriptor per connection (the hard limit is
    # 20,000 on the development machine and CI).
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    if (($(ulimit -n) < need + 500)); then
        WHY="ulimit -n is $(ulimit -n); this check needs $((need + 500)) descriptors per process"
        return 1
    fi
    launch_tarta burst
    TARTA3_PID=$L_PID
    out=$(timeout $((CLIENT_TIMEOUT * 3)) python3 "$HERE/burst_check.py" --port "$L_TCP" --pid "$L_PID" --n "$need" 2>&1) || rc=$?
    kill -CONT "$TARTA3_PID" 2>/dev/null || true
    printf '%s\n' "$out" | grep '^#' || true
    if ((rc != 0)); then
        WHY=$(printf '%s\n' "$out" | grep -m1 '^not ok' | sed 's/^not ok - [^:]*: //')
        [[ -n $WHY ]] || WHY="burst_check.py exited with status $rc: $(printf '%s' "$out" | tail -n 3 | tr '\n' ' ')"
        return 1
    fi
    if ! wait_for 10 exited "$TARTA3_PID"; then
        WHY="the broker still runs 10 s after SIGTERM"
        return 1
    fi
    wait "$TARTA3_PID" || rc=$?
    TARTA3_PID=
    if ((rc != 0)); then
        WHY="the broker exited with status $rc"
        return 1
    fi
    check_log_clean burst
}

# ---------------------------------------------- Node.js, Chromium and nginx

# node_ready: Node.js and tests/interop/node_modules (`npm ci`) are there.
node_ready() {
    if ! command -v node >/dev/null; then
        WHY="node is not installed (Node.js >= 20, see README.md)"
        return 1
    fi
    if [[ ! -f $HERE/node_modules/mqtt/dist/mqtt.min.js || ! -d $HERE/node_modules/playwright-core ]]; then
        WHY="$HERE/node_modules is incomplete: run 'npm ci' in tests/interop"
        return 1
    fi
}

# run_suite LABEL SECONDS COMMAND...: runs a script that prints `ok - NAME` /
# `not ok - NAME: why` lines, as it goes, as `ok - LABEL NAME`, and counts
# them. Lines `key=number` (measurements) and `# ...` pass through; anything
# else (a stack trace, say) is printed as a `# ` comment. The script exiting
# non-zero (or timing out) without a `not ok` line, or printing no `ok` line
# at all, counts as one more failure.
run_suite() {
    local label=$1 secs=$2
    shift 2
    local line rc=0 oks=0 bad=0 log=$WORK/suite-$label.log out=$WORK/suite-$label.out
    : >"$log"
    : >"$out"
    # In the background with its pid in SUITE_PID, so that the exit trap can
    # stop it (timeout(1) passes SIGTERM on; playwright then closes Chromium).
    timeout -k 5 "$secs" "$@" >"$out" 2>&1 &
    SUITE_PID=$!
    while IFS= read -r line; do
        case $line in
        "ok - "*)
            echo "ok - $label ${line#ok - }"
            PASSED=$((PASSED + 1)) oks=$((oks + 1))
            ;;
        "not ok - "*)
            echo "not ok - $label ${line#not ok - }"
            FAILED=$((FAILED + 1)) bad=$((bad + 1))
            ;;
        "#"* | [a-z]*=[0-9]*) echo "$line" ;;
        *)
            echo "# $line"
            echo "$line" >>"$log"
            ;;
        esac
    done < <(tail -s 0.2 -n +1 -f --pid="$SUITE_PID" "$out")
    wait "$SUITE_PID" || rc=$?
    SUITE_PID=
    if ((rc != 0 && bad == 0)) || ((oks + bad == 0)); then
        local why="exited with status $rc"
        ((rc == 124)) && why="timed out after ${secs}s"
        echo "not ok - $label: $why: $(tail -n 3 "$log" | tr '\n' ' ')"
        FAILED=$((FAILED + 1))
    fi
}

# node_suite LABEL SECONDS SCRIPT ARGS...: run_suite for a Node.js script,
# or one failure if Node.js or node_modules is missing.
node_suite() {
    local label=$1 secs=$2 script=$3
    shift 3
    if node_ready; then
        run_suite "$label" "$secs" node "$HERE/$script" "$@"
    else
        echo "not ok - $label: $WHY"
        FAILED=$((FAILED + 1))
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# setup_nginx: a second broker (`proxied`) whose config trusts 127.0.0.1 as
# a proxy, with --log debug, and nginx running nginx-example.conf with only
# its marked lines rewritten (free port, the broker's ws port, files in
# $WORK/nginx, daemon off). Sets TARTA2_PID, TCP2, NGINX_PORT, NGINX_PID.
setup_nginx() {
    if ! command -v nginx >/dev/null; then
        WHY="nginx is not installed (apt-get install nginx)"
        return 1
    fi
    printf '%s\n' 'ws_trusted_proxies = ["127.0.0.1"]' >"$WORK/proxied.toml"
    launch_tarta proxied --config "$WORK/proxied.toml" --log debug
    TARTA2_PID=$L_PID TCP2=$L_TCP
    local d=$WORK/nginx ws2=$L_WS
    mkdir -p "$d"
    NGINX_PORT=$(free_port)
    sed -e "1i daemon off;" \
        -e "s|^pid .*|pid $d/nginx.pid;|" \
        -e "s|^error_log .*|error_log $d/error.log info;|" \
        -e "s|^\( *\)access_log .*|\1access_log $d/access.log;|" \
        -e "s|^http {|http {\n    client_body_temp_path $d/body; proxy_temp_path $d/proxy; fastcgi_temp_path $d/fastcgi; uwsgi_temp_path $d/uwsgi; scgi_temp_path $d/scgi;|" \
        -e "s|listen 127\.0\.0\.1:8080;|listen 127.0.0.1:$NGINX_PORT;|" \
        -e "s|http://127\.0\.0\.1:8083;|http://127.0.0.1:$ws2;|" \
        "$HERE/nginx-example.conf" >"$d/nginx.conf"
    local want
    for want in "pid $d/nginx.pid;" "error_log $d/error.log info;" "access_log $d/access.log;" \
        "proxy_temp_path $d/proxy;" "listen 127.0.0.1:$NGINX_PORT;" "http://127.0.0.1:$ws2;"; do
        if ! grep -qF -- "$want" "$d/nginx.conf"; then
            WHY="rewriting nginx-example.conf did not produce '$want': keep its marked lines as run.sh expects"
            return 1
        fi
    done
    if grep -v '^[[:space:]]*#' "$d/nginx.conf" | grep -q '127\.0\.0\.1:808[03]'; then
        WHY="nginx-example.conf has an address run.sh did not rewrite: $(grep -v '^[[:space:]]*#' "$d/nginx.conf" | grep -m1 '127\.0\.0\.1:808[03]')"
        return 1
    fi
    if ! timeout 20 nginx -t -q -c "$d/nginx.conf" -p "$d/" -e "$d/error.log" >"$d/test.out" 2>&1; then
        WHY="nginx -t: $(tr '\n' ' ' <"$d/test.out")"
        return 1
    fi
    nginx -c "$d/nginx.conf" -p "$d/" -e "$d/error.log" >"$d/stdout" 2>&1 &
    NGINX_PID=$!
    if ! wait_for 10 port_open "$NGINX_PORT"; then
        WHY="nginx not listening on 127.0.0.1:$NGINX_PORT after 10 s: $(tail -n 3 "$d/error.log" "$d/stdout" 2>/dev/null | tr '\n' ' ')"
        return 1
    fi
    echo "# nginx pid $NGINX_PID ($(nginx -v 2>&1 | sed 's|.*/||')) on 127.0.0.1:$NGINX_PORT -> tarta pid $TARTA2_PID ws 127.0.0.1:$ws2 (ws_trusted_proxies = [\"127.0.0.1\"], --log debug)"
}

# SIGTERM (fast shutdown) to nginx's master: gone within 5 s.
check_nginx_stop() {
    kill -TERM "$NGINX_PID"
    if ! wait_for 5 exited "$NGINX_PID"; then
        WHY="nginx still running 5 s after SIGTERM"
        return 1
    fi
    wait "$NGINX_PID" 2>/dev/null || true
    NGINX_PID=
}

# The clients really went through nginx: its access log has the upgrades.
check_nginx_upgrades() {
    local n
    n=$(grep -c '"GET /mqtt HTTP/1.1" 101 ' "$WORK/nginx/access.log" 2>/dev/null || true)
    if ((n < 2)); then
        WHY="expected at least 2 'GET /mqtt ... 101' lines in nginx's access log, found ${n:-0}"
        return 1
    fi
}

# launch_tarta NAME [ARGS...]: starts a broker on free TCP and WebSocket
# ports (--shards 2 --no-pin --sys-interval 1, its own --data-dir, ARGS), stdout and stderr in
# $WORK/NAME.{out,err}; sets L_PID, L_TCP, L_WS. Exits if it does not start.
launch_tarta() {
    local name=$1
    shift
    "$TARTA" --tcp 127.0.0.1:0 --ws 127.0.0.1:0 --shards 2 --no-pin --sys-interval 1 \
        --data-dir "$WORK/$name.data" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    L_PID=$!
    local deadline=$((SECONDS + 15))
    L_TCP= L_WS=
    until grep -q '^tarta started with' "$WORK/$name.out" 2>/dev/null; do
        if ! alive "$L_PID" || ((SECONDS >= deadline)); then
            echo "tarta ($name) did not start:" >&2
            cat "$WORK/$name.out" "$WORK/$name.err" >&2
            exit 1
        fi
        sleep 0.1
    done
    L_TCP=$(sed -n 's|^tarta listening mqtt/tcp 127\.0\.0\.1:\([0-9][0-9]*\)$|\1|p' "$WORK/$name.out" | head -n1)
    L_WS=$(sed -n 's|^tarta listening mqtt/ws 127\.0\.0\.1:\([0-9][0-9]*\)$|\1|p' "$WORK/$name.out" | head -n1)
    if [[ -z $L_TCP || -z $L_WS ]]; then
        echo "tarta ($name): no 'tarta listening mqtt/tcp|ws 127.0.0.1:PORT' lines:" >&2
        cat "$WORK/$name.out" >&2
        exit 1
    fi
}

# ------------------------------------------------------- TLS and PROXY

# start_tarta NAME ARGS...: starts a broker with ARGS (and its own data
# directory), stdout and
# stderr in $WORK/NAME.{out,err}, and waits (15 s at most) for its `tarta
# started` line; sets L_PID. On failure it stops the broker, sets WHY and
# returns 1 (the checks that need it fail; the suite goes on).
start_tarta() {
    local name=$1
    shift
    "$TARTA" --data-dir "$WORK/$name.data" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    L_PID=$!
    local deadline=$((SECONDS + 15))
    until grep -q '^tarta started with' "$WORK/$name.out" 2>/dev/null; do
        if ! alive "$L_PID" || ((SECONDS >= deadline)); then
            WHY="tarta ($name) did not start: $(cat "$WORK/$name.out" "$WORK/$name.err" | tail -n 3 | tr '\n' ' ')"
            stop_pid "$L_PID"
            return 1
        fi
        sleep 0.1
    done
}

# listen_ports NAME KIND: the ports of broker NAME's `tarta listening KIND
# 127.0.0.1:PORT` lines (KIND: mqtt/tcp, mqtt/ws, mqtt/tls, mqtt/wss), in
# their order.
listen_ports() {
    sed -n "s|^tarta listening $2 127\.0\.0\.1:\([0-9][0-9]*\)\$|\1|p" "$WORK/$1.out"
}

# sys_total NAME [MIN]: the sum over both shards of $SYS/tarta/shard/N/NAME
# (each shard's latest value) on the broker at 127.0.0.1:$PORT, printed as
# soon as both shards have published and the sum is above MIN (default: at
# once); fails after $WAIT seconds. (mosquitto_sub ignores SIGPIPE, so it
# writes to a file that is polled, and is stopped by its pid.)
sys_total() {
    local f=$WORK/sys-total.out pid sum= deadline=$(($(now_ms) + WAIT * 1000))
    : >"$f"
    timeout "$CLIENT_TIMEOUT" mosquitto_sub -h 127.0.0.1 -p "$PORT" -i "$(pick_id sysr 0)" \
        -t "\$SYS/tarta/shard/+/$1" -F '%t %p' -W "$WAIT" >"$f" 2>/dev/null &
    pid=$!
    while :; do
        sum=$(awk -v min="${2:--1}" '{ v[$1] = $2 }
            END { n = 0; s = 0; for (t in v) { n++; s += v[t] } if (n == 2 && s > min) print s }' "$f")
        if [[ -n $sum ]] || ! alive "$pid" || (($(now_ms) >= deadline)); then
            break
        fi
        sleep 0.1
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    [[ -n $sum ]] && echo "$sum"
}

# tls_errors NAME: how many connections broker NAME closed for a TLS error
# (its --log debug `closing connection ... reason=Transport("TLS error")`).
tls_errors() {
    grep -c 'closing connection .* reason=.*TLS' "$WORK/$1.err" 2>/dev/null || true
}
tls_errors_above() { (($(tls_errors "$1") > $2)); }

TLS_DIR=
SPKI=

# make_certs: the test PKI, made with the openssl CLI in $WORK/tls (never
# committed): an ECDSA P-256 CA (ca.pem), a server certificate for localhost
# and 127.0.0.1 signed by it (server.pem, server.key), client certificates
# with CN device-7 and device-8 signed by it, a second, unrelated CA
# (other-ca.pem) and a client certificate with CN device-7 signed by that one
# (rogue.pem). Sets TLS_DIR, and SPKI: the base64 SHA-256 of the server key's
# SubjectPublicKeyInfo (Chromium's --ignore-certificate-errors-spki-list).
make_certs() {
    if ! command -v openssl >/dev/null; then
        WHY="openssl is not installed (apt-get install openssl)"
        return 1
    fi
    local d=$WORK/tls
    mkdir -p "$d"
    # new_ca NAME CN; new_cert NAME CN CA EXTENSION...
    new_ca() {
        openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout "$d/$1.key" -out "$d/$1.pem" -days 2 -subj "/CN=$2" \
            -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
    }
    new_cert() {
        printf '%s\n' "${@:4}" >"$d/$1.ext"
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout "$d/$1.key" -out "$d/$1.csr" -subj "/CN=$2" &&
            openssl x509 -req -in "$d/$1.csr" -CA "$d/$3.pem" -CAkey "$d/$3.key" \
                -set_serial "0x$(openssl rand -hex 8)" -days 2 -extfile "$d/$1.ext" -out "$d/$1.pem"
    }
    local client=(basicConstraints=CA:FALSE keyUsage=critical,digitalSignature extendedKeyUsage=clientAuth)
    if ! {
        new_ca ca "Tarta interop test CA" &&
            new_ca other-ca "Unrelated interop test CA" &&
            new_cert server localhost ca subjectAltName=DNS:localhost,IP:127.0.0.1 basicConstraints=CA:FALSE \
                keyUsage=critical,digitalSignature extendedKeyUsage=serverAuth &&
            new_cert device-7 device-7 ca "${client[@]}" &&
            new_cert device-8 device-8 ca "${client[@]}" &&
            new_cert rogue device-7 other-ca "${client[@]}" &&
            openssl verify -CAfile "$d/ca.pem" "$d/server.pem" "$d/device-7.pem" "$d/device-8.pem" &&
            openssl verify -CAfile "$d/other-ca.pem" "$d/rogue.pem"
    } >"$d/openssl.log" 2>&1; then
        WHY="making the test certificates failed: $(tail -n 3 "$d/openssl.log" | tr '\n' ' ')"
        return 1
    fi
    SPKI=$(openssl x509 -in "$d/server.pem" -pubkey -noout | openssl pkey -pubin -outform der |
        openssl dgst -sha256 -binary | base64)
    if [[ -z $SPKI ]]; then
        WHY="cannot compute the server key's SPKI hash"
        return 1
    fi
    TLS_DIR=$d
}

# setup_tls: make_certs, then a broker `tls` with --tcp, --ws, --mqtts and
# --wss (--cert/--key: server.pem) and --log debug. Sets TARTA_TLS_PID,
# TLS_TCP, TLS_WS, TLS_MQTTS, TLS_WSS.
setup_tls() {
    make_certs || return 1
    start_tarta tls --tcp 127.0.0.1:0 --ws 127.0.0.1:0 --mqtts 127.0.0.1:0 --wss 127.0.0.1:0 \
        --cert "$TLS_DIR/server.pem" --key "$TLS_DIR/server.key" \
        --shards 2 --no-pin --sys-interval 1 --log debug || return 1
    TARTA_TLS_PID=$L_PID
    TLS_TCP=$(listen_ports tls mqtt/tcp) TLS_WS=$(listen_ports tls mqtt/ws)
    TLS_MQTTS=$(listen_ports tls mqtt/tls) TLS_WSS=$(listen_ports tls mqtt/wss)
    if [[ -z $TLS_TCP || -z $TLS_WS || -z $TLS_MQTTS || -z $TLS_WSS ]]; then
        WHY="expected 'tarta listening mqtt/tcp|ws|tls|wss 127.0.0.1:PORT' lines, got: $(tr '\n' ' ' <"$WORK/tls.out")"
        return 1
    fi
    echo "# tarta pid $TARTA_TLS_PID: 127.0.0.1:$TLS_MQTTS (mqtts), 127.0.0.1:$TLS_WSS (wss), 127.0.0.1:$TLS_TCP (tcp), 127.0.0.1:$TLS_WS (ws), --log debug; $(openssl version)"
}

# mosquitto over mqtts (--cafile ca.pem), publisher on shard 0, subscriber
# on shard 1: 50 QoS 1 messages, exact.
check_mqtts_qos1() {
    local PORT=$TLS_MQTTS t=interop/mqtts/qos1 n=50
    local -a MOSQ_OPTS=(--cafile "$TLS_DIR/ca.pem")
    start_sub mqtts-qos1 -i "$(pick_id ms-sub 1)" -q 1 -t "$t" || return 1
    local s=$SUB_PID
    seq 1 "$n" | sed 's/^/mqtts-/' >"$WORK/mqtts-qos1.payloads"
    if ! pub -i "$(pick_id ms-pub 0)" -q 1 -t "$t" -l <"$WORK/mqtts-qos1.payloads"; then
        WHY="mosquitto_pub --cafile ca.pem failed"
        stop_sub "$s"
        return 1
    fi
    sed "s|^|1 0 $t |" "$WORK/mqtts-qos1.payloads" >"$WORK/mqtts-qos1.want"
    wait_for "$WAIT" count_at_least "$WORK/mqtts-qos1.out" " $t " "$n" || true
    sleep 0.3
    stop_sub "$s"
    expect_output mqtts-qos1 "$WORK/mqtts-qos1.want"
}

# mosquitto_pub with the unrelated CA's file: exits non-zero (and not by
# timing out); a subscriber gets nothing from it, only a later sentinel.
check_mqtts_wrong_ca() {
    local PORT=$TLS_MQTTS t=interop/mqtts/wrong-ca
    local -a MOSQ_OPTS=(--cafile "$TLS_DIR/ca.pem")
    start_sub mqtts-wrong-ca -i "$(pick_id mw-sub 1)" -q 1 -t "$t" || return 1
    local s=$SUB_PID out rc=0
    out=$(timeout "$CLIENT_TIMEOUT" mosquitto_pub -h 127.0.0.1 -p "$PORT" --cafile "$TLS_DIR/other-ca.pem" \
        -i "$(pick_id mw-pub 0)" -q 1 -t "$t" -m wrong-ca 2>&1) || rc=$?
    if ((rc == 0 || rc == 124)); then
        WHY="mosquitto_pub --cafile other-ca.pem: exit status $rc (expected a TLS failure): $out"
        stop_sub "$s"
        return 1
    fi
    pub -i "$(pick_id mw-pub 0)" -q 1 -t "$t" -m sentinel || {
        WHY="mosquitto_pub --cafile ca.pem (sentinel) failed"
        stop_sub "$s"
        return 1
    }
    wait_for "$WAIT" has_line "$WORK/mqtts-wrong-ca.out" "1 0 $t sentinel" || true
    sleep 0.3
    stop_sub "$s"
    printf '%s\n' "1 0 $t sentinel" >"$WORK/mqtts-wrong-ca.want"
    expect_output mqtts-wrong-ca "$WORK/mqtts-wrong-ca.want"
}

# s_client PORT ARGS...: `openssl s_client` to 127.0.0.1:PORT with stdin
# closed (it handshakes, then quits), bounded; its output in SC_OUT, its
# exit status in SC_RC.
s_client() {
    local port=$1
    shift
    SC_RC=0
    SC_OUT=$(timeout 20 openssl s_client -connect "127.0.0.1:$port" "$@" </dev/null 2>&1) || SC_RC=$?
}

# check_tls_version FLAG PROTOCOL: s_client FLAG (-tls1_2, -tls1_3)
# negotiates PROTOCOL on the mqtts port, the chain verified against ca.pem
# for the name localhost.
check_tls_version() {
    s_client "$TLS_MQTTS" "$1" -CAfile "$TLS_DIR/ca.pem" -verify_return_error -verify_hostname localhost
    if ((SC_RC != 0)) || ! grep -q "^New, $2, Cipher is " <<<"$SC_OUT" ||
        ! grep -q '^ *Verify return code: 0 (ok)' <<<"$SC_OUT"; then
        WHY="s_client $1: exit status $SC_RC: $(grep -m4 -E '^New, |Verify return code|error|alert' <<<"$SC_OUT" | tr '\n' ' ')"
        return 1
    fi
}

# check_tls_version_refused FLAG PROTOCOL: s_client FLAG (-tls1, -tls1_1),
# with SECLEVEL=0 so that Debian's OpenSSL really offers PROTOCOL: it sends
# its ClientHello, the handshake fails (no cipher), and the broker logs the
# connection closed for a TLS error.
check_tls_version_refused() {
    local before nread written
    before=$(tls_errors tls)
    s_client "$TLS_MQTTS" "$1" -cipher 'DEFAULT:@SECLEVEL=0' -CAfile "$TLS_DIR/ca.pem"
    nread=$(sed -n 's/^SSL handshake has read \([0-9]*\) bytes and written [0-9]* bytes$/\1/p' <<<"$SC_OUT")
    written=$(sed -n 's/^SSL handshake has read [0-9]* bytes and written \([0-9]*\) bytes$/\1/p' <<<"$SC_OUT")
    if ((SC_RC == 0)) || grep -q "^New, $2, " <<<"$SC_OUT" || ! grep -q '^New, (NONE), Cipher is (NONE)' <<<"$SC_OUT"; then
        WHY="s_client $1: exit status $SC_RC, expected a failed handshake: $(grep -m3 -E '^New, |Protocol|error' <<<"$SC_OUT" | tr '\n' ' ')"
        return 1
    fi
    if ((${written:-0} == 0)); then
        WHY="s_client $1 sent no ClientHello (its OpenSSL would not offer $2): $(grep -m2 error <<<"$SC_OUT" | tr '\n' ' ')"
        return 1
    fi
    if ! wait_for 5 tls_errors_above tls "$before"; then
        WHY="the broker logged no connection closed for a TLS error"
        return 1
    fi
    if ((${nread:-0} == 0)); then
        echo "# s_client $1: the broker closed the connection without a TLS alert (the client read 0 bytes)"
    fi
}

# ALPN: offered both protocols, the mqtts listener selects mqtt and the wss
# listener http/1.1.
check_alpn() {
    s_client "$TLS_MQTTS" -alpn http/1.1,mqtt -CAfile "$TLS_DIR/ca.pem"
    if ! grep -qx 'ALPN protocol: mqtt' <<<"$SC_OUT"; then
        WHY="mqtts: $(grep -m1 -E 'ALPN' <<<"$SC_OUT" || echo "no ALPN line, exit status $SC_RC")"
        return 1
    fi
    s_client "$TLS_WSS" -alpn mqtt,http/1.1 -CAfile "$TLS_DIR/ca.pem"
    if ! grep -qx 'ALPN protocol: http/1.1' <<<"$SC_OUT"; then
        WHY="wss: $(grep -m1 -E 'ALPN' <<<"$SC_OUT" || echo "no ALPN line, exit status $SC_RC")"
        return 1
    fi
}

# Plain MQTT (mosquitto_pub without TLS) on the mqtts port fails within 5 s;
# then a TLS client still publishes, and $SYS tls_failed went up.
check_plain_on_mqtts() {
    local PORT=$TLS_TCP before t0 ms out rc=0
    before=$(sys_total tls_failed) || {
        WHY="no \$SYS/tarta/shard/{0,1}/tls_failed within ${WAIT}s"
        return 1
    }
    t0=$(now_ms)
    out=$(timeout "$CLIENT_TIMEOUT" mosquitto_pub -h 127.0.0.1 -p "$TLS_MQTTS" -i "$(pick_id plain 0)" \
        -q 1 -t interop/mqtts/plain -m plain 2>&1) || rc=$?
    ms=$(($(now_ms) - t0))
    if ((rc == 0)); then
        WHY="plain mosquitto_pub on the mqtts port exited 0"
        return 1
    fi
    if ((ms > 5000)); then
        WHY="plain mosquitto_pub on the mqtts port took ${ms} ms to fail (exit status $rc: $out)"
        return 1
    fi
    if ! timeout "$CLIENT_TIMEOUT" mosquitto_pub -h 127.0.0.1 -p "$TLS_MQTTS" --cafile "$TLS_DIR/ca.pem" \
        -i "$(pick_id plain 1)" -q 1 -t interop/mqtts/plain -m tls >/dev/null 2>&1; then
        WHY="a TLS client failed afterwards"
        return 1
    fi
    if ! sys_total tls_failed "$before" >/dev/null; then
        WHY="\$SYS tls_failed stayed at $before"
        return 1
    fi
}

# check_paho_tls NAME: a paho_check.py tls-... check against the TLS broker.
check_paho_tls() {
    local PORT=$TLS_TCP WS_PORT=$TLS_WS
    check_paho "$1" --mqtts-port "$TLS_MQTTS" --wss-port "$TLS_WSS" --cafile "$TLS_DIR/ca.pem"
}

# setup_edge: a broker `edge` whose listeners come from a TOML file, in this
# order: (1) MQTT over TLS requiring a client certificate from ca.pem, its CN
# as the username; (2) PROXY protocol, trusting 127.0.0.1 (HAProxy, nginx);
# (3) PROXY protocol, trusting only 10.9.9.9; (4) plain MQTT. --acl-file:
# anonymous clients read $SYS and use interop/#, user device-7 has only
# devices/device-7/#. Sets TARTA_EDGE_PID, EDGE_TLS, EDGE_PROXY,
# EDGE_UNTRUSTED, EDGE_TCP.
setup_edge() {
    [[ -n $TLS_DIR ]] || make_certs || return 1
    cat >"$WORK/edge.toml" <<EOF
[[listener]]
bind = "127.0.0.1:0"
protocol = "mqtt"
tls = { cert = "$TLS_DIR/server.pem", key = "$TLS_DIR/server.key", client_ca = "$TLS_DIR/ca.pem", require_client_cert = true, identity_as_username = true }

[[listener]]
bind = "127.0.0.1:0"
protocol = "mqtt"
proxy_protocol = true
trusted_proxies = ["127.0.0.1/32"]

[[listener]]
bind = "127.0.0.1:0"
protocol = "mqtt"
proxy_protocol = true
trusted_proxies = ["10.9.9.9/32"]

[[listener]]
bind = "127.0.0.1:0"
protocol = "mqtt"
EOF
    printf '%s\n' 'topic read $SYS/#' 'topic readwrite interop/#' '' \
        'user device-7' 'topic readwrite devices/device-7/#' >"$WORK/edge.acl"
    start_tarta edge --config "$WORK/edge.toml" --acl-file "$WORK/edge.acl" \
        --shards 2 --no-pin --sys-interval 1 --log debug || return 1
    TARTA_EDGE_PID=$L_PID
    local tcp
    mapfile -t tcp < <(listen_ports edge mqtt/tcp)
    EDGE_TLS=$(listen_ports edge mqtt/tls)
    if [[ -z $EDGE_TLS || ${#tcp[@]} != 3 ]]; then
        WHY="expected 'tarta listening mqtt/tls' and 3 'mqtt/tcp' lines, got: $(tr '\n' ' ' <"$WORK/edge.out")"
        return 1
    fi
    EDGE_PROXY=${tcp[0]} EDGE_UNTRUSTED=${tcp[1]} EDGE_TCP=${tcp[2]}
    echo "# tarta pid $TARTA_EDGE_PID (--config edge.toml): 127.0.0.1:$EDGE_TLS (mqtts, client certificates), 127.0.0.1:$EDGE_PROXY (PROXY from 127.0.0.1), 127.0.0.1:$EDGE_UNTRUSTED (PROXY from 10.9.9.9), 127.0.0.1:$EDGE_TCP (tcp), --acl-file, --log debug"
}

# Client certificate device-7 (identity_as_username, ACL devices/device-7/#):
# its publication to devices/device-7/x reaches a subscriber with the same
# certificate (other shard).
check_cert_device7() {
    local PORT=$EDGE_TLS SYNC=devices/device-7/sync t=devices/device-7/x
    local -a MOSQ_OPTS=(--cafile "$TLS_DIR/ca.pem" --cert "$TLS_DIR/device-7.pem" --key "$TLS_DIR/device-7.key")
    start_sub cert-d7 -i "$(pick_id d7-sub 1)" -q 1 -t "$t" || return 1
    local s=$SUB_PID
    pub -i "$(pick_id d7-pub 0)" -q 1 -t "$t" -m from-device-7 || {
        WHY="mosquitto_pub --cert device-7.pem failed"
        stop_sub "$s"
        return 1
    }
    wait_for "$WAIT" has_line "$WORK/cert-d7.out" "1 0 $t from-device-7" || true
    sleep 0.3
    stop_sub "$s"
    printf '%s\n' "1 0 $t from-device-7" >"$WORK/cert-d7.want"
    expect_output cert-d7 "$WORK/cert-d7.want"
}

# check_cert_denied NAME CERT HOW: a client with certificate CERT (device-8:
# valid, but the ACL gives it nothing; rogue: CN device-7 from the unrelated
# CA, refused) publishes to devices/device-7/x; a device-7 subscriber gets
# only device-7's later sentinel. HOW: `acl` (the TLS connection works; the
# broker drops the publication, acknowledged or with a disconnect, as MQTT
# 3.1.1 allows, and logs `publish denied by ACL`) or `refused`
# (mosquitto_pub fails, the broker logs a TLS error).
check_cert_denied() {
    local PORT=$EDGE_TLS SYNC=devices/device-7/sync t=devices/device-7/x name=$1
    local -a MOSQ_OPTS=(--cafile "$TLS_DIR/ca.pem" --cert "$TLS_DIR/device-7.pem" --key "$TLS_DIR/device-7.key")
    local before denied out rc=0
    before=$(tls_errors edge)
    denied=$(acl_denials)
    start_sub "$name" -i "$(pick_id "$name-s" 1)" -q 1 -t "$t" || return 1
    local s=$SUB_PID
    out=$(timeout "$CLIENT_TIMEOUT" mosquitto_pub -h 127.0.0.1 -p "$PORT" --cafile "$TLS_DIR/ca.pem" \
        --cert "$TLS_DIR/$2.pem" --key "$TLS_DIR/$2.key" -i "$(pick_id "$name-p" 0)" -q 1 -t "$t" -m "from-$2" 2>&1) || rc=$?
    if [[ $3 == acl ]] && ((rc == 124)); then
        WHY="mosquitto_pub --cert $2.pem timed out: $out"
    elif [[ $3 == acl ]] && (($(tls_errors edge) > before)); then
        WHY="the broker closed the TLS connection of $2: $(grep 'TLS' "$WORK/edge.err" | tail -n1)"
    elif [[ $3 == acl ]] && ! wait_for 5 acl_denials_above "$denied"; then
        WHY="the broker logged no 'publish denied by ACL topic=$t'"
    elif [[ $3 == refused ]] && ((rc == 0 || rc == 124)); then
        WHY="mosquitto_pub --cert $2.pem: exit status $rc, expected a TLS failure: $out"
    elif [[ $3 == refused ]] && ! wait_for 5 tls_errors_above edge "$before"; then
        WHY="the broker logged no connection closed for a TLS error"
    fi
    if [[ -n $WHY ]]; then
        stop_sub "$s"
        return 1
    fi
    pub -i "$(pick_id "$name-p" 0)" -q 1 -t "$t" -m sentinel || {
        WHY="mosquitto_pub --cert device-7.pem (sentinel) failed"
        stop_sub "$s"
        return 1
    }
    wait_for "$WAIT" has_line "$WORK/$name.out" "1 0 $t sentinel" || true
    sleep 0.3
    stop_sub "$s"
    printf '%s\n' "1 0 $t sentinel" >"$WORK/$name.want"
    expect_output "$name" "$WORK/$name.want"
}

acl_denials() { grep -c 'publish denied by ACL topic=devices/device-7/x$' "$WORK/edge.err" || true; }
acl_denials_above() { (($(acl_denials) > $1)); }

# No client certificate: mosquitto_pub fails (not by timing out) and the
# broker logs the connection closed for a TLS error.
check_cert_none() {
    local before out rc=0
    before=$(tls_errors edge)
    out=$(timeout "$CLIENT_TIMEOUT" mosquitto_pub -h 127.0.0.1 -p "$EDGE_TLS" --cafile "$TLS_DIR/ca.pem" \
        -i "$(pick_id nocert 0)" -q 1 -t interop/nocert -m x 2>&1) || rc=$?
    if ((rc == 0 || rc == 124)); then
        WHY="mosquitto_pub without --cert: exit status $rc, expected a TLS failure: $out"
        return 1
    fi
    if ! wait_for 5 tls_errors_above edge "$before"; then
        WHY="the broker logged no connection closed for a TLS error"
        return 1
    fi
}

# raw_mqtt ARGS...: raw_mqtt.py, bounded; its one line in RAW_OUT.
raw_mqtt() {
    RAW_OUT=$(timeout "$CLIENT_TIMEOUT" python3 "$HERE/raw_mqtt.py" "$@" 2>&1)
}

# check_via_proxy NAME PORT: mosquitto_sub and mosquitto_pub through the
# proxy on 127.0.0.1:PORT (pings and all), subscriber on shard 1, publisher
# on shard 0: 20 QoS 1 messages, exact.
check_via_proxy() {
    local PORT=$2 t=interop/edge/$1 n=20
    start_sub "$1" -i "$(pick_id "$1-s" 1)" -q 1 -t "$t" || return 1
    local s=$SUB_PID
    seq 1 "$n" | sed "s/^/$1-/" >"$WORK/$1.payloads"
    if ! pub -i "$(pick_id "$1-p" 0)" -q 1 -t "$t" -l <"$WORK/$1.payloads"; then
        WHY="mosquitto_pub through the proxy failed"
        stop_sub "$s"
        return 1
    fi
    sed "s|^|1 0 $t |" "$WORK/$1.payloads" >"$WORK/$1.want"
    wait_for "$WAIT" count_at_least "$WORK/$1.out" " $t " "$n" || true
    sleep 0.3
    stop_sub "$s"
    expect_output "$1" "$WORK/$1.want"
}

# check_proxy_peer NAME PORT: raw_mqtt.py, bound to 127.0.0.2, connects
# through the proxy on 127.0.0.1:PORT, publishes at QoS 1 and disconnects;
# the broker's log names its exact address as the peer
# (`closing connection ... peer=127.0.0.2:SRCPORT client_id=ID`).
check_proxy_peer() {
    local id addr
    id=$(pick_id "$1-raw" 1)
    if ! raw_mqtt --port "$2" --bind 127.0.0.2 --id "$id" --topic "interop/edge/$1" --payload hello --expect connack; then
        WHY="raw_mqtt.py: $RAW_OUT"
        return 1
    fi
    addr=$(sed -n 's/^ok local=\(127\.0\.0\.2:[0-9]*\) .*/\1/p' <<<"$RAW_OUT")
    if [[ -z $addr ]]; then
        WHY="raw_mqtt.py did not connect from 127.0.0.2: $RAW_OUT"
        return 1
    fi
    if ! wait_for 5 grep -qF -- " peer=$addr client_id=$id reason=" "$WORK/edge.err"; then
        WHY="no 'closing connection ... peer=$addr client_id=$id' in the broker's log; it has: $(grep -m1 -F -- "client_id=$id reason=" "$WORK/edge.err" || echo nothing for $id)"
        return 1
    fi
}

# setup_haproxy: HAProxy (foreground, config in $WORK/haproxy) on a free
# port, mode tcp, in front of the edge broker's PROXY listener with
# send-proxy-v2, and an MQTT health check every 200 ms (PROXY v2 LOCAL
# header from check-send-proxy, CONNECT, expect CONNACK 0, DISCONNECT).
# Sets HAPROXY_PID, HAPROXY_PORT.
setup_haproxy() {
    local hap
    hap=$(command -v haproxy || true)
    [[ -n $hap || ! -x /usr/sbin/haproxy ]] || hap=/usr/sbin/haproxy
    if [[ -z $hap ]]; then
        WHY="haproxy is not installed (apt-get install haproxy)"
        return 1
    fi
    local d=$WORK/haproxy
    mkdir -p "$d"
    HAPROXY_PORT=$(free_port)
    cat >"$d/haproxy.cfg" <<EOF
global
    log stderr format raw local0 info
    stats socket $d/haproxy.sock mode 600 level admin

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout check 5s

frontend mqtt
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend tarta

backend tarta
    # MQTT 3.1.1 CONNECT (client id "hapcheck", keep-alive 60), CONNACK 0, DISCONNECT.
    option tcp-check
    tcp-check send-binary 101400044d5154540402003c0008686170636865636b
    tcp-check expect binary 20020000
    tcp-check send-binary e000
    server s1 127.0.0.1:$EDGE_PROXY send-proxy-v2 check check-send-proxy inter 200ms
EOF
    if ! timeout 20 "$hap" -c -q -f "$d/haproxy.cfg" >"$d/check.out" 2>&1; then
        WHY="haproxy -c: $(tr '\n' ' ' <"$d/check.out")"
        return 1
    fi
    "$hap" -db -f "$d/haproxy.cfg" >"$d/haproxy.log" 2>&1 &
    HAPROXY_PID=$!
    if ! wait_for 10 port_open "$HAPROXY_PORT"; then
        WHY="haproxy not listening on 127.0.0.1:$HAPROXY_PORT after 10 s: $(tail -n 3 "$d/haproxy.log" | tr '\n' ' ')"
        return 1
    fi
    echo "# haproxy pid $HAPROXY_PID ($("$hap" -v | head -n1 | cut -d' ' -f1-3)) on 127.0.0.1:$HAPROXY_PORT -> 127.0.0.1:$EDGE_PROXY send-proxy-v2"
}

# haproxy_server: "STATUS CHECK_STATUS CHKFAIL" of backend tarta, server s1
# (`show stat` on HAProxy's stats socket).
haproxy_server() {
    timeout 10 python3 - "$WORK/haproxy/haproxy.sock" <<'EOF'
import csv, io, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"show stat\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
for row in csv.DictReader(io.StringIO(data.decode().lstrip("# "))):
    if row["pxname"] == "tarta" and row["svname"] == "s1":
        print(row["status"], row["check_status"], row["chkfail"])
EOF
}
haproxy_checks_seen() { (($(grep -c 'client_id=hapcheck reason=ClientDisconnect' "$WORK/edge.err") >= $1)); }

# HAProxy's health checks, PROXY v2 LOCAL then MQTT: at least 5 done, the
# server UP with L7OK and no failed check, and $SYS proxy_malformed 0.
check_haproxy_health() {
    local st malformed
    if ! wait_for 10 haproxy_checks_seen 5; then
        WHY="fewer than 5 health checks (client id hapcheck) in the broker's log after 10 s"
        return 1
    fi
    st=$(haproxy_server) || true
    if [[ $st != "UP L7OK 0" ]]; then
        WHY="haproxy server s1 (status check_status chkfail): '$st', expected 'UP L7OK 0'"
        return 1
    fi
    malformed=$(PORT=$EDGE_TCP sys_total proxy_malformed) || {
        WHY="no \$SYS/tarta/shard/{0,1}/proxy_malformed within ${WAIT}s"
        return 1
    }
    if ((malformed != 0)); then
        WHY="\$SYS proxy_malformed is $malformed: $(grep -m1 'PROXY' "$WORK/edge.err")"
        return 1
    fi
}

# setup_nginx_stream: nginx with its stream module (Debian: a dynamic module,
# libnginx-mod-stream) on a free port in front of the edge broker's PROXY
# listener, `proxy_protocol on` (PROXY v1); config and files in
# $WORK/nginx-stream. Sets NGINX_STREAM_PID, NGINX_STREAM_PORT.
setup_nginx_stream() {
    local mod=/usr/lib/nginx/modules/ngx_stream_module.so d=$WORK/nginx-stream
    if ! command -v nginx >/dev/null; then
        WHY="nginx is not installed (apt-get install nginx)"
        return 1
    fi
    if [[ ! -f $mod ]]; then
        WHY="$mod not found (apt-get install libnginx-mod-stream)"
        return 1
    fi
    mkdir -p "$d"
    NGINX_STREAM_PORT=$(free_port)
    cat >"$d/nginx.conf" <<EOF
load_module $mod;
daemon off;
pid $d/nginx.pid;
error_log $d/error.log info;
events {
    worker_connections 64;
}
stream {
    log_format proxied '\$remote_addr:\$remote_port \$upstream_addr \$status';
    access_log $d/access.log proxied;
    server {
        listen 127.0.0.1:$NGINX_STREAM_PORT;
        proxy_pass 127.0.0.1:$EDGE_PROXY;
        proxy_protocol on;
    }
}
EOF
    if ! timeout 20 nginx -t -q -c "$d/nginx.conf" -p "$d/" -e "$d/error.log" >"$d/test.out" 2>&1; then
        WHY="nginx -t: $(tr '\n' ' ' <"$d/test.out")"
        return 1
    fi
    nginx -c "$d/nginx.conf" -p "$d/" -e "$d/error.log" >"$d/stdout" 2>&1 &
    NGINX_STREAM_PID=$!
    if ! wait_for 10 port_open "$NGINX_STREAM_PORT"; then
        WHY="nginx not listening on 127.0.0.1:$NGINX_STREAM_PORT after 10 s: $(tail -n 3 "$d/error.log" "$d/stdout" 2>/dev/null | tr '\n' ' ')"
        return 1
    fi
    echo "# nginx pid $NGINX_STREAM_PID (stream, proxy_protocol on) on 127.0.0.1:$NGINX_STREAM_PORT -> 127.0.0.1:$EDGE_PROXY"
}

# check_stopped VAR NAME: SIGTERM to the process whose pid is in $VAR; gone
# within 5 s; clears VAR.
check_stopped() {
    local pid=${!1}
    kill -TERM "$pid"
    if ! wait_for 5 exited "$pid"; then
        WHY="$2 still running 5 s after SIGTERM"
        return 1
    fi
    wait "$pid" 2>/dev/null || true
    printf -v "$1" '%s' ''
}

# A connection with a valid PROXY v1 header from 127.0.0.1 to the listener
# that trusts only 10.9.9.9: closed without a byte of MQTT; $SYS
# proxy_untrusted above 0.
check_proxy_untrusted() {
    if ! raw_mqtt --port "$EDGE_UNTRUSTED" --proxy v1 --id "$(pick_id untrusted 0)" --expect closed; then
        WHY="raw_mqtt.py: $RAW_OUT"
        return 1
    fi
    if ! PORT=$EDGE_TCP sys_total proxy_untrusted 0 >/dev/null; then
        WHY="\$SYS proxy_untrusted stayed 0 (or was not published) for ${WAIT}s"
        return 1
    fi
}

# From a trusted peer (127.0.0.1): a PROXY v1 line whose source is not an
# address, and a CONNECT with no PROXY header at all: each closed without a
# byte of MQTT; $SYS proxy_malformed reaches 2 (it was 0 with HAProxy's
# health checks running).
check_proxy_malformed() {
    if ! raw_mqtt --port "$EDGE_PROXY" --proxy malformed --id "$(pick_id malformed 0)" --expect closed; then
        WHY="malformed PROXY line: raw_mqtt.py: $RAW_OUT"
        return 1
    fi
    if ! raw_mqtt --port "$EDGE_PROXY" --proxy none --id "$(pick_id noheader 0)" --expect closed; then
        WHY="no PROXY header: raw_mqtt.py: $RAW_OUT"
        return 1
    fi
    if ! PORT=$EDGE_TCP sys_total proxy_malformed 1 >/dev/null; then
        WHY="\$SYS proxy_malformed did not reach 2 within ${WAIT}s"
        return 1
    fi
}

# ----------------------------------------------------------------- main

launch_tarta main
TARTA_PID=$L_PID PORT=$L_TCP WS_PORT=$L_WS
echo "# tarta pid $TARTA_PID listening on 127.0.0.1:$PORT (tcp), 127.0.0.1:$WS_PORT (ws) ($(mosquitto_pub --help 2>&1 | sed -n 2p | cut -d' ' -f1-3), paho-mqtt $(python3 -c 'import paho.mqtt; print(paho.mqtt.__version__)' 2>/dev/null || echo missing), node $(node --version 2>/dev/null || echo missing))"

run_check "client ids land on the intended shard" check_placement
run_check "mosquitto QoS 0 pub->sub across shards" check_qos 0
run_check "mosquitto QoS 1 pub->sub across shards" check_qos 1
run_check "mosquitto QoS 2 pub->sub across shards" check_qos 2
run_check "mosquitto protocol mqttv31" check_version mqttv31 mqttv31 31
run_check "mosquitto protocol mqttv311" check_version mqttv311 mqttv311 311
run_check "mosquitto protocol mqttv5" check_version mqttv5 mqttv5 5
run_check "mosquitto mixed versions mqttv31 -> mqttv5" check_version mqttv31 mqttv5 31to5
run_check "mosquitto mixed versions mqttv5 -> mqttv311" check_version mqttv5 mqttv311 5to311
run_check "mosquitto retained message set, delivered, cleared" check_retained
run_check "mosquitto will on SIGKILL, none on disconnect (mqttv311)" check_will mqttv311
run_check "mosquitto will on SIGKILL, none on disconnect (mqttv5)" check_will mqttv5
run_check "mosquitto persistent session -c (mqttv311)" check_persistent mqttv311
run_check "mosquitto persistent session -c (mqttv5)" check_persistent mqttv5
run_check "mosquitto 1 MiB payload intact" check_large
run_check "mosquitto 10000 QoS 1 messages in order" check_many

if paho_checks=$(timeout "$CLIENT_TIMEOUT" python3 "$HERE/paho_check.py" --list 2>"$WORK/paho-list.err"); then
    mapfile -t paho_names <<<"$paho_checks"
    for name in "${paho_names[@]}"; do
        # The tls-... ones run against the TLS broker, below.
        if [[ -n $name && $name != tls-* ]]; then run_check "paho $name" check_paho "$name"; fi
    done
else
    echo "not ok - paho checks: cannot list them: $(tr '\n' ' ' <"$WORK/paho-list.err")"
    FAILED=$((FAILED + 1))
fi

# Paho over WebSocket ran above (paho ws-...); now MQTT.js in Node.js and
# in Chromium against the same broker.
node_suite mqttjs $((CLIENT_TIMEOUT * 4)) ws_mqttjs.mjs --tcp "$PORT" --ws "$WS_PORT"
if [[ -x ${CHROMIUM:-/usr/bin/chromium} ]]; then
    node_suite chromium $((CLIENT_TIMEOUT * 3)) ws_chromium.mjs --tcp "$PORT" --ws "$WS_PORT"
else
    echo "not ok - chromium: ${CHROMIUM:-/usr/bin/chromium} not found (apt-get install chromium)"
    FAILED=$((FAILED + 1))
fi

# The live dashboard in Chromium: against the main broker, and against a
# broker with a password file (the page asks for credentials).
check_dashboard() {
    local pw=$WORK/dash.pw
    "$TARTA" passwd -c -b "$pw" dash 'dash pw' || {
        echo "not ok - dashboard: tarta passwd failed"
        FAILED=$((FAILED + 1))
        return
    }
    WHY=
    if ! start_tarta dashauth --tcp 127.0.0.1:0 --ws 127.0.0.1:0 --shards 2 --no-pin --sys-interval 1 \
        --password-file "$pw"; then
        echo "not ok - dashboard: $WHY"
        FAILED=$((FAILED + 1))
        return
    fi
    TARTA_DASH_PID=$L_PID
    local auth_ws
    auth_ws=$(listen_ports dashauth mqtt/ws | head -n1)
    node_suite dashboard $((CLIENT_TIMEOUT * 3)) dashboard_chromium.mjs --ws "$WS_PORT" --tcp "$PORT" \
        --auth-ws "$auth_ws" --user dash --pass 'dash pw' --shot "${DASHBOARD_SHOT:-$WORK/dashboard.png}"
    run_check "dashboard broker exits with status 0 within 5 s of SIGTERM" check_shutdown TARTA_DASH_PID
}

if [[ -x ${CHROMIUM:-/usr/bin/chromium} ]]; then
    check_dashboard
fi

run_check "broker log has no panic" check_log_clean main
run_check "broker exits with status 0 within 5 s of SIGTERM" check_shutdown TARTA_PID

# MQTT.js through nginx to a second broker that trusts nginx's X-Forwarded-For.
WHY=
if setup_nginx; then
    node_suite nginx $((CLIENT_TIMEOUT * 2)) ws_nginx.mjs --proxy "$NGINX_PORT" --tcp "$TCP2" --log "$WORK/proxied.err"
    if [[ -x ${CHROMIUM:-/usr/bin/chromium} ]]; then
        node_suite dashboard-nginx $((CLIENT_TIMEOUT * 2)) dashboard_chromium.mjs --ws "$NGINX_PORT" --tcp "$TCP2" \
            dashboard-live-connection-count-and-topic-explorer
    fi
    run_check "nginx stops on SIGTERM" check_nginx_stop
    run_check "nginx access log shows the proxied WebSocket upgrades (101)" check_nginx_upgrades
else
    echo "not ok - nginx: $WHY"
    FAILED=$((FAILED + 1))
fi
if [[ -n $TARTA2_PID ]]; then
    run_check "broker behind nginx: log has no panic" check_log_clean proxied
    run_check "broker behind nginx exits with status 0 within 5 s of SIGTERM" check_shutdown TARTA2_PID
fi

# MQTT over TLS and secure WebSocket: a broker with --mqtts/--wss, and the
# test certificates made by openssl.
WHY=
if setup_tls; then
    run_check "mosquitto mqtts --cafile: QoS 1 pub->sub across shards" check_mqtts_qos1
    run_check "mosquitto mqtts with the wrong CA file: refused, nothing delivered" check_mqtts_wrong_ca
    run_check "openssl s_client -tls1_2 negotiates TLSv1.2" check_tls_version -tls1_2 TLSv1.2
    run_check "openssl s_client -tls1_3 negotiates TLSv1.3" check_tls_version -tls1_3 TLSv1.3
    run_check "openssl s_client -tls1 (TLS 1.0) refused by the broker" check_tls_version_refused -tls1 TLSv1
    run_check "openssl s_client -tls1_1 (TLS 1.1) refused by the broker" check_tls_version_refused -tls1_1 TLSv1.1
    run_check "openssl s_client ALPN: mqtts selects mqtt, wss selects http/1.1" check_alpn
    run_check "plain MQTT on the mqtts port fails fast; TLS still works; tls_failed counted" check_plain_on_mqtts
    for name in "${paho_names[@]}"; do
        if [[ $name == tls-* ]]; then run_check "paho $name" check_paho_tls "$name"; fi
    done
    node_suite mqttjs-tls $((CLIENT_TIMEOUT * 2)) tls_mqttjs.mjs --mqtts "$TLS_MQTTS" --wss "$TLS_WSS" --cafile "$TLS_DIR/ca.pem"
    if [[ -x ${CHROMIUM:-/usr/bin/chromium} ]]; then
        node_suite chromium-tls $((CLIENT_TIMEOUT * 2)) wss_chromium.mjs --mqtts "$TLS_MQTTS" --wss "$TLS_WSS" \
            --cafile "$TLS_DIR/ca.pem" --spki "$SPKI"
    else
        echo "not ok - chromium-tls: ${CHROMIUM:-/usr/bin/chromium} not found (apt-get install chromium)"
        FAILED=$((FAILED + 1))
    fi
else
    echo "not ok - tls: $WHY"
    FAILED=$((FAILED + 1))
fi
if [[ -n $TARTA_TLS_PID ]]; then
    run_check "TLS broker: log has no panic" check_log_clean tls
    run_check "TLS broker exits with status 0 within 5 s of SIGTERM" check_shutdown TARTA_TLS_PID
fi

# Client certificates and the PROXY protocol: a broker whose listeners come
# from a TOML file, with HAProxy and nginx (stream) in front.
WHY=
if setup_edge; then
    run_check "client certificate device-7: publishes to devices/device-7/x, its subscriber gets it (CN as username, ACL)" \
        check_cert_device7
    run_check "client certificate device-8 (same CA): the ACL drops its publication to devices/device-7/x" \
        check_cert_denied cert-d8 device-8 acl
    run_check "client certificate CN=device-7 from an unrelated CA: refused, nothing delivered" \
        check_cert_denied cert-rogue rogue refused
    run_check "no client certificate: refused" check_cert_none
    WHY=
    if setup_haproxy; then
        run_check "haproxy send-proxy-v2: mosquitto_sub/pub through it, QoS 1 across shards" check_via_proxy haproxy "$HAPROXY_PORT"
        run_check "haproxy send-proxy-v2: the broker logs the client's own address (127.0.0.2)" check_proxy_peer haproxy "$HAPROXY_PORT"
        run_check "haproxy MQTT health checks with PROXY v2 LOCAL: server UP, L7OK, proxy_malformed 0" check_haproxy_health
    else
        echo "not ok - haproxy: $WHY"
        FAILED=$((FAILED + 1))
    fi
    WHY=
    if setup_nginx_stream; then
        run_check "nginx stream proxy_protocol (v1): mosquitto_sub/pub through it, QoS 1 across shards" check_via_proxy nginx-stream "$NGINX_STREAM_PORT"
        run_check "nginx stream proxy_protocol (v1): the broker logs the client's own address (127.0.0.2)" check_proxy_peer nginx-stream "$NGINX_STREAM_PORT"
        run_check "nginx (stream) stops on SIGTERM" check_stopped NGINX_STREAM_PID nginx
    else
        echo "not ok - nginx stream: $WHY"
        FAILED=$((FAILED + 1))
    fi
    run_check "untrusted PROXY sender: closed without an MQTT answer, proxy_untrusted counted" check_proxy_untrusted
    run_check "malformed or missing PROXY header from a trusted peer: closed, proxy_malformed counted" check_proxy_malformed
    if [[ -n $HAPROXY_PID ]]; then
        run_check "haproxy stops on SIGTERM" check_stopped HAPROXY_PID haproxy
    fi
else
    echo "not ok - edge: $WHY"
    FAILED=$((FAILED + 1))
fi
if [[ -n $TARTA_EDGE_PID ]]; then
    run_check "edge broker (listener tables): log has no panic" check_log_clean edge
    run_check "edge broker exits with status 0 within 5 s of SIGTERM" check_shutdown TARTA_EDGE_PID
fi

# Password files: Mosquitto's for Tarta, Tarta's for Mosquitto.
run_check "mosquitto_passwd file (\$7\$ and \$6\$) as --password-file: logins, wrong and missing passwords refused" \
    check_mosquitto_passwd_file
run_check "tarta passwd file read by the Mosquitto broker" check_tarta_passwd_for_mosquitto
if [[ -n ${TARTA_PW_PID:-} ]]; then
    run_check "password broker exits with status 0 within 5 s of SIGTERM" check_shutdown TARTA_PW_PID
fi
stop_pid "${MOSQ_PW_PID:-}"

# Last: it leaves 17,000 server-side TIME_WAIT sockets behind.
run_check "burst of readiness above the completion queue: every PINGREQ answered" check_burst

echo "$PASSED passed, $FAILED failed"
if ((FAILED > 0)); then
    if [[ -s $WORK/main.err ]]; then
        echo "# last lines of the broker log:" >&2
        tail -n 20 "$WORK/main.err" >&2 || true
    fi
    exit 1
fi
