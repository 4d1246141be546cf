#!/usr/bin/env bash
# What one Prometheus scrape costs the broker: N idle connections held by
# loadgen, then SCRAPES sequential GET /metrics; the broker's CPU (from
# /proc) during the scrapes minus its CPU over an equally long idle window.
#
#   bash bench/scripts/scrape_cost.sh [CONNS] [SCRAPES]
set -euo pipefail
CONNS=${1:-10000}
SCRAPES=${2:-200}
cd "$(dirname "$0")/../.."
T=target/release/tarta
L=target/release/loadgen
W=$(mktemp -d)
trap 'kill $BROKER $LG 2>/dev/null || true; rm -rf "$W"' EXIT
"$T" --tcp 127.0.0.1:0 --ws 127.0.0.1:0 --http 127.0.0.1:0 --shards 2 --no-pin --no-persistence >"$W/out" 2>"$W/err" &
BROKER=$!
until grep -q '^tarta started' "$W/out" 2>/dev/null; do sleep 0.1; done
TCP=$(sed -n 's|^tarta listening mqtt/tcp 127.0.0.1:||p' "$W/out")
HTTP=$(sed -n 's|^tarta listening http 127.0.0.1:||p' "$W/out")
"$L" conn -n "$CONNS" --procs 2 --connect-rate 5000 --duration 600 --port "$TCP" >"$W/lg" 2>&1 &
LG=$!
cpu() { awk '{print $14 + $15}' "/proc/$BROKER/stat"; }
conns() { curl -s "http://127.0.0.1:$HTTP/metrics" | awk '/^tarta_listener_connections\{.*transport="tcp"/ {print $2}'; }
until [[ $(conns) == "$CONNS" ]]; do sleep 0.5; done
sleep 2
TICK=$(getconf CLK_TCK)
c0=$(cpu); t0=$(date +%s.%N)
sleep 10
c1=$(cpu); t1=$(date +%s.%N)
idle_per_s=$(echo "($c1 - $c0) / ($t1 - $t0)" | bc -l)
c2=$(cpu); t2=$(date +%s.%N)
for _ in $(seq "$SCRAPES"); do curl -s -o /dev/null "http://127.0.0.1:$HTTP/metrics"; done
c3=$(cpu); t3=$(date +%s.%N)
size=$(curl -s "http://127.0.0.1:$HTTP/metrics" | wc -c)
spent=$(echo "($c3 - $c2) - $idle_per_s * ($t3 - $t2)" | bc -l)
printf 'connections=%s scrapes=%s wall=%.2fs size=%sB idle_cpu=%.4fs/s\n' "$CONNS" "$SCRAPES" "$(echo "$t3 - $t2" | bc -l)" "$size" "$(echo "$idle_per_s / $TICK" | bc -l)"
printf 'broker CPU per scrape: %.3f ms\n' "$(echo "$spent / $TICK / $SCRAPES * 1000" | bc -l)"
