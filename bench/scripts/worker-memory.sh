#!/usr/bin/env bash
# Worker memory: USS (Private_Clean + Private_Dirty), PSS and RSS of every child of angel-host
# (zygote, workers; then again with --no-zygote) and of plain-hyper --http1, 2 processes each,
# after 3 s of `wrk -t1 -c64`, from /proc/PID/smaps_rollup.
#
#   bench/scripts/worker-memory.sh
#
# Needs wrk and `cargo build --release -p angel-host -p hello -p angel-bench`.
REL=$(cd "$(dirname "$0")/../.." && pwd)/target/release
uss() { awk '/Private_(Clean|Dirty)/{s+=$2} END{print s}' /proc/$1/smaps_rollup; }
pss() { awk '/^Pss:/{print $2}' /proc/$1/smaps_rollup; }
rss() { awk '/^Rss:/{print $2}' /proc/$1/smaps_rollup; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for variant in zygote no-zygote plain; do
  P=$(port)
  case $variant in
    zygote) $REL/angel-host --lib $REL/libhello.so --host 127.0.0.1 --port $P --workers 2 --pidfile /tmp/uss-$P.pid >/dev/null 2>&1 & ;;
    no-zygote) $REL/angel-host --lib $REL/libhello.so --host 127.0.0.1 --port $P --workers 2 --pidfile /tmp/uss-$P.pid --no-zygote >/dev/null 2>&1 & ;;
    plain) $REL/plain-hyper --addr 127.0.0.1:$P --processes 2 --http1 >/dev/null 2>&1 & ;;
  esac
  M=$!
  for i in $(seq 50); do curl -sf http://127.0.0.1:$P/ >/dev/null && break; sleep 0.1; done
  sleep 0.5
  wrk -t1 -c64 -d3s http://127.0.0.1:$P/ >/dev/null
  echo "$variant: parent $M USS $(uss $M) kB"
  for c in $(pgrep -P $M); do
    echo "  $(tr '\0' ' ' < /proc/$c/cmdline | cut -c1-45): USS $(uss $c) PSS $(pss $c) RSS $(rss $c) kB"
  done
  kill $M; wait $M 2>/dev/null
done
