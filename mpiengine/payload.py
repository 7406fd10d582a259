"""How Python objects become bytes and raw buffers, and back.

Objects are pickled with protocol 5 and out-of-band buffers (cloudpickle, so
functions, lambdas and closures travel too): a numpy array's data never sits as
bytes inside a pickle; it moves as its own raw buffer, and comes back as an
array viewing the received memory, without a copy.

A *blob pair* is what one engine contributes to a result::

    meta blob  "!I" n | n x "!Q" buffer lengths | pickle bytes
    data blob  the n raw buffers, back to back
"""
from __future__ import annotations

import pickle
import struct
from typing import Any, List, Tuple

import cloudpickle

__all__ = ["dumps", "loads", "pack", "unpack", "alloc", "PicklingFailed"]

_LAZY = 1 << 16


def alloc(n: int) -> Any:
    """Return a writable buffer of ``n`` bytes for something to be received into.

    ``bytearray(n)`` writes zeros over all of it first; a large numpy buffer is
    left untouched until the data arrives, which on a VM halves the cost of
    receiving 100 MB.
    """
    if n < _LAZY:
        return bytearray(n)
    import numpy  # a dependency of the package; imported only for large messages

    return numpy.empty(n, dtype=numpy.uint8)

_COUNT = struct.Struct("!I")
_LEN = struct.Struct("!Q")


class PicklingFailed(TypeError):
    """Raised in the client when an object cannot be serialised; nothing was sent."""


def dumps(obj: Any, plain_first: bool = False) -> Tuple[bytes, List[memoryview]]:
    """Pickle ``obj``; return the pickle and its out-of-band raw buffers.

    ``plain_first`` tries the standard pickler before cloudpickle (several times
    cheaper to set up, which shows on small replies). Only engines may ask for it:
    where the two differ, for functions and classes defined in ``__main__``, the
    standard pickler fails on an engine (its user namespace is not the process's
    ``__main__``) and cloudpickle takes over, whereas in a client session it would
    succeed with a reference the engines cannot resolve.
    """
    buffers: List[pickle.PickleBuffer] = []
    data = None
    if plain_first and not cloudpickle.list_registry_pickle_by_value():
        try:
            data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        except Exception:
            buffers.clear()
    if data is None:
        try:
            data = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        except Exception as e:
            raise PicklingFailed(f"cannot serialise {type(obj).__name__} object: {e}") from e
    views = []
    for b in buffers:
        try:
            views.append(b.raw())
        except BufferError:  # not contiguous: let pickle copy it in-band instead
            return cloudpickle.dumps(obj, protocol=5), []
    return data, views


def loads(data: Any, buffers: List[Any] = ()) -> Any:
    return pickle.loads(data, buffers=buffers)


def pack(obj: Any, plain_first: bool = False) -> Tuple[bytes, Any]:
    """Return the (meta blob, data blob) pair for ``obj`` (``plain_first``: see :func:`dumps`).

    A single raw buffer is returned as it is (no copy); several are joined.
    """
    data, views = dumps(obj, plain_first)
    head = _COUNT.pack(len(views)) + b"".join(_LEN.pack(v.nbytes) for v in views)
    if not views:
        blob: Any = b""
    elif len(views) == 1:
        blob = views[0]
    else:
        blob = b"".join(views)
    return head + data, blob


def unpack(meta: Any, data: Any) -> Any:
    """Rebuild an object from a blob pair; arrays view ``data`` without copying."""
    meta = memoryview(meta)
    (n,) = _COUNT.unpack_from(meta, 0)
    off = _COUNT.size
    lens = [_LEN.unpack_from(meta, off + 8 * i)[0] for i in range(n)]
    off += 8 * n
    view = memoryview(data)
    buffers, pos = [], 0
    for ln in lens:
        buffers.append(view[pos:pos + ln])
        pos += ln
    return pickle.loads(meta[off:], buffers=buffers)
