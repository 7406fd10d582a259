"""The library's exceptions: remote errors as data, CompositeError, builtin bases."""
from __future__ import annotations

import io

import pytest

from mpiengine import errors
from mpiengine.errors import (AuthenticationError, ClusterLost, CommandTimeout, CompositeError,
                              ConnectError, ErrorRecord, MPIEngineError, ProtocolError,
                              RemoteError)
from mpiengine.payload import PicklingFailed

pytestmark = pytest.mark.timeout(30)

TB_ZERO = ('Traceback (most recent call last):\n  File "<engine 0 In [1]>", line 1, in <module>\n'
           '    1/0\nZeroDivisionError: division by zero\n')


def rec(eid: int, ename: str = "ZeroDivisionError", evalue: str = "division by zero",
        tb: str = TB_ZERO, method: str = "execute", host: str = "node1") -> ErrorRecord:
    return ErrorRecord(engine_id=eid, method=method, ename=ename, evalue=evalue,
                       traceback=tb, host=host)


@pytest.fixture
def ce() -> CompositeError:
    return CompositeError("execute", [
        rec(0), rec(2),
        rec(3, "MyError", "custom", "Traceback ...\nMyError: custom\n"),
    ])


# --- the exception hierarchy --------------------------------------------------------------
@pytest.mark.parametrize("cls, builtin", [
    (ConnectError, ConnectionError),
    (AuthenticationError, ConnectionError),
    (AuthenticationError, ConnectError),
    (ClusterLost, ConnectionError),
    (CommandTimeout, TimeoutError),
    (ProtocolError, ValueError),
    (PicklingFailed, TypeError),
])
def test_library_errors_subclass_the_builtins(cls, builtin):
    assert issubclass(cls, builtin)


@pytest.mark.parametrize("cls", [ConnectError, AuthenticationError, ClusterLost, CommandTimeout,
                                 ProtocolError, CompositeError, RemoteError])
def test_library_errors_share_a_base(cls):
    assert issubclass(cls, MPIEngineError)
    assert issubclass(cls, Exception)


def test_cluster_lost_is_not_a_connect_error():
    # "It broke" is a different error from "could not connect".
    assert not issubclass(ClusterLost, ConnectError)


def test_command_timeout_carries_the_pending_result():
    sentinel = object()
    e = CommandTimeout("too slow", pending=sentinel)
    assert e.pending is sentinel and str(e) == "too slow"
    try:
        raise e
    except TimeoutError as caught:  # a generic handler still catches it
        assert caught is e


def test_all_names_exist():
    for name in errors.__all__:
        assert hasattr(errors, name)


# --- ErrorRecord ------------------------------------------------------------------------------
def test_record_line():
    assert rec(0).line() == "[0:execute]: ZeroDivisionError: division by zero"


def test_record_from_dict_fills_defaults_and_coerces():
    r = ErrorRecord.from_dict({"engine_id": "4", "ename": "KeyError", "evalue": 5})
    assert r == ErrorRecord(engine_id=4, method="", ename="KeyError", evalue="5",
                            traceback="", host="")
    assert ErrorRecord.from_dict({}).ename == "Exception"


def test_record_is_frozen():
    with pytest.raises(Exception):
        rec(0).engine_id = 9  # type: ignore[misc]


# --- CompositeError ---------------------------------------------------------------------------
def test_str_lists_one_line_per_engine(ce):
    lines = str(ce).splitlines()
    assert lines == [
        "one or more exceptions from call to method: execute",
        "[0:execute]: ZeroDivisionError: division by zero",
        "[2:execute]: ZeroDivisionError: division by zero",
        "[3:execute]: MyError: custom",
    ]
    assert ce.args[0] == str(ce)


def test_elist_len_and_indexing(ce):
    assert len(ce) == 3
    assert [r.engine_id for r in ce.elist] == [0, 2, 3]
    assert ce[1] is ce.elist[1]
    assert all(isinstance(r, ErrorRecord) for r in ce.elist)


def test_results_are_kept():
    c = CompositeError("pull", [rec(1, method="pull")], results=[10, None])
    assert c.results == [10, None]


def test_raise_exception_builtin_with_remote_cause(ce):
    with pytest.raises(ZeroDivisionError) as ei:
        ce.raise_exception()
    exc = ei.value
    assert str(exc) == "division by zero"
    cause = exc.__cause__
    assert isinstance(cause, RemoteError)
    assert cause.engine_id == 0 and cause.host == "node1"
    assert cause.ename == "ZeroDivisionError" and cause.traceback == TB_ZERO
    assert "1/0" in str(cause) and "engine 0 on node1" in str(cause)


def test_raise_exception_by_index(ce):
    with pytest.raises(ZeroDivisionError) as ei:
        ce.raise_exception(1)
    assert ei.value.__cause__.engine_id == 2
    with pytest.raises(RemoteError):  # negative indices count from the end
        ce.raise_exception(-1)


def test_raise_exception_non_builtin_is_a_remote_error(ce):
    with pytest.raises(RemoteError) as ei:
        ce.raise_exception(2)
    e = ei.value
    assert e.ename == "MyError" and e.evalue == "custom" and e.engine_id == 3
    assert "MyError: custom" in str(e)


def test_raise_exception_builtin_with_an_exotic_constructor_is_a_remote_error():
    # UnicodeDecodeError cannot be built from one string: fall back to RemoteError.
    c = CompositeError("execute", [rec(0, "UnicodeDecodeError", "'utf-8' codec ...")])
    with pytest.raises(RemoteError) as ei:
        c.raise_exception()
    assert ei.value.ename == "UnicodeDecodeError"


def test_raise_exception_ename_that_is_a_builtin_but_not_an_exception():
    c = CompositeError("execute", [rec(0, "print", "x"), rec(1, "len", "y")])
    with pytest.raises(RemoteError):
        c.raise_exception(0)
    with pytest.raises(RemoteError):
        c.raise_exception(1)


@pytest.mark.parametrize("bad", [3, 10, -4])
def test_raise_exception_bad_index(ce, bad):
    with pytest.raises(IndexError, match="3"):
        ce.raise_exception(bad)


def test_print_tracebacks_one(ce):
    out = io.StringIO()
    ce.print_tracebacks(0, file=out)
    text = out.getvalue()
    assert text.startswith("[0:execute]:")
    assert "1/0" in text and text.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "MyError" not in text


def test_print_tracebacks_all(ce):
    out = io.StringIO()
    ce.print_tracebacks(file=out)
    text = out.getvalue()
    assert text.count("[0:execute]:") == 1
    assert text.count("[2:execute]:") == 1
    assert "MyError: custom" in text
    assert text.index("[0:execute]") < text.index("[2:execute]") < text.index("[3:execute]")


def test_print_tracebacks_defaults_to_stdout(ce, capsys):
    ce.print_tracebacks(2)
    assert "MyError: custom" in capsys.readouterr().out


def test_print_tracebacks_bad_index(ce):
    with pytest.raises(IndexError):
        ce.print_tracebacks(7, file=io.StringIO())


def test_print_tracebacks_without_traceback_text():
    c = CompositeError("pull", [rec(1, "NameError", "name 'x' is not defined", tb="",
                                    method="pull")])
    out = io.StringIO()
    c.print_tracebacks(file=out)
    assert out.getvalue() == "[1:pull]:\nNameError: name 'x' is not defined\n"


def test_render_traceback_groups_identical_tracebacks(ce):
    lines = ce._render_traceback_()
    assert lines[0] == "CompositeError: one or more exceptions from call to method: execute"
    assert "[0,2:execute]:" in lines                  # engines 0 and 2 share one traceback
    assert "[3:execute]:" in lines
    assert sum("ZeroDivisionError: division by zero" in line for line in lines) == 1
    assert lines.index("[0,2:execute]:") < lines.index("[3:execute]:")
    assert "MyError: custom" in lines


def test_remote_error_render_traceback():
    e = RemoteError(rec(5))
    assert e._render_traceback_() == TB_ZERO.splitlines()
    bare = RemoteError(rec(5, tb=""))
    assert bare._render_traceback_() == ["ZeroDivisionError: division by zero"]
    assert str(bare) == "ZeroDivisionError: division by zero (raised on engine 5 on node1)"
    assert "on node" not in str(RemoteError(rec(5, tb="", host="")))
