"""Whole-cluster measurements: start until usable, idle CPU, wake-up, scaling.

These start and stop clusters themselves (through :mod:`benchmarks.clusters`),
so every process they start is ended by pid even when a measurement fails.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import procs
from .suite import time_calls


def start_reps(cls: Any, n: int, workdir: str, reps: int,
               log: Callable[[str], None]) -> Tuple[List[float], Any]:
    """Start a cluster ``reps`` times; return (seconds until usable, the last one, running)."""
    times: List[float] = []
    cluster = None
    for i in range(reps):
        cluster = cls(n, workdir, name=f"{cls.framework[:3]}{n}-{i}")
        try:
            times.append(cluster.start())
        except BaseException:
            cluster.stop()
            raise
        log(f"# {cls.framework:<11} start #{i + 1} with {n} engines: {times[-1]:.2f} s")
        if i < reps - 1:
            cluster.stop()
    return times, cluster


def idle(clusters: List[Any], seconds: float, reps: int,
         log: Callable[[str], None]) -> Dict[str, Dict[str, List[float]]]:
    """Leave the clusters idle ``reps`` times for ``seconds``; then time one execute each.

    Returns, per framework: 'cpu' (CPU-s of the ranks per 10 s), 'tree' (CPU-s per
    10 s of every process of the cluster, launcher included) and 'first' (seconds
    of the first ``execute('pass')`` on all engines after the quiet spell). The
    clusters idle at the same time (CPU time is counted per process, so one
    does not bill the other); their first commands run one after the other.
    """
    out: Dict[str, Dict[str, List[float]]] = {
        c.framework: {"cpu": [], "tree": [], "first": []} for c in clusters}
    for rep in range(reps):
        marks = []
        for c in clusters:
            ranks = c.rank_pids()
            tree = list(c.tree())
            marks.append((c, c.adapter(), ranks, tree, procs.cpu_seconds(ranks),
                          procs.cpu_seconds(tree), time.monotonic()))
        time.sleep(seconds)
        for c, a, ranks, tree, cpu0, tree0, t0 in marks:
            cpu1, tree1, t1 = procs.cpu_seconds(ranks), procs.cpu_seconds(tree), time.monotonic()
            first = time_calls(lambda: a.execute("pass"), 1)[0]
            per10 = 10.0 / (t1 - t0)
            res = out[c.framework]
            res["cpu"].append((cpu1 - cpu0) * per10)
            res["tree"].append((tree1 - tree0) * per10)
            res["first"].append(first)
            log(f"# {c.framework:<11} idle #{rep + 1}: ranks {res['cpu'][-1]:.3f} CPU-s/10 s, "
                f"all processes {res['tree'][-1]:.3f}; first execute {first * 1e3:.2f} ms")
    return out


def scale(cls: Any, counts: List[int], workdir: str, reps: int, log: Callable[[str], None],
          limit: Optional[int] = None) -> Dict[int, Dict[str, Any]]:
    """Start a cluster of each size in turn; time ``execute('pass')`` on all engines.

    Returns ``{n: {'exec': [seconds], 'start': seconds}}``, or ``{'skip': reason}``
    for a size over ``limit`` or one that failed.
    """
    out: Dict[int, Dict[str, Any]] = {}
    for n in counts:
        if limit is not None and n > limit:
            out[n] = {"skip": f"skipped: {n} engines over --ipp-max-engines {limit}"}
            continue
        cluster = cls(n, workdir, name=f"{cls.framework[:3]}-scale{n}")
        try:
            started = cluster.start()
            a = cluster.adapter()
            time_calls(lambda: a.execute("pass"), 3)  # warm-up: first target-set set-up
            times = time_calls(lambda: a.execute("pass"), reps)
            out[n] = {"exec": times, "start": started}
            log(f"# {cls.framework:<11} {n:>2} engines: started in {started:.1f} s, "
                f"execute('pass') median {sorted(times)[len(times) // 2] * 1e3:.2f} ms")
        except Exception as e:
            out[n] = {"skip": f"failed: {type(e).__name__}: {e}"}
            log(f"# {cls.framework:<11} {n:>2} engines FAILED: {e}")
        finally:
            cluster.stop()
    return out
