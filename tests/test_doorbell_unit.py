"""Doorbells alone: a BellTower and Bells on 127.0.0.1, no MPI.

The engines' last words travel on the doorbell: what an engine writes there
(or a fatal signal's report, written by faulthandler) is what the controller
tells the clients about why that engine ended.
"""
from __future__ import annotations

import select
import subprocess
import sys
import threading
import time
from typing import List, Tuple

import pytest

from harness import REPO_ROOT
from mpiengine import doorbell

pytestmark = pytest.mark.timeout(30)


class FakeServer:
    """What BellTower.watch needs of the controller's server: remember callbacks."""

    def __init__(self) -> None:
        self.watched: List[Tuple[object, object]] = []

    def watch(self, sock, callback) -> None:
        self.watched.append((sock, callback))


def _tower_with(n: int, connect) -> Tuple[doorbell.BellTower, List[Tuple[int, str]], FakeServer]:
    tower = doorbell.BellTower(local_only=True)
    thread = threading.Thread(target=connect, args=(tower,))
    thread.start()
    tower.accept(n, timeout=10)
    thread.join(10)
    heard: List[Tuple[int, str]] = []
    server = FakeServer()
    tower.watch(server, lambda i, why: heard.append((i, why)))
    return tower, heard, server


def _listen(server: FakeServer, heard: list, timeout: float = 10.0) -> None:
    """Call the watch callbacks, as the controller's selector would, until one reports."""
    deadline = time.monotonic() + timeout
    while not heard and time.monotonic() < deadline:
        ready, _, _ = select.select([s for s, _ in server.watched], [], [], 0.1)
        for sock, callback in server.watched:
            if sock in ready:
                callback()


def test_last_words_name_the_reason():
    bells = []

    def connect(tower):
        bell = doorbell.Bell()
        assert bell.connect(["127.0.0.1"], tower.port, tower.token, 3)
        bells.append(bell)

    tower, heard, server = _tower_with(1, connect)
    try:
        t0 = time.monotonic()
        speaker = threading.Thread(target=bells[0].last_words, args=("it called os._exit(7)", 5))
        speaker.start()
        _listen(server, heard)
        assert heard == [(3, "it called os._exit(7)")]
        tower.close()  # the controller is done: the engine stops waiting at once
        speaker.join(5)
        assert not speaker.is_alive() and time.monotonic() - t0 < 4
    finally:
        tower.close()
        bells[0].close()


def test_a_ring_is_not_taken_for_last_words():
    bells = []

    def connect(tower):
        bell = doorbell.Bell()
        bell.connect(["127.0.0.1"], tower.port, tower.token, 0)
        bells.append(bell)

    tower, heard, server = _tower_with(1, connect)
    try:
        tower.ring()  # rings
        tower.ring()
        assert bells[0].sleep(2.0) is True
        time.sleep(0.05)
        bells[0].sleep(0.01)
        assert bells[0].rings == 2  # one per header: the engine counts them
        _listen(server, heard, timeout=0.3)
        assert heard == []
    finally:
        tower.close()
        bells[0].close()


_CRASH = r"""
import ctypes, sys
from mpiengine import doorbell
bell = doorbell.Bell()
assert bell.connect(["127.0.0.1"], int(sys.argv[1]), bytes.fromhex(sys.argv[2]), 2)
def user_code():
    ctypes.string_at(0)
user_code()
"""


def test_a_segfault_is_reported_with_where_it_happened():
    tower = doorbell.BellTower(local_only=True)
    proc = subprocess.Popen([sys.executable, "-c", _CRASH, str(tower.port), tower.token.hex()],
                            cwd=str(REPO_ROOT), stderr=subprocess.PIPE)
    try:
        tower.accept(1, timeout=20)
        heard: list = []
        server = FakeServer()
        tower.watch(server, lambda i, why: heard.append((i, why)))
        proc.wait(20)
        time.sleep(0.2)  # the whole report is in the socket by now
        _listen(server, heard)
        assert proc.returncode < 0  # died on the signal, as it would have without us
        (engine, words), = heard
        assert engine == 2
        words += tower.read_rest(2, 1.0)
        assert words.startswith("Fatal Python error: Segmentation fault"), words
        assert "in user_code" in words, words  # the whole report, for the log
        why = doorbell.why_ended(words)
        assert why.startswith("it crashed (Segmentation fault, File "), why
        assert why.endswith("in string_at)"), why
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        tower.close()


def test_an_end_without_words_says_the_process_ended():
    assert doorbell.why_ended("") == "its process ended (killed, or out of memory?)"
    report = ("Fatal Python error: Floating point exception\n\n"
              "Thread 0x01 (most recent call first):\n  File \"listener.py\", line 3 in poll\n\n"
              "Current thread 0x02 (most recent call first):\n"
              "  File \"<string>\", line 9 in <module>\n")
    assert doorbell.why_ended(report) == (
        "it crashed (Floating point exception, File \"<string>\", line 9 in <module>)")
    # Cut off before the signal's name, or in the middle of the crashing call's line.
    assert doorbell.why_ended("Fatal Python error: ") == "it crashed (a fatal signal)"
    assert doorbell.why_ended("Fatal Python error: Aborted\n\nStack (most recent call "
                               "first):\n  File \"x.py\", li") == "it crashed (Aborted)"


def test_an_alarm_wakes_its_sleeper_only_if_not_disarmed_in_time():
    alarm = doorbell.Alarm()
    try:
        t = time.monotonic()
        alarm.arm(0.05)
        assert alarm.sleep(2.0) is True
        assert 0.04 <= time.monotonic() - t < 1.0

        alarm.arm(0.05)
        alarm.disarm()
        t = time.monotonic()
        assert alarm.sleep(0.2) is False  # disarmed in time: the sleeper is never woken
        assert time.monotonic() - t >= 0.15

        alarm.arm(0.01)
        time.sleep(0.05)
        alarm.disarm()  # rang, but nobody slept: disarming forgets it
        assert alarm.sleep(0.1) is False

        threading.Timer(0.05, alarm.wake).start()
        assert alarm.sleep(2.0) is True
    finally:
        alarm.close()


def test_a_wake_ends_one_sleep_only():
    """wake() ends the current or next sleep; the sleep reads it, so the one after waits."""
    bell = doorbell.Bell()
    try:
        bell.wake()
        t = time.monotonic()
        assert bell.sleep(2.0) is True
        assert time.monotonic() - t < 1.0
        t = time.monotonic()
        assert bell.sleep(0.2) is False
        assert time.monotonic() - t >= 0.15
    finally:
        bell.close()
