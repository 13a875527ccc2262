"""The MyNAS replication protocol: frames over one SSH channel (subsystem ``mynas@1``).

Why not SFTP: per-file SFTP round trips top out near 2,000 files/s from Python. Here the
client streams requests without waiting, the host writes them in batches from a worker thread
and acknowledges each file once its batch is durable
(see docs/architecture.md, "One sync, end to end").

Every frame is ``u32 length | u8 type | body`` (big-endian; ``length`` counts type + body and
never exceeds ``MAX_FRAME``). ``id`` is a u32 the client picks per request; the host answers
each request exactly once (``OK``, ``FAIL``, ``OFFSET``, ``REPLY`` or, after a stream of
``ENTRY``/``DATA`` frames, ``DONE``), in the order it finished the work. Paths are raw bytes
relative to the peer's jail (``u16 length | bytes``), so any file name survives the trip.

====== ==== ================================================================================
frame  dir  body
====== ==== ================================================================================
HELLO  C→S  JSON ``{"protocol": 1}``; the host answers WELCOME (JSON: peer name, quota...)
PUT    C→S  id u32, mtime_ns i64, mode u16, path, data (the whole file: the batched path)
OPEN   C→S  id u32, size u64, mtime_ns i64, mode u16, path → OFFSET (resume point) or FAIL
DATA   C↔S  id u32, bytes: the next piece of the file being uploaded or read
CLOSE  C→S  id u32, how u8 (0 finish, 1 abandon and keep for resume, 2 discard) → OK/FAIL
DELETE C→S  id u32, path: move the file or tree into the host's trash → OK/FAIL
MKDIR  C→S  id u32, mtime_ns i64 (-1: leave), path → OK/FAIL
UTIME  C→S  id u32, mtime_ns i64, path → OK/FAIL
SYNC   C→S  id u32: make everything before it durable and answered, then OK
LIST   C→S  id u32, flags u8 (1: with content hashes), path (empty: whole jail)
            → ENTRY frames in canonical order, then DONE (or FAIL)
READ   C→S  id u32, path: a file or a tree → for each file an ENTRY, then its DATA
            frames; directories as ENTRY only; then DONE (or FAIL)
QUERY  C→S  id u32, JSON: ``{"op": "usage"}`` (→ ``used``, ``quota``, ``disk_free``; from
            90 % of the quota used also ``trash`` bytes, ``trash_oldest``/``trash_newest``
            stamps and ``trash_days``/``trash_days_longest``), ``{"op": "retention",
            "folder", "days"}``, ``{"op": "stat", "path": hex}`` (→ ``{"kind": "f" | "d" |
            null}``; a host that serves it lists ``"stat"`` in WELCOME's features) or
            ``{"op": "folders"}`` (→ ``{"folders": [{"name": hex, "files", "bytes",
            "changed"}], "more"}``: the top-level folders of the peer's own jail, stored
            sizes, the latest ctime; listed as ``"folders"`` in the features) → REPLY
HEADS  C→S  id u32, length u16 (at most MAX_HEAD), path: the directory's tree → for each
            file an ENTRY (its whole size), then one DATA of its first min(length, size)
            bytes (none when that is 0); directories as ENTRY only; then DONE (or FAIL).
            What adopting an encrypted replica reads (each file's sealed meta block); a
            host that serves it lists ``"heads"`` in WELCOME's features
ANNOUNCE C→S id u32, JSON ``{"addresses": ["host:port", ...]}``: where the sender can be
            reached now (at most ``MAX_ANNOUNCED``, each at most ``MAX_ADDRESS`` characters,
            the body at most ``MAX_ANNOUNCE_BODY`` bytes) → OK/FAIL. Only addresses: the
            sender is the connection's authenticated peer, nothing here changes its key
CHECK  C→S  id u32, JSON ``{"addresses": [...]}`` (empty: all announced): "connect back to
            these addresses of mine" → REPLY ``{"results": [{"address", "outcome",
            "detail"}], "seen_from"}``; only addresses the peer announced, at most
            ``MAX_CHECKED``, rate-limited (FAIL ``busy`` with ``retry_after`` seconds)
OK     S→C  id u32 ...: the requests named are done (and durable)
FAIL   S→C  id u32, JSON ``{"code", "message", ...}``; codes in ``FailCode``
OFFSET S→C  id u32, offset u64
ENTRY  S→C  id u32, kind u8, size u64, mtime_ns i64, mode u16, hash (u8 len + bytes), path
DONE   S→C  id u32
REPLY  S→C  id u32, JSON
====== ==== ================================================================================

WELCOME names the optional requests a host serves in ``features`` (``"announce"``,
``"check"``): an older host breaks off the session on a frame it does not know, so a
client sends those only when they are listed.

The reverse subsystem (``REVERSE_SUBSYSTEM``) carries the same frames with the roles of the
SSH connection turned round: a node that cannot accept connections opens the channel (as the
SSH client) and then *serves* the protocol on it, to the peer that accepted the connection.
The peer speaks first (HELLO) when it wants the channel; until then it stays idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
import enum
import json
import struct
from typing import Any, Protocol

from .errors import ProtocolError
from .tree import Entry, Kind

SUBSYSTEM = "mynas@1"
REVERSE_SUBSYSTEM = "mynas-reverse@1"
VERSION = 1
MAX_FRAME = 4 * 1024 * 1024 + 4096
# Large files travel as DATA frames of this size; small ones whole, in one PUT each.
CHUNK = 256 * 1024
# FrameReader asks the stream for this much at a time: one call serves many small frames.
READ_SIZE = 256 * 1024
MAX_PATH = 4096
MAX_HEAD = 4096  # bytes of each file a HEADS answer may carry
# ANNOUNCE and CHECK: what one peer may make the host remember, and dial for it.
MAX_ANNOUNCED = 8
MAX_ADDRESS = 255
MAX_ANNOUNCE_BODY = 4096
MAX_CHECKED = 4
# What a host lists in WELCOME's "features": what older hosts do not serve.
FEATURES = ("announce", "check", "folders", "heads", "stat")


class Frame(enum.IntEnum):
    """Frame types."""

    HELLO = 1
    WELCOME = 2
    PUT = 3
    OPEN = 4
    DATA = 5
    CLOSE = 6
    DELETE = 7
    MKDIR = 8
    UTIME = 9
    SYNC = 10
    LIST = 11
    READ = 12
    QUERY = 13
    HEADS = 40
    OK = 20
    FAIL = 21
    OFFSET = 22
    ENTRY = 23
    DONE = 24
    REPLY = 25
    ANNOUNCE = 30
    CHECK = 31


class Close(enum.IntEnum):
    """How an upload ends."""

    FINISH = 0
    ABANDON = 1
    DISCARD = 2


class FailCode(enum.StrEnum):
    """Why the host refused a request."""

    QUOTA = "quota"
    DISK_FULL = "disk_full"
    PATH = "path"
    MISSING = "missing"
    CHANGED = "changed"
    IO = "io"
    PROTOCOL = "protocol"
    INVALID = "invalid"
    BUSY = "busy"


_HEAD = struct.Struct(">IB")
_LEN32 = 4  # the length field, which does not count itself
_ID = struct.Struct(">I")
_PUT = struct.Struct(">IqH")
_OPEN = struct.Struct(">IQqH")
_CLOSE = struct.Struct(">IB")
_TIME = struct.Struct(">Iq")
_FLAGS = struct.Struct(">IB")
_HEADS = struct.Struct(">IH")
_OFFSET = struct.Struct(">IQ")
_ENTRY = struct.Struct(">IBQqH")
_LEN16 = struct.Struct(">H")
# What a DATA frame carries besides its bytes (length, type, id).
DATA_OVERHEAD = _HEAD.size + _ID.size


class Reader(Protocol):
    """What frames are read from (asyncssh's SSHReader, asyncio.StreamReader)."""

    async def readexactly(self, n: int) -> bytes:
        """Read exactly ``n`` bytes."""
        ...


class BufferedReader(Reader, Protocol):
    """A reader that can also return whatever is available (FrameReader's source)."""

    async def read(self, n: int = -1) -> bytes:
        """Read at most ``n`` bytes, waiting only until some are there (b"" at the end)."""
        ...


class Writer(Protocol):
    """What frames are written to (asyncssh's SSHWriter, asyncio.StreamWriter)."""

    def write(self, data: bytes) -> None:
        """Queue ``data``."""

    async def drain(self) -> None:
        """Wait until the queue is small again."""


async def read_frame(reader: Reader) -> tuple[Frame, bytes]:
    """Read one frame; raise ProtocolError on an unknown type or an oversized frame.

    Raises asyncio.IncompleteReadError when the stream ends (cleanly between frames, when
    ``partial`` is empty).
    """
    head = await reader.readexactly(_HEAD.size)
    length, kind = _HEAD.unpack(head)
    if not 1 <= length <= MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes (limit {MAX_FRAME})")
    try:
        frame = Frame(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame type {kind}") from None
    body = await reader.readexactly(length - 1) if length > 1 else b""
    return frame, body


def _check_head(length: int, kind: int) -> Frame:
    if not 1 <= length <= MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes (limit {MAX_FRAME})")
    try:
        return Frame(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame type {kind}") from None


class FrameReader:
    """Reads frames from a stream ``READ_SIZE`` bytes at a time and splits them from a buffer.

    ``read_frame`` with two ``readexactly`` calls costs two trips through the stream (its
    lock, its buffer list) per frame; here one ``read`` serves every small frame it brought.
    A frame cut by the end of a read is completed with one ``readexactly`` of exactly its
    missing bytes, so the next read starts on a frame boundary and nothing is copied twice.
    Each body is a ``bytes`` object of its own: keeping one never keeps a whole read alive.

    ``charge``, when given, is awaited with each frame's body length before the body is
    taken: the caller's byte budget, which may wait (and so stop reading the stream: SSH
    flow control then holds the sender back) until bytes held earlier are given back.
    """

    def __init__(
        self,
        reader: BufferedReader,
        *,
        charge: Callable[[int], Awaitable[None]] | None = None,
        read_size: int = READ_SIZE,
    ) -> None:
        """Read from ``reader``; ``charge(n)`` is awaited before each body of ``n`` bytes."""
        self._reader = reader
        self._charge = charge
        self._read_size = read_size
        self._buf = b""
        self._pos = 0
        self._eof = False  # the stream has ended (seen by ``fill``)

    @property
    def ended(self) -> bool:
        """Whether ``fill`` found the end of the stream."""
        return self._eof

    @property
    def buffered(self) -> int:
        """Bytes read from the stream and not yet returned in a frame."""
        return len(self._buf) - self._pos

    def peek(self) -> Frame | None:
        """Return the type of the next frame if it is buffered whole, else None."""
        if not self.ready():
            return None
        try:
            return Frame(self._buf[self._pos + _LEN32])
        except ValueError:
            return None  # read_frame reports it

    def ready(self) -> bool:
        """Return whether a whole frame is buffered (``read_frame`` needs no stream read)."""
        if self.buffered < _HEAD.size:
            return False
        length, _ = _HEAD.unpack_from(self._buf, self._pos)
        return bool(self.buffered >= _LEN32 + length)

    async def fill(self) -> None:
        """Wait until more bytes are buffered, or the stream has ended.

        Safe to cancel (e.g. under ``asyncio.timeout``): a read still waiting has taken
        nothing from the stream yet.
        """
        data = await self._reader.read(self._read_size)
        self._append(data)
        self._eof = not data

    def _append(self, data: bytes) -> None:
        if self._pos < len(self._buf):
            self._buf = self._buf[self._pos :] + data
        else:
            self._buf = data
        self._pos = 0

    async def read_frame(self) -> tuple[Frame, bytes]:
        """Read one frame; ProtocolError on an unknown type or an oversized frame.

        Raises asyncio.IncompleteReadError when the stream ends (``partial`` is empty when
        it ended cleanly between frames).
        """
        while True:
            buf, pos = self._buf, self._pos
            if len(buf) - pos >= _HEAD.size:
                length, kind = _HEAD.unpack_from(buf, pos)
                frame = _check_head(length, kind)
                if self._charge is not None:
                    await self._charge(length - 1)
                end = pos + _LEN32 + length
                if end <= len(buf):
                    self._pos = end
                    return frame, buf[pos + _HEAD.size : end]
                # Cut by the end of the buffer: read exactly what is missing of this frame.
                self._buf, self._pos = b"", 0
                try:
                    rest = await self._reader.readexactly(end - len(buf))
                except asyncio.IncompleteReadError as err:
                    raise asyncio.IncompleteReadError(buf[pos:] + err.partial, None) from None
                head_end = pos + _HEAD.size
                return frame, buf[head_end:] + rest if head_end < len(buf) else rest
            data = b"" if self._eof else await self._reader.read(self._read_size)
            if not data:
                raise asyncio.IncompleteReadError(buf[pos:], None)
            self._append(data)


def frame(kind: Frame, *parts: bytes | memoryview) -> bytes:
    """Encode one frame from its body parts."""
    length = 1 + sum(len(part) for part in parts)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes (limit {MAX_FRAME})")
    return b"".join((_HEAD.pack(length, kind), *parts))


def _path(path: bytes) -> bytes:
    if len(path) > MAX_PATH:
        raise ProtocolError(f"path of {len(path)} bytes (limit {MAX_PATH})")
    return _LEN16.pack(len(path)) + path


def _split_path(body: bytes, offset: int) -> tuple[bytes, int]:
    if offset + _LEN16.size > len(body):
        raise ProtocolError("truncated path")
    (length,) = _LEN16.unpack_from(body, offset)
    start = offset + _LEN16.size
    end = start + length
    if end > len(body):
        raise ProtocolError("truncated path")
    return body[start:end], end


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def parse_json(body: bytes, offset: int = 0) -> dict[str, Any]:
    """Decode the JSON object at ``body[offset:]``."""
    try:
        value = json.loads(body[offset:])
    except ValueError as err:
        raise ProtocolError(f"bad JSON: {err}") from None
    except RecursionError:  # "[[[[…": a peer's frame must not take the connection down
        raise ProtocolError("bad JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise ProtocolError("JSON body is not an object")
    return value


# --- encoders ------------------------------------------------------------------------------


def hello() -> bytes:
    """Encode HELLO."""
    return frame(Frame.HELLO, _json({"protocol": VERSION}))


def welcome(info: dict[str, Any]) -> bytes:
    """Encode WELCOME."""
    return frame(Frame.WELCOME, _json(info))


def put(req: int, path: bytes, mtime_ns: int, mode: int, data: bytes | memoryview) -> bytes:
    """Encode PUT (a whole small file)."""
    return frame(Frame.PUT, _PUT.pack(req, mtime_ns, mode), _path(path), data)


def open_upload(req: int, path: bytes, size: int, mtime_ns: int, mode: int) -> bytes:
    """Encode OPEN (start or resume a large file)."""
    return frame(Frame.OPEN, _OPEN.pack(req, size, mtime_ns, mode), _path(path))


def data(req: int, chunk: bytes | memoryview) -> bytes:
    """Encode DATA."""
    return frame(Frame.DATA, _ID.pack(req), chunk)


def close(req: int, how: Close) -> bytes:
    """Encode CLOSE."""
    return frame(Frame.CLOSE, _CLOSE.pack(req, how))


def delete(req: int, path: bytes) -> bytes:
    """Encode DELETE."""
    return frame(Frame.DELETE, _ID.pack(req), _path(path))


def mkdir(req: int, path: bytes, mtime_ns: int | None) -> bytes:
    """Encode MKDIR."""
    return frame(Frame.MKDIR, _TIME.pack(req, -1 if mtime_ns is None else mtime_ns), _path(path))


def utime(req: int, path: bytes, mtime_ns: int) -> bytes:
    """Encode UTIME."""
    return frame(Frame.UTIME, _TIME.pack(req, mtime_ns), _path(path))


def sync(req: int) -> bytes:
    """Encode SYNC."""
    return frame(Frame.SYNC, _ID.pack(req))


def list_tree(req: int, path: bytes, *, with_hash: bool) -> bytes:
    """Encode LIST."""
    return frame(Frame.LIST, _FLAGS.pack(req, 1 if with_hash else 0), _path(path))


def read(req: int, path: bytes) -> bytes:
    """Encode READ."""
    return frame(Frame.READ, _ID.pack(req), _path(path))


def heads(req: int, path: bytes, length: int) -> bytes:
    """Encode HEADS (the first ``length`` bytes of every file below ``path``)."""
    if not 0 <= length <= MAX_HEAD:
        raise ProtocolError(f"HEADS of {length} bytes (limit {MAX_HEAD})")
    return frame(Frame.HEADS, _HEADS.pack(req, length), _path(path))


def query(req: int, request: dict[str, Any]) -> bytes:
    """Encode QUERY."""
    return frame(Frame.QUERY, _ID.pack(req), _json(request))


def announce(req: int, addresses: list[str] | tuple[str, ...]) -> bytes:
    """Encode ANNOUNCE (where we can be reached)."""
    return frame(Frame.ANNOUNCE, _ID.pack(req), _json({"addresses": list(addresses)}))


def check(req: int, addresses: list[str] | tuple[str, ...] = ()) -> bytes:
    """Encode CHECK (connect back to these announced addresses of ours)."""
    return frame(Frame.CHECK, _ID.pack(req), _json({"addresses": list(addresses)}))


def ok(*reqs: int) -> bytes:
    """Encode OK for one or more requests."""
    return frame(Frame.OK, b"".join(_ID.pack(req) for req in reqs))


def fail(req: int, code: FailCode, message: str, **extra: Any) -> bytes:
    """Encode FAIL."""
    return frame(Frame.FAIL, _ID.pack(req), _json({"code": code, "message": message, **extra}))


def offset(req: int, value: int) -> bytes:
    """Encode OFFSET."""
    return frame(Frame.OFFSET, _OFFSET.pack(req, value))


def entry(req: int, item: Entry, digest: bytes | None = None) -> bytes:
    """Encode ENTRY."""
    digest = digest or b""
    kind = 0 if item.kind is Kind.FILE else 1
    return frame(
        Frame.ENTRY,
        _ENTRY.pack(req, kind, item.size, item.mtime_ns, item.mode),
        bytes((len(digest),)),
        digest,
        _path(item.path),
    )


def done(req: int) -> bytes:
    """Encode DONE."""
    return frame(Frame.DONE, _ID.pack(req))


def reply(req: int, value: dict[str, Any]) -> bytes:
    """Encode REPLY."""
    return frame(Frame.REPLY, _ID.pack(req), _json(value))


# --- decoders ------------------------------------------------------------------------------


def _unpack(fmt: struct.Struct, body: bytes) -> tuple[Any, ...]:
    if len(body) < fmt.size:
        raise ProtocolError("truncated frame")
    return fmt.unpack_from(body)


def request_id(body: bytes) -> int:
    """Return the request id that starts most bodies."""
    (req,) = _unpack(_ID, body)
    return int(req)


@dataclass(frozen=True, slots=True)
class PutRequest:
    """A decoded PUT."""

    req: int
    path: bytes
    mtime_ns: int
    mode: int
    data: memoryview


def parse_put(body: bytes) -> PutRequest:
    """Decode PUT."""
    req, mtime_ns, mode = _unpack(_PUT, body)
    path, end = _split_path(body, _PUT.size)
    return PutRequest(req, path, mtime_ns, mode, memoryview(body)[end:])


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """A decoded OPEN."""

    req: int
    path: bytes
    size: int
    mtime_ns: int
    mode: int


def parse_open(body: bytes) -> OpenRequest:
    """Decode OPEN."""
    req, size, mtime_ns, mode = _unpack(_OPEN, body)
    path, _ = _split_path(body, _OPEN.size)
    return OpenRequest(req, path, size, mtime_ns, mode)


def parse_data(body: bytes) -> tuple[int, memoryview]:
    """Decode DATA into (id, bytes)."""
    return request_id(body), memoryview(body)[_ID.size :]


def parse_close(body: bytes) -> tuple[int, Close]:
    """Decode CLOSE."""
    req, how = _unpack(_CLOSE, body)
    try:
        return req, Close(how)
    except ValueError:
        raise ProtocolError(f"unknown close mode {how}") from None


def parse_path(body: bytes) -> tuple[int, bytes]:
    """Decode DELETE or READ: (id, path)."""
    req = request_id(body)
    path, _ = _split_path(body, _ID.size)
    return req, path


def parse_time(body: bytes) -> tuple[int, int, bytes]:
    """Decode MKDIR or UTIME: (id, mtime_ns, path)."""
    req, mtime_ns = _unpack(_TIME, body)
    path, _ = _split_path(body, _TIME.size)
    return req, mtime_ns, path


def parse_list(body: bytes) -> tuple[int, bool, bytes]:
    """Decode LIST: (id, with_hash, path)."""
    req, flags = _unpack(_FLAGS, body)
    path, _ = _split_path(body, _FLAGS.size)
    return req, bool(flags & 1), path


def parse_heads(body: bytes) -> tuple[int, int, bytes]:
    """Decode HEADS: (id, length, path)."""
    req, length = _unpack(_HEADS, body)
    if length > MAX_HEAD:
        raise ProtocolError(f"HEADS of {length} bytes (limit {MAX_HEAD})")
    path, _ = _split_path(body, _HEADS.size)
    return req, length, path


def parse_query(body: bytes) -> tuple[int, dict[str, Any]]:
    """Decode QUERY."""
    return request_id(body), parse_json(body, _ID.size)


def parse_ok(body: bytes) -> list[int]:
    """Decode OK into the request ids it names."""
    if not body or len(body) % _ID.size:
        raise ProtocolError("malformed OK")
    return [req for (req,) in _ID.iter_unpack(body)]


def parse_fail(body: bytes) -> tuple[int, dict[str, Any]]:
    """Decode FAIL."""
    return request_id(body), parse_json(body, _ID.size)


def parse_offset(body: bytes) -> tuple[int, int]:
    """Decode OFFSET."""
    req, value = _unpack(_OFFSET, body)
    return req, value


def parse_entry(body: bytes) -> tuple[int, Entry, bytes | None]:
    """Decode ENTRY into (id, entry, hash or None)."""
    req, kind, size, mtime_ns, mode = _unpack(_ENTRY, body)
    if kind not in (0, 1):
        raise ProtocolError(f"unknown entry kind {kind}")
    start = _ENTRY.size
    if len(body) <= start:
        raise ProtocolError("truncated entry")
    hash_len = body[start]
    digest = body[start + 1 : start + 1 + hash_len]
    path, _ = _split_path(body, start + 1 + hash_len)
    item = Entry(path, Kind.FILE if kind == 0 else Kind.DIR, size, mtime_ns, mode)
    return req, item, digest or None


def parse_reply(body: bytes) -> tuple[int, dict[str, Any]]:
    """Decode REPLY."""
    return request_id(body), parse_json(body, _ID.size)


def _addresses(body: bytes, limit: int) -> tuple[int, list[str]]:
    req = request_id(body)
    if len(body) - _ID.size > MAX_ANNOUNCE_BODY:
        raise ProtocolError(f"address list of {len(body)} bytes (limit {MAX_ANNOUNCE_BODY})")
    value = parse_json(body, _ID.size).get("addresses", [])
    if not isinstance(value, list) or len(value) > limit:
        raise ProtocolError(f"addresses must be a list of at most {limit}")
    found: list[str] = []
    for item in value:
        if not isinstance(item, str) or not 0 < len(item) <= MAX_ADDRESS:
            raise ProtocolError(f"an address is a string of at most {MAX_ADDRESS} characters")
        if item not in found:
            found.append(item)
    return req, found


def parse_announce(body: bytes) -> tuple[int, list[str]]:
    """Decode ANNOUNCE: (id, addresses, duplicates dropped). Anything else in it is ignored."""
    return _addresses(body, MAX_ANNOUNCED)


def parse_check(body: bytes) -> tuple[int, list[str]]:
    """Decode CHECK: (id, the announced addresses to dial; empty for all of them)."""
    return _addresses(body, MAX_ANNOUNCED)
