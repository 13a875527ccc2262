"""The replication protocol, served to one authenticated peer on one channel.

``protocol`` says what the frames are; this is what the host does with them, in its
peer's jail: PUTs of small files gathered into batches that one worker thread writes (one
``syncfs`` each), uploads of large files streamed in groups of chunks, DELETE/MKDIR/UTIME
carried out together, LIST/READ/STAT/HASH/USAGE answered from the disk. Every byte of the
peer's data held in memory is taken from the session's and the peer's byte budgets before
it is read (see ``server``), and every disk operation runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
import dataclasses
from dataclasses import dataclass, field
import itertools
import logging
import os
from typing import Any, ClassVar

import asyncssh
from asyncssh.stream import SSHReader, SSHWriter

from .. import protocol
from ..errors import MyNasError, PathRefused, PeerDiskFull, ProtocolError, QuotaExceeded
from ..protocol import FailCode, Frame
from ..tree import Entry, Kind
from .budget import ByteBudget
from .jail import Jail
from .limits import Limits
from .quota import charge
from .upload import Upload
from .writes import IncomingFile

_LOGGER = logging.getLogger(__name__)


# Requests on paths that are answered in groups (see ReplicationSession._ops).
_OPS = frozenset({Frame.DELETE, Frame.MKDIR, Frame.UTIME})
_MAX_OPS = 256
type _Op = tuple[int, Callable[..., object], tuple[Any, ...]]

# What one frame held in memory costs beyond its body (the bytes object, a memoryview, a
# batch entry): charged with the body, so that a flood of tiny frames is bounded too.
_FRAME_COST = 512


def _cost(body: bytes) -> int:
    return len(body) + _FRAME_COST


@dataclass(slots=True)
class _Batch:
    items: list[tuple[int, IncomingFile]] = field(default_factory=list)
    size: int = 0  # bytes of file data
    held: int = 0  # bytes of the session's budget its frames hold
    started: float = 0.0  # event loop time of its first file


@dataclass(slots=True)
class _OpenUpload:
    req: int
    upload: Upload
    chunks: list[memoryview] = field(default_factory=list)
    held: int = 0  # budget bytes of the chunks not yet handed to the writer
    writer: asyncio.Task[None] | None = None
    error: BaseException | None = None


class ReplicationSession:
    """Serves the replication protocol to one authenticated peer on one channel."""

    def __init__(
        self,
        limits: Limits,
        jail: Jail,
        reader: SSHReader[bytes],
        writer: SSHWriter[bytes],
        budget: ByteBudget,
    ) -> None:
        self._limits = limits
        self._jail = jail
        self._frames = protocol.FrameReader(reader, charge=self._charge)
        self._writer = writer
        self._budget = budget
        self._batch = _Batch()
        self._in_flight: deque[asyncio.Task[None]] = deque()
        self._upload: _OpenUpload | None = None
        self._written = False  # frames were written since the last drain
        self._loop = asyncio.get_running_loop()

    async def run(self) -> None:
        """Serve frames until the peer closes the channel (or breaks the protocol)."""
        try:
            await self._handshake()
            while True:
                if self._batch.items and not self._frames.ready():
                    await self._wait_or_submit()
                try:
                    kind, body = await self._frames.read_frame()
                except asyncio.IncompleteReadError:
                    break
                await self._dispatch(kind, body)
            await self._flush()
        except ProtocolError as err:
            _LOGGER.warning("%s broke the protocol: %s", self._jail.name, err)
        except TimeoutError, asyncssh.Error, ConnectionError, BrokenPipeError:
            pass
        finally:
            await self._teardown()

    async def _wait_or_submit(self) -> None:
        """No whole frame at hand while a batch waits: let it grow only while data flows.

        The batch goes to the disk once it is ``batch_age`` old, or when the channel has
        brought nothing for ``batch_idle``: on a slow link (or while the peer pauses) its
        files are acknowledged promptly instead of waiting for a full batch.
        """
        frames = self._frames
        # (Past one read's worth, the rest of a big frame is read in one piece.)
        while not frames.ready() and not frames.ended and frames.buffered < protocol.READ_SIZE:
            age_left = self._batch.started + self._limits.batch_age - self._loop.time()
            if age_left <= 0:
                break
            try:
                async with asyncio.timeout(min(age_left, self._limits.batch_idle)):
                    await frames.fill()
            except TimeoutError:
                break
        else:
            return  # a frame (or the end of the stream) is here: the batch may still grow
        await self._submit()

    async def _charge(self, size: int) -> None:
        """Take a frame's bytes from the budget before reading it (FrameReader's hook)."""
        cost = size + _FRAME_COST
        if not self._budget.try_take(cost):
            # Before waiting, everything held must be on its way to the disk: the bytes
            # given back then are what the wait is for (see budget.py).
            await self._submit()
            self._write_chunks()
            await self._budget.take(cost)

    async def _handshake(self) -> None:
        kind, body = await asyncio.wait_for(self._frames.read_frame(), self._limits.hello_timeout)
        self._budget.give(_cost(body))
        if kind is not Frame.HELLO:
            raise ProtocolError("expected HELLO")
        self._writer.write(protocol.welcome(self._welcome()))

    def _welcome(self) -> dict[str, Any]:
        usage = self._jail.usage()
        return {
            "protocol": protocol.VERSION,
            "peer": self._jail.name,
            "quota": usage.quota,
            "used": usage.used,
            "chunk": protocol.CHUNK,
            "batch_bytes": self._limits.batch_bytes,
        }

    async def _teardown(self) -> None:
        # Data not yet handed to the disk is dropped (the client never got an OK for it):
        # give its reservations back. Batches already being written complete.
        _release(self._jail, self._batch)
        self._batch = _Batch()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._upload is not None:
            state = self._upload
            self._upload = None
            state.chunks.clear()  # never written: the partial ends where the disk has it
            # Never cancelled: a write running in a worker thread would go on while
            # abandon() closes its file. The writer ends after the chunks it holds.
            if state.writer is not None:
                await asyncio.gather(asyncio.shield(state.writer), return_exceptions=True)
            await self._thread(state.upload.abandon)
        self._budget.close()  # whatever is still held goes back to the peer's budget

    async def _thread[T](self, func: Callable[..., T], *args: Any) -> T:
        return await self._loop.run_in_executor(None, func, *args)

    def _send(self, data: bytes) -> None:
        self._writer.write(data)
        self._written = True

    def _send_error(self, req: int, err: BaseException) -> None:
        self._send(_failure(req, err))

    async def _dispatch(self, kind: Frame, body: bytes) -> None:
        if kind is Frame.PUT:
            await self._put(body)
        elif kind is Frame.DATA:
            self._data(body)
        else:
            self._budget.give(_cost(body))  # nothing of these bodies is kept
            if self._upload is not None and kind is not Frame.CLOSE:
                raise ProtocolError(f"{kind.name} while an upload is open")
            handler = self._handlers.get(kind)
            if handler is None and kind not in _OPS:
                raise ProtocolError(f"unexpected {kind.name}")
            await self._flush()
            if handler is None:
                await self._ops(kind, body)
            else:
                await handler(self, body)
        if self._written:
            # Bound what the writer holds: a peer that never reads its answers gets paused.
            self._written = False
            await self._writer.drain()

    # --- the batched path ------------------------------------------------------------------

    async def _put(self, body: bytes) -> None:
        # The path is checked (syntax and disk) by write_batch, in a worker thread.
        request = protocol.parse_put(body)
        try:
            self._jail.quota.reserve(charge(len(request.data)))
        except QuotaExceeded as err:
            self._budget.give(_cost(body))
            self._send_error(request.req, err)
            return
        batch = self._batch
        if not batch.items:
            batch.started = self._loop.time()
        item = IncomingFile(request.path, request.data, request.mtime_ns, request.mode)
        batch.items.append((request.req, item))
        batch.size += len(request.data)
        batch.held += _cost(body)
        if len(batch.items) >= self._limits.batch_files or batch.size >= self._limits.batch_bytes:
            await self._submit()

    async def _submit(self) -> None:
        if not self._batch.items:
            return
        batch, self._batch = self._batch, _Batch()
        try:
            while len(self._in_flight) >= self._limits.batches_in_flight:
                await self._in_flight.popleft()
        except BaseException:
            _release(self._jail, batch)  # never handed to the disk: free its reservations
            raise
        self._in_flight.append(asyncio.create_task(self._write(batch)))

    async def _write(self, batch: _Batch) -> None:
        files = [item for _, item in batch.items]
        results: list[BaseException | None]
        try:
            results = list(await self._thread(self._jail.write_batch, files))
        except Exception as err:  # every file of the batch must be answered
            _LOGGER.exception("Writing a batch for %s failed", self._jail.name)
            results = [err] * len(files)
        finally:
            self._budget.give(batch.held)
        done = [
            req for (req, _), result in zip(batch.items, results, strict=True) if result is None
        ]
        try:
            if done:
                self._send(protocol.ok(*done))
            for (req, _), result in zip(batch.items, results, strict=True):
                if result is not None:
                    self._send_error(req, result)
        except ConnectionError, asyncssh.Error:
            pass  # the peer is gone: it hears nothing, and its next run finds these files

    async def _flush(self) -> None:
        await self._submit()
        while self._in_flight:
            await self._in_flight.popleft()

    # --- large files ---------------------------------------------------------------------

    async def _open(self, body: bytes) -> None:
        request = protocol.parse_open(body)
        try:
            upload = await self._thread(
                self._jail.begin_upload, request.path, request.size, request.mtime_ns, request.mode
            )
        except (MyNasError, OSError) as err:
            self._send_error(request.req, err)
            return
        self._upload = _OpenUpload(request.req, upload)
        self._send(protocol.offset(request.req, upload.offset))

    def _data(self, body: bytes) -> None:
        req, chunk = protocol.parse_data(body)
        state = self._upload
        if state is None or state.req != req:
            raise ProtocolError("DATA for no open upload")
        state.chunks.append(chunk)
        state.held += _cost(body)
        if state.held >= self._limits.upload_group:
            self._write_chunks()

    def _write_chunks(self) -> None:
        """Start writing the open upload's chunks in a worker thread, if it is not already."""
        state = self._upload
        if state is not None and state.chunks and state.writer is None:
            state.writer = asyncio.create_task(self._writing(state))

    async def _writing(self, state: _OpenUpload) -> None:
        """Write the chunks in order, all that came meanwhile in each thread hop."""
        try:
            while state.chunks:
                chunks, held = state.chunks, state.held
                state.chunks, state.held = [], 0
                try:
                    if state.error is None:
                        await self._thread(state.upload.write_many, chunks)
                except (MyNasError, OSError) as err:
                    state.error = err
                finally:
                    self._budget.give(held)
        finally:
            state.writer = None

    async def _close(self, body: bytes) -> None:
        req, how = protocol.parse_close(body)
        state = self._upload
        if state is None or state.req != req:
            raise ProtocolError("CLOSE for no open upload")
        self._write_chunks()
        if state.writer is not None:
            await asyncio.shield(state.writer)  # see _teardown: never cancelled mid-write
        self._upload = None
        upload = state.upload
        try:
            if state.error is not None:
                await self._thread(upload.discard)
                raise state.error
            if how is protocol.Close.FINISH:
                await self._thread(_finish_or_keep, upload)
            elif how is protocol.Close.ABANDON:
                await self._thread(upload.abandon)
            else:
                await self._thread(upload.discard)
        except (MyNasError, OSError) as err:
            self._send_error(req, err)
            return
        self._send(protocol.ok(req))

    # --- single operations -----------------------------------------------------------------

    async def _simple(self, req: int, func: Callable[..., object], *args: Any) -> None:
        try:
            await self._thread(func, *args)
        except (MyNasError, OSError) as err:
            self._send_error(req, err)
        else:
            self._send(protocol.ok(req))

    def _parse_op(self, kind: Frame, body: bytes) -> _Op:
        if kind is Frame.DELETE:
            req, path = protocol.parse_path(body)
            return req, self._jail.delete, (path,)
        req, mtime_ns, path = protocol.parse_time(body)
        if kind is Frame.MKDIR:
            return req, self._jail.make_dir, (path, None if mtime_ns < 0 else mtime_ns)
        return req, self._jail.set_mtime, (path, mtime_ns)

    async def _ops(self, kind: Frame, body: bytes) -> None:
        """DELETE, MKDIR, UTIME: this one and those right behind it, in one thread hop.

        A push ends with a MKDIR per directory and a cleanup sends DELETE after DELETE:
        one hop (and one syncfs, so that a move into the trash is durable before its OK)
        for each group instead of one hop per request. Only frames already read are taken,
        in order, so nothing waits for more to come.
        """
        ops = [self._parse_op(kind, body)]
        broken: ProtocolError | None = None
        while len(ops) < _MAX_OPS and self._frames.peek() in _OPS:
            kind, body = await self._frames.read_frame()  # whole and small: no wait
            self._budget.give(_cost(body))
            try:
                ops.append(self._parse_op(kind, body))
            except ProtocolError as err:
                broken = err  # answer those before it, then end the session
                break
        results = await self._thread(_run_ops, self._jail, ops)
        done = [req for (req, _, _), result in zip(ops, results, strict=True) if result is None]
        if done:
            self._send(protocol.ok(*done))
        for (req, _, _), result in zip(ops, results, strict=True):
            if result is not None:
                self._send_error(req, result)
        if broken is not None:
            raise broken

    async def _sync(self, body: bytes) -> None:
        self._send(protocol.ok(protocol.request_id(body)))

    async def _query(self, body: bytes) -> None:
        req, request = protocol.parse_query(body)
        op = request.get("op")
        if op == "usage":
            usage = self._jail.usage()
            disk = await self._thread(_disk_free, self._jail.root)
            self._send(
                protocol.reply(
                    req,
                    {"used": usage.used, "quota": usage.quota, "disk_free": disk},
                )
            )
        elif op == "retention":
            folder, days = request.get("folder"), request.get("days")
            if not isinstance(folder, str) or not isinstance(days, int):
                raise ProtocolError("retention needs a folder name and a number of days")
            await self._simple(req, self._jail.set_retention, folder, days)
        else:
            raise ProtocolError(f"unknown query {op!r}")

    # --- streams from the host -------------------------------------------------------------

    async def _list(self, body: bytes) -> None:
        req, with_hash, path = protocol.parse_list(body)
        entries = self._jail.list(path) if path else self._jail.list()
        source = _Chunks(entries, with_hash, self._jail)
        try:
            while chunk := await self._thread(source.next_chunk):
                for item, digest in chunk:
                    self._send(protocol.entry(req, item, digest))
                await self._writer.drain()
        except (MyNasError, OSError) as err:
            self._send_error(req, err)
            return
        self._send(protocol.done(req))

    async def _read(self, body: bytes) -> None:
        req, path = protocol.parse_path(body)
        try:
            reader = await self._thread(_TreeReader, self._jail, path)
            while chunk := await self._thread(reader.next_chunk):
                for item, content in chunk:
                    self._send(protocol.entry(req, item))
                    if content is not None:
                        for start in range(0, len(content), protocol.CHUNK):
                            self._send(protocol.data(req, content[start : start + protocol.CHUNK]))
                    elif item.kind is Kind.FILE:
                        await self._stream_large(req, item)
                    await self._writer.drain()
        except (MyNasError, OSError) as err:
            self._send_error(req, err)
            return
        self._send(protocol.done(req))

    async def _stream_large(self, req: int, item: Entry) -> None:
        fd = await self._thread(self._jail.open_read, item.path)
        try:
            remaining = item.size
            position = 0
            while remaining > 0:
                piece = await self._thread(os.pread, fd, min(protocol.CHUNK, remaining), position)
                if not piece:
                    raise MyNasError(f"{item.path!r} shrank while being read")
                self._send(protocol.data(req, piece))
                position += len(piece)
                remaining -= len(piece)
                await self._writer.drain()
        finally:
            os.close(fd)

    _handlers: ClassVar[dict[Frame, Callable[[ReplicationSession, bytes], Awaitable[None]]]] = {
        Frame.OPEN: _open,
        Frame.CLOSE: _close,
        Frame.SYNC: _sync,
        Frame.QUERY: _query,
        Frame.LIST: _list,
        Frame.READ: _read,
    }


def _run_ops(jail: Jail, ops: list[_Op]) -> list[BaseException | None]:
    """Carry out DELETE/MKDIR/UTIME requests in order; make them durable; one result each."""
    results: list[BaseException | None] = []
    for _, func, args in ops:
        try:
            func(*args)
        except (MyNasError, OSError) as err:
            results.append(err)
        else:
            results.append(None)
    if any(result is None for result in results):
        try:
            jail.sync()  # a move into the trash is a rename: durable before its OK
        except OSError as err:
            results = [err if result is None else result for result in results]
    return results


def _finish_or_keep(upload: Upload) -> None:
    """Finish an upload; if it cannot be (bytes missing, disk error), keep it for a resume.

    A failed finish leaves the upload open: ending it here frees its file descriptor, its
    upload slot and its reservation, which would otherwise stay held until a restart.
    """
    try:
        upload.finish()
    except BaseException:
        upload.abandon()
        raise


def _release(jail: Jail, batch: _Batch) -> None:
    """Give back the quota reservations of a batch that will never be written.

    (Its budget bytes go back when the session's budget is closed.)
    """
    for _, item in batch.items:
        jail.quota.release(charge(len(item.data)))


def _failure(req: int, err: BaseException) -> bytes:
    """Encode the FAIL frame that tells the client what went wrong."""
    if isinstance(err, QuotaExceeded):
        return protocol.fail(
            req, FailCode.QUOTA, str(err), needed=err.needed, available=err.available
        )
    if isinstance(err, PeerDiskFull):
        return protocol.fail(req, FailCode.DISK_FULL, str(err))
    if isinstance(err, PathRefused):
        return protocol.fail(req, FailCode.PATH, str(err))
    if isinstance(err, FileNotFoundError):
        return protocol.fail(req, FailCode.MISSING, "no such file or directory")
    if isinstance(err, OSError):
        return protocol.fail(req, FailCode.IO, err.strerror or str(err))
    return protocol.fail(req, FailCode.IO, str(err))


def _disk_free(path: str | os.PathLike[str]) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


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
