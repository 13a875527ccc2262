"""A bandwidth limit: a token bucket that makes the sender wait, never drops data."""

from __future__ import annotations

import asyncio
import time


class Throttle:
    """Lets at most ``rate`` bytes per second through, with bursts of up to one second."""

    def __init__(self, rate: int | None) -> None:
        """Limit to ``rate`` bytes/s; None or 0 means no limit."""
        self.rate = rate or 0
        self._tokens = float(self.rate)
        self._last = time.monotonic()

    async def consume(self, count: int) -> None:
        """Wait until ``count`` bytes may be sent."""
        if not self.rate:
            return
        now = time.monotonic()
        self._tokens = min(float(self.rate), self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= count
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)
