#!/usr/bin/env bash
# Cross-check of loadgen's counts against an independent counter:
# Mosquitto (Debian package) is started on a free port, mosquitto_sub
# subscribes to the run's topics and counts what it receives, and loadgen's
# `sent` / `received` totals (from --json) must match that count.
#
#   bash loadgen/tests/interop/run.sh [path/to/loadgen]
#
# Prints `ok - NAME` / `not ok - NAME: why` per check and exits 1 if any
# failed. Every wait is bounded; the script cleans up what it started.
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOADGEN=${1:-$HERE/../../../target/release/loadgen}
MOSQUITTO=${MOSQUITTO:-/usr/sbin/mosquitto}
[[ -x $MOSQUITTO ]] || MOSQUITTO=$(command -v mosquitto || true)
for tool in "$LOADGEN" "$MOSQUITTO" mosquitto_sub timeout; do
    if ! command -v "$tool" >/dev/null 2>&1 && [[ ! -x $tool ]]; then
        echo "missing required tool: $tool (apt-get install mosquitto mosquitto-clients)" >&2
        exit 1
    fi
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/loadgen-interop.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# Below the kernel's ephemeral range (32768-60999 by default), where other
# tests' brokers (port 0) and client sockets take their ports.
free_port() {
    local p
    for _ in $(seq 100); do
        p=$((20000 + RANDOM % 12000))
        if ! (echo >/dev/tcp/127.0.0.1/$p) 2>/dev/null; then
            echo $p
            return
        fi
    done
    echo "no free port" >&2
    exit 1
}

# Another process may take the port between the check and the bind: retry
# until Mosquitto is up and listening.
UP=0
for _ in $(seq 5); do
    PORT=$(free_port)
    printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$PORT" >"$WORK/mosquitto.conf"
    "$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
    MPID=$!
    PIDS+=($MPID)
    for _ in $(seq 50); do
        kill -0 "$MPID" 2>/dev/null || break
        if (echo >/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then UP=1; break; fi
        sleep 0.1
    done
    [ "$UP" = 1 ] && break
    kill "$MPID" 2>/dev/null
done
if [ "$UP" != 1 ]; then
    echo "mosquitto did not start:" >&2
    cat "$WORK/mosquitto.log" >&2
    exit 1
fi

FAILED=0
json_num() { grep -m1 -o "\"$2\": [0-9]*" "$1" | grep -o '[0-9]*$'; }

# check NAME QOS SUBS_PER_MSG LOADGEN_ARGS...: mosquitto_sub (QoS QOS) on the
# run's prefix counts every publish once; loadgen counts `sent`, and
# `received` = sent x SUBS_PER_MSG.
check() {
    local name=$1 qos=$2 per=$3
    shift 3
    local prefix="interop/$name/$$"
    local count="$WORK/$name.count"
    mosquitto_sub -p "$PORT" -q "$qos" -t "$prefix/#" -F '%t' >"$count" 2>"$WORK/$name.sub.err" &
    local sub=$!
    PIDS+=($sub)
    sleep 1
    local rc=0
    timeout 120 "$LOADGEN" "$@" --port "$PORT" --qos "$qos" --topic-prefix "interop/$name/$$" \
        --duration 2 --warmup 0.5 --quiet --json "$WORK/$name.json" >"$WORK/$name.out" 2>&1 || rc=$?
    # Let the independent subscriber finish counting (bounded).
    local last=-1 now
    for _ in $(seq 50); do
        now=$(wc -l <"$count")
        [[ $now == "$last" ]] && break
        last=$now
        sleep 0.2
    done
    kill "$sub" 2>/dev/null || true
    local sent received lost independent
    sent=$(json_num "$WORK/$name.json" sent || echo -1)
    received=$(json_num "$WORK/$name.json" received || echo -1)
    lost=$(json_num "$WORK/$name.json" lost || echo -1)
    independent=$(wc -l <"$count")
    local why=
    [[ $rc == 0 ]] || why="loadgen exit $rc"
    [[ $sent -gt 0 ]] || why="${why:+$why; }nothing sent"
    [[ $independent == "$sent" ]] || why="${why:+$why; }mosquitto_sub counted $independent, loadgen sent $sent"
    [[ $received == $((sent * per)) ]] || why="${why:+$why; }loadgen received $received, expected $((sent * per))"
    [[ $lost == 0 ]] || why="${why:+$why; }loadgen lost $lost"
    if [[ -z $why ]]; then
        echo "ok - $name (sent $sent, loadgen received $received, mosquitto_sub counted $independent)"
    else
        echo "not ok - $name: $why"
        sed 's/^/#   /' "$WORK/$name.out"
        FAILED=$((FAILED + 1))
    fi
}

check pairs-qos1 1 1 pairs -n 4 --rate 200
check pairs-qos2-v5 2 1 pairs -n 3 --rate 200 --protocol 5
check fanout-qos0 0 3 fanout -p 1 -s 3 --rate 200

if [[ $FAILED -gt 0 ]]; then
    echo "$FAILED check(s) failed"
    exit 1
fi
echo "all checks passed"
