"""The magics in a real Jupyter kernel driving the session cluster.

One ipykernel per module, started with ``$MPIENGINE_CONNECTION_FILE`` pointing
at the session cluster, so ``%load_ext mpiengine`` connects to it. The tests
read the kernel's messages as a notebook front end would: live output must
arrive as ``stream`` messages while the cell still runs, long calls show a
progress display, an interrupt of the kernel interrupts the engines, and
remote errors arrive as an ``error`` message with every engine's traceback.
The last test runs ``examples/interactive.ipynb`` with nbclient.
"""
from __future__ import annotations

import os
import queue
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import pytest

import harness

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(90)]

ANSI = re.compile(r"\x1b\[[0-9;]*m")
NOTEBOOK = harness.REPO_ROOT / "examples" / "interactive.ipynb"


def kernel_env(cluster: harness.Cluster) -> Dict[str, str]:
    """The kernel's environment: the session cluster is its default, this checkout on the path."""
    env = dict(os.environ)
    env["MPIENGINE_CONNECTION_FILE"] = str(cluster.connection_file)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(harness.REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


@dataclass
class Reply:
    """What one execute request produced: iopub messages with arrival times, and the reply."""

    sent: float
    messages: List[Dict[str, Any]] = field(default_factory=list)
    arrived: List[float] = field(default_factory=list)
    reply: Optional[Dict[str, Any]] = None
    reply_at: float = 0.0

    def of_type(self, *types: str) -> List[Dict[str, Any]]:
        return [m for m in self.messages if m["msg_type"] in types]

    def stream_text(self) -> str:
        return "".join(m["content"]["text"] for m in self.of_type("stream"))

    def error(self) -> Dict[str, Any]:
        errors = self.of_type("error")
        assert errors, f"no error message; got {[m['msg_type'] for m in self.messages]}"
        return errors[0]["content"]

    def traceback_text(self) -> str:
        return ANSI.sub("", "\n".join(self.error()["traceback"]))


class Kernel:
    """A started kernel and its client, with an execute that collects everything."""

    def __init__(self, km: Any, kc: Any) -> None:
        self.km, self.kc = km, kc

    def execute(self, code: str, timeout: float = 30.0, stdin: Optional[List[str]] = None,
                on_busy: Any = None) -> Reply:
        """Run ``code``; return when the kernel is idle again and the reply is in.

        ``stdin`` answers input requests in order (for ``%debug``); ``on_busy``
        is called once, after the code started, from this thread.
        """
        kc = self.kc
        rep = Reply(sent=time.monotonic())
        msg_id = kc.execute(code, allow_stdin=stdin is not None, store_history=True)
        answers = list(stdin or [])
        deadline = rep.sent + timeout
        idle = False
        while not (idle and rep.reply is not None):
            if time.monotonic() > deadline:
                raise TimeoutError(f"cell did not finish in {timeout} s: {code!r}; "
                                   f"got {[m['msg_type'] for m in rep.messages]}")
            got_any = False
            for channel in (kc.iopub_channel, kc.shell_channel, kc.stdin_channel):
                try:
                    msg = channel.get_msg(timeout=0.02)
                except queue.Empty:
                    continue
                got_any = True
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                kind = msg["msg_type"]
                if kind == "input_request":
                    kc.input(answers.pop(0) if answers else "q")
                elif kind == "execute_reply":
                    rep.reply, rep.reply_at = msg, time.monotonic()
                elif kind == "status":
                    idle = msg["content"]["execution_state"] == "idle"
                    if not idle and on_busy is not None:
                        on_busy()
                        on_busy = None
                else:
                    rep.messages.append(msg)
                    rep.arrived.append(time.monotonic())
            if not got_any:
                time.sleep(0.01)
        return rep


@pytest.fixture(scope="module")
def kernel(cluster):
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=kernel_env(cluster), cwd=str(harness.REPO_ROOT))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        k = Kernel(km, kc)
        rep = k.execute("%load_ext mpiengine")
        assert "connected to 4 engines" in rep.stream_text(), rep.messages
        yield k
    finally:
        kc.stop_channels()
        pid = km.provisioner.pid if km.provisioner is not None else None
        km.shutdown_kernel(now=True)
        if pid is not None and harness._stat(pid) is not None:  # by pid, never by name
            os.kill(pid, 9)


def test_live_output_streams_while_the_cell_runs(kernel):
    rep = kernel.execute("%%px\nimport time\nfor i in range(5):\n"
                         "    print(i, flush=True); time.sleep(1)\n")
    assert rep.reply["content"]["status"] == "ok"
    firsts = [(t - rep.sent, m) for t, m in zip(rep.arrived, rep.messages)
              if m["msg_type"] == "stream" and "[stdout:0] 0" in m["content"]["text"]]
    assert firsts, rep.stream_text()
    delay, msg = firsts[0]
    print(f"\nfirst [stdout:0] line reached the notebook after {delay:.2f} s "
          f"of a {rep.reply_at - rep.sent:.2f} s cell")
    assert delay < 2.5
    assert msg["header"]["date"] < rep.reply["header"]["date"]  # the kernel sent it first
    text = rep.stream_text()
    for eid in range(4):
        assert [f"[stdout:{eid}] {i}" in text for i in range(5)] == [True] * 5
    # Then the Results List, as for any %px.
    result = rep.of_type("execute_result")[0]["content"]["data"]["text/plain"]
    assert result.startswith("<Results List>") and "[3] Out[" in result


def test_progress_display_only_for_long_calls(kernel):
    slow = kernel.execute("%px import time; time.sleep(3)")
    shown = slow.of_type("display_data", "update_display_data")
    assert shown, [m["msg_type"] for m in slow.messages]
    texts = [m["content"]["data"]["text/plain"] for m in shown]
    assert texts[0].startswith("[mpiengine] ") and "engines done" in texts[0]
    assert texts[-1] == texts[-1].replace("done,", "") and "4/4 engines done in" in texts[-1]
    ids = {m["content"]["transient"]["display_id"] for m in shown}
    assert len(ids) == 1  # one display, updated in place

    quick = kernel.execute("%px time.sleep(0.1)")
    assert not quick.of_type("display_data", "update_display_data")
    assert "[mpiengine]" not in quick.stream_text()


def test_remote_errors_arrive_with_each_engines_traceback(kernel):
    rep = kernel.execute("%px 1/0 if comm.rank < 2 else undefined_name")
    assert rep.reply["content"]["status"] == "error"
    err = rep.error()
    assert err["ename"] == "CompositeError"
    assert "[0:execute]: ZeroDivisionError" in err["evalue"]
    text = rep.traceback_text()
    for eid in range(4):
        assert re.search(rf"^\[[\d,-]*\b{eid}\b[\d,-]*:execute\]:", text, re.M), text
    assert "ZeroDivisionError: division by zero" in text
    assert "NameError: name 'undefined_name' is not defined" in text
    assert "get_ipython()" not in text  # the remote tracebacks, not the client's stack


def test_debug_after_a_composite_error_inspects_it(kernel):
    kernel.execute("%px 1/0")
    rep = kernel.execute("%debug", stdin=[
        "p type(e).__name__, [r.engine_id for r in e.elist], e.elist[0].ename",
        "p type(self).__name__, self.client.get_ids()",
        "q"])
    text = ANSI.sub("", rep.stream_text())
    assert "('CompositeError', [0, 1, 2, 3], 'ZeroDivisionError')" in text, text
    assert "('ParallelMagics', [0, 1, 2, 3])" in text, text


def test_interrupting_the_kernel_interrupts_the_engines(kernel):
    kernel.execute("%px kept = comm.rank + 7")
    stamp: List[float] = []

    def interrupt() -> None:
        time.sleep(1.0)  # the cell is now waiting for the engines
        stamp.append(time.monotonic())
        kernel.km.interrupt_kernel()

    rep = kernel.execute("%px time.sleep(30)", timeout=40, on_busy=interrupt)
    latency = rep.reply_at - stamp[0]
    print(f"\nkernel interrupt -> CompositeError shown in {latency:.2f} s")
    assert latency < 3.0
    err = rep.error()
    assert err["ename"] == "CompositeError"
    assert err["evalue"].count("KeyboardInterrupt") == 4
    after = kernel.execute("%px print(kept)")
    assert after.reply["content"]["status"] == "ok"
    out = after.of_type("execute_result")[0]["content"]["data"]["text/plain"]
    assert "[0] Out[" in out and ": 7" in out and ": 10" in out


def test_the_example_notebook_runs(cluster, tmp_path):
    import nbclient
    import nbformat
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    runner = nbclient.NotebookClient(nb, timeout=60, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    runner.execute(env=kernel_env(cluster))

    def outputs(tag: str) -> str:
        cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
        assert cells, f"no cell tagged {tag}"
        text = []
        for out in cells[0].outputs:
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                text.append(out.data.get("text/plain", ""))
            elif out.output_type == "error":
                text.append(ANSI.sub("", "\n".join(out.traceback)))
        return "\n".join(text)

    assert "connected to 4 engines" in outputs("load")
    assert "<Results List>" in outputs("px") and "[3] Out[" in outputs("px")
    assert "[1] Out[" in outputs("targets") and "[0] " not in outputs("targets")
    assert "<PendingResult execute" in outputs("noblock")
    assert "[2] Out[" in outputs("result") and ": 6" in outputs("result")
    live = outputs("live")
    assert "[stdout:0] step 0" in live and "[stdout:0] step 2" in live
    assert "Auto Parallel Enabled" in outputs("autopx-on")
    assert "<Results List>" in outputs("autopx-cell")
    assert "Auto Parallel Disabled" in outputs("autopx-off")
    assert "[0, 1, 4, 9]" in outputs("pull")
    stacks = outputs("stacks")
    assert "--- engine 0 ---" in stacks and "time.sleep(3)" in stacks
    assert "CompositeError" in outputs("error") and "ZeroDivisionError" in outputs("error")
