"""A first look at mpiengine: start 4 engines, drive them, stop them.

Run it from a clone of the repository after ``pip install '.[mpich]'``::

    python examples/quickstart.py

It starts a cluster of its own in the background (``mpiengine start -n 4
--profile quickstart``), shows the main client calls one after the other, and
stops the cluster again whatever happens (``mpiengine stop --profile
quickstart``). Connection files and logs go under ``$MPIENGINE_DIR`` if it is
set, else ``~/.mpiengine``. It takes a few seconds and exits non-zero if
anything does not behave as shown.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

PROFILE = "quickstart"
N_ENGINES = 4


def _use_this_checkout() -> None:
    """Run from a clone without installing: import (and launch) the checkout's mpiengine."""
    if importlib.util.find_spec("mpiengine") is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not os.path.isdir(os.path.join(root, "mpiengine")):
            raise SystemExit("quickstart: mpiengine is not installed: pip install '.[mpich]'")
        sys.path.insert(0, root)
        # The ranks started by mpiexec must find it too.
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


_use_this_checkout()

from mpiengine import client  # noqa: E402


def mpiengine_cli(*args: str, timeout: float = 150.0) -> int:
    """Run ``mpiengine ARGS`` with this Python; its output goes straight to ours."""
    sys.stdout.flush()
    cmd = [sys.executable, "-m", "mpiengine", *args]
    return subprocess.run(cmd, timeout=timeout).returncode


def stop_cluster() -> None:
    """Stop the cluster; nothing (not even a closed stdout) may prevent the stop itself."""
    try:
        print(f"\nStopping the cluster (mpiengine stop --profile {PROFILE}) ...", flush=True)
    except OSError:
        pass
    subprocess.run([sys.executable, "-m", "mpiengine", "stop", "--profile", PROFILE],
                   timeout=60.0)


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"quickstart: FAILED: {what}")


def section(title: str) -> None:
    print(f"\n== {title}")


def demo(mec: client.MultiEngineClient) -> None:
    section("engines")
    ids = mec.get_ids()
    print("mec.get_ids() ->", ids)
    check(ids == list(range(N_ENGINES)), f"expected {N_ENGINES} engines, got {ids}")
    print("Each engine is one MPI rank with its own Python namespace.")

    section("execute: run code on every engine")
    mec.execute("import os, socket")
    code = "print('engine', comm.rank, 'on', socket.gethostname(), 'pid', os.getpid())"
    results = mec.execute(code)
    print("mec.execute(...) returns one result per engine:")
    print(results)
    check([r["id"] for r in results] == ids, "one result per engine, in engine order")
    check(all(r["stdout"].startswith(f"engine {r['id']} ") for r in results),
          "each engine printed its own rank")

    section("push and pull: move Python objects")
    mec.push(dict(scale=2.5, label="run-1"))
    print("mec.push(dict(scale=2.5, label='run-1'))")
    print("mec.pull('scale') ->", mec.pull("scale"))
    print("mec.pull(('scale', 'label'), targets=0) ->", mec.pull(("scale", "label"), targets=0))
    check(mec.pull("scale") == [2.5] * N_ENGINES, "pull returns the pushed value from each engine")

    section("scatter and gather: split a list over the engines and join it back")
    mec.scatter("chunk", list(range(10)))
    print("mec.scatter('chunk', range(10)); each engine holds a contiguous part:")
    print("mec.pull('chunk') ->", mec.pull("chunk"))
    mec.execute("chunk = [x * x for x in chunk]")
    squares = mec.gather("chunk")
    print("after squaring on the engines, mec.gather('chunk') ->", squares)
    check(squares == [x * x for x in range(10)], "gather returns the squares in order")

    section("map: a parallel version of the builtin")
    parallel = mec.map(lambda x: x ** 3 - x, range(12))
    print("mec.map(lambda x: x**3 - x, range(12)) ->", parallel)
    check(parallel == [x ** 3 - x for x in range(12)], "parallel map equals serial map")

    section("errors: one exception per engine, collected in a CompositeError")
    try:
        mec.execute("1/0")
    except client.CompositeError as e:
        print("mec.execute('1/0') raised CompositeError:")
        for line in str(e).splitlines():
            print("   ", line)
        check(len(e.elist) == N_ENGINES, "every engine reported its error")
        check(all(rec.ename == "ZeroDivisionError" for rec in e.elist), "the error type travels")
    else:
        check(False, "1/0 on the engines should raise CompositeError")

    section("MPI between engines: `comm` is a communicator of the engines only")
    mec.execute("total = comm.allreduce(comm.rank + 1)")
    totals = mec.pull("total")
    print("mec.execute('total = comm.allreduce(comm.rank + 1)')")
    print("mec.pull('total') ->", totals)
    want = N_ENGINES * (N_ENGINES + 1) // 2
    check(totals == [want] * N_ENGINES, f"allreduce of 1..{N_ENGINES} is {want} on every engine")


def main() -> int:
    t0 = time.monotonic()
    print(f"Starting a local cluster of {N_ENGINES} engines "
          f"(mpiengine start -n {N_ENGINES} --profile {PROFILE}) ...")
    try:
        code = mpiengine_cli("start", "-n", str(N_ENGINES), "--profile", PROFILE)
        if code != 0:
            print(f"quickstart: 'mpiengine start' failed with exit code {code}", file=sys.stderr)
            return 1
        with client.MultiEngineClient(profile=PROFILE) as mec:
            print(f"Connected: {mec!r}")
            demo(mec)
    finally:
        stop_cluster()
    print(f"\nquickstart: all checks passed in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
