"""Capture what user code writes to file descriptors 1 and 2.

``print`` in user code goes to a per-command buffer directly; output of C
extensions and child processes goes to the process's fds 1 and 2, which
``FdCapture`` points at pipes while a command runs. The engine's listener thread
drains the pipes during long commands (so a chatty C loop never blocks on a
full pipe, and its output streams live); the main thread drains what is left
when the command ends, before the result is sent.
"""
from __future__ import annotations

import codecs
import ctypes
import os
import select
import sys
import threading
from typing import Any, List, Optional, Tuple

try:
    _libc: Any = ctypes.CDLL(None)
except OSError:  # pragma: no cover - no C library to flush
    _libc = None


_CHUNK = 65536


class FdCapture:
    def __init__(self) -> None:
        self._pipes: List[Tuple[int, int]] = []
        self._saved: List[int] = []
        for fd in (1, 2):
            r, w = os.pipe()
            os.set_blocking(r, False)
            self._pipes.append((r, w))
            self._saved.append(os.dup(fd))
        self._lock = threading.Lock()
        self._targets: Optional[Tuple[Any, Any]] = None
        self._decoders = [codecs.getincrementaldecoder("utf-8")("replace") for _ in (1, 2)]
        # Most commands write nothing to fds 1 and 2: one poll says so, instead of a
        # failing read per pipe (an exception each) at the end of every command.
        self._poll = select.poll()
        for r, _w in self._pipes:
            self._poll.register(r, select.POLLIN)

    @property
    def read_fds(self) -> List[int]:
        return [r for r, _ in self._pipes]

    def start(self, out: Any, err: Any) -> None:
        """Send fds 1 and 2 into the pipes; their text goes to ``out``/``err``.write."""
        _flush_all()
        with self._lock:
            self._targets = (out, err)
        for fd, (_r, w) in zip((1, 2), self._pipes):
            os.dup2(w, fd)

    def stop(self) -> None:
        """Restore fds 1 and 2 and collect everything written while captured."""
        _flush_all()
        for fd, saved in zip((1, 2), self._saved):
            os.dup2(saved, fd)
        with self._lock:
            self._drain_locked(final=True)
            self._targets = None

    def drain(self) -> None:
        """Move what the pipes hold now into the current command's output."""
        with self._lock:
            if self._targets is not None:
                self._drain_locked(final=False)

    def _drain_locked(self, final: bool) -> None:
        ready = {fd for fd, _ev in self._poll.poll(0)}
        for i, (r, _w) in enumerate(self._pipes):
            chunks = []
            while r in ready:
                try:
                    data = os.read(r, _CHUNK)
                except BlockingIOError:
                    break
                if data:
                    chunks.append(data)
                if len(data) < _CHUNK:  # the pipe is empty now (or its writers closed)
                    break
            if chunks or final:
                text = self._decoders[i].decode(b"".join(chunks), final=final)
                if text and self._targets is not None:
                    self._targets[i].write(text)


def _flush_all() -> None:
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    if _libc is not None:
        try:
            _libc.fflush(None)  # C stdio buffers of extension code
        except Exception:
            pass
