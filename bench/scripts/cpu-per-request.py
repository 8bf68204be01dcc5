#!/usr/bin/env python3
"""Server CPU per request, interleaved: angel-host (one or more app libraries) against the two
plain references (`plain-hyper`, hyper-util's auto builder, and `plain-hyper --http1`, hyper's
own http1 connection), all with the same handler and process count, all up at once.

Each round runs `wrk -t1 -cC -dDs` against every server in turn, the order rotated every
round, and reads the CPU time (utime + stime from /proc/PID/stat, every thread, of the master
or parent and every child) each server used meanwhile. Prints per-round figures, then the
median µs/request and req/s of each server and the median of the per-round ratios against
both references. Needs wrk and `cargo build --release -p angel-host -p hello -p angel-bench`.

    bench/scripts/cpu-per-request.py [--rounds 8] [--duration 5] [--connections 64]
        [--workers 2] [--lib NAME=PATH ...] [--no-zygote-too] [--refs minimal-http1]

`--refs` picks the references to run (default both): with fewer servers per round, the
servers of one round run closer together in time, so their ratio is less exposed to the
machine's drift. Beside each median ratio it prints the middle half of the per-round ratios
(quartiles), which says how far to trust it.
"""

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REL = os.path.join(ROOT, "target", "release")
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def tree(pid):
    pids = [pid]
    for c in children(pid):
        pids += tree(c)
    return pids


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # utime and stime: fields 14 and 15 of stat, 12 and 13 after "pid (comm)".
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / TICK


def wait_port(port, proc, what):
    deadline = time.time() + 20
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


def start(name, argv, port, workers):
    log = tempfile.NamedTemporaryFile(prefix=f"cpu-{name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    wait_port(port, proc, name)
    deadline = time.time() + 20
    while len(tree(proc.pid)) < workers + 1 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    return {"name": name, "proc": proc, "port": port, "rounds": []}


def wrk(port, connections, duration):
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    bad = (errors.group(1) if errors else "") + (f" non-2xx {non2xx.group(1)}" if non2xx else "")
    return requests, bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lib", action="append", default=[],
                    help="NAME=PATH of an app library for angel-host (default: hello)")
    ap.add_argument("--refs", default="plain-hyper,minimal-http1",
                    help="comma-separated references to run: plain-hyper, minimal-http1")
    ap.add_argument("--no-zygote-too", action="store_true",
                    help="also measure angel-host --no-zygote (exec'd workers) on the first library")
    args = ap.parse_args()
    libs = [l.split("=", 1) for l in args.lib] or [["angel", os.path.join(REL, "libhello.so")]]
    libs = [(name, lib, []) for name, lib in libs]
    if args.no_zygote_too:
        libs.append((libs[0][0] + "-no-zygote", libs[0][1], ["--no-zygote"]))
    w = str(args.workers)
    servers = []
    try:
        for name, lib, extra in libs:
            port = free_port()
            servers.append(start(name, [os.path.join(REL, "angel-host"), "--lib", lib,
                                        "--host", "127.0.0.1", "--port", str(port),
                                        "--workers", w, "--pidfile",
                                        os.path.join(tempfile.gettempdir(), f"cpu-{name}-{port}.pid")]
                                 + extra,
                                 port, args.workers))
        wanted = args.refs.split(",")
        for bad in set(wanted) - {"plain-hyper", "minimal-http1"}:
            sys.exit(f"--refs: unknown reference {bad!r}")
        for name, extra in [("plain-hyper", []), ("minimal-http1", ["--http1"])]:
            if name not in wanted:
                continue
            port = free_port()
            servers.append(start(name, [os.path.join(REL, "plain-hyper"), "--addr",
                                        f"127.0.0.1:{port}", "--processes", w] + extra,
                                 port, args.workers))
        for s in servers:  # warm-up
            wrk(s["port"], args.connections, 1)
        for r in range(args.rounds):
            k = r % len(servers)
            order = servers[k:] + servers[:k]
            line = []
            for s in order:
                pids = tree(s["proc"].pid)
                before = cpu_seconds(pids)
                t0 = time.time()
                n, bad = wrk(s["port"], args.connections, args.duration)
                elapsed = time.time() - t0
                used = cpu_seconds(pids) - before
                s["rounds"].append((used * 1e6 / n, n / elapsed))
                line.append(f"{s['name']} {used * 1e6 / n:.2f} µs {n / elapsed:.0f}/s{' ' + bad if bad else ''}")
            print(f"round {r + 1}: " + " | ".join(line), flush=True)
    finally:
        for s in servers:
            s["proc"].send_signal(signal.SIGTERM if s["name"] not in ("plain-hyper", "minimal-http1") else signal.SIGKILL)
        for s in servers:
            s["proc"].wait()
    refs = {s["name"]: s for s in servers if s["name"] in ("plain-hyper", "minimal-http1")}
    print(f"\nmedian of {args.rounds} rounds, wrk -t1 -c{args.connections} -d{args.duration}s, "
          f"{args.workers} processes each:")
    order = [r for r in ("minimal-http1", "plain-hyper") if r in refs]
    head = "".join(f" CPU vs {r} | req/s vs {r} |" for r in order)
    print("| server | CPU µs/request | req/s |" + head)
    print("|---|---|---|" + "---|---|" * len(order))
    for s in servers:
        cpu = statistics.median(x[0] for x in s["rounds"])
        rps = statistics.median(x[1] for x in s["rounds"])
        cols = []
        for ref in order:
            rr = refs[ref]["rounds"]
            for i in (0, 1):
                cols.append(spread([a[i] / b[i] for a, b in zip(s["rounds"], rr)]))
        print(f"| {s['name']} | {cpu:.2f} | {rps:.0f} | " + " | ".join(cols) + " |")


def spread(ratios):
    """The median of per-round ratios, with their quartiles when there are enough rounds."""
    med = statistics.median(ratios)
    if len(ratios) < 4:
        return f"{med:.3f}"
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"{med:.3f} ({q1:.3f}–{q3:.3f})"


if __name__ == "__main__":
    main()
