"""The interactive front end against a real cluster: magics, live output, interrupt.

A real (headless) ``InteractiveShell`` drives the session cluster through the
magics as a user would; the interrupt tests also signal a real client process.
Timings that the report quotes (interrupt latency, delay of the first streamed
line) are printed; run with ``-s`` to see them.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any, List, Tuple

import pytest

from IPython.core.interactiveshell import InteractiveShell

import harness
from mpiengine import client, magics
from mpiengine.errors import CompositeError
from mpiengine.results import PendingResult, ResultList

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(60)]

ALL = [0, 1, 2, 3]


@pytest.fixture
def ip(mec):
    """The IPython shell with the test's client active (through ``mec.activate()``)."""
    shell = InteractiveShell.instance()
    magics.deactivate(shell)
    mec.activate()  # finds the shell through get_ipython(), as in a session
    yield shell
    magics.deactivate(shell)


def run(ip: InteractiveShell, cell: str) -> Any:
    return ip.run_cell(cell, store_history=True)


def shown_ids(text: str) -> set:
    """The engine ids in the ``[0,2:execute]:`` headers of a rendered CompositeError."""
    ids: set = set()
    for group in re.findall(r"^\[([\d,-]+):execute\]:", text, re.M):
        for part in group.split(","):
            a, _, b = part.partition("-")
            ids.update(range(int(a), int(b or a) + 1))
    return ids


def enames(err: CompositeError) -> List[Tuple[int, str]]:
    return [(r.engine_id, r.ename) for r in err.elist]


# -- the magics on real engines ----------------------------------------------------

def test_px_and_result(ip, mec, capsys):
    assert run(ip, "%px a = comm.rank * 10").success
    res = run(ip, "%px print(a)")
    assert res.success and isinstance(res.result, ResultList)
    assert [r["stdout"] for r in res.result] == ["0\n", "10\n", "20\n", "30\n"]
    out = capsys.readouterr().out
    assert "<Results List>" in out and "[3] Out[" in out and ": 30" in out
    again = run(ip, "%result")
    assert again.result is res.result
    assert "[2] In [" in capsys.readouterr().out


def test_cell_px_targets_and_block_options(ip, mec):
    res = run(ip, "%%px --targets 1,3 --noblock\nb = comm.rank + 1\nprint(b)\n")
    assert isinstance(res.result, PendingResult)
    shown = run(ip, "%result").result  # waits for it, as in the reference
    assert [(r["id"], r["stdout"]) for r in shown] == [(1, "2\n"), (3, "4\n")]
    mec.block = False
    res = run(ip, "%%px --targets 0 --block\nb = -1\n")
    assert isinstance(res.result, ResultList) and [r["id"] for r in res.result] == [0]
    assert mec.pull("b", targets=[0, 1, 3], block=True) == [-1, 2, 4]


def test_autopx_blocking_then_nonblocking(ip, mec, capsys):
    ip.user_ns.pop("auto_x", None)
    assert run(ip, "%autopx").success
    assert "Auto Parallel Enabled\nType %autopx to disable" in capsys.readouterr().out
    res = run(ip, "auto_x = comm.rank + 100")
    assert res.success and isinstance(res.result, ResultList)
    assert "auto_x" not in ip.user_ns  # it ran on the engines only
    assert run(ip, "%pxstacks 0").success  # our magics stay local under %autopx
    assert "--- engine 0 ---" in capsys.readouterr().out
    run(ip, "%autopx")
    assert "Auto Parallel Disabled" in capsys.readouterr().out
    assert mec.pull("auto_x") == [100, 101, 102, 103]

    mec.block = False  # the reference's non-blocking %autopx session
    run(ip, "%autopx")
    res = run(ip, "evals = []\nfor i in range(3):\n    evals.append(i * comm.rank)\n")
    assert isinstance(res.result, PendingResult)
    assert "<PendingResult execute" in capsys.readouterr().out
    done = run(ip, "%result").result
    assert isinstance(done, ResultList) and len(done) == 4
    run(ip, "%autopx")
    assert not magics.magics_for(ip).autopx_enabled
    assert mec.pull("evals", block=True) == [[0, i, 2 * i] for i in ALL]


def test_load_ext_connects_to_the_default_cluster(cluster, monkeypatch, capsys):
    shell = InteractiveShell.instance()
    magics.deactivate(shell)
    monkeypatch.setenv("MPIENGINE_CONNECTION_FILE", str(cluster.connection_file))
    shell.user_ns.pop("mec", None)
    shell.extension_manager.loaded.discard("mpiengine")
    try:
        assert run(shell, "%load_ext mpiengine").success
        assert "connected to 4 engines; the client is `mec`" in capsys.readouterr().out
        mec = shell.user_ns["mec"]
        assert isinstance(mec, client.MultiEngineClient)
        assert magics.magics_for(shell).client is mec
        res = run(shell, "%px loaded = comm.rank")
        assert res.success and len(res.result) == 4
        assert mec.pull("loaded") == ALL
        mec.execute("del loaded")
    finally:
        magics.unload_ipython_extension(shell)
        shell.extension_manager.loaded.discard("mpiengine")
    assert "mec" not in shell.user_ns and magics.magics_for(shell).client is None


# -- live output ----------------------------------------------------------------------

def test_live_output_comes_before_the_results_list(ip, mec, capsys):
    res = run(ip, "%%px --targets 0,2\nimport time\nfor i in range(2):\n"
                  "    print('tick', i, flush=True)\n    time.sleep(0.5)\n")
    assert res.success
    out = capsys.readouterr().out
    for eid in (0, 2):
        assert f"[stdout:{eid}] tick 0" in out and f"[stdout:{eid}] tick 1" in out
    assert out.index("[stdout:0] tick 1") < out.index("<Results List>")


def test_first_streamed_line_arrives_while_the_command_runs(mec):
    seen: List[Tuple[float, int, str, str]] = []
    t0 = time.monotonic()
    mec.on_output = lambda eid, name, text: seen.append((time.monotonic() - t0, eid, name, text))
    result = mec.execute("import time\nfor i in range(5):\n"
                         "    print('line', i, flush=True)\n    time.sleep(1)\n")
    total = time.monotonic() - t0
    first = min(t for t, eid, _, text in seen if "line 0" in text)
    print(f"\nfirst streamed line after {first:.2f} s of a {total:.2f} s command")
    assert first < 1.5 and total > 4.5
    for eid in ALL:
        lines = [text for _, e, name, text in seen if e == eid and name == "stdout"]
        assert "".join(lines) == "".join(f"line {i}\n" for i in range(5))
    assert [r["stdout"] for r in result] == ["".join(f"line {i}\n" for i in range(5))] * 4


def test_output_of_child_processes_and_c_code(mec):
    # fds 1 and 2 of the engine, not Python's sys.stdout: os.system, os.write, C stdio.
    result = mec.execute("import os\nos.system('echo from a child process')\n"
                         "os.write(2, b'straight to fd 2\\n')\n", targets=[0, 3])
    for r in result:
        assert "from a child process" in r["stdout"]
        assert "straight to fd 2" in r["stderr"]


# -- interrupt and stacks ---------------------------------------------------------------

def _interrupt_later(mec, delay: float, stamp: list) -> threading.Timer:
    def fire() -> None:
        stamp.append(time.monotonic())
        mec.interrupt()

    timer = threading.Timer(delay, fire)
    timer.start()
    return timer


@pytest.mark.parametrize("code", [
    "import time\ntime.sleep(60)",
    "import numpy\nm = numpy.ones((200, 200))\nwhile True:\n    numpy.dot(m, m)",
], ids=["sleep", "numpy-loop"])
def test_interrupt_from_another_thread(mec, code):
    mec.execute("kept = comm.rank")
    stamp: list = []
    timer = _interrupt_later(mec, 1.0, stamp)
    try:
        with pytest.raises(CompositeError) as info:
            mec.execute(code, timeout=30)
        latency = time.monotonic() - stamp[0]
    finally:
        timer.cancel()
    print(f"\ninterrupt -> CompositeError in {latency:.2f} s")
    assert latency < 3.0
    assert enames(info.value) == [(i, "KeyboardInterrupt") for i in ALL]
    assert mec.pull("kept") == ALL  # the namespaces are intact
    assert [r["stdout"] for r in mec.execute("print(kept + 1)")] == ["1\n", "2\n", "3\n", "4\n"]


CHILD = """
import json, sys, time
from mpiengine import client, CompositeError
mec = client.MultiEngineClient(sys.argv[1])
mec.execute("kept = comm.rank * 2")
print("RUNNING", flush=True)
t0 = time.monotonic()
try:
    mec.execute("import time\\ntime.sleep(60)")
    report = {"raised": None}
except CompositeError as e:
    report = {"raised": "CompositeError", "enames": [r.ename for r in e.elist],
              "ids": [r.engine_id for r in e.elist]}
report["done_at"] = time.monotonic() - t0
report["kept"] = mec.pull("kept")
mec.close()
print(json.dumps(report), flush=True)
"""


def test_ctrl_c_in_a_client_process(cluster, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(cluster.connection_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=harness.mpi_env(), cwd=str(harness.REPO_ROOT))
    try:
        line = _readline(proc, 30.0)
        assert line.strip() == "RUNNING", line + proc.stderr.read()
        time.sleep(1.0)  # let the blocking execute reach the engines
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        latency = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    report = json.loads(out.strip().splitlines()[-1])
    print(f"\nSIGINT -> CompositeError (and exit) in {latency:.2f} s")
    assert report["raised"] == "CompositeError", (out, err)
    assert report["enames"] == ["KeyboardInterrupt"] * 4 and report["ids"] == ALL
    assert report["done_at"] < 5.0 and latency < 5.0
    assert report["kept"] == [0, 2, 4, 6]


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    box: List[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box:
        raise TimeoutError(f"the client process printed nothing in {timeout} s")
    return box[0]


def test_pxinterrupt_stops_a_nonblocking_command(ip, mec, capsys):
    res = run(ip, "%%px --noblock\nimport time\ntime.sleep(60)\n")
    pending = res.result
    assert isinstance(pending, PendingResult)
    harness.poll_for(lambda: all("time.sleep(60)" in s for s in mec.stacks().values()),
                     10, what="the engines to be in time.sleep")
    assert run(ip, "%pxinterrupt").success
    assert "KeyboardInterrupt sent to engines 0-3" in capsys.readouterr().out
    with pytest.raises(CompositeError) as info:
        pending.get_result(timeout=10)
    assert enames(info.value) == [(i, "KeyboardInterrupt") for i in ALL]


def test_stuck_barrier_shows_in_stacks_and_needs_the_missing_rank(ip, mec, capsys):
    pending = mec.execute("comm.barrier()", targets=[0, 1, 2], block=False)
    released = False
    try:
        stacks = harness.poll_for(
            lambda: (lambda s: s if all("comm.barrier()" in s[i] for i in (0, 1, 2)) else None)(
                mec.stacks()), 10, what="engines 0-2 to be in comm.barrier()")
        assert "comm.barrier()" not in stacks[3]
        assert run(ip, "%pxstacks").success
        out = capsys.readouterr().out
        for eid in (0, 1, 2):
            section = out.split(f"--- engine {eid} ---\n", 1)[1]
            assert section.split("---", 1)[0].rstrip().endswith("comm.barrier()")
        # KeyboardInterrupt cannot stop a blocking MPI call: they stay stuck...
        assert mec.interrupt([0, 1, 2]) == [0, 1, 2]
        time.sleep(2.0)
        assert not pending.done()
        # ...until the missing rank joins the barrier.
        mec.execute("comm.barrier()", targets=3, timeout=20)
        released = True
    finally:
        if not released:
            mec.execute("comm.barrier()", targets=3, timeout=20)
    try:
        pending.get_result(timeout=20)
    except CompositeError as e:  # the pending interrupt lands when the barrier returns
        assert {r.ename for r in e.elist} == {"KeyboardInterrupt"}
    assert mec.execute("x = comm.allreduce(1)") and mec.pull("x") == [4] * 4


# -- errors -----------------------------------------------------------------------------

def test_composite_error_shows_every_engines_traceback(ip, mec, capsys):
    res = run(ip, "%px 1/0 if comm.rank % 2 else undefined_name")
    assert isinstance(res.error_in_exec, CompositeError)
    out = capsys.readouterr().out
    assert "CompositeError: one or more exceptions from call to method: execute" in out
    assert shown_ids(out) == set(ALL)
    assert "ZeroDivisionError: division by zero" in out
    assert "NameError: name 'undefined_name' is not defined" in out
    assert "Traceback (most recent call last)" in out
    # %debug opens the deepest frame of the last traceback: there `e` is the error.
    tb = sys.last_traceback
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert tb.tb_frame.f_code.co_name == "run"
    assert tb.tb_frame.f_locals["e"] is res.error_in_exec is sys.last_value
    assert tb.tb_frame.f_locals["self"] is magics.magics_for(ip)


def test_identical_remote_tracebacks_are_grouped(ip, mec, capsys):
    run(ip, "%px 1/0")
    out = capsys.readouterr().out
    assert "[0,1,2,3:execute]" in out or "[0-3:execute]" in out
