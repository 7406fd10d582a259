"""An engine rank: a listener thread that receives commands, and a main thread
that runs them.

The listener always has a receive posted for the next command header, so it sees
every command while the main thread is busy; it receives the payloads of the
commands addressed to this engine and queues them, and it sends the engine's
own control messages (live output, stacks). The main thread runs the queued
commands one by one, in the order the controller sent them, and sends each
reply itself, waiting until it has left before the next command may change the
objects it points into. Keeping user code on the main thread means signals
(interrupts) reach it, and user MPI calls on ``comm`` never mix with the
runtime's communicators.

With nothing in flight the listener sleeps on its doorbell (see :mod:`doorbell`);
while collectives are under way it polls with a back-off sleep (see
:class:`fabric.Backoff`); the main thread blocks on a queue: neither spins.
"""
from __future__ import annotations

import base64
import collections
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any, Deque, List, Optional, Tuple

from . import fabric
from .capture import FdCapture
from .doorbell import DEEP_SLEEP, Bell
from . import protocol as P
from .engine import Command, Engine

log = logging.getLogger(__name__)

#: A command's output is streamed to the client once it has run this long
#: (shorter commands show their output in the result only) ...
STREAM_AFTER = 0.2
#: ... in chunks at most this often.
STREAM_EVERY = 0.2
#: Replies up to this size also go early to the controller, for partial results.
PARTIAL_MAX = 64 * 1024


class EngineRank:
    def __init__(self, world: fabric.World, engine: Engine, bell: Bell,
                 idle_cap: float = 0.02) -> None:
        self.world = world
        self.engine = engine
        self.bell = bell
        self.idle_cap = idle_cap
        self.inbox: "queue.Queue[Optional[Command]]" = queue.Queue()
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
        self.cancelled: set = set()             # seqs interrupted before they started
        self.main_done = threading.Event()
        self.error: Optional[BaseException] = None

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
                    cmd = self.inbox.get()
                    if cmd is None:
                        break
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
                except KeyboardInterrupt:
                    # An interrupt that arrived just after user code ended: nothing to stop.
                    continue
        finally:
            self.main_done.set()
            self.bell.wake()
        listener.join()
        if self.error is not None:
            raise RuntimeError("the engine's listener thread failed") from self.error

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
        world, me = self.world, self.engine.id
        backoff = fabric.Backoff(cap=self.idle_cap)
        req, buf = world.post_header_recv()
        incoming: Deque[Command] = collections.deque()
        sending: List[Tuple[list, list]] = []
        header_open = True
        headers = 0  # received; the controller rings the doorbell once per header
        while True:
            progressed = False
            if header_open and fabric.test([req]):
                meta = json.loads(world.finish_header(buf, backoff))
                headers += 1
                progressed = True
                if self._on_header(meta, me, incoming):
                    header_open = False
                else:
                    req, buf = world.post_header_recv()
            while incoming and fabric.test(incoming[0].reqs):
                cmd = incoming.popleft()
                cmd.reqs = []
                self.inbox.put(cmd)
                progressed = True
            if not header_open and not incoming and not self._sentinel_sent:
                self.inbox.put(None)
                self._sentinel_sent = True
            if self.current is not None:
                self.fds.drain()  # output of C code and child processes, as it comes
            self._flush_stream(me)
            while self._ctl_out:
                sending.append(world.send_ctl(self._ctl_out.popleft()))
                progressed = True
            if sending:
                sending = [s for s in sending if not fabric.test(s[0])]
            if (not header_open and self.main_done.is_set() and not sending
                    and not incoming):
                return
            if progressed:
                backoff.reset()
                continue
            # Sleep in the kernel with nothing in flight and every header we were
            # rung for received (the ring may come before its header is in). The
            # controller rings with each header, the main thread wakes us for live
            # output and control messages, and the timeout is a safety net.
            quiet = (not sending and not incoming and header_open and not self._stream
                     and headers >= self.bell.rings)
            if quiet and self.bell.connected:
                woke = self.bell.sleep(DEEP_SLEEP)
            else:
                delay = backoff.next_delay()
                if self._stream:  # wake in time for the next chunk of live output
                    due = max(self.started + STREAM_AFTER, self._last_flush + STREAM_EVERY)
                    delay = max(0.0, min(delay, due - time.monotonic()))
                woke = self.bell.sleep(delay)
            if woke:
                backoff.reset()

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
        self._ctl_out.append(json.dumps(note).encode())
        self.bell.wake()

    # --- live output ---------------------------------------------------------------------
    def _sink(self, name: str, text: str) -> None:
        """Main thread: user code wrote ``text``; the listener decides when it goes out."""
        was_empty = not self._stream
        self._stream.append((self.current, name, text))
        if was_empty:
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

    def _on_header(self, meta: dict, me: int, incoming: Deque[Command]) -> bool:
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
        incoming.append(cmd)
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
