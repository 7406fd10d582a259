"""What one engine does with a command: its namespace and its operations.

This module knows nothing of MPI or sockets: it takes a command (operation,
metadata, received buffers) and returns the reply blob pair. Everything user
code can raise, including ``SystemExit`` and ``KeyboardInterrupt``, becomes an
error record (type name, message, traceback text) in the reply: an exception in
user code never ends the engine.
"""
from __future__ import annotations

import ast
import io
import linecache
import os
import socket
import sys
import traceback
import types
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import partition, payload
from . import protocol as P

__all__ = ["Engine", "Command"]

_HIDDEN = frozenset({"__builtins__", "__name__", "comm"})


class Command:
    """A command as an engine receives it: op code, metadata and payload buffers."""

    __slots__ = ("op", "meta", "targets", "parts", "piece", "reqs")

    def __init__(self, op: int, meta: dict, targets: Tuple[int, ...]) -> None:
        self.op, self.meta, self.targets = op, meta, targets
        self.parts: List[bytearray] = []
        self.piece: Optional[bytearray] = None
        self.reqs: List[Any] = []


class _Capture(io.StringIO):
    """Captured output that user code cannot lose by closing ``sys.stdout``.

    Each write is also offered to ``sink(name, text)`` (live output), if given.
    """

    def __init__(self, name: str = "stdout", sink: Optional[Callable[[str, str], None]] = None):
        super().__init__()
        self.name, self.sink = name, sink

    def write(self, text: str) -> int:
        n = super().write(text)
        if self.sink is not None and text:
            self.sink(self.name, text)
        return n

    def close(self) -> None:
        pass


class _Failed(Exception):
    """Carries a value to return alongside an error (execute's partial output)."""

    def __init__(self, value: Any, error: BaseException) -> None:
        self.value, self.error = value, error


class Engine:
    """One engine's persistent namespace and the operations on it."""

    def __init__(self, engine_id: int, comm: Any = None, host: Optional[str] = None) -> None:
        self.id = engine_id
        self.comm = comm
        self.host = host or socket.gethostname()
        self.count = 0
        self.ns: Dict[str, Any] = {}
        self.in_user_code = False
        #: Called with (name, text) for every write of user code: live output.
        self.sink: Optional[Callable[[str, str], None]] = None
        #: Captures fds 1 and 2 during execute when set (see :mod:`capture`).
        self.fd_capture: Any = None
        #: The error record of the last command run, or None if it succeeded.
        self.last_error: Optional[dict] = None
        self.reset()
        self._ops: Dict[int, Callable[[Command], Any]] = {
            P.EXECUTE: self._execute, P.PUSH: self._push, P.PULL: self._pull,
            P.SCATTER: self._scatter, P.GATHER: self._gather, P.APPLY: self._apply,
            P.KEYS: self._keys, P.RESET: self._reset, P.PING: self._ping,
        }

    def reset(self) -> None:
        self.ns.clear()
        self.ns.update({"__name__": "__main__", "__builtins__": __builtins__, "comm": self.comm})

    # --- the entry point ---------------------------------------------------------------
    def run(self, cmd: Command) -> Tuple[bytes, Any]:
        """Run a command; return its reply blob pair. Never raises."""
        method = P.kind_name(cmd.op)
        self.last_error = None
        try:
            value = self._ops[cmd.op](cmd)
            reply = {"ok": True, "value": value}
        except _Failed as f:
            reply = {"ok": False, "value": f.value, "error": self.error_record(f.error, method)}
        except BaseException as e:  # noqa: B902 - user code may raise anything
            reply = {"ok": False, "value": None, "error": self.error_record(e, method)}
        self.last_error = reply.get("error")
        return self._pack(reply, method)

    def cancelled(self, cmd: Command, why: str,
                  ename: str = "CancelledError") -> Tuple[bytes, Any]:
        """Reply for a command that was dropped without running."""
        method = P.kind_name(cmd.op)
        rec = {"engine_id": self.id, "method": method, "ename": ename,
               "evalue": why, "traceback": "", "host": self.host}
        return self._pack({"ok": False, "value": None, "error": rec}, method)

    def _pack(self, reply: dict, method: str) -> Tuple[bytes, Any]:
        try:
            return payload.pack(reply, plain_first=True)
        except Exception as e:  # the value cannot be pickled: report it, keep the engine
            self.last_error = self.error_record(e, method)
            return payload.pack({"ok": False, "value": None, "error": self.last_error},
                                plain_first=True)

    def error_record(self, e: BaseException, method: str) -> dict:
        ename = type(e).__name__
        if isinstance(e, SystemExit):
            evalue = f"SystemExit({e.code!r}) in user code; the engine keeps running"
        else:
            evalue = _safe(lambda: str(e), f"<{ename} whose str() failed>")
        text = _safe(lambda: _user_traceback(e), f"{ename}: {evalue}\n")
        return {"engine_id": self.id, "method": method, "ename": ename,
                "evalue": evalue, "traceback": text, "host": self.host}

    # --- operations ------------------------------------------------------------------------
    def _execute(self, cmd: Command) -> dict:
        code = cmd.meta["code"]
        self.count += 1
        n = self.count
        out, err = _Capture("stdout", self.sink), _Capture("stderr", self.sink)
        result = {"id": self.id, "number": n, "input": {"raw": code, "translated": code},
                  "stdout": "", "stderr": ""}
        saved = sys.stdout, sys.stderr
        fds = self.fd_capture
        try:
            if fds is not None:
                fds.start(out, err)
            sys.stdout, sys.stderr = out, err
            self._run_code(code, f"<engine {self.id} In [{n}]>")
        except BaseException as e:
            raise _Failed(self._fill(result, out, err, fds), e) from None
        finally:
            sys.stdout, sys.stderr = saved  # user code may have replaced them
        return self._fill(result, out, err, fds)

    @staticmethod
    def _fill(result: dict, out: io.StringIO, err: io.StringIO, fds: Any = None) -> dict:
        if fds is not None:
            fds.stop()  # idempotent enough: a second stop finds empty pipes
        result["stdout"], result["stderr"] = out.getvalue(), err.getvalue()
        return result

    def _run_code(self, code: str, filename: str) -> None:
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        body, last = _compile(code, filename)
        self.in_user_code = True
        try:
            exec(body, self.ns)
            if last is not None:
                value = eval(last, self.ns)
                if value is not None:
                    print(repr(value))
        finally:
            self.in_user_code = False

    def _push(self, cmd: Command) -> None:
        ns = payload.loads(cmd.parts[0], cmd.parts[1:])
        self.ns.update(ns)

    def _lookup(self, name: str) -> Any:
        try:
            return self.ns[name]
        except KeyError:
            raise NameError(f"name {name!r} is not defined") from None

    def _pull(self, cmd: Command) -> Any:
        values = [self._lookup(n) for n in cmd.meta["names"]]
        return values[0] if cmd.meta.get("single") else values

    def _scatter(self, cmd: Command) -> None:
        self.ns[cmd.meta["name"]] = _decode_piece(cmd.meta, cmd.piece)

    def _gather(self, cmd: Command) -> Any:
        value = self._lookup(cmd.meta["name"])
        if partition.is_array(value):
            return value if value.flags.c_contiguous else value.copy()
        return value

    def _apply(self, cmd: Command) -> list:
        func = payload.loads(cmd.parts[0], cmd.parts[1:])
        seqs = _decode_piece(cmd.meta, cmd.piece)
        self.in_user_code = True
        try:
            return list(map(func, *seqs))
        finally:
            self.in_user_code = False

    def _keys(self, cmd: Command) -> list:
        return sorted(k for k in self.ns if k not in _HIDDEN)

    def _reset(self, cmd: Command) -> None:
        self.reset()

    def _ping(self, cmd: Command) -> dict:
        return {"id": self.id, "host": self.host, "pid": os.getpid()}


#: Compiled code of recent executions, by source text: (body, last expression).
_COMPILED: Dict[str, Tuple[types.CodeType, Optional[types.CodeType]]] = {}
_COMPILED_MAX = 256


def _compile(code: str, filename: str) -> Tuple[types.CodeType, Optional[types.CodeType]]:
    """Compile a cell: its statements, and its last line apart if it is an expression
    (whose value is shown, as in an interactive session).

    Code run again and again (a loop of ``execute`` calls) is parsed once: the
    cached code objects get this run's file name, which tracebacks show. Only
    code without nested code objects (functions, classes, comprehensions) is
    kept, since those carry the file name of their own.
    """
    hit = _COMPILED.get(code)
    if hit is not None:
        body, last = hit
        return (body.replace(co_filename=filename),
                last.replace(co_filename=filename) if last is not None else None)
    tree = ast.parse(code, filename, "exec")
    last_tree = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last_tree = ast.Expression(tree.body.pop().value)
    body = compile(tree, filename, "exec")
    last = compile(last_tree, filename, "eval") if last_tree is not None else None
    if not any(isinstance(c, types.CodeType)
               for co in (body, last) if co is not None for c in co.co_consts):
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.clear()
        _COMPILED[code] = (body, last)
    return body, last


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _user_traceback(e: BaseException) -> str:
    """Format ``e`` without this package's frames: the user wants to see their code
    (an interrupt, for one, arrives through the runtime's signal handler)."""
    te = traceback.TracebackException(type(e), e, e.__traceback__)
    if isinstance(e, SyntaxError):  # where it was parsed is noise: show the code
        te.stack = traceback.StackSummary.from_list([])
    else:
        te.stack = traceback.StackSummary.from_list(
            [f for f in te.stack if not os.path.abspath(f.filename).startswith(_PACKAGE_DIR)])
    return "".join(te.format())


def _safe(func: Callable[[], str], default: str) -> str:
    """Call ``func``; on any failure (user classes can break str()) return ``default``."""
    try:
        return func()
    except BaseException:  # noqa: B902
        return default


def _decode_piece(meta: dict, piece: Optional[bytearray]) -> Any:
    """Rebuild this engine's share of a scatter from its raw bytes."""
    if meta.get("kind") == "array":
        import numpy

        tail = tuple(meta["shape"])
        return numpy.frombuffer(piece, dtype=numpy.dtype(meta["dtype"])).reshape((-1,) + tail)
    return payload.loads(piece)
