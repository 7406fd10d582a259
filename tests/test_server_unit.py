"""The controller's TCP server alone: real sockets on 127.0.0.1, no MPI, no controller.

The server runs ``poll()`` in a thread (or, where timing must be exact, in the
test itself). Clients are plain blocking sockets that speak the protocol with
the functions of :mod:`mpiengine.protocol`. Every frame the server delivers is
echoed back from ``on_frame``, so a client can tell that it was served.
"""
from __future__ import annotations

import random
import socket
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

import pytest

from mpiengine import protocol as P
from mpiengine import server as S

pytestmark = pytest.mark.timeout(30)

KEY = bytes.fromhex("11" * 32)
_RNG = random.Random(20240611)  # garbage is arbitrary but the same on every run
MAX_MESSAGE = 1 << 20


def poll_for(predicate: Callable[[], Any], timeout: float = 5.0, step: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(step)


class Harness:
    """A Server on an ephemeral port that records frames and closes, and echoes frames."""

    def __init__(self, threaded: bool = True, max_message: int = MAX_MESSAGE) -> None:
        self.frames: List[Tuple[int, P.Frame]] = []
        self.closed: List[int] = []
        self.lock = threading.Lock()
        self.server = S.Server("127.0.0.1", 0, KEY, max_message, self._on_frame, self._on_close)
        self.stop = threading.Event()
        self.error: Optional[BaseException] = None
        self.thread: Optional[threading.Thread] = None
        if threaded:
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        try:
            while not self.stop.is_set():
                self.server.poll(0.02)
        except BaseException as e:  # noqa: B902 - reported by the test's teardown
            self.error = e

    def _on_frame(self, conn: S.Conn, frame: P.Frame) -> None:
        with self.lock:
            self.frames.append((conn.id, frame))
        self.server.send(conn, P.RESULT, {"req": frame.meta.get("req"), "echo": frame.meta},
                         frame.parts)

    def _on_close(self, conn: S.Conn) -> None:
        with self.lock:
            self.closed.append(conn.id)

    @property
    def address(self) -> Tuple[str, int]:
        return self.server.address

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)
            assert not self.thread.is_alive(), "the server loop did not stop"
        self.server.shutdown()
        if self.error is not None:
            raise self.error


@pytest.fixture
def srv():
    h = Harness()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def manual():
    """A server whose poll() the test calls itself."""
    h = Harness(threaded=False)
    try:
        yield h
    finally:
        h.close()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def is_closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True if the server closes ``sock`` within ``timeout`` (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionError:
        return True
    except socket.timeout:
        return False


class Client:
    """A protocol client over a plain blocking socket."""

    def __init__(self, address: Tuple[str, int], key: bytes = KEY,
                 authenticate: bool = True) -> None:
        self.sock = socket.create_connection(address, timeout=5)
        self.key = key
        if authenticate:
            self.handshake()

    def handshake(self) -> None:
        hello = recv_exact(self.sock, P.HELLO_SIZE)
        auth, nonce_s, nonce_c = P.client_auth(self.key, hello)
        self.sock.sendall(auth)
        proof = recv_exact(self.sock, P.PROOF_SIZE)
        keys = P.client_check_proof(self.key, nonce_s, nonce_c, proof)
        self.sender = P.Sender(keys.send)
        self.parser = P.FrameParser(keys.recv)

    def frame_bytes(self, kind: int, meta: dict, parts=()) -> bytes:
        return b"".join(bytes(memoryview(c).cast("B"))
                        for c in self.sender.encode(kind, meta, parts))

    def send(self, kind: int, meta: dict, parts=()) -> None:
        self.sock.sendall(self.frame_bytes(kind, meta, parts))

    def recv(self) -> P.Frame:
        while True:
            view = self.parser.want()
            n = self.sock.recv_into(view)
            if n == 0:
                raise EOFError("server closed the connection")
            frame = self.parser.advance(n)
            if frame is not None:
                return frame

    def request(self, req: int, parts=()) -> P.Frame:
        self.send(P.EXECUTE, {"req": req, "code": f"x = {req}"}, parts)
        reply = self.recv()
        assert reply.kind == P.RESULT and reply.meta["req"] == req
        return reply

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def clients():
    made: List[Client] = []

    def make(*args, **kw) -> Client:
        c = Client(*args, **kw)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.close()


# --- a well-behaved client -------------------------------------------------------------
def test_binds_loopback_on_an_ephemeral_port(srv):
    ip, port = srv.address
    assert ip == "127.0.0.1" and port > 0


def test_correct_client_is_served(srv, clients):
    c = clients(srv.address)
    reply = c.request(1, [b"abc", b"", b"z" * 100_000])
    assert reply.meta["echo"] == {"req": 1, "code": "x = 1"}
    assert [bytes(p) for p in reply.parts] == [b"abc", b"", b"z" * 100_000]
    assert c.request(2).meta["req"] == 2
    assert [f.meta["req"] for _, f in srv.frames] == [1, 2]
    assert srv.closed == []


def test_several_frames_in_one_write_are_all_delivered_in_order(srv, clients):
    c = clients(srv.address)
    c.sock.sendall(b"".join(c.frame_bytes(P.EXECUTE, {"req": i}) for i in range(50)))
    assert [c.recv().meta["req"] for _ in range(50)] == list(range(50))


def test_handshake_and_first_frame_pipelined(srv):
    # A client may send its frames right behind its AUTH, before reading the proof.
    sock = socket.create_connection(srv.address, timeout=5)
    try:
        hello = recv_exact(sock, P.HELLO_SIZE)
        auth, nonce_s, nonce_c = P.client_auth(KEY, hello)
        # The session keys depend only on the nonces: compute them as the server will.
        c2s = P._mac(KEY, b"c2s", nonce_s, nonce_c)
        frame = b"".join(bytes(c) for c in P.Sender(c2s).encode(P.PING, {"req": 9}))
        sock.sendall(auth + frame)
        proof = recv_exact(sock, P.PROOF_SIZE)
        P.client_check_proof(KEY, nonce_s, nonce_c, proof)
        assert poll_for(lambda: srv.frames)
        assert srv.frames[0][1].meta == {"req": 9}
    finally:
        sock.close()


def test_client_leaving_is_reported_once(srv, clients):
    c = clients(srv.address)
    c.request(1)
    c.close()
    assert poll_for(lambda: srv.closed)
    time.sleep(0.1)
    assert len(srv.closed) == 1 and srv.server.conns == {}


# --- clients that must be refused ---------------------------------------------------------
def test_wrong_key_is_closed_and_nothing_is_delivered(srv, clients):
    c = clients(srv.address, key=bytes.fromhex("22" * 32), authenticate=False)
    hello = recv_exact(c.sock, P.HELLO_SIZE)
    auth, _, _ = P.client_auth(c.key, hello)
    c.sock.sendall(auth)
    assert is_closed_by_peer(c.sock)  # no proof comes back: the connection just ends
    assert poll_for(lambda: srv.closed)
    assert srv.frames == []
    good = clients(srv.address)       # and the server keeps serving
    good.request(1)


def test_wrong_key_is_logged_as_a_warning_once_per_burst(srv, clients, caplog):
    """An admin sees who knocked with a wrong key (not the key), without a log flood."""
    caplog.set_level("WARNING", logger=S.__name__)
    for _ in range(5):
        c = clients(srv.address, key=bytes.fromhex("22" * 32), authenticate=False)
        auth, _, _ = P.client_auth(c.key, recv_exact(c.sock, P.HELLO_SIZE))
        c.sock.sendall(auth)
        assert is_closed_by_peer(c.sock)
    poll_for(lambda: len(srv.closed) >= 5)
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "127.0.0.1" in lines[0] and "did not prove knowledge of the key" in lines[0]
    assert "22" * 8 not in lines[0] and "11" * 8 not in lines[0]


def test_wrong_key_then_frames_are_never_delivered(srv, clients):
    c = clients(srv.address, key=bytes.fromhex("22" * 32), authenticate=False)
    hello = recv_exact(c.sock, P.HELLO_SIZE)
    auth, nonce_s, nonce_c = P.client_auth(c.key, hello)
    c2s = P._mac(c.key, b"c2s", nonce_s, nonce_c)
    frame = b"".join(bytes(x) for x in P.Sender(c2s).encode(P.EXECUTE, {"code": "evil"}))
    try:
        c.sock.sendall(auth + frame * 3)
    except ConnectionError:
        pass
    assert is_closed_by_peer(c.sock)
    time.sleep(0.1)
    assert srv.frames == []


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n",
    bytes(P.AUTH_SIZE),
    _RNG.randbytes(4096),
], ids=["http", "zeros", "random"])
def test_garbage_before_the_handshake_closes_only_that_connection(srv, clients, garbage):
    good = clients(srv.address)
    bad = clients(srv.address, authenticate=False)
    try:
        bad.sock.sendall(garbage)
    except ConnectionError:
        pass
    assert is_closed_by_peer(bad.sock)
    good.request(1)
    late = clients(srv.address)
    late.request(2)
    assert all(f.meta["req"] in (1, 2) for _, f in srv.frames)


@pytest.mark.parametrize("garbage", [
    _RNG.randbytes(500),
    b"MPE1" + _RNG.randbytes(200),
    P.HEADER.pack(P.MAGIC, P.EXECUTE, 0, 0, 0, 2) + b"{}" + bytes(P.TAG_SIZE),  # bad tag
], ids=["random", "magic-then-random", "bad-tag"])
def test_garbage_after_the_handshake_closes_only_that_connection(srv, clients, garbage):
    good = clients(srv.address)
    bad = clients(srv.address)
    bad.request(1)  # authenticated and served
    bad.sock.sendall(garbage)
    assert is_closed_by_peer(bad.sock)
    good.request(2)
    assert [f.meta["req"] for _, f in srv.frames] == [1, 2]


def test_replayed_frame_closes_the_connection(srv, clients):
    c = clients(srv.address)
    data = c.frame_bytes(P.EXECUTE, {"req": 1, "code": "once"})
    c.sock.sendall(data)
    assert c.recv().meta["req"] == 1
    c.sock.sendall(data)
    assert is_closed_by_peer(c.sock)
    assert len(srv.frames) == 1


def test_frame_recorded_on_one_connection_is_refused_on_another(srv, clients):
    a = clients(srv.address)
    data = a.frame_bytes(P.EXECUTE, {"req": 1, "code": "recorded"})
    b = clients(srv.address)
    b.sock.sendall(data)  # the same seq (0) but another session key
    assert is_closed_by_peer(b.sock)
    assert srv.frames == []


def test_oversized_frame_is_refused_on_its_lengths(srv, clients):
    c = clients(srv.address)
    head = P.HEADER.pack(P.MAGIC, P.PUSH, 0, 1, 0, 2) + P.LENGTH.pack(MAX_MESSAGE + 1)
    c.sock.sendall(head)  # only the header and lengths: nothing else is sent
    assert is_closed_by_peer(c.sock)
    assert srv.frames == []
    clients(srv.address).request(1)


def test_client_vanishing_mid_frame(srv, clients):
    c = clients(srv.address)
    data = c.frame_bytes(P.EXECUTE, {"req": 1}, [b"x" * 10_000])
    c.sock.sendall(data[:5000])
    c.close()
    assert poll_for(lambda: srv.closed)
    assert srv.frames == []
    clients(srv.address).request(2)


# --- connections that never authenticate ---------------------------------------------------
def test_unauthenticated_connection_is_closed_after_the_handshake_timeout(monkeypatch):
    monkeypatch.setattr(S, "HANDSHAKE_TIMEOUT", 0.3)
    h = Harness()
    try:
        silent = Client(h.address, authenticate=False)
        partial = Client(h.address, authenticate=False)
        recv_exact(partial.sock, P.HELLO_SIZE)
        partial.sock.sendall(b"x" * 10)  # a few bytes of AUTH, then nothing
        authed = Client(h.address)
        start = time.monotonic()
        assert is_closed_by_peer(silent.sock, timeout=5)
        assert is_closed_by_peer(partial.sock, timeout=5)
        assert time.monotonic() - start < 5
        # An authenticated client idle for as long is left alone.
        time.sleep(0.5)
        assert authed.request(1).meta["req"] == 1
        for c in (silent, partial, authed):
            c.close()
    finally:
        h.close()


def test_idle_connections_do_not_stop_a_real_client(srv, clients):
    idle = [socket.create_connection(srv.address, timeout=5) for _ in range(50)]
    try:
        start = time.monotonic()
        c = clients(srv.address)
        for i in range(5):
            c.request(i)
        assert time.monotonic() - start < 5
        assert poll_for(lambda: len(srv.server.conns) == 51)
    finally:
        for s in idle:
            s.close()
    assert poll_for(lambda: len(srv.server.conns) == 1)


# --- exact timing: the test drives poll() ------------------------------------------------------
def manual_client(h: Harness) -> Client:
    """Connect and authenticate a client to a server that only moves when polled."""
    c = Client(h.address, authenticate=False)
    assert poll_for(lambda: h.server.poll(0.05) or h.server.conns)
    hello = recv_exact(c.sock, P.HELLO_SIZE)
    auth, nonce_s, nonce_c = P.client_auth(KEY, hello)
    c.sock.sendall(auth)
    (conn,) = h.server.conns.values()
    assert poll_for(lambda: h.server.poll(0.05) or conn.authenticated)
    proof = recv_exact(c.sock, P.PROOF_SIZE)
    keys = P.client_check_proof(KEY, nonce_s, nonce_c, proof)
    c.sender, c.parser = P.Sender(keys.send), P.FrameParser(keys.recv)
    return c


def test_manual_poll_serves_a_frame(manual):
    c = manual_client(manual)
    try:
        c.send(P.EXECUTE, {"req": 1})
        assert poll_for(lambda: manual.server.poll(0.05) and manual.frames)
        assert c.recv().meta["req"] == 1
    finally:
        c.close()


def test_frame_followed_by_close_is_still_delivered(manual):
    c = manual_client(manual)
    try:
        c.send(P.EXECUTE, {"req": 1, "block": False, "code": "x = 1"})
        c.sock.shutdown(socket.SHUT_WR)  # the client is done sending
        time.sleep(0.2)                  # both the frame and the EOF have arrived
        poll_for(lambda: manual.server.poll(0.05) and manual.closed, timeout=3)
        assert manual.closed                              # the close was seen
        assert [f.meta["req"] for _, f in manual.frames] == [1]
    finally:
        c.close()
