"""Fixtures: one real MPI cluster per test session, a fresh client per test.

- ``cluster``: 4 engines under ``mpiexec``, started once per session. Without
  mpiexec or mpi4py the tests that need it are skipped with the reason, unless
  ``MPIENGINE_REQUIRE_MPI=1`` (CI), where that is a failure instead.
- ``mec``: a connected client with ``block=True, targets='all'``; after the test
  the engines' namespaces are cleared (``reset()``) and the client is closed.
- ``fresh_cluster``: a factory for tests that need a short-lived cluster of their
  own (crash tests); every process of it is ended by pid at teardown.

Every test gets a hard timeout: its own ``@pytest.mark.timeout`` if it has one,
otherwise the ini ``timeout`` (120 s in setup.cfg), otherwise DEFAULT_TIMEOUT.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `import harness`
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)  # this checkout's mpiengine, even when run from elsewhere

import harness  # noqa: E402

DEFAULT_TIMEOUT = 120.0
N_ENGINES = 4


def _require_mpi() -> bool:
    return os.environ.get("MPIENGINE_REQUIRE_MPI", "") not in ("", "0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mpi: needs a real mpiexec cluster")
    # Without pytest-timeout the marker is still ours to honour (see below).
    config.addinivalue_line("markers", "timeout(seconds): hard time limit of this test")


def _default_timeout(config: pytest.Config) -> float:
    try:
        value = config.getini("timeout")
    except (ValueError, KeyError):
        value = None
    try:
        return float(value) if value not in (None, "") and float(value) > 0 else DEFAULT_TIMEOUT
    except (TypeError, ValueError):
        return DEFAULT_TIMEOUT


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Give every test without its own timeout marker the default one."""
    seconds = _default_timeout(config)
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(seconds))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: object):
    """Enforce the timeout ourselves when pytest-timeout is not installed."""
    if item.config.pluginmanager.hasplugin("timeout") or not hasattr(signal, "SIGALRM") \
            or threading.current_thread() is not threading.main_thread():
        yield
        return
    marker = item.get_closest_marker("timeout")
    seconds = float(marker.args[0]) if marker and marker.args else DEFAULT_TIMEOUT

    def on_alarm(signum, frame):
        pytest.fail(f"Timeout >{seconds:g}s (conftest fallback timer)", pytrace=True)

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _mpi_or_skip() -> None:
    reason = harness.mpi_skip_reason()
    if reason is None:
        return
    if _require_mpi():
        pytest.fail(f"MPIENGINE_REQUIRE_MPI=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A running 4-engine cluster shared by the whole session."""
    _mpi_or_skip()
    c = harness.Cluster(workdir=str(tmp_path_factory.mktemp("cluster")), name="session")
    c.start(N_ENGINES)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def connection_file(cluster: harness.Cluster) -> str:
    """The session cluster's connection file, as a string path."""
    return str(cluster.connection_file)


@pytest.fixture
def mec(cluster: harness.Cluster):
    """A client of the session cluster; the engines are cleared after the test."""
    if not cluster.alive():
        pytest.fail(f"the session cluster is gone (mpiexec exit code "
                    f"{cluster.proc.returncode}); log tail:\n{cluster.log_tail()}")
    m = cluster.client()
    m.block = True
    m.targets = "all"
    try:
        yield m
    finally:
        try:
            # A test may leave block/targets changed, or commands queued: restore
            # the defaults so reset() waits for (and follows) whatever is queued.
            m.block = True
            m.targets = "all"
            if cluster.alive():
                m.reset()
        finally:
            m.close()


@pytest.fixture
def fresh_cluster(tmp_path: Path):
    """Return ``start(n_engines=4, extra_args=())`` for a cluster of the test's own.

    Each one is stopped at teardown; whatever does not exit is ended by pid.
    """
    _mpi_or_skip()
    started: list = []

    def start(n_engines: int = N_ENGINES, extra_args=(), env=None) -> harness.Cluster:
        c = harness.Cluster(workdir=str(tmp_path), name=f"fresh{len(started)}")
        started.append(c)
        return c.start(n_engines, extra_args, env=env)

    try:
        yield start
    finally:
        for c in started:
            if c.proc is not None:
                c.stop(shutdown=c.alive())
