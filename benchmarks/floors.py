"""The floor of each operation: what raw sockets plus raw MPI cost on this machine.

An mpiengine operation is a client->controller socket transfer plus an MPI
collective (or the reverse), so its floor is the sum of the two halves, each
measured on its own: :mod:`floor_socket` for the TCP half, :mod:`floor_mpi`
(under ``mpiexec``) for the MPI half, with the pickling a client cannot avoid
(lists, map) counted where the operation needs it. :data:`RECIPES` says, per
row, which halves are added; docs/performance.md prints the same recipes.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from . import procs
from .clusters import REPO_ROOT, find_mpiexec, mpi_env
from .floor_socket import SocketFloor
from .suite import Sizes

HERE = Path(__file__).resolve().parent

#: Row key -> how its floor is made (socket terms s.*, MPI terms m.*).
RECIPES = {
    "exec1": "s.rtt(100 B) + m.rtt_one (bcast code, exec, gather; 2 ranks)",
    "exec": "s.rtt(100 B) + m.rtt_all (bcast code, exec, gather; all ranks)",
    "push_small": "s.up(S) + m.Bcast(S)",
    "pull_small": "m.Gatherv(S from each engine) + s.down(N*S)",
    "push_big": "s.up(B) + m.Bcast(B)",
    "pull_big": "m.Gatherv(B from each engine) + s.down(N*B)",
    "scatter_big": "s.up(B) + m.Scatterv(B)",
    "gather_big": "m.Gatherv(B) + s.down(B)",
    "scatter_list": "pickle pieces + s.up(pickles) + m.Scatterv(pickles) + unpickle",
    "gather_list": "pickle on engines + m.Gatherv(pickles) + s.down(pickles) + unpickle",
    "map_small": "m.scatter/map/gather (pickled) + s.up(in) + s.down(out)",
    "map_big": "m.scatter/map/gather (pickled) + s.up(in) + s.down(out)",
    "start": "mpiexec -n N+1 python: import mpi4py, cloudpickle; Barrier (launch to Barrier)",
    "first_after_idle": "same as execute('pass'), all engines (nothing ever sleeps)",
}


def run_mpi(args: List[str], n_ranks: int, timeout: float) -> subprocess.CompletedProcess:
    """Run ``python floor_mpi.py ARGS`` under ``mpiexec -n n_ranks``; end it by pid on timeout.

    The job's process tree is recorded while it runs, so that ranks Hydra put
    in sessions of their own can still be found and ended.
    """
    cmd = [find_mpiexec(), "-n", str(n_ranks), sys.executable, str(HERE / "floor_mpi.py"), *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=str(REPO_ROOT), env=mpi_env(), start_new_session=True)
        pids = procs.remember(proc.pid)
        deadline = time.monotonic() + timeout
        scanned = 0.0
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now - scanned > 0.25:  # a /proc scan costs CPU: not too often
                    pids.update(procs.descendants(proc.pid))
                    scanned = now
                if now > deadline:
                    raise RuntimeError(f"{' '.join(cmd[-3:])} did not finish within {timeout:g} s")
                time.sleep(0.005)
        finally:
            procs.end(procs.alive(pids))
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read().decode(),
                                           err.read().decode())


def mpi_floor(sizes: Sizes, n: int) -> dict:
    res = run_mpi(["--small", str(sizes.small), "--big", str(sizes.big),
                   "--nlist", str(sizes.nlist), "--map", f"{sizes.map_small},{sizes.map_big}",
                   "--reps", str(sizes.reps)], n + 1, timeout=600)
    for line in res.stdout.splitlines():
        if line.startswith("FLOOR_JSON "):
            return json.loads(line[len("FLOOR_JSON "):])
    raise RuntimeError(f"floor_mpi.py printed no result (exit {res.returncode}):\n"
                       f"{res.stderr[-2000:]}")


def start_floor(n: int, reps: int) -> List[float]:
    """Seconds from launching ``mpiexec -n N+1 python`` until every rank passed a Barrier."""
    times = []
    for _ in range(reps):
        t = time.time()  # wall clock: the ranks report theirs
        res = run_mpi(["--start-only"], n + 1, timeout=120)
        stamp = next((ln.split()[1] for ln in res.stdout.splitlines()
                      if ln.startswith("STARTED ")), None)
        if res.returncode != 0 or stamp is None:
            raise RuntimeError(f"floor_mpi.py --start-only failed: {res.stderr[-1000:]}")
        times.append(float(stamp) - t)
    return times


def measure(sizes: Sizes, n: int, log: Callable[[str], None]) -> Dict[str, Optional[float]]:
    """Return ``{row key: floor seconds}`` and, under 'mpi', the raw MPI figures."""
    m = mpi_floor(sizes, n)
    log(f"# floor: MPI half measured ({m['library']}, {m['ranks']} ranks)")
    b = m["bytes"]
    sock = SocketFloor()
    try:
        fast, reps = max(sizes.reps_fast, 50), sizes.reps
        s_rtt = sock.median("rtt", 100, 200)

        def up(nb: int, k: int = reps) -> float:
            return sock.median("up", nb, k)

        def down(nb: int, k: int = reps) -> float:
            return sock.median("down", nb, k)

        f: Dict[str, Optional[float]] = {
            "exec1": s_rtt + m["rtt_one"],
            "exec": s_rtt + m["rtt_all"],
            "push_small": up(sizes.small, fast) + m["bcast_small"],
            "pull_small": m["pull_small"] + down(sizes.small * n, fast),
            "push_big": up(sizes.big) + m["bcast_big"],
            "pull_big": m["pull_big"] + down(sizes.big * n),
            "scatter_big": up(sizes.big) + m["scatterv"],
            "gather_big": m["gatherv"] + down(sizes.big),
            "scatter_list": m["list_pickle"] + up(b["list"]) + m["list_scatter"],
            "gather_list": m["list_gather"] + down(b["list"]) + m["list_unpickle"],
        }
        for key, count in (("map_small", sizes.map_small), ("map_big", sizes.map_big)):
            f[key] = (m[f"map_{count}"] + up(b[f"map_{count}_in"])
                      + down(b[f"map_{count}_out"]))
        f["first_after_idle"] = f["exec"]
        socket_terms = {"rtt_100B": s_rtt, "up_big": up(sizes.big), "down_big": down(sizes.big)}
    finally:
        sock.close()
    log(f"# floor: socket half measured (100 B round trip {s_rtt * 1e6:.0f} us)")
    starts = start_floor(n, sizes.start_reps)
    f["start"] = sorted(starts)[len(starts) // 2]
    f["_mpi"] = m  # type: ignore[assignment]
    f["_socket"] = socket_terms  # type: ignore[assignment]
    return f
