#!/usr/bin/env bash
# HUP -> all new workers ready (the master's `reloaded ... in X ms`), idle and with both cores
# saturated by wrk, for a roll onto the same build (a HUP to restart the workers) and onto a
# new build (a copy of the library with 64 random bytes appended, renamed into place before
# each HUP). Prints p50 / p90 / max per case.
#
#   bench/scripts/roll-latency.sh [ROLLS]      # default 20 rolls per case
#   ANGEL_ARGS=--no-zygote bench/scripts/roll-latency.sh   # extra flags for angel-host
#   ANGEL_BIN=/tmp/angel-host-base bench/scripts/roll-latency.sh   # another build of it
#   CASES="new-saturated" bench/scripts/roll-latency.sh 40   # only these cases
#
# Needs wrk and `cargo build --release -p angel-host -p hello`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
REL=$ROOT/target/release
BIN=${ANGEL_BIN:-$REL/angel-host}
ROLLS=${1:-20}
command -v wrk >/dev/null || { echo "needs wrk (apt-get install -y wrk)" >&2; exit 1; }
[ -x "$BIN" ] && [ -f "$REL/libhello.so" ] ||
    { echo "build first: cargo build --release -p angel-host -p hello" >&2; exit 1; }

WORK=$(mktemp -d /tmp/angel-roll-latency.XXXXXX)
MASTER=
cleanup() {
    [ -n "$MASTER" ] && kill "$MASTER" 2>/dev/null && wait "$MASTER" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

LIB=$WORK/libhello.so
cp "$REL/libhello.so" "$LIB"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN" --lib "$LIB" --host 127.0.0.1 --port "$PORT" --workers 2 \
    --pidfile "$WORK/pid" ${ANGEL_ARGS:-} >"$WORK/log" 2>&1 &
MASTER=$!
for _ in $(seq 100); do grep -q "serving" "$WORK/log" && break; sleep 0.1; done
grep -q "serving" "$WORK/log" || { cat "$WORK/log" >&2; exit 1; }

new_build() {
    cp "$REL/libhello.so" "$WORK/next.so"
    head -c 64 /dev/urandom >>"$WORK/next.so"
    mv "$WORK/next.so" "$LIB"
}

# case NAME BUILD(same|new) LOAD(idle|saturated)
run_case() {
    local name=$1 build=$2 load=$3 before wrk_pid=
    # A library copied less than a second ago is never shared (see host/src/snapshot.rs): let
    # the same-build case start from a settled file.
    [ "$build" = same ] && sleep 1.2
    before=$(grep -c "reloaded" "$WORK/log" || true)
    if [ "$load" = saturated ]; then
        wrk -t1 -c64 -d$((ROLLS * 7 / 10 + 3))s "http://127.0.0.1:$PORT/" >"$WORK/wrk.out" &
        wrk_pid=$!
        sleep 1
    fi
    for _ in $(seq "$ROLLS"); do
        [ "$build" = new ] && new_build
        kill -HUP "$MASTER"
        sleep 0.6
    done
    [ -n "$wrk_pid" ] && wait "$wrk_pid"
    sleep 0.5
    grep "reloaded" "$WORK/log" | tail -n +$((before + 1)) | grep -o "in [0-9.]* ms" |
        awk '{print $2}' | python3 -c "
import statistics, sys
v = sorted(float(x) for x in sys.stdin)
print(f'$name: {len(v)} rolls, p50 {statistics.median(v):.1f} ms, '
      f'p90 {v[max(0, int(len(v) * 0.9) - 1)]:.1f} ms, max {v[-1]:.1f} ms')"
    if [ -n "$wrk_pid" ]; then
        grep -E "Requests/sec|Socket errors|Non-2xx" "$WORK/wrk.out" | sed 's/^/    wrk: /'
    fi
}

CASES=${CASES:-same-idle same-saturated new-idle new-saturated}
for c in $CASES; do
    build=${c%-*} load=${c#*-}
    case "$build-$load" in
    same-idle | same-saturated | new-idle | new-saturated) ;;
    *) echo "unknown case $c (want same|new-idle|saturated)" >&2; exit 2 ;;
    esac
    run_case "$(printf '%-21s' "$build build, $load")" "$build" "$load"
done
