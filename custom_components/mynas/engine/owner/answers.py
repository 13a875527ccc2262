"""The host's answers, matched to the requests that wait for them.

The host answers every request exactly once, in the order it finished the work (see
``protocol``). A request either waits for its answer (a future: OPEN, CLOSE, SYNC, QUERY),
hears it through a callback without being awaited (PUT, DELETE, MKDIR, UTIME: the batched
path), or reads a stream of ENTRY and DATA frames that DONE or FAIL ends (LIST, READ). A
stream whose reader left early is abandoned: the rest of its answer is dropped, and an
answer to no request at all breaks the protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import protocol
from ..errors import HostRefused, MyNasError, PeerDiskFull, ProtocolError, QuotaExceeded
from ..protocol import FailCode, Frame

type AckCallback = Callable[[MyNasError | None], None]

# Frames of one stream queued at most: a slow reader stops the dispatcher, which stops
# reading the channel (SSH flow control then holds the host back).
_STREAM_QUEUE = 256


def error_from_fail(info: dict[str, Any]) -> MyNasError:
    """Turn a FAIL frame's body into the error it stands for."""
    code = str(info.get("code", ""))
    message = str(info.get("message", "refused by the host"))
    if code == FailCode.QUOTA:
        return QuotaExceeded(int(info.get("needed", 0)), int(info.get("available", 0)))
    if code == FailCode.DISK_FULL:
        # Hosts send the whole sentence ("the peer's disk is full: ..."): keep its detail.
        return PeerDiskFull(message.removeprefix(PeerDiskFull().args[0] + ": "))
    return HostRefused(code, message)


@dataclass(slots=True)
class Stream:
    """Where the frames of a LIST or READ answer go, in order."""

    queue: asyncio.Queue[tuple[Frame, Any]]
    # Set when the connection is lost: the consumer must hear it even if the queue is full.
    error: MyNasError | None = None


class Answers:
    """The requests waiting for an answer, and what each answer does."""

    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        self._callbacks: dict[int, AckCallback] = {}
        self._streams: dict[int, Stream] = {}
        # Streams whose reader stopped early: their frames are dropped until DONE or FAIL.
        self.abandoned: set[int] = set()

    @property
    def pending(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._waiters) + len(self._callbacks) + len(self._streams)

    def expect(self, req: int) -> asyncio.Future[Any]:
        """Return the future that the answer to ``req`` resolves (FAIL: its error)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[req] = future
        return future

    def notify(self, req: int, on_done: AckCallback) -> None:
        """Have the answer to ``req`` call ``on_done`` (None, or the error FAIL stands for)."""
        self._callbacks[req] = on_done

    def open_stream(self, req: int) -> Stream:
        """Return where the frames answering ``req`` will be queued."""
        stream = Stream(asyncio.Queue(_STREAM_QUEUE))
        self._streams[req] = stream
        return stream

    def close_stream(self, req: int, stream: Stream, *, finished: bool) -> None:
        """Forget a stream; unless ``finished``, drop the rest of its answer as it comes."""
        if self._streams.pop(req, None) is not None and not finished:
            # The reader left early (an error, a break): unless its end is already
            # here, the host is still answering and the rest must be dropped.
            while not finished and not stream.queue.empty():
                finished = stream.queue.get_nowait()[0] in (Frame.DONE, Frame.FAIL)
            if not finished:
                self.abandoned.add(req)

    async def handle(self, kind: Frame, body: bytes) -> None:
        """Deliver one frame from the host; ProtocolError if it answers nothing asked."""
        if kind is Frame.OK:
            for req in protocol.parse_ok(body):
                self._resolve(req, None)
        elif kind is Frame.FAIL:
            req, info = protocol.parse_fail(body)
            error = error_from_fail(info)
            stream = self._streams.get(req)
            if stream is not None:
                await stream.queue.put((Frame.FAIL, error))
            elif req in self.abandoned:
                self.abandoned.discard(req)
            else:
                self._resolve(req, error)
        elif kind is Frame.OFFSET:
            req, position = protocol.parse_offset(body)
            self._resolve(req, None, position)
        elif kind is Frame.REPLY:
            req, answer = protocol.parse_reply(body)
            self._resolve(req, None, answer)
        elif kind is Frame.ENTRY:
            req, item, digest = protocol.parse_entry(body)
            await self._to_stream(req, Frame.ENTRY, (item, digest))
        elif kind is Frame.DATA:
            req, chunk = protocol.parse_data(body)
            await self._to_stream(req, Frame.DATA, chunk)
        elif kind is Frame.DONE:
            req = protocol.request_id(body)
            await self._to_stream(req, Frame.DONE, None)
        else:
            raise ProtocolError(f"unexpected {kind.name} from the host")

    async def _to_stream(self, req: int, kind: Frame, value: Any) -> None:
        stream = self._streams.get(req)
        if stream is None:
            if req in self.abandoned:
                if kind is Frame.DONE:
                    self.abandoned.discard(req)
                return
            raise ProtocolError(f"{kind.name} for no open request")
        await stream.queue.put((kind, value))

    def _resolve(self, req: int, error: MyNasError | None, value: Any = None) -> None:
        callback = self._callbacks.pop(req, None)
        if callback is not None:
            callback(error)
            return
        future = self._waiters.pop(req, None)
        if future is None:
            raise ProtocolError(f"answer to unknown request {req}")
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def fail_all(self, error: MyNasError) -> None:
        """Answer every pending request with ``error`` (the connection is gone)."""
        for callback in self._callbacks.values():
            callback(error)
        self._callbacks.clear()
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(error)
        self._waiters.clear()
        for stream in self._streams.values():
            # The reader gets what was already queued, then the error (never a hang on a
            # full queue: it checks ``error`` before each wait).
            stream.error = error
            if not stream.queue.full():
                stream.queue.put_nowait((Frame.FAIL, error))
        self._streams.clear()
        self.abandoned.clear()
