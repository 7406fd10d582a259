"""Processes by pid: trees, CPU time and memory from /proc, and ending them.

Everything the benchmarks start is ended here, by pid, never by name. A pid is
remembered with its start time, and a signal goes out only if the process with
that pid still has that start time, so a recycled pid is never hit. MPICH's
Hydra puts each rank in a session of its own, so signalling the mpiexec
process group is not enough: the tree under mpiexec is recorded while it is
alive and every pid of it is signalled.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Dict, Iterable, List, Optional, Tuple

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

Pids = Dict[int, str]  # pid -> start time (field 22 of /proc/PID/stat)


def _stat_fields(pid: int) -> Optional[List[str]]:
    """Fields 3.. of /proc/PID/stat (after the command name), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return data[data.rfind(")") + 2:].split()


def stat(pid: int) -> Optional[Tuple[int, str]]:
    """Return (ppid, start time) of a live, non-zombie process, or None."""
    fields = _stat_fields(pid)
    if not fields or fields[0] == "Z":
        return None
    return int(fields[1]), fields[19]


def descendants(pid: int) -> Pids:
    """Return ``{pid: start time}`` of every live process under ``pid``."""
    children: Dict[int, List[int]] = {}
    starts: Dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
                starts[int(entry)] = st[1]
    found: Pids = {}
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if p not in found:
            found[p] = starts[p]
            todo.extend(children.get(p, []))
    return found


def same(pid: int, start: str) -> bool:
    st = stat(pid)
    return st is not None and st[1] == start


def remember(pid: int) -> Pids:
    """Return ``{pid: start}`` for one pid (empty if it is gone)."""
    st = stat(pid)
    return {pid: st[1]} if st else {}


def alive(pids: Pids) -> Pids:
    return {p: s for p, s in pids.items() if same(p, s)}


def cpu_seconds(pids: Iterable[int]) -> float:
    """Sum of utime + stime, in seconds, of the given processes (gone ones count 0).

    Read from each process's CPU clock (``clock_gettime`` on the clock id the
    kernel derives from a pid: nanoseconds, all threads), because the ticks of
    /proc/PID/stat are 10 ms per process: summed over 5 ranks, that error
    would be as large as the 0.05 CPU-s idle target itself. /proc/PID/stat is
    the fallback where the clock cannot be read.
    """
    total = 0.0
    for pid in pids:
        try:
            total += time.clock_gettime(((~pid) << 3) | 2)  # CPUCLOCK_SCHED of the process
            continue
        except OSError:
            pass
        fields = _stat_fields(pid)
        if fields:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def status_kib(pid: int, field: str) -> Optional[int]:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, ...) in KiB, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes(pid: int) -> Optional[int]:
    """Resident set size from /proc/PID/statm (cheap enough to sample often)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


def signal_all(pids: Pids, sig: int) -> None:
    """Send ``sig`` to each pid that is still the process we recorded."""
    for pid, start in pids.items():
        if same(pid, start):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def wait_gone(pids: Pids, timeout: float) -> bool:
    """Wait up to ``timeout`` s for every pid to exit; True if they all did."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while alive(pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    return True


def end(pids: Pids, grace: float = 5.0) -> Pids:
    """SIGTERM, then SIGKILL, each with ``grace`` s; return what survived (normally {})."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive(pids):
            return {}
        signal_all(pids, sig)
        if wait_gone(pids, grace):
            return {}
    return alive(pids)
