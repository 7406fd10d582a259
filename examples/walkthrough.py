"""A guided tour of the multiengine interface, in the order of the reference document.

Run it against a cluster that is already up, for instance::

    mpiengine start -n 4
    python examples/walkthrough.py            # the default profile's cluster
    mpiengine stop

``python examples/walkthrough.py PATH`` uses the connection file PATH instead;
``$MPIENGINE_CONNECTION_FILE`` is honoured as well. The tour needs at least two
engines and is written for four. Each step prints what it did and checks the
result; the script exits non-zero at the first surprise. It defines names on
the engines (a, b, c, ...): run ``mec.reset()`` afterwards for a clean slate.

The section on magics (``%px``, ``%result``, ``%autopx``) runs them in an
IPython shell created in-process when IPython is installed, and otherwise
shows the plain ``execute`` calls they stand for.
"""
from __future__ import annotations

import sys
import time
from typing import Any, List

from mpiengine import client


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"walkthrough: FAILED: {what}")


def step(title: str) -> None:
    print(f"\n=== {title} ===")


def show(expr: str, value: Any) -> Any:
    """Print ``expr`` and the value it produced, the way an interactive session would."""
    print(f">>> {expr}")
    if value is not None:
        print(repr(value) if not isinstance(value, str) else value)
    return value


def stdout_of(results: List[dict]) -> List[str]:
    return [r["stdout"].strip() for r in results]


def tour(mec: client.MultiEngineClient) -> None:
    step("Connect and list the engines")
    ids = show("mec.get_ids()", mec.get_ids())
    n = len(ids)
    check(ids == list(range(n)) and n >= 2, f"engine ids 0..N-1 with N >= 2, got {ids}")
    even, odd = ids[0::2], ids[1::2]

    step("Parallel map")
    serial = list(map(lambda x: x ** 10, range(32)))
    parallel = mec.map(lambda x: x ** 10, range(32))
    show("mec.map(lambda x: x**10, range(32))[:6]", parallel[:6])
    show("serial == parallel", serial == parallel)
    check(serial == parallel, "map on the engines equals the builtin map")

    step("The @parallel decorator")

    @mec.parallel()
    def f(x):
        return 10.0 * x ** 4

    out = show("f(range(32))[:5]   # f decorated with @mec.parallel()", f(range(32))[:5])
    check(out == [10.0 * x ** 4 for x in range(5)], "a parallel function maps over its argument")

    step("Blocking execution: every engine, then chosen ones")
    show("mec.execute('a = 5')", mec.execute("a = 5"))
    show("mec.execute('b = 10')", mec.execute("b = 10"))
    show(f"mec.execute('c = a + b', targets={even})", mec.execute("c = a + b", targets=even))
    show(f"mec.execute('c = a - b', targets={odd})", mec.execute("c = a - b", targets=odd))
    res = show("mec.execute('print(c)')", mec.execute("print(c)"))
    check(stdout_of(res) == ["15" if i % 2 == 0 else "-5" for i in ids],
          "namespaces persist: even engines hold 15, odd ones -5")

    step("Each result is a dict")
    res = mec.execute("d = 10; print(d)")
    print(">>> for r in mec.execute('d = 10; print(d)'): print(r)")
    for r in res:
        print(r)
    check(all({"id", "number", "input", "stdout", "stderr"} <= set(r) for r in res),
          "result dicts carry id, number, input, stdout and stderr")
    check([r["input"]["raw"] for r in res] == ["d = 10; print(d)"] * n, "input.raw is the code")

    step("Non-blocking execution")
    mec.execute("import time")
    pr = show("pr = mec.execute('time.sleep(0.5)', block=False)",
              mec.execute("time.sleep(0.5)", block=False))
    check(isinstance(pr, client.PendingResult), "block=False returns a PendingResult")
    show("pr.get_result()", pr.get_result())
    pr = mec.execute("time.sleep(0.5)", block=False)
    early = show("pr.get_result(block=False)   # not finished yet: the default, None",
                 pr.get_result(block=False))
    check(early is None, "an unfinished result polls as None")
    show("pr.r", pr.r)

    step("barrier: wait for a list of pending results")
    mec.block = False
    t0 = time.monotonic()
    pr_list = [mec.execute("time.sleep(0.1)") for _ in range(5)]
    print(">>> mec.block = False")
    print(">>> pr_list = [mec.execute('time.sleep(0.1)') for i in range(5)]")
    print(">>> mec.barrier(pr_list)")
    mec.barrier(pr_list)
    print(f"(all five done after {time.monotonic() - t0:.2f} s)")
    check(all(p.done() for p in pr_list), "barrier returns once every result is in")
    show("pr_list[0].r", pr_list[0].r)

    step("The block and targets attributes")
    mec.targets, mec.block = even, False
    print(f">>> mec.targets = {even}; mec.block = False")
    pr = show("pr = mec.execute('a = 5')", mec.execute("a = 5"))
    res = show("pr.r", pr.r)
    check([r["id"] for r in res] == even, "the targets attribute chose the engines")
    mec.targets, mec.block = "all", True
    print(">>> mec.targets = 'all'; mec.block = True")
    res = show("mec.execute('b = 10; print(b)')", mec.execute("b = 10; print(b)"))
    check(stdout_of(res) == ["10"] * n, "back on every engine, blocking")

    step("Parallel magics: %px, %result, %autopx")
    magics(mec)

    step("push and pull")
    show("mec.push(dict(a=1.03234, b=3453))", mec.push(dict(a=1.03234, b=3453)))
    check(show("mec.pull('a')", mec.pull("a")) == [1.03234] * n, "pull one name")
    check(show("mec.pull('b', targets=0)", mec.pull("b", targets=0)) == [3453],
          "pull from a single engine is still a list")
    check(show("mec.pull(('a', 'b'))", mec.pull(("a", "b"))) == [[1.03234, 3453]] * n,
          "pull several names: one list per engine")
    check(show("mec.zip_pull(('a', 'b'))", mec.zip_pull(("a", "b")))
          == [(1.03234,) * n, (3453,) * n], "zip_pull: one tuple per name")
    mec.push(dict(c="speed"))
    res = show("mec.push(dict(c='speed')); mec.execute('print(c)')", mec.execute("print(c)"))
    check(stdout_of(res) == ["speed"] * n, "a pushed string prints on every engine")
    pr = show("mec.pull('a', block=False).r", mec.pull("a", block=False).r)
    check(pr == [1.03234] * n, "non-blocking pull")

    step("push_function and pull_function")

    def g(x):
        return 2.0 * x ** 4

    show("mec.push_function(dict(g=g))", mec.push_function(dict(g=g)))
    mec.execute("y = g(4.0)")
    res = show("mec.execute('y = g(4.0)'); mec.execute('print(y)')", mec.execute("print(y)"))
    check(stdout_of(res) == ["512.0"] * n, "a pushed function runs on the engines")
    back = mec.pull_function("g", targets=0)[0]
    check(back(3.0) == g(3.0), "a pulled function is callable here")
    print(">>> mec.pull_function('g', targets=0)[0](3.0) ->", back(3.0))

    step("The dictionary interface")
    mec["a"] = ["foo", "bar"]
    print(">>> mec['a'] = ['foo', 'bar']")
    check(show("mec['a']", mec["a"]) == [["foo", "bar"]] * n, "mec[name] pulls from every engine")

    step("scatter and gather")
    show("mec.scatter('a', range(16))", mec.scatter("a", range(16)))
    res = show("mec.execute('print(a)')", mec.execute("print(a)"))
    parts = mec.pull("a")
    check(sum(parts, []) == list(range(16)), "scatter hands out contiguous parts in order")
    check(max(map(len, parts)) - min(map(len, parts)) <= 1, "parts differ by at most one item")
    check(show("mec.gather('a')", mec.gather("a")) == list(range(16)), "gather joins the parts")

    step("A parallel list comprehension")
    mec.scatter("x", range(64))
    mec.execute("y = [i**10 for i in x]")
    print(">>> mec.scatter('x', range(64)); mec.execute('y = [i**10 for i in x]')")
    y = mec.gather("y")
    show("mec.gather('y')[:6]", y[:6])
    check(y == [i ** 10 for i in range(64)], "scatter + execute + gather equals the serial list")

    step("Parallel exceptions")
    try:
        mec.execute("1/0")
    except client.CompositeError as e:
        print(">>> mec.execute('1/0')")
        print(f"CompositeError: {e}")
        err = e
    else:
        raise SystemExit("walkthrough: FAILED: 1/0 did not raise CompositeError")
    check(len(err.elist) == n and all(r.ename == "ZeroDivisionError" for r in err.elist),
          "one ZeroDivisionError per engine")
    print(">>> e.raise_exception()")
    try:
        err.raise_exception()
    except ZeroDivisionError as original:
        print(f"ZeroDivisionError: {original}")
    else:
        raise SystemExit("walkthrough: FAILED: raise_exception() did not re-raise")
    print(">>> e.print_tracebacks(0)")
    err.print_tracebacks(0)

    mec.block = False
    pr = mec.execute("1/0")
    print(">>> mec.block = False; pr = mec.execute('1/0'); pr.r")
    try:
        pr.r
    except client.CompositeError as e:
        print(f"CompositeError: {e}")
    else:
        raise SystemExit("walkthrough: FAILED: pr.r did not raise CompositeError")
    finally:
        mec.block = True


def magics(mec: client.MultiEngineClient) -> None:
    """Run the magics in an in-process IPython shell, or show what they stand for."""
    try:
        from IPython.core.interactiveshell import InteractiveShell
    except ImportError:
        print("(IPython is not installed: %px CODE is mec.execute(CODE), "
              "%result is mec.last_result())")
        mec.execute("import numpy")
        mec.execute("a = numpy.random.rand(2, 2)")
        show("mec.execute('print(numpy.linalg.eigvals(a))')",
             mec.execute("print(numpy.linalg.eigvals(a))"))
        show("mec.last_result()", mec.last_result())
        return
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False  # leave no history database behind
    shell = InteractiveShell.instance(config=config)
    mec.activate()
    mec.block = True
    for cell in ("%px import numpy",
                 "%px a = numpy.random.rand(2, 2)",
                 "%px print(numpy.linalg.eigvals(a))",
                 "%result"):
        print(f"In: {cell}")
        outcome = shell.run_cell(cell, store_history=True)
        check(outcome.success, f"{cell} ran")
    check(len(mec.last_result()) == len(mec.get_ids()), "%result shows every engine")

    # With %autopx on, every cell goes to the engines until %autopx is typed again.
    mec.block = False
    loop = ("max_evals = []\n"
            "for i in range(100):\n"
            "    a = numpy.random.rand(10, 10)\n"
            "    a = a + a.transpose()\n"
            "    max_evals.append(numpy.linalg.eigvalsh(a).max())\n")
    for cell in ("%autopx", loop, "%autopx"):
        print(f"In: {cell}")
        outcome = shell.run_cell(cell, store_history=True)
        check(outcome.success, f"{cell.splitlines()[0]} ran")
    mec.block = True
    cell = "%px print('Average max eigenvalue is:', sum(max_evals) / len(max_evals))"
    print(f"In: {cell}")
    outcome = shell.run_cell(cell, store_history=True)
    check(outcome.success, "%px after %autopx ran")
    averages = [float(s.rsplit(":", 1)[1]) for s in stdout_of(mec.last_result())]
    check(all(8.0 < v < 12.0 for v in averages),
          f"the loop ran on the engines (averages near 10), got {averages}")


def main(argv: List[str]) -> int:
    path = argv[1] if len(argv) > 1 else None
    t0 = time.monotonic()
    with client.MultiEngineClient(path) as mec:
        print(f"connected: {mec!r}")
        tour(mec)
    print(f"\nwalkthrough: all checks passed in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
