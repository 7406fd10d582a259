"""The login-node side of tests/test_multihost.py: one client action, results as JSON.

    hostexec login python tests/hpc/mh_client.py ACTION CONNECTION_FILE [ARGS]

Runs inside the fake ``login`` host (its own network namespace; the filesystem is
shared, so the connection file written on node1 is read here). Prints one JSON
object on the last line of stdout; the test asserts on it. Actions:

  walkthrough      the reference document's tour: execute, push/pull, scatter/gather
                   (lists and numpy), map, CompositeError, comm.allreduce across hosts
  bigpush MB       push an MB-megabyte array to every engine and check it arrived
  doorbell PIDS    idle CPU of the given engine pids over 5 s, then the latency of the
                   first command after 2.5 s idle
  badkey           connect with the right address but a wrong key
  garbage          raw bytes at the port (plain TCP, connect-and-close probes, and junk
                   after a real TLS handshake); then check that no command ran
  tunnel HOST      MultiEngineClient(path, sshserver=HOST) ($MPIENGINE_SSH is the ssh)
  direct           a plain connect (expected to fail for a loopback-only controller)
  shutdown         mec.shutdown()
"""
from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import tempfile
import time
from typing import Any, Dict

from mpiengine import client
from mpiengine.errors import AuthenticationError, CompositeError, MPIEngineError


def _connect(path: str, **kw: Any) -> client.MultiEngineClient:
    mec = client.MultiEngineClient(path, timeout=20, **kw)
    mec.on_output = None
    mec.on_progress = None
    return mec


def _count(mec: client.MultiEngineClient) -> Dict[int, int]:
    return {r["id"]: r["number"] for r in mec.execute("pass")}


def walkthrough(path: str) -> Dict[str, Any]:
    import numpy as np

    out: Dict[str, Any] = {"client_host": socket.gethostname()}
    t0 = time.monotonic()
    with _connect(path) as mec:
        out["connect_s"] = time.monotonic() - t0
        out["tls"] = bool(mec.info.tls)
        out["ids"] = mec.get_ids()
        res = mec.execute("import socket, os; host = socket.gethostname(); a = 5")
        out["execute_repr"] = repr(res)
        out["hosts"] = mec.pull("host")
        mec.push(dict(b=10, c="text", d=[1, 2, 3]))
        out["pull"] = mec.pull(("a", "b", "c", "d"), targets=0)
        mec["e"] = 3.5
        out["getitem"] = mec["e"]
        mec.scatter("x", list(range(16)))
        out["scatter_parts"] = mec.pull("x")
        out["gather"] = mec.gather("x")
        arr = np.arange(100_000, dtype=np.float64)
        mec.scatter("y", arr)
        out["numpy_roundtrip"] = bool(np.array_equal(mec.gather("y"), arr))
        mec.execute("s = comm.allreduce(comm.rank + 1)")
        out["allreduce"] = mec.pull("s")
        out["map"] = list(mec.map(lambda v: v * v, range(20)))
        try:
            mec.execute("1/0", targets=[1, 3])
            out["composite"] = None
        except CompositeError as e:
            out["composite"] = str(e)
            out["composite_n"] = len(e.elist)
        pending = mec.execute("import time; time.sleep(0.2); z = comm.rank", block=False)
        pending.get_result(block=True)
        out["nonblocking"] = mec.pull("z")
    return out


def bigpush(path: str, mb: str) -> Dict[str, Any]:
    import numpy as np

    n = int(float(mb) * 1e6) // 8
    arr = np.arange(n, dtype=np.float64)
    with _connect(path) as mec:
        t0 = time.monotonic()
        mec.push(dict(big=arr))
        took = time.monotonic() - t0
        mec.execute("import numpy as np; ok = bool(big.shape[0] == %d and big[-1] == %d); "
                    "del big" % (n, n - 1))
        return {"ok": mec.pull("ok"), "bytes": arr.nbytes, "seconds": took}


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def doorbell(path: str, pids: str) -> Dict[str, Any]:
    watch = [int(p) for p in pids.split(",")]
    with _connect(path) as mec:
        mec.execute("pass")
        before = {p: _cpu(p) for p in watch}
        time.sleep(5.0)
        idle_cpu = {p: _cpu(p) - before[p] for p in watch}
        lat = []
        for _ in range(3):
            time.sleep(2.5)
            t = time.perf_counter()
            mec.execute("pass")
            lat.append(time.perf_counter() - t)
    return {"idle_cpu_5s": idle_cpu, "latency_after_idle_s": lat}


def badkey(path: str) -> Dict[str, Any]:
    with open(path) as f:
        data = json.load(f)
    data["key"] = "00" * 32
    with tempfile.TemporaryDirectory() as d:
        wrong = os.path.join(d, "wrong.json")
        fd = os.open(wrong, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        t0 = time.monotonic()
        try:
            client.MultiEngineClient(wrong, timeout=10)
            return {"error": None}
        except AuthenticationError as e:
            return {"error": "AuthenticationError", "message": str(e),
                    "seconds": time.monotonic() - t0}
        except MPIEngineError as e:
            return {"error": type(e).__name__, "message": str(e)}


def _drain(sock: socket.socket, timeout: float = 10.0) -> str:
    """Read until the peer closes; say how it ended."""
    sock.settimeout(timeout)
    got = 0
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return f"closed (after {got} bytes)"
            got += len(chunk)
    except socket.timeout:
        return "still open"
    except (ConnectionResetError, ssl.SSLError, OSError) as e:
        return f"closed ({type(e).__name__})"


def garbage(path: str) -> Dict[str, Any]:
    with open(path) as f:
        info = json.load(f)
    addr = (info["ip"], info["port"])
    with _connect(path) as mec:
        start = _count(mec)
    out: Dict[str, Any] = {}
    # 1. plain-TCP junk (no TLS): the server's TLS handshake fails -> closed
    s = socket.create_connection(addr, timeout=10)
    s.sendall(os.urandom(4096))
    out["plain_junk"] = _drain(s)
    s.close()
    # 2. port probes: connect and close at once, as a scanner or health check does
    for _ in range(20):
        socket.create_connection(addr, timeout=10).close()
    out["probes"] = 20
    # 3. a real TLS handshake, then junk instead of the authentication
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(addr, timeout=10)
    try:
        t = ctx.wrap_socket(raw)
        t.sendall(os.urandom(4096))
        out["tls_junk"] = _drain(t)
        t.close()
    except (ssl.SSLError, OSError) as e:
        out["tls_junk"] = f"closed during handshake ({type(e).__name__})"
    time.sleep(0.5)
    try:
        with _connect(path) as mec:
            end = _count(mec)
        out["still_serving"] = True
        # our own 'pass' is the only command since `start`
        out["commands_run_meanwhile"] = {i: end[i] - start[i] - 1 for i in start}
    except MPIEngineError as e:
        out["still_serving"] = False
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def tunnel(path: str, host: str) -> Dict[str, Any]:
    t0 = time.monotonic()
    with _connect(path, sshserver=host) as mec:
        took = time.monotonic() - t0
        mec.execute("import socket; h = socket.gethostname()")
        return {"hosts": mec.pull("h"), "tls": bool(mec.info.tls), "connect_s": took,
                "via": f"127.0.0.1:{mec._tunnel.local_port}" if mec._tunnel else None,
                "tunnel_pid": mec._tunnel.proc.pid if mec._tunnel else None}


def direct(path: str) -> Dict[str, Any]:
    try:
        with _connect(path) as mec:
            return {"error": None, "ids": mec.get_ids()}
    except MPIEngineError as e:
        return {"error": type(e).__name__, "message": str(e)}


def shutdown(path: str, *rest: str) -> Dict[str, Any]:
    kw = {"sshserver": rest[0]} if rest else {}
    mec = _connect(path, **kw)
    mec.shutdown()
    return {"ok": True}


ACTIONS = {"walkthrough": walkthrough, "bigpush": bigpush, "doorbell": doorbell,
           "badkey": badkey, "garbage": garbage, "tunnel": tunnel, "direct": direct,
           "shutdown": shutdown}

if __name__ == "__main__":
    action, path, *args = sys.argv[1:]
    result = ACTIONS[action](path, *args)
    sys.stdout.write(json.dumps(result, default=str) + "\n")
