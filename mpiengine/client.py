"""``MultiEngineClient``: drive the engines of a running cluster.

    from mpiengine import client
    mec = client.MultiEngineClient()          # the default profile's cluster
    mec.execute('a = comm.rank')
    mec.pull('a')                             # [0, 1, 2, 3]

Every engine call takes ``targets`` ('all', an engine id, or a list of ids) and
``block``; when they are not given, the client's ``targets`` and ``block``
attributes apply. A blocking call returns the result; a non-blocking one returns
a :class:`PendingResult` at once. When engines fail, a :class:`CompositeError`
holds each engine's error. This module imports neither mpi4py nor IPython.
"""
from __future__ import annotations

import base64
import logging
import secrets
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from . import connection, partition, payload
from . import protocol as P
from .channel import Channel
from .tunnel import Tunnel
from .errors import (AuthenticationError, ClusterLost, CommandTimeout,  # noqa: F401
                     CompositeError, ConnectError, ErrorRecord, RemoteError)
from .codec import decode_any, gather_join
from .codec import (_by_engine, _check_name, _decode, _inband, _names, _nones,  # noqa: F401
                    _raise_refusal, _replies, _scatter_payload)
from .display import PROGRESS_AFTER, PROGRESS_EVERY, isatty, print_output, terminal_progress
from .mapping import Mapper, ParallelFunction
from .results import _NOT_FETCHED as _NOT_FETCHED_, _NOT_READY, LARGE, PendingResult, ResultList

__all__ = ["MultiEngineClient", "CompositeError", "PendingResult", "ResultList",
           "RemoteError", "ConnectError", "ClusterLost", "CommandTimeout"]

log = logging.getLogger(__name__)

Targets = Union[str, int, Sequence[int], None]


class MultiEngineClient:
    """A connection to one cluster's controller, and the multiengine interface over it.

    ``MultiEngineClient(path)`` reads that connection file; ``profile='P'`` reads
    the file of profile P; with neither, ``$MPIENGINE_CONNECTION_FILE`` or the
    default profile's file is used. ``timeout`` bounds connecting, in seconds;
    ``wait`` keeps trying that many seconds for a cluster that is still starting
    (a batch job in the queue). ``sshserver`` reaches the controller through an
    SSH tunnel via that host. ``max_reply`` caps the size of one result this
    client takes, in bytes: a larger one raises :class:`ReplyTooLarge` and stays
    at the controller (default: no cap below the cluster's message limit).
    """

    def __init__(self, path: Optional[str] = None, profile: Optional[str] = None,
                 timeout: float = 10.0, wait: Optional[float] = None,
                 sshserver: Optional[str] = None, max_reply: Optional[int] = None) -> None:
        if max_reply is not None and (type(max_reply) is not int or max_reply < 0):
            raise ValueError(f"max_reply must be a number of bytes (an int >= 0); "
                             f"got {max_reply!r}")
        self.path = connection.resolve_path(path, profile)
        self._tunnel = None
        self._max_reply = max_reply
        self._chan = self._connect(timeout, wait, sshserver)
        info = {} if max_reply is None else {"max_reply": max_reply}
        meta = self._control(P.INFO, info, timeout=timeout)
        self.engines: List[dict] = meta["engines"]
        self._ids = list(range(int(meta["n_engines"])))
        self._token = secrets.token_hex(6)
        self._count = 0
        self._last: Any = None
        self.block = True
        self.targets: Targets = "all"
        #: Called as ``on_output(engine_id, 'stdout' or 'stderr', text)`` with the live
        #: output of long-running blocking commands; None turns live output off.
        self.on_output: Optional[Callable[[int, str, str], None]] = print_output
        self._line_tails: Dict[Tuple[int, str], str] = {}
        #: Called as ``on_progress(done, total, elapsed_seconds, finished)`` while a
        #: blocking call runs longer than two seconds; None turns it off. The default
        #: draws a line on a terminal and does nothing when stderr is not one.
        self.on_progress: Optional[Callable[[int, int, float, bool], None]] = (
            terminal_progress if isatty(sys.stderr) else None)
        self._chan.on_event = self._on_event

    def _connect(self, timeout: float, wait: Optional[float],
                 sshserver: Optional[str]) -> Channel:
        """Read the file and connect; with ``wait``, keep trying for that many seconds."""
        deadline = time.monotonic() + (wait or 0.0)
        while True:
            try:
                self.info = connection.read(self.path)
                if sshserver:
                    self._tunnel = Tunnel(sshserver, self.info.ip, self.info.port)
                    local = connection.ConnectionInfo(**dict(
                        vars(self.info), ip="127.0.0.1", port=self._tunnel.local_port))
                    return Channel(local, self.path, timeout, self._frame_limit())
                return Channel(self.info, self.path, timeout, self._frame_limit())
            except AuthenticationError:
                raise
            except ConnectError:
                if self._tunnel is not None:
                    self._tunnel.close()
                    self._tunnel = None
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def _frame_limit(self) -> int:
        # Results over max_reply never come (the controller refuses them); the
        # parser's limit allows for a frame's header besides.
        if self._max_reply is None:
            return P.DEFAULT_MAX_MESSAGE
        return self._max_reply + 2**20

    def __repr__(self) -> str:
        return (f"<MultiEngineClient {len(self._ids)} engines at "
                f"{self.info.ip}:{self.info.port} block={self.block} targets={self.targets!r}>")

    def __enter__(self) -> "MultiEngineClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- defaults and validation ---------------------------------------------------------
    def get_ids(self) -> List[int]:
        """Return the engine ids, ``[0, 1, ..., N-1]``."""
        self._chan._check()
        return list(self._ids)

    def _targets(self, targets: Targets) -> Tuple[Any, List[int]]:
        spec = self.targets if targets is None else targets
        n = len(self._ids)
        if spec == "all" or spec is None:
            return "all", list(self._ids)
        if isinstance(spec, bool) or not isinstance(spec, (int, list, tuple, range)):
            raise ValueError(f"targets must be 'all', an engine id or a list of engine ids; "
                             f"got {spec!r}")
        ids = [spec] if isinstance(spec, int) else list(spec)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
        if not ids or bad:
            raise ValueError(f"targets must be engine ids in 0..{n - 1}; got {spec!r}")
        ids = sorted(set(ids))
        return ids, ids

    def _block(self, block: Optional[bool]) -> bool:
        return bool(self.block if block is None else block)

    # --- the request machinery -------------------------------------------------------------
    def _control(self, kind: int, meta: dict, timeout: Optional[float] = None) -> dict:
        """A request the controller answers itself."""
        req = self._chan.request(kind, meta)
        frame = self._chan.wait(req, timeout)
        if frame is None:
            raise CommandTimeout(f"the controller did not answer {P.kind_name(kind)} "
                                 f"within {timeout} s")
        _raise_refusal(frame)
        return frame.meta

    def _submit(self, kind: int, targets: Targets, block: Optional[bool],
                timeout: Optional[float], meta: dict, parts: List[Any] = (),
                finish: Optional[Callable[[List[Any]], Any]] = None) -> Any:
        spec, ids = self._targets(targets)
        block = self._block(block)
        rid = f"{self._token}-{self._count}"
        self._count += 1
        method = P.kind_name(kind)

        def decode(frame: P.Frame) -> Any:
            values = _decode(frame, method)
            if kind == P.GATHER:
                return gather_join(values, frame)
            return finish(values) if finish else values

        pr = PendingResult(self, rid, method, decode)
        pr.n_targets = len(ids)
        req = self._chan.request(
            kind, dict(meta, targets=spec, result_id=rid, block=block), list(parts))
        # A blocking submission is answered with its result; a non-blocking one is
        # not answered: its result waits at the controller for a fetch.
        pr._reply_req = req if block else None
        if kind == P.EXECUTE:
            self._last = pr
        if not block:
            return pr
        result = pr.get_result(block=True, timeout=timeout)
        if kind == P.EXECUTE:
            self._last = result
        return result

    def _fetch(self, pr: PendingResult, block: bool, timeout: Optional[float]) -> Any:
        """Return the reply frame for ``pr``, or ``_NOT_READY``."""
        if pr._reply_req is None:
            pr._reply_req = self._chan.request(P.FETCH, {"result_id": pr.result_id,
                                                         "block": block})
        # Without block the controller answers at once, ready or not.
        try:
            if block:
                frame = self._wait_showing_progress(pr, timeout)
            else:
                frame = self._chan.wait(pr._reply_req, 30.0)
        except KeyboardInterrupt:
            # Ctrl-C: interrupt the engines running this command, then collect what
            # they report (KeyboardInterrupt errors). A second Ctrl-C stops waiting.
            self._control(P.INTERRUPT, {"result_id": pr.result_id, "targets": "all"},
                          timeout=10.0)
            frame = self._chan.wait(pr._reply_req, 30.0)
            if frame is None:
                raise
        if frame is None:
            return _NOT_READY  # the request stays under way; a later call reuses it
        pr._reply_req = None
        if frame.kind == P.NOT_READY:
            return _NOT_READY
        return frame

    def _wait_showing_progress(self, pr: PendingResult, timeout: Optional[float]) -> Any:
        """Wait for ``pr``'s reply; past PROGRESS_AFTER seconds, report engines done."""
        handler = self.on_progress
        if handler is None:
            return self._chan.wait(pr._reply_req, timeout)
        start = time.monotonic()
        shown = False
        done = 0
        while True:
            elapsed = time.monotonic() - start
            step = PROGRESS_EVERY if elapsed >= PROGRESS_AFTER else PROGRESS_AFTER - elapsed
            if timeout is not None:
                step = min(step, max(0.0, timeout - elapsed))
            frame = self._chan.wait(pr._reply_req, step)
            elapsed = time.monotonic() - start
            if frame is not None or (timeout is not None and elapsed >= timeout):
                if shown:
                    handler(pr.n_targets if frame is not None else done, pr.n_targets,
                            elapsed, True)
                return frame
            if elapsed >= PROGRESS_AFTER:
                try:
                    done = len(self._partial(pr))
                except (KeyError, CommandTimeout):
                    continue
                handler(done, pr.n_targets, elapsed, False)
                shown = True

    def _on_event(self, frame: P.Frame) -> None:
        """Whichever client thread reads: live output of a running command arrived."""
        if frame.kind == P.LOST:
            self._chan._fail(ClusterLost(frame.meta.get("message", "an engine died")))
            return
        handler = self.on_output
        if frame.kind != P.STREAM or handler is None:
            return
        eid = int(frame.meta["id"])
        for name, text in frame.meta.get("chunks", []):
            # Whole lines only: a line split across chunks waits for its end.
            text = self._line_tails.pop((eid, name), "") + text
            head, sep, tail = text.rpartition("\n")
            if tail:
                self._line_tails[(eid, name)] = tail
            if sep:
                try:
                    handler(eid, name, head + sep)
                except Exception:  # a faulty handler must not cut the connection
                    log.exception("the on_output handler failed")

    def _partial(self, pr: PendingResult) -> Dict[int, Any]:
        """What ``pr.partial()`` returns: the engines done so far."""
        if pr._frame is None and pr._error is None and pr._value is _NOT_FETCHED_:
            meta = self._control(P.PARTIAL, {"result_id": pr.result_id}, timeout=30.0)
            if not meta["done"]:
                out: Dict[int, Any] = {}
                for key, note in meta["partial"].items():
                    if note.get("error"):
                        out[int(key)] = ErrorRecord.from_dict(note["error"])
                    elif "blob" in note:
                        blob = [base64.b64decode(b) for b in note["blob"]]
                        out[int(key)] = payload.unpack(blob[0], blob[1])["value"]
                    else:
                        out[int(key)] = LARGE
                return out
            pr.done()
        if pr._frame is None:
            return {}
        return _by_engine(_replies(pr._frame), pr._frame.meta["engines"])

    def get_pending(self, result_id: str) -> PendingResult:
        """Return a PendingResult for a result id from this or an earlier client."""
        return PendingResult(self, str(result_id), "fetch", decode_any)

    # --- running code ------------------------------------------------------------------------
    def execute(self, lines: str, targets: Targets = None, block: Optional[bool] = None,
                timeout: Optional[float] = None) -> Any:
        """Run ``lines`` of Python on each target; return a ResultList of per-engine dicts."""
        if not isinstance(lines, str):
            raise TypeError(f"execute takes the code as a string; got {type(lines).__name__}")
        return self._submit(P.EXECUTE, targets, block, timeout, {"code": lines},
                            finish=ResultList)

    def last_result(self) -> Any:
        """Return what the last ``execute`` of this client returned."""
        return self._last

    def barrier(self, pending: Sequence[PendingResult]) -> None:
        """Wait until every PendingResult in ``pending`` is done (errors stay in them)."""
        for pr in pending:
            if not isinstance(pr, PendingResult):
                raise TypeError(f"barrier takes PendingResults; got {type(pr).__name__}")
            pr.wait()

    # --- moving objects ------------------------------------------------------------------------
    def push(self, namespace: Dict[str, Any], targets: Targets = None,
             block: Optional[bool] = None, timeout: Optional[float] = None) -> Any:
        """Bind each name of the dict ``namespace`` on each target."""
        if not isinstance(namespace, dict):
            raise TypeError("push takes a dict of names to values, "
                            f"e.g. push(dict(a=1)); got {type(namespace).__name__}")
        for key in namespace:
            _check_name(key)
        data, buffers = payload.dumps(namespace)
        return self._submit(P.PUSH, targets, block, timeout, {"names": sorted(namespace)},
                            [data, *buffers], finish=_nones)

    def push_function(self, namespace: Dict[str, Callable], targets: Targets = None,
                      block: Optional[bool] = None, timeout: Optional[float] = None) -> Any:
        """Push functions (also lambdas and closures) by name, like ``push``."""
        if isinstance(namespace, dict):
            for key, func in namespace.items():
                if not callable(func):
                    raise TypeError(f"push_function takes functions; {key!r} is a "
                                    f"{type(func).__name__}")
        return self.push(namespace, targets, block, timeout)

    def pull(self, keys: Union[str, Sequence[str]], targets: Targets = None,
             block: Optional[bool] = None, timeout: Optional[float] = None) -> Any:
        """Return a list with the value of ``keys`` (a name or a tuple) on each target."""
        names, single = _names(keys)
        return self._submit(P.PULL, targets, block, timeout,
                            {"names": names, "single": single})

    pull_function = pull

    def zip_pull(self, keys: Sequence[str], targets: Targets = None,
                 block: Optional[bool] = None, timeout: Optional[float] = None) -> Any:
        """Pull several names and return one tuple per name across the targets."""
        names, _ = _names(keys)
        return self._submit(P.PULL, targets, block, timeout, {"names": names, "single": False},
                            finish=lambda vals: list(zip(*vals)))

    def __setitem__(self, key: str, value: Any) -> None:
        self.push({key: value})

    def __getitem__(self, key: str) -> Any:
        return self.pull(key)

    def keys(self, targets: Targets = None, block: Optional[bool] = None,
             timeout: Optional[float] = None) -> Any:
        """Return the list of names defined on each target."""
        return self._submit(P.KEYS, targets, block, timeout, {})

    def reset(self, targets: Targets = None, block: Optional[bool] = None,
              timeout: Optional[float] = None) -> Any:
        """Clear the namespace of each target (``comm`` stays)."""
        return self._submit(P.RESET, targets, block, timeout, {}, finish=_nones)

    # --- scatter, gather, map ---------------------------------------------------------------
    def scatter(self, key: str, seq: Any, targets: Targets = None,
                block: Optional[bool] = None, timeout: Optional[float] = None) -> Any:
        """Split ``seq`` into contiguous parts and bind part i to ``key`` on target i."""
        _check_name(key)
        _, ids = self._targets(targets)
        meta, parts, counts = _scatter_payload(seq, len(ids), "scatter")
        return self._submit(P.SCATTER, targets, block, timeout,
                            dict(meta, name=key, counts=counts), parts, finish=_nones)

    def gather(self, key: str, targets: Targets = None, block: Optional[bool] = None,
               timeout: Optional[float] = None) -> Any:
        """Collect ``key`` from the targets and join the parts in engine order."""
        _check_name(key)
        return self._submit(P.GATHER, targets, block, timeout, {"name": key})

    def map(self, func: Callable, *seqs: Any, targets: Targets = None,
            block: Optional[bool] = None, timeout: Optional[float] = None) -> Any:
        """Return ``list(map(func, *seqs))``, computed on the targets in parallel."""
        if not callable(func):
            raise TypeError(f"map needs a callable first; got {type(func).__name__}")
        if not seqs:
            raise TypeError("map needs at least one sequence")
        seqs = tuple(partition.as_sequence(s, "map") for s in seqs)
        n = min(len(s) for s in seqs)
        _, ids = self._targets(targets)
        data, buffers = payload.dumps(func)
        pieces = [[partition.map_piece(s, a, b) for s in seqs]
                  for a, b in partition.bounds(n, len(ids))]
        blobs = [_inband(p) for p in pieces]
        counts = [len(b) for b in blobs]
        return self._submit(P.APPLY, targets, block, timeout, {"kind": "pickle", "counts": counts},
                            [data, *buffers, blobs], finish=partition.join)

    def mapper(self, dist: str = "b", targets: Targets = None,
               block: Optional[bool] = None) -> "Mapper":
        """Return an object whose ``map`` uses these targets and block mode."""
        return Mapper(self, dist, targets, block)

    def parallel(self, dist: str = "b", targets: Targets = None,
                 block: Optional[bool] = None) -> Callable[[Callable], "ParallelFunction"]:
        """Decorate a function so that calling it on sequences maps it in parallel."""
        mapper = self.mapper(dist, targets, block)
        return lambda func: ParallelFunction(func, mapper)

    # --- the cluster ---------------------------------------------------------------------------
    def queue_status(self) -> List[Tuple[int, dict]]:
        """Return ``[(id, {'pending': running command, 'queue': [waiting]}), ...]``."""
        return [(i, d) for i, d in self._control(P.QUEUE_STATUS, {}, timeout=30.0)["status"]]

    def interrupt(self, targets: Targets = None) -> List[int]:
        """Raise KeyboardInterrupt in the user code running on the targets now.

        Commands queued behind it still run. Returns the engine ids signalled;
        an idle engine ignores the signal.
        """
        spec, _ = self._targets(targets)
        return self._control(P.INTERRUPT, {"targets": spec}, timeout=10.0)["engines"]

    def stacks(self, targets: Targets = None, timeout: float = 10.0) -> Dict[int, str]:
        """Return ``{engine id: current Python stack}``, also for engines stuck in MPI."""
        spec, _ = self._targets(targets)
        meta = self._control(P.STACKS, {"targets": spec}, timeout=timeout)
        return {int(k): v for k, v in sorted(meta["stacks"].items(), key=lambda kv: int(kv[0]))}

    def shutdown(self) -> None:
        """Stop the engines and the controller, then close this client."""
        self._control(P.SHUTDOWN, {}, timeout=30.0)
        self.close()

    def close(self) -> None:
        """Close this client's connection; the cluster keeps running."""
        self._chan.close()
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None

    def activate(self) -> None:
        """Make this client the target of the %px, %autopx and %result magics."""
        from . import magics  # IPython is imported only when magics are wanted

        magics.activate(self)
