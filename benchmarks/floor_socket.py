"""The TCP half of the floor: a raw socket over loopback, nothing else.

``python floor_socket.py`` serves one connection (it prints its port first);
:class:`SocketFloor` starts it as a subprocess and times, from this process:

- ``rtt()``       100 bytes there and 100 bytes back (a small request's round trip)
- ``up(n)``       n bytes to the server, which answers one byte once it has them all
- ``down(n)``     a 9-byte request, answered with n bytes

Buffers are allocated once; no pickling, no framing, no authentication: this is
what any client/controller link on this machine costs at least.
"""
from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from typing import List, Optional

REQ = struct.Struct("!cQ")


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    pos, n = 0, view.nbytes
    while pos < n:
        got = sock.recv_into(view[pos:])
        if not got:
            raise EOFError("peer closed")
        pos += got


def serve() -> None:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    print(lst.getsockname()[1], flush=True)
    lst.settimeout(60.0)
    conn, _ = lst.accept()
    conn.settimeout(None)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(0)
    head = memoryview(bytearray(REQ.size))
    while True:
        try:
            _recv_into(conn, head)
        except (EOFError, ConnectionError):
            return
        op, n = REQ.unpack(head)
        if len(buf) < n:
            buf = bytearray(n)
        view = memoryview(buf)[:n]
        if op == b"P":  # ping: n bytes each way
            _recv_into(conn, view)
            conn.sendall(view)
        elif op == b"U":
            _recv_into(conn, view)
            conn.sendall(b"k")
        elif op == b"D":
            conn.sendall(view)
        else:
            return


class SocketFloor:
    """A client connected to a ``floor_socket.py`` server in its own process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(0)
        self.one = memoryview(bytearray(1))

    def _view(self, n: int) -> memoryview:
        if len(self.buf) < n:
            self.buf = bytearray(n)
        return memoryview(self.buf)[:n]

    def rtt(self, n: int = 100) -> float:
        view = self._view(n)
        t = time.perf_counter()
        self.sock.sendall(REQ.pack(b"P", n))
        self.sock.sendall(view)
        _recv_into(self.sock, view)
        return time.perf_counter() - t

    def up(self, n: int) -> float:
        view = self._view(n)
        t = time.perf_counter()
        self.sock.sendall(REQ.pack(b"U", n))
        self.sock.sendall(view)
        _recv_into(self.sock, self.one)
        return time.perf_counter() - t

    def down(self, n: int) -> float:
        view = self._view(n)
        t = time.perf_counter()
        self.sock.sendall(REQ.pack(b"D", n))
        _recv_into(self.sock, view)
        return time.perf_counter() - t

    def median(self, what: str, n: int, reps: int) -> float:
        """Median seconds of ``reps`` runs of ``what`` ('rtt', 'up', 'down'), after a warm-up."""
        fn = getattr(self, what)
        fn(n)
        times: List[float] = sorted(fn(n) for _ in range(reps))
        return times[len(times) // 2]

    def close(self) -> None:
        from . import procs

        pids = procs.remember(self.proc.pid)
        try:
            self.sock.close()
            self.proc.wait(5.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        procs.end(procs.alive(pids))
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5.0)
        self.buf = bytearray(0)


def main(argv: Optional[List[str]] = None) -> int:
    serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
