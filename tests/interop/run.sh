#!/usr/bin/env bash
# Interop checks: Tarta against real third-party MQTT clients (Debian's
# mosquitto-clients 2.0.x, paho-mqtt 2.x for Python, MQTT.js 5 in Node.js and
# in headless Chromium, and MQTT.js through an nginx reverse proxy).
#
#   bash tests/interop/run.sh [path/to/tarta]
#
# Starts its own broker on free ports (--tcp and --ws, --shards 2 --no-pin
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
    stop_pid "$TARTA2_PID"
    stop_pid "$TARTA3_PID"
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
    timeout "$CLIENT_TIMEOUT" mosquitto_pub -h 127.0.0.1 -p "$PORT" "$@"
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

# start_sub NAME ARGS...: starts mosquitto_sub in the background with output
# format "$FMT" (default '%q %r %t %p': qos, retain flag, topic, payload) into
# $WORK/NAME.out, subscribed to ARGS' topics plus interop/sync/NAME, and waits
# until it is live: it publishes pings to interop/sync/NAME until one comes
# back, so every subscription in the same SUBSCRIBE is active. Sets SUB_PID
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
        mosquitto_sub -h 127.0.0.1 -p "$PORT" -F "${FMT:-%q %r %t %p}" "$@" \
        -t "interop/sync/$name" >"$out" 2>"$out.err" &
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
    until grep -q " interop/sync/$name " "$out" 2>/dev/null; do
        if ! alive "$SUB_PID"; then
            WHY="$name: mosquitto_sub exited early: $(tr '\n' ' ' <"$out.err")"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            WHY="$name: subscriber not live after ${WAIT}s: $(tr '\n' ' ' <"$out.err")"
            return 1
        fi
        pub -t "interop/sync/$name" -m ping -q 0 >/dev/null 2>&1 || true
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
    grep -v -- ' interop/sync/' "$WORK/$1.out" || true
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

# The Python paho-mqtt checks, one result line each.
check_paho() {
    local out rc=0
    out=$(timeout $((CLIENT_TIMEOUT * 3)) python3 "$HERE/paho_check.py" --port "$PORT" --ws-port "$WS_PORT" "$1" 2>&1) || rc=$?
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
# ports (--shards 2 --no-pin --sys-interval 1 ARGS), stdout and stderr in
# $WORK/NAME.{out,err}; sets L_PID, L_TCP, L_WS. Exits if it does not start.
launch_tarta() {
    local name=$1
    shift
    "$TARTA" --tcp 127.0.0.1:0 --ws 127.0.0.1:0 --shards 2 --no-pin --sys-interval 1 "$@" \
        >"$WORK/$name.out" 2>"$WORK/$name.err" &
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
        if [[ -n $name ]]; then run_check "paho $name" check_paho "$name"; fi
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

run_check "broker log has no panic" check_log_clean main
run_check "broker exits with status 0 within 5 s of SIGTERM" check_shutdown TARTA_PID

# MQTT.js through nginx to a second broker that trusts nginx's X-Forwarded-For.
WHY=
if setup_nginx; then
    node_suite nginx $((CLIENT_TIMEOUT * 2)) ws_nginx.mjs --proxy "$NGINX_PORT" --tcp "$TCP2" --log "$WORK/proxied.err"
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
