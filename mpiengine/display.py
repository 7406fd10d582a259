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


def terminal_progress(done: int, total: int, elapsed: float, finished: bool) -> None:
    """The default progress display: one line on stderr, rewritten in place."""
    if finished:
        sys.stderr.write("\r" + " " * 60 + "\r")
    else:
        sys.stderr.write(f"\r[mpiengine] {done}/{total} engines done, {elapsed:.0f} s")
    sys.stderr.flush()


def print_output(engine_id: int, name: str, text: str) -> None:
    """The default live-output handler: ``[stdout:2] line`` on this process's stdout/stderr."""
    out = sys.stderr if name == "stderr" else sys.stdout
    out.write("".join(f"[{name}:{engine_id}] {line}\n" for line in text.splitlines()))
    out.flush()
