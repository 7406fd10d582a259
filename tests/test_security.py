"""Attacks on a running cluster: wrong keys, replays, eavesdropping, hostile bytes.

DESIGN.md §5 and §6 ("wrong key, garbage bytes, replayed message: that connection
is refused or closed; nothing runs; the controller keeps serving") as tests
against real ``mpiexec`` clusters:

- authentication and replay, through :class:`proxy.RecordingProxy` placed between
  a real client and the controller;
- TLS: what a recording proxy sees with ``--tls on`` and with it off, and a
  pinned fingerprint that does not match;
- the connection file and the key: file mode, and where the key must never appear
  (argv, environment, logs, ``mpiengine status``, error messages, reprs);
- hostile bytes against a controller started with ``--max-message-size``:
  oversized claims, truncations, garbage, a dribbling client, 200 idle
  connections, and a short hypothesis fuzz of the handshake and frame parser
  (the long one is ``tests/test_fuzz_long.py``).

"Nothing ran" is checked on the engines themselves: their execution counters
advance by exactly one for the one probe command after an attack, and marker
variables keep their values.
"""
from __future__ import annotations

import collections
import json
import os
import secrets
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import harness
from harness import poll_for
from mpiengine import client, connection, tls
from mpiengine import protocol as P
from mpiengine.errors import AuthenticationError, ClusterLost, CommandTimeout, ConnectError
from proxy import C2S, S2C, RawClient, RecordingProxy, private_copy, split_frames, via_proxy

pytestmark = pytest.mark.mpi

LIMIT = 1_000_000          # --max-message-size of the "limited" cluster
FUZZ_SECONDS = 6.0         # the parser fuzz of the default suite


# -- helpers ---------------------------------------------------------------------------------

def _skip_without_mpi() -> None:
    reason = harness.mpi_skip_reason()
    if reason is None:
        return
    if os.environ.get("MPIENGINE_REQUIRE_MPI", "") not in ("", "0"):
        pytest.fail(f"MPIENGINE_REQUIRE_MPI=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def file_info(path: Any) -> dict:
    return json.loads(Path(path).read_text())


def address(path: Any) -> Tuple[str, int]:
    info = file_info(path)
    return info["ip"], int(info["port"])


def key_of(path: Any) -> bytes:
    return bytes.fromhex(file_info(path)["key"])


def counts(mec: Any) -> Dict[int, int]:
    """Run ``pass`` everywhere; return ``{engine id: its execution number}``."""
    return {r["id"]: r["number"] for r in mec.execute("pass", targets="all", block=True,
                                                      timeout=30)}


def assert_nothing_ran(mec: Any, before: Dict[int, int]) -> None:
    after = counts(mec)
    assert after == {i: n + 1 for i, n in before.items()}, \
        f"an attack reached the engines: execution counters {before} -> {after}"


def vm_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def round_trip(mec: Any) -> float:
    t0 = time.monotonic()
    mec.execute("pass", timeout=30)
    return time.monotonic() - t0


def start_own_cluster(tmp_path_factory: Any, name: str, n: int, args: List[str],
                      env: Optional[Dict[str, str]] = None) -> harness.Cluster:
    _skip_without_mpi()
    c = harness.Cluster(workdir=str(tmp_path_factory.mktemp(name)), name=name)
    c.start(n, args, env=env)
    return c


class ModeWatcher:
    """Poll a directory for the connection file (and its temporary) being group/world readable."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory, self.name = directory, name
        self.exposed: List[Tuple[str, int]] = []
        self.seen: set = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._scan()
            time.sleep(0.001)

    def _scan(self) -> None:
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return
        for e in entries:
            if e.name == self.name or e.name.startswith(f".{self.name}."):
                try:
                    mode = e.stat(follow_symlinks=False).st_mode & 0o777
                except OSError:
                    continue
                self.seen.add(e.name)
                if mode & 0o077:
                    self.exposed.append((e.name, mode))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._scan()


# -- module clusters ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """2 engines, ``--max-message-size 1000000``, debug logging; its start is watched."""
    _skip_without_mpi()
    workdir = tmp_path_factory.mktemp("limited")
    c = harness.Cluster(workdir=str(workdir), name="limited")
    watcher = ModeWatcher(workdir, "limited.json")
    try:
        c.start(2, ["--max-message-size", str(LIMIT)], env={"MPIENGINE_DEBUG": "1"})
    finally:
        watcher.stop()
    c.mode_watch = watcher
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def lmec(limited):
    if not limited.alive():
        pytest.fail(f"the limited cluster is gone; log tail:\n{limited.log_tail()}")
    m = limited.client()
    try:
        yield m
    finally:
        try:
            if limited.alive():
                m.reset(timeout=30)
        finally:
            m.close()


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """2 engines with ``--tls on`` on loopback."""
    c = start_own_cluster(tmp_path_factory, "tlson", 2, ["--tls", "on"])
    try:
        yield c
    finally:
        c.stop()


# == 1. authentication and replay ============================================================

def _wrong_key(key: bytes) -> bytes:
    return bytes(b ^ 0x5A for b in key)


def test_wrong_key_is_refused_at_the_auth_message(mec, cluster):
    """The server closes right after a wrong AUTH, without waiting for anything more."""
    before = counts(mec)
    with RawClient(address(cluster.connection_file), None) as raw:
        hello = raw.recv_exact(P.HELLO_SIZE)
        auth, _, _ = P.client_auth(_wrong_key(key_of(cluster.connection_file)), hello)
        raw.send(auth)
        t0 = time.monotonic()
        got, closed = raw.read_until_closed(8.0)
        # Closed at once: well before the 10 s handshake timeout, so it was the proof
        # that got it refused, not silence.
        assert closed and time.monotonic() - t0 < 5.0, "a wrong AUTH was not refused"
        assert got == b"", f"the controller answered a wrong AUTH with {len(got)} bytes"
    assert_nothing_ran(mec, before)


def test_frame_sent_after_a_wrong_key_never_reaches_the_engines(mec, cluster):
    mec.push(dict(sec_hit=0))
    before = counts(mec)
    with RawClient(address(cluster.connection_file), None) as raw:
        hello = raw.recv_exact(P.HELLO_SIZE)
        wrong = _wrong_key(key_of(cluster.connection_file))
        auth, nonce_s, nonce_c = P.client_auth(wrong, hello)
        # What a client with that key would send next, all in one write.
        sender = P.Sender(P._mac(wrong, b"c2s", nonce_s, nonce_c))
        frame = b"".join(bytes(c) for c in sender.encode(
            P.EXECUTE, {"code": "sec_hit = sec_hit + 1", "targets": "all", "req": 1,
                        "result_id": "sec-wrongkey", "block": True}))
        try:
            raw.send(auth + frame)
        except OSError:
            pass
        got, closed = raw.read_until_closed(8.0)
        assert closed and got == b""
    assert mec.pull("sec_hit") == [0] * 4
    assert_nothing_ran(mec, before)


def test_a_frame_without_any_handshake_is_refused(mec, cluster):
    before = counts(mec)
    sender = P.Sender(os.urandom(32))
    frame = b"".join(bytes(c) for c in sender.encode(
        P.EXECUTE, {"code": "pass", "targets": "all", "req": 1, "block": True}))
    assert len(frame) > P.AUTH_SIZE  # read as a (wrong) AUTH, not waited on
    with RawClient(address(cluster.connection_file), None) as raw:
        raw.recv_exact(P.HELLO_SIZE)
        raw.send(frame)
        got, closed = raw.read_until_closed(8.0)
        assert closed and got == b""
    assert_nothing_ran(mec, before)


def _record_hit_session(cluster, tmp_path, px: RecordingProxy) -> client.MultiEngineClient:
    """Through ``px``: push hit=0, execute hit = hit + 1; return the live proxied client."""
    path = via_proxy(cluster.connection_file, tmp_path / "via-proxy.json", px)
    pc = client.MultiEngineClient(str(path))
    pc.push(dict(hit=0))
    pc.execute("hit = hit + 1")
    assert pc.pull("hit") == [1] * 4
    return pc


def _the_execute_frame(px: RecordingProxy, conn: int = 0) -> Tuple[int, bytes]:
    auth, frames = split_frames(px.data(C2S, conn))
    assert len(auth) == P.AUTH_SIZE
    found = [(seq, data) for kind, seq, meta, data in frames
             if kind == P.EXECUTE and meta.get("code") == "hit = hit + 1"]
    assert len(found) == 1, [(k, m) for k, _s, m, _d in frames]
    return found[0]


def test_recorded_session_replayed_on_a_new_connection_runs_nothing(mec, cluster, tmp_path):
    ip, port = address(cluster.connection_file)
    with RecordingProxy(ip, port) as px:
        pc = _record_hit_session(cluster, tmp_path, px)
        pc.close()
        recorded = px.data(C2S, 0)
        assert px.data(S2C, 0)[:4] == P.HELLO_MAGIC
    assert len(recorded) > P.AUTH_SIZE + P.HEADER.size
    before = counts(mec)
    for attempt in range(2):  # the whole stream, then the frames alone
        with RawClient((ip, port), None) as raw:
            raw.recv_exact(P.HELLO_SIZE)
            try:
                raw.send(recorded if attempt == 0 else recorded[P.AUTH_SIZE:])
            except OSError:
                pass  # refused while we were still writing
            got, closed = raw.read_until_closed(8.0)
            assert closed, "a replayed session was not closed"
            assert got == b"", "the controller answered a replayed AUTH"
    assert mec.pull("hit") == [1] * 4
    assert_nothing_ran(mec, before)
    assert mec.get_ids() == [0, 1, 2, 3]


def test_recorded_frame_resent_on_the_same_connection_is_refused(mec, cluster, tmp_path):
    ip, port = address(cluster.connection_file)
    with RecordingProxy(ip, port) as px:
        pc = _record_hit_session(cluster, tmp_path, px)
        try:
            _seq, frame = _the_execute_frame(px)
            before = counts(mec)
            px.inject(0, frame)
            assert px.upstream_closed(0, 10.0), "the controller kept a connection that replayed"
            with pytest.raises(ClusterLost):
                poll_for(lambda: pc.execute("pass") and False, 10.0, what="ClusterLost")
        finally:
            pc.close()
    assert mec.pull("hit") == [1] * 4, "a replayed frame ran again"
    assert_nothing_ran(mec, before)


def test_recorded_frame_renumbered_to_the_next_sequence_is_refused(mec, cluster, tmp_path):
    """Rewriting the sequence number does not help: the tag is keyed by it."""
    ip, port = address(cluster.connection_file)
    with RecordingProxy(ip, port) as px:
        pc = _record_hit_session(cluster, tmp_path, px)
        try:
            _seq, frame = _the_execute_frame(px)
            nxt = pc._chan.sender.seq  # what the controller expects next on this connection
            forged = bytearray(frame)
            struct.pack_into("!Q", forged, 8, nxt)
            before = counts(mec)
            px.inject(0, bytes(forged))
            assert px.upstream_closed(0, 10.0)
        finally:
            pc.close()
    assert mec.pull("hit") == [1] * 4
    assert_nothing_ran(mec, before)


def test_frame_of_one_connection_injected_into_another_is_refused(mec, cluster, tmp_path):
    """Same sequence number, another session: the tag does not verify."""
    ip, port = address(cluster.connection_file)
    with RecordingProxy(ip, port) as px:
        pc = _record_hit_session(cluster, tmp_path, px)
        pc.close()
        path = via_proxy(cluster.connection_file, tmp_path / "second.json", px)
        second = client.MultiEngineClient(str(path))
        try:
            # Bring connection 1 to the sequence number of connection 0's execute frame.
            seq, frame = _the_execute_frame(px, 0)
            while second._chan.sender.seq < seq:
                second.queue_status()
            assert second._chan.sender.seq == seq
            before = counts(mec)
            px.inject(1, frame)
            assert px.upstream_closed(1, 10.0)
        finally:
            second.close()
    assert mec.pull("hit") == [1] * 4
    assert_nothing_ran(mec, before)


# == 2. TLS ===================================================================================

def _marker_session(path: Path, marker: str) -> str:
    pc = client.MultiEngineClient(str(path))
    try:
        res = pc.execute(f"print({marker!r})", targets=0)
        return res[0]["stdout"]
    finally:
        pc.close()


def test_tls_hides_what_the_proxy_sees(tls_cluster, tmp_path):
    info = file_info(tls_cluster.connection_file)
    assert info["tls"] and len(info["tls"]["fingerprint"]) == 64
    marker = f"MARK-{secrets.token_hex(8)}"
    with RecordingProxy(*address(tls_cluster.connection_file)) as px:
        path = via_proxy(tls_cluster.connection_file, tmp_path / "tls-proxy.json", px)
        assert _marker_session(path, marker) == marker + "\n"
        c2s, s2c = px.data(C2S), px.data(S2C)
    assert c2s[:1] == b"\x16" and s2c[:1] == b"\x16", "not a TLS handshake record"
    for name, data in (("client->server", c2s), ("server->client", s2c)):
        assert marker.encode() not in data, f"the marker crossed {name} in clear"
        assert P.MAGIC not in data and P.HELLO_MAGIC not in data, \
            f"mpiengine framing visible {name}"


def test_large_arrays_cross_tls_both_ways_intact(tls_cluster):
    """Frames of many TLS records (read in batches, without a tag of their own: TLS
    authenticates them), in both directions, and small frames between them."""
    import numpy as np
    mec = client.MultiEngineClient(tls_cluster.connection_file)
    try:
        a = np.random.default_rng(5).random(3 * 2**20 + 7)  # ~24 MB: many 16 KiB records
        mec.push({"a": a})
        assert mec.execute("s = float(a.sum())")[0]["stdout"] == ""
        assert mec.pull("s") == [float(a.sum())] * 2
        for got in mec.pull("a"):
            assert np.array_equal(got, a)
        mec.scatter("part", a)
        assert np.array_equal(mec.gather("part"), a)
        # The stream is still in step: small frames after the large ones.
        assert mec.pull("s", targets=1) == [float(a.sum())]
    finally:
        mec.close()


def test_without_tls_the_proxy_sees_the_marker(cluster, tmp_path):
    """The control for the test above: on loopback ``auto`` means off, and it shows."""
    assert file_info(cluster.connection_file)["tls"] is None
    marker = f"MARK-{secrets.token_hex(8)}"
    with RecordingProxy(*address(cluster.connection_file)) as px:
        path = via_proxy(cluster.connection_file, tmp_path / "plain-proxy.json", px)
        assert _marker_session(path, marker) == marker + "\n"
        c2s, s2c = px.data(C2S), px.data(S2C)
    assert marker.encode() in c2s and marker.encode() in s2c


class _SendRecorder:
    """Record every Python-level send of this process (plain and TLS sockets)."""

    def __init__(self, monkeypatch: Any) -> None:
        self.sent: List[bytes] = []
        self.thread = threading.current_thread()  # the client's; not an Impostor's
        for cls in (socket.socket, ssl.SSLSocket):
            for name in ("send", "sendall", "sendmsg", "write"):
                orig = getattr(cls, name, None)
                if orig is None:
                    continue
                monkeypatch.setattr(cls, name, self._wrap(orig))

    def _wrap(self, orig: Any) -> Any:
        def wrapped(sock: Any, data: Any, *a: Any, **kw: Any) -> Any:
            if threading.current_thread() is not self.thread:
                pass
            elif isinstance(data, (list, tuple)):
                self.sent.append(b"".join(bytes(d) for d in data))
            else:
                self.sent.append(bytes(data))
            return orig(sock, data, *a, **kw)
        return wrapped


class Impostor:
    """A TLS server with its own certificate that speaks HELLO and records what it gets."""

    def __init__(self) -> None:
        cert, key, self.fingerprint = tls.make_certificate("impostor")
        self.ctx = tls.server_context(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = b""
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            self.listener.settimeout(20)
            sock, _ = self.listener.accept()
            sock.settimeout(5)
            with self.ctx.wrap_socket(sock, server_side=True) as s:
                s.sendall(P.server_hello()[0])
                while len(self.received) < P.AUTH_SIZE:  # then hang up, as on a bad key
                    data = s.recv(4096)
                    if not data:
                        break
                    self.received += data
        except (OSError, ssl.SSLError):
            pass
        finally:
            self.listener.close()
            self.done.set()


@pytest.mark.parametrize("pinned", ["impostor", "cluster"])
def test_a_server_with_another_certificate_gets_no_mpiengine_bytes(tls_cluster, tmp_path,
                                                                   monkeypatch, pinned):
    """A man in the middle with its own certificate: refused before the AUTH is sent.

    With ``pinned='impostor'`` (the control) the client trusts the impostor and the
    impostor does receive the 64-byte AUTH: the recording would catch a leak.
    """
    imp = Impostor()
    real = file_info(tls_cluster.connection_file)
    fp = imp.fingerprint if pinned == "impostor" else real["tls"]["fingerprint"]
    path = private_copy(tls_cluster.connection_file, tmp_path / "mitm.json", ip="127.0.0.1",
                        port=imp.port, tls={"fingerprint": fp})
    rec = _SendRecorder(monkeypatch)
    with pytest.raises(ConnectError) as info:
        client.MultiEngineClient(str(path), timeout=5)
    monkeypatch.undo()
    assert imp.done.wait(10)
    if pinned == "impostor":
        # It trusted the impostor: the key proof went out (and then failed).
        assert len(imp.received) == P.AUTH_SIZE and rec.sent
        assert isinstance(info.value, AuthenticationError)
    else:
        assert isinstance(info.value, AuthenticationError), repr(info.value)
        assert "certificate" in str(info.value)
        assert imp.received == b"", "mpiengine bytes reached a server with the wrong certificate"
        assert rec.sent == [], f"the client sent {rec.sent!r} before checking the certificate"
    assert real["key"] not in str(info.value)


def test_wrong_fingerprint_is_refused_and_the_tls_cluster_keeps_serving(tls_cluster, tmp_path,
                                                                        monkeypatch):
    real = file_info(tls_cluster.connection_file)
    path = private_copy(tls_cluster.connection_file, tmp_path / "wrongfp.json",
                        tls={"fingerprint": "00" * 32})
    rec = _SendRecorder(monkeypatch)
    with pytest.raises(AuthenticationError) as info:
        client.MultiEngineClient(str(path), timeout=10)
    monkeypatch.undo()
    assert rec.sent == []
    assert "does not match the connection file" in str(info.value)
    assert real["key"] not in str(info.value) and real["tls"]["fingerprint"] not in str(info.value)
    with tls_cluster.client() as good:
        assert good.execute("t = 6 * 7; print(t)", targets=0)[0]["stdout"] == "42\n"


def test_plaintext_client_is_not_served_by_a_tls_controller(tls_cluster, tmp_path):
    """A file with TLS stripped (a downgrade) gets no HELLO: a timeout, no plaintext talk."""
    path = private_copy(tls_cluster.connection_file, tmp_path / "downgrade.json", tls=None)
    t0 = time.monotonic()
    with pytest.raises(ConnectError):
        client.MultiEngineClient(str(path), timeout=1)
    assert time.monotonic() - t0 < 8


@pytest.mark.parametrize("mode, ip, expected", [
    ("auto", "127.0.0.1", False), ("auto", "127.8.9.10", False), ("auto", "::1", False),
    ("auto", "0.0.0.0", True), ("auto", "10.1.2.3", True), ("auto", "192.168.0.5", True),
    ("auto", "::", True), ("auto", "compute-node-7", True),
    ("on", "127.0.0.1", True), ("on", "10.1.2.3", True),
    ("off", "127.0.0.1", False), ("off", "10.1.2.3", False),
])
def test_tls_wanted(mode, ip, expected):
    assert tls.wanted(mode, ip) is expected


@pytest.mark.parametrize("mode", ["yes", "ON", "", "true"])
def test_tls_wanted_rejects_unknown_modes(mode):
    with pytest.raises(ValueError, match="auto, on, off"):
        tls.wanted(mode, "127.0.0.1")


# == 3. the connection file and the key ======================================================

def test_connection_file_is_0600_and_never_readable_while_starting(limited):
    mode = limited.connection_file.stat().st_mode & 0o777
    assert mode == 0o600, oct(mode)
    assert limited.connection_file.name in limited.mode_watch.seen
    assert limited.mode_watch.exposed == [], \
        f"group/world-readable while the cluster started: {limited.mode_watch.exposed}"


def test_connection_write_never_widens_then_narrows(tmp_path, monkeypatch):
    """Created 0600 (even under umask 0), linked into place, never chmod-ed."""
    calls: List[str] = []
    at_link: List[int] = []
    real_link = os.link

    def link(src: str, dst: str, *a: Any, **kw: Any) -> None:
        at_link.append(os.stat(src).st_mode & 0o777)
        real_link(src, dst, *a, **kw)

    for name in ("chmod", "fchmod", "lchmod"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, lambda *a, _n=name, **k: calls.append(_n))
    monkeypatch.setattr(os, "link", link)
    old = os.umask(0)
    try:
        path = tmp_path / "sec" / "controller-x.json"
        connection.write(connection.ConnectionInfo.new("127.0.0.1", 1234), str(path))
    finally:
        os.umask(old)
    assert calls == [], f"the connection file was chmod-ed: {calls}"
    assert at_link == [0o600]
    assert path.stat().st_mode & 0o777 == 0o600
    assert os.listdir(path.parent) == [path.name]


def _all_texts_of(pids: Dict[int, str]) -> Dict[str, bytes]:
    out = {}
    for pid in pids:
        for what in ("cmdline", "environ"):
            try:
                with open(f"/proc/{pid}/{what}", "rb") as f:
                    out[f"{pid}/{what}"] = f.read()
            except OSError:
                pass
    return out


def test_key_not_in_argv_or_environment_of_any_process(cluster):
    key = file_info(cluster.connection_file)["key"]
    pids = cluster.job_pids()
    assert len(pids) >= 1 + 4 + 1, f"expected mpiexec, a proxy and 5 ranks; got {pids}"
    texts = _all_texts_of(pids)
    assert any(f.endswith("cmdline") for f in texts)
    for where, data in texts.items():
        for form in (key.encode(), key.upper().encode(), bytes.fromhex(key)):
            assert form not in data, f"the key is in /proc/{where}"


def _cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpiengine", *args], capture_output=True,
                          text=True, timeout=timeout, env=harness.mpi_env(),
                          cwd=str(harness.REPO_ROOT))


def test_key_not_in_status_output(cluster):
    key = file_info(cluster.connection_file)["key"]
    r = _cli("status", "--connection-file", str(cluster.connection_file))
    assert r.returncode == 0, r.stderr
    assert "4 engines" in r.stdout
    assert key not in r.stdout + r.stderr


def test_key_not_in_error_messages_or_reprs(mec, cluster, tmp_path):
    key = file_info(cluster.connection_file)["key"]
    wrong = private_copy(cluster.connection_file, tmp_path / "wrong.json",
                         key=_wrong_key(bytes.fromhex(key)).hex())
    dead = private_copy(cluster.connection_file, tmp_path / "dead.json", port=harness.free_port())
    badport = private_copy(cluster.connection_file, tmp_path / "badport.json", port="x")
    texts = [repr(mec), str(mec), repr(mec.info), str(mec.info), repr(mec._chan),
             repr(mec.execute("pass", block=False))]
    for path, cls in ((wrong, AuthenticationError), (dead, ConnectError), (badport, ConnectError)):
        with pytest.raises(cls) as info:
            client.MultiEngineClient(str(path), timeout=5)
        e = info.value
        texts += [str(e), repr(e), "".join(traceback.format_exception(type(e), e, e.__traceback__))]
        texts += [str(x) for x in (e.__cause__, e.__context__) if x is not None]
    assert any("refused the key" in t for t in texts)
    for text in texts:
        assert key not in text and key.upper() not in text, text


def test_serve_refuses_a_live_file_without_showing_the_key(mec, cluster, tmp_path):
    key = file_info(cluster.connection_file)["key"]
    before = cluster.connection_file.read_text()
    cmd = [harness.find_mpiexec(), "-n", "2", sys.executable, "-m", "mpiengine", "serve",
           "--connection-file", str(cluster.connection_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=harness.mpi_env(), cwd=str(harness.REPO_ROOT),
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pids = harness.descendants(proc.pid)
        harness.signal_pids(pids, 9)
        proc.kill()
        proc.communicate()
        pytest.fail("serve on a live connection file did not exit within 60 s")
    text = out.decode(errors="replace")
    assert proc.returncode != 0, text
    assert str(cluster.connection_file) in text and "already" in text, text
    assert key not in text
    assert cluster.connection_file.read_text() == before
    assert counts(mec) and mec.get_ids() == [0, 1, 2, 3]


def test_key_not_in_debug_logs(lmec, limited, tmp_path):
    """With MPIENGINE_DEBUG=1, after connections good and bad, errors and refusals."""
    key = file_info(limited.connection_file)["key"]
    wrong = private_copy(limited.connection_file, tmp_path / "w.json",
                         key=_wrong_key(bytes.fromhex(key)).hex())
    with pytest.raises(AuthenticationError):
        client.MultiEngineClient(str(wrong), timeout=5)
    with RawClient(address(limited.connection_file), key_of(limited.connection_file)) as raw:
        raw.send(b"\x00" * 64)
        raw.read_until_closed(5)
    with pytest.raises(Exception):
        lmec.execute("raise ValueError('boom')")
    lmec.execute("print('fine')")
    r = _cli("status", "--connection-file", str(limited.connection_file))
    assert r.returncode == 0
    log = limited.log_file.read_text(errors="replace")
    assert "DEBUG" in log, "MPIENGINE_DEBUG=1 produced no debug lines"
    assert "did not prove knowledge of the key" in log and "refused" in log
    assert key not in log and key.upper() not in log


# == 4. hostile bytes ==========================================================================

@pytest.mark.parametrize("claim", [10_000_000, 4 * 2**30, 2**63])
def test_oversized_claim_is_closed_before_anything_is_read(lmec, limited, claim):
    before = counts(lmec)
    pid = limited.controller_pid
    rss0 = vm_rss_kb(pid)
    with RawClient(address(limited.connection_file), key_of(limited.connection_file)) as raw:
        head = P.HEADER.pack(P.MAGIC, P.PUSH, 0, 1, 0, 2) + P.LENGTH.pack(claim)
        raw.send(head)  # and nothing else: the lengths alone must get it closed
        t0 = time.monotonic()
        got, closed = raw.read_until_closed(8.0)
        assert closed and time.monotonic() - t0 < 5.0, "an oversized claim was not refused"
    rss1 = vm_rss_kb(pid)
    assert rss1 - rss0 < 5000, f"controller RSS grew by {rss1 - rss0} kB after a refused claim"
    assert_nothing_ran(lmec, before)


def test_many_parts_summing_over_the_limit_are_refused(lmec, limited):
    before = counts(lmec)
    with RawClient(address(limited.connection_file), key_of(limited.connection_file)) as raw:
        n = 50
        head = P.HEADER.pack(P.MAGIC, P.PUSH, 0, n, 0, 2)
        raw.send(head + b"".join(P.LENGTH.pack(LIMIT // 10) for _ in range(n)))
        _, closed = raw.read_until_closed(8.0)
        assert closed
    assert_nothing_ran(lmec, before)


def test_frame_at_the_limit_is_served(lmec, limited):
    lmec.push(dict(big=b"x" * (LIMIT - 2000)), targets=0)
    assert lmec.execute("print(len(big))", targets=0)[0]["stdout"] == f"{LIMIT - 2000}\n"


def test_real_client_over_the_limit_is_refused_before_sending(lmec, limited):
    """The limit is in the connection file: the client refuses, names it, and goes on."""
    assert file_info(limited.connection_file)["max_message"] == LIMIT
    other = limited.client()
    try:
        before = counts(lmec)
        with pytest.raises(ValueError) as info:
            other.push(dict(big=b"x" * (3 * LIMIT)), targets=0, timeout=30)
        text = str(info.value).replace(str(limited.connection_file), "<file>")
        assert str(LIMIT) in text and "max-message-size" in text, text
        assert other.execute("print(2)", targets=0)[0]["stdout"] == "2\n"
        assert_nothing_ran(lmec, {i: n + (i == 0) for i, n in before.items()})
    finally:
        other.close()


def test_client_ignoring_the_limit_loses_only_its_connection(lmec, limited, tmp_path):
    """A client that believes a larger limit is cut off by the controller, alone."""
    path = private_copy(limited.connection_file, tmp_path / "biglimit.json",
                        max_message=100 * LIMIT)
    other = client.MultiEngineClient(str(path))
    try:
        with pytest.raises(ClusterLost):
            other.push(dict(big=b"x" * (3 * LIMIT)), targets=0, timeout=30)
    finally:
        other.close()
    assert lmec.execute("print(1)", targets=0)[0]["stdout"] == "1\n"


def _valid_frame(raw: RawClient, code: str = "pass", rid: Optional[str] = None) -> bytes:
    return raw.frame_bytes(P.EXECUTE, {"code": code, "targets": "all", "req": 1,
                                       "result_id": rid or f"sec-{secrets.token_hex(4)}",
                                       "block": True})


@pytest.mark.parametrize("cut", ["header", "lengths", "meta", "tag", "one-short"])
def test_truncated_frame_then_close(lmec, limited, cut):
    lmec.push(dict(trunc=0))
    before = counts(lmec)
    with RawClient(address(limited.connection_file), key_of(limited.connection_file)) as raw:
        frame = _valid_frame(raw, "trunc += 1")
        meta_at = P.HEADER.size  # no parts
        n = {"header": 7, "lengths": P.HEADER.size, "meta": meta_at + 5,
             "tag": len(frame) - P.TAG_SIZE + 3, "one-short": len(frame) - 1}[cut]
        try:
            raw.send(frame[:n])
            raw.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        _, closed = raw.read_until_closed(8.0)
        assert closed
    assert lmec.pull("trunc") == [0, 0]
    assert_nothing_ran(lmec, before)


def _tagged(raw: RawClient, header_fields: Tuple, lengths: List[int], meta: bytes,
            parts: List[bytes]) -> bytes:
    """A frame with a valid tag for whatever header and meta bytes: a key holder's mistakes."""
    seq = raw.sender.seq
    raw.sender.seq += 1
    magic, kind, flags, nparts, meta_len = header_fields
    head = P.HEADER.pack(magic, kind, flags, nparts, seq, meta_len)
    head += b"".join(P.LENGTH.pack(n) for n in lengths)
    mac = P._frame_mac(raw.sender.key, seq)
    mac.update(head)
    mac.update(meta)
    for p in parts:
        mac.update(p)
    return head + meta + b"".join(parts) + mac.finalize()


@pytest.mark.parametrize("case", [
    "bad-magic", "unknown-kind", "meta-not-json", "meta-a-list", "meta-too-long",
    "lengths-lie", "wrong-seq", "flipped-tag", "garbage-after-auth",
])
def test_malformed_frames_close_the_connection(lmec, limited, case):
    lmec.push(dict(mal=0))
    before = counts(lmec)
    code = b'{"code":"mal += 1","targets":"all","req":1,"block":true}'
    with RawClient(address(limited.connection_file), key_of(limited.connection_file)) as raw:
        if case == "bad-magic":
            data = _tagged(raw, (b"MPE2", P.EXECUTE, 0, 0, len(code)), [], code, [])
        elif case == "unknown-kind":
            data = _tagged(raw, (P.MAGIC, 200, 0, 0, len(code)), [], code, [])
        elif case == "meta-not-json":
            data = _tagged(raw, (P.MAGIC, P.EXECUTE, 0, 0, 5), [], b"{code", [])
        elif case == "meta-a-list":
            data = _tagged(raw, (P.MAGIC, P.EXECUTE, 0, 0, 7), [], b'["mal"]', [])
        elif case == "meta-too-long":
            data = _tagged(raw, (P.MAGIC, P.EXECUTE, 0, 0, P.MAX_META + 1), [], b"", [])
        elif case == "lengths-lie":  # the lengths say 3, the part has 2 and the tag follows
            data = _tagged(raw, (P.MAGIC, P.PUSH, 0, 1, len(code)), [3], code, [b"ab"])
        elif case == "wrong-seq":
            raw.sender.seq = 5
            data = _valid_frame(raw, "mal += 1")
        elif case == "flipped-tag":
            data = bytearray(_valid_frame(raw, "mal += 1"))
            data[-1] ^= 1
            data = bytes(data)
        else:
            data = os.urandom(4096)
        try:
            raw.send(data)
            raw.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused (reset) while we were still writing
        got, closed = raw.read_until_closed(8.0)
        assert closed and got == b"", f"{case}: answered {got[:60]!r}"
    assert lmec.pull("mal") == [0, 0]
    assert_nothing_ran(lmec, before)


def test_a_correct_raw_frame_does_run(lmec, limited):
    """The control for the malformed-frame tests: the same RawClient, done right, runs code."""
    lmec.push(dict(mal=0))
    with RawClient(address(limited.connection_file), key_of(limited.connection_file)) as raw:
        raw.send(_valid_frame(raw, "mal += 1"))
        reply = raw.read_frame(30)
        assert reply.kind == P.RESULT
    assert lmec.pull("mal") == [1, 1]


def _dribble(addr: Tuple[str, int], data: bytes, stop: threading.Event,
             sent: List[int], key: Optional[bytes] = None) -> None:
    try:
        with RawClient(addr, key) as raw:
            if key is None:
                raw.recv_exact(P.HELLO_SIZE)
            for b in data:
                if stop.is_set():
                    return
                raw.send(bytes([b]))
                sent[0] += 1
                stop.wait(1.0)
    except OSError:
        pass


@pytest.mark.timeout(60)
def test_clients_dribbling_one_byte_a_second_do_not_slow_others(lmec, limited):
    """Three dribble their AUTH, three (authenticated) a frame; round trips stay < 1 s."""
    addr, key = address(limited.connection_file), key_of(limited.connection_file)
    frame = b"".join(bytes(c) for c in P.Sender(b"k" * 32).encode(P.PUSH, {"req": 1},
                                                                   [b"z" * 100]))
    stop, sent = threading.Event(), [0]
    jobs = [(os.urandom(P.AUTH_SIZE - 1), None)] * 3 + [(frame, key)] * 3
    threads = [threading.Thread(target=_dribble, args=(addr, data, stop, sent, k), daemon=True)
               for data, k in jobs]
    for t in threads:
        t.start()
    try:
        poll_for(lambda: sent[0] >= 6, 10, what="the dribblers to start")
        times = []
        t_end = time.monotonic() + 5.0
        while time.monotonic() < t_end:
            times.append(round_trip(lmec))
            time.sleep(0.1)
        assert sent[0] >= 18, "the dribblers stopped: the test did not test anything"
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert max(times) < 1.0, f"execute round trips while dribbling: max {max(times):.3f} s"


@pytest.mark.timeout(60)
def test_200_idle_connections_do_not_stop_a_real_client(lmec, limited):
    addr, key = address(limited.connection_file), key_of(limited.connection_file)
    socks: List[socket.socket] = []
    raws: List[RawClient] = []
    try:
        for _ in range(200):
            socks.append(socket.create_connection(addr, timeout=10))
        for _ in range(20):  # and some that did authenticate, then fell silent
            raws.append(RawClient(addr, key))
        times = [round_trip(lmec) for _ in range(10)]
        assert max(times) < 1.0, f"round trips with 220 idle connections: {times}"
        t0 = time.monotonic()
        with limited.client() as newcomer:
            assert newcomer.pull("__name__", targets=0) == ["__main__"]
        assert time.monotonic() - t0 < 2.0, "a new client waited behind idle connections"
    finally:
        for s in socks:
            s.close()
        for r in raws:
            r.close()
    assert round_trip(lmec) < 1.0


# -- the parser fuzz: handshake and frames against the live controller --------------------------

def _mutations() -> Any:
    """A change that leaves no valid frame intact: (what, position/arg, value)."""
    return st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
        st.tuples(st.just("field"), st.sampled_from(["magic", "kind", "flags", "nparts",
                                                     "seq", "meta_len"]),
                  st.integers(0, 2**64 - 1)),
        st.tuples(st.just("splice"), st.integers(0, 10**6), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("replace"), st.just(0), st.binary(min_size=1, max_size=512)),
    )


_FIELDS = {"magic": (0, "4s"), "kind": (4, "B"), "flags": (5, "B"), "nparts": (6, "H"),
           "seq": (8, "Q"), "meta_len": (16, "I")}


def mutate(frame: bytes, mutation: Tuple[str, Any, Any]) -> Optional[bytes]:
    """Apply a mutation; None if it would leave the frame unchanged (not a test)."""
    what, arg, value = mutation
    data = bytearray(frame)
    if what == "flip":
        data[arg % len(data)] ^= value
    elif what == "truncate":
        data = data[:arg % len(data)]
    elif what == "field":
        off, fmt = _FIELDS[arg]
        size = struct.calcsize("!" + fmt)
        new = (value.to_bytes(8, "big")[-4:] if fmt == "4s"
               else (value % (1 << (8 * size))).to_bytes(size, "big"))
        if bytes(data[off:off + size]) == new:
            return None
        data[off:off + size] = new
    elif what == "splice":
        pos = arg % len(data)
        data[pos:pos] = value
    else:
        data = bytearray(value)
    if bytes(data) == frame or bytes(data).startswith(frame):
        return None
    return bytes(data)


class Fuzzer:
    """Send hostile bytes to a live controller; count what was tried."""

    def __init__(self, path: Path) -> None:
        self.addr, self.key = address(path), key_of(path)
        self.handshakes = 0
        self.frames = 0
        self.last: "collections.deque[str]" = collections.deque(maxlen=8)

    def handshake(self, data: bytes) -> None:
        with RawClient(self.addr, None) as raw:
            raw.recv_exact(P.HELLO_SIZE)
            _send_and_finish(raw, data)
        self.handshakes += 1

    def frame(self, mutation: Tuple[str, Any, Any], prefix_ok: bool) -> None:
        with RawClient(self.addr, self.key) as raw:
            if prefix_ok:  # one good frame first, so the bad one is not frame number 0
                raw.request(P.KEYS, {"req": 0, "targets": "all", "block": True})
                assert raw.read_frame(30).kind == P.RESULT
            frame = _valid_frame(raw, "fuzz_hits += 1")
            bad = mutate(frame, mutation)
            if bad is None:
                return
            self.last.append(f"{mutation!r:.120} prefix={prefix_ok}: {bad[:48].hex()}")
            _send_and_finish(raw, bad)
        self.frames += 1


def _send_and_finish(raw: RawClient, data: bytes) -> None:
    try:
        raw.send(data)
        raw.sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # refused while we were writing
    _, closed = raw.read_until_closed(10.0)
    assert closed, f"the controller kept a connection after {data[:40]!r}..."


def _cluster_log_tail(path: Path, n: int = 30) -> str:
    log = Path(path).with_suffix(".log")
    try:
        return "log tail:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no log at {log})"


def run_fuzz(path: Path, seconds: float, mec: Any, batch: int = 40) -> Fuzzer:
    """Fuzz the handshake and the frame parser for about ``seconds``; check nothing ran.

    Hypothesis runs in batches of ``batch`` examples (each batch with a fresh seed)
    until the time is up; between batches a real client must still be served.
    """
    fz = Fuzzer(path)
    mec.push(dict(fuzz_hits=0))
    before = counts(mec)
    quick = settings(max_examples=batch, deadline=None, database=None,
                     suppress_health_check=list(HealthCheck))

    @quick
    @given(st.binary(min_size=0, max_size=300))
    def fuzz_handshake(data: bytes) -> None:
        fz.handshake(data)

    @quick
    @given(_mutations(), st.booleans())
    def fuzz_frames(mutation: Tuple[str, Any, Any], prefix_ok: bool) -> None:
        fz.frame(mutation, prefix_ok)

    deadline = time.monotonic() + seconds
    probes = 0
    while time.monotonic() < deadline:
        fuzz_handshake()
        fuzz_frames()
        fuzz_frames()
        try:
            took = round_trip(mec)
        except CommandTimeout as e:
            pytest.fail(f"a probe did not return under fuzzing ({e}); "
                        f"{fz.handshakes} handshakes, {fz.frames} frames so far; the last "
                        f"frames sent:\n" + "\n".join(fz.last) +
                        f"\nqueues: {mec.queue_status()}\n{_cluster_log_tail(path)}")
        assert took < 5.0, f"the controller got slow under fuzzing: a probe took {took:.1f} s"
        probes += 1
    assert mec.pull("fuzz_hits") == [0] * len(mec.get_ids()), "a mutated frame ran"
    # Only our own probes executed (KEYS prefixes execute nothing).
    assert_nothing_ran(mec, {i: n + probes for i, n in before.items()})
    return fz


@pytest.mark.timeout(90)
def test_fuzz_handshake_and_frames(lmec, limited):
    fz = run_fuzz(limited.connection_file, FUZZ_SECONDS, lmec)
    print(f"fuzz: {fz.handshakes} handshakes, {fz.frames} frames in {FUZZ_SECONDS:g} s")
    assert fz.handshakes >= 20 and fz.frames >= 20
    assert limited.alive()


# -- a key holder's malformed requests --------------------------------------------------------

@pytest.mark.parametrize("bad_counts", [
    [1.5, 0.5], [-1, 3], [2**70, 2 - 2**70], "ab", [1, "1"], [True, True], None,
], ids=["float", "negative", "huge", "string", "mixed", "bools", "null"])
def test_malformed_scatter_counts_are_refused(lmec, limited, bad_counts):
    """Once a bug: counts that summed right but were not ints >= 0 reached the engines,
    whose runtime died on them (MPI_Abort: the whole cluster lost)."""
    before = counts(lmec)
    meta = {"req": 1, "targets": "all", "result_id": f"bad-{secrets.token_hex(3)}",
            "block": True, "name": "s", "kind": "pickle", "counts": bad_counts}
    with RawClient(address(limited.connection_file), key_of(limited.connection_file)) as raw:
        raw.request(P.SCATTER, meta, [b"ab"])
        try:
            reply = raw.read_frame(10)
            if bad_counts is not None:  # null means "no scatter": the engines may answer
                assert reply.kind == P.ERROR, reply
        except (EOFError, ConnectionError):
            pass  # closing the connection is an acceptable refusal too
    assert limited.alive(), f"the cluster died of counts={bad_counts!r}"
    assert_nothing_ran(lmec, before)
