"""Start and stop real ``mpiexec`` clusters for the tests, with hard timeouts.

A :class:`Cluster` is one ``mpiexec -n N+1 python -m mpiengine serve`` job:
rank 0 the controller, ranks 1..N the engines. It runs in its own session with
its output in a log file; :meth:`Cluster.stop` asks it to shut down and, if it
does not, ends every process of the job by pid.

Why by pid and not by process group: MPICH's Hydra proxy puts every rank in a
session of its own (``setsid``), so a signal to the ``mpiexec`` process group
never reaches the ranks. The harness therefore records the process tree under
the ``mpiexec`` pid while it is alive and signals each of those pids, checking
the start time first so that a reused pid is never hit. Nothing is ever
killed by name.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

#: The repository root: the ranks import ``mpiengine`` from here.
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Seconds a cluster may take to write its connection file (2 cores, 5 ranks).
START_TIMEOUT = float(os.environ.get("MPIENGINE_TEST_START_TIMEOUT", "60"))

#: Every Cluster still running, so that an interpreter exit does not leak jobs.
_LIVE: "List[Cluster]" = []
_LIVE_LOCK = threading.Lock()


def poll_for(predicate: Callable[[], Any], timeout: float = 10.0,
             interval: float = 0.05, what: str = "") -> Any:
    """Call ``predicate`` until it returns something truthy; return that value.

    Raise ``TimeoutError`` naming ``what`` if ``timeout`` seconds pass first.
    The interval grows gently (x1.5 up to 0.5 s) so long waits do not spin.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for "
                               f"{what or getattr(predicate, '__name__', 'a condition')}")
        time.sleep(min(delay, remaining))
        delay = min(delay * 1.5, 0.5)


def find_mpiexec() -> Optional[str]:
    """Return the mpiexec to use: ``$MPIEXEC``, the one beside python, or PATH's."""
    env = os.environ.get("MPIEXEC")
    if env:
        found = shutil.which(env)
        return found or (env if os.access(env, os.X_OK) else None)
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpiexec") or shutil.which("mpirun")


def have_mpi4py() -> bool:
    """Return True if mpi4py is installed (found, not imported: importing starts MPI)."""
    import importlib.util
    return importlib.util.find_spec("mpi4py") is not None


def mpi_skip_reason() -> Optional[str]:
    """Return why real-MPI tests cannot run here, or None if they can."""
    if find_mpiexec() is None:
        return ("no mpiexec found ($MPIEXEC, next to %s, or on PATH); "
                "install one, e.g. pip install mpich" % sys.executable)
    if not have_mpi4py():
        return "mpi4py is not installed in %s" % sys.executable
    return None


def mpi_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Return os.environ plus what a test job needs: oversubscription, root, imports.

    MPICH's Hydra needs nothing to run as root or to put more ranks than cores on
    one node. Open MPI refuses both unless told; its variables are harmless to
    MPICH, so they are always set. The repository root goes first on PYTHONPATH
    so the ranks import this checkout of ``mpiengine``.
    """
    env = dict(os.environ)
    env.update({
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
        "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
        "PYTHONUNBUFFERED": "1",
    })
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # A test job must never pick up a developer's own connection file.
    env.pop("MPIENGINE_CONNECTION_FILE", None)
    if extra:
        env.update(extra)
    return env


# -- processes, by pid ---------------------------------------------------------

def _stat(pid: int) -> Optional[Tuple[int, str]]:
    """Return (ppid, start time) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = data[data.rfind(")") + 2:].split()
    if fields and fields[0] == "Z":
        return None  # a zombie holds no resources; its parent reaps it
    return int(fields[1]), fields[19]


def descendants(pid: int) -> Dict[int, str]:
    """Return ``{pid: start time}`` of every live process under ``pid``."""
    children: Dict[int, List[int]] = {}
    starts: Dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st is not None:
            children.setdefault(st[0], []).append(int(entry))
            starts[int(entry)] = st[1]
    found: Dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if p in found:
            continue
        found[p] = starts[p]
        todo.extend(children.get(p, []))
    return found


def _same_process(pid: int, start: str) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == start


def signal_pids(pids: Dict[int, str], sig: int) -> None:
    """Send ``sig`` to each still-running pid that is still the same process."""
    for pid, start in pids.items():
        if _same_process(pid, start):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _all_gone(pids: Dict[int, str]) -> bool:
    return not any(_same_process(p, s) for p, s in pids.items())


# -- the cluster ---------------------------------------------------------------

def _shm_files() -> set:
    """MPICH's shared-memory segments in /dev/shm (names start with mpich_shm_)."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("mpich_shm_")}
    except OSError:
        return set()


class Cluster:
    """One ``mpiexec`` job of ``python -m mpiengine serve`` with N engines."""

    def __init__(self, workdir: Optional[str] = None, name: str = "cluster",
                 start_timeout: float = START_TIMEOUT) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mpiengine-test-"))
        self.name = name
        self.start_timeout = start_timeout
        self.connection_file = self.workdir / f"{name}.json"
        self.log_file = self.workdir / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.n_engines = 0
        self.info: Dict[str, Any] = {}
        self._pids: Dict[int, str] = {}
        self._log = None

    # -- start -----------------------------------------------------------
    def command(self, n_engines: int, extra_args: Sequence[str] = ()) -> List[str]:
        mpiexec = find_mpiexec()
        if mpiexec is None:
            raise RuntimeError(mpi_skip_reason())
        return [mpiexec, "-n", str(n_engines + 1), sys.executable, "-m", "mpiengine",
                "serve", "--connection-file", str(self.connection_file),
                "--ip", "127.0.0.1", *extra_args]

    def start(self, n_engines: int = 4, extra_args: Sequence[str] = (),
              env: Optional[Dict[str, str]] = None) -> "Cluster":
        """Launch the job and wait (at most ``start_timeout`` s) for its connection file."""
        if self.proc is not None:
            raise RuntimeError(f"{self.name} is already started")
        self.n_engines = n_engines
        try:
            self.connection_file.unlink()
        except FileNotFoundError:
            pass
        self._log = open(self.log_file, "ab")
        self._shm_before = _shm_files()
        self.proc = subprocess.Popen(
            self.command(n_engines, extra_args), stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
            env=mpi_env(env), start_new_session=True)
        with _LIVE_LOCK:
            _LIVE.append(self)
        try:
            self.info = poll_for(self._ready, self.start_timeout, 0.05,
                                 what=f"{self.connection_file} (cluster start)")
        except BaseException as e:
            tail = self.log_tail()
            self.stop(shutdown=False)
            raise RuntimeError(f"{self.name} did not start: {e}\n"
                               f"--- {self.log_file} (tail) ---\n{tail}") from e
        self._remember_pids()
        return self

    def _ready(self) -> Optional[Dict[str, Any]]:
        if self.proc.poll() is not None:
            raise RuntimeError(f"mpiexec exited with code {self.proc.returncode} "
                               f"before writing {self.connection_file}")
        try:
            with open(self.connection_file) as f:
                return json.load(f) or None
        except (FileNotFoundError, ValueError):
            return None

    def _remember_pids(self) -> None:
        """Record the job's process tree while mpiexec is alive to show it."""
        if self.proc is not None and self.proc.poll() is None:
            self._pids.update(descendants(self.proc.pid))

    def job_pids(self) -> Dict[int, str]:
        """Every process of the running job, mpiexec itself included, with start times."""
        self._remember_pids()
        pids = dict(self._pids)
        st = _stat(self.proc.pid)
        if st is not None:
            pids[self.proc.pid] = st[1]
        return pids

    @property
    def controller_pid(self) -> Optional[int]:
        pid = self.info.get("pid")
        return int(pid) if pid else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kwargs: Any) -> Any:
        """Return a new MultiEngineClient connected to this cluster."""
        from mpiengine import client
        return client.MultiEngineClient(str(self.connection_file), **kwargs)

    # -- stop --------------------------------------------------------------
    def stop(self, shutdown: bool = True, timeout: float = 20.0) -> Optional[int]:
        """End the job; return mpiexec's exit code, or None if it had to be killed.

        First ``mec.shutdown()`` (in a thread, so a hung controller cannot hang
        the tests), then wait for mpiexec, then SIGTERM and SIGKILL by pid.
        The log tail is printed whenever the job did not end cleanly.
        """
        if self.proc is None:
            return None
        self._remember_pids()
        clean = True
        if shutdown and self.alive():
            err = _run_with_deadline(self._shutdown, 10.0)
            if err is not None:
                clean = False
                print(f"[harness] {self.name}: shutdown() failed: {err!r}", file=sys.stderr)
        # After a successful shutdown() the job should exit on its own; otherwise
        # waiting long only delays the signals.
        code = self._wait(timeout if shutdown and clean else 1.0)
        if code is None or not _all_gone(self._pids):
            clean = False
            pids = dict(self._pids)
            pids[self.proc.pid] = _stat(self.proc.pid)[1] if _stat(self.proc.pid) else ""
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                self._remember_pids()
                pids.update(self._pids)
                signal_pids(pids, sig)
                try:
                    os.killpg(self.proc.pid, sig)  # the Popen's own group: mpiexec
                except (ProcessLookupError, PermissionError):
                    pass
                code = self._wait(grace)
                try:
                    poll_for(lambda: _all_gone(pids), grace, 0.05, what="the ranks to exit")
                    break
                except TimeoutError:
                    continue
        if code not in (0,) and shutdown:
            clean = False
        if not clean:
            print(f"[harness] {self.name} did not stop cleanly (exit code {code}); "
                  f"--- {self.log_file} (tail) ---\n{self.log_tail()}", file=sys.stderr)
        self._remove_shm()
        self._close()
        return code

    def _remove_shm(self) -> None:
        """Delete the shared-memory files of this job that a killed rank left behind.

        MPICH unlinks them on a clean exit; the crash tests kill ranks, and on a CI
        machine /dev/shm is memory. Only files that appeared while this job ran go.
        """
        if not _all_gone(self._pids):
            return
        for name in _shm_files() - getattr(self, "_shm_before", set()):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass

    def _shutdown(self) -> None:
        mec = self.client()
        try:
            mec.shutdown()
        finally:
            try:
                mec.close()
            except Exception:
                pass

    def _wait(self, timeout: float) -> Optional[int]:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _close(self) -> None:
        with _LIVE_LOCK:
            if self in _LIVE:
                _LIVE.remove(self)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_file, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(lines[-n:])

    def cleanup(self) -> None:
        """Stop if needed and remove the work directory if the harness made it."""
        if self.alive():
            self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.alive() else "stopped"
        return f"<Cluster {self.name} {self.n_engines} engines {state} {self.connection_file}>"


def _run_with_deadline(fn: Callable[[], Any], timeout: float) -> Optional[BaseException]:
    """Run ``fn`` in a daemon thread; return its exception, or TimeoutError if it hung."""
    box: List[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # reported to the caller, not raised in the thread
            box.append(e)

    t = threading.Thread(target=target, daemon=True, name="harness-deadline")
    t.start()
    t.join(timeout)
    if t.is_alive():
        return TimeoutError(f"{getattr(fn, '__name__', fn)} took more than {timeout:g} s")
    return box[0] if box else None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on (as of now)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@atexit.register
def _stop_all() -> None:
    for c in list(_LIVE):
        try:
            c.stop(shutdown=False)
        except Exception:
            pass


# -- processes of a cluster that a test launched itself ------------------------

def _start_time(pid: int) -> Optional[str]:
    """Return the start time of a live (non-zombie) process, or None."""
    stat = _stat(pid)
    return stat[1] if stat else None


def tell(config: Any, tag: str, text: str) -> None:
    """Print past pytest's capture (set-up timings belong in the CI log)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        sys.stdout.write(f"\n[{tag}] {text}\n")
        return
    with capman.global_and_fixture_disabled():
        sys.stdout.write(f"\n[{tag}] {text}\n")
        sys.stdout.flush()


class Watched:
    """The processes of one cluster; a pid is signalled only while it is the same process."""

    def __init__(self) -> None:
        self.pids: Dict[int, str] = {}

    def add_tree(self, pid: int) -> None:
        start = _start_time(pid)
        if start is not None:
            self.pids[pid] = start
            self.pids.update(descendants(pid))

    def add_sidecar(self, connection_file: str) -> Optional[int]:
        """Remember the mpiexec of ``connection_file`` (from its sidecar) and its tree."""
        try:
            with open(connection_file + ".mpiexec") as f:
                pid = int(json.load(f)["pid"])
        except (OSError, ValueError, KeyError):
            return None
        self.add_tree(pid)
        return pid

    def alive(self) -> List[int]:
        return [p for p, s in self.pids.items() if _start_time(p) == s]

    def kill(self) -> None:
        signal_pids(self.pids, signal.SIGKILL)

    def assert_gone(self, timeout: float, what: str) -> None:
        try:
            poll_for(lambda: not self.alive(), timeout, what=what)
        except TimeoutError:
            left = self.alive()
            self.kill()
            raise AssertionError(f"{what}: processes {left} still running after {timeout:g} s "
                        f"(now killed by pid)")
