"""The connection file: created safely, read strictly, found by the documented rules."""
from __future__ import annotations

import json
import os
import stat
from contextlib import contextmanager

import pytest

from mpiengine import connection
from mpiengine.connection import ConnectionInfo
from mpiengine.errors import ConnectError

pytestmark = pytest.mark.timeout(30)


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No test sees the user's real ~/.mpiengine or environment."""
    monkeypatch.delenv(connection.ENV_FILE, raising=False)
    monkeypatch.delenv(connection.ENV_DIR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def info(**kw) -> ConnectionInfo:
    return ConnectionInfo.new("127.0.0.1", 45678, n_engines=4, **kw)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- write ------------------------------------------------------------------------------
def test_write_creates_mode_0600_even_with_a_permissive_umask(tmp_path):
    path = tmp_path / "controller-default.json"
    with umask(0):
        connection.write(info(), str(path))
    assert mode(path) == 0o600


def test_write_creates_a_new_directory_0700(tmp_path):
    path = tmp_path / "new" / "controller-x.json"
    with umask(0):
        connection.write(info(), str(path))
    assert mode(path.parent) == 0o700
    assert mode(path) == 0o600


def test_write_creates_nested_directories(tmp_path):
    path = tmp_path / "a" / "b" / "security" / "controller-default.json"
    connection.write(info(), str(path))
    assert path.is_file()
    assert mode(path.parent) == 0o700


def test_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "c.json"
    connection.write(info(), str(path))
    assert sorted(os.listdir(tmp_path)) == ["c.json"]


def test_write_refuses_to_overwrite(tmp_path):
    path = tmp_path / "c.json"
    first = info()
    connection.write(first, str(path))
    with pytest.raises(FileExistsError):
        connection.write(info(), str(path))
    assert connection.read(str(path)).key == first.key  # the live file is untouched
    assert sorted(os.listdir(tmp_path)) == ["c.json"]   # and no temp file is left


def test_write_refuses_to_overwrite_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep me")
    link = tmp_path / "c.json"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        connection.write(info(), str(link))
    assert target.read_text() == "keep me"


def test_written_file_is_json_with_the_fields(tmp_path):
    path = tmp_path / "c.json"
    i = info(profile="p1")
    connection.write(i, str(path))
    data = json.loads(path.read_text())
    assert data["ip"] == "127.0.0.1" and data["port"] == 45678
    assert data["key"] == i.key and data["n_engines"] == 4 and data["profile"] == "p1"


# --- read -------------------------------------------------------------------------------
def test_read_round_trip(tmp_path):
    path = tmp_path / "c.json"
    i = info(tls={"cert": "PEM"}, profile="x")
    connection.write(i, str(path))
    back = connection.read(str(path))
    assert back == i
    assert len(back.key_bytes) == 32


def test_new_keys_are_fresh_and_hex():
    a, b = info(), info()
    assert a.key != b.key
    assert len(a.key) == 64 and bytes.fromhex(a.key)


def test_read_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ConnectError) as ei:
        connection.read(str(path))
    assert str(path) in str(ei.value)
    assert isinstance(ei.value, ConnectionError)


def test_read_directory(tmp_path):
    with pytest.raises(ConnectError) as ei:
        connection.read(str(tmp_path))
    assert str(tmp_path) in str(ei.value)


@pytest.mark.parametrize("text", ["", "{", "not json", "\xff\xfe", "{'ip': 1}"])
def test_read_invalid_json(tmp_path, text):
    path = tmp_path / "c.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConnectError) as ei:
        connection.read(str(path))
    assert str(path) in str(ei.value)


@pytest.mark.parametrize("data", [
    {"ip": "127.0.0.1", "port": 1},                       # no key
    {"port": 1, "key": "ab"},                              # no ip
    {"ip": "127.0.0.1", "key": "ab"},                      # no port
    {"ip": "127.0.0.1", "port": 1, "key": "not hex"},
    {"ip": "127.0.0.1", "port": 1, "key": 12},
    {"ip": "127.0.0.1", "port": "http", "key": "ab"},
    {"ip": "127.0.0.1", "port": None, "key": "ab"},
    [1, 2, 3],
    "a string",
    42,
    None,
], ids=lambda d: json.dumps(d)[:30])
def test_read_missing_or_bad_fields(tmp_path, data):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConnectError) as ei:
        connection.read(str(path))
    assert str(path) in str(ei.value)


def test_read_ignores_unknown_fields(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"ip": "10.0.0.1", "port": 5, "key": "ab" * 32,
                                "from_the_future": True}))
    i = connection.read(str(path))
    assert (i.ip, i.port) == ("10.0.0.1", 5)


def test_key_never_in_repr_or_str():
    i = info()
    assert i.key not in repr(i)
    assert i.key not in str(i)
    assert "127.0.0.1" in repr(i) and "45678" in repr(i)


def test_key_never_in_read_errors(tmp_path):
    i = info()
    path = tmp_path / "c.json"
    text = json.dumps({"ip": "127.0.0.1", "port": "bad", "key": i.key})
    for broken in (text, text[:-3]):  # bad field; truncated JSON
        path.write_text(broken)
        with pytest.raises(ConnectError) as ei:
            connection.read(str(path))
        assert i.key not in str(ei.value)
        assert i.key[:16] not in str(ei.value)


# --- where the file is ------------------------------------------------------------------
def test_profile_path_naming(tmp_path, monkeypatch):
    monkeypatch.setenv(connection.ENV_DIR, str(tmp_path / "mpe"))
    security = tmp_path / "mpe" / "security"
    assert connection.profile_path("prod") == str(security / "controller-prod.json")
    assert connection.profile_path(None) == str(security / "controller-default.json")
    assert connection.profile_path("a-b_c.1").endswith("controller-a-b_c.1.json")


def test_default_base_dir_is_under_home(tmp_path):
    assert connection.profile_path() == str(
        tmp_path / "home" / ".mpiengine" / "security" / "controller-default.json")


@pytest.mark.parametrize("name", ["a/b", "../x", "..", ".", "-", "a b", "x\x00", "/abs", "a\\b"])
def test_invalid_profile_names(name):
    with pytest.raises(ValueError):
        connection.profile_path(name)


def test_resolve_path_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(connection.ENV_DIR, str(tmp_path / "mpe"))
    default = str(tmp_path / "mpe" / "security" / "controller-default.json")
    assert connection.resolve_path() == default

    env_file = str(tmp_path / "env.json")
    monkeypatch.setenv(connection.ENV_FILE, env_file)
    assert connection.resolve_path() == env_file                       # env beats default
    assert connection.resolve_path(profile="p") == connection.profile_path("p")  # profile beats env
    explicit = str(tmp_path / "explicit.json")
    assert connection.resolve_path(explicit) == explicit               # path beats all

    with pytest.raises(ValueError):
        connection.resolve_path(explicit, profile="p")


def test_resolve_path_expands_user_and_makes_absolute(tmp_path, monkeypatch):
    assert connection.resolve_path("~/c.json") == str(tmp_path / "home" / "c.json")
    monkeypatch.chdir(tmp_path)
    assert connection.resolve_path("rel.json") == str(tmp_path / "rel.json")


def test_resolve_path_rejects_invalid_profile():
    with pytest.raises(ValueError):
        connection.resolve_path(profile="../../etc/passwd")


# --- remove -----------------------------------------------------------------------------
def test_remove_deletes_our_file(tmp_path):
    path = tmp_path / "c.json"
    i = info()
    connection.write(i, str(path))
    connection.remove(str(path), i)
    assert not path.exists()


def test_remove_keeps_a_newer_clusters_file(tmp_path):
    path = tmp_path / "c.json"
    ours, theirs = info(), info()
    connection.write(theirs, str(path))
    connection.remove(str(path), ours)
    assert connection.read(str(path)).key == theirs.key


def test_remove_of_missing_or_broken_file_is_quiet(tmp_path):
    connection.remove(str(tmp_path / "missing.json"), info())
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    connection.remove(str(bad), info())
    assert bad.exists()
