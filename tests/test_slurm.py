"""mpiengine under a real SLURM: interactive jobs, batch jobs, ``mpiengine sbatch``.

A module fixture installs Debian's slurm-wlm (apt) if needed and starts a private
single-node cluster (munged + slurmctld + slurmd on 127.0.0.1, free ports, every file
in one temporary directory) with tests/hpc/slurm_start.sh; slurm_stop.sh ends it,
by pid, whatever happens. This test process plays the login node: it submits with
``sbatch``, waits for the connection file on the shared filesystem and connects.

The tests need root and apt-get (or the packages already installed). Elsewhere they
skip, saying why; with ``MPIENGINE_REQUIRE_SLURM=1`` (CI) they fail instead.

Every job's processes are found by ``SLURM_JOB_ID=<id>`` in their environment, so
"nothing left" means: no process of the job exists any more, on top of ``squeue``
no longer listing it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import harness
from harness import REPO_ROOT, poll_for

HPC = REPO_ROOT / "tests" / "hpc"
EXAMPLES = REPO_ROOT / "examples"
REQUIRE = os.environ.get("MPIENGINE_REQUIRE_SLURM", "") not in ("", "0")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")

pytestmark = [pytest.mark.mpi, pytest.mark.root]


def _skip_or_fail(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"MPIENGINE_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _installed(pkg: str) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True,
                         text=True) if shutil.which("dpkg-query") else None
    return bool(out and "install ok installed" in out.stdout)


def _unavailable() -> Optional[str]:
    if not sys.platform.startswith("linux"):
        return "SLURM tests run on Linux only"
    if os.geteuid() != 0:
        return "not root: the SLURM tests install slurm-wlm and run slurmctld/slurmd as root"
    if not all(_installed(p) for p in PACKAGES) and not shutil.which("apt-get"):
        return "no apt-get to install Debian's slurm-wlm (slurmctld slurmd slurm-client munge)"
    return harness.mpi_skip_reason()


class Slurm:
    """A running single-node SLURM cluster and the login-node helpers for the tests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "etc" / "slurm.conf"
        self.shared = root / "shared"  # plays the filesystem both login and node see
        self.shared.mkdir(mode=0o755, exist_ok=True)
        self.jobs: List[str] = []  # every job submitted, for the clean-up at the end
        self.env = harness.mpi_env({
            "SLURM_CONF": str(self.conf),
            "MPIENGINE_DIR": str(root / "home"),
            "PYTHON": sys.executable,
        })
        # the job's processes must not think they run under pytest or mpiexec
        for k in list(self.env):
            if k.startswith(("PMI_", "HYDRA_", "SLURM_JOB", "SLURM_STEP")):
                del self.env[k]

    def run(self, *cmd: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True,
                              text=True, timeout=timeout, **kw)

    def sbatch(self, script: Path, *args: str, env: Optional[Dict[str, str]] = None,
               cwd: Path = REPO_ROOT) -> str:
        e = dict(self.env, **(env or {}))
        out = self.run("sbatch", "--parsable", *args, str(script), env=e, cwd=str(cwd))
        assert out.returncode == 0, f"sbatch failed: {out.stderr}"
        job = out.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, ...); {} if unknown."""
        out = self.run("scontrol", "-o", "show", "job", job, timeout=30)
        return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)

    def in_queue(self, job: str) -> bool:
        out = self.run("squeue", "-h", "-j", job, "-o", "%T", timeout=30)
        return bool(out.stdout.strip())

    def wait_done(self, job: str, timeout: float = 120) -> Dict[str, str]:
        """Wait until the job has left the queue; return its final record."""
        def done():
            info = self.job(job)
            state = info.get("JobState", "")
            return info if state and state not in (
                "PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED") else None
        info = poll_for(done, timeout, 0.1, what=f"job {job} to finish")
        poll_for(lambda: not self.in_queue(job), 30, 0.1, what=f"job {job} to leave squeue")
        return info

    def jobcomp(self, job: str) -> Dict[str, str]:
        """The job's line in the jobcomp/filetxt log, as a dict."""
        path = self.root / "log" / "jobcomp.txt"
        for line in (path.read_text().splitlines() if path.exists() else []):
            if line.startswith(f"JobId={job} "):
                return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        return {}

    def log_tail(self, name: str, n: int = 30) -> str:
        p = self.root / "log" / name
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""


def job_processes(job: str) -> List[str]:
    """Live processes with SLURM_JOB_ID=<job> in their environment ('pid cmdline')."""
    needle = f"\0SLURM_JOB_ID={job}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = b"\0" + f.read()
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # a zombie holds nothing; its parent reaps it
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        if needle in env:
            found.append(f"{entry} {cmd}")
    return found


def _fnv1a(text: str) -> str:
    h = 2166136261
    for byte in text.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return f"{h:x}"


def mpich_segments(job: str, steps=range(4)) -> List[Path]:
    """MPICH shared-memory files of the job's steps that exist in /dev/shm.

    MPICH names them ``mpich_shm_<FNV-1a of the PMI job id>_<node>`` (and
    ``mpich_vci_...``); under ``srun --mpi=pmi2`` the PMI job id is ``<job>.<step>``.
    MPI_Finalize removes them; a killed job leaves them behind.
    """
    found = []
    for step in steps:
        h = _fnv1a(f"{job}.{step}")
        for kind in ("shm", "vci"):
            p = Path(f"/dev/shm/mpich_{kind}_{h}_0")
            if p.exists():
                found.append(p)
    return found


def assert_nothing_left(slurm: Slurm, job: str, killed: bool = False) -> None:
    """The job is out of the queue, none of its processes live, no shm is left.

    A killed job (scancel) cannot run MPI_Finalize, so its MPICH segments stay in
    /dev/shm: those are removed here (SLURM sites do this in an epilog).
    """
    assert not slurm.in_queue(job), f"job {job} is still in squeue"
    try:
        poll_for(lambda: not job_processes(job), 20, 0.2, what=f"the processes of job {job}")
    except TimeoutError:
        pytest.fail(f"processes of job {job} are left: {job_processes(job)}")
    left = mpich_segments(job)
    for p in left:
        try:
            p.unlink()
        except OSError:
            pass
    if not killed:
        assert not left, f"job {job} ended but left MPICH shared memory: {left}"


def wait_for_cluster(slurm: Slurm, job: str, cf: Path, name: str,
                     timeout: float = 150) -> float:
    """Run `mpiengine wait` (what a user types) until it returns; fail early if the job ends.

    Returns the seconds `mpiengine wait` took.
    """
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "mpiengine", "wait", "--connection-file",
                             str(cf), "--timeout", str(timeout)], env=slurm.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def done():
            if proc.poll() is not None:
                return True
            if not slurm.in_queue(job) and not cf.exists():
                raise AssertionError(f"job {job} ended before its cluster answered: "
                                     f"{slurm.job(job).get('JobState')}\n"
                                     f"{_job_output(slurm, name, job)}")
            return False
        poll_for(done, timeout + 10, 0.1, what=f"mpiengine wait for job {job}")
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, (f"mpiengine wait failed: {err}\n"
                                  f"{_job_output(slurm, name, job)}")
    return time.monotonic() - t0


def _tell(config: pytest.Config, text: str) -> None:
    harness.tell(config, "slurm", text)


@pytest.fixture(scope="module")
def slurm(request: pytest.FixtureRequest):
    """The SLURM cluster of this module (module scope: the daemons stop right after it)."""
    reason = _unavailable()
    if reason:
        _skip_or_fail(reason)
    # Not under pytest's tmp dirs: those are 0700, and munged refuses a socket below a
    # directory that is not o+x.
    root = Path(tempfile.mkdtemp(prefix="mpiengine-slurm-", dir="/tmp"))
    root.chmod(0o755)
    env = dict(os.environ, SLURM_SINGLE_DIR=str(root), SLURM_WAIT_S="60",
               # job ids unlike any earlier run's: see mpich_segments()
               SLURM_FIRST_JOB_ID=str(random.randrange(100_000, 50_000_000)),
               SLURMCTLD_PORT=str(harness.free_port()), SLURMD_PORT=str(harness.free_port()))
    t0 = time.monotonic()
    cluster: Optional[Slurm] = None
    try:
        try:
            out = subprocess.run(["bash", str(HPC / "slurm_start.sh")], env=env,
                                 capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            _skip_or_fail("slurm_start.sh did not finish within 600 s")
        if out.returncode != 0:
            tail = "\n".join((out.stdout + out.stderr).splitlines()[-25:])
            _skip_or_fail(f"could not install or start SLURM (slurm_start.sh exit "
                          f"{out.returncode}):\n{tail}")
        _tell(request.config, f"single-node cluster up after {time.monotonic() - t0:.1f} s "
                              f"(apt install included when needed) in {root}")
        cluster = Slurm(root)
        yield cluster
    finally:
        stop = subprocess.run(["bash", str(HPC / "slurm_stop.sh")], env=env,
                              capture_output=True, text=True, timeout=120)
        if stop.returncode != 0:
            sys.stderr.write(f"[slurm] slurm_stop.sh exit {stop.returncode}:\n"
                             f"{stop.stdout}{stop.stderr}\n")
        for job in (cluster.jobs if cluster is not None else []):
            for seg in mpich_segments(job):  # from jobs that a failed test had to cancel
                seg.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def say(capsys):
    """Print a line to the terminal even under pytest's capture (timings for the CI log)."""
    def say(text: str) -> None:
        with capsys.disabled():
            sys.stdout.write(f"\n[slurm] {text}\n")
            sys.stdout.flush()
    return say


def _connection(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _interactive_job(slurm: Slurm, name: str):
    """Submit examples/slurm_interactive.sh; return (job, connection file, t_submit)."""
    cf = slurm.shared / f"{name}.json"
    t0 = time.monotonic()
    job = slurm.sbatch(EXAMPLES / "slurm_interactive.sh", "-o", str(slurm.shared / f"{name}-%j.out"),
                       env={"MPIENGINE_CONNECTION_FILE": str(cf)})
    return job, cf, t0


def _job_output(slurm: Slurm, name: str, job: str) -> str:
    p = slurm.shared / f"{name}-{job}.out"
    if name == "generated":  # mpiengine sbatch logs under $MPIENGINE_DIR/log
        p = Path(slurm.env["MPIENGINE_DIR"]) / "log" / f"slurm-{job}.out"
    return p.read_text(errors="replace") if p.exists() else "(no output file)"


@pytest.mark.timeout(240)
def test_interactive_job_client_and_stop(slurm: Slurm, say):
    """sbatch examples/slurm_interactive.sh -> a login-node client -> mpiengine stop."""
    from mpiengine import client

    job, cf, t0 = _interactive_job(slurm, "interactive")
    try:
        wait_for_cluster(slurm, job, cf, "interactive")
        t_wait = time.monotonic() - t0
        mec = client.MultiEngineClient(str(cf), wait=30)
        mec.on_output = None
        mec.execute("import os, socket; x = comm.rank + 1")
        t_usable = time.monotonic() - t0
        say(f"sbatch -> 'mpiengine wait' returned: {t_wait:.2f} s; "
            f"sbatch -> first command answered: {t_usable:.2f} s")
        info = _connection(cf)
        # --ip '*' (the script's default) means TLS, pinned in the connection file
        assert info["tls"] and len(info["tls"]["fingerprint"]) == 64
        assert mec.get_ids() == [0, 1, 2, 3]

        # the job is SLURM's: the engines are ranks 1..4 of srun's step (mpirun_launch.sh
        # took its srun path), in this job
        mec.execute("e = (os.environ.get('SLURM_JOB_ID'), os.environ.get('SLURM_PROCID'), "
                    "os.environ.get('SLURM_STEP_ID'))")
        ids = mec.pull("e")
        assert [i[0] for i in ids] == [job] * 4, ids
        assert sorted(int(i[1]) for i in ids) == [1, 2, 3, 4], ids
        assert all(i[2] is not None for i in ids), ids

        mec.scatter("a", list(range(10)))
        assert mec.gather("a") == list(range(10))
        mec.execute("total = comm.allreduce(x)")
        assert mec.pull("total") == [10, 10, 10, 10]
        status = slurm.run(sys.executable, "-m", "mpiengine", "status", "--connection-file",
                           str(cf))
        assert status.returncode == 0 and "4 engines" in status.stdout, status.stdout
        say(f"mpiengine status:\n{status.stdout.rstrip()}")
        mec.close()

        # the batch driver, unchanged, against this interactive cluster
        out_file = slurm.shared / "driver-interactive.txt"
        drv = slurm.run(sys.executable, str(EXAMPLES / "driver.py"), "--out", str(out_file),
                        env=dict(slurm.env, MPIENGINE_CONNECTION_FILE=str(cf)), timeout=120)
        assert drv.returncode == 0, drv.stdout + drv.stderr
        report = out_file.read_text()
        assert "engines: 4" in report and "FAILED" not in report, report

        stop = slurm.run(sys.executable, "-m", "mpiengine", "stop", "--connection-file",
                         str(cf), timeout=90)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        final = slurm.wait_done(job, 60)
        assert final["JobState"] == "COMPLETED", final
        assert final["ExitCode"] == "0:0", final
        assert_nothing_left(slurm, job)
        assert not cf.exists(), "the connection file outlived the cluster"
        output = _job_output(slurm, "interactive", job)
        assert "4 engines ready" in output, output
    finally:
        if slurm.in_queue(job):
            slurm.run("scancel", job)


@pytest.mark.timeout(180)
def test_scancel_ends_the_cluster_and_the_client_hears_it(slurm: Slurm, say):
    from mpiengine import client
    from mpiengine.errors import MPIEngineError

    job, cf, t0 = _interactive_job(slurm, "cancelled")
    try:
        wait_for_cluster(slurm, job, cf, "cancelled")
        mec = client.MultiEngineClient(str(cf), wait=30)
        mec.on_output = None
        assert mec.execute("y = 1") is not None
        say(f"second job: sbatch -> usable client {time.monotonic() - t0:.2f} s")
        t1 = time.monotonic()
        assert slurm.run("scancel", job).returncode == 0
        final = slurm.wait_done(job, 60)
        assert final["JobState"] == "CANCELLED", final
        assert_nothing_left(slurm, job, killed=True)
        say(f"scancel -> job and all its processes gone: {time.monotonic() - t1:.2f} s")
        # the client does not hang: a clear error at once
        t2 = time.monotonic()
        with pytest.raises(MPIEngineError):
            mec.execute("y", timeout=30)
        assert time.monotonic() - t2 < 10
        mec.close()
    finally:
        if slurm.in_queue(job):
            slurm.run("scancel", job)


@pytest.mark.timeout(240)
def test_batch_job_exit_status_is_the_drivers(slurm: Slurm, say):
    """examples/slurm_batch.sh: the job's ExitCode is driver.py's, with srun and mpiexec."""
    cases = {  # name: (launcher, driver args, expected exit status)
        "ok": ("srun", [], 0),
        "three": ("mpiexec", ["--exit-code", "3"], 3),
    }
    jobs = {}
    for name, (launcher, args, _) in cases.items():
        out = slurm.shared / f"batch-{name}.txt"
        tmp = slurm.shared / f"batch-{name}-tmp"  # the job's TMPDIR: must end up empty
        tmp.mkdir()
        jobs[name] = slurm.sbatch(
            EXAMPLES / "slurm_batch.sh", "-o", str(slurm.shared / f"batch-{name}-%j.out"),
            env={"LAUNCHER": launcher, "TMPDIR": str(tmp),
                 "DRIVER_ARGS": " ".join(["--out", str(out)] + args)})
    try:
        for name, (launcher, args, code) in cases.items():
            job = jobs[name]
            final = slurm.wait_done(job, 150)
            log = slurm.shared / f"batch-{name}-{job}.out"
            text = log.read_text(errors="replace") if log.exists() else "(no job output)"
            assert final["ExitCode"] == f"{code}:0", f"{final}\n{text}"
            assert final["JobState"] == ("COMPLETED" if code == 0 else "FAILED"), final
            comp = slurm.jobcomp(job)
            assert comp.get("ExitCode") == f"{code}:0", comp
            report = (slurm.shared / f"batch-{name}.txt").read_text()
            assert "engines: 4" in report and "FAILED" not in report, report
            assert f"exit status: {code}" in report, report
            assert f"driver exit status {code}" in text, text
            assert_nothing_left(slurm, job)
            leftovers = list((slurm.shared / f"batch-{name}-tmp").iterdir())
            assert not leftovers, f"the batch job left {leftovers} behind"
            say(f"batch job {job} ({launcher}, driver {args}): "
                f"JobState={final['JobState']} ExitCode={final['ExitCode']}")
    finally:
        for job in jobs.values():
            if slurm.in_queue(job):
                slurm.run("scancel", job)


@pytest.mark.timeout(180)
def test_mpiengine_sbatch_submit(slurm: Slurm, say, tmp_path: Path):
    """`mpiengine sbatch -n 2 --submit` as generated, with no edits: usable, stops cleanly."""
    from mpiengine import client

    cf = slurm.shared / "generated.json"
    printed = slurm.run(sys.executable, "-m", "mpiengine", "sbatch", "-n", "2",
                        "--connection-file", str(cf), cwd=str(tmp_path))
    assert printed.returncode == 0, printed.stderr
    assert "--ntasks=3" in printed.stdout and 'srun --mpi="${SRUN_MPI:-pmi2}"' in printed.stdout
    t0 = time.monotonic()
    sub = slurm.run(sys.executable, "-m", "mpiengine", "sbatch", "-n", "2", "--submit",
                    "--connection-file", str(cf), cwd=str(tmp_path))
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job = sub.stdout.strip()
    assert re.fullmatch(r"\d+", job), sub.stdout
    slurm.jobs.append(job)
    log = Path(slurm.env["MPIENGINE_DIR"]) / "log" / f"slurm-{job}.out"
    try:
        wait_for_cluster(slurm, job, cf, "generated")
        with client.MultiEngineClient(str(cf), timeout=20) as mec:
            mec.on_output = None
            assert mec.get_ids() == [0, 1]
            mec.execute("s = comm.allreduce(comm.rank + 1)")
            assert mec.pull("s") == [3, 3]
        say(f"mpiengine sbatch --submit -> usable client {time.monotonic() - t0:.2f} s")
        assert _connection(cf)["tls"], "--ip '*' should mean TLS"
        stop = slurm.run(sys.executable, "-m", "mpiengine", "stop", "--connection-file",
                         str(cf), timeout=90)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        final = slurm.wait_done(job, 60)
        assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", final
        assert_nothing_left(slurm, job)
        assert "2 engines ready" in log.read_text()
    finally:
        if slurm.in_queue(job):
            slurm.run("scancel", job)
