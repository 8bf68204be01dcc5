#!/usr/bin/env python3
"""How evenly do N worker processes share connections with ONE inherited listening socket?

The question behind `host/src/activation.rs`: a systemd `.socket` unit hands the master one
socket per address. Either every worker accepts from that one socket ("shared"), or the master
keeps it for slot 0 and binds slots 1..n-1 itself on the same address with SO_REUSEPORT
("join": only possible when the inherited socket has SO_REUSEPORT, i.e. ReusePort=yes).
"reuseport" (n sockets all bound by us) is the master's own mode, for reference.

Workers are real processes, each an epoll loop like a tokio worker: the listener is
non-blocking, edge-triggered (EPOLLET, as mio registers it), and on readiness a worker
accepts until EAGAIN, reads the request, answers `Connection: close` and closes. The client
runs C threads, each making R sequential requests, a new connection each (bounded: C*R
connections, then it stops). Prints accepted connections per worker, max/min and the ratio.

    python3 contrib/experiments/balance_inherited.py [--workers 4] [--clients 8] [--requests 500]

Only 127.0.0.1 is used.
"""

import argparse
import os
import select
import socket
import sys
import threading
import time

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


def worker(listener, report_w, stop_r):
    ep = select.epoll()
    listener.setblocking(False)
    ep.register(listener.fileno(), select.EPOLLIN | select.EPOLLET)
    ep.register(stop_r, select.EPOLLIN)
    accepted = 0
    while True:
        for fd, _ in ep.poll():
            if fd == stop_r:
                os.write(report_w, f"{accepted}\n".encode())
                os._exit(0)
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                accepted += 1
                conn.setblocking(True)
                conn.settimeout(5)
                try:
                    buf = b""
                    while b"\r\n\r\n" not in buf:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        buf += chunk
                    conn.sendall(RESPONSE)
                except OSError:
                    pass
                conn.close()


def listener_socket(port, reuseport):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1024)
    return s


def run(mode, workers, clients, requests):
    if mode == "shared":
        one = listener_socket(0, False)
        port = one.getsockname()[1]
        per_worker = [one] * workers
    else:
        # "join": slot 0 is the inherited socket (with SO_REUSEPORT), the others join its
        # group; "reuseport": all bound by the master. Same kernel mechanics, so both go here.
        first = listener_socket(0, True)
        port = first.getsockname()[1]
        per_worker = [first] + [listener_socket(port, True) for _ in range(workers - 1)]
    stop_r, stop_w = os.pipe()
    report_r, report_w = os.pipe()
    pids = []
    for i in range(workers):
        pid = os.fork()
        if pid == 0:
            os.close(stop_w)
            os.close(report_r)
            worker(per_worker[i], report_w, stop_r)
        pids.append(pid)
    os.close(stop_r)
    os.close(report_w)

    failures = [0]

    def client():
        for _ in range(requests):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    while c.recv(4096):
                        pass
            except OSError:
                failures[0] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - start
    os.close(stop_w)  # EOF: every worker reports and exits
    counts = []
    with os.fdopen(report_r) as r:
        for line in r:
            counts.append(int(line))
    for pid in pids:
        os.waitpid(pid, 0)
    counts.sort(reverse=True)
    lo = min(counts)
    ratio = f"{max(counts) / lo:.2f}" if lo else "inf"
    print(
        f"{mode:9} workers={workers} conns={clients * requests} failed={failures[0]} "
        f"per-worker={counts} max/min={max(counts)}/{lo} ratio={ratio} ({took:.1f}s)"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    for _ in range(a.rounds):
        for mode in ("shared", "join"):
            run(mode, a.workers, a.clients, a.requests)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
