#!/usr/bin/env bash
# The benchmark's entry command: builds the release artifacts, installs wrk if it is missing,
# and runs the full benchmark (a few minutes). Extra arguments go to angel-bench, e.g.
#   bench/run.sh --workers 4
# Results: bench/results/results.md, summary.txt, rolls.svg (see BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p angel-host -p hello -p angel-bench

if ! command -v wrk >/dev/null 2>&1; then
    echo "wrk not found: installing it with apt-get" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update && $SUDO apt-get install -y wrk ||
        echo "could not install wrk: the A/B falls back to the built-in client" >&2
fi

exec target/release/angel-bench --full --out bench/results "$@"
