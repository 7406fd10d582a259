"""How scatter splits a sequence across engines, and how gather joins it again.

Partitions are contiguous; their sizes differ by at most one, and the earlier
engines take the extra items: 10 items on 4 engines are 3, 3, 2, 2. Lists (and
other sequences) become lists; numpy arrays are split on axis 0 and joined
back by concatenation.
"""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple

__all__ = ["bounds", "split", "map_piece", "join", "is_array"]


def bounds(n: int, k: int) -> List[Tuple[int, int]]:
    """Return the ``k`` (start, stop) pairs that partition ``range(n)``."""
    if k <= 0:
        raise ValueError(f"cannot partition over {k} engines")
    base, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def is_array(obj: Any) -> bool:
    """True for numpy arrays (checked without importing numpy)."""
    return type(obj).__module__ == "numpy" and type(obj).__name__ == "ndarray"


def as_sequence(seq: Any, what: str = "scatter") -> Any:
    """Return ``seq`` as something sliceable, or raise TypeError saying what was expected."""
    if is_array(seq):
        if seq.ndim == 0:
            raise TypeError(f"{what} needs a sequence or an array with at least one axis; "
                            f"got a 0-d array")
        return seq
    if isinstance(seq, (str, bytes, dict, set, frozenset)) or not hasattr(seq, "__len__"):
        if hasattr(seq, "__iter__") and not isinstance(seq, (str, bytes, dict)):
            return list(seq)
        raise TypeError(f"{what} needs a sequence (list, tuple, range or numpy array); "
                        f"got {type(seq).__name__}")
    if not hasattr(seq, "__getitem__"):
        return list(seq)
    return seq


def split(seq: Sequence, k: int) -> List[Any]:
    """Split ``seq`` into ``k`` contiguous pieces: lists, or array views."""
    seq = as_sequence(seq)
    pieces = [seq[a:b] for a, b in bounds(len(seq), k)]
    if is_array(seq):
        return pieces
    # A list's slices are new lists already: copying them again costs as much again.
    return [p if type(p) is list else list(p) for p in pieces]


def map_piece(seq: Sequence, start: int, stop: int) -> Any:
    """``seq[start:stop]`` for ``map``: a list's slice (a new list already) and a
    range's (a range: a few bytes to send, however long) as they come; other
    sequences as lists."""
    piece = seq[start:stop]
    return piece if type(piece) in (list, range) else list(piece)


def join(pieces: List[Any]) -> Any:
    """Join gathered pieces: arrays concatenate, lists and tuples chain into a list.

    Anything else (one scalar per engine) comes back as a list of the pieces.
    """
    if pieces and all(is_array(p) for p in pieces):
        import numpy  # only reached when arrays came back, so numpy is there

        if all(p.ndim >= 1 for p in pieces):
            return numpy.concatenate(pieces)
    if all(isinstance(p, (list, tuple)) for p in pieces):
        out: List[Any] = []
        for p in pieces:
            out.extend(p)
        return out
    return list(pieces)
