"""Start, stop and inspect a local cluster from the user's shell.

``start`` runs ``mpiexec -n N+1 python -m mpiengine serve`` in a new session in
the background, logging to ``~/.mpiengine/log/``, and returns once every engine
has answered. The mpiexec pid is kept beside the connection file (``.mpiexec``)
so that ``stop`` can end the whole process group by pid if the cluster does not
shut down by itself.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, List, Optional

from . import connection
from . import protocol as P
from .client import MultiEngineClient
from .errors import ConnectError, MPIEngineError


class LaunchError(MPIEngineError, RuntimeError):
    """Raised when a cluster cannot be started, reached or stopped; the message says why."""


def find_mpiexec() -> List[str]:
    """The launcher command as words: $MPIEXEC (may carry flags, e.g. 'mpirun
    --oversubscribe'), else the mpiexec beside this Python (a venv with the mpich
    wheel), else the one on PATH."""
    env = os.environ.get("MPIEXEC")
    if env:
        return shlex.split(env)
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        return [beside]
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise LaunchError("no mpiexec found: install an MPI ('pip install mpiengine[mpich]') "
                          "or set $MPIEXEC")
    return [found]


def _sidecar(path: str) -> str:
    return path + ".mpiexec"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def _try_connect(path: str, timeout: float) -> Optional[MultiEngineClient]:
    try:
        return MultiEngineClient(path, timeout=timeout)
    except (ConnectError, OSError):
        return None


def start(n: int, path: str, profile: Optional[str], ip: str, port: int, timeout: float,
          tls: str = "auto") -> int:
    if n < 1:
        raise LaunchError(f"-n counts engines and must be at least 1; got {n}")
    if os.path.exists(path):
        mec = _try_connect(path, 2.0)
        if mec is not None:
            mec.close()
            raise LaunchError(f"a cluster is already running with {path}; "
                              f"'mpiengine stop' it or use another --profile")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    logdir = os.path.join(connection.base_dir(), "log")
    os.makedirs(logdir, mode=0o700, exist_ok=True)
    name = profile or os.path.splitext(os.path.basename(path))[0].replace("controller-", "")
    log_path = os.path.join(logdir, f"cluster-{name}.log")
    cmd = find_mpiexec() + ["-n", str(n + 1), sys.executable, "-m", "mpiengine", "serve",
           "--connection-file", path, "--ip", ip, "--port", str(port), "--tls", tls]
    if profile:
        cmd += ["--profile", profile]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    with open(_sidecar(path) + ".tmp", "w") as f:
        json.dump({"pid": proc.pid, "log": log_path}, f)
    os.replace(_sidecar(path) + ".tmp", _sidecar(path))
    try:
        return _await_start(proc, n, path, log_path, timeout)
    except BaseException:  # Ctrl-C, a crash, a timeout: never leave a half-started job
        _kill_group(proc.pid)
        if os.path.exists(_sidecar(path)):
            os.unlink(_sidecar(path))
        raise


def _await_start(proc: subprocess.Popen, n: int, path: str, log_path: str,
                 timeout: float) -> int:
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LaunchError(f"mpiexec exited with code {proc.returncode} before the cluster "
                              f"was up; its log ({log_path}) ends with:\n{_tail(log_path)}")
        if os.path.exists(path):
            mec = _try_connect(path, 5.0)
            if mec is not None:
                try:
                    mec._submit(P.PING, "all", True, max(1.0, deadline - time.monotonic()), {})
                finally:
                    mec.close()
                print(path)
                sys.stderr.write(f"mpiengine: {n} engines answered after "
                                 f"{time.monotonic() - t0:.1f} s (log: {log_path})\n")
                return 0
        time.sleep(0.05)
    raise LaunchError(f"the cluster did not answer within {timeout} s and was stopped; "
                      f"its log ({log_path}) ends with:\n{_tail(log_path)}")


def stop(path: str, timeout: float) -> int:
    pid = _launched_pid(path)
    mec = _try_connect(path, min(5.0, timeout)) if os.path.exists(path) else None
    if mec is None and pid is None:
        lost = _lost_note(path)
        if lost:
            print(f"the cluster had already ended: {lost}")
        stale = [p for p in (path, _sidecar(path), path + ".lost") if os.path.exists(p)]
        if not stale:
            raise LaunchError(f"no cluster to stop: {path} does not exist")
        for leftover in stale:
            os.unlink(leftover)
        print(f"no cluster answers at {path}; removed its stale files")
        return 0
    controller = None
    if mec is not None:
        controller = mec.info.pid if mec.info.host == os.uname().nodename else None
        try:
            mec.shutdown()
        except MPIEngineError:
            pass
    deadline = time.monotonic() + timeout
    watched = [p for p in (pid, controller) if p]
    while time.monotonic() < deadline and any(_alive(p) for p in watched):
        time.sleep(0.05)
    if pid and _alive(pid):
        _kill_group(pid)
    lost = _lost_note(path)
    if lost:
        print(f"the cluster had already ended: {lost}")
    for leftover in (_sidecar(path), path + ".lost", path):
        if os.path.exists(leftover) and (leftover != path or _try_connect(path, 1.0) is None):
            try:
                os.unlink(leftover)
            except OSError:
                pass
    print(f"stopped the cluster of {path}")
    return 0


def status(path: str, timeout: float) -> int:
    mec = _try_connect(path, min(timeout, 10.0))
    if mec is None:
        state = "no connection file" if not os.path.exists(path) else "not answering"
        print(f"no running cluster at {path} ({state})")
        lost = _lost_note(path)
        if lost:
            print(f"it ended because {lost}")
        return 1
    with mec:
        queues = dict(mec.queue_status())
        print(f"cluster at {mec.info.ip}:{mec.info.port}, controller pid {mec.info.pid} "
              f"on {mec.info.host}, {len(mec.engines)} engines")
        print(f"{'id':>4}  {'host':<20} {'pid':>8}  {'state':<5} {'queue':>5}")
        for e in mec.engines:
            q = queues.get(e["id"], {})
            busy = q.get("pending") is not None
            waiting = len(q.get("queue", []))
            print(f"{e['id']:>4}  {e['host']:<20} {e['pid']:>8}  "
                  f"{'busy' if busy else 'idle':<5} {waiting + busy:>5}")
    return 0


def wait(path: str, timeout: float) -> int:
    """Wait until the cluster of ``path`` answers; print the path."""
    t0 = time.monotonic()
    try:
        mec = MultiEngineClient(path, wait=timeout)
    except ConnectError as e:
        raise LaunchError(f"no cluster answered within {timeout:.0f} s: {e}") from None
    with mec:
        n = len(mec.engines)
    print(path)
    sys.stderr.write(f"mpiengine: {n} engines answered after {time.monotonic() - t0:.1f} s\n")
    return 0


SBATCH_TEMPLATE = """#!/bin/bash
#SBATCH --job-name=mpiengine-{profile}
#SBATCH --ntasks={ranks}
#SBATCH --time={time}
#SBATCH --output={qlogdir}/slurm-%j.out
{extra}
# An mpiengine cluster: rank 0 is the controller, ranks 1..{n} are engines 0..{last}.
# Connect from the login node with:  mpiengine wait --connection-file {path}
#   then in Python:  client.MultiEngineClient({path!r})
# Written by 'mpiengine sbatch'. The connection file must be on a filesystem that the
# login node sees too (home directories usually are).
{launch} {python} -m mpiengine serve --connection-file {qpath}{profile_arg} --ip {qip}
"""


def sbatch(n: int, path: str, profile: Optional[str], args: Any) -> int:
    """Print a batch script for an n-engine cluster, or submit it with --submit."""
    if n < 1:
        raise LaunchError(f"-n counts engines and must be at least 1; got {n}")
    extra = "\n".join(f"#SBATCH --{k}={v}" for k, v in
                      (("partition", args.partition), ("account", args.account)) if v)
    if args.launcher == "srun":
        launch = 'srun --mpi="${SRUN_MPI:-pmi2}"'
    else:
        launch = " ".join(shlex.quote(w) for w in find_mpiexec()) + ' -n "$SLURM_NTASKS"'
    logdir = os.path.join(connection.base_dir(), "log")
    script = SBATCH_TEMPLATE.format(
        profile=profile or "default", ranks=n + 1, n=n, last=n - 1, time=args.time,
        qlogdir=shlex.quote(logdir), extra=extra, path=path, qpath=shlex.quote(path),
        launch=launch, python=shlex.quote(sys.executable), qip=shlex.quote(args.ip),
        profile_arg=f" --profile {shlex.quote(profile)}" if profile else "")
    if not args.submit:
        sys.stdout.write(script)
        return 0
    os.makedirs(logdir, mode=0o700, exist_ok=True)
    try:
        out = subprocess.run(["sbatch", "--parsable"], input=script.encode(),
                             capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"sbatch failed: {e}") from None
    if out.returncode != 0:
        raise LaunchError(f"sbatch refused the job: {out.stderr.decode().strip()}")
    job = out.stdout.decode().strip().split(";")[0]
    print(job)
    sys.stderr.write(f"mpiengine: submitted job {job}; 'mpiengine wait --connection-file "
                     f"{path}' returns when it answers\n")
    return 0


def _lost_note(path: str) -> Optional[str]:
    """What the controller wrote when an engine died, if it did."""
    try:
        with open(path + ".lost") as f:
            return str(json.load(f)["message"])
    except (OSError, ValueError, KeyError):
        return None


def _launched_pid(path: str) -> Optional[int]:
    try:
        with open(_sidecar(path)) as f:
            pid = int(json.load(f)["pid"])
    except (OSError, ValueError, KeyError):
        return None
    return pid if _alive(pid) else None


def _kill_group(pid: int) -> None:
    """End mpiexec and every rank it started (they share its session), by pid."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if not _alive(pid):
            return


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


__all__: List[str] = ["start", "stop", "status", "wait", "sbatch", "find_mpiexec",
                      "LaunchError"]
