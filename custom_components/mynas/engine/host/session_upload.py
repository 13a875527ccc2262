"""OPEN, DATA..., CLOSE: the one large file a replication session may be receiving.

The chunks are written in order by one writer task, all that came meanwhile in each thread
hop (``Limits.upload_group`` bytes of them start a write); the session's budget gets each
chunk's bytes back once it is written. A write is never cancelled: a thread cannot be
stopped, and the partial must not be closed under it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .. import protocol
from ..errors import MyNasError, ProtocolError
from .budget import ByteBudget, frame_cost
from .jail import Jail
from .limits import Limits
from .session_io import SessionIO
from .upload import Upload


@dataclass(slots=True)
class _OpenUpload:
    req: int
    upload: Upload
    chunks: list[memoryview] = field(default_factory=list)
    held: int = 0  # budget bytes of the chunks not yet handed to the writer
    writer: asyncio.Task[None] | None = None
    error: BaseException | None = None


class UploadReceiver:
    """Receives the large files of one session, one at a time, into the jail's partials."""

    def __init__(self, limits: Limits, jail: Jail, io: SessionIO, budget: ByteBudget) -> None:
        self._limits = limits
        self._jail = jail
        self._io = io
        self._budget = budget
        self._state: _OpenUpload | None = None

    @property
    def is_open(self) -> bool:
        """Whether an upload is open (between its OPEN and its CLOSE)."""
        return self._state is not None

    async def open(self, body: bytes) -> None:
        """OPEN: start or resume an upload; the answer says from which offset."""
        request = protocol.parse_open(body)
        try:
            upload = await self._io.thread(
                self._jail.begin_upload, request.path, request.size, request.mtime_ns, request.mode
            )
        except (MyNasError, OSError) as err:
            self._io.fail(request.req, err)
            return
        self._state = _OpenUpload(request.req, upload)
        self._io.send(protocol.offset(request.req, upload.offset))

    def data(self, body: bytes) -> None:
        """DATA: keep a chunk (its bytes are taken from the budget already)."""
        req, chunk = protocol.parse_data(body)
        state = self._state
        if state is None or state.req != req:
            raise ProtocolError("DATA for no open upload")
        state.chunks.append(chunk)
        state.held += frame_cost(body)
        if state.held >= self._limits.upload_group:
            self.write_chunks()

    def write_chunks(self) -> None:
        """Start writing the open upload's chunks in a worker thread, if it is not already."""
        state = self._state
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
                        await self._io.thread(state.upload.write_many, chunks)
                except (MyNasError, OSError) as err:
                    state.error = err
                finally:
                    self._budget.give(held)
        finally:
            state.writer = None

    async def close(self, body: bytes) -> None:
        """CLOSE: finish, abandon (keep for a resume) or discard the open upload."""
        req, how = protocol.parse_close(body)
        state = self._state
        if state is None or state.req != req:
            raise ProtocolError("CLOSE for no open upload")
        self.write_chunks()
        if state.writer is not None:
            await asyncio.shield(state.writer)  # see abandon(): never cancelled mid-write
        self._state = None
        upload = state.upload
        try:
            if state.error is not None:
                await self._io.thread(upload.discard)
                raise state.error
            if how is protocol.Close.FINISH:
                await self._io.thread(_finish_or_keep, upload)
            elif how is protocol.Close.ABANDON:
                await self._io.thread(upload.abandon)
            else:
                await self._io.thread(upload.discard)
        except (MyNasError, OSError) as err:
            self._io.fail(req, err)
            return
        self._io.send(protocol.ok(req))

    async def abandon(self) -> None:
        """The session ends: keep what is on disk of an open upload for a resume."""
        state, self._state = self._state, None
        if state is None:
            return
        state.chunks.clear()  # never written: the partial ends where the disk has it
        # Never cancelled: a write running in a worker thread would go on while
        # abandon() closes its file. The writer ends after the chunks it holds.
        if state.writer is not None:
            await asyncio.gather(asyncio.shield(state.writer), return_exceptions=True)
        await self._io.thread(state.upload.abandon)


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
