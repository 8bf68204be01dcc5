#!/usr/bin/env bash
# 50 file-change rolls under wrk with --watch: alternates the app template and hello builds
# over the watched path by atomic rename; prints wrk's totals and errors, save -> `reloaded`
# (debounce included) and the roll's own duration. Needs wrk and
# `cargo build --release -p angel-host -p hello -p app`. DUR=seconds of load (default 40).
set -u
R="$(cd "$(dirname "$0")/../.." && pwd)/target/release"
D=$(mktemp -d); cd $D
cp $R/libhello.so libapp.so
$R/angel-host --lib $D/libapp.so --port 0 --host 127.0.0.1 --workers 2 --watch --pidfile $D/angel.pid > log 2>&1 &
until grep -q "serving" log; do sleep 0.05; done
PORT=$(grep -o 'listening on 127.0.0.1:[0-9]*' log | head -1 | cut -d: -f2)
wrk -t1 -c32 -d${DUR:-40}s http://127.0.0.1:$PORT/ > wrk.txt 2>&1 &
WRK=$!
sleep 0.5
for i in $(seq 1 50); do
  if [ $((i % 2)) = 1 ]; then src=$R/libapp.so; else src=$R/libhello.so; fi
  cp $src $D/libapp.so.new && mv $D/libapp.so.new $D/libapp.so   # atomic like install/cargo
  t0=$(date +%s%N)
  n=$((i+1))
  until grep -q "(generation $n," log; do sleep 0.002; done
  t1=$(date +%s%N)
  echo $(( (t1-t0)/1000 )) >> lat_us.txt
done
wait $WRK
kill -TERM $(cat angel.pid); sleep 0.5
cat wrk.txt
echo "rolls: $(grep -c reloaded log)  save->reloaded (ms incl. debounce 150): $(sort -n lat_us.txt | awk '{a[NR]=$1} END {printf "p50=%.1f p90=%.1f max=%.1f", a[int(NR/2)+1]/1000, a[int(NR*0.9)]/1000, a[NR]/1000}')"
grep -o "in [0-9.]* ms" log | awk '{print $2}' | sort -n | awk '{a[NR]=$1} END {print "roll itself (ms): p50="a[int(NR/2)+1], "p90="a[int(NR*0.9)], "max="a[NR]}'
