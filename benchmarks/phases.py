"""Where the time of an operation goes: client phases and rank profiles.

    python benchmarks/phases.py [--ops exec,push,pull,scatter,gather,...] [--seconds 6]

Starts a 4-engine cluster and, for each operation, repeats it for a few
seconds while

- the client's own steps are timed by wrapping the package's functions in this
  process (pickling, frame encoding with its MAC, socket send, waiting for the
  reply, the frame parsing with its MAC check inside that wait, unpickling);
- ``py-spy record`` (if installed: ``pip install py-spy``) samples the
  controller and engine 0; their busiest lines (self time, CPU only) are shown
  in milliseconds per operation.

First it times the building blocks those operations are made of (MAC, fresh
buffers, concatenation, pickling) in its own process; ``--cpu`` adds the ranks'
CPU per ``execute('pass')`` (read from their CPU clocks), by the pace of commands
and at 4, 16 and 32 engines.

This is the tool behind the "where time goes" section of docs/performance.md.
It only observes: nothing in the package is changed.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks import clusters, procs  # noqa: E402

BIG = 10**8


class Clock:
    """Cumulative seconds and calls per wrapped function, per thread kind."""

    def __init__(self) -> None:
        self.total: Dict[str, float] = collections.defaultdict(float)
        self.calls: Dict[str, int] = collections.defaultdict(int)
        self.lock = threading.Lock()

    def wrap(self, owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name, None)
        if fn is None:
            return
        clock = self

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                with clock.lock:
                    clock.total[label] += dt
                    clock.calls[label] += 1

        setattr(owner, name, timed)

    def reset(self) -> None:
        with self.lock:
            self.total.clear()
            self.calls.clear()


def instrument() -> Clock:
    """Wrap the client-side steps of the package (in this process only)."""
    import importlib

    from mpiengine import channel, client, partition, payload, protocol

    try:  # helpers the client imports by name: wrap them where the client looks them up
        codec: Any = client if hasattr(client, "_decode") else importlib.import_module(
            "mpiengine.codec")
    except ImportError:
        codec = client
    clock = Clock()
    clock.wrap(payload, "dumps", "pickle (payload.dumps)")
    clock.wrap(codec, "_scatter_payload", "split + pickle pieces (_scatter_payload)")
    clock.wrap(protocol.Outgoing, "take", "frame slices + MAC (Outgoing.take)")
    clock.wrap(channel.Channel, "_sendv", "socket send (Channel._sendv)")
    clock.wrap(channel.Channel, "wait", "wait for the reply (Channel.wait)")
    clock.wrap(protocol.FrameParser, "advance",
               "[in the wait] parse + MAC check (FrameParser.advance)")
    clock.wrap(codec, "_decode", "decode reply (client._decode)")
    clock.wrap(payload, "unpack", "unpickle (payload.unpack)")
    clock.wrap(partition, "join", "join pieces (partition.join)")
    return clock


def spy(pid: int, seconds: float, out: Path) -> Optional[str]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return None
    subprocess.run([exe, "record", "-p", str(pid), "-d", f"{seconds:g}", "-r", "250",
                    "--nonblocking", "--format", "raw", "-o", str(out)],
                   capture_output=True, timeout=seconds + 60)
    return str(out)


_WAITS = ("sleep(", "select(", ".wait(", ".get(", ".poll(", "poll(")


def _is_wait(frame: str) -> bool:
    """True for a frame parked in a sleep, poll, select or condition wait.

    py-spy's own idle detection misses some of these on this kernel, so the
    source line of the frame is looked at ("name (path:line)").
    """
    import linecache
    import sysconfig

    try:
        where = frame[frame.rindex("(") + 1:-1]
        path, line = where.rsplit(":", 1)
    except ValueError:
        return False
    for base in ("", str(clusters.REPO_ROOT), sysconfig.get_paths()["stdlib"],
                 sysconfig.get_paths()["purelib"]):
        text = linecache.getline(str(Path(base) / path), int(line))
        if text:
            return any(w in text for w in _WAITS)
    return False


def top_lines(path: str, per_op: float, n: int = 8) -> List[str]:
    """The busiest leaf frames (self time) of a py-spy raw file, in ms per operation.

    Frames parked in a wait are summed on one line instead of ranked.
    """
    counts: Dict[str, int] = collections.Counter()
    try:
        text = Path(path).read_text()
    except OSError:
        return ["(no profile)"]
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            counts[stack.split(";")[-1]] += int(count)
    ms = 1000.0 / 250 / per_op  # one sample = 4 ms
    waits = sum(c for f, c in counts.items() if _is_wait(f))
    busy = [(f, c) for f, c in counts.most_common() if not _is_wait(f)][:n]
    out = [f"{c * ms:8.1f} ms  {frame}" for frame, c in busy]
    out.append(f"{waits * ms:8.1f} ms  (in sleep/poll/select/wait: not CPU)")
    return out


def micro(reps: int = 7) -> List[str]:
    """Costs of the building blocks, per 100 MB (medians), measured in this process."""
    import os
    import pickle

    import numpy as np
    from mpiengine import protocol

    src = np.ones(BIG, dtype=np.uint8)
    pool = bytearray(BIG)

    def med(fn: Callable[[], Any]) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[reps // 2] * 1e3

    def mac() -> None:
        m = protocol._frame_mac(os.urandom(32), 0)  # as a large frame's parts go by
        for i in range(0, BIG, protocol.STREAM_SLICE):
            m.update(memoryview(src)[i:i + protocol.STREAM_SLICE])
        m.finalize()

    def fill(buf: Any) -> None:
        memoryview(buf).cast("B")[:] = memoryview(src)

    quarters = [np.ones(BIG // 32) for _ in range(4)]  # 4 x 25 MB of float64
    ints = list(range(10**6))
    pieces = [ints[i * 250_000:(i + 1) * 250_000] for i in range(4)]
    blobs = [pickle.dumps(p, protocol=5) for p in pieces]
    rows = [
        ("GMAC of 100 MB (every frame part is MACed, both ends; not over TLS)", med(mac)),
        ("bytearray(100 MB) + fill (a fresh, zeroed receive buffer)",
         med(lambda: fill(bytearray(BIG)))),
        ("numpy.empty(100 MB) + fill (no zeroing, transparent huge pages)",
         med(lambda: fill(np.empty(BIG, dtype=np.uint8)))),
        ("fill of a reused 100 MB buffer (memory the ranks keep, see heap.py)", med(lambda: fill(pool))),
        ("numpy.concatenate of 4 x 25 MB (gather's join)", med(lambda: np.concatenate(quarters))),
        ("pickle 1M ints in 4 pieces", med(lambda: [pickle.dumps(p, protocol=5) for p in pieces])),
        ("unpickle them", med(lambda: [pickle.loads(b) for b in blobs])),
        ("slice 1M ints into 4 lists", med(lambda: [ints[i * 250_000:(i + 1) * 250_000]
                                                      for i in range(4)])),
        ("slice + list() copy (partition.split)", med(
            lambda: [list(ints[i * 250_000:(i + 1) * 250_000]) for i in range(4)])),
    ]
    return [f"{ms:8.1f} ms  {what}" for what, ms in rows]


def cpu_per_command(workdir: str) -> None:
    """Print the ranks' CPU per ``execute('pass')``: split, by pace, and by engine count."""
    def run(mec: Any, ranks: List[int], n: int, targets: Any = "all",
            pause: float = 0.0) -> Tuple[float, List[float], float]:
        for _ in range(3):
            mec.execute("pass", targets=targets)
        per = [procs.cpu_seconds([p]) for p in ranks]
        mine = time.process_time()
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            mec.execute("pass", targets=targets)
            lat.append(time.perf_counter() - t)
            if pause:
                time.sleep(pause)
        cpu = [(procs.cpu_seconds([p]) - c) / n * 1e3 for p, c in zip(ranks, per)]
        return sorted(lat)[n // 2] * 1e3, cpu, (time.process_time() - mine) / n * 1e3

    for engines in (4, 16, 32):
        cluster = clusters.MpiengineCluster(engines, workdir, f"cpu{engines}")
        try:
            cluster.start()
            mec, ranks = cluster.mec, cluster.rank_pids()
            if engines == 4:
                print("\n== CPU per execute('pass'), 4 engines, back to back (ms per call)")
                for targets in ("all", 0):
                    lat, cpu, client = run(mec, ranks, 300, targets)
                    print(f"  targets={targets!r:5}: latency {lat:.2f}; client {client:.2f}; "
                          f"controller {cpu[0]:.2f}; engines "
                          + " ".join(f"{c:.2f}" for c in cpu[1:]) + f"; ranks {sum(cpu):.2f}")
                print("== ... with a pause after each command (ranks' CPU includes the polling)")
                for pause in (0.0, 0.01, 0.03, 0.1, 0.3, 1.0):
                    lat, cpu, _ = run(mec, ranks, 40 if pause < 0.3 else 10, pause=pause)
                    print(f"  pause {pause * 1e3:5.0f} ms: ranks' CPU per command "
                          f"{sum(cpu):6.2f} ms; latency {lat:.2f} ms")
                print("== ... by engine count, back to back")
            lat, cpu, _ = run(mec, ranks, 60)
            print(f"  {engines:2} engines: latency {lat:6.2f} ms; ranks' CPU per command "
                  f"{sum(cpu):6.2f} ms ({sum(cpu) / lat / 2 * 100:3.0f}% of 2 cores)")
        finally:
            cluster.stop()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default="exec,push,pull,scatter,gather,scatter_list,"
                                      "gather_list,map")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--micro-only", action="store_true",
                    help="only the building blocks, no cluster")
    ap.add_argument("--cpu", action="store_true",
                    help="also the ranks' CPU per command: by pace and at 4/16/32 engines")
    args = ap.parse_args(argv)
    import numpy as np

    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        return _main(args, np)
    finally:
        clusters.stop_all()
        procs.end(procs.descendants(os.getpid()))  # py-spy or a half-started job: by pid


def _main(args: argparse.Namespace, np: Any) -> int:
    print("== building blocks (this process, medians):")
    for line in micro():
        print("  " + line)
    if args.micro_only:
        return 0
    workdir = tempfile.mkdtemp(prefix="mpiengine-phases-")
    if args.cpu:
        try:
            cpu_per_command(workdir)
        finally:
            clusters.stop_all()
    clock = instrument()
    cluster = clusters.MpiengineCluster(4, workdir, "phases")
    try:
        cluster.start()
        mec = cluster.mec
        ctrl, eng = int(mec.info.pid), int(mec.engines[0]["pid"])
        arr = np.random.default_rng(0).random(BIG // 8)
        ints = list(range(10**6))
        mec.push({"big": arr})
        mec.scatter("part", arr)
        mec.scatter("ints", ints)
        f = lambda x: x ** 10  # noqa: E731
        calls: Dict[str, Callable[[], Any]] = {
            "exec": lambda: mec.execute("pass"),
            "push": lambda: mec.push({"big": arr}),
            "pull": lambda: mec.pull("big"),
            "scatter": lambda: mec.scatter("part", arr),
            "gather": lambda: mec.gather("part"),
            "scatter_list": lambda: mec.scatter("ints", ints),
            "gather_list": lambda: mec.gather("ints"),
            "map": lambda: mec.map(f, range(100_000)),
        }
        for name in args.ops.split(","):
            call = calls[name]
            call()
            clock.reset()
            files: Dict[str, Optional[str]] = {}
            spies = [threading.Thread(target=lambda p=p, k=k: files.__setitem__(
                k, spy(p, args.seconds, Path(workdir) / f"{name}-{k}.txt")))
                for k, p in (("controller", ctrl), ("engine 0", eng))]
            for t in spies:
                t.start()
            time.sleep(0.3)  # py-spy attaches
            times = []
            t_end = time.monotonic() + args.seconds - 0.6
            while time.monotonic() < t_end or len(times) < 3:
                t = time.perf_counter()
                call()
                times.append(time.perf_counter() - t)
            for t in spies:
                t.join()
            count = len(times)
            med = sorted(times)[count // 2]
            print(f"\n== {name}: {count} calls, median {med * 1e3:.1f} ms")
            print("client (ms per call; '[in the wait]' is part of the wait):")
            for label, total in sorted(clock.total.items(), key=lambda kv: -kv[1]):
                print(f"  {total / count * 1e3:8.2f}  {label}")
            for who, path in files.items():
                if path is None:
                    print(f"{who}: py-spy is not installed (pip install py-spy)")
                    continue
                print(f"{who} (py-spy, CPU self time, ms per call):")
                for line in top_lines(path, count):
                    print("  " + line)
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
