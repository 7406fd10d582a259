"""The IPython magics, in a real (headless) IPython shell driving a fake client.

The fake records every ``execute`` and answers with real ``ResultList`` and
``PendingResult`` objects, so what these tests check is what a user would see.
"""
from __future__ import annotations

from typing import Any, List, Sequence

import pytest

pytest.importorskip("IPython")
from IPython.core.error import UsageError  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

from mpiengine import magics  # noqa: E402
from mpiengine.errors import CompositeError, ConnectError, ErrorRecord  # noqa: E402
from mpiengine.results import PendingResult, ResultList  # noqa: E402

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
