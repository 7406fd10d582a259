"""The long fuzz: minutes of hostile bytes and malformed requests against a live cluster.

Skipped unless ``MPIENGINE_FUZZ_SECONDS`` is set; it is the long version of
``test_security.py::test_fuzz_handshake_and_frames`` plus a fuzz of the requests
a key holder can send (well-formed, authenticated frames with arbitrary
metadata)::

    MPIENGINE_FUZZ_SECONDS=120 python -m pytest tests/test_fuzz_long.py -q -s

Each test gets that many seconds (at least 60 are recommended). The cluster is a
2-engine job of its own with ``--max-message-size 1000000``.
"""
from __future__ import annotations

import json
import os
import random
import time
from typing import List, Tuple

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import harness
from mpiengine import protocol as P
from proxy import RawClient
from test_security import LIMIT, address, counts, key_of, round_trip, run_fuzz

SECONDS = float(os.environ.get("MPIENGINE_FUZZ_SECONDS", "0") or 0)

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.slow,
    pytest.mark.skipif(SECONDS <= 0, reason=(
        "the long fuzz runs only when MPIENGINE_FUZZ_SECONDS is set, e.g. "
        "MPIENGINE_FUZZ_SECONDS=120 python -m pytest tests/test_fuzz_long.py -q -s")),
    pytest.mark.timeout(max(120.0, 3 * SECONDS + 120.0)),
]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    reason = harness.mpi_skip_reason()
    if reason:
        pytest.skip(reason)
    c = harness.Cluster(workdir=str(tmp_path_factory.mktemp("fuzz")), name="fuzz")
    c.start(2, ["--max-message-size", str(LIMIT)])
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def fmec(fuzzed):
    m = fuzzed.client()
    m.on_output = None
    try:
        yield m
    finally:
        m.close()


def test_long_fuzz_of_handshake_and_frames(fuzzed, fmec):
    t0 = time.monotonic()
    fz = run_fuzz(fuzzed.connection_file, SECONDS, fmec)
    took = time.monotonic() - t0
    print(f"\nlong fuzz: {fz.handshakes} handshakes and {fz.frames} mutated frames "
          f"in {took:.0f} s; nothing ran, the controller kept serving")
    assert fuzzed.alive()


# -- a key holder's malformed requests ----------------------------------------------------------

# Kinds a client may send, minus SHUTDOWN (it ends the cluster, as it should).
KINDS = sorted(k for k, (_, who, _) in P.KINDS.items() if who == "client" and k != P.SHUTDOWN)
# Harmless code: an authenticated client may run anything; the fuzz is about the runtime.
CODES = ["pass", "1 +", "x = 1", "print('fz')", "raise ValueError('fz')", "import sys; sys.exit()",
         "'\\x00'", "(", "del comm"]

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=False), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
target_value = st.one_of(st.just("all"), st.integers(-2, 3), st.lists(st.integers(-1, 3), max_size=4),
                         json_value)
# 'counts' is left out: malformed scatter counts kill the cluster (a known bug, see
# test_security.py::test_malformed_scatter_counts_are_refused).
meta_strategy = st.fixed_dictionaries({}, optional={
    "targets": target_value, "code": st.one_of(st.sampled_from(CODES), json_value),
    "names": st.one_of(st.lists(st.sampled_from(["x", "comm", "__name__", "nope"]), max_size=3),
                       json_value),
    "name": st.one_of(st.sampled_from(["x", "y", "comm"]), json_value),
    "single": json_value, "block": json_value, "result_id": json_value, "kind": json_value,
    "dtype": json_value, "shape": json_value, "sid": json_value, "seq": json_value,
    "op": json_value, "parts": json_value, "extra": json_value,
})


def test_long_fuzz_of_authenticated_requests(fuzzed, fmec):
    """Arbitrary metadata in well-formed frames: replies or a closed connection, never a dead
    cluster or a silent controller."""
    addr, key = address(fuzzed.connection_file), key_of(fuzzed.connection_file)
    sent: List[Tuple[int, dict, int]] = []
    outcomes = {"reply": 0, "closed": 0, "no reply": 0}
    silent: List[Tuple[int, dict, int]] = []
    rng = random.Random(7)

    @settings(max_examples=50, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(KINDS), meta_strategy, st.integers(0, 3))
    def one(kind: int, meta: dict, nparts: int) -> None:
        meta = dict(meta, req=1)
        parts = [bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
                 for _ in range(nparts)]
        sent.append((kind, meta, nparts))
        with RawClient(addr, key) as raw:
            raw.request(kind, meta, parts)
            # A non-blocking engine command is not answered (its result waits for a fetch).
            quiet = kind in P.ENGINE_OPS and not meta.get("block", True)
            try:
                frame = raw.read_frame(2 if quiet else 20)
                outcomes["reply"] += 1
                assert frame.kind in (P.RESULT, P.ERROR, P.NOT_READY, P.STREAM), frame
            except (EOFError, ConnectionError):
                outcomes["closed"] += 1
            except TimeoutError:
                if not quiet:  # the controller must answer (or refuse) everything else
                    outcomes["no reply"] += 1
                    silent.append((kind, meta, nparts))
        if not fuzzed.alive():
            last = "\n".join(f"  {P.kind_name(k)} {json.dumps(m)[:300]} parts={n}"
                             for k, m, n in sent[-5:])
            pytest.fail(f"the cluster died after these requests (last is the likely cause):\n"
                        f"{last}\nlog tail:\n{fuzzed.log_tail(30)}")

    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        one()
        assert round_trip(fmec) < 10.0
        fmec.reset(timeout=60)
    assert counts(fmec)
    print(f"\nlong request fuzz: {len(sent)} requests in {SECONDS:g} s: {outcomes}")
    assert silent == [], "requests the controller neither answered nor refused:\n" + "\n".join(
        f"  {P.kind_name(k)} {json.dumps(m)[:300]} parts={n}" for k, m, n in silent)
