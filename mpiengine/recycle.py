"""The client's receive buffers for large frame parts, reused once nothing uses them.

A pulled or gathered array arrives in a buffer of its own (the result's arrays are
views of it, without a copy). Fresh memory costs a page fault per page, and on a VM
that is about as long as copying the data, so a session that pulls arrays of about
the same size again and again (a loop, a benchmark) would pay it every time. The
:class:`Recycler` hands out anonymous private mappings instead, and keeps them: once
no array or view refers to one any more, the next part of about its size is
received into it. After :data:`RELEASE_AFTER` seconds without a large part, the
free mappings go back to the system and the ones still in use are forgotten (they
go when their arrays do); more than :data:`KEEP_FREE` free bytes are never kept.

A buffer is free when only the recycler refers to it: everything that uses its
memory (numpy arrays made with ``frombuffer``, their views, memoryviews) keeps a
reference to it, so its reference count says so.
"""
from __future__ import annotations

import mmap
import sys
import threading
import time
from typing import Any, List, Optional

from . import payload

#: Parts at least this large come from the recycler (smaller ones are cheap).
MIN_SIZE = 8 << 20
#: Free buffers go back to the system after this many seconds without a large part.
RELEASE_AFTER = 2.0
#: ... and at once when more than this many bytes of them are free.
KEEP_FREE = 2 << 30
_PAGE = 2 << 20  # sizes round up to huge pages


def _free_refs() -> int:
    """The reference count of a buffer that only the recycler's list holds."""
    bufs = [object()]
    return sys.getrefcount(bufs[0])


_FREE = _free_refs()


class Recycler:
    def __init__(self) -> None:
        self._bufs: List[mmap.mmap] = []  # every buffer handed out and still kept
        self._lock = threading.Lock()
        self._used_at: Optional[float] = None  # last large part, if any buffer is kept
        self.reused = 0

    def alloc(self, n: int) -> Any:
        """A writable buffer of ``n`` bytes (a numpy uint8 array)."""
        if n < MIN_SIZE:
            return payload.alloc(n)
        import numpy  # only for large parts, as payload.alloc

        with self._lock:
            self._used_at = time.monotonic()
            i = self._pick(n)
            if i is None:
                self._drop_free(keep=KEEP_FREE)
                buf = mmap.mmap(-1, -(-n // _PAGE) * _PAGE, flags=mmap.MAP_PRIVATE)
                try:
                    buf.madvise(mmap.MADV_HUGEPAGE)
                except (AttributeError, OSError):  # pragma: no cover - no THP here
                    pass
                self._bufs.append(buf)
            else:
                buf = self._bufs[i]
                self.reused += 1
            return numpy.frombuffer(buf, dtype=numpy.uint8, count=n)

    def _pick(self, n: int) -> Optional[int]:
        """The smallest free buffer that holds ``n`` bytes without wasting a quarter."""
        best = None
        for i in range(len(self._bufs)):
            size = len(self._bufs[i])
            if n <= size <= n + n // 4 + _PAGE and sys.getrefcount(self._bufs[i]) == _FREE:
                if best is None or size < len(self._bufs[best]):
                    best = i
        return best

    def _drop_free(self, keep: int) -> None:
        """Unmap free buffers, oldest first, until at most ``keep`` bytes are free."""
        free = [i for i in range(len(self._bufs)) if sys.getrefcount(self._bufs[i]) == _FREE]
        total = sum(len(self._bufs[i]) for i in free)
        drop = set()
        for i in free:
            if total <= keep:
                break
            drop.add(i)
            total -= len(self._bufs[i])
        if drop:
            gone = [self._bufs[i] for i in drop]
            self._bufs = [b for i, b in enumerate(self._bufs) if i not in drop]
            for b in gone:
                b.close()

    def release_in(self) -> Optional[float]:
        """Seconds until free buffers are due to go back; None when none are kept."""
        with self._lock:
            if self._used_at is None:
                return None
            return max(0.0, self._used_at + RELEASE_AFTER - time.monotonic())

    def release_if_due(self) -> bool:
        """Give free buffers back if no large part came for RELEASE_AFTER; True if due."""
        with self._lock:
            if self._used_at is None or time.monotonic() - self._used_at < RELEASE_AFTER:
                return False
            self._drop_free(keep=0)
            # Buffers still in use are forgotten: they go back to the system when
            # their arrays do, as any other memory would.
            self._bufs = []
            self._used_at = None
            return True

    def kept_bytes(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._bufs)
