#!/usr/bin/env bash
# User-space instructions per request, counted by callgrind: deterministic where CPU time on
# this noisy 2-core machine is not. One worker / one process each, `h2load --h1 -n N -c CONNS`
# keep-alive GET / after a warm-up, counters zeroed before and dumped after the counted load.
# CONNS=1 (the default) makes every request a whole wake-up of the worker, and the count
# repeatable (the references to the instruction); with more connections, how many requests
# one wake-up serves depends on timing, and counts vary by a few percent between runs.
#
#   [CONNS=1] bench/scripts/instructions-per-request.sh [N] [NAME=LIB ...]
#
# Servers: `plain-hyper --http1` (the minimal reference), then angel-host with each LIB
# (default: hello=target/release/libhello.so minimal-app=target/release/libminimal_app.so).
# Needs valgrind and h2load (apt-get install valgrind nghttp2-client) and
# `cargo build --release -p angel-host -p hello -p minimal-app -p angel-bench`.
#
# Under valgrind /proc/self/exe names valgrind's tool, not the master, and a library mapped
# from a memfd has no symbols; so the master measured is a copy of HEAD's built with two
# changes, in target/callgrind: workers exec $CG_EXE, and $CG_NOMEMFD puts snapshots in the
# directory fallback. The workers' code (the SDK and the app) is the one under test.
# Per-function counts: bench/scripts/callgrind-diff.py on the dumps this prints.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
n=${1:-20000}
conns=${CONNS:-1}
shift || true
libs=("$@")
[ ${#libs[@]} -gt 0 ] || libs=(hello="$root/target/release/libhello.so" minimal-app="$root/target/release/libminimal_app.so")
out=$(mktemp -d /tmp/angel-callgrind.XXXXXX)

host=$root/target/callgrind/release/angel-host
if [ ! -x "$host" ] || [ "$host" -ot "$root/target/release/angel-host" ]; then
    src=$out/src
    git -C "$root" worktree add --detach "$src" HEAD >/dev/null
    trap 'git -C "$root" worktree remove --force "$src" >/dev/null 2>&1 || true' EXIT
    sed -i 's|exe: std::path::PathBuf::from("/proc/self/exe"),|exe: std::env::var_os("CG_EXE").map(std::path::PathBuf::from).unwrap_or_else(\|\| std::path::PathBuf::from("/proc/self/exe")),|' "$src/host/src/master/mod.rs"
    sed -i 's|^    new_memfd(0).is_ok()$|    std::env::var_os("CG_NOMEMFD").is_none() \&\& new_memfd(0).is_ok()|' "$src/host/src/snapshot/memfd.rs"
    grep -q CG_EXE "$src/host/src/master/mod.rs" && grep -q CG_NOMEMFD "$src/host/src/snapshot/memfd.rs" \
        || { echo "instructions-per-request: the host's source moved; update the two patches" >&2; exit 2; }
    (cd "$src" && CARGO_TARGET_DIR=$root/target/callgrind cargo build --release -p angel-host -q)
fi

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# measure NAME CMD... (PORT in CMD is replaced): prints NAME and the busiest process's Ir/request.
measure() {
    local name=$1; shift
    local dir=$out/$name port
    mkdir -p "$dir"
    port=$(free_port)
    local cmd=("${@//PORT/$port}")
    CG_EXE=$host CG_NOMEMFD=1 valgrind --tool=callgrind --trace-children=yes \
        --callgrind-out-file="$dir/%p.out" "${cmd[@]}" >"$dir/log" 2>&1 &
    local vg=$!
    for _ in $(seq 600); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
    h2load --h1 -n 3000 -c 16 "http://127.0.0.1:$port/" >/dev/null
    callgrind_control -z >/dev/null 2>&1
    local done
    done=$(h2load --h1 -n "$n" -c "$conns" "http://127.0.0.1:$port/" | awk '/^requests:/ {print $8}')
    callgrind_control -d >/dev/null 2>&1
    kill -TERM $vg 2>/dev/null || true
    for _ in $(seq 100); do kill -0 $vg 2>/dev/null || break; sleep 0.1; done
    kill -KILL $vg 2>/dev/null || true
    pkill -KILL -f "callgrind-out-file=$dir/" 2>/dev/null || true
    [ "$done" = "$n" ] || { echo "$name: only $done of $n requests succeeded; see $dir/log" >&2; exit 1; }
    local best=0 file=
    for f in "$dir"/*.out.*; do
        local ir
        ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$f")
        if [ "${ir:-0}" -gt "$best" ]; then best=$ir; file=$f; fi
    done
    printf '%-14s %7d Ir/request  (%s)\n' "$name" $((best / n)) "$file"
}

echo "callgrind, h2load --h1 -n $n -c $conns, one worker/process each:"
measure minimal-http1 "$root/target/release/plain-hyper" --addr 127.0.0.1:PORT --processes 1 --http1
for spec in "${libs[@]}"; do
    measure "${spec%%=*}" "$host" --lib "${spec#*=}" --host 127.0.0.1 --port PORT --workers 1 \
        --no-zygote --pidfile "$out/${spec%%=*}.pid"
done
