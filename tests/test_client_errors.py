"""Bad input gets a clear error, and the cluster stays up afterwards.

Each test makes one mistake (or a few of one kind) and then checks that the next
ordinary command works (:func:`assert_works`). Where DESIGN.md says an error is
raised "before anything is sent", the engines' execution counters prove it:
they advance by exactly one for the one good command that follows.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

import harness
from mpiengine import client
from mpiengine.errors import (AuthenticationError, ClusterLost, CommandTimeout,
                              CompositeError, ConnectError)
from mpiengine.results import PendingResult

pytestmark = pytest.mark.mpi

ALL = [0, 1, 2, 3]
PICKLE_ERRORS = (TypeError, pickle.PicklingError, AttributeError)


def counts(mec, targets="all"):
    """Run ``pass`` and return ``{engine id: its execution number}``."""
    return {r["id"]: r["number"] for r in mec.execute("pass", targets=targets, block=True)}


def assert_works(mec):
    """The cluster still answers: a push, an execute and a pull on every engine."""
    mec.push(dict(ok_value=41), targets="all", block=True)
    mec.execute("ok_value += 1", targets="all", block=True)
    assert mec.pull("ok_value", targets="all", block=True) == [42] * 4


def assert_nothing_ran(mec, before):
    after = counts(mec)
    assert after == {i: before[i] + 1 for i in ALL}, \
        f"a rejected call reached the engines: counters {before} -> {after}"


# -- bad targets ------------------------------------------------------------------

@pytest.mark.parametrize("targets, needle", [
    (7, "7"), ("some", "some"), ([0, 9], "9"), (-1, "-1"), ([0, "1"], "1"), (4, "4"), ([4], "4"),
])
def test_bad_targets_rejected_before_sending(mec, targets, needle):
    before = counts(mec)
    with pytest.raises(ValueError) as info:
        mec.execute("bad_target_ran = True", targets=targets)
    assert needle in str(info.value), f"the message should name the bad target: {info.value}"
    for call in (lambda: mec.push(dict(x=1), targets=targets),
                 lambda: mec.pull("x", targets=targets),
                 lambda: mec.scatter("x", range(8), targets=targets),
                 lambda: mec.gather("x", targets=targets)):
        with pytest.raises(ValueError):
            call()
    assert_nothing_ran(mec, before)
    assert_works(mec)
    with pytest.raises(CompositeError):
        mec.pull("bad_target_ran")


def test_bad_targets_attribute(mec):
    # Rejected when set, or at the latest when used; never sent.
    with pytest.raises(ValueError):
        mec.targets = 7
        mec.execute("x = 1")
    mec.targets = "all"
    assert_works(mec)


def test_bad_targets_nonblocking(mec):
    with pytest.raises(ValueError):
        mec.execute("x = 1", targets=[0, 5], block=False)
    assert_works(mec)


# -- unknown names, engine-side failures -------------------------------------------------

def test_pull_unknown_name(mec):
    with pytest.raises(CompositeError) as info:
        mec.pull("no_such_name")
    e = info.value
    assert [r.engine_id for r in e.elist] == ALL
    assert {r.ename for r in e.elist} == {"NameError"}
    assert all("no_such_name" in r.evalue for r in e.elist)
    assert "NameError" in str(e)
    assert_works(mec)


def test_pull_unknown_name_one_target(mec):
    with pytest.raises(CompositeError) as info:
        mec.pull("no_such_name", targets=1)
    assert [(r.engine_id, r.ename) for r in info.value.elist] == [(1, "NameError")]
    assert_works(mec)


def test_pull_name_defined_on_some_engines(mec):
    # A gather where some engines fail and others succeed must not strand anyone.
    mec.execute("if comm.rank == 2:\n    only2 = 5")
    with pytest.raises(CompositeError) as info:
        mec.pull("only2")
    assert [(r.engine_id, r.ename) for r in info.value.elist] == \
        [(0, "NameError"), (1, "NameError"), (3, "NameError")]
    assert mec.pull("only2", targets=2) == [5]
    assert_works(mec)


def test_gather_unknown_name(mec):
    with pytest.raises(CompositeError) as info:
        mec.gather("no_such_name")
    assert {r.ename for r in info.value.elist} == {"NameError"}
    assert_works(mec)


def test_pull_unpicklable_value_on_engines(mec):
    mec.execute("import threading; lk = threading.Lock()")
    with pytest.raises(CompositeError) as info:
        mec.pull("lk")
    assert [r.engine_id for r in info.value.elist] == ALL
    with pytest.raises(CompositeError):
        mec.pull("lk", targets=[1])
    with pytest.raises(CompositeError):
        mec.pull_function("lk", targets=[1])
    assert_works(mec)


def test_syntax_error(mec):
    with pytest.raises(CompositeError) as info:
        mec.execute("x = = 1")
    e = info.value
    assert [r.engine_id for r in e.elist] == ALL
    assert {r.ename for r in e.elist} == {"SyntaxError"}
    assert all(line.startswith(f"[{i}:execute]: SyntaxError: ")
               for i, line in zip(ALL, str(e).splitlines()[1:]))
    with pytest.raises(SyntaxError):
        e.raise_exception()
    assert_works(mec)


def test_sys_exit_is_reported_and_engine_survives(mec):
    with pytest.raises(CompositeError) as info:
        mec.execute("import sys; sys.exit(3)")
    assert {r.ename for r in info.value.elist} == {"SystemExit"}
    with pytest.raises(CompositeError):
        mec.execute("exit()", targets=[1])
    assert_works(mec)


def test_keyboardinterrupt_in_user_code_is_reported(mec):
    with pytest.raises(CompositeError) as info:
        mec.execute("raise KeyboardInterrupt", targets=[0, 3])
    assert [(r.engine_id, r.ename) for r in info.value.elist] == \
        [(0, "KeyboardInterrupt"), (3, "KeyboardInterrupt")]
    assert_works(mec)


def test_user_defined_exception(mec):
    with pytest.raises(CompositeError) as info:
        mec.execute("class MyErr(Exception):\n    pass\nraise MyErr('boom')", targets=0)
    rec = info.value.elist[0]
    assert (rec.engine_id, rec.ename, rec.evalue) == (0, "MyErr", "boom")
    assert "MyErr" in rec.traceback
    # Not a builtin: it comes back as a RemoteError that names the engine.
    with pytest.raises(Exception) as raised:
        info.value.raise_exception()
    assert "MyErr" in str(raised.value) and "boom" in str(raised.value)
    assert_works(mec)


def test_exception_with_broken_str(mec):
    code = ("class Weird(Exception):\n"
            "    def __str__(self):\n"
            "        raise RuntimeError('no str for you')\n"
            "raise Weird()")
    with pytest.raises(CompositeError) as info:
        mec.execute(code, targets=[2])
    assert info.value.elist[0].ename == "Weird"
    assert_works(mec)


# -- bad arguments, rejected in the client -------------------------------------------------

@pytest.mark.parametrize("bad", [threading.Lock, socket.socket, lambda: (i for i in range(3))],
                         ids=["lock", "socket", "generator"])
def test_push_unpicklable_sends_nothing(mec, bad):
    obj = bad()
    try:
        before = counts(mec)
        with pytest.raises(PICKLE_ERRORS):
            mec.push(dict(fine=1, bad=obj))
        assert_nothing_ran(mec, before)
        # Nothing of the dict arrived: not even its picklable part.
        with pytest.raises(CompositeError):
            mec.pull("fine")
        assert_works(mec)
    finally:
        if isinstance(obj, socket.socket):
            obj.close()


def test_scatter_unpicklable_sends_nothing(mec):
    before = counts(mec)
    with pytest.raises(PICKLE_ERRORS):
        mec.scatter("s", [1, 2, threading.Lock(), 4])
    assert_nothing_ran(mec, before)
    assert_works(mec)


def test_scatter_non_sequence(mec):
    before = counts(mec)
    with pytest.raises(TypeError):
        mec.scatter("a", 5)
    with pytest.raises(TypeError):
        mec.scatter("a", None)
    assert_nothing_ran(mec, before)
    mec.scatter("a", range(4))
    assert mec.pull("a") == [[0], [1], [2], [3]]


@pytest.mark.parametrize("call", [
    pytest.param(lambda m: m.execute(5), id="execute-int"),
    pytest.param(lambda m: m.push(5), id="push-int"),
    pytest.param(lambda m: m.push(["a", 1]), id="push-list"),
    pytest.param(lambda m: m.push({1: "not a name"}), id="push-nonstr-key"),
    pytest.param(lambda m: m.pull(5), id="pull-int"),
    pytest.param(lambda m: m.scatter(5, [1, 2]), id="scatter-nonstr-name"),
    pytest.param(lambda m: m.push_function(dict(f=5)), id="push_function-noncallable"),
    pytest.param(lambda m: m.map(5, range(4)), id="map-noncallable"),
])
def test_wrong_argument_types(mec, call):
    before = counts(mec)
    with pytest.raises((TypeError, ValueError)):
        call(mec)
    assert_nothing_ran(mec, before)
    assert_works(mec)


def test_push_invalid_identifier(mec):
    # A name that is not an identifier can never be used on the engines.
    with pytest.raises((TypeError, ValueError)):
        mec.push({"not a name": 1})
    assert_works(mec)


def test_raise_exception_bad_index(mec):
    with pytest.raises(CompositeError) as info:
        mec.execute("1/0", targets=[0, 1])
    with pytest.raises(IndexError):
        info.value.raise_exception(excid=5)
    assert_works(mec)


# -- timeouts ------------------------------------------------------------------------

def test_execute_timeout(mec):
    mec.execute("import time")
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        mec.execute("time.sleep(2); slept = True", timeout=0.3)
    assert time.monotonic() - t0 < 1.5
    e = info.value
    assert isinstance(e, TimeoutError)
    assert isinstance(e.pending, PendingResult)
    result = e.pending.get_result(timeout=15)
    assert [d["id"] for d in result] == ALL
    assert mec.pull("slept") == [True] * 4
    assert_works(mec)


def test_get_result_timeout(mec):
    mec.execute("import time")
    pr = mec.execute("time.sleep(1.5)", block=False)
    with pytest.raises(CommandTimeout):
        pr.get_result(timeout=0.2)
    assert [d["id"] for d in pr.get_result(timeout=15)] == ALL
    assert_works(mec)


# -- connecting --------------------------------------------------------------------------

def _connect_fails(path, exc_type=ConnectError, within=10.0):
    t0 = time.monotonic()
    with pytest.raises(exc_type) as info:
        m = client.MultiEngineClient(str(path))
        m.close()  # not reached when the contract holds
    assert time.monotonic() - t0 < within, "a failed connect must fail within seconds"
    assert str(path) in str(info.value), f"the error should name {path}: {info.value}"
    return info.value


def test_error_hierarchy():
    assert issubclass(ConnectError, ConnectionError)
    assert issubclass(AuthenticationError, ConnectError)
    assert issubclass(CommandTimeout, TimeoutError)
    assert issubclass(ClusterLost, ConnectionError)


def test_missing_connection_file(mec, tmp_path):
    _connect_fails(tmp_path / "no-such-cluster.json")
    assert_works(mec)


def test_missing_connection_file_from_environment(mec, tmp_path, monkeypatch):
    path = tmp_path / "also-missing.json"
    monkeypatch.setenv("MPIENGINE_CONNECTION_FILE", str(path))
    t0 = time.monotonic()
    with pytest.raises(ConnectError) as info:
        client.MultiEngineClient()
    assert time.monotonic() - t0 < 10
    assert str(path) in str(info.value)
    assert_works(mec)


@pytest.mark.parametrize("content", [b"", b"not json at all", b"[1, 2, 3]", b'{"ip": "127.0.0.1"}',
                                     b"\xff\xfe\x00garbage"],
                         ids=["empty", "text", "list", "no-port", "binary"])
def test_unreadable_connection_file(mec, tmp_path, content):
    path = tmp_path / "broken.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    _connect_fails(path)
    assert_works(mec)


def test_connection_file_is_a_directory(mec, tmp_path):
    _connect_fails(tmp_path)
    assert_works(mec)


def _private_copy(src, dst, edit=None):
    with open(src) as f:
        info = json.load(f)
    if edit:
        edit(info)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return info


def test_stale_file_nothing_listening(mec, cluster, tmp_path):
    # The file of a cluster that is gone: its port is closed and its pid is dead.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    port = harness.free_port()

    def edit(info):
        info["port"] = port
        info["pid"] = dead.pid

    _private_copy(cluster.connection_file, tmp_path / "stale.json", edit)
    _connect_fails(tmp_path / "stale.json")
    assert_works(mec)


@pytest.mark.timeout(90)
def test_stale_file_of_stopped_cluster(fresh_cluster, tmp_path):
    c = fresh_cluster(n_engines=1)
    stale = tmp_path / "kept.json"
    shutil.copy(c.connection_file, stale)
    m = c.client()
    try:
        assert m.get_ids() == [0]
    finally:
        m.close()
    assert c.stop() == 0, "mec.shutdown() should end the job with exit code 0"
    _connect_fails(stale)
    if c.connection_file.exists():
        _connect_fails(c.connection_file)


def _key_fields(info):
    return [k for k, v in info.items() if "key" in k.lower() and isinstance(v, str) and v]


def test_wrong_key(mec, cluster, tmp_path):
    real = json.loads(cluster.connection_file.read_text())
    fields = _key_fields(real)
    assert fields, f"no key field found in the connection file (fields: {sorted(real)})"

    def edit(info):
        for k in fields:
            info[k] = "".join("a" if ch != "a" else "b" for ch in info[k])

    forged = _private_copy(cluster.connection_file, tmp_path / "forged.json", edit)
    e = _connect_fails(tmp_path / "forged.json", AuthenticationError)
    for k in fields:  # the key never appears in an error message
        assert real[k] not in str(e) and forged[k] not in str(e)
    assert_works(mec)


def test_connection_file_is_private(cluster):
    mode = cluster.connection_file.stat().st_mode & 0o777
    assert mode == 0o600, f"connection file mode is {oct(mode)}, expected 0o600"


# -- the controller keeps serving when a connection misbehaves ---------------------------------

def _address(cluster):
    info = json.loads(cluster.connection_file.read_text())
    return info["ip"], int(info["port"])


@pytest.mark.parametrize("payload", [
    b"", b"GET / HTTP/1.0\r\n\r\n", b"\x00" * 64, b"\xff" * 64, os.urandom(4096),
], ids=["nothing", "http", "zeros", "ones", "random"])
def test_garbage_connection(mec, cluster, payload):
    with socket.create_connection(_address(cluster), timeout=5) as s:
        if payload:
            try:
                s.sendall(payload)
            except OSError:
                pass  # the controller may close on us first
        s.settimeout(5)
        try:
            s.recv(1024)  # whatever it answers, it must not hang (timeout 5 s)
        except OSError:
            pass
    assert_works(mec)


def test_silent_connection_does_not_block_others(mec, cluster):
    # A client that connects and never speaks must not stall the controller.
    s = socket.create_connection(_address(cluster), timeout=5)
    try:
        t0 = time.monotonic()
        assert_works(mec)
        other = client.MultiEngineClient(str(cluster.connection_file))
        try:
            assert other.get_ids() == ALL
        finally:
            other.close()
        assert time.monotonic() - t0 < 10
    finally:
        s.close()


def test_closed_client(mec, cluster):
    other = client.MultiEngineClient(str(cluster.connection_file))
    assert other.get_ids() == ALL
    other.close()
    with pytest.raises(ValueError):
        other.execute("x = 1")
    with pytest.raises(ValueError):
        other.pull("x")
    other.close()  # closing twice is harmless
    assert_works(mec)


def test_closed_client_get_ids(cluster):
    # errors.ClusterLost: "after close(), calls raise ValueError" - get_ids too,
    # rather than answering from a cache as if still connected.
    other = client.MultiEngineClient(str(cluster.connection_file))
    other.close()
    with pytest.raises(ValueError):
        other.get_ids()


def test_client_dropped_without_close(mec, cluster):
    other = client.MultiEngineClient(str(cluster.connection_file))
    assert other.get_ids() == ALL
    other.execute("import time", block=True)
    other.execute("time.sleep(0.3); dropped = 1", block=False)
    del other
    import gc
    gc.collect()
    mec.execute("import time")  # queued behind the dropped client's command
    assert mec.pull("dropped") == [1] * 4
    assert_works(mec)
