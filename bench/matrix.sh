#!/usr/bin/env bash
# The loss matrix of BENCHMARKS.md: traffic shapes x operator events on the release build,
# every request counted. Extra arguments go to loss-matrix (--rolls, --recycles,
# --max-requests, --stream-max-requests, --resizes, --connections, --h2-connections,
# --h2-streams, --only NAME).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p angel-host -p hello -p echo -p ticker -p axum-example -p angel-bench
mkdir -p bench/results
target/release/loss-matrix "$@" | tee bench/results/matrix.md
