"""Benchmark mpiengine against ipyparallel and against the floor, in one run.

    python benchmarks/run.py            the full suite (a few minutes on 2 cores)
    python benchmarks/run.py --quick    a smoke run: tiny sizes, 1-2 repetitions, 4 engines
    python benchmarks/run.py --memory   also: peak memory of pushing 1 GB to all engines
    python benchmarks/run.py --huge     also: a 2.5 GiB array to one engine and back
    python benchmarks/run.py --tls      also: the same operations with TLS off and on

Prints progress lines starting with '#', then one table of medians [min-max]
with the ratios mpiengine/ipyparallel and mpiengine/floor and the issue's
targets. Every process it starts is ended by pid before it exits, also on
errors, Ctrl-C and SIGTERM.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):
    # Run as a script: import 'benchmarks' and this checkout's mpiengine from the
    # repository root, and do not let this directory shadow other modules.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks import clusters, floors, lifecycle, memory, procs, report, suite, tls  # noqa: E402,E501
from benchmarks.report import Row  # noqa: E402


def log(line: str) -> None:
    print(line, flush=True)


def machine() -> List[str]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 2**30
    lines = [f"machine: {os.cpu_count()} CPUs ({model}), {mem:.1f} GiB RAM, "
             f"{platform.system()} {platform.release()}",
             f"python {platform.python_version()} ({sys.executable}); load average "
             f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (other work on the machine "
             f"makes every figure noisier)"]
    try:
        from importlib.metadata import version
        vs = []
        for pkg in ("mpi4py", "mpich", "numpy", "ipyparallel"):
            try:
                vs.append(f"{pkg} {version(pkg)}")
            except Exception:
                vs.append(f"{pkg} not installed")
        lines.append(", ".join(vs))
    except ImportError:
        pass
    return lines


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny sizes, 1-2 repetitions, 4 engines, 1 s idle")
    ap.add_argument("--memory", action="store_true",
                    help="also measure peak memory of pushing 1 GB to all engines")
    ap.add_argument("--huge", action="store_true",
                    help="also push a 2.5 GiB array to one engine and pull it back")
    ap.add_argument("--tls", action="store_true",
                    help="also run the operations on two mpiengine clusters, TLS off and on")
    ap.add_argument("--reps", type=int, default=None,
                    help="repetitions of heavy operations (default 5; --quick 2)")
    ap.add_argument("--engines", type=int, default=4, help="engines of the main cluster")
    ap.add_argument("--no-ipyparallel", action="store_true", help="skip ipyparallel")
    ap.add_argument("--ipp-max-engines", type=int, default=32,
                    help="largest ipyparallel cluster of the scaling rows (default 32)")
    ap.add_argument("--json", metavar="PATH", help="also write every sample to PATH")
    return ap.parse_args(argv)


def build_rows(sizes: suite.Sizes, n: int, ops: Dict[str, Dict[str, List[float]]],
               floor: Dict[str, Any], starts: Dict[str, List[float]],
               idle: Dict[str, Dict[str, List[float]]], scaled: Dict[str, Dict[int, Any]],
               ipp_note: str) -> List[Row]:
    rows = []
    for op in suite.ops(sizes):
        got = ops.get(op.key, {})
        rows.append(Row(op.key, op.label, "ms", got.get("mpiengine", []),
                        got.get("ipyparallel", []), floor.get(op.key),
                        "" if got.get("mpiengine") else "failed",
                        ipp_note or ("" if got.get("ipyparallel") else "failed")))
    rows.append(Row("start", f"start {n} engines until all answer", "s",
                    starts.get("mpiengine", []), starts.get("ipyparallel", []),
                    floor.get("start"), ipp_note=ipp_note))
    w = f"{sizes.idle:g} s"
    me_idle, ipp_idle = idle.get("mpiengine", {}), idle.get("ipyparallel", {})
    rows.append(Row("idle_cpu", f"idle CPU of all ranks per 10 s ({w} windows)", "CPU-s",
                    me_idle.get("cpu", []), ipp_idle.get("cpu", []), None, ipp_note=ipp_note))
    rows.append(Row("first_after_idle", f"first execute('pass') after {w} idle", "ms",
                    me_idle.get("first", []), ipp_idle.get("first", []),
                    floor.get("first_after_idle"), ipp_note=ipp_note))
    for m in (4, 16, 32):
        me = scaled.get("mpiengine", {}).get(m, {})
        ip = scaled.get("ipyparallel", {}).get(m, {})
        skipped = "" if m in sizes.scale else "skipped (--quick)"
        rows.append(Row(f"scale_{m}", f"execute('pass'), all of {m} engines", "ms",
                        me.get("exec", []), ip.get("exec", []), None,
                        me.get("skip", skipped), ipp_note or ip.get("skip", skipped)))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    sizes = suite.QUICK if args.quick else suite.FULL
    if args.reps:
        sizes = dataclasses.replace(sizes, reps=args.reps, start_reps=args.reps)
    n = args.engines
    if n not in sizes.scale:
        sizes = dataclasses.replace(sizes, scale=tuple(sorted({n, *sizes.scale})))

    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    for line in machine():
        log(f"# {line}")
    ipp_note = ""
    if args.no_ipyparallel:
        ipp_note = "skipped (--no-ipyparallel)"
    elif clusters.ipyparallel_missing():
        ipp_note = "not installed"
        log(f"# ipyparallel: {clusters.ipyparallel_missing()}; its columns stay empty")
    mode = "QUICK smoke run: sizes are tiny, ratios and targets mean nothing" if args.quick \
        else "full run"
    log(f"# {mode}; {n} engines; {sizes.reps} repetitions of heavy operations, "
        f"{sizes.reps_fast} of fast ones")
    workdir = tempfile.mkdtemp(prefix="mpiengine-bench-")
    t_start = time.monotonic()
    samples: Dict[str, Any] = {}
    try:
        floor = floors.measure(sizes, n, log)
        samples["floor"] = floor
        kinds = [clusters.MpiengineCluster] + ([] if ipp_note else [clusters.IppCluster])
        starts, running = {}, {}
        for cls in kinds:
            starts[cls.framework], running[cls.framework] = lifecycle.start_reps(
                cls, n, workdir, sizes.start_reps, log)
        data = suite.Data(sizes, n)
        ops = suite.run_ops({k: c.adapter() for k, c in running.items()}, data, sizes, log)
        del data
        idle = lifecycle.idle(list(running.values()), sizes.idle, sizes.start_reps, log)
        for c in running.values():
            c.stop()
        # Every size of the scaling rows gets a fresh cluster of its own, measured in
        # the same phase, so that 32 is compared with 4 under the same conditions (the
        # --quick run reuses the main cluster's figures instead, to stay short).
        scaled: Dict[str, Dict[int, Any]] = {}
        fresh = [m for m in sizes.scale if m != n or not args.quick]
        for cls in kinds:
            limit = args.ipp_max_engines if cls is clusters.IppCluster else None
            scaled[cls.framework] = lifecycle.scale(cls, fresh, workdir, sizes.reps_fast, log,
                                                    limit)
            if n not in fresh:
                scaled[cls.framework][n] = {"exec": ops["exec"].get(cls.framework, [])}
        rows = build_rows(sizes, n, ops, floor, starts, idle, scaled, ipp_note)
        mem: List[Dict[str, Any]] = []
        if args.memory:
            mem.append(memory.measure(workdir, 10**9, "push_all", log))
        if args.huge:
            mem.append(memory.measure(workdir, int(2.5 * 2**30), "huge", log))
        with_tls = tls.measure(workdir, n, sizes, log) if args.tls else {}
        samples.update(rows=[dataclasses.asdict(r) for r in rows], memory=mem,
                       ops=ops, starts=starts, idle=idle, scaled=scaled, tls=with_tls)
        print_report(rows, floor, idle, scaled, mem, time.monotonic() - t_start, args.quick)
        if with_tls:
            print()
            print("\n".join(tls.describe(with_tls, sizes)))
        if args.json:
            Path(args.json).write_text(json.dumps(samples, indent=1, default=str))
    finally:
        clusters.stop_all()
        # Whatever is still under this process is ours: a signal can land between a
        # launcher's fork and its bookkeeping. End it by pid before leaving.
        leftover = procs.descendants(os.getpid())
        if leftover:
            log(f"# ending {len(leftover)} leftover processes by pid: {sorted(leftover)}")
            procs.end(leftover)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def print_report(rows: List[Row], floor: Dict[str, Any], idle: Dict[str, Any],
                 scaled: Dict[str, Any], mem: List[Dict[str, Any]], seconds: float,
                 quick: bool) -> None:
    print()
    print(report.table(rows))
    print()
    print(report.summary(rows) + (" (QUICK run: not meaningful)" if quick else ""))
    for fw, res in idle.items():
        if res.get("tree"):
            print(f"{fw}: idle CPU of every process of the cluster (launcher included): "
                  f"median {sorted(res['tree'])[len(res['tree']) // 2]:.3f} CPU-s per 10 s")
    for fw, per_n in scaled.items():
        for m, res in sorted(per_n.items()):
            if res.get("start") is not None:
                print(f"{fw}: a cluster of {m} engines took {res['start']:.1f} s to start")
            elif res.get("skip"):
                print(f"{fw}: {m} engines {res['skip']}")
    for f in mem:
        for line in memory.describe(f):
            print(f"memory: {line}")
    m = floor.get("_mpi", {})
    print(f"floor: {m.get('library', '?')} with {m.get('ranks', '?')} ranks spinning in "
          f"blocking collectives; recipes in benchmarks/floors.py")
    print(f"total time {seconds:.0f} s; load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
