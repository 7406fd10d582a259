"""The controller's client side: a non-blocking TCP server of authenticated frames.

One thread (the controller's) drives everything with a selector. Each connection
first runs the handshake of :mod:`protocol` (fixed sizes, nothing else read);
a wrong proof closes it. After that, frames are received straight into their
final buffers and handed to the controller only once authenticated. Any
malformed or oversized frame closes that connection and nothing else.
"""
from __future__ import annotations

import collections
import logging
import selectors
import socket
import ssl
import time
from typing import Any, Callable, Deque, Dict, List, Optional

from . import protocol as P
from . import tls
from .errors import AuthenticationError, ProtocolError

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
_IOV_MAX = 512


class Conn:
    """One client connection: handshake state, frame parser, output queue."""

    _next_id = 0

    def __init__(self, sock: socket.socket, addr: Any, key: bytes, max_message: int) -> None:
        Conn._next_id += 1
        self.id = Conn._next_id
        self.sock = sock
        self.addr = addr
        self.key = key
        self.max_message = max_message
        self.max_reply: Optional[int] = None  # the client's own limit, if it gave one
        self.opened = time.monotonic()
        hello, self.nonce = P.server_hello()
        self.out: Deque[memoryview] = collections.deque([memoryview(hello)])
        self.frames: Deque[P.Outgoing] = collections.deque()  # queued, not yet taken
        self.auth_buf = bytearray(P.AUTH_SIZE)
        self.auth_pos = 0
        self.parser: Optional[P.FrameParser] = None
        self.stage = memoryview(bytearray(P.STAGE))
        self.sender: Optional[P.Sender] = None
        self.closed = False
        self.eof = False
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.handshaking = self.tls  # the TLS handshake comes before everything else

    def __repr__(self) -> str:
        return f"<client {self.id} from {self.addr}>"

    @property
    def authenticated(self) -> bool:
        return self.parser is not None

    def _tls_handshake(self) -> bool:
        """Drive a non-blocking TLS handshake; return True once it is complete."""
        try:
            self.sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except (ssl.SSLError, OSError) as e:
            raise ProtocolError(f"TLS handshake failed: {e}") from e
        self.handshaking = False
        return True

    def read(self) -> List[P.Frame]:
        """Read what is available; return complete frames. Raises on bad input."""
        frames: List[P.Frame] = []
        if self.handshaking and not self._tls_handshake():
            return frames
        for _ in range(64):  # bounded, so one busy client cannot starve the others
            if self.parser is None:
                view = memoryview(self.auth_buf)[self.auth_pos:]
            else:
                view = self.parser.want()
                if len(view) < P.STAGE:
                    view = self.stage  # a small frame (or several) in one recv
            try:
                n = self.sock.recv_into(view)
                if n and self.tls and view is not self.stage and self.parser is not None:
                    n = tls.read_more(self.sock, view, n)  # a large part: many records
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                    ssl.SSLWantWriteError):
                break
            except ssl.SSLError as e:
                raise ProtocolError(f"TLS error: {e}") from e
            if n == 0:
                self.eof = True  # frames read before the close are still delivered
                break
            if self.parser is None:
                self.auth_pos += n
                if self.auth_pos == P.AUTH_SIZE:
                    proof, keys = P.server_check_auth(self.key, self.nonce, bytes(self.auth_buf))
                    # Over TLS, frames carry no tag of their own (see protocol.py).
                    self.parser = P.FrameParser(keys.recv, self.max_message,
                                                tagged=not self.tls)
                    self.sender = P.Sender(keys.send, tagged=not self.tls)
                    self.out.append(memoryview(proof))
            elif view is self.stage:
                frames += self.parser.feed(self.stage[:n])
            else:
                frame = self.parser.advance(n)
                if frame is not None:
                    frames.append(frame)
            if n < len(view) and not self.tls:
                break  # the socket is empty for now (epoll says when it is not)
        return frames

    def send(self, kind: int, meta: dict, parts: List[Any] = ()) -> None:
        if self.closed or self.sender is None:
            return
        self.frames.append(self.sender.stream(kind, meta, parts))

    @property
    def pending(self) -> bool:
        """True while bytes wait to be written."""
        return bool(self.out or self.frames)

    def flush(self) -> bool:
        """Write what the socket takes now; return True when everything is written."""
        if self.handshaking and not self._tls_handshake():
            return False
        while self.out or self.frames:
            if not self.out:
                # The next slices of the oldest frame, MACed now: while the client
                # reads one slice, the next one is being MACed here.
                views = self.frames[0].take()
                if not views:
                    self.frames.popleft()
                    continue
                # An empty part has nothing to send (and SSL send() would say 0).
                self.out.extend(v for v in views if v.nbytes)
                continue
            try:
                if self.tls:  # SSL sockets have no sendmsg
                    n = self.sock.send(self.out[0])
                else:
                    n = self.sock.sendmsg(list(_head(self.out, _IOV_MAX)))
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                    ssl.SSLWantWriteError):
                return False
            while n:
                first = self.out[0]
                if n >= first.nbytes:
                    n -= first.nbytes
                    self.out.popleft()
                else:
                    self.out[0] = first[n:]
                    n = 0
        return True


def _head(dq: Deque[Any], n: int) -> Any:
    for i, item in enumerate(dq):
        if i >= n:
            break
        yield item


class Server:
    """Accept clients, read their frames, write replies; all non-blocking."""

    def __init__(self, ip: str, port: int, key: bytes, max_message: int,
                 on_frame: Callable[[Conn, P.Frame], None],
                 on_close: Callable[[Conn], None],
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self.ssl_context = ssl_context
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((ip, port))
        self.listener.listen(256)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()[:2]
        self.key = key
        self.max_message = max_message
        self.on_frame = on_frame
        self.on_close = on_close
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.conns: Dict[int, Conn] = {}
        self._last_sweep = time.monotonic()
        self._last_refusal_log, self._n_refused = -1e9, 0

    def poll(self, timeout: Optional[float]) -> bool:
        """Serve socket events for up to ``timeout`` seconds; return True if any happened."""
        events = self.sel.select(timeout)
        for key, mask in events:
            if key.data is None:
                self._accept()
                continue
            if callable(key.data):  # a socket watched for someone else (doorbells)
                key.data()
                continue
            conn: Conn = key.data
            if mask & selectors.EVENT_READ and not conn.closed:
                self._read(conn)
            if mask & selectors.EVENT_WRITE and not conn.closed:
                self._write(conn)
        for conn in list(self.conns.values()):
            # Decrypted bytes already inside OpenSSL do not wake the selector.
            if conn.tls and not conn.closed and not conn.handshaking and conn.sock.pending():
                self._read(conn)
        now = time.monotonic()
        if now - self._last_sweep > 1.0:
            self._last_sweep = now
            self._sweep(now)
        return bool(events)

    def _refused(self, conn: Conn, e: Exception) -> None:
        """Log a refused connection: one line per 10 s at most, with the count refused."""
        self._n_refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= 10.0:
            more = self._n_refused - 1
            log.warning("%r refused: %s%s", conn, e,
                        f" ({more} more refused since the last such line)" if more else "")
            self._last_refusal_log, self._n_refused = now, 0

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. out of file descriptors: keep serving the others
                log.warning("accept failed: %s", e)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                    do_handshake_on_connect=False)
            conn = Conn(sock, addr, self.key, self.max_message)
            self.conns[conn.id] = conn
            self.sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
            self._write(conn)

    def _read(self, conn: Conn) -> None:
        try:
            frames = conn.read()
        except (ProtocolError, AuthenticationError) as e:  # before ConnectionError: a subclass
            self._refused(conn, e)
            self.close(conn)
            return
        except (EOFError, ConnectionError) as e:
            log.debug("%r closed: %s", conn, e)
            self.close(conn)
            return
        except OSError as e:
            log.debug("%r failed: %s", conn, e)
            self.close(conn)
            return
        for frame in frames:
            if conn.closed:
                break
            self.on_frame(conn, frame)
        if conn.eof:
            log.debug("%r closed by the client", conn)
            self.close(conn)
        elif conn.pending and not conn.closed:  # e.g. the handshake proof
            self._write(conn)

    def watch(self, sock: socket.socket, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``sock`` is readable."""
        self.sel.register(sock, selectors.EVENT_READ, callback)

    def unwatch(self, sock: socket.socket) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def broadcast(self, kind: int, meta: dict) -> None:
        """Send an event to every authenticated client."""
        for conn in list(self.conns.values()):
            if conn.authenticated:
                self.send(conn, kind, meta)

    def send(self, conn: Conn, kind: int, meta: dict, parts: List[Any] = ()) -> None:
        if conn.closed:
            return
        conn.send(kind, meta, parts)
        self._write(conn)

    def _write(self, conn: Conn) -> None:
        try:
            done = conn.flush()
        except (OSError, ProtocolError) as e:  # ProtocolError: a failed TLS handshake
            log.debug("%r write failed: %s", conn, e)
            self.close(conn)
            return
        mask = selectors.EVENT_READ | (0 if done else selectors.EVENT_WRITE)
        try:
            self.sel.modify(conn.sock, mask, conn)
        except (KeyError, ValueError):
            pass

    def _sweep(self, now: float) -> None:
        for conn in list(self.conns.values()):
            if not conn.authenticated and now - conn.opened > HANDSHAKE_TIMEOUT:
                log.info("%r did not authenticate within %.0f s", conn, HANDSHAKE_TIMEOUT)
                self.close(conn)

    def close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.conns.pop(conn.id, None)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        try:
            conn.sock.close()
        except OSError:
            pass
        self.on_close(conn)

    def drain(self, timeout: float) -> None:
        """Try to deliver queued output to every client for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(c.pending for c in self.conns.values()):
            self.poll(0.01)

    def shutdown(self) -> None:
        for conn in list(self.conns.values()):
            self.close(conn)
        self.sel.unregister(self.listener)
        self.listener.close()
        self.sel.close()
