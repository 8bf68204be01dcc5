#!/usr/bin/env bash
# 20 HUPs under wrk (keep-alive, then Connection: close) against a 2-worker release build;
# prints wrk's totals and errors and the HUP -> all-new-workers-ready latency from the log.
# Needs wrk and `cargo build --release -p angel-host -p hello`.
set -u
R="$(cd "$(dirname "$0")/../.." && pwd)/target/release"
D=$(mktemp -d); cd $D
$R/angel-host --lib $R/libhello.so --port 0 --host 127.0.0.1 --workers 2 --pidfile $D/angel.pid > log 2>&1 &
until grep -q "serving" log; do sleep 0.05; done
PORT=$(grep -o 'listening on 127.0.0.1:[0-9]*' log | head -1 | cut -d: -f2)
for mode in keepalive close; do
  H=(); [ $mode = close ] && H=(-H "Connection: close")
  wrk -t2 -c64 -d12s "${H[@]}" http://127.0.0.1:$PORT/ > wrk_$mode.txt 2>&1 &
  W=$!; sleep 1
  for i in $(seq 1 20); do kill -HUP $(cat angel.pid); sleep 0.5; done
  wait $W
  echo "== $mode"; grep -E "requests in|Requests/sec|Socket errors|Non-2xx" wrk_$mode.txt
done
echo "rolls: $(grep -c ' reloaded ' log)"
grep -o " in [0-9.]* ms" log | awk '{print $2}' | sort -n | awk '{a[NR]=$1} END {print "HUP->all new workers ready (ms, under load): p50="a[int(NR/2)+1], "p90="a[int(NR*0.9)], "max="a[NR]}'
kill -TERM $(cat angel.pid); sleep 2
