"""The MPI half of the floor: raw mpi4py collectives, run as ``mpiexec -n N+1``.

Rank 0 plays the controller, ranks 1..N the engines, and every rank waits in
blocking collectives (busy-polling: the fastest MPI can go, and the most CPU it
can burn). Rank 0 prints one line ``FLOOR_JSON {...}`` with the median seconds
of each measurement:

    rtt_all, rtt_one      bcast(code) + exec + gather(reply), all engines / engine 0
    bcast_S               Bcast of S bytes (buffer) + Barrier       (push floor)
    pull_S                Gatherv of S bytes from every engine      (pull floor)
    scatterv, gatherv     Scatterv / Gatherv of BIG bytes in all    (scatter/gather floor)
    list_pickle           pickling the list's pieces (what a client must do)
    list_scatter          Scatterv of the pickled pieces + unpickle on each engine
    list_gather           pickle on each engine + Gather(sizes) + Gatherv
    list_unpickle         unpickling the gathered pieces (what a client must do)
    map_N                 comm.scatter of (function, piece) + map + comm.gather
    bytes                 sizes of the pickles, for the socket half of the floor

``--start-only`` imports what the runtime imports to serve (mpi4py,
cloudpickle), meets in a Barrier and prints the wall-clock time: from launch to
that moment is the floor of "start until usable".
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import time


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--start-only", action="store_true")
    ap.add_argument("--small", type=int, default=10**6)
    ap.add_argument("--big", type=int, default=10**8)
    ap.add_argument("--nlist", type=int, default=10**6)
    ap.add_argument("--map", default="32,100000")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    import cloudpickle
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if args.start_only:
        # What the runtime needs before it can serve (numpy is imported lazily,
        # so not here either); the wall-clock time after the Barrier ends the span.
        comm.Barrier()
        if comm.Get_rank() == 0:
            print(f"STARTED {time.time():.6f}", flush=True)
        return 0
    import numpy as np
    rank, size = comm.Get_rank(), comm.Get_size()
    n = size - 1
    root = rank == 0
    out = {}
    reps, many = args.reps, max(args.reps, 50)

    def timed(fn, k):
        fn()  # warm-up
        ts = []
        for _ in range(k):
            comm.Barrier()
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return _median(ts)

    # --- small round trips ---------------------------------------------------
    ns = {}

    def rtt(c):
        def go():
            code = c.bcast("pass" if c.Get_rank() == 0 else None, root=0)
            reply = None
            if c.Get_rank() != 0:
                exec(compile(code, "<floor>", "exec"), ns)
                reply = {"ok": True, "value": None}
            c.gather(reply, root=0)
        return go

    out["rtt_all"] = timed(rtt(comm), many)
    pair = comm.Split(0 if rank <= 1 else MPI.UNDEFINED, rank)
    # Ranks outside the pair still join timed()'s Barriers, with nothing to do.
    out["rtt_one"] = timed(rtt(pair) if pair != MPI.COMM_NULL else (lambda: None), many)

    # --- buffers: push, pull, scatter, gather --------------------------------
    def bcast(nbytes):
        buf = np.zeros(nbytes, dtype=np.uint8)

        def go():
            comm.Bcast([buf, MPI.BYTE], root=0)
            comm.Barrier()
        return go

    def pull(nbytes):
        mine = np.zeros(0 if root else nbytes, dtype=np.uint8)
        counts = [0] + [nbytes] * n
        displs = [0] + [i * nbytes for i in range(n)]
        recv = np.empty(nbytes * n if root else 0, dtype=np.uint8)

        def go():
            comm.Gatherv([mine, MPI.BYTE], [recv, (counts, displs), MPI.BYTE] if root else None,
                         root=0)
        return go

    def split(total):
        base, extra = divmod(total, n)
        counts = [0] + [base + (1 if i < extra else 0) for i in range(n)]
        displs = [sum(counts[:i]) for i in range(len(counts))]
        return counts, displs

    def scatterv(total):
        counts, displs = split(total)
        send = np.zeros(total if root else 0, dtype=np.uint8)
        recv = np.empty(counts[rank], dtype=np.uint8)

        def go():
            comm.Scatterv([send, (counts, displs), MPI.BYTE] if root else None,
                          [recv, MPI.BYTE], root=0)
            comm.Barrier()
        return go

    def gatherv(total):
        counts, displs = split(total)
        mine = np.zeros(counts[rank], dtype=np.uint8)
        recv = np.empty(total if root else 0, dtype=np.uint8)

        def go():
            comm.Gatherv([mine, MPI.BYTE], [recv, (counts, displs), MPI.BYTE] if root else None,
                         root=0)
        return go

    for label, nbytes in (("small", args.small), ("big", args.big)):
        out[f"bcast_{label}"] = timed(bcast(nbytes), many if label == "small" else reps)
        out[f"pull_{label}"] = timed(pull(nbytes), many if label == "small" else reps)
    out["scatterv"] = timed(scatterv(args.big), reps)
    out["gatherv"] = timed(gatherv(args.big), reps)

    # --- a list of ints: pickles through Scatterv / Gatherv ------------------
    data = list(range(args.nlist))
    base, extra = divmod(args.nlist, n)
    bounds, a = [], 0
    for i in range(n):
        b = a + base + (1 if i < extra else 0)
        bounds.append((a, b))
        a = b
    blobs = [pickle.dumps(data[a:b], protocol=5) for a, b in bounds] if root else None
    sizes = [0] + [len(b) for b in blobs] if root else None
    sizes = comm.bcast(sizes, root=0)
    out["bytes"] = {"list": sum(sizes)}
    if root:
        out["list_pickle"] = _median(
            [_t(lambda: [pickle.dumps(data[a:b], protocol=5) for a, b in bounds])
             for _ in range(reps)])
    ldispl = [sum(sizes[:i]) for i in range(len(sizes))]
    lsend = b"".join(blobs) if root else b""
    lrecv = bytearray(sizes[rank])
    piece = [None]

    def list_scatter():
        comm.Scatterv([lsend, (sizes, ldispl), MPI.BYTE] if root else None,
                      [lrecv, MPI.BYTE], root=0)
        if not root:
            piece[0] = pickle.loads(lrecv)
        comm.Barrier()

    out["list_scatter"] = timed(list_scatter, reps)
    gathered = bytearray(sum(sizes) if root else 0)

    def list_gather():
        mine = b"" if root else pickle.dumps(piece[0], protocol=5)
        got = comm.gather(len(mine), root=0)
        counts = got if root else None
        displs = [sum(got[:i]) for i in range(len(got))] if root else None
        comm.Gatherv([mine, MPI.BYTE],
                     [gathered, (counts, displs), MPI.BYTE] if root else None, root=0)

    out["list_gather"] = timed(list_gather, reps)
    if root:
        out["list_unpickle"] = _median(
            [_t(lambda: [pickle.loads(memoryview(gathered)[ldispl[i]:ldispl[i] + sizes[i]])
                         for i in range(1, len(sizes))]) for _ in range(reps)])

    # --- map(lambda x: x**10, range(N)) ---------------------------------------
    func = cloudpickle.dumps(lambda x: x ** 10)
    for m in (int(x) for x in args.map.split(",")):
        mb, mx = divmod(m, n)
        cuts, a = [], 0
        for i in range(n):
            b = a + mb + (1 if i < mx else 0)
            cuts.append((a, b))
            a = b

        def go(m=m, cuts=cuts):
            send = [(func, None)] + [(func, list(range(a, b))) for a, b in cuts] if root else None
            f, part = comm.scatter(send, root=0)
            res = list(map(pickle.loads(f), part)) if part is not None else None
            comm.gather(res, root=0)

        out[f"map_{m}"] = timed(go, reps)
        if root:
            chunks = [list(range(a, b)) for a, b in cuts]
            out["bytes"][f"map_{m}_in"] = len(func) + sum(len(pickle.dumps(c, 5)) for c in chunks)
            out["bytes"][f"map_{m}_out"] = sum(
                len(pickle.dumps([x ** 10 for x in c], 5)) for c in chunks)

    if root:
        out["ranks"] = size
        out["library"] = MPI.Get_library_version().splitlines()[0].strip()
        print("FLOOR_JSON " + json.dumps(out), flush=True)
    return 0


def _t(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
