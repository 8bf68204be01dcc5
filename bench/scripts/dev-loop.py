#!/usr/bin/env python3
"""Save -> new code serving, per deploy style, for `angel-host --watch`.

Runs angel-host --watch (2 workers) on a copy of a library in a temp dir and, per trial, puts
a new build in place one of four ways, then polls with one new connection per request until a
response comes from a worker forked after the change (`Hello:<pid>`: the pid names the
worker). The new build is the library with a few random bytes appended (the loader ignores
them; the content hash changes). Styles:

  rename   write lib.tmp, then rename(2) over the library (mv, rsync without --inplace)
  relink   what cargo does: write deps/lib-<n>.so, unlink the library, hard-link the new file
  cp       overwrite in place (open O_TRUNC, write, close), as cp does
  inplace  rsync --inplace (needs rsync)

"save" is the moment the last step returns (the rename, the link, the close); the figure is
from there to the first response from the new generation. Also prints the snapshot/hash
figures the master logs (`reloaded ... in X ms` = trigger -> all new workers ready).

    bench/scripts/dev-loop.py [--lib target/release/libhello.so] [--trials 10] [--styles ...]

With `--edit APP` (`template` = app-template, `axum` = examples/axum) it measures the real
loop instead: angel-host --watch on target/<profile>/lib<app>.so under a load client
(loadclient.py; keep-alive and `Connection: close` trials interleaved), and per trial the
app's greeting in its source is changed to carry `build <n>` ("save"), `cargo build
--profile <profile> -p <package> --lib` runs, and the figure is save -> the first response
with `build <n>`, split at cargo's exit. Every failed request of the load client is counted.
From the master's JSON log it also splits the master's own roll time (`reloaded ... in X ms`,
trigger -> all new workers ready) into trigger -> first new worker forked (the snapshot: copy
and SHA-256 of the library) and forked -> all ready (exec, probe and workers loading the
library, the app's init). The source is restored and rebuilt at the end.

    bench/scripts/dev-loop.py --edit template --profile hot --trials 6
    bench/scripts/dev-loop.py --edit axum --profile release --trials 4
"""

import argparse
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime

sys.dont_write_bytecode = True  # no __pycache__ in the work tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loadclient import Load  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def get(port):
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    m = re.search(rb"Hello:(\d+)", data)
    return int(m.group(1)) if m else None


def forked(log_path):
    with open(log_path, errors="replace") as f:
        return [int(p) for p in re.findall(r"forked worker\[(\d+)\]", f.read())]


def variant(base, n):
    return base + b"\0angel-dev-loop" + os.urandom(8) + str(n).encode()


def write_file(path, data, fsync=False):
    with open(path, "wb") as f:
        f.write(data)


def put(style, lib, data, n, work):
    if style == "rename":
        tmp = lib + ".tmp"
        write_file(tmp, data)
        os.rename(tmp, lib)
    elif style == "relink":
        deps = os.path.join(work, "deps")
        os.makedirs(deps, exist_ok=True)
        new = os.path.join(deps, f"lib-{n}.so")
        write_file(new, data)
        os.unlink(lib)
        os.link(new, lib)
    elif style == "cp":
        write_file(lib, data)
    elif style == "inplace":
        src = os.path.join(work, "src.so")
        write_file(src, data)
        subprocess.run(["rsync", "--inplace", src, lib], check=True)
    else:
        sys.exit(f"unknown style {style}")
    return time.monotonic()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=os.path.join(ROOT, "target/release/libhello.so"))
    ap.add_argument("--host-bin", default=os.path.join(ROOT, "target/release/angel-host"))
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--styles", nargs="+", default=["rename", "relink", "cp", "inplace"])
    ap.add_argument("--edit", choices=sorted(APPS), help="measure source edit -> rebuild -> serving")
    ap.add_argument("--profile", default="hot", help="with --edit: cargo profile (hot, release, dev)")
    ap.add_argument("--cargo-config", nargs="*", default=[],
                    help="with --edit: extra `cargo --config` values, e.g. profile.hot.package.app.opt-level=1")
    ap.add_argument("--loads", nargs="+", default=["keepalive", "close"],
                    help="with --edit: load client modes, one per trial in turn")
    args = ap.parse_args()
    if args.edit:
        return edit_loop(args)
    base = open(args.lib, "rb").read()
    work = tempfile.mkdtemp(prefix="angel-devloop-")
    lib = os.path.join(work, "libapp.so")
    write_file(lib, base)
    log_path = os.path.join(work, "log")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "w")
    host = subprocess.Popen([args.host_bin, "--lib", lib, "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "2", "--watch",
                             "--pidfile", os.path.join(work, "angel.pid")],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    results = {}
    try:
        deadline = time.time() + 20
        while "serving" not in open(log_path).read():
            if time.time() > deadline or host.poll() is not None:
                sys.exit(open(log_path).read())
            time.sleep(0.05)
        n = 0
        for style in args.styles:
            if style == "inplace" and not shutil.which("rsync"):
                print("rsync not found: skipping inplace", file=sys.stderr)
                continue
            figures = []
            for _ in range(args.trials):
                n += 1
                old = set(forked(log_path))
                saved = put(style, lib, variant(base, n), n, work)
                while True:
                    pid = get(port)
                    now = time.monotonic()
                    if pid is not None and pid not in old and pid in forked(log_path):
                        break
                    if now - saved > 10:
                        sys.exit(f"{style}: no new generation after 10 s\n" + open(log_path).read())
                figures.append((now - saved) * 1000)
                # Let the old generation drain before the next trial.
                time.sleep(1.5)
            results[style] = figures
            print(f"{style:8} save -> new code serving: median {statistics.median(figures):.1f} ms, "
                  f"min {min(figures):.1f}, max {max(figures):.1f} ({len(figures)} trials)",
                  flush=True)
    finally:
        host.terminate()
        host.wait()
    took = [float(x) for x in re.findall(r"reloaded .* in ([0-9.]+) ms", open(log_path).read())]
    if took:
        print(f"master: trigger -> all new workers ready, median {statistics.median(took):.1f} ms "
              f"over {len(took)} rolls")
    shutil.rmtree(work, ignore_errors=True)


# What --edit changes in each app: the source, the text in it, and what replaces it (`{n}` is
# the trial's build number).
APPS = {
    "template": {
        "package": "app",
        "lib": "libapp.so",
        "source": "app-template/src/lib.rs",
        "needle": '"Hello from angel-host\\n"',
        "replace": '"Hello from angel-host build {n}\\n"',
    },
    "axum": {
        "package": "axum-example",
        "lib": "libaxum_example.so",
        "source": "examples/axum/src/lib.rs",
        "needle": 'format!("Hello from axum:{}"',
        "replace": 'format!("Hello from axum build {n}:{{}}"',
    },
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_log(log_path, text, host, seconds):
    deadline = time.monotonic() + seconds
    while text not in open(log_path, errors="replace").read():
        if time.monotonic() > deadline or host.poll() is not None:
            sys.exit(f"no {text!r} in the host's log:\n" + open(log_path, errors="replace").read())
        time.sleep(0.05)


def cargo_build(profile, package, config=()):
    """Builds; returns the CPU seconds (user + system) cargo and its children used: unlike the
    wall time, that hardly depends on how many other builds share the cores."""
    cmd = ["cargo", "build", "--quiet", "--profile", profile, "-p", package, "--lib"]
    for c in config:
        cmd += ["--config", c]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, cwd=ROOT, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def placed_at(path):
    """When cargo put `path` in place (its hard link: the inode's ctime), on the monotonic clock.
    cargo exits a little later (on a loaded machine, hundreds of ms)."""
    return os.stat(path).st_ctime - time.time() + time.monotonic()


def master_split(log_path):
    """Per roll from the master's JSON log: (roll ms, trigger -> first fork ms, fork -> ready ms)."""
    forks, rolls = {}, []
    for line in open(log_path, errors="replace"):
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("role") != "master":
            continue
        ts = datetime.fromisoformat(ev["ts"].replace("Z", "+00:00")).timestamp()
        gen = ev.get("generation")
        if ev.get("event") == "forked" and gen is not None:
            forks.setdefault(gen, ts)
        if ev.get("event") == "reloaded":
            took = float(re.search(r" in ([0-9.]+) ms", ev["msg"]).group(1))
            trigger = ts - took / 1000
            first = forks.get(gen, ts)
            rolls.append((took, (first - trigger) * 1000, (ts - first) * 1000))
    return rolls


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def edit_loop(args):
    app = APPS[args.edit]
    target = "debug" if args.profile == "dev" else args.profile
    lib = os.path.join(ROOT, "target", target, app["lib"])
    source = os.path.join(ROOT, app["source"])
    original = open(source).read()
    if app["needle"] not in original:
        sys.exit(f"{app['source']}: {app['needle']} not found")
    print(f"building {app['package']} (profile {args.profile}) once first ...", flush=True)
    cargo_build(args.profile, app["package"], args.cargo_config)
    work = tempfile.mkdtemp(prefix="angel-devloop-")
    log_path = os.path.join(work, "log")
    port = free_port()
    log = open(log_path, "w")
    host = subprocess.Popen([args.host_bin, "--lib", lib, "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "2", "--watch", "--log-format", "json",
                             "--pidfile", os.path.join(work, "angel.pid")],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            # examples/axum logs every request at INFO: under a flat-out load
                            # client that is ~300 bytes a request (600 MB in one release trial)
                            # and the host's CPU. The master's own events are not filtered.
                            env={**os.environ, "ANGEL_LOG": os.environ.get("ANGEL_LOG", "warn")})
    rows = []
    try:
        wait_log(log_path, '"event":"serving"', host, 30)
        print(f"{os.path.getsize(lib) / 1e6:.1f} MB {lib}", flush=True)
        for n in range(1, args.trials + 1):
            mode = args.loads[(n - 1) % len(args.loads)]
            load = Load(port, mode)
            load.start()
            time.sleep(0.5)  # the load runs before the save, not only after it
            with open(source, "w") as f:
                f.write(original.replace(app["needle"], app["replace"].format(n=n)))
            saved = time.monotonic()
            cpu = cargo_build(args.profile, app["package"], args.cargo_config)
            built = time.monotonic()
            placed = placed_at(lib)
            deadline = built + 30
            while load.served_since(n) is None:
                if time.monotonic() > deadline or host.poll() is not None:
                    sys.exit(f"build {n} not served 30 s after cargo finished\n"
                             + open(log_path, errors="replace").read()[-4000:])
                time.sleep(0.002)
            served = load.served_since(n)
            time.sleep(0.5)  # and on, while the old generation drains
            stats = load.stop()
            row = {"n": n, "load": mode, "save_built": built - saved, "built_served": served - built,
                   "placed_served": served - placed, "save_served": served - saved, "cpu": cpu,
                   "load_avg": os.getloadavg()[0], **stats}
            rows.append(row)
            print(f"trial {n} ({mode}): save -> cargo done {row['save_built']:.2f} s "
                  f"({cpu:.1f} s CPU, load {row['load_avg']:.1f}), "
                  f"cargo done -> served {row['built_served'] * 1000:.0f} ms "
                  f"(library in place -> served {row['placed_served'] * 1000:.0f} ms), "
                  f"save -> served {row['save_served']:.2f} s; load {stats['ok']} ok, "
                  f"{stats['failed']} failed {stats['reasons'] or ''}", flush=True)
    finally:
        with open(source, "w") as f:
            f.write(original)
        host.terminate()
        host.wait()
    rolls = master_split(log_path)
    size = os.path.getsize(lib) / 1e6
    extra = f" ({' '.join(args.cargo_config)})" if args.cargo_config else ""
    print(f"\n{args.edit}, profile {args.profile}{extra}, {size:.1f} MB library, {len(rows)} trials:")
    print(f"  save -> cargo done     median {med([r['save_built'] for r in rows]):.2f} s "
          f"(min {min(r['save_built'] for r in rows):.2f}, max {max(r['save_built'] for r in rows):.2f})")
    print(f"  cargo's CPU time       median {med([r['cpu'] for r in rows]):.1f} s (user + system; "
          f"load average {min(r['load_avg'] for r in rows):.1f}-{max(r['load_avg'] for r in rows):.1f})")
    print(f"  cargo done -> serving  median {med([r['built_served'] * 1000 for r in rows]):.0f} ms "
          f"(min {min(r['built_served'] for r in rows) * 1000:.0f}, "
          f"max {max(r['built_served'] for r in rows) * 1000:.0f})")
    print(f"  library in place -> serving  median {med([r['placed_served'] * 1000 for r in rows]):.0f} ms "
          f"(min {min(r['placed_served'] for r in rows) * 1000:.0f}, "
          f"max {max(r['placed_served'] for r in rows) * 1000:.0f})")
    print(f"  save -> serving        median {med([r['save_served'] for r in rows]):.2f} s "
          f"(min {min(r['save_served'] for r in rows):.2f}, max {max(r['save_served'] for r in rows):.2f})")
    print(f"  load client: {sum(r['ok'] for r in rows)} ok, {sum(r['failed'] for r in rows)} failed, "
          f"longest gap median {med([r['longest_gap_ms'] for r in rows]):.0f} ms, "
          f"max {max(r['longest_gap_ms'] for r in rows):.0f} ms")
    if rolls:
        print(f"  master, {len(rolls)} rolls: trigger -> all ready median {med([r[0] for r in rolls]):.1f} ms; "
              f"of it trigger -> first fork (snapshot: copy + hash) {med([r[1] for r in rolls]):.1f} ms, "
              f"fork -> all ready (probe, workers load + init) {med([r[2] for r in rolls]):.1f} ms")
    print("restoring the source and rebuilding ...", flush=True)
    cargo_build(args.profile, app["package"], args.cargo_config)
    shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
