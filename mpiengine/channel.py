"""The client's end of the connection: handshake, frames out, replies in.

Frames the controller sends are filed by request number; callers wait on the
request they made. A thread that waits reads the socket itself (one thread reads
at a time; the others wait to be handed their reply), so a blocking call costs
no hand-off between threads. When no call has waited for :data:`STAND_ASIDE`
seconds, a reader thread takes over, for what comes unasked (live output, an
engine's death). Socket errors never escape: they become :class:`ConnectError`
while connecting and :class:`ClusterLost` afterwards.
"""
from __future__ import annotations

import itertools
import json
import logging
import select
import signal
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from . import protocol as P
from . import tls
from .connection import ConnectionInfo
from .errors import AuthenticationError, ClusterLost, ConnectError, ProtocolError
from .recycle import Recycler

log = logging.getLogger(__name__)
_IOV_MAX = 512
#: The reader thread reads only once no call has waited for this long.
STAND_ASIDE = 0.25
#: A waiting thread reads in slices of at most this long (Ctrl-C stays responsive).
WAIT_SLICE = 0.25
_SIGMASK = getattr(signal, "pthread_sigmask", None)
_SIGINT = {signal.SIGINT}


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, pos = memoryview(buf), 0
    while pos < n:
        got = sock.recv_into(view[pos:])
        if got == 0:
            raise EOFError("connection closed")
        pos += got
    return bytes(buf)


class Channel:
    """An authenticated connection to a controller, shared by the client's threads."""

    def __init__(self, info: ConnectionInfo, path: str, timeout: float = 10.0,
                 max_message: int = P.DEFAULT_MAX_MESSAGE) -> None:
        self.where = f"{info.ip}:{info.port} (from {path})"
        self.path = path
        self.limit = int(info.max_message)
        try:
            sock = socket.create_connection((info.ip, info.port), timeout=timeout)
        except OSError as e:
            raise ConnectError(
                f"cannot reach the controller at {self.where}: {e.strerror or e}. "
                f"Is the cluster still running? ('mpiengine status')") from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if info.tls:
                sock = tls.wrap_client(sock, str(info.tls.get("fingerprint", "")), self.where)
            key = info.key_bytes
            hello = _recv_exact(sock, P.HELLO_SIZE)
            auth, nonce_s, nonce_c = P.client_auth(key, hello)
            sock.sendall(auth)
            try:
                proof = _recv_exact(sock, P.PROOF_SIZE)
            except (EOFError, ConnectionError):
                raise AuthenticationError(
                    f"the controller at {self.where} refused the key: the connection "
                    f"file does not belong to this cluster") from None
            keys = P.client_check_proof(key, nonce_s, nonce_c, proof)
        except AuthenticationError:  # before OSError: it is a ConnectionError too
            sock.close()
            raise
        except socket.timeout as e:
            sock.close()
            raise ConnectError(f"the controller at {self.where} did not answer "
                               f"within {timeout} s") from e
        except (OSError, EOFError, ProtocolError) as e:
            sock.close()
            raise ConnectError(f"handshake with {self.where} failed: {e}") from e
        # An SSL object must not be read and written by two threads at once: with TLS
        # the socket is non-blocking and every SSL call is made under one lock.
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._io_lock = threading.Lock()
        sock.settimeout(0.0 if self.tls else None)
        self.sock = sock
        # Over TLS, frames carry no tag of their own (protocol.py says why).
        self.sender = P.Sender(keys.send, tagged=not self.tls)
        # Large parts are received into buffers that are reused once their arrays
        # are gone (recycle.py).
        self.recycler = Recycler()
        self.parser = P.FrameParser(keys.recv, max_message, tagged=not self.tls,
                                    alloc=self.recycler.alloc)
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._aside = threading.Condition(self._cond._lock)  # where the reader thread waits
        self._reading = False  # a thread is reading the socket (under _cond)
        self._waiters = 0      # threads in wait()
        self._last_wait = 0.0  # when the last wait() ended
        self._stage = memoryview(bytearray(P.STAGE))
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        # Ctrl-C is held off while bytes are read and parsed (see _read_some), unless
        # the main thread blocks SIGINT already.
        self._mask_sigint = (_SIGMASK is not None
                             and threading.current_thread() is threading.main_thread()
                             and signal.SIGINT not in _SIGMASK(signal.SIG_BLOCK, ()))
        self._replies: Dict[int, P.Frame] = {}
        self._reqs = itertools.count(1)
        self.broken: Optional[BaseException] = None
        self.closed = False
        self.on_event: Optional[Callable[[P.Frame], None]] = None
        self._reader = threading.Thread(target=self._read_loop, name="mpiengine-reader",
                                        daemon=True)
        self._reader.start()

    # --- sending ---------------------------------------------------------------------------
    def request(self, kind: int, meta: dict, parts: List[Any] = ()) -> int:
        """Send a request; return its number, which its reply will carry."""
        self._check()
        size = sum(P.part_size(p) for p in parts)
        if size > self.limit:
            raise ValueError(f"this request carries {size} bytes; the cluster takes at most "
                             f"{self.limit} per message (serve --max-message-size)")
        req = next(self._reqs)
        with self._send_lock:
            out = self.sender.stream(kind, dict(meta, req=req), parts)
            try:
                # A small frame goes in one write; a large one slice by slice, each
                # MACed just before it is sent.
                while True:
                    views = out.take()
                    if not views:
                        break
                    self._sendv(views)
            except OSError as e:
                self._fail(e)
                self._check()
        return req

    def _sendv(self, views: List[memoryview]) -> None:
        if self.tls:
            for view in views:
                while view.nbytes:
                    with self._io_lock:
                        try:
                            n = self.sock.send(view)
                        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                            n = 0
                    if n:
                        view = view[n:]
                    else:
                        select.select([], [self.sock], [], 1.0)
            return
        i = 0
        while i < len(views):
            n = self.sock.sendmsg(views[i:i + _IOV_MAX])
            while n and i < len(views):
                if n >= views[i].nbytes:
                    n -= views[i].nbytes
                    i += 1
                else:
                    views[i] = views[i][n:]
                    n = 0

    # --- receiving ---------------------------------------------------------------------
    def _read_loop(self) -> None:
        """The reader thread: read while no call waits (see the module docstring)."""
        try:
            while True:
                with self._cond:
                    while True:
                        if self.closed or self.broken is not None:
                            return
                        quiet = time.monotonic() - self._last_wait
                        if not (self._reading or self._waiters) and quiet >= STAND_ASIDE:
                            break
                        self._aside.wait(STAND_ASIDE)
                    self._reading = True
                try:
                    # Asleep until bytes come, or until kept buffers are due to go back.
                    self._read_some(self.recycler.release_in())
                finally:
                    with self._cond:
                        self._reading = False
                        self._cond.notify_all()
                self.recycler.release_if_due()
        except BaseException as e:  # noqa: B902 - every way out must wake the waiters
            self._fail(self._lost_note() or e)

    def _read_some(self, timeout: Optional[float]) -> None:
        """Wait up to ``timeout`` seconds (None: no limit) for bytes; read and file
        what came. The caller is the one thread reading."""
        tls_ready = self.tls and self.sock.pending()
        if not tls_ready and not self._poll.poll(None if timeout is None else timeout * 1000):
            if self.closed:
                raise EOFError("client closed")
            return
        # From here until the frames are filed, Ctrl-C waits: an interrupt between
        # the recv and the parse would lose bytes of the stream. (The block is inside
        # the try: a KeyboardInterrupt raised just after it still unblocks.)
        masked = self._mask_sigint and threading.current_thread() is threading.main_thread()
        try:
            if masked:
                _SIGMASK(signal.SIG_BLOCK, _SIGINT)
            view = self.parser.want()
            if len(view) < P.STAGE:
                view = self._stage  # a small frame (or several) in one recv
            n = self._recv_into(view)
            if n is None:
                return
            if n == 0:
                raise EOFError("the controller closed the connection")
            if view is self._stage:
                frames = self.parser.feed(view[:n])
            else:
                frame = self.parser.advance(n)
                frames = [frame] if frame is not None else []
            for frame in frames:
                self._file(frame)
        finally:
            if masked:
                _SIGMASK(signal.SIG_UNBLOCK, _SIGINT)

    def _file(self, frame: P.Frame) -> None:
        """Hand a received frame to whoever waits for it (or to the event callback)."""
        req = frame.meta.get("req")
        if req is None:
            if self.on_event is not None:
                self.on_event(frame)
            return
        with self._cond:
            self._replies[req] = frame
            self._cond.notify_all()

    def _lost_note(self) -> Optional[ClusterLost]:
        """The controller's note on a dead engine, when its LOST event did not arrive
        (the launcher can end it in between). Only read where the file is shared."""
        if self.closed or self.broken is not None or not self.path:
            return None
        for _ in range(3):
            try:
                with open(self.path + ".lost") as f:
                    return ClusterLost(str(json.load(f)["message"]))
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.1)
        return None

    def _recv_into(self, view: memoryview) -> Optional[int]:
        if not self.tls:
            return self.sock.recv_into(view)
        with self._io_lock:
            try:
                n = self.sock.recv_into(view)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return None
            if n and view is not self._stage:
                n = tls.read_more(self.sock, view, n)  # a large part: many records
            return n

    def _fail(self, e: BaseException) -> None:
        with self._cond:
            if self.broken is None:
                self.broken = e
            self._cond.notify_all()
            self._aside.notify_all()

    def _check(self) -> None:
        if self.closed:
            raise ValueError("this client is closed; create a new MultiEngineClient")
        if isinstance(self.broken, ClusterLost):
            raise ClusterLost(str(self.broken))
        if self.broken is not None:
            raise ClusterLost(
                f"lost the connection to the controller at {self.where}: "
                f"{self.broken or type(self.broken).__name__}. The cluster stopped or "
                f"died; 'mpiengine status' tells which") from self.broken

    def wait(self, req: int, timeout: Optional[float]) -> Optional[P.Frame]:
        """Return the reply to ``req``, or None if ``timeout`` seconds pass first.

        The caller reads the socket itself unless another thread is reading, in
        which case it waits to be handed its reply."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._waiters += 1
        try:
            while True:
                with self._cond:
                    if req in self._replies:
                        return self._replies.pop(req)
                    if self.closed or self.broken is not None:
                        self._check()
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return None
                    step = WAIT_SLICE if remaining is None else min(remaining, WAIT_SLICE)
                    if self._reading:
                        self._cond.wait(step)
                        continue
                    self._reading = True
                try:
                    self._read_some(step)
                except BaseException as e:  # noqa: B902
                    if isinstance(e, KeyboardInterrupt):
                        raise  # between reads: nothing was lost
                    self._fail(self._lost_note() or e)
                finally:
                    with self._cond:
                        self._reading = False
                        self._cond.notify_all()
        finally:
            with self._cond:
                self._waiters -= 1
                self._last_wait = time.monotonic()

    def close(self) -> None:
        if self.closed:
            return
        if self.broken is None:
            try:
                self.request(P.CLOSE, {})
            except (ClusterLost, ValueError):
                pass
        with self._cond:
            self.closed = True
            self._aside.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(timeout=2.0)
