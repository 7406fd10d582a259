"""Every MPI call of mpiengine, and the only module that imports mpi4py.

Communicators (``world`` is ``COMM_WORLD``; rank 0 is the controller, rank
``i + 1`` is engine ``i``)::

    user       engines only (engine id == rank); handed to user code as ``comm``,
               never used by the runtime
    hdr        a dup of world: every command's fixed-size header goes from rank 0
               to each engine as a point-to-point message (a linear broadcast: no
               engine waits for another to pass it on, which matters when ranks
               outnumber cores), so all engines see every command in one global order
    down[T]    controller + the engines of target set T: the command's payload
               (Ibcast of each part, Iscatterv of a scatter)
    rep        a dup of world: each engine's replies to the controller, point to
               point, in the order the engine ran the commands. A small reply is
               one message (envelope + blobs); a large one is its envelope, then
               its meta blob and its data blob as messages of their own, received
               straight into their final buffers
    ctl        a dup of world: the engines' own small messages (live output,
               stacks, early notes)

Per-target-set communicators let commands to disjoint engines overlap; within
each, every member starts collectives in command order, which is the order the
controller sent the headers in. Replies go point to point rather than as a
gather: no engine waits for another to pass a reply on (ranks outnumber cores),
a small reply leaves as soon as it is sent, and the controller takes each as it
arrives.

Nothing here blocks in MPI while idle: callers poll requests with ``test``
and sleep with :class:`Backoff` (a blocking MPI wait burns a whole core).
The one blocking call is ``Create_group`` for a target set seen for the first
time, done by the controller and the engines of that set right after its header.
"""
from __future__ import annotations

import os
import pickle
import socket
import struct
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import mpi4py

from .payload import alloc

mpi4py.rc.thread_level = "multiple"
mpi4py.rc.finalize = True
from mpi4py import MPI  # noqa: E402  (rc must be set before the import initializes MPI)

HDR_SIZE = 1024
_HDR_LEN = struct.Struct("!I")
#: A reply's envelope: the command's seq, the meta blob's and the data blob's sizes.
_ENVELOPE = struct.Struct("!QQQ")
#: Replies up to this size (both blobs) travel inside their envelope, copied once.
INLINE_REPLY = 64 * 1024
TAG_ENVELOPE, TAG_META, TAG_DATA = 0, 1, 2

Requests = List[Any]

#: ``os._exit`` as it is before the runtime has engines report their exits.
_exit = os._exit


def _ended_by_abort(code: int) -> None:
    """End this process after ``MPI_Abort`` returned.

    MPICH's returns once it has told the launcher, which ends the job a moment
    later: whatever the caller did in between (an engine's reply to the command
    that aborted) would look as if the abort had not happened."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    _exit(code if 0 < code < 256 else 1)


class Backoff:
    """Sleep between polls: short while an exchange is under way, long when idle.

    Polls stay fast (``first`` seconds apart) for ``hot`` seconds after the last
    progress, because a collective in flight needs every rank on its path to
    poll; after that the sleep grows with the idle time, up to ``cap``. ``reset()``
    marks progress.
    """

    def __init__(self, cap: float = 0.02, hot: float = 0.05, first: float = 5e-5) -> None:
        self.cap, self.hot, self.first = cap, hot, first
        self.reset()

    def reset(self) -> None:
        self._since = time.monotonic()

    def next_delay(self) -> float:
        idle = time.monotonic() - self._since
        if idle < self.hot:
            return self.first
        return min(self.cap, max(self.first, (idle - self.hot) * 0.25))

    def idle(self) -> float:
        """Seconds since the last progress."""
        return time.monotonic() - self._since

    def sleep(self) -> None:
        time.sleep(self.next_delay())


#: Right after progress, poll by yielding the core this long before sleeping between
#: polls: the next step of an exchange is usually microseconds away, and a short
#: sleep costs a timer wake-up.
SPIN_AFTER_PROGRESS = 0.002


def test(reqs: Requests) -> bool:
    """Return True when every request completed (drives MPI progress)."""
    return MPI.Request.Testall(reqs) if reqs else True


def wait(reqs: Requests, backoff: Optional[Backoff] = None, timeout: Optional[float] = None) -> bool:
    """Poll until ``reqs`` complete, sleeping between polls; False on timeout."""
    backoff = backoff or Backoff(cap=0.005)
    deadline = None if timeout is None else time.monotonic() + timeout
    while not test(reqs):
        if deadline is not None and time.monotonic() > deadline:
            return False
        backoff.sleep()
    return True


class World:
    """This rank's view of the job: its role, and the runtime's communicators."""

    def __init__(self) -> None:
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError(
                "mpiengine needs an MPI library with MPI_THREAD_MULTIPLE support; "
                f"this one gives level {MPI.Query_thread()} ({MPI.Get_library_version()[:40]!r})")
        world = MPI.COMM_WORLD
        self.rank = world.Get_rank()
        self.size = world.Get_size()
        if self.size < 2:
            raise RuntimeError(
                "mpiengine needs at least 2 MPI ranks (a controller and one engine); "
                "start it as 'mpiexec -n 5 python -m mpiengine serve'")
        self.n_engines = self.size - 1
        self.is_controller = self.rank == 0
        self.engine_id = self.rank - 1
        self.world = world
        self.hdr = world.Dup()
        self.parent = world.Dup()
        self.ctl = world.Dup()
        self.rep = world.Dup()
        self.all = tuple(range(self.n_engines))
        self._groups: Dict[Tuple[int, ...], Any] = {self.all: world.Dup()}
        color = MPI.UNDEFINED if self.is_controller else 0
        user = world.Split(color, self.rank)
        self.user = EngineComm(user) if user != MPI.COMM_NULL else user
        self._pending_free: List[Any] = []

    # --- set-up and teardown -------------------------------------------------------
    def exchange_info(self, info: dict) -> Optional[List[dict]]:
        """Gather each engine's info dict at the controller (start-up only)."""
        return self.world.gather(info, root=0)

    def share(self, obj: Any) -> Any:
        """Broadcast a small object from the controller to every engine (start-up only)."""
        return self.world.bcast(obj, root=0)

    def abort(self, code: int = 1) -> None:
        """End the whole job; never returns."""
        self.world.Abort(code)
        _ended_by_abort(code)

    def report_aborts(self, before: Callable[[str, int], None]) -> None:
        """Have user code's ``comm.Abort(code)`` and ``MPI.COMM_WORLD.Abort(code)``
        call ``before(name, code)`` first, and never return (engine ranks only).

        ``MPI.COMM_WORLD`` becomes an object of :class:`WorldComm` for the same
        communicator; the runtime keeps using its own reference."""
        _Reporting.before_abort = before
        if not isinstance(MPI.COMM_WORLD, WorldComm):
            MPI.COMM_WORLD = WorldComm(self.world)

    def processor_name(self) -> str:
        try:
            return MPI.Get_processor_name()
        except Exception:
            return socket.gethostname()

    # --- target sets ------------------------------------------------------------------
    def known(self, targets: Tuple[int, ...]) -> bool:
        return targets in self._groups

    def group(self, targets: Tuple[int, ...]) -> Any:
        """Return the payload communicator of a target set, creating it the first time.

        Collective over the controller and the engines in ``targets`` only.
        """
        comm = self._groups.get(targets)
        if comm is None:
            grp = self.world.Get_group().Incl([0] + [t + 1 for t in targets])
            comm = self.parent.Create_group(grp, tag=1)
            grp.Free()
            self._groups[targets] = comm
        return comm

    # --- headers (controller sends, every engine receives) --------------------------
    # A header is a small dict of plain values, pickled: one C call to make and one to
    # read, which shows when 32 engines each read every header. (Only engines unpickle
    # it, and only what their controller sent; the controller unpickles nothing.)
    def send_header(self, header: dict) -> Tuple[Requests, List[Any]]:
        meta = pickle.dumps(header, protocol=5)
        buf = bytearray(HDR_SIZE)
        _HDR_LEN.pack_into(buf, 0, len(meta))
        inline = meta[:HDR_SIZE - _HDR_LEN.size]
        buf[_HDR_LEN.size:_HDR_LEN.size + len(inline)] = inline
        reqs = [self.hdr.Isend([buf, MPI.BYTE], dest=r) for r in range(1, self.size)]
        keep = [buf]
        rest = meta[len(inline):]
        if rest:
            rest_buf = bytearray(rest)
            reqs += [self.hdr.Isend([rest_buf, MPI.BYTE], dest=r) for r in range(1, self.size)]
            keep.append(rest_buf)
        return reqs, keep

    def post_header_recv(self) -> Tuple[Any, bytearray]:
        buf = bytearray(HDR_SIZE)
        return self.hdr.Irecv([buf, MPI.BYTE], source=0), buf

    def finish_header(self, buf: bytearray, backoff: Backoff) -> dict:
        """Return a received header, receiving its overflow part if any."""
        (n,) = _HDR_LEN.unpack_from(buf, 0)
        room = HDR_SIZE - _HDR_LEN.size
        meta = bytes(buf[_HDR_LEN.size:_HDR_LEN.size + min(n, room)])
        if n > room:
            rest = bytearray(n - room)
            wait([self.hdr.Irecv([rest, MPI.BYTE], source=0)], backoff)
            meta += bytes(rest)
        return pickle.loads(meta)

    # --- payload, controller side ---------------------------------------------------
    def bcast_parts(self, down: Any, parts: Sequence[Any]) -> Requests:
        return [down.Ibcast([p, MPI.BYTE], root=0) for p in parts]

    def scatterv(self, down: Any, buf: Any, counts: Sequence[int]) -> Any:
        counts = [0] + list(counts)
        displs = _displacements(counts)
        return down.Iscatterv([buf, (counts, displs), MPI.BYTE], MPI.IN_PLACE, root=0)

    def recv_replies(self, limit: int = 256) -> List[Tuple[int, int, Any, Any, Requests]]:
        """Take the replies that have arrived, oldest first per engine.

        Returns (engine id, seq, meta blob, data blob, requests): a large reply's
        blobs are still arriving into their buffers until its requests complete.
        """
        out = []
        status = MPI.Status()
        for _ in range(limit):
            msg = self.rep.Improbe(MPI.ANY_SOURCE, TAG_ENVELOPE, status)
            if msg is None:
                break
            source = status.Get_source()
            buf = bytearray(status.Get_count(MPI.BYTE))
            msg.Recv([buf, MPI.BYTE])
            seq, m, d = _ENVELOPE.unpack_from(buf, 0)
            if m + d <= INLINE_REPLY:
                view = memoryview(buf)
                start = _ENVELOPE.size
                out.append((source - 1, seq, view[start:start + m],
                            view[start + m:start + m + d], []))
            else:
                meta, data = alloc(m), alloc(d)
                reqs = [self.rep.Irecv([meta, MPI.BYTE], source=source, tag=TAG_META),
                        self.rep.Irecv([data, MPI.BYTE], source=source, tag=TAG_DATA)]
                out.append((source - 1, seq, meta, data, reqs))
        return out

    # --- payload, engine side --------------------------------------------------------
    def recv_parts(self, down: Any, lengths: Sequence[int]) -> Tuple[Requests, List[bytearray]]:
        bufs = [alloc(n) for n in lengths]
        return [down.Ibcast([b, MPI.BYTE], root=0) for b in bufs], bufs

    def recv_scatter(self, down: Any, count: int) -> Tuple[Any, bytearray]:
        buf = alloc(count)
        return down.Iscatterv(None, [buf, MPI.BYTE], root=0), buf

    # --- engine-initiated control messages (stacks; small, point to point) -------------
    def send_ctl(self, data: bytes) -> Tuple[Requests, List[Any]]:
        buf = bytearray(data)
        return [self.ctl.Isend([buf, MPI.BYTE], dest=0, tag=1)], [buf]

    def recv_ctl(self) -> Optional[Tuple[int, bytes]]:
        """Return (engine id, bytes) of one waiting control message, or None."""
        status = MPI.Status()
        msg = self.ctl.Improbe(MPI.ANY_SOURCE, MPI.ANY_TAG, status)
        if msg is None:
            return None
        buf = bytearray(status.Get_count(MPI.BYTE))
        msg.Recv([buf, MPI.BYTE])
        return status.Get_source() - 1, bytes(buf)

    def send_reply(self, seq: int, meta: Any, data: Any) -> Tuple[Requests, List[Any]]:
        """Send this engine's reply to command ``seq`` (engine side); keep the buffers
        until the requests complete."""
        m, d = memoryview(meta).cast("B"), memoryview(data).cast("B")
        envelope = _ENVELOPE.pack(seq, m.nbytes, d.nbytes)
        if m.nbytes + d.nbytes <= INLINE_REPLY:
            whole = b"".join((envelope, m, d))
            return [self.rep.Isend([whole, MPI.BYTE], dest=0, tag=TAG_ENVELOPE)], [whole]
        return [self.rep.Isend([envelope, MPI.BYTE], dest=0, tag=TAG_ENVELOPE),
                self.rep.Isend([m, MPI.BYTE], dest=0, tag=TAG_META),
                self.rep.Isend([d, MPI.BYTE], dest=0, tag=TAG_DATA)], [envelope, meta, data]


class _Reporting:
    """An ``Abort`` that lets the runtime say why first, and never returns."""

    #: Called as ``before_abort(name, errorcode)`` just before ``Abort`` ends the job.
    before_abort: Optional[Callable[[str, int], None]] = None
    #: How user code calls this communicator.
    calls = "comm"

    def Abort(self, errorcode: int = 0) -> None:  # noqa: N802 - mpi4py's name
        if _Reporting.before_abort is not None:
            _Reporting.before_abort(self.calls, errorcode)
        super().Abort(errorcode)  # mpi4py's (the next class in the MRO)
        _ended_by_abort(errorcode)


class WorldComm(_Reporting, MPI.Intracomm):
    """``MPI.COMM_WORLD`` as user code sees it on an engine: mpi4py's, but for ``Abort``."""

    calls = "MPI.COMM_WORLD"


class EngineComm(_Reporting, MPI.Intracomm):
    """The engines' communicator handed to user code as ``comm``.

    mpi4py's object reductions (``allreduce``, ``reduce``, ``scan``, ``exscan``
    with Python objects) hold the GIL while they wait for the other ranks, which
    would freeze the engine's listener thread: no stacks, no interrupts, and
    commands to other engines stuck behind it. These four are done here with
    gathers, which wait without the GIL, and the reduction applied locally in rank
    order (as MPI does for predefined operations; ``op`` must be associative).
    ``Abort`` first lets the runtime say why the engine ends (see
    :meth:`World.report_aborts`). Everything else is mpi4py's own.
    """

    def allreduce(self, sendobj: Any, op: Any = MPI.SUM) -> Any:
        return _fold(op, self.allgather(sendobj))

    def reduce(self, sendobj: Any, op: Any = MPI.SUM, root: int = 0) -> Any:
        items = self.gather(sendobj, root=root)
        return _fold(op, items) if items is not None else None

    def scan(self, sendobj: Any, op: Any = MPI.SUM) -> Any:
        return _fold(op, self.allgather(sendobj)[:self.Get_rank() + 1])

    def exscan(self, sendobj: Any, op: Any = MPI.SUM) -> Any:
        items = self.allgather(sendobj)[:self.Get_rank()]
        return _fold(op, items) if items else None


def _fold(op: Any, items: List[Any]) -> Any:
    result = items[0]
    for item in items[1:]:
        result = op(result, item)
    return result


def _displacements(counts: Sequence[int]) -> List[int]:
    out, pos = [], 0
    for c in counts:
        out.append(pos)
        pos += c
    return out
