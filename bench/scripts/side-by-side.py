#!/usr/bin/env python3
"""The same app rebuilt N times under load, three ways of picking up the new build:

  angel     angel-host --watch --lib target/hot/libapp.so (2 workers)
  systemfd  systemfd --no-pid -s http::ADDR -- watchexec -r ... -- target/hot/app-plain
            (the socket stays open in systemfd across restarts; app-plain takes it from
            LISTEN_FDS)
  watchexec watchexec -r ... -- target/hot/app-plain ADDR (app-plain binds the port itself)

The app is app-template's router in both forms: the cdylib angel-host loads, and `app-plain`
(app-template/plain/main.rs, feature `plain-bin`), which serves the same `router()` on a
2-thread tokio runtime and stops gracefully on SIGTERM. Every build is a real `cargo build
--profile hot -p app --features plain-bin` of both after the greeting in
app-template/src/lib.rs was changed to carry `build <n>` (restored at the end), so each setup
sees the same kind of build.

Per setup and load client (loadclient.py: `keepalive` and `Connection: close`, 4 threads,
nothing retried) it reports failed requests, the longest stretch with no successful response,
and cargo's exit -> the first response from the new code (median, min, max). The blocks run
in the order angel, systemfd, watchexec for the first load client and reversed for the
second, so a drift in the machine's load does not favour one setup.

systemfd and watchexec are installed with `cargo install --locked` if they are missing.

    bench/scripts/side-by-side.py [--rebuilds 20] [--setups angel systemfd watchexec]
    KEEP=1 bench/scripts/side-by-side.py ...   # keep each setup's log (angel-host's, watchexec's)
"""

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the work tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loadclient import Load  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "app-template/src/lib.rs")
NEEDLE = '"Hello from angel-host\\n"'
REPLACE = '"Hello from angel-host build {n}\\n"'
HOT = os.path.join(ROOT, "target/hot")
LIB = os.path.join(HOT, "libapp.so")
BIN = os.path.join(HOT, "app-plain")
BUILD = ["cargo", "build", "--quiet", "--profile", "hot", "-p", "app", "--features", "plain-bin"]
# How long the new code may take to answer after cargo finished before the run is called
# broken (a restart that never happened).
SERVE_DEADLINE = 30.0
# Tools the script installs when missing, and the crate that has them.
TOOLS = {"systemfd": "systemfd", "watchexec": "watchexec-cli"}


def tool(name):
    found = shutil.which(name) or shutil.which(os.path.expanduser(f"~/.cargo/bin/{name}"))
    if found:
        return found
    print(f"{name} not found: cargo install --locked {TOOLS[name]}", flush=True)
    subprocess.run(["cargo", "install", "--locked", TOOLS[name]], check=True)
    return shutil.which(name) or os.path.expanduser(f"~/.cargo/bin/{name}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def watchexec_cmd(watchexec):
    # Watch target/hot itself (cargo replaces app-plain by unlink + hard link, so a watch on
    # the file would be lost), only app-plain's name, ignore files off (target/ is in
    # .gitignore), and restart (-r: SIGTERM, wait, start) on a change.
    return [watchexec, "-r", "--no-vcs-ignore", "--no-project-ignore", "--no-global-ignore",
            "-W", HOT, "-f", "app-plain", "--"]


def start(setup, port, work, tools):
    log = open(os.path.join(work, f"{setup}.log"), "w")
    addr = f"127.0.0.1:{port}"
    if setup == "angel":
        cmd = [os.path.join(ROOT, "target/release/angel-host"), "--lib", LIB, "--host",
               "127.0.0.1", "--port", str(port), "--workers", "2", "--watch",
               "--pidfile", os.path.join(work, "angel.pid")]
    elif setup == "systemfd":
        cmd = [tools["systemfd"], "--no-pid", "-s", f"http::{addr}", "--"] + \
            watchexec_cmd(tools["watchexec"]) + [BIN]
    elif setup == "watchexec":
        cmd = watchexec_cmd(tools["watchexec"]) + [BIN, addr]
    else:
        sys.exit(f"unknown setup {setup}")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while not answers(port):
        if time.monotonic() > deadline or proc.poll() is not None:
            stop(proc)
            sys.exit(f"{setup} did not serve:\n" + open(log.name).read())
        time.sleep(0.05)
    return proc, log.name


def stop(proc):
    # The whole session: watchexec's child too.
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def block(setup, mode, rebuilds, first_n, original, work, tools):
    port = free_port()
    proc, log_path = start(setup, port, work, tools)
    load = Load(port, mode)
    load.start()
    times, placed_times = [], []
    try:
        time.sleep(0.5)
        for i in range(rebuilds):
            n = first_n + i
            with open(SOURCE, "w") as f:
                f.write(original.replace(NEEDLE, REPLACE.format(n=n)))
            subprocess.run(BUILD, cwd=ROOT, check=True)
            built = time.monotonic()
            # When cargo put the artifact this setup runs in place (its hard link: the inode's
            # ctime): cargo itself exits later, by hundreds of ms on a loaded machine.
            artifact = LIB if setup == "angel" else BIN
            placed = os.stat(artifact).st_ctime - time.time() + time.monotonic()
            while load.served_since(n) is None:
                if time.monotonic() > built + SERVE_DEADLINE or proc.poll() is not None:
                    load.stop()
                    sys.exit(f"{setup}/{mode}: build {n} not served {SERVE_DEADLINE} s after "
                             f"cargo finished\n" + open(log_path).read()[-4000:])
                time.sleep(0.002)
            times.append((load.served_since(n) - built) * 1000)
            placed_times.append((load.served_since(n) - placed) * 1000)
        time.sleep(1.0)  # the last old process finishes under load too
    finally:
        stats = load.stop()
        stop(proc)
    stats["served_ms"] = times
    stats["placed_ms"] = placed_times
    return stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rebuilds", type=int, default=20)
    ap.add_argument("--setups", nargs="+", default=["angel", "systemfd", "watchexec"])
    ap.add_argument("--loads", nargs="+", default=["keepalive", "close"])
    args = ap.parse_args()
    tools = {}
    if set(args.setups) & {"systemfd", "watchexec"}:
        tools["watchexec"] = tool("watchexec")
    if "systemfd" in args.setups:
        tools["systemfd"] = tool("systemfd")
    original = open(SOURCE).read()
    if NEEDLE not in original:
        sys.exit(f"{SOURCE}: {NEEDLE} not found")
    subprocess.run(["cargo", "build", "--quiet", "--release", "-p", "angel-host"], cwd=ROOT,
                   check=True)
    print("building app (lib and app-plain, profile hot) once first ...", flush=True)
    subprocess.run(BUILD, cwd=ROOT, check=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    work = tempfile.mkdtemp(prefix="angel-side-by-side-")
    results = []
    n = 1
    try:
        for k, mode in enumerate(args.loads):
            order = args.setups if k % 2 == 0 else list(reversed(args.setups))
            for setup in order:
                stats = block(setup, mode, args.rebuilds, n, original, work, tools)
                n += args.rebuilds
                s = stats["served_ms"]
                print(f"{setup:9} {mode:9}: {stats['ok']} ok, {stats['failed']} failed "
                      f"{stats['reasons'] or ''}, longest gap {stats['longest_gap_ms']:.0f} ms, "
                      f"cargo done -> new code serving median {statistics.median(s):.0f} ms "
                      f"(min {min(s):.0f}, max {max(s):.0f}); artifact in place -> serving "
                      f"median {statistics.median(stats['placed_ms']):.0f} ms", flush=True)
                results.append((setup, mode, stats))
    finally:
        with open(SOURCE, "w") as f:
            f.write(original)
    print(f"load average after: {os.getloadavg()}")
    print("\n| setup | load client | requests ok | failed | longest gap with no success | "
          "cargo done → new code serving, median (min–max) | artifact in place → serving, median |")
    print("|---|---|---:|---:|---:|---|---:|")
    for setup, mode, st in results:
        s = st["served_ms"]
        print(f"| {setup} | {mode} | {st['ok']} | {st['failed']} | {st['longest_gap_ms']:.0f} ms | "
              f"{statistics.median(s):.0f} ms ({min(s):.0f}–{max(s):.0f}) | "
              f"{statistics.median(st['placed_ms']):.0f} ms |")
    print("restoring the greeting and rebuilding ...", flush=True)
    subprocess.run(BUILD, cwd=ROOT, check=True)
    if os.environ.get("KEEP"):
        print(f"kept the setups' logs in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
