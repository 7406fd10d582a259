"""How a client shows what runs elsewhere: live engine output and progress.

These are the defaults of ``MultiEngineClient.on_output`` and ``on_progress``;
the magics install IPython/Jupyter-aware ones.
"""
from __future__ import annotations

import sys
from typing import Any

__all__ = ["print_output", "terminal_progress", "isatty", "PROGRESS_AFTER", "PROGRESS_EVERY"]

PROGRESS_AFTER = 2.0
PROGRESS_EVERY = 0.5


def isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


_progress_shown = False


def _clear_progress() -> None:
    global _progress_shown
    if _progress_shown:
        sys.stderr.write("\r" + " " * 60 + "\r")
        sys.stderr.flush()
        _progress_shown = False


def terminal_progress(done: int, total: int, elapsed: float, finished: bool) -> None:
    """The default progress display: one line on stderr, rewritten in place."""
    global _progress_shown
    if finished:
        _clear_progress()
        return
    sys.stderr.write(f"\r[mpiengine] {done}/{total} engines done, {elapsed:.0f} s")
    sys.stderr.flush()
    _progress_shown = True


def print_output(engine_id: int, name: str, text: str) -> None:
    """The default live-output handler: ``[stdout:2] line`` on this process's stdout/stderr."""
    _clear_progress()  # live lines go above the progress line, not into it
    out = sys.stderr if name == "stderr" else sys.stdout
    out.write("".join(f"[{name}:{engine_id}] {line}\n" for line in text.splitlines()))
    out.flush()
