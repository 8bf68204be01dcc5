#!/usr/bin/env python3
"""What systemd's socket activation does, for a test: own a listening socket and run the
service on it (LISTEN_FDS=1, LISTEN_PID=<child>), then, on each line "restart" on stdin,
stop the service with SIGTERM, wait for it, and start it again on the same socket.

Usage: socket_holder.py COMMAND [ARG...]; prints "port N" once listening, "started PID" for
each start, "exited STATUS" for each stop.
"""
import os
import signal
import socket
import sys

sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", 0))
sock.listen(128)
print("port", sock.getsockname()[1], flush=True)


def start():
    pid = os.fork()
    if pid == 0:
        os.dup2(sock.fileno(), 3)
        os.set_inheritable(3, True)
        env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
        os.execve(sys.argv[1], sys.argv[1:], env)
    print("started", pid, flush=True)
    return pid


child = start()
for line in sys.stdin:
    if line.strip() == "restart":
        os.kill(child, signal.SIGTERM)
        _, status = os.waitpid(child, 0)
        print("exited", status, flush=True)
        child = start()
os.kill(child, signal.SIGTERM)
os.waitpid(child, 0)
