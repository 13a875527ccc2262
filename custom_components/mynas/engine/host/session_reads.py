"""LIST, READ and HEADS: the host streams a listing or a tree back to its peer.

The disk is read in worker threads a chunk at a time (a few hundred entries, small files
whole, a large file in ``protocol.CHUNK`` pieces), and the channel is drained after each
chunk, so a peer that does not read holds the host to one chunk's worth of memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import dataclasses
import itertools
import math
import os

from .. import protocol
from ..errors import MyNasError
from ..tree import Entry, Kind
from .jail import Jail
from .session_io import SessionIO


class ReadStreams:
    """Answers LIST and READ for one session, in its peer's jail."""

    def __init__(self, jail: Jail, io: SessionIO) -> None:
        self._jail = jail
        self._io = io

    async def list(self, body: bytes) -> None:
        """LIST: the entries below a directory (or the whole jail), hashes if asked."""
        req, with_hash, path = protocol.parse_list(body)
        hash_file = self._jail.hash_file

        def hashed(item: Entry) -> _Carried:
            if with_hash and item.kind is Kind.FILE:
                return item, hash_file(item.path), item.size
            return item, None, 0

        source = _Chunks(self._listing(path), hashed, most=512, most_read=32 * 1024 * 1024)
        await self._send_listing(
            req, source, lambda item, digest: (protocol.entry(req, item, digest),)
        )

    async def read(self, body: bytes) -> None:
        """READ: a file, or a tree (its directory first), entries each followed by data."""
        req, path = protocol.parse_path(body)
        try:
            reader = await self._io.thread(_TreeReader, self._jail, path)
            while chunk := await self._io.thread(reader.next_chunk):
                for item, content in chunk:
                    self._io.send(protocol.entry(req, item))
                    if content is not None:
                        for start in range(0, len(content), protocol.CHUNK):
                            piece = content[start : start + protocol.CHUNK]
                            self._io.send(protocol.data(req, piece))
                    elif item.kind is Kind.FILE:
                        await self._stream_large(req, item)
                    await self._io.drain()
        except (MyNasError, OSError) as err:
            self._io.fail(req, err)
            return
        self._io.send(protocol.done(req))

    async def heads(self, body: bytes) -> None:
        """HEADS: the entries below a directory, each file followed by its first bytes."""
        req, length, path = protocol.parse_heads(body)
        jail = self._jail

        def with_head(item: Entry) -> _Carried:
            want = min(length, item.size)
            if item.kind is not Kind.FILE or not want:
                return item, None, 0
            head = _read_at(jail, item.path, want)
            # The entry announces the whole size; exactly ``head`` follows it.
            if len(head) < want:
                item = dataclasses.replace(item, size=len(head))
            return item, head, 0

        def frames(item: Entry, head: bytes | None) -> tuple[bytes, ...]:
            entry = protocol.entry(req, item)
            return (entry, protocol.data(req, head)) if head else (entry,)

        await self._send_listing(req, _Chunks(self._listing(path), with_head, most=256), frames)

    def _listing(self, path: bytes) -> Iterator[Entry]:
        return self._jail.list(path) if path else self._jail.list()

    async def _send_listing(
        self,
        req: int,
        source: _Chunks,
        frames: Callable[[Entry, bytes | None], tuple[bytes, ...]],
    ) -> None:
        """Send each entry of ``source`` as its ``frames``, draining after each chunk; DONE."""
        try:
            while chunk := await self._io.thread(source.next_chunk):
                for item, carried in chunk:
                    for frame in frames(item, carried):
                        self._io.send(frame)
                await self._io.drain()
        except (MyNasError, OSError) as err:
            self._io.fail(req, err)
            return
        self._io.send(protocol.done(req))

    async def _stream_large(self, req: int, item: Entry) -> None:
        fd = await self._io.thread(self._jail.open_read, item.path)
        try:
            remaining = item.size
            position = 0
            while remaining > 0:
                size = min(protocol.CHUNK, remaining)
                piece = await self._io.thread(os.pread, fd, size, position)
                if not piece:
                    raise MyNasError(f"{item.path!r} shrank while being read")
                self._io.send(protocol.data(req, piece))
                position += len(piece)
                remaining -= len(piece)
                await self._io.drain()
        finally:
            os.close(fd)


type _Carried = tuple[Entry, bytes | None, int]
"""An entry, what its frames carry (a hash, a head; None: nothing) and the bytes read for it."""


@dataclasses.dataclass(slots=True)
class _Chunks:
    """Pulls a listing from a worker thread in chunks, each entry with what it carries.

    A chunk ends at ``most`` entries, or once ``most_read`` bytes were read to carry them.
    """

    entries: Iterator[Entry]
    carry: Callable[[Entry], _Carried]
    most: int
    most_read: float = math.inf

    def next_chunk(self) -> list[tuple[Entry, bytes | None]]:
        chunk: list[tuple[Entry, bytes | None]] = []
        read = 0
        for listed in self.entries:
            item, carried, cost = self.carry(listed)
            chunk.append((item, carried))
            read += cost
            if len(chunk) >= self.most or read >= self.most_read:
                break
        return chunk


class _TreeReader:
    """Reads a file or a tree for READ: small files whole, in groups, from a worker thread."""

    SMALL = 1024 * 1024

    def __init__(self, jail: Jail, path: bytes) -> None:
        self._jail = jail
        top = jail.stat(path)
        # The tree's own directory comes first, so its mtime can be restored too.
        self._entries = itertools.chain([top], jail.list(path) if top.kind is Kind.DIR else ())

    def next_chunk(self) -> list[tuple[Entry, bytes | None]]:
        chunk: list[tuple[Entry, bytes | None]] = []
        size = 0
        for listed in self._entries:
            item, content = listed, None
            if item.kind is Kind.FILE and item.size <= self.SMALL:
                content = self._read_small(item)
                # The entry announces exactly the bytes that follow, even if the file moved on.
                item = dataclasses.replace(item, size=len(content))
                size += len(content)
            chunk.append((item, content))
            if item.kind is Kind.FILE and content is None:
                break  # a large file: the session streams it before the next chunk
            if len(chunk) >= 256 or size >= 4 * 1024 * 1024:
                break
        return chunk

    def _read_small(self, item: Entry) -> bytes:
        return _read_at(self._jail, item.path, self.SMALL)


def _read_at(jail: Jail, path: bytes, size: int) -> bytes:
    """Read up to ``size`` bytes from the start of a file in the jail."""
    fd = jail.open_read(path)
    try:
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)
