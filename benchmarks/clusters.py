"""Start and stop the clusters under test, timing how long they take to be usable.

``MpiengineCluster`` is one ``mpiexec -n N+1 python -m mpiengine serve`` job;
``IppCluster`` is an ipyparallel controller with N local engines, started with
ipyparallel's own ``Cluster`` API. ``start()`` returns the seconds from launch
until every engine has answered an ``execute('pass')``. ``stop()`` asks the
cluster to end (``shutdown()`` / ``stop_cluster()``), with a deadline, and then
ends whatever is left by pid (see :mod:`benchmarks.procs`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

from . import procs

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 180.0

#: Clusters still running; run.py stops them on any exit.
LIVE: List[Any] = []


def find_mpiexec() -> str:
    env = os.environ.get("MPIEXEC")
    if env:
        return shutil.which(env) or env
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise RuntimeError("no mpiexec: set $MPIEXEC or 'pip install mpich' into this venv")
    return found


def mpi_env() -> dict:
    """os.environ plus oversubscription/root permission and this checkout on PYTHONPATH."""
    env = dict(os.environ)
    env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.pop("MPIENGINE_CONNECTION_FILE", None)
    return env


def run_with_deadline(fn: Callable[[], Any], timeout: float) -> Optional[BaseException]:
    """Run ``fn`` in a daemon thread; return its exception, or TimeoutError if it hung."""
    box: List[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # reported to the caller
            box.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return TimeoutError(f"{getattr(fn, '__name__', fn)} took more than {timeout:g} s")
    return box[0] if box else None


class MpiengineCluster:
    """One mpiengine job of ``n`` engines; ``self.mec`` is a connected client."""

    framework = "mpiengine"

    def __init__(self, n: int, workdir: str, name: str = "me",
                 args: Sequence[str] = ()) -> None:
        self.n = n
        self.args = list(args)  # more options of ``serve`` (``--tls on``)
        self.workdir = Path(workdir)
        self.file = self.workdir / f"{name}.json"
        self.log = self.workdir / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.mec: Any = None
        self.pids: procs.Pids = {}

    def start(self, timeout: float = START_TIMEOUT) -> float:
        from mpiengine import client

        cmd = [find_mpiexec(), "-n", str(self.n + 1), sys.executable, "-m", "mpiengine",
               "serve", "--connection-file", str(self.file), "--ip", "127.0.0.1", *self.args]
        if self.file.exists():
            self.file.unlink()
        LIVE.append(self)
        with open(self.log, "ab") as log:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                                         env=mpi_env(), start_new_session=True)
        self.pids = procs.remember(self.proc.pid)
        deadline = time.monotonic() + timeout
        scanned = time.monotonic()
        while not self.file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mpiexec exited with {self.proc.returncode} before the "
                                   f"cluster was up; see {self.log}:\n{self.tail()}")
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"no connection file after {timeout:g} s; see {self.log}")
            if now - scanned > 0.5:  # a /proc scan costs CPU the start needs: rarely
                self._remember()
                scanned = now
            time.sleep(0.005)
        self.mec = client.MultiEngineClient(str(self.file), timeout=30.0)
        self.mec.execute("pass", timeout=timeout)
        elapsed = time.perf_counter() - t0
        self._remember()
        return elapsed

    def _remember(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.pids.update(procs.descendants(self.proc.pid))

    def tree(self) -> procs.Pids:
        """Every process of the job: mpiexec, the Hydra proxy and the ranks."""
        self._remember()
        return procs.alive(self.pids)

    def rank_pids(self) -> List[int]:
        """Controller then engines, as the cluster reports them."""
        return [int(self.mec.info.pid)] + [int(e["pid"]) for e in self.mec.engines]

    def adapter(self) -> Any:
        from .suite import MpiengineOps
        return MpiengineOps(self.mec)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None:
            return
        self._remember()
        if self.mec is not None and self.proc.poll() is None:
            mec = self.mec
            err = run_with_deadline(mec.shutdown, 15.0)
            if err is not None:
                print(f"# mpiengine shutdown() failed: {err!r}; ending it by pid",
                      file=sys.stderr)
        self.mec = None
        try:
            self.proc.wait(20.0)
        except subprocess.TimeoutExpired:
            pass
        left = procs.end(procs.alive(self.pids))
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        if left:
            print(f"# could not end pids {sorted(left)}", file=sys.stderr)
        if self in LIVE:
            LIVE.remove(self)


def ipyparallel_missing() -> Optional[str]:
    """Why ipyparallel cannot be benchmarked here, or None."""
    import importlib.util

    if importlib.util.find_spec("ipyparallel") is None:
        return (f"ipyparallel is not installed in {sys.executable}; "
                f"'pip install -e .[benchmark]' to compare with it")
    return None


class IppCluster:
    """An ipyparallel controller and ``n`` local engines, via ``ipyparallel.Cluster``."""

    framework = "ipyparallel"

    def __init__(self, n: int, workdir: str, name: str = "ipp") -> None:
        self.n = n
        self.profile_dir = tempfile.mkdtemp(prefix=f"{name}-", dir=workdir)
        self.cluster: Any = None
        self.rc: Any = None
        self.pids: procs.Pids = {}
        self._before: procs.Pids = {}

    def start(self, timeout: float = START_TIMEOUT) -> float:
        import ipyparallel as ipp

        self._before = procs.descendants(os.getpid())
        LIVE.append(self)
        t0 = time.perf_counter()
        self.cluster = ipp.Cluster(n=self.n, profile_dir=self.profile_dir,
                                   controller_ip="127.0.0.1", log_level=logging.ERROR)
        try:
            asyncio.run(asyncio.wait_for(self.cluster.start_cluster(), timeout))
        finally:
            self._remember()
        self.rc = self.cluster.connect_client_sync()
        self.rc.wait_for_engines(self.n, timeout=timeout)
        self.rc[:].execute("pass", block=True)
        elapsed = time.perf_counter() - t0
        self._remember()
        return elapsed

    def _remember(self) -> None:
        now = procs.descendants(os.getpid())
        self.pids.update({p: s for p, s in now.items() if self._before.get(p) != s})

    def tree(self) -> procs.Pids:
        """The controller (with any processes it started) and the engines."""
        roots = [self.cluster.controller.pid]
        for engine_set in self.cluster.engines.values():
            roots += [el.pid for el in engine_set.launchers.values()]
        out: procs.Pids = {}
        for pid in roots:
            out.update(procs.remember(pid))
            out.update(procs.descendants(pid))
        return out

    def rank_pids(self) -> List[int]:
        return list(self.tree())

    def adapter(self) -> Any:
        from .suite import IppOps
        return IppOps(self.rc)

    def stop(self) -> None:
        if self.cluster is None:
            return
        try:
            self.pids.update(self.tree())
        except Exception:  # a half-started cluster: the pids seen at start must do
            pass
        if self.rc is not None:
            run_with_deadline(self.rc.close, 10.0)
            self.rc = None
        err = run_with_deadline(
            lambda: asyncio.run(asyncio.wait_for(self.cluster.stop_cluster(), 30.0)), 40.0)
        if err is not None:
            print(f"# ipyparallel stop_cluster failed: {err!r}; ending it by pid",
                  file=sys.stderr)
        left = procs.end(procs.alive(self.pids))
        if left:
            print(f"# could not end pids {sorted(left)}", file=sys.stderr)
        self.cluster = None
        if self in LIVE:
            LIVE.remove(self)


def stop_all() -> None:
    """Stop every cluster still running (also on errors and signals)."""
    for c in reversed(list(LIVE)):
        try:
            c.stop()
        except BaseException as e:  # keep stopping the others
            print(f"# stopping {c.framework} failed: {e!r}", file=sys.stderr)
