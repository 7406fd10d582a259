"""Scatter a 2-d numpy array over the engines, work on the pieces, gather the result.

Run it against a cluster that is already up::

    mpiengine start -n 4
    python examples/numpy_scatter_gather.py
    mpiengine stop

The cluster is the default profile's, or the one named by
``$MPIENGINE_CONNECTION_FILE``. ``scatter`` splits the array along its first
axis into contiguous blocks of rows (sizes differ by at most one row) and sends
them as raw buffers; ``gather`` joins the blocks back in engine order. A
column sum is also combined between the engines with ``comm.Allreduce``. Every
result is compared with the same computation done here, serially; the script
exits non-zero on any difference.
"""
from __future__ import annotations

import sys
import time

import numpy

from mpiengine import client

ROWS, COLS = 1001, 64  # 1001 rows: the blocks cannot all be the same size

# Runs on every engine, on its own block of rows.
ENGINE_CODE = """
import numpy
rows_here = block.shape
smooth = numpy.tanh(block) * 2.0 + numpy.sqrt(numpy.abs(block))
row_norms = numpy.linalg.norm(block, axis=1)
col_sums = numpy.empty(block.shape[1])
comm.Allreduce(numpy.ascontiguousarray(block.sum(axis=0)), col_sums)
"""


def serial(a: numpy.ndarray) -> numpy.ndarray:
    return numpy.tanh(a) * 2.0 + numpy.sqrt(numpy.abs(a))


def main() -> int:
    t0 = time.monotonic()
    data = numpy.random.default_rng(7).standard_normal((ROWS, COLS))
    failures = []
    with client.MultiEngineClient() as mec:
        n = len(mec.get_ids())
        print(f"scattering a {data.shape} {data.dtype} array over {n} engines")
        mec.scatter("block", data)
        mec.execute(ENGINE_CODE)
        shapes = mec.pull("rows_here")
        print("block shape on each engine:", shapes)
        sizes = [s[0] for s in shapes]
        if (sum(sizes) != ROWS or max(sizes) - min(sizes) > 1
                or sizes != sorted(sizes, reverse=True)):
            failures.append(f"blocks of {sizes} rows: expected contiguous near-equal parts, "
                            f"larger ones first")

        smooth = mec.gather("smooth")
        norms = mec.gather("row_norms")
        col_sums = mec.pull("col_sums")
        back = mec.gather("block")
        mec.execute("del block, smooth, row_norms, col_sums")

    print("gathered:", type(smooth).__name__, smooth.shape, "and", norms.shape)
    checks = [
        ("gather(block) gives back the original array", numpy.array_equal(back, data)),
        ("elementwise result equals the serial one",
         isinstance(smooth, numpy.ndarray) and numpy.allclose(smooth, serial(data))),
        ("row norms equal the serial ones",
         numpy.allclose(norms, numpy.linalg.norm(data, axis=1))),
        ("comm.Allreduce column sums agree on every engine and with the serial sum",
         all(numpy.allclose(c, data.sum(axis=0)) for c in col_sums)),
    ]
    for what, ok in checks:
        print(f"  [{'ok' if ok else 'FAILED'}] {what}")
        if not ok:
            failures.append(what)
    for f in failures:
        print("FAILED:", f)
    print(f"numpy_scatter_gather: {'all checks passed' if not failures else 'FAILED'} "
          f"in {time.monotonic() - t0:.1f} s")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
