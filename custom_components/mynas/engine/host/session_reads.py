"""LIST, READ and HEADS: the host streams a listing or a tree back to its peer.

The disk is read in worker threads a chunk at a time (a few hundred entries, small files
whole, a large file in ``protocol.CHUNK`` pieces), and the channel is drained after each
chunk, so a peer that does not read holds the host to one chunk's worth of memory.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import itertools
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
        entries = self._jail.list(path) if path else self._jail.list()
        source = _Chunks(entries, with_hash, self._jail)
        try:
            while chunk := await self._io.thread(source.next_chunk):
                for item, digest in chunk:
                    self._io.send(protocol.entry(req, item, digest))
                await self._io.drain()
        except (MyNasError, OSError) as err:
            self._io.fail(req, err)
            return
        self._io.send(protocol.done(req))

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
        source = _Heads(self._jail.list(path) if path else self._jail.list(), length, self._jail)
        try:
            while chunk := await self._io.thread(source.next_chunk):
                for item, head in chunk:
                    self._io.send(protocol.entry(req, item))
                    if head:
                        self._io.send(protocol.data(req, head))
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


class _Chunks:
    """Pulls a listing from a worker thread a few hundred entries (and hashes) at a time."""

    def __init__(self, entries: Iterator[Entry], with_hash: bool, jail: Jail) -> None:
        self._entries = entries
        self._with_hash = with_hash
        self._jail = jail

    def next_chunk(self) -> list[tuple[Entry, bytes | None]]:
        chunk: list[tuple[Entry, bytes | None]] = []
        hashed = 0
        for item in self._entries:
            digest = None
            if self._with_hash and item.kind is Kind.FILE:
                digest = self._jail.hash_file(item.path)
                hashed += item.size
            chunk.append((item, digest))
            if len(chunk) >= 512 or hashed >= 32 * 1024 * 1024:
                break
        return chunk


class _Heads:
    """Pulls a listing with each file's first bytes from a worker thread, in chunks."""

    def __init__(self, entries: Iterator[Entry], length: int, jail: Jail) -> None:
        self._entries = entries
        self._length = length
        self._jail = jail

    def next_chunk(self) -> list[tuple[Entry, bytes | None]]:
        chunk: list[tuple[Entry, bytes | None]] = []
        for listed in self._entries:
            item, head = listed, None
            if item.kind is Kind.FILE and self._length and item.size:
                fd = self._jail.open_read(item.path)
                try:
                    head = os.pread(fd, min(self._length, item.size), 0)
                finally:
                    os.close(fd)
                # The entry announces the whole size; exactly ``head`` follows it.
                if len(head) < min(self._length, item.size):
                    item = dataclasses.replace(item, size=len(head))
            chunk.append((item, head))
            if len(chunk) >= 256:
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
        fd = self._jail.open_read(item.path)
        try:
            return os.read(fd, self.SMALL)
        finally:
            os.close(fd)
