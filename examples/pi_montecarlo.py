"""Estimate pi by Monte Carlo: every engine throws darts, MPI adds up the hits.

Run it against a cluster that is already up::

    mpiengine start -n 4
    python examples/pi_montecarlo.py [SAMPLES_PER_ENGINE]
    mpiengine stop

The cluster is the default profile's, or the one named by
``$MPIENGINE_CONNECTION_FILE``. Each engine draws points in the unit square
from its own random stream and counts those inside the quarter circle; the
counts are combined on the engines with ``comm.reduce`` (to engine 0) and
``comm.allreduce`` (to all), without passing through the client. The script
exits non-zero if the two disagree or the estimate is implausibly far from pi.
"""
from __future__ import annotations

import math
import sys
import time

from mpiengine import client

# Runs on every engine; `comm` is the engines' communicator (rank == engine id).
ENGINE_CODE = """
import numpy
rng = numpy.random.default_rng([seed, comm.rank])   # an independent stream per engine
hits = 0
for start in range(0, samples, 250_000):
    xy = rng.random((min(250_000, samples - start), 2))
    hits += int(numpy.count_nonzero((xy * xy).sum(axis=1) <= 1.0))
hits_at_root = comm.reduce(hits, root=0)    # the sum on engine 0, None elsewhere
hits_everywhere = comm.allreduce(hits)      # the sum on every engine
"""


def main(argv: list) -> int:
    samples = int(argv[1]) if len(argv) > 1 else 1_000_000
    t0 = time.monotonic()
    with client.MultiEngineClient() as mec:
        n = len(mec.get_ids())
        print(f"{n} engines, {samples:,} samples each, {n * samples:,} in all")
        mec.push(dict(samples=samples, seed=2024))
        mec.execute(ENGINE_CODE)

        per_engine = mec.pull("hits")
        at_root = mec.pull("hits_at_root")
        everywhere = mec.pull("hits_everywhere")
        mec.execute("rng = xy = None")  # keep the counts, free the big arrays
    total = sum(per_engine)
    print("hits per engine:          ", per_engine)
    print("comm.reduce (root 0):     ", at_root)
    print("comm.allreduce:           ", everywhere)

    ok = True
    if at_root[0] != total or any(v is not None for v in at_root[1:]):
        print("FAILED: comm.reduce should give the total on engine 0 and None elsewhere")
        ok = False
    if everywhere != [total] * n:
        print("FAILED: comm.allreduce should give the same total on every engine")
        ok = False

    estimate = 4.0 * total / (n * samples)
    # The standard error of the estimate; allow a generous 8 of them.
    sigma = 4.0 * math.sqrt((math.pi / 4) * (1 - math.pi / 4) / (n * samples))
    error = abs(estimate - math.pi)
    print(f"pi is about {estimate:.6f}  (math.pi = {math.pi:.6f}, "
          f"off by {error:.2e}, standard error {sigma:.1e})")
    if error > 8 * sigma:
        print("FAILED: the estimate is further from pi than chance allows")
        ok = False
    print(f"pi_montecarlo: {'all checks passed' if ok else 'FAILED'} "
          f"in {time.monotonic() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
