"""A cluster across hosts: controller on node1, engines on node1 and node2, client on login.

tests/hpc/make_hosts.sh builds three fake hosts from network namespaces on this
machine (login 10.77.0.10, node1 .11, node2 .12, a bridge between them, their own
host names and /etc/hosts; the filesystem stays shared, like NFS homes). MPICH's
hydra starts the ranks on node2 through tests/hpc/fake_ssh. MPI runs over TCP on
the veths (``UCX_TLS=tcp,self UCX_NET_DEVICES=eth0``: without it UCX sees one
machine and uses shared memory), so MPI data really crosses the virtual wire, and
the tests check the byte counters to prove it.

The client always runs in ``login`` (tests/hpc/mh_client.py under
tests/hpc/hostexec) and finds the cluster through the connection file, which the
controller on node1 wrote for ``--ip eth0`` with TLS (``--tls auto`` on a
non-loopback address).

Needs root and network namespaces; skipped otherwise, saying why
(``MPIENGINE_REQUIRE_NETNS=1`` turns the skip into a failure). Each run uses its
own namespace prefix and state directory and removes them at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

import harness
from harness import REPO_ROOT, poll_for

HPC = REPO_ROOT / "tests" / "hpc"
REQUIRE = os.environ.get("MPIENGINE_REQUIRE_NETNS", "") not in ("", "0")
NODE1, NODE2 = "10.77.0.11", "10.77.0.12"
#: hydra over fake ssh, MPI over TCP on eth0 (see the module docstring)
MPI_NET_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "eth0"}

pytestmark = [pytest.mark.mpi, pytest.mark.root]


def _skip_or_fail(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"MPIENGINE_REQUIRE_NETNS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _unavailable() -> Optional[str]:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "not root: fake hosts need network namespaces (ip netns add)"
    for tool in ("ip", "nsenter", "unshare", "ss"):
        if not shutil.which(tool):
            return f"{tool} is not installed (iproute2 / util-linux)"
    probe = f"mpieprobe{os.getpid()}"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if out.returncode != 0:
        return f"'ip netns add' failed: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return harness.mpi_skip_reason()


class Hosts:
    """The fake hosts of one test run, and how to run things on them."""

    def __init__(self, prefix: str, run: str, work: Path) -> None:
        self.prefix, self.run_dir, self.work = prefix, run, work
        self.env = harness.mpi_env(dict(MPI_NET_ENV, MH_PREFIX=prefix, MH_RUN=run,
                                        MPIENGINE_SSH=str(HPC / "fake_ssh")))

    def cmd(self, host: str, *argv: str) -> List[str]:
        return [str(HPC / "hostexec"), host, *argv]

    def client(self, action: str, path: Path, *args: str, timeout: float = 90,
               env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """Run one mh_client.py action in `login`; return its JSON result."""
        out = subprocess.run(
            self.cmd("login", sys.executable, str(HPC / "mh_client.py"), action, str(path),
                     *args),
            env=dict(self.env, **(env or {})), capture_output=True, text=True,
            timeout=timeout, cwd=str(self.work))
        lines = out.stdout.strip().splitlines()
        assert out.returncode == 0 and lines, (
            f"mh_client.py {action} failed (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")
        return json.loads(lines[-1])

    def rx_bytes(self, host: str) -> int:
        """eth0's receive counter of a host (ip -n follows the netns, /sys would not)."""
        out = subprocess.run(["ip", "-n", self.prefix + host, "-s", "-j", "link", "show",
                              "eth0"], capture_output=True, text=True, check=True)
        return int(json.loads(out.stdout)[0]["stats64"]["rx"]["bytes"])

    def sockets(self, host: str) -> List[Dict[str, Any]]:
        """Established TCP sockets in a host: local/peer address and port, owning pids."""
        out = subprocess.run(["ip", "netns", "exec", self.prefix + host, "ss", "-tnpH",
                              "state", "established"], capture_output=True, text=True,
                             check=True)
        found = []
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) < 4:
                continue
            local, peer = parts[2], parts[3]
            pids = [int(chunk.split(",")[0]) for chunk in line.split("pid=")[1:]]
            found.append({"local": local.rsplit(":", 1)[0], "lport": int(local.rsplit(":", 1)[1]),
                          "peer": peer.rsplit(":", 1)[0], "pport": int(peer.rsplit(":", 1)[1]),
                          "pids": pids})
        return found


def _tell(config: pytest.Config, text: str) -> None:
    harness.tell(config, "multihost", text)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    reason = _unavailable()
    if reason:
        _skip_or_fail(reason)
    tag = f"mpie{os.getpid()}"
    prefix, run = f"{tag}-", f"/run/{tag}"
    work = tmp_path_factory.mktemp("multihost")
    h = Hosts(prefix, run, work)
    t0 = time.monotonic()
    try:
        out = subprocess.run(["bash", str(HPC / "make_hosts.sh")], env=h.env,
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            _skip_or_fail(f"make_hosts.sh failed (exit {out.returncode}): "
                          f"{out.stdout[-800:]}{out.stderr[-800:]}")
        _tell(request.config, f"hosts login/node1/node2 ({prefix}*) up after "
                              f"{time.monotonic() - t0:.1f} s")
        yield h
    finally:
        subprocess.run(["bash", str(HPC / "teardown_hosts.sh")], env=h.env,
                       capture_output=True, text=True, timeout=60)
        left = [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                            text=True).stdout.split() if ns.startswith(prefix)]
        assert not left, f"namespaces left after teardown: {left}"


class Job:
    """An mpiexec job started on a fake host, ended by pid whatever happens."""

    def __init__(self, hosts: Hosts, name: str, argv: List[str], host: str = "node1") -> None:
        self.hosts, self.name = hosts, name
        self.cf = hosts.work / f"{name}.json"
        self.log = hosts.work / f"{name}.log"
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(hosts.cmd(host, "timeout", "600", *argv),
                                     stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=hosts.env,
                                     cwd=str(hosts.work), start_new_session=True)
        self.tree: Dict[int, str] = {}

    def wait_ready(self, timeout: float = 90) -> dict:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before "
                                     f"writing {self.cf}:\n{self.log_text()}")
            if self.cf.exists():
                try:
                    return json.loads(self.cf.read_text()) or None
                except ValueError:
                    return None
            return None
        info = poll_for(ready, timeout, 0.1, what=f"{self.cf} ({self.name})")
        self.tree.update(harness.descendants(self.proc.pid))
        return info

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, shutdown: Optional[List[str]] = None) -> Optional[int]:
        """Shut down through a login client if asked, then end every process by pid."""
        if self.proc.poll() is None:
            self.tree.update(harness.descendants(self.proc.pid))
        code = None
        if shutdown is not None and self.proc.poll() is None and self.cf.exists():
            try:
                self.hosts.client("shutdown", self.cf, *shutdown, timeout=60)
                code = self.proc.wait(timeout=30)
            except (AssertionError, subprocess.TimeoutExpired):
                code = None
        if self.proc.poll() is None or not harness._all_gone(self.tree):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if self.proc.poll() is None:
                    self.tree.update(harness.descendants(self.proc.pid))
                harness.signal_pids(self.tree, sig)
                if self.proc.poll() is None:
                    try:
                        os.kill(self.proc.pid, sig)
                    except ProcessLookupError:
                        pass
                try:
                    poll_for(lambda: self.proc.poll() is not None
                             and harness._all_gone(self.tree), 5, 0.05, what="the job to end")
                    break
                except TimeoutError:
                    continue
        self._log.close()
        return code if code is not None else self.proc.poll()


def _serve_argv(cf: Path, *serve_args: str, hosts_spec: str = f"{NODE1}:3,{NODE2}:2",
                n: int = 5) -> List[str]:
    mpiexec = harness.find_mpiexec()
    return [mpiexec, "-launcher", "ssh", "-launcher-exec", str(HPC / "fake_ssh"),
            "-iface", "eth0", "-hosts", hosts_spec, "-n", str(n),
            sys.executable, "-m", "mpiengine", "serve", "--connection-file", str(cf),
            *serve_args]


@pytest.fixture(scope="module")
def cluster_mh(hosts: Hosts):
    """Controller + engines 0,1 on node1, engines 2,3 on node2, listening on node1's eth0."""
    job = Job(hosts, "mh", _serve_argv(hosts.work / "mh.json", "--ip", "eth0"))
    t0 = time.monotonic()
    try:
        job.info = job.wait_ready()
        job.start_s = time.monotonic() - t0
        yield job
    finally:
        code = job.stop(shutdown=[])
        log = job.log_text()
        assert code == 0, f"the multi-host job did not exit cleanly ({code}):\n{log}"


@pytest.fixture
def say(capsys):
    def say(text: str) -> None:
        with capsys.disabled():
            sys.stdout.write(f"\n[multihost] {text}\n")
            sys.stdout.flush()
    return say


@pytest.mark.timeout(180)
def test_walkthrough_from_login(hosts: Hosts, cluster_mh: Job, say):
    info = cluster_mh.info
    assert info["ip"] == NODE1 and info["host"] == "node1", info
    # --tls auto on a non-loopback address: TLS on, the certificate pinned in the file
    assert info["tls"] and len(info["tls"]["fingerprint"]) == 64, info
    r = hosts.client("walkthrough", cluster_mh.cf)
    say(f"cluster up in {cluster_mh.start_s:.1f} s; client in {r['client_host']} connected "
        f"(TLS) in {r['connect_s']:.2f} s; engines on {r['hosts']}")
    assert r["client_host"] == "login"
    assert r["tls"] is True
    assert r["ids"] == [0, 1, 2, 3]
    assert r["hosts"] == ["node1", "node1", "node2", "node2"]
    assert r["execute_repr"].splitlines()[0] == "<Results List>"
    assert r["pull"] == [[5, 10, "text", [1, 2, 3]]]
    assert r["getitem"] == [3.5] * 4
    assert r["scatter_parts"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert r["gather"] == list(range(16))
    assert r["numpy_roundtrip"] is True
    assert r["allreduce"] == [10] * 4
    assert r["map"] == [v * v for v in range(20)]
    assert r["composite_n"] == 2, r["composite"]
    assert "[1:execute]: ZeroDivisionError" in r["composite"], r["composite"]
    assert "[3:execute]: ZeroDivisionError" in r["composite"], r["composite"]
    assert r["nonblocking"] == [0, 1, 2, 3]


@pytest.mark.timeout(120)
def test_mpi_data_crosses_the_wire(hosts: Hosts, cluster_mh: Job, say):
    mb = 50
    before = {h: hosts.rx_bytes(h) for h in ("node1", "node2", "login")}
    r = hosts.client("bigpush", cluster_mh.cf, str(mb))
    after = {h: hosts.rx_bytes(h) for h in ("node1", "node2", "login")}
    grown = {h: after[h] - before[h] for h in before}
    say(f"push of a {mb} MB array: {r['seconds']:.2f} s; eth0 rx grew by "
        + ", ".join(f"{h} {v / 1e6:.1f} MB" for h, v in grown.items()))
    assert r["ok"] == [True] * 4
    # login -> node1 carries the push to the controller; the controller's MPI
    # broadcast carries it node1 -> node2
    assert grown["node1"] >= r["bytes"], grown
    assert grown["node2"] >= r["bytes"], grown


@pytest.mark.timeout(120)
def test_doorbells_connect_across_hosts(hosts: Hosts, cluster_mh: Job, say):
    engines = json.loads(cluster_mh.cf.read_text())
    ctl_pid = engines["pid"]
    node2_pids = _engine_pids(hosts, cluster_mh, "node2")
    assert len(node2_pids) == 2, node2_pids
    # The doorbell listener is gone after start-up, but its accepted sockets keep its
    # port: node1's engines dial it on 127.0.0.1, node2's on node1's address.
    ctl = [s for s in hosts.sockets("node1") if ctl_pid in s["pids"]]
    bell_ports = {s["lport"] for s in ctl if s["peer"] == "127.0.0.1"}
    assert len(bell_ports) == 1, f"no doorbells from node1's engines: {ctl}"
    remote = [s for s in ctl if s["lport"] in bell_ports and s["peer"] == NODE2]
    node2_socks = hosts.sockets("node2")
    owners = {next((p for p in s2["pids"]), None) for s in remote for s2 in node2_socks
              if s2["lport"] == s["pport"] and s2["peer"] == NODE1}
    assert owners == set(node2_pids), (
        f"node2's engines {node2_pids} have no doorbell to node1 (sockets: {remote})")
    assert "no doorbell" not in cluster_mh.log_text()
    d = hosts.client("doorbell", cluster_mh.cf, ",".join(map(str, node2_pids)), timeout=60)
    cpu = {int(k): v for k, v in d["idle_cpu_5s"].items()}
    lat = d["latency_after_idle_s"]
    say(f"doorbells: node2 engines {node2_pids} rung over node1:{bell_ports.pop()}; "
        f"idle CPU over 5 s: " + ", ".join(f"{v:.3f} s" for v in cpu.values())
        + "; first command after 2.5 s idle: " + ", ".join(f"{v * 1e3:.1f} ms" for v in lat))
    assert all(v < 0.25 for v in cpu.values()), cpu
    assert min(lat) < 0.5, lat


def _engine_pids(hosts: Hosts, job: Job, host: str) -> List[int]:
    """Pids of the engines running on a host: the job's python ranks in that netns."""
    out = subprocess.run(["ip", "netns", "pids", hosts.prefix + host], capture_output=True,
                         text=True, check=True)
    in_ns = {int(p) for p in out.stdout.split()}
    ctl = json.loads(job.cf.read_text())["pid"]
    pids = []
    for pid in sorted(in_ns):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"mpiengine" in argv and b"serve" in argv and pid != ctl and b"timeout" not in argv[0]:
            if os.path.basename(argv[0].decode()).startswith("python"):
                pids.append(pid)
    return pids


@pytest.mark.timeout(120)
def test_intruders_in_login_get_nothing(hosts: Hosts, cluster_mh: Job, say):
    bad = hosts.client("badkey", cluster_mh.cf)
    assert bad["error"] == "AuthenticationError", bad
    junk = hosts.client("garbage", cluster_mh.cf)
    say(f"wrong key: AuthenticationError in {bad['seconds']:.2f} s; plain junk: "
        f"{junk['plain_junk']}; junk after TLS: {junk['tls_junk']}; "
        f"{junk['probes']} connect+close probes; still serving: {junk['still_serving']}")
    assert junk["plain_junk"].startswith("closed"), junk
    assert junk["tls_junk"].startswith("closed"), junk
    assert junk["still_serving"], (f"the cluster died from raw connections: {junk}\n"
                                   f"{cluster_mh.log_text()[-3000:]}")
    assert set(junk["commands_run_meanwhile"].values()) == {0}, junk


@pytest.mark.timeout(180)
def test_ssh_tunnel_to_a_loopback_controller(hosts: Hosts, say):
    """A controller on node1's 127.0.0.1 (TLS on) is reachable from login only via ssh."""
    cf = hosts.work / "lo.json"
    job = Job(hosts, "lo", _serve_argv(cf, "--ip", "127.0.0.1", "--tls", "on",
                                       hosts_spec=f"{NODE1}:3", n=3))
    try:
        info = job.wait_ready()
        assert info["ip"] == "127.0.0.1" and info["tls"], info
        direct = hosts.client("direct", cf)
        assert direct["error"] in ("ConnectError", "AuthenticationError"), direct
        ssh_log = hosts.work / "fake_ssh.log"
        env = {"FAKE_SSH_LOG": str(ssh_log)}
        r = hosts.client("tunnel", cf, "node1", env=env)
        say(f"sshserver='node1': connected through {r['via']} in {r['connect_s']:.2f} s "
            f"(TLS {r['tls']}); engines on {r['hosts']}")
        assert r["hosts"] == ["node1", "node1"]
        assert r["tls"] is True
        assert "-L 127.0.0.1:" in ssh_log.read_text()
        # the client ended its tunnel when it closed
        assert not harness._stat(r["tunnel_pid"]), "the ssh tunnel outlived its client"
        assert job.proc.poll() is None, f"the controller died:\n{job.log_text()}"
    finally:
        code = job.stop(shutdown=["node1"] if job.proc.poll() is None else None)
    assert code == 0, f"the loopback job did not exit cleanly ({code}):\n{job.log_text()}"
