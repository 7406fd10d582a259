"""How scatter splits and gather joins: contiguous, balanced, earlier engines first."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpiengine import partition

pytestmark = pytest.mark.timeout(30)

FAST = settings(max_examples=200, deadline=None, derandomize=True, database=None)


# --- bounds -----------------------------------------------------------------------------
@FAST
@given(n=st.integers(0, 5000), k=st.integers(1, 300))
def test_bounds_partition_range_n_evenly(n, k):
    b = partition.bounds(n, k)
    assert len(b) == k
    assert b[0][0] == 0 and b[-1][1] == n
    for (a0, b0), (a1, _) in zip(b, b[1:]):
        assert b0 == a1                              # contiguous, no gaps or overlaps
    sizes = [stop - start for start, stop in b]
    assert all(s >= 0 for s in sizes)
    assert max(sizes) - min(sizes) <= 1              # balanced
    assert sizes == sorted(sizes, reverse=True)      # the earlier engines take the extra
    assert sum(sizes) == n


@pytest.mark.parametrize("n, k, sizes", [
    (10, 4, [3, 3, 2, 2]),
    (3, 5, [1, 1, 1, 0, 0]),
    (0, 3, [0, 0, 0]),
    (8, 4, [2, 2, 2, 2]),
    (1, 1, [1]),
    (7, 1, [7]),
])
def test_bounds_examples(n, k, sizes):
    assert [b - a for a, b in partition.bounds(n, k)] == sizes


@pytest.mark.parametrize("k", [0, -1])
def test_bounds_needs_an_engine(k):
    with pytest.raises(ValueError, match="engines"):
        partition.bounds(5, k)


# --- split / join -----------------------------------------------------------------------
@FAST
@given(items=st.lists(st.integers() | st.text(max_size=3) | st.none(), max_size=60),
       k=st.integers(1, 12), as_tuple=st.booleans())
def test_split_join_round_trip_lists_and_tuples(items, k, as_tuple):
    seq = tuple(items) if as_tuple else items
    pieces = partition.split(seq, k)
    assert len(pieces) == k
    assert all(type(p) is list for p in pieces)      # lists and tuples become lists
    assert [len(p) for p in pieces] == [b - a for a, b in partition.bounds(len(seq), k)]
    assert partition.join(pieces) == list(seq)


@pytest.mark.parametrize("r", [range(0), range(10), range(5, 50, 7), range(10, 0, -3)])
@pytest.mark.parametrize("k", [1, 3, 20])
def test_split_join_round_trip_ranges(r, k):
    pieces = partition.split(r, k)
    assert all(type(p) is list for p in pieces)
    assert partition.join(pieces) == list(r)


@FAST
@given(n=st.integers(0, 40), k=st.integers(1, 10), cols=st.integers(0, 4),
       two_d=st.booleans())
def test_split_join_round_trip_arrays(n, k, cols, two_d):
    arr = np.arange(n * max(cols, 1), dtype=np.float64)
    if two_d:
        arr = np.arange(n * cols, dtype=np.int64).reshape(n, cols)
    pieces = partition.split(arr, k)
    assert len(pieces) == k
    for p, (a, b) in zip(pieces, partition.bounds(len(arr), k)):
        assert isinstance(p, np.ndarray)
        assert p.shape == (b - a,) + arr.shape[1:]   # split on axis 0 only
        assert np.shares_memory(p, arr) or p.size == 0  # views, not copies
    back = partition.join(pieces)
    assert isinstance(back, np.ndarray)
    assert back.shape == arr.shape and back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)


def test_join_scalars_gives_a_list():
    assert partition.join([1, 2, 3]) == [1, 2, 3]
    assert partition.join([]) == []
    assert partition.join([np.float64(1.5), np.float64(2.5)]) == [1.5, 2.5]


def test_join_mixed_lists_and_tuples_chains():
    assert partition.join([[1, 2], (3,), []]) == [1, 2, 3]


def test_join_zero_d_arrays_gives_a_list():
    out = partition.join([np.array(1), np.array(2)])
    assert isinstance(out, list) and out == [1, 2]


def test_is_array():
    assert partition.is_array(np.zeros(2))
    assert not partition.is_array([1])
    assert not partition.is_array(np.float64(1))


# --- as_sequence ------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [5, None, 2.5, object(), "text", b"bytes", {"a": 1}],
                         ids=["int", "None", "float", "object", "str", "bytes", "dict"])
def test_as_sequence_refuses_non_sequences(bad):
    with pytest.raises(TypeError) as ei:
        partition.as_sequence(bad, "scatter")
    msg = str(ei.value)
    assert "scatter needs a sequence" in msg           # says what was expected
    assert type(bad).__name__ in msg                   # and what it got


def test_as_sequence_names_the_operation():
    with pytest.raises(TypeError, match="^map needs"):
        partition.as_sequence(3, "map")


def test_as_sequence_refuses_zero_d_arrays():
    with pytest.raises(TypeError, match="0-d"):
        partition.as_sequence(np.array(3.0))


def test_as_sequence_accepts_iterables():
    assert partition.as_sequence(x for x in range(3)) == [0, 1, 2]
    assert sorted(partition.as_sequence({3, 1, 2})) == [1, 2, 3]
    lst = [1, 2]
    assert partition.as_sequence(lst) is lst
    arr = np.zeros(3)
    assert partition.as_sequence(arr) is arr


def test_split_refuses_non_sequences():
    with pytest.raises(TypeError):
        partition.split(42, 2)
    with pytest.raises(TypeError):
        partition.split(None, 2)


@pytest.mark.parametrize("seq", [list(range(10)), tuple(range(10)), range(10),
                                 list("abcdefghij")])
def test_split_gives_new_plain_lists_whatever_the_sequence(seq):
    pieces = partition.split(seq, 3)
    assert [type(p) for p in pieces] == [list] * 3
    assert [x for p in pieces for x in p] == list(seq)
    if isinstance(seq, list):
        pieces[0].append("changed")  # the caller's list is not one of the pieces
        assert len(seq) == 10


def test_map_pieces_keep_lists_and_ranges_and_turn_the_rest_into_lists():
    r = partition.map_piece(range(0, 100, 3), 2, 5)
    assert r == range(6, 15, 3) and type(r) is range
    lst = [0, 1, 2, 3]
    got = partition.map_piece(lst, 1, 3)
    assert got == [1, 2] and type(got) is list and got is not lst
    assert partition.map_piece((0, 1, 2, 3), 1, 3) == [1, 2]
    arr = partition.map_piece(np.arange(4.0), 1, 3)
    assert type(arr) is list and arr == [1.0, 2.0]
