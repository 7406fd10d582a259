"""A recording TCP proxy, and raw protocol clients, for the attack tests.

:class:`RecordingProxy` listens on ``127.0.0.1:0`` and forwards every accepted
connection to a target (the controller), recording the bytes of both
directions with timestamps. A real :class:`MultiEngineClient` talks through it
when its connection file names the proxy's port (:func:`via_proxy`). The proxy
can also inject bytes into a live connection (a replay on the same
connection) and throttle the client-to-server direction (so that a test can
kill a client in the middle of a large push).

:class:`RawClient` is a hand-made client socket: it speaks the handshake of
:mod:`mpiengine.protocol` with a given key and then sends whatever bytes a
test wants (frames, truncated frames, garbage).

:func:`split_frames` cuts a recorded client-to-server byte stream into its
AUTH message and its frames, without checking tags (it is the attacker's view).
"""
from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from mpiengine import protocol as P

C2S, S2C = "c2s", "s2c"


@dataclass
class Chunk:
    """Bytes that went one way on one proxied connection, and when."""

    time: float
    conn: int
    direction: str
    data: bytes


@dataclass
class _Pair:
    index: int
    client: socket.socket
    upstream: socket.socket
    forwarded: Dict[str, int] = field(default_factory=lambda: {C2S: 0, S2C: 0})
    closed: threading.Event = field(default_factory=threading.Event)


class RecordingProxy:
    """Forward connections to ``(host, port)``; record both directions.

    ``c2s_rate`` (bytes per second), when set, slows the client-to-server
    direction. Use as a context manager; :meth:`close` ends every connection.
    """

    def __init__(self, host: str, port: int, c2s_rate: Optional[float] = None) -> None:
        self.target = (host, port)
        self.c2s_rate = c2s_rate
        self.chunks: List[Chunk] = []
        self.pairs: List[_Pair] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self._threads: List[threading.Thread] = []
        self._start(self._accept_loop, "proxy-accept")

    def _start(self, fn: Any, name: str, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    # --- forwarding ------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                pair = _Pair(len(self.pairs), client, upstream)
                self.pairs.append(pair)
            self._start(self._pump, f"proxy-{pair.index}-c2s", pair, client, upstream, C2S)
            self._start(self._pump, f"proxy-{pair.index}-s2c", pair, upstream, client, S2C)

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket, direction: str) -> None:
        throttle = self.c2s_rate if direction == C2S else None
        size = 65536 if throttle is None else max(1024, int(throttle / 20))
        try:
            while not self._stop.is_set():
                r, _, _ = select.select([src], [], [], 0.1)
                if not r:
                    continue
                data = src.recv(size)
                if not data:
                    break
                with self._lock:
                    self.chunks.append(Chunk(time.monotonic(), pair.index, direction, data))
                    pair.forwarded[direction] += len(data)
                dst.sendall(data)
                if throttle:
                    time.sleep(len(data) / throttle)
        except OSError:
            pass
        finally:
            # One side ended: end the other too, as a TCP peer would see it.
            for s in (dst, src):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            pair.closed.set()

    # --- what was seen -----------------------------------------------------------------
    def data(self, direction: Optional[str] = None, conn: Optional[int] = None) -> bytes:
        """All bytes recorded in ``direction`` (both when None) on ``conn`` (all when None)."""
        with self._lock:
            return b"".join(c.data for c in self.chunks
                            if (direction is None or c.direction == direction)
                            and (conn is None or c.conn == conn))

    def forwarded(self, conn: int, direction: str) -> int:
        with self._lock:
            return self.pairs[conn].forwarded[direction] if conn < len(self.pairs) else 0

    def connections(self) -> int:
        with self._lock:
            return len(self.pairs)

    def inject(self, conn: int, data: bytes) -> None:
        """Send ``data`` to the server on connection ``conn``, as if its client had."""
        with self._lock:
            pair = self.pairs[conn]
            self.chunks.append(Chunk(time.monotonic(), conn, C2S, data))
        pair.upstream.sendall(data)

    def upstream_closed(self, conn: int, timeout: float = 10.0) -> bool:
        """Wait until the server side of ``conn`` is closed; return whether it was."""
        return self.pairs[conn].closed.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        try:
            self.listener.close()
        except OSError:
            pass
        with self._lock:
            pairs = list(self.pairs)
        for pair in pairs:
            for s in (pair.client, pair.upstream):
                try:
                    s.close()
                except OSError:
                    pass
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self) -> "RecordingProxy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def private_copy(src: Union[str, Path], dst: Union[str, Path], **changes: Any) -> Path:
    """Copy a connection file to ``dst`` (mode 0600) with some fields changed."""
    info = json.loads(Path(src).read_text())
    info.update(changes)
    dst = Path(dst)
    fd = os.open(str(dst), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return dst


def via_proxy(src: Union[str, Path], dst: Union[str, Path], proxy: RecordingProxy) -> Path:
    """A copy of connection file ``src`` that points at ``proxy``."""
    return private_copy(src, dst, ip="127.0.0.1", port=proxy.port)


def split_frames(stream: bytes) -> Tuple[bytes, List[Tuple[int, int, dict, bytes]]]:
    """Cut a client-to-server stream into (auth bytes, [(kind, seq, meta, frame bytes)]).

    Tags are not checked (an eavesdropper cannot); a trailing partial frame is dropped.
    """
    auth, pos, frames = stream[:P.AUTH_SIZE], P.AUTH_SIZE, []
    while pos + P.HEADER.size <= len(stream):
        magic, kind, _flags, nparts, seq, meta_len = P.HEADER.unpack_from(stream, pos)
        if magic != P.MAGIC:
            raise ValueError(f"no frame magic at offset {pos}")
        lengths_at = pos + P.HEADER.size
        lengths = [P.LENGTH.unpack_from(stream, lengths_at + 8 * i)[0] for i in range(nparts)]
        meta_at = lengths_at + 8 * nparts
        end = meta_at + meta_len + sum(lengths) + P.TAG_SIZE
        if end > len(stream):
            break
        meta = json.loads(stream[meta_at:meta_at + meta_len] or b"{}")
        frames.append((kind, seq, meta, stream[pos:end]))
        pos = end
    return auth, frames


class RawClient:
    """A plain socket that completes (or fails) the handshake and sends raw bytes."""

    def __init__(self, address: Tuple[str, int], key: Optional[bytes],
                 timeout: float = 10.0, max_message: int = P.DEFAULT_MAX_MESSAGE) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sender: Optional[P.Sender] = None
        self.parser: Optional[P.FrameParser] = None
        self.max_message = max_message
        if key is not None:
            self.handshake(key)

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def handshake(self, key: bytes) -> None:
        hello = self.recv_exact(P.HELLO_SIZE)
        auth, nonce_s, nonce_c = P.client_auth(key, hello)
        self.sock.sendall(auth)
        proof = self.recv_exact(P.PROOF_SIZE)
        keys = P.client_check_proof(key, nonce_s, nonce_c, proof)
        self.sender = P.Sender(keys.send)
        self.parser = P.FrameParser(keys.recv, self.max_message)

    def frame_bytes(self, kind: int, meta: dict, parts: List[Any] = ()) -> bytes:
        """Encode (and consume the sequence number of) one authenticated frame."""
        return b"".join(bytes(c) for c in self.sender.encode(kind, meta, list(parts)))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, kind: int, meta: dict, parts: List[Any] = ()) -> None:
        self.send(self.frame_bytes(kind, meta, parts))

    def read_frame(self, timeout: float = 10.0) -> P.Frame:
        """Read and verify the next frame from the controller."""
        self.sock.settimeout(timeout)
        while True:
            view = self.parser.want()
            n = self.sock.recv_into(view)
            if n == 0:
                raise EOFError("the controller closed the connection")
            frame = self.parser.advance(n)
            if frame is not None:
                return frame

    def read_until_closed(self, timeout: float = 10.0) -> Tuple[bytes, bool]:
        """Read until the peer closes; return (what arrived, whether it closed in time).

        A reset counts as closed (a server that closes with unread input resets).
        """
        got = b""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return got, False
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return got, False
            except OSError:
                return got, True
            if not data:
                return got, True
            got += data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
