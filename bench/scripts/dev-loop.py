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
"""

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
