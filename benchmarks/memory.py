"""``--memory`` and ``--huge``: how much memory very large pushes and pulls cost.

:func:`measure` starts a fresh 4-engine mpiengine cluster, runs a fresh client
process (``python -m benchmarks.memory``, so earlier benchmarks do not inflate
its peak), and meanwhile samples the resident memory of the controller and of
the engines every few milliseconds. Peaks also come from ``VmHWM`` in
/proc/PID/status, reset first by writing 5 to /proc/PID/clear_refs where the
kernel allows it.

- ``push_all``: a 1 GB float64 array pushed to every engine. Reported: the
  controller's peak RSS increase, and the client's beyond the array itself.
- ``huge``: a 2.5 GiB array pushed to engine 0 and pulled back (objects over
  2 GiB: MPI counts and frame sizes past 32 bits), checked for equality.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from . import procs


def reset_hwm(pid: str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler:
    """Sample the RSS of some pids every ``period`` s in a thread: (monotonic time, rss)."""

    def __init__(self, pids: List[int], period: float = 0.005) -> None:
        self.pids, self.period = pids, period
        self.samples: Dict[int, List[tuple]] = {p: [] for p in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for p in self.pids:
                rss = procs.rss_bytes(p)
                if rss is not None:
                    self.samples[p].append((now, rss))
            self._stop.wait(self.period)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def peak(self, pid: int, start: float = 0.0, end: float = float("inf")) -> Optional[int]:
        window = [r for t, r in self.samples[pid] if start <= t <= end]
        return max(window) if window else None


# --- the client process ------------------------------------------------------------
def _status(field: str) -> int:
    return (procs.status_kib(os.getpid(), field) or 0) * 1024


def client_main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connection-file", required=True)
    ap.add_argument("--bytes", type=int, required=True)
    ap.add_argument("--mode", choices=("push_all", "huge"), required=True)
    args = ap.parse_args(argv)
    import numpy as np
    from mpiengine import client

    mec = client.MultiEngineClient(args.connection_file, timeout=30.0)
    targets = "all" if args.mode == "push_all" else 0
    mec.push({"warm": np.ones(1000)}, targets=targets)  # warm every code path once
    mec.pull("warm", targets=0)
    arr = np.arange(args.bytes // 8, dtype=np.float64)  # writes every page: resident
    out: Dict[str, Any] = {"array_bytes": arr.nbytes}

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        can_reset = reset_hwm()
        before = _status("VmRSS")
        with Sampler([os.getpid()]) as me:  # in case VmHWM cannot be reset
            t0 = time.monotonic()
            value = fn()
            t1 = time.monotonic()
        peak = max(me.peak(os.getpid()) or 0, _status("VmHWM") if can_reset else 0)
        out[name] = {"seconds": t1 - t0, "start": t0, "end": t1, "rss_before": before,
                     "peak": peak}
        return value

    phase("push", lambda: mec.push({"big": arr}, targets=targets))
    if args.mode == "huge":
        back = phase("pull", lambda: mec.pull("big", targets=0)[0])
        out["pull_correct"] = bool(back.shape == arr.shape and back.dtype == arr.dtype
                                   and np.array_equal(back, arr))
        del back
    mec.execute("del big", targets=targets)
    mec.close()
    print("MEM_JSON " + json.dumps(out), flush=True)
    return 0


# --- the measuring side --------------------------------------------------------------
def measure(workdir: str, nbytes: int, mode: str, log: Callable[[str], None]) -> Dict[str, Any]:
    """Run one memory scenario on a fresh cluster; return its figures (bytes, seconds)."""
    from .clusters import MpiengineCluster, REPO_ROOT, mpi_env

    cluster = MpiengineCluster(4, workdir, name=f"mem-{mode}")
    try:
        cluster.start()
        ctrl = int(cluster.mec.info.pid)
        engines = [int(e["pid"]) for e in cluster.mec.engines]
        base = {p: procs.rss_bytes(p) or 0 for p in [ctrl] + engines}
        hwm_ok = all(reset_hwm(str(p)) for p in [ctrl] + engines)
        cmd = [sys.executable, "-m", "benchmarks.memory", "--connection-file",
               str(cluster.file), "--bytes", str(nbytes), "--mode", mode]
        with Sampler([ctrl] + engines) as sampler:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=str(REPO_ROOT), env=mpi_env(), start_new_session=True)
            pids = procs.remember(proc.pid)
            try:
                out, err = proc.communicate(timeout=900)
            except subprocess.TimeoutExpired:
                procs.end(pids)
                proc.communicate(timeout=10)
                raise RuntimeError(f"the {mode} memory client did not finish within 900 s")
        ctrl_hwm = (procs.status_kib(ctrl, "VmHWM") or 0) * 1024 if hwm_ok else 0
        eng_hwm = [(procs.status_kib(p, "VmHWM") or 0) * 1024 if hwm_ok else 0 for p in engines]
    finally:
        cluster.stop()
    text = out.decode()
    line = next((ln for ln in text.splitlines() if ln.startswith("MEM_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"the {mode} memory client failed (exit {proc.returncode}):\n"
                           f"{err.decode()[-3000:]}")
    res = json.loads(line[len("MEM_JSON "):])
    figures: Dict[str, Any] = {"mode": mode, "array_bytes": res["array_bytes"],
                               "hwm_reset": hwm_ok}
    for ph in ("push", "pull"):
        if ph not in res:
            continue
        r = res[ph]
        client_peak = r["peak"]
        sampled = sampler.peak(ctrl, r["start"], r["end"]) or base[ctrl]
        figures[ph] = {
            "seconds": r["seconds"],
            # The client already holds the array (and, pulling, must end up with the copy).
            "client_extra": client_peak - r["rss_before"] - (res["array_bytes"] if ph == "pull"
                                                             else 0),
            "controller_sampled": sampled - base[ctrl],
        }
    figures["controller_hwm"] = ctrl_hwm - base[ctrl] if hwm_ok else None
    figures["engine_hwm_max"] = (max(h - base[p] for h, p in zip(eng_hwm, engines))
                                 if hwm_ok else None)
    if "pull_correct" in res:
        figures["pull_correct"] = res["pull_correct"]
    return figures


def describe(f: Dict[str, Any]) -> List[str]:
    """Lines for the report."""
    gb = 1e9
    size = f"{f['array_bytes'] / 2**30:.2f} GiB" if f["mode"] == "huge" else \
        f"{f['array_bytes'] / gb:g} GB"
    lines = []
    where = "to all 4 engines" if f["mode"] == "push_all" else "to engine 0"
    p = f["push"]
    lines.append(f"push {size} {where}: {p['seconds']:.2f} s; client peak RSS beyond the array "
                 f"+{p['client_extra'] / 2**20:.0f} MiB; controller peak RSS (sampled) "
                 f"+{p['controller_sampled'] / 2**20:.0f} MiB")
    if "pull" in f:
        q = f["pull"]
        lines.append(f"pull {size} back from engine 0: {q['seconds']:.2f} s; client peak RSS "
                     f"beyond the array it receives +{q['client_extra'] / 2**20:.0f} MiB; "
                     f"controller peak (sampled) +{q['controller_sampled'] / 2**20:.0f} MiB; "
                     f"equal to the original: {f.get('pull_correct')}")
    if f["controller_hwm"] is not None:
        lines.append(f"controller VmHWM increase over the whole run "
                     f"+{f['controller_hwm'] / 2**20:.0f} MiB; largest engine VmHWM increase "
                     f"+{f['engine_hwm_max'] / 2**20:.0f} MiB")
    return lines


if __name__ == "__main__":
    sys.exit(client_main())
