"""Parallel functions: ``@mec.parallel()`` and ``mec.mapper()``.

Run it against a cluster that is already up::

    mpiengine start -n 4
    python examples/parallel_decorator.py
    mpiengine stop

The cluster is the default profile's, or the one named by
``$MPIENGINE_CONNECTION_FILE``. A function decorated with ``@mec.parallel()``
takes sequences instead of single values: the items are split into contiguous
blocks, one per engine, the function is applied on the engines, and the results
come back in the original order. ``mec.mapper(targets=..., block=...)`` gives a
``map`` with fixed options. Every result is compared with Python's own ``map``;
the script exits non-zero on any difference.
"""
from __future__ import annotations

import math
import sys
import time

from mpiengine import client

failures = []


def check(what: str, got, want) -> None:
    ok = got == want
    print(f"  [{'ok' if ok else 'FAILED'}] {what}")
    if not ok:
        failures.append(f"{what}: got {got!r}, expected {want!r}")


def collatz_steps(n: int) -> int:
    """The number of Collatz steps from n down to 1 (uneven work per item)."""
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def main() -> int:
    t0 = time.monotonic()
    with client.MultiEngineClient() as mec:
        ids = mec.get_ids()
        print(f"{len(ids)} engines")

        # The decorator: calling the result maps the function over its arguments.
        @mec.parallel()
        def quartic(x):
            return 10.0 * x ** 4

        print("quartic(range(8)) ->", quartic(range(8)))
        check("@mec.parallel() on one sequence", quartic(range(40)),
              [10.0 * x ** 4 for x in range(40)])

        # Functions defined here travel with what they use (closures, globals, imports).
        offset = 0.5

        @mec.parallel()
        def hypot_plus(a, b):
            return math.hypot(a, b) + offset

        check("two sequences and a closure", hypot_plus(range(30), range(30, 60)),
              [math.hypot(a, b) + offset for a, b in zip(range(30), range(30, 60))])

        steps = mec.parallel()(collatz_steps)
        check("a module-level function, uneven work", steps(range(1, 2001)),
              [collatz_steps(n) for n in range(1, 2001)])

        # A mapper fixes targets and block mode for every map it does.
        some = ids[:2]
        on_some = mec.mapper(targets=some)
        check(f"mapper(targets={some}).map", on_some.map(str.upper, ["a", "b", "c", "d", "e"]),
              ["A", "B", "C", "D", "E"])

        later = mec.mapper(block=False)
        pending = later.map(lambda s: s[::-1], ["mpi", "engine", "map"])
        print("mapper(block=False).map(...) ->", pending)
        check("a non-blocking mapper returns a PendingResult",
              isinstance(pending, client.PendingResult), True)
        check("... whose .r is the mapped list", pending.r, ["ipm", "enigne", "pam"])

        @mec.parallel(block=False)
        def square(x):
            return x * x

        check("@mec.parallel(block=False) result", square(range(10)).r,
              [x * x for x in range(10)])

        # An exception on any engine comes back as one CompositeError.
        @mec.parallel()
        def inverse(x):
            return 1 / x

        try:
            inverse(range(-2, 3))
        except client.CompositeError as e:
            print("inverse(range(-2, 3)) raised CompositeError:", str(e).splitlines()[1])
            check("the failing engine reports ZeroDivisionError",
                  [r.ename for r in e.elist], ["ZeroDivisionError"])
        else:
            failures.append("inverse(range(-2, 3)) did not raise CompositeError")

    for f in failures:
        print("FAILED:", f)
    print(f"parallel_decorator: {'all checks passed' if not failures else 'FAILED'} "
          f"in {time.monotonic() - t0:.1f} s")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
