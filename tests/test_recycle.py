"""The client's recycled receive buffers: reused only once nothing refers to them."""
from __future__ import annotations

import gc
import pickle

import pytest

import harness
from mpiengine import recycle

import numpy as np

N = recycle.MIN_SIZE + 12345


def _addr(a) -> int:
    return a.__array_interface__["data"][0]


def test_small_buffers_are_not_recycled():
    r = recycle.Recycler()
    buf = r.alloc(1000)
    assert len(memoryview(buf).cast("B")) == 1000
    assert r.kept_bytes() == 0 and r.release_in() is None


def test_a_dropped_buffer_is_reused_for_the_next_part_of_its_size():
    r = recycle.Recycler()
    a = r.alloc(N)
    assert a.nbytes == N and a.flags.writeable
    a[:] = 7
    first = _addr(a)
    del a
    b = r.alloc(N - 1000)  # about the same size
    assert _addr(b) == first and r.reused == 1


@pytest.mark.parametrize("hold", ["view", "memoryview", "unpickled", "frombuffer"])
def test_a_buffer_anything_still_uses_is_never_handed_out_again(hold):
    r = recycle.Recycler()
    a = r.alloc(N)
    a[:] = 1
    if hold == "view":
        kept = a[100:200]
    elif hold == "memoryview":
        kept = memoryview(a)[100:200]
    elif hold == "unpickled":  # how a pulled array arrives: rebuilt on the part's bytes
        bufs = []
        data = pickle.dumps(np.full(10, 1.0), protocol=5, buffer_callback=bufs.append)
        a[:80] = np.frombuffer(bufs[0].raw(), dtype=np.uint8)
        kept = pickle.loads(data, buffers=[memoryview(a)[:80]])
        assert not kept.flags.owndata
    else:
        kept = np.frombuffer(a.data, dtype=np.uint8)[100:200]
    before = bytes(memoryview(kept).cast("B"))
    first = _addr(a)
    del a
    gc.collect()
    b = r.alloc(N)
    assert _addr(b) != first, "a buffer in use was handed out again"
    b[:] = 9
    assert bytes(memoryview(kept).cast("B")) == before  # untouched
    assert r.reused == 0


def test_a_much_smaller_part_does_not_take_a_large_free_buffer():
    r = recycle.Recycler()
    big = r.alloc(4 * N)
    first = _addr(big)
    del big
    small = r.alloc(N)
    assert _addr(small) != first and r.reused == 0


def test_release_gives_free_buffers_back_and_forgets_the_ones_in_use(monkeypatch):
    r = recycle.Recycler()
    free, used = r.alloc(N), r.alloc(N)
    used[:] = 5
    del free
    assert r.release_in() > 0 and r.release_if_due() is False  # not idle long enough
    monkeypatch.setattr(recycle, "RELEASE_AFTER", 0.0)
    assert r.release_if_due() is True
    assert r.kept_bytes() == 0 and r.release_in() is None
    assert int(used.sum()) == 5 * N  # still valid: it goes when its array goes


def test_more_free_bytes_than_keep_free_are_given_back(monkeypatch):
    monkeypatch.setattr(recycle, "KEEP_FREE", 0)
    r = recycle.Recycler()
    a = r.alloc(N)
    del a
    b = r.alloc(4 * N)  # does not fit the free one: a new buffer, the free one goes
    assert b.nbytes == 4 * N
    assert r.kept_bytes() == -(-4 * N // (2 << 20)) * (2 << 20)


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_pulled_arrays_stay_intact_while_later_pulls_reuse_dropped_buffers(mec):
    mec.push({"a": np.full(2**21, 1.0)})  # 16 MB on each engine
    first = mec.pull("a")
    mec.execute("a += 1")
    second = mec.pull("a")
    assert all(float(x[0]) == 1.0 and float(x[-1]) == 1.0 for x in first)
    assert all(float(x[0]) == 2.0 for x in second)
    del first
    gc.collect()
    before = mec._chan.recycler.reused
    mec.execute("a += 1")
    third = mec.pull("a")
    assert mec._chan.recycler.reused == before + 1  # the first result's buffer
    assert all(float(x[0]) == 3.0 and float(x[-1]) == 3.0 for x in third)
    assert all(float(x[0]) == 2.0 for x in second)  # still intact
    mec.execute("del a")
    # Left alone, the client's reader thread gives the kept buffers back.
    harness.poll_for(lambda: mec._chan.recycler.kept_bytes() == 0,
                     timeout=recycle.RELEASE_AFTER + 10, what="the buffers to go back")
    assert float(third[0][0]) == 3.0  # forgotten, not freed, while in use
