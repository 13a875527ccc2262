"""How a replication session and its parts reach the peer and the disk.

One ``SessionIO`` per session: frames written back to the peer (an error becomes the FAIL
frame that names it), the channel drained so that a peer that never reads its answers gets
paused, and blocking calls run in worker threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from asyncssh import SSHWriter

from .. import protocol
from ..errors import PathRefused, PeerDiskFull, QuotaExceeded
from ..protocol import FailCode


class SessionIO:
    """The peer's end of one session's channel, and the worker threads it hands work to."""

    def __init__(self, writer: SSHWriter[bytes]) -> None:
        self._writer = writer
        self._loop = asyncio.get_running_loop()
        self.written = False  # frames were written since the last drain_written()

    def send(self, data: bytes) -> None:
        """Write frames to the peer (not waiting for them to leave)."""
        self._writer.write(data)
        self.written = True

    def fail(self, req: int, err: BaseException) -> None:
        """Tell the peer that request ``req`` failed, and why."""
        self.send(failure(req, err))

    async def drain(self) -> None:
        """Wait until the channel takes more (the peer reads what was sent)."""
        await self._writer.drain()

    async def drain_written(self) -> None:
        """``drain`` what was written since the last call (callers check ``written`` first)."""
        self.written = False
        await self._writer.drain()

    async def thread[T](self, func: Callable[..., T], *args: Any) -> T:
        """Run blocking ``func(*args)`` in a worker thread."""
        return await self._loop.run_in_executor(None, func, *args)


def failure(req: int, err: BaseException) -> bytes:
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
