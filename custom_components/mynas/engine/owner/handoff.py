"""Batches from a worker thread to the event loop: bounded, in order, and stoppable.

A push scans (and reads and seals small files) in a worker thread while the loop sends; the
thread hands its work over through a ``Handoff``: a full queue holds the thread back (memory
stays bounded), the end or the exception that ended the thread reaches the loop in order
after the last batch, and ``stop`` releases a thread that waits on a loop which no longer
reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
import threading

from .run import QUEUE_BATCHES


class Handoff[T]:
    """A bounded queue of batches (``T``) from one worker thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int = QUEUE_BATCHES) -> None:
        """Hand over to ``loop``, at most ``size`` batches ahead of it."""
        # A batch; then None (the end) or the exception that ended the thread.
        self._queue: asyncio.Queue[T | BaseException | None] = asyncio.Queue(size)
        self._loop = loop
        self._stop = threading.Event()

    def stop(self) -> None:
        """Tell the thread to stop: its waiting (or next) ``put`` returns False."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        """Whether the loop told the thread to stop (work that cannot be handed over)."""
        return self._stop.is_set()

    # --- the worker thread's side ---------------------------------------------------------

    def feed(self, produce: Callable[[], bool]) -> None:
        """Run ``produce`` here, then hand over the end, or what it raised.

        ``produce`` ``put``s its batches and returns False if told to stop on the way.
        """
        try:
            if produce():
                self._put(None)
        except BaseException as err:  # handed to the loop, which re-raises
            self._put(err)

    def put(self, batch: T) -> bool:
        """Hand ``batch`` over, waiting while the queue is full; False once stopped."""
        return self._put(batch)

    def _put(self, item: T | BaseException | None) -> bool:
        future = asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop)
        while not self._stop.is_set():
            try:
                future.result(timeout=0.2)
                return True
            except TimeoutError:
                continue
        future.cancel()
        return False

    # --- the event loop's side ------------------------------------------------------------

    async def get(self) -> T | None:
        """Return the next batch, or None after the last; raise what ended the thread."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item
