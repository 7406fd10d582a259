"""The IPython magics, in a real (headless) IPython shell driving a fake client.

The fake records every ``execute`` and answers with real ``ResultList`` and
``PendingResult`` objects, so what these tests check is what a user would see.
"""
from __future__ import annotations

import contextvars
import sys
from typing import Any, List, Sequence

import pytest

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from mpiengine import display, magics, notebook
from mpiengine.errors import CompositeError, ConnectError, ErrorRecord
from mpiengine.results import PendingResult, ResultList

pytestmark = pytest.mark.timeout(30)


class FakeClient:
    """A MultiEngineClient stand-in: records calls, returns real result objects."""

    def __init__(self, ids: Sequence[int] = (0, 1), block: bool = True) -> None:
        self.ids = list(ids)
        self.block = block
        self.targets: Any = "all"
        self.calls: List[dict] = []
        self.fail: CompositeError | None = None
        self._last: Any = None
        self._pending: dict = {}
        self.on_output: Any = display.print_output
        self.on_progress: Any = None
        self.closed = False
        self.interrupted: List[Any] = []

    def _engines(self, targets: Any) -> List[int]:
        t = self.targets if targets is None else targets
        return self.ids if t == "all" else [t] if isinstance(t, int) else list(t)

    def execute(self, lines: str, targets: Any = None, block: Any = None,
                timeout: Any = None) -> Any:
        self.calls.append({"lines": lines, "targets": targets, "block": block})
        if self.fail is not None:
            raise self.fail
        number = len(self.calls)
        result = ResultList(
            {"id": i, "number": number, "input": {"raw": lines, "translated": lines},
             "stdout": f"out{i}\n", "stderr": ""}
            for i in self._engines(targets))
        if (self.block if block is None else block):
            self._last = result
        else:
            rid = f"r{number}"
            self._pending[rid] = result
            self._last = PendingResult(self, rid, "execute")
        return self._last

    def _fetch(self, pending: PendingResult, block: bool, timeout: Any) -> Any:
        return self._pending[pending.result_id]

    def last_result(self) -> Any:
        return self._last

    def stacks(self, targets: Any = None) -> dict:
        return {i: (f'  File "<engine {i} In [3]>", line 1, in <module>\n    comm.barrier()\n'
                    if i < 2 else "(idle: waiting for a command)\n")
                for i in self._engines(targets)}

    def interrupt(self, targets: Any = None) -> List[int]:
        self.interrupted.append(targets)
        return self._engines(targets)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def ip():
    shell = InteractiveShell.instance()
    magics.deactivate(shell)
    yield shell
    magics.deactivate(shell)


@pytest.fixture
def mec(ip):
    client = FakeClient()
    magics.activate(client, shell=ip)
    return client


def run(ip: InteractiveShell, cell: str) -> Any:
    """Run a cell as a user would; return IPython's ExecutionResult."""
    return ip.run_cell(cell, store_history=True)


def test_px_shows_results_list(ip, mec, capsys):
    res = run(ip, "%px a = 1")
    assert res.success
    assert mec.calls == [{"lines": "a = 1", "targets": None, "block": None}]
    assert isinstance(res.result, ResultList)
    out = capsys.readouterr().out
    assert "Out[" in out and "<Results List>" in out
    assert "[0] In [1]: a = 1" in out and "[1] Out[1]: out1" in out
    assert "Executing command" not in out


def test_px_sends_code_verbatim(ip, mec):
    ip.user_ns["x"] = "LOCAL"
    assert run(ip, "%px d = {'k': 1}; s = f'{x}' + '$x'").success
    assert mec.calls[-1]["lines"] == "d = {'k': 1}; s = f'{x}' + '$x'"


def test_px_uses_client_block_mode(ip, mec, capsys):
    mec.block = False
    res = run(ip, "%px a = 2")
    assert isinstance(res.result, PendingResult)
    assert "<PendingResult execute" in capsys.readouterr().out
    assert isinstance(res.result.get_result(), ResultList)


def test_no_active_client_is_a_usage_error(ip, capsys):
    res = run(ip, "%px a = 1")
    assert isinstance(res.error_in_exec, UsageError)
    assert "mec.activate()" in str(res.error_in_exec)
    assert "%load_ext mpiengine" in str(res.error_in_exec)
    for cell in ("%autopx", "%result", "%%px\na = 1\n"):
        assert isinstance(run(ip, cell).error_in_exec, UsageError), cell
    assert not magics.magics_for(ip).autopx_enabled


def test_empty_px_is_a_usage_error(ip, mec):
    assert isinstance(run(ip, "%px   ").error_in_exec, UsageError)
    assert mec.calls == []


def test_activate_needs_ipython(monkeypatch):
    monkeypatch.setattr(magics, "get_ipython", lambda: None)
    with pytest.raises(RuntimeError, match="IPython"):
        magics.activate(FakeClient())


def test_activate_uses_running_shell(ip):
    client = FakeClient()
    assert magics.activate(client) is magics.magics_for(ip)  # found via get_ipython()
    assert magics.magics_for(ip).client is client
    assert run(ip, "%px b = 1").success and client.calls


@pytest.mark.parametrize("option, targets", [
    ("--targets 1,3", [1, 3]), ("--targets 2", 2), ("--targets all", "all"),
    ("", None)])
def test_cell_px_targets(ip, mec, option, targets, capsys):
    res = run(ip, f"%%px {option}\nfor i in range(3):\n    x = i\n")
    assert res.success
    assert mec.calls == [{"lines": "for i in range(3):\n    x = i\n",
                          "targets": targets, "block": None}]
    assert "<Results List>" in capsys.readouterr().out


def test_cell_px_targets_from_a_variable(ip, mec):
    ip.user_ns["t"] = "0,1"
    assert run(ip, "%%px --targets $t\ny = 1\n").success
    assert mec.calls[-1]["targets"] == [0, 1]


def test_cell_px_block_options(ip, mec):
    res = run(ip, "%%px --noblock\ny = 1\n")
    assert isinstance(res.result, PendingResult)
    assert mec.calls[-1]["block"] is False
    mec.block = False
    res = run(ip, "%%px --block --targets 0\ny = 1\n")
    assert mec.calls[-1] == {"lines": "y = 1\n", "targets": 0, "block": True}
    assert isinstance(res.result, ResultList)


@pytest.mark.parametrize("option", ["--targets x", "--targets 1,a", "--targets ,",
                                    "--block --noblock", "--bogus"])
def test_cell_px_bad_options(ip, mec, option):
    res = run(ip, f"%%px {option}\ny = 1\n")
    assert isinstance(res.error_in_exec, UsageError)
    assert mec.calls == []


def test_autopx_sends_whole_cells(ip, mec, capsys):
    run(ip, "%autopx")
    assert "Auto Parallel Enabled\nType %autopx to disable" in capsys.readouterr().out
    cell = "for i in range(3):\n    probe = i  # {not expanded} $x\nprint('done')\n"
    res = run(ip, cell)
    assert res.success
    assert [c["lines"] for c in mec.calls] == [cell]
    assert mec.calls[0]["targets"] is None and mec.calls[0]["block"] is None
    assert "probe" not in ip.user_ns  # nothing ran locally
    assert "<Results List>" in capsys.readouterr().out

    run(ip, "%autopx")
    assert "Auto Parallel Disabled" in capsys.readouterr().out
    assert run(ip, "z = 5").success
    assert ip.user_ns["z"] == 5 and len(mec.calls) == 1


def test_autopx_keeps_multiline_input_open(ip, mec):
    # The terminal and Jupyter ask check_complete whether to read more lines.
    run(ip, "%autopx")
    tm = ip.input_transformer_manager
    assert tm.check_complete("for i in range(3):\n")[0] == "incomplete"
    assert tm.check_complete("a = 1\n")[0] == "complete"
    run(ip, "%autopx")


def test_autopx_nonblocking_shows_pending(ip, mec, capsys):
    mec.block = False
    run(ip, "%autopx")
    res = run(ip, "max_evals = []")
    assert isinstance(res.result, PendingResult)
    assert "<PendingResult execute" in capsys.readouterr().out
    run(ip, "%autopx")
    assert not magics.magics_for(ip).autopx_enabled


def test_autopx_runs_own_magics_locally(ip, mec, capsys):
    run(ip, "%autopx")
    assert run(ip, "%px q = 1").success
    assert run(ip, "%%px --targets 1\nq = 2\n").success
    assert [c["lines"] for c in mec.calls] == ["q = 1", "q = 2\n"]
    assert run(ip, "%result").result is mec.last_result()
    assert len(mec.calls) == 2
    run(ip, "   %autopx  ")  # stray spaces still switch it off
    assert not magics.magics_for(ip).autopx_enabled


def test_autopx_trailing_semicolon_hides_output(ip, mec, capsys):
    run(ip, "%autopx")
    capsys.readouterr()
    assert run(ip, "a = 1;").success
    assert mec.calls[-1]["lines"] == "a = 1;\n"  # IPython ends every cell with \n
    assert "<Results List>" not in capsys.readouterr().out
    run(ip, "%autopx")


def test_result_shows_last_command(ip, mec, capsys):
    first = run(ip, "%px print(1)").result
    capsys.readouterr()
    res = run(ip, "%result")
    assert res.result is first
    assert "[0] In [1]: print(1)" in capsys.readouterr().out
    assert len(mec.calls) == 1  # %result runs nothing on the engines


def test_result_fetches_a_pending_result(ip, mec):
    mec.block = False
    pending = run(ip, "%px a = 1").result
    assert isinstance(pending, PendingResult)
    res = run(ip, "%result")
    assert isinstance(res.result, ResultList) and res.result[0]["input"]["raw"] == "a = 1"


def test_result_follows_a_direct_execute(ip, mec):
    run(ip, "%px a = 1")
    direct = mec.execute("b = 2")
    assert run(ip, "%result").result is direct


def test_result_without_client_last_result(ip):
    class Bare:  # a client without last_result(): the magics' own record serves
        block, targets = True, "all"

        def execute(self, lines, targets=None, block=None):
            return ResultList([{"id": 0, "number": 1, "input": {"raw": lines,
                                "translated": lines}, "stdout": "", "stderr": ""}])

    magics.activate(Bare(), shell=ip)
    assert isinstance(run(ip, "%result").error_in_exec, UsageError)
    shown = run(ip, "%px c = 3").result
    assert run(ip, "%result").result is shown


def test_remote_error_shows_engine_tracebacks(ip, mec, capsys):
    rec = ErrorRecord(0, "execute", "ZeroDivisionError", "division by zero",
                      "Traceback (most recent call last):\n  remote line\n"
                      "ZeroDivisionError: division by zero\n")
    mec.fail = CompositeError("execute", [rec])
    res = run(ip, "%px 1/0")
    assert isinstance(res.error_in_exec, CompositeError)
    seen = capsys.readouterr()
    text = seen.out + seen.err
    assert "[0:execute]" in text and "remote line" in text


def test_load_extension_connects_and_activates(ip, monkeypatch, capsys):
    client = FakeClient()
    monkeypatch.setattr(magics, "_connect", lambda: client)
    ip.user_ns.pop("mec", None)
    magics.load_ipython_extension(ip)
    assert "connected" in capsys.readouterr().out
    assert ip.user_ns["mec"] is client
    assert run(ip, "%px a = 1").success and client.calls
    ip.user_ns.pop("mec", None)


def test_load_extension_without_cluster(ip, monkeypatch, capsys):
    def refuse() -> Any:
        raise ConnectError("no connection file at /nowhere/mpiengine-default.json")

    monkeypatch.setattr(magics, "_connect", refuse)
    magics.load_ipython_extension(ip)
    out = capsys.readouterr().out
    assert "no connection file at /nowhere/mpiengine-default.json" in out
    assert "mec.activate()" in out
    res = run(ip, "%px a = 1")  # registered, but no client yet
    assert isinstance(res.error_in_exec, UsageError)
    client = FakeClient()
    magics.activate(client, shell=ip)
    assert run(ip, "%px a = 1").success and client.calls


# -- %pxstacks and %pxinterrupt ------------------------------------------------------

@pytest.mark.parametrize("ids, text", [
    ([3], "3"), ([0, 1, 2], "0-2"), ([0, 1, 2, 5, 7, 8], "0-2,5,7-8"), ([4, 0, 1], "0-1,4")])
def test_id_ranges(ids, text):
    assert magics._id_ranges(ids) == text


def test_format_stacks_groups_identical_stacks():
    text = magics.format_stacks({3: "idle\n", 0: "  File x\n    comm.barrier()\n",
                                 1: "idle\n", 2: "idle"})
    assert text == ("--- engine 0 ---\n  File x\n    comm.barrier()\n"
                    "--- engines 1-3 ---\nidle")


def test_pxstacks_prints_every_engine_by_default(ip, capsys):
    fake = FakeClient(ids=(0, 1, 2, 3))
    magics.activate(fake, shell=ip)
    fake.targets = [0]  # %pxstacks still looks at all engines unless told
    assert run(ip, "%pxstacks").success
    out = capsys.readouterr().out
    assert "--- engine 0 ---" in out and "--- engines 2-3 ---" in out
    assert out.count("comm.barrier()") == 2
    assert run(ip, "%pxstacks 1,3").success
    out = capsys.readouterr().out
    assert "--- engine 1 ---" in out and "--- engine 3 ---" in out and "engine 0" not in out
    assert fake.calls == []  # nothing ran on the engines
    assert isinstance(run(ip, "%pxstacks x").error_in_exec, UsageError)


def test_pxinterrupt(ip, mec, capsys):
    assert run(ip, "%pxinterrupt").success
    assert "KeyboardInterrupt sent to engines 0-1" in capsys.readouterr().out
    assert run(ip, "%pxinterrupt 1").success
    assert "KeyboardInterrupt sent to engine 1\n" in capsys.readouterr().out
    assert mec.interrupted == ["all", 1]


def test_autopx_keeps_every_magic_local(ip, mec, capsys):
    run(ip, "%autopx")
    assert run(ip, "%pxstacks").success
    assert run(ip, "%pxinterrupt 0").success
    assert run(ip, "%who_ls").success
    assert mec.calls == []
    ip.automagic = True
    try:
        assert run(ip, "pxstacks").success  # bare, as the reference's "autopx"
        assert mec.calls == []
        run(ip, "result = 1")  # "result" may be a variable on the engines
        assert [c["lines"] for c in mec.calls] == ["result = 1\n"]
    finally:
        run(ip, "%autopx")


# -- errors and %debug -------------------------------------------------------------

def test_debug_lands_in_the_magics_frame_with_the_error_as_e(ip, mec):
    rec = ErrorRecord(1, "execute", "ZeroDivisionError", "division by zero", "tb\n")
    mec.fail = CompositeError("execute", [rec])
    res = run(ip, "%px 1/0")
    tb = res.error_in_exec.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame
    assert frame.f_code.co_name == "run"
    assert frame.f_locals["e"] is mec.fail
    assert frame.f_locals["self"] is magics.magics_for(ip)


# -- in a Jupyter kernel -----------------------------------------------------------

class FakeStream:
    """An ipykernel OutStream stand-in: records writes with the thread parent in force."""

    def __init__(self) -> None:
        self.parent: Any = None
        self.writes: List[Any] = []

    def set_thread_parent(self, parent: Any) -> Any:
        old, self.parent = self.parent, parent
        return old

    def reset_thread_parent(self, token: Any) -> None:
        self.parent = token

    def write(self, text: str) -> int:
        self.writes.append((self.parent, text))
        return len(text)

    def flush(self) -> None:
        pass


@pytest.fixture
def kernel_ip(ip, monkeypatch):
    """The shell posing as a kernel's: it has a ``kernel`` and a ``parent_header``."""
    monkeypatch.setattr(ip, "kernel", object(), raising=False)
    monkeypatch.setattr(ip, "parent_header", {"msg_id": "cell-1"}, raising=False)
    yield ip
    magics.unload_ipython_extension(ip)


def test_kernel_output_goes_to_the_running_cell(kernel_ip, monkeypatch):
    fake = FakeClient()
    magics.activate(fake, shell=kernel_ip)
    handler = fake.on_output
    assert isinstance(handler, notebook.CellOutput)
    out = FakeStream()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(kernel_ip, "parent_header", {"msg_id": "cell-2"})
    run(kernel_ip, "pass")  # pre_run_cell records the new cell's header
    handler(3, "stdout", "a\nb\n")  # as the client's reader thread would
    assert out.writes == [({"msg_id": "cell-2"}, "[stdout:3] a\n[stdout:3] b\n")]
    assert out.parent is None  # reset after the write


class OldStream:
    """ipykernel 6.29's OutStream: no set_thread_parent, a private context variable."""

    def __init__(self) -> None:
        self._parent_header = contextvars.ContextVar("parent_header")
        self.writes: List[Any] = []

    def write(self, text: str) -> int:
        self.writes.append((self._parent_header.get(None), text))
        return len(text)

    def flush(self) -> None:
        pass


def test_kernel_output_with_ipykernel_6(kernel_ip, monkeypatch):
    # 6.29 keeps the whole request in shell.parent_header; the stream wants its header.
    monkeypatch.setattr(kernel_ip, "parent_header",
                        {"header": {"msg_id": "cell-7"}, "content": {"code": "x"}})
    fake = FakeClient()
    magics.activate(fake, shell=kernel_ip)
    err = OldStream()
    monkeypatch.setattr(sys, "stderr", err)
    fake.on_output(0, "stderr", "oops\n")
    assert err.writes == [({"msg_id": "cell-7"}, "[stderr:0] oops\n")]
    assert err._parent_header.get(None) is None


def test_kernel_output_never_raises_into_the_reader_thread(kernel_ip, monkeypatch, caplog):
    class Broken(FakeStream):
        def write(self, text: str) -> int:
            raise ValueError("I/O operation on closed file")

    fake = FakeClient()
    magics.activate(fake, shell=kernel_ip)
    monkeypatch.setattr(sys, "stdout", Broken())
    fake.on_output(2, "stdout", "lost\n")  # logged, not raised
    assert "live output of engine 2 could not be shown" in caplog.text


def test_kernel_hooks_keep_the_users_own_handlers(kernel_ip):
    mine = FakeClient()
    mine.on_output = own_output = lambda *a: None
    mine.on_progress = own_progress = lambda *a: None
    magics.activate(mine, shell=kernel_ip)
    assert mine.on_output is own_output and mine.on_progress is own_progress
    plain = FakeClient()
    magics.activate(plain, shell=kernel_ip)
    assert isinstance(plain.on_progress, notebook.CellProgress)


def test_no_kernel_hooks_outside_a_kernel(ip):
    fake = FakeClient()
    magics.activate(fake, shell=ip)
    assert fake.on_output is display.print_output and fake.on_progress is None


def test_cell_progress_updates_one_display_per_call(kernel_ip, monkeypatch):
    shown: List[Any] = []

    class Handle:
        def __init__(self, bundle: dict) -> None:
            self.bundles = [bundle]
            shown.append(self)

        def update(self, bundle: dict, raw: bool = False) -> None:
            self.bundles.append(bundle)

    monkeypatch.setattr(notebook, "display", lambda b, raw, display_id: Handle(b))
    progress = notebook.CellProgress(kernel_ip)
    progress(0, 4, 2.0, False)
    progress(3, 4, 2.5, False)
    progress(4, 4, 2.7, True)
    assert len(shown) == 1
    texts = [b["text/plain"] for b in shown[0].bundles]
    assert texts == ["[mpiengine] 0/4 engines done, 2 s", "[mpiengine] 3/4 engines done, 2 s",
                     "[mpiengine] 4/4 engines done in 2.7 s"]
    assert '<progress value="3" max="4">' in shown[0].bundles[1]["text/html"]
    progress(1, 4, 2.5, False)  # a call cut short by Ctrl-C: no "finished" came
    progress(1, 4, 2.0, False)  # the next call (same cell) starts a display of its own
    assert len(shown) == 3
    kernel_ip.execution_count += 1
    progress(1, 4, 2.5, False)  # and so does a call in the next cell
    assert len(shown) == 4
    progress(4, 4, 2.6, True)
    progress(4, 4, 0.1, True)  # finished before anything was shown: nothing to show
    assert len(shown) == 4


def test_unload_extension_closes_the_client_it_made(ip, monkeypatch, capsys):
    made = FakeClient()
    monkeypatch.setattr(magics, "_connect", lambda: made)
    ip.user_ns.pop("mec", None)
    magics.load_ipython_extension(ip)
    assert ip.user_ns["mec"] is made
    magics.unload_ipython_extension(ip)
    assert made.closed and "mec" not in ip.user_ns
    assert magics.magics_for(ip).client is None
    other = FakeClient()
    magics.activate(other, shell=ip)
    magics.unload_ipython_extension(ip)  # a client you activated yourself stays yours
    assert not other.closed and magics.magics_for(ip).client is other
