"""``--tls``: what TLS costs, the same operations with it off and on.

Two mpiengine clusters of ``n`` engines on loopback, one started with
``--tls off`` (the default there) and one with ``--tls on`` (what a client on a
login node gets from a controller that listens on the network), run every
operation of the main table, alternating between the two as the main
comparison alternates between frameworks (:func:`benchmarks.suite.run_ops`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

from . import clusters, report, suite

MODES = {"tls off": ["--tls", "off"], "tls on": ["--tls", "on"]}


def measure(workdir: str, n: int, sizes: suite.Sizes,
            log: Callable[[str], None]) -> Dict[str, Dict[str, List[float]]]:
    """Return ``{op key: {"tls off": [seconds], "tls on": [seconds]}}``."""
    running: Dict[str, Any] = {}
    try:
        for mode, args in MODES.items():
            c = clusters.MpiengineCluster(n, workdir, name=mode.replace(" ", "-"), args=args)
            log(f"# {mode}: started {n} engines in {c.start():.2f} s")
            running[mode] = c
        data = suite.Data(sizes, n)
        return suite.run_ops({m: suite.MpiengineOps(c.mec) for m, c in running.items()},
                             data, sizes, log)
    finally:
        for c in running.values():
            c.stop()


def describe(results: Dict[str, Dict[str, List[float]]], sizes: suite.Sizes) -> List[str]:
    """The table: medians [min-max] with TLS off and on, and on/off."""
    lines = [f"{'with TLS (--tls on) against without, ms':<45}  {'tls off median [min-max]':<26}"
             f"  {'tls on median [min-max]':<26}  on/off",
             f"{'-' * 45}  {'-' * 26}  {'-' * 26}  ------"]
    for op in suite.ops(sizes):
        got = results.get(op.key, {})
        off, on = got.get("tls off", []), got.get("tls on", [])
        r = report.ratio(suite.median(on), suite.median(off))
        lines.append(f"{op.label:<45}  {report.cell(off, 'ms', 'failed'):<26}  "
                     f"{report.cell(on, 'ms', 'failed'):<26}  "
                     f"{'-' if r is None else f'{r:.2f}'}")
    return lines
