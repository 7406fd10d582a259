"""Failures: never hang, nothing lost, user code that misbehaves (DESIGN.md §4, §6).

- Crash tests, each on a short-lived cluster of its own: an engine dies
  (``os._exit``, SIGKILL, a segfault, ``MPI_Abort``) while the client is blocked
  in ``execute``, ``pull``, ``gather`` or ``PendingResult.r``; the controller is
  SIGKILLed; a client is SIGKILLed in the middle of a 100 MB push. The default
  suite runs one call per kind of death (the diagonal of the matrix);
  ``MPIENGINE_CRASH_MATRIX=1`` runs all sixteen pairs. Naming the dead engine races
  with MPICH's launcher killing the controller, so it is also checked under
  ``mpiexec -disable-auto-cleanup``, where only the controller ends the job.
- Engines stuck in a collective still answer ``stacks()`` and are freed by the
  matching call; a burst of commands to one engine must not leave the others behind.
- Results of non-blocking calls outlive the client that made them, and two
  clients at once each get their own replies.
- ``benchmarks/soak.py --commands 300``.
- User code that exits, deletes ``comm``, replaces ``sys.stdout``, recurses
  without end, or returns more than the client accepts: a clear error, and the
  next command works on the same engine.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

import harness
from harness import REPO_ROOT, poll_for
from mpiengine.errors import ClusterLost, CompositeError, ReplyTooLarge
from proxy import C2S, RecordingProxy, via_proxy

pytestmark = pytest.mark.mpi

LOST_WITHIN = 10.0  # DESIGN §4: "a clear error within seconds"


# -- helpers ---------------------------------------------------------------------------------

def assert_all_gone(pids: Dict[int, str], timeout: float = 15.0) -> None:
    try:
        poll_for(lambda: harness._all_gone(pids), timeout, what="every process of the job to end")
    except TimeoutError:
        left = [p for p, s in pids.items() if harness._same_process(p, s)]
        harness.signal_pids(pids, signal.SIGKILL)
        pytest.fail(f"processes {left} of the dead job still ran after {timeout:g} s "
                    f"(now killed by pid)")


def status(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpiengine", "status", "--connection-file",
                           str(path), "--timeout", "5"], capture_output=True, text=True,
                          timeout=60, env=harness.mpi_env(), cwd=str(REPO_ROOT))


def call_with_deadline(fn: Callable[[], Any], timeout: float) -> Optional[BaseException]:
    """Run ``fn`` in a thread: a hang fails the test instead of blocking it."""
    err = harness._run_with_deadline(fn, timeout)
    if isinstance(err, TimeoutError) and "took more than" in str(err):
        pytest.fail(f"the client call hung for more than {timeout:g} s")
    return err


# == 5. never hang ============================================================================

DEATHS = {
    "os._exit": "import os; os._exit(1)",
    "sigkill": "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
    "segfault": "import ctypes; ctypes.string_at(0)",
    "abort": "from mpi4py import MPI; MPI.COMM_WORLD.Abort(3)",
    "comm.Abort": "comm.Abort(3)",
}
CALLS = ["execute", "pull", "gather", "pending.r"]
#: What the client's message says of each death, when it names the engine.
REASONS = {"os._exit": "it called os._exit(1)", "sigkill": "its process ended",
           "segfault": "it crashed (", "abort": "it called MPI.COMM_WORLD.Abort(3)",
           "comm.Abort": "it called comm.Abort(3)"}
DIAGONAL = {("os._exit", "execute"), ("sigkill", "pull"), ("segfault", "gather"),
            ("abort", "pending.r"), ("comm.Abort", "execute")}
MATRIX = os.environ.get("MPIENGINE_CRASH_MATRIX", "") not in ("", "0")
VICTIM = 1
DELAY = 1.0  # the engine dies this long after the call starts: the client is blocked by then


def _blocking_call(mec: Any, death: str, call: str) -> Callable[[], Any]:
    die = f"import time\ntime.sleep({DELAY})\n{DEATHS[death]}"
    if call == "execute":
        code = f"import time\ntime.sleep({DELAY})\nif comm.rank == {VICTIM}:\n    {DEATHS[death]}"
        return lambda: mec.execute(code, timeout=60)
    pending = mec.execute(die, targets=[VICTIM], block=False)
    if call == "pull":  # queued behind the dying command on the victim
        return lambda: mec.pull("x", timeout=60)
    if call == "gather":
        return lambda: mec.gather("y", timeout=60)
    return lambda: pending.r


def _die_while_blocked(c: harness.Cluster, death: str, call: str) -> Tuple[Any, float, Any]:
    """Kill engine VICTIM while a client is blocked in ``call``; return (error, s, client)."""
    mec = c.client()
    mec.on_output = None
    mec.push(dict(x=1))
    mec.scatter("y", [1, 2, 3, 4])
    blocked = _blocking_call(mec, death, call)
    t0 = time.monotonic()
    err = call_with_deadline(blocked, DELAY + LOST_WITHIN + 20)
    return err, time.monotonic() - t0, mec


def _after(mec: Any) -> str:
    """What the cluster says after a death that did not happen as expected."""
    try:
        return repr(mec.queue_status()) + " " + repr(mec.execute("pass", timeout=10))
    except BaseException as e:  # noqa: B902 - a diagnostic: whatever it is, show it
        return repr(e)


def _lost_note(path: Path) -> Optional[str]:
    try:
        return str(json.loads(path.read_text())["message"])
    except (OSError, ValueError, KeyError):
        return None


NAMED = re.compile(rf"engine {VICTIM} \(pid (\d+) on [^)]+\) died")


def _check_named(c: harness.Cluster, mec: Any, message: str) -> None:
    named = NAMED.search(message)
    assert named, message
    pid = next(e["pid"] for e in mec.engines if e["id"] == VICTIM)
    assert int(named.group(1)) == pid
    assert Path(str(c.connection_file) + ".lost").exists(), "no .lost note"


def _check_aftermath(c: harness.Cluster, mec: Any, pids: Dict[int, str]) -> None:
    """Later calls fail at once; no process is left; status says it is gone, and why."""
    t1 = time.monotonic()
    with pytest.raises(ClusterLost):
        mec.execute("pass", timeout=30)
    assert time.monotonic() - t1 < 2.0
    mec.close()
    assert_all_gone(pids)
    r = status(c.connection_file)
    assert r.returncode != 0
    assert "no running cluster" in r.stdout, r.stdout + r.stderr
    noted = _lost_note(Path(str(c.connection_file) + ".lost"))
    if noted:  # (a SIGKILL can land while the controller writes it: then it is empty)
        assert noted in r.stdout, r.stdout


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("death", list(DEATHS))
@pytest.mark.timeout(90)
def test_engine_death_raises_cluster_lost(fresh_cluster, death, call):
    """ClusterLost within 10 s; no process left; status tells that (and why) it ended.

    An engine that calls os._exit, comm.Abort or MPI.COMM_WORLD.Abort, or crashes
    on a signal, says so on its doorbell before it dies, so the controller names it
    (and why) every time. (The Aborts never return: MPICH's MPI_Abort does, and the
    command would report success before the launcher ends the job.) A SIGKILL
    gives no warning: the engine is named when the controller's LOST event gets
    out before MPICH's Hydra, which SIGKILLs every rank as soon as one dies, reaches
    the controller, a race it loses now and then on a busy machine; such a run is
    reported as XFAIL. test_dead_engine_is_named_when_the_launcher_waits checks
    that naming without the race.
    """
    if (death, call) not in DIAGONAL and not MATRIX:
        pytest.skip("off the diagonal: MPIENGINE_CRASH_MATRIX=1 runs every pair")
    c = fresh_cluster(2)
    pids = c.job_pids()
    err, elapsed, mec = _die_while_blocked(c, death, call)
    assert isinstance(err, ClusterLost), (
        f"expected ClusterLost, got {err!r} after {elapsed:.2f} s; "
        f"then the cluster says: {_after(mec)}")
    assert elapsed < DELAY + LOST_WITHIN, f"ClusterLost only after {elapsed:.1f} s"
    message = str(err)
    print(f"[{death} during {call}] after {elapsed:.2f} s: {message}")  # shown with -s
    named = bool(NAMED.search(message))
    if named:
        _check_named(c, mec, message)
        assert REASONS[death] in message, message
    else:
        assert death == "sigkill", f"{death} must name the engine: {message}"
        assert "lost the connection to the controller" in message, message
    _check_aftermath(c, mec, pids)
    if death == "sigkill" and not named:
        pytest.xfail("a race: Hydra SIGKILLed the controller before its LOST event and "
                     f"note were out (no warning from a SIGKILLed engine): {message}")


class _PatientCluster(harness.Cluster):
    """A job whose launcher does not kill the other ranks when one dies (MPICH Hydra)."""

    def command(self, n_engines: int, extra_args: Any = ()) -> List[str]:
        cmd = super().command(n_engines, extra_args)
        return cmd[:1] + ["-disable-auto-cleanup"] + cmd[1:]


def _hydra() -> bool:
    mpiexec = harness.find_mpiexec()
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError, TypeError):
        return False
    return "HYDRA" in out


@pytest.mark.parametrize("death, call", [("os._exit", "execute"), ("sigkill", "pull")])
@pytest.mark.timeout(90)
def test_dead_engine_is_named_when_the_launcher_waits(tmp_path, death, call):
    """The doorbell path without the race: with Hydra's -disable-auto-cleanup only the
    controller ends the job, after it has told the client which engine died."""
    reason = harness.mpi_skip_reason()
    if reason or not _hydra():
        pytest.skip(reason or "needs MPICH's Hydra mpiexec (-disable-auto-cleanup)")
    with _PatientCluster(workdir=str(tmp_path), name="patient") as c:
        c.start(2)
        pids = c.job_pids()
        err, elapsed, mec = _die_while_blocked(c, death, call)
        assert isinstance(err, ClusterLost), f"expected ClusterLost, got {err!r}"
        assert elapsed < DELAY + LOST_WITHIN, f"ClusterLost only after {elapsed:.1f} s"
        _check_named(c, mec, str(err))
        _check_aftermath(c, mec, pids)


@pytest.mark.timeout(90)
def test_controller_killed_raises_cluster_lost(fresh_cluster):
    c = fresh_cluster(2)
    pids = c.job_pids()
    mec = c.client()
    mec.on_output = None
    t0 = time.monotonic()
    killer = threading.Timer(DELAY, os.kill, (c.controller_pid, signal.SIGKILL))
    killer.start()
    try:
        err = call_with_deadline(lambda: mec.execute("import time; time.sleep(30)", timeout=60),
                                 DELAY + LOST_WITHIN + 20)
    finally:
        killer.cancel()
    elapsed = time.monotonic() - t0
    assert isinstance(err, ClusterLost), repr(err)
    assert elapsed < DELAY + LOST_WITHIN, f"ClusterLost only after {elapsed:.1f} s"
    assert "controller" in str(err)
    assert_all_gone(pids)
    assert status(c.connection_file).returncode != 0
    mec.close()


_PUSHER = r"""
import sys, numpy
from mpiengine import client
mec = client.MultiEngineClient(sys.argv[1])
print("connected", flush=True)
mec.push(dict(big=numpy.ones(100 * 2**20 // 8)))
print("pushed", flush=True)
"""


@pytest.mark.timeout(120)
def test_client_killed_during_a_100MB_push(fresh_cluster, tmp_path):
    """The controller drops the half-received frame; the next clients are served."""
    c = fresh_cluster(2)
    ip, port = json.loads(c.connection_file.read_text())["ip"], c.info["port"]
    # A throttled proxy makes "the middle of the push" last long enough to hit.
    with RecordingProxy(ip, port, c2s_rate=20e6) as px:
        path = via_proxy(c.connection_file, tmp_path / "slow.json", px)
        proc = subprocess.Popen([sys.executable, "-c", _PUSHER, str(path)],
                                stdout=subprocess.PIPE, text=True, env=harness.mpi_env(),
                                cwd=str(REPO_ROOT))
        try:
            assert proc.stdout.readline().strip() == "connected"
            poll_for(lambda: px.forwarded(0, C2S) > 20e6, 30, what="20 MB of the push")
            proc.kill()
            proc.wait(10)
            assert px.forwarded(0, C2S) < 90e6, "the push was not cut in the middle"
            assert px.upstream_closed(0, 15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    with c.client() as mec:
        mec.push(dict(small=[1, 2, 3]))
        assert mec.pull("small") == [[1, 2, 3]] * 2
        assert "big" not in mec.keys()[0]
    with c.client() as mec:
        import numpy
        mec.push(dict(big=numpy.ones(100 * 2**20 // 8)), timeout=60)
        res = mec.execute("print(big.nbytes, big.sum())", timeout=60)
        assert [r["stdout"] for r in res] == [f"{100 * 2**20} {100 * 2**20 // 8}.0\n"] * 2
        mec.execute("del big")


# == 6. nothing lost ===========================================================================

@pytest.mark.parametrize("when", ["while-running", "after-it-finished"])
def test_result_waits_for_a_new_client_after_close(cluster, mec, when):
    a = cluster.client()
    a.on_output = None
    pr = a.execute("import time\ntime.sleep(1)\nx = 42\nprint(x)", block=False)
    rid = pr.result_id
    a.close()
    if when == "after-it-finished":  # the result is stored, not handed to a waiter
        poll_for(lambda: all(q["pending"] is None for _, q in mec.queue_status()), 30,
                 what="the engines to finish")
    res = mec.get_pending(rid).get_result(timeout=30)
    assert [r["stdout"] for r in res] == ["42\n"] * 4
    assert [r["id"] for r in res] == [0, 1, 2, 3]
    assert mec.pull("x") == [42] * 4
    with pytest.raises(KeyError, match="already fetched"):
        mec.get_pending(rid).get_result(timeout=10)


_SUBMITTER = r"""
import sys, time
from mpiengine import client
mec = client.MultiEngineClient(sys.argv[1])
pr = mec.execute("import time\ntime.sleep(1.5)\nx = 43\nprint('done', x)", block=False)
m = mec.push(dict(pushed_by_dead=7), block=False)
print(pr.result_id, m.result_id, flush=True)
time.sleep(600)
"""


def test_result_waits_for_a_new_client_after_the_first_is_killed(cluster, mec):
    proc = subprocess.Popen([sys.executable, "-c", _SUBMITTER, str(cluster.connection_file)],
                            stdout=subprocess.PIPE, text=True, env=harness.mpi_env(),
                            cwd=str(REPO_ROOT))
    try:
        line = proc.stdout.readline().split()
    finally:
        proc.kill()
        proc.wait(10)
    assert len(line) == 2, f"the submitting client printed {line!r}"
    rid, push_rid = line
    res = mec.get_pending(rid).get_result(timeout=30)
    assert [r["stdout"] for r in res] == ["done 43\n"] * 4
    assert mec.get_pending(push_rid).get_result(timeout=30) == [None] * 4
    assert mec.pull("pushed_by_dead") == [7] * 4
    for r in (rid, push_rid):
        with pytest.raises(KeyError):
            mec.get_pending(r).get_result(timeout=10)


def test_unknown_result_id_is_a_key_error(mec):
    with pytest.raises(KeyError, match="no result with id .*no-such-id.*already fetched"):
        mec.get_pending("no-such-id").r


def test_unknown_result_id_message_is_quoted_once(mec):
    with pytest.raises(KeyError) as info:
        mec.get_pending("no-such-id").r
    assert info.value.args[0].startswith("no result with id 'no-such-id'"), info.value.args


def _own_replies(cl: Any, tag: str, rounds: int, problems: List[str]) -> None:
    try:
        pending = []
        for i in range(rounds):
            res = cl.execute(f"{tag}_v = {i}\nprint('{tag}', {tag}_v)", timeout=60)
            if [r["stdout"] for r in res] != [f"{tag} {i}\n"] * 4:
                problems.append(f"{tag} execute {i}: {[r['stdout'] for r in res]}")
            pending.append((i, cl.execute(f"print('{tag}-nb', {i})", block=False)))
            cl.push({f"{tag}_p": (tag, i)})
            got = cl.pull(f"{tag}_p")
            if got != [(tag, i)] * 4:
                problems.append(f"{tag} pull {i}: {got}")
            if i % 3 == 0:
                for j, pr in pending:
                    out = [r["stdout"] for r in pr.get_result(timeout=60)]
                    if out != [f"{tag}-nb {j}\n"] * 4:
                        problems.append(f"{tag} nb {j}: {out}")
                pending = []
        for j, pr in pending:
            out = [r["stdout"] for r in pr.get_result(timeout=60)]
            if out != [f"{tag}-nb {j}\n"] * 4:
                problems.append(f"{tag} nb {j}: {out}")
    except BaseException as e:  # noqa: B902 - reported by the test
        problems.append(f"{tag}: {e!r}")


@pytest.mark.timeout(120)
def test_a_pulled_array_is_not_changed_by_the_next_command(cluster, mec):
    """A reply points into the engine's array (no copy); the next command, which
    overwrites that array, must not start before the reply has left the engine."""
    mec.execute("import numpy\na = numpy.ones(4_000_000)", targets=[0, 1])
    try:
        for _ in range(3):
            mec.execute("a[:] = 1", targets=[0, 1])
            pulled = mec.pull("a", targets=[0, 1], block=False)
            zeroed = mec.execute("a[:] = 0", targets=[0, 1], block=False)
            assert [float(x.sum()) for x in pulled.get_result(timeout=60)] == [4e6, 4e6]
            zeroed.get_result(timeout=60)
    finally:
        mec.execute("del a", targets=[0, 1])


@pytest.mark.timeout(90)
def test_two_clients_at_once_get_their_own_replies(cluster, mec):
    a, b = cluster.client(), cluster.client()
    problems: List[str] = []
    try:
        threads = [threading.Thread(target=_own_replies, args=(cl, tag, 15, problems))
                   for cl, tag in ((a, "alice"), (b, "bob"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(80)
        assert not any(t.is_alive() for t in threads), "a client thread hung"
    finally:
        a.close()
        b.close()
    assert problems == []


@pytest.mark.timeout(90)
def test_threads_sharing_one_client_get_their_own_replies(mec):
    """One thread at a time reads the socket for everyone (channel.Channel.wait); the
    others must be handed their replies, whoever reads them."""
    problems: List[str] = []

    def work(tag: str) -> None:
        try:
            for j in range(25):
                out = [r["stdout"] for r in mec.execute(f"print('{tag}', {j})")]
                if out != [f"{tag} {j}\n"] * 4:
                    problems.append(f"{tag} {j}: {out}")
                if j % 5 == 0:  # and some non-blocking ones, fetched later
                    pr = mec.execute(f"print('{tag}-nb', {j})", block=False)
                    got = [r["stdout"] for r in pr.get_result(timeout=60)]
                    if got != [f"{tag}-nb {j}\n"] * 4:
                        problems.append(f"{tag} nb {j}: {got}")
        except BaseException as e:  # noqa: B902 - reported by the test
            problems.append(f"{tag}: {e!r}")

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(80)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    assert problems == []


# == 7. the soak, quick ========================================================================

@pytest.mark.timeout(120)
def test_soak_quick(cluster, mec):
    r = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "soak.py"),
                        "--commands", "300", "--connection-file", str(cluster.connection_file)],
                       capture_output=True, text=True, timeout=110, env=harness.mpi_env(),
                       cwd=str(REPO_ROOT))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("SOAK ")]
    assert lines, f"no SOAK line; rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    result = json.loads(lines[-1][5:])
    assert result["errors_found"] == 0, result["problems"]
    assert result["lost"] == result["duplicated"] == result["wrong"] == 0
    assert result["replies_checked"] >= 300
    assert result["rss_start_kb"] and result["rss_end_kb"]
    assert r.returncode == 0


# == 8. user code that misbehaves ==============================================================

def assert_engine_works(mec: Any, targets: Any = "all") -> None:
    res = mec.execute("after_ok = 5\nprint(after_ok * 2)", targets=targets, timeout=30)
    assert all(r["stdout"] == "10\n" for r in res), [r["stdout"] for r in res]
    assert mec.pull("after_ok", targets=targets, timeout=30) == [5] * len(res)


@pytest.mark.parametrize("code, ename, evalue", [
    ("import sys; sys.exit()", "SystemExit", "keeps running"),
    ("import sys; sys.exit(3)", "SystemExit", "SystemExit(3)"),
    ("exit()", "SystemExit", "keeps running"),
    ("quit(2)", "SystemExit", "SystemExit(2)"),
    ("raise SystemExit", "SystemExit", "keeps running"),
    ("raise SystemExit('bye')", "SystemExit", "bye"),
    ("def f(n):\n    return f(n + 1)\nf(0)", "RecursionError", "recursion"),
    ("import sys\nsys.stderr = None\nraise ValueError('no stderr')", "ValueError", "no stderr"),
], ids=["sys.exit", "sys.exit(3)", "exit", "quit(2)", "SystemExit", "SystemExit-msg",
        "recursion", "stderr-None"])
def test_misbehaving_user_code_is_an_error_and_the_engine_goes_on(mec, code, ename, evalue):
    with pytest.raises(CompositeError) as info:
        mec.execute(code, targets=[1, 2], timeout=60)
    e = info.value
    assert sorted(r.engine_id for r in e.elist) == [1, 2]
    for rec in e.elist:
        assert rec.ename == ename and evalue in rec.evalue, rec.line()
    assert f"[1:execute]: {ename}" in str(e)
    assert_engine_works(mec, [1, 2])
    assert_engine_works(mec)


@pytest.mark.parametrize("code", [
    "import sys\nsys.stdout = None\nprint('lost')",
    "import sys, io\nsys.stdout = io.StringIO()\nprint('elsewhere')",
    "import sys, os\nsys.stdout = open(os.devnull, 'w')",
    "import sys\nsys.stdout.close()",
    "import sys\nsys.stdout = sys.stderr = 42",
], ids=["None", "StringIO", "devnull", "close", "not-a-file"])
def test_replacing_sys_stdout_does_not_lose_later_output(mec, code):
    try:
        mec.execute(code, timeout=30)
    except CompositeError:
        pass  # printing to something that is not a file may fail: that is fine
    res = mec.execute("print('visible'); import sys; print('err', file=sys.stderr)", timeout=30)
    assert [r["stdout"] for r in res] == ["visible\n"] * 4
    assert [r["stderr"] for r in res] == ["err\n"] * 4
    assert_engine_works(mec)


def test_del_comm_is_clear_and_reset_restores_it(mec):
    mec.execute("del comm", timeout=30)
    with pytest.raises(CompositeError) as info:
        mec.execute("comm.allreduce(1)", timeout=30)
    assert all(r.ename == "NameError" and "comm" in r.evalue for r in info.value.elist)
    assert_engine_works(mec)  # the runtime never relied on the user's 'comm'
    mec.push(dict(comm="not a communicator"))
    assert_engine_works(mec)
    mec.reset()
    res = mec.execute("print(comm.allreduce(comm.rank))", timeout=30)
    assert [r["stdout"] for r in res] == ["6\n"] * 4


@pytest.mark.timeout(60)
def test_result_larger_than_the_client_accepts(cluster, mec):
    """A result over a client's max_reply is a clear error; the result is kept for a
    client that takes it; that client, the engine and every other client go on."""
    mec.execute("blob = b'x' * 3_000_000", targets=0)
    with pytest.raises(ValueError, match="max_reply must be a number of bytes"):
        cluster.client(max_reply=-1)
    small = cluster.client(max_reply=1_000_000)
    try:
        with pytest.raises(ReplyTooLarge) as info:
            small.pull("blob", targets=0, timeout=30)
        message = str(info.value)
        assert "takes at most 1,000,000" in message and "get_pending(" in message, message
        rid = info.value.result_id
        assert rid and repr(rid) in message
        assert small.execute("print(7)", targets=1, timeout=30)[0]["stdout"] == "7\n"
        with pytest.raises(ReplyTooLarge):  # asking again: still too large, still kept
            small.get_pending(rid).get_result(timeout=30)
    finally:
        small.close()
    assert mec.get_pending(rid).get_result(timeout=30) == [b"x" * 3_000_000]
    assert mec.execute("print(len(blob))", targets=0)[0]["stdout"] == "3000000\n"
    assert_engine_works(mec, 0)


# -- a rank stuck in a collective ----------------------------------------------------------------

@pytest.mark.timeout(60)
def test_stacks_and_recovery_with_engines_stuck_in_allreduce(fresh_cluster):
    """Engines waiting in an object allreduce still answer stacks(), and the matching
    call on the missing engines frees them.

    Once a bug: mpi4py's object reductions hold the GIL while they wait, which froze
    the engine's listener thread: stacks() timed out and the cluster stopped taking
    commands (fixed in d437e2d: the engines' comm reduces with gathers).
    """
    c = fresh_cluster(4)
    mec = c.client()
    mec.on_output = None
    try:
        pr = mec.execute("total = comm.allreduce(1)", targets=[0, 1], block=False)
        poll_for(lambda: dict(mec.queue_status())[1]["pending"], 10, what="engines 0-1 busy")
        time.sleep(0.5)
        stacks = mec.stacks(timeout=5)
        assert "comm.allreduce(1)" in stacks[0] and "idle" in stacks[3]
        mec.execute("total = comm.allreduce(1)", targets=[2, 3], timeout=10)
        pr.get_result(timeout=10)
        assert mec.pull("total", timeout=10) == [4, 4, 4, 4]  # one allreduce over all 4
    finally:
        mec.close()
        c.stop(shutdown=False)  # a wedged cluster would take 10 s to shut down


# -- a burst of commands to one engine --------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_burst_to_one_engine_does_not_leave_the_others_behind(fresh_cluster):
    c = fresh_cluster(2)
    mec = c.client()
    mec.on_output = None
    try:
        for _ in range(40):
            mec.execute("pass", targets=0, timeout=30)
            time.sleep(0.005)
        t0 = time.monotonic()
        mec.execute("pass", timeout=5)
        assert time.monotonic() - t0 < 2.0
    finally:
        mec.close()
        c.stop(shutdown=False)  # engines that lag would make a shutdown wait
