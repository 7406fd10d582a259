"""The client's channel alone, against the controller's TCP server in a thread (no MPI).

Who reads the socket: a thread that waits for a reply reads it itself; when no
call has waited for a while, the reader thread reads what comes unasked.
"""
from __future__ import annotations

import gc
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

import pytest

from mpiengine import channel as C
from mpiengine import protocol as P
from mpiengine import server as S
from mpiengine.connection import ConnectionInfo
from mpiengine.errors import ClusterLost

pytestmark = pytest.mark.timeout(30)

KEY = "22" * 32


class FakeController:
    """A Server whose frames are answered by ``answer(server, conn, frame)``; ``later``
    runs queued actions in the server's thread."""

    def __init__(self, answer: Callable[[S.Server, S.Conn, P.Frame], None]) -> None:
        self.answer = answer
        self.server = S.Server("127.0.0.1", 0, bytes.fromhex(KEY), 1 << 20,
                               self._on_frame, lambda conn: None)
        self.actions: List[Callable[[S.Server], None]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _on_frame(self, conn: S.Conn, frame: P.Frame) -> None:
        self.answer(self.server, conn, frame)

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.server.poll(0.01)
            with self.lock:
                actions, self.actions = self.actions, []
            for action in actions:
                action(self.server)

    def later(self, action: Callable[[S.Server], None]) -> None:
        with self.lock:
            self.actions.append(action)

    def channel(self) -> C.Channel:
        ip, port = self.server.address
        return C.Channel(ConnectionInfo(ip=ip, port=port, key=KEY), "")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.shutdown()


def echo_with_event(server: S.Server, conn: S.Conn, frame: P.Frame) -> None:
    # An event first, then the reply: whoever reads the reply reads the event too.
    server.send(conn, P.STREAM, {"note": frame.meta.get("n")})
    server.send(conn, P.RESULT, {"req": frame.meta["req"], "n": frame.meta.get("n")})


@pytest.fixture
def fake():
    f = FakeController(echo_with_event)
    try:
        yield f
    finally:
        f.close()


def events_of(chan: C.Channel) -> List[Tuple[Any, str]]:
    seen: List[Tuple[Any, str]] = []
    chan.on_event = lambda frame: seen.append((frame.meta.get("note"),
                                               threading.current_thread().name))
    return seen


def test_a_waiting_call_reads_its_own_reply(fake):
    """After the first call (which the reader thread may serve: it was reading), the
    calls read for themselves: the events before their replies come in this thread.

    Only a pause of STAND_ASIDE between two calls lets the reader thread take the
    next one, by design; a loaded machine can stall this thread that long now and
    then (it did in CI), so a few are allowed. Handing every reply over fails."""
    chan = fake.channel()
    seen = events_of(chan)
    gc.disable()  # a full collection in a long pytest run is such a pause
    try:
        time.sleep(C.STAND_ASIDE + 0.2)  # the reader thread is reading by now
        for n in range(20):
            frame = chan.wait(chan.request(P.PING, {"n": n}), 5)
            assert frame.meta["n"] == n
        me = threading.current_thread().name
        assert [note for note, _ in seen] == list(range(20))
        handed = [note for note, thread in seen[1:] if thread != me]
        assert len(handed) <= 3, seen
    finally:
        gc.enable()
        chan.close()


def test_what_comes_unasked_is_read_when_no_call_waits(fake):
    chan = fake.channel()
    seen = events_of(chan)
    try:
        chan.wait(chan.request(P.PING, {"n": 0}), 5)
        fake.later(lambda server: server.broadcast(P.STREAM, {"note": "unasked"}))
        deadline = time.monotonic() + C.STAND_ASIDE + 2
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # not a call: only the reader thread can read it
        assert seen[1:] == [("unasked", "mpiengine-reader")]
    finally:
        chan.close()


def test_threads_waiting_at_once_are_handed_their_replies(fake):
    chan = fake.channel()
    problems: List[str] = []

    def work(base: int) -> None:
        for n in range(base, base + 50):
            frame: Optional[P.Frame] = chan.wait(chan.request(P.PING, {"n": n}), 10)
            if frame is None or frame.meta["n"] != n:
                problems.append(f"{n}: {frame}")

    threads = [threading.Thread(target=work, args=(i * 1000,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads) and problems == []
    finally:
        chan.close()


def test_the_controller_going_away_ends_a_waiting_call():
    fake = FakeController(lambda server, conn, frame: server.close(conn))
    chan = fake.channel()
    try:
        with pytest.raises(ClusterLost):
            chan.wait(chan.request(P.PING, {}), 5)
    finally:
        chan.close()
        fake.close()


def test_a_wait_that_times_out_leaves_the_reply_for_a_later_wait():
    replies: List[Tuple[S.Conn, Any]] = []
    fake = FakeController(lambda server, conn, frame: replies.append((conn, frame.meta["req"])))
    chan = fake.channel()
    try:
        req = chan.request(P.PING, {})
        assert chan.wait(req, 0.3) is None
        conn, r = replies[0]
        fake.later(lambda server: server.send(conn, P.RESULT, {"req": r, "late": True}))
        assert chan.wait(req, 5).meta["late"] is True
    finally:
        chan.close()
        fake.close()
