"""Every example of the reference document, in Python 3, against a real cluster.

The reference is ``seed/parallel_multiengine.txt`` (IPython 0.9's multiengine
interface). Each test names the ``In [n]`` lines it reproduces. The ``%px``
examples are written here as ``mec.execute`` (which is all ``%px`` is); the
magics themselves are tested elsewhere.

Execution numbers (``In [n]``) are per-engine counters that ``reset()`` does not
restart, so the expected numbers are computed from the engines' counts at the
start of each test (:func:`counts`), exactly as the document's numbers follow
from the commands before them.
"""
from __future__ import annotations

import re
import time

import pytest

from mpiengine import client
from mpiengine.errors import CompositeError
from mpiengine.results import PendingResult

pytestmark = pytest.mark.mpi

ALL = [0, 1, 2, 3]


def counts(mec, targets="all"):
    """Run ``pass`` and return ``{engine id: its execution number}``."""
    return {r["id"]: r["number"] for r in mec.execute("pass", targets=targets, block=True)}


def lines(result):
    return repr(result).splitlines()


def in_lines(n, src, ids=ALL):
    """The ``<Results List>`` lines of a command without output."""
    return ["<Results List>"] + [f"[{i}] In [{n[i]}]: {src}" for i in ids]


def next_numbers(base, k=1):
    return {i: v + k for i, v in base.items()}


# -- Creating a MultiEngineClient instance -------------------------------------

def test_client_from_path_and_get_ids(cluster):
    # In [2]: mec = client.MultiEngineClient('/path/to/my/ipcontroller-mec.furl')
    # In [3]: mec.get_ids()  ->  [0, 1, 2, 3]
    mec = client.MultiEngineClient(str(cluster.connection_file))
    try:
        assert mec.get_ids() == ALL
    finally:
        mec.close()


def test_client_default_from_environment(cluster, monkeypatch):
    # In [2]: mec = client.MultiEngineClient()   (the default connection file)
    monkeypatch.setenv("MPIENGINE_CONNECTION_FILE", str(cluster.connection_file))
    mec = client.MultiEngineClient()
    try:
        assert mec.get_ids() == ALL
        assert mec.block is True and mec.targets == "all"  # the documented defaults
    finally:
        mec.close()


def test_composite_error_is_reexported():
    # The document catches ``client.CompositeError``.
    assert client.CompositeError is CompositeError


# -- Quick and easy parallelism --------------------------------------------------

def test_parallel_map(mec):
    # In [63]-[65]: serial_result == parallel_result  ->  True
    serial_result = list(map(lambda x: x**10, range(32)))
    parallel_result = mec.map(lambda x: x**10, range(32))
    assert parallel_result == serial_result
    assert isinstance(parallel_result, list)


def test_parallel_map_several_sequences_and_uneven(mec):
    assert mec.map(lambda x, y: x * y, range(10), range(10, 20)) == \
        [x * y for x, y in zip(range(10), range(10, 20))]
    # Fewer items than engines, and a single item.
    assert mec.map(lambda x: x + 1, [1, 2]) == [2, 3]
    assert mec.map(str, [7]) == ["7"]


def test_mapper(mec):
    # "The map method has a number of options that can be controlled by the mapper method."
    def f(x):
        return x * 3
    m = mec.mapper(dist="b", targets=[1, 3], block=True)
    assert m.map(f, range(9)) == [x * 3 for x in range(9)]
    pr = mec.mapper(block=False).map(f, range(8))
    assert isinstance(pr, PendingResult)
    assert pr.r == [x * 3 for x in range(8)]


def test_parallel_decorator(mec):
    # In [10]: @mec.parallel()  def f(x): return 10.0*x**4
    # In [11]: f(range(32))  ->  [0.0, 10.0, 160.0, ...]
    @mec.parallel()
    def f(x):
        return 10.0 * x**4

    result = f(range(32))
    assert result[:3] == [0.0, 10.0, 160.0]
    assert result == [10.0 * x**4 for x in range(32)]


# -- Blocking execution ------------------------------------------------------------

def test_blocking_execute_and_targets(mec):
    # In [4]-[8]: a=5, b=10, c=a+b on [0,2], c=a-b on [1,3], print(c)
    n = counts(mec)
    r = mec.execute("a=5")
    n = next_numbers(n)
    assert lines(r) == in_lines(n, "a=5")

    r = mec.execute("b=10")
    n = next_numbers(n)
    assert lines(r) == in_lines(n, "b=10")

    r = mec.execute("c=a+b", targets=[0, 2])
    for i in (0, 2):
        n[i] += 1
    assert lines(r) == in_lines(n, "c=a+b", ids=[0, 2])

    r = mec.execute("c=a-b", targets=[1, 3])
    for i in (1, 3):
        n[i] += 1
    assert lines(r) == in_lines(n, "c=a-b", ids=[1, 3])

    r = mec.execute("print(c)")
    n = next_numbers(n)
    expected = ["<Results List>"]
    for i in ALL:
        expected += [f"[{i}] In [{n[i]}]: print(c)",
                     f"[{i}] Out[{n[i]}]: {15 if i % 2 == 0 else -5}"]
    assert lines(r) == expected


def test_execute_result_dicts(mec):
    # In [9]: result_dict = mec.execute('d=10; print d')
    # {'input': {'translated': ..., 'raw': ...}, 'number': 5, 'id': 0, 'stdout': '10\n'}
    n = next_numbers(counts(mec))
    result_dict = mec.execute("d=10; print(d)")
    assert isinstance(result_dict, list) and len(result_dict) == 4
    for i, r in enumerate(result_dict):
        assert isinstance(r, dict)
        assert {"id", "number", "input", "stdout", "stderr"} <= set(r)
        assert r["id"] == i
        assert r["number"] == n[i]
        assert r["input"] == {"translated": "d=10; print(d)", "raw": "d=10; print(d)"}
        assert r["stdout"] == "10\n"
        assert r["stderr"] == ""


def test_execute_single_int_target_and_stderr(mec):
    r = mec.execute("import sys; print('oops', file=sys.stderr)", targets=2)
    assert [d["id"] for d in r] == [2]
    assert r[0]["stderr"] == "oops\n"
    assert r[0]["stdout"] == ""


# -- Non-blocking execution ---------------------------------------------------------

def test_nonblocking_execute(mec):
    # In [6]-[11]: import time; pr = execute('time.sleep(10)', block=False);
    # pr.get_result(); pr.get_result(block=False) -> None while running; pr.r
    n = next_numbers(counts(mec))
    assert lines(mec.execute("import time")) == in_lines(n, "import time")

    pr = mec.execute("time.sleep(0.5)", block=False)
    assert isinstance(pr, PendingResult)
    n = next_numbers(n)
    assert lines(pr.get_result()) == in_lines(n, "time.sleep(0.5)")

    pr = mec.execute("time.sleep(2)", block=False)
    t0 = time.monotonic()
    assert pr.get_result(block=False) is None
    assert pr.get_result(default="not yet", block=False) == "not yet"
    assert time.monotonic() - t0 < 1.0, "a non-blocking poll must not wait"
    n = next_numbers(n)
    assert lines(pr.r) == in_lines(n, "time.sleep(2)")
    # Once fetched, the result stays available.
    assert lines(pr.get_result(block=False)) == in_lines(n, "time.sleep(2)")


def test_barrier(mec):
    # In [72]-[75]: mec.block=False; pr_list = [mec.execute('time.sleep(3)') ...];
    # mec.barrier(pr_list); pr_list[0].r
    mec.execute("import time")
    n = counts(mec)
    mec.block = False
    pr_list = [mec.execute("time.sleep(0.1)") for i in range(10)]
    assert all(isinstance(pr, PendingResult) for pr in pr_list)
    assert len({pr.result_id for pr in pr_list}) == 10
    mec.barrier(pr_list)
    # After the barrier every result is ready without waiting.
    ready = [pr.get_result(block=False) for pr in pr_list]
    assert all(r is not None for r in ready)
    assert lines(pr_list[0].r) == in_lines(next_numbers(n, 1), "time.sleep(0.1)")
    assert lines(pr_list[9].r) == in_lines(next_numbers(n, 10), "time.sleep(0.1)")


# -- The block and targets keyword arguments and attributes --------------------------

def test_block_and_targets_attributes(mec):
    # In [16]-[22]
    n = counts(mec)
    mec.targets = [0, 2]
    mec.block = False
    pr = mec.execute("a=5")
    assert isinstance(pr, PendingResult)
    for i in (0, 2):
        n[i] += 1
    assert lines(pr.r) == in_lines(n, "a=5", ids=[0, 2])

    mec.targets = "all"
    mec.block = True
    r = mec.execute("b=10; print(b)")
    n = next_numbers(n)
    expected = ["<Results List>"]
    for i in ALL:
        expected += [f"[{i}] In [{n[i]}]: b=10; print(b)", f"[{i}] Out[{n[i]}]: 10"]
    assert lines(r) == expected


def test_keywords_override_attributes(mec):
    mec.targets = [0, 2]
    mec.block = False
    r = mec.execute("k = 1", targets=[3], block=True)
    assert [d["id"] for d in r] == [3]
    assert mec.pull("k", targets=3, block=True) == [1]
    pr = mec.pull("k", targets=[3])  # the block attribute (False) applies
    assert isinstance(pr, PendingResult)
    assert pr.r == [1]


# -- Parallel magic commands, as the execute calls they stand for ------------------

def test_px_examples_as_execute(mec):
    # In [26]-[28]: %px import numpy; a = numpy.random.rand(2,2); print eigvals(a)
    n = next_numbers(counts(mec))
    assert lines(mec.execute("import numpy")) == in_lines(n, "import numpy")
    n = next_numbers(n)
    src = "a = numpy.random.rand(2,2)"
    assert lines(mec.execute(src)) == in_lines(n, src)
    n = next_numbers(n)
    out = lines(mec.execute("print(numpy.linalg.eigvals(a))"))
    assert out[0] == "<Results List>"
    assert len(out) == 1 + 2 * 4
    for k, i in enumerate(ALL):
        assert out[1 + 2 * k] == f"[{i}] In [{n[i]}]: print(numpy.linalg.eigvals(a))"
        assert re.fullmatch(rf"\[{i}\] Out\[{n[i]}\]: \[.*\]", out[2 + 2 * k])


def test_autopx_example_as_execute(mec):
    # In [32]-[36]: max_evals over 100 random symmetric matrices, then the average.
    mec.execute("import numpy")
    mec.execute("max_evals = []")
    loop = ("for i in range(100):\n"
            "    a = numpy.random.rand(10,10)\n"
            "    a = a+a.transpose()\n"
            "    evals = numpy.linalg.eigvals(a)\n"
            "    max_evals.append(evals[0].real)\n")
    mec.block = False
    pr = mec.execute(loop)
    assert isinstance(pr, PendingResult)
    mec.block = True
    n = next_numbers(counts(mec))
    src = 'print("Average max eigenvalue is: ", sum(max_evals)/len(max_evals))'
    out = lines(mec.execute(src))
    for k, i in enumerate(ALL):
        assert out[1 + 2 * k] == f"[{i}] In [{n[i]}]: {src}"
        assert re.fullmatch(rf"\[{i}\] Out\[{n[i]}\]: Average max eigenvalue is: +\d+\.\d+",
                            out[2 + 2 * k])
    assert all(len(v) == 100 for v in mec.pull("max_evals"))


def test_multiline_input_repr(mec):
    n = next_numbers(counts(mec))
    r = mec.execute("for i in range(2):\n    print(i)", targets=1)
    assert lines(r) == ["<Results List>",
                        f"[1] In [{n[1]}]: for i in range(2):",
                        f"           {' ' * len(str(n[1]))}    print(i)",
                        f"[1] Out[{n[1]}]: 0",
                        f"           {' ' * len(str(n[1]))}1"]


# -- Moving Python objects around -------------------------------------------------------

def test_push_and_pull(mec):
    # In [38]-[44]
    assert mec.push(dict(a=1.03234, b=3453)) == [None, None, None, None]
    assert mec.pull("a") == [1.03234, 1.03234, 1.03234, 1.03234]
    assert mec.pull("b", targets=0) == [3453]
    assert mec.pull(("a", "b")) == [[1.03234, 3453]] * 4
    assert mec.zip_pull(("a", "b")) == [(1.03234, 1.03234, 1.03234, 1.03234),
                                        (3453, 3453, 3453, 3453)]
    assert mec.push(dict(c="speed")) == [None, None, None, None]
    r = mec.execute("print(c)")
    assert [d["stdout"] for d in r] == ["speed\n"] * 4


def test_push_pull_targets_and_objects(mec):
    value = {"nested": [1, (2, 3)], "s": "x" * 1000, "none": None}
    assert mec.push(dict(v=value), targets=[1, 2]) == [None, None]
    assert mec.pull("v", targets=[1, 2]) == [value, value]
    assert mec.pull("v", targets=[2, 1]) == [value, value]


def test_pull_nonblocking(mec):
    # In [47]-[49]: mec.block=False; pr = mec.pull('a'); pr.r
    mec.push(dict(a=1.03234))
    mec.block = False
    pr = mec.pull("a")
    assert isinstance(pr, PendingResult)
    assert pr.r == [1.03234, 1.03234, 1.03234, 1.03234]
    pr = mec.push(dict(z=1))
    assert isinstance(pr, PendingResult)
    assert pr.r == [None, None, None, None]


def test_push_function(mec):
    # In [52]-[56]: push_function(dict(f=f)); execute('y = f(4.0)'); print y -> 512.0
    def f(x):
        return 2.0 * x**4

    assert mec.push_function(dict(f=f)) == [None, None, None, None]
    n = next_numbers(counts(mec))
    assert lines(mec.execute("y = f(4.0)")) == in_lines(n, "y = f(4.0)")
    n = next_numbers(n)
    expected = ["<Results List>"]
    for i in ALL:
        expected += [f"[{i}] In [{n[i]}]: print(y)", f"[{i}] Out[{n[i]}]: 512.0"]
    assert lines(mec.execute("print(y)")) == expected
    assert mec.pull("y") == [512.0] * 4


def test_push_function_lambda_and_closure(mec):
    k = 7

    def add_k(x):
        return x + k

    mec.push_function(dict(g=lambda x: x * 2, h=add_k))
    mec.execute("r = (g(3), h(1))")
    assert mec.pull("r") == [(6, 8)] * 4


def test_pull_function(mec):
    def f(x):
        return 2.0 * x**4

    mec.push_function(dict(f=f))
    pulled = mec.pull_function("f")
    assert len(pulled) == 4
    assert [g(4.0) for g in pulled] == [512.0] * 4
    # A function defined on the engines comes back too.
    # (It must not refer to ``comm``: a communicator cannot travel.)
    mec.execute("def h(x, k=comm.rank):\n    return x + k")
    assert [h(10) for h in mec.pull_function("h")] == [10, 11, 12, 13]
    assert len(mec.pull_function("h", targets=3)) == 1


def test_dictionary_interface(mec):
    # In [50]-[52]: mec['a']=['foo','bar']; mec['a']
    mec["a"] = ["foo", "bar"]
    assert mec["a"] == [["foo", "bar"], ["foo", "bar"], ["foo", "bar"], ["foo", "bar"]]
    mec.targets = [1, 3]
    mec["a"] = "only odd"
    assert mec["a"] == ["only odd", "only odd"]
    assert mec.pull("a", targets="all") == [["foo", "bar"], "only odd", ["foo", "bar"], "only odd"]


# -- Scatter and gather -------------------------------------------------------------------

def test_scatter_and_gather(mec):
    # In [58]-[60]
    assert mec.scatter("a", range(16)) == [None, None, None, None]
    out = [d["stdout"] for d in mec.execute("print(a)")]
    assert out == ["[0, 1, 2, 3]\n", "[4, 5, 6, 7]\n", "[8, 9, 10, 11]\n", "[12, 13, 14, 15]\n"]
    assert mec.pull("a") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert mec.gather("a") == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]


def test_scatter_uneven_partitions(mec):
    # Contiguous partitions, sizes differ by at most one, earlier engines take the extra.
    mec.scatter("a", list(range(10)))
    assert mec.pull("a") == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert mec.gather("a") == list(range(10))
    mec.scatter("a", ["x", "y"])
    assert mec.pull("a") == [["x"], ["y"], [], []]
    assert mec.gather("a") == ["x", "y"]
    mec.scatter("a", [])
    assert mec.pull("a") == [[], [], [], []]
    assert mec.gather("a") == []


def test_scatter_gather_targets(mec):
    assert mec.scatter("a", range(5), targets=[1, 3]) == [None, None]
    assert mec.pull("a", targets=[1, 3]) == [[0, 1, 2], [3, 4]]
    assert mec.gather("a", targets=[1, 3]) == [0, 1, 2, 3, 4]


def test_scatter_gather_numpy(mec):
    import numpy as np
    A = np.arange(40, dtype=np.float64).reshape(10, 4)
    assert mec.scatter("A", A) == [None, None, None, None]
    parts = mec.pull("A")
    assert [p.shape for p in parts] == [(3, 4), (3, 4), (2, 4), (2, 4)]
    assert all(isinstance(p, np.ndarray) and p.dtype == A.dtype for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), A)
    mec.execute("B = A * 2")
    B = mec.gather("B")
    assert isinstance(B, np.ndarray) and B.dtype == A.dtype and B.shape == (10, 4)
    np.testing.assert_array_equal(B, A * 2)

    v = np.arange(7, dtype=np.int32)
    mec.scatter("v", v)
    assert [p.tolist() for p in mec.pull("v")] == [[0, 1], [2, 3], [4, 5], [6]]
    g = mec.gather("v")
    assert g.dtype == np.int32
    np.testing.assert_array_equal(g, v)


def test_large_and_small_replies_in_one_result(mec):
    """Replies over 64 KiB travel as separate messages, smaller ones inline; a result
    mixes both, and a gathered array's large pieces still join without a copy."""
    import numpy as np
    mec.execute("import numpy\nx = numpy.arange(200_000.0 if comm.rank % 2 == 0 else 3.0)")
    got = mec.pull("x")
    assert [len(g) for g in got] == [200_000, 3, 200_000, 3]
    np.testing.assert_array_equal(got[2], np.arange(200_000.0))
    A = np.arange(1_000_003.0)
    mec.scatter("A", A)
    np.testing.assert_array_equal(mec.gather("A"), A)
    mec.execute("del x, A")


def test_parallel_list_comprehension(mec):
    # In [66]-[69]
    assert mec.scatter("x", range(64)) == [None, None, None, None]
    n = next_numbers(counts(mec))
    src = "y = [i**10 for i in x]"
    assert lines(mec.execute(src)) == in_lines(n, src)
    y = mec.gather("y")
    assert y[:9] == [0, 1, 1024, 59049, 1048576, 9765625, 60466176, 282475249, 1073741824]
    assert y == [i**10 for i in range(64)]


# -- Parallel exceptions -------------------------------------------------------------------

ZDE_LINES = ["one or more exceptions from call to method: execute"] + \
    [f"[{i}:execute]: ZeroDivisionError: division by zero" for i in ALL]


def test_composite_error_blocking(mec):
    # In [77]: mec.execute('1/0')  ->  CompositeError with one line per engine
    with pytest.raises(CompositeError) as info:
        mec.execute("1/0")
    e = info.value
    assert str(e).splitlines() == ZDE_LINES
    assert [r.engine_id for r in e.elist] == ALL
    for r in e.elist:
        assert r.method == "execute"
        assert r.ename == "ZeroDivisionError"
        assert r.evalue == "division by zero"
        assert "ZeroDivisionError" in r.traceback
    # The cluster is fine afterwards.
    assert mec.execute("q = 1") and mec.pull("q") == [1] * 4


def test_composite_error_raise_exception(mec):
    # In [80]: except client.CompositeError as e: e.raise_exception()
    with pytest.raises(ZeroDivisionError, match="division by zero"):
        try:
            mec.execute("1/0")
        except client.CompositeError as e:
            e.raise_exception()
    with pytest.raises(CompositeError) as info:
        mec.execute("1/0")
    with pytest.raises(IndexError):
        info.value.raise_exception(excid=9)


def test_composite_error_print_tracebacks(mec, capsys):
    # ipdb> e.print_tracebacks()
    with pytest.raises(CompositeError) as info:
        mec.execute("1/0")
    capsys.readouterr()
    info.value.print_tracebacks()
    out = capsys.readouterr().out
    positions = [out.index(f"[{i}:execute]:") for i in ALL]
    assert positions == sorted(positions)
    assert out.count("ZeroDivisionError") >= 4
    assert "division by zero" in out


def test_composite_error_some_engines(mec):
    with pytest.raises(CompositeError) as info:
        mec.execute("if comm.rank % 2:\n    raise ValueError('odd %d' % comm.rank)")
    assert [(r.engine_id, r.ename, r.evalue) for r in info.value.elist] == \
        [(1, "ValueError", "odd 1"), (3, "ValueError", "odd 3")]
    assert str(info.value).splitlines()[1:] == \
        ["[1:execute]: ValueError: odd 1", "[3:execute]: ValueError: odd 3"]


def test_composite_error_nonblocking(mec):
    # In [83]-[85]: mec.block=False; pr = mec.execute('1/0'); pr.r
    mec.block = False
    pr = mec.execute("1/0")
    assert isinstance(pr, PendingResult)
    with pytest.raises(CompositeError) as info:
        pr.r
    assert str(info.value).splitlines() == ZDE_LINES
    with pytest.raises(CompositeError):
        pr.get_result()
    mec.block = True
    mec.execute("q = 2")
    assert mec.pull("q") == [2] * 4  # the engines still answer


def test_error_in_parallel_map(mec):
    with pytest.raises(CompositeError) as info:
        mec.map(lambda x: 1 / x, range(8))
    assert [r.ename for r in info.value.elist] == ["ZeroDivisionError"]
    assert [r.engine_id for r in info.value.elist] == [0]
    assert mec.map(lambda x: x, range(8)) == list(range(8))


# -- Beyond the document: comm, keys, reset, queue_status, ordering, overlap ---------------

def test_comm_between_engines(mec):
    mec.execute("s = comm.allreduce(comm.rank)")
    assert mec.pull("s") == [6, 6, 6, 6]
    mec.execute("r, n = comm.rank, comm.size")
    assert mec.pull(("r", "n")) == [[0, 4], [1, 4], [2, 4], [3, 4]]
    # MPI.COMM_WORLD is the job's (its Abort says why first): rank 0 is the controller.
    mec.execute("from mpi4py import MPI\n"
                "w = MPI.COMM_WORLD\n"
                "wr, wn, same = w.Get_rank(), w.size, w == MPI.Intracomm(MPI.COMM_WORLD)")
    assert mec.pull(("wr", "wn", "same")) == [[1, 5, True], [2, 5, True], [3, 5, True],
                                              [4, 5, True]]


def test_keys_and_reset(mec):
    mec.push(dict(alpha=1, beta=2))
    keys = mec.keys()
    assert len(keys) == 4
    for k in keys:
        assert "alpha" in k and "beta" in k
    assert [("alpha" in k) for k in mec.keys(targets=[2])] == [True]
    mec.reset()
    for k in mec.keys():
        assert "alpha" not in k and "beta" not in k
    with pytest.raises(CompositeError) as info:
        mec.pull("alpha")
    assert {r.ename for r in info.value.elist} == {"NameError"}
    # reset() keeps the engines usable, comm included.
    mec.execute("s = comm.allreduce(1)")
    assert mec.pull("s") == [4, 4, 4, 4]


def test_reset_keeps_execution_counter(mec):
    before = counts(mec)
    mec.reset()
    after = counts(mec)
    assert all(after[i] > before[i] for i in ALL)


def test_queue_status_while_busy(mec):
    mec.execute("import time")
    pr = mec.execute("time.sleep(2)", targets=[0], block=False)
    t0 = time.monotonic()
    qs = mec.queue_status()
    assert time.monotonic() - t0 < 1.5, "the controller must answer while an engine is busy"
    ids = sorted(qs) if isinstance(qs, dict) else [
        q[0] if isinstance(q, (tuple, list)) else q.get("id", q.get("engine_id")) for q in qs]
    assert sorted(ids) == ALL
    pr.r


def test_nonblocking_overlap_and_order(mec):
    # Engines [0,2] sleep while [1,3] keep working; each engine keeps its order.
    mec.execute("import time; x = 0")
    n = counts(mec)
    t0 = time.monotonic()
    slow = mec.execute("time.sleep(3)", targets=[0, 2], block=False)
    after = mec.execute("x = 2", targets=[0, 2], block=False)
    fast = mec.execute("x = 1", targets=[1, 3])
    assert time.monotonic() - t0 < 1.5, "[1,3] must not wait for [0,2]"
    assert [d["id"] for d in fast] == [1, 3]
    assert slow.get_result(block=False) is None
    assert mec.pull("x", targets=[1, 3]) == [1, 1]
    # A blocking pull on [0,2] is queued behind the sleep and the assignment.
    assert mec.pull("x", targets=[0, 2]) == [2, 2]
    assert time.monotonic() - t0 >= 2.5
    assert [d["number"] for d in slow.r] == [n[0] + 1, n[2] + 1]
    assert [d["number"] for d in after.r] == [n[0] + 2, n[2] + 2]


def test_order_of_many_nonblocking_commands(mec):
    mec.block = False
    mec.execute("L = []")
    prs = [mec.execute(f"L.append({i})") for i in range(20)]
    mec.block = True
    assert mec.pull("L") == [list(range(20))] * 4
    mec.barrier(prs)


def test_get_pending_from_new_client(mec, cluster):
    pr = mec.execute("import time; time.sleep(0.5); z = 7", block=False)
    rid = pr.result_id
    other = client.MultiEngineClient(str(cluster.connection_file))
    try:
        got = other.get_pending(rid)
        result = got.get_result(timeout=30) if hasattr(got, "get_result") else got
        assert [d["id"] for d in result] == ALL
        assert [d["input"]["raw"] for d in result] == ["import time; time.sleep(0.5); z = 7"] * 4
    finally:
        other.close()
    assert mec.pull("z") == [7] * 4
