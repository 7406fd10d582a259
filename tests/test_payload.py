"""Objects to (pickle, raw buffers) and back: arrays travel out of band, without copies."""
from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

from mpiengine import payload
from mpiengine.payload import PicklingFailed

pytestmark = pytest.mark.timeout(30)


def received(blob) -> bytearray:
    """What the other side holds after the blob crossed a socket or MPI: a fresh bytearray."""
    return bytearray(memoryview(blob).cast("B"))


def round_trip(obj):
    meta, data = payload.pack(obj)
    data_rx = received(data)
    return payload.unpack(bytearray(meta), data_rx), data_rx


def test_nested_objects_round_trip():
    obj = {"a": [1, 2.5, "three", None, True], "b": (b"bytes", {"nested": {1, 2}}),
           "c": {"deep": [[[]]]}, "big": 2**100, "u": "ünïcode"}
    back, data = round_trip(obj)
    assert back == obj
    assert len(data) == 0  # nothing out of band


def test_array_travels_out_of_band_and_shares_memory_with_the_data_blob():
    arr = np.arange(1000, dtype=np.float64).reshape(10, 100)
    meta, data = payload.pack(arr)
    assert len(meta) < 1000            # the 8000 bytes of data are not in the pickle
    assert memoryview(data).nbytes == arr.nbytes
    data_rx = received(data)
    back = payload.unpack(bytearray(meta), data_rx)
    np.testing.assert_array_equal(back, arr)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert np.shares_memory(back, np.frombuffer(data_rx, dtype=np.uint8))  # no copy
    back[0, 0] = -1.0                   # a received bytearray gives a writable array
    assert np.frombuffer(data_rx, dtype=np.float64)[0] == -1.0


def test_pack_of_a_single_array_does_not_copy_it():
    arr = np.arange(100, dtype=np.int32)
    _, data = payload.pack(arr)
    assert np.shares_memory(np.frombuffer(data, dtype=np.uint8), arr)


def test_several_arrays_in_one_object():
    a = np.arange(10, dtype=np.int16)
    b = np.linspace(0, 1, 7)
    c = np.zeros((0, 3))
    d = np.array([[1 + 2j]])
    obj = {"a": a, "list": [b, "x", c], "d": d}
    meta, data = payload.pack(obj)
    data_rx = received(data)
    assert len(data_rx) == a.nbytes + b.nbytes + c.nbytes + d.nbytes
    back = payload.unpack(bytearray(meta), data_rx)
    np.testing.assert_array_equal(back["a"], a)
    np.testing.assert_array_equal(back["list"][0], b)
    assert back["list"][1] == "x"
    assert back["list"][2].shape == (0, 3)
    np.testing.assert_array_equal(back["d"], d)
    raw = np.frombuffer(data_rx, dtype=np.uint8)
    for arr in (back["a"], back["list"][0], back["d"]):
        assert np.shares_memory(arr, raw)


@pytest.mark.parametrize("arr", [
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    np.arange(20)[::3],                         # not contiguous: pickled in band
    np.arange(12).reshape(3, 4).T,
    np.array(["a", "bc"]),
    np.array([1, None, "x"], dtype=object),
    np.array(3.5),                              # 0-d
    np.array([(1, 2.0)], dtype=[("i", "<i4"), ("f", "<f8")]),
    np.array(["2020-01-01"], dtype="datetime64[D]"),
], ids=["fortran", "strided", "transposed", "unicode", "object", "0-d", "structured",
        "datetime"])
def test_unusual_arrays_round_trip(arr):
    back, _ = round_trip(arr)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert back.tolist() == arr.tolist()


def test_lambdas_and_closures_travel():
    k = 7

    def closure(x):
        return x * k

    back, _ = round_trip({"f": lambda y: y + 1, "g": closure})
    assert back["f"](1) == 2
    assert back["g"](3) == 21


def test_dumps_and_loads_with_buffers():
    obj = [np.arange(5), {"s": "t"}]
    data, buffers = payload.dumps(obj)
    assert len(buffers) == 1 and all(isinstance(b, memoryview) for b in buffers)
    back = payload.loads(data, [bytearray(b) for b in buffers])
    np.testing.assert_array_equal(back[0], obj[0])
    assert back[1] == {"s": "t"}


def test_plain_pickle_loads_in_band_fallback():
    data, buffers = payload.dumps(np.arange(4)[::2])  # strided: no out-of-band buffer
    assert buffers == []
    assert pickle.loads(data).tolist() == [0, 2]


def test_none_round_trip():
    back, data = round_trip(None)
    assert back is None and len(data) == 0


@pytest.mark.parametrize("bad", [threading.Lock(), (x for x in range(3)),
                                 {"nested": [threading.Lock()]}],
                         ids=["lock", "generator", "nested-lock"])
def test_unpicklable_objects_raise_pickling_failed(bad):
    with pytest.raises(PicklingFailed) as ei:
        payload.dumps(bad)
    assert isinstance(ei.value, TypeError)
    assert type(bad).__name__ in str(ei.value)
    assert ei.value.__cause__ is not None
    with pytest.raises(PicklingFailed):
        payload.pack(bad)
