"""The replication protocol, served to one authenticated peer on one channel.

``protocol`` says what the frames are; this is what the host does with them, in its
peer's jail: PUTs of small files gathered into batches that one worker thread writes (one
``syncfs`` each), uploads of large files streamed in groups of chunks (``session_upload``),
DELETE/MKDIR/UTIME carried out together, LIST/READ streamed back (``session_reads``),
USAGE and retention answered here, ANNOUNCE and CHECK handed to the server's record of
where its peers are (``reach``). Every byte of the peer's data held in memory is taken
from the session's and the peer's byte budgets before it is read (see ``server``), and
every disk operation runs in a worker thread (``session_io``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
import logging
import os
from typing import Any

import asyncssh
from asyncssh import SSHWriter

from .. import protocol
from ..errors import MyNasError, ProtocolError, QuotaExceeded
from ..protocol import Frame
from .budget import FRAME_COST, ByteBudget, frame_cost
from .jail import Jail
from .limits import Limits
from .quota import charge
from .reach import CheckRefused, SessionReach
from .session_io import SessionIO
from .session_reads import ReadStreams
from .session_upload import UploadReceiver
from .writes import IncomingFile

_LOGGER = logging.getLogger(__name__)


# Requests on paths that are answered in groups (see ReplicationSession._ops).
_OPS = frozenset({Frame.DELETE, Frame.MKDIR, Frame.UTIME})
_MAX_OPS = 256
# The usage answer says what the trash holds once this share of the quota is used (the
# trash is walked for it: not at every probe of a peer with room to spare).
TRASH_REPORTED_FROM = 0.9
type _Op = tuple[int, Callable[..., object], tuple[Any, ...]]


@dataclass(slots=True)
class _Batch:
    items: list[tuple[int, IncomingFile]] = field(default_factory=list)
    size: int = 0  # bytes of file data
    held: int = 0  # bytes of the session's budget its frames hold
    started: float = 0.0  # event loop time of its first file


class ReplicationSession:
    """Serves the replication protocol to one authenticated peer on one channel."""

    def __init__(
        self,
        limits: Limits,
        jail: Jail,
        reader: protocol.BufferedReader,
        writer: SSHWriter[bytes],
        budget: ByteBudget,
        reach: SessionReach | None = None,
    ) -> None:
        self._limits = limits
        self._reach = reach
        self._jail = jail
        self._frames = protocol.FrameReader(reader, charge=self._charge)
        self._io = io = SessionIO(writer)
        self._budget = budget
        self._batch = _Batch()
        self._in_flight: deque[asyncio.Task[None]] = deque()
        self._upload = UploadReceiver(limits, jail, io, budget)
        reads = ReadStreams(jail, io)
        self._loop = asyncio.get_running_loop()
        self._handlers: dict[Frame, Callable[[bytes], Awaitable[None]]] = {
            Frame.OPEN: self._upload.open,
            Frame.CLOSE: self._upload.close,
            Frame.SYNC: self._sync,
            Frame.QUERY: self._query,
            Frame.LIST: reads.list,
            Frame.READ: reads.read,
            Frame.HEADS: reads.heads,
        }
        if reach is not None:
            self._handlers[Frame.ANNOUNCE] = self._announce
            self._handlers[Frame.CHECK] = self._check

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
        cost = size + FRAME_COST
        if not self._budget.try_take(cost):
            # Before waiting, everything held must be on its way to the disk: the bytes
            # given back then are what the wait is for (see budget.py).
            await self._submit()
            self._upload.write_chunks()
            await self._budget.take(cost)

    async def _handshake(self) -> None:
        kind, body = await asyncio.wait_for(self._frames.read_frame(), self._limits.hello_timeout)
        self._budget.give(frame_cost(body))
        if kind is not Frame.HELLO:
            raise ProtocolError("expected HELLO")
        self._io.send(protocol.welcome(self._welcome()))

    def _welcome(self) -> dict[str, Any]:
        usage = self._jail.usage()
        return {
            "protocol": protocol.VERSION,
            "peer": self._jail.name,
            "quota": usage.quota,
            "used": usage.used,
            "chunk": protocol.CHUNK,
            "batch_bytes": self._limits.batch_bytes,
            "features": [
                feature
                for feature in protocol.FEATURES
                if self._reach is not None or feature not in ("announce", "check")
            ],
        }

    async def _teardown(self) -> None:
        # Data not yet handed to the disk is dropped (the client never got an OK for it):
        # give its reservations back. Batches already being written complete.
        _release(self._jail, self._batch)
        self._batch = _Batch()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        await self._upload.abandon()
        self._budget.close()  # whatever is still held goes back to the peer's budget

    async def _dispatch(self, kind: Frame, body: bytes) -> None:
        if kind is Frame.PUT:
            await self._put(body)
        elif kind is Frame.DATA:
            self._upload.data(body)
        else:
            self._budget.give(frame_cost(body))  # nothing of these bodies is kept
            if self._upload.is_open and kind is not Frame.CLOSE:
                raise ProtocolError(f"{kind.name} while an upload is open")
            handler = self._handlers.get(kind)
            if handler is None and kind not in _OPS:
                raise ProtocolError(f"unexpected {kind.name}")
            await self._flush()
            if handler is None:
                await self._ops(kind, body)
            else:
                await handler(body)
        if self._io.written:  # checked here: a coroutine per frame costs the small-file path
            # Bound what the writer holds: a peer that never reads its answers gets paused.
            await self._io.drain_written()

    # --- the batched path ------------------------------------------------------------------

    async def _put(self, body: bytes) -> None:
        # The path is checked (syntax and disk) by write_batch, in a worker thread.
        request = protocol.parse_put(body)
        try:
            self._jail.quota.reserve(charge(len(request.data)))
        except QuotaExceeded as err:
            self._budget.give(frame_cost(body))
            self._io.fail(request.req, err)
            return
        batch = self._batch
        if not batch.items:
            batch.started = self._loop.time()
        item = IncomingFile(request.path, request.data, request.mtime_ns, request.mode)
        batch.items.append((request.req, item))
        batch.size += len(request.data)
        batch.held += frame_cost(body)
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
            results = list(await self._io.thread(self._jail.write_batch, files))
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
                self._io.send(protocol.ok(*done))
            for (req, _), result in zip(batch.items, results, strict=True):
                if result is not None:
                    self._io.fail(req, result)
        except ConnectionError, asyncssh.Error:
            pass  # the peer is gone: it hears nothing, and its next run finds these files

    async def _flush(self) -> None:
        await self._submit()
        while self._in_flight:
            await self._in_flight.popleft()

    # --- single operations -----------------------------------------------------------------

    async def _simple(self, req: int, func: Callable[..., object], *args: Any) -> None:
        try:
            await self._io.thread(func, *args)
        except (MyNasError, OSError) as err:
            self._io.fail(req, err)
        else:
            self._io.send(protocol.ok(req))

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
            self._budget.give(frame_cost(body))
            try:
                ops.append(self._parse_op(kind, body))
            except ProtocolError as err:
                broken = err  # answer those before it, then end the session
                break
        results = await self._io.thread(_run_ops, self._jail, ops)
        done = [req for (req, _, _), result in zip(ops, results, strict=True) if result is None]
        if done:
            self._io.send(protocol.ok(*done))
        for (req, _, _), result in zip(ops, results, strict=True):
            if result is not None:
                self._io.fail(req, result)
        if broken is not None:
            raise broken

    async def _sync(self, body: bytes) -> None:
        self._io.send(protocol.ok(protocol.request_id(body)))

    async def _query(self, body: bytes) -> None:
        req, request = protocol.parse_query(body)
        op = request.get("op")
        if op == "usage":
            usage = self._jail.usage()
            disk = await self._io.thread(_disk_free, self._jail.root)
            answer: dict[str, Any] = {"used": usage.used, "quota": usage.quota, "disk_free": disk}
            if usage.used + usage.reserved >= usage.quota * TRASH_REPORTED_FROM:
                answer.update(await self._io.thread(self._jail.trash_report))
            self._io.send(protocol.reply(req, answer))
        elif op == "folders":
            # Answered from this session's jail only: no field of the request names a place.
            folders, more = await self._io.thread(self._jail.folders)
            self._io.send(
                protocol.reply(
                    req,
                    {
                        "folders": [
                            {
                                "name": item.name.hex(),
                                "files": item.files,
                                "bytes": item.bytes,
                                "changed": round(item.changed, 3),
                            }
                            for item in folders
                        ],
                        "more": more,
                    },
                )
            )
        elif op == "stat":
            try:
                path = bytes.fromhex(str(request.get("path")))
            except ValueError:
                raise ProtocolError("stat needs a path in hex") from None
            try:
                found = await self._io.thread(self._jail.stat, path)
            except FileNotFoundError, NotADirectoryError:
                self._io.send(protocol.reply(req, {"kind": None}))
            except (MyNasError, OSError) as err:
                self._io.fail(req, err)
            else:
                self._io.send(protocol.reply(req, {"kind": str(found.kind)}))
        elif op == "retention":
            folder, days = request.get("folder"), request.get("days")
            if not isinstance(folder, str) or not isinstance(days, int):
                raise ProtocolError("retention needs a folder name and a number of days")
            await self._simple(req, self._jail.set_retention, folder, days)
        else:
            raise ProtocolError(f"unknown query {op!r}")

    async def _announce(self, body: bytes) -> None:
        req, addresses = protocol.parse_announce(body)
        assert self._reach is not None
        try:
            self._reach.announce(addresses)
        except ValueError as err:
            self._io.send(protocol.fail(req, protocol.FailCode.INVALID, str(err)))
        else:
            self._io.send(protocol.ok(req))

    async def _check(self, body: bytes) -> None:
        req, addresses = protocol.parse_check(body)
        assert self._reach is not None
        try:
            answer = await self._reach.check(addresses)
        except CheckRefused as err:
            self._io.send(
                protocol.fail(
                    req, protocol.FailCode.BUSY, str(err), retry_after=round(err.retry_after)
                )
            )
        except ValueError as err:
            self._io.send(protocol.fail(req, protocol.FailCode.INVALID, str(err)))
        else:
            self._io.send(protocol.reply(req, answer))


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


def _release(jail: Jail, batch: _Batch) -> None:
    """Give back the quota reservations of a batch that will never be written.

    (Its budget bytes go back when the session's budget is closed.)
    """
    for _, item in batch.items:
        jail.quota.release(charge(len(item.data)))


def _disk_free(path: str | os.PathLike[str]) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize
