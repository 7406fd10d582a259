"""One engine without MPI: commands in, reply blob pairs out.

Commands are built the way the controller delivers them (op, meta, received
bytearrays), scatter and map pieces the way the client builds them
(``client._scatter_payload``, ``client._inband``), and replies are decoded with
``payload.unpack`` as the client does.
"""
from __future__ import annotations

import os
import sys
from typing import Any, List, Optional, Sequence

import numpy as np
import pytest

from mpiengine import client, partition, payload
from mpiengine import protocol as P
from mpiengine.engine import Command, Engine

pytestmark = pytest.mark.timeout(30)

COMM = object()  # stands in for the engines' communicator


def run(engine: Engine, op: int, meta: dict, parts: Sequence[Any] = (),
        piece: Optional[bytes] = None) -> dict:
    """Run one command and decode the reply as the client would."""
    cmd = Command(op, meta, (engine.id,))
    cmd.parts = [bytearray(p) for p in parts]  # what arrives over MPI: fresh bytearrays
    cmd.piece = None if piece is None else bytearray(piece)
    meta_blob, data_blob = engine.run(cmd)
    return payload.unpack(bytearray(meta_blob), bytearray(memoryview(data_blob).cast("B")))


def ex(engine: Engine, code: str) -> dict:
    return run(engine, P.EXECUTE, {"code": code})


def ok(reply: dict) -> Any:
    assert reply["ok"], reply.get("error")
    return reply["value"]


def push(engine: Engine, **ns: Any) -> dict:
    data, buffers = payload.dumps(ns)
    return run(engine, P.PUSH, {"names": sorted(ns)}, [data, *buffers])


def pull(engine: Engine, *names: str) -> dict:
    if len(names) == 1:
        return run(engine, P.PULL, {"names": list(names), "single": True})
    return run(engine, P.PULL, {"names": list(names), "single": False})


@pytest.fixture
def eng() -> Engine:
    return Engine(3, comm=COMM, host="testhost")


# --- execute -----------------------------------------------------------------------------
def test_execute_result_fields(eng):
    value = ok(ex(eng, "a = 5\nprint('hello', a)"))
    assert value == {"id": 3, "number": 1,
                     "input": {"raw": "a = 5\nprint('hello', a)",
                               "translated": "a = 5\nprint('hello', a)"},
                     "stdout": "hello 5\n", "stderr": ""}


def test_execution_counter_counts_every_execute_of_this_engine(eng):
    other = Engine(0)
    assert ok(ex(eng, "x = 1"))["number"] == 1
    assert ok(ex(eng, "x = 2"))["number"] == 2
    assert ex(eng, "1/0")["value"]["number"] == 3   # failures count too
    assert ex(eng, "def (")["value"]["number"] == 4
    ok(run(eng, P.KEYS, {}))                          # other ops do not
    assert ok(ex(eng, "x"))["number"] == 5
    assert ok(ex(other, "x = 1"))["number"] == 1      # each engine has its own


@pytest.mark.parametrize("code, out", [
    ("1+1", "2\n"),
    ("x = 'a'\nx", "'a'\n"),             # repr, like the prompt
    ("None", ""),
    ("x = 3", ""),
    ("print(7)", "7\n"),                  # print's None is not echoed
    ("for i in range(2):\n    i\n", ""),  # only a final top-level expression is shown
    ("", ""),
    ("# just a comment", ""),
])
def test_last_expression_value_is_printed(eng, code, out):
    assert ok(ex(eng, code))["stdout"] == out


def test_stdout_and_stderr_are_captured_not_leaked(eng, capfd):
    value = ok(ex(eng, "import sys, os\nprint('out')\nprint('err', file=sys.stderr)\n"
                       "sys.stdout.write('more')"))
    assert value["stdout"] == "out\nmore4\n"  # write() returns 4: the last expression
    assert value["stderr"] == "err\n"
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_exception_becomes_an_error_record(eng):
    reply = ex(eng, "a = 1\nprint('before')\nb = a / 0\nprint('after')")
    assert reply["ok"] is False
    err = reply["error"]
    assert err["ename"] == "ZeroDivisionError"
    assert err["evalue"] == "division by zero"
    assert err["engine_id"] == 3 and err["method"] == "execute" and err["host"] == "testhost"
    assert "b = a / 0" in err["traceback"]            # the user's line, from linecache
    assert "In [1]" in err["traceback"]
    assert "engine.py" not in err["traceback"]        # the engine's own frames are dropped
    assert err["traceback"].rstrip().endswith("ZeroDivisionError: division by zero")
    assert reply["value"]["stdout"] == "before\n"     # output up to the failure is kept
    assert ok(ex(eng, "a"))["stdout"] == "1\n"        # state before the failure is kept


def test_traceback_shows_lines_of_earlier_cells(eng):
    ok(ex(eng, "def f(x):\n    return x / 0\n"))
    err = ex(eng, "f(1)")["error"]
    assert "return x / 0" in err["traceback"]
    assert "f(1)" in err["traceback"]


def test_code_run_again_runs_again_under_its_own_cell_number(eng):
    # Repeated code is compiled once (engine._compile); each run is still a run of
    # its own, with its own cell number in tracebacks.
    ok(ex(eng, "x = 0"))
    for n in (2, 3, 4):
        assert ok(ex(eng, "x += 1\nx"))["stdout"] == f"{n - 1}\n"
    for n in (5, 6):
        err = ex(eng, "y = 1\n1 / 0")["error"]
        assert f"In [{n}]" in err["traceback"] and "1 / 0" in err["traceback"]
    for n in (7, 8):  # nested code objects are compiled every time
        ok(ex(eng, "def g():\n    return 1 / 0"))
        err = ex(eng, "g()")["error"]
        assert "return 1 / 0" in err["traceback"]


def test_syntax_error(eng):
    reply = ex(eng, "def f(:\n    pass")
    assert reply["ok"] is False
    assert reply["error"]["ename"] == "SyntaxError"
    assert "def f(:" in reply["error"]["traceback"]
    assert ok(ex(eng, "1"))["stdout"] == "1\n"


@pytest.mark.parametrize("code", ["import sys; sys.exit(2)", "exit()", "raise SystemExit",
                                  "quit(1)", "raise SystemExit('bye')"])
def test_system_exit_is_reported_and_the_engine_keeps_running(eng, code):
    reply = ex(eng, code)
    assert reply["ok"] is False
    assert reply["error"]["ename"] == "SystemExit"
    assert "keeps running" in reply["error"]["evalue"]
    assert ok(ex(eng, "40 + 2"))["stdout"] == "42\n"


def test_keyboard_interrupt_in_code_is_reported(eng):
    reply = ex(eng, "raise KeyboardInterrupt")
    assert reply["ok"] is False
    assert reply["error"]["ename"] == "KeyboardInterrupt"
    assert ok(ex(eng, "1"))["stdout"] == "1\n"


def test_base_exception_subclass_is_reported(eng):
    reply = ex(eng, "class Odd(BaseException): pass\nraise Odd('x')")
    assert reply["error"]["ename"] == "Odd"
    assert reply["error"]["evalue"] == "x"


def test_exception_whose_str_raises_is_still_a_record(eng):
    reply = ex(eng, "class E(Exception):\n"
                    "    def __str__(self):\n"
                    "        raise RuntimeError('no')\n"
                    "raise E()")
    assert reply["ok"] is False
    err = reply["error"]
    assert err["ename"] == "E"
    assert isinstance(err["evalue"], str) and err["evalue"]
    assert isinstance(err["traceback"], str)
    assert ok(ex(eng, "1"))["stdout"] == "1\n"


def test_user_replacing_sys_stdout_does_not_break_the_next_command(eng):
    real_out, real_err = sys.stdout, sys.stderr
    ok(ex(eng, "import sys, io\nsys.stdout = io.StringIO()\nsys.stderr = io.StringIO()"))
    assert sys.stdout is real_out and sys.stderr is real_err
    assert ok(ex(eng, "print('visible')"))["stdout"] == "visible\n"


def test_user_closing_sys_stdout_does_not_break_the_engine(eng):
    ex(eng, "import sys\nsys.stdout.close()")  # reported either way; the engine must survive
    assert ok(ex(eng, "print('still here')"))["stdout"] == "still here\n"


def test_comm_is_in_the_namespace_and_reset_restores_it(eng):
    assert ok(ex(eng, "comm is not None"))["stdout"] == "True\n"
    assert eng.ns["comm"] is COMM
    ok(ex(eng, "del comm"))
    assert ex(eng, "comm")["error"]["ename"] == "NameError"
    ok(run(eng, P.RESET, {}))
    assert eng.ns["comm"] is COMM


# --- push / pull / keys / reset -----------------------------------------------------------
def test_push_then_pull(eng):
    arr = np.arange(6.0).reshape(2, 3)
    ok(push(eng, a=5, b=[1, "two"], arr=arr, f=lambda x: x + 1))
    assert ok(pull(eng, "a")) == 5
    assert ok(pull(eng, "a", "b")) == [5, [1, "two"]]
    np.testing.assert_array_equal(ok(pull(eng, "arr")), arr)
    assert ok(ex(eng, "f(a)"))["stdout"] == "6\n"
    assert ok(ex(eng, "float(arr.sum())"))["stdout"] == "15.0\n"


def test_pushed_arrays_are_writable(eng):
    ok(push(eng, arr=np.zeros(3)))
    ok(ex(eng, "arr[0] = 1"))
    np.testing.assert_array_equal(ok(pull(eng, "arr")), [1, 0, 0])


def test_pull_unknown_name_is_a_name_error_record(eng):
    ok(push(eng, a=1))
    reply = pull(eng, "a", "nope")
    assert reply["ok"] is False
    err = reply["error"]
    assert err["ename"] == "NameError"
    assert "nope" in err["evalue"]
    assert err["method"] == "pull" and err["engine_id"] == 3


def test_pull_of_an_unpicklable_value_is_an_error_record(eng):
    ok(ex(eng, "import threading\nlock = threading.Lock()"))
    reply = pull(eng, "lock")
    assert reply["ok"] is False
    assert reply["error"]["method"] == "pull"
    assert "lock" in reply["error"]["evalue"]
    assert ok(pull(eng, "threading")).__name__ == "threading"  # modules pickle by reference


def test_functions_and_classes_made_on_the_engine_come_back_by_value(eng):
    # Replies try the standard pickler first; what it would pickle by a reference the
    # client cannot resolve (the engine's __main__) must fall back to cloudpickle.
    ok(ex(eng, "def f(x):\n    return x * 2\nclass P:\n    def __init__(self, v):\n"
               "        self.v = v\np = P(3)\ng = lambda: 7"))
    f, p, g = ok(pull(eng, "f", "p", "g"))
    assert f(4) == 8 and p.v == 3 and type(p).__name__ == "P" and g() == 7


def test_keys_hides_internals(eng):
    assert ok(run(eng, P.KEYS, {})) == []
    ok(ex(eng, "b = 1\na = 2"))
    assert ok(run(eng, P.KEYS, {})) == ["a", "b"]


def test_reset_clears_the_namespace(eng):
    ok(push(eng, a=1))
    ok(run(eng, P.RESET, {}))
    assert ok(run(eng, P.KEYS, {})) == []
    assert pull(eng, "a")["error"]["ename"] == "NameError"
    assert ok(ex(eng, "__name__"))["stdout"] == "'__main__'\n"


def test_ping(eng):
    assert ok(run(eng, P.PING, {})) == {"id": 3, "host": "testhost", "pid": os.getpid()}


def test_cancelled_reply(eng):
    meta_blob, data_blob = eng.cancelled(Command(P.EXECUTE, {"code": "x"}, (3,)), "dropped")
    reply = payload.unpack(meta_blob, data_blob)
    assert reply["ok"] is False
    assert reply["error"]["ename"] == "CancelledError"
    assert reply["error"]["evalue"] == "dropped"
    assert reply["error"]["method"] == "execute"


def test_a_result_that_cannot_be_pickled_is_an_error_record(eng):
    # Any op whose value cannot be pickled: the engine reports it instead of raising.
    ok(ex(eng, "def gen():\n    yield 1\ng = gen()"))
    reply = run(eng, P.GATHER, {"name": "g"})
    assert reply["ok"] is False and reply["error"]["method"] == "gather"


# --- scatter / gather / map pieces, as the client builds them ---------------------------
def scatter(engines: List[Engine], name: str, seq: Any) -> List[dict]:
    """Scatter ``seq`` over ``engines`` exactly as client.scatter + the controller do."""
    meta, parts, counts = client._scatter_payload(seq, len(engines), "scatter")
    last = parts[-1]  # a part given as a list of buffers goes as their concatenation
    blob = b"".join(bytes(memoryview(b).cast("B")) for b in
                    (last if isinstance(last, list) else [last]))
    meta = dict(meta, name=name, counts=counts)
    replies, pos = [], 0
    for e, c in zip(engines, counts):
        replies.append(run(e, P.SCATTER, meta, parts[:-1], piece=blob[pos:pos + c]))
        pos += c
    assert pos == len(blob)
    return replies


def gather(engines: List[Engine], name: str) -> Any:
    return partition.join([ok(run(e, P.GATHER, {"name": name})) for e in engines])


def engines(k: int) -> List[Engine]:
    return [Engine(i, host="h") for i in range(k)]


@pytest.mark.parametrize("seq", [
    list(range(10)),
    tuple("abcdefg"),
    range(3),
    [],
    [{"a": 1}, None, 2.5, "s", b"b"],
    [np.arange(3), np.arange(2)],          # a list of arrays stays a list
], ids=["list", "tuple", "range-short", "empty", "mixed", "list-of-arrays"])
def test_scatter_gather_sequences(seq):
    es = engines(4)
    for r in scatter(es, "x", seq):
        assert ok(r) is None
    pieces = [e.ns["x"] for e in es]
    assert all(isinstance(p, list) for p in pieces)
    sizes = [len(p) for p in pieces]
    assert sizes == [b - a for a, b in partition.bounds(len(seq), 4)]
    back = gather(es, "x")
    assert len(back) == len(seq)
    for got, want in zip(back, seq):
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(got, want)
        else:
            assert got == want


@pytest.mark.parametrize("arr", [
    np.arange(10.0),
    np.arange(24, dtype=np.int32).reshape(6, 4),
    np.arange(60, dtype=np.complex128).reshape(5, 3, 4),
    np.arange(3, dtype=np.uint8),           # fewer rows than engines
    np.zeros(0),
    np.arange(12).reshape(3, 4).T,          # not contiguous
    np.asfortranarray(np.arange(12.0).reshape(6, 2)),
    np.array([1, 2, 3, 4, 5], dtype=">i4"),  # big-endian
    np.array(["ab", "c", "def"]),
    np.array([True, False, True, True, False]),
], ids=["f8", "i4-2d", "c16-3d", "short", "empty", "transposed", "fortran", "big-endian",
        "unicode", "bool"])
def test_scatter_gather_arrays(arr):
    es = engines(4)
    for r in scatter(es, "a", arr):
        assert ok(r) is None
    for e, (a, b) in zip(es, partition.bounds(len(arr), 4)):
        piece = e.ns["a"]
        assert isinstance(piece, np.ndarray)
        assert piece.dtype == arr.dtype
        np.testing.assert_array_equal(piece, arr[a:b])
        assert piece.shape == arr[a:b].shape
    back = gather(es, "a")
    # numpy.concatenate (in partition.join) returns native byte order: same values.
    assert back.dtype in (arr.dtype, arr.dtype.newbyteorder("="))
    np.testing.assert_array_equal(back, arr)


def test_scattered_array_piece_is_usable(eng):
    (r,) = scatter([eng], "a", np.arange(5.0))
    ok(r)
    assert ok(ex(eng, "a *= 2\nfloat(a.sum())"))["stdout"] == "20.0\n"


def test_scatter_structured_array_keeps_its_fields():
    arr = np.array([(i, i * 0.5) for i in range(5)], dtype=[("a", "<i4"), ("b", "<f8")])
    es = engines(2)
    for r in scatter(es, "s", arr):
        ok(r)
    assert es[0].ns["s"].dtype == arr.dtype
    np.testing.assert_array_equal(gather(es, "s"), arr)


def test_scatter_datetime_array():
    arr = np.array(["2020-01-01", "2020-01-02", "2020-01-03"], dtype="datetime64[D]")
    es = engines(2)
    for r in scatter(es, "d", arr):
        ok(r)
    np.testing.assert_array_equal(gather(es, "d"), arr)


def test_scatter_array_with_zero_width_rows():
    arr = np.zeros((3, 0))
    es = engines(2)
    for r in scatter(es, "z", arr):
        ok(r)
    assert [e.ns["z"].shape for e in es] == [(2, 0), (1, 0)]


def test_object_arrays_are_scattered_as_pickles():
    arr = np.array([{"a": 1}, None, [2]], dtype=object)
    es = engines(2)
    for r in scatter(es, "o", arr):
        ok(r)
    assert list(es[0].ns["o"]) == [{"a": 1}, None]
    assert list(es[1].ns["o"]) == [[2]]


def test_gather_unknown_name_is_a_name_error_record(eng):
    reply = run(eng, P.GATHER, {"name": "missing"})
    assert reply["ok"] is False and reply["error"]["ename"] == "NameError"


def map_on(es: List[Engine], func: Any, *seqs: Any) -> List[dict]:
    """Run ``map`` pieces exactly as client.map builds them."""
    seqs = tuple(partition.as_sequence(s, "map") for s in seqs)
    n = min(len(s) for s in seqs)
    data, buffers = payload.dumps(func)
    pieces = [[partition.map_piece(s, a, b) for s in seqs]
              for a, b in partition.bounds(n, len(es))]
    blobs = [client._inband(p) for p in pieces]
    meta = {"kind": "pickle", "counts": [len(b) for b in blobs]}
    return [run(e, P.APPLY, meta, [data, *buffers], piece=b) for e, b in zip(es, blobs)]


@pytest.mark.parametrize("k", [1, 3, 8])
def test_map_equals_serial_map(k):
    offset = 10

    def f(x, y):  # a closure: travels by cloudpickle
        return x * y + offset

    xs, ys = list(range(7)), list(range(100, 110))
    replies = map_on(engines(k), f, xs, ys)
    assert partition.join([ok(r) for r in replies]) == list(map(f, xs, ys))


def test_map_over_arrays():
    arr = np.arange(9.0)
    replies = map_on(engines(2), lambda v: float(v) ** 2, arr)
    assert partition.join([ok(r) for r in replies]) == [float(v) ** 2 for v in arr]


def test_map_failure_is_an_error_record_named_map():
    replies = map_on(engines(2), lambda x: 1 / x, [1, 2, 0, 4])
    assert replies[0]["ok"] is True and replies[0]["value"] == [1.0, 0.5]
    err = replies[1]["error"]
    assert replies[1]["ok"] is False
    assert err["ename"] == "ZeroDivisionError" and err["method"] == "map"
    assert err["engine_id"] == 1
