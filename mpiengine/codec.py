"""How client calls become request payloads, and replies become values.

Pure functions shared by the client's methods: name checks, the scatter payload
(raw bytes for plain numeric arrays, pickles otherwise), and decoding a RESULT
frame into per-engine values or a ``CompositeError``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from . import partition, payload
from . import protocol as P
from .errors import CompositeError, ErrorRecord, NoSuchResult, ReplyTooLarge
from .results import ResultList

def _nones(values: List[Any]) -> List[None]:
    return [None] * len(values)


def _inband(obj: Any) -> bytes:
    data, buffers = payload.dumps(obj)
    if buffers:  # scattered pieces travel inside one buffer: pickle them in-band
        import cloudpickle

        return cloudpickle.dumps(obj, protocol=5)
    return data


def _check_name(key: Any) -> None:
    if not isinstance(key, str):
        raise TypeError(f"a name on the engines must be a string; got {key!r}")
    if not key.isidentifier():
        raise ValueError(f"a name on the engines must be a Python identifier; got {key!r}")


def _names(keys: Any) -> Tuple[List[str], bool]:
    if isinstance(keys, str):
        _check_name(keys)
        return [keys], True
    if isinstance(keys, (list, tuple)) and keys:
        for k in keys:
            _check_name(k)
        return list(keys), False
    raise TypeError(f"pull takes a name or a tuple of names; got {keys!r}")


def _scatter_payload(seq: Any, k: int, what: str) -> Tuple[dict, List[Any], List[int]]:
    """Return (meta, parts, byte counts per target) for scattering ``seq`` over k targets."""
    seq = partition.as_sequence(seq, what)
    if partition.is_array(seq) and seq.dtype.kind in "biufc" and 0 not in seq.shape[1:]:
        # Plain numbers travel as raw bytes; structured, datetime and object arrays
        # (and rows of width 0, which carry no bytes to count) go as pickles.
        import numpy

        arr = numpy.ascontiguousarray(seq)
        row = arr.itemsize * (int(numpy.prod(arr.shape[1:])) if arr.ndim > 1 else 1)
        counts = [(b - a) * row for a, b in partition.bounds(len(arr), k)]
        meta = {"kind": "array", "dtype": arr.dtype.str, "shape": list(arr.shape[1:])}
        return meta, [memoryview(arr).cast("B")], counts
    blobs = [_inband(p) for p in partition.split(seq, k)]
    return {"kind": "pickle"}, [blobs], [len(b) for b in blobs]  # one part, not joined


def _raise_refusal(frame: P.Frame) -> None:
    if frame.kind != P.ERROR:
        return
    ename, evalue = frame.meta.get("ename", "RuntimeError"), frame.meta.get("evalue", "")
    if ename == "ReplyTooLarge":
        raise ReplyTooLarge(evalue, frame.meta.get("result_id"))
    cls = {"ValueError": ValueError, "TypeError": TypeError, "KeyError": NoSuchResult}.get(ename)
    if cls is not None:
        raise cls(evalue)
    raise RuntimeError(f"the controller refused the request: {evalue}")


def _replies(frame: P.Frame) -> List[dict]:
    """Split a RESULT frame into the engines' reply dicts, in engine order."""
    _raise_refusal(frame)
    metas, datas = memoryview(frame.parts[0]), memoryview(frame.parts[1])
    replies, mo, do = [], 0, 0
    for m, d in frame.meta["sizes"]:
        replies.append(payload.unpack(metas[mo:mo + m], datas[do:do + d]))
        mo, do = mo + m, do + d
    return replies


def _by_engine(replies: List[dict], ids: List[int]) -> Dict[int, Any]:
    return {i: (r["value"] if r["ok"] else ErrorRecord.from_dict(r["error"]))
            for i, r in zip(ids, replies)}


def _decode(frame: P.Frame, method: str) -> List[Any]:
    """Turn a RESULT frame into per-engine values; raise CompositeError on failures."""
    replies = _replies(frame)
    values = [r["value"] for r in replies]
    errors = [ErrorRecord.from_dict(r["error"]) for r in replies if not r["ok"]]
    if errors:
        method = errors[0].method or method
        raise CompositeError(method, errors,
                             ResultList(values) if method == "execute" else values)
    return values


def gather_join(values: List[Any], frame: Any) -> Any:
    """Join gathered pieces; same-typed arrays without a copy.

    When every engine sent an array of one dtype and row shape as its only raw
    buffer, the pieces already lie back to back in the reply's data part, in
    engine order: that part *is* the joined array.
    """
    data = frame.parts[1] if len(frame.parts) > 1 else b""
    if values and all(partition.is_array(v) and v.ndim >= 1 and not v.dtype.hasobject
                      for v in values):
        first = values[0]
        same = all(v.dtype == first.dtype and v.shape[1:] == first.shape[1:]
                   for v in values)
        sizes = [d for _m, d in frame.meta["sizes"]]
        if same and sizes == [v.nbytes for v in values] and sum(sizes) == len(data):
            import numpy

            return numpy.frombuffer(data, dtype=first.dtype).reshape((-1,) + first.shape[1:])
    return partition.join(values)


#: How each operation's per-engine values become what the call returns.
FINISH = {
    P.EXECUTE: ResultList,
    P.PUSH: _nones, P.SCATTER: _nones, P.RESET: _nones,
    P.APPLY: partition.join,
}


def decode_any(frame: Any) -> Any:
    """Decode a result fetched by id alone: the operation comes from the reply."""
    op = frame.meta.get("op")
    values = _decode(frame, P.kind_name(op) if op in P.KINDS else "fetch")
    if op == P.GATHER:
        return gather_join(values, frame)
    finish = FINISH.get(op)
    return finish(values) if finish else values
