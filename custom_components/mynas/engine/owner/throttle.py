"""Bandwidth limits: token buckets that make the sender wait, never drop data.

A run's own limit (a folder's ``--bwlimit``) is a ``Throttle`` of its own; the node-wide
limits (one for uploads, one for downloads) are one ``Throttle`` each that every run of the
node shares: a run's throttle names it as ``shared`` and waits for both. A shared bucket
keeps its debt: when two runs take bytes at once, each waits until the bucket has paid for
everything taken before it, so together they never pass the rate (beyond one second's burst).
"""

from __future__ import annotations

import asyncio
import time


class Throttle:
    """Lets at most ``rate`` bytes per second through, with bursts of up to one second."""

    def __init__(self, rate: int | None, shared: Throttle | None = None) -> None:
        """Limit to ``rate`` bytes/s (None or 0: no limit of its own), and to ``shared``'s."""
        self.rate = rate or 0
        self.shared = shared
        self._tokens = float(self.rate)
        self._last = time.monotonic()

    async def consume(self, count: int) -> None:
        """Wait until ``count`` bytes may be sent."""
        if self.rate:
            now = time.monotonic()
            self._tokens = min(float(self.rate), self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= count
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)
        if self.shared is not None:
            await self.shared.consume(count)
