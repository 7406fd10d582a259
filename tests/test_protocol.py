"""The wire format without sockets or MPI: handshake, frames, and every way to break them.

A frame is fed to a :class:`FrameParser` the way the server and the channel do:
ask ``want()`` for the buffer to fill, fill some of it, call ``advance()``.
"""
from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpiengine import protocol as P
from mpiengine.errors import AuthenticationError, ConnectError, ProtocolError

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent


# --- helpers ---------------------------------------------------------------------------
def handshake(server_key: bytes, client_key: Optional[bytes] = None
              ) -> Tuple[P.SessionKeys, P.SessionKeys]:
    """Run the whole handshake in memory; return (client keys, server keys)."""
    client_key = server_key if client_key is None else client_key
    hello, nonce_s = P.server_hello()
    auth, nonce_s_seen, nonce_c = P.client_auth(client_key, hello)
    assert nonce_s_seen == nonce_s
    proof, server_keys = P.server_check_auth(server_key, nonce_s, auth)
    client_keys = P.client_check_proof(client_key, nonce_s, nonce_c, proof)
    return client_keys, server_keys


def session(tagged: bool = True) -> Tuple[P.Sender, P.FrameParser]:
    """A client Sender and the server FrameParser that must accept its frames
    (``tagged=False``: as over TLS, frames without a tag of their own)."""
    ck, sk = handshake(os.urandom(32))
    return P.Sender(ck.send, tagged=tagged), P.FrameParser(sk.recv, tagged=tagged)


def wire(chunks: Sequence) -> bytes:
    return b"".join(bytes(memoryview(c).cast("B")) for c in chunks)


#: How ``feed`` gives bytes to the parser: "staged" through want()/advance() (large
#: parts), "whole" through FrameParser.feed (what readers do with small frames,
#: which parses a frame that arrived whole in one step). Every test runs both ways.
READING = {"mode": "staged"}


@pytest.fixture(autouse=True, params=["staged", "whole"])
def reading(request):
    READING["mode"] = request.param
    yield request.param
    READING["mode"] = "staged"


def feed(parser: P.FrameParser, data: bytes, rng: Optional[random.Random] = None,
         max_chunk: int = 1 << 30, asked: Optional[List[int]] = None) -> List[P.Frame]:
    """Feed ``data`` into ``parser`` in chunks; return the frames it completed.

    ``rng`` picks chunk sizes in 1..max_chunk (never more than ``want()`` offers);
    ``asked`` collects the size of every buffer ``want()`` offered (staged only).
    """
    frames: List[P.Frame] = []
    src, pos = memoryview(data), 0
    if READING["mode"] == "whole" and asked is None:
        while pos < len(data):
            n = len(data) - pos if rng is None else rng.randint(1, max_chunk)
            frames += parser.feed(src[pos:pos + n])
            pos += n
        return frames
    while pos < len(data):
        view = parser.want()
        assert len(view) > 0, "want() offered an empty buffer"
        if asked is not None:
            asked.append(len(view))
        n = min(len(view), len(data) - pos)
        if rng is not None:
            n = min(n, rng.randint(1, max_chunk))
        view[:n] = src[pos:pos + n]
        pos += n
        frame = parser.advance(n)
        if frame is not None:
            frames.append(frame)
    return frames


def feed_until_error(parser: P.FrameParser, data: bytes, pad_limit: int, what: str) -> None:
    """Feed ``data`` and then up to ``pad_limit`` zero bytes; fail if a frame comes out.

    A corrupted length can make the parser wait for more bytes instead of failing
    at once; the zeros that follow (what a later frame might bring) must then
    lead to the error. The caller expects ProtocolError to escape.
    """
    frames = feed(parser, data)
    assert frames == [], f"{what}: a tampered frame was accepted: {frames}"
    padded = 0
    while padded < pad_limit:
        n = len(parser.want())  # a fresh stage buffer is already zero-filled
        frame = parser.advance(n)
        padded += n
        assert frame is None, f"{what}: a frame was accepted: {frame}"
    raise AssertionError(f"{what}: no error after {pad_limit} more bytes")


def make_frame(key: bytes, seq: int, kind: int, meta_b: bytes,
               parts: Sequence[bytes] = (), magic: bytes = P.MAGIC) -> bytes:
    """Build a frame by hand with a valid tag (for contents Sender would not produce)."""
    head = P.HEADER.pack(magic, kind, 0, len(parts), seq, len(meta_b))
    head += b"".join(P.LENGTH.pack(len(p)) for p in parts)
    mac = P._frame_mac(key, seq)
    body = head + meta_b + b"".join(parts)
    mac.update(body)
    return body + mac.finalize()


# --- layering ---------------------------------------------------------------------------
def test_importing_the_client_side_imports_neither_mpi4py_nor_ipython():
    # A subprocess: other tests in this session may have imported either already.
    code = (
        "import sys\n"
        "import mpiengine, mpiengine.client\n"
        "import mpiengine.protocol, mpiengine.connection, mpiengine.engine\n"
        "import mpiengine.partition, mpiengine.errors, mpiengine.payload\n"
        "import mpiengine.server, mpiengine.results\n"
        "print(sorted(m for m in ('mpi4py', 'IPython') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True,
                          text=True, timeout=25, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


# --- the kinds table ----------------------------------------------------------------------
def test_kinds_table_is_consistent():
    names = [v[0] for v in P.KINDS.values()]
    assert len(names) == len(set(names))
    assert P.ENGINE_OPS <= set(P.KINDS)
    assert all(0 < k < 256 for k in P.KINDS)  # a kind is a u8 on the wire
    assert P.kind_name(P.EXECUTE) == "execute"
    assert P.kind_name(P.APPLY) == "map"
    assert P.kind_name(250) == "kind 250"


# --- handshake -----------------------------------------------------------------------------
def test_handshake_gives_matching_session_keys():
    key = os.urandom(32)
    ck, sk = handshake(key)
    assert ck.send == sk.recv
    assert ck.recv == sk.send
    assert ck.send != ck.recv  # the two directions use different keys
    assert len(ck.send) == len(ck.recv) == 32
    ck2, _ = handshake(key)
    assert (ck2.send, ck2.recv) != (ck.send, ck.recv)  # fresh nonces, fresh keys
    assert key not in (ck.send, ck.recv)


def test_handshake_message_sizes():
    hello, nonce = P.server_hello()
    assert len(hello) == P.HELLO_SIZE and hello.startswith(P.HELLO_MAGIC)
    assert len(nonce) == P.NONCE_SIZE and hello.endswith(nonce)
    auth, _, _ = P.client_auth(b"k" * 32, hello)
    assert len(auth) == P.AUTH_SIZE
    proof, _ = P.server_check_auth(b"k" * 32, nonce, auth)
    assert len(proof) == P.PROOF_SIZE


def test_wrong_key_fails_at_the_server():
    with pytest.raises(AuthenticationError):
        handshake(os.urandom(32), client_key=os.urandom(32))


def test_server_without_the_key_fails_at_the_client():
    key, other = os.urandom(32), os.urandom(32)
    hello, nonce_s = P.server_hello()
    auth, _, nonce_c = P.client_auth(key, hello)
    # An impostor server that does not know `key` answers with a proof made with its own:
    # it runs the real server code with its key against a client that shares that key.
    fake_auth = nonce_c + P._mac(other, b"client", nonce_s, nonce_c)
    fake_proof, _ = P.server_check_auth(other, nonce_s, fake_auth)
    with pytest.raises(AuthenticationError):
        P.client_check_proof(key, nonce_s, nonce_c, fake_proof)
    with pytest.raises(AuthenticationError):
        P.client_check_proof(key, nonce_s, nonce_c, os.urandom(P.PROOF_SIZE))
    # The genuine proof, for the genuine nonces, passes.
    proof, _ = P.server_check_auth(key, nonce_s, auth)
    P.client_check_proof(key, nonce_s, nonce_c, proof)


def test_authentication_error_is_a_connect_error():
    assert issubclass(AuthenticationError, ConnectError)
    assert issubclass(AuthenticationError, ConnectionError)


def test_a_proof_for_other_nonces_is_refused():
    key = os.urandom(32)
    hello1, nonce_s1 = P.server_hello()
    auth1, _, _ = P.client_auth(key, hello1)
    _, nonce_s2 = P.server_hello()
    # A recorded AUTH replayed against a new connection (new server nonce) fails.
    with pytest.raises(AuthenticationError):
        P.server_check_auth(key, nonce_s2, auth1)


@pytest.mark.parametrize("auth_len", [0, 10, P.NONCE_SIZE, P.AUTH_SIZE - 1])
def test_short_auth_is_refused(auth_len):
    key = os.urandom(32)
    hello, nonce_s = P.server_hello()
    auth, _, _ = P.client_auth(key, hello)
    with pytest.raises(AuthenticationError):
        P.server_check_auth(key, nonce_s, auth[:auth_len])


@pytest.mark.parametrize("hello", [
    b"",
    b"HTTP/1.1 200 OK\r\n" + b"x" * 21,                     # right size, wrong magic
    P.HELLO_MAGIC + struct.pack("!H", P.VERSION) + b"n" * 31,  # one byte short
    P.HELLO_MAGIC + struct.pack("!H", P.VERSION) + b"n" * 33,  # one byte long
    P.HELLO_MAGIC + struct.pack("!H", P.VERSION + 1) + b"n" * 32,  # another version
])
def test_bad_hello_is_a_protocol_error(hello):
    with pytest.raises(ProtocolError):
        P.client_auth(os.urandom(32), hello)


# --- frames: round trips --------------------------------------------------------------------
FRAMES = [
    pytest.param([], id="no-parts"),
    pytest.param([b"one part"], id="one-part"),
    pytest.param([b""], id="one-empty-part"),
    pytest.param([b"a", b"", b"bc", b"", b""], id="empty-parts-between"),
    pytest.param([bytes([i % 256]) * (i % 7) for i in range(300)], id="300-parts"),
]


@pytest.mark.parametrize("parts", FRAMES)
@pytest.mark.parametrize("max_chunk", [1, 3, 1 << 20])
def test_frame_round_trip(parts, max_chunk):
    sender, parser = session()
    meta = {"code": "a = 1", "targets": [0, 2], "nested": {"x": None, "ü": 1.5}}
    data = wire(sender.encode(P.EXECUTE, meta, parts))
    frames = feed(parser, data, random.Random(max_chunk), max_chunk)
    assert len(frames) == 1
    f = frames[0]
    assert f.kind == P.EXECUTE
    assert f.meta == meta
    assert [bytes(p) for p in f.parts] == list(parts)


def test_large_part_in_random_chunks():
    sender, parser = session()
    rng = random.Random(1234)
    big = rng.randbytes(8 * 2**20)
    parts = [b"small", big, b"", b"tail"]
    data = wire(sender.encode(P.SCATTER, {"name": "x"}, parts))
    asked: List[int] = []
    frames = feed(parser, data, rng, max_chunk=256 * 1024, asked=asked)
    assert len(frames) == 1
    got = frames[0].parts
    assert [len(p) for p in got] == [len(p) for p in parts]
    assert bytes(got[1]) == big
    memoryview(got[1])[0] = 1  # received straight into its own writable buffer
    assert len(big) in asked  # the big part was offered as one buffer of its own


def test_non_bytes_parts_are_sent_without_copy_and_by_byte_length():
    import numpy as np
    sender, parser = session()
    rows = P.SMALL_FRAME // 32 + 1  # a frame too large to be joined into one buffer
    arr = np.arange(rows * 4, dtype=np.float64).reshape(rows, 4)
    chunks = sender.encode(P.PUSH, {}, [arr, memoryview(b"xyz")])
    assert any(isinstance(c, memoryview) and c.obj is arr for c in chunks)
    (frame,) = feed(parser, wire(chunks))
    assert len(frame.parts[0]) == arr.nbytes == rows * 32
    assert np.array_equal(np.frombuffer(frame.parts[0], dtype=np.float64).reshape(rows, 4), arr)
    assert bytes(frame.parts[1]) == b"xyz"


def test_a_small_frame_is_one_buffer_with_its_tag_and_reads_the_same():
    import numpy as np
    sender, parser = session()
    arr = np.arange(12, dtype=np.float64).reshape(3, 4)
    chunks = sender.encode(P.PUSH, {"a": 1}, [arr, [memoryview(b"x"), b"yz"], b""])
    assert len(chunks) == 1  # header, metadata, parts and tag in one buffer
    (frame,) = feed(parser, wire(chunks))
    assert frame.meta == {"a": 1}
    assert bytes(frame.parts[0]) == arr.tobytes() and bytes(frame.parts[1]) == b"xyz"
    assert frame.parts[2] == bytearray()


def test_whole_frames_and_a_partial_one_in_one_read():
    sender, parser = session()
    data = b"".join(wire(sender.encode(P.EXECUTE, {"i": i}, [bytes([i]) * i]))
                    for i in range(3))
    cut = len(data) - 5
    frames = parser.feed(data[:cut]) + parser.feed(data[cut:])
    assert [(f.meta["i"], bytes(f.parts[0])) for f in frames] == [
        (i, bytes([i]) * i) for i in range(3)]


def test_a_part_given_as_a_list_of_buffers_is_their_concatenation_without_a_copy():
    import numpy as np
    sender, parser = session()
    n = P.SMALL_FRAME // 8 + 1  # a frame too large to be joined into one buffer
    pieces = [np.arange(n, dtype=np.float64), memoryview(b"ab"), b"", bytearray(b"cde")]
    chunks = sender.encode(P.RESULT, {"sizes": [1]}, [b"head", pieces])
    assert any(isinstance(c, memoryview) and c.obj is pieces[0] for c in chunks)
    (frame,) = feed(parser, wire(chunks), random.Random(3), max_chunk=7000)
    assert bytes(frame.parts[0]) == b"head"
    assert bytes(frame.parts[1]) == pieces[0].tobytes() + b"abcde"
    assert P.part_size(pieces) == 8 * n + 5 and P.part_size(b"head") == 4


def test_many_frames_in_sequence_in_one_stream():
    sender, parser = session()
    sent = [(P.EXECUTE, {"i": i}, [bytes([i]) * i]) for i in range(20)]
    data = b"".join(wire(sender.encode(*s)) for s in sent)
    frames = feed(parser, data, random.Random(7), max_chunk=50)
    assert [(f.kind, f.meta, [bytes(p) for p in f.parts]) for f in frames] == sent
    assert sender.seq == parser.seq == 20


@pytest.mark.parametrize("size", [10, P.SMALL_FRAME + 1, 3 * P.STREAM_SLICE + 5])
def test_the_tag_is_gmac_of_the_frame_with_the_sequence_number_as_nonce(size):
    """What docs/wire.md specifies, checked against AES-GCM itself (small frames are
    tagged in one call, large ones slice by slice: both must give this tag)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    ck, _sk = handshake(os.urandom(32))
    sender = P.Sender(ck.send)
    for seq in range(2):
        data = wire(sender.encode(P.PUSH, {"seq": seq}, [os.urandom(size)]))
        body, tag = data[:-P.TAG_SIZE], data[-P.TAG_SIZE:]
        nonce = bytes(4) + struct.pack("!Q", seq)
        assert tag == AESGCM(ck.send).encrypt(nonce, b"", body)


# --- untagged frames (TLS connections) ------------------------------------------------
@pytest.mark.parametrize("parts", FRAMES)
@pytest.mark.parametrize("max_chunk", [1, 7, 1 << 20])
def test_untagged_frame_round_trip(parts, max_chunk):
    sender, parser = session(tagged=False)
    meta = {"code": "a = 1", "targets": [0, 2]}
    data = wire(sender.encode(P.EXECUTE, meta, parts))
    tagged = wire(session()[0].encode(P.EXECUTE, meta, parts))
    assert len(data) == len(tagged) - P.TAG_SIZE  # the same frame, without its tag
    (frame,) = feed(parser, data, random.Random(max_chunk), max_chunk)
    assert (frame.kind, frame.meta) == (P.EXECUTE, meta)
    assert [bytes(p) for p in frame.parts] == list(parts)


def test_untagged_large_parts_and_many_frames_in_one_stream():
    sender, parser = session(tagged=False)
    rng = random.Random(99)
    big = rng.randbytes(3 * 2**20)
    sent = [(P.PUSH, {"i": 0}, [big, b""]), (P.EXECUTE, {"i": 1}, []),
            (P.RESULT, {"i": 2}, [b"", b"x"]), (P.SCATTER, {"i": 3}, [b"y" * 5, big])]
    chunks = [sender.encode(*f) for f in sent]
    assert any(c is big for c in chunks[0])  # sent as it is, not copied
    data = b"".join(wire(c) for c in chunks)
    frames = feed(parser, data, rng, max_chunk=300_000)
    assert [(f.kind, f.meta, [bytes(p) for p in f.parts]) for f in frames] == sent
    assert sender.seq == parser.seq == 4


def test_untagged_frames_still_check_their_sequence_number():
    sender, parser = session(tagged=False)
    first = wire(sender.encode(P.EXECUTE, {"i": 0}))
    feed(parser, first)
    with pytest.raises(ProtocolError, match="sequence"):
        feed(parser, first)  # replayed


@pytest.mark.parametrize("sender_tagged", [True, False])
def test_ends_that_disagree_about_tags_fail_at_once(sender_tagged):
    ck, sk = handshake(os.urandom(32))
    sender = P.Sender(ck.send, tagged=sender_tagged)
    parser = P.FrameParser(sk.recv, tagged=not sender_tagged)
    data = b"".join(wire(sender.encode(P.EXECUTE, {"i": i}, [b"p" * i])) for i in range(3))
    with pytest.raises(ProtocolError):
        feed(parser, data)


def test_frame_repr_hides_payload():
    sender, parser = session()
    secret = b"TOP-SECRET-PAYLOAD"
    (frame,) = feed(parser, wire(sender.encode(P.PUSH, {"names": ["a"]}, [secret])))
    text = repr(frame)
    assert "TOP-SECRET" not in text
    assert "push" in text and str(len(secret)) in text


def test_sender_limits():
    sender, _ = session()
    with pytest.raises(ValueError):
        sender.encode(P.PUSH, {}, [b""] * (P.MAX_PARTS + 1))
    with pytest.raises(ValueError):
        sender.encode(P.PUSH, {"big": "x" * P.MAX_META})


# --- frames: tampering ------------------------------------------------------------------
def test_every_flipped_byte_is_detected():
    ck, sk = handshake(os.urandom(32))
    max_message = 4096
    data = wire(P.Sender(ck.send).encode(
        P.EXECUTE, {"code": "print(1)"}, [b"abc", b"", b"\x00" * 40]))
    # Enough trailing zeros for the largest length a flip can produce below the limit.
    pad = P.LENGTH.size * 65535 + max_message + P.TAG_SIZE + P.HEADER.size
    for i in range(len(data)):
        for mask in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= mask
            parser = P.FrameParser(sk.recv, max_message)
            with pytest.raises(ProtocolError):
                feed_until_error(parser, bytes(bad), pad, f"byte {i} ^ {mask:#x}")


def test_replayed_frame_is_refused():
    sender, parser = session()
    data = wire(sender.encode(P.EXECUTE, {"code": "x = 1"}))
    assert len(feed(parser, data)) == 1
    with pytest.raises(ProtocolError, match="sequence"):
        feed(parser, data)


def test_reordered_frames_are_refused():
    sender, parser = session()
    first = wire(sender.encode(P.EXECUTE, {"code": "a"}))
    second = wire(sender.encode(P.EXECUTE, {"code": "b"}))
    with pytest.raises(ProtocolError):
        feed(parser, second + first)


def test_frame_with_forged_sequence_number_is_refused():
    # Rewriting the seq field to the expected number does not help: the tag is keyed by seq.
    sender, parser = session()
    sender.encode(P.EXECUTE, {"code": "skipped"})
    data = bytearray(wire(sender.encode(P.EXECUTE, {"code": "b"})))
    struct.pack_into("!Q", data, 8, 0)
    with pytest.raises(ProtocolError, match="authentication"):
        feed(parser, bytes(data))


def test_frame_from_another_session_is_refused():
    sender_a, _ = session()
    _, parser_b = session()
    with pytest.raises(ProtocolError):
        feed(parser_b, wire(sender_a.encode(P.EXECUTE, {"code": "x"})))


def test_reflected_frame_is_refused():
    # The client's own frame sent back to it: the directions have different keys.
    ck, sk = handshake(os.urandom(32))
    data = wire(P.Sender(ck.send).encode(P.RESULT, {}))
    with pytest.raises(ProtocolError):
        feed(P.FrameParser(ck.recv), data)


def test_oversized_frame_fails_on_its_lengths_before_any_part_is_read():
    ck, sk = handshake(os.urandom(32))
    big = P.SMALL_FRAME + 1  # sent as pieces, the header and lengths first
    chunks = P.Sender(ck.send).encode(P.PUSH, {"a": 1}, [b"x" * 10, b"y" * big])
    head = bytes(chunks[0])  # header and lengths, nothing else
    assert len(head) == P.HEADER.size + 2 * P.LENGTH.size
    parser = P.FrameParser(sk.recv, max_message=1000)
    asked: List[int] = []
    with pytest.raises(ProtocolError, match="exceeds"):
        feed(parser, head, asked=asked)
    assert max(asked) <= P.HEADER.size  # no buffer was ever offered for a part
    assert big not in asked


@pytest.mark.parametrize("length", [2**64 - 1, 2**40, P.DEFAULT_MAX_MESSAGE + 1])
def test_huge_length_fails_with_the_default_limit(length):
    ck, sk = handshake(os.urandom(32))
    head = P.HEADER.pack(P.MAGIC, P.PUSH, 0, 1, 0, 2) + P.LENGTH.pack(length)
    parser = P.FrameParser(sk.recv)
    with pytest.raises(ProtocolError, match="exceeds"):
        feed(parser, head)


def test_meta_counts_towards_the_limit():
    ck, sk = handshake(os.urandom(32))
    data = wire(P.Sender(ck.send).encode(P.EXECUTE, {"code": "x" * 2000}))
    parser = P.FrameParser(sk.recv, max_message=1000)
    with pytest.raises(ProtocolError, match="exceeds"):
        feed(parser, data[:P.HEADER.size])  # the header alone is enough to tell


def test_meta_above_max_meta_fails_on_the_header():
    ck, sk = handshake(os.urandom(32))
    head = P.HEADER.pack(P.MAGIC, P.EXECUTE, 0, 0, 0, P.MAX_META + 1)
    with pytest.raises(ProtocolError, match="metadata"):
        feed(P.FrameParser(sk.recv), head)


@pytest.mark.parametrize("magic", [b"MPE2", b"GET ", b"\x00\x00\x00\x00", P.HELLO_MAGIC])
def test_bad_magic_fails_on_the_header(magic):
    ck, sk = handshake(os.urandom(32))
    data = bytearray(wire(P.Sender(ck.send).encode(P.EXECUTE, {})))
    data[:4] = magic
    with pytest.raises(ProtocolError, match="magic"):
        feed(P.FrameParser(sk.recv), bytes(data[:P.HEADER.size]))


@pytest.mark.parametrize("kind", [0, 10, 99, 255])
def test_unknown_kind_fails_on_the_header(kind):
    assert kind not in P.KINDS
    ck, sk = handshake(os.urandom(32))
    data = wire(P.Sender(ck.send).encode(kind, {}))  # a correctly tagged frame
    with pytest.raises(ProtocolError, match="kind"):
        feed(P.FrameParser(sk.recv), data[:P.HEADER.size])


@pytest.mark.parametrize("meta", [[1, 2], "text", 3, None, True])
def test_meta_that_is_not_an_object_is_refused(meta):
    ck, sk = handshake(os.urandom(32))
    data = wire(P.Sender(ck.send).encode(P.EXECUTE, meta))  # tag valid, meta not a dict
    with pytest.raises(ProtocolError, match="object"):
        feed(P.FrameParser(sk.recv), data)


@pytest.mark.parametrize("meta_b", [b"{not json", b"\xff\xfe\xfd", b'{"a": 1', b"{}{}"])
def test_meta_that_is_not_json_is_refused(meta_b):
    ck, sk = handshake(os.urandom(32))
    data = make_frame(ck.send, 0, P.EXECUTE, meta_b, [b"p"])
    with pytest.raises(ProtocolError, match="JSON"):
        feed(P.FrameParser(sk.recv), data)


def test_hand_built_frame_is_accepted():
    # make_frame agrees with Sender: the negative tests above differ in one thing only.
    ck, sk = handshake(os.urandom(32))
    data = make_frame(ck.send, 0, P.EXECUTE, b'{"code":"x"}', [b"p", b""])
    assert data == wire(P.Sender(ck.send).encode(P.EXECUTE, {"code": "x"}, [b"p", b""]))
    (frame,) = feed(P.FrameParser(sk.recv), data)
    assert frame.meta == {"code": "x"}


# --- fuzzing ----------------------------------------------------------------------------------
_KEYS = handshake(b"fuzz" * 8)

# Headers that pass the magic/kind/seq checks, so that the later stages get fuzzed too.
_valid_header = st.builds(
    lambda kind, flags, nparts, meta_len: P.HEADER.pack(P.MAGIC, kind, flags, nparts, 0, meta_len),
    st.sampled_from(sorted(P.KINDS)), st.integers(0, 255), st.integers(0, 8),
    st.integers(0, 64))
_garbage = st.one_of(
    st.binary(max_size=600),
    st.builds(lambda h, tail: h + tail, _valid_header, st.binary(max_size=600)),
)


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=_garbage, chunk=st.integers(1, 64))
def test_random_bytes_only_ever_raise_protocol_error(data, chunk):
    parser = P.FrameParser(_KEYS[1].recv, max_message=1 << 16)
    try:
        frames = feed(parser, data, random.Random(chunk), chunk)
    except ProtocolError:
        return
    assert frames == []  # nothing forged ever comes out
