#!/usr/bin/env bash
# CPU per request with the server pinned to one core and wrk to the other: the regime where a
# worker's per-request cost shows best on this noisy 2-core machine (one process each, the
# server's core saturated, so batching is the same for all). Five servers, all up at once and
# measured in alternating rounds (`perf stat -e task-clock` of the serving process during
# `wrk -t1 -c64 -d3s`):
#
#   angel           angel-host --workers 1 on examples/hello
#   angel-noheader  the same with ANGEL_HEADER_READ_TIMEOUT=0
#   minimal         plain-hyper --http1 (hyper's http1 connection, nothing around it)
#   minimal+thread  the same with one idle extra thread (what being multi-threaded costs)
#   minimal+timer   the same with one idle 1 s tokio timer pending (what a pending timer costs:
#                   every blocking epoll_wait then has a timeout; see sdk/src/ticker.rs)
#
# Prints each server's median µs/request and the median of its per-round ratios to minimal.
#
#   bench/scripts/cpu-pinned.sh [ROUNDS]     # default 15
#
# Needs wrk, perf and `cargo build --release -p angel-host -p hello -p angel-bench`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
REL=$ROOT/target/release
ROUNDS=${1:-15}
for tool in wrk perf taskset; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
WORK=$(mktemp -d /tmp/angel-cpu-pinned.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start NAME PORT COMMAND...: runs a server in the background, waits until it answers.
start() {
    local name=$1 port=$2
    shift 2
    "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$port/" >/dev/null 2>&1 && return
        sleep 0.1
    done
    cat "$WORK/$name.log" >&2
    exit 1
}

# The serving process of a server started by `start`: its child that is not angel's zygote.
server_of() {
    local child
    for child in $(pgrep -P "$1"); do
        tr '\0' ' ' <"/proc/$child/cmdline" | grep -q "angel-host: zygote" || { echo "$child"; return; }
    done
}

declare -A PORT SERVING
names=(angel angel-noheader minimal minimal+thread minimal+timer)
for name in "${names[@]}"; do PORT[$name]=$(free_port); done
start angel "${PORT[angel]}" "$REL/angel-host" --lib "$REL/libhello.so" --host 127.0.0.1 \
    --port "${PORT[angel]}" --workers 1 --pidfile "$WORK/angel.pid"
SERVING[angel]=$(server_of "${PIDS[-1]}")
ANGEL_HEADER_READ_TIMEOUT=0 start angel-noheader "${PORT[angel-noheader]}" "$REL/angel-host" \
    --lib "$REL/libhello.so" --host 127.0.0.1 --port "${PORT[angel-noheader]}" --workers 1 \
    --pidfile "$WORK/noheader.pid"
SERVING[angel-noheader]=$(server_of "${PIDS[-1]}")
start minimal "${PORT[minimal]}" "$REL/plain-hyper" --addr "127.0.0.1:${PORT[minimal]}" \
    --processes 1 --http1
SERVING[minimal]=$(server_of "${PIDS[-1]}")
start minimal+thread "${PORT[minimal+thread]}" "$REL/plain-hyper" \
    --addr "127.0.0.1:${PORT[minimal+thread]}" --processes 1 --http1 --idle-thread
SERVING[minimal+thread]=$(server_of "${PIDS[-1]}")
start minimal+timer "${PORT[minimal+timer]}" "$REL/plain-hyper" \
    --addr "127.0.0.1:${PORT[minimal+timer]}" --processes 1 --http1 --idle-timer
SERVING[minimal+timer]=$(server_of "${PIDS[-1]}")
for name in "${names[@]}"; do
    taskset -a -p -c 0 "${SERVING[$name]}" >/dev/null
    echo "$name: pid ${SERVING[$name]}, $(ls "/proc/${SERVING[$name]}/task" | wc -l) thread(s)"
done

for round in $(seq "$ROUNDS"); do
    for name in "${names[@]}"; do
        perf stat -x, -e task-clock -p "${SERVING[$name]}" -- \
            taskset -c 1 wrk -t1 -c64 -d3s "http://127.0.0.1:${PORT[$name]}/" \
            2>"$WORK/stat" >"$WORK/wrk"
        n=$(awk '/requests in/ {print $1}' "$WORK/wrk")
        ms=$(cut -d, -f1 "$WORK/stat" | head -1)
        echo "$round $name $n $ms"
    done
done | tee "$WORK/rounds" | awk '{printf "."} END {print ""}'

python3 - "$WORK/rounds" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    rnd, name, n, ms = line.split()
    rows.setdefault(name, {})[rnd] = float(ms) * 1000 / int(n)
base = rows["minimal"]
for name, by_round in rows.items():
    us = list(by_round.values())
    ratio = statistics.median(by_round[r] / base[r] for r in by_round)
    print(f"{name:15s} {statistics.median(us):6.2f} µs/request median ({min(us):.1f}-{max(us):.1f}), "
          f"per-round ratio to minimal median {ratio:.3f}")
EOF
