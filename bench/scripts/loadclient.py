"""A small HTTP/1.1 load client for the dev-loop benches: counts every failed request, the
longest stretch with no successful response, and when each build's code first answered.

Each of `threads` threads sends `GET /` back to back, on one connection it keeps alive
(`keepalive`; a response with `Connection: close` makes it reconnect, as any client does) or
on a new connection per request with `Connection: close` (`close`). Nothing is retried: a
refused connect, a reset, an EOF before a whole response, a timeout or a status other than
200 is a failed request. A request that failed on a reused keep-alive connection counts too
(wrk counts it as a read error; a browser would retry it).

The body of every success is searched for `build <n>` (what the benches put into the app's
greeting); the first moment each `n` was seen is kept, so the bench can ask when the new code
first answered.

    load = Load(port, "keepalive"); load.start(); ...; stats = load.stop()
"""

import re
import socket
import threading
import time

MARKER = re.compile(rb"build (\d+)")
TIMEOUT = 2.0


class Load:
    def __init__(self, port, mode, threads=4, host="127.0.0.1", path="/"):
        assert mode in ("keepalive", "close"), mode
        self.addr = (host, port)
        self.mode = mode
        self.nthreads = threads
        close = b"Connection: close\r\n" if mode == "close" else b""
        self.request = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: bench\r\n" + close + b"\r\n"
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.ok = 0
        self.failed = 0
        self.reasons = {}
        self.first_seen = {}
        self.last_ok = None
        self.longest_gap = 0.0
        self.gap_at = None
        self.started = None
        self.workers = []

    def start(self):
        self.started = time.monotonic()
        self.last_ok = self.started
        for _ in range(self.nthreads):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self.workers.append(t)

    def stop(self):
        self.stopping.set()
        for t in self.workers:
            t.join()
        now = time.monotonic()
        with self.lock:
            self._gap(now)
            return {
                "ok": self.ok,
                "failed": self.failed,
                "reasons": dict(self.reasons),
                "longest_gap_ms": self.longest_gap * 1000,
                "seconds": now - self.started,
            }

    def served_since(self, build):
        """When code of `build` first answered (time.monotonic()), or None."""
        with self.lock:
            return self.first_seen.get(build)

    def _gap(self, now):
        gap = now - self.last_ok
        if gap > self.longest_gap:
            self.longest_gap = gap
            self.gap_at = self.last_ok

    def _success(self, body):
        now = time.monotonic()
        m = MARKER.search(body)
        with self.lock:
            self.ok += 1
            self._gap(now)
            self.last_ok = now
            if m:
                self.first_seen.setdefault(int(m.group(1)), now)

    def _failure(self, reason):
        with self.lock:
            self.failed += 1
            self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def _run(self):
        conn = None
        while not self.stopping.is_set():
            try:
                if conn is None:
                    conn = socket.create_connection(self.addr, timeout=TIMEOUT)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    reader = Reader(conn)
                conn.sendall(self.request)
                status, headers, body = reader.response()
                keep = self.mode == "keepalive" and b"close" not in headers.get(b"connection", b"")
                if status == 200:
                    self._success(body)
                else:
                    self._failure(f"status {status}")
                if not keep:
                    conn.close()
                    conn = None
            except (OSError, ValueError) as e:
                self._failure(type(e).__name__)
                if conn is not None:
                    conn.close()
                    conn = None
                # A refused connect returns at once: don't spin a core while nobody listens.
                time.sleep(0.001)
        if conn is not None:
            conn.close()


class Reader:
    """Reads HTTP/1.1 responses (Content-Length or chunked) off one connection."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise PeerClosed()
        self.buf += chunk

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exactly(self, n):
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def response(self):
        status_line = self._line()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ValueError("bad status line")
        status = int(parts[1])
        headers = {}
        while True:
            line = self._line()
            if not line:
                break
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip().lower() if k.lower() == b"connection" else v.strip()
        if b"content-length" in headers:
            body = self._exactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = b""
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    self._line()
                    break
                body += self._exactly(size)
                self._line()
        else:
            while True:
                try:
                    self._fill()
                except PeerClosed:
                    break
            body, self.buf = self.buf, b""
        return status, headers, body


class PeerClosed(OSError):
    """The peer closed the connection before a whole response."""
