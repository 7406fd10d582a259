"""Freed memory kept for reuse in the ranks, and given back when they are idle."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

import harness
from mpiengine import heap

MB = 2**20


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _in_fresh_process(code: str, env: dict = None) -> str:
    """malloc settings are per process: try them in one of its own."""
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_disabled_heap_does_nothing():
    h = heap.Heap(enabled=False)
    assert not h.keeping
    h.busy()
    assert h.release_in() is None and h.release_if_due() is False


def test_environment_keeps_the_system_defaults(monkeypatch):
    monkeypatch.setenv("MPIENGINE_HEAP", "system")
    assert not heap.Heap().keeping


def test_freed_memory_is_reused_then_given_back():
    out = _in_fresh_process("""
        import numpy as np
        from mpiengine import heap
        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
        def cycle():
            a = np.empty(200 * 2**20, dtype=np.uint8); a[::4096] = 1
            addr = a.ctypes.data
            del a
            return addr
        base = rss()
        h = heap.Heap()
        assert h.keeping
        kept = cycle(), cycle()
        h.busy()
        held = rss()
        heap.RELEASE_AFTER = 0.0
        assert h.release_if_due() and h.releases == 1
        print(kept[0] == kept[1], held - base, held - rss())
    """)
    same, held, given_back = out.split()
    assert same == "True"                # the second allocation reused the first's memory
    assert int(held) >= 150             # ... which stayed in the process after the free
    assert int(given_back) >= 150       # ... until the release


def test_release_waits_for_the_idle_time():
    # In a process of its own: mallopt cannot be undone (glibc's thresholds stop
    # adapting once set), and this test process should keep its own settings.
    out = _in_fresh_process("""
        from mpiengine import heap
        h = heap.Heap()
        heap.RELEASE_AFTER = 30.0
        h.busy()
        waits = 25.0 < h.release_in() <= 30.0
        early = h.release_if_due()
        heap.RELEASE_AFTER = 0.0
        due = h.release_in() == 0.0 and h.release_if_due()
        print(h.keeping, waits, early, due, h.release_in())
    """)
    assert out.split() == ["True", "True", "False", "True", "None"]


def _engine_pid(mec) -> int:
    return int(mec.engines[0]["pid"])


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_ranks_keep_a_freed_array_while_busy_and_give_it_back_when_idle(fresh_cluster):
    c = fresh_cluster(1)
    mec = c.client()
    try:
        import numpy as np
        pids = {"engine": _engine_pid(mec), "controller": int(mec.info.pid)}
        base = {k: _rss(p) for k, p in pids.items()}
        mec.push({"a": np.ones(200 * MB // 8)})
        mec.execute("del a")
        after_del = {k: _rss(p) - base[k] for k, p in pids.items()}
        # Right after the free, the memory is still there for the next transfer ...
        assert after_del["engine"] > 150 * MB, after_del
        assert after_del["controller"] > 150 * MB, after_del
        # ... and goes back once the ranks have been idle for RELEASE_AFTER.
        for name, pid in pids.items():
            harness.poll_for(lambda: _rss(pid) - base[name] < 50 * MB,
                             timeout=heap.RELEASE_AFTER + 15,
                             what=f"the {name} to give 200 MB back")
    finally:
        mec.close()


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_with_mpiengine_heap_system_a_freed_array_goes_back_at_once(fresh_cluster):
    c = fresh_cluster(1, env={"MPIENGINE_HEAP": "system"})
    mec = c.client()
    try:
        import numpy as np
        pid = _engine_pid(mec)
        base = _rss(pid)
        mec.push({"a": np.ones(200 * MB // 8)})
        assert _rss(pid) - base > 150 * MB
        t0 = time.monotonic()
        mec.execute("del a")
        assert _rss(pid) - base < 50 * MB
        assert time.monotonic() - t0 < heap.RELEASE_AFTER
    finally:
        mec.close()
