"""Freed memory kept for reuse while transfers follow each other; given back when idle.

A large array that a rank receives (a push, a piece of a scatter, the replies the
controller passes on) needs fresh memory. By default glibc gives every allocation
above 32 MiB a mapping of its own and unmaps it when it is freed, so the next
transfer of the same size pays again for fresh pages (a page fault and zeroing per
page: on a VM about as long as copying the data) and for the unmapping. The ranks
(controller and engines, never a client's process) raise glibc's two thresholds so
that such memory stays in the process for the next allocation, and give whatever is
free back to the system (``malloc_trim``) once the rank has been idle for
:data:`RELEASE_AFTER` seconds. Allocations of :data:`KEEP_BELOW` and more keep their
own mappings as before.

``MPIENGINE_HEAP=system`` in the ranks' environment keeps glibc's defaults. Where
the C library is not glibc (no ``mallopt``), nothing changes.
"""
from __future__ import annotations

import ctypes
import os
import time
from typing import Any, Optional

#: Allocations below this come from the process's heap and are reused after a free.
KEEP_BELOW = 1 << 30
#: Free memory goes back to the system after this many idle seconds.
RELEASE_AFTER = 2.0

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _glibc() -> Any:
    try:
        lib = ctypes.CDLL(None)
    except OSError:  # pragma: no cover - no C library to talk to
        return None
    if not (hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim")):
        return None
    return lib


class Heap:
    """A rank's malloc settings and its idle-time release.

    :meth:`busy` marks work (a command, a transfer); :meth:`release_in` says how long
    the owner may sleep before :meth:`release_if_due` has something to do.
    """

    def __init__(self, enabled: Optional[bool] = None) -> None:
        if enabled is None:
            enabled = os.environ.get("MPIENGINE_HEAP", "") != "system"
        self._lib = _glibc() if enabled else None
        self.keeping = False
        if self._lib is not None:
            self.keeping = (self._lib.mallopt(_M_MMAP_THRESHOLD, KEEP_BELOW) == 1
                            and self._lib.mallopt(_M_TRIM_THRESHOLD, KEEP_BELOW) == 1)
        self._busy_at: Optional[float] = None  # work since the last release
        self.releases = 0

    def busy(self) -> None:
        if self.keeping:
            self._busy_at = time.monotonic()

    def release_in(self) -> Optional[float]:
        """Seconds until free memory is due to go back; None when nothing is pending."""
        if self._busy_at is None:
            return None
        return max(0.0, self._busy_at + RELEASE_AFTER - time.monotonic())

    def release_if_due(self) -> bool:
        """Give free memory back if the rank has been idle long enough; True if it did."""
        due = self.release_in()
        if due is None or due > 0:
            return False
        self._busy_at = None
        self._lib.malloc_trim(0)
        self.releases += 1
        return True
