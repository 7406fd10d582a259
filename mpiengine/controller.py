"""The controller (rank 0): turns client requests into MPI messages and back.

No user code runs here and nothing is unpickled: payloads are opaque buffers
that go from a client's socket straight into an MPI broadcast or scatter, and
the engines' replies go from their MPI messages straight onto the socket.

For each command the controller sends a header to every engine (on ``hdr``)
and rings their doorbells, then broadcasts the payload on the command's target
set. Each engine sends its reply to the controller as a message of its own; a
command is complete when every target's reply is in, and its result goes out
as those replies' blobs back to back, without a copy. Commands to disjoint
engines overlap.

A result is sent to the client that is waiting for it (a blocking call);
otherwise it is kept until a client fetches it by id (non-blocking calls,
clients that went away). One thread, one selector loop, MPI requests polled
between socket events with a back-off: nothing blocks, nothing spins.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import fabric
from . import protocol as P
from .doorbell import BellTower, why_ended
from .heap import Heap
from .server import Conn, Server

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 10.0
EARLY_FAILURE_AFTER = 1.0
#: A result part up to this size is joined into one buffer (cheaper to send and MAC
#: than many small ones); a larger one goes out as the engines' buffers.
SMALL_PART = 64 * 1024


@dataclass
class Command:
    seq: int
    op: int
    targets: Tuple[int, ...]
    result_id: str
    conn: Optional[Conn]
    req: Any
    deliver: bool
    description: str
    replies: Dict[int, Tuple[Any, Any]] = field(default_factory=dict)  # engine: blobs
    reqs: List[Any] = field(default_factory=list)  # large replies' blobs still arriving
    partial: Dict[str, dict] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)
    interrupted: bool = False  # the user asked: its KeyboardInterrupts are no news


@dataclass
class Stored:
    meta: dict
    parts: List[Any]
    kind: int = P.RESULT


class Controller:
    def __init__(self, world: fabric.World, engines: List[dict], ip: str, port: int,
                 key: bytes, max_message: int = P.DEFAULT_MAX_MESSAGE,
                 poll_cap: float = 0.01, bells: Optional[BellTower] = None,
                 ssl_context: Any = None, heap: Optional[Heap] = None) -> None:
        self.world = world
        self.heap = heap if heap is not None else Heap(enabled=False)
        self.bells = bells
        self.engines = engines
        self.n = world.n_engines
        self.server = Server(ip, port, key, max_message, self._on_frame, self._on_close,
                             ssl_context)
        self.poll_cap = poll_cap
        self.seq = 0
        self.sends: List[Tuple[List[Any], List[Any]]] = []
        self.arrived: List[Command] = []  # every reply in; large blobs may still arrive
        self.running: Dict[str, Command] = {}
        self.by_seq: Dict[int, Command] = {}
        self.queues: List[Dict[int, str]] = [{} for _ in range(self.n)]  # seq: description
        self.stored: Dict[str, Stored] = {}
        self.waiters: Dict[str, Tuple[Conn, Any]] = {}
        self.stopping = False
        self.stack_reqs: Dict[int, dict] = {}
        self.lost_note: Optional[str] = None  # where to leave word of a dead engine
        self.lost = False
        self.on_tick: Optional[Callable[[], Any]] = None  # called every loop turn
        if bells is not None:
            bells.watch(self.server, self._engine_lost)
        self.handlers = {P.INFO: self._info, P.QUEUE_STATUS: self._queue_status,
                         P.FETCH: self._fetch, P.SHUTDOWN: self._shutdown, P.CLOSE: self._close,
                         P.INTERRUPT: self._interrupt, P.STACKS: self._stacks,
                         P.PARTIAL: self._partial}

    @property
    def address(self) -> Tuple[str, int]:
        return self.server.address

    # --- the loop ------------------------------------------------------------------------
    def stop(self) -> None:
        """Shut the engines down, as a client's shutdown request would."""
        if not self.stopping:
            reqs, keep = self._send_header({"op": P.SHUTDOWN, "targets": list(self.world.all)})
            self.sends.append((reqs, keep))
            self.stopping = True
            self.stop_deadline = time.monotonic() + SHUTDOWN_GRACE

    def run(self) -> None:
        backoff = fabric.Backoff(cap=self.poll_cap)
        while True:
            if self.on_tick is not None:
                self.on_tick()
            busy = bool(self.sends or self.running or self.stack_reqs)
            if self.stopping and not busy:
                break
            if self.stopping and time.monotonic() > self.stop_deadline:
                # Engines that cannot be interrupted (stuck in an MPI call of user code)
                # would keep the job alive forever: end it.
                log.warning("engines did not stop within %.0f s; aborting the job",
                            SHUTDOWN_GRACE)
                self.server.drain(1.0)
                self.world.abort(4)
            # Idle, the loop wakes only for sockets (or, with a tick, five times a second),
            # and once to give free memory back.
            if busy:
                timeout = backoff.next_delay()
            else:
                timeout = 0.2 if self.on_tick else 1.0
                release = self.heap.release_in()
                if release is not None:
                    timeout = min(timeout, max(release, 0.002))
            if timeout < 0.002:
                # epoll counts whole milliseconds: sleep the short waits ourselves.
                # Right after progress, only yield the core: the next step of a
                # command (the engines' replies) is usually a few microseconds away.
                events = self.server.poll(0)
                if not events:
                    if backoff.idle() < fabric.SPIN_AFTER_PROGRESS:
                        os.sched_yield()
                    else:
                        time.sleep(timeout)
            else:
                events = self.server.poll(timeout)
            if self._progress() or events:
                backoff.reset()
                self.heap.busy()
            elif not busy:
                self.heap.release_if_due()
        self.server.drain(5.0)
        self.server.shutdown()
        if self.bells is not None:
            self.bells.close()

    def _progress(self) -> bool:
        progressed = False
        if self.sends:
            before = len(self.sends)
            self.sends = [s for s in self.sends if not fabric.test(s[0])]
            progressed = len(self.sends) != before
        if self.stack_reqs or self.running:
            progressed |= self._collect_ctl()
        if self.running:
            progressed |= self._collect_replies()
        return progressed

    def _collect_replies(self) -> bool:
        got = False
        for engine, seq, meta, data, reqs in self.world.recv_replies():
            got = True
            cmd = self.by_seq.get(seq)
            if cmd is None or engine not in cmd.targets or engine in cmd.replies:
                log.error("engine %d sent a reply to command %d, which it was not "
                          "running; ignored", engine, seq)
                continue
            cmd.replies[engine] = (meta, data)
            cmd.reqs += reqs
            if len(cmd.replies) == len(cmd.targets):
                self.arrived.append(cmd)
        if self.arrived:
            waiting = []
            for cmd in self.arrived:
                if fabric.test(cmd.reqs):
                    self._complete(cmd)
                    got = True
                else:
                    waiting.append(cmd)
            self.arrived = waiting
        return got

    # --- requests ------------------------------------------------------------------------
    def _on_frame(self, conn: Conn, frame: P.Frame) -> None:
        req = frame.meta.get("req")
        try:
            if self.stopping and frame.kind != P.CLOSE:
                raise RuntimeError("the cluster is shutting down")
            if frame.kind in P.ENGINE_OPS:
                self._dispatch(conn, frame)
            elif frame.kind in self.handlers:
                self.handlers[frame.kind](conn, frame)
            else:
                raise ValueError(f"{P.kind_name(frame.kind)} is not a request")
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            refusal = {"ename": type(e).__name__, "evalue": text}
            rid = frame.meta.get("result_id")
            if (frame.kind in P.ENGINE_OPS and not frame.meta.get("block", True)
                    and isinstance(rid, str) and rid not in self.running
                    and rid not in self.stored):
                # Nobody waits on a non-blocking submission: keep the refusal for the fetch.
                self.stored[rid] = Stored(refusal, [], P.ERROR)
            else:
                self.server.send(conn, P.ERROR, dict(refusal, req=req))

    def _targets(self, spec: Any) -> Tuple[int, ...]:
        if spec == "all" or spec is None:
            return self.world.all
        ids = [spec] if isinstance(spec, int) else spec
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(i, int) and 0 <= i < self.n for i in ids)):
            raise ValueError(f"targets must be 'all', an engine id or a list of ids in "
                             f"0..{self.n - 1}; got {spec!r}")
        return tuple(sorted(set(ids)))

    def _dispatch(self, conn: Conn, frame: P.Frame) -> None:
        meta = frame.meta
        targets = self._targets(meta.get("targets"))
        result_id = str(meta.get("result_id") or f"r{self.seq}")
        if result_id in self.running or result_id in self.stored:
            raise ValueError(f"result id {result_id!r} is already in use")
        parts = frame.parts
        counts = meta.get("counts")
        scatter = None
        if counts is not None:
            if (not isinstance(counts, list) or len(counts) != len(targets) or not parts
                    or not all(type(c) is int and c >= 0 for c in counts)
                    or sum(counts) != len(parts[-1])):
                raise ValueError("scatter counts must be one byte count (an int >= 0) per "
                                 "target, adding up to the data sent")
            parts, scatter = parts[:-1], parts[-1]
        engine_meta = {k: v for k, v in meta.items() if k not in ("req", "result_id", "block")}
        engine_meta.update(op=frame.kind, targets=list(targets),
                           parts=[len(p) for p in parts], seq=self.seq)
        reqs, keep = self._send_header(engine_meta)
        down = self.world.group(targets)
        reqs += self.world.bcast_parts(down, parts)
        if scatter is not None:
            reqs.append(self.world.scatterv(down, scatter, counts))
        self.sends.append((reqs, keep + list(frame.parts)))
        description = _describe(frame.kind, meta)
        cmd = Command(self.seq, frame.kind, targets, result_id, conn, meta.get("req"),
                      bool(meta.get("block", True)), description)
        self.seq += 1
        self.running[result_id] = cmd
        self.by_seq[cmd.seq] = cmd
        for t in targets:
            self.queues[t][cmd.seq] = description

    def _send_header(self, meta: dict) -> Tuple[List[Any], List[Any]]:
        sent = self.world.send_header(meta)
        if self.bells is not None:
            self.bells.ring()  # after: a woken engine finds its header there
        return sent

    def _complete(self, cmd: Command) -> None:
        del self.running[cmd.result_id]
        del self.by_seq[cmd.seq]
        for t in cmd.targets:
            del self.queues[t][cmd.seq]
        blobs = [cmd.replies[t] for t in cmd.targets]
        sizes = [[memoryview(m).nbytes, memoryview(d).nbytes] for m, d in blobs]
        meta = {"result_id": cmd.result_id, "op": cmd.op, "engines": list(cmd.targets),
                "sizes": sizes}
        # Two parts, each the engines' blobs back to back (sent as they are: a part
        # may be a list of buffers); the client splits them by ``sizes``.
        result = Stored(meta, [_part([m for m, _ in blobs]), _part([d for _, d in blobs])])
        waiter = self.waiters.pop(cmd.result_id, None)
        if waiter is not None and not waiter[0].closed:
            self._deliver(waiter[0], waiter[1], result)
        elif cmd.deliver and cmd.conn is not None and not cmd.conn.closed:
            self._deliver(cmd.conn, cmd.req, result)
        else:
            self.stored[cmd.result_id] = result

    def _deliver(self, conn: Conn, req: Any, result: Stored) -> None:
        size = sum(P.part_size(p) for p in result.parts)
        if conn.max_reply is not None and size > conn.max_reply:
            rid = result.meta["result_id"]
            self.stored[rid] = result  # nothing is lost: a client that takes it may fetch it
            self.server.send(conn, P.ERROR, {
                "req": req, "ename": "ReplyTooLarge", "result_id": rid,
                "evalue": f"the result {rid!r} is {size:,} bytes; this client takes at most "
                          f"{conn.max_reply:,} (MultiEngineClient(max_reply=...)). It stays "
                          f"at the controller: fetch it with get_pending({rid!r}) from a "
                          f"client that takes more"})
            return
        self.server.send(conn, result.kind, dict(result.meta, req=req), result.parts)

    def _on_close(self, conn: Conn) -> None:
        for rid, (c, _req) in list(self.waiters.items()):
            if c is conn:
                del self.waiters[rid]

    # --- controller-only requests ---------------------------------------------------------
    def _reply(self, conn: Conn, frame: P.Frame, **meta: Any) -> None:
        self.server.send(conn, P.RESULT, dict(meta, req=frame.meta.get("req")))

    def _info(self, conn: Conn, frame: P.Frame) -> None:
        max_reply = frame.meta.get("max_reply")
        if max_reply is not None:
            if type(max_reply) is not int or max_reply < 0:
                raise ValueError(f"max_reply must be a byte count (an int >= 0); "
                                 f"got {max_reply!r}")
            conn.max_reply = max_reply
        self._reply(conn, frame, engines=self.engines, n_engines=self.n)

    def _queue_status(self, conn: Conn, frame: P.Frame) -> None:
        status = []
        for i, q in enumerate(self.queues):
            waiting = list(q.values())  # in command order (dicts keep insertion order)
            status.append([i, {"pending": waiting[0] if waiting else None,
                               "queue": waiting[1:]}])
        self._reply(conn, frame, status=status)

    def _fetch(self, conn: Conn, frame: P.Frame) -> None:
        rid = str(frame.meta.get("result_id"))
        req = frame.meta.get("req")
        if rid in self.stored:
            self._deliver(conn, req, self.stored.pop(rid))
        elif rid in self.running:
            if frame.meta.get("block", True):
                self.waiters[rid] = (conn, req)
            else:
                self.server.send(conn, P.NOT_READY, {"req": req, "result_id": rid})
        else:
            raise KeyError(f"no result with id {rid!r}: it was already fetched or never existed")

    def _shutdown(self, conn: Conn, frame: P.Frame) -> None:
        self.stop()
        self._reply(conn, frame, ok=True)

    def _interrupt(self, conn: Conn, frame: P.Frame) -> None:
        targets = self._targets(frame.meta.get("targets"))
        seq = None
        rid = frame.meta.get("result_id")
        if rid is not None:
            cmd = self.running.get(str(rid))
            if cmd is None:  # finished already: nothing to interrupt
                self._reply(conn, frame, engines=[])
                return
            seq = cmd.seq
            cmd.interrupted = True
            targets = tuple(t for t in cmd.targets if t in targets)
        reqs, keep = self._send_header({"op": P.INTERRUPT, "targets": list(targets), "seq": seq})
        self.sends.append((reqs, keep))
        self._reply(conn, frame, engines=list(targets))

    def _stacks(self, conn: Conn, frame: P.Frame) -> None:
        targets = self._targets(frame.meta.get("targets"))
        sid = self.seq
        self.seq += 1
        reqs, keep = self._send_header({"op": P.STACKS, "targets": list(targets), "sid": sid})
        self.sends.append((reqs, keep))
        self.stack_reqs[sid] = {"conn": conn, "req": frame.meta.get("req"),
                                "want": set(targets), "stacks": {}, "busy": {}}

    def _collect_ctl(self) -> bool:
        """Take the engines' own messages: live output and stack replies."""
        got = False
        for _ in range(64):
            msg = self.world.recv_ctl()
            if msg is None:
                break
            got = True
            reply = json.loads(msg[1])
            if reply.get("kind") == "stream":
                self._forward_stream(reply)
            elif reply.get("kind") == "done":
                self._early_done(reply)
            else:
                self._add_stack(reply)
        return got

    def _watcher(self, cmd: Command) -> Optional[Conn]:
        """The client waiting for this command right now, if any."""
        waiter = self.waiters.get(cmd.result_id)
        conn = waiter[0] if waiter else (cmd.conn if cmd.deliver else None)
        return conn if conn is not None and not conn.closed else None

    def _forward_stream(self, reply: dict) -> None:
        cmd = self.by_seq.get(reply.get("seq"))
        conn = self._watcher(cmd) if cmd is not None else None
        if conn is not None:
            self.server.send(conn, P.STREAM, {"result_id": cmd.result_id, "id": reply["id"],
                                             "chunks": reply["chunks"]})

    def _early_done(self, note: dict) -> None:
        cmd = self.by_seq.get(note.get("seq"))
        if cmd is None:
            return
        cmd.partial[str(note["id"])] = note
        conn = self._watcher(cmd)
        error = note.get("error")
        # Say it now only when it helps: a command that has already run a while on
        # several engines, some of which may run for long yet.
        if (conn is not None and error and len(cmd.targets) > 1 and not cmd.interrupted
                and time.monotonic() - cmd.t0 >= EARLY_FAILURE_AFTER):
            text = (f"{error.get('ename')}: {error.get('evalue')} (engine {note['id']} "
                    f"failed; the full report comes when every target has finished)\n")
            self.server.send(conn, P.STREAM, {"result_id": cmd.result_id, "id": note["id"],
                                             "chunks": [["stderr", text]]})

    def _partial(self, conn: Conn, frame: P.Frame) -> None:
        rid = str(frame.meta.get("result_id"))
        cmd = self.running.get(rid)
        if cmd is not None:
            self._reply(conn, frame, done=False, engines=list(cmd.targets),
                        partial=cmd.partial)
        elif rid in self.stored:
            self._reply(conn, frame, done=True)
        else:
            raise KeyError(f"no result with id {rid!r}: it was already fetched or never existed")

    def _add_stack(self, reply: dict) -> None:
        pending = self.stack_reqs.get(reply.get("sid"))
        if pending is None:
            return
        pending["stacks"][str(reply["id"])] = reply["stack"]
        pending["busy"][str(reply["id"])] = reply["busy"]
        if set(int(k) for k in pending["stacks"]) >= pending["want"]:
            del self.stack_reqs[reply["sid"]]
            self.server.send(pending["conn"], P.RESULT,
                             {"req": pending["req"], "stacks": pending["stacks"],
                              "busy": pending["busy"]})

    def _engine_lost(self, engine_id: int, words: str) -> None:
        """An engine is ending or gone: tell every client, leave a note, end the job.

        The launcher ends every rank (this one too) soon after one dies: the note
        (for ``mpiengine status``, and for clients whose LOST event is cut off)
        takes a fraction of a millisecond, so it goes first."""
        if self.stopping or self.lost:
            return  # engines exit at shutdown: not a loss; and report a loss once
        self.lost = True
        e = next((x for x in self.engines if x.get("id") == engine_id), {"id": engine_id})

        def message(words: str) -> str:
            return (f"engine {engine_id} (pid {e.get('pid', '?')} on {e.get('host', '?')}) "
                    f"died: {why_ended(words)}; MPI ends the whole job, so the cluster is gone")

        text = message(words)
        if self.lost_note:
            _write_note(self.lost_note, {"engine": engine_id, "message": text,
                                         "time": time.time()})
        self.server.broadcast(P.LOST, {"engine": engine_id, "message": text})
        log.error(text)
        if self.bells is not None and words.startswith("Fatal Python error"):
            # The rest of the crash report, if the launcher leaves us the time: the
            # log gets all of it, the note the signal and the crashing call.
            report = words + self.bells.read_rest(engine_id, 0.2)
            log.error("engine %d's crash report:\n%s", engine_id, report.rstrip())
            if self.lost_note and message(report) != text:
                _write_note(self.lost_note, {"engine": engine_id, "message": message(report),
                                             "time": time.time()})
        self.server.drain(0.5)
        self.world.abort(5)

    def _close(self, conn: Conn, frame: P.Frame) -> None:
        log.debug("%r closed by the client", conn)
        self.server.close(conn)


def _part(bufs: List[Any]) -> Any:
    """One frame part made of ``bufs``: small ones joined, large ones left as they are."""
    if sum(memoryview(b).nbytes for b in bufs) <= SMALL_PART:
        return b"".join(bufs)
    return bufs


def _write_note(path: str, note: dict) -> None:
    """Write ``note`` as JSON to ``path`` whole or not at all (a kill can come any time)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(note, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _describe(op: int, meta: dict) -> str:
    name = P.kind_name(op)
    if op == P.EXECUTE:
        code = str(meta.get("code", ""))
        return f"{name}: {code if len(code) <= 60 else code[:57] + '...'}"
    for key in ("name", "names"):
        if key in meta:
            return f"{name}: {meta[key]}"
    return name
