"""Every script under ``examples/`` runs, passes its own checks and prints what it should.

The scripts that expect a running cluster run against the session cluster
(named by ``$MPIENGINE_CONNECTION_FILE``, or as the walkthrough's argument; the
``mec`` fixture clears the engines afterwards). ``quickstart.py`` starts and stops a cluster of its own under a
temporary ``$MPIENGINE_DIR``; while it runs, the test remembers that cluster's
processes (the ``mpiexec`` pid from the ``.mpiexec`` sidecar and its process
tree) and afterwards checks, in /proc, that none is left. Leftovers are killed
by pid and fail the test.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from harness import REPO_ROOT, Watched, mpi_env, poll_for

pytestmark = pytest.mark.mpi

EXAMPLES = REPO_ROOT / "examples"
SCRIPT_TIMEOUT = 120.0


def run_example(name: str, env: Dict[str, str], log: Path, args: List[str] = (),
                watch: Optional[Callable[[], None]] = None) -> str:
    """Run ``examples/NAME`` to completion (at most SCRIPT_TIMEOUT s); return its output.

    ``watch`` is called every 20 ms while the script runs. On timeout the script
    and everything under it are killed by pid and the test fails.
    """
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(EXAMPLES / name), *args], env=env,
                                cwd=str(log.parent), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    tree = Watched()
    deadline = time.monotonic() + SCRIPT_TIMEOUT
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            tree.add_tree(proc.pid)
            if watch is not None:
                watch()
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            tree.add_tree(proc.pid)
            tree.kill()
            proc.kill()
            proc.wait(10)
            pytest.fail(f"{name} did not finish within {SCRIPT_TIMEOUT:g} s; output:\n"
                        f"{log.read_text(errors='replace')}")
    output = log.read_text(errors="replace")
    print(output)  # shows with -s, and in the report of a failing test
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{output}"
    return output


@pytest.fixture
def cluster_env(mec, connection_file: str, tmp_path: Path) -> Dict[str, str]:
    """Run a script against the session cluster; ``mec`` resets the engines afterwards."""
    return mpi_env({"MPIENGINE_CONNECTION_FILE": connection_file,
                    "MPIENGINE_DIR": str(tmp_path / "mpiengine-dir"),
                    "IPYTHONDIR": str(tmp_path / "ipython")})


@pytest.mark.timeout(150)
def test_walkthrough(mec, connection_file: str, tmp_path: Path) -> None:
    # The connection file as an argument here; the other scripts find it through
    # $MPIENGINE_CONNECTION_FILE.
    env = mpi_env({"MPIENGINE_DIR": str(tmp_path / "empty"),
                   "IPYTHONDIR": str(tmp_path / "ipython")})
    out = run_example("walkthrough.py", env, tmp_path / "walkthrough.log", [connection_file])
    assert "walkthrough: all checks passed" in out
    assert ">>> mec.get_ids()\n[0, 1, 2, 3]" in out
    assert "[1] Out[" in out and ": -5" in out            # c = a - b on the odd engines
    assert "Auto Parallel Enabled" in out and "Auto Parallel Disabled" in out
    assert "[3:execute]: ZeroDivisionError: division by zero" in out
    assert "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]" in out


@pytest.mark.timeout(150)
def test_pi_montecarlo(cluster_env: Dict[str, str], tmp_path: Path) -> None:
    out = run_example("pi_montecarlo.py", cluster_env, tmp_path / "pi.log")
    assert "pi_montecarlo: all checks passed" in out
    assert re.search(r"pi is about 3\.1[34]\d*", out), out
    assert re.search(r"comm\.reduce \(root 0\):\s+\[\d+, None, None, None\]", out), out


@pytest.mark.timeout(150)
def test_numpy_scatter_gather(cluster_env: Dict[str, str], tmp_path: Path) -> None:
    out = run_example("numpy_scatter_gather.py", cluster_env, tmp_path / "numpy.log")
    assert "numpy_scatter_gather: all checks passed" in out
    assert "[(251, 64), (250, 64), (250, 64), (250, 64)]" in out
    assert "[ok] elementwise result equals the serial one" in out
    assert "FAILED" not in out


@pytest.mark.timeout(150)
def test_parallel_decorator(cluster_env: Dict[str, str], tmp_path: Path) -> None:
    out = run_example("parallel_decorator.py", cluster_env, tmp_path / "decorator.log")
    assert "parallel_decorator: all checks passed" in out
    assert "quartic(range(8)) -> [0.0, 10.0, 160.0, 810.0," in out
    assert "FAILED" not in out


@pytest.mark.timeout(180)
def test_quickstart_starts_and_stops_its_own_cluster(tmp_path: Path) -> None:
    home = tmp_path / "mpiengine-dir"
    connection_file = home / "security" / "controller-quickstart.json"
    sidecar = Path(str(connection_file) + ".mpiexec")
    env = mpi_env({"MPIENGINE_DIR": str(home), "IPYTHONDIR": str(tmp_path / "ipython")})
    cluster = Watched()
    seen = {}

    def watch() -> None:
        # The sidecar exists from just after mpiexec starts until 'stop' is done.
        try:
            pid = int(json.loads(sidecar.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return
        seen["mpiexec"] = pid
        cluster.add_tree(pid)

    try:
        out = run_example("quickstart.py", env, tmp_path / "quickstart.log", watch=watch)
        assert "quickstart: all checks passed" in out
        assert "mec.get_ids() -> [0, 1, 2, 3]" in out
        assert "[2:execute]: ZeroDivisionError: division by zero" in out
        assert "mec.pull('total') -> [10, 10, 10, 10]" in out
        assert "mec.gather('chunk') -> [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in out

        assert "mpiexec" in seen, "never saw the .mpiexec sidecar of the quickstart cluster"
        engine_pids = {int(p) for p in re.findall(r"engine \d+ on \S+ pid (\d+)", out)}
        assert len(engine_pids) == 4, out
        assert engine_pids <= set(cluster.pids), (
            f"the engines {engine_pids} were not under mpiexec {seen['mpiexec']}")
        try:
            poll_for(lambda: not cluster.alive(), 5.0, what="the quickstart cluster to exit")
        except TimeoutError:
            pytest.fail(f"quickstart left processes running: {cluster.alive()}")
        assert not connection_file.exists() and not sidecar.exists()
    finally:
        if cluster.alive():
            cluster.kill()


@pytest.mark.parametrize("targets", ["all", 0])
def test_a_quick_failure_prints_only_the_composite_error(mec, capsys, targets) -> None:
    """The examples' 1/0 shows the CompositeError and nothing else.

    Regression: the controller used to send "(failed; the other engines are still
    running)" on stderr for every engine that failed, even the last one, so the
    examples printed one misleading line per engine before the CompositeError.
    """
    from mpiengine import client

    for _ in range(3):
        with pytest.raises(client.CompositeError):
            mec.execute("1/0", targets=targets)
    captured = capsys.readouterr()
    assert "ZeroDivisionError" not in captured.err + captured.out, captured
