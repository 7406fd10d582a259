"""What a command returns: result lists and pending results.

``ResultList`` is the list of per-engine result dicts that ``execute`` returns;
its repr is the ``<Results List>`` view. ``PendingResult`` stands for the result
of a non-blocking call until it is fetched.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from .errors import CommandTimeout

__all__ = ["ResultList", "PendingResult", "LARGE"]


class ResultList(list):
    """A list of per-engine result dicts whose repr shows inputs and outputs.

    Each dict has ``id``, ``number``, ``input`` (``raw``, ``translated``),
    ``stdout`` and ``stderr``.
    """

    def __repr__(self) -> str:
        out = ["<Results List>"]
        for r in self:
            if not isinstance(r, dict):
                out.append(repr(r))
                continue
            eid, num = r.get("id"), r.get("number")
            src = r.get("input", {}).get("translated", "")
            out.extend(_labelled(f"[{eid}] In [{num}]: ", src))
            if r.get("stdout"):
                out.extend(_labelled(f"[{eid}] Out[{num}]: ", r["stdout"]))
            if r.get("stderr"):
                out.extend(_labelled(f"[{eid}] Err[{num}]: ", r["stderr"]))
        return "\n".join(out)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def _labelled(prefix: str, text: str) -> list:
    """Prefix the first line; indent the others under it."""
    lines = text.rstrip("\n").split("\n")
    pad = " " * len(prefix)
    return [prefix + lines[0]] + [pad + line for line in lines[1:]]


_NOT_FETCHED = object()


class PendingResult:
    """The result of a non-blocking call, fetched on demand.

    ``get_result(default=None, block=True)`` returns the result (raising a
    ``CompositeError`` if any engine failed), or ``default`` if ``block`` is
    false and it is not ready yet. ``.r`` is ``get_result(block=True)``.
    ``result_id`` names it at the controller: a new client on the same
    cluster can fetch it with ``MultiEngineClient.get_pending(result_id)``.
    """

    def __init__(self, client: Any, result_id: str, method: str,
                 finish: Optional[Callable[[Any], Any]] = None) -> None:
        self.client = client
        self.result_id = result_id
        self.method = method
        self._finish = finish
        self._value: Any = _NOT_FETCHED
        self._error: Optional[BaseException] = None
        # The request whose reply will carry the result, once one is under way.
        self._reply_req: Optional[int] = None
        self._frame: Any = None  # the raw reply, kept for partial()
        self.n_targets = 0

    def __repr__(self) -> str:
        state = "done" if self._value is not _NOT_FETCHED or self._error else "pending"
        return f"<PendingResult {self.method} {self.result_id} ({state})>"

    def _settle(self, raw: Any) -> None:
        self._frame = raw
        try:
            self._value = self._finish(raw) if self._finish else raw
        except BaseException as e:  # CompositeError, decode errors: kept and re-raised
            self._error = e

    def _raise_or_return(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def done(self) -> bool:
        """Return True if the result is available without waiting."""
        if self._value is not _NOT_FETCHED or self._error is not None:
            return True
        raw = self.client._fetch(self, block=False, timeout=None)
        if raw is _NOT_READY:
            return False
        self._settle(raw)
        return True

    def get_result(self, default: Any = None, block: bool = True,
                   timeout: Optional[float] = None) -> Any:
        """Return the result; with ``block=False`` return ``default`` if not ready.

        Raises ``CompositeError`` if any engine failed, and ``CommandTimeout`` if
        ``timeout`` seconds pass first (the result can still be fetched later).
        """
        if self._value is not _NOT_FETCHED or self._error is not None:
            return self._raise_or_return()
        raw = self.client._fetch(self, block=block, timeout=timeout)
        if raw is _NOT_READY:
            if block:
                raise CommandTimeout(
                    f"{self.method} did not finish within {timeout} s; it is still "
                    f"running: fetch it later with .get_result()", pending=self)
            return default
        self._settle(raw)
        return self._raise_or_return()

    def partial(self) -> Dict[int, Any]:
        """Return ``{engine_id: result}`` for the engines that finished so far.

        A failed engine maps to its error record (``.ename``, ``.evalue``,
        ``.traceback``). Engines report early only for commands that ran longer
        than a fraction of a second, or failed; a quick command shows up when
        the whole result is in.
        """
        return self.client._partial(self)

    @property
    def r(self) -> Any:
        """The result, waiting for it if needed."""
        return self.get_result(block=True)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until the result is ready; return False if ``timeout`` passed first."""
        try:
            self.get_result(block=True, timeout=timeout)
        except CommandTimeout:
            return False
        except Exception:  # a failed command is a finished one
            pass
        return True


class _Large:
    def __repr__(self) -> str:
        return "<finished; result too large for partial(): wait for the whole result>"


#: Stands in ``partial()`` for a finished engine whose result is too big to send early.
LARGE = _Large()


class _NotReady:
    def __repr__(self) -> str:
        return "<not ready>"


#: Sentinel a client's ``_fetch`` returns when a result is not ready yet.
_NOT_READY = _NotReady()

ResultsByEngine = Dict[int, Any]
