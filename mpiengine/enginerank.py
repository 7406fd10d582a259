"""An engine rank: a main thread that receives and runs commands, and a listener
thread that takes over receiving while a command runs long.

Receiving means: keeping a receive posted for the next command header, acting on
headers (interrupts, stack requests and shutdown at once; commands addressed to
this engine get their payload receives posted and are queued), completing
payloads, and sending the engine's own control messages (live output, stacks,
early notes). Whichever thread holds the receiving lock does one *turn* of that.

An idle main thread does the receiving itself, sleeping on its doorbell (see
:mod:`doorbell`) between turns, so a command costs one wake-up, not a listener
wake-up followed by a hand-off to the main thread. Before it runs a command it
arms an :class:`doorbell.Alarm`, and disarms it when the reply has left: if the
command takes longer than :data:`TAKEOVER`, the alarm wakes the listener, which
receives for as long as the command runs, so that interrupts, stack requests and
the next commands' payloads are seen while user code runs. A command that ends
in time never wakes the listener.

User code runs on the main thread, so signals (interrupts) reach it and user MPI
calls on ``comm`` never mix with the runtime's communicators. The main thread
sends each reply itself, waiting until it has left before the next command may
change the objects it points into. Nothing spins: idle threads sleep in
``poll(2)``; while collectives are under way, turns are spaced by a back-off
sleep (see :class:`fabric.Backoff`).
"""
from __future__ import annotations

import base64
import collections
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Deque, List, Optional, Tuple

from . import fabric
from .capture import FdCapture
from .doorbell import DEEP_SLEEP, Alarm, Bell
from . import protocol as P
from .engine import Command, Engine
from .heap import Heap

log = logging.getLogger(__name__)

#: A command's output is streamed to the client once it has run this long
#: (shorter commands show their output in the result only) ...
STREAM_AFTER = 0.2
#: ... in chunks at most this often.
STREAM_EVERY = 0.2
#: Replies up to this size also go early to the controller, for partial results.
PARTIAL_MAX = 64 * 1024
#: The listener takes over receiving once a command has run this long.
TAKEOVER = 0.005
#: The longest sleep of a listener with nothing to do (the alarm or the main thread
#: wake it; this only bounds the sleep).
LISTENER_SLEEP = 60.0


class EngineRank:
    def __init__(self, world: fabric.World, engine: Engine, bell: Bell,
                 idle_cap: float = 0.02, heap: Optional[Heap] = None) -> None:
        self.world = world
        self.engine = engine
        self.bell = bell
        self.idle_cap = idle_cap
        self.heap = heap if heap is not None else Heap(enabled=False)
        self.alarm = Alarm()
        self.ready: Deque[Optional[Command]] = collections.deque()  # None: shut down
        self._ctl_out: Deque[bytes] = collections.deque()
        self._stream: Deque[Tuple[int, str, str]] = collections.deque()
        self._streamed: set = set()        # seqs whose output went out live
        self._last_flush = 0.0
        self.started = 0.0
        engine.sink = self._sink
        self.fds = FdCapture()
        engine.fd_capture = self.fds
        for fd in self.fds.read_fds:
            bell.watch_fd(fd)
        self.stopping = False
        self.current: Optional[int] = None      # seq of the command the main thread runs
        self.busy = False                       # the main thread is running a command
        self.cancelled: set = set()             # seqs interrupted before they started
        self.main_done = threading.Event()
        self.error: Optional[BaseException] = None
        # Receiving state, touched only under ``_receiving``.
        self._receiving = threading.Lock()
        self._doorbell = threading.Lock()  # held by the one thread sleeping on the bell
        self._listener_active = False
        self._backoff = fabric.Backoff(cap=idle_cap)
        self._req, self._buf = world.post_header_recv()
        self._incoming: Deque[Command] = collections.deque()
        self._sending: List[Tuple[list, list]] = []
        self._header_open = True
        self._headers = 0  # received; the controller rings the doorbell once per header

    # --- main thread -------------------------------------------------------------------
    def run(self) -> None:
        """Run commands until shutdown; return when the listener has finished too."""
        signal.signal(signal.SIGINT, self._on_sigint)
        listener = threading.Thread(target=self._listen_guarded, name="mpiengine-listener",
                                    daemon=True)
        listener.start()
        try:
            while True:
                try:
                    cmd = self._next_command()
                    if cmd is None:
                        break
                    self.busy = True
                    self.alarm.arm(TAKEOVER)
                    try:
                        self._run(cmd)
                    finally:
                        self.busy = False
                        self.alarm.disarm()
                        self.heap.busy()
                except KeyboardInterrupt:
                    # An interrupt that arrived just after user code ended: nothing to stop.
                    continue
        finally:
            self.main_done.set()
            self.alarm.wake()
        listener.join()
        if self.error is not None:
            raise RuntimeError("the engine's listener thread failed") from self.error

    def _run(self, cmd: Command) -> None:
        seq = cmd.meta.get("seq")
        self.started = time.monotonic()
        self.current = seq
        if self.stopping:
            reply = self.engine.cancelled(cmd, "the cluster is shutting down")
        elif seq in self.cancelled:
            self.cancelled.discard(seq)
            reply = self.engine.cancelled(cmd, "interrupted before it started",
                                          ename="KeyboardInterrupt")
        else:
            reply = self.engine.run(cmd)
        self.current = None
        self._note_done(cmd, reply)
        self._send_reply(cmd, reply)

    def _next_command(self) -> Optional[Command]:
        """Receive until a command is ready (None: shut down), sleeping when idle."""
        while True:
            with self._receiving:
                if self.ready:
                    return self.ready.popleft()
            if not self._doorbell.acquire(blocking=False):
                self.bell.wake()  # the listener sleeps on it: have it hand it over
                self._doorbell.acquire()
            try:
                self._turn_and_sleep()
            finally:
                self._doorbell.release()

    def _send_reply(self, cmd: Command, reply: Tuple[Any, Any]) -> None:
        """Send a command's reply, and wait until it has left.

        A reply points into the namespace's objects (arrays go without a copy), so
        the next command, which may change them, runs only once it is out. A small
        reply leaves at once; a large one as fast as the controller takes it.
        """
        meta, data = reply
        reqs, _keep = self.world.send_reply(cmd.meta["seq"], meta, data)
        if memoryview(meta).nbytes + memoryview(data).nbytes <= fabric.INLINE_REPLY:
            # One message that leaves at once (a larger reply leaves at the
            # controller's pace): wait for it by yielding the core.
            spin = time.monotonic() + fabric.SPIN_AFTER_PROGRESS  # it leaves in microseconds
            while not fabric.test(reqs) and time.monotonic() < spin:
                os.sched_yield()
        fabric.wait(reqs, fabric.Backoff(cap=self.idle_cap))

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # Only user code is interrupted; the runtime's own bookkeeping never is.
        if self.engine.in_user_code:
            raise KeyboardInterrupt

    def _interrupt_main(self) -> None:
        if self.engine.in_user_code:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    # --- listener thread ---------------------------------------------------------------
    def _listen_guarded(self) -> None:
        try:
            self._listen()
        except BaseException as e:  # a broken runtime must not leave the job hanging
            log.exception("engine %d listener failed", self.engine.id)
            self.error = e
            self.world.abort(3)

    def _listen(self) -> None:
        while True:
            if self.main_done.is_set():
                # Shut down: finish sending what is queued, then end.
                with self._receiving:
                    if not self._header_open and not self._sending and not self._incoming:
                        return
                with self._doorbell:
                    self._turn_and_sleep()
            elif not self.busy:
                # The main thread receives while it is idle: sleep until a command has
                # run for TAKEOVER (the alarm), or until the main thread ends (it wakes
                # us). Nothing else needs this thread: no safety-net wake-ups.
                self._listener_active = False
                self.alarm.sleep(LISTENER_SLEEP)
            elif self._doorbell.acquire(blocking=False):
                self._listener_active = True
                try:
                    self._turn_and_sleep(lambda: self.busy or self.main_done.is_set())
                finally:
                    self._doorbell.release()
            else:
                time.sleep(0.001)  # the main thread is just leaving its sleep

    # --- receiving (whichever thread holds the lock) ---------------------------------------
    def _turn_and_sleep(self, still_mine: Optional[Callable[[], bool]] = None) -> None:
        """One turn of receiving; then, if it made no progress, sleep until there may be.

        The caller holds ``_doorbell``: only one thread sleeps on the doorbell and
        reads its rings at a time, so the rings counted here cannot change between
        the check that all is quiet and the sleep. ``still_mine`` (the listener's)
        says whether receiving is still this thread's job.
        """
        with self._receiving:
            if still_mine is not None and not still_mine():
                return
            # With nothing in flight and every header we were rung for received, a
            # turn would find nothing new: sleep first (a ring already waiting ends
            # the sleep at once). A running command's captured output needs turns.
            if not (self._quiet() and self.current is None) and self._turn():
                self._backoff.reset()
                return
            # Sleep in the kernel when quiet (the ring may come before its header is
            # in). The controller rings with each header, user code's output wakes
            # the listener, and the timeout is a safety net.
            if self._quiet() and self.bell.connected:
                delay = DEEP_SLEEP
                release = self.heap.release_in() if still_mine is None else None
                if release is not None:  # the main thread gives free memory back
                    delay = min(delay, release)
            else:
                delay = self._backoff.next_delay()
                if self._stream:  # wake in time for the next chunk of live output
                    due = max(self.started + STREAM_AFTER, self._last_flush + STREAM_EVERY)
                    delay = max(0.0, min(delay, due - time.monotonic()))
        if self.bell.sleep(delay):
            self._backoff.reset()
        elif still_mine is None:
            self.heap.release_if_due()

    def _quiet(self) -> bool:
        """Nothing in flight, nothing to send, and every header we were rung for in."""
        return (not self._sending and not self._incoming and self._header_open
                and not self._stream and not self._ctl_out
                and self._headers >= self.bell.rings)

    def _turn(self) -> bool:
        """Receive and send what can be now; return True if anything happened."""
        world, me = self.world, self.engine.id
        progressed = False
        if self._header_open and fabric.test([self._req]):
            meta = world.finish_header(self._buf, self._backoff)
            self._headers += 1
            progressed = True
            if self._on_header(meta, me):
                self._header_open = False
            else:
                self._req, self._buf = world.post_header_recv()
        while self._incoming and fabric.test(self._incoming[0].reqs):
            cmd = self._incoming.popleft()
            cmd.reqs = []
            self.ready.append(cmd)
            progressed = True
        if not self._header_open and not self._incoming and not self._sentinel_sent:
            self.ready.append(None)
            self._sentinel_sent = True
        if self.current is not None:
            self.fds.drain()  # output of C code and child processes, as it comes
        self._flush_stream(me)
        while self._ctl_out:
            self._sending.append(world.send_ctl(self._ctl_out.popleft()))
            progressed = True
        if self._sending:
            self._sending = [s for s in self._sending if not fabric.test(s[0])]
        return progressed

    _sentinel_sent = False

    def _note_done(self, cmd: Command, reply: Tuple[bytes, Any]) -> None:
        """Tell the controller early that this engine is done with a long or failed command.

        The reply itself travels in the command's gather, which completes only when
        every target is done; this note lets the client see failures as they happen
        and ``PendingResult.partial()`` show who has finished. Fast commands that
        succeed skip it, so they cost nothing extra.
        """
        error = self.engine.last_error
        if error is None and time.monotonic() - self.started < STREAM_AFTER:
            return
        note: dict = {"kind": "done", "seq": cmd.meta.get("seq"), "id": self.engine.id,
                      "ok": error is None, "error": error}
        meta, data = reply
        if memoryview(meta).nbytes + memoryview(data).nbytes <= PARTIAL_MAX:
            note["blob"] = [base64.b64encode(bytes(meta)).decode(),
                            base64.b64encode(bytes(data)).decode()]
        self._ctl_out.append(json.dumps(note).encode())  # sent by the next turn

    # --- live output ---------------------------------------------------------------------
    def _sink(self, name: str, text: str) -> None:
        """Main thread: user code wrote ``text``; the listener decides when it goes out."""
        was_empty = not self._stream
        self._stream.append((self.current, name, text))
        if was_empty and self._listener_active:
            self.bell.wake()

    def _flush_stream(self, me: int) -> None:
        """Send buffered output of long-running commands; drop that of short ones."""
        if not self._stream:
            return
        now = time.monotonic()
        running = self.current
        live = running is not None and now - self.started >= STREAM_AFTER
        if live and now - self._last_flush < STREAM_EVERY:
            return
        chunks: dict = {}
        while self._stream:
            seq, name, text = self._stream[0]
            if seq == running and not live:
                break  # too early to tell whether this command is a long one
            self._stream.popleft()
            if seq == running or seq in self._streamed:
                chunks.setdefault(seq, []).append([name, text])
            # else: a command that ended quickly; its result holds the output
        for seq, parts in chunks.items():
            self._streamed.add(seq)
            self._ctl_out.append(json.dumps({"kind": "stream", "seq": seq, "id": me,
                                             "chunks": _merge(parts)}).encode())
        self._streamed = {s for s in self._streamed if s == running}
        if chunks:
            self._last_flush = now

    def _on_header(self, meta: dict, me: int) -> bool:
        """Handle one command header; return True if it was the shutdown command."""
        op = meta["op"]
        targets = tuple(meta["targets"])
        if op == P.SHUTDOWN:
            self.stopping = True
            self._interrupt_main()
            return True
        if me not in targets:
            return False
        if op == P.INTERRUPT:
            seq = meta.get("seq")
            if seq is not None:
                self.cancelled.add(seq)
            if seq is None or self.current == seq:
                self._interrupt_main()
            return False
        if op == P.STACKS:
            self._ctl_out.append(json.dumps({"kind": "stacks", "sid": meta["sid"], "id": me,
                                             "busy": self.current is not None,
                                             "stack": main_stack(self.current is not None)}).encode())
            return False
        down = self.world.group(targets)
        cmd = Command(op, meta, targets)
        cmd.reqs, cmd.parts = self.world.recv_parts(down, meta.get("parts", []))
        counts = meta.get("counts")
        if counts is not None:
            r, cmd.piece = self.world.recv_scatter(down, counts[targets.index(me)])
            cmd.reqs.append(r)
        self._incoming.append(cmd)
        return False


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def main_stack(busy: bool) -> str:
    """Return the main thread's Python stack, without this package's own frames."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None or not busy:
        return "(idle: waiting for a command)"
    entries = traceback.extract_stack(frame)
    ours = [os.path.abspath(e.filename).startswith(_PACKAGE_DIR + os.sep) for e in entries]
    # User code starts at the first frame the package called; what it calls in turn
    # (comm.allreduce of EngineComm, say) stays in view.
    first = next((i for i in range(1, len(entries)) if ours[i - 1] and not ours[i]), 0)
    user = entries[first:]
    return "".join(traceback.format_list(user))


def _merge(parts: list) -> list:
    """Join consecutive writes to the same stream: fewer, larger chunks."""
    out: list = []
    for name, text in parts:
        if out and out[-1][0] == name:
            out[-1][1] += text
        else:
            out.append([name, text])
    return out
