"""The exceptions of mpiengine.

Remote errors travel as data: an engine formats its exception where it happened
(type name, message, traceback text, engine id and host) and the client rebuilds
them here. No exception class is ever pickled across the wire.

Each library error also subclasses the builtin that fits, so a generic
``except ConnectionError`` or ``except TimeoutError`` still catches it.
"""
from __future__ import annotations

import builtins
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional

__all__ = [
    "MPIEngineError",
    "RemoteError",
    "CompositeError",
    "ConnectError",
    "AuthenticationError",
    "ClusterLost",
    "CommandTimeout",
    "ProtocolError",
    "NoSuchResult",
    "ErrorRecord",
]


_ENGINE_INPUT = re.compile(r"<engine \d+ In \[\d+\]>")


class MPIEngineError(Exception):
    """Base class of every error this library raises on its own account."""


class ProtocolError(MPIEngineError, ValueError):
    """Raised when bytes on the wire do not form a valid, authenticated frame.

    The connection that sent them is closed; nothing in the frame was acted on.
    """


class NoSuchResult(MPIEngineError, KeyError):
    """Raised when a result id is unknown: already fetched, or never submitted."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "no such result"


class ConnectError(MPIEngineError, ConnectionError):
    """Raised when a client cannot reach the controller named by a connection file.

    The message names the file and the address tried. Check that the cluster is
    running (``mpiengine status``) and that the file belongs to it.
    """


class AuthenticationError(ConnectError):
    """Raised when the controller and the client do not share the same key.

    The connection file is stale (from another cluster) or was altered.
    """


class ClusterLost(MPIEngineError, ConnectionError):
    """Raised when the connection to a running cluster breaks.

    The controller or an engine died (which ends the whole MPI job), or the
    network between client and controller failed. This is different from
    :meth:`MultiEngineClient.close`, after which calls raise ``ValueError``.
    """


class ReplyTooLarge(MPIEngineError, ValueError):
    """Raised when a result is larger than this client takes (``max_reply=``).

    The result stays at the controller: a client with a larger limit can fetch
    it by id (``.result_id``) with
    :meth:`~mpiengine.client.MultiEngineClient.get_pending`.
    """

    def __init__(self, message: str, result_id: Optional[str] = None) -> None:
        super().__init__(message)
        self.result_id = result_id


class CommandTimeout(MPIEngineError, TimeoutError):
    """Raised when a blocking call did not finish within its ``timeout=``.

    The command keeps running on the engines; ``.pending`` is the
    :class:`~mpiengine.results.PendingResult` to fetch its result later.
    """

    def __init__(self, message: str, pending: Any = None) -> None:
        super().__init__(message)
        self.pending = pending


@dataclass(frozen=True)
class ErrorRecord:
    """One engine's failure, as text: what an engine sends instead of an exception."""

    engine_id: int
    method: str
    ename: str
    evalue: str
    traceback: str = ""
    host: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> "ErrorRecord":
        return cls(
            engine_id=int(d.get("engine_id", -1)),
            method=str(d.get("method", "")),
            ename=str(d.get("ename", "Exception")),
            evalue=str(d.get("evalue", "")),
            traceback=str(d.get("traceback", "")),
            host=str(d.get("host", "")),
        )

    def line(self) -> str:
        """Return the one-line summary ``[id:method]: Type: message``."""
        text = f"{self.ename}: {self.evalue}" if self.evalue else self.ename
        return f"[{self.engine_id}:{self.method}]: {text}"


class RemoteError(MPIEngineError):
    """An exception raised by user code on one engine, rebuilt from its text.

    Attributes ``ename``, ``evalue``, ``traceback``, ``engine_id`` and ``host``
    hold what the engine reported.
    """

    def __init__(self, record: ErrorRecord) -> None:
        super().__init__(record.ename, record.evalue)
        self.record = record
        self.ename = record.ename
        self.evalue = record.evalue
        self.traceback = record.traceback
        self.engine_id = record.engine_id
        self.host = record.host

    def __str__(self) -> str:
        where = f"engine {self.engine_id}" + (f" on {self.host}" if self.host else "")
        text = f"{self.ename}: {self.evalue} (raised on {where})"
        if self.traceback:
            text += "\n" + self.traceback.rstrip()
        return text

    def _render_traceback_(self) -> list:
        """Let IPython show the engine's traceback instead of the client's stack."""
        return (self.traceback or f"{self.ename}: {self.evalue}").splitlines()


def _builtin_exception(ename: str) -> Optional[type]:
    cls = getattr(builtins, ename, None)
    # Only Exception subclasses: re-raising a remote SystemExit or KeyboardInterrupt
    # in the client would end the user's session instead of reporting.
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls
    return None


class CompositeError(MPIEngineError):
    """Raised when a command failed on one or more engines.

    ``str()`` lists one ``[id:method]: Type: message`` line per failed engine;
    ``elist`` holds their :class:`ErrorRecord`; :meth:`raise_exception`
    re-raises one of them and :meth:`print_tracebacks` prints the remote
    tracebacks. ``results`` holds the successful engines' results, if any.
    """

    def __init__(self, method: str, elist: Iterable[ErrorRecord], results: Any = None) -> None:
        self.method = method
        self.elist = list(elist)
        self.results = results
        super().__init__(self._message())

    def _message(self) -> str:
        lines = [f"one or more exceptions from call to method: {self.method}"]
        lines += [e.line() for e in self.elist]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._message()

    def __getitem__(self, i: int) -> ErrorRecord:
        return self.elist[i]

    def __len__(self) -> int:
        return len(self.elist)

    def _get_engine_str(self, excid: int) -> str:
        return f"[{self.elist[excid].engine_id}:{self.elist[excid].method}]:"

    def _get_traceback(self, excid: int) -> str:
        rec = self.elist[excid]
        return rec.traceback or f"{rec.ename}: {rec.evalue}"

    def print_tracebacks(self, excid: Optional[int] = None, file: Any = None) -> None:
        """Print the remote traceback of one failure, or of all when ``excid`` is None."""
        out = file if file is not None else sys.stdout
        ids = range(len(self.elist)) if excid is None else [self._check_index(excid)]
        for i in ids:
            out.write(self._get_engine_str(i) + "\n")
            out.write(self._get_traceback(i).rstrip() + "\n")

    def _check_index(self, excid: int) -> int:
        if not -len(self.elist) <= excid < len(self.elist):
            raise IndexError(
                f"an exception with index {excid} does not exist: "
                f"this CompositeError holds {len(self.elist)}"
            )
        return excid

    def raise_exception(self, excid: int = 0) -> None:
        """Raise failure number ``excid`` as its own exception type where possible.

        A builtin exception (``ZeroDivisionError``, ``NameError``, ...) is raised as
        that type; any other becomes a :class:`RemoteError`. The remote traceback
        is attached as the ``__cause__``.
        """
        rec = self.elist[self._check_index(excid)]
        remote = RemoteError(rec)
        cls = _builtin_exception(rec.ename)
        if cls is None:
            raise remote
        try:
            exc = cls(rec.evalue)
        except Exception:  # exotic constructor signatures
            raise remote from None
        raise exc from remote

    def _render_traceback_(self) -> list:
        """Show the remote tracebacks in IPython, grouping identical ones.

        Tracebacks that differ only in the engine's own name for the input
        (``<engine 2 In [5]>``) count as identical; the first one is shown.
        """
        groups: dict = {}
        for rec in self.elist:
            text = rec.traceback or f"{rec.ename}: {rec.evalue}"
            key = _ENGINE_INPUT.sub("<engine In>", text)
            groups.setdefault(key, (text, []))[1].append(rec)
        lines = [f"CompositeError: one or more exceptions from call to method: {self.method}"]
        for text, recs in groups.values():
            ids = ",".join(str(r.engine_id) for r in recs)
            lines.append(f"[{ids}:{self.method}]:")
            lines.extend(text.rstrip().splitlines())
        return lines
