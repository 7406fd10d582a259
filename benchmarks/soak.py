"""Soak test: many mixed commands from two clients at once, every reply checked.

    python benchmarks/soak.py                       20,000 commands, 4 engines (minutes)
    python benchmarks/soak.py --commands 300        a quick run (seconds)
    python benchmarks/soak.py --connection-file F   use a running cluster instead of starting one

Two clients, each in its own thread, send a random mix of ``execute`` (also
non-blocking, also on a few engines only), ``push``/``pull``, ``scatter``/
``gather`` (lists and numpy arrays), ``map`` and deliberate errors. Every reply
is compared with the value it must have. At the end it counts:

- ``wrong``: a reply with the wrong value (including one meant for the other client);
- ``lost``: a command that never answered (``CommandTimeout``) or whose execution
  is missing from an engine's execution counter;
- ``duplicated``: an engine that executed more commands than were sent to it, or
  a reply left unclaimed in a client's inbox;
- ``unexpected``: any exception that was not the deliberate one;

and the controller's resident memory (VmRSS) at the start, the peak and the end.
It prints one ``SOAK {json}`` line last and exits 1 if anything was found.
Every process it starts is ended by pid (see :mod:`benchmarks.clusters`).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy  # noqa: E402

from mpiengine import client  # noqa: E402
from mpiengine.errors import CommandTimeout, CompositeError  # noqa: E402

TIMEOUT = 120.0  # per command: on 2 shared cores a slow reply is not a lost one


def vm_rss_kb(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: Counter = Counter()
        self.problems: List[str] = []
        self.counts: Counter = Counter()  # wrong, lost, duplicated, unexpected
        self.executes: Counter = Counter()  # engine id -> executes sent to it

    def op(self, name: str) -> None:
        with self.lock:
            self.ops[name] += 1

    def problem(self, kind: str, text: str) -> None:
        with self.lock:
            self.counts[kind] += 1
            if len(self.problems) < 50:
                self.problems.append(f"{kind}: {text}")

    def sent_execute(self, targets: List[int]) -> None:
        with self.lock:
            for t in targets:
                self.executes[t] += 1


class Worker:
    """One client's share of the soak; ``tag`` keeps its names apart from the other's."""

    def __init__(self, path: str, tag: str, n: int, seed: int, tally: Tally) -> None:
        self.mec = client.MultiEngineClient(path, timeout=30.0)
        self.mec.on_output = None
        self.ids = self.mec.get_ids()
        self.tag, self.n, self.tally = tag, n, tally
        self.rng = random.Random(seed)
        self.pending: List[Any] = []  # (PendingResult, expected stdout, targets)
        self.error: Optional[BaseException] = None

    # --- the command mix ---------------------------------------------------------------
    def run(self) -> None:
        try:
            ops = [self.execute, self.execute_nb, self.push_pull, self.scatter_gather,
                   self.scatter_gather_array, self.map, self.error_cmd, self.execute_some]
            weights = [20, 10, 15, 10, 5, 8, 7, 10]
            for i in range(self.n):
                op = self.rng.choices(ops, weights)[0]
                try:
                    op(i)
                except CommandTimeout as e:
                    self.tally.problem("lost", f"{self.tag} #{i} {op.__name__}: {e}")
                except Exception as e:  # noqa: BLE001 - counted, and the soak goes on
                    self.tally.problem("unexpected", f"{self.tag} #{i} {op.__name__}: "
                                       f"{type(e).__name__}: {e}")
                if len(self.pending) > 8 or (self.pending and self.rng.random() < 0.2):
                    self.collect(1)
            self.collect(len(self.pending))
            leftover = len(self.mec._chan._replies)
            if leftover:
                self.tally.problem("duplicated", f"{self.tag}: {leftover} replies never claimed")
        except BaseException as e:  # noqa: B902 - reported by main()
            self.error = e
            traceback.print_exc()

    def _targets(self) -> List[int]:
        k = self.rng.randint(1, len(self.ids))
        return sorted(self.rng.sample(self.ids, k))

    def execute(self, i: int, targets: Optional[List[int]] = None) -> None:
        targets = targets or self.ids
        name = f"{self.tag}_e"
        self.tally.sent_execute(targets)
        res = self.mec.execute(f"{name} = {i}\nprint({name} * 3)", targets=targets,
                               timeout=TIMEOUT)
        self.tally.op("execute")
        got = [(r["id"], r["stdout"]) for r in res]
        want = [(t, f"{3 * i}\n") for t in targets]
        if got != want:
            self.tally.problem("wrong", f"{self.tag} execute #{i}: {got} != {want}")

    def execute_some(self, i: int) -> None:
        self.execute(i, self._targets())

    def execute_nb(self, i: int) -> None:
        targets = self._targets()
        self.tally.sent_execute(targets)
        pr = self.mec.execute(f"print('{self.tag}-nb-{i}')", targets=targets, block=False)
        self.pending.append((pr, f"{self.tag}-nb-{i}\n", targets))
        self.tally.op("execute_nb")

    def collect(self, k: int) -> None:
        for _ in range(k):
            pr, want, targets = self.pending.pop(0)
            try:
                res = pr.get_result(timeout=TIMEOUT)
            except CommandTimeout as e:
                self.tally.problem("lost", f"{self.tag} {pr.result_id}: {e}")
                continue
            got = [(r["id"], r["stdout"]) for r in res]
            if got != [(t, want) for t in targets]:
                self.tally.problem("wrong", f"{self.tag} {pr.result_id}: {got} != {want!r}")

    def push_pull(self, i: int) -> None:
        targets = self._targets()
        name = f"{self.tag}_p"
        value = {"i": i, "blob": bytes(self.rng.randrange(256) for _ in range(64))}
        self.mec.push({name: value}, targets=targets, timeout=TIMEOUT)
        got = self.mec.pull(name, targets=targets, timeout=TIMEOUT)
        self.tally.op("push")
        self.tally.op("pull")
        if got != [value] * len(targets):
            self.tally.problem("wrong", f"{self.tag} pull #{i}: {got!r:.200}")

    def scatter_gather(self, i: int) -> None:
        seq = list(range(i, i + self.rng.randint(0, 40)))
        name = f"{self.tag}_s"
        self.mec.scatter(name, seq, timeout=TIMEOUT)
        got = self.mec.gather(name, timeout=TIMEOUT)
        self.tally.op("scatter")
        self.tally.op("gather")
        if got != seq:
            self.tally.problem("wrong", f"{self.tag} gather #{i}: {got!r:.200} != {seq!r:.200}")

    def scatter_gather_array(self, i: int) -> None:
        arr = numpy.arange(self.rng.randint(1, 20000), dtype=numpy.float64) + i
        name = f"{self.tag}_a"
        self.mec.scatter(name, arr, timeout=TIMEOUT)
        got = self.mec.gather(name, timeout=TIMEOUT)
        self.tally.op("scatter")
        self.tally.op("gather")
        if not (isinstance(got, numpy.ndarray) and numpy.array_equal(got, arr)):
            self.tally.problem("wrong", f"{self.tag} array gather #{i}")

    def map(self, i: int) -> None:
        items = list(range(self.rng.randint(1, 30)))
        got = self.mec.map(lambda x, k=i: x * k + 1, items, timeout=TIMEOUT)
        self.tally.op("map")
        want = [x * i + 1 for x in items]
        if got != want:
            self.tally.problem("wrong", f"{self.tag} map #{i}: {got} != {want}")

    def error_cmd(self, i: int) -> None:
        targets = self._targets()
        self.tally.sent_execute(targets)
        try:
            self.mec.execute(f"raise ValueError('{self.tag}-err-{i}')", targets=targets,
                             timeout=TIMEOUT)
        except CompositeError as e:
            self.tally.op("error")
            got = sorted((r.engine_id, r.ename, r.evalue) for r in e.elist)
            want = [(t, "ValueError", f"{self.tag}-err-{i}") for t in targets]
            if got != want:
                self.tally.problem("wrong", f"{self.tag} error #{i}: {got} != {want}")
            return
        self.tally.problem("wrong", f"{self.tag} error #{i}: no CompositeError")


def execution_numbers(mec: Any) -> Dict[int, int]:
    return {r["id"]: r["number"] for r in mec.execute("pass", timeout=TIMEOUT)}


def soak(path: str, commands: int, clients: int, seed: int, log: Any = print) -> dict:
    probe = client.MultiEngineClient(path, timeout=30.0)
    probe.on_output = None
    pid = int(probe.info.pid)
    tally = Tally()
    start_numbers = execution_numbers(probe)
    rss_start = vm_rss_kb(pid)
    peak = [rss_start or 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            rss = vm_rss_kb(pid)
            if rss:
                peak[0] = max(peak[0], rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    per = [commands // clients + (1 if k < commands % clients else 0) for k in range(clients)]
    workers = [Worker(path, f"c{k}", per[k], seed + k, tally) for k in range(clients)]
    threads = [threading.Thread(target=w.run, name=w.tag) for w in workers]
    t0 = time.monotonic()
    last = t0
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(1.0)
        if time.monotonic() - last > 15:
            last = time.monotonic()
            log(f"# {sum(tally.ops.values())} replies checked, "
                f"{sum(tally.counts.values())} problems, controller RSS "
                f"{vm_rss_kb(pid)} kB, {last - t0:.0f} s")
    duration = time.monotonic() - t0
    end_numbers = execution_numbers(probe)
    stop.set()
    sampler.join(2)
    for w in workers:
        if w.error is not None:
            tally.problem("unexpected", f"{w.tag} crashed: {w.error!r}")
        w.mec.close()
    for eid, n0 in start_numbers.items():
        ran = end_numbers[eid] - n0 - 1  # minus the closing probe itself
        sent = tally.executes[eid]
        if ran < sent:
            tally.problem("lost", f"engine {eid} ran {ran} executes of {sent} sent")
        elif ran > sent:
            tally.problem("duplicated", f"engine {eid} ran {ran} executes, {sent} sent")
    probe.reset(timeout=TIMEOUT)
    probe.close()
    rss_end = vm_rss_kb(pid)
    return {
        "commands": commands, "clients": clients, "engines": len(start_numbers),
        "replies_checked": sum(tally.ops.values()), "ops": dict(tally.ops),
        "wrong": tally.counts["wrong"], "lost": tally.counts["lost"],
        "duplicated": tally.counts["duplicated"], "unexpected": tally.counts["unexpected"],
        "errors_found": sum(tally.counts.values()), "problems": tally.problems,
        "rss_start_kb": rss_start, "rss_peak_kb": peak[0], "rss_end_kb": rss_end,
        "duration_s": round(duration, 1),
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--commands", type=int, default=20000, help="commands in all (default 20000)")
    p.add_argument("--engines", type=int, default=4, help="engines of the cluster it starts")
    p.add_argument("--clients", type=int, default=2, help="client threads (default 2)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--connection-file", default=None,
                   help="soak this running cluster instead of starting one")
    args = p.parse_args(argv)
    cluster, workdir = None, None
    try:
        if args.connection_file:
            path = args.connection_file
        else:
            from benchmarks import clusters

            workdir = tempfile.mkdtemp(prefix="mpiengine-soak-")
            cluster = clusters.MpiengineCluster(args.engines, workdir, "soak")
            print(f"# starting {args.engines} engines (log {cluster.log})", flush=True)
            cluster.start()
            path = str(cluster.file)
        result = soak(path, args.commands, args.clients, args.seed,
                      log=lambda s: print(s, flush=True))
    finally:
        if cluster is not None:
            cluster.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    for line in result["problems"]:
        print(f"# {line}")
    print(f"# {result['commands']} commands ({result['replies_checked']} replies checked) "
          f"from {result['clients']} clients on {result['engines']} engines in "
          f"{result['duration_s']} s: {result['wrong']} wrong, {result['lost']} lost, "
          f"{result['duplicated']} duplicated, {result['unexpected']} unexpected; controller "
          f"RSS {result['rss_start_kb']} -> peak {result['rss_peak_kb']} -> "
          f"{result['rss_end_kb']} kB")
    print("SOAK " + json.dumps(result), flush=True)
    return 1 if result["errors_found"] else 0


if __name__ == "__main__":
    sys.exit(main())
