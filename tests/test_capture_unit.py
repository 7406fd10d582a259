"""FdCapture on its own: what C code and child processes write to fds 1 and 2."""
from __future__ import annotations

import fcntl
import io
import os

import pytest

from mpiengine.capture import FdCapture

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@pytest.fixture
def make_cap(capfd):
    """An FdCapture made inside the test, where capfd's files are fds 1 and 2 (during
    fixture set-up they are not yet), so what it restores, or leaks, shows there."""
    made = []

    def make():
        made.append(FdCapture())
        return made[-1]

    yield make
    for c in made:
        for r, w in c._pipes:
            os.close(r)
            os.close(w)
        for fd in c._saved:
            os.close(fd)


def _run(cap, *writes, drain_between=False):
    out, err = io.StringIO(), io.StringIO()
    cap.start(out, err)
    try:
        for fd, data in writes:
            os.write(fd, data)
            if drain_between:
                cap.drain()
    finally:
        cap.stop()
    return out.getvalue(), err.getvalue()


def test_nothing_written_gives_empty_text_and_restores_the_fds(make_cap, capfd):
    cap = make_cap()
    for _ in range(3):
        assert _run(cap) == ("", "")
    os.write(1, b"after\n")
    os.write(2, b"after err\n")
    seen = capfd.readouterr()
    assert (seen.out, seen.err) == ("after\n", "after err\n")


def test_each_fd_goes_to_its_own_text(make_cap, capfd):
    cap = make_cap()
    assert _run(cap, (1, b"to out\n"), (2, b"to err\n"), (1, b"more\n")) == (
        "to out\nmore\n", "to err\n")
    seen = capfd.readouterr()
    assert (seen.out, seen.err) == ("", "")


def test_a_full_pipe_and_more_arrive_whole_and_in_order(make_cap):
    cap = make_cap()
    # Exactly one read's worth (the pipe's capacity), drained as the listener would,
    # then the rest: the read after a full chunk must not be taken for the end.
    first, second = b"a" * 65536, b"b" * 1000
    out, _ = _run(cap, (1, first), (1, second), drain_between=True)
    assert out == "a" * 65536 + "b" * 1000


def test_more_than_one_read_at_the_end_is_all_collected(make_cap):
    cap = make_cap()
    for _r, w in cap._pipes:
        fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 18)  # room for it without a drain
    out, _ = _run(cap, (1, b"c" * 200_000))
    assert out == "c" * 200_000
    assert _run(cap) == ("", "")


def test_a_character_split_across_drains_is_decoded_whole(make_cap):
    cap = make_cap()
    snow = "\u2603".encode()
    out, _ = _run(cap, (1, snow[:1]), (1, snow[1:] + b"\n"), drain_between=True)
    assert out == "\u2603\n"


def test_a_dangling_partial_character_at_the_end_is_replaced_not_lost(make_cap):
    cap = make_cap()
    assert _run(cap, (1, b"ok \xe2\x98")) == ("ok \ufffd", "")
    # Its bytes taken by a drain during the command, nothing new by the end.
    assert _run(cap, (1, b"ok \xe2\x98"), drain_between=True) == ("ok \ufffd", "")
    # The decoder starts clean for the next command.
    assert _run(cap, (1, b"next\n")) == ("next\n", "")
