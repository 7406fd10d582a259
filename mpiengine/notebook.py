"""Live output and progress for Jupyter kernels (used by :mod:`mpiengine.magics`).

In a kernel, :func:`magics.activate` replaces the client's terminal-oriented
defaults with these: live lines go to the cell that is running, and long
blocking calls show a progress display that is updated in place.
"""
from __future__ import annotations

import contextvars
import logging
import sys
from typing import Any, Callable, Dict

from IPython.display import display

from .display import print_output

__all__ = ["CellOutput", "CellProgress"]

_log = logging.getLogger(__name__)


class CellOutput:
    """``on_output`` for a Jupyter kernel: live lines go to the cell now running.

    The client thread that reads the socket calls it: usually the one waiting
    for the command, the client's reader thread when no call waits. ipykernel
    picks the cell an output belongs to from a per-thread parent header, and
    versions differ in what a thread that is not the kernel's own gets:
    ipykernel 7 uses the latest request, 6.29 the cell that started the thread
    (for the reader thread, the ``%load_ext`` cell, so every live line would
    land there). So the header of each cell is recorded when it starts and set
    around each write.
    """

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.parent: Dict[str, Any] = {}
        self._remember()
        shell.events.register("pre_run_cell", self._remember)

    def _remember(self, info: Any = None) -> None:
        parent = getattr(self.shell, "parent_header", None) or {}
        # ipykernel 7 keeps the request's header here, 6.29 the whole request.
        self.parent = dict(parent.get("header", parent)) if isinstance(parent, dict) else {}

    def close(self) -> None:
        try:
            self.shell.events.unregister("pre_run_cell", self._remember)
        except ValueError:
            pass

    def __call__(self, engine_id: int, name: str, text: str) -> None:
        stream = sys.stderr if name == "stderr" else sys.stdout
        # An exception here would reach the thread reading the client's socket:
        # a line that cannot be shown is logged and dropped.
        try:
            reset = _set_thread_parent(stream, self.parent)
            try:
                print_output(engine_id, name, text)
            finally:
                reset()
        except Exception:
            _log.exception("live output of engine %s could not be shown", engine_id)


def _set_thread_parent(stream: Any, parent: Dict[str, Any]) -> Callable[[], None]:
    """Make ``stream``'s output in this thread belong to ``parent``; return the undo."""
    if not parent:
        return lambda: None
    setter = getattr(stream, "set_thread_parent", None)  # ipykernel 7
    if callable(setter):
        token = setter(parent)
        return lambda: stream.reset_thread_parent(token)
    # ipykernel 6.29 has no public call for it, but consults the same context
    # variable before its thread-to-cell table.
    var = getattr(stream, "_parent_header", None)
    if isinstance(var, contextvars.ContextVar):
        token = var.set(parent)
        return lambda: var.reset(token)
    return lambda: None


class CellProgress:
    """``on_progress`` for a Jupyter kernel: one display, updated in place.

    The client calls it from the thread that waits (the kernel's main thread),
    only for blocking calls that run longer than two seconds.
    """

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._handle: Any = None
        self._key: Any = None
        self._elapsed = 0.0

    @staticmethod
    def _bundle(done: int, total: int, elapsed: float, finished: bool) -> Dict[str, str]:
        text = (f"[mpiengine] {total}/{total} engines done in {elapsed:.1f} s" if finished
                else f"[mpiengine] {done}/{total} engines done, {elapsed:.0f} s")
        bar = f'<progress value="{total if finished else done}" max="{total}"></progress>'
        return {"text/plain": text, "text/html": f"{bar} <code>{text[12:]}</code>"}

    def __call__(self, done: int, total: int, elapsed: float, finished: bool) -> None:
        # A new call (or a call cut short by Ctrl-C before its last update) must
        # not update the display of an earlier one.
        key = getattr(self.shell, "execution_count", None)
        if self._handle is not None and (key != self._key or elapsed < self._elapsed):
            self._handle = None
        bundle = self._bundle(done, total, elapsed, finished)
        if self._handle is None:
            if finished:
                return
            self._handle = display(bundle, raw=True, display_id=True)
            self._key = key
        else:
            self._handle.update(bundle, raw=True)
        self._elapsed = elapsed
        if finished:
            self._handle = None
