"""The operations, done the same way on mpiengine and on ipyparallel.

Each framework gets a small adapter with the same six verbs (``execute``,
``push``, ``pull``, ``scatter``, ``gather``, ``map``, all blocking), and
:func:`run_ops` times every row of :data:`OPS` on it. The first, untimed run
of each operation is also checked for the right answer, so a fast wrong
result cannot pass for a fast one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple


@dataclass(frozen=True)
class Sizes:
    """How big and how often: the full run, or ``--quick``."""

    small: int        # bytes of the small array (push/pull)
    big: int         # bytes of the big array (push/pull/scatter/gather)
    nlist: int       # items of the list of ints (scatter/gather)
    map_small: int   # items mapped
    map_big: int
    reps: int        # repetitions of heavy operations
    reps_fast: int   # repetitions of sub-millisecond operations
    idle: float      # seconds of the idle window
    scale: Tuple[int, ...]  # engine counts of the scaling rows
    start_reps: int


FULL = Sizes(small=10**6, big=10**8, nlist=10**6, map_small=32, map_big=100_000,
             reps=5, reps_fast=30, idle=10.0, scale=(4, 16, 32), start_reps=5)
QUICK = Sizes(small=10**3, big=10**5, nlist=10**3, map_small=32, map_big=1000,
              reps=2, reps_fast=2, idle=1.0, scale=(4,), start_reps=1)


def human(nbytes: int) -> str:
    for unit, div in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= div:
            return f"{nbytes / div:g} {unit}"
    return f"{nbytes} B"


# --- adapters ------------------------------------------------------------------------
class MpiengineOps:
    def __init__(self, mec: Any) -> None:
        self.mec = mec

    def execute(self, code: str, one: bool = False) -> Any:
        return self.mec.execute(code, targets=0 if one else "all")

    def push(self, ns: dict) -> Any:
        return self.mec.push(ns)

    def pull(self, name: str) -> Any:
        return self.mec.pull(name)

    def scatter(self, name: str, seq: Any) -> Any:
        return self.mec.scatter(name, seq)

    def gather(self, name: str) -> Any:
        return self.mec.gather(name)

    def map(self, f: Callable, seq: Any) -> Any:
        return self.mec.map(f, seq)


class IppOps:
    def __init__(self, rc: Any) -> None:
        self.dv = rc[:]
        self.dv.block = True
        self.one = rc[rc.ids[0]]
        self.one.block = True

    def execute(self, code: str, one: bool = False) -> Any:
        return (self.one if one else self.dv).execute(code, block=True)

    def push(self, ns: dict) -> Any:
        return self.dv.push(ns, block=True)

    def pull(self, name: str) -> Any:
        return self.dv.pull(name, block=True)

    def scatter(self, name: str, seq: Any) -> Any:
        return self.dv.scatter(name, seq, block=True)

    def gather(self, name: str) -> Any:
        return self.dv.gather(name, block=True)

    def map(self, f: Callable, seq: Any) -> Any:
        return self.dv.map_sync(f, seq)


# --- the operations ------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    key: str
    label: str
    heavy: bool  # repeated ``reps`` times, else ``reps_fast``
    # (adapter, data) -> (call to time, check of its first result)
    make: Callable[[Any, "Data"], Tuple[Callable[[], Any], Callable[[Any], bool]]]


class Data:
    """The inputs, made once and shared by both frameworks."""

    def __init__(self, sizes: Sizes, n_engines: int) -> None:
        import numpy

        self.sizes = sizes
        self.n = n_engines
        self.small = numpy.random.default_rng(1).random(sizes.small // 8)
        self.big = numpy.random.default_rng(2).random(sizes.big // 8)
        self.ints = list(range(sizes.nlist))


def _ok(_: Any) -> bool:
    return True


def _exec(one: bool) -> Callable:
    def make(a: Any, d: Data) -> Tuple[Callable, Callable]:
        return (lambda: a.execute("pass", one=one)), (lambda r: len(r) == (1 if one else d.n))
    return make


def _push(attr: str) -> Callable:
    def make(a: Any, d: Data) -> Tuple[Callable, Callable]:
        arr = getattr(d, attr)
        return (lambda: a.push({attr: arr})), _ok
    return make


def _pull(attr: str) -> Callable:
    def make(a: Any, d: Data) -> Tuple[Callable, Callable]:
        arr = getattr(d, attr)
        a.push({attr: arr})
        return (lambda: a.pull(attr)), (
            lambda r: len(r) == d.n and all(x.shape == arr.shape and x[-1] == arr[-1] for x in r))
    return make


def _scatter(attr: str) -> Callable:
    def make(a: Any, d: Data) -> Tuple[Callable, Callable]:
        seq = getattr(d, attr)
        return (lambda: a.scatter("part_" + attr, seq)), _ok
    return make


def _gather(attr: str) -> Callable:
    def make(a: Any, d: Data) -> Tuple[Callable, Callable]:
        seq = getattr(d, attr)
        a.scatter("part_" + attr, seq)
        return (lambda: a.gather("part_" + attr)), (
            lambda r: len(r) == len(seq) and r[-1] == seq[-1] and r[0] == seq[0])
    return make


def _map(which: str) -> Callable:
    def make(a: Any, d: Data) -> Tuple[Callable, Callable]:
        n = getattr(d.sizes, which)
        # A lambda, as in the issue: cloudpickle sends it by value, so the
        # engines need not import this module.
        f = lambda x: x ** 10  # noqa: E731
        return (lambda: a.map(f, range(n))), (
            lambda r: list(r) == [x ** 10 for x in range(n)])
    return make


def ops(sizes: Sizes) -> List[Op]:
    """The operation rows timed on a running cluster, in table order."""
    s, b = human(sizes.small), human(sizes.big)
    return [
        Op("exec1", "execute('pass'), 1 engine", False, _exec(True)),
        Op("exec", "execute('pass'), all engines", False, _exec(False)),
        Op("push_small", f"push {s} float64 array", False, _push("small")),
        Op("pull_small", f"pull {s} array (from all)", False, _pull("small")),
        Op("push_big", f"push {b} float64 array", True, _push("big")),
        Op("pull_big", f"pull {b} array (from all)", True, _pull("big")),
        Op("scatter_big", f"scatter {b} array", True, _scatter("big")),
        Op("gather_big", f"gather {b} array", True, _gather("big")),
        Op("scatter_list", f"scatter list of {sizes.nlist:,} ints", True, _scatter("ints")),
        Op("gather_list", f"gather list of {sizes.nlist:,} ints", True, _gather("ints")),
        Op("map_small", f"map x**10 over {sizes.map_small:,} items", False, _map("map_small")),
        Op("map_big", f"map x**10 over {sizes.map_big:,} items", True, _map("map_big")),
    ]


#: Fast operations are timed in blocks of this many calls per framework (see run_ops).
FAST_BLOCK = 6


def time_calls(fn: Callable[[], Any], reps: int) -> List[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run_ops(adapters: Dict[str, Any], data: Data, sizes: Sizes,
            log: Callable[[str], None]) -> Dict[str, Dict[str, List[float]]]:
    """Time every op on every framework; return ``{op key: {framework: [seconds]}}``.

    Repetitions alternate between the frameworks, so a burst of load from
    elsewhere on the machine hits both alike instead of one: blocks of one timed
    call (heavy operations) or FAST_BLOCK timed calls (fast ones), each block
    after one untimed call of the same framework (a A.. b B.. a A.., lower case
    for the untimed call). A framework's processes keep working for a while after
    a call returns (ipyparallel's engines and hub after a 100 MB push, for
    instance); timing the first call after a switch would measure one framework
    inside the other's tail.
    """
    results: Dict[str, Dict[str, List[float]]] = {}
    for op in ops(sizes):
        calls: Dict[str, Callable[[], Any]] = {}
        results[op.key] = {}
        for name, adapter in adapters.items():
            try:
                call, check = op.make(adapter, data)
                if not check(call()):  # also the warm-up
                    raise AssertionError(f"{op.key} on {name} returned a wrong result")
                calls[name] = call
                results[op.key][name] = []
            except Exception as e:  # one broken op must not hide the others
                log(f"# {name}: {op.label} FAILED: {type(e).__name__}: {e}")
                results[op.key][name] = []
        reps = sizes.reps if op.heavy else sizes.reps_fast
        block = 1 if op.heavy else min(FAST_BLOCK, reps)
        for _ in range(max(1, reps // block)):
            for name in list(calls):
                try:
                    calls[name]()  # untimed: lets the other framework's tail pass
                    results[op.key][name] += time_calls(calls[name], block)
                except Exception as e:
                    log(f"# {name}: {op.label} FAILED: {type(e).__name__}: {e}")
                    del calls[name]
                    results[op.key][name] = []
        for name, times in results[op.key].items():
            if times:
                log(f"# {name:<11} {op.label:<36} median {_median(times) * 1e3:9.2f} ms")
        _cleanup(adapters)
    return results


def _cleanup(adapters: Dict[str, Any]) -> None:
    """Drop the big objects on the engines so memory does not pile up."""
    for adapter in adapters.values():
        try:
            adapter.execute("for _k in ('big', 'small', 'part_big', 'part_ints'): "
                            "globals().pop(_k, None)")
        except Exception:
            pass


def _median(xs: List[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def median(xs: List[float]) -> Optional[float]:
    return _median(xs) if xs else None
