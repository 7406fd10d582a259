"""An Abort in user code says why first and never returns (mpiengine.fabric).

MPICH's ``MPI_Abort`` returns once it has told the launcher; the job ends a
moment later. Here a stand-in for such an Abort sits under the runtime's, in a
process of its own (the real one would end it, and so does the runtime's).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from harness import REPO_ROOT

SCRIPT = textwrap.dedent("""
    import sys
    from mpiengine import fabric

    class ReturningAbort:  # what MPICH's MPI_Abort does: it returns
        def Abort(self, code):
            print("mpi abort", code, flush=True)

    class Comm(fabric._Reporting, ReturningAbort):
        calls = "comm"

    fabric._Reporting.before_abort = lambda name, code: print("said", name, code, flush=True)
    Comm().Abort(int(sys.argv[1]))
    print("returned", flush=True)
""")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code, status", [(3, 3), (0, 1), (300, 1)])
def test_abort_says_why_then_never_returns(code, status):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(code)], capture_output=True,
                       text=True, timeout=50, cwd=str(REPO_ROOT))
    assert r.stdout.splitlines() == [f"said comm {code}", f"mpi abort {code}"], r.stderr
    assert r.returncode == status, r.stderr
