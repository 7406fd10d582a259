"""The wire format between a client and the controller: one table, one screen.

A connection starts with a mutual challenge-response handshake, then carries
frames. Every frame is authenticated with the per-connection session key and the
frame's sequence number, so a recorded frame replayed on the same or on another
connection fails its check. Nothing in a frame is parsed (let alone unpickled)
before its tag has been verified; sizes are checked before anything is read.

Handshake (all fixed sizes; ``key`` is the per-job secret of the connection file)::

    server -> client  HELLO   b"MPEH" | version u16 | nonce_s[32]            38 bytes
    client -> server  AUTH    nonce_c[32] | HMAC(key, "client"|nonce_s|nonce_c)  64 bytes
    server -> client  PROOF   HMAC(key, "server"|nonce_c|nonce_s)                32 bytes

    session keys: HMAC(key, "c2s"|nonce_s|nonce_c) and HMAC(key, "s2c"|nonce_s|nonce_c)

Frame::

    header   "!4sBBHQI": magic b"MPE1" | kind u8 | flags u8 | nparts u16 | seq u64 | meta_len u32
    lengths  nparts x u64                      (length of each opaque part)
    meta     meta_len bytes of JSON            (small, never user objects)
    parts    the opaque parts (pickles and raw array buffers)
    tag      16 bytes: GMAC over everything above (AES-256-GCM with nothing to encrypt:
             key = the session key, nonce = 4 zero bytes | seq u64, the bytes as
             associated data); both ends compute it as the bytes go out and come in

On a TLS connection frames carry no tag (``tagged=False`` at both ends): TLS
already authenticates every record with its own sequence number, so the tag
would check the same bytes a second time (GMAC costs a third to a half of the
socket transfer of a large part here).
The header's sequence number is still checked. Both ends know whether the
connection is TLS (the client from the connection file), so they always agree.

The frame ``kind`` is one of the message kinds in :data:`KINDS` below; the same
numbers name the operations the controller sends to engines over MPI.
"""
from __future__ import annotations

import hmac
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import AuthenticationError, ProtocolError
from .payload import alloc

VERSION = 2
MAGIC = b"MPE1"
HELLO_MAGIC = b"MPEH"
HEADER = struct.Struct("!4sBBHQI")
LENGTH = struct.Struct("!Q")
TAG_SIZE = 16
NONCE_SIZE = 32
HELLO_SIZE = 4 + 2 + NONCE_SIZE
AUTH_SIZE = NONCE_SIZE + 32
PROOF_SIZE = 32

MAX_PARTS = 65535
MAX_META = 16 * 2**20
DEFAULT_MAX_MESSAGE = 16 * 2**30

# --- the message kinds -------------------------------------------------------------
# One table: number -> (name, who sends it, what it means). Engine operations are
# also the operation codes of commands broadcast over MPI (see fabric/engine).
EXECUTE, PUSH, PULL, SCATTER, GATHER, APPLY, KEYS, RESET, PING = 1, 2, 3, 4, 5, 6, 7, 8, 9
INFO, QUEUE_STATUS, FETCH, SHUTDOWN, CLOSE, INTERRUPT, STACKS, PARTIAL = range(20, 28)
RESULT, NOT_READY, ERROR = 40, 41, 42
STREAM, LOST = 50, 51

KINDS = {
    EXECUTE:      ("execute",      "client", "run code on the targets"),
    PUSH:         ("push",         "client", "bind names from a pickled dict on the targets"),
    PULL:         ("pull",         "client", "return the values of names from the targets"),
    SCATTER:      ("scatter",      "client", "split a sequence across the targets (MPI Scatterv)"),
    GATHER:       ("gather",       "client", "collect a name from the targets (MPI Gatherv)"),
    APPLY:        ("map",          "client", "apply a function to scattered chunks, gather the results"),
    KEYS:         ("keys",         "client", "list the names in each target's namespace"),
    RESET:        ("reset",        "client", "clear each target's namespace"),
    PING:         ("ping",         "client", "return host and pid of each target"),
    INFO:         ("info",         "client", "controller: engine ids, hosts, pids"),
    QUEUE_STATUS: ("queue_status", "client", "controller: each engine's running and queued commands"),
    FETCH:        ("fetch",        "client", "controller: deliver a stored result by its id"),
    SHUTDOWN:     ("shutdown",     "client", "controller: stop engines and controller"),
    CLOSE:        ("close",        "client", "controller: this client is leaving"),
    INTERRUPT:    ("interrupt",    "client", "raise KeyboardInterrupt in the targets' running user code"),
    STACKS:       ("stacks",       "client", "return each target's current Python stack"),
    PARTIAL:      ("partial",      "client", "controller: the engines done so far with a running command"),
    RESULT:       ("result",       "controller", "the result of a request"),
    NOT_READY:    ("not_ready",    "controller", "a fetched result is still running"),
    ERROR:        ("error",        "controller", "a request was refused (bad targets, unknown id, ...)"),
    STREAM:       ("stream",       "controller", "output printed so far by a running command"),
    LOST:         ("lost",         "controller", "an engine died; the job is ending"),
}
ENGINE_OPS = frozenset({EXECUTE, PUSH, PULL, SCATTER, GATHER, APPLY, KEYS, RESET, PING})


def kind_name(kind: int) -> str:
    return KINDS[kind][0] if kind in KINDS else f"kind {kind}"


# --- handshake ---------------------------------------------------------------------
def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.digest(key, b"".join(parts), "sha256")


@dataclass
class SessionKeys:
    send: bytes
    recv: bytes


def server_hello() -> tuple:
    """Return (hello bytes, nonce_s) for the server to send first."""
    nonce = os.urandom(NONCE_SIZE)
    return HELLO_MAGIC + struct.pack("!H", VERSION) + nonce, nonce


def client_auth(key: bytes, hello: bytes) -> tuple:
    """Check the server's hello; return (auth bytes, nonce_s, nonce_c)."""
    if len(hello) != HELLO_SIZE or hello[:4] != HELLO_MAGIC:
        raise ProtocolError("the server did not speak the mpiengine protocol")
    (version,) = struct.unpack("!H", hello[4:6])
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} at the server, {VERSION} here")
    nonce_s = hello[6:]
    nonce_c = os.urandom(NONCE_SIZE)
    return nonce_c + _mac(key, b"client", nonce_s, nonce_c), nonce_s, nonce_c


def server_check_auth(key: bytes, nonce_s: bytes, auth: bytes) -> tuple:
    """Verify the client's proof; return (proof bytes, SessionKeys) or raise."""
    nonce_c, proof = auth[:NONCE_SIZE], auth[NONCE_SIZE:]
    if not hmac.compare_digest(proof, _mac(key, b"client", nonce_s, nonce_c)):
        raise AuthenticationError("the client did not prove knowledge of the key")
    keys = SessionKeys(send=_mac(key, b"s2c", nonce_s, nonce_c),
                       recv=_mac(key, b"c2s", nonce_s, nonce_c))
    return _mac(key, b"server", nonce_c, nonce_s), keys


def client_check_proof(key: bytes, nonce_s: bytes, nonce_c: bytes, proof: bytes) -> SessionKeys:
    """Verify the server's proof; return the client's SessionKeys or raise."""
    if not hmac.compare_digest(proof, _mac(key, b"server", nonce_c, nonce_s)):
        raise AuthenticationError("the controller did not prove knowledge of the key")
    return SessionKeys(send=_mac(key, b"c2s", nonce_s, nonce_c),
                       recv=_mac(key, b"s2c", nonce_s, nonce_c))


_NONCE = struct.Struct("!4xQ")


class _Gmac:
    """A frame's tag as its bytes go by: GMAC, i.e. AES-GCM with nothing to encrypt
    and the bytes as associated data. The nonce is the frame's sequence number: one
    per frame, never repeated under a session key (each direction has its own)."""

    __slots__ = ("_ctx",)

    def __init__(self, aes: algorithms.AES, seq: int) -> None:
        self._ctx = Cipher(aes, modes.GCM(_NONCE.pack(seq))).encryptor()

    def update(self, data: Any) -> None:
        self._ctx.authenticate_additional_data(data)

    def finalize(self) -> bytes:
        self._ctx.finalize()
        return self._ctx.tag

    def verify(self, tag: bytes) -> None:
        if not hmac.compare_digest(self.finalize(), tag):
            raise ValueError("tag mismatch")


def _frame_mac(session_key: bytes, seq: int) -> _Gmac:
    return _Gmac(algorithms.AES(session_key), seq)


class _Untagged:
    """The MAC of an untagged (TLS) connection's frames: nothing to compute."""

    @staticmethod
    def update(data: Any) -> None:
        pass


_UNTAGGED = _Untagged()


def _json_default(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


try:  # the C encoder and scanner, made once (json.dumps/loads set them up on every call)
    _ENCODE: Any = json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None, _json_default, json.encoder.encode_basestring_ascii, None, ":", ",",
        False, False, True)
except (AttributeError, TypeError):  # pragma: no cover - an interpreter without them
    _ENCODE = None
_SCAN = json.decoder.JSONDecoder().scan_once


def _to_json(meta: dict) -> bytes:
    """``json.dumps(meta, separators=(",", ":"))``, as bytes."""
    if _ENCODE is None:  # pragma: no cover
        return json.dumps(meta, separators=(",", ":")).encode()
    return "".join(_ENCODE(meta, 0)).encode()


def _check_header(magic: bytes, kind: int, seq: int, expected: int, meta_len: int) -> None:
    if magic != MAGIC:
        raise ProtocolError("bad frame magic: not an mpiengine frame")
    if kind not in KINDS:
        raise ProtocolError(f"unknown frame kind {kind}")
    if seq != expected:
        raise ProtocolError(f"frame sequence {seq}, expected {expected}: replayed or reordered")
    if meta_len > MAX_META:
        raise ProtocolError(f"frame metadata of {meta_len} bytes exceeds {MAX_META}")


def _parse_meta(meta_b: bytes) -> dict:
    try:
        text = meta_b.decode("utf-8")
        if not text:
            return {}
        try:
            meta, end = _SCAN(text, 0)
        except StopIteration:
            end = -1
        if end != len(text):  # not one bare value: json.loads decides (and says why)
            meta = json.loads(text)
    except ValueError:
        raise ProtocolError("frame metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise ProtocolError("frame metadata is not an object")
    return meta


# --- frames --------------------------------------------------------------------------
@dataclass
class Frame:
    kind: int
    meta: dict
    parts: List[Any] = field(default_factory=list)  # bytes-like (bytearray on receipt)

    def __repr__(self) -> str:  # never shows payload bytes
        sizes = [memoryview(p).nbytes for p in self.parts]
        return f"<Frame {kind_name(self.kind)} meta={self.meta!r} parts={sizes}>"


#: Readers receive into a staging buffer of this size while the parser wants fewer
#: bytes (headers, metadata, small parts), and straight into the part otherwise.
STAGE = 64 * 1024

#: Large parts are MACed and sent in slices of this size, so that the MAC of one
#: slice overlaps the transfer of the previous one (the tag still comes last).
STREAM_SLICE = 1 << 20

#: A frame up to this size (parts and metadata) is built as one buffer and MACed in
#: one call: most frames are small, and for them the per-piece work is the cost.
SMALL_FRAME = STAGE // 2


def part_size(part: Any) -> int:
    """Bytes of a frame part: a buffer, or a list of buffers sent back to back."""
    if isinstance(part, list):
        return sum(memoryview(b).nbytes for b in part)
    return memoryview(part).nbytes


class Sender:
    """Turn frames into authenticated byte chunks (no copy of the parts).

    A part may be given as a list of buffers: it is sent as their concatenation
    (one part on the wire), without joining them first.
    """

    def __init__(self, session_key: bytes, tagged: bool = True) -> None:
        self.key = session_key
        self.tagged = tagged
        self.seq = 0
        self._aes = algorithms.AES(session_key)
        self._gcm = AESGCM(session_key)

    def stream(self, kind: int, meta: dict, parts: Sequence[Any] = ()) -> "Outgoing":
        """Return the frame as an :class:`Outgoing`, whose MAC is computed as it is sent."""
        if len(parts) > MAX_PARTS:
            raise ValueError(f"a frame holds at most {MAX_PARTS} parts, got {len(parts)}")
        meta_b = _to_json(meta)
        if len(meta_b) > MAX_META:
            raise ValueError(f"frame metadata of {len(meta_b)} bytes exceeds {MAX_META}")
        sizes = [part_size(p) for p in parts]
        head = HEADER.pack(MAGIC, kind, 0, len(parts), self.seq, len(meta_b))
        if sizes:
            head += struct.pack(f"!{len(sizes)}Q", *sizes)
        pieces: List[Any] = [head, meta_b]
        for p in parts:
            for b in (p if isinstance(p, list) else [p]):
                pieces.append(b if isinstance(b, (bytes, bytearray)) else memoryview(b).cast("B"))
        seq = self.seq
        self.seq += 1
        if sum(sizes) + len(meta_b) <= SMALL_FRAME:  # one buffer, tag included
            body = b"".join(pieces)
            tag = self._gcm.encrypt(_NONCE.pack(seq), b"", body) if self.tagged else b""
            return Outgoing(None, [body + tag])
        return Outgoing(_Gmac(self._aes, seq) if self.tagged else None, pieces)

    def encode(self, kind: int, meta: dict, parts: Sequence[Any] = ()) -> List[Any]:
        """Return the whole frame as chunks: header, meta, each part, tag."""
        out = self.stream(kind, meta, parts)
        if out.mac is None:  # a small frame (one buffer, tag included), or untagged
            return list(out.pieces)
        for piece in out.pieces:
            out.mac.update(piece)
        return [*out.pieces, out.mac.finalize()]


class Outgoing:
    """One frame's bytes in sending order, MACed as they are handed out.

    :meth:`take` returns the next chunks (slices of large parts) after adding them
    to the MAC; the tag, last, is computed when it is reached. A sender that
    takes, sends, and takes again overlaps the MAC with the transfer. With ``mac``
    None, the pieces come in one take as they are: a small frame built whole (tag
    included), or any frame of an untagged (TLS) connection.
    """

    def __init__(self, mac: Optional[_Gmac], pieces: List[Any]) -> None:
        self.mac = mac
        self.pieces = pieces
        self._i = 0       # next piece
        self._off = 0     # bytes of it already taken
        self._done = False

    def take(self, limit: int = 4 * STREAM_SLICE) -> List[memoryview]:
        """MAC and return the next chunks, about ``limit`` bytes; [] when all is out."""
        out: List[memoryview] = []
        if self.mac is None:  # whole, tag included
            if self._done:
                return out
            self._done = True
            return [memoryview(p) for p in self.pieces]
        budget = limit
        while self._i < len(self.pieces) and budget > 0:
            piece = memoryview(self.pieces[self._i]).cast("B")
            n = min(piece.nbytes - self._off, budget, STREAM_SLICE)
            if n > 0:
                chunk = piece[self._off:self._off + n]
                self.mac.update(chunk)
                out.append(chunk)
                self._off += n
                budget -= n
            if self._off >= piece.nbytes:
                self._i, self._off = self._i + 1, 0
        if self._i == len(self.pieces) and not self._done and budget > 0:
            self._done = True
            out.append(memoryview(self.mac.finalize()))
        return out


class FrameParser:
    """Incremental, size-checked, authenticated frame reader.

    The owner asks :meth:`want` for the buffer to fill next (so large parts are
    received straight into their final bytearray), fills some of it, and calls
    :meth:`advance`. A complete, verified frame is returned by :meth:`advance`.
    """

    def __init__(self, session_key: bytes, max_message: int = DEFAULT_MAX_MESSAGE,
                 tagged: bool = True, alloc: Callable[[int], Any] = alloc) -> None:
        self.max_message = max_message
        self.tagged = tagged
        self._alloc = alloc  # the buffers each stage, and each part, is received into
        self.seq = 0
        self._aes = algorithms.AES(session_key)
        self._gcm = AESGCM(session_key)
        self._reset()

    def _reset(self) -> None:
        self._stage = "header"
        self._buf = bytearray(HEADER.size)
        self._pos = 0
        self._lengths: List[int] = []
        self._parts: List[bytearray] = []
        self._kind = 0
        self._meta_b = b""
        self._mac: Any = _UNTAGGED

    def want(self) -> memoryview:
        """Return the writable view that the next received bytes belong in."""
        return memoryview(self._buf)[self._pos:]

    def advance(self, n: int) -> Optional[Frame]:
        """Record that ``n`` bytes were written into :meth:`want`'s view."""
        if self._stage == "part" and n:
            # MAC a part as it arrives: the check of a large part then overlaps its
            # transfer instead of following it. Nothing is used before the tag.
            self._mac.update(memoryview(self._buf)[self._pos:self._pos + n])
        self._pos += n
        while self._pos == len(self._buf):
            frame = self._next_stage()
            if frame is not None or self._stage == "header":
                return frame
        return None

    def feed(self, data: Any) -> List[Frame]:
        """Take bytes received into a buffer of the caller's; return the frames they
        complete. Readers receive small stages this way (one ``recv`` can bring a whole
        small frame, or several) and large parts straight into :meth:`want`."""
        frames: List[Frame] = []
        data = memoryview(data)
        pos = 0
        while pos < len(data):
            if self._stage == "header" and self._pos == 0:
                whole = self._whole(data, pos)  # the common case: a whole small frame
                if whole is not None:
                    frames.append(whole[0])
                    pos += whole[1]
                    continue
            view = self.want()
            n = min(len(view), len(data) - pos)
            view[:n] = data[pos:pos + n]
            pos += n
            frame = self.advance(n)
            if frame is not None:
                frames.append(frame)
        return frames

    def _whole(self, data: memoryview, pos: int) -> Optional[tuple]:
        """(frame, its size) if ``data[pos:]`` starts with a whole frame, else None.

        The same checks, in the same order, as the stage-by-stage path."""
        have = len(data) - pos
        if have < HEADER.size:
            return None
        magic, kind, _flags, nparts, seq, meta_len = HEADER.unpack_from(data, pos)
        _check_header(magic, kind, seq, self.seq, meta_len)
        body = HEADER.size + LENGTH.size * nparts
        if have < body:
            return None
        lengths = struct.unpack_from(f"!{nparts}Q", data, pos + HEADER.size)
        self._check_size(sum(lengths), meta_len)
        size = body + meta_len + sum(lengths)
        tag_size = TAG_SIZE if self.tagged else 0
        if have < size + tag_size:
            return None
        if self.tagged:
            signed = data[pos:pos + size]
            tag = bytes(data[pos + size:pos + size + TAG_SIZE])
            try:
                self._gcm.decrypt(_NONCE.pack(self.seq), tag, signed)
            except Exception:
                raise ProtocolError("frame failed authentication") from None
        self.seq += 1
        start = pos + body
        meta = _parse_meta(bytes(data[start:start + meta_len]))
        start += meta_len
        parts = []
        for n in lengths:
            parts.append(bytearray(data[start:start + n]))
            start += n
        return Frame(kind, meta, parts), size + tag_size

    def _check_size(self, parts: int, meta_len: int) -> None:
        if parts + meta_len > self.max_message:
            raise ProtocolError(f"frame of {parts} bytes exceeds the limit of {self.max_message}")

    def _next_stage(self) -> Optional[Frame]:
        stage, data = self._stage, self._buf
        if stage == "header":
            magic, kind, _flags, nparts, seq, meta_len = HEADER.unpack(bytes(data))
            _check_header(magic, kind, seq, self.seq, meta_len)
            self._kind, self._meta_len, self._nparts = kind, meta_len, nparts
            if self.tagged:
                self._mac = _Gmac(self._aes, self.seq)
            self._mac.update(bytes(data))
            self._set(LENGTH.size * nparts, "lengths")
        elif stage == "lengths":
            self._mac.update(bytes(data))
            self._lengths = [LENGTH.unpack_from(data, i * 8)[0] for i in range(self._nparts)]
            self._check_size(sum(self._lengths), self._meta_len)
            self._set(self._meta_len, "meta")
        elif stage == "meta":
            self._meta_b = bytes(data)
            self._mac.update(self._meta_b)
            self._start_part()
        elif stage == "part":
            self._parts.append(data)  # MACed as it came in (advance)
            self._start_part()
        elif stage == "tag":
            try:
                self._mac.verify(bytes(data))
            except Exception:
                raise ProtocolError("frame failed authentication") from None
            return self._finish()
        if self._stage == "end":  # untagged: the last part completes the frame
            return self._finish()
        return None

    def _finish(self) -> Frame:
        self.seq += 1
        meta = _parse_meta(self._meta_b)
        frame = Frame(self._kind, meta, self._parts)
        self._reset()
        return frame

    def _start_part(self) -> None:
        i = len(self._parts)
        if i < len(self._lengths):
            self._set(self._lengths[i], "part")
        elif self.tagged:
            self._set(TAG_SIZE, "tag")
        else:
            self._stage = "end"

    def _set(self, size: int, stage: str) -> None:
        self._stage, self._buf, self._pos = stage, self._alloc(size), 0
