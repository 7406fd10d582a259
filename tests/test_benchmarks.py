"""The benchmark suite runs: ``python benchmarks/run.py --quick --tls`` exits 0 with its tables.

No timing is asserted (CI machines are noisy); this only keeps the command
working: every operation has its row, under the table's header. The script
runs in a session of its own; if it overruns, it gets SIGTERM (it stops its
clusters on that) and then everything under it is ended by pid.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import harness

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "run.py"

#: The start of the row of each operation in a --quick run.
ROWS = [
    "execute('pass'), 1 engine",
    "execute('pass'), all engines",
    "push 1 kB float64 array",
    "pull 1 kB array (from all)",
    "push 100 kB float64 array",
    "pull 100 kB array (from all)",
    "scatter 100 kB array",
    "gather 100 kB array",
    "scatter list of 1,000 ints",
    "gather list of 1,000 ints",
    "map x**10 over 32 items",
    "map x**10 over 1,000 items",
    "start 4 engines until all answer",
    "idle CPU of all ranks per 10 s",
    "first execute('pass') after",
    "execute('pass'), all of 4 engines",
    "execute('pass'), all of 16 engines",
    "execute('pass'), all of 32 engines",
]
HEADER = ["operation", "mpiengine median [min-max]", "ipyparallel median [min-max]",
          "floor", "me/ipp", "me/floor", "target", "met"]


def _run(args, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MPIENGINE_CONNECTION_FILE", None)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = harness.descendants(proc.pid)
        proc.terminate()  # the script stops its clusters on SIGTERM
        try:
            out, _ = proc.communicate(timeout=25)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate(timeout=10)
        tree.update(harness.descendants(proc.pid))
        for sig in (15, 9):
            harness.signal_pids(tree, sig)
        pytest.fail(f"benchmarks/run.py {' '.join(args)} took more than {timeout:g} s; "
                    f"output:\n{out.decode(errors='replace')[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode,
                                       out.decode(errors="replace"), "")


@pytest.mark.mpi
@pytest.mark.timeout(180)
def test_quick_benchmark_prints_the_table():
    reason = harness.mpi_skip_reason()
    if reason:
        pytest.skip(reason)
    res = _run(["--quick", "--tls"], timeout=150)
    assert res.returncode == 0, res.stdout[-4000:]
    lines = res.stdout.splitlines()
    header = next((i for i, ln in enumerate(lines) if ln.startswith("operation")), None)
    assert header is not None, f"no table header in:\n{res.stdout[-4000:]}"
    for name in HEADER:
        assert name in lines[header], f"{name!r} missing from the header {lines[header]!r}"
    body = lines[header + 2:]
    for row in ROWS:
        assert any(ln.startswith(row) for ln in body), f"no row for {row!r}:\n{res.stdout}"
    assert any(ln.startswith("targets met:") for ln in lines)
    # --tls: the same operations on a cluster with TLS off and one with it on.
    tls_head = next((i for i, ln in enumerate(lines) if ln.startswith("with TLS")), None)
    assert tls_head is not None, f"no TLS table in:\n{res.stdout[-4000:]}"
    tls_body = lines[tls_head + 2:]
    for row in ROWS[:12]:  # the operations (start, idle and scaling are not repeated)
        line = next((ln for ln in tls_body if ln.startswith(row)), None)
        assert line is not None and "failed" not in line, f"TLS row {row!r}: {line!r}"
    if importlib.util.find_spec("ipyparallel") is None:
        assert "ipyparallel is not installed" in res.stdout
