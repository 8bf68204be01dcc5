#!/usr/bin/env python3
"""The balance question of balance_inherited.py, with real angel-host workers.

Starts N real workers (`angel-host __worker`, the hidden mode the master fork+execs, serving
examples/hello on its tokio runtime) by hand, each with a control socketpair and either
  shared:    one listening socket, the same for every worker (an inherited socket without
             SO_REUSEPORT), or
  reuseport: one SO_REUSEPORT socket per worker on the same port (the master's per-slot
             sockets, or an inherited ReusePort=yes socket joined by per-slot ones).
The client makes C threads x R sequential `Connection: close` requests; hello answers
`Hello:<pid>`, so the count per worker comes from the responses. Closing the control
sockets drains the workers (EOF = master gone). Only 127.0.0.1 is used.

    cargo build -p angel-host -p hello
    python3 contrib/experiments/balance_real_workers.py [--workers 4] [--clients 2] [--requests 500]
"""

import argparse
import os
import socket
import subprocess
import threading
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LISTENER_TCP = 1


def listener(port, reuseport):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1024)
    return s


def start_worker(exe, lib, slot, sock):
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [
        exe, "__worker", "--lib", lib,
        "--control-fd", str(worker_end.fileno()),
        "--listener", f"{sock.fileno()}:{LISTENER_TCP}",
        "--slot", str(slot), "--generation", "1", "--max-requests", "0",
        "--heartbeat-ms", "1000", "--graceful-ms", "5000",
    ]
    proc = subprocess.Popen(
        argv, pass_fds=(worker_end.fileno(), sock.fileno()),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    worker_end.close()
    # Heartbeats and `ready` arrive on the control socket: read them away.
    threading.Thread(target=lambda: drain(master_end), daemon=True).start()
    return proc, master_end


def drain(sock):
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


def wait_listening(proc, deadline):
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit(f"worker {proc.pid} exited before listening")
        if b"listening on" in line:
            threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()
            return
    raise SystemExit(f"worker {proc.pid} not listening within the deadline")


def run(mode, exe, lib, workers, clients, requests):
    if mode == "shared":
        one = listener(0, False)
        port = one.getsockname()[1]
        socks = [one] * workers
    else:
        first = listener(0, True)
        port = first.getsockname()[1]
        socks = [first] + [listener(port, True) for _ in range(workers - 1)]
    started = [start_worker(exe, lib, i, s) for i, s in enumerate(socks)]
    deadline = time.monotonic() + 20
    for proc, _ in started:
        wait_listening(proc, deadline)

    counts = Counter()
    failures = [0]
    lock = threading.Lock()

    def client():
        for _ in range(requests):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    data = b""
                    while True:
                        chunk = c.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                pid = data.rsplit(b":", 1)[-1].decode()
                with lock:
                    counts[pid] += 1
            except OSError:
                with lock:
                    failures[0] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    for proc, control in started:
        control.close()
    for proc, _ in started:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for s in set(socks):
        s.close()
    per = sorted((counts.get(str(p.pid), 0) for p, _ in started), reverse=True)
    lo = min(per)
    ratio = f"{max(per) / lo:.2f}" if lo else "inf"
    print(
        f"{mode:9} workers={workers} clients={clients} conns={clients * requests} "
        f"failed={failures[0]} per-worker={per} max/min={max(per)}/{lo} ratio={ratio} "
        f"({took:.1f}s)",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", default="debug")
    a = ap.parse_args()
    exe = os.path.join(ROOT, "target", a.profile, "angel-host")
    lib = os.path.join(ROOT, "target", a.profile, "libhello.so")
    for _ in range(a.rounds):
        for mode in ("shared", "reuseport"):
            run(mode, exe, lib, a.workers, a.clients, a.requests)


if __name__ == "__main__":
    main()
