"""Frames on their way into the SSH channel: coalesced into few writes of whole packets.

asyncssh sends every write as packets of its own (each preceded by an IGNORE packet, each one
``send()`` call), and the host copies its input per packet: a write per small file cost two
packets and two system calls per file on both sides. So the frames queued in one pass of the
event loop reach the channel in one write, sooner once ``COALESCE`` bytes wait; and a write
forced by size keeps back a tail shorter than one SSH packet, so a 256 KiB DATA frame never
costs one more, tiny, packet for its header.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
import contextlib
from typing import cast

import asyncssh

from ..errors import MyNasError
from ..protocol import Writer

# Wait for the SSH channel's flow control after queueing this much.
DRAIN_EVERY = 512 * 1024
# Queued frames reach the channel at the end of the loop's pass, or once this much waits.
COALESCE = 256 * 1024
# The data an SSH packet carries at most (asyncssh's default maximum packet size).
PACKET = 32 * 1024


class Outbox:
    """The frames not handed to the channel yet, in order, and how much since a drain."""

    def __init__(self, writer: Writer, broken: Callable[[BaseException], MyNasError]) -> None:
        """Write to ``writer``; a failed write raises what ``broken(error)`` returns."""
        self._writer = writer
        self._broken = broken
        self._out: list[bytes] = []
        self._size = 0
        self._scheduled = False
        self._closed = False
        self.unflushed = 0  # bytes queued since the last drain

    def put(self, data: bytes) -> None:
        """Queue a frame for the channel.

        It reaches the channel at the end of this pass of the event loop, with every other
        frame queued meanwhile, in order (or at once when COALESCE bytes wait).
        """
        self._out.append(data)
        self._size += len(data)
        self.unflushed += len(data)
        if self._size >= COALESCE:
            self.write_out(whole_packets=True)
        if self._out and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_write)

    def write_out(self, *, whole_packets: bool = False) -> None:
        """Hand the queued frames to the channel in one write.

        With ``whole_packets`` a tail shorter than one SSH packet stays queued: a 256 KiB
        DATA frame plus its header would otherwise cost one more (tiny) packet every time.
        """
        if not self._out:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        tail = len(data) % PACKET if whole_packets else 0
        self._size = tail
        if tail:
            self._out.append(data[-tail:])
            # The channel copies what it is given before write() returns.
            data = cast(bytes, memoryview(data)[:-tail])
        try:
            self._writer.write(data)
        except (asyncssh.Error, OSError) as err:
            raise self._broken(err) from None

    def _scheduled_write(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        with contextlib.suppress(MyNasError):  # ``broken`` failed everything pending
            self.write_out()

    async def drain(self) -> None:
        """Write everything queued, then wait for the channel's flow control."""
        self.write_out()
        self.unflushed = 0
        try:
            await self._writer.drain()
        except (asyncssh.Error, OSError) as err:
            raise self._broken(err) from None

    def clear(self) -> None:
        """Drop what is queued (the requests it carried are failing)."""
        self._out.clear()
        self._size = 0

    def close(self) -> None:
        """Drop what is queued and write nothing more."""
        self._closed = True
        self.clear()
