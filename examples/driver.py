"""A driver script: the same file runs in batch mode and against an interactive cluster.

Batch mode (the script drives the engines of its own job, then the job ends with the
script's exit status)::

    mpiexec -n 5 python -m mpiengine run examples/driver.py --out result.txt
    srun --mpi=pmi2 -n 5 python -m mpiengine run examples/driver.py --out result.txt

Against a running cluster (``mpiengine start``, ``sbatch examples/slurm_interactive.sh``)::

    MPIENGINE_CONNECTION_FILE=/path/to/controller.json python examples/driver.py

``MultiEngineClient()`` without arguments finds the engines either way: ``mpiengine run``
sets ``$MPIENGINE_CONNECTION_FILE`` for the driver to a private connection file.

The driver estimates pi with a Monte Carlo sum spread over the engines, checks a scatter /
gather round trip and an MPI allreduce among the engines, writes a short report (to
``--out`` and to stdout) and exits with status 0 if every check passed, 1 if one failed,
or the status given with ``--exit-code`` (to show that the status reaches the job).
"""
from __future__ import annotations

import argparse
import math
import sys
import time

from mpiengine import client


def run(mec: client.MultiEngineClient, samples: int) -> list:
    """Do the work on the engines; return report lines, each 'name: value ok|FAILED'."""
    n = len(mec.get_ids())
    report = [f"engines: {n}"]
    mec.execute("import socket; host = socket.gethostname()")
    hosts = mec.pull("host")
    report.append(f"hosts: {','.join(sorted(set(hosts)))}")

    # scatter / gather: contiguous pieces, back in order
    data = list(range(1000))
    mec.scatter("part", data)
    back = mec.gather("part")
    report.append(f"scatter/gather of 1000 items: {'ok' if back == data else 'FAILED'}")

    # engines talk to each other over MPI: comm is the engines-only communicator
    mec.execute("rank_sum = comm.allreduce(comm.rank)")
    got = mec.pull("rank_sum")
    want = n * (n - 1) // 2
    report.append(f"comm.allreduce of ranks: {got[0]} "
                  f"{'ok' if got == [want] * n else 'FAILED'}")

    # a Monte Carlo estimate of pi, each engine with its own seed
    mec.push({"samples": samples})
    mec.execute("import numpy as np\n"
                "rng = np.random.default_rng(1234 + comm.rank)\n"
                "xy = rng.random((samples, 2))\n"
                "hits = int(((xy ** 2).sum(axis=1) <= 1.0).sum())\n"
                "total_hits = comm.allreduce(hits)")
    total = mec.pull("total_hits", targets=0)[0]
    pi = 4.0 * total / (samples * n)
    ok = abs(pi - math.pi) < 0.05
    report.append(f"pi ~ {pi:.4f} from {samples * n} samples: {'ok' if ok else 'FAILED'}")

    # map keeps order
    squares = mec.map(lambda x: x * x, range(20))
    report.append(f"map: {'ok' if list(squares) == [x * x for x in range(20)] else 'FAILED'}")
    return report


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the report to this file")
    ap.add_argument("--samples", type=int, default=200_000, help="samples per engine")
    ap.add_argument("--exit-code", type=int, default=None,
                    help="exit with this status after the work (default: 0 if all checks pass)")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    with client.MultiEngineClient() as mec:
        mec.on_output = None  # the report says everything
        report = run(mec, args.samples)
    report.append(f"took {time.monotonic() - t0:.2f} s")
    failed = any(line.endswith("FAILED") for line in report)
    status = args.exit_code if args.exit_code is not None else int(failed)
    report.append(f"exit status: {status}")
    text = "".join(line + "\n" for line in report)
    sys.stdout.write(text)
    sys.stdout.flush()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
